//! Knowing when backups stop: webhooks (signed, retried, one per incident, resolved when it
//! clears), `/health` going 200 → 503 → 200, `/metrics` parsed by a Prometheus parser with
//! counters moving by exactly one per backup, and the size anomaly.

use std::time::Duration;

use datasaver_tests::webhook::WebhookReceiver;
use datasaver_tests::{wait_until, Fleet, FleetOptions, PgCluster};

const SECRET: &str = "whsec-test-0123456789";

fn small_db(pg: &PgCluster, db: &str) {
    pg.create_small_db(db, 20000);
}

fn fleet_with(hook: &WebhookReceiver, extra: &[(&str, &str)]) -> Fleet {
    let mut env = vec![
        ("DATASAVER_WEBHOOK_URL".to_string(), hook.url("/hook")),
        ("DATASAVER_WEBHOOK_SECRET".to_string(), SECRET.to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Fleet::start_with(FleetOptions {
        coordinator_env: env,
        ..Default::default()
    })
}

fn hmac_hex(key: &[u8], msg: &[u8]) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&k, msg)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_failed_backup_is_announced_once_signed_and_retried() {
    let hook = WebhookReceiver::start();
    // The receiver fails twice before it takes the event.
    hook.respond_with(&[500, 500]);
    let mut pg = PgCluster::new();
    small_db(&pg, "app");
    let mut fleet = fleet_with(&hook, &[]);
    fleet.add_agent("app", &pg, "app");
    assert!(fleet.backup("app", None).is_completed());

    pg.stop();
    fleet
        .dsctl(&["backup", "app"])
        .expect_code(1, "backup with the database down");
    fleet
        .dsctl(&["backup", "app"])
        .expect_code(1, "second failing backup");
    assert!(
        wait_until(Duration::from_secs(60), || !hook
            .events("backup.failed")
            .is_empty()),
        "no backup.failed delivered: {:?}",
        hook.received()
    );
    std::thread::sleep(Duration::from_secs(6));
    let failed = hook.events("backup.failed");
    assert_eq!(failed.len(), 1, "one notification per incident: {failed:?}");
    let e = &failed[0];
    assert_eq!(e["target"], "app");
    assert!(e["backup_id"]
        .as_str()
        .is_some_and(|id| id.starts_with("app_")));
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot connect to database")),
        "{e}"
    );
    assert!(e["at"].is_string() && e["text"].is_string(), "{e}");
    assert!(!e.to_string().contains(pg.password()));

    // Delivered on the third try; every try was signed over its own timestamp.
    let tries: Vec<_> = hook
        .received()
        .into_iter()
        .filter(|r| r.json()["event"] == "backup.failed")
        .collect();
    assert_eq!(
        tries.iter().map(|r| r.answered).collect::<Vec<_>>(),
        vec![500, 500, 200]
    );
    for r in &tries {
        let ts = r.header("x-datasaver-timestamp").expect("timestamp header");
        let sig = r.header("x-datasaver-signature").expect("signature header");
        let want = format!(
            "sha256={}",
            hmac_hex(SECRET.as_bytes(), format!("{ts}.{}", r.body).as_bytes())
        );
        assert_eq!(sig, want, "signature does not verify");
        assert_eq!(r.method, "POST");
        assert_eq!(r.header("content-type"), Some("application/json"));
    }

    // It clears with the next success: one `resolved`.
    pg.start();
    assert!(fleet.backup("app", None).is_completed());
    assert!(
        wait_until(Duration::from_secs(30), || hook
            .resolved_of("backup.failed")
            .len()
            == 1),
        "{:?}",
        hook.delivered()
    );
    // A restart neither repeats nor forgets: nothing new is sent.
    let before = hook.received().len();
    fleet.restart_coordinator();
    std::thread::sleep(Duration::from_secs(7));
    let after = hook.received();
    assert_eq!(after.len(), before, "{:?}", &after[before..]);
    // Neither the webhook secret nor the database password reaches any log.
    let logs = format!(
        "{}{}",
        fleet.coordinator().log(),
        fleet.agent("app").proc.log()
    );
    assert!(!logs.contains(SECRET));
    assert!(!logs.contains(pg.password()));
}

#[test]
fn overdue_target_turns_health_503_and_recovers() {
    let hook = WebhookReceiver::start();
    let pg = PgCluster::new();
    small_db(&pg, "app");
    let mut fleet = fleet_with(&hook, &[("DATASAVER_ALERT_AFTER", "6s")]);
    fleet.add_agent("app", &pg, "app");
    assert!(fleet.backup("app", None).is_completed());
    let h = fleet.http_get("/health").expect("GET /health");
    assert_eq!(h.status, 200, "{}", h.body);
    let v: serde_json::Value = serde_json::from_str(&h.body).expect("health JSON");
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["targets"][0]["target"], "app");
    assert_eq!(v["targets"][0]["agent_connected"], true);
    assert!(v["targets"][0]["last_success_at"].is_string(), "{v}");

    // The agent stops; no backup for longer than the window: overdue.
    fleet.agent_mut("app").proc.kill(datasaver_tests::Sig::Kill);
    assert!(
        wait_until(Duration::from_secs(60), || !hook
            .events("backup.overdue")
            .is_empty()),
        "{:?}",
        hook.delivered()
    );
    let h = fleet.http_get("/health").expect("GET /health");
    assert_eq!(h.status, 503, "{}", h.body);
    let v: serde_json::Value = serde_json::from_str(&h.body).expect("health JSON");
    assert_eq!(v["status"], "unhealthy");
    assert_eq!(v["targets"][0]["agent_connected"], false);
    assert_eq!(v["targets"][0]["alerts"][0]["event"], "backup.overdue");
    let dsctl = fleet.dsctl_json(&["health"]);
    assert_eq!(dsctl["status"], "unhealthy", "{dsctl}");
    assert_eq!(hook.events("backup.overdue").len(), 1);

    // Back: a success resolves it and health is 200 again.
    fleet.agent_mut("app").proc.respawn();
    fleet.wait_agent_listed("app", Duration::from_secs(30));
    assert!(fleet.backup("app", None).is_completed());
    assert!(
        wait_until(Duration::from_secs(30), || hook
            .resolved_of("backup.overdue")
            .len()
            == 1),
        "{:?}",
        hook.delivered()
    );
    assert!(wait_until(Duration::from_secs(10), || fleet
        .http_get("/health")
        .is_ok_and(|h| h.status == 200)));
}

fn scrape(fleet: &Fleet) -> Vec<prometheus_parse::Sample> {
    let r = fleet.http_get("/metrics").expect("GET /metrics");
    assert_eq!(r.status, 200);
    let lines = r.body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines)
        .expect("/metrics parses as Prometheus text")
        .samples
}

fn value(samples: &[prometheus_parse::Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            _ => 0.0,
        })
        .sum()
}

#[test]
fn metrics_count_each_backup_once_and_sizes_flag_a_truncated_table() {
    let hook = WebhookReceiver::start();
    let pg = PgCluster::new();
    small_db(&pg, "app");
    let mut fleet = fleet_with(&hook, &[]);
    fleet.add_agent("app", &pg, "app");

    let before = scrape(&fleet);
    let ok = |s: &[prometheus_parse::Sample]| {
        value(
            s,
            "datasaver_backups_total",
            &[("target", "app"), ("result", "success")],
        )
    };
    assert_eq!(ok(&before), 0.0);
    let b1 = fleet.backup("app", None);
    let after = scrape(&fleet);
    assert_eq!(ok(&after), 1.0);
    assert_eq!(
        value(&after, "datasaver_backup_size_bytes", &[("target", "app")]),
        b1.stored_bytes.unwrap_or(0) as f64
    );
    assert_eq!(value(&after, "datasaver_agents_connected", &[]), 1.0);
    assert!(
        value(
            &after,
            "datasaver_last_success_timestamp_seconds",
            &[("target", "app")]
        ) > 1.6e9
    );
    assert_eq!(
        value(&after, "datasaver_stored_bytes", &[("target", "app")]),
        b1.stored_bytes.unwrap_or(0) as f64
    );
    assert!(
        value(&after, "datasaver_upload_bytes_total", &[("target", "app")])
            >= b1.stored_bytes.unwrap_or(0) as f64
    );

    // Normal growth (+10%) is not an anomaly.
    pg.psql(
        "app",
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(20001, 22000) g;",
    );
    fleet.backup("app", None);
    assert_eq!(ok(&scrape(&fleet)), 2.0);
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        hook.events("backup.size_anomaly").is_empty(),
        "{:?}",
        hook.delivered()
    );

    // A truncated table is.
    pg.psql("app", "TRUNCATE t;");
    let b3 = fleet.backup("app", None);
    assert_eq!(ok(&scrape(&fleet)), 3.0);
    assert!(
        wait_until(Duration::from_secs(30), || hook
            .events("backup.size_anomaly")
            .len()
            == 1),
        "{:?}",
        hook.delivered()
    );
    let e = &hook.events("backup.size_anomaly")[0];
    assert_eq!(e["backup_id"], b3.id.as_str());
    let failures = value(
        &scrape(&fleet),
        "datasaver_backups_total",
        &[("target", "app"), ("result", "failure")],
    );
    assert_eq!(failures, 0.0);
}

#[test]
fn agent_health_reports_coordinator_and_database() {
    let mut pg = PgCluster::new();
    small_db(&pg, "app");
    let mut fleet = Fleet::start();
    let port = datasaver_tests::free_port();
    let spec = fleet
        .agent_spec("app", &pg, "app")
        .env("DATASAVER_HTTP_LISTEN", format!("127.0.0.1:{port}"));
    fleet.add_agent_spec("app", spec);
    let get = || {
        let r = datasaver_tests::http_get(port, "/health").expect("GET agent /health");
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("agent health JSON");
        (r.status, v)
    };
    assert!(
        wait_until(Duration::from_secs(20), || get().0 == 200),
        "{:?}",
        get()
    );
    let (_, v) = get();
    assert_eq!(v["coordinator_connected"], true);
    assert_eq!(v["database_reachable"], true);
    assert_eq!(v["target"], "app");

    // The database check is cached for 10 s (probes must not open a
    // connection each), so a stop shows within that.
    pg.stop();
    assert!(
        wait_until(Duration::from_secs(20), || get().0 == 503),
        "{:?}",
        get()
    );
    let (code, v) = get();
    assert_eq!(code, 503, "{v}");
    assert_eq!(v["database_reachable"], false);
    // Liveness (the image's HEALTHCHECK) asks for the database too.
    assert_eq!(
        datasaver_tests::http_get(port, "/live")
            .map(|r| r.status)
            .ok(),
        Some(503)
    );
    let out = agent_healthcheck(port);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    datasaver_tests::assert_one_line_error(&out.stderr, "503");
    assert!(!v.to_string().contains(pg.password()));
    // The error's detail (host, port, user) stays in the agent's log.
    for detail in [
        pg.host().to_string(),
        pg.port().to_string(),
        pg.user().to_string(),
    ] {
        assert!(!v.to_string().contains(&detail), "{detail} in {v}");
    }
    pg.start();

    fleet.kill_coordinator();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let (code, v) = get();
            code == 503 && v["database_reachable"] == true
        }),
        "{:?}",
        get()
    );
    assert_eq!(get().1["coordinator_connected"], false);
    assert_eq!(get().1["database_reachable"], true);
    // A lost coordinator is not the agent's liveness: restarting the agent
    // would not bring it back.
    assert_eq!(
        datasaver_tests::http_get(port, "/live")
            .map(|r| r.status)
            .ok(),
        Some(200)
    );
    agent_healthcheck(port).expect_success("healthcheck without a coordinator");
}

/// `datasaver-agent healthcheck` (the image's HEALTHCHECK) against an agent
/// serving on `port`.
fn agent_healthcheck(port: u16) -> datasaver_tests::procs::Output {
    let mut cmd =
        datasaver_tests::procs::clean_command(datasaver_tests::procs::bin_path("datasaver-agent"));
    cmd.arg("healthcheck")
        .env("DATASAVER_HTTP_LISTEN", format!("127.0.0.1:{port}"));
    datasaver_tests::procs::run(cmd, Duration::from_secs(30))
}
