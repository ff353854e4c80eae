//! Self-test of the harness: real Postgres clusters, the fidelity fixture, and a comparison
//! that passes on a faithful copy and fails (naming the object) on a changed one. Needs no
//! datasaver binary.

use datasaver_tests::fidelity::{
    compare_databases, dump_restore, load_fidelity, total_rows, FIDELITY_MIN_ROWS,
};
use datasaver_tests::{run, PgCluster};
use std::time::{Duration, Instant};

#[test]
fn harness_postgres_and_fidelity() {
    let t0 = Instant::now();
    let pg = PgCluster::new();
    eprintln!(
        "cluster up on port {} ({}) in {:?}",
        pg.port(),
        pg.server_version(),
        t0.elapsed()
    );

    let t = Instant::now();
    load_fidelity(&pg, "src");
    let rows = total_rows(&pg, "src").expect("count source rows");
    eprintln!("fidelity fixture loaded in {:?}: {rows} rows", t.elapsed());
    assert!(rows >= FIDELITY_MIN_ROWS, "fixture too small: {rows} rows");

    let t = Instant::now();
    pg.create_db("dst");
    dump_restore(&pg, "src", &pg, "dst").expect("pg_dump -Fc | pg_restore");
    eprintln!("reference dump|restore in {:?}", t.elapsed());

    let t = Instant::now();
    compare_databases(&pg, "src", &pg, "dst").expect("a faithful restore must compare equal");
    eprintln!("compare_databases (equal) in {:?}", t.elapsed());

    // One changed value in one row must be caught and the table named.
    pg.psql("dst", r#"UPDATE "Weird Schema"."Table With Spaces" SET "select" = 'changed' WHERE "Column A" = 42"#);
    let err = compare_databases(&pg, "src", &pg, "dst")
        .expect_err("a changed row must make the comparison fail");
    assert!(
        err.contains(r#""Weird Schema"."Table With Spaces""#),
        "error does not name the table:\n{err}"
    );
    assert!(
        err.contains("plain pg_dump output differs"),
        "the dump comparison did not notice:\n{err}"
    );
    eprintln!(
        "changed row detected:\n{}",
        err.lines().take(6).collect::<Vec<_>>().join("\n")
    );

    // Changing it back (which moves the tuple physically) compares equal again.
    pg.psql("dst", r#"UPDATE "Weird Schema"."Table With Spaces" SET "select" = 'sel 42' WHERE "Column A" = 42"#);
    compare_databases(&pg, "src", &pg, "dst").expect("row order must not matter");

    // Sequences, large objects and schema changes are caught too.
    pg.psql("dst", "SELECT setval('app.big_seq', 5)");
    let err = compare_databases(&pg, "src", &pg, "dst").expect_err("sequence change");
    assert!(err.contains("sequence app.big_seq"), "{err}");
    pg.psql(
        "dst",
        "SELECT setval('app.big_seq', 9223372036854000000, true)",
    );

    pg.psql(
        "dst",
        "SELECT lo_put((SELECT blob FROM app.documents WHERE id = 1), 0, '\\x01')",
    );
    let err = compare_databases(&pg, "src", &pg, "dst").expect_err("large object change");
    assert!(err.contains("large object oid"), "{err}");

    pg.psql(
        "dst",
        "SELECT lo_put((SELECT blob FROM app.documents WHERE id = 1), 0, '\\x00')",
    );
    compare_databases(&pg, "src", &pg, "dst").expect("large object restored");

    // Schema-only changes are caught by the catalog inventory, naming the object.
    pg.psql(
        "dst",
        "COMMENT ON TABLE app.events IS 'changed'; DROP INDEX app.orders_open_idx;",
    );
    let err = compare_databases(&pg, "src", &pg, "dst").expect_err("schema change");
    assert!(err.contains("catalog object relation app.events"), "{err}");
    assert!(
        err.contains("catalog object index app.orders_open_idx"),
        "{err}"
    );

    pg.psql("src", "CREATE DATABASE small");
    let err = datasaver_tests::compare_databases(&pg, "small", &pg, "small")
        .expect_err("empty db must not pass");
    assert!(err.contains("nothing meaningful to compare"), "{err}");
    eprintln!("total {:?}", t0.elapsed());
}

#[test]
fn harness_postgres_password_stop_start() {
    let mut pg = PgCluster::new();
    pg.create_db("app");
    pg.psql(
        "app",
        "CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)",
    );

    // TCP needs the password: right one works, wrong one fails.
    let psql = |password: &str| {
        let mut cmd = datasaver_tests::clean_command(pg.client_bindir().join("psql"));
        cmd.args([
            "-X",
            "-At",
            "-h",
            pg.host(),
            "-p",
            &pg.port().to_string(),
            "-U",
            "postgres",
            "-d",
            "app",
            "-c",
            "SELECT sum(x) FROM t",
        ]);
        cmd.env("PGPASSWORD", password);
        cmd.env("PGCONNECT_TIMEOUT", "5");
        run(cmd, Duration::from_secs(30))
    };
    let ok = psql(pg.password()).expect_success("psql over TCP with the password");
    assert_eq!(ok.stdout.trim(), "3");
    let bad = psql("wrong").expect_failure("psql over TCP with a wrong password");
    assert!(
        bad.stderr.contains("password authentication failed"),
        "{}",
        bad.describe()
    );

    // Rows with separators survive query_rows.
    let rows = pg.query_rows("app", "SELECT 'a|b', E'c\\nd' UNION ALL SELECT NULL, ''");
    assert_eq!(
        rows,
        vec![
            vec!["a|b".to_string(), "c\nd".to_string()],
            vec![String::new(), String::new()]
        ]
    );

    // Stop and start again: same port, data kept.
    pg.stop();
    assert!(!pg.is_running());
    assert!(
        pg.try_psql("app", "SELECT 1").is_err(),
        "stopped server still answers"
    );
    pg.start();
    assert_eq!(pg.psql("app", "SELECT count(*) FROM t"), "2");

    // A crash (SIGKILL of the postmaster) and recovery.
    // (Clusters run with synchronous_commit=off: make this commit durable before the crash.)
    pg.psql(
        "app",
        "SET synchronous_commit = on; INSERT INTO t VALUES (3)",
    );
    pg.kill_server();
    pg.start();
    assert_eq!(pg.psql("app", "SELECT sum(x) FROM t"), "6");
}

/// Needs a newer PostgreSQL (tests/install-newer-pg.sh, or DATASAVER_TEST_PG_NEWER_BINDIR):
/// the newer server starts, the default pg_dump refuses it, and a restore from the old server
/// into the newer one compares equal.
#[test]
fn harness_newer_postgres() {
    let Some(bindir) = PgCluster::newer_bindir() else {
        datasaver_tests::skip(
            "no newer PostgreSQL: run tests/install-newer-pg.sh or set DATASAVER_TEST_PG_NEWER_BINDIR",
        );
        return;
    };
    let newer = PgCluster::start_with_bindir(&bindir);
    let default_major = datasaver_tests::pg::server_major(&PgCluster::default_bindir());
    assert!(newer.major() > default_major);
    newer.create_db("n");
    let mut dump = newer.tool_command(PgCluster::default_bindir().join("pg_dump"));
    dump.args(["-d", "n"]);
    let out = run(dump, Duration::from_secs(60)).expect_failure("old pg_dump against newer server");
    assert!(
        out.stderr.contains("server version mismatch"),
        "{}",
        out.describe()
    );

    // Cross-version restore (old server -> newer server) compares equal.
    let old = PgCluster::new();
    load_fidelity(&old, "src");
    newer.create_db("dst");
    dump_restore(&old, "src", &newer, "dst").expect("dump from old server, restore into newer");
    compare_databases(&old, "src", &newer, "dst").expect("cross-version restore compares equal");
}
