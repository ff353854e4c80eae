//! Where backup objects live. One trait, one implementation per backend; the
//! coordinator never knows which one it is talking to. Writes are streams that
//! become visible only on `commit` (and vanish on `abort` or drop), so a
//! broken upload never leaves a partial object under its final name.

pub mod local;
pub mod s3;

use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

/// A stream of object bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, StorageError>> + Send>>;

/// Which keys belong to the caller (relative to the backend's root/prefix).
pub type KeyFilter = dyn Fn(&str) -> bool + Send + Sync;

/// What kind of failure a storage operation had; callers retry only
/// `Transient` ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object does not exist.
    NotFound,
    /// Credentials or permissions refuse the operation.
    PermissionDenied,
    /// Worth retrying (network, throttling, 5xx).
    Transient,
    /// Anything else.
    Other,
}

/// A storage failure, naming the object.
#[derive(Debug, thiserror::Error)]
#[error("storage {op} {key:?}: {message}")]
pub struct StorageError {
    /// classification
    pub kind: ErrorKind,
    /// operation ("write", "read", ...)
    pub op: &'static str,
    /// object key (or prefix)
    pub key: String,
    /// what happened
    pub message: String,
}

impl StorageError {
    pub fn new(kind: ErrorKind, op: &'static str, key: &str, message: impl Into<String>) -> Self {
        Self {
            kind,
            op,
            key: key.to_string(),
            message: message.into(),
        }
    }

    pub fn from_io(op: &'static str, key: &str, e: &std::io::Error) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            _ => ErrorKind::Other,
        };
        Self::new(kind, op, key, e.to_string())
    }
}

/// An object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
}

/// A backend. Keys are `/`-separated relative paths, never starting with `/`.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Human-readable description for logs ("local /srv/backups").
    fn describe(&self) -> String;

    /// Starts a streaming write of `key`.
    async fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StorageError>;

    /// Writes a small object in one go, atomically.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError>;

    /// Streams a whole object.
    async fn get(&self, key: &str) -> Result<ByteStream, StorageError> {
        self.get_range(key, 0, None).await
    }

    /// Streams `len` bytes (or to the end) from `offset`.
    async fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<ByteStream, StorageError>;

    /// Size of an object, or `None` if it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError>;

    /// Every object whose key starts with `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError>;

    /// Deletes objects; deleting a missing object is not an error.
    async fn delete(&self, keys: &[String]) -> Result<(), StorageError>;

    /// Removes leftovers of interrupted writes (temp files, stale multipart
    /// uploads) whose key `ours` accepts: a bucket may be shared with other
    /// applications, whose uploads must never be touched. (A local root is
    /// the coordinator's own, and its temp files carry datasaver's marker.)
    /// Returns how many were removed.
    async fn cleanup_incomplete(&self, ours: &KeyFilter) -> Result<usize, StorageError>;
}

/// A streaming write in progress. Dropping it without `commit` discards it.
#[async_trait]
pub trait ObjectWriter: Send {
    /// Appends bytes.
    async fn write(&mut self, data: Bytes) -> Result<(), StorageError>;
    /// Makes the object visible under its key, durably.
    async fn commit(self: Box<Self>) -> Result<ObjectInfo, StorageError>;
    /// Discards everything written.
    async fn abort(self: Box<Self>) -> Result<(), StorageError>;
}

/// Keys must be relative, `/`-separated, without `.`/`..` parts, so no
/// backend can be tricked into writing outside its root.
pub fn check_key(key: &str) -> Result<(), StorageError> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.contains('\\')
        || key.contains('\0')
        || key
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..");
    if bad {
        Err(StorageError::new(
            ErrorKind::Other,
            "check",
            key,
            "invalid object key",
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The same behaviour, checked against every backend.
    use super::*;
    use futures::TryStreamExt;

    async fn read_all(s: &dyn Storage, key: &str) -> Vec<u8> {
        let chunks: Vec<Bytes> = s.get(key).await.unwrap().try_collect().await.unwrap();
        chunks.concat()
    }

    pub async fn run(s: &dyn Storage) {
        // streaming write, invisible until commit
        let mut w = s.create("t1/logical/a.dump.zst").await.unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        for part in data.chunks(100_000) {
            w.write(Bytes::copy_from_slice(part)).await.unwrap();
        }
        assert!(s.head("t1/logical/a.dump.zst").await.unwrap().is_none());
        let info = w.commit().await.unwrap();
        assert_eq!(info.size, data.len() as u64);
        assert_eq!(read_all(s, "t1/logical/a.dump.zst").await, data);

        // ranged read
        let part: Vec<Bytes> = s
            .get_range("t1/logical/a.dump.zst", 10, Some(20))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(part.concat(), data[10..30].to_vec());

        // aborted and dropped writes leave nothing behind
        let mut w = s.create("t1/logical/b.dump.zst").await.unwrap();
        w.write(Bytes::from_static(b"partial")).await.unwrap();
        w.abort().await.unwrap();
        let mut w = s.create("t1/logical/c.dump.zst").await.unwrap();
        w.write(Bytes::from_static(b"partial")).await.unwrap();
        drop(w);

        s.put("t1/logical/a.meta.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        s.put("t2/logical/x.meta.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let mut keys: Vec<String> = s
            .list("t1/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            vec!["t1/logical/a.dump.zst", "t1/logical/a.meta.json"]
        );
        assert_eq!(s.list("").await.unwrap().len(), 3);

        s.delete(&["t1/logical/a.dump.zst".into(), "t1/logical/missing".into()])
            .await
            .unwrap();
        assert!(s.head("t1/logical/a.dump.zst").await.unwrap().is_none());
        let e = match s.get("t1/logical/a.dump.zst").await {
            Ok(stream) => stream.try_collect::<Vec<Bytes>>().await.unwrap_err(),
            Err(e) => e,
        };
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(s.create("../escape").await.is_err());
    }
}
