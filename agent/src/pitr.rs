//! A point-in-time restore into a data directory (issue 14): the
//! coordinator has proven every WAL file the recovery replays is stored;
//! this fetches each and checks it against its BLAKE3 while it writes the
//! base backup into the directory (absent or empty; with `--force` a
//! stopped cluster's), and only then runs the recovery itself on a private
//! socket: a temporary postmaster that replays the fetched WAL through a
//! `restore_command` serving only those files (a planned file that cannot be
//! served aborts the recovery instead of ending it early), stops at the
//! target, promotes, and is shut down cleanly. The directory is then a
//! consistent cluster on a new timeline that the user starts as usual. On
//! any failure the directory is emptied again.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use datasaver_common::proto::{
    agent_service_client::AgentServiceClient, DownloadWalRequest, PhysicalRestore, RestoreJob,
};
use tokio::io::AsyncBufReadExt;
use tonic::transport::Channel;

use crate::config::TargetConfig;
use crate::jobs::{JobCancel, JobError};
use crate::pg::PgTools;
use crate::pipeline::transform::Decode;
use crate::progress::{Counters, Reporter};
use crate::restore::{decode_for, stopped, stream_into};

/// How long recovery may run before the restore gives up on it.
const RECOVERY_LIMIT: Duration = Duration::from_secs(6 * 3600);
/// How long the restored server may take to shut down after promotion.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(600);
/// `restore_command`'s exit status for a planned file it cannot serve:
/// above 125, so the server aborts recovery instead of taking it as the end
/// of the WAL.
const ABORT_STATUS: u8 = 200;

/// What the recovery reported.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub stopped: Option<String>,
    pub last_commit: Option<String>,
    pub timeline: Option<String>,
    pub redo_done: Option<String>,
}

impl Recovered {
    /// Takes what one line of the server's log says about the recovery.
    pub fn note(&mut self, line: &str) {
        let after = |key: &str| {
            line.split_once(key)
                .map(|(_, rest)| rest.trim().trim_end_matches('.').to_string())
        };
        if let Some(r) = after("recovery stopping ") {
            self.stopped = Some(format!("recovery stopping {r}"));
        }
        if let Some(t) = after("last completed transaction was at log time ") {
            self.last_commit = Some(t);
        }
        if let Some(t) = after("selected new timeline ID: ") {
            self.timeline = Some(t);
        }
        if let Some(r) = after("redo done at ") {
            self.redo_done = Some(r.split_whitespace().next().unwrap_or_default().to_string());
        }
    }
}

/// The uid and gid the server runs as: this process's, or — as root, which
/// the server refuses — the owner of the data directory or of its parent.
fn run_as(dir: &Path) -> Result<Option<(u32, u32)>, String> {
    let me = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0);
    if me != 0 {
        return Ok(None);
    }
    let probe = if dir.exists() {
        dir.to_path_buf()
    } else {
        dir.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let m =
        std::fs::metadata(&probe).map_err(|e| format!("cannot read {}: {e}", probe.display()))?;
    if m.uid() == 0 {
        return Err(format!(
            "the agent runs as root and {} belongs to root; PostgreSQL will not run as root: give the data directory (or its parent) to the user the server runs as (chown postgres)",
            probe.display()
        ));
    }
    Ok(Some((m.uid(), m.gid())))
}

/// Checks the data directory: absolute, quotable, and absent or empty —
/// with `force`, a stopped cluster's, emptied.
fn prepare_dir(dir: &Path, force: bool) -> Result<(), String> {
    let text = dir.to_string_lossy();
    if !dir.is_absolute() || text.contains(['\'', '\n', '\r', '%']) {
        return Err(format!(
            "--data-dir {text:?} must be an absolute path without quotes, '%' or line breaks"
        ));
    }
    if !dir.exists() {
        return Ok(());
    }
    let mut entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    if entries.next().is_none() {
        return Ok(());
    }
    if !force {
        return Err(format!(
            "{} is not empty: give an absent or empty directory, or --force to replace a stopped cluster's data directory",
            dir.display()
        ));
    }
    if let Some(pid) = running_postmaster(dir) {
        return Err(format!(
            "a postmaster (pid {pid}) is running on {}; stop it before restoring over it",
            dir.display()
        ));
    }
    empty_dir(dir)
}

/// The pid in `postmaster.pid` when that process is alive.
fn running_postmaster(dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
        .ok()
        .map(|_| pid)
}

fn empty_dir(dir: &Path) -> Result<(), String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        let r = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| format!("cannot remove {}: {e}", p.display()))?;
    }
    Ok(())
}

fn make_dir(dir: &Path, owner: Option<(u32, u32)>) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot set the mode of {}: {e}", dir.display()))?;
    if let Some((u, g)) = owner {
        std::os::unix::fs::chown(dir, Some(u), Some(g))
            .map_err(|e| format!("cannot give {} to uid {u}: {e}", dir.display()))?;
    }
    Ok(())
}

/// The restore_command: serves a planned file from the spool, says "not
/// there" for anything else, and aborts recovery when a copy fails.
fn restore_command(spool: &Path) -> String {
    let s = spool.display();
    format!("if [ -f '{s}/%f' ]; then cp '{s}/%f' '%p' || exit {ABORT_STATUS}; else exit 1; fi")
}

/// Fetches one planned WAL file, checks it, and writes it whole into the
/// spool (a partial padded to a segment).
async fn fetch_wal(
    client: &mut AgentServiceClient<Channel>,
    job_id: &str,
    decode: &Decode,
    w: &datasaver_common::proto::PlannedWal,
    seg_size: u64,
    spool: &Path,
) -> Result<(), String> {
    let mut stream = client
        .download_wal(DownloadWalRequest {
            job_id: job_id.to_string(),
            name: w.name.clone(),
        })
        .await
        .map_err(|s| format!("WAL {}: {}", w.name, s.message()))?
        .into_inner();
    // The stored form goes to a scratch file as it arrives, not into
    // memory: two fetches at once would otherwise hold two files each.
    let scratch = spool.join(format!(".{}.stored", w.name));
    let mut out = tokio::fs::File::create(&scratch)
        .await
        .map_err(|e| format!("cannot write {}: {e}", scratch.display()))?;
    let mut received = 0u64;
    while let Some(c) = stream
        .message()
        .await
        .map_err(|s| format!("WAL {}: {}", w.name, s.message()))?
    {
        received += c.data.len() as u64;
        if received > seg_size * 2 + (1 << 20) {
            let _ = tokio::fs::remove_file(&scratch).await;
            return Err(format!("WAL {} is larger than any segment", w.name));
        }
        tokio::io::AsyncWriteExt::write_all(&mut out, &c.data)
            .await
            .map_err(|e| format!("cannot write {}: {e}", scratch.display()))?;
    }
    tokio::io::AsyncWriteExt::flush(&mut out)
        .await
        .map_err(|e| format!("cannot write {}: {e}", scratch.display()))?;
    drop(out);
    let stored = std::fs::File::open(&scratch)
        .map_err(|e| format!("cannot read {}: {e}", scratch.display()))?;
    // Unlinked while open: gone whatever happens next.
    let _ = std::fs::remove_file(&scratch);
    let (decode, name, expect) = (decode.clone(), w.name.clone(), w.raw_blake3.clone());
    let path = spool.join(&w.name);
    let written = path.clone();
    let partial = w.partial;
    // A history file is a few lines, stored as it is.
    let history = w.name.ends_with(".history");
    // Decoded straight into the spool file, hashed on the way: the raw
    // segment is never held in memory.
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        use std::io::Write;
        let fail = |m: String| {
            let _ = std::fs::remove_file(&path);
            m
        };
        let mut reader = decode
            .reader(std::io::BufReader::new(stored), &name)
            .map_err(|e| e.to_string())?;
        let mut file = std::fs::File::create(&path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let mut sum = datasaver_common::checksum::Checksum::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| fail(format!("WAL {name} cannot be read: {e}")))?;
            if n == 0 {
                break;
            }
            sum.update(&buf[..n]);
            if sum.len() > seg_size {
                return Err(fail(format!("WAL {name} is larger than a segment")));
            }
            file.write_all(&buf[..n])
                .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
        }
        let got = sum.finish();
        if got.trim_start_matches("blake3:") != expect {
            return Err(fail(format!(
                "WAL {name} does not match its checksum (stored {expect}, read {}): the stored file is damaged",
                got.trim_start_matches("blake3:")
            )));
        }
        if history {
            return Ok(());
        }
        if !partial && sum.len() != seg_size {
            return Err(fail(format!(
                "WAL {name} holds {} bytes; a segment holds {seg_size}",
                sum.len()
            )));
        }
        // A partial is padded with zeros to a whole segment.
        file.set_len(seg_size)
            .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())??;
    let _ = std::fs::set_permissions(&written, std::fs::Permissions::from_mode(0o644));
    Ok(())
}

/// How many WAL files are fetched at once: each is decoded, hashed and
/// written on a blocking thread, so two keep both of a small host's cores
/// busy.
const FETCH_AT_ONCE: usize = 2;

/// Fetches and checks every planned WAL file into the spool, a few at a
/// time; the first failure stops the others and is returned.
async fn fetch_all(
    client: &AgentServiceClient<Channel>,
    job: &RestoreJob,
    decode: &Decode,
    p: &PhysicalRestore,
    spool: &Path,
    reporter: &Reporter,
    cancel: &JobCancel,
) -> Result<(), JobError> {
    let mut running = tokio::task::JoinSet::new();
    let mut next = p.wal.iter();
    let mut done = 0usize;
    loop {
        while running.len() < FETCH_AT_ONCE {
            let Some(w) = next.next().cloned() else {
                break;
            };
            let (mut client, job_id, decode) = (client.clone(), job.job_id.clone(), decode.clone());
            let (seg_size, spool) = (p.segment_size, spool.to_path_buf());
            running.spawn(async move {
                fetch_wal(&mut client, &job_id, &decode, &w, seg_size, &spool).await
            });
        }
        let joined = tokio::select! {
            j = running.join_next() => j,
            _ = cancel.cancelled() => return Err(stopped(cancel)),
        };
        let Some(joined) = joined else {
            return Ok(());
        };
        joined.map_err(|e| format!("fetching WAL failed: {e}"))??;
        done += 1;
        reporter.phase(
            "wal",
            &format!("fetched and checked {done} of {} WAL files", p.wal.len()),
        );
    }
}

/// Runs a physical restore job.
pub async fn run(
    mut client: AgentServiceClient<Channel>,
    job: RestoreJob,
    target: TargetConfig,
    tools: PgTools,
    reporter: Reporter,
    cancel: JobCancel,
) -> Result<String, JobError> {
    let Some(p) = job.physical.clone() else {
        return Err("not a physical restore".to_string().into());
    };
    if job.mode == datasaver_common::proto::RestoreMode::List as i32 {
        return verify(&mut client, &job, &p, &target, &reporter, &cancel).await;
    }
    let dir = PathBuf::from(&p.data_dir);
    // Everything that can be checked is checked before anything is written.
    prepare_dir(&dir, p.force)?;
    let existed = dir.exists();
    let owner = run_as(&dir)?;
    let decode = decode_for(&job, &target)?;
    let postgres = tools.path("postgres");
    if !postgres.is_file() {
        return Err(format!(
            "{} not found: a physical restore runs the server's own binaries (set DATASAVER_PG_BIN_DIR to the bin directory of PostgreSQL {})",
            postgres.display(),
            major(&job.server_version)
        )
        .into());
    }
    let have = tools.tool_version("postgres").await?.major;
    if have.to_string() != major(&job.server_version) {
        return Err(format!(
            "the base backup is of PostgreSQL {} but {} is PostgreSQL {have}: point DATASAVER_PG_BIN_DIR at PostgreSQL {}'s binaries",
            major(&job.server_version),
            postgres.display(),
            major(&job.server_version)
        )
        .into());
    }
    let spool = PathBuf::from(format!("{}.datasaver-wal", p.data_dir));
    let result = restore(
        &mut client,
        &job,
        &p,
        &dir,
        &spool,
        owner,
        &decode,
        &tools,
        &reporter,
        &cancel,
    )
    .await;
    let _ = std::fs::remove_dir_all(&spool);
    if result.is_err() && dir.exists() {
        // Never leave a half-recovered cluster someone could start; a
        // directory this restore made goes altogether.
        let cleared = if existed {
            empty_dir(&dir)
        } else {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| format!("cannot remove {}: {e}", dir.display()))
        };
        if let Err(e) = cleared {
            tracing::error!(dir = %dir.display(), error = %e, "could not empty the data directory after a failed restore");
        }
    }
    result
}

/// `dsctl verify` of a base backup: every planned WAL file fetched and
/// checked against its BLAKE3, the base's object checked against its
/// checksum as `tar` lists it. Nothing is written but a scratch spool.
async fn verify(
    client: &mut AgentServiceClient<Channel>,
    job: &RestoreJob,
    p: &PhysicalRestore,
    target: &TargetConfig,
    reporter: &Reporter,
    cancel: &JobCancel,
) -> Result<String, JobError> {
    let decode = decode_for(job, target)?;
    let spool = std::env::temp_dir().join(format!("datasaver-verify-{}", job.job_id));
    let _ = std::fs::remove_dir_all(&spool);
    make_dir(&spool, None)?;
    let checked = async {
        for (i, w) in p.wal.iter().enumerate() {
            if cancel.is_cancelled() {
                return Err(stopped(cancel));
            }
            reporter.phase(
                "wal",
                &format!("checking WAL {} ({} of {})", w.name, i + 1, p.wal.len()),
            );
            fetch_wal(client, &job.job_id, &decode, w, p.segment_size, &spool).await?;
            // Checked; the spool need not hold more than one.
            let _ = std::fs::remove_file(spool.join(&w.name));
        }
        reporter.phase("base", &format!("checking base backup {}", job.backup_id));
        let mut tar = std::process::Command::new("tar");
        tar.args(["-t", "-f", "-"]);
        let counters = Arc::new(Counters::default());
        let listing =
            stream_into(tar, client, job, decode.clone(), counters, cancel, false).await?;
        let files = listing.lines().filter(|l| !l.trim().is_empty()).count();
        for needed in ["PG_VERSION", "global/pg_control", "backup_label"] {
            if !listing
                .lines()
                .any(|l| l.trim_start_matches("./") == needed)
            {
                return Err(format!(
                    "base backup {} has no {needed}: it is not a cluster's base backup",
                    job.backup_id
                )
                .into());
            }
        }
        Ok::<_, JobError>(files)
    }
    .await;
    let _ = std::fs::remove_dir_all(&spool);
    let files = checked?;
    Ok(format!(
        "checksum matches, {files} files in the base backup; {} WAL files from it to the end of the stored WAL each match their checksum",
        p.wal.len()
    ))
}

fn major(version: &str) -> String {
    version
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .unwrap_or_default()
        .to_string()
}

#[allow(clippy::too_many_arguments)]
async fn restore(
    client: &mut AgentServiceClient<Channel>,
    job: &RestoreJob,
    p: &PhysicalRestore,
    dir: &Path,
    spool: &Path,
    owner: Option<(u32, u32)>,
    decode: &Decode,
    tools: &PgTools,
    reporter: &Reporter,
    cancel: &JobCancel,
) -> Result<String, JobError> {
    // Every planned WAL file is fetched and checked while the base backup
    // is written (the plan already proved each one stored): a damaged one
    // stops the base and the restore before any server starts, and the
    // directory is emptied again.
    let _ = std::fs::remove_dir_all(spool);
    make_dir(spool, owner)?;
    make_dir(dir, owner)?;
    let wal_client = client.clone();
    let base_cancel = cancel.child();
    let wal = async {
        let r = fetch_all(&wal_client, job, decode, p, spool, reporter, cancel).await;
        if r.is_err() {
            base_cancel.token().cancel();
        }
        r
    };
    let base = async {
        reporter.phase(
            "base",
            &format!(
                "writing base backup {} into {}",
                job.backup_id,
                dir.display()
            ),
        );
        let mut tar = std::process::Command::new("tar");
        tar.args(["-x", "-f", "-", "-C"]).arg(dir);
        if let Some((u, g)) = owner {
            use std::os::unix::process::CommandExt;
            tar.uid(u).gid(g);
        }
        let counters = Arc::new(Counters::default());
        stream_into(
            tar,
            client,
            job,
            decode.clone(),
            counters,
            &base_cancel,
            false,
        )
        .await
    };
    let (fetched, written) = tokio::join!(wal, base);
    fetched?;
    written?;
    if let Some((u, g)) = owner {
        for e in std::fs::read_dir(spool)
            .map_err(|e| e.to_string())?
            .flatten()
        {
            let _ = std::os::unix::fs::chown(e.path(), Some(u), Some(g));
        }
    }
    std::fs::write(dir.join("recovery.signal"), b"")
        .map_err(|e| format!("cannot write recovery.signal: {e}"))?;
    if let Some((u, g)) = owner {
        let _ = std::os::unix::fs::chown(dir.join("recovery.signal"), Some(u), Some(g));
    }
    reporter.phase("recovery", "replaying the WAL on a private server");
    let recovered = recover(p, dir, spool, owner, tools, cancel).await?;
    let target = if p.immediate {
        format!("the base backup's end ({})", p.consistent_lsn)
    } else if !p.target_time.is_empty() {
        p.target_time.clone()
    } else if !p.target_lsn.is_empty() {
        p.target_lsn.clone()
    } else {
        "the end of the stored WAL".into()
    };
    Ok(format!(
        "restored base backup {} into {} to {target}: {}, last completed transaction at {}, now on timeline {}; start the server on it as usual",
        job.backup_id,
        dir.display(),
        recovered.stopped.unwrap_or_else(|| format!(
            "redo done at {}",
            recovered.redo_done.as_deref().unwrap_or("?")
        )),
        recovered.last_commit.as_deref().unwrap_or("(none replayed)"),
        recovered.timeline.as_deref().unwrap_or("?")
    ))
}

/// Runs the recovery: a postmaster on `dir` with only a socket in the
/// spool, until it has promoted; then a fast (clean) shutdown.
async fn recover(
    p: &PhysicalRestore,
    dir: &Path,
    spool: &Path,
    owner: Option<(u32, u32)>,
    tools: &PgTools,
    cancel: &JobCancel,
) -> Result<Recovered, JobError> {
    let mut cmd = tokio::process::Command::new(tools.path("postgres"));
    cmd.arg("-D").arg(dir);
    let mut set = |k: &str, v: &str| {
        cmd.arg("-c").arg(format!("{k}={v}"));
    };
    set("listen_addresses", "");
    set("unix_socket_directories", &spool.to_string_lossy());
    set("port", "5432");
    set("archive_mode", "off");
    set("hot_standby", "off");
    set("logging_collector", "off");
    set("restore_command", &restore_command(spool));
    set("recovery_target_action", "promote");
    // The timeline the plan follows (its history file is in the spool):
    // the base backup's own, or one a later switch led to.
    if p.timeline > 0 {
        set("recovery_target_timeline", &p.timeline.to_string());
    } else {
        set("recovery_target_timeline", "current");
    }
    if p.immediate {
        set("recovery_target", "immediate");
    } else if !p.target_time.is_empty() {
        set("recovery_target_time", &p.target_time);
    } else if !p.target_lsn.is_empty() {
        set("recovery_target_lsn", &p.target_lsn);
    }
    // A data directory without its configuration (Debian keeps it in
    // /etc) still starts: empty settings and a closed pg_hba from the spool.
    if !dir.join("postgresql.conf").is_file() {
        let conf = spool.join("postgresql.conf");
        std::fs::write(&conf, b"").map_err(|e| e.to_string())?;
        set("config_file", &conf.to_string_lossy());
    }
    if !dir.join("pg_hba.conf").is_file() {
        let hba = spool.join("pg_hba.conf");
        std::fs::write(&hba, b"local all all reject\n").map_err(|e| e.to_string())?;
        set("hba_file", &hba.to_string_lossy());
    }
    if !dir.join("pg_ident.conf").is_file() {
        let ident = spool.join("pg_ident.conf");
        std::fs::write(&ident, b"").map_err(|e| e.to_string())?;
        set("ident_file", &ident.to_string_lossy());
    }
    if let Some((u, g)) = owner {
        cmd.uid(u).gid(g);
        for f in ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"] {
            let _ = std::os::unix::fs::chown(spool.join(f), Some(u), Some(g));
        }
    }
    cmd.env_clear();
    for k in ["PATH", "LANG", "LC_ALL", "TZ"] {
        if let Ok(v) = std::env::var(k) {
            cmd.env(k, v);
        }
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start postgres for the recovery: {e}"))?;
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| "postgres has no stderr".to_string())?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let mut recovered = Recovered::default();
    let mut log: Vec<String> = Vec::new();
    let interrupt = || {
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGINT,
            );
        }
    };
    let deadline = tokio::time::Instant::now() + RECOVERY_LIMIT;
    // Until promoted: the server says it accepts connections only once
    // recovery has ended (hot_standby is off).
    let promoted = loop {
        let line = tokio::select! {
            l = lines.next_line() => l,
            _ = cancel.cancelled() => { interrupt(); let _ = child.wait().await; return Err(stopped(cancel)); }
            _ = tokio::time::sleep_until(deadline) => { interrupt(); let _ = child.wait().await; return Err(format!("recovery did not finish within {} h", RECOVERY_LIMIT.as_secs() / 3600).into()); }
        };
        match line {
            Ok(Some(l)) => {
                tracing::debug!(line = %l, "recovery");
                recovered.note(&l);
                let ready = l.contains("database system is ready to accept connections");
                log.push(l);
                if log.len() > 200 {
                    log.remove(0);
                }
                if ready {
                    break true;
                }
            }
            _ => break false,
        }
    };
    if !promoted {
        let status = child.wait().await.ok();
        let fatal = log
            .iter()
            .rev()
            .find(|l| l.contains("FATAL") || l.contains("PANIC"))
            .cloned()
            .unwrap_or_else(|| log.last().cloned().unwrap_or_default());
        return Err(format!(
            "recovery failed (postgres exited {}): {}; nothing was promoted and the data directory was emptied",
            status.map(|s| s.to_string()).unwrap_or_default(),
            datasaver_common::text::sanitize(&fatal, 400)
        )
        .into());
    }
    interrupt();
    let drain = async {
        while let Ok(Some(l)) = lines.next_line().await {
            recovered.note(&l);
            log.push(l);
        }
        child.wait().await
    };
    let status = tokio::time::timeout(SHUTDOWN_LIMIT, drain)
        .await
        .map_err(|_| "the restored server did not shut down".to_string())?
        .map_err(|e| e.to_string())?;
    if !status.success()
        || !log
            .iter()
            .any(|l| l.contains("database system is shut down"))
    {
        return Err(format!(
            "the restored server did not shut down cleanly ({status}): {}",
            log.last().cloned().unwrap_or_default()
        )
        .into());
    }
    Ok(recovered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recovery_log_says_where_it_stopped() {
        let mut r = Recovered::default();
        for l in [
            "2026-12-03 01:00:00 UTC [9] LOG:  redo starts at 0/2000028",
            "2026-12-03 01:00:01 UTC [9] LOG:  recovery stopping before commit of transaction 745, time 2026-12-03 00:59:58.1+00",
            "2026-12-03 01:00:01 UTC [9] LOG:  redo done at 0/3000A10 system usage: CPU: user: 0.00 s",
            "2026-12-03 01:00:01 UTC [9] LOG:  last completed transaction was at log time 2026-12-03 00:59:57.9+00",
            "2026-12-03 01:00:01 UTC [9] LOG:  selected new timeline ID: 2",
        ] {
            r.note(l);
        }
        assert_eq!(
            r,
            Recovered {
                stopped: Some("recovery stopping before commit of transaction 745, time 2026-12-03 00:59:58.1+00".into()),
                last_commit: Some("2026-12-03 00:59:57.9+00".into()),
                timeline: Some("2".into()),
                redo_done: Some("0/3000A10".into()),
            }
        );
    }

    #[test]
    fn a_data_directory_must_be_absent_empty_or_forced() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("pgdata");
        assert!(prepare_dir(&dir, false).is_ok());
        std::fs::create_dir(&dir).unwrap();
        assert!(prepare_dir(&dir, false).is_ok());
        std::fs::write(dir.join("PG_VERSION"), "15").unwrap();
        let e = prepare_dir(&dir, false).unwrap_err();
        assert!(e.contains("--force"), "{e}");
        // A postmaster.pid naming this (live) process: refused even forced.
        std::fs::write(
            dir.join("postmaster.pid"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        let e = prepare_dir(&dir, true).unwrap_err();
        assert!(e.contains("is running"), "{e}");
        std::fs::remove_file(dir.join("postmaster.pid")).unwrap();
        assert!(prepare_dir(&dir, true).is_ok());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        assert!(prepare_dir(Path::new("relative/dir"), false).is_err());
        assert!(prepare_dir(Path::new("/tmp/it's"), false).is_err());
        assert_eq!(
            restore_command(Path::new("/x/spool")),
            "if [ -f '/x/spool/%f' ]; then cp '/x/spool/%f' '%p' || exit 200; else exit 1; fi"
        );
    }
}
