//! The gRPC service dsctl calls. Long operations (backup, restore, verify)
//! run as detached tasks that own their outcome: an operator who disconnects
//! does not leave a backup half-recorded.

use std::pin::Pin;
use std::sync::Arc;

use datasaver_common::checksum::Checksum;
use datasaver_common::proto::operator_service_server::OperatorService;
use datasaver_common::proto::{
    coordinator_message, job_event, BackupJob, CoordinatorMessage, GetBackupRequest, JobDone,
    JobEvent, JobProgress, ListAgentsRequest, ListAgentsResponse, ListBackupsRequest,
    ListBackupsResponse, RebuildCatalogRequest, RebuildCatalogResponse, RestoreJob, RestoreMode,
    RestoreRequest, StartBackupRequest, VerifyRequest,
};
use datasaver_common::tls::Role;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::catalog::{status, BackupRow};
use crate::fleet::{JobKind, Report};
use crate::{internal, now_rfc3339, peer, to_proto, Core};

pub struct OperatorSvc {
    pub core: Arc<Core>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

fn progress(phase: &str, message: String) -> JobEvent {
    JobEvent {
        event: Some(job_event::Event::Progress(JobProgress {
            phase: phase.into(),
            message,
            ..Default::default()
        })),
    }
}

fn done(d: JobDone) -> JobEvent {
    JobEvent {
        event: Some(job_event::Event::Done(d)),
    }
}

fn failed(error: String) -> JobEvent {
    done(JobDone {
        ok: false,
        error,
        ..Default::default()
    })
}

#[tonic::async_trait]
impl OperatorService for OperatorSvc {
    type StartBackupStream = EventStream;
    type RestoreStream = EventStream;
    type VerifyStream = EventStream;

    async fn list_agents(
        &self,
        req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let who = peer(&req, Role::Operator)?;
        tracing::info!(operator = %who, "list agents");
        Ok(Response::new(ListAgentsResponse {
            agents: self.core.fleet.agents(),
        }))
    }

    async fn list_backups(
        &self,
        req: Request<ListBackupsRequest>,
    ) -> Result<Response<ListBackupsResponse>, Status> {
        let who = peer(&req, Role::Operator)?;
        let target = Some(req.into_inner().target).filter(|t| !t.is_empty());
        tracing::info!(operator = %who, target = ?target, "list backups");
        let rows = self.core.catalog.list(target).await.map_err(internal)?;
        Ok(Response::new(ListBackupsResponse {
            backups: rows.iter().map(to_proto).collect(),
        }))
    }

    async fn get_backup(
        &self,
        req: Request<GetBackupRequest>,
    ) -> Result<Response<datasaver_common::proto::Backup>, Status> {
        let who = peer(&req, Role::Operator)?;
        let id = req.into_inner().id;
        tracing::info!(operator = %who, backup = %id, "get backup");
        let row = self.find(&id).await?;
        Ok(Response::new(to_proto(&row)))
    }

    async fn start_backup(
        &self,
        req: Request<StartBackupRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let who = peer(&req, Role::Operator)?;
        let req = req.into_inner();
        datasaver_common::names::validate_target(&req.target)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (conn_id, agent_name, agent_tx) =
            self.core.fleet.agent_for(&req.target).ok_or_else(|| {
                Status::failed_precondition(format!(
                    "no agent is connected for target {} (see `dsctl agents`)",
                    req.target
                ))
            })?;
        if !self.core.fleet.start_backup_slot(&req.target) {
            return Err(Status::failed_precondition(format!(
                "a backup of {} is already running; wait for it to finish",
                req.target
            )));
        }
        let core = self.core.clone();
        let target = req.target.clone();
        let release = SlotGuard {
            core: core.clone(),
            target: target.clone(),
        };
        let now = chrono::Utc::now();
        let id = core
            .catalog
            .unused_id(datasaver_common::names::backup_id(&target, now))
            .await
            .map_err(internal)?;
        let label = req.label.filter(|l| !l.trim().is_empty());
        core.catalog
            .insert(BackupRow {
                id: id.clone(),
                target: target.clone(),
                kind: "logical".into(),
                status: status::RUNNING.into(),
                trigger: "manual".into(),
                label,
                created_at: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                agent: agent_name.clone(),
                ..Default::default()
            })
            .await
            .map_err(internal)?;
        tracing::info!(operator = %who, target = %target, backup = %id, "backup requested");

        let job_id = format!("job-{}", rand::random::<u64>());
        let mut reports = core.fleet.add_job(
            &job_id,
            JobKind::Backup,
            &target,
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
                    target: target.clone(),
                })),
            }))
            .await;
        tokio::spawn(async move {
            let _release = release;
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
            let event = match (outcome, row) {
                (Ok(_), Some(row)) if row.status == status::COMPLETED => {
                    tracing::info!(backup = %id, "backup completed");
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
                    failed(format!("backup {id} failed: {error}"))
                }
            };
            let _ = tx.send(Ok(event)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn restore(&self, req: Request<RestoreRequest>) -> Result<Response<EventStream>, Status> {
        let who = peer(&req, Role::Operator)?;
        let req = req.into_inner();
        let row = if !req.id.is_empty() {
            self.find(&req.id).await?
        } else if !req.target.is_empty() {
            let at = if req.latest {
                None
            } else if !req.at.is_empty() {
                Some(parse_time(&req.at)?)
            } else {
                return Err(Status::invalid_argument(
                    "with --target, give --latest or --at TIME",
                ));
            };
            self.core
                .catalog
                .latest_completed(&req.target, at.clone())
                .await
                .map_err(internal)?
                .ok_or_else(|| {
                    Status::not_found(match at {
                        Some(at) => format!(
                            "target {} has no completed backup at or before {at}",
                            req.target
                        ),
                        None => format!("target {} has no completed backup", req.target),
                    })
                })?
        } else {
            return Err(Status::invalid_argument(
                "give a backup id, or --target with --latest or --at",
            ));
        };
        if row.status != status::COMPLETED {
            return Err(Status::failed_precondition(format!(
                "backup {} is {}, not completed; it cannot be restored",
                row.id, row.status
            )));
        }
        let mode = if req.dry_run {
            RestoreMode::List
        } else {
            RestoreMode::Restore
        };
        tracing::info!(operator = %who, backup = %row.id, dry_run = req.dry_run, target_db = %req.target_db, "restore requested");
        self.run_agent_read(row, mode, req.target_db, req.force, false)
            .await
    }

    async fn rebuild_catalog(
        &self,
        req: Request<RebuildCatalogRequest>,
    ) -> Result<Response<RebuildCatalogResponse>, Status> {
        let who = peer(&req, Role::Operator)?;
        tracing::info!(operator = %who, "catalog rebuild requested");
        let r = crate::rebuild::rebuild(&self.core)
            .await
            .map_err(Status::unavailable)?;
        for p in &r.problems {
            tracing::warn!(problem = %p, "not imported during catalog rebuild");
        }
        Ok(Response::new(RebuildCatalogResponse {
            imported: r.imported,
            already_known: r.already_known,
            problems: r.problems,
        }))
    }

    async fn verify(&self, req: Request<VerifyRequest>) -> Result<Response<EventStream>, Status> {
        let who = peer(&req, Role::Operator)?;
        let row = self.find(&req.into_inner().id).await?;
        if row.status != status::COMPLETED {
            return Err(Status::failed_precondition(format!(
                "backup {} is {}, not completed; there is nothing to verify",
                row.id, row.status
            )));
        }
        tracing::info!(operator = %who, backup = %row.id, "verify requested");
        self.run_agent_read(row, RestoreMode::List, String::new(), false, true)
            .await
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

fn parse_time(s: &str) -> Result<String, Status> {
    let t = chrono::DateTime::parse_from_rfc3339(s)
        .map(|d| d.with_timezone(&chrono::Utc))
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").map(|n| n.and_utc())
        })
        .or_else(|_| {
            chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .map(|d| d.and_hms_opt(23, 59, 59).unwrap_or_default().and_utc())
        })
        .map_err(|_| {
            Status::invalid_argument(format!(
                "--at {s:?} is not a time (use RFC 3339 like 2024-01-11T02:00:00Z, or 2024-01-11)"
            ))
        })?;
    Ok(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// Waits for the agent's result, forwarding progress to the operator.
async fn wait_result(
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

/// Re-reads a stored object and checks it against the catalog.
pub async fn check_object(core: &Core, row: &BackupRow) -> Result<(), String> {
    let mut stream = core
        .storage
        .get(&row.object_key)
        .await
        .map_err(|e| format!("backup {}: cannot read {}: {e}", row.id, row.object_key))?;
    let mut h = Checksum::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| format!("backup {}: reading {} failed: {e}", row.id, row.object_key))?;
        crate::hash_off_thread(&mut h, chunk).await?;
    }
    let got = h.finish();
    if got != row.checksum || h.len() != row.stored_bytes {
        return Err(format!(
            "backup {} is corrupt: {} has checksum {got} ({} bytes) but {} ({} bytes) was recorded when it was stored",
            row.id,
            row.object_key,
            h.len(),
            row.checksum,
            row.stored_bytes
        ));
    }
    Ok(())
}

impl OperatorSvc {
    async fn find(&self, id: &str) -> Result<BackupRow, Status> {
        datasaver_common::names::validate_backup_id(id).map_err(Status::invalid_argument)?;
        self.core
            .catalog
            .get(id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no backup with id {id} (see `dsctl list`)")))
    }

    /// Restore, dry-run and verify share one shape: check the stored bytes
    /// first (so a corrupt object never reaches a database), then have the
    /// agent stream the object into pg_restore.
    async fn run_agent_read(
        &self,
        row: BackupRow,
        mode: RestoreMode,
        target_db: String,
        force: bool,
        record_verify: bool,
    ) -> Result<Response<EventStream>, Status> {
        let (conn_id, agent_name, agent_tx) = self.core.fleet.agent_for(&row.target).ok_or_else(|| {
            Status::failed_precondition(format!(
                "no agent is connected for target {}; restore and verify run on its agent (see `dsctl agents`)",
                row.target
            ))
        })?;
        let core = self.core.clone();
        let (tx, rx) = mpsc::channel(16);
        let job_id = format!("job-{}", rand::random::<u64>());
        let kind = if mode == RestoreMode::List {
            JobKind::List
        } else {
            JobKind::Restore
        };
        // Registered now so the backup counts as in use from the start.
        let mut reports = core.fleet.add_job(
            &job_id,
            kind,
            &row.target,
            &row.id,
            &row.object_key,
            conn_id,
            &agent_name,
        );
        tokio::spawn(async move {
            let _ = tx
                .send(Ok(progress(
                    "checksum",
                    format!("checking the stored bytes of {}", row.id),
                )))
                .await;
            let result = async {
                if let Err(e) = check_object(&core, &row).await {
                    let next = next_good(&core, &row).await;
                    return Err(format!("{e}; {next}"));
                }
                let _ = tx
                    .send(Ok(progress(
                        "checksum",
                        format!("{} checksum ok ({})", row.id, row.checksum),
                    )))
                    .await;
                let job = RestoreJob {
                    job_id: job_id.clone(),
                    backup_id: row.id.clone(),
                    target: row.target.clone(),
                    mode: mode as i32,
                    target_db: target_db.clone(),
                    force,
                    compression: row.compression.clone(),
                    checksum: row.checksum.clone(),
                    stored_bytes: row.stored_bytes,
                    encrypted: row.encrypted,
                    encryption_recipient: row.encryption_recipient.clone(),
                };
                agent_tx
                    .send(Ok(CoordinatorMessage {
                        msg: Some(coordinator_message::Msg::Restore(job)),
                    }))
                    .await
                    .map_err(|_| format!("agent {agent_name} disconnected"))?;
                wait_result(&mut reports, &tx, &core).await
            }
            .await;
            core.fleet.remove_job(&job_id);
            if record_verify {
                let verdict = match &result {
                    Ok(r) => format!("ok: checksum matches, {} archive entries", r.toc_entries),
                    Err(e) => format!("failed: {e}"),
                };
                let _ = core
                    .catalog
                    .set_verified(&row.id, now_rfc3339(), verdict)
                    .await;
                // keep the meta file in step, so a rebuilt catalog knows it too
                if let Ok(Some(updated)) = core.catalog.get(&row.id).await {
                    let meta = crate::meta::Meta::from_row(&updated).to_json();
                    if let Err(e) = core
                        .storage
                        .put(&updated.meta_key, bytes::Bytes::from(meta))
                        .await
                    {
                        tracing::warn!(backup = %row.id, error = %e, "could not update the meta file with the verify result");
                    }
                }
            }
            let event = match result {
                Ok(r) => {
                    tracing::info!(backup = %row.id, message = %r.message, "agent job finished");
                    let backup = core
                        .catalog
                        .get(&row.id)
                        .await
                        .ok()
                        .flatten()
                        .map(|b| to_proto(&b));
                    done(JobDone {
                        ok: true,
                        message: r.message,
                        backup,
                        target_db: r.target_db,
                        ..Default::default()
                    })
                }
                Err(e) => {
                    tracing::warn!(backup = %row.id, error = %e, "agent job failed");
                    failed(e)
                }
            };
            let _ = tx.send(Ok(event)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Names the newest older backup of the same target whose bytes check out.
async fn next_good(core: &Core, row: &BackupRow) -> String {
    let older = core
        .catalog
        .older_completed(&row.target, &row.id)
        .await
        .unwrap_or_default();
    for candidate in older.iter().take(5) {
        if check_object(core, candidate).await.is_ok() {
            return format!(
                "the next-oldest good backup is {} (dsctl restore {})",
                candidate.id, candidate.id
            );
        }
    }
    format!("no older good backup of {} was found", row.target)
}
