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
    /// Why it was cancelled (set before `cancel` fires).
    cancel_reason: std::sync::Arc<Mutex<Option<String>>>,
}

/// A job's place in the fleet: where the agent's reports arrive, and how an
/// operator (or shutdown) asks it to stop.
pub struct JobTicket {
    pub reports: mpsc::Receiver<Report>,
    pub cancel: CancellationToken,
    cancel_reason: std::sync::Arc<Mutex<Option<String>>>,
}

impl JobTicket {
    /// Why the job was cancelled, once `cancel` fired.
    pub fn cancel_reason(&self) -> String {
        lock!(self.cancel_reason)
            .clone()
            .unwrap_or_else(|| "cancelled".into())
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
    next_id: AtomicU64,
    clock: std::sync::Arc<dyn crate::clock::Clock>,
}

impl Fleet {
    pub fn new(clock: std::sync::Arc<dyn crate::clock::Clock>) -> Self {
        Self {
            inner: Mutex::default(),
            next_id: AtomicU64::new(0),
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
            let _ = s.try_send(Report::Lost {
                why: why.to_string(),
                planned,
            });
        }
    }

    pub fn touch(&self, conn_id: u64) {
        if let Some(a) = lock!(self.inner).agents.get_mut(&conn_id) {
            a.last_seen = self.clock.now();
        }
    }

    /// The connection serving `target`: (conn_id, agent name, sender).
    pub fn agent_for(&self, target: &str) -> Option<(u64, String, AgentTx)> {
        let g = lock!(self.inner);
        let id = g.targets.get(target)?;
        let a = g.agents.get(id)?;
        Some((a.conn_id, a.name.clone(), a.tx.clone()))
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
            },
        );
        JobTicket {
            reports: rx,
            cancel,
            cancel_reason,
        }
    }

    /// Asks job `job_id` to stop (its task tells the agent and records the
    /// outcome). False when no such job is running.
    pub fn cancel_job(&self, job_id: &str, reason: &str) -> bool {
        let g = lock!(self.inner);
        let Some(job) = g.jobs.get(job_id) else {
            return false;
        };
        lock!(job.cancel_reason).get_or_insert_with(|| reason.to_string());
        job.cancel.cancel();
        true
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

    /// Backups a restore or verify is reading now: retention must keep them.
    pub fn backups_in_use(&self) -> HashSet<String> {
        lock!(self.inner)
            .jobs
            .values()
            .filter(|j| j.info.kind != JobKind::Backup)
            .map(|j| j.info.backup_id.clone())
            .collect()
    }

    /// When the agent serving `target` went away (`None`: connected, or not
    /// seen since this coordinator started).
    pub fn disconnected_since(&self, target: &str) -> Option<DateTime<Utc>> {
        lock!(self.inner).disconnected.get(target).copied()
    }

    /// Whether an agent serving `target` is connected.
    pub fn is_connected(&self, target: &str) -> bool {
        self.agent_for(target).is_some()
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
