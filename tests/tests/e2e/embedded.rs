//! Embedded agents: the coordinator backs a database up itself, from
//! `targets.<name>.database_url` in its YAML file (the password from its
//! environment through `${VAR}`), with no agent process and no certificate
//! files for it — the standalone setup and the way to back up a managed
//! database. It behaves like any agent: listed, backed up, restored.

use std::time::Duration;

use datasaver_tests::procs::run;
use datasaver_tests::{assert_one_line_error, Fleet, FleetOptions, PgCluster};

fn config(dir: &std::path::Path, pg: &PgCluster, password_ref: &str) -> std::path::PathBuf {
    let path = dir.join("datasaver.yaml");
    std::fs::write(
        &path,
        format!(
            "targets:\n  app:\n    database_url: \"postgresql://postgres:{password_ref}@127.0.0.1:{}/app\"\n    schedule: \"off\"\n",
            pg.port()
        ),
    )
    .expect("write config");
    path
}

#[test]
fn the_coordinator_backs_up_a_database_it_reaches_itself() {
    let pg = PgCluster::new();
    pg.create_small_db("app", 300);
    let dir = datasaver_tests::short_tempdir("dsemb");
    let cfg = config(dir.path(), &pg, "${APP_DB_PASSWORD}");
    let fleet = Fleet::start_with(FleetOptions {
        enrollment: true,
        coordinator_env: vec![
            (
                "DATASAVER_CONFIG".into(),
                cfg.to_string_lossy().into_owned(),
            ),
            ("APP_DB_PASSWORD".into(), pg.password().to_string()),
            (
                "DATASAVER_PG_BIN_DIR".into(),
                pg.client_bindir().to_string_lossy().into_owned(),
            ),
        ],
        ..Default::default()
    });
    let listed = datasaver_tests::wait_until(Duration::from_secs(30), || {
        fleet.dsctl(&["agents"]).stdout.contains("embedded-app")
    });
    assert!(listed, "{}", fleet.coordinator().log());
    let agents = fleet.dsctl(&["agents"]).expect_success("dsctl agents");
    assert!(agents.stdout.contains("app"), "{}", agents.stdout);

    let b = fleet.backup("app", None);
    assert!(b.is_completed(), "{:?}", b.raw);
    fleet
        .restore(&b.id, "app_copy", &[])
        .expect_success("restore through the embedded agent");
    assert_eq!(
        pg.query_rows("app_copy", "SELECT id, v FROM t ORDER BY id"),
        pg.query_rows("app", "SELECT id, v FROM t ORDER BY id")
    );
    let log = fleet.coordinator().log();
    assert!(!log.contains(pg.password()), "the password reached the log");
    assert!(
        fleet.data_dir().join("embedded/app/agent.key").is_file(),
        "no key kept for the embedded agent"
    );
}

#[test]
fn an_embedded_target_with_bad_settings_stops_the_coordinator_with_one_line() {
    let pg = PgCluster::new();
    let fleet = Fleet::start();
    let dir = datasaver_tests::short_tempdir("dsembbad");

    // A variable that is not set: named, the URL not echoed.
    let cfg = config(dir.path(), &pg, "${NOT_SET_ANYWHERE}");
    let mut cmd = fleet.coordinator_command(&dir.path().join("d1"));
    cmd.env("DATASAVER_CONFIG", &cfg);
    let out = run(cmd, Duration::from_secs(30));
    assert!(out.code.is_some_and(|c| c != 0), "{}", out.describe());
    let line = assert_one_line_error(
        &out.stderr,
        "targets.app.database_url: ${NOT_SET_ANYWHERE} is not set in the coordinator's environment",
    );
    assert!(!line.contains("127.0.0.1"), "{line}");

    // A database URL without the enrollment CA to certify its agent.
    let cfg = config(dir.path(), &pg, "${APP_DB_PASSWORD}");
    let mut cmd = fleet.coordinator_command(&dir.path().join("d2"));
    cmd.env("DATASAVER_CONFIG", &cfg)
        .env("APP_DB_PASSWORD", "s3cret-pw");
    let out = run(cmd, Duration::from_secs(30));
    assert!(out.code.is_some_and(|c| c != 0), "{}", out.describe());
    let line = assert_one_line_error(
        &out.stderr,
        "targets.app: database_url needs the enrollment CA",
    );
    assert!(!line.contains("s3cret-pw"), "{line}");
}

/// The one-container setup, with processes: a coordinator given only a data
/// directory, `DATASAVER_TLS_AUTO`, a target and its database (what the
/// standalone image sets and the five compose lines add), and `dsctl` run
/// beside it with nothing but `DATASAVER_DATA_DIR`.
#[test]
fn a_standalone_coordinator_needs_no_certificate_steps() {
    use datasaver_tests::procs::{bin_path, clean_command, Proc, ProcSpec};
    use datasaver_tests::{free_port, tcp_port_open, wait_until};

    let pg = PgCluster::new();
    pg.create_small_db("app", 200);
    let dir = datasaver_tests::short_tempdir("dsstand");
    let data = dir.path().join("data");
    let grpc = free_port();
    let spec = ProcSpec::new(bin_path("datasaver-coordinator"))
        .env("DATASAVER_DATA_DIR", &data)
        .env("DATASAVER_TLS_AUTO", "true")
        .env("DATASAVER_GRPC_LISTEN", format!("127.0.0.1:{grpc}"))
        .env(
            "DATASAVER_HTTP_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("DATASAVER_TARGET", "app")
        .env(
            "DATASAVER_DATABASE_URL",
            format!("postgresql://postgres@127.0.0.1:{}/app", pg.port()),
        )
        .env("DATASAVER_DB_PASSWORD", pg.password())
        .env("DATASAVER_PG_BIN_DIR", pg.client_bindir())
        .env("DATASAVER_MIN_SCHEDULE_INTERVAL", "0s");
    let mut coordinator = Proc::spawn("standalone", spec, dir.path().join("standalone.log"));
    assert!(
        wait_until(Duration::from_secs(30), || tcp_port_open(grpc)),
        "{}",
        coordinator.log()
    );
    let dsctl = |args: &[&str]| {
        let mut c = clean_command(bin_path("dsctl"));
        c.env("DATASAVER_DATA_DIR", &data)
            .env(
                "DATASAVER_COORDINATOR_URL",
                format!("https://localhost:{grpc}"),
            )
            .args(args);
        run(c, Duration::from_secs(120))
    };
    assert!(
        wait_until(Duration::from_secs(30), || dsctl(&["agents"])
            .stdout
            .contains("embedded-app")),
        "{}",
        coordinator.log()
    );
    let out = dsctl(&["backup", "app"]).expect_success("dsctl backup");
    let id = out.stdout.trim().to_string();
    assert!(id.starts_with("app_"), "{}", out.describe());
    let list = dsctl(&["list"]).expect_success("dsctl list");
    assert!(list.stdout.contains(&id), "{}", list.stdout);
    dsctl(&["restore", &id, "--target-db", "app_copy"]).expect_success("dsctl restore");
    assert_eq!(
        pg.query_rows("app_copy", "SELECT id, v FROM t ORDER BY id"),
        pg.query_rows("app", "SELECT id, v FROM t ORDER BY id")
    );
    // A restart keeps the fleet it made: same CA, the backup still listed.
    let ca = std::fs::read(data.join("pki/ca.crt")).expect("ca.crt");
    coordinator.stop(Duration::from_secs(20));
    coordinator.respawn();
    assert!(wait_until(Duration::from_secs(30), || tcp_port_open(grpc)));
    assert_eq!(std::fs::read(data.join("pki/ca.crt")).expect("ca.crt"), ca);
    let list = dsctl(&["list"]);
    assert!(list.stdout.contains(&id), "{}", list.describe());
    assert!(
        !coordinator.log().contains(pg.password()),
        "password logged"
    );
}
