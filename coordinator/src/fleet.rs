//! Live state: which agents are connected (and for which targets) and which
//! jobs are in flight. Lost connections fail their jobs here, in one place.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use datasaver_common::proto::{self, CoordinatorMessage, JobProgress, JobResult};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// Takes the lock even if a panicking thread poisoned it: the maps stay
/// consistent because every update is a single insert/remove.
macro_rules! lock {
    ($m:expr) => {
        $m.lock().unwrap_or_else(|p| p.into_inner())
    };
}

/// What an agent said (or what happened to it) about a job.
#[derive(Debug)]
pub enum Report {
    Progress(JobProgress),
    Result(JobResult),
    /// The agent's connection went away. `planned`: it said goodbye first
    /// (SIGTERM), so its jobs were interrupted rather than failed.
    Lost {
        why: String,
        planned: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Backup,
    Restore,
    List,
}

/// What a transfer request is checked against.
#[derive(Debug, Clone)]
pub struct JobRef {
    pub kind: JobKind,
    pub target: String,
    pub backup_id: String,
    /// empty for backups (the key is chosen when the upload arrives)
    pub object_key: String,
    pub agent_name: String,
}

pub struct Job {
    info: JobRef,
    conn_id: u64,
    reports: mpsc::Sender<Report>,
    cancel: CancellationToken,
    /// Why it was stopped (set before `cancel` fires).
    cancel_reason: std::sync::Arc<Mutex<Option<StopReason>>>,
    /// Its one upload, once begun (a second is refused): cancelled when
    /// that upload has ended and left nothing behind.
    upload: std::sync::Arc<Mutex<Option<CancellationToken>>>,
}

/// Why a job was asked to stop before its agent reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// An operator (or the coordinator) cancelled it, e.g. "cancelled by
    /// operator alice".
    Cancelled(String),
    /// A limit passed (a transfer moved no byte for too long); the message
    /// names the setting.
    TimedOut(String),
}

/// A job's place in the fleet: where the agent's reports arrive, and how an
/// operator (or shutdown) asks it to stop.
pub struct JobTicket {
    pub reports: mpsc::Receiver<Report>,
    pub cancel: CancellationToken,
    cancel_reason: std::sync::Arc<Mutex<Option<StopReason>>>,
    upload: std::sync::Arc<Mutex<Option<CancellationToken>>>,
}

/// A backup being exported; see [`Fleet::exporting`].
pub struct ExportGuard {
    exports: std::sync::Arc<Mutex<HashMap<String, usize>>>,
    backup_id: String,
}

impl Drop for ExportGuard {
    fn drop(&mut self) {
        let mut e = lock!(self.exports);
        if let Some(n) = e.get_mut(&self.backup_id) {
            *n -= 1;
            if *n == 0 {
                e.remove(&self.backup_id);
            }
        }
    }
}

/// A job's one upload, as its handler holds it: `stop` fires when the job is
/// stopped (cancel, deadline, idle limit), and dropping the claim tells the
/// job the upload has ended.
pub struct UploadClaim {
    pub stop: CancellationToken,
    reason: std::sync::Arc<Mutex<Option<StopReason>>>,
    _ended: tokio_util::sync::DropGuard,
}

impl UploadClaim {
    /// Why the job was stopped, once `stop` fired.
    pub fn stop_message(&self) -> String {
        (self.stop_message_fn())()
    }

    /// [`Self::stop_message`], for a stream that outlives a borrow.
    pub fn stop_message_fn(&self) -> impl Fn() -> String + Send + Sync + 'static {
        let reason = self.reason.clone();
        move || match lock!(reason).clone() {
            Some(StopReason::Cancelled(r) | StopReason::TimedOut(r)) => r,
            None => "the job was stopped".into(),
        }
    }
}

impl JobTicket {
    /// Why the job was cancelled, once `cancel` fired.
    pub fn cancel_reason(&self) -> String {
        match self.stop_reason() {
            StopReason::Cancelled(r) | StopReason::TimedOut(r) => r,
        }
    }

    /// Waits, `limit` at most, until the job's upload (if one began) has
    /// ended, so an outcome recorded afterwards leaves nothing half-written.
    pub async fn upload_ended(&self, limit: std::time::Duration) {
        let ended = lock!(self.upload).clone();
        if let Some(ended) = ended {
            let _ = tokio::time::timeout(limit, ended.cancelled()).await;
        }
    }

    /// Why the job was stopped, once `cancel` fired.
    pub fn stop_reason(&self) -> StopReason {
        lock!(self.cancel_reason)
            .clone()
            .unwrap_or_else(|| StopReason::Cancelled("cancelled".into()))
    }
}

/// Sends control messages to one agent connection.
pub type AgentTx = mpsc::Sender<Result<CoordinatorMessage, Status>>;

pub struct AgentConn {
    pub conn_id: u64,
    pub name: String,
    pub version: String,
    pub peer_addr: String,
    pub targets: Vec<proto::TargetInfo>,
    pub connected_since: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub tx: mpsc::Sender<Result<CoordinatorMessage, Status>>,
    /// The agent said goodbye: it is stopping on purpose.
    pub leaving: Option<String>,
}

#[derive(Default)]
struct Inner {
    agents: HashMap<u64, AgentConn>,
    /// target -> conn_id serving it
    targets: HashMap<String, u64>,
    jobs: HashMap<String, Job>,
    running_backups: HashSet<String>,
    /// target -> when its agent went away (for the disconnect alert)
    disconnected: HashMap<String, DateTime<Utc>>,
}

pub struct Fleet {
    inner: Mutex<Inner>,
    /// Backups an operator is exporting now (`dsctl export`), with how many
    /// exports of each: in use like a backup a job reads.
    exports: std::sync::Arc<Mutex<HashMap<String, usize>>>,
    next_id: AtomicU64,
    clock: std::sync::Arc<dyn crate::clock::Clock>,
    /// When this coordinator started: the earliest an agent can have been
    /// seen to go away.
    started: DateTime<Utc>,
}

impl Fleet {
    pub fn new(clock: std::sync::Arc<dyn crate::clock::Clock>) -> Self {
        Self {
            inner: Mutex::default(),
            exports: std::sync::Arc::default(),
            next_id: AtomicU64::new(0),
            started: clock.now(),
            clock,
        }
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds a connection; a target served by an older connection moves to
    /// the new one (an agent that restarted), and the old one's jobs fail.
    pub fn add_agent(&self, conn: AgentConn) {
        let mut lost = Vec::new();
        {
            let mut g = lock!(self.inner);
            for t in &conn.targets {
                g.disconnected.remove(&t.name);
                if let Some(old) = g.targets.insert(t.name.clone(), conn.conn_id) {
                    if old != conn.conn_id {
                        lost.push(old);
                    }
                }
            }
            g.agents.insert(conn.conn_id, conn);
        }
        for old in lost {
            self.remove_agent(old, "agent reconnected on a new connection");
        }
    }

    /// The agent on `conn_id` said it is stopping on purpose.
    pub fn mark_leaving(&self, conn_id: u64, reason: &str) {
        if let Some(a) = lock!(self.inner).agents.get_mut(&conn_id) {
            a.leaving = Some(reason.to_string());
        }
    }

    /// Why the agent on `conn_id` is leaving, if it said so.
    pub fn leaving(&self, conn_id: u64) -> Option<String> {
        lock!(self.inner)
            .agents
            .get(&conn_id)
            .and_then(|a| a.leaving.clone())
    }

    /// Removes a connection and ends every job it was running: interrupted
    /// if the agent said goodbye first, failed otherwise.
    pub fn remove_agent(&self, conn_id: u64, why: &str) {
        let mut senders = Vec::new();
        let planned;
        {
            let mut g = lock!(self.inner);
            planned = g
                .agents
                .remove(&conn_id)
                .is_some_and(|a| a.leaving.is_some());
            let gone: Vec<String> = g
                .targets
                .iter()
                .filter(|(_, c)| **c == conn_id)
                .map(|(t, _)| t.clone())
                .collect();
            let now = self.clock.now();
            for t in gone {
                g.targets.remove(&t);
                g.disconnected.insert(t, now);
            }
            for job in g.jobs.values() {
                if job.conn_id == conn_id {
                    senders.push(job.reports.clone());
                }
            }
        }
        for s in senders {
            let lost = Report::Lost {
                why: why.to_string(),
                planned,
            };
            // A channel full of unread progress must not swallow the one
            // report that ends the job: wait for room on a task.
            if let Err(mpsc::error::TrySendError::Full(lost)) = s.try_send(lost) {
                match tokio::runtime::Handle::try_current() {
                    Ok(h) => {
                        h.spawn(async move {
                            let _ = s.send(lost).await;
                        });
                    }
                    Err(_) => tracing::error!("job report lost: no runtime to deliver it"),
                }
            }
        }
    }

    pub fn touch(&self, conn_id: u64) {
        if let Some(a) = lock!(self.inner).agents.get_mut(&conn_id) {
            a.last_seen = self.clock.now();
        }
    }

    /// The connection serving `target`: (conn_id, agent name, sender).
    /// The agent that takes new jobs for `target`: connected and not
    /// leaving (one that said goodbye finishes nothing new).
    pub fn agent_for(&self, target: &str) -> Option<(u64, String, AgentTx)> {
        let g = lock!(self.inner);
        let id = g.targets.get(target)?;
        let a = g.agents.get(id)?;
        if a.leaving.is_some() {
            return None;
        }
        Some((a.conn_id, a.name.clone(), a.tx.clone()))
    }

    /// Whether an agent takes new jobs for `target` now (see `agent_for`).
    pub fn takes_jobs(&self, target: &str) -> bool {
        self.agent_for(target).is_some()
    }

    /// How many agents are connected.
    pub fn agent_count(&self) -> usize {
        lock!(self.inner).agents.len()
    }

    pub fn agents(&self) -> Vec<proto::AgentInfo> {
        let g = lock!(self.inner);
        let mut v: Vec<_> = g
            .agents
            .values()
            .map(|a| proto::AgentInfo {
                name: a.name.clone(),
                version: a.version.clone(),
                targets: a.targets.iter().map(|t| t.name.clone()).collect(),
                connected_since: a
                    .connected_since
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                last_seen: a
                    .last_seen
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                peer_addr: a.peer_addr.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Claims the per-target backup slot. Returns false if one is running.
    pub fn start_backup_slot(&self, target: &str) -> bool {
        lock!(self.inner).running_backups.insert(target.to_string())
    }

    pub fn end_backup_slot(&self, target: &str) {
        lock!(self.inner).running_backups.remove(target);
    }

    #[allow(clippy::too_many_arguments)]
    pub fn add_job(
        &self,
        job_id: &str,
        kind: JobKind,
        target: &str,
        backup_id: &str,
        object_key: &str,
        conn_id: u64,
        agent_name: &str,
    ) -> JobTicket {
        let (tx, rx) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let cancel_reason = std::sync::Arc::new(Mutex::new(None));
        let upload = std::sync::Arc::new(Mutex::new(None));
        lock!(self.inner).jobs.insert(
            job_id.to_string(),
            Job {
                info: JobRef {
                    kind,
                    target: target.to_string(),
                    backup_id: backup_id.to_string(),
                    object_key: object_key.to_string(),
                    agent_name: agent_name.to_string(),
                },
                conn_id,
                reports: tx,
                cancel: cancel.clone(),
                cancel_reason: cancel_reason.clone(),
                upload: upload.clone(),
            },
        );
        JobTicket {
            reports: rx,
            cancel,
            cancel_reason,
            upload,
        }
    }

    /// Asks job `job_id` to stop (its task tells the agent and records the
    /// outcome). False when no such job is running.
    pub fn cancel_job(&self, job_id: &str, reason: &str) -> bool {
        self.stop_job(job_id, StopReason::Cancelled(reason.to_string()))
    }

    /// Asks job `job_id` to stop for `why`; the first reason given wins.
    /// False when no such job is running.
    pub fn stop_job(&self, job_id: &str, why: StopReason) -> bool {
        let g = lock!(self.inner);
        let Some(job) = g.jobs.get(job_id) else {
            return false;
        };
        lock!(job.cancel_reason).get_or_insert(why);
        job.cancel.cancel();
        true
    }

    /// Claims job `job_id`'s one upload. None when the job is not running,
    /// was stopped, or its upload has begun already.
    pub fn claim_upload(&self, job_id: &str) -> Option<UploadClaim> {
        let g = lock!(self.inner);
        let j = g.jobs.get(job_id)?;
        if j.cancel.is_cancelled() {
            return None;
        }
        let mut upload = lock!(j.upload);
        if upload.is_some() {
            return None;
        }
        let ended = CancellationToken::new();
        *upload = Some(ended.clone());
        Some(UploadClaim {
            stop: j.cancel.clone(),
            reason: j.cancel_reason.clone(),
            _ended: ended.drop_guard(),
        })
    }

    /// Every running job, by id.
    pub fn jobs(&self) -> Vec<(String, JobRef)> {
        let mut v: Vec<_> = lock!(self.inner)
            .jobs
            .iter()
            .map(|(id, j)| (id.clone(), j.info.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The running jobs of `target`, by id.
    pub fn jobs_of(&self, target: &str) -> Vec<(String, JobRef)> {
        let mut v: Vec<_> = lock!(self.inner)
            .jobs
            .iter()
            .filter(|(_, j)| j.info.target == target)
            .map(|(id, j)| (id.clone(), j.info.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Backups a restore, verify or export is reading now: retention and
    /// deletion must keep them.
    pub fn backups_in_use(&self) -> HashSet<String> {
        let mut used: HashSet<String> = lock!(self.inner)
            .jobs
            .values()
            .filter(|j| j.info.kind != JobKind::Backup)
            .map(|j| j.info.backup_id.clone())
            .collect();
        used.extend(lock!(self.exports).keys().cloned());
        used
    }

    /// Marks `backup_id` as being exported until the guard is dropped (the
    /// export's stream ends, however it ends).
    pub fn exporting(&self, backup_id: &str) -> ExportGuard {
        *lock!(self.exports)
            .entry(backup_id.to_string())
            .or_default() += 1;
        ExportGuard {
            exports: self.exports.clone(),
            backup_id: backup_id.to_string(),
        }
    }

    /// When the agent serving `target` went away (`None`: connected, or not
    /// seen since this coordinator started).
    pub fn disconnected_since(&self, target: &str) -> Option<DateTime<Utc>> {
        lock!(self.inner).disconnected.get(target).copied()
    }

    /// Since when nobody serves `target`: `None` while an agent serves it;
    /// the coordinator's start when it has not been served since.
    pub fn unserved_since(&self, target: &str) -> Option<DateTime<Utc>> {
        if self.is_connected(target) {
            return None;
        }
        Some(self.disconnected_since(target).unwrap_or(self.started))
    }

    /// When the agent serving `target` was last heard from.
    pub fn last_seen(&self, target: &str) -> Option<DateTime<Utc>> {
        let g = lock!(self.inner);
        let id = g.targets.get(target)?;
        g.agents.get(id).map(|a| a.last_seen)
    }

    /// Whether an agent serving `target` is connected.
    /// Whether an agent serving `target` is connected (possibly leaving).
    pub fn is_connected(&self, target: &str) -> bool {
        let g = lock!(self.inner);
        g.targets
            .get(target)
            .is_some_and(|id| g.agents.contains_key(id))
    }

    pub fn remove_job(&self, job_id: &str) {
        lock!(self.inner).jobs.remove(job_id);
    }

    /// Facts about a job for checking an upload/download request.
    pub fn job(&self, job_id: &str) -> Option<JobRef> {
        lock!(self.inner).jobs.get(job_id).map(|j| j.info.clone())
    }

    /// Routes an agent's report to its job, if the job is still waiting and
    /// belongs to that connection.
    pub fn report(&self, conn_id: u64, job_id: &str, r: Report) {
        let sender = {
            let g = lock!(self.inner);
            g.jobs
                .get(job_id)
                .filter(|j| j.conn_id == conn_id)
                .map(|j| j.reports.clone())
        };
        if let Some(s) = sender {
            match r {
                // progress is advisory: never block the control stream on it
                Report::Progress(_) => {
                    let _ = s.try_send(r);
                }
                _ => {
                    tokio::spawn(async move {
                        let _ = s.send(r).await;
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use chrono::TimeZone;
    use std::sync::Arc;
    use tokio::sync::mpsc::error::TryRecvError;

    type Rx = mpsc::Receiver<Result<CoordinatorMessage, Status>>;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
    }

    fn fleet() -> (Fleet, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(t0()));
        (Fleet::new(clock.clone()), clock)
    }

    /// Connects agent `name` serving `targets` at the clock's time; the
    /// receiver is what the agent's control stream would carry.
    fn connect(f: &Fleet, clock: &ManualClock, name: &str, targets: &[&str]) -> (u64, Rx) {
        let (tx, rx) = mpsc::channel(8);
        let id = f.next_conn_id();
        let now = crate::clock::Clock::now(clock);
        f.add_agent(AgentConn {
            conn_id: id,
            name: name.to_string(),
            version: "1.2.3".into(),
            peer_addr: format!("10.0.0.{id}:4000"),
            targets: targets
                .iter()
                .map(|t| proto::TargetInfo {
                    name: t.to_string(),
                    ..Default::default()
                })
                .collect(),
            connected_since: now,
            last_seen: now,
            tx,
            leaving: None,
        });
        (id, rx)
    }

    fn lost(why: &str, planned: bool) -> String {
        format!(
            "{:?}",
            Report::Lost {
                why: why.into(),
                planned
            }
        )
    }

    /// The next report already queued for a ticket, printed (Report has no
    /// PartialEq); "empty"/"closed" when there is none.
    fn next(t: &mut JobTicket) -> String {
        match t.reports.try_recv() {
            Ok(r) => format!("{r:?}"),
            Err(TryRecvError::Empty) => "empty".into(),
            Err(TryRecvError::Disconnected) => "closed".into(),
        }
    }

    fn progress(raw: u64) -> Report {
        Report::Progress(JobProgress {
            job_id: "j".into(),
            phase: "dump".into(),
            raw_bytes: raw,
            ..Default::default()
        })
    }

    #[test]
    fn connection_ids_are_distinct_and_start_at_one() {
        let (f, _) = fleet();
        assert_eq!(
            (f.next_conn_id(), f.next_conn_id(), f.next_conn_id()),
            (1, 2, 3)
        );
    }

    #[tokio::test]
    async fn a_connected_agent_serves_its_targets() {
        let (f, clock) = fleet();
        let (b, mut b_rx) = connect(&f, &clock, "node-b", &["acme", "beta"]);
        clock.advance(chrono::Duration::minutes(5));
        let (a, _a_rx) = connect(&f, &clock, "node-a", &["gamma"]);

        let (id, name, tx) = f.agent_for("beta").unwrap();
        assert_eq!((id, name.as_str()), (b, "node-b"));
        // the sender is the one of that connection
        tx.send(Ok(CoordinatorMessage::default())).await.unwrap();
        assert!(b_rx.try_recv().is_ok());
        assert_eq!(
            f.agent_for("gamma").map(|(id, n, _)| (id, n)),
            Some((a, "node-a".into()))
        );
        assert!(f.agent_for("delta").is_none());
        assert_eq!(
            ["acme", "beta", "gamma", "delta"].map(|t| f.is_connected(t)),
            [true, true, true, false]
        );
        assert_eq!(f.agent_count(), 2);
        assert_eq!(f.disconnected_since("acme"), None);
        assert_eq!(f.leaving(b), None);

        assert_eq!(
            f.agents(),
            vec![
                proto::AgentInfo {
                    name: "node-a".into(),
                    version: "1.2.3".into(),
                    targets: vec!["gamma".into()],
                    connected_since: "2026-03-01T12:05:00Z".into(),
                    last_seen: "2026-03-01T12:05:00Z".into(),
                    peer_addr: format!("10.0.0.{a}:4000"),
                },
                proto::AgentInfo {
                    name: "node-b".into(),
                    version: "1.2.3".into(),
                    targets: vec!["acme".into(), "beta".into()],
                    connected_since: "2026-03-01T12:00:00Z".into(),
                    last_seen: "2026-03-01T12:00:00Z".into(),
                    peer_addr: format!("10.0.0.{b}:4000"),
                },
            ]
        );
    }

    #[test]
    fn touch_moves_last_seen_to_the_clocks_time() {
        let (f, clock) = fleet();
        let (id, _rx) = connect(&f, &clock, "node-a", &["acme"]);
        clock.advance(chrono::Duration::seconds(90));
        f.touch(id);
        // an unknown connection is ignored
        f.touch(id + 100);
        let a = &f.agents()[0];
        assert_eq!(
            (a.connected_since.as_str(), a.last_seen.as_str()),
            ("2026-03-01T12:00:00Z", "2026-03-01T12:01:30Z")
        );
        assert_eq!(f.agent_count(), 1);
    }

    #[test]
    fn a_lost_connection_fails_its_jobs_and_records_when() {
        let (f, clock) = fleet();
        let (a, _a_rx) = connect(&f, &clock, "node-a", &["acme", "beta"]);
        let (c, _c_rx) = connect(&f, &clock, "node-c", &["gamma"]);
        let mut backup = f.add_job("j1", JobKind::Backup, "acme", "b1", "", a, "node-a");
        let mut restore = f.add_job(
            "j2",
            JobKind::Restore,
            "beta",
            "b0",
            "beta/logical/b0.dump.zst",
            a,
            "node-a",
        );
        let mut other = f.add_job("j3", JobKind::Backup, "gamma", "b2", "", c, "node-c");
        clock.advance(chrono::Duration::minutes(7));

        f.remove_agent(a, "agent node-a disconnected (stream reset)");

        let want = lost("agent node-a disconnected (stream reset)", false);
        assert_eq!(next(&mut backup), want);
        assert_eq!(next(&mut restore), want);
        assert_eq!(next(&mut backup), "empty");
        assert_eq!(next(&mut other), "empty");
        let then = t0() + chrono::Duration::minutes(7);
        assert_eq!(f.disconnected_since("acme"), Some(then));
        assert_eq!(f.disconnected_since("beta"), Some(then));
        assert_eq!(f.disconnected_since("gamma"), None);
        assert!(!f.is_connected("acme") && !f.is_connected("beta"));
        assert!(f.is_connected("gamma"));
        assert_eq!(f.agent_count(), 1);
        assert_eq!(f.agents()[0].name, "node-c");
        // the jobs stay registered until their tasks remove them
        assert_eq!(f.job("j1").map(|j| j.target), Some("acme".to_string()));

        // the agent comes back: the target is connected again
        clock.advance(chrono::Duration::minutes(1));
        let (a2, _a2_rx) = connect(&f, &clock, "node-a", &["acme"]);
        assert_eq!(f.agent_for("acme").map(|(id, ..)| id), Some(a2));
        assert_eq!(f.disconnected_since("acme"), None);
        assert_eq!(f.disconnected_since("beta"), Some(then));
    }

    #[test]
    fn an_agent_that_said_goodbye_interrupts_its_jobs() {
        let (f, clock) = fleet();
        let (a, _rx) = connect(&f, &clock, "node-a", &["acme"]);
        let mut job = f.add_job("j1", JobKind::Backup, "acme", "b1", "", a, "node-a");
        f.mark_leaving(a, "SIGTERM");
        // marking an unknown connection does nothing
        f.mark_leaving(a + 1, "nope");
        assert_eq!(f.leaving(a).as_deref(), Some("SIGTERM"));
        assert_eq!(f.leaving(a + 1), None);
        // connected until the stream ends, but given nothing new
        assert!(f.is_connected("acme"));
        assert!(!f.takes_jobs("acme") && f.agent_for("acme").is_none());
        assert_eq!(next(&mut job), "empty");

        f.remove_agent(a, "agent node-a stopped");
        assert_eq!(next(&mut job), lost("agent node-a stopped", true));
        assert_eq!(f.leaving(a), None);
        assert_eq!(f.disconnected_since("acme"), Some(t0()));
    }

    #[test]
    fn a_new_connection_takes_over_a_target() {
        let (f, clock) = fleet();
        let (old, _old_rx) = connect(&f, &clock, "node-a", &["acme"]);
        let mut old_job = f.add_job("j1", JobKind::Backup, "acme", "b1", "", old, "node-a");
        clock.advance(chrono::Duration::seconds(20));
        let (new, _new_rx) = connect(&f, &clock, "node-a", &["acme"]);
        assert_ne!(old, new);

        assert_eq!(f.agent_for("acme").map(|(id, ..)| id), Some(new));
        assert_eq!(
            next(&mut old_job),
            lost("agent reconnected on a new connection", false)
        );
        assert_eq!(f.agent_count(), 1);
        assert_eq!(f.agents()[0].connected_since, "2026-03-01T12:00:20Z");
        // taken over, never disconnected
        assert_eq!(f.disconnected_since("acme"), None);

        // the old stream ending later leaves the new connection alone
        let mut new_job = f.add_job("j2", JobKind::Backup, "acme", "b2", "", new, "node-a");
        f.remove_agent(old, "agent node-a disconnected (old stream)");
        assert_eq!(f.agent_for("acme").map(|(id, ..)| id), Some(new));
        assert_eq!(f.disconnected_since("acme"), None);
        assert_eq!(next(&mut new_job), "empty");
    }

    #[test]
    fn one_backup_slot_per_target() {
        let (f, _) = fleet();
        assert!(f.start_backup_slot("acme"));
        assert!(!f.start_backup_slot("acme"));
        assert!(f.start_backup_slot("beta"));
        f.end_backup_slot("acme");
        assert!(f.start_backup_slot("acme"));
        assert!(!f.start_backup_slot("beta"));
        // ending a slot that is not held is harmless
        f.end_backup_slot("gamma");
        assert!(f.start_backup_slot("gamma"));
    }

    #[tokio::test]
    async fn reports_reach_the_job_only_from_its_connection() {
        let (f, clock) = fleet();
        let (a, _a_rx) = connect(&f, &clock, "node-a", &["acme"]);
        let (b, _b_rx) = connect(&f, &clock, "node-b", &["beta"]);
        let mut job = f.add_job("j1", JobKind::Backup, "acme", "b1", "", a, "node-a");

        f.report(a, "j1", progress(10));
        match job.reports.try_recv() {
            Ok(Report::Progress(p)) => assert_eq!((p.phase.as_str(), p.raw_bytes), ("dump", 10)),
            other => panic!("expected progress, got {other:?}"),
        }
        // another connection, an unknown job: dropped
        f.report(b, "j1", progress(11));
        f.report(a, "j9", progress(12));
        assert_eq!(next(&mut job), "empty");

        f.report(
            b,
            "j1",
            Report::Result(JobResult {
                job_id: "j1".into(),
                ok: false,
                error: "forged".into(),
                ..Default::default()
            }),
        );
        f.report(
            a,
            "j1",
            Report::Result(JobResult {
                job_id: "j1".into(),
                ok: true,
                message: "done".into(),
                ..Default::default()
            }),
        );
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), job.reports.recv())
            .await
            .expect("the result arrives");
        match r {
            Some(Report::Result(r)) => {
                assert_eq!(
                    (r.job_id.as_str(), r.ok, r.message.as_str()),
                    ("j1", true, "done")
                )
            }
            other => panic!("expected the result, got {other:?}"),
        }
        // the forged result never arrives
        let r =
            tokio::time::timeout(std::time::Duration::from_millis(200), job.reports.recv()).await;
        assert!(r.is_err(), "unexpected report {r:?}");

        // once removed, the job hears nothing more and its channel closes
        f.remove_job("j1");
        f.report(a, "j1", progress(13));
        assert_eq!(next(&mut job), "closed");
    }

    #[test]
    fn job_facts_and_a_targets_jobs() {
        let (f, _) = fleet();
        let _j3 = f.add_job(
            "j3",
            JobKind::List,
            "acme",
            "b7",
            "acme/logical/b7.dump",
            1,
            "node-a",
        );
        let _j1 = f.add_job("j1", JobKind::Backup, "acme", "b9", "", 1, "node-a");
        let _j2 = f.add_job(
            "j2",
            JobKind::Restore,
            "beta",
            "b8",
            "beta/logical/b8.dump.zst",
            2,
            "node-b",
        );

        let j = f.job("j2").unwrap();
        assert_eq!(
            (
                j.kind,
                j.target.as_str(),
                j.backup_id.as_str(),
                j.object_key.as_str(),
                j.agent_name.as_str()
            ),
            (
                JobKind::Restore,
                "beta",
                "b8",
                "beta/logical/b8.dump.zst",
                "node-b"
            )
        );
        assert!(f.job("j4").is_none());

        let ids = |v: Vec<(String, JobRef)>| {
            v.into_iter()
                .map(|(id, j)| (id, j.kind, j.backup_id))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids(f.jobs_of("acme")),
            vec![
                ("j1".to_string(), JobKind::Backup, "b9".to_string()),
                ("j3".to_string(), JobKind::List, "b7".to_string()),
            ]
        );
        assert_eq!(
            ids(f.jobs_of("beta")),
            vec![("j2".to_string(), JobKind::Restore, "b8".to_string())]
        );
        assert!(f.jobs_of("gamma").is_empty());

        f.remove_job("j1");
        assert!(f.job("j1").is_none());
        assert_eq!(
            ids(f.jobs_of("acme")),
            vec![("j3".to_string(), JobKind::List, "b7".to_string())]
        );
        // removing twice, or an unknown id, is harmless
        f.remove_job("j1");
        f.remove_job("nope");
        assert_eq!(f.jobs_of("beta").len(), 1);
    }

    #[test]
    fn backups_being_read_are_in_use_but_backups_being_written_are_not() {
        let (f, _) = fleet();
        let _w = f.add_job("j1", JobKind::Backup, "acme", "b-new", "", 1, "node-a");
        let _r = f.add_job("j2", JobKind::Restore, "acme", "b-old", "k1", 1, "node-a");
        let _l = f.add_job("j3", JobKind::List, "beta", "b-beta", "k2", 2, "node-b");
        let _r2 = f.add_job("j4", JobKind::Restore, "acme", "b-old", "k1", 1, "node-a");
        assert_eq!(
            f.backups_in_use(),
            HashSet::from(["b-old".to_string(), "b-beta".to_string()])
        );
        f.remove_job("j2");
        // still read by j4
        assert_eq!(
            f.backups_in_use(),
            HashSet::from(["b-old".to_string(), "b-beta".to_string()])
        );
        f.remove_job("j4");
        f.remove_job("j3");
        assert!(f.backups_in_use().is_empty());
        // an export holds its backup until its stream is dropped
        let one = f.exporting("b-exp");
        let two = f.exporting("b-exp");
        assert_eq!(f.backups_in_use(), HashSet::from(["b-exp".to_string()]));
        drop(one);
        assert_eq!(f.backups_in_use(), HashSet::from(["b-exp".to_string()]));
        drop(two);
        assert!(f.backups_in_use().is_empty());
    }

    #[test]
    fn cancel_keeps_the_first_reason() {
        let (f, _) = fleet();
        let j1 = f.add_job("j1", JobKind::Backup, "acme", "b1", "", 1, "node-a");
        let j2 = f.add_job("j2", JobKind::Restore, "acme", "b0", "k", 1, "node-a");
        assert!(!j1.cancel.is_cancelled());
        assert_eq!(j1.cancel_reason(), "cancelled");

        assert!(f.cancel_job("j1", "cancelled by alice"));
        assert!(j1.cancel.is_cancelled());
        assert_eq!(j1.cancel_reason(), "cancelled by alice");
        assert!(f.cancel_job("j1", "the coordinator is shutting down"));
        assert_eq!(j1.cancel_reason(), "cancelled by alice");
        // the other job is untouched
        assert!(!j2.cancel.is_cancelled());
        assert_eq!(j2.cancel_reason(), "cancelled");

        assert!(!f.cancel_job("j9", "nope"));
        f.remove_job("j2");
        assert!(!f.cancel_job("j2", "too late"));
        assert!(!j2.cancel.is_cancelled());
    }

    #[test]
    fn a_timed_out_job_says_so() {
        let (f, _) = fleet();
        let j = f.add_job("j1", JobKind::Backup, "acme", "b1", "", 1, "node-a");
        assert_eq!(
            j.stop_reason(),
            StopReason::Cancelled("cancelled".into()),
            "before any stop"
        );
        assert!(f.stop_job("j1", StopReason::TimedOut("no data for 5m".into())));
        assert!(f.cancel_job("j1", "cancelled by operator alice"));
        assert!(j.cancel.is_cancelled());
        assert_eq!(
            j.stop_reason(),
            StopReason::TimedOut("no data for 5m".into())
        );
        assert_eq!(j.cancel_reason(), "no data for 5m");
    }

    #[tokio::test]
    async fn one_upload_per_job_stopped_with_its_job() {
        let (f, _) = fleet();
        let j = f.add_job("j1", JobKind::Backup, "acme", "b1", "", 1, "node-a");
        let _k = f.add_job("j2", JobKind::Backup, "beta", "b2", "", 1, "node-a");
        let _m = f.add_job("j3", JobKind::Backup, "gamma", "b3", "", 1, "node-a");
        let claim = f.claim_upload("j1").expect("first upload");
        assert!(f.claim_upload("j1").is_none(), "a second upload is refused");
        assert!(
            f.claim_upload("j2").is_some(),
            "other jobs are not affected"
        );
        assert!(f.claim_upload("j9").is_none(), "no such job");
        assert_eq!(
            f.jobs().into_iter().map(|(id, _)| id).collect::<Vec<_>>(),
            vec!["j1".to_string(), "j2".to_string(), "j3".to_string()]
        );

        // Stopping the job reaches its upload, with the reason.
        assert!(!claim.stop.is_cancelled());
        assert!(f.cancel_job("j1", "cancelled by operator alice"));
        assert!(claim.stop.is_cancelled());
        assert_eq!(claim.stop_message(), "cancelled by operator alice");

        // The job waits for its upload to end, and no longer than asked.
        let waited = tokio::time::Instant::now();
        j.upload_ended(std::time::Duration::from_millis(200)).await;
        assert!(waited.elapsed() >= std::time::Duration::from_millis(200));
        drop(claim);
        let waited = tokio::time::Instant::now();
        j.upload_ended(std::time::Duration::from_secs(30)).await;
        assert!(waited.elapsed() < std::time::Duration::from_secs(5));

        // A stopped job takes no upload.
        assert!(f.cancel_job("j3", "cancelled by operator alice"));
        assert!(f.claim_upload("j3").is_none());
    }

    /// A job whose channel is full of progress its task has not read yet
    /// still gets the loss of its connection (after the progress), instead
    /// of waiting for DATASAVER_JOB_TIMEOUT.
    #[tokio::test]
    async fn a_lost_connection_is_not_dropped_behind_progress() {
        let (f, clock) = fleet();
        let (a, _rx) = connect(&f, &clock, "node-a", &["acme"]);
        let mut job = f.add_job("j1", JobKind::Backup, "acme", "b1", "", a, "node-a");
        for i in 0..64 {
            f.report(a, "j1", progress(i));
        }
        f.remove_agent(a, "agent node-a disconnected");
        let mut last = String::new();
        for _ in 0..65 {
            let r = tokio::time::timeout(std::time::Duration::from_secs(5), job.reports.recv())
                .await
                .expect("a report in time")
                .expect("the channel is open");
            last = format!("{r:?}");
        }
        assert_eq!(last, lost("agent node-a disconnected", false));
    }
}
