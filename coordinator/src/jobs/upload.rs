//! The upload's domain side: the bytes of a running backup, as they arrive
//! from its agent, handed to the repository's all-or-nothing ingest with the
//! GFS tags the backup gets when it completes.

use std::sync::Arc;

use crate::repo::{self, BackupRecord};
use crate::Core;

/// Stores the bytes of running backup `backup_id` as they arrive from its
/// agent (job `job_id`'s `Upload` call): GFS tags for its completion, the
/// repository's all-or-nothing ingest, and — when it does not complete — the
/// reason kept with the backup (the job's outcome is still decided in
/// `decide`, once the agent reports). An upload that stalls for
/// DATASAVER_TRANSFER_IDLE_TIMEOUT fails its job (`transfer::watch`); a job
/// stopped for any reason ends its upload at once (`claim.stop`), and the
/// job waits for that before it records the outcome.
pub async fn store_upload<S>(
    core: &Arc<Core>,
    job_id: &str,
    claim: crate::fleet::UploadClaim,
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
    let watched = super::transfer::watch(
        core,
        job_id,
        super::transfer::Start::FirstItem,
        pieces,
        IngestError::Failed,
    );
    let counted = watched.inspect(|p| {
        if let Ok(Piece::Data(d)) = p {
            metrics.uploaded(&target, d.len() as u64);
        }
    });
    let body = until_cancelled(counted, core.cancel.clone(), || {
        "coordinator shutting down".to_string()
    });
    let stopped = claim.stop_message_fn();
    let body = until_cancelled(body, claim.stop.clone(), stopped);
    let result = core.repo.ingest(backup_id, meta, body, tags).await;
    // The job records its own reason once this returns (and the claim drops).
    if result.is_err() && claim.stop.is_cancelled() {
        return result;
    }
    if let Err(e) = &result {
        if let Err(ne) = core.repo.note_error(backup_id, &e.to_string()).await {
            tracing::error!(backup = %backup_id, error = %ne, "could not record why the upload failed");
        }
    }
    result
}

/// `s`, ending with an error item (`why()`) when `cancel` fires.
fn until_cancelled<S, F>(
    s: S,
    cancel: tokio_util::sync::CancellationToken,
    why: F,
) -> impl futures::Stream<Item = Result<repo::ingest::Piece, repo::ingest::IngestError>> + Send
where
    S: futures::Stream<Item = Result<repo::ingest::Piece, repo::ingest::IngestError>> + Send,
    F: Fn() -> String + Send,
{
    use futures::StreamExt;
    futures::stream::unfold(
        (Box::pin(s), cancel, why, false),
        |(mut s, cancel, why, ended)| async move {
            if ended {
                return None;
            }
            tokio::select! {
                _ = cancel.cancelled() => {
                    let e = repo::ingest::IngestError::Failed(why());
                    Some((Err(e), (s, cancel, why, true)))
                }
                item = s.next() => item.map(|i| (i, (s, cancel, why, false))),
            }
        },
    )
}
