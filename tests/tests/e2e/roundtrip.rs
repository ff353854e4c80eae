//! A real backup and restore through the real binaries, proven faithful: the
//! fidelity database (every kind of object, >100k rows) is backed up, then
//! restored into a new database and compared object by object and row by row.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use datasaver_tests::fidelity::{compare_databases, load_fidelity};
use datasaver_tests::{Fleet, PgCluster};

#[test]
fn backup_restore_roundtrip_is_faithful() {
    let pg = PgCluster::new();
    load_fidelity(&pg, "shop");
    let mut fleet = Fleet::start();
    fleet.add_agent("shop-main", &pg, "shop");

    let b = fleet.backup("shop-main", Some("before upgrade"));
    assert!(b.is_completed(), "{}", b.raw);
    assert!(b.id.starts_with("shop-main_"), "id {}", b.id);
    assert_eq!(b.kind, "logical");
    assert_eq!(b.label.as_deref(), Some("before upgrade"));
    assert_eq!(b.compression.as_deref(), Some("zstd"));
    assert!(!b.encrypted);
    assert!(b.tags.contains(&"manual".to_string()), "{:?}", b.tags);
    let checksum = b.checksum.clone().unwrap_or_default();
    assert!(
        checksum.starts_with("blake3:") && checksum.len() == 7 + 64,
        "{checksum}"
    );
    let stored = b.stored_bytes.unwrap_or(0);
    let raw = b.raw_bytes.unwrap_or(0);
    assert!(
        stored > 0 && raw > stored,
        "zstd should shrink the dump: raw {raw}, stored {stored}"
    );

    // list and get agree with what backup printed
    let listed = fleet.list_backups(Some("shop-main"));
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, b.id);
    assert_eq!(listed[0].checksum.as_deref(), Some(checksum.as_str()));
    let got = fleet.get_backup(&b.id);
    assert_eq!(got.raw, b.raw);
    let table = fleet.dsctl(&["list"]).expect_success("dsctl list");
    let header = table.stdout.lines().next().unwrap_or_default().to_string();
    for col in ["ID", "TARGET", "DATE", "SIZE", "TYPE", "STATUS"] {
        assert!(header.contains(col), "list header {header:?} lacks {col}");
    }
    assert!(table.stdout.contains(&b.id));

    // storage layout: the object and its meta file, owner-only
    let dir = fleet.storage_dir().join("shop-main/logical");
    let object = dir.join(format!("{}.dump.zst", b.id));
    let meta_path = dir.join(format!("{}.meta.json", b.id));
    let object_len = std::fs::metadata(&object).expect("object exists").len();
    assert_eq!(object_len, stored, "object size matches the catalog");
    assert_eq!(
        std::fs::metadata(&object).unwrap().permissions().mode() & 0o077,
        0
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).expect("meta file exists"))
            .expect("meta is JSON");
    assert_eq!(meta["id"], b.id.as_str());
    assert_eq!(meta["checksum"], checksum.as_str());
    assert_eq!(meta["stored_bytes"], stored);
    assert_eq!(meta["database"]["name"], "shop");
    assert!(meta["pg_dump_version"]
        .as_str()
        .is_some_and(|v| v.starts_with(&pg.major().to_string())));
    let catalog = fleet.data_dir().join("catalog.db");
    assert_eq!(
        std::fs::metadata(&catalog).unwrap().permissions().mode() & 0o077,
        0
    );

    // verify: checksum and table of contents
    let v = fleet
        .dsctl(&["verify", &b.id])
        .expect_success("dsctl verify");
    assert!(v.stdout.contains("verified"), "{}", v.describe());
    assert!(fleet.get_backup(&b.id).raw["verify_result"]
        .as_str()
        .is_some_and(|r| r.starts_with("ok")));

    // dry run changes nothing
    let before = pg.databases();
    fleet
        .dsctl(&["restore", &b.id, "--dry-run"])
        .expect_success("dsctl restore --dry-run");
    assert_eq!(
        pg.databases(),
        before,
        "a dry run must not create databases"
    );

    // the real restore, into a new database, compared to the source
    let out = fleet.restore(&b.id, "shop_restored", &[]);
    assert!(out.stdout.contains("shop_restored"), "{}", out.describe());
    compare_databases(&pg, "shop", &pg, "shop_restored")
        .expect("restored database equals the source");

    // a second restore into the now non-empty database is refused and changes nothing
    pg.psql(
        "shop_restored",
        "CREATE TABLE marker (x int); INSERT INTO marker VALUES (7)",
    );
    let refused = fleet
        .dsctl(&["--quiet", "restore", &b.id, "--target-db", "shop_restored"])
        .expect_code(1, "restore over a non-empty database without --force");
    assert!(refused.stderr.contains("--force"), "{}", refused.describe());
    assert_eq!(pg.query_one("shop_restored", "SELECT x FROM marker"), "7");

    // --force replaces it, even with a client connected
    let mut holder = pg.client_command("psql");
    holder
        .args(["-X", "-d", "shop_restored", "-c", "SELECT pg_sleep(60)"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut holder = holder.spawn().expect("start a client holding a connection");
    std::thread::sleep(Duration::from_millis(500));
    fleet
        .dsctl(&["restore", &b.id, "--target-db", "shop_restored", "--force"])
        .expect_success("restore --force");
    let _ = holder.kill();
    let _ = holder.wait();
    compare_databases(&pg, "shop", &pg, "shop_restored").expect("forced restore equals the source");
    assert!(
        pg.try_psql("shop_restored", "SELECT x FROM marker")
            .is_err(),
        "old contents replaced"
    );

    // --target --latest picks this backup and the default name is <db>_restored_<time>
    let latest = fleet
        .dsctl(&["--json", "restore", "--target", "shop-main", "--latest"])
        .expect_success("restore --target --latest");
    let v = latest.json();
    let db = v["target_db"]
        .as_str()
        .expect("target_db in JSON")
        .to_string();
    assert!(
        db.starts_with("shop_restored_"),
        "default restore name {db}"
    );
    assert_eq!(v["backup"]["id"], b.id.as_str());
    compare_databases(&pg, "shop", &pg, &db).expect("latest restore equals the source");
}
