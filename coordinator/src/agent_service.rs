//! The gRPC service agents call: the control stream, uploads and downloads.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use datasaver_common::checksum::Checksum;
use datasaver_common::codec::Compression;
use datasaver_common::proto::agent_service_server::AgentService;
use datasaver_common::proto::{
    agent_message, coordinator_message, upload_request, AgentMessage, CoordinatorMessage,
    DownloadChunk, DownloadRequest, Registered, UploadHeader, UploadRequest, UploadResponse,
};
use datasaver_common::tls::Role;
use futures::{Stream, StreamExt};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::catalog::{status, BackupRow};
use crate::fleet::{AgentConn, JobKind, Report};
use crate::meta::Meta;
use crate::storage::{logical_meta_key, logical_object_key, ObjectWriter};
use crate::{internal, now_rfc3339, peer, Core};

pub struct AgentSvc {
    pub core: Arc<Core>,
}

/// Why an upload did not store a backup.
enum UploadFailure {
    Failed(String),
    /// The agent aborted it because it is stopping on purpose.
    Interrupted(String),
}

impl From<String> for UploadFailure {
    fn from(s: String) -> Self {
        UploadFailure::Failed(s)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentSvc {
    type ControlStream = BoxStream<CoordinatorMessage>;
    type DownloadStream = BoxStream<DownloadChunk>;

    async fn control(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        let who = peer(&req, Role::Agent)?;
        let addr = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("agent did not register within 30 s"))??;
        let reg = match first.and_then(|m| m.msg) {
            Some(agent_message::Msg::Register(r)) => r,
            _ => {
                return Err(Status::invalid_argument(
                    "the first control message must be Register",
                ))
            }
        };
        if reg.targets.is_empty() {
            return Err(Status::invalid_argument("agent registered no targets"));
        }
        for t in &reg.targets {
            datasaver_common::names::validate_target(&t.name)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let owner = self
                .core
                .catalog
                .claim_target(&t.name, &who.name, now_rfc3339())
                .await
                .map_err(internal)?;
            if let Some(owner) = owner {
                tracing::warn!(agent = %who, target = %t.name, %owner, "agent refused: target belongs to another agent");
                return Err(Status::permission_denied(format!(
                    "target {} belongs to agent {owner}; agent {} may not act for it",
                    t.name, who.name
                )));
            }
        }
        let (tx, rx) = mpsc::channel(32);
        let conn_id = self.core.fleet.next_conn_id();
        let now = self.core.clock.now();
        let names: Vec<String> = reg.targets.iter().map(|t| t.name.clone()).collect();
        let requested = reg.targets.clone();
        tx.send(Ok(CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Registered(Registered {
                agent_name: who.name.clone(),
                coordinator_version: datasaver_common::VERSION.into(),
            })),
        }))
        .await
        .map_err(|_| Status::cancelled("agent went away"))?;
        self.core.fleet.add_agent(AgentConn {
            conn_id,
            name: who.name.clone(),
            version: reg.agent_version.clone(),
            peer_addr: addr.clone(),
            targets: reg.targets,
            connected_since: now,
            last_seen: now,
            tx,
            leaving: None,
        });
        tracing::info!(agent = %who, peer = %addr, targets = ?names, version = %reg.agent_version, "agent connected");
        // What the agent asks for is remembered, so schedules and retention
        // hold while it is away.
        for t in &requested {
            let retention = t
                .retention
                .as_ref()
                .map(crate::policy::RetentionSpec::from_proto)
                .and_then(|r| serde_json::to_string(&r).ok());
            let schedule = Some(t.schedule.clone()).filter(|s| !s.trim().is_empty());
            if let Err(e) = self
                .core
                .catalog
                .set_target_request(&t.name, schedule.clone(), retention)
                .await
            {
                tracing::error!(target = %t.name, error = %e, "could not record the agent's settings");
            }
            self.core
                .scheduler
                .update_target(&self.core, &t.name, schedule.as_deref())
                .await;
        }

        let core = self.core.clone();
        // Ends the response stream when the agent's side ends, so a planned
        // stop closes the call cleanly on both sides (no reset, no "h2
        // protocol error" in either log).
        let closed = tokio_util::sync::CancellationToken::new();
        let close = closed.clone();
        tokio::spawn(async move {
            let _close = close.drop_guard();
            let why = loop {
                let msg = tokio::select! {
                    _ = core.cancel.cancelled() => break "coordinator shutting down".to_string(),
                    // Heartbeats come every 10 s; silence for 60 s means the
                    // agent or the network is gone even if TCP has not noticed.
                    m = tokio::time::timeout(Duration::from_secs(60), inbound.message()) => m,
                };
                match msg {
                    Err(_) => break "no heartbeat for 60 s".to_string(),
                    Ok(Err(e)) => break format!("control stream broke: {}", e.message()),
                    Ok(Ok(None)) => break "agent closed its control stream".to_string(),
                    Ok(Ok(Some(m))) => {
                        core.fleet.touch(conn_id);
                        match m.msg {
                            Some(agent_message::Msg::Progress(p)) => {
                                let id = p.job_id.clone();
                                core.fleet.report(conn_id, &id, Report::Progress(p));
                            }
                            Some(agent_message::Msg::Result(r)) => {
                                let id = r.job_id.clone();
                                core.fleet.report(conn_id, &id, Report::Result(r));
                            }
                            Some(agent_message::Msg::Goodbye(g)) => {
                                tracing::info!(agent = %who, reason = %g.reason, "agent is stopping (planned)");
                                core.fleet.mark_leaving(conn_id, &g.reason);
                            }
                            _ => {}
                        }
                    }
                }
            };
            match core.fleet.leaving(conn_id) {
                Some(reason) => {
                    tracing::info!(agent = %who, reason = %reason, "agent disconnected (planned stop)")
                }
                None => tracing::info!(agent = %who, reason = %why, "agent disconnected"),
            }
            core.fleet
                .remove_agent(conn_id, &format!("agent {} disconnected ({why})", who.name));
        });
        let outbound = ReceiverStream::new(rx).take_until(closed.cancelled_owned());
        Ok(Response::new(Box::pin(outbound)))
    }

    async fn upload(
        &self,
        req: Request<Streaming<UploadRequest>>,
    ) -> Result<Response<UploadResponse>, Status> {
        let who = peer(&req, Role::Agent)?;
        let remote = datasaver_common::telemetry::from_metadata(req.metadata());
        let mut inbound = req.into_inner();
        let header = match inbound.message().await?.and_then(|m| m.msg) {
            Some(upload_request::Msg::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first upload message must be a header",
                ))
            }
        };
        let job = self
            .core
            .fleet
            .job(&header.job_id)
            .ok_or_else(|| Status::not_found(format!("no running job {}", header.job_id)))?;
        let (target, backup_id) = (job.target, job.backup_id);
        if job.kind != JobKind::Backup || backup_id != header.backup_id || target != header.target {
            return Err(Status::invalid_argument(
                "upload header does not match its job",
            ));
        }
        if job.agent_name != who.name {
            return Err(Status::permission_denied(format!(
                "agent {} may not upload for target {target}",
                who.name
            )));
        }
        // A child of the agent's upload span, so both sides share one trace.
        let span = tracing::info_span!("upload", target = %target, backup = %backup_id);
        datasaver_common::telemetry::set_parent(&span, &remote);
        span.in_scope(|| tracing::info!(agent = %who, backup = %backup_id, "upload started"));
        match tracing::Instrument::instrument(self.receive(&header, &who.name, &mut inbound), span)
            .await
        {
            Ok(resp) => {
                tracing::info!(agent = %who, backup = %backup_id, bytes = resp.stored_bytes, "backup stored");
                Ok(Response::new(resp))
            }
            Err(UploadFailure::Interrupted(msg)) => {
                tracing::info!(agent = %who, backup = %backup_id, reason = %msg, "upload interrupted: the agent is stopping");
                let msg = format!("interrupted: {msg}");
                if let Err(e) = self.core.catalog.note_error(&backup_id, &msg).await {
                    tracing::error!(backup = %backup_id, error = %e, "could not record the interruption");
                }
                Err(Status::aborted(msg))
            }
            Err(UploadFailure::Failed(msg)) => {
                tracing::warn!(agent = %who, backup = %backup_id, error = %msg, "upload failed");
                // The job decides failed or interrupted; the reason is kept.
                if let Err(e) = self.core.catalog.note_error(&backup_id, &msg).await {
                    tracing::error!(backup = %backup_id, error = %e, "could not record the failure");
                }
                Err(Status::aborted(msg))
            }
        }
    }

    async fn download(
        &self,
        req: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let who = peer(&req, Role::Agent)?;
        let req = req.into_inner();
        let job = self
            .core
            .fleet
            .job(&req.job_id)
            .ok_or_else(|| Status::not_found(format!("no running job {}", req.job_id)))?;
        let (backup_id, object_key) = (job.backup_id, job.object_key);
        if job.kind == JobKind::Backup || backup_id != req.backup_id {
            return Err(Status::invalid_argument(
                "download request does not match its job",
            ));
        }
        if job.agent_name != who.name {
            return Err(Status::permission_denied(format!(
                "agent {} may not read backup {backup_id}",
                who.name
            )));
        }
        tracing::info!(agent = %who, backup = %backup_id, "download started");
        let stream = self
            .core
            .storage
            .get(&object_key)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let out = stream.map(|r| match r {
            Ok(data) => Ok(DownloadChunk {
                data: data.to_vec(),
            }),
            Err(e) => Err(Status::unavailable(e.to_string())),
        });
        Ok(Response::new(Box::pin(out)))
    }
}

impl AgentSvc {
    /// Streams an upload into storage. The object becomes visible only when
    /// every byte arrived and both checksums agree; then the meta file, then
    /// the catalog row. Any failure undoes what was written.
    async fn receive(
        &self,
        h: &UploadHeader,
        agent: &str,
        inbound: &mut Streaming<UploadRequest>,
    ) -> Result<UploadResponse, UploadFailure> {
        let row = self
            .core
            .catalog
            .get(&h.backup_id)
            .await
            .map_err(|e| e.to_string())?
            .filter(|r| r.status == status::RUNNING)
            .ok_or_else(|| format!("backup {} is not running", h.backup_id))?;
        let codec: Compression = h
            .compression
            .parse()
            .map_err(|e| format!("upload header: {e}"))?;
        let extension = if h.encrypted {
            format!("{}.age", codec.extension())
        } else {
            codec.extension().to_string()
        };
        let object_key = logical_object_key(&h.target, &h.backup_id, &extension);
        let meta_key = logical_meta_key(&h.target, &h.backup_id);
        let storage = &self.core.storage;
        let mut writer: Box<dyn ObjectWriter> = storage
            .create(&object_key)
            .await
            .map_err(|e| e.to_string())?;
        let mut hasher = Checksum::new();
        let received: Result<_, UploadFailure> = async {
            loop {
                let msg = tokio::select! {
                    _ = self.core.cancel.cancelled() => return Err("coordinator shutting down".to_string().into()),
                    m = inbound.message() => m,
                };
                let m = match msg {
                    Err(e) => return Err(format!("upload interrupted: {}", e.message()).into()),
                    Ok(None) => return Err(String::from("upload ended without a trailer (agent stopped?)").into()),
                    Ok(Some(m)) => m,
                };
                match m.msg {
                    Some(upload_request::Msg::Chunk(data)) => {
                        let data = Bytes::from(data);
                        self.core.metrics.uploaded(&h.target, data.len() as u64);
                        crate::hash_off_thread(&mut hasher, data.clone()).await?;
                        writer.write(data).await.map_err(|e| e.to_string())?;
                    }
                    Some(upload_request::Msg::Trailer(t)) => return Ok(t),
                    Some(upload_request::Msg::Abort(a)) if a.interrupted => return Err(UploadFailure::Interrupted(a.reason)),
                    Some(upload_request::Msg::Abort(a)) => return Err(a.reason.into()),
                    _ => return Err(String::from("unexpected message in upload stream").into()),
                }
            }
        }
        .await;
        // One place undoes the partial object, whatever went wrong.
        let trailer = match received {
            Ok(t) => t,
            Err(e) => {
                let _ = writer.abort().await;
                return Err(e);
            }
        };
        let ours = hasher.finish();
        if trailer.checksum != ours || trailer.stored_bytes != hasher.len() {
            let _ = writer.abort().await;
            return Err(UploadFailure::Failed(format!(
                "checksum mismatch on upload: agent sent {} ({} bytes), coordinator received {} ({} bytes)",
                trailer.checksum,
                trailer.stored_bytes,
                ours,
                hasher.len()
            )));
        }
        let info = tracing::Instrument::instrument(
            writer.commit(),
            tracing::info_span!("storage.commit", key = %object_key),
        )
        .await
        .map_err(|e| e.to_string())?;

        let finished = self.core.clock.now();
        let created = chrono::DateTime::parse_from_rfc3339(&row.created_at)
            .map(|d| d.with_timezone(&chrono::Utc))
            .unwrap_or(finished);
        let tags = crate::retention::cleanup::tags_for_new(&self.core, &row).await;
        let done = BackupRow {
            status: status::COMPLETED.into(),
            finished_at: Some(finished.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            duration_ms: (finished - created).num_milliseconds().max(0) as u64,
            raw_bytes: trailer.raw_bytes,
            stored_bytes: info.size,
            checksum: ours.clone(),
            compression: codec.name().into(),
            encrypted: h.encrypted,
            encryption_recipient: h.encryption_recipient.clone(),
            format: if h.format.is_empty() {
                "pg_dump-custom".into()
            } else {
                h.format.clone()
            },
            object_key: object_key.clone(),
            meta_key: meta_key.clone(),
            database: h.database.clone(),
            db_host: h.db_host.clone(),
            server_version: h.server_version.clone(),
            pg_dump_version: h.pg_dump_version.clone(),
            tags,
            agent: agent.to_string(),
            error: None,
            ..row
        };
        let meta = Meta::from_row(&done).to_json();
        if let Err(e) = storage.put(&meta_key, Bytes::from(meta)).await {
            let _ = storage.delete(std::slice::from_ref(&object_key)).await;
            return Err(format!("writing meta file failed: {e}").into());
        }
        if let Err(e) = self.core.catalog.complete(done).await {
            let _ = storage
                .delete(&[object_key.clone(), meta_key.clone()])
                .await;
            return Err(format!("recording the backup in the catalog failed: {e}").into());
        }
        Ok(UploadResponse {
            backup_id: h.backup_id.clone(),
            checksum: ours,
            stored_bytes: info.size,
        })
    }
}
