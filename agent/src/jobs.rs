//! The jobs of one control session: how a job kind plugs in ([`Job`]), the
//! one place a job is started, reported and forgotten ([`Jobs`]), and how a
//! job is stopped — by itself through the coordinator's `CancelJob`, or
//! with every other job when the session ends or the agent stops
//! ([`JobCancel`]). A job's result always reaches the coordinator, and says
//! which of these stopped it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};

use datasaver_common::proto::agent_service_client::AgentServiceClient;
use datasaver_common::proto::{agent_message, AgentMessage, JobErrorKind, JobResult};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

use crate::config::TargetConfig;
use crate::pg::PgTools;
use crate::progress::Reporter;

/// Why a job failed: one line for the operator, and the kind where the
/// coordinator acts on it (a corrupt object names the next good backup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub message: String,
    pub kind: JobErrorKind,
}

impl JobError {
    /// The stored bytes do not match their recorded checksum.
    pub fn checksum_mismatch(message: String) -> Self {
        Self {
            message,
            kind: JobErrorKind::ChecksumMismatch,
        }
    }
}

impl From<String> for JobError {
    fn from(message: String) -> Self {
        Self {
            message,
            kind: JobErrorKind::Unspecified,
        }
    }
}

impl From<&str> for JobError {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

/// A kind of job the coordinator sends. A new kind (base backup, restore
/// drill) implements this next to its work and gets one arm in the
/// session's dispatch; starting, cancelling and reporting are shared.
pub trait Job: Send + 'static {
    /// What logs and messages call it ("backup").
    const WHAT: &'static str;
    fn job_id(&self) -> &str;
    /// The job's span, joined to the coordinator's trace.
    fn span(&self) -> tracing::Span;
    /// Does the work. `ok`, `job_id` and the error fields of the result
    /// are filled in by [`Jobs`].
    fn run(self, ctx: JobContext) -> impl Future<Output = Result<JobResult, JobError>> + Send;
}

/// What a running job may use.
pub struct JobContext {
    pub client: AgentServiceClient<Channel>,
    pub target: TargetConfig,
    pub tools: PgTools,
    pub reporter: Reporter,
    pub cancel: JobCancel,
    /// The WAL stream's acknowledged run (base backups wait for it).
    pub wal: Arc<crate::walstream::WalState>,
}

/// Why a job was stopped before it ended by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The coordinator cancelled this job (deadline, operator, shutdown).
    Coordinator(String),
    /// The agent is stopping on purpose: the job was interrupted.
    AgentStopping,
    /// The control session ended: nobody is waiting for the result.
    SessionEnded,
}

impl Stop {
    /// The job's error for this stop when the job has no better words.
    pub fn message(&self, what: &str) -> String {
        match self {
            Self::Coordinator(reason) => format!("cancelled by the coordinator: {reason}"),
            Self::AgentStopping => format!("{what} interrupted: the agent is stopping"),
            Self::SessionEnded => {
                format!("{what} cancelled (connection to the coordinator lost)")
            }
        }
    }
}

/// One job's cancellation: its own token (a child of the session's, so the
/// session's end stops it too) and why it fired.
#[derive(Clone)]
pub struct JobCancel {
    token: CancellationToken,
    /// Set by the coordinator's `CancelJob`, before the token fires.
    reason: Arc<OnceLock<String>>,
    /// The agent is stopping on purpose.
    stopping: CancellationToken,
}

impl JobCancel {
    /// A job's cancellation under the session's `jobs` token.
    pub fn new(jobs: &CancellationToken, stopping: &CancellationToken) -> Self {
        Self {
            token: jobs.child_token(),
            reason: Arc::new(OnceLock::new()),
            stopping: stopping.clone(),
        }
    }

    /// A part of this job that can be stopped on its own (and stops with
    /// the job).
    pub fn child(&self) -> JobCancel {
        Self {
            token: self.token.child_token(),
            reason: self.reason.clone(),
            stopping: self.stopping.clone(),
        }
    }

    /// The coordinator cancelled this job; the first reason is kept.
    pub fn cancel_by_coordinator(&self, reason: &str) {
        let _ = self.reason.set(reason.to_string());
        self.token.cancel();
    }

    /// The token that kills the job's children when it fires.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// Why the job was stopped, if it was.
    pub fn stop(&self) -> Option<Stop> {
        if !self.token.is_cancelled() {
            return None;
        }
        Some(match self.reason.get() {
            Some(r) => Stop::Coordinator(r.clone()),
            None if self.stopping.is_cancelled() => Stop::AgentStopping,
            None => Stop::SessionEnded,
        })
    }

    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.reason, &other.reason)
    }
}

/// What a session's jobs share: where they report, how they are stopped, and
/// the tracker the session waits on before it leaves.
pub struct Jobs {
    tx: mpsc::Sender<AgentMessage>,
    /// Ends this session's jobs (agent stopping, or the session ended).
    cancel: CancellationToken,
    /// The agent is stopping on purpose: a job that ends now was interrupted.
    stopping: CancellationToken,
    tracker: TaskTracker,
    /// The jobs running now, for `CancelJob`.
    running: Arc<Mutex<HashMap<String, JobCancel>>>,
}

impl Jobs {
    pub fn new(tx: mpsc::Sender<AgentMessage>, stopping: CancellationToken) -> Self {
        Self {
            tx,
            cancel: CancellationToken::new(),
            stopping,
            tracker: TaskTracker::new(),
            running: Arc::default(),
        }
    }

    /// Stops every job of the session.
    pub fn cancel_all(&self) {
        self.cancel.cancel();
    }

    /// A guard that stops every job when the session is left, however.
    pub fn cancel_on_drop(&self) -> tokio_util::sync::DropGuard {
        self.cancel.clone().drop_guard()
    }

    /// How many jobs are running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Waits (at most until `deadline`) for the running jobs to report;
    /// false when they did not.
    pub async fn wait_until(&self, deadline: tokio::time::Instant) -> bool {
        self.tracker.close();
        tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_ok()
    }

    /// Cancels the job `job_id` alone; false when no such job runs.
    pub fn cancel_job(&self, job_id: &str, reason: &str) -> bool {
        let job = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(job_id)
            .cloned();
        match job {
            Some(c) => {
                c.cancel_by_coordinator(reason);
                true
            }
            None => false,
        }
    }

    /// Starts a job the coordinator sent, with what jobs may use.
    pub fn dispatch<J: Job>(
        &self,
        job: J,
        client: &AgentServiceClient<Channel>,
        target: &TargetConfig,
        tools: &PgTools,
        wal: &Arc<crate::walstream::WalState>,
    ) {
        let span = job.span();
        let job_id = job.job_id().to_string();
        let reporter = Reporter {
            job_id: job_id.clone(),
            tx: self.tx.clone(),
        };
        let (client, target, tools, wal) =
            (client.clone(), target.clone(), tools.clone(), wal.clone());
        self.start(span, job_id, J::WHAT, move |cancel| {
            job.run(JobContext {
                client,
                target,
                tools,
                reporter,
                cancel,
                wal,
            })
        });
    }

    /// Runs one job on its own task (inside `span`) with its own
    /// cancellation, and reports its result on the control stream whatever
    /// the outcome.
    pub fn start<W, F>(&self, span: tracing::Span, job_id: String, what: &'static str, work: W)
    where
        W: FnOnce(JobCancel) -> F,
        F: Future<Output = Result<JobResult, JobError>> + Send + 'static,
    {
        let cancel = JobCancel::new(&self.cancel, &self.stopping);
        let previous = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job_id.clone(), cancel.clone());
        if previous.is_some() {
            tracing::warn!(job = %job_id, "a job with this id is already running; a cancel reaches only the new one");
        }
        let work = work(cancel.clone());
        let (tx, running) = (self.tx.clone(), self.running.clone());
        let task = async move {
            tracing::info!("{what} started");
            let outcome = work.await;
            {
                let mut running = running.lock().unwrap_or_else(|p| p.into_inner());
                if running.get(&job_id).is_some_and(|c| c.same(&cancel)) {
                    running.remove(&job_id);
                }
            }
            let result = report(outcome, &cancel, job_id, what);
            let _ = tx
                .send(AgentMessage {
                    msg: Some(agent_message::Msg::Result(result)),
                })
                .await;
        };
        self.tracker
            .spawn(tracing::Instrument::instrument(task, span));
    }
}

/// A job's outcome as the coordinator is told it: interrupted only for the
/// agent's own planned stop, a coordinator's cancel as a failure that says
/// so.
fn report(
    outcome: Result<JobResult, JobError>,
    cancel: &JobCancel,
    job_id: String,
    what: &str,
) -> JobResult {
    match (outcome, cancel.stop()) {
        (Ok(r), _) => {
            tracing::info!("{}", r.message);
            JobResult {
                job_id,
                ok: true,
                ..r
            }
        }
        (Err(e), Some(Stop::Coordinator(reason))) => {
            tracing::warn!(reason = %reason, error = %e.message, "{what} cancelled by the coordinator");
            JobResult {
                job_id,
                ok: false,
                error: Stop::Coordinator(reason).message(what),
                ..Default::default()
            }
        }
        (Err(e), _) if cancel.stopping.is_cancelled() => {
            let e = e.message;
            tracing::info!(reason = %e, "{what} interrupted: the agent is stopping");
            JobResult {
                job_id,
                ok: false,
                interrupted: true,
                error: format!("the agent was stopped during the {what} ({e})"),
                ..Default::default()
            }
        }
        (Err(e), _) => {
            tracing::warn!(error = %e.message, kind = ?e.kind, "{what} failed");
            JobResult {
                job_id,
                ok: false,
                error: e.message,
                error_kind: e.kind as i32,
                ..Default::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::child::Proc;
    use std::time::{Duration, Instant};

    /// A job whose work is a child process that runs until killed, through
    /// the same child handling the pipelines use.
    fn sleeper(jobs: &Jobs, id: &str) -> Proc {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        let (proc, _pipes) = Proc::spawn(cmd, "sleep", false).unwrap();
        let p = proc.clone();
        jobs.start(
            tracing::Span::none(),
            id.into(),
            "sleep job",
            move |cancel| async move {
                let _kill = p.kill_on(cancel.token());
                let waited = p.clone();
                let exit = tokio::task::spawn_blocking(move || waited.wait())
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                Err(JobError::from(format!("sleep ended: {}", exit.describe())))
            },
        );
        proc
    }

    async fn next_result(rx: &mut mpsc::Receiver<AgentMessage>) -> JobResult {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("a result within 5 s")
                .expect("the channel stays open");
            if let Some(agent_message::Msg::Result(r)) = m.msg {
                return r;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancel_job_stops_that_job_alone() {
        let (tx, mut rx) = mpsc::channel(16);
        let stopping = CancellationToken::new();
        let jobs = Jobs::new(tx, stopping.clone());
        let a = sleeper(&jobs, "job-a");
        let b = sleeper(&jobs, "job-b");
        assert_eq!(jobs.len(), 2);

        assert!(!jobs.cancel_job("no-such-job", "deadline"));
        let started = Instant::now();
        assert!(jobs.cancel_job("job-a", "the job's deadline passed"));
        let r = next_result(&mut rx).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(r.job_id, "job-a");
        assert!(!r.ok && !r.interrupted);
        assert_eq!(
            r.error,
            "cancelled by the coordinator: the job's deadline passed"
        );
        assert!(a.has_exited());

        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!b.has_exited(), "the other job's child keeps running");
        assert!(rx.try_recv().is_err(), "the other job has not reported");
        assert_eq!(jobs.len(), 1);
        // a finished job is forgotten: a late cancel finds nothing
        assert!(!jobs.cancel_job("job-a", "again"));

        // the agent's planned stop still reaches every job, as an interruption
        stopping.cancel();
        jobs.cancel_all();
        let r = next_result(&mut rx).await;
        assert_eq!(r.job_id, "job-b");
        assert!(!r.ok && r.interrupted, "{r:?}");
        assert!(r
            .error
            .starts_with("the agent was stopped during the sleep job"));
        assert!(b.has_exited());
        assert!(
            jobs.wait_until(tokio::time::Instant::now() + Duration::from_secs(1))
                .await
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn session_end_is_neither_interrupted_nor_the_coordinators_cancel() {
        let (tx, mut rx) = mpsc::channel(16);
        let jobs = Jobs::new(tx, CancellationToken::new());
        let a = sleeper(&jobs, "job-a");
        drop(jobs.cancel_on_drop());
        let r = next_result(&mut rx).await;
        assert!(!r.ok && !r.interrupted, "{r:?}");
        assert_eq!(r.error, "sleep ended: killed by a signal");
        assert!(a.has_exited());
    }

    #[test]
    fn stop_reasons() {
        let jobs = CancellationToken::new();
        let stopping = CancellationToken::new();
        let c = JobCancel::new(&jobs, &stopping);
        assert_eq!(c.stop(), None);
        jobs.cancel();
        assert_eq!(c.stop(), Some(Stop::SessionEnded));
        stopping.cancel();
        assert_eq!(c.stop(), Some(Stop::AgentStopping));
        c.cancel_by_coordinator("operator asked");
        c.cancel_by_coordinator("later reason");
        assert_eq!(c.stop(), Some(Stop::Coordinator("operator asked".into())));
        assert_eq!(
            Stop::SessionEnded.message("backup"),
            "backup cancelled (connection to the coordinator lost)"
        );
        assert_eq!(
            Stop::AgentStopping.message("backup"),
            "backup interrupted: the agent is stopping"
        );
    }
}
