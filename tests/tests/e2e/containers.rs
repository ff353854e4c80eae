//! The images a user builds from `deploy/Dockerfile`, run the way a compose
//! file runs them: a Postgres container, a coordinator container and an
//! agent container on a podman network of their own. The agent joins with a
//! token (no certificate files), then a backup, a restore into a new
//! database with the rows checked, both containers restarted, and the
//! images' HEALTHCHECKs reporting healthy. Podman stands in for a Docker engine (none here), set
//! up by `tests/install-podman.sh` in `DATASAVER_TEST_PODMAN_DIR`; the images
//! take the binaries just built (`BINARIES=context`) and Debian's PostgreSQL
//! (`PG_SOURCE=debian`), since this machine reaches neither an image
//! registry nor apt.postgresql.org.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use datasaver_tests::procs::{bin_dir, clean_command, run, Output};
use datasaver_tests::{free_port, is_root, skip, wait_until};

/// podman with the test store and configuration.
struct Podman {
    dir: PathBuf,
    /// Containers and the network to remove at the end, whatever happened.
    containers: std::cell::RefCell<Vec<String>>,
    network: String,
}

impl Podman {
    fn find() -> Option<Podman> {
        let dir = std::env::var_os("DATASAVER_TEST_PODMAN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/opt/datasaver-test-podman"));
        if !dir.join("containers.conf").is_file() || !is_root() {
            return None;
        }
        Some(Podman {
            dir,
            containers: Default::default(),
            network: format!("ds-itest-{}", std::process::id()),
        })
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = clean_command("podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("store"))
            .args(["--storage-driver", "overlay"])
            .args(args);
        c
    }

    #[track_caller]
    fn ok(&self, args: &[&str], timeout: Duration) -> Output {
        run(self.cmd(args), timeout).expect_success(&format!("podman {}", args.join(" ")))
    }

    /// Builds `target` of deploy/Dockerfile from the workspace as a user
    /// would, switched only by its documented build arguments.
    fn build(&self, target: &str, tag: &str) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let bins = bin_dir();
        let rel = bins
            .strip_prefix(root.canonicalize().expect("workspace root"))
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|_| PathBuf::from("target/debug"));
        let mut c = self.cmd(&[
            "build",
            "--format",
            "docker",
            "--pull=never",
            "-f",
            "deploy/Dockerfile",
            "--target",
            target,
            "--build-arg",
            "BINARIES=context",
            "--build-arg",
            "PG_SOURCE=debian",
            "-t",
            tag,
        ]);
        c.arg("--build-arg")
            .arg(format!("BINARIES_DIR={}", rel.display()))
            .arg(".")
            .current_dir(&root);
        run(c, Duration::from_secs(600)).expect_success(&format!("podman build --target {target}"));
    }

    fn run_container(&self, name: &str, args: &[&str]) {
        self.containers.borrow_mut().push(name.to_string());
        let mut all = vec!["run", "-d", "--name", name, "--network", &self.network];
        all.extend_from_slice(args);
        self.ok(&all, Duration::from_secs(60));
    }

    /// The last lines of a container's log.
    fn logs(&self, name: &str) -> String {
        let o = run(self.cmd(&["logs", name]), Duration::from_secs(30));
        datasaver_tests::tail_lines(&format!("{}{}", o.stdout, o.stderr), 25)
    }

    /// psql in the Postgres container, one value.
    fn sql(&self, db: &str, sql: &str) -> String {
        self.ok(
            &[
                "exec", "pg", "psql", "-h", "/tmp", "-U", "postgres", "-d", db, "-XAtqc", sql,
            ],
            Duration::from_secs(60),
        )
        .stdout
        .trim()
        .to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for c in self.containers.borrow().iter() {
            let _ = run(
                self.cmd(&["rm", "-f", "-t", "2", c]),
                Duration::from_secs(60),
            );
        }
        let _ = run(
            self.cmd(&["network", "rm", "-f", &self.network]),
            Duration::from_secs(60),
        );
    }
}

/// Makes every file under `dir` readable by the images' user (uid 10001):
/// test certificates only, in a directory of the test's own.
fn readable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir).expect("certs dir").flatten() {
        let p = e.path();
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        if p.is_dir() {
            readable(&p);
        }
    }
}

#[test]
fn the_images_back_up_and_restore_a_database_in_containers() {
    let Some(podman) = Podman::find() else {
        skip("podman is not set up (run tests/install-podman.sh as root) or not root");
        return;
    };
    podman.build("coordinator", "localhost/datasaver-coordinator:itest");
    podman.build("agent", "localhost/datasaver-agent:itest");
    podman.build("standalone", "localhost/datasaver:itest");
    let version = podman
        .ok(
            &[
                "image",
                "inspect",
                "--format",
                "{{index .Labels \"org.opencontainers.image.version\"}} {{.Config.User}}",
                "localhost/datasaver-agent:itest",
            ],
            Duration::from_secs(30),
        )
        .stdout;
    assert_eq!(
        version.trim(),
        format!("{} 10001:10001", env!("CARGO_PKG_VERSION")),
        "OCI version label and non-root user"
    );
    podman.ok(
        &["network", "create", &podman.network],
        Duration::from_secs(30),
    );

    // Certificates as a user makes them: the coordinator is "coordinator" on
    // the network and 127.0.0.1 from here.
    let dir = datasaver_tests::short_tempdir("dsctr");
    let certs = dir.path().join("certs");
    let grpc = free_port();
    let http = free_port();
    let coordinator_url = format!("https://127.0.0.1:{grpc}");
    let dsctl = |args: &[&str]| {
        let mut c = clean_command(bin_dir().join("dsctl"));
        c.env("DATASAVER_COORDINATOR_URL", &coordinator_url)
            .env("DATASAVER_TLS_CA", certs.join("ca.crt"))
            .env("DATASAVER_TLS_CERT", certs.join("operator.crt"))
            .env("DATASAVER_TLS_KEY", certs.join("operator.key"))
            .args(args);
        run(c, Duration::from_secs(300))
    };
    let certs_s = certs.to_str().expect("utf-8 path");
    dsctl(&[
        "certs",
        "init",
        "--out",
        certs_s,
        "--san",
        "coordinator",
        "--san",
        "127.0.0.1",
        "--enrollment",
    ])
    .expect_success("dsctl certs init");
    std::fs::write(certs.join("pgpass"), "pg-secret-1\n").expect("password file");
    readable(&certs);
    let mount = format!("{certs_s}:/certs:ro");

    // Postgres: the agent image carries Debian's PostgreSQL server too.
    podman.run_container(
        "pg",
        &[
            "-v",
            &mount,
            "--entrypoint",
            "/bin/bash",
            "localhost/datasaver-agent:itest",
            "-c",
            "set -e; B=/usr/lib/postgresql/15/bin; D=/var/lib/datasaver/pg;
             $B/initdb -D $D -U postgres --auth-local=trust --auth-host=scram-sha-256 --pwfile=/certs/pgpass >/dev/null;
             echo 'host all all 0.0.0.0/0 scram-sha-256' >> $D/pg_hba.conf;
             exec $B/postgres -D $D -c listen_addresses='*' -k /tmp",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(60), || run(
            podman.cmd(&["exec", "pg", "pg_isready", "-h", "/tmp"]),
            Duration::from_secs(10)
        )
        .success()),
        "{}",
        podman.logs("pg")
    );
    podman.sql("postgres", "CREATE DATABASE shop");
    podman.sql(
        "shop",
        "CREATE TABLE orders (id int PRIMARY KEY, item text);
         INSERT INTO orders SELECT g, 'item ' || g FROM generate_series(1, 5000) g;",
    );

    let grpc_map = format!("127.0.0.1:{grpc}:50051");
    let http_map = format!("127.0.0.1:{http}:9090");
    podman.run_container(
        "coordinator",
        &[
            "-v",
            &mount,
            "-p",
            &grpc_map,
            "-p",
            &http_map,
            "-e",
            "DATASAVER_TLS_CA=/certs/ca.crt",
            "-e",
            "DATASAVER_TLS_CERT=/certs/coordinator.crt",
            "-e",
            "DATASAVER_TLS_KEY=/certs/coordinator.key",
            "-e",
            "DATASAVER_ENROLLMENT_CA_CERT=/certs/enrollment-ca.crt",
            "-e",
            "DATASAVER_ENROLLMENT_CA_KEY=/certs/enrollment-ca.key",
            "localhost/datasaver-coordinator:itest",
        ],
    );
    // A join token for the sidecar, as the README says: the address agents
    // reach the coordinator at, one use. It goes to the agent as a file.
    let mut token = None;
    let made = wait_until(Duration::from_secs(60), || {
        let out = dsctl(&[
            "tokens",
            "create",
            "--target",
            "shop",
            "--url",
            "https://coordinator:50051",
        ]);
        if out.success() {
            token = Some(out.stdout.trim().to_string());
        }
        out.success()
    });
    assert!(
        made,
        "no token from the coordinator container
{}",
        podman.logs("coordinator")
    );
    std::fs::write(certs.join("join-token"), token.unwrap_or_default()).expect("token file");
    readable(&certs);
    podman.run_container(
        "agent",
        &[
            "-v",
            &mount,
            "-e",
            "DATASAVER_COORDINATOR_URL=https://coordinator:50051",
            "-e",
            "DATASAVER_TARGET=shop",
            "-e",
            "DATASAVER_DATABASE_URL=postgres://postgres@pg:5432/shop",
            "-e",
            "DATASAVER_DB_PASSWORD_FILE=/certs/pgpass",
            "-e",
            "DATASAVER_JOIN_TOKEN_FILE=/certs/join-token",
            "-e",
            "DATASAVER_AGENT_NAME=shop-sidecar",
            "localhost/datasaver-agent:itest",
        ],
    );
    let describe = || {
        format!(
            "coordinator:\n{}\nagent:\n{}",
            podman.logs("coordinator"),
            podman.logs("agent")
        )
    };
    assert!(
        wait_until(Duration::from_secs(60), || {
            std::thread::sleep(Duration::from_millis(500));
            dsctl(&["--json", "agents"]).stdout.contains("shop-sidecar")
        }),
        "{}",
        describe()
    );
    let backup = dsctl(&["--json", "backup", "shop"]);
    assert!(backup.success(), "{}\n{}", backup.describe(), describe());
    let id = backup.json()["id"].as_str().expect("backup id").to_string();
    let restored = dsctl(&["restore", &id, "--target-db", "shop_copy"]);
    assert!(
        restored.success(),
        "{}\n{}",
        restored.describe(),
        describe()
    );
    assert_eq!(
        podman.sql("shop_copy", "SELECT count(*) || ' ' || sum(id) FROM orders"),
        podman.sql("shop", "SELECT count(*) || ' ' || sum(id) FROM orders")
    );

    // A restarted coordinator container, then a restarted agent container:
    // the agent comes back by itself with the certificate it keeps in its
    // state volume (the token had one use, spent on joining), and the next
    // backup works.
    podman.ok(
        &["restart", "-t", "10", "coordinator"],
        Duration::from_secs(120),
    );
    podman.ok(&["restart", "-t", "10", "agent"], Duration::from_secs(120));
    let again = (0..60).find_map(|_| {
        std::thread::sleep(Duration::from_secs(1));
        let b = dsctl(&["--json", "backup", "shop"]);
        b.success().then_some(b)
    });
    assert!(
        again.is_some(),
        "no backup after the restart\n{}",
        describe()
    );
    let tokens = dsctl(&["--json", "tokens", "list"]);
    assert!(tokens.success(), "{}", tokens.describe());
    assert_eq!(tokens.json()[0]["uses"], 1, "{}", tokens.stdout);

    // The standalone image, as standalone.yml's five lines run it: pointed
    // at a database, it backs it up into its own volume, and dsctl inside
    // it needs no flags.
    podman.run_container(
        "standalone",
        &[
            "-v",
            &mount,
            "-e",
            "DATASAVER_TARGET=shop-local",
            "-e",
            "DATASAVER_DATABASE_URL=postgres://postgres@pg:5432/shop",
            "-e",
            "DATASAVER_DB_PASSWORD_FILE=/certs/pgpass",
            "localhost/datasaver:itest",
        ],
    );
    let inside = |args: &[&str]| {
        let mut all = vec!["exec", "standalone", "dsctl"];
        all.extend_from_slice(args);
        run(podman.cmd(&all), Duration::from_secs(300))
    };
    assert!(
        wait_until(Duration::from_secs(60), || {
            std::thread::sleep(Duration::from_millis(500));
            inside(&["agents"]).stdout.contains("embedded-shop-local")
        }),
        "{}",
        podman.logs("standalone")
    );
    let local = inside(&["backup", "shop-local"]);
    assert!(
        local.success(),
        "{}\n{}",
        local.describe(),
        podman.logs("standalone")
    );
    let local_id = local.stdout.trim().to_string();
    let restored = inside(&["restore", &local_id, "--target-db", "shop_local_copy"]);
    assert!(
        restored.success(),
        "{}\n{}",
        restored.describe(),
        podman.logs("standalone")
    );
    assert_eq!(
        podman.sql(
            "shop_local_copy",
            "SELECT count(*) || ' ' || sum(id) FROM orders"
        ),
        podman.sql("shop", "SELECT count(*) || ' ' || sum(id) FROM orders")
    );

    // The images' own HEALTHCHECKs (liveness) pass in the running containers.
    for c in ["coordinator", "agent", "standalone"] {
        let h = run(
            podman.cmd(&["healthcheck", "run", c]),
            Duration::from_secs(60),
        );
        assert!(h.success(), "{c}: {}\n{}", h.describe(), describe());
    }
    // And a stopped database is what the agent's reports: not live.
    podman.ok(&["stop", "-t", "5", "pg"], Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(40), || !run(
            podman.cmd(&["healthcheck", "run", "agent"]),
            Duration::from_secs(30)
        )
        .success()),
        "the agent stayed healthy without its database"
    );
}
