//! The gRPC service dsctl calls: proto in, a domain call (`backups`, `jobs`,
//! `repo`, `schedule`, `health`), proto out. Long operations run as jobs that
//! own their outcome, so an operator who disconnects changes nothing.

use std::pin::Pin;
use std::sync::Arc;

use datasaver_common::proto::operator_service_server::OperatorService;
use datasaver_common::proto::{
    CancelRequest, CancelResponse, CancelledJob, CleanupItem, CleanupRequest, CleanupResponse,
    DeleteBackupRequest, DeleteBackupResponse, ExportChunk, ExportRequest, FloorRaise,
    GetBackupRequest, HealthRequest, HealthResponse, JobEvent, JobQueue, ListAgentsRequest,
    ListAgentsResponse, ListBackupsRequest, ListBackupsResponse, ListTargetsRequest,
    ListTargetsResponse, OpenAlert, PinRequest, RebuildCatalogRequest, RebuildCatalogResponse,
    RestoreRequest, StartBackupRequest, TargetCleanup, TargetHealth, TargetInfoRow, VerifyRequest,
};
use datasaver_common::proto::{
    CreateTokenRequest, CreateTokenResponse, JoinToken, ListTokensRequest, ListTokensResponse,
    RevokeTokenRequest,
};
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{internal, Caller};
use crate::authz::{self, Action, Denied};
use crate::backups::{self, ActionError, Selector};
use crate::fleet::JobKind;
use crate::jobs::{self, Part, Read, StartError};
use crate::{to_proto, Core};

pub struct OperatorSvc {
    pub core: Arc<Core>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl OperatorService for OperatorSvc {
    type StartBackupStream = EventStream;
    type RestoreStream = EventStream;
    type VerifyStream = EventStream;
    type ExportStream = Pin<Box<dyn Stream<Item = Result<ExportChunk, Status>> + Send>>;

    async fn create_token(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let who = self.allow(&req, Action::Tokens, None)?;
        let enrollment = self.enrollment()?;
        let r = req.into_inner();
        let now = self.core.clock.now().timestamp();
        let (token, record) = enrollment
            .create_token(&r.targets, r.ttl_seconds, r.uses, &r.url, who.name(), now)
            .await
            .map_err(super::enrollment::status)?;
        tracing::info!(operator = %who, token = %record.id, targets = ?record.targets, expires = record.expires_at, uses = record.uses_allowed, "join token created");
        Ok(Response::new(CreateTokenResponse {
            token,
            info: Some(token_proto(record)),
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        self.allow(&req, Action::Tokens, None)?;
        let enrollment = self.enrollment()?;
        let tokens = enrollment.tokens.list().await.map_err(internal)?;
        Ok(Response::new(ListTokensResponse {
            tokens: tokens.into_iter().map(token_proto).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<RevokeTokenRequest>,
    ) -> Result<Response<JoinToken>, Status> {
        let who = self.allow(&req, Action::Tokens, None)?;
        let enrollment = self.enrollment()?;
        let id = req.into_inner().id;
        let now = self.core.clock.now().timestamp();
        match enrollment
            .tokens
            .revoke(id.trim(), now)
            .await
            .map_err(internal)?
        {
            Some(t) => {
                tracing::info!(operator = %who, token = %t.id, "join token revoked");
                Ok(Response::new(token_proto(t)))
            }
            None => Err(Status::not_found(format!(
                "no join token {:?} (see `dsctl tokens list`)",
                datasaver_common::text::sanitize(&id, 40)
            ))),
        }
    }

    async fn export(
        &self,
        req: Request<ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        use datasaver_common::proto::export_chunk::Msg;
        use futures::StreamExt;
        let who = Caller::of(&req)?;
        let req = req.into_inner();
        let id = req.id;
        let row = self.find_for(&who, Action::Export, &id).await?;
        tracing::info!(operator = %who, backup = %id, part = %req.part, "export started");
        let part = (!req.part.is_empty()).then_some(req.part.as_str());
        // Retention and `dsctl delete` keep it while the export reads it.
        let in_use = self.core.fleet.exporting(&row.id);
        let bytes = self
            .core
            .repo
            .open_verified(&row, part)
            .await
            .map_err(|e| match e {
                crate::repo::RepoError::Conflict(m) => Status::failed_precondition(m),
                crate::repo::RepoError::NotFound(m) => Status::not_found(m),
                e => Status::unavailable(e.to_string()),
            })?;
        let first = ExportChunk {
            msg: Some(Msg::Backup(to_proto(&row))),
        };
        let rest = bytes.map(move |r| {
            // Held by the stream: dropped with it, however the export ends.
            let _in_use = &in_use;
            match r {
                Ok(data) => Ok(ExportChunk {
                    msg: Some(Msg::Data(data.to_vec())),
                }),
                Err(crate::repo::ReadError::Corrupt(m)) => Err(Status::data_loss(m)),
                Err(crate::repo::ReadError::Storage(m)) => Err(Status::unavailable(m)),
            }
        });
        Ok(Response::new(Box::pin(
            futures::stream::once(async move { Ok(first) }).chain(rest),
        )))
    }

    async fn list_agents(
        &self,
        req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let who = self.allow(&req, Action::ListAgents, None)?;
        tracing::info!(operator = %who, "list agents");
        let mut agents = self.core.fleet.agents();
        // A scoped operator sees the agents of its targets, and only those
        // targets of theirs.
        for a in &mut agents {
            a.targets.retain(|t| who.identity.in_scope(t));
        }
        agents.retain(|a| !a.targets.is_empty() || who.identity.unscoped());
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn list_backups(
        &self,
        req: Request<ListBackupsRequest>,
    ) -> Result<Response<ListBackupsResponse>, Status> {
        let target = Some(req.get_ref().target.clone()).filter(|t| !t.is_empty());
        let who = self.allow(&req, Action::List, target.as_deref())?;
        tracing::info!(operator = %who, target = ?target, "list backups");
        let rows = self
            .core
            .repo
            .list(target.as_deref())
            .await
            .map_err(internal)?;
        Ok(Response::new(ListBackupsResponse {
            backups: rows
                .iter()
                .filter(|b| who.identity.in_scope(&b.target))
                .map(to_proto)
                .collect(),
        }))
    }

    async fn get_backup(
        &self,
        req: Request<GetBackupRequest>,
    ) -> Result<Response<datasaver_common::proto::Backup>, Status> {
        let who = Caller::of(&req)?;
        let id = req.into_inner().id;
        tracing::info!(operator = %who, backup = %id, "get backup");
        let row = self.find_for(&who, Action::Get, &id).await?;
        let mut b = to_proto(&row);
        match self.core.repo.database_changes(&row).await {
            Ok((appeared, gone)) => {
                b.databases_appeared = appeared;
                b.databases_disappeared = gone;
            }
            Err(e) => {
                tracing::warn!(backup = %id, error = %e, "could not compare the backup's databases with the previous backup's")
            }
        }
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
        let who = self.allow(&req, Action::Backup, Some(&req.get_ref().target))?;
        let req = req.into_inner();
        datasaver_common::names::validate_target(&req.target)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(operator = %who, target = %req.target, "backup requested");
        // Manual backups wait in the same queue as scheduled ones, under the
        // same limit; the stream says `queued (N ahead)` meanwhile.
        let events = self
            .core
            .scheduler
            .request_backup(
                &self.core,
                &req.target,
                req.label,
                if req.physical {
                    crate::repo::Kind::Base
                } else {
                    crate::repo::Kind::Logical
                },
            )
            .map_err(start_status)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }

    async fn restore(&self, req: Request<RestoreRequest>) -> Result<Response<EventStream>, Status> {
        let who = Caller::of(&req)?;
        let req = req.into_inner();
        if req.physical {
            return self.restore_physical(who, req).await;
        }
        let part = Part::new(
            req.tables.clone(),
            req.schemas.clone(),
            req.into_existing,
            req.force,
            req.dry_run,
        )
        .map_err(Status::invalid_argument)?
        .of_database(&req.database);
        // Over or into an existing database is the admin's call; into a new
        // one, or only checking the archive, the operator's.
        let action = if req.force && !req.dry_run {
            Action::RestoreForce
        } else if part.into_existing {
            Action::RestoreIntoExisting
        } else {
            Action::Restore
        };
        if req.id.is_empty() && !req.target.is_empty() {
            self.allow_caller(&who, action, Some(&req.target))?;
        }
        let sel = if !req.id.is_empty() {
            Selector::Id(req.id.clone())
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
            Selector::Latest {
                target: req.target.clone(),
                at,
            }
        } else {
            return Err(Status::invalid_argument(
                "give a backup id, or --target with --latest or --at",
            ));
        };
        if let Selector::Id(id) = &sel {
            self.find_for(&who, action, id).await?;
        }
        let row = backups::pick(&self.core, &sel, "restored")
            .await
            .map_err(action_status)?;
        part.databases_of(&row, &req.target_db)
            .map_err(Status::invalid_argument)?;
        let read = if req.dry_run {
            Read::DryRun { part }
        } else {
            Read::Restore {
                target_db: req.target_db.clone(),
                force: req.force,
                part,
            }
        };
        tracing::info!(operator = %who, backup = %row.id, dry_run = req.dry_run, target_db = %req.target_db, tables = ?req.tables, schemas = ?req.schemas, into_existing = req.into_existing, "restore requested");
        let started = jobs::start_read(&self.core, row, read).map_err(start_status)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(started.events))))
    }

    async fn rebuild_catalog(
        &self,
        req: Request<RebuildCatalogRequest>,
    ) -> Result<Response<RebuildCatalogResponse>, Status> {
        let who = self.allow(&req, Action::RebuildCatalog, None)?;
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
        crate::agents::restore_owners(&self.core).await;
        Ok(Response::new(RebuildCatalogResponse {
            imported: r.imported,
            already_known: r.already_known,
            problems: r.problems,
        }))
    }

    async fn verify(&self, req: Request<VerifyRequest>) -> Result<Response<EventStream>, Status> {
        let who = Caller::of(&req)?;
        let req = req.into_inner();
        let found = self.find_for(&who, Action::Verify, &req.id).await?;
        if found.kind == crate::repo::Kind::Base && !req.restore {
            return self.verify_base(who, found).await;
        }
        let sel = Selector::Id(req.id);
        let row = backups::pick(&self.core, &sel, "verified")
            .await
            .map_err(action_status)?;
        tracing::info!(operator = %who, backup = %row.id, drill = req.restore, "verify requested");
        let read = if req.restore {
            Read::Drill
        } else {
            Read::Verify
        };
        let started = jobs::start_read(&self.core, row, read).map_err(start_status)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(started.events))))
    }

    async fn cleanup(
        &self,
        req: Request<CleanupRequest>,
    ) -> Result<Response<CleanupResponse>, Status> {
        let who = Caller::of(&req)?;
        let req = req.into_inner();
        let target = Some(req.target).filter(|t| !t.is_empty());
        let action = if req.dry_run {
            Action::CleanupDryRun
        } else {
            Action::Cleanup
        };
        self.allow_caller(&who, action, target.as_deref())?;
        tracing::info!(operator = %who, target = ?target, dry_run = req.dry_run, "cleanup requested");
        let r = backups::cleanup(&self.core, target.as_deref(), req.dry_run)
            .await
            .map_err(action_status)?;
        let targets = r
            .plans
            .iter()
            .map(|p| TargetCleanup {
                target: p.target.clone(),
                policy: p.policy_text(),
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
        let who = Caller::of(&req)?;
        let req = req.into_inner();
        self.find_for(&who, Action::Pin, &req.id).await?;
        let updated = self
            .core
            .repo
            .set_pinned(&req.id, req.pinned)
            .await
            .map_err(|e| action_status(e.into()))?;
        tracing::info!(operator = %who, backup = %updated.id, pinned = req.pinned, "pin changed");
        Ok(Response::new(to_proto(&updated)))
    }

    async fn delete_backup(
        &self,
        req: Request<DeleteBackupRequest>,
    ) -> Result<Response<DeleteBackupResponse>, Status> {
        let who = Caller::of(&req)?;
        let req = req.into_inner();
        self.find_for(&who, Action::Delete, &req.id).await?;
        let id = backups::delete(&self.core, &req.id, req.force, who.name())
            .await
            .map_err(action_status)?;
        Ok(Response::new(DeleteBackupResponse { id }))
    }

    async fn list_wal(
        &self,
        req: Request<datasaver_common::proto::ListWalRequest>,
    ) -> Result<Response<datasaver_common::proto::ListWalResponse>, Status> {
        use datasaver_common::proto::{WalTarget, WalTimeline};
        use datasaver_common::wal::Lsn;
        let target = req.get_ref().target.clone();
        let target = (!target.is_empty()).then_some(target);
        let who = self.allow(&req, Action::Wal, target.as_deref())?;
        let rows = crate::wal::view::targets(&self.core, target.as_deref())
            .await
            .map_err(internal)?
            .into_iter()
            .filter(|t| who.identity.in_scope(&t.target))
            .map(|t| WalTarget {
                target: t.target,
                system_identifier: t.system_identifier,
                bound_at: t.bound_at,
                streaming: t.streaming,
                timelines: t
                    .timelines
                    .into_iter()
                    .map(|l| WalTimeline {
                        timeline: l.timeline,
                        first_segment: l.first.unwrap_or_default(),
                        last_segment: l.last.unwrap_or_default(),
                        segments: l.segments,
                        gaps: l
                            .gaps
                            .into_iter()
                            .map(|(a, b)| format!("{a}..{b}"))
                            .collect(),
                        partial: l.partial.unwrap_or_default(),
                        stored_bytes: l.stored_bytes,
                    })
                    .collect(),
                stored_end_lsn: Lsn(t.stored_end).to_string(),
                server_lsn: t.server_lsn.map(|l| Lsn(l).to_string()).unwrap_or_default(),
                lag_bytes: t.lag_bytes.unwrap_or(0),
                last_stored_at: t
                    .last_stored_at
                    .map(crate::alerts::stamp)
                    .unwrap_or_default(),
                lag_seconds: t.lag_seconds.unwrap_or(0),
                refused: t
                    .refused
                    .map(|(s, at)| format!("cluster {s} at {at}"))
                    .unwrap_or_default(),
                conflict: t
                    .conflict
                    .map(|(m, at)| format!("{m} (at {at})"))
                    .unwrap_or_default(),
                latest_recoverable: t
                    .latest_recoverable
                    .map(crate::alerts::stamp)
                    .unwrap_or_default(),
                earliest_recoverable: t
                    .earliest_recoverable
                    .map(crate::alerts::stamp)
                    .unwrap_or_default(),
                slot_status: t.slot_status.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(datasaver_common::proto::ListWalResponse {
            targets: rows,
        }))
    }

    async fn rebind_target(
        &self,
        req: Request<datasaver_common::proto::RebindTargetRequest>,
    ) -> Result<Response<datasaver_common::proto::RebindTargetResponse>, Status> {
        let target = req.get_ref().target.clone();
        let who = self.allow(&req, Action::Rebind, Some(&target))?;
        let old = self
            .core
            .wal_index
            .unbind(&target)
            .await
            .map_err(internal)?
            .filter(|b| !b.system_identifier.is_empty())
            .ok_or_else(|| {
                Status::not_found(format!(
                    "target {target} is not bound to a cluster (it streams no WAL yet)"
                ))
            })?;
        tracing::warn!(operator = %who, target = %target, previous = %old.system_identifier, "target released from its cluster: the next one to stream starts a new WAL series");
        Ok(Response::new(
            datasaver_common::proto::RebindTargetResponse {
                previous_system_identifier: old.system_identifier,
            },
        ))
    }

    async fn list_targets(
        &self,
        req: Request<ListTargetsRequest>,
    ) -> Result<Response<ListTargetsResponse>, Status> {
        let who = self.allow(&req, Action::Targets, None)?;
        let rows = crate::agents::targets(&self.core)
            .await
            .map_err(internal)?
            .into_iter()
            .filter(|t| who.identity.in_scope(&t.name))
            .map(|t| TargetInfoRow {
                name: t.name,
                agent: t.agent,
                connected: t.connected,
                last_contact: t.last_contact.unwrap_or_default(),
                cert_expires: t.cert_expires.unwrap_or_default(),
                first_seen: t.first_seen,
            })
            .collect();
        Ok(Response::new(ListTargetsResponse { targets: rows }))
    }

    async fn cancel(
        &self,
        req: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let who = Caller::of(&req)?;
        let req = req.into_inner();
        let which = match (req.id.trim(), req.target.trim()) {
            (id, "") if !id.is_empty() => jobs::Which::Id(id.to_string()),
            ("", t) if !t.is_empty() => jobs::Which::Target(t.to_string()),
            _ => {
                return Err(Status::invalid_argument(
                    "give a job or backup id, or --target T",
                ))
            }
        };
        let target = match &which {
            jobs::Which::Target(t) => Some(t.as_str()),
            jobs::Which::Id(_) => None,
        };
        self.allow_caller(&who, Action::Cancel, target)?;
        tracing::info!(operator = %who, which = ?which, "cancel requested");
        let reason = format!("cancelled by {} {}", who.identity.role.as_str(), who.name());
        let visible = |t: &str| who.identity.in_scope(t);
        let jobs = jobs::cancel_running(&self.core, &which, &visible, &reason, CANCEL_WAIT)
            .await
            .map_err(|e| Status::not_found(e.to_string()))?;
        Ok(Response::new(CancelResponse {
            jobs: jobs
                .into_iter()
                .map(|(job_id, j)| CancelledJob {
                    job_id,
                    kind: match j.kind {
                        JobKind::Backup => "backup",
                        JobKind::Restore => "restore",
                        JobKind::List => "verify",
                    }
                    .into(),
                    target: j.target,
                    backup_id: j.backup_id,
                })
                .collect(),
        }))
    }

    async fn health(
        &self,
        req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let who = self.allow(&req, Action::Health, None)?;
        let mut r = crate::health::report(&self.core)
            .await
            .map_err(Status::unavailable)?;
        if !who.identity.unscoped() {
            // The verdict a scoped operator sees is about its targets only.
            r.targets.retain(|t| who.identity.in_scope(&t.target));
            r.status = r
                .targets
                .iter()
                .map(|t| t.status)
                .max()
                .unwrap_or(crate::health::Level::Healthy);
        }
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
                drill_schedule: t.drill_schedule.unwrap_or_default(),
                last_drill_success_at: t.last_drill_success_at,
                recovery_from: t
                    .recovery_window
                    .as_ref()
                    .map(|w| w.from.clone())
                    .unwrap_or_default(),
                recovery_to: t
                    .recovery_window
                    .as_ref()
                    .map(|w| w.to.clone())
                    .unwrap_or_default(),
                backups: t.backups,
                stored_bytes: t.stored_bytes,
                agent_connected: t.agent_connected,
                missed_slots: t.missed_slots,
                raised_to_floor: t
                    .raised_to_floor
                    .into_iter()
                    .map(|r| FloorRaise {
                        setting: r.setting,
                        asked: r.asked,
                        floor: r.floor,
                        message: r.message,
                    })
                    .collect(),
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

/// How long `Cancel` waits for the cancelled jobs to record their outcome
/// (the agent is given 5 s to take the CancelJob).
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

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
    /// `dsctl verify` of a base backup: its object and every WAL file from
    /// its start to the end of what is stored, read and checked by the
    /// agent; a missing file fails it here, named.
    async fn verify_base(
        &self,
        who: Caller,
        row: crate::repo::BackupRecord,
    ) -> Result<Response<EventStream>, Status> {
        use crate::wal::restore::{Goal, Refused};
        if row.status != crate::repo::Status::Completed {
            return Err(Status::failed_precondition(format!(
                "backup {} is {}, not completed; it cannot be verified",
                row.id, row.status
            )));
        }
        let plan =
            match crate::wal::restore::plan(&self.core, &row.target, Some(&row.id), Goal::Latest)
                .await
            {
                Ok(p) => p,
                Err(Refused::Refused(m)) => {
                    let _ = self.core.repo.record_verification(&row.id, false, &m).await;
                    return Err(Status::failed_precondition(format!(
                        "verify of {} failed: {m}",
                        row.id
                    )));
                }
                Err(Refused::NotFound(m)) => return Err(Status::not_found(m)),
                Err(Refused::Unavailable(m)) => return Err(Status::unavailable(m)),
            };
        tracing::info!(operator = %who, backup = %row.id, wal_files = plan.wal.len(), "verify of a base backup requested");
        let read = Read::Physical {
            plan: Box::new(plan),
            data_dir: String::new(),
            force: false,
            verify: true,
        };
        let started = jobs::start_read(&self.core, row, read).map_err(start_status)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(started.events))))
    }

    /// `dsctl restore --physical`: the plan is made and proven here, before
    /// the agent is asked to write anything.
    async fn restore_physical(
        &self,
        who: Caller,
        req: RestoreRequest,
    ) -> Result<Response<EventStream>, Status> {
        use crate::wal::restore::{Goal, Refused};
        if req.data_dir.is_empty() {
            return Err(Status::invalid_argument(
                "--physical needs --data-dir DIR (on the agent's host)",
            ));
        }
        if req.dry_run
            || !req.tables.is_empty()
            || !req.schemas.is_empty()
            || !req.target_db.is_empty()
            || !req.database.is_empty()
        {
            return Err(Status::invalid_argument(
                "--physical restores the whole cluster: --dry-run, --table, --schema, --target-db and --database do not apply",
            ));
        }
        let action = if req.force {
            Action::RestoreForce
        } else {
            Action::Restore
        };
        let (target, base_id, goal) = if !req.id.is_empty() {
            if req.latest || !req.at.is_empty() || !req.lsn.is_empty() {
                return Err(Status::invalid_argument(
                    "a base backup's id restores to its end; for --at, --lsn or --latest give --target instead",
                ));
            }
            let row = self.find_for(&who, action, &req.id).await?;
            if row.kind != crate::repo::Kind::Base {
                return Err(Status::failed_precondition(format!(
                    "backup {} is a dump, not a base backup: restore it without --physical",
                    row.id
                )));
            }
            (row.target.clone(), Some(row.id.clone()), Goal::BaseEnd)
        } else if !req.target.is_empty() {
            self.allow_caller(&who, action, Some(&req.target))?;
            let goal = if req.latest {
                Goal::Latest
            } else if !req.at.is_empty() {
                Goal::Time(parse_time(&req.at)?)
            } else if !req.lsn.is_empty() {
                Goal::Lsn(
                    datasaver_common::wal::Lsn::parse(&req.lsn)
                        .map_err(|e| Status::invalid_argument(format!("--lsn: {e}")))?,
                )
            } else {
                return Err(Status::invalid_argument(
                    "with --target, give --latest, --at TIME or --lsn LSN",
                ));
            };
            (req.target.clone(), None, goal)
        } else {
            return Err(Status::invalid_argument(
                "give a base backup's id, or --target with --latest, --at or --lsn",
            ));
        };
        let plan = crate::wal::restore::plan(&self.core, &target, base_id.as_deref(), goal)
            .await
            .map_err(|e| match e {
                Refused::NotFound(m) => Status::not_found(m),
                Refused::Refused(m) => Status::failed_precondition(m),
                Refused::Unavailable(m) => Status::unavailable(m),
            })?;
        tracing::info!(operator = %who, target = %target, base = %plan.base.id, wal_files = plan.wal.len(), upto = %plan.upto, data_dir = %req.data_dir, "physical restore requested");
        let row = plan.base.clone();
        let read = Read::Physical {
            plan: Box::new(plan),
            data_dir: req.data_dir.clone(),
            force: req.force,
            verify: false,
        };
        let started = jobs::start_read(&self.core, row, read).map_err(start_status)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(started.events))))
    }

    async fn find(&self, id: &str) -> Result<crate::repo::BackupRecord, Status> {
        backups::find(&self.core, id).await.map_err(action_status)
    }

    /// The backup `id`, if `who` may do `action` to it; outside the caller's
    /// scope it is "not found", as if it did not exist.
    async fn find_for(
        &self,
        who: &Caller,
        action: Action,
        id: &str,
    ) -> Result<crate::repo::BackupRecord, Status> {
        self.allow_caller(who, action, None)?;
        let row = self.find(id).await?;
        authz::check_object(&self.core, &who.identity, action, &row.target, || {
            crate::repo::RepoError::NotFound(id.to_string()).to_string()
        })
        .map_err(denied_status)?;
        Ok(row)
    }

    /// The caller of `req`, if it may do `action` (on `target`).
    fn allow<T>(
        &self,
        req: &Request<T>,
        action: Action,
        target: Option<&str>,
    ) -> Result<Caller, Status> {
        let who = Caller::of(req)?;
        self.allow_caller(&who, action, target)?;
        Ok(who)
    }

    fn enrollment(&self) -> Result<Arc<crate::enrollment::Enrollment>, Status> {
        self.core.enrollment.clone().ok_or_else(|| {
            Status::failed_precondition(
                "this coordinator has no enrollment CA: create one with `dsctl certs init --enrollment` and set DATASAVER_ENROLLMENT_CA_CERT and DATASAVER_ENROLLMENT_CA_KEY",
            )
        })
    }

    fn allow_caller(
        &self,
        who: &Caller,
        action: Action,
        target: Option<&str>,
    ) -> Result<(), Status> {
        authz::check(&self.core, &who.identity, action, target).map_err(denied_status)
    }
}

fn token_proto(t: crate::tokens::TokenRecord) -> JoinToken {
    JoinToken {
        id: t.id,
        targets: t.targets,
        created_unix: t.created_at,
        expires_unix: t.expires_at,
        uses_allowed: t.uses_allowed,
        uses: t.uses,
        revoked_unix: t.revoked_at.unwrap_or(0),
        created_by: t.created_by,
        agents: t.agents,
        last_used_unix: t.last_used_at.unwrap_or(0),
    }
}

fn denied_status(d: Denied) -> Status {
    match d {
        Denied::Role(m) | Denied::Scope(m) => Status::permission_denied(m),
        Denied::Hidden(m) => Status::not_found(m),
    }
}

/// A refused or failed operator action as a gRPC status.
fn action_status(e: ActionError) -> Status {
    match e {
        ActionError::Invalid(m) => Status::invalid_argument(m),
        ActionError::NotFound(m) => Status::not_found(m),
        ActionError::Refused(m) => Status::failed_precondition(m),
        ActionError::Unavailable(m) => Status::unavailable(m),
    }
}

/// A job that could not start as a gRPC status.
fn start_status(e: StartError) -> Status {
    match e {
        StartError::NoAgent(_) | StartError::Busy(_) => Status::failed_precondition(e.to_string()),
        StartError::Internal(m) => Status::internal(m),
    }
}
