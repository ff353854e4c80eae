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
use super::record::{BackupRecord, DatabaseDump, Kind, PartRecord, Status};
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
    /// A whole server: each database is a part, the upload ends with an
    /// empty trailer and the backup has no dump of its own.
    pub whole_server: bool,
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
    /// Each table's rows, read from the archive by the agent.
    pub row_counts: super::record::RowCounts,
    /// A base backup's place in the WAL.
    pub physical: Option<super::record::Physical>,
}

/// One element of an upload. Parts (`PartStart`, its data, `PartEnd`)
/// come before the dump's own data and `End`.
#[derive(Debug, Clone)]
pub enum Piece {
    Data(Bytes),
    End(Trailer),
    PartStart {
        name: String,
        role_passwords: bool,
        /// A whole-server backup's database (its row counts come with the
        /// part's end).
        dump: Option<DatabaseDump>,
    },
    PartEnd(Trailer),
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
        // The parts stored so far are removed on any failure — also when
        // this future is dropped (the agent's connection went away).
        let mut guard = RemoveUnlessKept {
            storage: self.storage.clone(),
            keys: Vec::new(),
        };
        let r = self.ingest_into(id, meta, body, tags, &mut guard).await;
        if r.is_err() {
            guard.remove_now().await;
        }
        r
    }

    async fn ingest_into<S>(
        &self,
        id: &str,
        meta: IngestMeta,
        body: S,
        tags: Vec<String>,
        guard: &mut RemoveUnlessKept,
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
        let kind = running.kind;
        let object_key = keys::object_key(kind, &running.target, id, &extension);
        let meta_key = keys::meta_key(kind, &running.target, id);
        let mut body = std::pin::pin!(body);
        // The parts first, each stored whole before the next.
        let mut parts: Vec<PartRecord> = Vec::new();
        let first = loop {
            match body.next().await {
                Some(Ok(Piece::PartStart {
                    name,
                    role_passwords,
                    dump,
                })) => {
                    let is_database = datasaver_common::names::part_database(&name).is_some();
                    let stored = if kind == Kind::Base {
                        Err(IngestError::Failed(format!(
                            "a base backup has no parts; the upload sent {name:?}"
                        )))
                    } else if !keys::is_part_name(&name) {
                        Err(IngestError::Failed(format!(
                            "upload has an unknown part {name:?} (known: {})",
                            keys::PART_NAMES_TEXT
                        )))
                    } else if is_database && !(meta.whole_server && dump.is_some()) {
                        Err(IngestError::Failed(format!(
                            "upload has part {name:?}, which only a whole-server backup has, with its database described"
                        )))
                    } else if parts.iter().any(|p| p.name == name) {
                        Err(IngestError::Failed(format!(
                            "upload has part {name:?} twice"
                        )))
                    } else {
                        let key = keys::part_key(kind, &running.target, id, &name, &extension);
                        self.store_object(&key, &mut body, true)
                            .await
                            .map(|(size, checksum, t)| PartRecord {
                                name,
                                key,
                                stored_bytes: size,
                                checksum,
                                raw_bytes: t.raw_bytes,
                                raw_checksum: t.raw_checksum,
                                role_passwords,
                                dump: dump.map(|d| DatabaseDump {
                                    row_counts: t.row_counts,
                                    ..d
                                }),
                            })
                    };
                    match stored {
                        Ok(p) => {
                            guard.keys.push(p.key.clone());
                            parts.push(p);
                            if let Err(e) = self.store.note_parts(id, &parts).await {
                                return Err(IngestError::Failed(format!(
                                    "recording the backup's {} in the catalog failed: {e}",
                                    parts.last().map(|p| p.name.as_str()).unwrap_or("parts")
                                )));
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
                other => break other,
            }
        };
        let (object_key, size, ours, trailer) = if meta.whole_server {
            // No dump of its own: the databases were the parts.
            let trailer = match first {
                Some(Ok(Piece::End(t))) if t.stored_bytes == 0 => t,
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(IngestError::Failed(
                        "upload ended without a trailer (agent stopped?)".into(),
                    ))
                }
                Some(Ok(_)) => {
                    return Err(IngestError::Failed(
                        "a whole-server upload holds data outside its databases".into(),
                    ))
                }
            };
            let dumps: Vec<&PartRecord> = parts.iter().filter(|p| p.dump.is_some()).collect();
            if dumps.is_empty() {
                return Err(IngestError::Failed(
                    "a whole-server upload ended without any database".into(),
                ));
            }
            let trailer = Trailer {
                raw_bytes: dumps.iter().map(|p| p.raw_bytes).sum(),
                ..trailer
            };
            let size = dumps.iter().map(|p| p.stored_bytes).sum();
            (String::new(), size, String::new(), trailer)
        } else {
            let rest = futures::stream::iter(first).chain(body);
            let (size, ours, trailer) = self.store_object(&object_key, rest, false).await?;
            (object_key, size, ours, trailer)
        };

        let physical = match (kind, trailer.physical) {
            (Kind::Base, Some(p)) if p.end_lsn >= p.start_lsn && p.timeline > 0 => Some(p),
            (Kind::Base, _) => {
                let _ = self.storage.delete(std::slice::from_ref(&object_key)).await;
                return Err(IngestError::Failed(
                    "the base backup's upload did not say where it sits in the WAL".into(),
                ));
            }
            (Kind::Logical, _) => None,
        };
        let finished = self.now();
        let done = BackupRecord {
            status: Status::Completed,
            finished_at: Some(finished),
            duration_ms: (finished - running.created_at).num_milliseconds().max(0) as u64,
            raw_bytes: trailer.raw_bytes,
            stored_bytes: size,
            checksum: ours,
            raw_checksum: if meta.whole_server {
                String::new()
            } else {
                trailer.raw_checksum
            },
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
            parts,
            row_counts: if meta.whole_server {
                Default::default()
            } else {
                trailer.row_counts
            },
            tags,
            error: None,
            physical,
            ..running
        };
        let json = Meta::from_record(&done).to_json();
        if let Err(e) = self.storage.put(&meta_key, Bytes::from(json)).await {
            // The parts go with the guard (`ingest`).
            if !object_key.is_empty() {
                let _ = self.storage.delete(std::slice::from_ref(&object_key)).await;
            }
            return Err(IngestError::Failed(format!(
                "writing the meta file failed: {e}"
            )));
        }
        if let Err(e) = self.store.complete(done.clone()).await {
            let _ = self.storage.delete(&done.keys()).await;
            return Err(IngestError::Failed(format!(
                "recording the backup in the catalog failed: {e}"
            )));
        }
        guard.keys.clear();
        Ok(done)
    }
}

impl Repository {
    /// Streams one object from `body` into `key` until its end (`PartEnd`
    /// for a part, `End` for the dump), checks the agent's checksum against
    /// ours and that the backend kept every byte, and commits it. Returns
    /// the size, our checksum and the agent's trailer. Nothing is left at
    /// `key` on failure.
    async fn store_object<S>(
        &self,
        key: &str,
        body: S,
        part: bool,
    ) -> Result<(u64, String, Trailer), IngestError>
    where
        S: Stream<Item = Result<Piece, IngestError>> + Send,
    {
        let writer = self
            .storage
            .create(key)
            .await
            .map_err(|e| IngestError::Failed(e.to_string()))?;
        let (writer, hash, trailer) = match receive(writer, body, part).await {
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
                "checksum mismatch on upload of {key}: agent sent {} ({} bytes), coordinator received {} ({} bytes)",
                trailer.checksum,
                trailer.stored_bytes,
                ours,
                hash.len()
            )));
        }
        let info = tracing::Instrument::instrument(
            writer.commit(),
            tracing::info_span!("storage.commit", key = %key),
        )
        .await
        .map_err(|e| IngestError::Failed(e.to_string()))?;
        // A backend that kept fewer bytes than it was given must not leave a
        // "completed" backup whose checksum describes bytes it does not hold.
        if info.size != hash.len() {
            let _ = self.storage.delete(&[key.to_string()]).await;
            return Err(IngestError::Failed(format!(
                "storage kept {} of the {} bytes written to {key}",
                info.size,
                hash.len()
            )));
        }
        Ok((info.size, ours, trailer))
    }
}

/// How often, and how many times, the parts of a failed upload are tried
/// to be removed (storage may be what failed).
const REMOVE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
const REMOVE_ATTEMPTS: u32 = 150;

/// The parts an upload has stored: removed when it is dropped before the
/// backup completed (`keys` cleared), in the background and retried while
/// storage fails. They are also noted on the running row, so a later
/// cleanup of the failed attempt finds them if storage stays away.
struct RemoveUnlessKept {
    storage: std::sync::Arc<dyn crate::storage::Storage>,
    keys: Vec<String>,
}

impl RemoveUnlessKept {
    /// One attempt now; what it could not remove is retried from `drop`.
    async fn remove_now(&mut self) {
        if !self.keys.is_empty() && self.storage.delete(&self.keys).await.is_ok() {
            self.keys.clear();
        }
    }
}

impl Drop for RemoveUnlessKept {
    fn drop(&mut self) {
        let keys = std::mem::take(&mut self.keys);
        if keys.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!(keys = ?keys, "could not remove the parts of a failed upload (no runtime); a cleanup of the failed attempt removes them");
            return;
        };
        let storage = self.storage.clone();
        rt.spawn(async move {
            for attempt in 1..=REMOVE_ATTEMPTS {
                match storage.delete(&keys).await {
                    Ok(()) => return,
                    Err(e) if attempt == REMOVE_ATTEMPTS => {
                        tracing::error!(error = %e, keys = ?keys, "could not remove the parts of a failed upload; a cleanup of the failed attempt removes them");
                    }
                    Err(_) => tokio::time::sleep(REMOVE_EVERY).await,
                }
            }
        });
    }
}

type Received = (Box<dyn ObjectWriter>, Checksum, Trailer);

/// Writes the data pieces and hashes them; hands the writer back with the
/// error so the caller aborts it.
async fn receive<S>(
    mut writer: Box<dyn ObjectWriter>,
    body: S,
    part: bool,
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
            Some(Ok(Piece::End(t))) if !part => return Ok((writer, hash, t)),
            Some(Ok(Piece::PartEnd(t))) if part => return Ok((writer, hash, t)),
            Some(Ok(other)) => {
                return Err((
                    writer,
                    IngestError::Failed(format!(
                        "upload out of order: {} inside {}",
                        match other {
                            Piece::PartStart { .. } => "a part's start",
                            Piece::PartEnd(_) => "a part's end",
                            _ => "the end of the dump",
                        },
                        if part { "a part" } else { "the dump" }
                    )),
                ))
            }
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
        completed_backup, header, repo_with, upload, upload_server, upload_with_globals, Fault,
        FaultyStorage,
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
            .begin(
                "app",
                Trigger::Scheduled,
                None,
                "agent1",
                crate::repo::Kind::Logical,
            )
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

    /// The globals are stored beside the dump under the same id, recorded
    /// in the row and the meta file, read back checked, and deleted with it.
    #[tokio::test]
    async fn a_part_is_stored_read_and_deleted_with_its_backup() {
        use futures::StreamExt;
        let (repo, storage, _dir) = repo_with(FaultyStorage::new());
        let b = repo
            .begin(
                "app",
                Trigger::Scheduled,
                None,
                "agent1",
                crate::repo::Kind::Logical,
            )
            .await
            .unwrap();
        let done = repo
            .ingest(
                &b.id,
                header(),
                futures::stream::iter(upload_with_globals(b"CREATE ROLE app;", b"the dump")),
                vec![],
            )
            .await
            .unwrap();
        let g = done.part("globals").expect("a globals part").clone();
        assert_eq!(g.key, format!("app/logical/{}.globals.sql", b.id));
        assert_eq!((g.stored_bytes, g.role_passwords), (16, true));
        assert_eq!(g.raw_checksum, "blake3:globals");
        let mut want = vec![
            done.object_key.clone(),
            done.meta_key.clone(),
            g.key.clone(),
        ];
        want.sort();
        assert_eq!(storage.keys().await, want);
        assert_eq!(repo.get(&b.id).await.unwrap().unwrap(), done);
        let meta = storage.read_meta(&done.meta_key).await;
        assert_eq!(meta.to_record().unwrap().parts, done.parts);
        let mut read = Vec::new();
        let mut s = repo.open_verified(&done, Some("globals")).await.unwrap();
        while let Some(c) = s.next().await {
            read.extend_from_slice(&c.unwrap());
        }
        assert_eq!(read, b"CREATE ROLE app;");
        repo.check_parts(&done).await.unwrap();
        // A damaged part is found by a verify.
        storage.inner_put_raw(&g.key, b"CREATE ROLE apX;").await;
        let e = repo.check_parts(&done).await.unwrap_err();
        assert!(e.to_string().contains("is corrupt"), "{e}");
        assert!(repo.delete(&done, "test").await.unwrap());
        assert!(storage.keys().await.is_empty());
    }

    /// A whole server is one backup with one object per database and none
    /// of its own: each is read back checked by its part name, the backup
    /// as a whole is refused (name a database), the next backup says which
    /// databases came and went, and a new catalog rebuilt from storage
    /// knows it the same way. Dump data outside the databases is refused.
    #[tokio::test]
    async fn a_whole_server_is_one_backup_with_an_object_per_database() {
        use futures::StreamExt;
        let (repo, storage, _dir) = repo_with(FaultyStorage::new());
        let server = IngestMeta {
            whole_server: true,
            database: String::new(),
            ..header()
        };
        let store = |dbs: &'static [(&'static str, &'static [u8])]| {
            let (repo, server) = (&repo, server.clone());
            async move {
                let b = repo
                    .begin(
                        "srv",
                        Trigger::Scheduled,
                        None,
                        "agent1",
                        crate::repo::Kind::Logical,
                    )
                    .await
                    .unwrap();
                repo.ingest(
                    &b.id,
                    server,
                    futures::stream::iter(upload_server(dbs)),
                    vec![],
                )
                .await
            }
        };
        let first = store(&[("crm", b"crm dump"), ("my db", b"shop dump!")])
            .await
            .unwrap();
        assert!(first.is_whole_server());
        assert_eq!(first.object_key, "");
        assert_eq!(first.database_names(), ["crm", "my db"]);
        assert_eq!((first.stored_bytes, first.raw_bytes), (18, 18));
        let mut want = vec![
            first.meta_key.clone(),
            format!("srv/logical/{}.globals.sql", first.id),
            format!("srv/logical/{}.db-crm.dump", first.id),
            format!("srv/logical/{}.db-my%20db.dump", first.id),
        ];
        want.sort();
        assert_eq!(storage.keys().await, want);
        let mut read = Vec::new();
        let mut s = repo
            .open_verified(&first, Some("database:my db"))
            .await
            .unwrap();
        while let Some(c) = s.next().await {
            read.extend_from_slice(&c.unwrap());
        }
        assert_eq!(read, b"shop dump!");
        let e = repo.open_verified(&first, None).await.err().unwrap();
        assert!(e.to_string().contains("name one with --database"), "{e}");

        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let second = store(&[("crm", b"crm dump"), ("new", b"new dump")])
            .await
            .unwrap();
        assert_eq!(
            repo.database_changes(&second).await.unwrap(),
            (vec!["new".to_string()], vec!["my db".to_string()])
        );
        assert_eq!(
            repo.database_changes(&first).await.unwrap(),
            (vec![], vec![])
        );

        let (fresh, _, _dir2) = repo_with(storage.clone());
        let report = fresh.rebuild().await.unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(
            fresh.get(&first.id).await.unwrap().unwrap().parts,
            first.parts
        );

        // Dump data after the databases is no whole server.
        let b = repo
            .begin(
                "srv",
                Trigger::Scheduled,
                None,
                "agent1",
                crate::repo::Kind::Logical,
            )
            .await
            .unwrap();
        let mut odd = upload_server(&[("crm", b"crm dump")]);
        odd.insert(odd.len() - 1, Ok(Piece::Data(Bytes::from_static(b"x"))));
        let before = storage.keys().await;
        let e = repo
            .ingest(&b.id, server.clone(), futures::stream::iter(odd), vec![])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("outside its databases"), "{e}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(storage.keys().await, before, "its parts were left");
        // A database part in a single-database upload is refused.
        let mut odd = upload_server(&[("crm", b"crm dump")]);
        odd.pop();
        odd.extend(upload(b"the dump"));
        let b = repo
            .begin(
                "srv",
                Trigger::Scheduled,
                None,
                "agent1",
                crate::repo::Kind::Logical,
            )
            .await
            .unwrap();
        let e = repo
            .ingest(&b.id, header(), futures::stream::iter(odd), vec![])
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("only a whole-server backup has"),
            "{e}"
        );
    }

    /// A dump that fails after its part was stored takes the part with it;
    /// an unknown part is refused.
    #[tokio::test]
    async fn a_failed_upload_leaves_none_of_its_parts() {
        let data = vec![7u8; 300_000];
        let mut cut = upload_with_globals(b"CREATE ROLE app;", &data);
        cut.truncate(4);
        let (r, keys, row) = attempt(Fault::None, cut).await;
        assert!(r.unwrap_err().to_string().contains("without a trailer"));
        assert!(keys.is_empty(), "left {keys:?}");
        assert_eq!(row.unwrap().status, Status::Running);
        let (r, keys, _) = attempt(
            Fault::FailCall { op: "put", nth: 1 },
            upload_with_globals(b"x", &data),
        )
        .await;
        assert!(r.unwrap_err().to_string().contains("meta file"));
        assert!(keys.is_empty(), "left {keys:?}");
        let mut odd = upload_with_globals(b"x", &data);
        odd[0] = Ok(Piece::PartStart {
            name: "../../etc".into(),
            role_passwords: false,
            dump: None,
        });
        let (r, keys, _) = attempt(Fault::None, odd).await;
        assert!(r.unwrap_err().to_string().contains("unknown part"));
        assert!(keys.is_empty());
    }

    /// The agent's connection goes away after the globals were stored: the
    /// upload's future is dropped, and the part goes anyway; the running row
    /// named it meanwhile, for a cleanup of the attempt.
    #[tokio::test]
    async fn a_dropped_upload_removes_its_stored_parts() {
        use futures::StreamExt;
        let (repo, storage, _dir) = repo_with(FaultyStorage::new());
        let b = repo
            .begin(
                "app",
                Trigger::Scheduled,
                None,
                "agent1",
                crate::repo::Kind::Logical,
            )
            .await
            .unwrap();
        let mut first = upload_with_globals(b"CREATE ROLE app;", b"dump");
        first.truncate(4);
        let body = futures::stream::iter(first).chain(futures::stream::pending());
        let cut = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            repo.ingest(&b.id, header(), body, vec![]),
        )
        .await;
        assert!(cut.is_err(), "the upload should still be waiting");
        let row = repo.get(&b.id).await.unwrap().unwrap();
        assert_eq!(row.parts.len(), 1, "the stored part is not on the row");
        for _ in 0..100 {
            if storage.keys().await.is_empty() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("left {:?}", storage.keys().await);
    }

    #[tokio::test]
    async fn a_lying_trailer_is_refused() {
        let mut body = upload(b"0123456789");
        body[2] = Ok(Piece::End(Trailer {
            checksum: "blake3:00".into(),
            raw_bytes: 1,
            stored_bytes: 10,
            raw_checksum: String::new(),
            row_counts: Default::default(),
            physical: None,
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
