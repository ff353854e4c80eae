//! The server is gone: a backup restored onto a brand-new, empty Postgres.

use datasaver_tests::{assert_one_line_error, Fleet, PgCluster};

/// The roles a database needs are not in its `pg_dump` archive: on a new
/// server without them, pg_restore stops at the first `OWNER TO`. The user
/// must read Postgres's own words (which role is missing), not a broken
/// pipe, and find no half-restored database left behind.
#[test]
fn a_restore_onto_a_new_server_without_the_owner_role_says_what_postgres_said() {
    let old = PgCluster::new();
    old.psql("postgres", "CREATE ROLE app_owner LOGIN;");
    old.psql("postgres", "CREATE DATABASE shop OWNER app_owner;");
    old.psql(
        "shop",
        "SET ROLE app_owner;
         CREATE TABLE orders (id int PRIMARY KEY, item text);
         INSERT INTO orders SELECT g, 'item ' || g FROM generate_series(1, 50000) g;",
    );
    let mut fleet = Fleet::start();
    fleet.add_agent("shop", &old, "shop");
    let b = fleet.backup("shop", None);
    assert!(b.is_completed(), "{}", b.raw);

    // The server dies; the agent comes back against a new, empty one.
    fleet.remove_agent("shop");
    drop(old);
    let new = PgCluster::new();
    fleet.add_agent("shop", &new, "postgres");

    let out = fleet
        .dsctl(&["--quiet", "restore", &b.id, "--target-db", "shop"])
        .expect_code(1, "restore onto a server without the owner role");
    let line = assert_one_line_error(&out.stderr, r#"role "app_owner" does not exist"#);
    assert!(line.contains("pg_restore failed"), "{line}");
    assert!(!line.contains("Broken pipe"), "{line}");
    assert!(
        !new.db_exists("shop"),
        "the half-restored database was left behind: {:?}",
        new.databases()
    );
}
