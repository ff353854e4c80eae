//! Limits that keep one fault from spreading: one coordinator per data
//! directory, a floor of free space on local storage, catalog rebuilds that
//! believe a meta file only about its own place, and an unauthenticated HTTP
//! endpoint that shows no connection details and cannot be held by a slow
//! client.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use datasaver_tests::{files_under, run, wait_until, Fleet, FleetOptions, PgCluster};

fn one_line(s: &str) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected exactly one line, got:\n{s}");
    lines[0].to_string()
}

fn fleet_with(env: &[(&str, &str)]) -> Fleet {
    Fleet::start_with(FleetOptions {
        coordinator_env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
}

#[test]
fn a_second_coordinator_on_the_same_data_dir_refuses_while_the_first_ones_backup_completes() {
    let pg = PgCluster::new();
    pg.create_big_db("big");
    let mut fleet = Fleet::start();
    fleet.add_agent("big", &pg, "big");
    let data_dir = fleet.data_dir();
    let handle = fleet.dsctl_in_flight(&["backup", "big"], 1_000_000);

    // Its start-up repair would fail the running row and remove the temp
    // file of the upload in flight: it must not get that far.
    let second = run(
        fleet.coordinator_command(&data_dir),
        Duration::from_secs(60),
    );
    assert!(
        !second.success() && !second.timed_out,
        "{}",
        second.describe()
    );
    let line = one_line(&second.stderr);
    let pid = fleet.coordinator().pid();
    assert!(
        line.contains(&data_dir.display().to_string()) && line.contains(&format!("PID {pid}")),
        "{line}"
    );
    assert!(line.contains("DATASAVER_DATA_DIR"), "{line}");

    // Had the second one removed the upload's temp file, the first could not
    // commit it; had it failed the running row, the backup could not complete.
    let out = handle.join().expect("dsctl thread");
    assert!(out.success(), "{}", out.describe());
    let id = out.stdout.trim().to_string();
    let b = fleet.get_backup(&id);
    assert!(b.is_completed(), "{}", b.raw);
    let listed = fleet.list_backups(Some("big"));
    assert_eq!(listed.len(), 1, "{listed:?}");
    fleet
        .dsctl(&["verify", &id])
        .expect_success("verify the backup that completed beside the refused start");
    let log = fleet.coordinator().log();
    assert!(
        !log.contains("marked interrupted backups as failed"),
        "{log}"
    );
}

#[test]
fn a_backup_under_the_free_space_floor_fails_cleanly() {
    let pg = PgCluster::new();
    pg.create_small_db("app", 2000);
    // More than any disk here has free: the floor stops the backup before a
    // byte is written.
    let mut fleet = fleet_with(&[("DATASAVER_MIN_FREE_BYTES", "1000000TiB")]);
    fleet.add_agent("app", &pg, "app");
    let storage = fleet.storage_dir();
    let out = fleet
        .dsctl(&["--quiet", "backup", "app"])
        .expect_code(1, "backup under the free-space floor");
    let line = one_line(&out.stderr);
    assert!(line.contains("DATASAVER_MIN_FREE_BYTES"), "{line}");
    assert!(line.contains(&storage.display().to_string()), "{line}");
    assert!(line.contains("free"), "{line}");
    let rows = fleet.list_backups(Some("app"));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].status, "failed");
    assert!(
        rows[0].raw["error"]
            .as_str()
            .is_some_and(|e| e.contains("DATASAVER_MIN_FREE_BYTES")),
        "{}",
        rows[0].raw
    );
    assert!(
        files_under(&storage).is_empty(),
        "{:?}",
        files_under(&storage)
    );

    // 0 turns the floor off.
    let spec = fleet.coordinator_mut().spec_mut();
    *spec = spec.clone().env("DATASAVER_MIN_FREE_BYTES", "0");
    fleet.restart_coordinator();
    fleet.wait_agent_listed("app", Duration::from_secs(60));
    let b = fleet.backup("app", None);
    assert!(b.is_completed(), "{}", b.raw);
}

#[test]
fn a_meta_file_planted_under_another_target_is_reported_and_not_imported() {
    let pg = PgCluster::new();
    pg.create_small_db("app", 2000);
    pg.create_small_db("shop", 2000);
    let mut fleet = Fleet::start();
    fleet.add_agent("app", &pg, "app");
    fleet.add_agent("shop", &pg, "shop");
    let app = fleet.backup("app", None);
    let shop = fleet.backup("shop", None);
    let root = fleet.storage_dir();

    // A real meta file of app, copied into shop's directory and edited to
    // say it is shop's: it would hand app's backup to shop.
    let real = std::fs::read(root.join(format!("app/logical/{}.meta.json", app.id)))
        .expect("app's meta file");
    let mut meta: serde_json::Value = serde_json::from_slice(&real).expect("meta JSON");
    meta["target"] = "shop".into();
    let planted = format!("shop/logical/{}.meta.json", app.id);
    std::fs::write(
        root.join(&planted),
        serde_json::to_vec_pretty(&meta).unwrap(),
    )
    .expect("plant meta file");
    // A real meta file of shop's, copied unchanged into app's directory.
    let copied = format!("app/logical/{}.meta.json", shop.id);
    std::fs::copy(
        root.join(format!("shop/logical/{}.meta.json", shop.id)),
        root.join(&copied),
    )
    .expect("copy meta file");
    // And one too big to be a meta file.
    let huge_id = "shop_20200101_000000";
    let huge = format!("shop/logical/{huge_id}.meta.json");
    std::fs::write(root.join(&huge), vec![b' '; 2 << 20]).expect("plant huge meta file");

    // Catalog lost: the start-up rebuild imports the real backups only.
    fleet.stop_coordinator();
    for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let _ = std::fs::remove_file(fleet.data_dir().join(f));
    }
    fleet.start_coordinator();
    let mut ids: Vec<(String, String)> = fleet
        .list_backups(None)
        .into_iter()
        .map(|b| (b.target, b.id))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            ("app".to_string(), app.id.clone()),
            ("shop".to_string(), shop.id.clone())
        ]
    );
    let log = fleet.coordinator().log();
    assert!(
        log.contains(&planted) && log.contains(&copied) && log.contains(&huge),
        "{log}"
    );

    // An explicit rebuild reports both, and imports neither.
    let report = fleet.dsctl_json(&["catalog", "rebuild"]);
    assert_eq!(report["imported"], serde_json::json!([]), "{report}");
    assert_eq!(report["already_known"], 2, "{report}");
    let problems: Vec<String> = report["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with(&planted) && p.contains("not imported")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with(&copied)
            && p.contains("records target \"shop\" but lies under \"app\"")
            && p.contains("not imported")),
        "{problems:?}"
    );
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with(&huge) && p.contains("larger than")),
        "{problems:?}"
    );
    let text = fleet
        .dsctl(&["catalog", "rebuild"])
        .expect_success("rebuild");
    assert!(
        text.stdout.contains(&planted) && text.stdout.contains(&copied),
        "{}",
        text.stdout
    );
    let shop_rows = fleet.list_backups(Some("shop"));
    assert_eq!(shop_rows.len(), 1, "{shop_rows:?}");
    assert_eq!(shop_rows[0].id, shop.id);
    // and the real backups still verify from the rebuilt catalog
    fleet.wait_agent_listed("app", Duration::from_secs(60));
    fleet
        .dsctl(&["verify", &app.id])
        .expect_success("verify app");
}

/// Connects and sends the start of a request, never its end.
fn half_request(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .expect("send half a request");
    s
}

#[test]
fn health_shows_no_connection_details_and_slow_clients_are_dropped() {
    let pg = PgCluster::new();
    pg.create_small_db("app", 2000);
    let mut fleet = fleet_with(&[("DATASAVER_HTTP_HEADER_TIMEOUT", "2s")]);
    let user = "limits_probe_user";
    let spec = fleet
        .agent_spec("app", &pg, "app")
        .env("DATASAVER_DB_USER", user)
        .env("DATASAVER_DB_PASSWORD", "not-the-password");
    fleet.add_agent_spec("app", spec);
    fleet
        .dsctl(&["--quiet", "backup", "app"])
        .expect_code(1, "backup with a wrong user");
    let port = pg.port().to_string();

    // Operators, over mutual TLS, see the whole error.
    let health = fleet.dsctl_json(&["health"]).to_string();
    assert!(health.contains(user), "{health}");
    assert!(health.contains(&port), "{health}");
    // Anyone who reaches the HTTP port sees its class only.
    let h = fleet.http_get("/health").expect("GET /health");
    assert_eq!(h.status, 503, "{}", h.body);
    for detail in [user, &port, pg.host(), "authentication"] {
        assert!(
            !h.body.contains(detail),
            "{detail:?} in /health:\n{}",
            h.body
        );
    }
    let v = h.json();
    assert_eq!(v["targets"][0]["target"], "app", "{}", h.body);
    assert!(
        v["targets"][0]["last_backup_error"]
            .as_str()
            .is_some_and(|e| e.contains("database unreachable")),
        "{}",
        h.body
    );
    let m = fleet.http_get("/metrics").expect("GET /metrics");
    for detail in [user, &port, "authentication"] {
        assert!(!m.body.contains(detail), "{detail:?} in /metrics");
    }

    // A client that never finishes its headers is dropped after the header
    // timeout (2 s here).
    let mut slow = half_request(fleet.http_port());
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "closed after {took:?}"
    );

    // 64 such clients take every connection slot: the next request waits
    // for them to be dropped, then is answered.
    let held: Vec<TcpStream> = (0..64).map(|_| half_request(fleet.http_port())).collect();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let h = fleet
        .http_get("/health")
        .expect("GET /health after the slots freed");
    let waited = t0.elapsed();
    assert_eq!(h.status, 503, "{}", h.body);
    assert!(
        waited >= Duration::from_millis(1000),
        "answered after {waited:?} while 64 connections were held"
    );
    drop(held);
    assert!(wait_until(Duration::from_secs(5), || fleet
        .http_get("/health")
        .is_ok()));
}
