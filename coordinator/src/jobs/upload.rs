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
/// DATASAVER_TRANSFER_IDLE_TIMEOUT fails its job (`transfer::watch`).
pub async fn store_upload<S>(
    core: &Arc<Core>,
    job_id: &str,
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
    let body = until_shutdown(counted, core.cancel.clone());
    let result = core.repo.ingest(backup_id, meta, body, tags).await;
    if let Err(e) = &result {
        if let Err(ne) = core.repo.note_error(backup_id, &e.to_string()).await {
            tracing::error!(backup = %backup_id, error = %ne, "could not record why the upload failed");
        }
    }
    result
}

/// `s`, ending with an error item when `cancel` fires.
fn until_shutdown<S>(
    s: S,
    cancel: tokio_util::sync::CancellationToken,
) -> impl futures::Stream<Item = Result<repo::ingest::Piece, repo::ingest::IngestError>> + Send
where
    S: futures::Stream<Item = Result<repo::ingest::Piece, repo::ingest::IngestError>> + Send,
{
    use futures::StreamExt;
    futures::stream::unfold(
        (Box::pin(s), cancel, false),
        |(mut s, cancel, ended)| async move {
            if ended {
                return None;
            }
            tokio::select! {
                _ = cancel.cancelled() => Some((
                    Err(repo::ingest::IngestError::Failed("coordinator shutting down".into())),
                    (s, cancel, true),
                )),
                item = s.next() => item.map(|i| (i, (s, cancel, false))),
            }
        },
    )
}
