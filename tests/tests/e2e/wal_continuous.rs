//! Continuous WAL end to end (issue 14): an agent with
//! `DATASAVER_WAL=stream` streams its server's WAL through the real
//! coordinator into storage. A stored segment equals the server's file; the
//! slot follows only what the coordinator stored; a quiet database's last
//! writes are stored as a partial within the sync interval; a SIGKILLed
//! agent and a restarted coordinator leave no gap; another cluster
//! presenting itself as the target is refused and alerted until an
//! operator rebinds the target.

use std::path::{Path, PathBuf};
use std::time::Duration;

use datasaver_common::wal::{Lsn, Segment, DEFAULT_SEG_SIZE};
use datasaver_tests::{wait_until, Fleet, FleetOptions, PgCluster};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

fn wal_env() -> [(&'static str, &'static str); 2] {
    [
        ("DATASAVER_WAL", "stream"),
        ("DATASAVER_WAL_SYNC_INTERVAL", "1s"),
    ]
}

fn wal_json(fleet: &Fleet, target: &str) -> Option<Value> {
    let v = fleet.dsctl_json(&["wal", "--target", target]);
    v.as_array()?.first().cloned()
}

fn lsn(v: &Value, field: &str) -> Lsn {
    Lsn::parse(v[field].as_str().unwrap_or("0/0")).unwrap_or(Lsn(0))
}

/// Segment names of timeline 1 stored so far, and the gaps.
fn timeline1(v: &Value) -> (String, String, Vec<String>) {
    let t = &v["timelines"][0];
    (
        t["first_segment"].as_str().unwrap_or("").to_string(),
        t["last_segment"].as_str().unwrap_or("").to_string(),
        t["gaps"]
            .as_array()
            .map(|g| {
                g.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

/// Waits until the stored WAL of `target` reaches `upto`.
fn wait_stored(fleet: &Fleet, target: &str, upto: Lsn) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(WAIT, || {
        if let Some(v) = wal_json(fleet, target) {
            let done = lsn(&v, "stored_end_lsn") >= upto;
            last = v;
            return done;
        }
        false
    });
    assert!(
        ok,
        "the stored WAL of {target} did not reach {upto}: {last:#}\n--- agent ---\n{}",
        fleet.agent(target).proc.log()
    );
    last
}

fn current_lsn(pg: &PgCluster) -> Lsn {
    Lsn::parse(&pg.query_one("postgres", "SELECT pg_current_wal_insert_lsn()")).expect("lsn")
}

/// Writes and closes the segment, returning the closed segment's name.
fn write_and_switch(pg: &PgCluster, rows: u32) -> (String, Lsn) {
    pg.psql(
        "postgres",
        &format!("INSERT INTO w SELECT g, md5(g::text) FROM generate_series(1, {rows}) g;"),
    );
    let at = current_lsn(pg);
    pg.psql("postgres", "SELECT pg_switch_wal();");
    // The segment holding `at` is closed now.
    let seg = Segment::of(1, at, DEFAULT_SEG_SIZE);
    (seg.name(DEFAULT_SEG_SIZE), seg.start(DEFAULT_SEG_SIZE))
}

/// The stored object of `name` (raw bytes hash in its key), decompressed.
fn stored_segment(storage: &Path, target: &str, name: &str) -> Vec<u8> {
    let mut found: Vec<PathBuf> = Vec::new();
    let root = storage.join(target).join("wal");
    for sys in std::fs::read_dir(&root).expect("wal dir").flatten() {
        let dir = sys.path().join("00000001");
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for f in rd.flatten() {
                let n = f.file_name().to_string_lossy().to_string();
                if n.starts_with(&format!("{name}-")) && n.ends_with(".zst") {
                    found.push(f.path());
                }
            }
        }
    }
    assert_eq!(found.len(), 1, "one stored object for {name}: {found:?}");
    let bytes = std::fs::read(&found[0]).expect("read stored segment");
    zstd::stream::decode_all(&bytes[..]).expect("zstd")
}

fn time(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// The server's clock now.
fn server_now(pg: &PgCluster) -> chrono::DateTime<chrono::Utc> {
    let s = pg.query_one(
        "postgres",
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    time(&s).expect("server time")
}

fn slot_restart(pg: &PgCluster) -> Lsn {
    Lsn::parse(&pg.query_one(
        "postgres",
        "SELECT coalesce(restart_lsn::text, '0/0') FROM pg_replication_slots WHERE slot_name = 'datasaver'",
    ))
    .unwrap_or(Lsn(0))
}

#[test]
fn wal_streams_through_the_coordinator_and_the_slot_follows_what_is_stored() {
    let pg = PgCluster::new();
    pg.psql("postgres", "CREATE TABLE w (g int, m text);");
    let mut fleet = Fleet::start();
    let env = wal_env();
    fleet.add_agent_with("app", &pg, "postgres", &env);
    assert!(
        fleet.agent("app").proc.wait_for_log("streaming WAL", WAIT),
        "{}",
        fleet.agent("app").proc.log()
    );

    // A closed segment is stored as the server wrote it.
    let (name, start) = write_and_switch(&pg, 20_000);
    let on_disk = std::fs::read(pg.data_dir().join("pg_wal").join(&name)).expect("segment file");
    let v = wait_stored(&fleet, "app", Lsn(start.0 + DEFAULT_SEG_SIZE));
    assert_eq!(
        v["system_identifier"].as_str(),
        Some(
            pg.query_one(
                "postgres",
                "SELECT system_identifier FROM pg_control_system()"
            )
            .as_str()
        )
    );
    let got = stored_segment(&fleet.storage_dir(), "app", &name);
    assert!(
        got == on_disk,
        "stored {name} differs from the server's file"
    );

    // The slot moves with what is stored, never past it.
    let quiet = wait_until(WAIT, || {
        let v = wal_json(&fleet, "app").expect("wal");
        let slot = slot_restart(&pg);
        assert!(
            slot <= lsn(&v, "stored_end_lsn"),
            "slot at {slot} is past the stored end {}",
            v["stored_end_lsn"]
        );
        slot >= Lsn(start.0 + DEFAULT_SEG_SIZE)
    });
    assert!(quiet, "the slot never followed the stored WAL");

    // A few rows and no switch: stored as a partial within seconds.
    pg.psql(
        "postgres",
        "INSERT INTO w SELECT g, 'last' FROM generate_series(1, 10) g;",
    );
    let written = current_lsn(&pg);
    let v = wait_stored(&fleet, "app", written);
    let partial = v["timelines"][0]["partial"].as_str().unwrap_or("");
    assert!(
        partial.ends_with(".partial"),
        "the segment in progress is stored as a partial: {v:#}"
    );
    // And the coordinator knows that everything written until now is
    // stored: the latest recoverable time passes the insert.
    let inserted = server_now(&pg);
    let recoverable = wait_until(WAIT, || {
        wal_json(&fleet, "app")
            .and_then(|v| v["latest_recoverable"].as_str().and_then(time))
            .is_some_and(|t| t >= inserted)
    });
    assert!(
        recoverable,
        "latest recoverable time never passed {inserted}"
    );
    // And /metrics says so, with the lag.
    let metrics = fleet.http_get("/metrics").expect("/metrics").body;
    for line in [
        "datasaver_wal_latest_recoverable_timestamp_seconds{target=\"app\"}",
        "datasaver_wal_lag_bytes{target=\"app\"}",
        "datasaver_wal_lag_seconds{target=\"app\"}",
    ] {
        assert!(
            metrics.contains(line),
            "{line} missing from /metrics:\n{metrics}"
        );
    }

    // SIGKILL the agent under writes, write more, start it again: no gap.
    fleet
        .agent_mut("app")
        .proc
        .kill(datasaver_tests::procs::Sig::Kill);
    fleet
        .agent_mut("app")
        .proc
        .wait_exit(Duration::from_secs(10));
    let (_, _) = write_and_switch(&pg, 30_000);
    let (last_while_away, start2) = write_and_switch(&pg, 30_000);
    fleet.agent_mut("app").proc.respawn();
    let v = wait_stored(&fleet, "app", Lsn(start2.0 + DEFAULT_SEG_SIZE));
    let (first, last, gaps) = timeline1(&v);
    assert!(gaps.is_empty(), "no gap after a killed agent: {v:#}");
    assert!(last >= last_while_away, "{last} < {last_while_away}");

    // The coordinator away for a minute under writes: the slot keeps the
    // server's WAL, and the stream resumes where it was.
    fleet.stop_coordinator();
    let away = std::time::Instant::now();
    let mut start3 = start2;
    while away.elapsed() < Duration::from_secs(60) {
        start3 = write_and_switch(&pg, 30_000).1;
        std::thread::sleep(Duration::from_secs(5));
    }
    fleet.start_coordinator();
    let v = wait_stored(&fleet, "app", Lsn(start3.0 + DEFAULT_SEG_SIZE));
    let (first_after, _, gaps) = timeline1(&v);
    assert!(gaps.is_empty(), "no gap after a coordinator restart: {v:#}");
    assert_eq!(first_after, first, "nothing stored was lost");

    // What people read, once the agent's control connection is back too
    // (its retries back off to 30 s over a minute away): the slot's state
    // comes with its heartbeat.
    fleet.wait_agent_listed("app", Duration::from_secs(60));
    wait_until(WAIT, || {
        fleet
            .dsctl(&["wal"])
            .stdout
            .contains("streaming  slot reserved")
    });
    let out = fleet.dsctl(&["wal"]);
    let text = out.stdout.clone();
    assert!(out.code == Some(0), "{text}");
    assert!(text.contains("app  cluster "), "{text}");
    assert!(text.contains("streaming  slot reserved"), "{text}");
    assert!(text.contains("  timeline 1: "), "{text}");
    assert!(!text.contains("GAP"), "{text}");
    // The agent and the coordinator never logged a refusal.
    assert!(
        !fleet.coordinator().log().contains("WAL stream refused"),
        "{}",
        fleet.coordinator().log()
    );
}

#[test]
fn another_cluster_as_the_same_target_is_refused_until_rebound() {
    let pg = PgCluster::new();
    let mut fleet = Fleet::start_with(FleetOptions::default());
    let env = wal_env();
    fleet.add_agent_with("app", &pg, "postgres", &env);
    pg.psql(
        "postgres",
        "CREATE TABLE w (g int, m text); SELECT pg_switch_wal();",
    );
    let v = wait_stored(&fleet, "app", Lsn(1));
    let bound = v["system_identifier"].as_str().unwrap_or("").to_string();

    // A new initdb answering as the same target.
    let other = PgCluster::new();
    let other_id = other.query_one(
        "postgres",
        "SELECT system_identifier FROM pg_control_system()",
    );
    assert_ne!(other_id, bound);
    fleet.remove_agent("app");
    fleet.add_agent_with("app", &other, "postgres", &env);
    let refused = wait_until(WAIT, || {
        wal_json(&fleet, "app")
            .is_some_and(|v| v["refused"].as_str().is_some_and(|r| r.contains(&other_id)))
    });
    assert!(refused, "{}", fleet.coordinator().log());
    assert!(fleet
        .agent("app")
        .proc
        .wait_for_log("dsctl targets rebind app", WAIT));
    // The alert, as people read it.
    let alerted = wait_until(WAIT, || {
        let out = fleet.dsctl(&["health"]);
        out.stdout.contains("wal.sysid_mismatch")
    });
    assert!(alerted, "wal.sysid_mismatch in dsctl health");
    let out = fleet.dsctl(&["wal", "--target", "app"]);
    let text = out.stdout.clone();
    assert!(text.contains("REFUSED: cluster "), "{text}");
    // Nothing of the other cluster was stored under the bound series.
    let series: Vec<String> = std::fs::read_dir(fleet.storage_dir().join("app/wal"))
        .expect("wal dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(series, vec![bound.clone()]);

    // The operator rebinds: the new cluster starts a new series.
    let out = fleet.dsctl(&["targets", "rebind", "app"]);
    let text = out.stdout.clone();
    assert!(out.code == Some(0), "{text}{}", out.stderr);
    assert!(
        text.contains(&format!("target app released from cluster {bound}")),
        "{text}"
    );
    other.psql(
        "postgres",
        "CREATE TABLE w (g int); SELECT pg_switch_wal();",
    );
    let rebound = wait_until(WAIT, || {
        wal_json(&fleet, "app").is_some_and(|v| {
            v["system_identifier"].as_str() == Some(other_id.as_str())
                && v["refused"].as_str() == Some("")
                && lsn(&v, "stored_end_lsn") > Lsn(0)
        })
    });
    assert!(rebound, "{}", fleet.agent("app").proc.log());
    let resolved = wait_until(WAIT, || {
        let out = fleet.dsctl(&["health"]);
        !out.stdout.contains("wal.sysid_mismatch")
    });
    assert!(resolved, "wal.sysid_mismatch resolved after the rebind");
    let mut series: Vec<String> = std::fs::read_dir(fleet.storage_dir().join("app/wal"))
        .expect("wal dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    series.sort();
    let mut want = vec![bound, other_id];
    want.sort();
    assert_eq!(series, want, "both series are stored");
}
