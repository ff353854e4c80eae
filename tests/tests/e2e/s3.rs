//! The coordinator on a real S3-compatible server (s3s-fs, SigV4 on): the same faithful
//! round trip as on local storage, a backup big enough for a multipart upload of more than
//! three parts, a catalog rebuilt from the bucket, start-up refusals with distinct messages,
//! and the server dying in the middle of an upload.

use std::time::Duration;

use datasaver_tests::fidelity::{compare_databases, load_fidelity};
use datasaver_tests::s3::RecordingProxy;
use datasaver_tests::{free_port, run, wait_until, Fleet, FleetOptions, PgCluster, S3Server};

/// 5 MiB parts (S3's minimum) so a modest database needs several.
const PART_MB: &str = "5";

fn s3_fleet(srv: &S3Server, prefix: &str) -> Fleet {
    let mut env = srv.coordinator_env(prefix);
    env.push(("DATASAVER_S3_PART_SIZE_MB".into(), PART_MB.into()));
    Fleet::start_with(FleetOptions {
        coordinator_env: env,
        ..Default::default()
    })
}

/// ~30 MB of incompressible-ish rows on top of whatever `db` holds.
fn add_bulk(pg: &PgCluster, db: &str) {
    pg.psql(
        db,
        "CREATE TABLE bulk AS SELECT g AS id,
            md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text) AS payload
         FROM generate_series(1, 300000) g;",
    );
}

#[test]
fn s3_round_trip_multipart_and_rebuild() {
    let srv = S3Server::start();
    // Every request goes through a recording proxy, to count the reads.
    let proxy = RecordingProxy::start(srv.port());
    let pg = PgCluster::new();
    load_fidelity(&pg, "shop");
    add_bulk(&pg, "shop");
    let mut env = srv.coordinator_env("prod/eu");
    env.retain(|(k, _)| k != "DATASAVER_S3_ENDPOINT");
    env.push(("DATASAVER_S3_ENDPOINT".into(), proxy.endpoint()));
    env.push(("DATASAVER_S3_PART_SIZE_MB".into(), PART_MB.into()));
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: env,
        ..Default::default()
    });
    assert!(
        fleet
            .coordinator()
            .wait_for_log("s3://backups/prod/eu/", Duration::from_secs(30)),
        "{}",
        fleet.coordinator().log()
    );
    // Uncompressed, so the object is several parts long.
    let spec = fleet
        .agent_spec("shop-main", &pg, "shop")
        .env("DATASAVER_COMPRESSION", "none");
    fleet.add_agent_spec("shop-main", spec);

    let b = fleet.backup("shop-main", None);
    assert!(b.is_completed(), "{}", b.raw);
    let stored = b.stored_bytes.unwrap_or(0);
    assert!(
        stored > 3 * 5 * 1024 * 1024,
        "the object must span more than three 5 MiB parts, got {stored} bytes"
    );
    let object = format!("prod/eu/shop-main/logical/{}.dump", b.id);
    let meta = format!("prod/eu/shop-main/logical/{}.meta.json", b.id);
    let globals = format!("prod/eu/shop-main/logical/{}.globals.sql", b.id);
    assert_eq!(
        srv.objects(),
        vec![object.clone(), globals.clone(), meta.clone()]
    );
    let on_disk = std::fs::metadata(srv.root().join(&srv.bucket).join(&object))
        .expect("object in the bucket")
        .len();
    assert_eq!(on_disk, stored);
    assert!(srv.pending_upload_parts().is_empty());

    // Verify and restore each read the object once (GETs of its key).
    let gets_of_object = || {
        proxy
            .requests()
            .iter()
            .filter(|(line, _)| line.starts_with("GET ") && line.contains(&object))
            .count()
    };
    let before = gets_of_object();
    let v = fleet
        .dsctl(&["verify", &b.id])
        .expect_success("dsctl verify on S3");
    assert!(v.stdout.contains("verified"), "{}", v.describe());
    assert_eq!(
        gets_of_object() - before,
        1,
        "verify read the object more than once"
    );

    let before = gets_of_object();
    fleet.restore(&b.id, "shop_restored", &[]);
    compare_databases(&pg, "shop", &pg, "shop_restored")
        .expect("database restored from S3 equals the source");
    assert_eq!(
        gets_of_object() - before,
        1,
        "restore read the object more than once"
    );

    // The catalog is only an index: lose it, and the bucket gives it back.
    let before = fleet
        .dsctl(&["--json", "list"])
        .expect_success("list")
        .stdout;
    fleet.stop_coordinator();
    std::fs::remove_file(fleet.data_dir().join("catalog.db")).expect("remove catalog.db");
    let _ = std::fs::remove_file(fleet.data_dir().join("catalog.db-wal"));
    let _ = std::fs::remove_file(fleet.data_dir().join("catalog.db-shm"));
    fleet.start_coordinator();
    let after = fleet
        .dsctl(&["--json", "list"])
        .expect_success("list after rebuild")
        .stdout;
    assert_eq!(after, before, "catalog rebuilt from S3 differs");
    fleet.wait_agent_listed("shop-main", Duration::from_secs(60));
    fleet.restore(&b.id, "shop_rebuilt", &[]);
    compare_databases(&pg, "shop", &pg, "shop_rebuilt")
        .expect("restore after a rebuild from S3 equals the source");
}

#[test]
fn s3_start_up_check_refuses_with_distinct_messages() {
    let srv = S3Server::start();
    let certs = Fleet::start();
    let data = datasaver_tests::short_tempdir("dss3cfg");
    // Exit 1: the storage check failed; exit 2: a setting is wrong.
    let attempt_code = |code: i32, overrides: &[(&str, String)]| {
        let mut cmd = certs.coordinator_command(data.path());
        for (k, v) in srv.coordinator_env("") {
            cmd.env(k, v);
        }
        for (k, v) in overrides {
            cmd.env(k, v);
        }
        let out = run(cmd, Duration::from_secs(120));
        assert!(
            !out.timed_out,
            "coordinator kept running with {overrides:?}"
        );
        assert_eq!(out.code, Some(code), "{overrides:?}: {}", out.describe());
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "expected one line: {}", out.stderr);
        lines[0].to_string()
    };
    let attempt = |overrides: &[(&str, String)]| attempt_code(1, overrides);

    let wrong_secret = attempt(&[("DATASAVER_S3_SECRET_KEY", "not-the-secret".into())]);
    assert!(
        wrong_secret.contains("SignatureDoesNotMatch")
            && wrong_secret.contains("DATASAVER_S3_SECRET_KEY"),
        "{wrong_secret}"
    );
    assert!(!wrong_secret.contains("not-the-secret"), "{wrong_secret}");

    let missing_bucket = attempt(&[("DATASAVER_S3_BUCKET", "nope".into())]);
    assert!(
        missing_bucket.contains("bucket \"nope\" does not exist")
            && missing_bucket.contains("DATASAVER_S3_BUCKET"),
        "{missing_bucket}"
    );

    let unreachable = attempt(&[(
        "DATASAVER_S3_ENDPOINT",
        format!("http://127.0.0.1:{}", free_port()),
    )]);
    assert!(
        unreachable.contains("cannot reach the S3 endpoint")
            && unreachable.contains("DATASAVER_S3_ENDPOINT"),
        "{unreachable}"
    );

    // The secret also comes from a file, and bad settings are caught before any request.
    let secret_file = data.path().join("s3-secret");
    std::fs::write(&secret_file, format!("{}\n", srv.secret_key)).expect("write secret file");
    let both = attempt_code(
        2,
        &[(
            "DATASAVER_S3_SECRET_KEY_FILE",
            secret_file.display().to_string(),
        )],
    );
    assert!(both.contains("set only one"), "{both}");
    let part = attempt_code(2, &[("DATASAVER_S3_PART_SIZE_MB", "1".into())]);
    assert!(part.contains("DATASAVER_S3_PART_SIZE_MB"), "{part}");
    let sse = attempt_code(2, &[("DATASAVER_S3_SSE", "rot13".into())]);
    assert!(sse.contains("DATASAVER_S3_SSE"), "{sse}");
    assert!(srv.objects().is_empty(), "{:?}", srv.objects());
}

#[test]
fn s3_server_dying_mid_upload_fails_cleanly_then_recovers() {
    let mut srv = S3Server::start();
    let pg = PgCluster::new();
    pg.create_big_db("big");
    let mut fleet = s3_fleet(&srv, "");
    let spec = fleet
        .agent_spec("big", &pg, "big")
        .env("DATASAVER_COMPRESSION", "none");
    fleet.add_agent_spec("big", spec);

    let mut cmd = fleet.dsctl_command();
    cmd.args(["--quiet", "backup", "big"]);
    let handle = std::thread::spawn(move || run(cmd, Duration::from_secs(300)));
    assert!(
        wait_until(Duration::from_secs(120), || !srv
            .pending_upload_parts()
            .is_empty()),
        "the multipart upload never started"
    );
    srv.kill();
    let out = handle
        .join()
        .expect("dsctl thread")
        .expect_code(1, "backup whose S3 server died");
    assert!(out.stderr.contains("failed"), "{}", out.describe());
    let list = fleet.list_backups(Some("big"));
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].status, "failed", "{}", list[0].raw);
    let error = list[0].raw["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("S3 endpoint"), "{error}");

    // Back up: the unfinished upload is aborted by the coordinator, the globals it had
    // already stored are removed (both retried in the background while the server was
    // away), and the next backup completes.
    srv.restart();
    assert!(
        wait_until(Duration::from_secs(90), || srv
            .pending_upload_parts()
            .is_empty()),
        "parts of the failed upload were never aborted: {:?}",
        srv.pending_upload_parts()
    );
    assert!(
        wait_until(Duration::from_secs(30), || srv.objects().is_empty()),
        "the failed backup left {:?}",
        srv.objects()
    );
    let b = fleet.backup("big", None);
    assert!(b.is_completed(), "{}", b.raw);
    assert_eq!(srv.objects().len(), 3, "{:?}", srv.objects());
}

/// The coordinator is killed after a backup's object is stored and before its catalog row is
/// completed: start-up reconciles storage with the catalog, so there is neither an orphan
/// object nor a completed row without its object. Which of the two correct ends it reaches
/// depends on whether the held meta-file PUT still reaches the server after the kill: a
/// whole, verified backup is adopted; a cut-off one is removed and its row failed.
#[test]
fn killed_between_object_and_row_leaves_no_orphan() {
    let srv = S3Server::start();
    let proxy = RecordingProxy::start(srv.port());
    let pg = PgCluster::new();
    pg.create_small_db("app", 20000);
    let mut env = srv.coordinator_env("");
    env.retain(|(k, _)| k != "DATASAVER_S3_ENDPOINT");
    env.push(("DATASAVER_S3_ENDPOINT".into(), proxy.endpoint()));
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: env,
        ..Default::default()
    });
    fleet.add_agent("app", &pg, "app");
    // The meta file's PUT is held by the proxy: the coordinator waits on it with the object
    // already stored, and is killed there.
    proxy.stall_on(b".meta.json");
    let mut cmd = fleet.dsctl_command();
    cmd.args(["--quiet", "backup", "app"]);
    let handle = std::thread::spawn(move || run(cmd, Duration::from_secs(300)));
    assert!(
        wait_until(Duration::from_secs(60), || srv
            .objects()
            .iter()
            .any(|o| o.ends_with(".dump.zst"))),
        "the object was never stored: {:?}",
        srv.objects()
    );
    assert!(
        srv.objects().iter().all(|o| !o.ends_with(".meta.json")),
        "{:?}",
        srv.objects()
    );
    fleet.kill_coordinator();
    handle
        .join()
        .expect("dsctl thread")
        .expect_code(1, "backup whose coordinator was killed");
    // Let go of what the proxy holds (so start-up's own reads pass), then see what the
    // kill left in storage.
    proxy.release();
    std::thread::sleep(Duration::from_secs(3));
    let meta_landed = srv.objects().iter().any(|o| o.ends_with(".meta.json"));

    fleet.start_coordinator();
    let rows = fleet.list_backups(Some("app"));
    assert_eq!(rows.len(), 1, "{rows:?}");
    let b = &rows[0];
    let log = fleet.coordinator().log();
    if meta_landed {
        // Object and meta file were whole: adopted, and really whole.
        assert_eq!(b.status, "completed", "{}", b.raw);
        let mut objects = srv.objects();
        objects.sort();
        let object = b.raw["object_key"].as_str().unwrap_or_default();
        let mut want = vec![
            object.to_string(),
            object.replace(".dump", ".globals.sql"),
            format!("app/logical/{}.meta.json", b.id),
        ];
        want.sort();
        assert_eq!(objects, want, "storage holds exactly the adopted backup");
        assert!(
            log.contains("completed backups whose object and meta file"),
            "{log}"
        );
        fleet.wait_agent_listed("app", Duration::from_secs(60));
        fleet.restore(&b.id, "app_adopted", &[]);
        assert_eq!(
            pg.query_one("app_adopted", "SELECT count(*) FROM t"),
            "20000"
        );
    } else {
        // The object alone: removed, the attempt failed.
        assert_eq!(b.status, "failed", "{}", b.raw);
        assert!(
            b.raw["error"]
                .as_str()
                .is_some_and(|e| e.contains("coordinator stopped")),
            "{}",
            b.raw
        );
        assert!(
            srv.objects().is_empty(),
            "the cut-off attempt left {:?}",
            srv.objects()
        );
        assert!(
            log.contains("marked interrupted backups as failed"),
            "{log}"
        );
    }
}

/// `datasaver-coordinator healthcheck` (the image's HEALTHCHECK) against the
/// running coordinator.
fn coordinator_healthcheck(fleet: &Fleet) -> datasaver_tests::procs::Output {
    let mut cmd = datasaver_tests::procs::clean_command(datasaver_tests::procs::bin_path(
        "datasaver-coordinator",
    ));
    cmd.arg("healthcheck").env(
        "DATASAVER_HTTP_LISTEN",
        format!("0.0.0.0:{}", fleet.http_port()),
    );
    datasaver_tests::procs::run(cmd, Duration::from_secs(30))
}

/// Liveness is the process and what it needs to work, not the fleet's
/// verdict: `/live` (and `healthcheck`, the image's HEALTHCHECK) answer 200
/// while the catalog and storage answer, even with no backup ever taken (so
/// `/health` says unhealthy); when the S3 server goes away they fail with
/// one line, and recover when it is back.
#[test]
fn liveness_follows_storage_not_the_fleets_backups() {
    let mut srv = S3Server::start();
    let fleet = s3_fleet(&srv, "live");
    let live = || fleet.http_get("/live").map(|r| r.status).unwrap_or(0);
    // (The HTTP listener may still be starting when gRPC answers.)
    assert!(
        wait_until(Duration::from_secs(20), || live() == 200),
        "/live answered {}",
        live()
    );
    coordinator_healthcheck(&fleet).expect_success("healthcheck of a live coordinator");
    srv.kill();
    // One check answers for 10 s, so probes never hammer storage.
    assert!(
        wait_until(Duration::from_secs(30), || live() == 503),
        "/live stayed {}",
        live()
    );
    let out = coordinator_healthcheck(&fleet);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    datasaver_tests::assert_one_line_error(&out.stderr, "503");
    assert!(
        fleet
            .coordinator()
            .wait_for_log("not live", Duration::from_secs(5)),
        "{}",
        fleet.coordinator().log()
    );
    srv.restart();
    assert!(
        wait_until(Duration::from_secs(30), || live() == 200),
        "/live stayed {}",
        live()
    );
    coordinator_healthcheck(&fleet).expect_success("healthcheck once storage is back");
}
