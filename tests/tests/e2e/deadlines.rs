//! Nothing waits forever: a table lock fails the backup after
//! DATASAVER_LOCK_WAIT_TIMEOUT naming the table, a transfer that moves no
//! byte fails at DATASAVER_TRANSFER_IDLE_TIMEOUT, and `dsctl cancel` stops a
//! running job. Each time the agent's pg_dump is gone, nothing is stored and
//! the next backup of the target runs.

use std::time::{Duration, Instant};

use datasaver_tests::{files_under, wait_until, Fleet, FleetOptions, PgCluster, Sig};

fn one_line(s: &str) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected exactly one line, got:\n{s}");
    lines[0].to_string()
}

/// A `psql` session holding `LOCK TABLE t IN ACCESS EXCLUSIVE MODE` in an
/// open transaction, as an application's long migration would. Killed on drop.
struct LockHolder(std::process::Child);

impl LockHolder {
    fn take(pg: &PgCluster, db: &str) -> LockHolder {
        use std::io::Write;
        let mut cmd = pg.client_command("psql");
        cmd.env("PGAPPNAME", "lock-holder")
            .args(["-X", "-q", "-d", db])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().expect("start psql");
        let stdin = child.stdin.as_mut().expect("psql stdin");
        stdin
            .write_all(b"BEGIN;\nLOCK TABLE t IN ACCESS EXCLUSIVE MODE;\n")
            .expect("send the lock");
        stdin.flush().expect("flush");
        let held = wait_until(Duration::from_secs(30), || {
            pg.query_one(
                db,
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                 WHERE a.application_name = 'lock-holder' AND l.mode = 'AccessExclusiveLock'
                   AND l.granted AND l.relation = 't'::regclass",
            ) == "1"
        });
        assert!(held, "the lock holder did not get its lock");
        LockHolder(child)
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent's sessions on `db` (pg_dump runs as application `datasaver-agent`).
fn agent_sessions(pg: &PgCluster, db: &str) -> String {
    pg.query_one(
        "postgres",
        &format!(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = 'datasaver-agent' AND datname = '{db}'"
        ),
    )
}

/// Child processes of `pid` named `name` (from /proc).
fn children_named(pid: u32, name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split at ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if comm == name && ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

#[test]
fn a_held_lock_fails_the_backup_within_the_lock_wait_naming_the_table() {
    let pg = PgCluster::new();
    pg.create_small_db("app", 20000);
    let mut fleet = Fleet::start();
    fleet.add_agent_with("app", &pg, "app", &[("DATASAVER_LOCK_WAIT_TIMEOUT", "2s")]);
    let lock = LockHolder::take(&pg, "app");

    let t0 = Instant::now();
    let out = fleet
        .dsctl(&["backup", "app"])
        .expect_code(1, "a backup behind a held lock");
    let took = t0.elapsed();
    // The job deadline is 12 h: only the lock wait can have ended it.
    assert!(took < Duration::from_secs(30), "took {took:?}");
    let last = out
        .stderr
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or_default();
    assert!(last.starts_with("dsctl: "), "{}", out.describe());
    assert!(
        last.contains(
            "pg_dump could not lock table public.t within 2s (DATASAVER_LOCK_WAIT_TIMEOUT)"
        ),
        "{}",
        out.describe()
    );
    // pg_dump's own words are kept.
    assert!(last.contains("LOCK TABLE public.t"), "{last}");

    // The catalog says the same, in `dsctl list` and `dsctl get`.
    let rows = fleet.list_backups(Some("app"));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].status, "failed");
    let list = fleet
        .dsctl(&["list", "--target", "app"])
        .expect_success("dsctl list");
    assert!(list.stdout.contains("failed"), "{}", list.stdout);
    let get = fleet
        .dsctl(&["get", &rows[0].id])
        .expect_success("dsctl get");
    assert!(
        get.stdout.contains("DATASAVER_LOCK_WAIT_TIMEOUT") && get.stdout.contains("public.t"),
        "{}",
        get.stdout
    );
    assert!(files_under(&fleet.storage_dir()).is_empty());
    assert!(
        wait_until(Duration::from_secs(15), || agent_sessions(&pg, "app")
            == "0"),
        "pg_dump still connected: {}",
        agent_sessions(&pg, "app")
    );

    // The lock goes away: the next backup completes.
    drop(lock);
    let b = fleet.backup("app", None);
    assert!(b.is_completed(), "{b:?}");
}

#[test]
fn a_stalled_upload_fails_at_the_idle_timeout_and_the_next_backup_runs() {
    let pg = PgCluster::new();
    pg.create_big_db("big");
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: vec![("DATASAVER_TRANSFER_IDLE_TIMEOUT".into(), "3s".into())],
        ..Default::default()
    });
    fleet.add_agent("big", &pg, "big");
    let handle = fleet.dsctl_in_flight(&["--quiet", "backup", "big"], 1_000_000);

    // The agent freezes mid-upload: no byte moves, nothing says why.
    let agent_pid = fleet.agent("big").proc.pid();
    fleet.agent_mut("big").proc.kill(Sig::Stop);
    let t0 = Instant::now();
    let out = handle
        .join()
        .expect("dsctl thread")
        .expect_code(1, "a backup whose upload stalled");
    let took = t0.elapsed();
    let line = one_line(&out.stderr);
    assert!(
        line.contains("no data for 3s (DATASAVER_TRANSFER_IDLE_TIMEOUT)"),
        "{line}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");

    let rows = fleet.list_backups(Some("big"));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].status, "failed", "{}", rows[0].raw);
    let err = rows[0].raw["error"].as_str().unwrap_or_default();
    assert!(err.contains("DATASAVER_TRANSFER_IDLE_TIMEOUT"), "{err}");
    assert!(
        files_under(&fleet.storage_dir()).is_empty(),
        "{:?}",
        files_under(&fleet.storage_dir())
    );
    let log = fleet.coordinator().log();
    assert!(log.contains("transfer stalled"), "{log}");

    // The agent wakes up: the CancelJob waiting for it stops its pg_dump.
    fleet.agent_mut("big").proc.kill(Sig::Cont);
    assert!(
        wait_until(Duration::from_secs(20), || agent_sessions(&pg, "big")
            == "0"
            && children_named(agent_pid, "pg_dump").is_empty()),
        "pg_dump still running after the stalled job failed: {} session(s), children {:?}\n{}",
        agent_sessions(&pg, "big"),
        children_named(agent_pid, "pg_dump"),
        fleet.agent("big").proc.log()
    );

    // The slot is free: the next backup of the target completes.
    fleet.wait_agent_listed("big", Duration::from_secs(60));
    let b = fleet.backup("big", None);
    assert!(b.is_completed(), "{b:?}");
}

#[test]
fn dsctl_cancel_stops_a_running_backup_and_the_next_one_runs() {
    let pg = PgCluster::new();
    pg.create_big_db("big");
    let mut fleet = Fleet::start();
    fleet.add_agent("big", &pg, "big");

    // Nothing runs yet: one line, exit 1.
    for args in [
        vec!["cancel", "big_20990101_000000"],
        vec!["cancel", "--target", "big"],
        vec!["--json", "cancel", "--target", "big"],
    ] {
        let out = fleet
            .dsctl(&args)
            .expect_code(1, &format!("dsctl {}", args.join(" ")));
        let line = one_line(&out.stderr);
        assert!(
            line.starts_with("dsctl: ")
                && (line.contains("no running job or backup big_20990101_000000")
                    || line.contains("nothing is running for target big")),
            "{line}"
        );
        assert!(out.stdout.trim().is_empty(), "{}", out.stdout);
    }

    // By id: the id `dsctl backup` names when it starts, listed as running.
    let handle = fleet.dsctl_in_flight(&["backup", "big"], 1_000_000);
    let rows = fleet.list_backups(Some("big"));
    let running: Vec<_> = rows.iter().filter(|b| b.status == "running").collect();
    assert_eq!(running.len(), 1, "{rows:?}");
    let id = running[0].id.clone();
    let out = fleet
        .dsctl(&["cancel", &id])
        .expect_success("dsctl cancel ID");
    let line = one_line(&out.stdout);
    assert!(
        line.starts_with(&format!("cancelled backup of big (backup {id}, job job-")),
        "{line}"
    );
    let waited = handle
        .join()
        .expect("dsctl thread")
        .expect_code(1, "the cancelled dsctl backup");
    assert!(
        waited.stderr.contains(&format!("backup {id} started")),
        "{}",
        waited.describe()
    );
    assert!(
        waited.stderr.contains("cancelled by operator admin"),
        "{}",
        waited.describe()
    );
    // Recorded at once (cancel answers after the outcome is recorded).
    let b = fleet.get_backup(&id);
    assert_eq!(b.status, "failed", "{}", b.raw);
    let err = b.raw["error"].as_str().unwrap_or_default();
    assert!(err.contains("cancelled by operator admin"), "{err}");
    assert!(
        files_under(&fleet.storage_dir()).is_empty(),
        "{:?}",
        files_under(&fleet.storage_dir())
    );
    assert!(
        wait_until(Duration::from_secs(15), || agent_sessions(&pg, "big")
            == "0"),
        "pg_dump still connected after cancel: {}",
        agent_sessions(&pg, "big")
    );
    // The same id again: nothing runs any more.
    let out = fleet
        .dsctl(&["cancel", &id])
        .expect_code(1, "cancel of a finished backup");
    let line = one_line(&out.stderr);
    assert!(
        line.contains(&format!("no running job or backup {id}")),
        "{line}"
    );

    // By target, --json.
    let handle = fleet.dsctl_in_flight(&["--quiet", "backup", "big"], 1_000_000);
    let v = fleet.dsctl_json(&["cancel", "--target", "big"]);
    let jobs = v["cancelled"].as_array().cloned().unwrap_or_default();
    assert_eq!(jobs.len(), 1, "{v}");
    assert_eq!(jobs[0]["kind"], "backup", "{v}");
    assert_eq!(jobs[0]["target"], "big", "{v}");
    assert!(
        jobs[0]["job_id"]
            .as_str()
            .is_some_and(|j| j.starts_with("job-")),
        "{v}"
    );
    let second = jobs[0]["backup_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let out = handle
        .join()
        .expect("dsctl thread")
        .expect_code(1, "the dsctl backup cancelled by target");
    let line = one_line(&out.stderr);
    assert!(line.contains("cancelled by operator admin"), "{line}");
    assert_eq!(fleet.get_backup(&second).status, "failed");
    assert!(files_under(&fleet.storage_dir()).is_empty());

    // The slot is free: the next backup completes.
    let b = fleet.backup("big", None);
    assert!(b.is_completed(), "{b:?}");
    assert_eq!(fleet.list_backups(Some("big")).len(), 3);
}
