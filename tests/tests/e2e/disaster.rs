//! The server is gone: a backup restored onto a brand-new, empty Postgres.

use std::time::Duration;

use datasaver_tests::fidelity::{compare_databases, load_fidelity};
use datasaver_tests::webhook::WebhookReceiver;
use datasaver_tests::{assert_one_line_error, wait_until, Fleet, FleetOptions, PgCluster};

/// The roles a database needs are not in its `pg_dump` archive: on a new,
/// empty server the restore is refused before anything is created, naming
/// every missing role and what to run; once they exist, the same restore
/// brings the data, the owner and the grants back.
#[test]
fn a_restore_onto_a_new_server_names_the_missing_roles_then_works() {
    let old = PgCluster::new();
    old.psql(
        "postgres",
        "CREATE ROLE app_owner LOGIN; CREATE ROLE app_reader;",
    );
    // Not the server's defaults: the restore must recreate these.
    old.psql(
        "postgres",
        "CREATE DATABASE shop OWNER app_owner ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;",
    );
    old.psql(
        "shop",
        "SET ROLE app_owner;
         CREATE TABLE orders (id int PRIMARY KEY, item text);
         INSERT INTO orders SELECT g, 'item ' || g FROM generate_series(1, 50000) g;
         GRANT SELECT ON orders TO app_reader;",
    );
    // Only app_reader (and the owner) may connect.
    old.psql(
        "postgres",
        "REVOKE ALL ON DATABASE shop FROM PUBLIC; GRANT CONNECT ON DATABASE shop TO app_reader;",
    );
    let mut fleet = Fleet::start();
    fleet.add_agent("shop", &old, "shop");
    let b = fleet.backup("shop", None);
    assert!(b.is_completed(), "{}", b.raw);
    assert_eq!(
        b.raw["roles"],
        serde_json::json!(["app_owner", "app_reader"]),
        "{}",
        b.raw
    );

    // The server dies; the agent comes back against a new, empty one.
    fleet.remove_agent("shop");
    drop(old);
    let new = PgCluster::new();
    fleet.add_agent("shop", &new, "postgres");
    let before = new.databases();
    let out = fleet
        .dsctl(&["--quiet", "restore", &b.id, "--target-db", "shop"])
        .expect_code(1, "restore onto a server without the roles");
    let line = assert_one_line_error(
        &out.stderr,
        "needs roles app_owner, app_reader that this server does not have",
    );
    assert!(
        line.contains(r#"CREATE ROLE "app_owner"; CREATE ROLE "app_reader";"#)
            && line.contains("nothing was changed"),
        "{line}"
    );
    assert_eq!(new.databases(), before, "a database was created");

    // What the message says to do, then the same restore.
    new.psql(
        "postgres",
        "CREATE ROLE app_owner LOGIN; CREATE ROLE app_reader;",
    );
    fleet
        .dsctl(&["--quiet", "restore", &b.id, "--target-db", "shop"])
        .expect_success("restore once the roles exist");
    assert_eq!(
        new.query_one("shop", "SELECT count(*) FROM orders"),
        "50000"
    );
    assert_eq!(
        new.query_one(
            "shop",
            "SELECT tableowner FROM pg_tables WHERE tablename = 'orders'"
        ),
        "app_owner"
    );
    assert_eq!(
        new.query_one(
            "shop",
            "SELECT has_table_privilege('app_reader', 'orders', 'SELECT')::text"
        ),
        "true"
    );
    // The database itself, as it was created.
    assert_eq!(
        new.query_one(
            "postgres",
            "SELECT pg_get_userbyid(datdba) || ' ' || pg_encoding_to_char(encoding) || ' ' || datcollate || ' ' || datctype
               FROM pg_database WHERE datname = 'shop'"
        ),
        "app_owner LATIN1 C C"
    );
    new.psql("postgres", "CREATE ROLE outsider LOGIN;");
    assert_eq!(
        new.query_one(
            "postgres",
            "SELECT has_database_privilege('app_reader', 'shop', 'CONNECT')::text || ' '
                 || has_database_privilege('outsider', 'shop', 'CONNECT')::text"
        ),
        "true false",
        "the database's own grants did not come back"
    );
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
        "CREATE TABLE hot (id int) TABLESPACE fast; INSERT INTO hot VALUES (1);",
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
    let mut fleet = Fleet::start();
    let spec = fleet
        .agent_spec("shop", &source, "shop")
        .env("DATASAVER_PG_BIN_DIR", &newer);
    fleet.add_agent_spec("shop", spec);
    let b = fleet.backup("shop", None);
    assert!(b.is_completed(), "{}", b.raw);

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

    // One flipped byte in storage: refused as corrupt, nothing written.
    let object = fleet
        .storage_dir()
        .join(format!("vault/logical/{}.dump.zst.age", b.id));
    let mut stored = std::fs::read(&object).expect("stored object");
    let mid = stored.len() / 2;
    stored[mid] ^= 0x01;
    std::fs::write(&object, &stored).expect("damage the object");
    let damaged = exports.join("damaged.dump");
    let bad = fleet
        .dsctl(&[
            "--quiet",
            "export",
            &b.id,
            "--out",
            damaged.to_str().expect("utf-8 path"),
            "--identity",
            &identity,
        ])
        .expect_code(1, "export of a damaged backup");
    let line = assert_one_line_error(&bad.stderr, "corrupt");
    assert!(line.contains(&b.id), "{line}");
    assert_eq!(
        listing(),
        vec!["shop.dump".to_string(), "shop2.dump".to_string()],
        "a damaged export left a file"
    );
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
