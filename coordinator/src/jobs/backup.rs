//! Backups: started when the scheduler's queue lets them (scheduled and
//! `dsctl backup` alike), their outcome decided in `decide` and nowhere else,
//! retention run after a success.

use std::sync::Arc;

use datasaver_common::proto::{coordinator_message, BackupJob, JobDone, JobEvent, JobResult};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::{
    done, failed, progress, AgentJob, Expected, FailureKind, JobFailure, StartError, Started,
};
use crate::fleet::JobKind;
use crate::repo::{self, BackupRecord, Trigger};
use crate::schedule::planner::Outcome;
use crate::{to_proto, Core};

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
    kind: crate::repo::Kind,
) -> Result<Started, StartError> {
    let agent_name = core
        .fleet
        .agent_for(target)
        .map(|(_, name, _)| name)
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
        .begin(target, trigger, label, &agent_name, kind)
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
        .filter(|_| kind == crate::repo::Kind::Logical)
        .map(|r| r.raw_bytes)
        .unwrap_or(0);
    // The job's span: a child of the schedule's when the scheduler started it.
    let span =
        tracing::info_span!("backup", target = %target, backup = %id, trigger = trigger.as_str());
    span.in_scope(|| tracing::info!(target = %target, backup = %id, trigger = trigger.as_str(), "backup started"));

    // Registered before the row can be seen as running by anyone else; an
    // agent gone meanwhile is a failed attempt of this backup.
    let job = AgentJob::register(core, JobKind::Backup, target, &id, "");
    let (tx, rx) = mpsc::channel(16);
    let (outcome_tx, outcome_rx) = oneshot::channel();
    let trace_context = datasaver_common::telemetry::context_of(&span);
    let core2 = core.clone();
    let target = target.to_string();
    let backup_id = id.clone();
    core.tasks.spawn(
        async move {
            let core = core2;
            let _release = release;
            let id = backup_id;
            let result = match job {
                Err(e) => Err(JobFailure::failed(e.to_string())),
                Ok(mut job) => {
                    let sent = job
                        .send(coordinator_message::Msg::Backup(BackupJob {
                            job_id: job.id.clone(),
                            backup_id: id.clone(),
                            target: target.clone(),
                            trace_context,
                            physical: kind == crate::repo::Kind::Base,
                        }))
                        .await;
                    match sent {
                        Err(f) => Err(f),
                        Ok(()) => {
                            let _ = tx
                                .send(Ok(progress("started", format!("backup {id} started"))))
                                .await;
                            let expected = Expected {
                                raw: expected_raw,
                                stored: 0,
                            };
                            job.wait(&tx, expected, &format!("backup {id}")).await
                        }
                    }
                }
            };
            let (outcome, event) = decide(&core, &id, &target, result).await;
            let _ = outcome_tx.send(outcome);
            let _ = tx.send(Ok(event)).await;
            core.alerter.wake.notify_one();
            // Retention after every successful backup, still holding the
            // target's slot so it never races the next backup of the target.
            if outcome == Outcome::Succeeded && !core.cancel.is_cancelled() {
                let rotation = tracing::info_span!("rotation", target = %target);
                if let Err(e) = crate::retention::cleanup::run(&core, Some(&target), false)
                    .instrument(rotation)
                    .await
                {
                    tracing::error!(target = %target, error = %e, "cleanup after the backup failed");
                }
            }
        }
        .instrument(span),
    );
    Ok(Started {
        id,
        events: rx,
        outcome: outcome_rx,
    })
}

/// The one place a backup's outcome is decided, from what the agent said and
/// what was stored: a stored backup is completed whatever the agent said
/// afterwards; a planned stop is an interruption; anything else fails.
pub(super) async fn decide(
    core: &Core,
    id: &str,
    target: &str,
    result: Result<JobResult, JobFailure>,
) -> (Outcome, JobEvent) {
    let row = core.repo.get(id).await.ok().flatten();
    if let Some(row) = row.filter(|r| r.status == repo::Status::Completed) {
        tracing::info!(backup = %id, "backup completed");
        if let Err(e) = core
            .targets
            .note_server(target, &row.system_identifier, id)
            .await
        {
            tracing::error!(backup = %id, error = %e, "could not record the backup's server");
        }
        core.metrics.backup_succeeded(
            target,
            row.duration_ms as f64 / 1000.0,
            row.stored_bytes,
            row.raw_bytes,
        );
        // A whole server's databases come and go: the event says which.
        let mut message = format!("backup {id} completed");
        if row.is_whole_server() {
            message.push_str(&format!(" ({} databases)", row.databases().len()));
            match core.repo.database_changes(&row).await {
                Ok((appeared, gone)) => {
                    if !appeared.is_empty() {
                        message.push_str(&format!(
                            "; new since the previous backup: {}",
                            appeared.join(", ")
                        ));
                    }
                    if !gone.is_empty() {
                        message.push_str(&format!(
                            "; gone since the previous backup: {}",
                            gone.join(", ")
                        ));
                    }
                    if !appeared.is_empty() || !gone.is_empty() {
                        tracing::info!(backup = %id, appeared = ?appeared, disappeared = ?gone, "the server's databases changed since the previous backup");
                    }
                }
                Err(e) => {
                    tracing::warn!(backup = %id, error = %e, "could not compare the backup's databases with the previous backup's")
                }
            }
        }
        let event = done(JobDone {
            ok: true,
            message,
            backup: Some(to_proto(&row)),
            ..Default::default()
        });
        return (Outcome::Succeeded, event);
    }
    let failure = match result {
        Err(f) => f,
        Ok(_) => JobFailure::failed("agent reported success but the backup was not stored"),
    };
    if failure.kind == FailureKind::Interrupted {
        let reason = format!("interrupted: {}", failure.message);
        if let Err(e) = core
            .repo
            .finish(id, repo::Status::Interrupted, &reason)
            .await
        {
            tracing::error!(backup = %id, error = %e, "could not record the interruption");
        }
        tracing::info!(backup = %id, reason = %failure.message, "backup interrupted by a planned stop");
        core.metrics.backup_interrupted(target);
        return (
            Outcome::Interrupted,
            failed(format!("backup {id} {reason}")),
        );
    }
    // A deadline or a cancel is the reason, whatever the upload said after
    // the agent was told to stop.
    let own_reason = matches!(failure.kind, FailureKind::TimedOut | FailureKind::Cancelled);
    if own_reason {
        if let Err(e) = core.repo.note_error(id, &failure.message).await {
            tracing::error!(backup = %id, error = %e, "could not record the failure");
        }
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
