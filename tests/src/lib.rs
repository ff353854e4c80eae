//! End-to-end test harness for datasaver.
//!
//! Everything here starts **real** processes: PostgreSQL clusters made with `initdb` on free
//! loopback ports ([`PgCluster`]), the datasaver binaries from this workspace's target dir
//! ([`Proc`], [`Fleet`]), and checks real outcomes ([`fidelity::compare_databases`]).
//! Nothing is mocked, nothing is killed by name (only by the PIDs started here), and all
//! traffic stays on 127.0.0.1 / unix sockets.
//!
//! Environment knobs (all optional):
//! - `DATASAVER_BIN_DIR`: where `dsctl`, `datasaver-agent`, `datasaver-coordinator` are
//!   (default: the target dir of the running test binary, e.g. `target/debug`).
//! - `DATASAVER_TEST_PG_BINDIR`: PostgreSQL bindir for ordinary clusters (default: the highest
//!   `/usr/lib/postgresql/<N>/bin`, else `pg_config --bindir`).
//! - `DATASAVER_TEST_PG_NEWER_BINDIR`: bindir of a *newer* PostgreSQL major version, used by
//!   tests that need a server newer than `pg_dump` (default: what `tests/install-newer-pg.sh`
//!   installed into `/opt/datasaver-test-pg`).
//! - `DATASAVER_TEST_S3S_FS`: the s3s-fs binary for [`S3Server`] (default: what
//!   `tests/install-s3-server.sh` installed into `/opt/datasaver-test-s3`).
//! - `DATASAVER_TEST_DISALLOW_SKIP=1` (set by scripts/test.sh under CI): [`skip`] fails
//!   instead of skipping.
//! - `DATASAVER_TEST_KEEP=1`: keep temp dirs (clusters, fleets, logs) for inspection.
//! - `DATASAVER_TEST_SHOW_LOGS=1`: print process logs on drop even when the test passed.
//!
//! When the test process runs as root, `initdb`/`postgres` are run as the `postgres` user.

pub mod fidelity;
pub mod fleet;
pub mod otlp;
pub mod pg;
pub mod procs;
pub mod s3;
pub mod text;
pub mod webhook;

pub use fidelity::{
    compare_databases, compare_databases_min_rows, dump_restore, load_fidelity, FIDELITY_MIN_ROWS,
    FIDELITY_SQL,
};
pub use fleet::{
    files_under, http_get, upload_in_progress, Agent, Backup, Fleet, FleetOptions, HttpResponse,
};
pub use pg::{PgCluster, PgOptions};
pub use procs::{
    bin_dir, bin_path, clean_command, cmdline, run, run_with_input, send_signal, Output, Proc,
    ProcSpec, Sig,
};
pub use s3::S3Server;

use std::collections::HashSet;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Ports handed out by [`free_port`] in this process, never handed out twice.
static PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A currently free TCP port on 127.0.0.1, never returned twice by this process (so parallel
/// tests do not collide with each other; another process can still grab it, which callers that
/// bind late tolerate by retrying).
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let listener =
            TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
        let port = listener
            .local_addr()
            .expect("local_addr of probe listener")
            .port();
        drop(listener);
        let mut guard = PORTS.lock().unwrap_or_else(|e| e.into_inner());
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("could not find a free TCP port on 127.0.0.1");
}

/// Poll `cond` every 50 ms (or less often when it is slow) until it returns true, or until
/// `timeout`; returns whether it became true.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether something accepts TCP connections on `127.0.0.1:port`.
pub fn tcp_port_open(port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A new, short temp dir under /tmp (short so unix socket paths inside stay < 107 bytes).
/// Honors `DATASAVER_TEST_KEEP=1` (the dir is then left behind and its path printed on drop
/// by its owner).
pub fn short_tempdir(prefix: &str) -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new()
        .prefix(prefix)
        .rand_bytes(6)
        .tempdir_in("/tmp")
        .expect("create temp dir under /tmp");
    if keep_temp() {
        dir.disable_cleanup(true);
    }
    dir
}

/// `DATASAVER_TEST_KEEP` is set to something other than empty/0.
pub fn keep_temp() -> bool {
    env_flag("DATASAVER_TEST_KEEP")
}

pub(crate) fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| !v.is_empty() && v != "0")
        .unwrap_or(false)
}

/// Skip the rest of a test that lacks something it needs: prints `SKIPPED: reason` (the
/// caller then returns). Under `DATASAVER_TEST_DISALLOW_SKIP=1` (CI) it panics instead.
#[track_caller]
pub fn skip(reason: &str) {
    if env_flag("DATASAVER_TEST_DISALLOW_SKIP") {
        panic!("test cannot run and DATASAVER_TEST_DISALLOW_SKIP is set: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

/// Whether this process runs as root (then Postgres server binaries must drop to `postgres`).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// uid and gid of a local user, read from /etc/passwd.
pub fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        if f.next()? != name {
            return None;
        }
        let _pw = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        Some((uid, gid))
    })
}

/// Recursively hand a path to `uid:gid` (used to give dirs to the `postgres` user when root).
pub fn chown_recursive(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_recursive(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Quote an SQL identifier (`"a""b"`).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quote an SQL string literal (`'it''s'`), for use with `standard_conforming_strings = on`.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Last `n` lines of a text (for error messages).
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// The single non-empty line of `stderr`, checked to contain `needle`:
/// user-facing errors are one line naming what failed.
#[track_caller]
pub fn assert_one_line_error(stderr: &str, needle: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected exactly one line, got:\n{stderr}");
    assert!(
        lines[0].contains(needle),
        "the error does not mention {needle:?}: {}",
        lines[0]
    );
    lines[0].to_string()
}
