//! Base backups and point-in-time restores end to end (issue 14), through
//! the real binaries: `dsctl backup --physical` stores `pg_basebackup`'s tar
//! only once the WAL to its end is stored; `dsctl restore --physical`
//! rebuilds a data directory that a real server starts from.

use std::time::Duration;

use datasaver_tests::{wait_until, Fleet, PgCluster};

const WAIT: Duration = Duration::from_secs(90);

fn wal_env() -> [(&'static str, &'static str); 2] {
    [
        ("DATASAVER_WAL", "stream"),
        ("DATASAVER_WAL_SYNC_INTERVAL", "1s"),
    ]
}

#[test]
fn a_base_backup_is_stored_whole_with_its_wal() {
    let pg = PgCluster::new();
    pg.create_small_db("shop", 500);
    let mut fleet = Fleet::start();
    fleet.add_agent_with("app", &pg, "postgres", &wal_env());
    assert!(fleet.agent("app").proc.wait_for_log("streaming WAL", WAIT));

    let out = fleet.dsctl(&["backup", "app", "--physical"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stderr.contains("from pg_basebackup"), "{}", out.stderr);
    let list = fleet.list_backups(Some("app"));
    assert_eq!(list.len(), 1, "{list:?}");
    let b = &list[0];
    assert!(b.is_completed(), "{b:?}");
    let text = fleet.dsctl(&["list"]).stdout;
    assert!(text.contains(" base "), "{text}");

    // The stored tar holds the cluster and its manifest.
    let key = fleet
        .storage_dir()
        .join("app/base")
        .join(format!("{}.tar.zst", b.id));
    let tar =
        zstd::stream::decode_all(&std::fs::read(&key).expect("stored tar")[..]).expect("zstd");
    let listing = String::from_utf8_lossy(&tar);
    for name in [
        "PG_VERSION",
        "backup_label",
        "backup_manifest",
        "global/pg_control",
    ] {
        assert!(listing.contains(name), "{name} missing from the tar");
    }
    // The WAL to its end is stored.
    let v = fleet.dsctl_json(&["wal", "--target", "app"]);
    assert!(
        v[0]["timelines"][0]["segments"].as_u64().unwrap_or(0) >= 1,
        "{v:#}"
    );
    // A base backup is not a dump: a logical restore of it is refused.
    let out = fleet.dsctl(&["restore", &b.id]);
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("--physical"), "{}", out.stderr);
}

#[test]
fn a_base_backup_without_the_wal_stream_is_refused() {
    let pg = PgCluster::new();
    let mut fleet = Fleet::start();
    fleet.add_agent("app", &pg, "postgres");
    let out = fleet.dsctl(&["backup", "app", "--physical"]);
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("DATASAVER_WAL=stream"),
        "{}",
        out.describe()
    );
    assert!(wait_until(Duration::from_secs(5), || fleet
        .list_backups(Some("app"))
        .iter()
        .all(|b| !b.is_completed())));
    assert!(
        !fleet.storage_dir().join("app/base").exists()
            || std::fs::read_dir(fleet.storage_dir().join("app/base"))
                .map(|d| d.count() == 0)
                .unwrap_or(true)
    );
}

fn time(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// The server's clock now, as RFC 3339 with microseconds.
fn server_now(pg: &PgCluster) -> String {
    pg.query_one(
        "postgres",
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
}

/// Waits until everything the server wrote up to `at` is stored.
fn wait_recoverable(fleet: &Fleet, at: &str) {
    let want = time(at).expect("time");
    let ok = wait_until(WAIT, || {
        fleet.dsctl_json(&["wal", "--target", "app"])[0]["latest_recoverable"]
            .as_str()
            .and_then(time)
            .is_some_and(|t| t >= want)
    });
    assert!(ok, "the WAL up to {at} was never all stored");
}

fn ids(pg: &PgCluster) -> Vec<String> {
    pg.query_rows("shop", "SELECT id FROM t ORDER BY id")
        .into_iter()
        .map(|r| r[0].clone())
        .collect()
}

#[test]
fn rows_before_the_noted_time_come_back_and_rows_after_do_not() {
    let pg = PgCluster::new();
    pg.create_db("shop");
    pg.psql("shop", "CREATE TABLE t (id int PRIMARY KEY, note text);");
    pg.psql(
        "shop",
        "INSERT INTO t SELECT g, 'before the base' FROM generate_series(1, 100) g;",
    );
    // The source's configuration (in the base backup) names a command
    // for the end of a recovery: the agent's recovery must not run it.
    let ran = pg.data_dir().with_file_name("recovery-end-command-ran");
    pg.psql(
        "postgres",
        &format!(
            "ALTER SYSTEM SET recovery_end_command = 'touch {}';",
            ran.display()
        ),
    );
    let mut fleet = Fleet::start();
    fleet.add_agent_with("app", &pg, "postgres", &wal_env());
    assert!(fleet.agent("app").proc.wait_for_log("streaming WAL", WAIT));
    let out = fleet.dsctl(&["backup", "app", "--physical"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let base = fleet.list_backups(Some("app"))[0].id.clone();

    pg.psql(
        "shop",
        "INSERT INTO t SELECT g, 'after the base, before T' FROM generate_series(101, 200) g;",
    );
    std::thread::sleep(Duration::from_millis(1200));
    let t = server_now(&pg);
    std::thread::sleep(Duration::from_millis(1200));
    pg.psql(
        "shop",
        "INSERT INTO t SELECT g, 'after T: the bad migration' FROM generate_series(201, 300) g;",
    );
    pg.psql("shop", "DELETE FROM t WHERE id <= 50;");
    let end = server_now(&pg);
    wait_recoverable(&fleet, &end);
    // The window, as /health and dsctl health show it.
    let health = fleet.http_get("/health").expect("/health").json();
    let window = health["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["target"] == "app"))
        .map(|t| t["recovery_window"].clone())
        .unwrap_or_default();
    let from = window["from"]
        .as_str()
        .and_then(time)
        .expect("recovery window from");
    let to = window["to"]
        .as_str()
        .and_then(time)
        .expect("recovery window to");
    assert!(
        from <= time(&t).expect("t") && time(&end).expect("end") <= to,
        "{window}"
    );
    let text = fleet.dsctl(&["health"]).stdout;
    assert!(text.contains("RECOVERABLE"), "{text}");
    // dsctl wal and /metrics give the same window.
    let v = fleet.dsctl_json(&["wal", "--target", "app"]);
    assert_eq!(
        v[0]["earliest_recoverable"].as_str().and_then(time),
        Some(from),
        "{v:#}"
    );
    let text = fleet.dsctl(&["wal", "--target", "app"]).stdout;
    assert!(text.contains("  recovery window: "), "{text}");
    let metrics = fleet.http_get("/metrics").expect("/metrics").body;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("datasaver_wal_earliest_recoverable_timestamp_seconds{target=\"app\"}")
        })
        .unwrap_or_default();
    let secs: f64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        (secs - from.timestamp_micros() as f64 / 1e6).abs() < 0.01,
        "{line}"
    );

    // To T: the rows before it, none after; on a new timeline; it starts.
    let mut restored = PgCluster::unstarted_like(&pg);
    let dir = restored.data_dir();
    let out = restore_into(&fleet, &["--target", "app", "--at", &t], &restored);
    assert_eq!(
        out.code,
        Some(0),
        "{}\n--- agent ---\n{}",
        out.describe(),
        fleet.agent("app").proc.log()
    );
    assert!(
        out.stdout.contains(&format!("restored base backup {base}")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("now on timeline 2"), "{}", out.stdout);
    assert!(!ran.exists(), "the source's recovery_end_command ran");
    assert!(
        !dir.join("recovery.signal").exists(),
        "promoted: no recovery.signal left"
    );
    restored.start();
    let want: Vec<String> = (1..=200).map(|i| i.to_string()).collect();
    assert_eq!(ids(&restored), want, "rows 1-200 exactly");
    assert_eq!(
        restored.query_one("shop", "SELECT count(*) FROM t WHERE note LIKE 'after T%'"),
        "0"
    );
    assert_eq!(
        restored.query_one(
            "postgres",
            "SELECT timeline_id FROM pg_control_checkpoint()"
        ),
        "2"
    );
    // A writable primary, not a standby.
    assert_eq!(
        restored.query_one("postgres", "SELECT pg_is_in_recovery()"),
        "f"
    );
    restored.psql(
        "shop",
        "INSERT INTO t VALUES (1000, 'written after the restore');",
    );
    restored.stop();

    // --latest: everything, including the deletes.
    let latest = PgCluster::unstarted_like(&pg);
    let out = restore_into(&fleet, &["--target", "app", "--latest"], &latest);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let mut latest = latest;
    latest.start();
    assert_eq!(ids(&latest), ids(&pg), "--latest equals the source");
    latest.stop();

    // The base backup alone, to its end: the rows it held.
    let only = PgCluster::unstarted_like(&pg);
    let out = restore_into(&fleet, &[&base], &only);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let mut only = only;
    only.start();
    assert_eq!(only.query_one("shop", "SELECT count(*) FROM t"), "100");
    only.stop();

    // Outside the window: refused before anything is written.
    let early = PgCluster::unstarted_like(&pg);
    let out = restore_into(
        &fleet,
        &["--target", "app", "--at", "2020-01-01T00:00:00Z"],
        &early,
    );
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("before the earliest recoverable point"),
        "{}",
        out.stderr
    );
    assert!(!early.data_dir().exists(), "nothing written");
    let out = restore_into(
        &fleet,
        &["--target", "app", "--at", "2100-01-01T00:00:00Z"],
        &early,
    );
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("after the latest recoverable time"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("recovery window"), "{}", out.stderr);
    assert!(!early.data_dir().exists(), "nothing written");
    // Over a non-empty directory without --force: refused, untouched.
    let out = restore_into(&fleet, &["--target", "app", "--latest"], &only);
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("--force"), "{}", out.stderr);
    assert!(only.data_dir().join("PG_VERSION").exists());
}

/// The stored object of WAL segment `name` of target app.
fn stored_wal(fleet: &Fleet, name: &str) -> std::path::PathBuf {
    let root = fleet.storage_dir().join("app/wal");
    for sys in std::fs::read_dir(&root).expect("wal dir").flatten() {
        for f in std::fs::read_dir(sys.path().join("00000001"))
            .expect("timeline dir")
            .flatten()
        {
            if f.file_name()
                .to_string_lossy()
                .starts_with(&format!("{name}-"))
            {
                return f.path();
            }
        }
    }
    panic!("{name} is not stored");
}

#[test]
fn a_damaged_or_missing_segment_stops_the_restore_and_leaves_nothing() {
    let pg = PgCluster::new();
    pg.create_db("shop");
    pg.psql("shop", "CREATE TABLE t (id int PRIMARY KEY, note text);");
    let mut fleet = Fleet::start();
    fleet.add_agent_with("app", &pg, "postgres", &wal_env());
    assert!(fleet.agent("app").proc.wait_for_log("streaming WAL", WAIT));
    let out = fleet.dsctl(&["backup", "app", "--physical"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let mut names = Vec::new();
    for i in 0..3 {
        pg.psql(
            "shop",
            &format!(
                "INSERT INTO t SELECT g, 'x' FROM generate_series({}, {}) g;",
                i * 1000 + 1,
                i * 1000 + 1000
            ),
        );
        names.push(pg.query_one(
            "postgres",
            "SELECT pg_walfile_name(pg_current_wal_insert_lsn())",
        ));
        pg.psql("postgres", "SELECT pg_switch_wal();");
    }
    wait_recoverable(&fleet, &server_now(&pg));
    let middle = &names[1];
    let dir = PgCluster::unstarted_like(&pg);
    let data = dir.data_dir();
    let restore = |fleet: &Fleet| restore_into(fleet, &["--target", "app", "--latest"], &dir);

    let base = fleet.list_backups(Some("app"))[0].id.clone();
    let out = fleet.dsctl(&["verify", &base]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stdout.contains("checksum matches"), "{}", out.stdout);
    assert!(out.stdout.contains("WAL files from it"), "{}", out.stdout);

    // A flipped byte in the base backup: verify finds it; a restore
    // refuses and leaves no data directory behind.
    let tar = fleet
        .storage_dir()
        .join("app/base")
        .join(format!("{base}.tar.zst"));
    let original = std::fs::read(&tar).expect("read base");
    let mut bad = original.clone();
    let at = bad.len() / 3;
    bad[at] ^= 0x01;
    std::fs::write(&tar, &bad).expect("write");
    let out = fleet.dsctl(&["verify", &base]);
    assert_ne!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stderr.contains("checksum") || out.stderr.contains("corrupt"),
        "{}",
        out.stderr
    );
    let out = restore(&fleet);
    assert_ne!(out.code, Some(0), "{}", out.describe());
    assert!(
        !data.exists()
            || std::fs::read_dir(&data)
                .map(|d| d.count() == 0)
                .unwrap_or(true),
        "no half-written data directory"
    );
    std::fs::write(&tar, &original).expect("put it back");
    // Repaired, it verifies again (and is chosen again).
    let out = fleet.dsctl(&["verify", &base]);
    assert_eq!(out.code, Some(0), "{}", out.describe());

    // One flipped byte in a segment: verify names it, and the agent's
    // check refuses it, aborting the recovery before it could promote;
    // nothing is left.
    let path = stored_wal(&fleet, middle);
    let mut bytes = std::fs::read(&path).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).expect("write");
    let out = fleet.dsctl(&["verify", &base]);
    assert_ne!(out.code, Some(0), "{}", out.describe());
    assert!(out.stderr.contains(middle.as_str()), "{}", out.stderr);
    let out = restore(&fleet);
    assert_ne!(
        out.code,
        Some(0),
        "{}\nflipped {middle} of {names:?}\n{:#}",
        out.describe(),
        fleet.dsctl_json(&["wal"])
    );
    assert!(out.stderr.contains(middle.as_str()), "{}", out.stderr);
    assert!(
        !data.exists()
            || std::fs::read_dir(&data)
                .map(|d| d.count() == 0)
                .unwrap_or(true),
        "nothing written"
    );

    // Gone altogether: refused by the plan, naming it; dsctl wal shows
    // the gap and wal.gap fires.
    std::fs::remove_file(&path).expect("remove");
    let out = restore(&fleet);
    assert_ne!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stderr
            .contains(&format!("WAL segment {middle} is missing")),
        "{}",
        out.stderr
    );
    assert!(!data.exists(), "nothing written");
    let text = fleet.dsctl(&["wal"]).stdout;
    assert!(
        text.contains(&format!("GAP: {middle}..{middle} missing")),
        "{text}"
    );
    let alerted = wait_until(WAIT, || fleet.dsctl(&["health"]).stdout.contains("wal.gap"));
    assert!(alerted, "wal.gap in dsctl health");
}

/// pgbench's invariant: every balance is the sum of its history's deltas.
fn balances_agree(pg: &PgCluster) {
    for (table, col, key) in [
        ("pgbench_accounts", "abalance", "aid"),
        ("pgbench_tellers", "tbalance", "tid"),
        ("pgbench_branches", "bbalance", "bid"),
    ] {
        let bad = pg.query_one(
            "bench",
            &format!(
                "SELECT count(*) FROM {table} x LEFT JOIN (SELECT {key}, sum(delta) AS s FROM pgbench_history GROUP BY {key}) h USING ({key}) WHERE x.{col} <> coalesce(h.s, 0)"
            ),
        );
        assert_eq!(bad, "0", "{table}: balances disagree with the history");
    }
}

#[test]
fn under_pgbench_a_restore_to_a_moment_in_the_load_is_consistent_on_postgresql_17() {
    let Some(newer) = PgCluster::newer_bindir() else {
        datasaver_tests::skip(
            "no newer PostgreSQL major version installed (tests/install-newer-pg.sh)",
        );
        return;
    };
    let pg = PgCluster::start_with_bindir(&newer);
    pg.create_db("bench");
    let init = pg
        .client_command("pgbench")
        .args(["-i", "-q", "-s", "2", "bench"])
        .output()
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let mut fleet = Fleet::start();
    fleet.add_agent_with("app", &pg, "postgres", &wal_env());
    assert!(fleet.agent("app").proc.wait_for_log("streaming WAL", WAIT));

    // Load during the base backup and after it.
    let mut load = pg
        .client_command("pgbench")
        .args(["-n", "-c", "4", "-T", "25", "bench"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgbench");
    std::thread::sleep(Duration::from_secs(3));
    let out = fleet.dsctl(&["backup", "app", "--physical"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    std::thread::sleep(Duration::from_secs(3));
    let t = server_now(&pg);
    let ran = load.wait().expect("pgbench ends");
    assert!(ran.success(), "pgbench failed");
    let after_t = pg.query_one(
        "bench",
        &format!("SELECT count(*) FROM pgbench_history WHERE mtime > '{t}'::timestamptz"),
    );
    assert_ne!(after_t, "0", "the load went on after T");
    wait_recoverable(&fleet, &server_now(&pg));

    let mut restored = PgCluster::unstarted_like(&pg);
    let out = restore_into(&fleet, &["--target", "app", "--at", &t], &restored);
    assert_eq!(
        out.code,
        Some(0),
        "{}\n--- agent ---\n{}",
        out.describe(),
        fleet.agent("app").proc.log()
    );
    restored.start();
    balances_agree(&restored);
    let n = restored.query_one("bench", "SELECT count(*) FROM pgbench_history");
    assert_ne!(n, "0", "transactions before T are there");
    let later = restored.query_one(
        "bench",
        &format!("SELECT count(*) FROM pgbench_history WHERE mtime > '{t}'::timestamptz"),
    );
    assert_eq!(later, "0", "nothing begun after T");
    assert!(
        restored
            .query_one("bench", "SELECT count(*) FROM pgbench_history")
            .parse::<u64>()
            .unwrap_or(0)
            < pg.query_one("bench", "SELECT count(*) FROM pgbench_history")
                .parse::<u64>()
                .unwrap_or(0),
        "the restore stopped inside the load"
    );
    restored.stop();
}

#[test]
fn a_short_window_keeps_exactly_what_it_needs() {
    let pg = PgCluster::new();
    pg.create_db("shop");
    pg.psql("shop", "CREATE TABLE t (id int PRIMARY KEY);");
    let mut fleet = Fleet::start_with(datasaver_tests::FleetOptions {
        coordinator_env: vec![("DATASAVER_PITR_WINDOW".into(), "4s".into())],
        ..Default::default()
    });
    // GFS beyond the window: the first base backup of the day is kept.
    let mut env = wal_env().to_vec();
    env.extend([
        ("DATASAVER_KEEP_DAILY", "1"),
        ("DATASAVER_KEEP_WEEKLY", "0"),
        ("DATASAVER_KEEP_MONTHLY", "0"),
    ]);
    fleet.add_agent_with("app", &pg, "postgres", &env);
    assert!(fleet.agent("app").proc.wait_for_log("streaming WAL", WAIT));
    let physical = |fleet: &Fleet| {
        let before: Vec<String> = fleet
            .list_backups(Some("app"))
            .into_iter()
            .map(|b| b.id)
            .collect();
        let out = fleet.dsctl(&["backup", "app", "--physical"]);
        assert_eq!(out.code, Some(0), "{}", out.describe());
        fleet
            .list_backups(Some("app"))
            .into_iter()
            .map(|b| b.id)
            .find(|id| !before.contains(id))
            .expect("a new base backup")
    };
    let switches = |from: i32| {
        for i in from..from + 3 {
            pg.psql(
                "shop",
                &format!("INSERT INTO t VALUES ({i}); SELECT pg_switch_wal();"),
            );
        }
    };
    let first = physical(&fleet);
    switches(0);
    let middle = physical(&fleet);
    switches(10);
    std::thread::sleep(Duration::from_secs(5));
    let second = physical(&fleet);
    pg.psql("shop", "INSERT INTO t VALUES (100);");
    wait_recoverable(&fleet, &server_now(&pg));
    let ids = |fleet: &Fleet| {
        let mut v: Vec<String> = fleet
            .list_backups(Some("app"))
            .into_iter()
            .map(|b| b.id)
            .collect();
        v.sort();
        v
    };
    // Right after the second: the middle one is still the window's anchor.
    assert_eq!(ids(&fleet).len(), 3, "{:?}", ids(&fleet));
    let segments = |fleet: &Fleet| {
        let v = fleet.dsctl_json(&["wal", "--target", "app"]);
        (
            v[0]["timelines"][0]["segments"].as_u64().unwrap_or(0),
            v[0]["timelines"][0]["first_segment"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            v,
        )
    };
    let (count_before, first_before, _) = segments(&fleet);
    // Once the window has passed the second: the middle one and the WAL
    // between the first's end and the second's start go; the first stays
    // (GFS daily) with its own WAL, the second (the anchor) with all after.
    std::thread::sleep(Duration::from_secs(5));
    let out = fleet.dsctl(&["cleanup", "--target", "app"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let mut want = vec![first.clone(), second.clone()];
    want.sort();
    assert_eq!(ids(&fleet), want, "the GFS-kept first and the anchor stay");
    assert!(!fleet
        .storage_dir()
        .join("app/base")
        .join(format!("{middle}.tar.zst"))
        .exists());
    let (count_after, first_after, v) = segments(&fleet);
    assert!(
        count_after < count_before && first_after == first_before,
        "WAL between the kept ranges deleted, the first's kept: {count_before} -> {count_after}, {v:#}"
    );
    // What retention removed is not a gap.
    assert!(
        v[0]["timelines"][0]["gaps"]
            .as_array()
            .is_some_and(|g| g.is_empty()),
        "{v:#}"
    );
    let text = fleet.dsctl(&["wal", "--target", "app"]).stdout;
    assert!(!text.contains("GAP"), "{text}");
    // Both restore: the first to its end, the window to its latest.
    let restored = PgCluster::unstarted_like(&pg);
    let out = restore_into(&fleet, &[&first], &restored);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let mut restored = restored;
    restored.start();
    assert_eq!(restored.query_one("shop", "SELECT count(*) FROM t"), "0");
    restored.stop();
    let restored = PgCluster::unstarted_like(&pg);
    let out = restore_into(&fleet, &["--target", "app", "--latest"], &restored);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let mut restored = restored;
    restored.start();
    assert_eq!(restored.query_one("shop", "SELECT count(*) FROM t"), "7");
    restored.stop();
}

/// `dsctl restore <how> --physical --data-dir <into's data directory>`.
fn restore_into(fleet: &Fleet, how: &[&str], into: &PgCluster) -> datasaver_tests::Output {
    let dir = into.data_dir();
    let mut args = vec!["restore"];
    args.extend_from_slice(how);
    args.extend(["--physical", "--data-dir", dir.to_str().expect("path")]);
    fleet.dsctl(&args)
}

#[test]
fn restores_follow_a_promoted_standby_across_the_timeline_switch() {
    let mut primary = PgCluster::new();
    primary.create_db("shop");
    primary.psql("shop", "CREATE TABLE t (id int PRIMARY KEY, note text);");
    primary.psql(
        "shop",
        "INSERT INTO t SELECT g, 'old primary, before the base' FROM generate_series(1, 100) g;",
    );
    let mut fleet = Fleet::start();
    fleet.add_agent_with("app", &primary, "postgres", &wal_env());
    assert!(fleet.agent("app").proc.wait_for_log("streaming WAL", WAIT));
    let out = fleet.dsctl(&["backup", "app", "--physical"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let base = fleet.list_backups(Some("app"))[0].id.clone();
    let standby = PgCluster::standby_of(&primary);

    primary.psql(
        "shop",
        "INSERT INTO t SELECT g, 'old primary, before T1' FROM generate_series(101, 200) g;",
    );
    std::thread::sleep(Duration::from_millis(1200));
    let t1 = server_now(&primary);
    std::thread::sleep(Duration::from_millis(1200));
    primary.psql(
        "shop",
        "INSERT INTO t SELECT g, 'old primary, after T1' FROM generate_series(201, 300) g;",
    );
    let caught_up = wait_until(WAIT, || {
        standby
            .try_query_rows("shop", "SELECT count(*) FROM t")
            .is_ok_and(|r| r.first().and_then(|r| r.first()).map(String::as_str) == Some("300"))
    });
    assert!(caught_up, "the standby never replayed the 300 rows");
    wait_recoverable(&fleet, &server_now(&primary));

    // The failover: the primary goes, the standby is promoted (timeline
    // 2), and the agent now serves it.
    primary.stop();
    standby.promote();
    fleet.remove_agent("app");
    fleet.add_agent_with("app", &standby, "postgres", &wal_env());
    standby.psql(
        "shop",
        "INSERT INTO t SELECT g, 'new primary, before T2' FROM generate_series(301, 400) g;",
    );
    std::thread::sleep(Duration::from_millis(1200));
    let t2 = server_now(&standby);
    std::thread::sleep(Duration::from_millis(1200));
    standby.psql(
        "shop",
        "INSERT INTO t SELECT g, 'new primary, after T2' FROM generate_series(401, 500) g;",
    );
    wait_recoverable(&fleet, &server_now(&standby));
    let v = fleet.dsctl_json(&["wal", "--target", "app"]);
    let timelines: Vec<u64> = v[0]["timelines"]
        .as_array()
        .map(|ts| ts.iter().filter_map(|t| t["timeline"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(timelines, [1, 2], "{v:#}");
    let text = fleet.dsctl(&["wal", "--target", "app"]).stdout;
    assert!(!text.contains("GAP"), "{text}");

    // Before the switch: the base backup of timeline 1, replayed to T1.
    let before = PgCluster::unstarted_like(&primary);
    let out = restore_into(&fleet, &["--target", "app", "--at", &t1], &before);
    assert_eq!(
        out.code,
        Some(0),
        "{}\n--- agent ---\n{}",
        out.describe(),
        fleet.agent("app").proc.log()
    );
    assert!(
        out.stdout.contains(&format!("restored base backup {base}")),
        "{}",
        out.stdout
    );
    let mut before = before;
    before.start();
    let want: Vec<String> = (1..=200).map(|i| i.to_string()).collect();
    assert_eq!(ids(&before), want, "rows 1-200 exactly");
    before.stop();

    // After the switch: through timeline 1 into timeline 2, to T2. The
    // result takes a timeline no stored branch has (3).
    let after = PgCluster::unstarted_like(&primary);
    let out = restore_into(&fleet, &["--target", "app", "--at", &t2], &after);
    assert_eq!(
        out.code,
        Some(0),
        "{}\n--- agent ---\n{}",
        out.describe(),
        fleet.agent("app").proc.log()
    );
    assert!(out.stdout.contains("now on timeline 3"), "{}", out.stdout);
    let mut after = after;
    after.start();
    let want: Vec<String> = (1..=400).map(|i| i.to_string()).collect();
    assert_eq!(ids(&after), want, "rows 1-400 exactly");
    assert_eq!(
        after.query_one(
            "shop",
            "SELECT count(*) FROM t WHERE note = 'new primary, before T2'"
        ),
        "100"
    );
    after.stop();

    // The base backup of timeline 1 verifies through to timeline 2's end.
    let out = fleet.dsctl(&["verify", &base]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
}

#[test]
fn base_backups_run_on_the_schedule_the_agent_asks_for() {
    let pg = PgCluster::new();
    pg.create_small_db("shop", 100);
    let mut fleet = Fleet::start();
    let mut env = wal_env().to_vec();
    env.push(("DATASAVER_BASE_SCHEDULE", "*/5 * * * * *"));
    fleet.add_agent_with("app", &pg, "postgres", &env);
    let scheduled = |fleet: &Fleet| {
        fleet
            .list_backups(Some("app"))
            .into_iter()
            .filter(|b| b.is_completed() && b.kind == "base" && b.raw["trigger"] == "scheduled")
            .count()
    };
    // One per slot, never two at once, each a whole base backup with its
    // WAL; the scheduled dumps are another schedule (none here).
    assert!(
        wait_until(WAIT, || scheduled(&fleet) >= 2),
        "no two scheduled base backups: {:?}\n{}",
        fleet.list_backups(Some("app")),
        fleet.coordinator().log()
    );
    let rows = fleet.list_backups(Some("app"));
    assert!(rows.iter().all(|b| b.kind == "base"), "{rows:?}");
    // A scheduled base backup restores like any other.
    let newest = rows
        .iter()
        .find(|b| b.is_completed())
        .expect("a completed base backup");
    let text = fleet.dsctl(&["get", &newest.id]).stdout;
    assert!(text.contains("scheduled"), "{text}");
    let into = PgCluster::unstarted_like(&pg);
    let out = restore_into(&fleet, &[&newest.id], &into);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let mut into = into;
    into.start();
    assert_eq!(into.query_one("shop", "SELECT count(*) FROM t"), "100");
}

#[test]
fn on_s3_and_encrypted_an_unreachable_bucket_raises_wal_lag_and_loses_nothing() {
    let mut srv = datasaver_tests::S3Server::start();
    let pg = PgCluster::new();
    pg.create_db("shop");
    pg.psql("shop", "CREATE TABLE t (id int PRIMARY KEY);");
    let mut env = srv.coordinator_env("pitr");
    env.push(("DATASAVER_ALERT_WAL_LAG".into(), "3s".into()));
    let mut fleet = Fleet::start_with(datasaver_tests::FleetOptions {
        coordinator_env: env,
        ..Default::default()
    });
    let keys = fleet.dir().join("keys");
    std::fs::create_dir_all(&keys).expect("keys dir");
    let id_file = keys.join("wal.agekey");
    let out = fleet.dsctl(&["keygen", "--out", id_file.to_str().expect("path")]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let recipient = out.stdout.trim().to_string();
    let mut spec = fleet
        .agent_spec("app", &pg, "postgres")
        .env("DATASAVER_ENCRYPTION_RECIPIENT", &recipient)
        .env("DATASAVER_ENCRYPTION_IDENTITY_FILE", &id_file);
    for (k, v) in wal_env() {
        spec = spec.env(k, v);
    }
    fleet.add_agent_spec("app", spec);
    assert!(fleet.agent("app").proc.wait_for_log("streaming WAL", WAIT));
    let out = fleet.dsctl(&["backup", "app", "--physical"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    pg.psql(
        "shop",
        "INSERT INTO t SELECT g FROM generate_series(1, 100) g;",
    );
    wait_recoverable(&fleet, &server_now(&pg));
    // Stored encrypted, in the bucket.
    let objects = srv.objects();
    assert!(
        objects
            .iter()
            .any(|k| k.contains("/wal/") && k.ends_with(".zst.age")),
        "{objects:?}"
    );
    assert!(
        objects
            .iter()
            .any(|k| k.contains("/base/") && k.ends_with(".tar.zst.age")),
        "{objects:?}"
    );

    // The bucket goes away while the server writes: the stored WAL falls
    // behind the server the agent still reads, and wal.lag fires.
    srv.kill();
    for i in 0..3 {
        pg.psql(
            "shop",
            &format!(
                "INSERT INTO t SELECT g FROM generate_series({}, {}) g; SELECT pg_switch_wal();",
                101 + i * 100,
                200 + i * 100
            ),
        );
    }
    let fired = wait_until(WAIT, || fleet.dsctl(&["health"]).stdout.contains("wal.lag"));
    assert!(
        fired,
        "wal.lag never fired\n{}\n--- coordinator ---\n{}",
        fleet.dsctl(&["wal"]).stdout,
        fleet.coordinator().log()
    );
    // Back: the stream catches up from the slot, the alert resolves, and
    // nothing is missing.
    srv.restart();
    let end = server_now(&pg);
    wait_recoverable(&fleet, &end);
    let resolved = wait_until(WAIT, || {
        !fleet.dsctl(&["health"]).stdout.contains("wal.lag")
    });
    assert!(
        resolved,
        "wal.lag never resolved\n{}",
        fleet.dsctl(&["health"]).stdout
    );
    let text = fleet.dsctl(&["wal", "--target", "app"]).stdout;
    assert!(!text.contains("GAP"), "{text}");
    // The encrypted WAL and base replay to the end.
    let restored = PgCluster::unstarted_like(&pg);
    let out = restore_into(&fleet, &["--target", "app", "--latest"], &restored);
    assert_eq!(
        out.code,
        Some(0),
        "{}\n--- agent ---\n{}",
        out.describe(),
        fleet.agent("app").proc.log()
    );
    let mut restored = restored;
    restored.start();
    assert_eq!(restored.query_one("shop", "SELECT count(*) FROM t"), "400");
    restored.stop();
}

#[test]
fn a_coordinator_stopped_during_a_restore_aborts_it_and_a_rerun_gives_the_whole_result() {
    let pg = PgCluster::new();
    pg.create_db("shop");
    pg.psql("shop", "CREATE TABLE t (id int PRIMARY KEY);");
    let mut fleet = Fleet::start();
    fleet.add_agent_with("app", &pg, "postgres", &wal_env());
    assert!(fleet.agent("app").proc.wait_for_log("streaming WAL", WAIT));
    let out = fleet.dsctl(&["backup", "app", "--physical"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    // Many segments to fetch, so the recovery is still waiting for WAL
    // when the coordinator goes.
    for i in 0..40 {
        pg.psql(
            "shop",
            &format!("INSERT INTO t VALUES ({i}); SELECT pg_switch_wal();"),
        );
    }
    wait_recoverable(&fleet, &server_now(&pg));

    let into = PgCluster::unstarted_like(&pg);
    let dir = into.data_dir();
    let spool = std::path::PathBuf::from(format!("{}.datasaver-wal", dir.display()));
    let mut cmd = fleet.dsctl_command();
    cmd.args([
        "restore",
        "--target",
        "app",
        "--latest",
        "--physical",
        "--data-dir",
    ])
    .arg(&dir);
    let restore = std::thread::spawn(move || datasaver_tests::run(cmd, Duration::from_secs(300)));
    // The recovering server is up (its pid file is in the directory) and
    // asks for WAL the spool does not hold yet.
    let recovering = wait_until(WAIT, || dir.join("postmaster.pid").exists());
    assert!(recovering, "the restore never started its recovery");
    fleet.stop_coordinator();
    let out = restore.join().expect("dsctl thread");
    assert_ne!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stderr
            .contains("interrupted: the coordinator is shutting down"),
        "{}",
        out.stderr
    );
    // Nothing promoted, nothing half-written left to start by mistake.
    let left = wait_until(Duration::from_secs(30), || {
        !spool.exists() && std::fs::read_dir(&dir).map_or(true, |d| d.count() == 0)
    });
    assert!(
        left,
        "the aborted restore left files: {:?}\n--- agent ---\n{}",
        datasaver_tests::files_under(&dir),
        fleet.agent("app").proc.log()
    );

    // Back: the same restore gives the whole result. The spool beside the
    // directory holds a window of the WAL ahead of the server (16
    // segments of 16 MiB), a few behind it, never all 40 and more.
    fleet.start_coordinator();
    fleet.wait_agent_listed("app", Duration::from_secs(60));
    let segments_in_spool = || {
        std::fs::read_dir(&spool).map_or(0, |d| {
            d.flatten()
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit())
                })
                .count()
        })
    };
    let (out, most) = std::thread::scope(|s| {
        let restoring = s.spawn(|| restore_into(&fleet, &["--target", "app", "--latest"], &into));
        let mut most = 0;
        while !restoring.is_finished() {
            most = most.max(segments_in_spool());
            std::thread::sleep(Duration::from_millis(5));
        }
        (restoring.join().expect("restore thread"), most)
    });
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(most > 0, "the spool was never seen holding WAL");
    assert!(most <= 16 + 2 + 1, "the spool held {most} segments at once");
    let mut into = into;
    into.start();
    assert_eq!(into.query_one("shop", "SELECT count(*) FROM t"), "40");
    into.stop();
}
