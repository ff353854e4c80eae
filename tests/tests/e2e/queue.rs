//! One queue for every backup: manual `dsctl backup`s wait under the global
//! limit like scheduled ones, a fleet with more work than the limit allows is
//! served in turn with every missed slot counted (log, metric, health, alert),
//! and a scheduled target that never succeeded is never "healthy". `/health`
//! and `dsctl health --json` speak one vocabulary.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use datasaver_tests::webhook::WebhookReceiver;
use datasaver_tests::{run, wait_until, Fleet, FleetOptions, PgCluster};
use serde_json::Value;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn millis(t: &str) -> i64 {
    // RFC 3339 in UTC with milliseconds, as the coordinator writes them:
    // 2026-12-02T01:02:03.456Z
    let parse = |s: &str| {
        s.parse::<i64>()
            .unwrap_or_else(|_| panic!("bad time {t:?}"))
    };
    let (date, time) = t
        .trim_end_matches('Z')
        .split_once('T')
        .unwrap_or_else(|| panic!("bad time {t:?}"));
    let d: Vec<i64> = date.split('-').map(parse).collect();
    let (hms, ms) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<i64> = hms.split(':').map(parse).collect();
    // days since an epoch are enough to order times within one test run
    let days = d[0] * 372 + d[1] * 31 + d[2];
    ((days * 24 + h[0]) * 60 + h[1]) * 60_000 + h[2] * 1000 + parse(&format!("{ms:0<3}")[..3])
}

/// The most backups whose [created_at, finished_at] overlap at one moment.
fn max_overlap(backups: &[datasaver_tests::Backup]) -> usize {
    let mut edges: Vec<(i64, i32)> = Vec::new();
    for b in backups {
        let start = millis(&b.created_at);
        let end = millis(b.raw["finished_at"].as_str().unwrap_or_else(|| {
            panic!("backup without finished_at: {}", b.raw);
        }));
        edges.push((start, 1));
        edges.push((end, -1));
    }
    // an end at the same millisecond as a start frees its slot first
    edges.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        max = max.max(now);
    }
    max as usize
}

/// `running=N` of every "backup admitted" line of the coordinator's log.
fn admitted_running(log: &str) -> Vec<usize> {
    log.lines()
        .filter(|l| l.contains("backup admitted"))
        .filter_map(|l| l.split(" running=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn twenty_manual_backups_never_run_more_than_the_limit_and_all_complete() {
    const LIMIT: usize = 3;
    let pg = PgCluster::new();
    let targets: Vec<String> = (0..10).map(|i| format!("q{i}")).collect();
    for t in &targets {
        pg.create_small_db(t, 20000);
    }
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: env(&[("DATASAVER_MAX_CONCURRENT_BACKUPS", &LIMIT.to_string())]),
        ..Default::default()
    });
    for t in &targets {
        fleet.add_agent(t, &pg, t);
    }
    // Twenty requests at once: two per target.
    let handles: Vec<_> = targets
        .iter()
        .chain(targets.iter())
        .map(|t| {
            let mut cmd = fleet.dsctl_command();
            cmd.args(["backup", t]);
            std::thread::spawn(move || run(cmd, Duration::from_secs(300)))
        })
        .collect();
    let outs: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("dsctl thread"))
        .collect();
    let mut printed = BTreeSet::new();
    for o in &outs {
        assert!(o.success(), "{}", o.describe());
        let id = o.stdout.trim().to_string();
        assert!(
            targets.iter().any(|t| id.starts_with(&format!("{t}_"))),
            "{}",
            o.describe()
        );
        printed.insert(id);
    }
    assert_eq!(printed.len(), 20, "twenty distinct backups: {printed:?}");
    // The waiting ones were told their place in the queue.
    assert!(
        outs.iter().any(|o| o.stderr.contains("queued (")),
        "no dsctl showed `queued (N ahead)`:\n{}",
        outs.iter()
            .map(|o| o.stderr.as_str())
            .collect::<Vec<_>>()
            .join("\n---\n")
    );

    let all = fleet.list_backups(None);
    let completed: Vec<_> = all.iter().filter(|b| b.is_completed()).cloned().collect();
    assert_eq!(completed.len(), 20, "{all:?}");
    let ids: BTreeSet<String> = completed.iter().map(|b| b.id.clone()).collect();
    assert_eq!(ids, printed);
    // The coordinator's own count at every admission, and the catalog's
    // start/finish times: never more than the limit at once, and the limit
    // was reached (the queue really was in the way).
    let admitted = admitted_running(&fleet.coordinator().log());
    assert_eq!(admitted.len(), 20, "{admitted:?}");
    assert!(admitted.iter().all(|n| *n <= LIMIT), "{admitted:?}");
    assert_eq!(admitted.iter().max(), Some(&LIMIT), "{admitted:?}");
    let overlap = max_overlap(&completed);
    assert!(overlap <= LIMIT, "{overlap} backups overlapped");
    assert!(overlap >= 2, "backups ran one at a time: {overlap}");
}

/// Every key path of a JSON value (`targets[].alerts[].event`).
fn key_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = format!("{prefix}.{k}");
                out.insert(p.clone());
                key_paths(v, &p, out);
            }
        }
        Value::Array(items) => {
            for i in items {
                key_paths(i, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

fn samples(fleet: &Fleet) -> Vec<prometheus_parse::Sample> {
    let r = fleet.http_get("/metrics").expect("GET /metrics");
    assert_eq!(r.status, 200);
    prometheus_parse::Scrape::parse(r.body.lines().map(|l| Ok(l.to_string())))
        .expect("/metrics parses")
        .samples
}

fn missed_metric(samples: &[prometheus_parse::Sample]) -> BTreeMap<String, u64> {
    samples
        .iter()
        .filter(|s| s.metric == "datasaver_schedule_missed_total")
        .filter_map(|s| {
            let v = match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            Some((s.labels.get("target")?.to_string(), v as u64))
        })
        .collect()
}

#[test]
fn a_fleet_over_capacity_is_served_in_turn_and_every_missed_slot_is_counted() {
    let hook = WebhookReceiver::start();
    let pg = PgCluster::new();
    let targets = ["ov-a", "ov-b", "ov-c", "ov-d"];
    // ~65 MB each: a backup takes about half a second even on a fast
    // machine, so four every second cannot fit one at a time (at 15 MB a
    // round of four fitted in a second and no slot was missed).
    for t in targets {
        pg.create_small_db(t, 1_000_000);
    }
    // Four targets every second, one backup at a time: far more work than fits.
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: env(&[
            ("DATASAVER_MAX_CONCURRENT_BACKUPS", "1"),
            ("DATASAVER_WEBHOOK_URL", &hook.url("/hook")),
            // keep every backup, so the count shows who was served
            ("DATASAVER_KEEP_LAST", "1000"),
        ]),
        ..Default::default()
    });
    for t in targets {
        let spec = fleet
            .agent_spec(t, &pg, t)
            .env("DATASAVER_SCHEDULE", "* * * * * *");
        fleet.add_agent_spec(t, spec);
    }
    // No target starves: each gets several backups.
    let served = wait_until(Duration::from_secs(90), || {
        targets.iter().all(|t| {
            fleet
                .list_backups(Some(t))
                .iter()
                .filter(|b| b.is_completed())
                .count()
                >= 3
        })
    });
    let counts: Vec<(String, usize)> = targets
        .iter()
        .map(|t| {
            let n = fleet
                .list_backups(Some(t))
                .iter()
                .filter(|b| b.is_completed())
                .count();
            (t.to_string(), n)
        })
        .collect();
    assert!(served, "a target starved: {counts:?}");
    // Slots were missed and said so: a log line, the alert, health degraded.
    let log = fleet.coordinator().log();
    assert!(log.contains("scheduled backup missed"), "{log}");
    assert!(
        wait_until(Duration::from_secs(30), || !hook
            .events("schedule.missed")
            .is_empty()),
        "{:?}",
        hook.delivered()
    );
    let e = &hook.events("schedule.missed")[0];
    assert!(targets.contains(&e["target"].as_str().unwrap_or("")), "{e}");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("could not start")),
        "{e}"
    );

    // Stop the load; what is waiting then waits for agents and is no miss.
    for t in targets {
        fleet.remove_agent(t);
    }
    std::thread::sleep(Duration::from_secs(3));
    let metric = missed_metric(&samples(&fleet));
    let health = fleet.http_get("/health").expect("GET /health").json();
    let mut from_health = BTreeMap::new();
    for t in health["targets"].as_array().expect("targets") {
        from_health.insert(
            t["target"].as_str().unwrap_or_default().to_string(),
            t["missed_slots"].as_u64().expect("missed_slots"),
        );
    }
    // The metric and the catalog count the same events, exactly.
    let total: u64 = metric.values().sum();
    assert!(total > 0, "{metric:?}");
    for t in targets {
        assert_eq!(
            metric.get(t).copied().unwrap_or(0),
            from_health.get(t).copied().unwrap_or(0),
            "{t}: metric {metric:?} vs health {from_health:?}"
        );
    }
    // A target whose last miss came after its last success is degraded.
    let open_missed: Vec<&Value> = health["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter(|t| {
            t["alerts"]
                .as_array()
                .is_some_and(|a| a.iter().any(|a| a["event"] == "schedule.missed"))
        })
        .collect();
    for t in &open_missed {
        assert_ne!(t["status"], "healthy", "{t}");
    }

    // One vocabulary: dsctl health --json has exactly /health's fields.
    let dsctl = fleet.dsctl_json(&["health"]);
    let (mut a, mut b) = (BTreeSet::new(), BTreeSet::new());
    key_paths(&health, "", &mut a);
    key_paths(&dsctl, "", &mut b);
    assert_eq!(a, b, "/health: {health}\ndsctl: {dsctl}");
    for field in [
        "last_backup_status",
        "stored_bytes",
        "next_backup_at",
        "missed_slots",
    ] {
        assert!(a.contains(&format!(".targets[].{field}")), "{field}: {a:?}");
    }
    // and a backup object speaks it too (stored_bytes, status)
    let b0 = &fleet.list_backups(Some("ov-a"))[0];
    assert!(b0.raw.get("stored_bytes").is_some() && b0.raw.get("status").is_some());
}

#[test]
fn a_scheduled_target_that_never_succeeded_is_never_healthy() {
    let pg = PgCluster::new();
    pg.create_small_db("app", 2000);
    let dir = datasaver_tests::short_tempdir("dsq");
    let config = dir.path().join("datasaver.yaml");
    // "ghost" is scheduled by the config file, but no agent ever serves it.
    std::fs::write(
        &config,
        "targets:\n  ghost:\n    schedule: \"*/2 * * * * *\"\n",
    )
    .expect("write config");
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: env(&[
            ("DATASAVER_CONFIG", config.to_str().expect("utf-8 path")),
            ("DATASAVER_AGENT_GRACE", "5m"),
        ]),
        ..Default::default()
    });
    fleet.add_agent("app", &pg, "app");
    assert!(fleet.backup("app", None).is_completed());
    // Its first slot passes: degraded, "no backup yet", and /health says 503.
    std::thread::sleep(Duration::from_secs(3));
    let h = fleet.http_get("/health").expect("GET /health");
    assert_eq!(h.status, 503, "{}", h.body);
    let v = h.json();
    let find = |name: &str| -> Value {
        v["targets"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["target"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {v}"))
    };
    let ghost = find("ghost");
    assert_eq!(ghost["status"], "degraded", "{ghost}");
    assert!(
        ghost["status_reason"]
            .as_str()
            .is_some_and(|r| r.contains("no backup yet")),
        "{ghost}"
    );
    assert_eq!(ghost["backups"], 0);
    assert!(ghost["last_backup_at"].is_null(), "{ghost}");
    let app = find("app");
    assert_eq!(app["status"], "healthy", "{app}");
    assert_eq!(app["last_backup_status"], "completed", "{app}");
    // dsctl health (text) says it too, next to the healthy target.
    let out = fleet.dsctl(&["health"]).expect_success("dsctl health");
    let ghost_line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("ghost"))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(
        ghost_line.contains("degraded") && ghost_line.contains("no backup yet"),
        "{}",
        out.stdout
    );
    let app_line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("app"))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(app_line.contains("healthy"), "{}", out.stdout);
}
