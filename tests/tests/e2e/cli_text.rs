//! dsctl in human (non-JSON) mode: every subcommand against a real fleet, its stdout (and,
//! for jobs, its plain progress lines on stderr) compared with reviewed snapshots in
//! `snapshots/`, plus what matters beyond layout. A command that only works with `--json` must
//! not ship again.
//!
//! Snapshots: `INSTA_UPDATE=always cargo test -p datasaver-tests --test e2e cli_text` rewrites
//! them; review the diff before committing. Under CI (CI=true) a mismatch fails.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use datasaver_tests::text::{without_byte_counts, Redactor};
use datasaver_tests::{
    assert_one_line_error, bin_path, clean_command, run, Fleet, FleetOptions, Output, PgCluster,
};

/// Compares `text` with the snapshot `name`; the snapshot's header names the command.
#[track_caller]
fn snap(name: &str, command: &str, text: &str) {
    let mut settings = insta::Settings::clone_current();
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    settings.set_description(command);
    settings.bind(|| insta::assert_snapshot!(name, text));
}

/// `dsctl ARGS` with no coordinator and no TLS variables (so `--help` shows no local paths).
fn dsctl_offline(args: &[&str], cwd: &Path) -> Output {
    let mut cmd = clean_command(bin_path("dsctl"));
    cmd.args(args).current_dir(cwd);
    run(cmd, Duration::from_secs(60))
}

/// The lines of `s` that are not blank.
fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// Plain progress of a job, comparable across runs: byte-count lines depend on how long the
/// job took. (A backup that can start at once is never told `queued`.)
fn job_stderr(stderr: &str) -> String {
    without_byte_counts(stderr)
        .lines()
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn cli_text_commands_without_a_coordinator() {
    let dir = datasaver_tests::short_tempdir("dscli");
    let mut r = Redactor::new();
    r.name(dir.path().display().to_string(), "[DIR]");

    let help = dsctl_offline(&["--help"], dir.path()).expect_success("dsctl --help");
    for word in [
        "--quiet",
        "--json",
        "completion",
        "backup",
        "restore",
        "health",
        "Exit status",
    ] {
        assert!(
            help.stdout.contains(word),
            "--help lacks {word}:\n{}",
            help.stdout
        );
    }
    snap("help", "dsctl --help", &help.stdout);
    // Every subcommand has a one-line description in the list.
    let listed: Vec<&str> = help
        .stdout
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert!(listed.len() >= 15, "{listed:?}");
    for l in &listed {
        let words: Vec<&str> = l.split_whitespace().collect();
        assert!(words.len() >= 3, "subcommand without a help line: {l:?}");
    }

    for (shell, marker) in [
        ("bash", "complete -F _dsctl"),
        ("zsh", "#compdef dsctl"),
        ("fish", "complete -c dsctl"),
    ] {
        let out = dsctl_offline(&["completion", shell], dir.path())
            .expect_success(&format!("dsctl completion {shell}"));
        assert!(out.stderr.is_empty(), "{}", out.describe());
        for word in [marker, "backup", "restore", "quiet", "target-db"] {
            assert!(
                out.stdout.contains(word),
                "{shell} completion lacks {word:?}"
            );
        }
        snap(
            &format!("completion_{shell}"),
            &format!("dsctl completion {shell}"),
            &out.stdout,
        );
    }
    if Path::new("/bin/bash").is_file() {
        // The bash script must at least load.
        let script = dir.path().join("dsctl.bash");
        let out = dsctl_offline(&["completion", "bash"], dir.path());
        std::fs::write(&script, &out.stdout).expect("write the completion script");
        let mut cmd = clean_command("/bin/bash");
        cmd.arg("-c")
            .arg(format!("source {} && complete -p dsctl", script.display()));
        let loaded = run(cmd, Duration::from_secs(30)).expect_success("source the bash completion");
        assert!(loaded.stdout.contains("_dsctl"), "{}", loaded.describe());
    }

    let certs = dir.path().join("certs");
    let out = dsctl_offline(
        &[
            "certs",
            "init",
            "--out",
            certs.to_str().expect("utf-8 path"),
        ],
        dir.path(),
    )
    .expect_success("dsctl certs init");
    snap(
        "certs_init",
        "dsctl certs init --out DIR/certs",
        &r.redact(&out.stdout),
    );
    for f in [
        "ca.crt",
        "ca.key",
        "coordinator.crt",
        "coordinator.key",
        "operator.crt",
        "operator.key",
    ] {
        assert!(certs.join(f).is_file(), "certs init did not write {f}");
    }
    let agent_dir = dir.path().join("agents");
    let out = dsctl_offline(
        &[
            "certs",
            "issue",
            "--ca",
            certs.to_str().expect("utf-8 path"),
            "--agent",
            "app",
            "--target",
            "app",
            "--target",
            "acme-*",
            "--out",
            agent_dir.to_str().expect("utf-8 path"),
        ],
        dir.path(),
    )
    .expect_success("dsctl certs issue --agent");
    snap(
        "certs_issue_agent",
        "dsctl certs issue --ca DIR/certs --agent app --target app --target 'acme-*' --out DIR/agents",
        &r.redact(&expiry_checked(&out.stdout, 365)),
    );
    assert!(agent_dir.join("app.crt").is_file() && agent_dir.join("app.key").is_file());
    let ops_dir = dir.path().join("ops");
    let out = dsctl_offline(
        &[
            "certs",
            "issue",
            "--ca",
            certs.to_str().expect("utf-8 path"),
            "--operator",
            "alice",
            "--role",
            "viewer",
            "--scope",
            "acme-*",
            "--days",
            "30",
            "--out",
            ops_dir.to_str().expect("utf-8 path"),
        ],
        dir.path(),
    )
    .expect_success("dsctl certs issue --operator");
    snap(
        "certs_issue_operator",
        "dsctl certs issue --ca DIR/certs --operator alice --role viewer --scope 'acme-*' --days 30 --out DIR/ops",
        &r.redact(&expiry_checked(&out.stdout, 30)),
    );
    // An agent certificate that names no target could serve nothing: refused
    // up front, not at the coordinator.
    let out = dsctl_offline(
        &[
            "certs",
            "issue",
            "--ca",
            certs.to_str().expect("utf-8 path"),
            "--agent",
            "lost",
            "--out",
            agent_dir.to_str().expect("utf-8 path"),
        ],
        dir.path(),
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_one_line_error(&out.stderr, "--target");
    assert!(!agent_dir.join("lost.crt").exists());
    assert!(ops_dir.join("alice.crt").is_file() && ops_dir.join("alice.key").is_file());

    let out = dsctl_offline(&["keygen"], dir.path()).expect_success("dsctl keygen");
    let printed = lines(&out.stdout);
    assert_eq!(printed.len(), 3, "{}", out.stdout);
    assert!(
        printed[1].starts_with("# public key: age1"),
        "{}",
        out.stdout
    );
    assert!(printed[2].starts_with("AGE-SECRET-KEY-1"), "{}", out.stdout);
    snap("keygen", "dsctl keygen", &r.redact(&out.stdout));
    let id_file = dir.path().join("identity.txt");
    let out = dsctl_offline(
        &["keygen", "--out", id_file.to_str().expect("utf-8 path")],
        dir.path(),
    )
    .expect_success("dsctl keygen --out");
    snap(
        "keygen_out",
        "dsctl keygen --out FILE",
        &r.redact(&out.stdout),
    );
    let written = std::fs::read_to_string(&id_file).expect("read the identity file");
    let recipient = out.stdout.trim();
    assert!(
        written.contains(&format!("# public key: {recipient}")),
        "stdout must be the file's recipient: {recipient} / {written}"
    );
    let mode = std::fs::metadata(&id_file)
        .expect("identity file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "identity file mode {mode:o}");
}

#[test]
fn cli_text_every_operator_command_against_a_fleet() {
    let pg = PgCluster::new();
    pg.create_small_db("app", 1000);
    pg.create_db("crm");
    // Keep only the newest, so that what cleanup does depends on pins and labels, not on the
    // date the test runs.
    let env = [
        ("DATASAVER_KEEP_LAST", "1"),
        ("DATASAVER_KEEP_DAILY", "0"),
        ("DATASAVER_KEEP_WEEKLY", "0"),
        ("DATASAVER_KEEP_MONTHLY", "0"),
    ];
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    });
    let mut r = Redactor::new();
    r.name(fleet.dir().display().to_string(), "[FLEET]");
    let ok = |args: &[&str]| -> Output {
        let out = fleet.dsctl(args);
        out.expect_success(&format!("dsctl {}", args.join(" ")))
    };

    let out = ok(&["agents"]);
    snap(
        "agents_none",
        "dsctl agents (none connected)",
        &r.redact(&out.stdout),
    );
    let out = ok(&["wal"]);
    snap("wal_none", "dsctl wal (no target streams WAL)", &out.stdout);
    fleet.add_agent("app", &pg, "app");
    fleet.add_agent("crm", &pg, "crm");
    let ok = |args: &[&str]| -> Output {
        let out = fleet.dsctl(args);
        out.expect_success(&format!("dsctl {}", args.join(" ")))
    };
    let out = ok(&["agents"]);
    let agents = lines(&out.stdout);
    assert_eq!(agents.len(), 3, "{}", out.stdout);
    assert!(agents[0].starts_with("AGENT") && agents[0].contains("TARGETS"));
    assert!(
        agents.iter().any(|l| l.starts_with("app ")),
        "{}",
        out.stdout
    );
    assert!(
        agents.iter().any(|l| l.starts_with("crm ")),
        "{}",
        out.stdout
    );
    snap("agents", "dsctl agents", &r.redact(&out.stdout));

    let out = ok(&["list"]);
    assert_eq!(out.stdout, "no backups\n");

    let out = ok(&["health"]);
    snap(
        "health_before_backups",
        "dsctl health (no backups yet)",
        &r.redact(&out.stdout),
    );
    for t in ["app", "crm"] {
        let row = out
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("{t} ")))
            .unwrap_or_else(|| panic!("health lists no {t}:\n{}", out.stdout));
        assert!(row.contains("no backup yet"), "{row}");
    }

    // backup: stdout is exactly the new id; stderr (not a terminal) has plain progress lines
    let out = ok(&["backup", "app"]);
    let a = out.stdout.trim().to_string();
    assert_eq!(out.stdout, format!("{a}\n"), "stdout must be the id alone");
    assert!(a.starts_with("app_"), "{a}");
    r.name(a.as_str(), "app_<A>");
    let progress = lines(&out.stderr);
    assert!(
        progress.contains(&format!("backup {a} started").as_str()),
        "no start line on stderr:\n{}",
        out.stderr
    );
    assert!(
        progress
            .last()
            .is_some_and(|l| l.starts_with(&format!("backup {a} completed: "))),
        "no completion line last on stderr:\n{}",
        out.stderr
    );
    snap(
        "backup_stderr",
        "dsctl backup app (stderr, not a terminal)",
        &r.redact(&job_stderr(&out.stderr)),
    );

    let out = ok(&["pin", &a]);
    snap("pin", "dsctl pin A", &r.redact(&out.stdout));

    // --quiet: the id and nothing else
    let out = ok(&["--quiet", "backup", "app", "--label", "before upgrade"]);
    let b = out.stdout.trim().to_string();
    assert_eq!(out.stdout, format!("{b}\n"));
    assert_eq!(out.stderr, "", "--quiet must print no progress");
    r.name(b.as_str(), "app_<B>");

    // --json: the object on stdout and no plain progress lines
    let out = ok(&["--json", "backup", "app"]);
    assert_eq!(out.stderr, "", "--json must print no plain progress lines");
    let c = out.json()["id"]
        .as_str()
        .expect("backup --json has an id")
        .to_string();
    r.name(c.as_str(), "app_<C>");

    let out = ok(&["list"]);
    let rows = lines(&out.stdout);
    assert_eq!(rows.len(), 4, "{}", out.stdout);
    for col in [
        "ID", "TARGET", "DATE", "SIZE", "TYPE", "STATUS", "TAGS", "PINNED", "LABEL",
    ] {
        assert!(
            rows[0].contains(col),
            "list header lacks {col}: {}",
            rows[0]
        );
    }
    let row_of = |id: &str| {
        rows.iter()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("list lacks {id}:\n{}", out.stdout))
            .to_string()
    };
    assert!(row_of(&a).contains("yes"), "A is pinned:\n{}", out.stdout);
    assert!(
        row_of(&b).ends_with("before upgrade"),
        "B's label:\n{}",
        out.stdout
    );
    snap("list", "dsctl list", &r.redact(&out.stdout));
    let by_target = ok(&["list", "--target", "app"]);
    assert_eq!(by_target.stdout, out.stdout, "all backups are app's");
    let out = ok(&["list", "--target", "crm"]);
    assert_eq!(out.stdout, "no backups\n");

    // The pg_dump (and here also server) version is the machine's.
    let pg_dump = fleet.get_backup(&b).raw["pg_dump_version"]
        .as_str()
        .expect("backup JSON has pg_dump_version")
        .to_string();
    r.name(pg_dump, "[PG]");
    let out = ok(&["get", &b]);
    assert!(out
        .stdout
        .lines()
        .any(|l| l.starts_with("label") && l.ends_with("before upgrade")));
    snap("get", "dsctl get B", &r.redact(&out.stdout));

    let out = ok(&["verify", &c]);
    assert!(out.stdout.contains(&c), "{}", out.describe());
    snap("verify", "dsctl verify C", &r.redact(&out.stdout));
    snap(
        "verify_stderr",
        "dsctl verify C (stderr, not a terminal)",
        &r.redact(&job_stderr(&out.stderr)),
    );

    let out = ok(&["restore", &c, "--target-db", "app_copy"]);
    assert!(out.stdout.contains("app_copy"), "{}", out.describe());
    assert_eq!(pg.query_one("app_copy", "SELECT count(*) FROM t"), "1000");
    snap(
        "restore",
        "dsctl restore C --target-db app_copy",
        &r.redact(&out.stdout),
    );
    snap(
        "restore_stderr",
        "dsctl restore C --target-db app_copy (stderr, not a terminal)",
        &r.redact(&job_stderr(&out.stderr)),
    );
    let before = pg.databases();
    let out = ok(&["restore", &c, "--dry-run"]);
    snap(
        "restore_dry_run",
        "dsctl restore C --dry-run",
        &r.redact(&out.stdout),
    );
    assert_eq!(pg.databases(), before, "a dry run creates no database");

    let out = ok(&["unpin", &a]);
    snap("unpin", "dsctl unpin A", &r.redact(&out.stdout));

    let out = ok(&["cleanup", "--dry-run"]);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.contains("would delete") && l.contains(&a)),
        "{}",
        out.stdout
    );
    snap(
        "cleanup_dry_run",
        "dsctl cleanup --dry-run",
        &r.redact(&out.stdout),
    );
    assert_eq!(
        fleet.list_backups(Some("app")).len(),
        3,
        "a dry run deletes nothing"
    );

    let out = ok(&["cleanup"]);
    snap("cleanup", "dsctl cleanup", &r.redact(&out.stdout));
    let left: Vec<String> = fleet
        .list_backups(Some("app"))
        .into_iter()
        .map(|x| x.id)
        .collect();
    assert!(!left.contains(&a), "cleanup kept A: {left:?}");

    let out = ok(&["delete", &b, "--yes"]);
    assert_eq!(out.stdout, format!("deleted {b}\n"));
    let left: Vec<String> = fleet
        .list_backups(Some("app"))
        .into_iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(left, vec![c.clone()]);

    let out = ok(&["catalog", "rebuild"]);
    snap(
        "catalog_rebuild",
        "dsctl catalog rebuild",
        &r.redact(&out.stdout),
    );

    let out = ok(&["health"]);
    snap("health", "dsctl health", &r.redact(&out.stdout));
    let text = lines(&out.stdout);
    let app = text
        .iter()
        .find(|l| l.starts_with("app "))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(
        app.contains("healthy") && app.contains("completed"),
        "{app}"
    );
    let crm = text
        .iter()
        .find(|l| l.starts_with("crm "))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(
        crm.contains("no backup yet") && crm.contains(" - "),
        "{crm}"
    );
    let summary = text.last().expect("a summary line");
    assert!(
        summary.starts_with("2 targets: 2 healthy, 0 degraded, 0 unhealthy; 1 backup, ")
            && summary
                .contains("; 2 agents connected; queue: 0 running, 0 waiting (limit 4); times UTC"),
        "{summary}"
    );
}

/// The coordinator is SIGKILLed while `dsctl backup` streams progress: dsctl says, in one
/// line, that the coordinator closed the connection — and nothing about certificates.
#[test]
fn cli_text_coordinator_killed_mid_backup_says_the_connection_closed() {
    let pg = PgCluster::new();
    pg.create_big_db("big");
    let mut fleet = Fleet::start();
    fleet.add_agent("big", &pg, "big");
    let handle = fleet.dsctl_in_flight(&["--quiet", "backup", "big"], 1_000_000);
    fleet.kill_coordinator();
    let out = handle
        .join()
        .expect("dsctl thread")
        .expect_code(1, "dsctl backup whose coordinator was killed");
    let err = lines(&out.stderr);
    assert_eq!(err.len(), 1, "expected one line:\n{}", out.stderr);
    let line = err[0];
    assert!(
        line.contains("closed the connection")
            && line.contains(&fleet.coordinator_url())
            && line.contains("restarting or stopped"),
        "{line}"
    );
    assert!(!line.to_lowercase().contains("certificate"), "{line}");
    assert_eq!(out.stdout, "", "no id for a backup that did not complete");
}

/// Checks the `expires YYYY-MM-DD HH:MM UTC (in N days)` line `dsctl certs issue`
/// prints (N is `days` or one less, as the clock moved on), and returns the
/// output with that line's varying part replaced for the snapshot.
fn expiry_checked(stdout: &str, days: i64) -> String {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("expires "))
        .unwrap_or_else(|| panic!("no expiry line in {stdout:?}"));
    let date = chrono::NaiveDateTime::parse_from_str(&line[8..24], "%Y-%m-%d %H:%M")
        .unwrap_or_else(|e| panic!("expiry {line:?}: {e}"))
        .and_utc();
    let left = (date - chrono::Utc::now()).num_hours();
    assert!(
        (days * 24 - 2..=days * 24).contains(&left),
        "expiry {line:?} is not {days} days away"
    );
    assert!(
        line.ends_with(&format!("(in {days} days)"))
            || line.ends_with(&format!("(in {} days)", days - 1)),
        "{line:?}"
    );
    stdout.replace(line, "expires <DATE> (in <N> days)")
}
