//! Child processes: long-running ones ([`Proc`], logs to a file, killed on drop) and
//! run-to-completion commands ([`run`], with a timeout).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Signals a test may send to a process it started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sig {
    Int,
    Term,
    Kill,
    Hup,
    Quit,
    Stop,
    Cont,
}

impl Sig {
    fn to_rustix(self) -> rustix::process::Signal {
        use rustix::process::Signal;
        match self {
            Sig::Int => Signal::INT,
            Sig::Term => Signal::TERM,
            Sig::Kill => Signal::KILL,
            Sig::Hup => Signal::HUP,
            Sig::Quit => Signal::QUIT,
            Sig::Stop => Signal::STOP,
            Sig::Cont => Signal::CONT,
        }
    }
}

/// Send `sig` to the process `pid` (one this test started). Errors (e.g. already reaped) are
/// returned, not panicked on.
pub fn send_signal(pid: u32, sig: Sig) -> std::io::Result<()> {
    let raw = i32::try_from(pid).map_err(|_| std::io::Error::other("pid out of range"))?;
    let pid = rustix::process::Pid::from_raw(raw).ok_or_else(|| std::io::Error::other("pid 0"))?;
    rustix::process::kill_process(pid, sig.to_rustix()).map_err(std::io::Error::from)
}

/// Directory holding the workspace's binaries (`dsctl`, `datasaver-agent`,
/// `datasaver-coordinator`): `$DATASAVER_BIN_DIR`, else the profile dir of the running test
/// binary (`<target>/<profile>/deps/e2e-…` → `<target>/<profile>`), else
/// `$CARGO_TARGET_DIR/debug`, else `<workspace>/target/debug`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DATASAVER_BIN_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(deps) = exe.parent() {
            if deps.file_name().is_some_and(|n| n == "deps") {
                if let Some(profile) = deps.parent() {
                    return profile.to_path_buf();
                }
            }
        }
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("debug");
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("debug")
}

/// Path of a workspace binary, e.g. `bin_path("dsctl")`. Panics with a hint when it has not
/// been built.
pub fn bin_path(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "binary {name:?} not found at {}: build the workspace binaries first \
         (`cargo build --bins`), or point DATASAVER_BIN_DIR at them",
        path.display()
    );
    path
}

/// The variables every child keeps from the test's environment (everything else is cleared).
const KEPT_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "TMPDIR",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "LLVM_PROFILE_FILE",
];

/// A `Command` with a cleared environment except a few basics (PATH, HOME, TMPDIR, RUST_LOG,
/// …), `LANG=C.UTF-8`, and `RUST_BACKTRACE=1` unless set. Add what the test needs with `.env`.
pub fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear();
    for key in KEPT_ENV {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin");
    }
    if std::env::var_os("RUST_BACKTRACE").is_none() {
        cmd.env("RUST_BACKTRACE", "1");
    }
    cmd.env("LANG", "C.UTF-8");
    cmd
}

/// What a finished command did.
#[derive(Clone, Debug)]
pub struct Output {
    /// Exit code; `None` when killed by a signal or timed out.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Raw stdout bytes (for binary output).
    pub stdout_bytes: Vec<u8>,
    pub timed_out: bool,
    /// The command line, for messages.
    pub cmdline: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Panics (with command line, exit code, stdout and stderr) unless the exit code was 0.
    #[track_caller]
    pub fn expect_success(self, what: &str) -> Self {
        if !self.success() {
            panic!("{what}: expected success\n{}", self.describe());
        }
        self
    }

    /// Panics unless the command exited with exactly `code`.
    #[track_caller]
    pub fn expect_code(self, code: i32, what: &str) -> Self {
        if self.code != Some(code) {
            panic!("{what}: expected exit code {code}\n{}", self.describe());
        }
        self
    }

    /// Panics unless the command ran to completion and exited non-zero.
    #[track_caller]
    pub fn expect_failure(self, what: &str) -> Self {
        if self.timed_out || self.code.is_none() || self.success() {
            panic!(
                "{what}: expected a clean failure (non-zero exit)\n{}",
                self.describe()
            );
        }
        self
    }

    /// stdout parsed as JSON; panics with the output when it is not JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_str(self.stdout.trim()) {
            Ok(v) => v,
            Err(e) => panic!("stdout is not JSON ({e})\n{}", self.describe()),
        }
    }

    /// A multi-line description for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nexit: {}{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            match self.code {
                Some(c) => c.to_string(),
                None => "none (signal)".to_string(),
            },
            if self.timed_out {
                " (TIMED OUT, killed)"
            } else {
                ""
            },
            truncate(&self.stdout, 20_000),
            truncate(&self.stderr, 20_000),
        )
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut cut = s.len() - max;
    while !s.is_char_boundary(cut) {
        cut += 1;
    }
    format!("[... {} bytes cut ...]\n{}", cut, &s[cut..])
}

/// A printable command line.
pub fn cmdline(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Run a command to completion (stdin closed), killing it after `timeout`.
pub fn run(cmd: Command, timeout: Duration) -> Output {
    run_with_input(cmd, None, timeout)
}

/// Run a command to completion, feeding `input` on stdin (from a thread, so large inputs
/// cannot deadlock), killing it after `timeout`.
pub fn run_with_input(mut cmd: Command, input: Option<&[u8]>, timeout: Duration) -> Output {
    let line = cmdline(&cmd);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("cannot start {line}: {e}"),
    };
    let stdin = child.stdin.take();
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let (out, err, timed_out, status) = std::thread::scope(|s| {
        if let (Some(mut pipe), Some(data)) = (stdin, input) {
            s.spawn(move || {
                // The child may exit without reading everything: a broken pipe is its business.
                let _ = pipe.write_all(data);
            });
        }
        let out_t = s.spawn(move || {
            let mut buf = Vec::new();
            let _ = stdout.read_to_end(&mut buf);
            buf
        });
        let err_t = s.spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf);
            buf
        });
        let (status, timed_out) = wait_timeout(&mut child, timeout);
        let out = out_t.join().unwrap_or_default();
        let err = err_t.join().unwrap_or_default();
        (out, err, timed_out, status)
    });
    Output {
        code: status.and_then(|s| s.code()),
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        stdout_bytes: out,
        timed_out,
        cmdline: line,
    }
}

/// Wait for `child` up to `timeout`; on timeout SIGKILL it and reap. Returns (status, timed_out).
fn wait_timeout(child: &mut Child, timeout: Duration) -> (Option<ExitStatus>, bool) {
    let deadline = Instant::now() + timeout;
    let mut sleep = Duration::from_millis(2);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return (Some(status), false),
            Ok(None) => {}
            Err(_) => return (None, false),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let status = child.wait().ok();
            return (status, true);
        }
        std::thread::sleep(sleep);
        sleep = (sleep * 2).min(Duration::from_millis(50));
    }
}

/// How to (re)start a long-running process.
#[derive(Clone, Debug)]
pub struct ProcSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Extra environment on top of [`clean_command`]'s basics.
    pub env: Vec<(OsString, OsString)>,
    pub current_dir: Option<PathBuf>,
}

impl ProcSpec {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        ProcSpec {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            current_dir: None,
        }
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Self {
        let k = k.into();
        self.env.retain(|(key, _)| *key != k);
        self.env.push((k, v.into()));
        self
    }

    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    /// The value this spec sets for `key`, if any.
    pub fn get_env(&self, key: &str) -> Option<&OsString> {
        self.env.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The spec as a command, to run to completion with [`run`].
    pub fn command(&self) -> Command {
        let mut cmd = clean_command(&self.program);
        cmd.args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(dir) = &self.current_dir {
            cmd.current_dir(dir);
        }
        cmd
    }
}

/// A long-running child process whose stdout+stderr go to a log file. Dropping it SIGKILLs and
/// reaps it; if the thread is panicking (a failed test) or `DATASAVER_TEST_SHOW_LOGS=1`, its
/// log is printed first.
pub struct Proc {
    name: String,
    spec: ProcSpec,
    child: Option<Child>,
    pid: u32,
    status: Option<ExitStatus>,
    log_path: PathBuf,
    /// Set by [`Proc::spawn_in_tempdir`]: keeps the log dir alive as long as the process.
    _log_dir: Option<tempfile::TempDir>,
}

impl Proc {
    /// Start `spec`, appending its output to `log_path`. Panics if it cannot be started.
    pub fn spawn(name: &str, spec: ProcSpec, log_path: impl Into<PathBuf>) -> Proc {
        let log_path = log_path.into();
        let mut p = Proc {
            name: name.to_string(),
            spec,
            child: None,
            pid: 0,
            status: None,
            log_path,
            _log_dir: None,
        };
        p.start_child();
        p
    }

    /// Start `spec` with its log in a fresh temp dir owned by the returned `Proc`.
    pub fn spawn_in_tempdir(name: &str, spec: ProcSpec) -> Proc {
        let dir = crate::short_tempdir("dslog");
        let log = dir.path().join(format!("{name}.log"));
        let mut p = Proc::spawn(name, spec, log);
        p._log_dir = Some(dir);
        p
    }

    fn start_child(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("cannot open log {}: {e}", self.log_path.display()));
        let log2 = log.try_clone().expect("clone log file handle");
        let mut cmd = self.spec.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let line = cmdline(&cmd);
        if let Ok(mut f) = OpenOptions::new().append(true).open(&self.log_path) {
            let _ = writeln!(f, "===== harness: starting {} =====", line);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {line}: {e}", self.name));
        self.pid = child.id();
        self.child = Some(child);
        self.status = None;
    }

    /// Start the same program again (after it exited or was killed), appending to the same
    /// log. Panics if it is still running.
    pub fn respawn(&mut self) {
        assert!(
            !self.is_running(),
            "{} (pid {}) is still running; kill it before respawn",
            self.name,
            self.pid
        );
        self.reap();
        self.start_child();
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn spec(&self) -> &ProcSpec {
        &self.spec
    }

    /// Change the spec used by the next [`Proc::respawn`].
    pub fn spec_mut(&mut self) -> &mut ProcSpec {
        &mut self.spec
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process (and earlier incarnations) wrote so far.
    pub fn log(&self) -> String {
        let mut buf = Vec::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Wait until the log contains `needle` (true) or `timeout` passes (false).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        crate::wait_until(timeout, || self.log().contains(needle))
    }

    /// Send a signal to the process (by its PID). Does nothing if it has already been reaped.
    pub fn kill(&mut self, sig: Sig) {
        if self.child.is_some() && self.try_exit().is_none() {
            if let Err(e) = send_signal(self.pid, sig) {
                eprintln!(
                    "harness: kill({}, {sig:?}) for {}: {e}",
                    self.pid, self.name
                );
            }
        }
    }

    /// The exit status if the process has exited (reaping it), else None.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let child = self.child.as_mut()?;
        if let Ok(Some(st)) = child.try_wait() {
            self.status = Some(st);
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_exit().is_none()
    }

    /// Wait up to `timeout` for the process to exit; its status, or None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit() {
                return Some(st);
            }
            if self.child.is_none() || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.kill(Sig::Term);
        if let Some(st) = self.wait_exit(grace) {
            return Some(st);
        }
        self.kill(Sig::Kill);
        self.wait_exit(Duration::from_secs(10))
    }

    /// Panics (printing the log) if the process has exited.
    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Some(st) = self.try_exit() {
            panic!(
                "{} (pid {}) exited unexpectedly with {st}\n--- log ---\n{}",
                self.name,
                self.pid,
                self.log()
            );
        }
    }

    fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.status.is_none() {
                let _ = child.kill();
                self.status = child.wait().ok();
            }
        }
    }

    /// Print the log to stderr (captured by the test runner, shown for failed tests).
    pub fn print_log(&self) {
        eprintln!(
            "===== log of {} (pid {}, {}) =====\n{}\n===== end of log of {} =====",
            self.name,
            self.pid,
            self.log_path.display(),
            truncate(&self.log(), 200_000),
            self.name
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() || crate::env_flag("DATASAVER_TEST_SHOW_LOGS") {
            self.print_log();
        }
        if self.child.is_some() && self.try_exit().is_none() {
            let _ = send_signal(self.pid, Sig::Kill);
        }
        self.reap();
    }
}
