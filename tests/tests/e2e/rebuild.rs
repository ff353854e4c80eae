//! Losing the catalog must not lose the backups: it is rebuilt from the meta
//! files in storage, identical to before, and anything that does not add up is
//! reported instead of imported.

use std::time::Duration;

use datasaver_tests::fidelity::compare_databases_min_rows;
use datasaver_tests::{Fleet, PgCluster};

#[test]
fn catalog_is_rebuilt_from_storage() {
    let pg = PgCluster::new();
    pg.create_db("app");
    pg.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 30000) g;",
    );
    let mut fleet = Fleet::start();
    fleet.add_agent("app", &pg, "app");
    let first = fleet.backup("app", Some("first"));
    std::thread::sleep(Duration::from_millis(1100));
    let second = fleet.backup("app", None);
    fleet.dsctl(&["verify", &first.id]).expect_success("verify");
    let before = fleet.dsctl_json(&["list"]);
    assert_eq!(before.as_array().map(|a| a.len()), Some(2));

    // lose the catalog; leave a stray object and a meta whose object is short
    fleet.stop_coordinator();
    for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let _ = std::fs::remove_file(fleet.data_dir().join(f));
    }
    let dir = fleet.storage_dir().join("app/logical");
    std::fs::write(dir.join("app_20200101_000000.dump.zst"), b"stray bytes").expect("stray object");
    let second_obj = dir.join(format!("{}.dump.zst", second.id));
    let saved = std::fs::read(&second_obj).expect("second object");
    std::fs::write(&second_obj, &saved[..saved.len() / 2]).expect("truncate second object");

    fleet.start_coordinator();
    let after = fleet.dsctl_json(&["list"]);
    let ids: Vec<&str> = after
        .as_array()
        .expect("list is an array")
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec![first.id.as_str()],
        "only the intact backup is imported"
    );
    assert_eq!(
        after[0], before[1],
        "the rebuilt row is identical, verify result included"
    );
    assert!(fleet
        .coordinator()
        .log()
        .contains("rebuilt it from storage"));

    // put the object back: an explicit rebuild imports it and reports the stray
    std::fs::write(&second_obj, &saved).expect("restore second object");
    let report = fleet.dsctl_json(&["catalog", "rebuild"]);
    assert_eq!(report["imported"], serde_json::json!([second.id]));
    assert_eq!(report["already_known"], 1);
    let problems = report["problems"].to_string();
    assert!(
        problems.contains("app_20200101_000000.dump.zst")
            && problems.contains("without a meta file"),
        "{problems}"
    );
    let after = fleet.dsctl_json(&["list"]);
    assert_eq!(
        after, before,
        "dsctl list --json is identical to before the catalog was lost"
    );

    // and restores still work from the rebuilt catalog
    fleet.wait_agent_listed("app", Duration::from_secs(60));
    fleet.restore(&first.id, "app_back", &[]);
    compare_databases_min_rows(&pg, "app", &pg, "app_back", 30_000)
        .expect("restored from the rebuilt catalog");
}
