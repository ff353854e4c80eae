//! Test helpers for the repository: a storage wrapper that injects failures
//! (fail the Nth call of an operation, slow small writes, truncate what is
//! written) around the real local backend, and a repository on a temp dir.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;

use super::ingest::{IngestMeta, Piece, Trailer};
use super::meta::Meta;
use super::{BackupRecord, Repository, Trigger};
use crate::catalog::Catalog;
use crate::clock::SystemClock;
use crate::storage::local::LocalStorage;
use crate::storage::{ByteStream, ErrorKind, ObjectInfo, ObjectWriter, Storage, StorageError};

/// What goes wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The `nth` call (1-based, counted from when the fault is set) of `op`
    /// fails: one of create, write, commit, put, get, delete.
    FailCall {
        op: &'static str,
        nth: usize,
    },
    /// Every `put` (meta files) takes this long.
    SlowPuts(Duration),
    /// Streaming writes keep only the first `n` bytes of each object.
    Truncate(usize),
}

#[derive(Default)]
struct State {
    fault: Option<Fault>,
    calls: HashMap<&'static str, usize>,
}

#[derive(Clone)]
pub struct FaultyStorage {
    inner: Arc<LocalStorage>,
    state: Arc<Mutex<State>>,
    _dir: Arc<tempfile::TempDir>,
}

impl FaultyStorage {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let inner = LocalStorage::open(dir.path().join("backups")).expect("local storage");
        Self {
            inner: Arc::new(inner),
            state: Arc::default(),
            _dir: Arc::new(dir),
        }
    }

    pub fn set(&self, f: Fault) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.fault = Some(f);
        s.calls.clear();
    }

    /// Counts a call of `op`; `Err` when the fault says this one fails.
    fn call(&self, op: &'static str, key: &str) -> Result<(), StorageError> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let n = {
            let c = s.calls.entry(op).or_default();
            *c += 1;
            *c
        };
        match &s.fault {
            Some(Fault::FailCall { op: o, nth }) if *o == op && *nth == n => Err(
                StorageError::new(ErrorKind::Transient, op, key, "injected failure"),
            ),
            _ => Ok(()),
        }
    }

    fn fault(&self) -> Option<Fault> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fault
            .clone()
    }

    /// Writes an object directly (around the faults): damage for tests.
    pub async fn inner_put_raw(&self, key: &str, data: &'static [u8]) {
        self.inner
            .put(key, Bytes::from_static(data))
            .await
            .expect("raw put");
    }

    /// Like `inner_put_raw`, for bytes made at run time.
    pub async fn inner_put_vec(&self, key: &str, data: Vec<u8>) {
        self.inner
            .put(key, Bytes::from(data))
            .await
            .expect("raw put");
    }

    pub async fn read(&self, key: &str) -> Vec<u8> {
        let chunks: Vec<Bytes> = self
            .inner
            .get(key)
            .await
            .expect("get")
            .try_collect()
            .await
            .expect("read");
        chunks.concat()
    }

    pub async fn read_meta(&self, key: &str) -> Meta {
        Meta::parse(&self.read(key).await).expect("meta file")
    }

    /// Every key stored.
    pub async fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self
            .inner
            .list("")
            .await
            .expect("list")
            .into_iter()
            .map(|o| o.key)
            .collect();
        k.sort();
        k
    }
}

struct FaultyWriter {
    inner: Box<dyn ObjectWriter>,
    storage: FaultyStorage,
    key: String,
    written: usize,
}

#[async_trait]
impl ObjectWriter for FaultyWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), StorageError> {
        self.storage.call("write", &self.key)?;
        let data = match self.storage.fault() {
            Some(Fault::Truncate(n)) => {
                data.slice(..data.len().min(n.saturating_sub(self.written)))
            }
            _ => data,
        };
        self.written += data.len();
        self.inner.write(data).await
    }

    async fn commit(self: Box<Self>) -> Result<ObjectInfo, StorageError> {
        self.storage.call("commit", &self.key)?;
        self.inner.commit().await
    }

    async fn abort(self: Box<Self>) -> Result<(), StorageError> {
        self.inner.abort().await
    }
}

#[async_trait]
impl Storage for FaultyStorage {
    fn describe(&self) -> String {
        format!("faulty {}", self.inner.describe())
    }

    async fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        self.call("create", key)?;
        Ok(Box::new(FaultyWriter {
            inner: self.inner.create(key).await?,
            storage: self.clone(),
            key: key.to_string(),
            written: 0,
        }))
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        self.call("put", key)?;
        if let Some(Fault::SlowPuts(d)) = self.fault() {
            tokio::time::sleep(d).await;
        }
        self.inner.put(key, data).await
    }

    async fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<ByteStream, StorageError> {
        self.call("get", key)?;
        self.inner.get_range(key, offset, len).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        self.inner.list(prefix).await
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        self.call("delete", keys.first().map(String::as_str).unwrap_or(""))?;
        self.inner.delete(keys).await
    }

    async fn cleanup_incomplete(
        &self,
        ours: &crate::storage::KeyFilter,
    ) -> Result<usize, StorageError> {
        self.inner.cleanup_incomplete(ours).await
    }
}

/// A repository on a fresh catalog in a temp dir over `storage`.
pub fn repo_with(storage: FaultyStorage) -> (Repository, FaultyStorage, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Catalog::open(&dir.path().join("catalog.db")).expect("catalog");
    let repo = Repository::new(db, Arc::new(storage.clone()), Arc::new(SystemClock));
    (repo, storage, dir)
}

pub fn header() -> IngestMeta {
    IngestMeta {
        compression: "none".into(),
        encrypted: false,
        encryption_recipient: String::new(),
        format: "pg_dump-custom".into(),
        database: "app".into(),
        db_host: "db:5432".into(),
        server_version: "15.1".into(),
        pg_dump_version: "15.1".into(),
        extensions: vec!["plpgsql".into()],
        system_identifier: "7300000000000000001".into(),
        roles: vec!["postgres".into()],
        database_shape: Default::default(),
        whole_server: false,
    }
}

/// The upload of `data` in two chunks, as an agent sends it.
pub fn upload(data: &[u8]) -> Vec<Result<Piece, super::ingest::IngestError>> {
    let mut h = datasaver_common::checksum::Checksum::new();
    h.update(data);
    let mid = data.len() / 2;
    vec![
        Ok(Piece::Data(Bytes::copy_from_slice(&data[..mid]))),
        Ok(Piece::Data(Bytes::copy_from_slice(&data[mid..]))),
        Ok(Piece::End(Trailer {
            checksum: h.finish(),
            raw_bytes: data.len() as u64 * 3,
            stored_bytes: data.len() as u64,
            raw_checksum: "blake3:plain".into(),
            row_counts: super::RowCounts {
                tables: vec![super::TableRows {
                    schema: "public".into(),
                    name: "t".into(),
                    rows: data.len() as u64,
                }],
                not_counted: String::new(),
            },
            physical: None,
        })),
    ]
}

/// Begins and stores a backup of `target` holding `data`.
/// An upload with a `globals` part before the dump.
pub fn upload_with_globals(
    globals: &[u8],
    dump: &[u8],
) -> Vec<Result<Piece, super::ingest::IngestError>> {
    let mut h = datasaver_common::checksum::Checksum::new();
    h.update(globals);
    let mut v = vec![
        Ok(Piece::PartStart {
            name: "globals".into(),
            role_passwords: true,
            dump: None,
        }),
        Ok(Piece::Data(Bytes::copy_from_slice(globals))),
        Ok(Piece::PartEnd(Trailer {
            checksum: h.finish(),
            raw_bytes: globals.len() as u64,
            stored_bytes: globals.len() as u64,
            raw_checksum: "blake3:globals".into(),
            row_counts: Default::default(),
            physical: None,
        })),
    ];
    v.extend(upload(dump));
    v
}

/// The upload of a whole server: globals, then each `(database, dump)` as
/// a `database:` part, then the empty trailer.
pub fn upload_server(dbs: &[(&str, &[u8])]) -> Vec<Result<Piece, super::ingest::IngestError>> {
    let part = |name: String, data: &[u8], dump| {
        let mut h = datasaver_common::checksum::Checksum::new();
        h.update(data);
        vec![
            Ok(Piece::PartStart {
                name,
                role_passwords: true,
                dump,
            }),
            Ok(Piece::Data(Bytes::copy_from_slice(data))),
            Ok(Piece::PartEnd(Trailer {
                checksum: h.finish(),
                raw_bytes: data.len() as u64,
                stored_bytes: data.len() as u64,
                raw_checksum: "blake3:plain".into(),
                row_counts: Default::default(),
                physical: None,
            })),
        ]
    };
    let mut v = part("globals".into(), b"CREATE ROLE app;", None);
    for (db, data) in dbs {
        v.extend(part(
            datasaver_common::names::database_part(db),
            data,
            Some(super::DatabaseDump {
                database: db.to_string(),
                roles: vec!["app".into()],
                ..Default::default()
            }),
        ));
    }
    v.push(Ok(Piece::End(Trailer {
        checksum: datasaver_common::checksum::Checksum::new().finish(),
        raw_bytes: 0,
        stored_bytes: 0,
        raw_checksum: String::new(),
        row_counts: Default::default(),
        physical: None,
    })));
    v
}

pub async fn completed_backup(repo: &Repository, target: &str, data: &[u8]) -> BackupRecord {
    let b = repo
        .begin(
            target,
            Trigger::Scheduled,
            None,
            "agent1",
            crate::repo::Kind::Logical,
        )
        .await
        .expect("begin");
    repo.ingest(
        &b.id,
        header(),
        futures::stream::iter(upload(data)),
        Vec::new(),
    )
    .await
    .expect("ingest")
}
