//! The gRPC service dsctl calls. Long operations (backup, restore, verify)
//! run as detached tasks that own their outcome: an operator who disconnects
//! does not leave a backup half-recorded.

use std::pin::Pin;
use std::sync::Arc;

use datasaver_common::proto::operator_service_server::OperatorService;
use datasaver_common::proto::{
    coordinator_message, CleanupItem, CleanupRequest, CleanupResponse, CoordinatorMessage,
    DeleteBackupRequest, DeleteBackupResponse, GetBackupRequest, HealthRequest, HealthResponse,
    JobDone, JobEvent, JobQueue, ListAgentsRequest, ListAgentsResponse, ListBackupsRequest,
    ListBackupsResponse, OpenAlert, PinRequest, RebuildCatalogRequest, RebuildCatalogResponse,
    RestoreJob, RestoreMode, RestoreRequest, StartBackupRequest, TargetCleanup, TargetHealth,
    VerifyRequest,
};
use datasaver_common::tls::Role;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::fleet::JobKind;
use crate::jobs::{self, done, failed, progress, wait_result, JobFailure, StartError};
use crate::repo::{self, BackupRecord, RepoError};
use crate::{internal, peer, to_proto, Core};

pub struct OperatorSvc {
    pub core: Arc<Core>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

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
        let rows = self
            .core
            .repo
            .list(target.as_deref())
            .await
            .map_err(internal)?;
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
        let mut b = to_proto(&row);
        b.next_backup_at = self
            .core
            .scheduler
            .next_run(&row.target)
            .map(crate::rfc3339);
        Ok(Response::new(b))
    }

    async fn start_backup(
        &self,
        req: Request<StartBackupRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let who = peer(&req, Role::Operator)?;
        let req = req.into_inner();
        datasaver_common::names::validate_target(&req.target)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(operator = %who, target = %req.target, "backup requested");
        // Manual backups wait in the same queue as scheduled ones, under the
        // same limit; the stream says `queued (N ahead)` meanwhile.
        let events = self
            .core
            .scheduler
            .request_backup(&self.core, &req.target, req.label)
            .map_err(|e| match e {
                StartError::NoAgent(_) | StartError::Busy(_) => {
                    Status::failed_precondition(e.to_string())
                }
                StartError::Internal(m) => Status::internal(m),
            })?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
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
                .repo
                .latest_completed(&req.target, at)
                .await
                .map_err(internal)?
                .ok_or_else(|| {
                    Status::not_found(match at {
                        Some(at) => format!(
                            "target {} has no completed backup at or before {}",
                            req.target,
                            crate::rfc3339(at)
                        ),
                        None => format!("target {} has no completed backup", req.target),
                    })
                })?
        } else {
            return Err(Status::invalid_argument(
                "give a backup id, or --target with --latest or --at",
            ));
        };
        if row.status != repo::Status::Completed {
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
        let r = self
            .core
            .repo
            .rebuild()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
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
        if row.status != repo::Status::Completed {
            return Err(Status::failed_precondition(format!(
                "backup {} is {}, not completed; there is nothing to verify",
                row.id, row.status
            )));
        }
        tracing::info!(operator = %who, backup = %row.id, "verify requested");
        self.run_agent_read(row, RestoreMode::List, String::new(), false, true)
            .await
    }

    async fn cleanup(
        &self,
        req: Request<CleanupRequest>,
    ) -> Result<Response<CleanupResponse>, Status> {
        let who = peer(&req, Role::Operator)?;
        let req = req.into_inner();
        let target = Some(req.target).filter(|t| !t.is_empty());
        if let Some(t) = &target {
            datasaver_common::names::validate_target(t)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        tracing::info!(operator = %who, target = ?target, dry_run = req.dry_run, "cleanup requested");
        let r = crate::retention::cleanup::run(&self.core, target.as_deref(), req.dry_run)
            .await
            .map_err(Status::unavailable)?;
        let targets = r
            .plans
            .iter()
            .map(|p| TargetCleanup {
                target: p.target.clone(),
                policy: crate::retention::cleanup::describe_policy(&p.policy),
                items: p
                    .decisions
                    .iter()
                    .map(|(row, d)| CleanupItem {
                        id: row.id.clone(),
                        created_at: crate::repo::record::format_time(row.created_at),
                        status: row.status.as_str().into(),
                        keep: d.keep,
                        reasons: d.reasons.iter().map(|r| r.to_string()).collect(),
                        tags: d.tags.iter().map(|t| t.as_str().to_string()).collect(),
                        label: row.label.clone(),
                        pinned: row.pinned,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(CleanupResponse {
            targets,
            dry_run: req.dry_run,
            deleted: r.deleted,
            finished: r.finished,
            errors: r.errors,
        }))
    }

    async fn pin(
        &self,
        req: Request<PinRequest>,
    ) -> Result<Response<datasaver_common::proto::Backup>, Status> {
        let who = peer(&req, Role::Operator)?;
        let req = req.into_inner();
        let updated = self
            .core
            .repo
            .set_pinned(&req.id, req.pinned)
            .await
            .map_err(repo_status)?;
        tracing::info!(operator = %who, backup = %updated.id, pinned = req.pinned, "pin changed");
        Ok(Response::new(to_proto(&updated)))
    }

    async fn delete_backup(
        &self,
        req: Request<DeleteBackupRequest>,
    ) -> Result<Response<DeleteBackupResponse>, Status> {
        let who = peer(&req, Role::Operator)?;
        let req = req.into_inner();
        let row = self.find(&req.id).await?;
        if row.pinned {
            return Err(Status::failed_precondition(format!(
                "backup {} is pinned; `dsctl unpin {}` first",
                row.id, row.id
            )));
        }
        if row.status == repo::Status::Running {
            return Err(Status::failed_precondition(format!(
                "backup {} is still running",
                row.id
            )));
        }
        if self.core.fleet.backups_in_use().contains(&row.id) {
            return Err(Status::failed_precondition(format!(
                "backup {} is in use by a restore or verify",
                row.id
            )));
        }
        if row.status == repo::Status::Completed && !req.force {
            let newest = self
                .core
                .repo
                .latest_completed(&row.target, None)
                .await
                .map_err(internal)?;
            if newest.is_some_and(|n| n.id == row.id) {
                return Err(Status::failed_precondition(format!(
                    "backup {} is the newest completed backup of {}; add --force to delete it anyway",
                    row.id, row.target
                )));
            }
        }
        tracing::info!(operator = %who, backup = %row.id, force = req.force, "delete requested");
        let reason = format!("deleted by operator {}", who.name);
        match self.core.repo.delete(&row, &reason).await {
            Ok(true) => Ok(Response::new(DeleteBackupResponse { id: row.id })),
            Ok(false) => Err(Status::failed_precondition(format!(
                "backup {} changed meanwhile (pinned?); nothing deleted",
                row.id
            ))),
            Err(e) => Err(Status::unavailable(format!(
                "backup {} is marked for deletion but {e}; `dsctl cleanup` finishes it",
                row.id
            ))),
        }
    }

    async fn health(
        &self,
        req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let _who = peer(&req, Role::Operator)?;
        let r = crate::health::report(&self.core)
            .await
            .map_err(Status::unavailable)?;
        let targets = r
            .targets
            .into_iter()
            .map(|t| TargetHealth {
                target: t.target,
                schedule: t.schedule.unwrap_or_default(),
                next_backup_at: t.next_backup_at,
                last_backup_at: t.last_backup_at,
                last_backup_id: t.last_backup_id,
                last_backup_status: t.last_backup_status,
                last_backup_error: t.last_backup_error,
                last_success_at: t.last_success_at,
                backups: t.backups,
                stored_bytes: t.stored_bytes,
                agent_connected: t.agent_connected,
                missed_slots: t.missed_slots,
                status: t.status.as_str().into(),
                status_reason: t.status_reason,
                alerts: t
                    .alerts
                    .into_iter()
                    .map(|a| OpenAlert {
                        event: a.event,
                        message: a.message,
                        since: a.since,
                        backup_id: a.backup_id,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(HealthResponse {
            targets,
            time_zone: r.time_zone,
            status: r.status.as_str().into(),
            agents_connected: r.agents_connected as u32,
            queue: Some(JobQueue {
                running: r.queue.running as u32,
                waiting: r.queue.waiting as u32,
                limit: r.queue.limit as u32,
            }),
        }))
    }
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, Status> {
    chrono::DateTime::parse_from_rfc3339(s)
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
        })
}

impl OperatorSvc {
    async fn find(&self, id: &str) -> Result<BackupRecord, Status> {
        datasaver_common::names::validate_backup_id(id).map_err(Status::invalid_argument)?;
        self.core.repo.find(id).await.map_err(repo_status)
    }

    /// Restore, dry-run and verify share one shape: the agent streams the
    /// object once into pg_restore, checking its checksum on the way (a
    /// corrupt object never commits anything and is reported with the next
    /// good backup).
    async fn run_agent_read(
        &self,
        row: BackupRecord,
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
        let span = tracing::info_span!(
            "restore",
            target = %row.target,
            backup = %row.id,
            mode = if record_verify { "verify" } else if mode == RestoreMode::List { "list" } else { "restore" }
        );
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
            // The object is read once: the agent checks its checksum as the
            // bytes arrive and holds back the archive's tail until it
            // matches, so a corrupt object never commits anything.
            let _ = tx
                .send(Ok(progress(
                    "download",
                    format!(
                        "reading {} from storage; the agent checks it against {} as it arrives",
                        row.id, row.checksum
                    ),
                )))
                .await;
            let result = async {
                let job = RestoreJob {
                    trace_context: datasaver_common::telemetry::context_of(&tracing::Span::current()),
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
                    .map_err(|_| JobFailure::failed(format!("agent {agent_name} disconnected")))?;
                let expected = jobs::Expected { raw: 0, stored: row.stored_bytes };
                wait_result(&mut reports, &tx, &core, expected).await
            }
            .await;
            core.fleet.remove_job(&job_id);
            if record_verify {
                core.metrics.verify_finished(&row.target, result.is_ok());
            } else if mode == RestoreMode::Restore {
                core.metrics.restore_finished(&row.target, result.is_ok());
            }
            let corrupt = matches!(&result, Err(f) if f.corrupt);
            // A verify, and any read that found the object corrupt, is kept
            // with the backup (catalog and meta file), so the next restore
            // and `dsctl list` know.
            if record_verify || corrupt {
                let (ok, detail) = match &result {
                    Ok(r) => (true, format!("checksum matches, {} archive entries", r.toc_entries)),
                    Err(f) => (false, f.message.clone()),
                };
                if let Err(e) = core.repo.record_verification(&row.id, ok, &detail).await {
                    tracing::warn!(backup = %row.id, error = %e, "could not record the verify result");
                }
            }
            let result = match result {
                Err(f) if f.corrupt => Err(format!("{}; {}", f.message, next_good(&core, &row).await)),
                Err(f) => Err(f.message),
                Ok(r) => Ok(r),
            };
            let event = match result {
                Ok(r) => {
                    tracing::info!(backup = %row.id, message = %r.message, "agent job finished");
                    let backup = core
                        .repo
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
            core.alerter.wake.notify_one();
        }.instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Names the backup to restore instead of a corrupt one, from the catalog
/// alone (no extra reads), saying whether it was verified.
async fn next_good(core: &Core, row: &BackupRecord) -> String {
    match core.repo.next_good(row).await {
        Ok(Some(b)) => match &b.verification {
            Some(v) if v.ok => format!(
                "the next-oldest good backup is {} (verified {}; dsctl restore {})",
                b.id,
                crate::rfc3339(v.at),
                b.id
            ),
            _ => format!(
                "the next-oldest good backup is {} (not verified since it was stored: `dsctl verify {}`, then `dsctl restore {}`)",
                b.id, b.id, b.id
            ),
        },
        Ok(None) => format!("no older good backup of {} is known", row.target),
        Err(e) => format!("the catalog could not name an older backup: {e}"),
    }
}

/// A repository error as a gRPC status.
fn repo_status(e: RepoError) -> Status {
    match e {
        RepoError::NotFound(_) => Status::not_found(e.to_string()),
        RepoError::Conflict(_) => Status::failed_precondition(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}
