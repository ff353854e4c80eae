//! Storing a backup as it streams in: object → meta file → catalog row, all
//! or nothing. The object becomes visible only when every byte arrived and the
//! agent's checksum matches the one computed here; then the meta file, then
//! the row. Any failure undoes what was written, so no completed row lacks its
//! object and no object outlives a failed attempt.

use bytes::Bytes;
use datasaver_common::checksum::Checksum;
use futures::{Stream, StreamExt};

use super::keys;
use super::meta::Meta;
use super::record::{BackupRecord, Kind, Status};
use super::{hash_off_thread, Repository};
use crate::storage::ObjectWriter;

/// What the agent says about the bytes it is about to send.
#[derive(Debug, Clone)]
pub struct IngestMeta {
    /// Codec name (`zstd`, `gzip`, `none`).
    pub compression: String,
    pub encrypted: bool,
    pub encryption_recipient: String,
    /// e.g. `pg_dump-custom`
    pub format: String,
    pub database: String,
    pub db_host: String,
    pub server_version: String,
    pub pg_dump_version: String,
    /// The extensions the database uses.
    pub extensions: Vec<String>,
    /// The server's `system_identifier` (empty when unknown).
    pub system_identifier: String,
    /// The roles the database's objects name.
    pub roles: Vec<String>,
    /// How the database was created.
    pub database_shape: super::record::DatabaseShape,
}

/// What the agent says after the last byte.
#[derive(Debug, Clone)]
pub struct Trailer {
    /// `blake3:<hex>` of every byte sent.
    pub checksum: String,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// `blake3:<hex>` of the plain pg_dump output (empty from old agents).
    pub raw_checksum: String,
}

/// One element of an upload.
#[derive(Debug, Clone)]
pub enum Piece {
    Data(Bytes),
    End(Trailer),
}

/// Why an upload did not become a completed backup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// The agent stopped it because it is stopping on purpose.
    #[error("interrupted: {0}")]
    Interrupted(String),
    #[error("{0}")]
    Failed(String),
}

impl From<String> for IngestError {
    fn from(s: String) -> Self {
        IngestError::Failed(s)
    }
}

impl Repository {
    /// Stores the upload of running backup `id`. `tags` are the GFS tags it
    /// gets as a completed backup. On success the backup is completed (object,
    /// meta file and row); on any failure nothing of it is left in storage
    /// and the row is still running (the caller decides failed or
    /// interrupted).
    pub async fn ingest<S>(
        &self,
        id: &str,
        meta: IngestMeta,
        body: S,
        tags: Vec<String>,
    ) -> Result<BackupRecord, IngestError>
    where
        S: Stream<Item = Result<Piece, IngestError>> + Send,
    {
        let running = self
            .store
            .get(id)
            .await
            .map_err(|e| IngestError::Failed(e.to_string()))?
            .filter(|r| r.status == Status::Running)
            .ok_or_else(|| IngestError::Failed(format!("backup {id} is not running")))?;
        let codec: datasaver_common::codec::Compression = meta
            .compression
            .parse()
            .map_err(|e| IngestError::Failed(format!("upload header: {e}")))?;
        let extension = if meta.encrypted {
            format!("{}.age", codec.extension())
        } else {
            codec.extension().to_string()
        };
        let object_key = keys::object_key(Kind::Logical, &running.target, id, &extension);
        let meta_key = keys::meta_key(Kind::Logical, &running.target, id);
        let writer = self
            .storage
            .create(&object_key)
            .await
            .map_err(|e| IngestError::Failed(e.to_string()))?;
        let (writer, hash, trailer) = match receive(writer, body).await {
            Ok(r) => r,
            Err((writer, e)) => {
                // One place undoes the partial object, whatever went wrong.
                let _ = writer.abort().await;
                return Err(e);
            }
        };
        let ours = hash.finish();
        if trailer.checksum != ours || trailer.stored_bytes != hash.len() {
            let _ = writer.abort().await;
            return Err(IngestError::Failed(format!(
                "checksum mismatch on upload: agent sent {} ({} bytes), coordinator received {} ({} bytes)",
                trailer.checksum,
                trailer.stored_bytes,
                ours,
                hash.len()
            )));
        }
        let info = tracing::Instrument::instrument(
            writer.commit(),
            tracing::info_span!("storage.commit", key = %object_key),
        )
        .await
        .map_err(|e| IngestError::Failed(e.to_string()))?;
        // A backend that kept fewer bytes than it was given must not leave a
        // "completed" backup whose checksum describes bytes it does not hold.
        if info.size != hash.len() {
            let _ = self.storage.delete(std::slice::from_ref(&object_key)).await;
            return Err(IngestError::Failed(format!(
                "storage kept {} of the {} bytes written to {object_key}",
                info.size,
                hash.len()
            )));
        }

        let finished = self.now();
        let done = BackupRecord {
            status: Status::Completed,
            finished_at: Some(finished),
            duration_ms: (finished - running.created_at).num_milliseconds().max(0) as u64,
            raw_bytes: trailer.raw_bytes,
            stored_bytes: info.size,
            checksum: ours,
            raw_checksum: trailer.raw_checksum,
            compression: codec.name().into(),
            encrypted: meta.encrypted,
            encryption_recipient: meta.encryption_recipient,
            format: if meta.format.is_empty() {
                "pg_dump-custom".into()
            } else {
                meta.format
            },
            object_key: object_key.clone(),
            meta_key: meta_key.clone(),
            database: meta.database,
            db_host: meta.db_host,
            server_version: meta.server_version,
            pg_dump_version: meta.pg_dump_version,
            extensions: meta.extensions,
            system_identifier: meta.system_identifier,
            roles: meta.roles,
            database_shape: meta.database_shape,
            tags,
            error: None,
            ..running
        };
        let json = Meta::from_record(&done).to_json();
        if let Err(e) = self.storage.put(&meta_key, Bytes::from(json)).await {
            let _ = self.storage.delete(std::slice::from_ref(&object_key)).await;
            return Err(IngestError::Failed(format!(
                "writing the meta file failed: {e}"
            )));
        }
        if let Err(e) = self.store.complete(done.clone()).await {
            let _ = self.storage.delete(&[object_key, meta_key]).await;
            return Err(IngestError::Failed(format!(
                "recording the backup in the catalog failed: {e}"
            )));
        }
        Ok(done)
    }
}

type Received = (Box<dyn ObjectWriter>, Checksum, Trailer);

/// Writes the data pieces and hashes them; hands the writer back with the
/// error so the caller aborts it.
async fn receive<S>(
    mut writer: Box<dyn ObjectWriter>,
    body: S,
) -> Result<Received, (Box<dyn ObjectWriter>, IngestError)>
where
    S: Stream<Item = Result<Piece, IngestError>> + Send,
{
    let mut body = std::pin::pin!(body);
    let mut hash = Checksum::new();
    loop {
        match body.next().await {
            Some(Ok(Piece::Data(data))) => {
                if let Err(e) = hash_off_thread(&mut hash, data.clone()).await {
                    return Err((writer, IngestError::Failed(e)));
                }
                if let Err(e) = writer.write(data).await {
                    return Err((writer, IngestError::Failed(e.to_string())));
                }
            }
            Some(Ok(Piece::End(t))) => return Ok((writer, hash, t)),
            Some(Err(e)) => return Err((writer, e)),
            None => {
                return Err((
                    writer,
                    IngestError::Failed("upload ended without a trailer (agent stopped?)".into()),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{
        completed_backup, header, repo_with, upload, Fault, FaultyStorage,
    };
    use super::super::Trigger;
    use super::*;

    type Body = Vec<Result<Piece, IngestError>>;

    async fn attempt(
        fault: Fault,
        body: Body,
    ) -> (
        Result<BackupRecord, IngestError>,
        Vec<String>,
        Option<BackupRecord>,
    ) {
        let (repo, storage, _dir) = repo_with(FaultyStorage::new());
        let b = repo
            .begin("app", Trigger::Scheduled, None, "agent1")
            .await
            .unwrap();
        storage.set(fault);
        let r = repo
            .ingest(
                &b.id,
                header(),
                futures::stream::iter(body),
                vec!["daily".into()],
            )
            .await;
        let keys = storage.keys().await;
        let row = repo.get(&b.id).await.unwrap();
        (r, keys, row)
    }

    #[tokio::test]
    async fn object_then_meta_then_row() {
        let data = vec![7u8; 300_000];
        let (r, keys, row) = attempt(Fault::None, upload(&data)).await;
        let b = r.unwrap();
        assert_eq!(keys, vec![b.object_key.clone(), b.meta_key.clone()]);
        let row = row.unwrap();
        assert_eq!(row, b);
        assert_eq!(row.status, Status::Completed);
        assert_eq!(row.stored_bytes, 300_000);
        assert_eq!(row.tags, vec!["daily"]);
        assert!(row.object_key.ends_with(".dump"), "{}", row.object_key);
    }

    #[tokio::test]
    async fn any_failure_leaves_nothing_and_the_row_running() {
        let data = vec![7u8; 300_000];
        let cases: Vec<(Fault, Body, &str)> = vec![
            (
                Fault::FailCall {
                    op: "create",
                    nth: 1,
                },
                upload(&data),
                "injected",
            ),
            (
                Fault::FailCall {
                    op: "write",
                    nth: 2,
                },
                upload(&data),
                "injected",
            ),
            (
                Fault::FailCall {
                    op: "commit",
                    nth: 1,
                },
                upload(&data),
                "injected",
            ),
            (
                Fault::FailCall { op: "put", nth: 1 },
                upload(&data),
                "meta file",
            ),
            // a storage that silently loses bytes is caught by the checksum
            (
                Fault::Truncate(1000),
                upload(&data),
                "storage kept 1000 of the 300000 bytes",
            ),
            // the agent's own abort, and a stream that just ends
            (
                Fault::None,
                vec![
                    Ok(Piece::Data(Bytes::from_static(b"part"))),
                    Err(IngestError::Interrupted("agent stopping".into())),
                ],
                "interrupted",
            ),
            (
                Fault::None,
                vec![Ok(Piece::Data(Bytes::from_static(b"part")))],
                "without a trailer",
            ),
        ];
        for (fault, body, says) in cases {
            let what = format!("{fault:?}");
            let (r, keys, row) = attempt(fault, body).await;
            let e = r.unwrap_err();
            assert!(e.to_string().contains(says), "{what}: {e}");
            assert!(keys.is_empty(), "{what}: left {keys:?}");
            assert_eq!(row.unwrap().status, Status::Running, "{what}");
        }
    }

    #[tokio::test]
    async fn a_lying_trailer_is_refused() {
        let mut body = upload(b"0123456789");
        body[2] = Ok(Piece::End(Trailer {
            checksum: "blake3:00".into(),
            raw_bytes: 1,
            stored_bytes: 10,
            raw_checksum: String::new(),
        }));
        let (r, keys, _) = attempt(Fault::None, body).await;
        assert!(r.unwrap_err().to_string().contains("checksum mismatch"));
        assert!(keys.is_empty());
    }

    #[tokio::test]
    async fn only_a_running_backup_takes_an_upload() {
        let (repo, storage, _dir) = repo_with(FaultyStorage::new());
        let b = completed_backup(&repo, "app", b"first").await;
        let e = repo
            .ingest(
                &b.id,
                header(),
                futures::stream::iter(upload(b"again")),
                vec![],
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not running"), "{e}");
        assert_eq!(
            storage.keys().await.len(),
            2,
            "the first upload is untouched"
        );
    }
}
