//! Jobs: each backup, restore and verify from the moment it may start to its
//! one recorded outcome. A detached task owns every job (an operator who
//! disconnects does not leave it half-recorded), registered with the fleet so
//! the agent's reports reach it; it has a deadline (`DATASAVER_JOB_TIMEOUT`)
//! and can be cancelled, and either way the agent is sent `CancelJob` and
//! ends its child processes. Tasks run on the coordinator's task tracker, so
//! shutdown waits for them to record how they ended.
//!
//! `backup` starts backups (the scheduler's queue calls it for scheduled and
//! manual ones alike) and decides their outcome; `read` runs restores and
//! verifies; `upload` is the upload's domain side; `transfer` fails a job
//! whose upload or download moves no byte for DATASAVER_TRANSFER_IDLE_TIMEOUT.

pub mod backup;
pub mod read;
pub mod transfer;
pub mod upload;

use std::sync::Arc;
use std::time::Duration;

use datasaver_common::proto::{
    coordinator_message, job_event, CancelJob, CoordinatorMessage, JobDone, JobErrorKind, JobEvent,
    JobProgress, JobResult,
};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::fleet::{AgentTx, JobKind, JobRef, JobTicket, Report, StopReason};
use crate::schedule::planner::Outcome;
use crate::Core;

pub use crate::repo::Trigger;
pub use backup::{record_failed_attempt, start_backup};
pub use read::{start_read, Part, Read};
pub use upload::store_upload;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no agent is connected for target {0} (see `dsctl agents`)")]
    NoAgent(String),
    #[error("a backup of {0} is already running; wait for it to finish")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
}

/// A job that was started: its id (the backup's id for backups), its events
/// (progress, then one `Done`) and, once it ended, its outcome.
pub struct Started {
    pub id: String,
    pub events: mpsc::Receiver<Result<JobEvent, Status>>,
    pub outcome: oneshot::Receiver<Outcome>,
}

pub fn progress(phase: &str, message: String) -> JobEvent {
    JobEvent {
        event: Some(job_event::Event::Progress(JobProgress {
            phase: phase.into(),
            message,
            ..Default::default()
        })),
    }
}

pub fn done(d: JobDone) -> JobEvent {
    JobEvent {
        event: Some(job_event::Event::Done(d)),
    }
}

pub fn failed(error: String) -> JobEvent {
    done(JobDone {
        ok: false,
        error,
        ..Default::default()
    })
}

/// How an agent job ended when it did not succeed; what its outcome is
/// decided from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The job itself failed.
    Failed,
    /// A planned stop (the agent or the coordinator shutting down), not a
    /// failure of the job: a backup is retried.
    Interrupted,
    /// The stored object does not match its recorded checksum.
    Corrupt,
    /// `DATASAVER_JOB_TIMEOUT` or `DATASAVER_TRANSFER_IDLE_TIMEOUT` passed.
    TimedOut,
    /// An operator (or the coordinator) cancelled it.
    Cancelled,
}

/// Why an agent job did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    pub message: String,
    pub kind: FailureKind,
}

impl JobFailure {
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(FailureKind::Failed, message)
    }

    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind,
        }
    }
}

/// What a job's byte counters are heading for, for dsctl's progress bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expected {
    /// Backups: the previous backup's pg_dump size (an estimate).
    pub raw: u64,
    /// Restores and verifies: the stored object's size.
    pub stored: u64,
}

/// Asks the fleet's running job `job_id` to stop; its task tells the agent
/// and records the outcome. False when no such job runs.
pub fn cancel(core: &Core, job_id: &str, reason: &str) -> bool {
    core.fleet.cancel_job(job_id, reason)
}

/// Which running jobs an operator cancels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Which {
    /// A job id, or the id of the backup a job writes or reads.
    Id(String),
    /// Every running job of a target.
    Target(String),
}

#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("{0}")]
    NothingRunning(String),
}

/// Cancels the running jobs `which` names, for `reason` ("cancelled by
/// operator alice"), the way the deadline does; returns them once each has
/// recorded its outcome (or after `wait`, whichever comes first).
/// Jobs of targets `visible` rejects (outside the caller's scope) are
/// treated as if they did not exist.
pub async fn cancel_running(
    core: &Core,
    which: &Which,
    visible: &(dyn Fn(&str) -> bool + Sync),
    reason: &str,
    wait: Duration,
) -> Result<Vec<(String, JobRef)>, CancelError> {
    let jobs: Vec<(String, JobRef)> = core
        .fleet
        .jobs()
        .into_iter()
        .filter(|(_, j)| visible(&j.target))
        .filter(|(id, j)| match which {
            Which::Id(x) => id == x || &j.backup_id == x,
            Which::Target(t) => &j.target == t,
        })
        .collect();
    if jobs.is_empty() {
        return Err(CancelError::NothingRunning(match which {
            Which::Id(x) => format!(
                "no running job or backup {x} (running backups are listed by `dsctl list` with status running)"
            ),
            Which::Target(t) => format!("nothing is running for target {t}"),
        }));
    }
    let mut cancelled = Vec::new();
    for (id, j) in jobs {
        if core.fleet.cancel_job(&id, reason) {
            tracing::warn!(job = %id, target = %j.target, backup = %j.backup_id, %reason, "job cancelled");
            cancelled.push((id, j));
        }
    }
    if cancelled.is_empty() {
        return Err(CancelError::NothingRunning(
            "the job ended before it could be cancelled".into(),
        ));
    }
    // A job leaves the fleet after its outcome is recorded (`AgentJob` is
    // dropped then): wait for that, so the caller sees the recorded result.
    let until = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < until
        && cancelled.iter().any(|(id, _)| core.fleet.job(id).is_some())
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(cancelled)
}

/// Fails job `job_id` because a limit passed (`message` names the setting);
/// its task tells the agent and records the outcome. False when no such job
/// runs.
pub fn time_out(core: &Core, job_id: &str, message: &str) -> bool {
    core.fleet
        .stop_job(job_id, StopReason::TimedOut(message.to_string()))
}

/// How long a stopped job waits for its upload to end and clean up (an S3
/// writer lets its in-flight parts settle before the abort, 10 s at most).
const UPLOAD_END_WAIT: Duration = Duration::from_secs(30);

/// One job registered with the fleet and bound to the agent running it.
/// Dropping it takes the job out of the fleet, however the task ended.
struct AgentJob {
    core: Arc<Core>,
    id: String,
    agent: AgentTx,
    agent_name: String,
    target: String,
    ticket: JobTicket,
}

impl AgentJob {
    /// Registers a job for `target` on the agent serving it. `object_key` is
    /// what a restore or verify may read (empty for backups).
    fn register(
        core: &Arc<Core>,
        kind: JobKind,
        target: &str,
        backup_id: &str,
        object_key: &str,
    ) -> Result<AgentJob, StartError> {
        let (conn_id, agent_name, agent) = core
            .fleet
            .agent_for(target)
            .ok_or_else(|| StartError::NoAgent(target.to_string()))?;
        let id = format!("job-{}", rand::random::<u64>());
        let ticket = core.fleet.add_job(
            &id,
            kind,
            target,
            backup_id,
            object_key,
            conn_id,
            &agent_name,
        );
        tracing::info!(job = %id, kind = ?kind, %target, backup = %backup_id, agent = %agent_name, "job assigned to its agent");
        Ok(AgentJob {
            core: core.clone(),
            id,
            agent,
            agent_name,
            target: target.to_string(),
            ticket,
        })
    }

    /// Sends the job to its agent.
    async fn send(&self, msg: coordinator_message::Msg) -> Result<(), JobFailure> {
        self.agent
            .send(Ok(CoordinatorMessage { msg: Some(msg) }))
            .await
            .map_err(|_| {
                JobFailure::failed(format!(
                    "agent {} disconnected before the job could be sent",
                    self.agent_name
                ))
            })
    }

    /// Tells the agent to stop the job and end its child processes. Best
    /// effort: an agent that is gone has stopped it already.
    async fn stop_on_agent(&self, reason: &str) {
        let msg = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Cancel(CancelJob {
                job_id: self.id.clone(),
                reason: reason.to_string(),
            })),
        };
        let sent = tokio::time::timeout(Duration::from_secs(5), self.agent.send(Ok(msg))).await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::info!(job = %self.id, agent = %self.agent_name, "could not send CancelJob: the agent is gone");
        }
    }

    /// Waits for the agent's result, forwarding progress to `tx`, until the
    /// deadline, a cancel or shutdown; in those three cases the agent is told
    /// to stop. `what` names the job in messages ("backup b-…").
    async fn wait(
        &mut self,
        tx: &mpsc::Sender<Result<JobEvent, Status>>,
        expected: Expected,
        what: &str,
    ) -> Result<JobResult, JobFailure> {
        let limit = self.core.policies.job_timeout_for(&self.target);
        let deadline = tokio::time::sleep(limit);
        tokio::pin!(deadline);
        let stop = loop {
            // Shutdown first: it also ends the agent's control stream, and
            // the connection's loss it causes must not be taken for a failure.
            let r = tokio::select! {
                biased;
                _ = self.core.cancel.cancelled() => break JobFailure::new(
                    FailureKind::Interrupted,
                    format!("{what} interrupted: the coordinator is shutting down; the agent was told to stop it, run it again once the coordinator is back"),
                ),
                _ = self.ticket.cancel.cancelled() => break match self.ticket.stop_reason() {
                    StopReason::Cancelled(why) => JobFailure::new(
                        FailureKind::Cancelled,
                        format!("{what} cancelled: {why}"),
                    ),
                    StopReason::TimedOut(why) => JobFailure::new(
                        FailureKind::TimedOut,
                        format!("{what} failed: {why}; the agent was told to stop it"),
                    ),
                },
                _ = &mut deadline => break JobFailure::new(
                    FailureKind::TimedOut,
                    format!(
                        "{what} timed out after {} (DATASAVER_JOB_TIMEOUT); the agent was told to stop it",
                        datasaver_common::config::format_duration(limit)
                    ),
                ),
                r = self.ticket.reports.recv() => r,
            };
            match r {
                None => return Err(JobFailure::failed("job ended without a result")),
                Some(Report::Progress(mut p)) => {
                    if p.expected_raw_bytes == 0 {
                        p.expected_raw_bytes = expected.raw;
                    }
                    if p.expected_stored_bytes == 0 {
                        p.expected_stored_bytes = expected.stored;
                    }
                    let _ = tx.try_send(Ok(JobEvent {
                        event: Some(job_event::Event::Progress(p)),
                    }));
                }
                Some(Report::Result(r)) => return result(r),
                Some(Report::Lost { why, planned }) => {
                    let kind = if planned {
                        FailureKind::Interrupted
                    } else {
                        FailureKind::Failed
                    };
                    return Err(JobFailure::new(kind, why));
                }
            }
        };
        tracing::warn!(job = %self.id, agent = %self.agent_name, reason = %stop.message, "stopping the job on its agent");
        self.stop_on_agent(&stop.message).await;
        // The upload ends at once on the stop (its storage writer discards
        // what it wrote); the outcome is recorded after that, so a stopped
        // job leaves nothing in storage when its result is seen.
        self.ticket.upload_ended(UPLOAD_END_WAIT).await;
        Err(stop)
    }
}

impl Drop for AgentJob {
    fn drop(&mut self) {
        self.core.fleet.remove_job(&self.id);
    }
}

/// The agent's result as the job's.
fn result(r: JobResult) -> Result<JobResult, JobFailure> {
    if r.ok {
        return Ok(r);
    }
    let kind = if r.error_kind == JobErrorKind::ChecksumMismatch as i32 {
        FailureKind::Corrupt
    } else if r.interrupted {
        FailureKind::Interrupted
    } else {
        FailureKind::Failed
    };
    Err(JobFailure::new(kind, r.error))
}

#[cfg(test)]
mod tests;
