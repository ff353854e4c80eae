//! Schedules, GFS retention and cleanup against a real coordinator, agent and Postgres:
//! scheduled backups appear on their own and old ones disappear from catalog and storage,
//! a restart neither loses nor repeats a slot, `cleanup --dry-run` says exactly what then
//! happens, a cleanup killed half-way is finished later, and pin/unpin/delete behave.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use datasaver_tests::s3::RecordingProxy;
use datasaver_tests::{run, wait_until, Fleet, FleetOptions, PgCluster, S3Server};

fn small_db(pg: &PgCluster, db: &str) {
    pg.create_small_db(db, 2000);
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Files under the local storage root, relative to it.
fn stored_files(root: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.insert(rel.display().to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// The object, globals and meta file every completed row must have.
fn expected_files(fleet: &Fleet, target: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for b in fleet.list_backups(Some(target)) {
        if b.status == "completed" {
            let object = b.raw["object_key"].as_str().unwrap_or_default();
            out.insert(object.to_string());
            out.insert(object.replace(".dump", ".globals.sql"));
            out.insert(format!("{target}/logical/{}.meta.json", b.id));
        }
    }
    out
}

/// `slot=...` of every "scheduled backup due" line with attempt=1 in the coordinator log.
fn fired_slots(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("scheduled backup due") && l.contains("attempt=1"))
        .filter_map(|l| l.split("slot=").nth(1))
        .map(|s| s.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn scheduled_backups_rotate_and_a_restart_repeats_nothing() {
    let pg = PgCluster::new();
    small_db(&pg, "app");
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: env(&[
            ("DATASAVER_KEEP_LAST", "2"),
            ("DATASAVER_KEEP_DAILY", "0"),
            ("DATASAVER_KEEP_WEEKLY", "0"),
            ("DATASAVER_KEEP_MONTHLY", "0"),
        ]),
        ..Default::default()
    });
    let spec = fleet
        .agent_spec("app", &pg, "app")
        .env("DATASAVER_SCHEDULE", "*/3 * * * * *");
    fleet.add_agent_spec("app", spec);

    // Backups appear on their own; every id ever seen is remembered.
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let watch = |fleet: &Fleet, seen: &mut BTreeSet<String>, n: usize| {
        assert!(
            wait_until(Duration::from_secs(90), || {
                for b in fleet.list_backups(Some("app")) {
                    if b.status == "completed" {
                        assert_eq!(b.raw["trigger"], "scheduled", "{}", b.raw);
                        seen.insert(b.id.clone());
                    }
                }
                seen.len() >= n
            }),
            "only {} scheduled backups appeared: {seen:?}\n{}",
            seen.len(),
            fleet.coordinator().log()
        );
    };
    watch(&fleet, &mut seen, 4);

    // The coordinator is down for two slots: exactly one catch-up run at start-up, not one
    // per missed slot; then the schedule goes on.
    fleet.stop_coordinator();
    std::thread::sleep(Duration::from_secs(7));
    fleet.start_coordinator();
    fleet.wait_agent_listed("app", Duration::from_secs(60));
    let before_restart = seen.len();
    watch(&fleet, &mut seen, before_restart + 3);

    // Stop the schedule (the agent goes), let in-flight work settle.
    fleet.remove_agent("app");
    std::thread::sleep(Duration::from_secs(2));
    let rows = fleet.list_backups(Some("app"));
    let completed: Vec<_> = rows.iter().filter(|b| b.status == "completed").collect();
    // keep_last=2, nothing else: exactly the two newest completed survive.
    assert_eq!(completed.len(), 2, "{rows:?}");
    let newest_two: BTreeSet<String> = seen.iter().rev().take(2).cloned().collect();
    let kept: BTreeSet<String> = completed.iter().map(|b| b.id.clone()).collect();
    assert_eq!(kept, newest_two);
    // Storage holds exactly their objects and meta files: the old ones are gone from both.
    assert_eq!(
        stored_files(&fleet.storage_dir()),
        expected_files(&fleet, "app")
    );

    // No slot fired twice, across both coordinator lives.
    let slots = fired_slots(&fleet.coordinator().log());
    assert!(slots.len() >= 7, "{slots:?}");
    let mut counts: HashMap<&String, usize> = HashMap::new();
    for s in &slots {
        *counts.entry(s).or_default() += 1;
    }
    let dup: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dup.is_empty(), "slots that ran twice: {dup:?}");
    let log = fleet.coordinator().log();
    let second_of = |needle: &str, nth: usize| {
        log.lines()
            .filter(|l| l.contains(needle))
            .nth(nth)
            .map(|l| l[..19].to_string())
            .unwrap_or_else(|| panic!("no {needle:?} #{nth} in the log"))
    };
    let stopped = second_of("shutdown requested", 0);
    let started = second_of("coordinator ready", 1);
    let caught_up: Vec<_> = slots
        .iter()
        .filter(|s| s[..19] > *stopped && s[..19] < *started)
        .collect();
    assert_eq!(
        caught_up.len(),
        1,
        "missed slots between {stopped} and {started} must run once: {slots:?}"
    );
}

#[test]
fn due_backup_without_its_agent_is_recorded_failed() {
    let pg = PgCluster::new();
    small_db(&pg, "app");
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: env(&[
            ("DATASAVER_AGENT_GRACE", "1s"),
            ("DATASAVER_RETRY_ATTEMPTS", "1"),
        ]),
        ..Default::default()
    });
    let spec = fleet
        .agent_spec("app", &pg, "app")
        .env("DATASAVER_SCHEDULE", "*/2 * * * * *");
    fleet.add_agent_spec("app", spec);
    assert!(wait_until(Duration::from_secs(60), || fleet
        .list_backups(Some("app"))
        .iter()
        .any(|b| b.status == "completed")));
    fleet.remove_agent("app");
    // The schedule is remembered without the agent; the next due run fails loudly.
    assert!(
        wait_until(Duration::from_secs(60), || fleet
            .list_backups(Some("app"))
            .iter()
            .any(|b| b.status == "failed"
                && b.raw["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("agent not connected")))),
        "{:?}",
        fleet.list_backups(Some("app"))
    );
    let health = fleet.dsctl_json(&["health"]);
    let app = &health["targets"][0];
    assert_eq!(app["target"], "app", "{health}");
    assert_eq!(app["agent_connected"], false);
    assert_eq!(app["schedule"], "*/2 * * * * *");
    assert!(app["next_backup_at"].is_string(), "{health}");
}

#[test]
fn cleanup_dry_run_matches_and_a_killed_cleanup_is_finished() {
    let srv = S3Server::start();
    let proxy = RecordingProxy::start(srv.port());
    let pg = PgCluster::new();
    small_db(&pg, "app");
    let mut coordinator_env = srv.coordinator_env("");
    coordinator_env.retain(|(k, _)| k != "DATASAVER_S3_ENDPOINT");
    coordinator_env.extend(env(&[
        ("DATASAVER_S3_ENDPOINT", &proxy.endpoint()),
        ("DATASAVER_KEEP_LAST", "4"),
        ("DATASAVER_KEEP_DAILY", "0"),
        ("DATASAVER_KEEP_WEEKLY", "0"),
        ("DATASAVER_KEEP_MONTHLY", "0"),
    ]));
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env,
        ..Default::default()
    });
    fleet.add_agent("app", &pg, "app");
    let ids: Vec<String> = (0..4).map(|_| fleet.backup("app", None).id).collect();
    let manual = fleet.backup("app", Some("before migration")).id;
    assert_eq!(fleet.list_backups(Some("app")).len(), 5);

    // Tighter retention from now on.
    let spec = fleet.coordinator_mut().spec_mut();
    *spec = spec.clone().env("DATASAVER_KEEP_LAST", "1");
    fleet.restart_coordinator();
    fleet.wait_agent_listed("app", Duration::from_secs(60));

    let dry = fleet.dsctl_json(&["cleanup", "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    let items = dry["targets"][0]["backups"]
        .as_array()
        .expect("backups in dry-run JSON")
        .clone();
    let would_delete: BTreeSet<String> = items
        .iter()
        .filter(|i| i["action"] == "delete")
        .map(|i| i["id"].as_str().unwrap_or_default().to_string())
        .collect();
    let expected: BTreeSet<String> = ids[..3].iter().cloned().collect();
    assert_eq!(would_delete, expected, "{dry}");
    for i in &items {
        let reasons = i["reasons"].as_array().map(|r| r.len()).unwrap_or(0);
        if i["action"] == "delete" {
            assert_eq!(reasons, 1, "{i}");
            assert!(
                i["reasons"][0]
                    .as_str()
                    .unwrap_or_default()
                    .contains("last 1"),
                "{i}"
            );
        } else {
            assert!(reasons >= 1, "{i}");
        }
    }
    let kept = items.iter().find(|i| i["id"] == manual.as_str()).unwrap();
    assert_eq!(
        kept["action"], "keep",
        "a labelled backup is kept (no manual period set)"
    );
    // The human form names every backup with its verdict.
    let text = fleet
        .dsctl(&["cleanup", "--dry-run"])
        .expect_success("dsctl cleanup --dry-run");
    for id in &ids[..3] {
        assert!(
            text.stdout
                .lines()
                .any(|l| l.contains("would delete") && l.contains(id.as_str())),
            "{}",
            text.stdout
        );
    }
    assert_eq!(
        fleet.list_backups(Some("app")).len(),
        5,
        "dry run deleted something"
    );

    // The real cleanup, with the S3 server not answering deletes: the coordinator dies
    // while rows are marked for deletion and their objects are still there.
    proxy.stall_on(b"?delete");
    let mut cmd = fleet.dsctl_command();
    cmd.args(["cleanup"]);
    let handle = std::thread::spawn(move || run(cmd, Duration::from_secs(120)));
    assert!(
        wait_until(Duration::from_secs(60), || fleet
            .list_backups(Some("app"))
            .iter()
            .any(|b| b.status == "deleting")),
        "cleanup never marked a row"
    );
    fleet.kill_coordinator();
    handle
        .join()
        .expect("dsctl thread")
        .expect_code(1, "cleanup whose coordinator died");
    proxy.release();

    // The next start finishes the deletion it had begun; no row points at a missing object.
    fleet.start_coordinator();
    let rows = fleet.list_backups(Some("app"));
    assert!(rows.iter().all(|b| b.status == "completed"), "{rows:?}");
    assert!(
        rows.len() < 5,
        "the marked backup was not finished: {rows:?}"
    );
    let objects: BTreeSet<String> = srv.objects().into_iter().collect();
    assert!(
        expected_files(&fleet, "app").is_subset(&objects),
        "a row points at a missing object: {objects:?}"
    );

    // The next cleanup finishes the job: exactly the dry run's set is gone, from the catalog
    // and from the bucket.
    fleet
        .dsctl(&["cleanup"])
        .expect_success("cleanup after the crash");
    let left: BTreeSet<String> = fleet
        .list_backups(Some("app"))
        .iter()
        .map(|b| b.id.clone())
        .collect();
    let mut want: BTreeSet<String> = BTreeSet::new();
    want.insert(ids[3].clone());
    want.insert(manual.clone());
    assert_eq!(left, want);
    let objects: BTreeSet<String> = srv.objects().into_iter().collect();
    assert_eq!(objects, expected_files(&fleet, "app"));
    assert!(fleet
        .list_backups(Some("app"))
        .iter()
        .all(|b| b.status == "completed"));
}

#[test]
fn pin_unpin_and_delete() {
    let pg = PgCluster::new();
    small_db(&pg, "app");
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: env(&[
            ("DATASAVER_KEEP_LAST", "1"),
            ("DATASAVER_KEEP_DAILY", "0"),
            ("DATASAVER_KEEP_WEEKLY", "0"),
            ("DATASAVER_KEEP_MONTHLY", "0"),
        ]),
        ..Default::default()
    });
    fleet.add_agent("app", &pg, "app");
    let first = fleet.backup("app", None).id;
    let p = fleet.dsctl_json(&["pin", &first]);
    assert_eq!(p["pinned"], true);
    // keep_last=1 would drop `first` now; pinned, it stays.
    let second = fleet.backup("app", None).id;
    let third = fleet.backup("app", None).id;
    let ids: BTreeSet<String> = fleet
        .list_backups(Some("app"))
        .iter()
        .map(|b| b.id.clone())
        .collect();
    assert_eq!(
        ids,
        [first.clone(), third.clone()].into_iter().collect(),
        "{second} should be gone"
    );
    // The pin is in the meta file too (a rebuilt catalog keeps it).
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            fleet
                .storage_dir()
                .join(format!("app/logical/{first}.meta.json")),
        )
        .expect("meta file"),
    )
    .expect("meta JSON");
    assert_eq!(meta["pinned"], true);

    // A pinned backup cannot be deleted; the newest only with --force; without a terminal,
    // deleting needs --yes.
    let out = fleet
        .dsctl(&["delete", &first, "--yes"])
        .expect_code(1, "delete a pinned backup");
    assert!(out.stderr.contains("unpin"), "{}", out.describe());
    let out = fleet
        .dsctl(&["delete", &third, "--yes"])
        .expect_code(1, "delete the newest without --force");
    assert!(out.stderr.contains("--force"), "{}", out.describe());
    fleet.dsctl(&["unpin", &first]).expect_success("unpin");
    let out = fleet
        .dsctl(&["delete", &first])
        .expect_code(1, "delete without --yes and without a terminal");
    assert!(out.stderr.contains("--yes"), "{}", out.describe());
    fleet
        .dsctl(&["delete", &first, "--yes"])
        .expect_success("delete");
    let ids: Vec<String> = fleet
        .list_backups(Some("app"))
        .iter()
        .map(|b| b.id.clone())
        .collect();
    assert_eq!(ids, vec![third.clone()]);
    assert_eq!(
        stored_files(&fleet.storage_dir()),
        expected_files(&fleet, "app")
    );
    fleet
        .dsctl(&["delete", &third, "--yes", "--force"])
        .expect_success("delete --force");
    assert!(fleet.list_backups(Some("app")).is_empty());
    assert!(stored_files(&fleet.storage_dir()).is_empty());
}
