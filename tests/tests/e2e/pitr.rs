//! Base backups and point-in-time restores end to end (issue 14), through
//! the real binaries: `dsctl backup --physical` stores `pg_basebackup`'s tar
//! only once the WAL to its end is stored; `dsctl restore --physical`
//! rebuilds a data directory that a real server starts from.

use std::time::Duration;

use datasaver_tests::{wait_until, Fleet, PgCluster};

const WAIT: Duration = Duration::from_secs(90);

fn wal_env() -> [(&'static str, &'static str); 2] {
    [
        ("DATASAVER_WAL", "stream"),
        ("DATASAVER_WAL_SYNC_INTERVAL", "1s"),
    ]
}

#[test]
fn a_base_backup_is_stored_whole_with_its_wal() {
    let pg = PgCluster::new();
    pg.create_small_db("shop", 500);
    let mut fleet = Fleet::start();
    fleet.add_agent_with("app", &pg, "postgres", &wal_env());
    assert!(fleet.agent("app").proc.wait_for_log("streaming WAL", WAIT));

    let out = fleet.dsctl(&["backup", "app", "--physical"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stderr.contains("from pg_basebackup"), "{}", out.stderr);
    let list = fleet.list_backups(Some("app"));
    assert_eq!(list.len(), 1, "{list:?}");
    let b = &list[0];
    assert!(b.is_completed(), "{b:?}");
    let text = fleet.dsctl(&["list"]).stdout;
    assert!(text.contains(" base "), "{text}");

    // The stored tar holds the cluster and its manifest.
    let key = fleet
        .storage_dir()
        .join("app/base")
        .join(format!("{}.tar.zst", b.id));
    let tar =
        zstd::stream::decode_all(&std::fs::read(&key).expect("stored tar")[..]).expect("zstd");
    let listing = String::from_utf8_lossy(&tar);
    for name in [
        "PG_VERSION",
        "backup_label",
        "backup_manifest",
        "global/pg_control",
    ] {
        assert!(listing.contains(name), "{name} missing from the tar");
    }
    // The WAL to its end is stored.
    let v = fleet.dsctl_json(&["wal", "--target", "app"]);
    assert!(
        v[0]["timelines"][0]["segments"].as_u64().unwrap_or(0) >= 1,
        "{v:#}"
    );
    // A base backup is not a dump: a logical restore of it is refused.
    let out = fleet.dsctl(&["restore", &b.id]);
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("--physical"), "{}", out.stderr);
}

#[test]
fn a_base_backup_without_the_wal_stream_is_refused() {
    let pg = PgCluster::new();
    let mut fleet = Fleet::start();
    fleet.add_agent("app", &pg, "postgres");
    let out = fleet.dsctl(&["backup", "app", "--physical"]);
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("DATASAVER_WAL=stream"),
        "{}",
        out.describe()
    );
    assert!(wait_until(Duration::from_secs(5), || fleet
        .list_backups(Some("app"))
        .iter()
        .all(|b| !b.is_completed())));
    assert!(
        !fleet.storage_dir().join("app/base").exists()
            || std::fs::read_dir(fleet.storage_dir().join("app/base"))
                .map(|d| d.count() == 0)
                .unwrap_or(true)
    );
}
