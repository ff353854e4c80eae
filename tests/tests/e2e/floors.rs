//! The coordinator sets the floor: an agent that asks for `keep_*=0`, `max_age_days=1` and a
//! per-second schedule gets at least the coordinator's floor (DATASAVER_MIN_*): its schedule
//! runs no more often than DATASAVER_MIN_SCHEDULE_INTERVAL, retention keeps at least the
//! floor's backups, `dsctl health` names every raised request, and the coordinator logs each
//! raise once, not on every reconnect.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use datasaver_tests::{wait_until, Fleet, FleetOptions, PgCluster};

/// The minimum interval the coordinator enforces in this test (seconds, so the test is fast).
const INTERVAL_S: i64 = 4;

fn created(b: &datasaver_tests::Backup) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(&b.created_at)
        .unwrap_or_else(|e| panic!("created_at {:?}: {e}", b.created_at))
        .with_timezone(&Utc)
}

#[test]
fn floors_an_agent_cannot_ask_for_less_than_the_coordinator_keeps() {
    let pg = PgCluster::new();
    pg.create_small_db("app", 500);
    let env: Vec<(String, String)> = [
        ("DATASAVER_MIN_SCHEDULE_INTERVAL", format!("{INTERVAL_S}s")),
        ("DATASAVER_MIN_KEEP_LAST", "3".into()),
        ("DATASAVER_MIN_KEEP_DAILY", "0".into()),
        ("DATASAVER_MIN_KEEP_WEEKLY", "0".into()),
        ("DATASAVER_MIN_KEEP_MONTHLY", "0".into()),
        ("DATASAVER_MIN_AGE_DAYS", "30".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: env,
        ..Default::default()
    });
    // What a compromised database host would ask for: nothing kept, every second.
    let hostile = |fleet: &Fleet| {
        fleet
            .agent_spec("app", &pg, "app")
            .env("DATASAVER_SCHEDULE", "* * * * * *")
            .env("DATASAVER_KEEP_LAST", "0")
            .env("DATASAVER_KEEP_DAILY", "0")
            .env("DATASAVER_KEEP_WEEKLY", "0")
            .env("DATASAVER_KEEP_MONTHLY", "0")
            .env("DATASAVER_MAX_AGE_DAYS", "1")
    };
    let spec = hostile(&fleet);
    let since_start = Instant::now();
    fleet.add_agent_spec("app", spec);

    // Every completed backup ever listed (retention deletes the older ones, so the catalog is
    // read often enough to see each one: a backup lives for at least 3 intervals).
    let mut seen: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    let look = |fleet: &Fleet, seen: &mut BTreeMap<String, DateTime<Utc>>| {
        for b in fleet.list_backups(Some("app")) {
            if b.is_completed() {
                assert_eq!(b.raw["trigger"], "scheduled", "{}", b.raw);
                seen.insert(b.id.clone(), created(&b));
            }
        }
    };
    assert!(
        wait_until(Duration::from_secs(20), || {
            look(&fleet, &mut seen);
            !seen.is_empty()
        }),
        "no scheduled backup appeared\n{}",
        fleet.coordinator().log()
    );
    // A window of 22 s: a per-second schedule would run ~20 times in it, the floor 6.
    let window = Duration::from_secs(22);
    let began = Instant::now();
    while began.elapsed() < window {
        look(&fleet, &mut seen);
        std::thread::sleep(Duration::from_millis(400));
    }
    // The agent goes: no more slots, and whatever ran has settled.
    fleet.remove_agent("app");
    std::thread::sleep(Duration::from_secs(1));
    look(&fleet, &mut seen);

    // (a) The schedule runs no more often than the minimum interval: consecutive scheduled
    // backups (their catalog start times) are at least the interval apart, and the count over
    // the window is what that allows.
    let mut times: Vec<DateTime<Utc>> = seen.values().copied().collect();
    times.sort();
    let gaps: Vec<i64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).num_milliseconds())
        .collect();
    assert!(
        gaps.iter().all(|g| *g >= INTERVAL_S * 1000),
        "scheduled backups closer than {INTERVAL_S} s (ms between them): {gaps:?}"
    );
    // Every backup started after the agent was added and before it was removed.
    let span_s = since_start.elapsed().as_secs() as i64;
    assert!(
        times.len() as i64 <= span_s / INTERVAL_S + 1,
        "{} backups in about {span_s} s: {times:?}",
        times.len()
    );
    assert!(
        times.len() >= 5,
        "the schedule stopped running: only {} backups in {span_s} s: {times:?}\n{}",
        times.len(),
        fleet.coordinator().log()
    );

    // (b) Retention ran after each backup and kept the floor: exactly the 3 newest (the agent
    // asked for keep_last=0, which alone keeps only the newest), the older ones are gone.
    let rows = fleet.list_backups(Some("app"));
    let kept: Vec<DateTime<Utc>> = rows
        .iter()
        .filter(|b| b.is_completed())
        .map(created)
        .collect();
    assert!(kept.len() >= 3, "fewer than the floor kept: {rows:?}");
    let mut newest: Vec<DateTime<Utc>> = times.iter().rev().take(3).copied().collect();
    let mut kept_sorted = kept.clone();
    newest.sort();
    kept_sorted.sort();
    assert_eq!(kept_sorted, newest, "{rows:?}");
    assert!(
        seen.len() > kept.len(),
        "retention never deleted anything, so the floor was not tested: {seen:?}"
    );

    // (c) `dsctl health` names each raised request, in words and in JSON.
    let out = fleet.dsctl(&["health"]).expect_success("dsctl health");
    for line in [
        "app: agent asked keep_last=0, raised to the floor 3",
        "app: agent asked max_age_days=1, raised to the floor 30",
        "app: agent asked schedule=\"* * * * * *\" (fires every 1s), raised to the floor of at most one backup every 4s",
    ] {
        assert!(
            out.stdout.lines().any(|l| l == line),
            "no line {line:?} in dsctl health:\n{}",
            out.stdout
        );
    }
    // What is at or above the floor is not reported.
    assert!(
        !out.stdout.contains("keep_daily"),
        "keep_daily=0 is the floor here, not below it:\n{}",
        out.stdout
    );
    let health = fleet.dsctl_json(&["health"]);
    let raised = health["targets"][0]["raised_to_floor"]
        .as_array()
        .unwrap_or_else(|| panic!("no raised_to_floor in {health}"))
        .clone();
    let settings: Vec<&str> = raised
        .iter()
        .map(|r| r["setting"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        settings,
        ["keep_last", "max_age_days", "schedule"],
        "{health}"
    );
    assert_eq!(raised[0]["asked"], "0");
    assert_eq!(raised[0]["floor"], "3");

    // Logged once per raise: the agent's reconnect with the same request logs nothing new.
    let spec = hostile(&fleet);
    fleet.add_agent_spec("app", spec);
    fleet.wait_agent_listed("app", Duration::from_secs(20));
    let log = fleet.coordinator().log();
    for needle in [
        "agent asked keep_last=0, raised to the floor 3",
        "agent asked max_age_days=1, raised to the floor 30",
    ] {
        let n = log.lines().filter(|l| l.contains(needle)).count();
        assert_eq!(n, 1, "{needle:?} logged {n} times\n{log}");
    }
}
