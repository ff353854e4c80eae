//! The repository: the only code that touches storage, the catalog's backup
//! table and the meta files. It owns the typed [`BackupRecord`], the storage
//! layout (`keys`), the write ordering (object → meta file → catalog row, all
//! or nothing: `ingest`), reads verified while they stream, pins and verify
//! results (each change of a backup's row and meta file serialised), crash-safe
//! deletion, the rebuild from storage and the reconciliation at start-up.
//! Everything else asks it.

pub mod ingest;
pub mod keys;
pub mod meta;
pub mod rebuild;
pub mod reconcile;
pub mod record;
pub mod store;
#[cfg(test)]
pub(crate) mod testing;
pub mod wal;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use datasaver_common::checksum::Checksum;
use futures::StreamExt;

use crate::catalog::{Catalog, CatalogError};
use crate::clock::Clock;
use crate::storage::{ByteStream, Storage, StorageError};
pub use record::{
    latest_drill, BackupRecord, DatabaseDump, Kind, PartRecord, RowCounts, Status, TableRows,
    Trigger, Verification, GLOBALS,
};
use store::BackupStore;

/// Why a verified read did not deliver the whole object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The bytes do not match what was recorded when they were stored.
    #[error("{0}")]
    Corrupt(String),
    /// Storage could not be read (worth trying again later).
    #[error("{0}")]
    Storage(String),
}

/// The bytes of a stored object, checked as they stream.
pub type VerifiedStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Bytes, ReadError>> + Send>>;

/// A repository failure a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("no backup with id {0} (see `dsctl list`)")]
    NotFound(String),
    /// The backup is not in a state that allows this.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Catalog(#[from] CatalogError),
    #[error("{0}")]
    Storage(#[from] StorageError),
}

pub struct Repository {
    store: BackupStore,
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    /// One writer at a time per backup for "change the row, rewrite the meta
    /// file from it", so a pin and a verify result can't overwrite each
    /// other's meta file with a stale copy.
    meta_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// One deletion pass at a time: two would race on the same rows.
    deleting: tokio::sync::Mutex<()>,
    /// The last liveness check and when it was made; held while checking,
    /// so concurrent probes wait for one check.
    live: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
}

/// How long one liveness check answers: a probe hammering `/live` must not
/// reach storage on every request.
pub const LIVE_CHECK_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// How long storage and the catalog may take to answer a liveness check.
const LIVE_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What a liveness check asks storage about (it need not exist).
const LIVE_KEY: &str = ".datasaver-live";

/// Adds `data` to a checksum on the blocking pool (chunks are up to 1 MiB:
/// too much hashing for an async worker thread).
pub(crate) async fn hash_off_thread(h: &mut Checksum, data: Bytes) -> Result<(), String> {
    let mut taken = std::mem::take(h);
    *h = tokio::task::spawn_blocking(move || {
        taken.update(&data);
        taken
    })
    .await
    .map_err(|e| format!("hashing worker failed: {e}"))?;
    Ok(())
}

/// Chunks a verified read keeps ready ahead of its consumer.
const READ_AHEAD: usize = 8;

/// Runs `s` on its own task, up to `READ_AHEAD` chunks ahead of the reader:
/// storage latency and hashing overlap with sending instead of taking turns
/// (a restore is fed as fast as the database takes it). Reading stops when
/// the reader goes away or after the first error.
fn read_ahead<S>(s: S) -> VerifiedStream
where
    S: futures::Stream<Item = Result<Bytes, ReadError>> + Send + 'static,
{
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
    tokio::spawn(async move {
        let mut s = Box::pin(s);
        while let Some(item) = s.next().await {
            let last = item.is_err();
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

impl Repository {
    pub fn new(db: Catalog, storage: Arc<dyn Storage>, clock: Arc<dyn Clock>) -> Self {
        Self {
            store: BackupStore::new(db),
            storage,
            clock,
            meta_locks: Mutex::new(HashMap::new()),
            deleting: tokio::sync::Mutex::new(()),
            live: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether the catalog and storage answer: the coordinator's liveness
    /// (`GET /live`). Cached for [`LIVE_CHECK_TTL`]; the error names which
    /// one did not answer, for the log.
    pub async fn reachable(&self) -> Result<(), String> {
        let mut cached = self.live.lock().await;
        if let Some((at, result)) = cached.as_ref() {
            if at.elapsed() < LIVE_CHECK_TTL {
                return result.clone();
            }
        }
        let check = async {
            self.store
                .get(LIVE_KEY)
                .await
                .map_err(|e| format!("the catalog does not answer: {e}"))?;
            self.storage
                .head(LIVE_KEY)
                .await
                .map_err(|e| format!("storage does not answer: {e}"))?;
            Ok(())
        };
        let result = tokio::time::timeout(LIVE_CHECK_TIMEOUT, check)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "the catalog or storage did not answer within {} s",
                    LIVE_CHECK_TIMEOUT.as_secs()
                ))
            });
        *cached = Some((std::time::Instant::now(), result.clone()));
        result
    }

    /// Now, to the millisecond: what records store, so a record read back
    /// equals the one written.
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        use chrono::SubsecRound;
        self.clock.now().trunc_subsecs(3)
    }

    /// "local /srv/backups", "s3://bucket/prefix", for logs.
    pub fn describe_storage(&self) -> String {
        self.storage.describe()
    }

    // ------------------------------------------------------------ queries

    pub async fn get(&self, id: &str) -> Result<Option<BackupRecord>, RepoError> {
        Ok(self.store.get(id).await?)
    }

    /// The backup `id`, or `NotFound`.
    pub async fn find(&self, id: &str) -> Result<BackupRecord, RepoError> {
        self.get(id)
            .await?
            .ok_or_else(|| RepoError::NotFound(id.to_string()))
    }

    /// Backups, newest first, optionally of one target.
    pub async fn list(&self, target: Option<&str>) -> Result<Vec<BackupRecord>, RepoError> {
        Ok(self.store.list(target.map(str::to_string)).await?)
    }

    pub async fn has_backups(&self) -> Result<bool, RepoError> {
        Ok(self.store.has_backups().await?)
    }

    /// Every target with at least one backup row.
    pub async fn targets(&self) -> Result<Vec<String>, RepoError> {
        Ok(self.store.targets().await?)
    }

    /// Newest completed backup of `target` created at or before `at`.
    pub async fn latest_completed(
        &self,
        target: &str,
        at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Option<BackupRecord>, RepoError> {
        Ok(self.store.latest_completed(target, at).await?)
    }

    /// The backup to use instead of a bad one: the newest older completed
    /// backup of the same target not known to be bad (from the catalog
    /// alone: no object is read).
    pub async fn next_good(&self, bad: &BackupRecord) -> Result<Option<BackupRecord>, RepoError> {
        Ok(self
            .store
            .older_completed(&bad.target, &bad.id)
            .await?
            .into_iter()
            .find(|b| !b.known_bad()))
    }

    /// For whole-server backup `b`: the databases it holds that the
    /// target's previous completed backup did not, and those that backup
    /// held that `b` does not (both empty for other backups, or the first).
    pub async fn database_changes(
        &self,
        b: &BackupRecord,
    ) -> Result<(Vec<String>, Vec<String>), RepoError> {
        if !b.is_whole_server() {
            return Ok((Vec::new(), Vec::new()));
        }
        let Some(prev) = self
            .store
            .older_completed(&b.target, &b.id)
            .await?
            .into_iter()
            .next()
        else {
            return Ok((Vec::new(), Vec::new()));
        };
        let before = if prev.is_whole_server() {
            prev.database_names()
        } else {
            vec![prev.database.clone()]
        };
        let now = b.database_names();
        let appeared = now
            .iter()
            .filter(|d| !before.contains(d))
            .cloned()
            .collect();
        let gone = before.into_iter().filter(|d| !now.contains(d)).collect();
        Ok((appeared, gone))
    }

    // ------------------------------------------------------------ life of a backup

    /// Records a backup that is starting, under a fresh id.
    pub async fn begin(
        &self,
        target: &str,
        trigger: Trigger,
        label: Option<String>,
        agent: &str,
        kind: Kind,
    ) -> Result<BackupRecord, RepoError> {
        let now = self.now();
        let base = datasaver_common::names::backup_id(target, now);
        let mut rec = BackupRecord::running(String::new(), target, trigger, label, agent, now);
        rec.kind = kind;
        Ok(self.store.insert_unique(base, rec).await?)
    }

    /// Ends a running backup as failed or interrupted. Returns false if it
    /// was no longer running (it completed, or already ended).
    pub async fn finish(&self, id: &str, status: Status, reason: &str) -> Result<bool, RepoError> {
        Ok(self.store.finish(id, status, reason, self.now()).await?)
    }

    /// Remembers why a running backup went wrong (the first reason wins)
    /// without deciding its outcome.
    pub async fn note_error(&self, id: &str, error: &str) -> Result<(), RepoError> {
        Ok(self.store.note_error(id, error).await?)
    }

    /// A backup that could not even start (its agent was not connected): a
    /// failed row, so a missed backup is never silent.
    pub async fn record_failed_attempt(
        &self,
        target: &str,
        trigger: Trigger,
        error: &str,
    ) -> Result<BackupRecord, RepoError> {
        let rec = self.begin(target, trigger, None, "", Kind::Logical).await?;
        self.finish(&rec.id, Status::Failed, error).await?;
        self.find(&rec.id).await
    }

    /// Every running row, failed: at start-up (nothing can still run) and at
    /// shutdown. Returns what it ended.
    pub async fn fail_all_running(&self, reason: &str) -> Result<Vec<BackupRecord>, RepoError> {
        Ok(self.store.fail_all_running(reason, self.now()).await?)
    }

    // ------------------------------------------------------------ reading

    /// Streams a completed backup's object, hashing it on the way: if the
    /// bytes do not match the recorded checksum and size, the stream ends
    /// with `ReadError::Corrupt` instead of a clean end, so no reader can take
    /// a damaged object for a good one.
    /// Reads every part of `b` but its databases (which the agent reads and
    /// checks as archives) and checks it against its checksum.
    pub async fn check_parts(&self, b: &BackupRecord) -> Result<(), ReadError> {
        for p in b.parts.iter().filter(|p| p.dump.is_none()) {
            let mut s = self
                .open_verified(b, Some(&p.name))
                .await
                .map_err(|e| ReadError::Storage(e.to_string()))?;
            while let Some(chunk) = s.next().await {
                chunk?;
            }
        }
        Ok(())
    }

    /// With `part`, that part of the backup (`globals`) instead of its dump.
    pub async fn open_verified(
        &self,
        b: &BackupRecord,
        part: Option<&str>,
    ) -> Result<VerifiedStream, RepoError> {
        if b.status != Status::Completed {
            return Err(RepoError::Conflict(format!(
                "backup {} is {}; only completed backups can be read",
                b.id, b.status
            )));
        }
        let (key, checksum, size) = match part {
            None if b.is_whole_server() => {
                return Err(RepoError::Conflict(format!(
                    "backup {} is a whole-server backup of databases {}; name one with --database",
                    b.id,
                    b.database_names().join(", ")
                )))
            }
            None => (&b.object_key, &b.checksum, b.stored_bytes),
            Some(name) => {
                let p = b.part(name).ok_or_else(|| {
                    RepoError::NotFound(format!("backup {} has no {name} part", b.id))
                })?;
                (&p.key, &p.checksum, p.stored_bytes)
            }
        };
        let inner = self.storage.get(key).await?;
        let state = Verifying {
            inner,
            hash: Some(Checksum::new()),
            id: b.id.clone(),
            key: key.clone(),
            checksum: checksum.clone(),
            size,
        };
        Ok(read_ahead(futures::stream::unfold(
            state,
            |mut s| async move {
                let mut hash = s.hash.take()?;
                let item = match s.inner.next().await {
                    Some(Ok(chunk)) => match hash_off_thread(&mut hash, chunk.clone()).await {
                        Ok(()) => {
                            s.hash = Some(hash);
                            Ok(chunk)
                        }
                        Err(e) => Err(ReadError::Storage(e)),
                    },
                    Some(Err(e)) => Err(ReadError::Storage(e.to_string())),
                    None => {
                        let got = hash.finish();
                        if got == s.checksum && hash.len() == s.size {
                            return None;
                        }
                        Err(ReadError::Corrupt(format!(
                        "backup {} is corrupt: {} has checksum {got} ({} bytes) but {} ({} bytes) was recorded when it was stored",
                        s.id,
                        s.key,
                        hash.len(),
                        s.checksum,
                        s.size
                    )))
                    }
                };
                Some((item, s))
            },
        )))
    }

    // ------------------------------------------------------------ changes to completed backups

    fn meta_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.meta_locks.lock().unwrap_or_else(|p| p.into_inner());
        // Forget locks nobody holds, so the map stays as small as the
        // number of backups being changed right now.
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(id.to_string()).or_default().clone()
    }

    /// Rewrites a backup's meta file from its current row (under its lock).
    async fn write_meta(&self, b: &BackupRecord) -> Result<(), RepoError> {
        let json = meta::Meta::from_record(b).to_json();
        self.storage.put(&b.meta_key, Bytes::from(json)).await?;
        Ok(())
    }

    /// Pins or unpins a completed backup, in the catalog and its meta file
    /// (so a rebuilt catalog still knows).
    pub async fn set_pinned(&self, id: &str, pinned: bool) -> Result<BackupRecord, RepoError> {
        let lock = self.meta_lock(id);
        let _one = lock.lock().await;
        let b = self.find(id).await?;
        if b.status != Status::Completed {
            return Err(RepoError::Conflict(format!(
                "backup {} is {}; only completed backups can be pinned",
                b.id, b.status
            )));
        }
        if !self.store.set_pinned(id, pinned).await? {
            return Err(RepoError::Conflict(format!("backup {id} is being deleted")));
        }
        let b = self.find(id).await?;
        self.write_meta(&b).await.map_err(|e| {
            RepoError::Conflict(format!(
                "the pin is recorded in the catalog, but the meta file could not be updated: {e}"
            ))
        })?;
        Ok(b)
    }

    /// Records what a read of the stored object found (a verify, or a restore
    /// that found it corrupt), in the catalog and the meta file.
    pub async fn record_verification(
        &self,
        id: &str,
        ok: bool,
        detail: &str,
    ) -> Result<BackupRecord, RepoError> {
        self.record_check(id, ok, detail, false).await
    }

    /// Keeps the result of a restore drill of backup `id` (catalog and
    /// meta file).
    pub async fn record_drill(
        &self,
        id: &str,
        ok: bool,
        detail: &str,
    ) -> Result<BackupRecord, RepoError> {
        self.record_check(id, ok, detail, true).await
    }

    async fn record_check(
        &self,
        id: &str,
        ok: bool,
        detail: &str,
        drill: bool,
    ) -> Result<BackupRecord, RepoError> {
        let lock = self.meta_lock(id);
        let _one = lock.lock().await;
        let v = Verification {
            at: self.now(),
            ok,
            detail: detail.to_string(),
        };
        self.store.set_check(id, v, drill).await?;
        let b = self.find(id).await?;
        if b.status == Status::Completed {
            if let Err(e) = self.write_meta(&b).await {
                tracing::warn!(backup = %id, error = %e, "could not update the meta file with the verify result");
            }
        }
        Ok(b)
    }

    // ------------------------------------------------------------ deletion

    /// Deletes one backup: mark the row, delete object and meta file, delete
    /// the row. Returns false if the row changed under us (pinned meanwhile),
    /// in which case nothing was deleted. A crash in between is finished by
    /// `finish_deletions`.
    pub async fn delete(&self, b: &BackupRecord, reason: &str) -> Result<bool, RepoError> {
        let _one = self.deleting.lock().await;
        if !self.store.mark_deleting(&b.id, reason).await? {
            return Ok(false);
        }
        self.delete_objects(b).await?;
        Ok(true)
    }

    /// Finishes deletions that were marked but not done (rows left
    /// `deleting` by a crash or a storage error). Returns their ids, and the
    /// errors of those that still could not be finished.
    pub async fn finish_deletions(
        &self,
        target: Option<&str>,
    ) -> Result<(Vec<String>, Vec<String>), RepoError> {
        let _one = self.deleting.lock().await;
        let mut done = Vec::new();
        let mut errors = Vec::new();
        for b in self
            .list(target)
            .await?
            .into_iter()
            .filter(|b| b.status == Status::Deleting)
        {
            match self.delete_objects(&b).await {
                Ok(()) => done.push(b.id),
                Err(e) => errors.push(format!("{}: {e}", b.id)),
            }
        }
        Ok((done, errors))
    }

    /// The object and meta file, then the row. Deleting what is already gone
    /// is not an error, so this can be repeated.
    async fn delete_objects(&self, b: &BackupRecord) -> Result<(), RepoError> {
        let keys = b.keys();
        if !keys.is_empty() {
            self.storage.delete(&keys).await.map_err(|e| {
                RepoError::Conflict(format!("deleting its objects failed (will retry): {e}"))
            })?;
        }
        Ok(self.store.delete_row(&b.id).await?)
    }
}

struct Verifying {
    inner: ByteStream,
    /// `None` once the stream has ended (cleanly or not).
    hash: Option<Checksum>,
    id: String,
    key: String,
    checksum: String,
    size: u64,
}

#[cfg(test)]
mod tests {
    use super::testing::{completed_backup, repo_with, Fault, FaultyStorage};
    use super::*;
    use futures::TryStreamExt;

    #[tokio::test]
    async fn a_verified_read_fails_on_a_damaged_object_and_passes_a_good_one() {
        let (repo, storage, _dir) = repo_with(FaultyStorage::new());
        let b = completed_backup(&repo, "app", b"the archive bytes").await;
        let got: Vec<Bytes> = repo
            .open_verified(&b, None)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(got.concat(), b"the archive bytes");

        storage
            .inner_put_raw(&b.object_key, b"the archive byteZ")
            .await;
        let err = repo
            .open_verified(&b, None)
            .await
            .unwrap()
            .try_collect::<Vec<Bytes>>()
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ReadError::Corrupt(m) if m.contains("corrupt")),
            "{err}"
        );
        storage.inner_put_raw(&b.object_key, b"the archive").await;
        let err = repo
            .open_verified(&b, None)
            .await
            .unwrap()
            .try_collect::<Vec<Bytes>>()
            .await
            .unwrap_err();
        assert!(
            matches!(err, ReadError::Corrupt(_)),
            "a truncated object too"
        );
    }

    #[tokio::test]
    async fn pin_and_verify_never_lose_each_other_in_the_meta_file() {
        let (repo, storage, _dir) = repo_with(FaultyStorage::new());
        let repo = Arc::new(repo);
        let b = completed_backup(&repo, "app", b"bytes").await;
        // Slow meta writes widen the window in which a stale copy could win.
        storage.set(Fault::SlowPuts(std::time::Duration::from_millis(20)));
        let mut tasks = Vec::new();
        for i in 0..10 {
            let (r, id) = (repo.clone(), b.id.clone());
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    r.set_pinned(&id, true).await.map(|_| ())
                } else {
                    r.record_verification(&id, true, &format!("check {i}"))
                        .await
                        .map(|_| ())
                }
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let row = repo.find(&b.id).await.unwrap();
        let meta = storage.read_meta(&b.meta_key).await.to_record().unwrap();
        assert!(meta.pinned, "the pin survived in the meta file");
        assert_eq!(meta.verification, row.verification);
        assert_eq!(meta.pinned, row.pinned);
    }

    #[tokio::test]
    async fn next_good_skips_backups_known_to_be_bad() {
        let (repo, _storage, _dir) = repo_with(FaultyStorage::new());
        let oldest = completed_backup(&repo, "app", b"1").await;
        let middle = completed_backup(&repo, "app", b"2").await;
        let newest = completed_backup(&repo, "app", b"3").await;
        assert_eq!(
            repo.next_good(&newest).await.unwrap().map(|b| b.id),
            Some(middle.id.clone())
        );
        repo.record_verification(&middle.id, false, "corrupt")
            .await
            .unwrap();
        assert_eq!(
            repo.next_good(&newest).await.unwrap().map(|b| b.id),
            Some(oldest.id.clone())
        );
        assert!(repo.next_good(&oldest).await.unwrap().is_none());
    }
}
