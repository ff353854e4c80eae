//! A point-in-time restore into a data directory (issue 14): the
//! coordinator has proven every WAL file the recovery replays is stored;
//! this writes the base backup into the directory (absent or empty; with
//! `--force` a stopped cluster's) and runs the recovery itself on a private
//! socket: a temporary postmaster that replays the WAL through
//! `walspool`'s `restore_command` — each planned file fetched and checked
//! against its BLAKE3 ahead of the server, a planned file that cannot be
//! served aborting the recovery instead of ending it early — stops at the
//! target, promotes, and is shut down cleanly. The directory is then a
//! consistent cluster on a new timeline that the user starts as usual. On
//! any failure the directory is emptied again.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use datasaver_common::proto::{
    agent_service_client::AgentServiceClient, PhysicalRestore, RestoreJob,
};
use tokio::io::AsyncBufReadExt;
use tonic::transport::Channel;

use crate::config::TargetConfig;
use crate::jobs::{JobCancel, JobError};
use crate::pg::PgTools;
use crate::pipeline::transform::Decode;
use crate::progress::{Counters, Reporter};
use crate::restore::{decode_for, stopped, stream_into};
use crate::walspool::{self, Fetcher};

/// How long recovery may run before the restore gives up on it.
const RECOVERY_LIMIT: Duration = Duration::from_secs(6 * 3600);
/// How long the restored server may take to shut down after promotion.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(600);
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
    walspool::give(dir, 0o700, owner)
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
    let mut fetcher = Fetcher {
        client: client.clone(),
        job_id: job.job_id.clone(),
        decode: decode.clone(),
        seg_size: p.segment_size,
        spool: spool.clone(),
        owner: None,
    };
    let checked = async {
        for (i, w) in p.wal.iter().enumerate() {
            if cancel.is_cancelled() {
                return Err(stopped(cancel));
            }
            reporter.phase(
                "wal",
                &format!("checking WAL {} ({} of {})", w.name, i + 1, p.wal.len()),
            );
            fetcher.fetch(w).await?;
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
    // The plan already proved every WAL file stored; the spool fetches
    // and checks each one ahead of the recovery (from the start, while the
    // base backup is written). A file that fails stops the base or aborts
    // the recovery, and the directory is emptied again.
    let _ = std::fs::remove_dir_all(spool);
    make_dir(spool, owner)?;
    make_dir(dir, owner)?;
    walspool::write_plan(spool, &p.wal, owner)?;
    let fetcher = Fetcher {
        client: client.clone(),
        job_id: job.job_id.clone(),
        decode: decode.clone(),
        seg_size: p.segment_size,
        spool: spool.to_path_buf(),
        owner,
    };
    let (restored_tx, restored_rx) = tokio::sync::watch::channel(None);
    // Stops the base and the recovery when the spool fails.
    let work_cancel = cancel.child();
    // Stops the spool when the work is over.
    let done = tokio_util::sync::CancellationToken::new();
    let fed = async {
        let r = walspool::feed(fetcher, p, restored_rx, reporter, &done, cancel).await;
        if r.is_err() {
            work_cancel.token().cancel();
        }
        r
    };
    let work = async {
        let r = async {
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
                &work_cancel,
                false,
            )
            .await?;
            std::fs::write(dir.join("recovery.signal"), b"")
                .map_err(|e| format!("cannot write recovery.signal: {e}"))?;
            if let Some((u, g)) = owner {
                let _ = std::os::unix::fs::chown(dir.join("recovery.signal"), Some(u), Some(g));
            }
            reporter.phase("recovery", "replaying the WAL on a private server");
            recover(p, dir, spool, owner, tools, &restored_tx, &work_cancel).await
        }
        .await;
        done.cancel();
        r
    };
    let (fed, recovered) = tokio::join!(fed, work);
    // A file the spool could not serve says more than the aborted recovery.
    fed?;
    let recovered = recovered?;
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
    restored: &tokio::sync::watch::Sender<Option<String>>,
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
    // Commands copied with the source's configuration are the source's
    // business, not this recovery's.
    set("recovery_end_command", "");
    set("archive_cleanup_command", "");
    set("hot_standby", "off");
    set("logging_collector", "off");
    // The log is read for where recovery stopped: in English, whatever the
    // cluster's own lc_messages.
    set("lc_messages", "C");
    // Without /proc the restore_command cannot tell the agent is gone.
    let me = std::process::id();
    let agent = Path::new(&format!("/proc/{me}")).is_dir().then_some(me);
    set("restore_command", &walspool::restore_command(spool, agent));
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
                if let Some(name) = walspool::restored_name(&l) {
                    let _ = restored.send(Some(name.to_string()));
                }
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
    }
}
