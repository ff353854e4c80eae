//! The server is gone: a backup restored onto a brand-new, empty Postgres.

use std::time::Duration;

use datasaver_tests::fidelity::{compare_databases, load_fidelity};
use datasaver_tests::webhook::WebhookReceiver;
use datasaver_tests::{assert_one_line_error, wait_until, Fleet, FleetOptions, PgCluster};

/// Can `role` log in to `db` over TCP with `password` (scram), and what does
/// `sql` give it?
fn as_role(
    pg: &PgCluster,
    role: &str,
    password: &str,
    db: &str,
    sql: &str,
) -> Result<String, String> {
    let mut cmd = pg.client_command("psql");
    cmd.env("PGHOST", pg.host())
        .env("PGUSER", role)
        .env("PGPASSWORD", password)
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db,
            "-c",
            sql,
        ]);
    let out = datasaver_tests::procs::run_with_input(cmd, None, Duration::from_secs(30));
    if out.success() {
        Ok(out.stdout.trim().to_string())
    } else {
        Err(out.stderr)
    }
}

/// The disaster: the server is gone. A `pg_dump` archive holds no roles, so
/// each backup also carries the cluster's globals. Onto a brand-new, empty
/// server one restore brings back the roles the database needs (with their
/// passwords, settings and memberships, and only those), the database as it
/// was created, its data, owners and grants, column and view grants through
/// a group role, and default privileges; the read-only login can log in with
/// its old password and read what it could read before. No password reaches
/// a log.
#[test]
fn a_lost_server_comes_back_with_its_roles_in_one_restore() {
    let old = PgCluster::new();
    old.psql(
        "postgres",
        "CREATE ROLE app_owner LOGIN PASSWORD 'owner-secret-1';
         CREATE ROLE app_readers NOLOGIN;
         CREATE ROLE reader_login LOGIN PASSWORD 'reader-secret-2' CONNECTION LIMIT 5;
         GRANT app_readers TO reader_login;
         ALTER ROLE reader_login SET statement_timeout = '7s';
         CREATE ROLE unrelated LOGIN PASSWORD 'other-secret-3';",
    );
    // Not the server's defaults: the restore must recreate these.
    old.psql(
        "postgres",
        "CREATE DATABASE shop OWNER app_owner ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;",
    );
    old.psql(
        "shop",
        "SET ROLE app_owner;
         CREATE SCHEMA app;
         CREATE TABLE app.orders (id int PRIMARY KEY, item text, secret_note text);
         INSERT INTO app.orders SELECT g, 'item ' || g, 'note ' || g FROM generate_series(1, 50000) g;
         CREATE VIEW app.order_items AS SELECT id, item FROM app.orders;
         GRANT USAGE ON SCHEMA app TO app_readers;
         GRANT SELECT (id, item) ON app.orders TO app_readers;
         GRANT SELECT ON app.order_items TO app_readers;
         ALTER DEFAULT PRIVILEGES IN SCHEMA app GRANT SELECT ON TABLES TO app_readers;",
    );
    // Only the readers (and the owner) may connect; the database and one
    // role in it have settings of their own.
    old.psql(
        "postgres",
        "REVOKE ALL ON DATABASE shop FROM PUBLIC; GRANT CONNECT ON DATABASE shop TO app_readers;
         ALTER DATABASE shop SET search_path TO app, \"$user\", public;
         ALTER DATABASE shop SET work_mem = '8MB';
         ALTER ROLE reader_login IN DATABASE shop SET statement_timeout = '3s';",
    );
    let settings = |pg: &PgCluster| {
        pg.query_one(
            "postgres",
            "SELECT string_agg(coalesce(r.rolname, '-') || ':' || array_to_string(s.setconfig, ';'), ' ' ORDER BY 1)
               FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole
              WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = 'shop')",
        )
    };
    let shop_settings = settings(&old);
    assert!(shop_settings.contains("work_mem=8MB"), "{shop_settings}");
    let hash = |pg: &PgCluster| {
        pg.query_one(
            "postgres",
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'reader_login'",
        )
    };
    let reader_hash = hash(&old);
    assert_eq!(
        as_role(
            &old,
            "reader_login",
            "reader-secret-2",
            "shop",
            "SELECT count(*) FROM app.order_items"
        ),
        Ok("50000".into())
    );
    let mut fleet = Fleet::start();
    fleet.add_agent("shop", &old, "shop");
    let b = fleet.backup("shop", None);
    assert!(b.is_completed(), "{}", b.raw);
    assert_eq!(
        b.raw["roles"],
        serde_json::json!(["app_owner", "app_readers"]),
        "{}",
        b.raw
    );
    assert_eq!(b.raw["parts"][0]["name"], "globals", "{}", b.raw);
    // Rows as of the dump, read from its archive as it passed.
    assert_eq!(
        b.raw["tables"],
        serde_json::json!([{"schema": "app", "name": "orders", "rows": 50000}]),
        "{}",
        b.raw
    );
    assert_eq!(b.raw["parts"][0]["role_passwords"], true, "{}", b.raw);
    let mut logs = fleet.agent("shop").proc.log();

    // The server dies; the agent comes back against a new, empty one.
    fleet.remove_agent("shop");
    drop(old);
    let new = PgCluster::new();
    fleet.add_agent("shop", &new, "postgres");
    let out = fleet
        .dsctl(&["restore", &b.id, "--target-db", "shop"])
        .expect_success("one restore onto the new server");
    assert!(
        out.stdout.contains(
            "created roles app_owner, app_readers, reader_login from the backup's globals"
        ),
        "{}",
        out.stdout
    );
    // The roles it needs, as they were; not the unrelated one.
    assert_eq!(hash(&new), reader_hash, "the password did not come back");
    assert_eq!(
        new.query_one(
            "postgres",
            "SELECT string_agg(rolname || ':' || rolcanlogin || ':' || rolconnlimit, ' ' ORDER BY rolname)
               FROM pg_roles WHERE rolname IN ('app_owner', 'app_readers', 'reader_login', 'unrelated')"
        ),
        "app_owner:true:-1 app_readers:false:-1 reader_login:true:5"
    );
    assert_eq!(
        new.query_one(
            "postgres",
            "SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
              WHERE r.rolname = 'reader_login'"
        ),
        "statement_timeout=7s"
    );
    // The database as it was created, its data, owners and grants.
    assert_eq!(
        new.query_one(
            "postgres",
            "SELECT pg_get_userbyid(datdba) || ' ' || pg_encoding_to_char(encoding) || ' ' || datcollate || ' ' || datctype
               FROM pg_database WHERE datname = 'shop'"
        ),
        "app_owner LATIN1 C C"
    );
    assert_eq!(
        new.query_one(
            "shop",
            "SELECT count(*) || ' ' || min(tableowner) FROM pg_tables WHERE schemaname = 'app'"
        ),
        "1 app_owner"
    );
    assert_eq!(settings(&new), shop_settings, "the database's settings");
    assert_eq!(
        as_role(
            &new,
            "reader_login",
            "reader-secret-2",
            "shop",
            "SHOW search_path"
        ),
        Ok("app, \"$user\", public".into())
    );
    assert_eq!(
        as_role(
            &new,
            "reader_login",
            "reader-secret-2",
            "shop",
            "SHOW statement_timeout"
        ),
        Ok("3s".into())
    );
    // The reader logs in with its old password and reads what it could,
    // through its group: the view and two columns, not the third.
    assert_eq!(
        as_role(
            &new,
            "reader_login",
            "reader-secret-2",
            "shop",
            "SELECT count(*) FROM app.order_items"
        ),
        Ok("50000".into())
    );
    assert_eq!(
        as_role(
            &new,
            "reader_login",
            "reader-secret-2",
            "shop",
            "SELECT max(item) FROM app.orders"
        ),
        Ok("item 9999".into())
    );
    let denied = as_role(
        &new,
        "reader_login",
        "reader-secret-2",
        "shop",
        "SELECT max(secret_note) FROM app.orders",
    )
    .expect_err("a column it could not read");
    assert!(denied.contains("permission denied"), "{denied}");
    assert!(
        as_role(&new, "reader_login", "wrong", "shop", "SELECT 1").is_err(),
        "a wrong password was accepted"
    );
    // Default privileges: a table the owner creates now is readable too.
    new.psql(
        "shop",
        "SET ROLE app_owner; CREATE TABLE app.later AS SELECT 1 AS x;",
    );
    assert_eq!(
        as_role(
            &new,
            "reader_login",
            "reader-secret-2",
            "shop",
            "SELECT x FROM app.later"
        ),
        Ok("1".into())
    );
    // Only who could connect before may connect.
    new.psql("postgres", "CREATE ROLE outsider LOGIN PASSWORD 'x';");
    assert!(as_role(&new, "outsider", "x", "shop", "SELECT 1").is_err());

    logs.push_str(&fleet.agent("shop").proc.log());
    logs.push_str(&fleet.coordinator().log());
    for secret in [
        "owner-secret-1",
        "reader-secret-2",
        "other-secret-3",
        "SCRAM-SHA-256$",
        &reader_hash,
    ] {
        assert!(!logs.contains(secret), "{secret} reached a log");
    }
}

/// When pg_restore itself fails (here: the archive puts a table in a
/// tablespace the new server does not have, which no archive carries), the
/// error is Postgres's own words, not a broken pipe, and the half-restored
/// database is dropped.
#[test]
fn a_failed_pg_restore_says_what_postgres_said() {
    use std::os::unix::fs::MetadataExt;
    let old = PgCluster::new();
    // A tablespace directory owned by whoever runs this server.
    let space = old.dir().join("fast_space");
    std::fs::create_dir_all(&space).expect("tablespace dir");
    let owner = std::fs::metadata(old.data_dir()).expect("data dir");
    std::os::unix::fs::chown(&space, Some(owner.uid()), Some(owner.gid()))
        .expect("chown tablespace dir");
    old.psql(
        "postgres",
        &format!("CREATE TABLESPACE fast LOCATION '{}';", space.display()),
    );
    old.create_small_db("shop", 1000);
    old.psql(
        "shop",
        "CREATE ROLE hot_owner;
         CREATE TABLE hot (id int) TABLESPACE fast; INSERT INTO hot VALUES (1);
         ALTER TABLE hot OWNER TO hot_owner;",
    );
    let mut fleet = Fleet::start();
    fleet.add_agent("shop", &old, "shop");
    let b = fleet.backup("shop", None);
    assert!(b.is_completed(), "{}", b.raw);

    fleet.remove_agent("shop");
    let new = PgCluster::new();
    fleet.add_agent("shop", &new, "postgres");
    let before = new.databases();
    let out = fleet
        .dsctl(&["--quiet", "restore", &b.id, "--target-db", "shop"])
        .expect_code(1, "restore onto a server without the tablespace");
    let line = assert_one_line_error(&out.stderr, "pg_restore failed: ");
    assert!(
        line.contains("ERROR:") && line.contains("fast") && !line.contains("Broken pipe"),
        "{line}"
    );
    // The role it needed was created from the globals first, and the error
    // says it is still there.
    assert!(
        line.contains("created roles hot_owner from the backup's globals; they stay"),
        "{line}"
    );
    assert_eq!(
        new.query_one(
            "postgres",
            "SELECT count(*) FROM pg_roles WHERE rolname = 'hot_owner'"
        ),
        "1"
    );
    assert_eq!(
        new.databases(),
        before,
        "the half-restored database was left behind"
    );
}

/// A backup of a newer server cannot be loaded into an older one: refused
/// before anything is created, naming both versions.
#[test]
fn a_restore_onto_an_older_server_is_refused_before_anything_is_created() {
    let Some(newer) = PgCluster::newer_bindir() else {
        datasaver_tests::skip(
            "no newer PostgreSQL major version installed (tests/install-newer-pg.sh)",
        );
        return;
    };
    let source = PgCluster::start_with_bindir(&newer);
    source.create_small_db("shop", 1000);
    // Rows with newlines and tabs in them, and a large object: still rows.
    source.psql(
        "shop",
        "CREATE TABLE notes (id int, body text);
         INSERT INTO notes SELECT g, E'line one\nline two\ttab' FROM generate_series(1, 7) g;
         SELECT lo_from_bytea(0, E'\\x0a0a0a');",
    );
    let mut fleet = Fleet::start();
    let spec = fleet
        .agent_spec("shop", &source, "shop")
        .env("DATASAVER_PG_BIN_DIR", &newer);
    fleet.add_agent_spec("shop", spec);
    let b = fleet.backup("shop", None);
    assert!(b.is_completed(), "{}", b.raw);
    // The newer pg_dump's archive format is read for row counts too.
    assert_eq!(
        b.raw["tables"],
        serde_json::json!([
            {"schema": "public", "name": "notes", "rows": 7},
            {"schema": "public", "name": "t", "rows": 1000}
        ]),
        "{}",
        b.raw
    );

    // The replacement server is an older major version.
    fleet.remove_agent("shop");
    let older = PgCluster::new();
    let before = older.databases();
    fleet.add_agent("shop", &older, "postgres");
    let out = fleet
        .dsctl(&["--quiet", "restore", &b.id, "--target-db", "shop"])
        .expect_code(1, "restore onto an older server");
    let line = assert_one_line_error(&out.stderr, "nothing was changed");
    assert!(
        line.contains(&format!("comes from PostgreSQL {}.", source.major()))
            && line.contains(&format!("runs PostgreSQL {}.", older.major()))
            && line.contains("(older)"),
        "the message must name both versions: {line}"
    );
    assert_eq!(older.databases(), before, "a database was created");
}

/// An archive that needs an extension the new server does not have fails
/// halfway through pg_restore; it is refused before anything is created,
/// naming the extension. (PostgreSQL 17 dropped `old_snapshot`, which 15
/// ships.)
#[test]
fn a_restore_onto_a_server_without_an_extension_is_refused_naming_it() {
    let Some(newer) = PgCluster::newer_bindir() else {
        datasaver_tests::skip(
            "no newer PostgreSQL major version installed (tests/install-newer-pg.sh)",
        );
        return;
    };
    let source = PgCluster::new();
    source.create_small_db("shop", 1000);
    source.psql("shop", "CREATE EXTENSION old_snapshot;");
    let mut fleet = Fleet::start();
    fleet.add_agent("shop", &source, "shop");
    let b = fleet.backup("shop", None);
    assert!(b.is_completed(), "{}", b.raw);
    let recorded: Vec<String> = b.raw["extensions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        recorded.contains(&"old_snapshot".to_string()) && recorded.contains(&"plpgsql".to_string()),
        "{}",
        b.raw
    );
    let shown = fleet.dsctl(&["get", &b.id]).expect_success("dsctl get");
    assert!(
        shown
            .stdout
            .lines()
            .any(|l| l.starts_with("extensions") && l.contains("old_snapshot")),
        "{}",
        shown.stdout
    );

    fleet.remove_agent("shop");
    let target = PgCluster::start_with_bindir(&newer);
    let before = target.databases();
    let spec = fleet
        .agent_spec("shop", &target, "postgres")
        .env("DATASAVER_PG_BIN_DIR", &newer);
    fleet.add_agent_spec("shop", spec);
    let out = fleet
        .dsctl(&["--quiet", "restore", &b.id, "--target-db", "shop"])
        .expect_code(1, "restore onto a server without old_snapshot");
    let line = assert_one_line_error(&out.stderr, "uses extension old_snapshot that this server");
    assert!(line.contains("nothing was changed"), "{line}");
    assert!(!line.contains("plpgsql"), "{line}");
    assert_eq!(target.databases(), before, "a database was created");
}

/// The database behind a target is now another server (rebuilt, failed
/// over): its system identifier changes, which `dsctl get` shows, a
/// `target.server_changed` webhook announces once, `dsctl health` lists, and
/// the next backup of the same new server resolves.
#[test]
fn a_new_server_behind_a_target_is_announced_once() {
    let hook = WebhookReceiver::start();
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: vec![("DATASAVER_WEBHOOK_URL".into(), hook.url("/hook"))],
        ..Default::default()
    });
    let first = PgCluster::new();
    first.create_small_db("shop", 1000);
    fleet.add_agent("shop", &first, "shop");
    let a = fleet.backup("shop", None);
    let b = fleet.backup("shop", None);
    let sys_a = first.query_one("shop", "SELECT system_identifier FROM pg_control_system()");
    assert_eq!(a.raw["system_identifier"], sys_a.as_str(), "{}", a.raw);
    assert_eq!(b.raw["system_identifier"], sys_a.as_str(), "{}", b.raw);
    let shown = fleet.dsctl(&["get", &b.id]).expect_success("dsctl get");
    assert!(
        shown
            .stdout
            .lines()
            .any(|l| l.starts_with("system identifier") && l.contains(&sys_a)),
        "{}",
        shown.stdout
    );

    fleet.remove_agent("shop");
    let second = PgCluster::new();
    second.create_small_db("shop", 1000);
    let sys_b = second.query_one("shop", "SELECT system_identifier FROM pg_control_system()");
    assert_ne!(sys_a, sys_b, "two initdb runs share a system identifier");
    fleet.add_agent("shop", &second, "shop");
    let c = fleet.backup("shop", None);
    assert!(c.is_completed(), "{}", c.raw);
    assert!(
        wait_until(Duration::from_secs(30), || !hook
            .events("target.server_changed")
            .is_empty()),
        "no target.server_changed webhook: {:?}",
        hook.delivered()
    );
    let events = hook.events("target.server_changed");
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["target"], "shop", "{e}");
    assert_eq!(e["backup_id"], c.id.as_str(), "{e}");
    let m = e["message"].as_str().unwrap_or_default();
    assert!(m.contains(&sys_a) && m.contains(&sys_b), "{m}");
    let health = fleet.dsctl(&["health"]).expect_success("dsctl health");
    assert!(
        health.stdout.contains("target.server_changed"),
        "{}",
        health.stdout
    );

    // The next backup of the new server: resolved, and said only once.
    assert!(fleet.backup("shop", None).is_completed());
    assert!(
        wait_until(Duration::from_secs(30), || hook
            .resolved_of("target.server_changed")
            .len()
            == 1),
        "{:?}",
        hook.delivered()
    );
    assert_eq!(hook.events("target.server_changed").len(), 1);
}

/// No lock-in: `dsctl export` writes the plain pg_dump archive of an
/// encrypted backup with the operator's identity, and plain `pg_restore`
/// gives back a database identical to the source; a damaged object writes
/// nothing.
#[test]
fn an_exported_backup_restores_with_plain_pg_restore_and_a_damaged_one_writes_nothing() {
    let pg = PgCluster::new();
    load_fidelity(&pg, "shop");
    let mut fleet = Fleet::start();
    let keys = fleet.dir().join("keys");
    std::fs::create_dir_all(&keys).expect("keys dir");
    let identity = keys.join("backup.agekey");
    let identity = identity.to_str().expect("utf-8 path").to_string();
    let recipient = fleet
        .dsctl(&["keygen", "--out", &identity])
        .expect_success("dsctl keygen")
        .stdout
        .trim()
        .to_string();
    // The agent can only encrypt: the operator's identity is what decrypts.
    let spec = fleet
        .agent_spec("vault", &pg, "shop")
        .env("DATASAVER_ENCRYPTION_RECIPIENT", &recipient);
    fleet.add_agent_spec("vault", spec);
    let b = fleet.backup("vault", None);
    assert!(b.encrypted, "{}", b.raw);
    assert!(
        b.raw["raw_checksum"]
            .as_str()
            .is_some_and(|c| c.starts_with("blake3:") && c.len() == 71),
        "{}",
        b.raw
    );

    let exports = fleet.dir().join("exports");
    std::fs::create_dir_all(&exports).expect("exports dir");
    let out = exports.join("shop.dump");
    let out_s = out.to_str().expect("utf-8 path");
    let listing = || {
        let mut v: Vec<String> = std::fs::read_dir(&exports)
            .expect("exports dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };

    // Without the identity: one line, nothing written.
    let refused = fleet
        .dsctl(&["--quiet", "export", &b.id, "--out", out_s])
        .expect_code(1, "export of an encrypted backup without --identity");
    assert_one_line_error(&refused.stderr, "pass --identity FILE");
    assert!(listing().is_empty(), "{:?}", listing());

    let done = fleet
        .dsctl(&["export", &b.id, "--out", out_s, "--identity", &identity])
        .expect_success("dsctl export");
    assert!(
        done.stdout.contains(&format!("exported backup {}", b.id))
            && done
                .stdout
                .contains("matches pg_dump's output at backup time"),
        "{}",
        done.stdout
    );
    assert_eq!(listing(), vec!["shop.dump".to_string()]);
    let archive = std::fs::read(&out).expect("exported archive");
    assert!(
        archive.starts_with(b"PGDMP"),
        "not a pg_dump custom archive"
    );

    // Plain PostgreSQL tools, no datasaver.
    pg.psql("postgres", "CREATE DATABASE shop_plain;");
    let restored = pg
        .client_command("pg_restore")
        .args(["--exit-on-error", "-d", "shop_plain", out_s])
        .output()
        .expect("run pg_restore");
    assert!(
        restored.status.success(),
        "pg_restore: {}",
        String::from_utf8_lossy(&restored.stderr)
    );
    compare_databases(&pg, "shop", &pg, "shop_plain").expect("the export restores to the source");

    // Never overwrites.
    let again = fleet
        .dsctl(&[
            "--quiet",
            "export",
            &b.id,
            "--out",
            out_s,
            "--identity",
            &identity,
        ])
        .expect_code(1, "export over an existing file");
    assert_one_line_error(&again.stderr, "never overwrites");
    assert_eq!(std::fs::read(&out).expect("archive"), archive);

    // JSON names the file and the check.
    let json_out = exports.join("shop2.dump");
    let v = fleet
        .dsctl(&[
            "--json",
            "export",
            &b.id,
            "--out",
            json_out.to_str().expect("utf-8 path"),
            "--identity",
            &identity,
        ])
        .expect_success("dsctl --json export")
        .json();
    assert_eq!(v["id"], b.id.as_str(), "{v}");
    assert_eq!(v["checked_against_backup"], true, "{v}");
    assert_eq!(v["checksum"], b.raw["raw_checksum"], "{v}");
    assert_eq!(std::fs::read(&json_out).expect("second export"), archive);

    // The globals, decrypted: the roles as pg_dumpall wrote them.
    pg.psql(
        "postgres",
        "CREATE ROLE exported_role LOGIN PASSWORD 'exported-secret';",
    );
    let g = fleet.backup("vault", None);
    let globals = exports.join("globals.sql");
    let done = fleet
        .dsctl(&[
            "export",
            &g.id,
            "--globals",
            globals.to_str().expect("utf-8 path"),
            "--identity",
            &identity,
        ])
        .expect_success("dsctl export --globals");
    assert!(
        done.stdout
            .contains(&format!("exported the globals of backup {}", g.id))
            && done
                .stdout
                .contains("with role passwords: keep the file secret")
            && done
                .stdout
                .contains("matches pg_dumpall's output at backup time"),
        "{}",
        done.stdout
    );
    let sql = std::fs::read_to_string(&globals).expect("globals file");
    assert!(
        sql.contains("CREATE ROLE exported_role;") && sql.contains("PASSWORD 'SCRAM-SHA-256$"),
        "{sql}"
    );
    std::fs::remove_file(&globals).expect("remove the globals file");

    // One flipped byte in storage: refused as corrupt, nothing written.
    let object = fleet
        .storage_dir()
        .join(format!("vault/logical/{}.dump.zst.age", b.id));
    flip_middle_byte(&object);
    let damaged = exports.join("damaged.dump");
    let export_of = |id: &str, what: &str, file: &std::path::Path| {
        fleet.dsctl(&[
            "--quiet",
            "export",
            id,
            what,
            file.to_str().expect("utf-8 path"),
            "--identity",
            &identity,
        ])
    };
    let bad = export_of(&b.id, "--out", &damaged).expect_code(1, "export of a damaged backup");
    let line = assert_one_line_error(&bad.stderr, "corrupt");
    assert!(line.contains(&b.id), "{line}");
    assert_eq!(
        listing(),
        vec!["shop.dump".to_string(), "shop2.dump".to_string()],
        "a damaged export left a file"
    );
    // The same for damaged globals; and a verify finds them.
    let part = fleet
        .storage_dir()
        .join(format!("vault/logical/{}.globals.sql.zst.age", g.id));
    flip_middle_byte(&part);
    let bad = export_of(&g.id, "--globals", &globals).expect_code(1, "export of damaged globals");
    let line = assert_one_line_error(&bad.stderr, "corrupt");
    assert!(line.contains(&g.id), "{line}");
    assert!(!globals.exists(), "damaged globals were written");
    let verified = fleet
        .dsctl(&["--quiet", "verify", &g.id])
        .expect_code(1, "verify of a backup with damaged globals");
    let line = assert_one_line_error(&verified.stderr, "corrupt");
    assert!(line.contains(".globals.sql.zst.age"), "{line}");
}

/// Damages a stored file: one bit in its middle byte.
fn flip_middle_byte(path: &std::path::Path) {
    let mut stored = std::fs::read(path).expect("stored file");
    let mid = stored.len() / 2;
    stored[mid] ^= 0x01;
    std::fs::write(path, &stored).expect("damage the stored file");
}

/// What `psql` says about table `t` of `db`: its constraints, indexes,
/// triggers, comment and who may read it — the parts of a table that are
/// not its rows, which a table restored without them is not the same table.
fn table_shape(pg: &PgCluster, db: &str, t: &str) -> String {
    pg.query_one(
        db,
        &format!(
            "SELECT coalesce((SELECT string_agg(conname || ':' || pg_get_constraintdef(oid), ', ' ORDER BY conname)
                       FROM pg_constraint WHERE conrelid = '{t}'::regclass), '')
                 || ' | ' || coalesce((SELECT string_agg(indexdef, ', ' ORDER BY indexname) FROM pg_indexes
                               WHERE schemaname || '.' || tablename = '{t}'), '')
                 || ' | ' || coalesce((SELECT string_agg(tgname, ', ' ORDER BY tgname) FROM pg_trigger
                               WHERE tgrelid = '{t}'::regclass AND NOT tgisinternal), '')
                 || ' | ' || coalesce(obj_description('{t}'::regclass, 'pg_class'), '')
                 || ' | ' || has_table_privilege('app_reader', '{t}', 'SELECT')::text"
        ),
    )
}

/// Rows of `t` as one fingerprint.
fn rows_of(pg: &PgCluster, db: &str, t: &str) -> String {
    pg.query_one(
        db,
        &format!(
            "SELECT count(*) || ' ' || md5(string_agg(x::text, ',' ORDER BY x::text)) FROM {t} x"
        ),
    )
}

/// "Someone dropped the orders table": the table comes back alone into the
/// live database with its rows, keys, index, trigger, comment and grant,
/// the rest of the live database untouched; the same command once it exists
/// is refused, naming it, and changes nothing.
#[test]
fn a_dropped_table_comes_back_alone_into_the_live_database() {
    let pg = PgCluster::new();
    pg.psql("postgres", "CREATE ROLE app_reader; CREATE DATABASE shop;");
    pg.psql(
        "shop",
        "CREATE TABLE customers (id int PRIMARY KEY, name text);
         INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, 100) g;
         CREATE TABLE orders (id serial PRIMARY KEY,
                              customer int NOT NULL REFERENCES customers,
                              total numeric CHECK (total >= 0),
                              placed timestamptz DEFAULT '2026-01-01');
         CREATE INDEX orders_customer_idx ON orders (customer);
         CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN NEW.placed := now(); RETURN NEW; END$$;
         CREATE TRIGGER orders_touch BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION touch();
         COMMENT ON TABLE orders IS 'every order ever placed';
         GRANT SELECT ON orders TO app_reader;
         INSERT INTO orders (customer, total) SELECT 1 + g % 100, g FROM generate_series(1, 20000) g;",
    );
    let shape = table_shape(&pg, "shop", "public.orders");
    let rows = rows_of(&pg, "shop", "public.orders");
    assert!(
        shape.contains("orders_customer_fkey") && shape.contains("orders_touch"),
        "{shape}"
    );
    let mut fleet = Fleet::start();
    fleet.add_agent("shop", &pg, "shop");
    let b = fleet.backup("shop", None);
    assert!(b.is_completed(), "{}", b.raw);

    // The accident, and life going on after it.
    pg.psql(
        "shop",
        "DROP TABLE orders; INSERT INTO customers VALUES (101, 'after the backup');",
    );
    let customers = rows_of(&pg, "shop", "public.customers");
    let before = pg.databases();
    let restore_orders = [
        "restore",
        &b.id,
        "--table",
        "public.orders",
        "--into-existing",
        "--target-db",
        "shop",
    ];
    let out = fleet
        .dsctl(&restore_orders)
        .expect_success("restore the dropped table");
    assert!(
        out.stdout.contains(&format!(
            "restored table public.orders of backup {} into database shop",
            b.id
        )),
        "{}",
        out.stdout
    );
    assert_eq!(rows_of(&pg, "shop", "public.orders"), rows);
    assert_eq!(table_shape(&pg, "shop", "public.orders"), shape);
    assert_eq!(
        rows_of(&pg, "shop", "public.customers"),
        customers,
        "the live table was touched"
    );
    // Its sequence came back where it was.
    assert_eq!(
        pg.query_one(
            "shop",
            "INSERT INTO orders (customer, total) VALUES (1, 1) RETURNING id"
        ),
        "20001"
    );
    assert_eq!(
        pg.databases(),
        before,
        "the scratch database was left behind"
    );

    // Again, now that it exists: refused, nothing changed.
    let rows = rows_of(&pg, "shop", "public.orders");
    let out = fleet
        .dsctl(&[&["--quiet"], &restore_orders[..]].concat())
        .expect_code(1, "restore over an existing table");
    let line = assert_one_line_error(&out.stderr, "database shop already has public.orders");
    assert!(line.contains("nothing was changed"), "{line}");
    assert_eq!(rows_of(&pg, "shop", "public.orders"), rows);
    assert_eq!(pg.databases(), before);
}

/// A schema restored into a new database comes back whole; a foreign key to
/// a table left behind is named, not silently dropped; a table the backup
/// does not have is refused, leaving no database behind.
#[test]
fn a_schema_comes_back_into_a_new_database_and_a_missing_table_is_refused() {
    let pg = PgCluster::new();
    pg.psql("postgres", "CREATE ROLE app_reader; CREATE DATABASE shop;");
    pg.psql(
        "shop",
        "CREATE TABLE customers (id int PRIMARY KEY);
         INSERT INTO customers SELECT generate_series(1, 10);
         CREATE SCHEMA sales;
         CREATE TABLE sales.invoices (id int PRIMARY KEY, customer int REFERENCES public.customers, amount int);
         CREATE INDEX invoices_amount_idx ON sales.invoices (amount);
         COMMENT ON TABLE sales.invoices IS 'sent';
         GRANT USAGE ON SCHEMA sales TO app_reader;
         GRANT SELECT ON sales.invoices TO app_reader;
         INSERT INTO sales.invoices SELECT g, 1 + g % 10, g * 3 FROM generate_series(1, 5000) g;",
    );
    let rows = rows_of(&pg, "shop", "sales.invoices");
    let mut fleet = Fleet::start();
    fleet.add_agent("shop", &pg, "shop");
    let b = fleet.backup("shop", None);
    assert!(b.is_completed(), "{}", b.raw);

    let out = fleet
        .dsctl(&[
            "restore",
            &b.id,
            "--schema",
            "sales",
            "--target-db",
            "shop_sales",
        ])
        .expect_success("restore a schema into a new database");
    assert!(
        out.stdout.contains(
            "foreign key invoices_customer_fkey of sales.invoices (to public.customers) was not created"
        ),
        "{}",
        out.stdout
    );
    assert_eq!(rows_of(&pg, "shop_sales", "sales.invoices"), rows);
    let shape = table_shape(&pg, "shop_sales", "sales.invoices");
    assert!(
        shape.contains("invoices_pkey")
            && shape.contains("invoices_amount_idx")
            && !shape.contains("invoices_customer_fkey")
            && shape.ends_with("sent | true"),
        "{shape}"
    );
    assert_eq!(
        pg.query_one(
            "shop_sales",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        "0",
        "more than the schema was restored"
    );

    let before = pg.databases();
    let out = fleet
        .dsctl(&[
            "--quiet",
            "restore",
            &b.id,
            "--table",
            "public.nope",
            "--target-db",
            "shop_nope",
        ])
        .expect_code(1, "restore of a table the backup lacks");
    assert_one_line_error(
        &out.stderr,
        &format!(
            "backup {} has no table public.nope; nothing was changed",
            b.id
        ),
    );
    assert_eq!(pg.databases(), before, "a database was left behind");

    // Bad names never reach the agent.
    let out = fleet
        .dsctl(&["--quiet", "restore", &b.id, "--table", "orders"])
        .expect_code(1, "a table without its schema");
    assert_one_line_error(
        &out.stderr,
        "--table \"orders\" is not accepted: give SCHEMA.NAME",
    );
}

/// A restore drill proves a backup: restored into a scratch database, every
/// table's rows checked against the counts recorded at backup time, the
/// scratch database dropped, the result kept and shown. A drill whose
/// restore fails (the drill server lacks an extension) is recorded as
/// failed and leaves nothing behind on the drill server.
#[test]
fn a_restore_drill_proves_a_backup_and_a_failed_one_leaves_nothing() {
    let pg = PgCluster::new();
    pg.create_small_db("shop", 1000);
    pg.psql(
        "shop",
        "CREATE TABLE notes (id int, body text);
         INSERT INTO notes SELECT g, E'two\\nlines' FROM generate_series(1, 25) g;
         CREATE TABLE empty (id int);",
    );
    let mut fleet = Fleet::start();
    fleet.add_agent("shop", &pg, "shop");
    let b = fleet.backup("shop", None);
    assert!(b.is_completed(), "{}", b.raw);
    let before = pg.databases();
    let out = fleet
        .dsctl(&["verify", &b.id, "--restore"])
        .expect_success("restore drill");
    assert!(
        out.stdout
            .contains(&format!("drill of backup {} passed", b.id))
            && out
                .stdout
                .contains("every table's rows as recorded (3 tables, 1025 rows)")
            && out.stdout.contains("the scratch database was dropped"),
        "{}",
        out.stdout
    );
    assert_eq!(pg.databases(), before, "the drill left a database");
    let list = fleet.dsctl(&["list"]).expect_success("dsctl list");
    let row = list
        .stdout
        .lines()
        .find(|l| l.starts_with(&b.id))
        .unwrap_or_else(|| panic!("{}", list.stdout));
    assert!(
        list.stdout.starts_with("ID") && list.stdout.contains("PROVEN"),
        "{}",
        list.stdout
    );
    assert!(
        !row.contains("FAILED") && row.contains(&b.raw["created_at"].as_str().unwrap_or("")[..10]),
        "{row}"
    );
    let shown = fleet.dsctl(&["get", &b.id]).expect_success("dsctl get");
    assert!(
        shown
            .stdout
            .lines()
            .any(|l| l.starts_with("last proven") && l.contains(": ok: drill of backup")),
        "{}",
        shown.stdout
    );

    // A drill server without an extension the backup needs.
    let Some(newer) = PgCluster::newer_bindir() else {
        datasaver_tests::skip(
            "no newer PostgreSQL major version installed (tests/install-newer-pg.sh)",
        );
        return;
    };
    let drills = PgCluster::start_with_bindir(&newer);
    pg.psql("shop", "CREATE EXTENSION old_snapshot;");
    fleet.remove_agent("shop");
    let spec = fleet
        .agent_spec("shop", &pg, "shop")
        .env("DATASAVER_DRILL_DATABASE_URL", drills.url("postgres"));
    fleet.add_agent_spec("shop", spec);
    let c = fleet.backup("shop", None);
    assert!(c.is_completed(), "{}", c.raw);
    let on_drill_server = drills.databases();
    let out = fleet
        .dsctl(&["--quiet", "verify", &c.id, "--restore"])
        .expect_code(1, "a drill on a server without the extension");
    assert_one_line_error(&out.stderr, "old_snapshot");
    assert_eq!(
        drills.databases(),
        on_drill_server,
        "the failed drill left a database"
    );
    assert_eq!(pg.databases(), before, "the drill ran on the wrong server");
    let list = fleet.dsctl(&["list"]).expect_success("dsctl list");
    let row = list
        .stdout
        .lines()
        .find(|l| l.starts_with(&c.id))
        .unwrap_or_else(|| panic!("{}", list.stdout));
    assert!(row.contains("FAILED"), "{row}");
    let v = fleet.dsctl_json(&["get", &c.id]);
    assert!(
        v["drill_result"]
            .as_str()
            .is_some_and(|r| r.starts_with("failed: ") && r.contains("old_snapshot")),
        "{v}"
    );
    // The password in the drill server's URL reaches no log.
    assert!(!fleet.agent("shop").proc.log().contains(drills.password()));
}

/// Waits for `alert` to be resolved by webhook and `/health` to answer 200.
fn resolved_and_healthy(fleet: &Fleet, hook: &WebhookReceiver, alert: &str) {
    assert!(
        wait_until(Duration::from_secs(60), || !hook
            .resolved_of(alert)
            .is_empty()),
        "{alert} never resolved: {:?}",
        hook.delivered()
    );
    assert!(
        wait_until(Duration::from_secs(30), || fleet
            .http_get("/health")
            .is_ok_and(|h| h.status == 200)),
        "{:?}",
        fleet.http_get("/health").map(|h| h.body)
    );
}

/// Drills on a schedule: a drill that fails (the drill server lacks an
/// extension) is announced once as `drill.failed` however often it fails
/// again, leaves no scratch database, and makes `/health` degraded; once a
/// drill passes the alert resolves and `/metrics` has the time of it. With
/// no passing drill for longer than DATASAVER_DRILL_MAX_AGE (the agent is
/// away) `drill.stale` opens, and a passing drill closes it.
#[test]
fn scheduled_drills_alert_when_they_fail_or_go_stale_and_recover() {
    let Some(newer) = PgCluster::newer_bindir() else {
        datasaver_tests::skip(
            "no newer PostgreSQL major version installed (tests/install-newer-pg.sh)",
        );
        return;
    };
    let hook = WebhookReceiver::start();
    let pg = PgCluster::new();
    pg.create_small_db("shop", 500);
    pg.psql("shop", "CREATE EXTENSION old_snapshot;");
    let drills = PgCluster::start_with_bindir(&newer);
    // The agent asks for the drill schedule (the coordinator's file could
    // override it: `drill_schedule`).
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: vec![
            ("DATASAVER_WEBHOOK_URL".into(), hook.url("/hook")),
            ("DATASAVER_DRILL_MAX_AGE".into(), "10s".into()),
        ],
        ..Default::default()
    });
    let spec = |fleet: &Fleet| {
        fleet
            .agent_spec("shop", &pg, "shop")
            .env("DATASAVER_DRILL_DATABASE_URL", drills.url("postgres"))
            .env("DATASAVER_DRILL_SCHEDULE", "*/2 * * * * *")
    };
    let s = spec(&fleet);
    fleet.add_agent_spec("shop", s);
    assert!(fleet.backup("shop", None).is_completed());

    assert!(
        wait_until(Duration::from_secs(60), || !hook
            .events("drill.failed")
            .is_empty()),
        "no drill.failed: {:?}",
        hook.delivered()
    );
    let failed = &hook.events("drill.failed")[0];
    assert!(
        failed["message"]
            .as_str()
            .is_some_and(|m| m.contains("old_snapshot")),
        "{failed}"
    );
    // More drills fail meanwhile; still one announcement.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        hook.events("drill.failed").len(),
        1,
        "{:?}",
        hook.delivered()
    );
    let h = fleet.http_get("/health").expect("GET /health");
    assert!(
        h.status == 503 && h.body.contains("drill.failed"),
        "{} {}",
        h.status,
        h.body
    );
    assert!(
        drills
            .databases()
            .iter()
            .all(|d| !d.starts_with("datasaver_drill")),
        "{:?}",
        drills.databases()
    );

    // The extension goes; the next drill (of the new backup) passes.
    pg.psql("shop", "DROP EXTENSION old_snapshot;");
    assert!(fleet.backup("shop", None).is_completed());
    resolved_and_healthy(&fleet, &hook, "drill.failed");
    let health = fleet.dsctl(&["health"]).expect_success("dsctl health");
    let header = health.stdout.lines().next().unwrap_or_default();
    let row = health
        .stdout
        .lines()
        .find(|l| l.starts_with("shop"))
        .unwrap_or_default();
    assert!(
        header.contains("LAST DRILL OK") && !row.contains("never"),
        "{}",
        health.stdout
    );
    let m = fleet.http_get("/metrics").expect("GET /metrics");
    assert!(
        m.body
            .lines()
            .any(|l| l
                .starts_with("datasaver_last_drill_success_timestamp_seconds{target=\"shop\"}")),
        "{}",
        m.body
    );

    // No drill can run while the agent is away: stale after 10 s.
    fleet.remove_agent("shop");
    assert!(
        wait_until(Duration::from_secs(60), || !hook
            .events("drill.stale")
            .is_empty()),
        "no drill.stale: {:?}",
        hook.delivered()
    );
    let h = fleet.http_get("/health").expect("GET /health");
    assert!(
        h.status == 503 && h.body.contains("drill.stale"),
        "{} {}",
        h.status,
        h.body
    );
    let s = spec(&fleet);
    fleet.add_agent_spec("shop", s);
    resolved_and_healthy(&fleet, &hook, "drill.stale");
}

/// An agent whose role is not a superuser (a managed database's admin role,
/// say) still captures the globals, without role passwords (reading them
/// takes a superuser), and says so; a restore from such a backup creates the
/// roles and tells the operator to set their passwords.
#[test]
fn globals_taken_without_superuser_have_no_passwords_and_say_so() {
    let old = PgCluster::new();
    old.psql(
        "postgres",
        "CREATE ROLE backup_agent LOGIN PASSWORD 'agent-pw' CREATEDB CREATEROLE;
         CREATE ROLE app_owner LOGIN PASSWORD 'owner-pw';
         GRANT app_owner TO backup_agent;
         CREATE DATABASE shop OWNER app_owner;",
    );
    old.psql(
        "shop",
        "SET ROLE app_owner; CREATE TABLE orders AS SELECT generate_series(1, 300) AS id;",
    );
    let mut fleet = Fleet::start();
    let spec = fleet.agent_spec("shop", &old, "shop").env(
        "DATASAVER_DATABASE_URL",
        format!(
            "postgresql://backup_agent:agent-pw@127.0.0.1:{}/shop",
            old.port()
        ),
    );
    fleet.add_agent_spec("shop", spec);
    let b = fleet.backup("shop", None);
    assert!(b.is_completed(), "{}", b.raw);
    assert_eq!(b.raw["parts"][0]["role_passwords"], false, "{}", b.raw);
    let shown = fleet.dsctl(&["get", &b.id]).expect_success("dsctl get");
    assert!(
        shown
            .stdout
            .lines()
            .any(|l| l.starts_with("globals") && l.contains("roles without passwords")),
        "{}",
        shown.stdout
    );

    fleet.remove_agent("shop");
    let new = PgCluster::new();
    fleet.add_agent("shop", &new, "postgres");
    let out = fleet
        .dsctl(&["restore", &b.id, "--target-db", "shop"])
        .expect_success("restore from globals without passwords");
    // backup_agent reads through app_owner: connected by membership.
    assert!(
        out.stdout
            .contains("created roles app_owner, backup_agent from the backup's globals")
            && out.stdout.contains("the backup holds no role passwords"),
        "{}",
        out.stdout
    );
    assert_eq!(
        new.query_one(
            "postgres",
            "SELECT (rolpassword IS NULL)::text || ' ' || rolcanlogin::text FROM pg_authid WHERE rolname = 'app_owner'"
        ),
        "true true"
    );
    assert_eq!(new.query_one("shop", "SELECT count(*) FROM orders"), "300");
}

/// What a whole-server test compares: each database's owner, encoding and
/// its table's rows and owner.
fn server_state(pg: &PgCluster, dbs: &[&str]) -> Vec<String> {
    dbs.iter()
        .map(|db| {
            let shape = pg.query_one(
                "postgres",
                &format!(
                    "SELECT pg_get_userbyid(datdba) || ' ' || pg_encoding_to_char(encoding) FROM pg_database WHERE datname = '{db}'"
                ),
            );
            let data = pg.query_one(
                db,
                "SELECT count(*) || ' rows, sum ' || sum(id) || ', owner ' || min(pg_get_userbyid(c.relowner))
                   FROM items, pg_class c WHERE c.relname = 'items'",
            );
            format!("{db}: {shape}; {data}")
        })
        .collect()
}

/// An agent can serve a whole server (`DATASAVER_DATABASES=all`, minus
/// `DATASAVER_EXCLUDE_DATABASES`): every matching database, found afresh at
/// each backup, under one backup id with one object each; `dsctl list` and
/// `get` say which, and what appeared or disappeared since the previous
/// backup (the backup's event says it too). When the server is gone, one
/// `dsctl restore ID` onto a new, empty server brings back every database
/// under its own name with its owner, roles and rows; a second one is
/// refused, naming the databases, and changes nothing; one database can come
/// back under a new name and be exported on its own.
#[test]
fn a_whole_server_comes_back_onto_an_empty_one() {
    let old = PgCluster::new();
    old.psql(
        "postgres",
        "CREATE ROLE shop_owner LOGIN PASSWORD 'shop-secret-9';
         CREATE ROLE crm_owner NOLOGIN;
         CREATE ROLE analyst NOLOGIN;
         CREATE DATABASE shop OWNER shop_owner;
         CREATE DATABASE crm OWNER crm_owner ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;
         CREATE DATABASE hr;
         CREATE DATABASE scratch_tmp;",
    );
    let fill = |db: &str, owner: &str, rows: u32| {
        old.psql(
            db,
            &format!(
                "SET ROLE {owner}; CREATE TABLE items (id int PRIMARY KEY, v text);
                 INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, {rows}) g;
                 GRANT SELECT ON items TO analyst;"
            ),
        );
    };
    fill("shop", "shop_owner", 3000);
    fill("crm", "crm_owner", 200);
    fill("hr", "postgres", 10);
    fill("scratch_tmp", "postgres", 1);
    let mut fleet = Fleet::start();
    let env = [
        ("DATASAVER_DATABASES", "all"),
        ("DATASAVER_EXCLUDE_DATABASES", "postgres,scratch_*"),
        // Every backup of the day stays (GFS keeps one a day).
        ("DATASAVER_KEEP_LAST", "10"),
    ];
    fleet.add_agent_with("srv", &old, "postgres", &env);
    let first = fleet.backup("srv", None);
    assert!(first.is_completed(), "{}", first.raw);
    assert_eq!(
        first.raw["databases"],
        serde_json::json!(["crm", "hr", "shop"]),
        "templates, postgres and scratch_* are not taken: {}",
        first.raw
    );

    // A fourth database appears; the next backup finds it.
    old.psql("postgres", "CREATE DATABASE billing OWNER crm_owner;");
    fill("billing", "crm_owner", 42);
    let b = fleet.backup("srv", None);
    assert_eq!(
        b.raw["databases"],
        serde_json::json!(["billing", "crm", "hr", "shop"]),
        "{}",
        b.raw
    );
    assert_eq!(b.raw["whole_server"], true);
    assert_eq!(b.raw["object_key"], "", "no dump of its own: {}", b.raw);
    let shop = b.raw["parts"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["database"] == "shop"))
        .cloned()
        .expect("a part for shop");
    assert_eq!(
        shop["tables"],
        serde_json::json!([{"schema": "public", "name": "items", "rows": 3000}])
    );
    assert_eq!(shop["roles"], serde_json::json!(["analyst", "shop_owner"]));
    let got = fleet.dsctl_json(&["get", &b.id]);
    assert_eq!(got["databases_appeared"], serde_json::json!(["billing"]));
    assert_eq!(got["databases_disappeared"], serde_json::json!([]));
    let shown = fleet.dsctl(&["get", &b.id]).expect_success("dsctl get");
    for line in [
        "whole server on",
        "billing: ",
        "shop: ",
        "3000 rows in 1 table, owner shop_owner",
        "new since previous",
    ] {
        assert!(shown.stdout.contains(line), "{line}: {}", shown.stdout);
    }
    let listed = fleet
        .dsctl(&["list", "--target", "srv"])
        .expect_success("dsctl list");
    assert!(listed.stdout.contains("DATABASES"), "{}", listed.stdout);
    assert!(
        listed.stdout.contains("billing,crm,hr (+1)") && listed.stdout.contains("crm,hr,shop"),
        "{}",
        listed.stdout
    );
    // One that disappears is named by the backup's event.
    old.psql("postgres", "DROP DATABASE hr;");
    let third = fleet
        .dsctl(&["backup", "srv"])
        .expect_success("dsctl backup");
    assert!(
        third
            .stderr
            .contains("(3 databases); gone since the previous backup: hr: "),
        "{}",
        third.stderr
    );
    let verified = fleet
        .dsctl(&["verify", &b.id])
        .expect_success("dsctl verify");
    assert!(
        verified.stdout.contains("4 databases"),
        "{}",
        verified.stdout
    );
    let listed_one = fleet
        .dsctl(&["restore", &b.id, "--dry-run", "--database", "crm"])
        .expect_success("a dry run of one database");
    assert!(
        listed_one.stdout.contains("1 database verified: crm: "),
        "{}",
        listed_one.stdout
    );
    let drilled = fleet
        .dsctl(&["verify", &b.id, "--restore"])
        .expect_success("a drill of every database");
    assert!(
        drilled.stdout.contains("4 databases drilled")
            && drilled
                .stdout
                .contains("every table's rows as recorded (1 tables, 3000 rows)"),
        "{}",
        drilled.stdout
    );

    let dbs = ["billing", "crm", "hr", "shop"];
    old.psql("postgres", "CREATE DATABASE hr;");
    let before = {
        // hr as it was at the second backup, for the comparison below.
        fill("hr", "postgres", 10);
        server_state(&old, &dbs)
    };
    // The server dies; the agent comes back against a new, empty one.
    fleet.remove_agent("srv");
    drop(old);
    let new = PgCluster::new();
    fleet.add_agent_with("srv", &new, "postgres", &env);
    let renamed = fleet
        .dsctl(&["--quiet", "restore", &b.id, "--target-db", "shop2"])
        .expect_failure("--target-db without --database");
    assert_one_line_error(&renamed.stderr, "add --database NAME");
    let restored = fleet
        .dsctl(&["restore", &b.id])
        .expect_success("one restore of the whole server");
    assert!(
        restored.stdout.contains("4 databases restored"),
        "{}",
        restored.stdout
    );
    assert_eq!(server_state(&new, &dbs), before);
    assert_eq!(
        new.query_one(
            "postgres",
            "SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles WHERE rolname IN ('shop_owner', 'crm_owner', 'analyst')"
        ),
        "analyst,crm_owner,shop_owner"
    );
    assert_eq!(
        as_role(
            &new,
            "shop_owner",
            "shop-secret-9",
            "shop",
            "SELECT count(*) FROM items"
        ),
        Ok("3000".into())
    );
    assert_eq!(
        new.query_one(
            "postgres",
            "SELECT datcollate FROM pg_database WHERE datname = 'crm'"
        ),
        "C"
    );
    // Again: every database is there and not empty; nothing changes.
    new.psql("shop", "INSERT INTO items VALUES (999999, 'after');");
    let again = fleet
        .dsctl(&["--quiet", "restore", &b.id])
        .expect_failure("a second whole-server restore");
    assert_one_line_error(
        &again.stderr,
        "databases billing, crm, hr, shop already exist",
    );
    assert_eq!(new.query_one("shop", "SELECT count(*) FROM items"), "3001");
    // One database under a new name, and one exported on its own.
    fleet
        .dsctl(&[
            "restore",
            &b.id,
            "--database",
            "crm",
            "--target-db",
            "crm_copy",
        ])
        .expect_success("one database under a new name");
    assert_eq!(
        new.query_one("crm_copy", "SELECT count(*) FROM items"),
        "200"
    );
    let missing = fleet
        .dsctl(&["--quiet", "restore", &b.id, "--database", "nope"])
        .expect_failure("a database the backup lacks");
    assert_one_line_error(&missing.stderr, "holds no database \"nope\"");
    let out = fleet.dir().join("billing.dump");
    let exported = fleet
        .dsctl(&[
            "export",
            &b.id,
            "--database",
            "billing",
            "--out",
            out.to_str().unwrap(),
        ])
        .expect_success("export of one database");
    assert!(
        exported.stdout.contains("(database billing)")
            && exported
                .stdout
                .contains("matches pg_dump's output at backup time"),
        "{}",
        exported.stdout
    );
    let whole = fleet
        .dsctl(&[
            "--quiet",
            "export",
            &b.id,
            "--out",
            fleet.dir().join("all.dump").to_str().unwrap(),
        ])
        .expect_failure("export of a whole server without --database");
    assert_one_line_error(&whole.stderr, "name one with --database");
    new.psql("postgres", "CREATE DATABASE billing_plain;");
    let mut pg_restore = new.client_command("pg_restore");
    pg_restore
        .args(["-d", "billing_plain", "--no-owner"])
        .arg(&out);
    let r = datasaver_tests::procs::run(pg_restore, Duration::from_secs(60));
    assert!(r.success(), "{}", r.stderr);
    assert_eq!(
        new.query_one("billing_plain", "SELECT count(*) FROM items"),
        "42"
    );
}

/// A database whose name has characters a restore does not take as a
/// destination (here a space) is backed up like any other (its object key
/// escaped); a whole-server restore refuses before writing any database,
/// saying how to restore it alone, and that works.
#[test]
fn an_oddly_named_database_is_kept_and_comes_back_under_a_new_name() {
    let pg = PgCluster::new();
    pg.psql(
        "postgres",
        "CREATE DATABASE plain; CREATE DATABASE \"odd db\";",
    );
    pg.psql(
        "odd db",
        "CREATE TABLE t AS SELECT generate_series(1, 77) AS id;",
    );
    let mut fleet = Fleet::start();
    fleet.add_agent_with(
        "srv",
        &pg,
        "postgres",
        &[("DATASAVER_DATABASES", "plain,odd*")],
    );
    let b = fleet.backup("srv", None);
    assert_eq!(
        b.raw["databases"],
        serde_json::json!(["odd db", "plain"]),
        "{}",
        b.raw
    );
    let keys = datasaver_tests::fleet::files_under(&fleet.storage_dir());
    assert!(
        keys.iter()
            .any(|k| k.ends_with(&format!("{}.db-odd%20db.dump.zst", b.id))),
        "{keys:?}"
    );
    let dbs = || {
        pg.query_one(
            "postgres",
            "SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database",
        )
    };
    let before = dbs();
    let refused = fleet
        .dsctl(&["--quiet", "restore", &b.id])
        .expect_failure("a whole-server restore with a name it cannot take");
    assert_one_line_error(
        &refused.stderr,
        "--database \"odd db\" --target-db NEW_NAME",
    );
    assert_eq!(dbs(), before, "the refused restore changed the server");
    fleet
        .dsctl(&[
            "restore",
            &b.id,
            "--database",
            "odd db",
            "--target-db",
            "odd_copy",
        ])
        .expect_success("the odd database alone, under a new name");
    assert_eq!(pg.query_one("odd_copy", "SELECT count(*) FROM t"), "77");
}
