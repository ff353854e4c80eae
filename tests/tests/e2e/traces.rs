//! Traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, a scheduled backup is one span tree —
//! schedule → backup → (agent) agent.backup → agent.upload → (coordinator) upload →
//! storage.commit, and rotation — exported by both processes to a real OTLP receiver and
//! joined across the gRPC hop into one trace.

use std::collections::HashMap;
use std::time::Duration;

use datasaver_tests::otlp::{OtlpReceiver, ReceivedSpan};
use datasaver_tests::{wait_until, Fleet, FleetOptions, PgCluster};

#[test]
fn a_scheduled_backup_is_one_trace_across_coordinator_and_agent() {
    let otlp = OtlpReceiver::start();
    let pg = PgCluster::new();
    pg.create_db("app");
    pg.psql(
        "app",
        "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g;",
    );
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: vec![("OTEL_EXPORTER_OTLP_ENDPOINT".into(), otlp.endpoint())],
        ..Default::default()
    });
    let spec = fleet
        .agent_spec("app", &pg, "app")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint())
        .env("DATASAVER_SCHEDULE", "*/2 * * * * *");
    fleet.add_agent_spec("app", spec);
    assert!(
        wait_until(Duration::from_secs(60), || fleet
            .list_backups(Some("app"))
            .iter()
            .any(|b| b.status == "completed")),
        "no scheduled backup completed"
    );
    std::thread::sleep(Duration::from_secs(1));
    // Orderly stops (SIGTERM) flush the exporters.
    fleet.agent_mut("app").proc.stop(Duration::from_secs(20));
    fleet.stop_coordinator();

    let find = |spans: &[ReceivedSpan], service: &str, name: &str| {
        spans
            .iter()
            .filter(|s| s.service == service && s.name == name)
            .cloned()
            .collect::<Vec<_>>()
    };
    let mut joined: Option<(String, HashMap<&str, ReceivedSpan>)> = None;
    let ok = wait_until(Duration::from_secs(30), || {
        let spans = otlp.spans();
        for agent_backup in find(&spans, "datasaver-agent", "agent.backup") {
            let t = &agent_backup.trace_id;
            let one = |service: &str, name: &str| {
                spans
                    .iter()
                    .find(|s| s.service == service && s.name == name && &s.trace_id == t)
                    .cloned()
            };
            let parts = [
                ("schedule", one("datasaver-coordinator", "schedule")),
                ("backup", one("datasaver-coordinator", "backup")),
                ("agent.backup", Some(agent_backup.clone())),
                ("agent.upload", one("datasaver-agent", "agent.upload")),
                ("upload", one("datasaver-coordinator", "upload")),
                (
                    "storage.commit",
                    one("datasaver-coordinator", "storage.commit"),
                ),
                ("rotation", one("datasaver-coordinator", "rotation")),
            ];
            if parts.iter().all(|(_, s)| s.is_some()) {
                joined = Some((
                    t.clone(),
                    parts
                        .into_iter()
                        .filter_map(|(n, s)| s.map(|s| (n, s)))
                        .collect(),
                ));
                return true;
            }
        }
        false
    });
    let summary: Vec<String> = otlp
        .spans()
        .iter()
        .map(|s| format!("{}:{}:{}", s.service, s.name, &s.trace_id[..8]))
        .collect();
    assert!(ok, "no trace holds the whole tree; got {summary:?}");
    let (trace, s) = joined.expect("joined trace");
    assert_eq!(trace.len(), 32);
    // The tree, parent by parent, across both processes.
    let parent = |child: &str, of: &str| {
        assert_eq!(
            s[child].parent_span_id, s[of].span_id,
            "{child} should be a child of {of}"
        )
    };
    parent("backup", "schedule");
    parent("agent.backup", "backup");
    parent("agent.upload", "agent.backup");
    parent("upload", "agent.upload");
    parent("storage.commit", "upload");
    parent("rotation", "backup");
}
