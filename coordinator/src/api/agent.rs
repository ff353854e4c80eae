//! The gRPC service agents call: the control stream, uploads and downloads.
//! Every string an agent sends is cleaned here, on arrival (`clean`): one
//! line, no control characters, bounded length, before it can reach the
//! catalog, logs, webhooks or dsctl.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use datasaver_common::proto::agent_service_server::AgentService;
use datasaver_common::proto::{
    agent_message, coordinator_message, upload_request, AgentMessage, CoordinatorMessage,
    DownloadChunk, DownloadRequest, IssuedCertificate, Registered, RenewCertificateRequest,
    UploadRequest, UploadResponse, WalAck, WalUpload,
};
use futures::{Stream, StreamExt};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Caller;
use crate::agents::JoinError;
use crate::fleet::{AgentConn, JobKind, Report};
use crate::repo::ingest::{IngestError, IngestMeta, Piece, Trailer};
use crate::repo::record::DatabaseDump;
use crate::repo::{ReadError, RepoError};
use crate::Core;

pub struct AgentSvc {
    pub core: Arc<Core>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentSvc {
    type ControlStream = BoxStream<CoordinatorMessage>;
    type DownloadStream = BoxStream<DownloadChunk>;
    type StreamWalStream = BoxStream<WalAck>;
    type DownloadWalStream = BoxStream<DownloadChunk>;

    async fn download_wal(
        &self,
        req: Request<datasaver_common::proto::DownloadWalRequest>,
    ) -> Result<Response<Self::DownloadWalStream>, Status> {
        use crate::wal::restore::Refused;
        let who = Caller::of(&req)?;
        let req = req.into_inner();
        let job = self
            .core
            .fleet
            .job(&req.job_id)
            .ok_or_else(|| Status::not_found(format!("no running job {}", req.job_id)))?;
        // A physical restore, or a verify of a base backup.
        if job.kind == JobKind::Backup || job.agent_name != who.name() {
            return Err(Status::permission_denied(format!(
                "agent {} has no restore job {}",
                who.name(),
                req.job_id
            )));
        }
        let base = self
            .core
            .repo
            .find(&job.backup_id)
            .await
            .map_err(|e| match e {
                RepoError::NotFound(_) => Status::not_found(e.to_string()),
                _ => Status::unavailable(e.to_string()),
            })?;
        if base.kind != crate::repo::Kind::Base {
            return Err(Status::invalid_argument(format!(
                "job {} restores a dump, not a base backup",
                req.job_id
            )));
        }
        let file = crate::wal::restore::wal_for_job(&self.core, &base, &req.name)
            .await
            .map_err(|e| match e {
                Refused::NotFound(m) => Status::not_found(m),
                Refused::Refused(m) => Status::invalid_argument(m),
                Refused::Unavailable(m) => Status::unavailable(m),
            })?;
        let stream = self
            .core
            .repo
            .open_wal(&file.stored.key)
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

    async fn stream_wal(
        &self,
        req: Request<Streaming<WalUpload>>,
    ) -> Result<Response<Self::StreamWalStream>, Status> {
        use crate::wal::receive::{self, Refusal};
        use datasaver_common::proto::{wal_ack, wal_upload, WalReady, WalStored};
        fn status(e: Refusal) -> Status {
            match e {
                Refusal::NotOwner { .. } => Status::permission_denied(e.to_string()),
                Refusal::OtherCluster { .. } | Refusal::Conflict { .. } => {
                    Status::failed_precondition(e.to_string())
                }
                Refusal::Invalid(m) => Status::invalid_argument(m),
                Refusal::Unavailable(m) => Status::unavailable(m),
            }
        }
        let who = Caller::of(&req)?;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no WAL hello within 30 s"))??;
        let Some(wal_upload::Msg::Hello(h)) = first.and_then(|m| m.msg) else {
            return Err(Status::invalid_argument(
                "the first WAL stream message must be a hello",
            ));
        };
        let extension = h.extension.clone();
        let hello = receive::Hello {
            target: h.target,
            system_identifier: h.system_identifier,
            timeline: h.timeline,
            seg_size: h.segment_size,
            extension: h.extension,
            histories: h
                .histories
                .into_iter()
                .map(|w| (w.timeline, String::from_utf8_lossy(&w.content).into_owned()))
                .collect(),
        };
        let (mut receiver, end) = match receive::open(&self.core, who.name(), hello.clone()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(agent = %who, target = %hello.target, error = %e, "WAL stream refused");
                return Err(status(e));
            }
        };
        tracing::info!(agent = %who, target = %hello.target, timeline = hello.timeline, stored_end = %datasaver_common::wal::Lsn(end), "WAL stream started");
        let max = receive::max_file_bytes(receiver.series.seg_size) as usize;
        let (tx, rx) = mpsc::channel(16);
        let ready = WalAck {
            msg: Some(wal_ack::Msg::Ready(WalReady {
                stored_end_lsn: end,
            })),
        };
        tx.send(Ok(ready))
            .await
            .map_err(|_| Status::cancelled("agent went away"))?;
        let core = self.core.clone();
        tokio::spawn(async move {
            let target = hello.target.clone();
            let result: Result<(), Status> = async {
                let mut current: Option<(datasaver_common::proto::WalFileStart, bytes::BytesMut)> =
                    None;
                loop {
                    let m = tokio::select! {
                        _ = core.cancel.cancelled() => {
                            return Err(Status::unavailable("coordinator shutting down"))
                        }
                        m = inbound.message() => m?,
                    };
                    let Some(m) = m else { return Ok(()) };
                    match m.msg {
                        Some(wal_upload::Msg::File(f)) if current.is_none() => {
                            current = Some((f, bytes::BytesMut::new()));
                        }
                        Some(wal_upload::Msg::Chunk(c)) => {
                            let Some((_, buf)) = current.as_mut() else {
                                return Err(Status::invalid_argument("WAL chunk outside a file"));
                            };
                            if buf.len() + c.len() > max {
                                return Err(Status::invalid_argument(format!(
                                    "WAL file larger than {max} bytes"
                                )));
                            }
                            buf.extend_from_slice(&c);
                        }
                        Some(wal_upload::Msg::End(e)) => {
                            let Some((f, buf)) = current.take() else {
                                return Err(Status::invalid_argument("WAL file end without a start"));
                            };
                            let name = clean::error(&f.name);
                            let stored = receiver
                                .store(
                                    &name,
                                    &f.raw_blake3,
                                    f.end_lsn,
                                    &e.checksum,
                                    &extension,
                                    buf.freeze(),
                                )
                                .await
                                .map_err(status)?;
                            tracing::debug!(target = %target, file = %stored.name, outcome = stored.outcome, "WAL file");
                            let ack = WalAck {
                                msg: Some(wal_ack::Msg::Stored(WalStored {
                                    name: stored.name,
                                    outcome: stored.outcome.to_string(),
                                    end_lsn: stored.end_lsn,
                                })),
                            };
                            tx.send(Ok(ack))
                                .await
                                .map_err(|_| Status::cancelled("agent went away"))?;
                        }
                        Some(wal_upload::Msg::Position(p)) => receiver
                            .server_position(p.server_lsn, p.server_time_micros, &p.slot_status)
                            .await
                            .map_err(status)?,
                        _ => return Err(Status::invalid_argument("unexpected WAL stream message")),
                    }
                }
            }
            .await;
            match result {
                Ok(()) => tracing::info!(target = %target, "WAL stream ended"),
                Err(e) => {
                    tracing::warn!(target = %target, error = %e.message(), "WAL stream ended");
                    let _ = tx.send(Err(e)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn control(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        let who = Caller::of(&req)?;
        let addr = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("agent did not register within 30 s"))??;
        let reg = match first.and_then(clean::message).and_then(|m| m.msg) {
            Some(agent_message::Msg::Register(r)) => r,
            _ => {
                return Err(Status::invalid_argument(
                    "the first control message must be Register",
                ))
            }
        };
        crate::agents::claim_targets(&self.core, &who.identity, &reg.targets)
            .await
            .map_err(|e| match e {
                JoinError::Invalid(m) => Status::invalid_argument(m),
                JoinError::Refused(m) => Status::permission_denied(m),
                JoinError::Unavailable(m) => Status::internal(m),
            })?;
        let (tx, rx) = mpsc::channel(32);
        let conn_id = self.core.fleet.next_conn_id();
        let now = self.core.clock.now();
        let names: Vec<String> = reg.targets.iter().map(|t| t.name.clone()).collect();
        // An agent streams the WAL of its (first) target.
        let wal_target = names.first().cloned();
        let requested = reg.targets.clone();
        tx.send(Ok(CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Registered(Registered {
                agent_name: who.name().to_string(),
                coordinator_version: datasaver_common::VERSION.into(),
            })),
        }))
        .await
        .map_err(|_| Status::cancelled("agent went away"))?;
        self.core.fleet.add_agent(AgentConn {
            conn_id,
            name: who.name().to_string(),
            version: reg.agent_version.clone(),
            peer_addr: addr.clone(),
            targets: reg.targets,
            connected_since: now,
            last_seen: now,
            tx,
            leaving: None,
        });
        tracing::info!(agent = %who, peer = %addr, targets = ?names, version = %reg.agent_version, "agent connected");
        self.core.alerter.certificates.seen(
            crate::alerts::expiry::Cert::of(crate::alerts::expiry::CertKind::Agent, &who.identity),
            &self.core.metrics,
        );
        crate::agents::remember_requests(&self.core, &requested).await;

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
                        match clean::message(m).and_then(|m| m.msg) {
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
                            Some(agent_message::Msg::Heartbeat(h)) if h.wal_server_lsn > 0 => {
                                if let Some(t) = &wal_target {
                                    core.wal_live.server_moved_to(
                                        t,
                                        h.wal_server_lsn,
                                        core.clock.now(),
                                    );
                                }
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
            core.fleet.remove_agent(
                conn_id,
                &format!("agent {} disconnected ({why})", who.name()),
            );
        });
        let outbound = ReceiverStream::new(rx).take_until(closed.cancelled_owned());
        Ok(Response::new(Box::pin(outbound)))
    }

    async fn upload(
        &self,
        req: Request<Streaming<UploadRequest>>,
    ) -> Result<Response<UploadResponse>, Status> {
        let who = Caller::of(&req)?;
        let remote = datasaver_common::telemetry::from_metadata(req.metadata());
        let mut inbound = req.into_inner();
        let header = match inbound.message().await?.and_then(|m| m.msg) {
            Some(upload_request::Msg::Header(h)) => clean::header(h),
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
        if job.agent_name != who.name() {
            return Err(Status::permission_denied(format!(
                "agent {} may not upload for target {target}",
                who.name()
            )));
        }
        // One upload per job: a second one (a replay, a confused or hostile
        // agent) must not race the first into the same backup.
        let Some(claim) = self.core.fleet.claim_upload(&header.job_id) else {
            return Err(Status::already_exists(format!(
                "backup {backup_id} already has an upload or was stopped (one upload per job); agent {} sent another",
                who.name()
            )));
        };
        // A child of the agent's upload span, so both sides share one trace.
        let span = tracing::info_span!("upload", target = %target, backup = %backup_id);
        datasaver_common::telemetry::set_parent(&span, &remote);
        span.in_scope(|| tracing::info!(agent = %who, backup = %backup_id, "upload started"));
        let meta = IngestMeta {
            compression: header.compression.clone(),
            encrypted: header.encrypted,
            encryption_recipient: header.encryption_recipient.clone(),
            format: header.format.clone(),
            database: header.database.clone(),
            db_host: header.db_host.clone(),
            server_version: header.server_version.clone(),
            pg_dump_version: header.pg_dump_version.clone(),
            extensions: header.extensions.clone(),
            system_identifier: header.system_identifier.clone(),
            roles: header.roles.clone(),
            database_shape: header
                .database_shape
                .clone()
                .map(Into::into)
                .unwrap_or_default(),
            whole_server: header.whole_server,
        };
        let stored = tracing::Instrument::instrument(
            crate::jobs::store_upload(
                &self.core,
                &header.job_id,
                claim,
                &backup_id,
                meta,
                pieces(inbound),
            ),
            span,
        )
        .await;
        match stored {
            Ok(b) => {
                tracing::info!(agent = %who, backup = %backup_id, bytes = b.stored_bytes, "backup stored");
                Ok(Response::new(UploadResponse {
                    backup_id: b.id,
                    checksum: b.checksum,
                    stored_bytes: b.stored_bytes,
                }))
            }
            Err(e @ IngestError::Interrupted(_)) => {
                tracing::info!(agent = %who, backup = %backup_id, reason = %e, "upload interrupted: the agent is stopping");
                Err(Status::aborted(e.to_string()))
            }
            Err(e) => {
                tracing::warn!(agent = %who, backup = %backup_id, error = %e, "upload failed");
                Err(Status::aborted(e.to_string()))
            }
        }
    }

    async fn renew_certificate(
        &self,
        req: Request<RenewCertificateRequest>,
    ) -> Result<Response<IssuedCertificate>, Status> {
        let who = Caller::of(&req)?;
        let Some(enrollment) = self.core.enrollment.clone() else {
            return Err(Status::failed_precondition(
                "this coordinator has no enrollment CA (DATASAVER_ENROLLMENT_CA_CERT/_KEY): renew the certificate with `dsctl certs issue`",
            ));
        };
        let der = req
            .peer_certs()
            .and_then(|c| c.first().map(|c| c.as_ref().to_vec()))
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let csr = req.into_inner().csr_pem;
        match enrollment.renew(&der, &who.identity, &csr) {
            Ok(i) => {
                tracing::info!(agent = %who, not_after = i.not_after_unix, "agent certificate renewed");
                Ok(Response::new(super::enrollment::issued(
                    i,
                    enrollment.enroller.fleet_ca_pem(),
                )))
            }
            Err(e) => {
                tracing::warn!(agent = %who, error = %e, "certificate renewal refused");
                Err(super::enrollment::status(e))
            }
        }
    }

    async fn download(
        &self,
        req: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let who = Caller::of(&req)?;
        let req = req.into_inner();
        let job = self
            .core
            .fleet
            .job(&req.job_id)
            .ok_or_else(|| Status::not_found(format!("no running job {}", req.job_id)))?;
        let backup_id = job.backup_id;
        if job.kind == JobKind::Backup || backup_id != req.backup_id {
            return Err(Status::invalid_argument(
                "download request does not match its job",
            ));
        }
        if job.agent_name != who.name() {
            return Err(Status::permission_denied(format!(
                "agent {} may not read backup {backup_id}",
                who.name()
            )));
        }
        tracing::info!(agent = %who, backup = %backup_id, "download started");
        let backup = self.core.repo.find(&backup_id).await.map_err(|e| match e {
            RepoError::NotFound(_) => Status::not_found(e.to_string()),
            _ => Status::unavailable(e.to_string()),
        })?;
        // Verified as it streams: bytes that do not match end the stream with
        // DATA_LOSS instead of a clean end.
        let part = (!req.part.is_empty()).then_some(req.part.as_str());
        let stream = self
            .core
            .repo
            .open_verified(&backup, part)
            .await
            .map_err(|e| match e {
                RepoError::NotFound(_) => Status::not_found(e.to_string()),
                _ => Status::unavailable(e.to_string()),
            })?;
        // A download that moves no byte for DATASAVER_TRANSFER_IDLE_TIMEOUT
        // (the agent stopped reading, or storage stalled) fails its job.
        let watched = crate::jobs::transfer::watch(
            &self.core,
            &req.job_id,
            crate::jobs::transfer::Start::Now,
            stream,
            ReadError::Storage,
        );
        let out = watched.map(|r| match r {
            Ok(data) => Ok(DownloadChunk {
                data: data.to_vec(),
            }),
            Err(ReadError::Corrupt(m)) => Err(Status::data_loss(m)),
            Err(ReadError::Storage(m)) => Err(Status::unavailable(m)),
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// The upload's messages after the header, as the repository takes them.
fn pieces(
    inbound: Streaming<UploadRequest>,
) -> impl Stream<Item = Result<Piece, IngestError>> + Send {
    futures::stream::unfold(Some(inbound), |state| async move {
        let mut inbound = state?;
        let item = match inbound.message().await {
            Err(e) => Err(IngestError::Failed(format!(
                "upload interrupted: {}",
                e.message()
            ))),
            Ok(None) => return None,
            Ok(Some(m)) => match m.msg {
                Some(upload_request::Msg::Chunk(data)) => Ok(Piece::Data(Bytes::from(data))),
                Some(upload_request::Msg::Trailer(t)) => Ok(Piece::End(trailer(t))),
                Some(upload_request::Msg::PartStart(mut p)) => {
                    clean::name(&mut p.name);
                    let dump = (!p.database.is_empty()).then(|| DatabaseDump {
                        database: p.database,
                        extensions: p.extensions,
                        roles: p.roles,
                        shape: p.database_shape.map(Into::into).unwrap_or_default(),
                        row_counts: Default::default(),
                    });
                    Ok(Piece::PartStart {
                        name: p.name,
                        role_passwords: p.role_passwords,
                        dump,
                    })
                }
                Some(upload_request::Msg::PartEnd(t)) => Ok(Piece::PartEnd(trailer(t))),
                Some(upload_request::Msg::Abort(a)) if a.interrupted => {
                    Err(IngestError::Interrupted(clean::error(&a.reason)))
                }
                Some(upload_request::Msg::Abort(a)) => {
                    Err(IngestError::Failed(clean::error(&a.reason)))
                }
                _ => Err(IngestError::Failed(
                    "unexpected message in upload stream".into(),
                )),
            },
        };
        // Nothing after an error or the trailer is read.
        let more = matches!(
            item,
            Ok(Piece::Data(_) | Piece::PartStart { .. } | Piece::PartEnd(_))
        );
        Some((item, more.then_some(inbound)))
    })
}

fn trailer(t: datasaver_common::proto::UploadTrailer) -> Trailer {
    Trailer {
        checksum: t.checksum,
        raw_bytes: t.raw_bytes,
        stored_bytes: t.stored_bytes,
        // anything but a checksum is not kept
        raw_checksum: Some(t.raw_checksum)
            .filter(|c| datasaver_common::checksum::is_valid(c))
            .unwrap_or_default(),
        row_counts: crate::repo::RowCounts {
            tables: t
                .tables
                .into_iter()
                .take(clean::MAX_TABLES)
                .map(|mut r| {
                    clean::name(&mut r.schema);
                    clean::name(&mut r.name);
                    crate::repo::TableRows {
                        schema: r.schema,
                        name: r.name,
                        rows: r.rows,
                    }
                })
                .collect(),
            not_counted: clean::error(&t.rows_not_counted),
        },
        physical: (t.wal_end_lsn > 0).then_some(crate::repo::record::Physical {
            start_lsn: t.wal_start_lsn,
            end_lsn: t.wal_end_lsn,
            timeline: t.timeline,
            consistent_at_micros: t.consistent_at_micros,
        }),
    }
}

/// Strings from agents, cleaned where they arrive (see
/// `datasaver_common::text::sanitize`): errors and messages up to
/// `MAX_MESSAGE` bytes, names and versions up to `MAX_NAME`.
mod clean {
    use datasaver_common::proto::{agent_message, AgentMessage, UploadHeader};
    use datasaver_common::text::{sanitize, MAX_MESSAGE, MAX_NAME};

    /// More extensions (or roles) than any real database names; the rest is
    /// dropped.
    const MAX_LIST: usize = 1024;

    /// Row counts kept per backup: more tables than this are not counted.
    pub const MAX_TABLES: usize = 100_000;

    pub fn error(s: &str) -> String {
        sanitize(s, MAX_MESSAGE)
    }

    pub fn name(s: &mut String) {
        if s.len() > MAX_NAME || s.chars().any(char::is_control) {
            *s = sanitize(s, MAX_NAME);
        }
    }

    fn text(s: &mut String) {
        if s.len() > MAX_MESSAGE || s.chars().any(char::is_control) {
            *s = sanitize(s, MAX_MESSAGE);
        }
    }

    /// A control message with every string field cleaned.
    pub fn message(mut m: AgentMessage) -> Option<AgentMessage> {
        match &mut m.msg {
            Some(agent_message::Msg::Register(r)) => {
                name(&mut r.agent_version);
                for t in &mut r.targets {
                    // The target's name is validated, not cleaned: a bad
                    // name is refused with the reason.
                    for f in [
                        &mut t.schedule,
                        &mut t.drill_schedule,
                        &mut t.compression,
                        &mut t.database,
                        &mut t.db_host,
                    ] {
                        name(f);
                    }
                }
            }
            Some(agent_message::Msg::Progress(p)) => {
                name(&mut p.job_id);
                name(&mut p.phase);
                text(&mut p.message);
            }
            Some(agent_message::Msg::Result(r)) => {
                name(&mut r.job_id);
                text(&mut r.error);
                text(&mut r.message);
                name(&mut r.target_db);
            }
            Some(agent_message::Msg::Goodbye(g)) => text(&mut g.reason),
            Some(agent_message::Msg::Heartbeat(_)) | None => {}
        }
        Some(m)
    }

    /// An upload header with every string field cleaned (ids and the
    /// target are compared with the job's, so a dirty one is refused).
    pub fn header(mut h: UploadHeader) -> UploadHeader {
        for f in [
            &mut h.compression,
            &mut h.format,
            &mut h.database,
            &mut h.db_host,
            &mut h.server_version,
            &mut h.pg_dump_version,
            &mut h.encryption_recipient,
            &mut h.system_identifier,
        ] {
            name(f);
        }
        if let Some(s) = &mut h.database_shape {
            for f in [&mut s.owner, &mut s.encoding, &mut s.collate, &mut s.ctype] {
                name(f);
            }
            s.grants.truncate(MAX_LIST);
            for g in &mut s.grants {
                name(&mut g.grantee);
                name(&mut g.privilege);
            }
            s.settings.truncate(MAX_LIST);
            for x in &mut s.settings {
                name(&mut x.role);
                text(&mut x.config);
            }
        }
        // Stored comma-joined: a name with a comma (impossible for a real
        // extension) is dropped, and the list is bounded.
        for list in [&mut h.extensions, &mut h.roles] {
            list.truncate(MAX_LIST);
            for e in list.iter_mut() {
                name(e);
            }
            list.retain(|e| !e.is_empty() && !e.contains(','));
        }
        h
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use datasaver_common::proto::{JobProgress, JobResult};

        #[test]
        fn agent_strings_are_one_bounded_line() {
            let long = "x".repeat(10_000);
            let m = message(AgentMessage {
                msg: Some(agent_message::Msg::Result(JobResult {
                    job_id: "job-1".into(),
                    error: format!("pg_dump: error\nFAKE LOG LINE\x1b[2J{long}"),
                    message: "ok\r\n".into(),
                    ..Default::default()
                })),
            })
            .and_then(|m| m.msg);
            let Some(agent_message::Msg::Result(r)) = m else {
                panic!("a result")
            };
            assert!(r.error.starts_with("pg_dump: error FAKE LOG LINE [2J"));
            assert!(r.error.len() <= MAX_MESSAGE);
            assert!(!r.error.chars().any(char::is_control));
            assert_eq!(r.message, "ok  ");
            assert_eq!(r.job_id, "job-1");

            let m = message(AgentMessage {
                msg: Some(agent_message::Msg::Progress(JobProgress {
                    phase: format!("dump\n{long}"),
                    ..Default::default()
                })),
            })
            .and_then(|m| m.msg);
            let Some(agent_message::Msg::Progress(p)) = m else {
                panic!("progress")
            };
            assert!(p.phase.len() <= MAX_NAME && p.phase.starts_with("dump x"));

            let h = header(UploadHeader {
                job_id: "job-1".into(),
                database: "shop\n".into(),
                server_version: long.clone(),
                ..Default::default()
            });
            assert_eq!((h.job_id.as_str(), h.database.as_str()), ("job-1", "shop "));
            assert!(h.server_version.len() <= MAX_NAME);
        }
    }
}
