//! Backups as jobs: the one path both `dsctl backup` and the scheduler take.
//! A detached task owns each backup's outcome (an operator who disconnects
//! does not leave it half-recorded) and runs retention after a success.

use std::sync::Arc;

use datasaver_common::proto::{
    coordinator_message, job_event, BackupJob, CoordinatorMessage, JobDone, JobEvent, JobProgress,
};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::Instrument;

use crate::catalog::{status, BackupRow};
use crate::fleet::{JobKind, Report};
use crate::{now_rfc3339, to_proto, Core};

/// Who asked for a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Manual,
    Scheduled,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::Scheduled => "scheduled",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no agent is connected for target {0} (see `dsctl agents`)")]
    NoAgent(String),
    #[error("a backup of {0} is already running; wait for it to finish")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
}

/// A backup that was started: its id and its events (progress, then one
/// `Done`).
pub struct Started {
    pub id: String,
    pub events: mpsc::Receiver<Result<JobEvent, Status>>,
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

async fn new_row(
    core: &Core,
    target: &str,
    trigger: Trigger,
    label: Option<String>,
    agent: String,
) -> Result<String, StartError> {
    let now = chrono::Utc::now();
    let id = core
        .catalog
        .unused_id(datasaver_common::names::backup_id(target, now))
        .await
        .map_err(|e| StartError::Internal(e.to_string()))?;
    core.catalog
        .insert(BackupRow {
            id: id.clone(),
            target: target.to_string(),
            kind: "logical".into(),
            status: status::RUNNING.into(),
            trigger: trigger.as_str().into(),
            label,
            created_at: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            agent,
            ..Default::default()
        })
        .await
        .map_err(|e| StartError::Internal(e.to_string()))?;
    Ok(id)
}

/// Records an attempt that could not even start (no agent connected), so a
/// missed scheduled backup is visible as a failure, never silently skipped.
pub async fn record_failed_attempt(
    core: &Core,
    target: &str,
    trigger: Trigger,
    error: &str,
) -> Result<String, StartError> {
    let id = new_row(core, target, trigger, None, String::new()).await?;
    core.catalog
        .fail(&id, error, now_rfc3339())
        .await
        .map_err(|e| StartError::Internal(e.to_string()))?;
    core.metrics.backup_failed(target, error);
    core.alerter.wake.notify_one();
    Ok(id)
}

/// Starts a backup of `target` on its agent.
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
    let id = new_row(core, target, trigger, label, agent_name.clone()).await?;
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
        let outcome = if sent.is_err() {
            Err(format!(
                "agent {agent_name} disconnected before the job could be sent"
            ))
        } else {
            let _ = tx
                .send(Ok(progress("started", format!("backup {id} started"))))
                .await;
            wait_result(&mut reports, &tx, &core).await
        };
        core.fleet.remove_job(&job_id);
        let row = core.catalog.get(&id).await.ok().flatten();
        let mut completed = false;
        let event = match (outcome, row) {
            (Ok(_), Some(row)) if row.status == status::COMPLETED => {
                completed = true;
                tracing::info!(backup = %id, "backup completed");
                core.metrics.backup_succeeded(
                    &target,
                    row.duration_ms as f64 / 1000.0,
                    row.stored_bytes,
                    row.raw_bytes,
                );
                done(JobDone {
                    ok: true,
                    message: format!("backup {id} completed"),
                    backup: Some(to_proto(&row)),
                    ..Default::default()
                })
            }
            (outcome, row) => {
                // Prefer the first recorded reason (e.g. the upload's own
                // error) over the agent's summary of it.
                let agent_error = match outcome {
                    Err(e) => e,
                    Ok(_) => "agent reported success but the backup was not stored".into(),
                };
                let _ = core.catalog.fail(&id, &agent_error, now_rfc3339()).await;
                let error = core
                    .catalog
                    .get(&id)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|r| r.error)
                    .or(row.and_then(|r| r.error))
                    .unwrap_or(agent_error);
                tracing::warn!(backup = %id, %error, "backup failed");
                core.metrics.backup_failed(&target, &error);
                failed(format!("backup {id} failed: {error}"))
            }
        };
        let _ = tx.send(Ok(event)).await;
        core.alerter.wake.notify_one();
        // Retention after every successful backup, still holding the target's
        // slot so it never races the next backup of the same target.
        if completed {
            let rotation = tracing::info_span!("rotation", target = %target);
            if let Err(e) = crate::retention::cleanup::run(&core, Some(&target), false)
                .instrument(rotation)
                .await
            {
                tracing::error!(target = %target, error = %e, "cleanup after the backup failed");
            }
        }
    }.instrument(span));
    Ok(Started { id, events: rx })
}

/// Waits for the agent's result, forwarding progress to the operator.
pub async fn wait_result(
    reports: &mut mpsc::Receiver<Report>,
    tx: &mpsc::Sender<Result<JobEvent, Status>>,
    core: &Core,
) -> Result<datasaver_common::proto::JobResult, String> {
    loop {
        let r = tokio::select! {
            _ = core.cancel.cancelled() => return Err("coordinator shutting down".into()),
            r = reports.recv() => r,
        };
        match r {
            None => return Err("job ended without a result".into()),
            Some(Report::Progress(p)) => {
                let _ = tx.try_send(Ok(JobEvent {
                    event: Some(job_event::Event::Progress(p)),
                }));
            }
            Some(Report::Result(r)) if r.ok => return Ok(r),
            Some(Report::Result(r)) => return Err(r.error),
            Some(Report::Lost(why)) => return Err(why),
        }
    }
}
