//! A datasaver fleet made of the real binaries: certificates from `dsctl certs`, one
//! `datasaver-coordinator`, any number of `datasaver-agent`s (one per target), and `dsctl`
//! runs as an operator. Names follow SPEC §13.

use crate::pg::PgCluster;
use crate::procs::{bin_path, clean_command, cmdline, run, Output, Proc, ProcSpec, Sig};
use crate::{free_port, tcp_port_open, wait_until};
use serde_json::Value;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default time allowed for one `dsctl` run (backups and restores of the fidelity db included).
pub const DSCTL_TIMEOUT: Duration = Duration::from_secs(300);
/// Time allowed for the coordinator to listen / an agent to show up in `dsctl agents`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Options for [`Fleet::start_with`].
#[derive(Clone, Debug, Default)]
pub struct FleetOptions {
    /// Extra coordinator environment (e.g. S3 settings, retention, webhook URL).
    pub coordinator_env: Vec<(String, String)>,
    /// Extra coordinator arguments.
    pub coordinator_args: Vec<String>,
    /// Extra `--san` values for `dsctl certs init` (none by default: the coordinator
    /// certificate is expected to cover localhost and 127.0.0.1 already).
    pub cert_sans: Vec<String>,
    /// Start the coordinator with `DATASAVER_TLS_CRL` naming `certs/crl.pem` (written by
    /// `dsctl certs init`, updated by `dsctl certs revoke`).
    pub tls_crl: bool,
    /// `dsctl certs init --enrollment` and the coordinator started with
    /// `DATASAVER_ENROLLMENT_CA_CERT`/`_KEY`: agents may join with tokens.
    pub enrollment: bool,
}

/// One running agent.
pub struct Agent {
    pub target: String,
    pub proc: Proc,
    /// Directory with `<target>.crt`, `<target>.key`, `ca.crt`.
    pub cert_dir: PathBuf,
}

impl Agent {
    pub fn cert(&self) -> PathBuf {
        self.cert_dir.join(format!("{}.crt", self.target))
    }

    pub fn key(&self) -> PathBuf {
        self.cert_dir.join(format!("{}.key", self.target))
    }
}

/// A backup object as printed by `dsctl --json list/get/backup` (SPEC §13).
#[derive(Clone, Debug)]
pub struct Backup {
    pub id: String,
    pub target: String,
    pub created_at: String,
    pub kind: String,
    pub status: String,
    pub raw_bytes: Option<u64>,
    pub stored_bytes: Option<u64>,
    pub checksum: Option<String>,
    pub compression: Option<String>,
    pub encrypted: bool,
    pub tags: Vec<String>,
    pub label: Option<String>,
    pub pinned: bool,
    /// The whole JSON object, for fields added later.
    pub raw: Value,
}

impl Backup {
    /// Parse one backup object; panics naming the missing field.
    #[track_caller]
    pub fn from_json(v: &Value) -> Backup {
        let s = |k: &str| -> String {
            match v.get(k).and_then(Value::as_str) {
                Some(s) => s.to_string(),
                None => panic!("backup JSON has no string field {k:?}: {v}"),
            }
        };
        let opt_s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Backup {
            id: s("id"),
            target: s("target"),
            created_at: s("created_at"),
            kind: s("kind"),
            status: s("status"),
            raw_bytes: v.get("raw_bytes").and_then(Value::as_u64),
            stored_bytes: v.get("stored_bytes").and_then(Value::as_u64),
            checksum: opt_s("checksum"),
            compression: opt_s("compression"),
            encrypted: v.get("encrypted").and_then(Value::as_bool).unwrap_or(false),
            tags: v
                .get("tags")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            label: opt_s("label"),
            pinned: v.get("pinned").and_then(Value::as_bool).unwrap_or(false),
            raw: v.clone(),
        }
    }

    pub fn is_completed(&self) -> bool {
        self.status == "completed"
    }
}

/// Certificates, one coordinator, agents, and an operator `dsctl`, all in one temp dir that
/// is removed on drop (processes are SIGKILLed first; their logs are printed if the test
/// failed).
pub struct Fleet {
    // Field order = drop order: processes go before the dir that holds their logs.
    agents: Vec<Agent>,
    coordinator: Proc,
    grpc_port: u16,
    http_port: u16,
    certs: PathBuf,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// Certificates + a coordinator with the local storage backend, ready to accept agents.
    pub fn start() -> Fleet {
        Fleet::start_with(FleetOptions::default())
    }

    pub fn start_with(opts: FleetOptions) -> Fleet {
        let dir = crate::short_tempdir("dsfleet");
        let certs = dir.path().join("certs");
        let mut cmd = clean_command(bin_path("dsctl"));
        cmd.args(["certs", "init", "--out"]).arg(&certs);
        for san in &opts.cert_sans {
            cmd.args(["--san", san]);
        }
        if opts.enrollment {
            cmd.arg("--enrollment");
        }
        run(cmd, Duration::from_secs(60)).expect_success("dsctl certs init");
        for f in [
            "ca.crt",
            "ca.key",
            "coordinator.crt",
            "coordinator.key",
            "operator.crt",
            "operator.key",
        ] {
            assert!(
                certs.join(f).is_file(),
                "dsctl certs init did not write {f} into {}",
                certs.display()
            );
        }
        let data_dir = dir.path().join("coord-data");
        std::fs::create_dir_all(&data_dir).expect("create coordinator data dir");
        let grpc_port = free_port();
        let http_port = free_port();
        let mut spec = ProcSpec::new(bin_path("datasaver-coordinator"))
            .args(opts.coordinator_args.iter().map(OsString::from))
            .env("DATASAVER_GRPC_LISTEN", format!("127.0.0.1:{grpc_port}"))
            .env("DATASAVER_HTTP_LISTEN", format!("127.0.0.1:{http_port}"))
            .env("DATASAVER_DATA_DIR", &data_dir)
            .env("DATASAVER_TLS_CA", certs.join("ca.crt"))
            .env("DATASAVER_TLS_CERT", certs.join("coordinator.crt"))
            .env("DATASAVER_TLS_KEY", certs.join("coordinator.key"))
            // Tests run agents' schedules every few seconds; the schedule
            // floor (15 minutes by default) is off unless a test sets it.
            .env("DATASAVER_MIN_SCHEDULE_INTERVAL", "0s")
            .current_dir(dir.path());
        if opts.tls_crl {
            spec = spec.env("DATASAVER_TLS_CRL", certs.join("crl.pem"));
        }
        if opts.enrollment {
            spec = spec
                .env(
                    "DATASAVER_ENROLLMENT_CA_CERT",
                    certs.join("enrollment-ca.crt"),
                )
                .env(
                    "DATASAVER_ENROLLMENT_CA_KEY",
                    certs.join("enrollment-ca.key"),
                );
        }
        for (k, v) in &opts.coordinator_env {
            spec = spec.env(k, v);
        }
        let coordinator = Proc::spawn("coordinator", spec, dir.path().join("coordinator.log"));
        let mut fleet = Fleet {
            agents: Vec::new(),
            coordinator,
            grpc_port,
            http_port,
            certs,
            dir,
        };
        fleet.wait_coordinator_ready();
        fleet
    }

    fn wait_coordinator_ready(&mut self) {
        let port = self.grpc_port;
        let coordinator = &mut self.coordinator;
        let ok = wait_until(READY_TIMEOUT, || {
            coordinator.assert_running();
            tcp_port_open(port)
        });
        assert!(ok, "coordinator did not listen on 127.0.0.1:{port} within {READY_TIMEOUT:?}\n--- log ---\n{}", self.coordinator.log());
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn certs_dir(&self) -> &Path {
        &self.certs
    }

    /// The coordinator's `DATASAVER_DATA_DIR` (catalog.db, local backups under `backups/`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("coord-data")
    }

    /// Root of the local storage backend (default `$DATA_DIR/backups`, or
    /// `DATASAVER_STORAGE_PATH` if the test set it).
    pub fn storage_dir(&self) -> PathBuf {
        match self.coordinator.spec().get_env("DATASAVER_STORAGE_PATH") {
            Some(p) => PathBuf::from(p),
            None => self.data_dir().join("backups"),
        }
    }

    pub fn grpc_port(&self) -> u16 {
        self.grpc_port
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// `https://127.0.0.1:<grpc port>`.
    pub fn coordinator_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.grpc_port)
    }

    /// `http://127.0.0.1:<http port>`.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn coordinator(&self) -> &Proc {
        &self.coordinator
    }

    pub fn coordinator_mut(&mut self) -> &mut Proc {
        &mut self.coordinator
    }

    /// A `datasaver-coordinator` command using this fleet's certificates, fresh loopback ports
    /// and `data_dir`, for tests that run a second coordinator to completion (bad settings,
    /// refused start-ups).
    pub fn coordinator_command(&self, data_dir: &Path) -> std::process::Command {
        let mut cmd = clean_command(bin_path("datasaver-coordinator"));
        cmd.env("DATASAVER_TLS_CA", self.certs.join("ca.crt"))
            .env("DATASAVER_TLS_CERT", self.certs.join("coordinator.crt"))
            .env("DATASAVER_TLS_KEY", self.certs.join("coordinator.key"))
            .env(
                "DATASAVER_GRPC_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env(
                "DATASAVER_HTTP_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env("DATASAVER_DATA_DIR", data_dir);
        cmd
    }

    /// SIGTERM the coordinator and wait for it (SIGKILL after 20 s).
    pub fn stop_coordinator(&mut self) {
        self.coordinator.stop(Duration::from_secs(20));
    }

    /// SIGKILL the coordinator (a crash).
    pub fn kill_coordinator(&mut self) {
        self.coordinator.kill(Sig::Kill);
        self.coordinator.wait_exit(Duration::from_secs(10));
    }

    /// Start the coordinator again (same ports, data dir, env) and wait until it listens.
    pub fn start_coordinator(&mut self) {
        self.coordinator.respawn();
        self.wait_coordinator_ready();
    }

    /// Stop + start.
    pub fn restart_coordinator(&mut self) {
        self.stop_coordinator();
        self.start_coordinator();
    }

    /// `dsctl certs issue --ca CERTS --agent NAME --target NAME --out OUT` (an agent
    /// named after the one target it serves); returns OUT (holding NAME.crt, NAME.key,
    /// ca.crt).
    pub fn issue_agent_cert(&self, name: &str) -> PathBuf {
        self.issue_cert("agent", "agents", name, &["--target", name])
    }

    /// `dsctl certs issue --ca CERTS --agent NAME --target T... --out OUT`.
    pub fn issue_agent_cert_for(&self, name: &str, targets: &[&str]) -> PathBuf {
        let extra: Vec<&str> = targets.iter().flat_map(|t| ["--target", t]).collect();
        self.issue_cert("agent", "agents", name, &extra)
    }

    /// `dsctl certs issue --ca CERTS --operator NAME --out OUT` (role operator, scope *);
    /// returns OUT.
    pub fn issue_operator_cert(&self, name: &str) -> PathBuf {
        self.issue_cert("operator", "operators", name, &[])
    }

    /// `dsctl certs issue --ca CERTS --operator NAME --role ROLE [--scope S]... --out OUT`.
    pub fn issue_operator_cert_with(&self, name: &str, role: &str, scopes: &[&str]) -> PathBuf {
        let mut extra = vec!["--role", role];
        extra.extend(scopes.iter().flat_map(|s| ["--scope", s]));
        self.issue_cert("operator", "operators", name, &extra)
    }

    fn issue_cert(&self, role: &str, subdir: &str, name: &str, extra: &[&str]) -> PathBuf {
        let out_dir = self.dir.path().join(subdir).join(name);
        let mut cmd = clean_command(bin_path("dsctl"));
        cmd.args(["certs", "issue", "--ca"])
            .arg(&self.certs)
            .args([&format!("--{role}"), name])
            .args(extra)
            .arg("--out")
            .arg(&out_dir);
        run(cmd, Duration::from_secs(60)).expect_success(&format!("dsctl certs issue --{role}"));
        for f in [
            format!("{name}.crt"),
            format!("{name}.key"),
            "ca.crt".to_string(),
        ] {
            assert!(
                out_dir.join(&f).is_file(),
                "dsctl certs issue did not write {f} into {}",
                out_dir.display()
            );
        }
        out_dir
    }

    /// The agent spec (env per SPEC §13) for `target` serving `db` on `pg`, using `pg`'s client
    /// bindir as `DATASAVER_PG_BIN_DIR`. Use with [`Fleet::add_agent_spec`] after tweaking.
    pub fn agent_spec(&self, target: &str, pg: &PgCluster, db: &str) -> ProcSpec {
        let cert_dir = self.dir.path().join("agents").join(target);
        if !cert_dir.join(format!("{target}.crt")).is_file() {
            self.issue_agent_cert(target);
        }
        self.agent_base(target, pg, db)
            .env("DATASAVER_COORDINATOR_URL", self.coordinator_url())
            .env("DATASAVER_TLS_CA", cert_dir.join("ca.crt"))
            .env("DATASAVER_TLS_CERT", cert_dir.join(format!("{target}.crt")))
            .env("DATASAVER_TLS_KEY", cert_dir.join(format!("{target}.key")))
            .current_dir(self.dir.path())
    }

    /// An agent spec for `target` that joins with `token` and keeps its
    /// certificate in `state_dir`: no certificate files, and the coordinator's
    /// address only in the token.
    pub fn join_agent_spec(
        &self,
        target: &str,
        pg: &PgCluster,
        db: &str,
        token: &str,
        state_dir: &Path,
    ) -> ProcSpec {
        self.agent_base(target, pg, db)
            .env("DATASAVER_JOIN_TOKEN", token)
            .env("DATASAVER_STATE_DIR", state_dir)
    }

    /// An agent for `target` serving `db` on `pg`, before its identity.
    fn agent_base(&self, target: &str, pg: &PgCluster, db: &str) -> ProcSpec {
        ProcSpec::new(bin_path("datasaver-agent"))
            .env("DATASAVER_TARGET", target)
            .env("DATASAVER_DB_HOST", pg.host())
            .env("DATASAVER_DB_PORT", pg.port().to_string())
            .env("DATASAVER_DB_NAME", db)
            .env("DATASAVER_DB_USER", pg.user())
            .env("DATASAVER_DB_PASSWORD", pg.password())
            .env("DATASAVER_PG_BIN_DIR", pg.client_bindir())
            .current_dir(self.dir.path())
    }

    /// Start an agent for `target` (database `db` on `pg`) and wait until `dsctl agents` lists
    /// it. Returns the agent.
    pub fn add_agent(&mut self, target: &str, pg: &PgCluster, db: &str) -> &mut Agent {
        let spec = self.agent_spec(target, pg, db);
        self.add_agent_spec(target, spec)
    }

    /// Like [`Fleet::add_agent`] with extra environment (e.g. `DATASAVER_COMPRESSION`).
    pub fn add_agent_with(
        &mut self,
        target: &str,
        pg: &PgCluster,
        db: &str,
        env: &[(&str, &str)],
    ) -> &mut Agent {
        let mut spec = self.agent_spec(target, pg, db);
        for (k, v) in env {
            spec = spec.env(k, v);
        }
        self.add_agent_spec(target, spec)
    }

    /// Start an agent from an explicit spec and wait until it is listed.
    pub fn add_agent_spec(&mut self, target: &str, spec: ProcSpec) -> &mut Agent {
        assert!(
            self.agents.iter().all(|a| a.target != target),
            "agent for target {target:?} already added"
        );
        self.spawn_agent_unchecked(target, spec);
        self.wait_agent_listed(target, READY_TIMEOUT);
        self.agent_mut(target)
    }

    /// Start an agent without waiting for it to connect (for tests where it must not).
    pub fn spawn_agent_unchecked(&mut self, target: &str, spec: ProcSpec) -> &mut Agent {
        let cert_dir = self.dir.path().join("agents").join(target);
        let log = self.dir.path().join(format!("agent-{target}.log"));
        let proc = Proc::spawn(&format!("agent {target}"), spec, log);
        self.agents.push(Agent {
            target: target.to_string(),
            proc,
            cert_dir,
        });
        self.agent_mut(target)
    }

    #[track_caller]
    pub fn agent(&self, target: &str) -> &Agent {
        match self.agents.iter().find(|a| a.target == target) {
            Some(a) => a,
            None => panic!("no agent for target {target:?}"),
        }
    }

    #[track_caller]
    pub fn agent_mut(&mut self, target: &str) -> &mut Agent {
        match self.agents.iter_mut().find(|a| a.target == target) {
            Some(a) => a,
            None => panic!("no agent for target {target:?}"),
        }
    }

    /// Remove (SIGKILL) the agent for `target`.
    pub fn remove_agent(&mut self, target: &str) {
        self.agents.retain(|a| a.target != target);
    }

    /// Restart the agent for `target` (SIGKILL then start again) and wait until it is listed.
    pub fn restart_agent(&mut self, target: &str) {
        let agent = self.agent_mut(target);
        agent.proc.kill(Sig::Kill);
        agent.proc.wait_exit(Duration::from_secs(10));
        agent.proc.respawn();
        self.wait_agent_listed(target, READY_TIMEOUT);
    }

    /// Whether `dsctl --json agents` mentions `target` (anywhere in its JSON output).
    pub fn agent_listed(&self, target: &str) -> bool {
        let out = self.dsctl(&["--json", "agents"]);
        if !out.success() {
            return false;
        }
        match serde_json::from_str::<Value>(out.stdout.trim()) {
            Ok(v) => json_contains_str(&v, target),
            Err(_) => false,
        }
    }

    /// Wait until `dsctl agents` lists `target`; panics with the agent's log otherwise.
    #[track_caller]
    pub fn wait_agent_listed(&mut self, target: &str, timeout: Duration) {
        let ok = wait_until(timeout, || {
            self.agent_mut(target).proc.assert_running();
            self.agent_listed(target)
        });
        if !ok {
            let last = self.dsctl(&["--json", "agents"]);
            panic!(
                "agent for {target:?} not listed by `dsctl agents` within {timeout:?}\n{}\n--- agent log ---\n{}",
                last.describe(),
                self.agent(target).proc.log()
            );
        }
    }

    /// A `dsctl` command as the fleet operator: `--coordinator URL` and the operator TLS env
    /// are set; add arguments with `.args`.
    pub fn dsctl_command(&self) -> std::process::Command {
        let mut cmd = clean_command(bin_path("dsctl"));
        cmd.env("DATASAVER_TLS_CA", self.certs.join("ca.crt"));
        cmd.env("DATASAVER_TLS_CERT", self.certs.join("operator.crt"));
        cmd.env("DATASAVER_TLS_KEY", self.certs.join("operator.key"));
        cmd.arg("--coordinator").arg(self.coordinator_url());
        cmd.current_dir(self.dir.path());
        cmd
    }

    /// Run `dsctl --coordinator URL ARGS...` as operator (timeout [`DSCTL_TIMEOUT`]).
    pub fn dsctl(&self, args: &[&str]) -> Output {
        let mut cmd = self.dsctl_command();
        cmd.args(args);
        run(cmd, DSCTL_TIMEOUT)
    }

    /// Run dsctl with extra environment and a custom timeout.
    pub fn dsctl_with(&self, args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
        let mut cmd = self.dsctl_command();
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(cmd, timeout)
    }

    /// `dsctl ARGS` as the operator whose `NAME.crt`/`NAME.key` are in `dir`
    /// (e.g. from [`Fleet::issue_operator_cert_with`]).
    pub fn dsctl_as(&self, dir: &Path, name: &str, args: &[&str]) -> Output {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        self.dsctl_with(
            args,
            &[
                ("DATASAVER_TLS_CERT", cert.to_str().expect("utf-8 path")),
                ("DATASAVER_TLS_KEY", key.to_str().expect("utf-8 path")),
            ],
            Duration::from_secs(120),
        )
    }

    /// `dsctl --json ARGS...`, expecting exit 0 and JSON on stdout.
    #[track_caller]
    pub fn dsctl_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.dsctl(&full);
        let what = format!("dsctl {}", full.join(" "));
        out.expect_success(&what).json()
    }

    /// `dsctl --json list [--target T]`.
    #[track_caller]
    pub fn list_backups(&self, target: Option<&str>) -> Vec<Backup> {
        let mut args = vec!["list"];
        if let Some(t) = target {
            args.extend(["--target", t]);
        }
        let v = self.dsctl_json(&args);
        match v.as_array() {
            Some(items) => items.iter().map(Backup::from_json).collect(),
            None => panic!("dsctl --json list did not print an array: {v}"),
        }
    }

    /// `dsctl --json get ID`.
    #[track_caller]
    pub fn get_backup(&self, id: &str) -> Backup {
        Backup::from_json(&self.dsctl_json(&["get", id]))
    }

    /// `dsctl --json backup TARGET [--label L]`, expecting success; returns the new backup.
    #[track_caller]
    pub fn backup(&self, target: &str, label: Option<&str>) -> Backup {
        let mut args = vec!["backup", target];
        if let Some(l) = label {
            args.extend(["--label", l]);
        }
        let b = Backup::from_json(&self.dsctl_json(&args));
        assert_eq!(
            b.target, target,
            "backup JSON names another target: {}",
            b.raw
        );
        b
    }

    /// `dsctl restore ID --target-db DB [extra...]`, expecting success.
    #[track_caller]
    pub fn restore(&self, id: &str, target_db: &str, extra: &[&str]) -> Output {
        let mut args = vec!["restore", id, "--target-db", target_db];
        args.extend_from_slice(extra);
        let what = format!("dsctl {}", args.join(" "));
        self.dsctl(&args).expect_success(&what)
    }

    /// Runs `dsctl ARGS...` (e.g. `backup big`) in a thread and returns once the upload it
    /// started holds at least `min_bytes` in local storage: a backup in flight, to interrupt.
    /// Panics if no upload gets there within 120 s.
    #[track_caller]
    pub fn dsctl_in_flight(
        &self,
        args: &[&str],
        min_bytes: u64,
    ) -> std::thread::JoinHandle<Output> {
        let mut cmd = self.dsctl_command();
        cmd.args(args);
        let handle = std::thread::spawn(move || run(cmd, DSCTL_TIMEOUT));
        let storage = self.storage_dir();
        let started = wait_until(Duration::from_secs(120), || {
            upload_in_progress(&storage).is_some_and(|n| n >= min_bytes)
        });
        assert!(
            started,
            "the upload never started: {:?}",
            files_under(&storage)
        );
        handle
    }

    /// `GET path` on the coordinator's HTTP port.
    pub fn http_get(&self, path: &str) -> std::io::Result<HttpResponse> {
        http_get(self.http_port, path)
    }

    /// Printable description of a dsctl command line (for messages).
    pub fn describe_dsctl(&self, args: &[&str]) -> String {
        let mut cmd = self.dsctl_command();
        cmd.args(args);
        cmdline(&cmd)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Agents first (they would otherwise log reconnect noise), then the coordinator; Proc's
        // own Drop prints logs when the test failed.
        self.agents.clear();
        if crate::keep_temp() {
            eprintln!("harness: keeping fleet dir {}", self.dir.path().display());
        }
    }
}

/// Every file under `dir`, recursively, sorted (paths as strings).
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// How far an upload into local storage under `dir` got: the bytes in its temp files
/// (`.tmp-`), or `None` while there is none.
pub fn upload_in_progress(dir: &Path) -> Option<u64> {
    let tmp: Vec<String> = files_under(dir)
        .into_iter()
        .filter(|f| f.contains(".tmp-"))
        .collect();
    if tmp.is_empty() {
        return None;
    }
    Some(
        tmp.iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .sum(),
    )
}

/// Whether a JSON value contains the string `needle` anywhere (as a string value or key).
pub fn json_contains_str(v: &Value, needle: &str) -> bool {
    match v {
        Value::String(s) => s == needle,
        Value::Array(items) => items.iter().any(|i| json_contains_str(i, needle)),
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| k == needle || json_contains_str(v, needle)),
        _ => false,
    }
}

/// A plain HTTP response.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics with the body when it is not JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        match serde_json::from_str(&self.body) {
            Ok(v) => v,
            Err(e) => panic!("HTTP body is not JSON ({e}): {}", self.body),
        }
    }
}

/// Minimal HTTP/1.1 GET to `127.0.0.1:port` (`Connection: close`; handles chunked bodies).
pub fn http_get(port: u16, path: &str) -> std::io::Result<HttpResponse> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_http_response(&raw).ok_or_else(|| {
        std::io::Error::other(format!(
            "malformed HTTP response: {:?}",
            String::from_utf8_lossy(&raw)
        ))
    })
}

fn parse_http_response(raw: &[u8]) -> Option<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Some(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_line = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_http() {
        let raw = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n";
        let r = parse_http_response(raw).expect("parse");
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "{\"a\":1}");
        assert_eq!(r.header("content-type"), Some("application/json"));
    }

    #[test]
    fn finds_strings_in_json() {
        let v: Value = serde_json::json!([{"name": "a1", "targets": ["acme-main"]}]);
        assert!(json_contains_str(&v, "acme-main"));
        assert!(!json_contains_str(&v, "acme"));
    }
}
