//! The WAL spool of a point-in-time restore: the planned WAL files, each
//! fetched from the coordinator and checked against its BLAKE3, a bounded
//! distance ahead of the recovery that replays them, and the
//! `restore_command` that serves them to that recovery.
//!
//! The server asks for files one at a time. A planned file not fetched yet
//! is waited for (the request also marks it wanted, so it is fetched first);
//! a file the plan does not hold is "not there", which is how recovery
//! learns where the WAL ends; a planned file that cannot be fetched or
//! fails its check aborts the recovery (exit status 200) instead of ending
//! it early. Files the server has replayed are dropped, so the spool holds
//! a window of the WAL, not all of it: a restore across days of WAL needs
//! no room for days of WAL.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use datasaver_common::proto::{
    agent_service_client::AgentServiceClient, DownloadWalRequest, PhysicalRestore, PlannedWal,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::jobs::{JobCancel, JobError};
use crate::pipeline::transform::Decode;
use crate::progress::Reporter;
use crate::restore::stopped;

/// `restore_command`'s exit status for a planned file it cannot serve:
/// above 125, so the server aborts recovery instead of taking it as the end
/// of the WAL.
pub const ABORT_STATUS: u8 = 200;

/// The spool file listing every planned name, one per line.
const PLANNED: &str = "planned";
/// The spool file whose presence says the fetching failed: every waiting
/// or later request aborts the recovery.
const FAILED: &str = "failed";
/// The suffix of the marker a request leaves for a file it waits for.
const WANTED: &str = ".wanted";

/// How many WAL files are fetched at once: each is decoded, hashed and
/// written on a blocking thread, so two keep both of a small host's cores
/// busy.
const FETCH_AT_ONCE: usize = 2;
/// How far ahead of the server the spool is filled, in bytes of WAL.
const AHEAD_BYTES: u64 = 256 << 20;
/// How often the spool is looked at for requests of files not fetched.
const POLL: Duration = Duration::from_millis(50);

/// The `restore_command` serving `spool`. While `agent` (this process's
/// pid) is gone, nothing would ever arrive: a request then aborts too.
pub fn restore_command(spool: &Path, agent: Option<u32>) -> String {
    let s = spool.display();
    let alive = agent
        .map(|p| format!("[ -d /proc/{p} ] || exit {ABORT_STATUS}; "))
        .unwrap_or_default();
    format!(
        "f=%f; s='{s}'; grep -qxF \"$f\" \"$s/{PLANNED}\" || exit 1; \
         [ -f \"$s/$f\" ] || : > \"$s/$f{WANTED}\"; \
         until [ -f \"$s/$f\" ]; do [ -f \"$s/{FAILED}\" ] && exit {ABORT_STATUS}; {alive}sleep 0.05 2>/dev/null || sleep 1; done; \
         cp \"$s/$f\" '%p' || exit {ABORT_STATUS}"
    )
}

/// The name of the file a line of the server's log says it restored.
pub fn restored_name(line: &str) -> Option<&str> {
    let (_, rest) = line.split_once("restored log file \"")?;
    let (name, rest) = rest.split_once('"')?;
    rest.trim_start()
        .starts_with("from archive")
        .then_some(name)
}

/// Which planned files (by their place in the plan) to fetch and which to
/// drop, given where the server is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Files fetched ahead of the newest one the server restored.
    pub ahead: usize,
    /// Files kept behind it: the server may read the one before again.
    pub behind: usize,
}

impl Window {
    /// The window for a cluster's segment size.
    pub fn for_segment_size(seg_size: u64) -> Window {
        let ahead = (AHEAD_BYTES / seg_size.max(1)).clamp(2, 64) as usize;
        Window { ahead, behind: 2 }
    }

    /// Up to `slots` files to fetch now: the wanted ones first (the server
    /// waits for them), then the next ones after `at` (the newest the
    /// server restored; none yet: from the first), in plan order; none
    /// already held or being fetched.
    pub fn fetch(
        &self,
        len: usize,
        at: Option<usize>,
        wanted: &BTreeSet<usize>,
        held: &BTreeSet<usize>,
        busy: &BTreeSet<usize>,
        slots: usize,
    ) -> Vec<usize> {
        let from = at.map_or(0, |a| a + 1);
        wanted
            .iter()
            .copied()
            .filter(|i| *i < len)
            .chain(from..len.min(from + self.ahead))
            .filter(|i| !held.contains(i) && !busy.contains(i))
            .fold(Vec::new(), |mut out, i| {
                if out.len() < slots && !out.contains(&i) {
                    out.push(i);
                }
                out
            })
    }

    /// The held files the server is done with: more than `behind` before
    /// `at`. History files (`keep`) stay: the server reads them again when
    /// it picks its new timeline.
    pub fn drop(
        &self,
        at: Option<usize>,
        held: &BTreeSet<usize>,
        keep: impl Fn(usize) -> bool,
    ) -> Vec<usize> {
        let Some(at) = at else {
            return Vec::new();
        };
        held.iter()
            .copied()
            .filter(|i| i + self.behind < at && !keep(*i))
            .collect()
    }
}

/// Writes the list of planned names the `restore_command` serves.
pub fn write_plan(
    spool: &Path,
    wal: &[PlannedWal],
    owner: Option<(u32, u32)>,
) -> Result<(), String> {
    let mut text = String::new();
    for w in wal {
        text.push_str(&w.name);
        text.push('\n');
    }
    let path = spool.join(PLANNED);
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    give(&path, 0o644, owner)
}

/// Gives `path` its `mode` and, when the server runs as another user,
/// to that user.
pub(crate) fn give(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> Result<(), String> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    if let Some((u, g)) = owner {
        std::os::unix::fs::chown(path, Some(u), Some(g))
            .map_err(|e| format!("cannot give {} to uid {u}: {e}", path.display()))?;
    }
    Ok(())
}

/// What fetching one file needs.
#[derive(Clone)]
pub struct Fetcher {
    pub client: AgentServiceClient<Channel>,
    pub job_id: String,
    pub decode: Decode,
    pub seg_size: u64,
    pub spool: PathBuf,
    pub owner: Option<(u32, u32)>,
}

impl Fetcher {
    /// Fetches one planned WAL file, checks it, and puts it whole into the
    /// spool (a partial padded to a segment) under its name, which appears
    /// only once the file is complete.
    pub async fn fetch(&mut self, w: &PlannedWal) -> Result<(), String> {
        let mut stream = self
            .client
            .download_wal(DownloadWalRequest {
                job_id: self.job_id.clone(),
                name: w.name.clone(),
            })
            .await
            .map_err(|s| format!("WAL {}: {}", w.name, s.message()))?
            .into_inner();
        // The stored form goes to a scratch file as it arrives, not into
        // memory: two fetches at once would otherwise hold two files each.
        let scratch = self.spool.join(format!(".{}.stored", w.name));
        let mut out = tokio::fs::File::create(&scratch)
            .await
            .map_err(|e| format!("cannot write {}: {e}", scratch.display()))?;
        let seg_size = self.seg_size;
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
        let (decode, name, expect) = (self.decode.clone(), w.name.clone(), w.raw_blake3.clone());
        let part = self.spool.join(format!(".{}.part", w.name));
        let path = self.spool.join(&w.name);
        let (partial, owner) = (w.partial, self.owner);
        // A history file is a few lines, stored as it is.
        let history = w.name.ends_with(".history");
        // Decoded straight into the spool, hashed on the way: the raw
        // segment is never held in memory.
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            use std::io::Write;
            let fail = |m: String| {
                let _ = std::fs::remove_file(&part);
                m
            };
            let mut reader = decode
                .reader(std::io::BufReader::new(stored), &name)
                .map_err(|e| e.to_string())?;
            let mut file = std::fs::File::create(&part)
                .map_err(|e| format!("cannot write {}: {e}", part.display()))?;
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
                    .map_err(|e| fail(format!("cannot write {}: {e}", part.display())))?;
            }
            let got = sum.finish();
            if got.trim_start_matches("blake3:") != expect {
                return Err(fail(format!(
                    "WAL {name} does not match its checksum (stored {expect}, read {}): the stored file is damaged",
                    got.trim_start_matches("blake3:")
                )));
            }
            if !history {
                if !partial && sum.len() != seg_size {
                    return Err(fail(format!(
                        "WAL {name} holds {} bytes; a segment holds {seg_size}",
                        sum.len()
                    )));
                }
                // A partial is padded with zeros to a whole segment.
                file.set_len(seg_size)
                    .map_err(|e| fail(format!("cannot write {}: {e}", part.display())))?;
            }
            drop(file);
            give(&part, 0o644, owner).map_err(fail)?;
            std::fs::rename(&part, &path)
                .map_err(|e| fail(format!("cannot write {}: {e}", path.display())))
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// Keeps the spool filled for a recovery until `done` fires: the files the
/// server waits for first, then the window ahead of the newest one it
/// restored (`restored`, from its log), dropping those it is done with.
/// The first failure — a file that cannot be fetched or fails its check —
/// is returned after the spool has been marked failed, so the recovery's
/// next request aborts it.
pub async fn feed(
    fetcher: Fetcher,
    plan: &PhysicalRestore,
    mut restored: watch::Receiver<Option<String>>,
    reporter: &Reporter,
    done: &CancellationToken,
    cancel: &JobCancel,
) -> Result<(), JobError> {
    let fed = fill(fetcher.clone(), plan, &mut restored, reporter, done, cancel).await;
    if let Err(e) = &fed {
        let _ = std::fs::write(fetcher.spool.join(FAILED), &e.message);
    }
    fed
}

async fn fill(
    fetcher: Fetcher,
    plan: &PhysicalRestore,
    restored: &mut watch::Receiver<Option<String>>,
    reporter: &Reporter,
    done: &CancellationToken,
    cancel: &JobCancel,
) -> Result<(), JobError> {
    let spool = fetcher.spool.clone();
    let wal = &plan.wal;
    let place: HashMap<&str, usize> = wal
        .iter()
        .enumerate()
        .map(|(i, w)| (w.name.as_str(), i))
        .collect();
    let window = Window::for_segment_size(plan.segment_size);
    let (mut held, mut busy) = (BTreeSet::new(), BTreeSet::new());
    let mut running = tokio::task::JoinSet::new();
    let mut at: Option<usize> = None;
    let mut listening = true;
    loop {
        let wanted = wanted(&spool, &place, &held);
        for i in window.fetch(
            wal.len(),
            at,
            &wanted,
            &held,
            &busy,
            FETCH_AT_ONCE.saturating_sub(running.len()),
        ) {
            busy.insert(i);
            let (mut f, w) = (fetcher.clone(), wal[i].clone());
            running.spawn(async move { (i, f.fetch(&w).await) });
        }
        for i in window.drop(at, &held, |i| wal[i].name.ends_with(".history")) {
            let _ = std::fs::remove_file(spool.join(&wal[i].name));
            held.remove(&i);
        }
        tokio::select! {
            Some(joined) = running.join_next(), if !running.is_empty() => {
                let (i, fetched) = joined.map_err(|e| format!("fetching WAL failed: {e}"))?;
                busy.remove(&i);
                fetched?;
                held.insert(i);
                let _ = std::fs::remove_file(spool.join(format!("{}{WANTED}", wal[i].name)));
            }
            changed = restored.changed(), if listening => {
                if changed.is_err() {
                    listening = false;
                    continue;
                }
                let name = restored.borrow_and_update().clone();
                if let Some(i) = name.as_deref().and_then(|n| place.get(n)).copied() {
                    if at.is_none_or(|a| i > a) {
                        at = Some(i);
                        reporter.phase(
                            "recovery",
                            &format!("replaying WAL {} ({} of {})", wal[i].name, i + 1, wal.len()),
                        );
                    }
                }
            }
            _ = tokio::time::sleep(POLL) => {}
            _ = done.cancelled() => return Ok(()),
            _ = cancel.cancelled() => return Err(stopped(cancel)),
        }
    }
}

/// The planned files a request waits for (markers of held ones are
/// stale: removed).
fn wanted(spool: &Path, place: &HashMap<&str, usize>, held: &BTreeSet<usize>) -> BTreeSet<usize> {
    let mut out = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir(spool) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(wanted) = name.to_str().and_then(|n| n.strip_suffix(WANTED)) else {
            continue;
        };
        if let Some(i) = place.get(wanted).copied() {
            if held.contains(&i) {
                let _ = std::fs::remove_file(e.path());
            } else {
                out.insert(i);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(v: &[usize]) -> BTreeSet<usize> {
        v.iter().copied().collect()
    }

    #[test]
    fn the_server_log_names_each_restored_file() {
        assert_eq!(
            restored_name("2026-12-03 06:32:37.330 UTC [20241] LOG:  restored log file \"000000010000000000000026\" from archive"),
            Some("000000010000000000000026")
        );
        assert_eq!(
            restored_name("LOG:  restored log file \"00000002.history\" from archive"),
            Some("00000002.history")
        );
        assert_eq!(restored_name("LOG:  redo starts at 0/2000028"), None);
        assert_eq!(restored_name("LOG:  restored log file \"x"), None);
    }

    #[test]
    fn the_window_fetches_what_is_waited_for_first_then_ahead_in_order() {
        let w = Window {
            ahead: 3,
            behind: 2,
        };
        let none = BTreeSet::new();
        // Before the server asks: the first files.
        assert_eq!(w.fetch(10, None, &none, &none, &none, 2), vec![0, 1]);
        assert_eq!(w.fetch(10, None, &none, &set(&[0]), &set(&[1]), 2), vec![2]);
        // Nothing past the window ahead of the newest restored (4).
        assert_eq!(
            w.fetch(10, Some(4), &none, &set(&[5, 6]), &none, 2),
            vec![7]
        );
        assert!(w
            .fetch(10, Some(4), &none, &set(&[5, 6, 7]), &none, 2)
            .is_empty());
        // A file the server waits for comes first, even behind the window.
        assert_eq!(
            w.fetch(10, Some(4), &set(&[1]), &set(&[5]), &none, 2),
            vec![1, 6]
        );
        // Not past the plan, never twice.
        assert_eq!(w.fetch(3, Some(1), &set(&[2]), &none, &none, 4), vec![2]);
        assert!(w.fetch(10, None, &none, &none, &none, 0).is_empty());
    }

    #[test]
    fn the_window_drops_what_the_server_is_done_with_but_history() {
        let w = Window {
            ahead: 3,
            behind: 2,
        };
        let held = set(&[0, 1, 2, 3, 4, 5, 6]);
        assert!(w.drop(None, &held, |_| false).is_empty());
        assert_eq!(w.drop(Some(5), &held, |_| false), vec![0, 1, 2]);
        assert_eq!(w.drop(Some(5), &held, |i| i == 0), vec![1, 2]);
        assert!(w.drop(Some(2), &held, |_| false).is_empty());
    }

    #[test]
    fn the_window_is_bounded_in_bytes() {
        assert_eq!(Window::for_segment_size(16 << 20).ahead, 16);
        assert_eq!(Window::for_segment_size(1 << 30).ahead, 2);
        assert_eq!(Window::for_segment_size(1 << 20).ahead, 64);
    }

    proptest! {
        /// Following the server file by file, the spool never holds more
        /// than the window and every file is there when it is asked for
        /// at the latest (as wanted).
        #[test]
        fn the_spool_stays_bounded(len in 1usize..80, ahead in 1usize..8, slots in 1usize..4) {
            let w = Window { ahead, behind: 2 };
            let mut held = BTreeSet::new();
            let mut at = None;
            for next in 0..len {
                let mut wanted = BTreeSet::new();
                // The server asks for `next`; the feeder fetches until it has it.
                loop {
                    if !held.contains(&next) {
                        wanted.insert(next);
                    }
                    let got = w.fetch(len, at, &wanted, &held, &BTreeSet::new(), slots);
                    if got.is_empty() {
                        break;
                    }
                    held.extend(got);
                    wanted.clear();
                }
                prop_assert!(held.contains(&next));
                at = Some(next);
                for i in w.drop(at, &held, |_| false) {
                    held.remove(&i);
                }
                prop_assert!(held.len() <= w.behind + 1 + w.ahead, "{held:?}");
            }
        }
    }

    fn shell(cmd: &str, f: &str, p: &Path) -> std::process::Output {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd.replace("%f", f).replace("%p", &p.to_string_lossy()))
            .output()
            .unwrap()
    }

    #[test]
    fn the_restore_command_serves_waits_ends_or_aborts() {
        let d = tempfile::tempdir().unwrap();
        let spool = d.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        let plan = ["000000010000000000000001", "000000010000000000000002"].map(|n| PlannedWal {
            name: n.into(),
            ..Default::default()
        });
        write_plan(&spool, &plan, None).unwrap();
        let cmd = restore_command(&spool, Some(std::process::id()));
        let out = d.path().join("RECOVERYXLOG");
        // Not planned: the end of the WAL.
        let r = shell(&cmd, "000000010000000000000003", &out);
        assert_eq!(r.status.code(), Some(1), "{r:?}");
        // Planned and there: served.
        std::fs::write(spool.join("000000010000000000000001"), b"one").unwrap();
        let r = shell(&cmd, "000000010000000000000001", &out);
        assert_eq!(r.status.code(), Some(0), "{r:?}");
        assert_eq!(std::fs::read(&out).unwrap(), b"one");
        // Planned, not there yet: it waits (saying so) until it arrives.
        let waiting = {
            let (cmd, out) = (cmd.clone(), out.clone());
            std::thread::spawn(move || shell(&cmd, "000000010000000000000002", &out))
        };
        let marker = spool.join("000000010000000000000002.wanted");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !marker.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(marker.exists(), "the request marks the file wanted");
        std::fs::write(spool.join("000000010000000000000002"), b"two").unwrap();
        let r = waiting.join().unwrap();
        assert_eq!(r.status.code(), Some(0), "{r:?}");
        assert_eq!(std::fs::read(&out).unwrap(), b"two");
        // The fetching failed: a planned file aborts the recovery.
        std::fs::remove_file(spool.join("000000010000000000000002")).unwrap();
        std::fs::write(spool.join(FAILED), b"damaged").unwrap();
        let r = shell(&cmd, "000000010000000000000002", &out);
        assert_eq!(r.status.code(), Some(i32::from(ABORT_STATUS)), "{r:?}");
        // The agent gone: nothing will arrive, so it aborts too.
        std::fs::remove_file(spool.join(FAILED)).unwrap();
        let gone = std::process::Command::new("true").spawn().unwrap();
        let pid = gone.id();
        let _ = { gone }.wait();
        let r = shell(
            &restore_command(&spool, Some(pid)),
            "000000010000000000000002",
            &out,
        );
        assert_eq!(r.status.code(), Some(i32::from(ABORT_STATUS)), "{r:?}");
    }
}
