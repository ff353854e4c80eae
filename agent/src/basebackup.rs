//! A base backup (`dsctl backup --physical`, issue 14): `pg_basebackup`'s
//! tar of the whole cluster (its manifest inside) through the same
//! compress/encrypt/hash/upload pipeline as a dump, without WAL — the WAL
//! comes from the agent's own stream. The server's WAL position just
//! before and just after bound the backup; the trailer, which makes the
//! backup completed, is sent only once the coordinator has acknowledged
//! the WAL up to that end.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use datasaver_common::proto::agent_service_client::AgentServiceClient;
use datasaver_common::proto::{BackupJob, UploadHeader};
use tonic::transport::Channel;

use crate::backup::{finish_upload, open_upload};
use crate::config::TargetConfig;
use crate::jobs::JobCancel;
use crate::pg::PgTools;
use crate::pipeline::transform::Chain;
use crate::pipeline::{self, PipelineError};
use crate::progress::{Counters, Reporter};
use crate::walstream::WalState;

/// How long a finished base backup waits for its WAL to be stored.
const WAL_WAIT: Duration = Duration::from_secs(120);

/// The most zstd workers a base backup uses.
const BASE_BACKUP_THREADS: u32 = 2;

/// Runs one base backup; returns a summary or a one-line error.
pub async fn run(
    client: AgentServiceClient<Channel>,
    job: BackupJob,
    target: TargetConfig,
    tools: PgTools,
    reporter: Reporter,
    cancel: JobCancel,
    wal: Arc<WalState>,
) -> Result<String, String> {
    if target.wal.is_none() {
        return Err("a base backup needs this agent to stream WAL (DATASAVER_WAL=stream): a restore replays the WAL from its start, and only the stream stores it".into());
    }
    reporter.phase("probe", "checking the server for a base backup");
    let db = &target.db;
    let extra = tools.extra_tablespaces(db).await?;
    if !extra.is_empty() {
        return Err(format!(
            "the cluster has tablespaces outside its data directory ({}); a base backup here is one tar of the data directory and cannot hold them: move them to pg_default, or keep to dumps for this target",
            extra.join(", ")
        ));
    }
    let (_, server_v) = tools.probe(db).await?;
    let system_identifier = tools.system_identifier(db).await.ok_or(
        "cannot read the server's system_identifier (pg_control_system): a base backup must name its cluster; give the agent's role pg_monitor or superuser",
    )?;
    let (start, _, timeline) = tools.wal_point(db).await?;
    let header = UploadHeader {
        job_id: job.job_id.clone(),
        backup_id: job.backup_id.clone(),
        target: target.name.clone(),
        compression: target.compression.name().into(),
        compression_level: target.compression_level,
        format: "pg_basebackup-tar".into(),
        db_host: format!("{}:{}", db.host, db.port),
        server_version: server_v.text.clone(),
        system_identifier,
        encrypted: target.encrypt_to.is_some(),
        encryption_recipient: target
            .encrypt_to
            .as_ref()
            .map(|e| e.fingerprint.clone())
            .unwrap_or_default(),
        ..Default::default()
    };
    let (tx, upload) = open_upload(&client, header).await?;
    let counters = Arc::new(Counters::default());
    let progress = reporter.start_ticker("basebackup", counters.clone());
    // zstd's workers (DATASAVER_COMPRESSION_THREADS), at most two: on one
    // thread compression was the base backup's bottleneck, and each worker's
    // buffers sit beside the WAL stream's (two kept the agent under 64 MiB).
    let chain = Chain::encode_pages(
        target.compression,
        target.compression_level,
        target.compression_threads.min(BASE_BACKUP_THREADS),
        target.encrypt_to.as_ref().map(|e| &e.recipient),
    );
    let copied = match chain {
        Ok(chain) => {
            pipeline::upload_child_output(
                tools.pg_basebackup(db),
                "pg_basebackup",
                false,
                chain,
                tx.clone(),
                counters.clone(),
                cancel.token(),
            )
            .await
        }
        Err(e) => Err(e),
    };
    progress.abort();
    // The trailer goes only when the WAL to the end is stored.
    let ended = match copied {
        Ok(mut trailer) => {
            match settle(&tools, &target, &reporter, &wal, start, timeline, &cancel).await {
                Ok((end, at)) => {
                    trailer.wal_start_lsn = start.0;
                    trailer.wal_end_lsn = end.0;
                    trailer.timeline = timeline;
                    trailer.consistent_at_micros = at;
                    Ok(trailer)
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    let resp = finish_upload(tx, upload, ended, &cancel, |r| r).await?;
    Ok(format!(
        "base backup {} stored: {} bytes from {} bytes of pg_basebackup output ({}), WAL from {start} stored with it",
        resp.backup_id,
        resp.stored_bytes,
        counters.raw.load(Ordering::Relaxed),
        resp.checksum
    ))
}

/// After `pg_basebackup`: the server's position now (the backup's end
/// bound) on the same timeline, and the WAL from `start` to it stored.
async fn settle(
    tools: &PgTools,
    target: &TargetConfig,
    reporter: &Reporter,
    wal: &WalState,
    start: datasaver_common::wal::Lsn,
    timeline: u32,
    cancel: &JobCancel,
) -> Result<(datasaver_common::wal::Lsn, i64), PipelineError> {
    let (end, at, now_tli) = tools
        .wal_point(&target.db)
        .await
        .map_err(PipelineError::Failed)?;
    if now_tli != timeline {
        return Err(PipelineError::Failed(format!(
            "the server moved from timeline {timeline} to {now_tli} during the base backup; take it again"
        )));
    }
    reporter.phase(
        "wal",
        &format!("waiting for the WAL from {start} to {end} to be stored"),
    );
    tokio::select! {
        ok = wal.wait_stored(start, end, WAL_WAIT) => {
            if ok {
                Ok((end, at))
            } else {
                let run = wal
                    .run()
                    .map(|(a, b)| format!("{a} to {b}"))
                    .unwrap_or_else(|| "nothing".into());
                Err(PipelineError::Failed(format!(
                    "the WAL from {start} to {end} was not stored within {} s (the stream has stored {run} so far; see `dsctl wal`): the base backup is not kept",
                    WAL_WAIT.as_secs()
                )))
            }
        }
        _ = cancel.cancelled() => Err(PipelineError::Cancelled),
    }
}
