//! The backup job: check that pg_dump can dump this server, open the upload,
//! and run the pipeline from pg_dump's stdout into it (see [`crate::pipeline`]).
//! The upload ends with the trailer only after pg_dump exited 0, or with an
//! abort that says why — interrupted when the agent is stopping on purpose,
//! so the coordinator retries instead of alerting.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use datasaver_common::proto::agent_service_client::AgentServiceClient;
use datasaver_common::proto::{
    upload_request, BackupJob, DatabaseShape, JobResult, UploadAbort, UploadHeader,
    UploadPartStart, UploadRequest, UploadTrailer,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::config::TargetConfig;
use crate::jobs::{Job, JobCancel, JobContext, JobError, Stop};
use crate::pg::PgTools;
use crate::pipeline::transform::Chain;
use crate::pipeline::{self, PipelineError};
use crate::progress::{Counters, Reporter};

/// How long a cancelled backup waits for the abort to reach the coordinator
/// before it drops the upload: a coordinator that stopped reading must not
/// keep the job (and its report) hanging.
const UPLOAD_CLOSE_GRACE: Duration = Duration::from_secs(5);

impl Job for BackupJob {
    const WHAT: &'static str = "backup";

    fn job_id(&self) -> &str {
        &self.job_id
    }

    fn span(&self) -> tracing::Span {
        let span =
            tracing::info_span!("agent.backup", target = %self.target, backup = %self.backup_id);
        datasaver_common::telemetry::set_parent(&span, &self.trace_context);
        span
    }

    async fn run(self, ctx: JobContext) -> Result<JobResult, JobError> {
        if self.physical {
            let message = crate::basebackup::run(
                ctx.client,
                self,
                ctx.target,
                ctx.tools,
                ctx.reporter,
                ctx.cancel,
                ctx.wal,
            )
            .await?;
            return Ok(JobResult {
                message,
                ..Default::default()
            });
        }
        let message = run(
            ctx.client,
            self,
            ctx.target,
            ctx.tools,
            ctx.reporter,
            ctx.cancel,
        )
        .await?;
        Ok(JobResult {
            message,
            ..Default::default()
        })
    }
}

/// The error of a backup stopped by `cancel`, and whether it was
/// interrupted (the agent's planned stop) rather than failed.
fn stopped(cancel: &JobCancel) -> (String, bool) {
    let stop = cancel.stop().unwrap_or(Stop::SessionEnded);
    (stop.message("backup"), stop == Stop::AgentStopping)
}

/// The upload being sent.
pub(crate) type UploadTask = tokio::task::JoinHandle<
    Result<tonic::Response<datasaver_common::proto::UploadResponse>, tonic::Status>,
>;

/// Opens the upload with `header`; the messages go to the returned sender.
pub(crate) async fn open_upload(
    client: &AgentServiceClient<Channel>,
    header: UploadHeader,
) -> Result<(mpsc::Sender<UploadRequest>, UploadTask), String> {
    let backup_id = header.backup_id.clone();
    let (tx, rx) = mpsc::channel::<UploadRequest>(4);
    tx.send(UploadRequest {
        msg: Some(upload_request::Msg::Header(header)),
    })
    .await
    .map_err(|_| "upload channel closed".to_string())?;
    let mut upload_client = client.clone();
    // The upload carries this span's trace context, so the coordinator's
    // spans for storing it join the same trace.
    let upload_span = tracing::info_span!("agent.upload", backup = %backup_id);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    datasaver_common::telemetry::inject_metadata(&upload_span, request.metadata_mut());
    let upload = tokio::spawn(tracing::Instrument::instrument(
        async move { upload_client.upload(request).await },
        upload_span,
    ));
    Ok((tx, upload))
}

/// Ends an upload after its pipeline: the trailer when the child succeeded,
/// else an abort that says why (interrupted on the agent's planned stop);
/// then the coordinator's answer. `explain` rewords a child's failure.
pub(crate) async fn finish_upload(
    tx: mpsc::Sender<UploadRequest>,
    mut upload: UploadTask,
    dumped: Result<UploadTrailer, PipelineError>,
    cancel: &JobCancel,
    explain: impl Fn(String) -> String,
) -> Result<datasaver_common::proto::UploadResponse, String> {
    let cancelled = cancel.is_cancelled();
    let (ending, dump_error) = match dumped {
        Ok(trailer) => (Some(upload_request::Msg::Trailer(trailer)), None),
        Err(PipelineError::UploadClosed) => (None, None),
        Err(PipelineError::Cancelled) => {
            let (reason, interrupted) = stopped(cancel);
            let abort = UploadAbort {
                reason: reason.clone(),
                interrupted,
            };
            (Some(upload_request::Msg::Abort(abort)), Some(reason))
        }
        Err(
            PipelineError::Failed(reason)
            | PipelineError::Corrupt(reason)
            | PipelineError::ChildStopped(reason),
        ) => {
            let reason = explain(reason);
            let abort = UploadAbort {
                reason: reason.clone(),
                interrupted: false,
            };
            (Some(upload_request::Msg::Abort(abort)), Some(reason))
        }
    };
    if let Some(msg) = ending {
        let send = tx.send(UploadRequest { msg: Some(msg) });
        if cancelled {
            let _ = tokio::time::timeout(UPLOAD_CLOSE_GRACE, send).await;
        } else {
            let _ = send.await;
        }
    }
    drop(tx);
    let uploaded = if cancelled {
        match tokio::time::timeout(UPLOAD_CLOSE_GRACE, &mut upload).await {
            Ok(r) => r,
            Err(_) => {
                upload.abort();
                tracing::warn!(
                    "the coordinator did not end the upload of a cancelled backup; dropped it"
                );
                return Err(dump_error.unwrap_or_else(|| stopped(cancel).0));
            }
        }
    } else {
        upload.await
    };
    let uploaded = uploaded.map_err(|e| format!("upload task failed: {e}"))?;
    if let Some(msg) = dump_error {
        return Err(msg);
    }
    Ok(uploaded
        .map_err(|s| format!("upload failed: {}", s.message()))?
        .into_inner())
}

/// Runs one backup job; returns a summary or a one-line error.
pub async fn run(
    client: AgentServiceClient<Channel>,
    job: BackupJob,
    target: TargetConfig,
    tools: PgTools,
    reporter: Reporter,
    cancel: JobCancel,
) -> Result<String, String> {
    reporter.phase("probe", "checking the database and pg_dump versions");
    let (dump_v, server_v) = tokio::select! {
        r = tools.probe(&target.db) => r?,
        _ = cancel.cancelled() => return Err(stopped(&cancel).0),
    };
    // A whole server describes each database with its part instead.
    let (extensions, roles, shape) = match &target.databases {
        Some(_) => (Vec::new(), Vec::new(), None),
        None => tokio::select! {
            r = describe(&tools, &target.db) => { let (e, r, s) = r?; (e, r, Some(s)) }
            _ = cancel.cancelled() => return Err(stopped(&cancel).0),
        },
    };
    let system_identifier = tokio::select! {
        s = tools.system_identifier(&target.db) => s.unwrap_or_default(),
        _ = cancel.cancelled() => return Err(stopped(&cancel).0),
    };
    // Role passwords can only be read by a superuser; without them the
    // globals are still taken, and say so.
    let role_passwords = tokio::select! {
        r = tools.is_superuser(&target.db) => r.map_err(|e| format!("cannot read the agent's role: {e}"))?,
        _ = cancel.cancelled() => return Err(stopped(&cancel).0),
    };
    let header = UploadHeader {
        job_id: job.job_id.clone(),
        backup_id: job.backup_id.clone(),
        target: target.name.clone(),
        compression: target.compression.name().into(),
        compression_level: target.compression_level,
        format: "pg_dump-custom".into(),
        database: if target.databases.is_some() {
            String::new()
        } else {
            target.db.dbname.clone()
        },
        db_host: format!("{}:{}", target.db.host, target.db.port),
        server_version: server_v.text.clone(),
        pg_dump_version: dump_v.text.clone(),
        extensions,
        system_identifier,
        roles,
        database_shape: shape,
        whole_server: target.databases.is_some(),
        encrypted: target.encrypt_to.is_some(),
        encryption_recipient: target
            .encrypt_to
            .as_ref()
            .map(|e| e.fingerprint.clone())
            .unwrap_or_default(),
    };
    let (tx, upload) = open_upload(&client, header).await?;

    let counters = Arc::new(Counters::default());
    let chain = || Chain::for_target(&target);
    reporter.phase(
        "globals",
        "dumping the cluster's roles (pg_dumpall --globals-only)",
    );
    let globals = send_globals(&tools, &target, role_passwords, chain, &tx, cancel.token()).await;
    let progress = reporter.start_ticker("dump", counters.clone());
    let mut databases = Vec::new();
    let dumped = match (globals, &target.databases) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(selection)) => {
            let server = Server {
                tools: &tools,
                target: &target,
                selection,
            };
            send_databases(
                server,
                chain,
                &tx,
                &counters,
                cancel.token(),
                &mut databases,
            )
            .await
        }
        (Ok(()), None) => match chain() {
            Ok(chain) => {
                pipeline::upload_child_output(
                    tools.pg_dump(&target.db, target.lock_wait_timeout),
                    "pg_dump",
                    true,
                    chain,
                    tx.clone(),
                    counters.clone(),
                    cancel.token(),
                )
                .await
            }
            Err(e) => Err(e),
        },
    };
    progress.abort();
    // A held lock says so, with the table and the setting (a whole
    // server's databases said it already, with their names).
    let explain = |reason: String| match target.databases {
        Some(_) => reason,
        None => crate::pg::lock_wait_failure(&reason, target.lock_wait_timeout).unwrap_or(reason),
    };
    let resp = finish_upload(tx, upload, dumped, &cancel, explain).await?;
    let what = if databases.is_empty() {
        format!("({})", resp.checksum)
    } else {
        format!(
            "of {} databases ({})",
            databases.len(),
            databases.join(", ")
        )
    };
    Ok(format!(
        "backup {} stored: {} bytes from {} bytes of pg_dump output {what}, with the cluster's roles{}",
        resp.backup_id,
        resp.stored_bytes,
        counters.raw.load(Ordering::Relaxed),
        if role_passwords {
            ""
        } else {
            " (without role passwords: the agent's role is not a superuser)"
        }
    ))
}

/// Sends the cluster's globals as the upload's `globals` part, ahead of the
/// dump: its start, its chunks through a chain of its own, its trailer.
async fn send_globals<F>(
    tools: &PgTools,
    target: &TargetConfig,
    role_passwords: bool,
    chain: F,
    tx: &mpsc::Sender<UploadRequest>,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), PipelineError>
where
    F: Fn() -> Result<Chain, PipelineError>,
{
    let send = |msg| async {
        tokio::select! {
            r = tx.send(UploadRequest { msg: Some(msg) }) => r.map_err(|_| PipelineError::UploadClosed),
            _ = cancel.cancelled() => Err(PipelineError::Cancelled),
        }
    };
    send(upload_request::Msg::PartStart(UploadPartStart {
        name: "globals".into(),
        role_passwords,
        ..Default::default()
    }))
    .await?;
    let trailer = pipeline::upload_child_output(
        tools.pg_dumpall_globals(&target.db, role_passwords),
        "pg_dumpall",
        false,
        chain()?,
        tx.clone(),
        Arc::new(Counters::default()),
        cancel,
    )
    .await?;
    send(upload_request::Msg::PartEnd(trailer)).await
}

/// What a backup records of one database so a restore can check the server
/// and create the database the same way: its extensions, the roles its
/// objects name, and how it was created.
async fn describe(
    tools: &PgTools,
    db: &crate::config::DbConn,
) -> Result<(Vec<String>, Vec<String>, DatabaseShape), String> {
    let extensions = tools
        .extensions(db)
        .await
        .map_err(|e| format!("cannot list the extensions of database {}: {e}", db.dbname))?;
    let roles = tools
        .referenced_roles(db)
        .await
        .map_err(|e| format!("cannot list the roles database {} names: {e}", db.dbname))?;
    let shape = tools
        .database_shape(db)
        .await
        .map_err(|e| format!("cannot read how database {} was created: {e}", db.dbname))?;
    Ok((extensions, roles, shape))
}

/// The server a whole-server backup takes, and which of its databases.
struct Server<'a> {
    tools: &'a PgTools,
    target: &'a TargetConfig,
    selection: &'a crate::config::DatabaseSelection,
}

/// Sends every selected database of the server, found now, as a
/// `database:<name>` part, one after the other; returns the upload's empty
/// trailer (a whole server has no dump of its own) and names the databases
/// in `sent`.
async fn send_databases<F>(
    server: Server<'_>,
    chain: F,
    tx: &mpsc::Sender<UploadRequest>,
    counters: &Arc<Counters>,
    cancel: &tokio_util::sync::CancellationToken,
    sent: &mut Vec<String>,
) -> Result<UploadTrailer, PipelineError>
where
    F: Fn() -> Result<Chain, PipelineError>,
{
    let Server {
        tools,
        target,
        selection,
    } = server;
    let send = |msg| async {
        tokio::select! {
            r = tx.send(UploadRequest { msg: Some(msg) }) => r.map_err(|_| PipelineError::UploadClosed),
            _ = cancel.cancelled() => Err(PipelineError::Cancelled),
        }
    };
    let all = tokio::select! {
        r = tools.databases(&target.db) => r.map_err(|e| PipelineError::Failed(format!("cannot list the server's databases: {e}")))?,
        _ = cancel.cancelled() => return Err(PipelineError::Cancelled),
    };
    let chosen: Vec<String> = all
        .iter()
        .filter(|d| selection.matches(d))
        .cloned()
        .collect();
    if chosen.is_empty() {
        return Err(PipelineError::Failed(format!(
            "no database of the server matches {} (it has {}); nothing was backed up",
            selection.describe(),
            all.join(", ")
        )));
    }
    for name in chosen {
        if let Err(e) = datasaver_common::names::validate_database_name(&name) {
            return Err(PipelineError::Failed(e));
        }
        let db = crate::config::DbConn {
            dbname: name.clone(),
            ..target.db.clone()
        };
        let (extensions, roles, shape) = tokio::select! {
            r = describe(tools, &db) => r.map_err(PipelineError::Failed)?,
            _ = cancel.cancelled() => return Err(PipelineError::Cancelled),
        };
        send(upload_request::Msg::PartStart(UploadPartStart {
            name: datasaver_common::names::database_part(&name),
            role_passwords: false,
            database: name.clone(),
            extensions,
            roles,
            database_shape: Some(shape),
        }))
        .await?;
        let trailer = pipeline::upload_child_output(
            tools.pg_dump(&db, target.lock_wait_timeout),
            "pg_dump",
            true,
            chain()?,
            tx.clone(),
            counters.clone(),
            cancel,
        )
        .await
        .map_err(|e| match e {
            PipelineError::Failed(r)
            | PipelineError::Corrupt(r)
            | PipelineError::ChildStopped(r) => {
                let r = crate::pg::lock_wait_failure(&r, target.lock_wait_timeout).unwrap_or(r);
                PipelineError::Failed(format!("database {name}: {r}"))
            }
            e => e,
        })?;
        send(upload_request::Msg::PartEnd(trailer)).await?;
        sent.push(name);
    }
    Ok(UploadTrailer {
        checksum: datasaver_common::checksum::Checksum::new().finish(),
        ..Default::default()
    })
}
