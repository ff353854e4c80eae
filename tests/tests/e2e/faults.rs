//! Bad input and faults: each must fail loudly, with one clear line, and
//! leave nothing half-done behind (no completed row, no stray object, no
//! touched database).

use std::time::Duration;

use datasaver_tests::procs::Sig;
use datasaver_tests::{clean_command, files_under, run, wait_until, Fleet, PgCluster, ProcSpec};

fn one_line(s: &str) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected exactly one line, got:\n{s}");
    lines[0].to_string()
}

/// A fleet backing up a ~150 MB database (slow enough to interrupt), with a
/// `dsctl backup` running in a thread; returns once the upload's temp file
/// holds at least `min_bytes`.
fn backup_in_flight(
    min_bytes: u64,
) -> (
    PgCluster,
    Fleet,
    std::thread::JoinHandle<datasaver_tests::Output>,
) {
    let pg = PgCluster::new();
    pg.create_big_db("big");
    let mut fleet = Fleet::start();
    fleet.add_agent("big", &pg, "big");
    let handle = fleet.dsctl_in_flight(&["--quiet", "backup", "big"], min_bytes);
    (pg, fleet, handle)
}

fn small_db(pg: &PgCluster, db: &str) {
    pg.create_small_db(db, 20000);
}

#[test]
fn clients_without_a_fleet_certificate_are_refused() {
    let fleet = Fleet::start();
    let other = datasaver_tests::short_tempdir("dsother");
    let mut cmd = clean_command(datasaver_tests::bin_path("dsctl"));
    cmd.args(["certs", "init", "--out"]).arg(other.path());
    run(cmd, Duration::from_secs(60)).expect_success("second CA");

    // no client certificate at all
    let ca = fleet.certs_dir().join("ca.crt");
    let mut cmd = clean_command(datasaver_tests::bin_path("dsctl"));
    cmd.env("DATASAVER_TLS_CA", &ca)
        .args(["--coordinator", &fleet.coordinator_url(), "list"]);
    let out =
        run(cmd, Duration::from_secs(60)).expect_code(1, "dsctl without a client certificate");
    let line = one_line(&out.stderr);
    assert!(line.contains("client certificate"), "{line}");

    // a certificate from another CA
    let mut cmd = clean_command(datasaver_tests::bin_path("dsctl"));
    cmd.env("DATASAVER_TLS_CA", &ca)
        .env("DATASAVER_TLS_CERT", other.path().join("operator.crt"))
        .env("DATASAVER_TLS_KEY", other.path().join("operator.key"))
        .args(["--coordinator", &fleet.coordinator_url(), "list"]);
    let out =
        run(cmd, Duration::from_secs(60)).expect_code(1, "dsctl with another CA's certificate");
    let line = one_line(&out.stderr);
    assert!(line.contains("fleet CA"), "{line}");

    // trusting another CA: the coordinator's certificate is rejected by dsctl
    let out = fleet
        .dsctl_with(
            &["list"],
            &[(
                "DATASAVER_TLS_CA",
                other.path().join("ca.crt").to_str().unwrap(),
            )],
            Duration::from_secs(60),
        )
        .expect_code(1, "dsctl trusting another CA");
    let line = one_line(&out.stderr);
    assert!(line.contains("certificate"), "{line}");

    // an agent certificate cannot act as an operator
    let agent_dir = fleet.issue_agent_cert("sneaky");
    let out = fleet
        .dsctl_with(
            &["list"],
            &[
                (
                    "DATASAVER_TLS_CERT",
                    agent_dir.join("sneaky.crt").to_str().unwrap(),
                ),
                (
                    "DATASAVER_TLS_KEY",
                    agent_dir.join("sneaky.key").to_str().unwrap(),
                ),
            ],
            Duration::from_secs(60),
        )
        .expect_code(1, "dsctl with an agent certificate");
    assert!(one_line(&out.stderr).contains("operator"), "{}", out.stderr);

    // the refusals were logged by the coordinator with the reason
    let log = fleet.coordinator().log();
    assert!(log.contains("peer sent no certificates"), "{log}");
}

#[test]
fn agent_killed_mid_upload_leaves_nothing() {
    let (_pg, mut fleet, handle) = backup_in_flight(1_000_000);
    // part of the object is on disk: kill the agent
    fleet.agent_mut("big").proc.kill(Sig::Kill);
    let out = handle
        .join()
        .expect("dsctl thread")
        .expect_code(1, "dsctl backup whose agent died");
    let line = one_line(&out.stderr);
    assert!(line.contains("failed"), "{line}");

    // no completed backup, the attempt recorded as failed, nothing in storage
    let ok = wait_until(Duration::from_secs(30), || {
        fleet
            .list_backups(Some("big"))
            .iter()
            .all(|b| b.status == "failed")
    });
    let list = fleet.list_backups(Some("big"));
    assert!(ok && list.len() == 1, "{list:?}");
    assert!(list[0].raw["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(
        wait_until(Duration::from_secs(30), || files_under(
            &fleet.storage_dir()
        )
        .is_empty()),
        "storage must hold no object or temp file: {:?}",
        files_under(&fleet.storage_dir())
    );

    // the agent comes back and the next backup works
    fleet.agent_mut("big").proc.respawn();
    fleet.wait_agent_listed("big", Duration::from_secs(30));
    let b = fleet.backup("big", None);
    assert!(b.is_completed());
}

#[test]
fn coordinator_killed_mid_upload_recovers_on_restart() {
    let (_pg, mut fleet, handle) = backup_in_flight(0);
    fleet.kill_coordinator();
    handle
        .join()
        .expect("dsctl thread")
        .expect_code(1, "dsctl backup whose coordinator died");
    fleet.start_coordinator();
    let list = fleet.list_backups(Some("big"));
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].status, "failed", "{}", list[0].raw);
    assert!(
        files_under(&fleet.storage_dir()).is_empty(),
        "{:?}",
        files_under(&fleet.storage_dir())
    );
    // the agent reconnects by itself and the next backup completes
    fleet.wait_agent_listed("big", Duration::from_secs(60));
    assert!(fleet.backup("big", None).is_completed());
}

#[test]
fn corrupted_object_is_caught_before_any_restore() {
    let pg = PgCluster::new();
    small_db(&pg, "app");
    let mut fleet = Fleet::start();
    fleet.add_agent("app", &pg, "app");
    let good = fleet.backup("app", None);
    std::thread::sleep(Duration::from_millis(1100));
    let b = fleet.backup("app", None);
    let object = fleet
        .storage_dir()
        .join(format!("app/logical/{}.dump.zst", b.id));
    let mut bytes = std::fs::read(&object).expect("object");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&object, &bytes).expect("flip one byte");

    let out = fleet
        .dsctl(&["--quiet", "verify", &b.id])
        .expect_code(1, "verify of a corrupted object");
    let line = one_line(&out.stderr);
    assert!(line.contains(&b.id) && line.contains("checksum"), "{line}");

    let out = fleet
        .dsctl(&["--quiet", "restore", &b.id, "--target-db", "app_restored"])
        .expect_code(1, "restore of a corrupted object");
    let line = one_line(&out.stderr);
    assert!(
        line.contains("corrupt") && line.contains(&good.id),
        "should name the next-oldest good backup: {line}"
    );
    assert!(
        !pg.db_exists("app_restored"),
        "the target database must not be touched"
    );
    let got = fleet.get_backup(&b.id);
    assert!(
        got.raw["verify_result"]
            .as_str()
            .is_some_and(|r| r.starts_with("failed")),
        "{}",
        got.raw
    );

    // the good one still restores
    fleet.restore(&good.id, "app_restored", &[]);
    assert_eq!(
        pg.query_one("app_restored", "SELECT count(*) FROM t"),
        "20000"
    );
}

/// A truncated object is read once, refused before anything is committed — the live
/// database a `--force` restore would replace keeps its rows, no scratch database is left —
/// and the error names the next good backup from the catalog's verify results.
#[test]
fn truncated_object_never_replaces_a_database() {
    let pg = PgCluster::new();
    small_db(&pg, "app");
    let mut fleet = Fleet::start();
    fleet.add_agent("app", &pg, "app");
    let good = fleet.backup("app", None);
    fleet
        .dsctl(&["verify", &good.id])
        .expect_success("verify of the good backup");
    std::thread::sleep(Duration::from_millis(1100));
    pg.psql(
        "app",
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(20001, 30000) g;",
    );
    let b = fleet.backup("app", None);
    let object = fleet
        .storage_dir()
        .join(format!("app/logical/{}.dump.zst", b.id));
    let bytes = std::fs::read(&object).expect("object");
    std::fs::write(&object, &bytes[..bytes.len() * 6 / 10]).expect("truncate the object");

    let out = fleet
        .dsctl(&["--quiet", "restore", &b.id, "--target-db", "app", "--force"])
        .expect_code(1, "forced restore of a truncated object");
    let line = one_line(&out.stderr);
    assert!(
        line.contains("corrupt") && line.contains(&b.id) && line.contains(&good.id),
        "should say the backup is corrupt and name the next good one: {line}"
    );
    assert!(line.contains("verified"), "{line}");
    assert_eq!(
        pg.query_one("app", "SELECT count(*) FROM t"),
        "30000",
        "the live database must be untouched"
    );
    let scratch: Vec<String> = pg
        .databases()
        .into_iter()
        .filter(|d| d.contains("dsrestore"))
        .collect();
    assert!(scratch.is_empty(), "scratch databases left: {scratch:?}");

    let out = fleet
        .dsctl(&["--quiet", "restore", &b.id, "--target-db", "app_new"])
        .expect_code(1, "restore of a truncated object into a new database");
    assert!(one_line(&out.stderr).contains(&good.id), "{}", out.stderr);
    assert!(
        !pg.db_exists("app_new"),
        "the new database must not be left"
    );
    // The finding is kept with the backup.
    let got = fleet.get_backup(&b.id);
    assert!(
        got.raw["verify_result"]
            .as_str()
            .is_some_and(|r| r.starts_with("failed") && r.contains("corrupt")),
        "{}",
        got.raw
    );
}

#[test]
fn database_down_or_wrong_password_fails_clearly() {
    let mut pg = PgCluster::new();
    small_db(&pg, "app");
    let mut fleet = Fleet::start();
    let secret = "Wr0ng-Secret-Pa55";
    let spec = fleet
        .agent_spec("badpw", &pg, "app")
        .env("DATASAVER_DB_PASSWORD", secret);
    fleet.add_agent_spec("badpw", spec);
    fleet.add_agent("app", &pg, "app");

    let out = fleet
        .dsctl(&["--quiet", "backup", "badpw"])
        .expect_code(1, "backup with a wrong password");
    let line = one_line(&out.stderr);
    assert!(line.contains("password authentication failed"), "{line}");
    assert!(!line.contains(secret));
    let list = fleet.list_backups(Some("badpw"));
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].status, "failed");
    let err = list[0].raw["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        err.contains("password authentication failed") && !err.contains(secret),
        "{err}"
    );
    for log in [fleet.agent("badpw").proc.log(), fleet.coordinator().log()] {
        assert!(
            !log.contains(secret),
            "the password leaked into a log:\n{log}"
        );
    }

    pg.stop();
    let out = fleet
        .dsctl(&["--quiet", "backup", "app"])
        .expect_code(1, "backup with the database down");
    let line = one_line(&out.stderr);
    assert!(line.contains("cannot connect to database"), "{line}");
    assert!(!line.contains(pg.password()), "{line}");
    let list = fleet.list_backups(Some("app"));
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].status, "failed");
    assert!(files_under(&fleet.storage_dir()).is_empty());
    pg.start();
}

#[test]
fn bad_configuration_stops_with_one_line_naming_the_setting() {
    let pg = PgCluster::new();
    pg.create_db("app");
    let fleet = Fleet::start();
    let base = fleet.agent_spec("cfg", &pg, "app");
    let cases: Vec<(&str, &str, &str)> = vec![
        ("DATASAVER_COMPRESSION", "lz5", "DATASAVER_COMPRESSION"),
        (
            "DATASAVER_COORDINATOR_URL",
            "backup-host:50051",
            "DATASAVER_COORDINATOR_URL",
        ),
        (
            "DATASAVER_TLS_CERT",
            "/nonexistent/agent.crt",
            "DATASAVER_TLS_CERT",
        ),
        ("DATASAVER_TARGET", "Not A Valid Name", "DATASAVER_TARGET"),
        (
            "DATASAVER_COMPRESSION_LEVEL",
            "99",
            "DATASAVER_COMPRESSION_LEVEL",
        ),
        ("DATASAVER_DB_PORT", "port", "DATASAVER_DB_PORT"),
        (
            "DATASAVER_ENCRYPTION_RECIPIENT",
            "age1bogus",
            "DATASAVER_ENCRYPTION_RECIPIENT",
        ),
        (
            "DATASAVER_ENCRYPTION_IDENTITY_FILE",
            "/nonexistent/id.txt",
            "DATASAVER_ENCRYPTION_IDENTITY_FILE",
        ),
    ];
    for (key, value, setting) in cases {
        let spec: ProcSpec = base.clone().env(key, value);
        let mut cmd = clean_command(&spec.program);
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        let out = run(cmd, Duration::from_secs(30));
        assert!(!out.timed_out, "agent with {key}={value} kept running");
        assert!(
            out.code.is_some_and(|c| c != 0),
            "agent with {key}={value}: {}",
            out.describe()
        );
        let line = one_line(&out.stderr);
        assert!(line.contains(setting), "{key}={value}: {line}");
    }

    let coord_cases: Vec<(&str, &str, &str)> = vec![
        (
            "DATASAVER_STORAGE_BACKEND",
            "ftp",
            "DATASAVER_STORAGE_BACKEND",
        ),
        (
            "DATASAVER_TLS_KEY",
            "/nonexistent/coordinator.key",
            "DATASAVER_TLS_KEY",
        ),
        ("DATASAVER_GRPC_LISTEN", "nowhere", "DATASAVER_GRPC_LISTEN"),
    ];
    let data = datasaver_tests::short_tempdir("dscfg");
    for (key, value, setting) in coord_cases {
        let mut cmd = fleet.coordinator_command(data.path());
        cmd.env(key, value);
        let out = run(cmd, Duration::from_secs(30));
        assert!(
            !out.timed_out,
            "coordinator with {key}={value} kept running"
        );
        assert!(out.code.is_some_and(|c| c != 0), "{}", out.describe());
        let line = one_line(&out.stderr);
        assert!(line.contains(setting), "{key}={value}: {line}");
    }
}

#[test]
fn restore_of_unknown_id_touches_nothing() {
    let pg = PgCluster::new();
    small_db(&pg, "app");
    let mut fleet = Fleet::start();
    fleet.add_agent("app", &pg, "app");
    let before = pg.databases();
    for id in ["app_20200101_000000", "../../etc/passwd"] {
        let out = fleet
            .dsctl(&["--quiet", "restore", id, "--target-db", "app_x"])
            .expect_code(1, "restore of an unknown id");
        let line = one_line(&out.stderr);
        assert!(
            line.contains(id) || line.contains("not a backup id"),
            "{line}"
        );
    }
    assert_eq!(pg.databases(), before);
    assert!(fleet.list_backups(None).is_empty());
}

#[test]
fn pg_dump_older_than_the_server_never_completes() {
    let Some(newer) = PgCluster::newer_bindir() else {
        datasaver_tests::skip(
            "no newer PostgreSQL major version installed (tests/install-newer-pg.sh)",
        );
        return;
    };
    let pg = PgCluster::start_with_bindir(newer);
    small_db(&pg, "app");
    let old_tools = PgCluster::default_bindir();
    let mut fleet = Fleet::start();
    let spec = fleet
        .agent_spec("newer", &pg, "app")
        .env("DATASAVER_PG_BIN_DIR", &old_tools);
    fleet.add_agent_spec("newer", spec);
    let out = fleet
        .dsctl(&["--quiet", "backup", "newer"])
        .expect_code(1, "backup with an old pg_dump");
    let line = one_line(&out.stderr);
    let server_major = pg.major().to_string();
    let dump_major = datasaver_tests::pg::tool_major(&old_tools, "pg_dump")
        .unwrap_or(0)
        .to_string();
    assert!(
        line.contains(&format!("pg_dump {dump_major}"))
            && line.contains(&format!("PostgreSQL {server_major}")),
        "message must name both versions: {line}"
    );
    let list = fleet.list_backups(Some("newer"));
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].status, "failed");
    assert!(files_under(&fleet.storage_dir()).is_empty());
}

/// A `psql` session holding `LOCK TABLE t IN ACCESS EXCLUSIVE MODE` in an
/// open transaction, as an application's long migration would: `pg_dump`
/// waits behind it. Killed on drop.
struct LockHolder(std::process::Child);

impl LockHolder {
    fn take(pg: &PgCluster, db: &str) -> LockHolder {
        use std::io::Write;
        let mut cmd = pg.client_command("psql");
        cmd.env("PGAPPNAME", "lock-holder")
            .args(["-X", "-q", "-d", db])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().expect("start psql");
        let stdin = child.stdin.as_mut().expect("psql stdin");
        stdin
            .write_all(b"BEGIN;\nLOCK TABLE t IN ACCESS EXCLUSIVE MODE;\n")
            .expect("send the lock");
        stdin.flush().expect("flush");
        let held = wait_until(Duration::from_secs(30), || {
            pg.query_one(
                db,
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                 WHERE a.application_name = 'lock-holder' AND l.mode = 'AccessExclusiveLock'
                   AND l.granted AND l.relation = 't'::regclass",
            ) == "1"
        });
        assert!(held, "the lock holder did not get its lock");
        LockHolder(child)
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_backup_stuck_behind_a_lock_times_out_and_frees_its_slot() {
    let pg = PgCluster::new();
    small_db(&pg, "app");
    let mut fleet = Fleet::start_with(datasaver_tests::FleetOptions {
        coordinator_env: vec![("DATASAVER_JOB_TIMEOUT".into(), "5s".into())],
        ..Default::default()
    });
    fleet.add_agent("app", &pg, "app");
    let lock = LockHolder::take(&pg, "app");

    let out = fleet
        .dsctl(&["--quiet", "backup", "app"])
        .expect_code(1, "a backup stuck behind a lock");
    let line = one_line(&out.stderr);
    assert!(
        line.contains("timed out after 5s (DATASAVER_JOB_TIMEOUT)"),
        "{line}"
    );
    // The agent was told to stop: its pg_dump is gone, not left waiting on
    // the lock (and holding a connection) forever.
    let dumps = || {
        pg.query_one(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = 'datasaver-agent' AND datname = 'app'",
        )
    };
    assert!(
        wait_until(Duration::from_secs(15), || dumps() == "0"),
        "pg_dump still connected after the job timed out: {} session(s)",
        dumps()
    );
    let list = fleet.list_backups(Some("app"));
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].status, "failed");
    let err = list[0].raw["error"].as_str().unwrap_or_default();
    assert!(err.contains("DATASAVER_JOB_TIMEOUT"), "{err}");
    assert!(files_under(&fleet.storage_dir()).is_empty());

    // The lock goes away; the slot is free and the next backup completes.
    drop(lock);
    fleet.wait_agent_listed("app", Duration::from_secs(30));
    let b = fleet.backup("app", None);
    assert!(b.is_completed(), "{b:?}");
}

#[test]
fn coordinator_stopped_mid_upload_interrupts_the_backup_and_keeps_nothing() {
    let (_pg, mut fleet, handle) = backup_in_flight(0);
    // SIGTERM: the job tells its agent to stop and records how it ended
    // before the coordinator exits.
    fleet.stop_coordinator();
    handle
        .join()
        .expect("dsctl thread")
        .expect_code(1, "dsctl backup whose coordinator stopped");
    assert!(
        fleet
            .coordinator()
            .log()
            .contains("the coordinator is shutting down"),
        "{}",
        fleet.coordinator().log()
    );
    fleet.start_coordinator();
    let list = fleet.list_backups(Some("big"));
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].status, "interrupted", "{}", list[0].raw);
    assert!(
        files_under(&fleet.storage_dir()).is_empty(),
        "{:?}",
        files_under(&fleet.storage_dir())
    );
    fleet.wait_agent_listed("big", Duration::from_secs(60));
    assert!(fleet.backup("big", None).is_completed());
}
