//! A planned agent stop (SIGTERM: every `docker stop`, every deploy) is not a
//! failure: the running backup is interrupted and recorded so, the agent says
//! goodbye and closes its streams cleanly within DATASAVER_SHUTDOWN_GRACE, and
//! the backup is tried again once the agent is back — no failure alert.

use std::time::{Duration, Instant};

use datasaver_tests::webhook::WebhookReceiver;
use datasaver_tests::{files_under, wait_until, Fleet, FleetOptions, PgCluster, Sig};

/// Sends SIGTERM and returns how long the agent took to exit, and its status.
fn sigterm(fleet: &mut Fleet, target: &str) -> (Duration, Option<std::process::ExitStatus>) {
    let agent = &mut fleet.agent_mut(target).proc;
    let t0 = Instant::now();
    agent.kill(Sig::Term);
    let status = agent.wait_exit(Duration::from_secs(30));
    (t0.elapsed(), status)
}

#[test]
fn sigterm_mid_backup_interrupts_it_and_the_retry_completes_without_an_alert() {
    let hook = WebhookReceiver::start();
    let pg = PgCluster::new();
    pg.create_big_db("big");
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: vec![("DATASAVER_WEBHOOK_URL".into(), hook.url("/hook"))],
        ..Default::default()
    });
    fleet.add_agent("big", &pg, "big");
    let storage = fleet.storage_dir();
    let handle = fleet.dsctl_in_flight(&["backup", "big"], 1_000_000);

    // docker stop: SIGTERM, then SIGKILL after 10 s. The agent is gone well
    // before, and cleanly.
    let (took, status) = sigterm(&mut fleet, "big");
    assert!(
        took < Duration::from_secs(10),
        "the agent took {took:?} to stop\n{}",
        fleet.agent("big").proc.log()
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "agent exit {status:?}\n{}",
        fleet.agent("big").proc.log()
    );
    // Recorded as interrupted, not failed; nothing partial left in storage.
    assert!(
        wait_until(Duration::from_secs(20), || fleet
            .list_backups(Some("big"))
            .iter()
            .any(|b| b.status == "interrupted")),
        "{:?}",
        fleet.list_backups(Some("big"))
    );
    let rows = fleet.list_backups(Some("big"));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(
        rows[0].raw["error"]
            .as_str()
            .is_some_and(|e| e.contains("interrupted")),
        "{}",
        rows[0].raw
    );
    assert!(
        files_under(&storage).is_empty(),
        "{:?}",
        files_under(&storage)
    );
    let log = fleet.coordinator().log();
    assert!(log.contains("agent is stopping (planned)"), "{log}");
    assert!(log.contains("agent disconnected (planned stop)"), "{log}");
    for bad in ["h2 protocol error", "control stream broke", "backup failed"] {
        assert!(!log.contains(bad), "{bad:?} in the coordinator log:\n{log}");
    }

    // dsctl is still waiting; the agent comes back and the backup runs again.
    assert!(
        !handle.is_finished(),
        "dsctl gave up on an interrupted backup"
    );
    fleet.agent_mut("big").proc.respawn();
    let out = handle.join().expect("dsctl thread");
    assert!(out.success(), "{}", out.describe());
    assert!(out.stderr.contains("interrupted"), "{}", out.describe());
    let id = out.stdout.trim().to_string();
    let rows = fleet.list_backups(Some("big"));
    let statuses: Vec<(&str, &str)> = rows
        .iter()
        .map(|b| (b.id.as_str(), b.status.as_str()))
        .collect();
    assert_eq!(rows.len(), 2, "{statuses:?}");
    assert!(
        statuses.contains(&(id.as_str(), "completed")),
        "{statuses:?} (printed {id})"
    );
    assert_eq!(
        statuses.iter().filter(|(_, s)| *s == "interrupted").count(),
        1,
        "{statuses:?}"
    );
    let b = fleet.get_backup(&id);
    assert_eq!(b.raw["trigger"], "manual");

    // An interruption is no failure: no alert, /health healthy.
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        hook.events("backup.failed").is_empty(),
        "{:?}",
        hook.delivered()
    );
    let h = fleet.http_get("/health").expect("GET /health");
    assert_eq!(h.status, 200, "{}", h.body);

    // Idle stops are clean too, every time.
    for _ in 0..3 {
        let (took, status) = sigterm(&mut fleet, "big");
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert!(status.is_some_and(|s| s.success()), "{status:?}");
        fleet.agent_mut("big").proc.respawn();
        fleet.wait_agent_listed("big", Duration::from_secs(30));
    }
    let log = fleet.coordinator().log();
    assert_eq!(
        log.matches("agent disconnected (planned stop)").count(),
        4,
        "{log}"
    );
    for bad in ["h2 protocol error", "control stream broke"] {
        assert!(!log.contains(bad), "{bad:?} in the coordinator log:\n{log}");
    }
}
