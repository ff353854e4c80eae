//! Backups as jobs: the one path every backup takes once the scheduler's
//! queue lets it start (scheduled or `dsctl backup`). A detached task owns
//! each backup's outcome — completed, failed or interrupted, decided here and
//! nowhere else — so an operator who disconnects does not leave it
//! half-recorded; it runs retention after a success.

use std::sync::Arc;

use datasaver_common::proto::{
    coordinator_message, job_event, BackupJob, CoordinatorMessage, JobDone, JobErrorKind, JobEvent,
    JobProgress, JobResult,
};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tracing::Instrument;

use crate::fleet::{JobKind, Report};
use crate::repo::{self, BackupRecord};
use crate::schedule::planner::Outcome;
use crate::{to_proto, Core};

pub use crate::repo::Trigger;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no agent is connected for target {0} (see `dsctl agents`)")]
    NoAgent(String),
    #[error("a backup of {0} is already running; wait for it to finish")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
}

/// A backup that was started: its id, its events (progress, then one
/// `Done`) and, once it ended, its outcome.
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

/// Why an agent job did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    pub message: String,
    /// A planned agent stop, not a failure of the job itself.
    pub interrupted: bool,
    /// The stored object does not match its recorded checksum.
    pub corrupt: bool,
}

impl JobFailure {
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            interrupted: false,
            corrupt: false,
        }
    }
}

/// Releases the per-target backup slot when the job task ends, however it ends.
struct SlotGuard {
    core: Arc<Core>,
    target: String,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.core.fleet.end_backup_slot(&self.target);
    }
}

/// Records an attempt that could not even start (no agent connected), so a
/// missed scheduled backup is visible as a failure, never silently skipped.
pub async fn record_failed_attempt(
    core: &Core,
    target: &str,
    trigger: Trigger,
    error: &str,
) -> Result<BackupRecord, StartError> {
    let b = core
        .repo
        .record_failed_attempt(target, trigger, error)
        .await
        .map_err(|e| StartError::Internal(e.to_string()))?;
    core.metrics.backup_failed(target, error);
    core.alerter.wake.notify_one();
    Ok(b)
}

/// Starts a backup of `target` on its agent now. Callers go through the
/// scheduler's queue (`schedule::driver`), which keeps the global limit.
pub async fn start_backup(
    core: &Arc<Core>,
    target: &str,
    trigger: Trigger,
    label: Option<String>,
) -> Result<Started, StartError> {
    let (conn_id, agent_name, agent_tx) = core
        .fleet
        .agent_for(target)
        .ok_or_else(|| StartError::NoAgent(target.to_string()))?;
    if !core.fleet.start_backup_slot(target) {
        return Err(StartError::Busy(target.to_string()));
    }
    let release = SlotGuard {
        core: core.clone(),
        target: target.to_string(),
    };
    let label = label.filter(|l| !l.trim().is_empty());
    let id = core
        .repo
        .begin(target, trigger, label, &agent_name)
        .await
        .map_err(|e| StartError::Internal(e.to_string()))?
        .id;
    // What this backup will roughly read: the previous one's pg_dump size
    // (for dsctl's progress bar; 0 when there is none).
    let expected_raw = core
        .repo
        .latest_completed(target, None)
        .await
        .ok()
        .flatten()
        .map(|r| r.raw_bytes)
        .unwrap_or(0);
    // The job's span: a child of the schedule's when the scheduler started it.
    let span =
        tracing::info_span!("backup", target = %target, backup = %id, trigger = trigger.as_str());
    span.in_scope(|| tracing::info!(target = %target, backup = %id, trigger = trigger.as_str(), "backup started"));

    let job_id = format!("job-{}", rand::random::<u64>());
    let mut reports = core.fleet.add_job(
        &job_id,
        JobKind::Backup,
        target,
        &id,
        "",
        conn_id,
        &agent_name,
    );
    let (tx, rx) = mpsc::channel(16);
    let (outcome_tx, outcome_rx) = oneshot::channel();
    let sent = agent_tx
        .send(Ok(CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Backup(BackupJob {
                job_id: job_id.clone(),
                backup_id: id.clone(),
                target: target.to_string(),
                trace_context: datasaver_common::telemetry::context_of(&span),
            })),
        }))
        .await;
    let core = core.clone();
    let target = target.to_string();
    let backup_id = id.clone();
    tokio::spawn(async move {
        let _release = release;
        let id = backup_id;
        let result = if sent.is_err() {
            Err(JobFailure::failed(format!(
                "agent {agent_name} disconnected before the job could be sent"
            )))
        } else {
            let _ = tx
                .send(Ok(progress("started", format!("backup {id} started"))))
                .await;
            let expected = Expected {
                raw: expected_raw,
                stored: 0,
            };
            wait_result(&mut reports, &tx, &core, expected).await
        };
        core.fleet.remove_job(&job_id);
        let (outcome, event) = decide(&core, &id, &target, result).await;
        let _ = outcome_tx.send(outcome);
        let _ = tx.send(Ok(event)).await;
        core.alerter.wake.notify_one();
        // Retention after every successful backup, still holding the target's
        // slot so it never races the next backup of the same target.
        if outcome == Outcome::Succeeded {
            let rotation = tracing::info_span!("rotation", target = %target);
            if let Err(e) = crate::retention::cleanup::run(&core, Some(&target), false)
                .instrument(rotation)
                .await
            {
                tracing::error!(target = %target, error = %e, "cleanup after the backup failed");
            }
        }
    }.instrument(span));
    Ok(Started {
        id,
        events: rx,
        outcome: outcome_rx,
    })
}

/// The one place a backup's outcome is decided, from what the agent said and
/// what was stored: a stored backup is completed whatever the agent said
/// afterwards; a planned agent stop is an interruption; anything else fails.
async fn decide(
    core: &Core,
    id: &str,
    target: &str,
    result: Result<JobResult, JobFailure>,
) -> (Outcome, JobEvent) {
    let row = core.repo.get(id).await.ok().flatten();
    if let Some(row) = row.filter(|r| r.status == repo::Status::Completed) {
        tracing::info!(backup = %id, "backup completed");
        core.metrics.backup_succeeded(
            target,
            row.duration_ms as f64 / 1000.0,
            row.stored_bytes,
            row.raw_bytes,
        );
        let event = done(JobDone {
            ok: true,
            message: format!("backup {id} completed"),
            backup: Some(to_proto(&row)),
            ..Default::default()
        });
        return (Outcome::Succeeded, event);
    }
    let failure = match result {
        Err(f) => f,
        Ok(_) => JobFailure::failed("agent reported success but the backup was not stored"),
    };
    if failure.interrupted {
        let reason = format!("interrupted: {}", failure.message);
        if let Err(e) = core
            .repo
            .finish(id, repo::Status::Interrupted, &reason)
            .await
        {
            tracing::error!(backup = %id, error = %e, "could not record the interruption");
        }
        tracing::info!(backup = %id, reason = %failure.message, "backup interrupted by a planned agent stop");
        core.metrics.backup_interrupted(target);
        return (
            Outcome::Interrupted,
            failed(format!("backup {id} {reason}")),
        );
    }
    if let Err(e) = core
        .repo
        .finish(id, repo::Status::Failed, &failure.message)
        .await
    {
        tracing::error!(backup = %id, error = %e, "could not record the failure");
    }
    // The first recorded reason (e.g. the upload's own error) is kept by the
    // repository; show that one.
    let error = core
        .repo
        .get(id)
        .await
        .ok()
        .flatten()
        .and_then(|r| r.error)
        .unwrap_or(failure.message);
    tracing::warn!(backup = %id, %error, "backup failed");
    core.metrics.backup_failed(target, &error);
    (
        Outcome::Failed,
        failed(format!("backup {id} failed: {error}")),
    )
}

/// What a job's byte counters are heading for, for dsctl's progress bar.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expected {
    /// Backups: the previous backup's pg_dump size (an estimate).
    pub raw: u64,
    /// Restores and verifies: the stored object's size.
    pub stored: u64,
}

/// Waits for the agent's result, forwarding progress to the operator.
pub async fn wait_result(
    reports: &mut mpsc::Receiver<Report>,
    tx: &mpsc::Sender<Result<JobEvent, Status>>,
    core: &Core,
    expected: Expected,
) -> Result<JobResult, JobFailure> {
    loop {
        let r = tokio::select! {
            _ = core.cancel.cancelled() => return Err(JobFailure::failed("coordinator shutting down")),
            r = reports.recv() => r,
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
            Some(Report::Result(r)) if r.ok => return Ok(r),
            Some(Report::Result(r)) => {
                return Err(JobFailure {
                    corrupt: r.error_kind == JobErrorKind::ChecksumMismatch as i32,
                    message: r.error,
                    interrupted: r.interrupted,
                })
            }
            Some(Report::Lost { why, planned }) => {
                return Err(JobFailure {
                    message: why,
                    interrupted: planned,
                    corrupt: false,
                })
            }
        }
    }
}

/// Stores the bytes of running backup `backup_id` as they arrive from its
/// agent (the agent's `Upload` call): GFS tags for its completion, the
/// repository's all-or-nothing ingest, and — when it does not complete — the
/// reason kept with the backup (the job's outcome is still decided in
/// `decide`, once the agent reports).
pub async fn store_upload<S>(
    core: &Core,
    backup_id: &str,
    meta: repo::ingest::IngestMeta,
    pieces: S,
) -> Result<BackupRecord, repo::ingest::IngestError>
where
    S: futures::Stream<Item = Result<repo::ingest::Piece, repo::ingest::IngestError>>
        + Send
        + 'static,
{
    use futures::StreamExt;
    use repo::ingest::{IngestError, Piece};
    let running = core
        .repo
        .find(backup_id)
        .await
        .map_err(|e| IngestError::Failed(e.to_string()))?;
    let target = running.target.clone();
    let tags = crate::retention::cleanup::tags_for_new(core, &running).await;
    // Counted as they arrive (throughput in /metrics), and cut off with a
    // reason when the coordinator shuts down.
    let metrics = &core.metrics;
    let counted = pieces.inspect(|p| {
        if let Ok(Piece::Data(d)) = p {
            metrics.uploaded(&target, d.len() as u64);
        }
    });
    let body = until_shutdown(counted, core.cancel.clone());
    let result = core.repo.ingest(backup_id, meta, body, tags).await;
    if let Err(e) = &result {
        if let Err(ne) = core.repo.note_error(backup_id, &e.to_string()).await {
            tracing::error!(backup = %backup_id, error = %ne, "could not record why the upload failed");
        }
    }
    result
}

/// `s`, ending with an error item when `cancel` fires.
fn until_shutdown<S>(
    s: S,
    cancel: tokio_util::sync::CancellationToken,
) -> impl futures::Stream<Item = Result<repo::ingest::Piece, repo::ingest::IngestError>> + Send
where
    S: futures::Stream<Item = Result<repo::ingest::Piece, repo::ingest::IngestError>> + Send,
{
    use futures::StreamExt;
    futures::stream::unfold(
        (Box::pin(s), cancel, false),
        |(mut s, cancel, ended)| async move {
            if ended {
                return None;
            }
            tokio::select! {
                _ = cancel.cancelled() => Some((
                    Err(repo::ingest::IngestError::Failed("coordinator shutting down".into())),
                    (s, cancel, true),
                )),
                item = s.next() => item.map(|i| (i, (s, cancel, false))),
            }
        },
    )
}
