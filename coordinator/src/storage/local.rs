//! Local-directory backend. A write goes to a hidden temp file beside its
//! final name, is fsynced, renamed into place and the directory fsynced, so a
//! crash leaves either the whole object or a temp file that start-up removes.
//! Files are 0600 and directories 0700: backups hold the whole database.
//!
//! A write also keeps a floor of free space on the filesystem
//! (`DATASAVER_MIN_FREE_BYTES`): checked before it starts and every
//! [`SPACE_CHECK_EVERY`] bytes, it fails the write (the temp file goes) rather
//! than fill the disk the catalog and the system live on. Nothing is ever
//! deleted to make room.

use std::io::SeekFrom;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use datasaver_common::config::format_size;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{
    check_key, ByteStream, ErrorKind, KeyFilter, ObjectInfo, ObjectWriter, Storage, StorageError,
};

const TMP_MARKER: &str = ".tmp-";

/// How many bytes a write may add between two free-space checks: often
/// enough that a filling disk is noticed long before it is full, rare enough
/// to cost nothing (one `statvfs` per 64 MiB).
pub const SPACE_CHECK_EVERY: u64 = 64 << 20;

/// Free bytes (for unprivileged users) on the filesystem holding a path.
type FreeSpaceProbe = Arc<dyn Fn(&Path) -> std::io::Result<u64> + Send + Sync>;

fn statvfs_free(path: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    #[allow(clippy::useless_conversion)] // the field types differ between platforms
    let (avail, frsize) = (
        u64::from(st.blocks_available()),
        u64::from(st.fragment_size()),
    );
    Ok(avail.saturating_mul(frsize))
}

/// The free-space floor of one storage root.
#[derive(Clone)]
struct SpaceFloor {
    root: PathBuf,
    min_free: u64,
    probe: FreeSpaceProbe,
}

impl SpaceFloor {
    /// `Err` when the filesystem has less than the floor free; the message
    /// names the setting, the directory and what is free.
    fn check(&self, key: &str) -> Result<(), StorageError> {
        if self.min_free == 0 {
            return Ok(());
        }
        let free = (self.probe)(&self.root).map_err(|e| {
            StorageError::new(
                ErrorKind::Other,
                "write",
                key,
                format!(
                    "cannot read the free space of {} for DATASAVER_MIN_FREE_BYTES: {e}",
                    self.root.display()
                ),
            )
        })?;
        if free < self.min_free {
            return Err(StorageError::new(
                ErrorKind::Other,
                "write",
                key,
                format!(
                    "only {} free on the filesystem of {}, under DATASAVER_MIN_FREE_BYTES ({}); the backup was not stored and nothing was deleted to make room: free space there or lower DATASAVER_MIN_FREE_BYTES",
                    format_size(free),
                    self.root.display(),
                    format_size(self.min_free)
                ),
            ));
        }
        Ok(())
    }
}

pub struct LocalStorage {
    root: PathBuf,
    floor: SpaceFloor,
}

impl LocalStorage {
    /// Opens (creating if needed) a storage root, without a free-space floor.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(|e| StorageError::from_io("open", &root.display().to_string(), &e))?;
        Ok(Self {
            floor: SpaceFloor {
                root: root.clone(),
                min_free: 0,
                probe: Arc::new(statvfs_free),
            },
            root,
        })
    }

    /// Writes fail when the filesystem has fewer than `bytes` free (0 = no
    /// floor).
    pub fn with_min_free(mut self, bytes: u64) -> Self {
        self.floor.min_free = bytes;
        self
    }

    /// Replaces how free space is measured (tests: a filling disk).
    #[cfg(test)]
    fn with_probe(mut self, probe: FreeSpaceProbe) -> Self {
        self.floor.probe = probe;
        self
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

fn is_temp(name: &str) -> bool {
    name.starts_with('.') && name.contains(TMP_MARKER)
}

fn blocking_err(op: &'static str, key: &str, e: tokio::task::JoinError) -> StorageError {
    StorageError::new(ErrorKind::Other, op, key, format!("worker failed: {e}"))
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let ft = entry.file_type()?;
        let path = entry.path();
        if ft.is_dir() {
            walk(&path, out)?;
        } else if ft.is_file() {
            out.push((path, entry.metadata()?.len()));
        }
    }
    Ok(())
}

fn rel_key(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let parts: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
    Some(parts?.join("/"))
}

#[async_trait]
impl Storage for LocalStorage {
    fn describe(&self) -> String {
        format!("local {}", self.root.display())
    }

    async fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let final_path = self.path(key)?;
        let floor = self.floor.clone();
        let k = key.to_string();
        tokio::task::spawn_blocking(move || floor.check(&k))
            .await
            .map_err(|e| blocking_err("write", key, e))??;
        let key_s = key.to_string();
        let (tmp_path, file) = tokio::task::spawn_blocking(move || {
            let dir = final_path.parent().unwrap_or(Path::new("/")).to_path_buf();
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| StorageError::from_io("write", &key_s, &e))?;
            let name = final_path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("object")
                .to_string();
            let tmp = dir.join(format!(".{name}{TMP_MARKER}{:016x}", rand::random::<u64>()));
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| StorageError::from_io("write", &key_s, &e))?;
            Ok::<_, StorageError>((tmp, file))
        })
        .await
        .map_err(|e| blocking_err("write", key, e))??;
        Ok(Box::new(LocalWriter {
            key: key.to_string(),
            final_path: self.path(key)?,
            tmp_path,
            file: Some(tokio::io::BufWriter::with_capacity(
                1 << 20,
                tokio::fs::File::from_std(file),
            )),
            written: 0,
            unchecked: 0,
            floor: self.floor.clone(),
            done: false,
        }))
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        let mut w = self.create(key).await?;
        w.write(data).await?;
        w.commit().await.map(|_| ())
    }

    async fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<ByteStream, StorageError> {
        let path = self.path(key)?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| StorageError::from_io("read", key, &e))?;
        if offset > 0 {
            file.seek(SeekFrom::Start(offset))
                .await
                .map_err(|e| StorageError::from_io("read", key, &e))?;
        }
        let key = key.to_string();
        let reader: Box<dyn tokio::io::AsyncRead + Send + Unpin> = match len {
            Some(n) => Box::new(file.take(n)),
            None => Box::new(file),
        };
        let stream =
            tokio_util::io::ReaderStream::with_capacity(reader, datasaver_common::CHUNK_SIZE)
                .map(move |r| r.map_err(|e| StorageError::from_io("read", &key, &e)));
        Ok(Box::pin(stream))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let path = self.path(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: m.len(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::from_io("head", key, &e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let root = self.root.clone();
        let prefix_s = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let mut files = Vec::new();
            walk(&root, &mut files).map_err(|e| StorageError::from_io("list", &prefix_s, &e))?;
            let mut out: Vec<ObjectInfo> = files
                .into_iter()
                .filter(|(p, _)| !p.file_name().and_then(|n| n.to_str()).is_some_and(is_temp))
                .filter_map(|(p, size)| rel_key(&root, &p).map(|key| ObjectInfo { key, size }))
                .filter(|o| o.key.starts_with(&prefix_s))
                .collect();
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
        .map_err(|e| blocking_err("list", prefix, e))?
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        for key in keys {
            let path = self.path(key)?;
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::from_io("delete", key, &e)),
            }
            if let Some(dir) = path.parent() {
                sync_dir(dir.to_path_buf(), key).await?;
            }
        }
        Ok(())
    }

    async fn cleanup_incomplete(&self, _ours: &KeyFilter) -> Result<usize, StorageError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut files = Vec::new();
            walk(&root, &mut files).map_err(|e| StorageError::from_io("cleanup", "", &e))?;
            let mut n = 0;
            for (p, _) in files {
                if p.file_name().and_then(|n| n.to_str()).is_some_and(is_temp) {
                    std::fs::remove_file(&p).map_err(|e| {
                        StorageError::from_io("cleanup", &p.display().to_string(), &e)
                    })?;
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
        .map_err(|e| blocking_err("cleanup", "", e))?
    }
}

async fn sync_dir(dir: PathBuf, key: &str) -> Result<(), StorageError> {
    let key_s = key.to_string();
    tokio::task::spawn_blocking(move || {
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StorageError::from_io("sync", &key_s, &e))
    })
    .await
    .map_err(|e| blocking_err("sync", key, e))?
}

struct LocalWriter {
    key: String,
    final_path: PathBuf,
    tmp_path: PathBuf,
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    written: u64,
    /// Bytes written since the last free-space check.
    unchecked: u64,
    floor: SpaceFloor,
    done: bool,
}

impl LocalWriter {
    fn file(&mut self) -> Result<&mut tokio::io::BufWriter<tokio::fs::File>, StorageError> {
        self.file.as_mut().ok_or_else(|| {
            StorageError::new(
                ErrorKind::Other,
                "write",
                &self.key,
                "writer already closed",
            )
        })
    }
}

#[async_trait]
impl ObjectWriter for LocalWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), StorageError> {
        let key = self.key.clone();
        self.file()?
            .write_all(&data)
            .await
            .map_err(|e| StorageError::from_io("write", &key, &e))?;
        self.written += data.len() as u64;
        self.unchecked += data.len() as u64;
        if self.unchecked >= SPACE_CHECK_EVERY {
            self.unchecked = 0;
            // The caller aborts (or drops) the writer on this error, which
            // removes the temp file.
            let floor = self.floor.clone();
            let k = key.clone();
            tokio::task::spawn_blocking(move || floor.check(&k))
                .await
                .map_err(|e| blocking_err("write", &key, e))??;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<ObjectInfo, StorageError> {
        let key = self.key.clone();
        let mut file = self.file.take().ok_or_else(|| {
            StorageError::new(ErrorKind::Other, "commit", &key, "writer already closed")
        })?;
        let io = |e: std::io::Error| StorageError::from_io("commit", &key, &e);
        file.flush().await.map_err(io)?;
        let file = file.into_inner();
        file.sync_all().await.map_err(io)?;
        drop(file);
        tokio::fs::rename(&self.tmp_path, &self.final_path)
            .await
            .map_err(io)?;
        self.done = true;
        if let Some(dir) = self.final_path.parent() {
            sync_dir(dir.to_path_buf(), &key).await?;
        }
        Ok(ObjectInfo {
            key,
            size: self.written,
        })
    }

    async fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        self.file = None;
        self.done = true;
        match tokio::fs::remove_file(&self.tmp_path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::from_io("abort", &self.key, &e)),
        }
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if !self.done {
            // An upload that ended without commit (agent gone, task
            // cancelled): the temp file must not outlive it.
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::open(dir.path().join("root")).unwrap();
        crate::storage::conformance::run(&s).await;
        // no temp files were left by the aborted and dropped writers
        let mut files = Vec::new();
        walk(dir.path(), &mut files).unwrap();
        assert!(
            files
                .iter()
                .all(|(p, _)| !p.to_string_lossy().contains(TMP_MARKER)),
            "{files:?}"
        );
    }

    #[tokio::test]
    async fn startup_cleanup_removes_temp_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::open(dir.path()).unwrap();
        s.put("t/logical/keep.meta.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        std::fs::write(dir.path().join("t/logical/.x.dump.zst.tmp-0001"), b"junk").unwrap();
        assert_eq!(s.cleanup_incomplete(&|_: &str| true).await.unwrap(), 1);
        assert_eq!(s.list("").await.unwrap().len(), 1);
    }

    /// A disk that loses `per_check` free bytes at every check, starting
    /// from `start`; counts the checks.
    fn filling_disk(
        start: u64,
        per_check: u64,
    ) -> (FreeSpaceProbe, Arc<std::sync::atomic::AtomicU64>) {
        use std::sync::atomic::{AtomicU64, Ordering};
        let checks = Arc::new(AtomicU64::new(0));
        let c = checks.clone();
        let probe: FreeSpaceProbe = Arc::new(move |_: &Path| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            Ok(start.saturating_sub(n * per_check))
        });
        (probe, checks)
    }

    #[tokio::test]
    async fn a_write_under_the_free_space_floor_fails_before_it_starts() {
        let dir = tempfile::tempdir().unwrap();
        let (probe, checks) = filling_disk(100 << 20, 0);
        let s = LocalStorage::open(dir.path().join("r"))
            .unwrap()
            .with_min_free(1 << 30)
            .with_probe(probe);
        let e = match s.create("t/logical/a.dump.zst").await {
            Ok(_) => panic!("a write under the floor started"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("DATASAVER_MIN_FREE_BYTES"), "{e}");
        assert!(e.contains("100.0 MiB") && e.contains("1.0 GiB"), "{e}");
        assert!(
            e.contains(&dir.path().join("r").display().to_string()),
            "{e}"
        );
        assert_eq!(checks.load(std::sync::atomic::Ordering::SeqCst), 1);
        let mut files = Vec::new();
        walk(dir.path(), &mut files).unwrap();
        assert!(files.is_empty(), "{files:?}");
    }

    #[tokio::test]
    async fn a_write_fails_when_free_space_drops_under_the_floor_midway() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        // 10 MiB above the floor at the start, 8 MiB less at every check:
        // the start and the first periodic check pass, the second fails.
        let floor = 1u64 << 30;
        let (probe, checks) = filling_disk(floor + (10 << 20), 8 << 20);
        let s = LocalStorage::open(dir.path().join("r"))
            .unwrap()
            .with_min_free(floor)
            .with_probe(probe);
        let mut w = s.create("t/logical/a.dump.zst").await.unwrap();
        let chunk = Bytes::from(vec![7u8; 1 << 20]);
        let mut written = 0u64;
        let err = loop {
            match w.write(chunk.clone()).await {
                Ok(()) => written += chunk.len() as u64,
                Err(e) => break e,
            }
            assert!(
                written <= 4 * SPACE_CHECK_EVERY,
                "the floor was never enforced"
            );
        };
        assert!(
            err.to_string().contains("DATASAVER_MIN_FREE_BYTES"),
            "{err}"
        );
        // checked at the start and once per SPACE_CHECK_EVERY, not per chunk
        assert_eq!(checks.load(Ordering::SeqCst), 3);
        assert_eq!(written + (1 << 20), 2 * SPACE_CHECK_EVERY);
        w.abort().await.unwrap();
        let mut files = Vec::new();
        walk(dir.path(), &mut files).unwrap();
        assert!(
            files.is_empty(),
            "no partial object or temp file: {files:?}"
        );
        assert!(s.head("t/logical/a.dump.zst").await.unwrap().is_none());

        // 0 disables the floor
        let (probe, checks) = filling_disk(0, 0);
        let s = LocalStorage::open(dir.path().join("r2"))
            .unwrap()
            .with_min_free(0)
            .with_probe(probe);
        s.put("t/x", Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(checks.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn free_space_is_measured() {
        let dir = tempfile::tempdir().unwrap();
        assert!(statvfs_free(dir.path()).unwrap() > 0);
        assert!(statvfs_free(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = LocalStorage::open(dir.path().join("r")).unwrap();
        rt.block_on(s.put("t/x", Bytes::from_static(b"1"))).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("r/t/x"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(dir.path().join("r/t"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
