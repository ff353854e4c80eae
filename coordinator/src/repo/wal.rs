//! Stored WAL (issue 14, being built; nothing uploads WAL yet): segments,
//! partials and history files under `<target>/wal/<timeline>/`
//! (`keys::wal_key`). A name is written once: the same content again is a
//! retry and accepted without a write; different content under a stored
//! name is refused and the original kept (the caller raises `wal.conflict`).
//! A partial is replaced by a longer one and dropped once its segment is
//! whole. Storage is the source of truth: [`Repository::wal_files`] lists it.

use bytes::Bytes;
use datasaver_common::wal::{Segment, WalFile};

use super::{keys, RepoError, Repository};

/// A WAL file in storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWal {
    pub file: WalFile,
    /// BLAKE3 of its raw (uncompressed, unencrypted) bytes, hex
    pub raw_blake3: String,
    pub key: String,
    /// bytes in storage
    pub size: u64,
}

/// What storing a WAL file did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutWal {
    Stored(StoredWal),
    /// the same content was stored already: nothing written
    Identical(StoredWal),
    /// a different file is stored under that name: nothing written, the
    /// original kept
    Conflict {
        existing: StoredWal,
    },
    /// a partial of a segment stored whole already: nothing written
    Superseded(StoredWal),
}

fn same_name(a: &WalFile, b: &WalFile) -> bool {
    a == b
}

fn segment_of(f: &WalFile) -> Option<Segment> {
    match f {
        WalFile::Segment(s) | WalFile::Partial(s) => Some(*s),
        WalFile::History(_) => None,
    }
}

impl Repository {
    /// Every WAL file of `target`, as storage lists them (keys of another
    /// shape under `wal/` are skipped).
    pub async fn wal_files(
        &self,
        target: &str,
        seg_size: u64,
    ) -> Result<Vec<StoredWal>, RepoError> {
        let prefix = format!("{target}/wal/");
        let mut out = Vec::new();
        for o in self.storage.list(&prefix).await? {
            if let Some((t, file, hash, _)) = keys::parse_wal_key(&o.key, seg_size) {
                if t == target {
                    out.push(StoredWal {
                        file,
                        raw_blake3: hash.to_string(),
                        key: o.key.clone(),
                        size: o.size,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Stores one WAL file of `target` whose raw bytes hash to
    /// `raw_blake3`, as `data` (already compressed/encrypted, named by
    /// `extension`), unless the rules above say otherwise.
    pub async fn put_wal(
        &self,
        target: &str,
        file: WalFile,
        seg_size: u64,
        raw_blake3: &str,
        extension: &str,
        data: Bytes,
    ) -> Result<PutWal, RepoError> {
        if raw_blake3.len() != 64
            || !raw_blake3
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(RepoError::Conflict(format!(
                "WAL checksum {raw_blake3:?} is not a BLAKE3 in lower-case hex"
            )));
        }
        let key = keys::wal_key(target, &file, seg_size, raw_blake3, extension);
        if keys::parse_wal_key(&key, seg_size).is_none() {
            return Err(RepoError::Conflict(format!(
                "cannot store WAL for target {target:?} under {key:?}"
            )));
        }
        let existing = self.wal_files(target, seg_size).await?;
        let stored = StoredWal {
            file,
            raw_blake3: raw_blake3.to_string(),
            key: key.clone(),
            size: data.len() as u64,
        };
        match file {
            WalFile::Segment(_) | WalFile::History(_) => {
                if let Some(e) = existing.iter().find(|e| same_name(&e.file, &file)) {
                    return Ok(if e.raw_blake3 == raw_blake3 {
                        PutWal::Identical(e.clone())
                    } else {
                        PutWal::Conflict {
                            existing: e.clone(),
                        }
                    });
                }
                self.storage.put(&key, data).await?;
                // The segment is whole now: its partials are not needed.
                if let WalFile::Segment(s) = file {
                    let partials: Vec<String> = existing
                        .iter()
                        .filter(|e| e.file == WalFile::Partial(s))
                        .map(|e| e.key.clone())
                        .collect();
                    if !partials.is_empty() {
                        self.storage.delete(&partials).await?;
                    }
                }
                Ok(PutWal::Stored(stored))
            }
            WalFile::Partial(s) => {
                if let Some(whole) = existing.iter().find(|e| e.file == WalFile::Segment(s)) {
                    return Ok(PutWal::Superseded(whole.clone()));
                }
                if let Some(e) = existing
                    .iter()
                    .find(|e| e.file == file && e.raw_blake3 == raw_blake3)
                {
                    return Ok(PutWal::Identical(e.clone()));
                }
                // The new partial first, then the older ones: there is
                // always one in storage.
                self.storage.put(&key, data).await?;
                let older: Vec<String> = existing
                    .iter()
                    .filter(|e| e.file == file && segment_of(&e.file) == Some(s))
                    .map(|e| e.key.clone())
                    .collect();
                if !older.is_empty() {
                    self.storage.delete(&older).await?;
                }
                Ok(PutWal::Stored(stored))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::testing::{repo_with, FaultyStorage};
    use datasaver_common::wal::DEFAULT_SEG_SIZE as SEG;

    fn b3(data: &[u8]) -> String {
        blake3::hash(data).to_hex().to_string()
    }

    fn seg(n: u64) -> Segment {
        Segment {
            timeline: 1,
            segno: n,
        }
    }

    #[tokio::test]
    async fn a_name_is_written_once_and_partials_give_way() {
        let (repo, storage, _dir) = repo_with(FaultyStorage::new());
        let one = Bytes::from_static(b"segment one");
        let put = |file, data: Bytes| {
            let repo = &repo;
            async move {
                repo.put_wal("app", file, SEG, &b3(&data), ".zst", data)
                    .await
                    .unwrap()
            }
        };
        assert!(matches!(
            put(WalFile::Segment(seg(5)), one.clone()).await,
            PutWal::Stored(_)
        ));
        // A retry of the same content: nothing written.
        assert!(matches!(
            put(WalFile::Segment(seg(5)), one.clone()).await,
            PutWal::Identical(_)
        ));
        // Different content under the same name: refused, original kept.
        let other = Bytes::from_static(b"something else");
        match put(WalFile::Segment(seg(5)), other).await {
            PutWal::Conflict { existing } => assert_eq!(existing.raw_blake3, b3(&one)),
            p => panic!("{p:?}"),
        }
        // Partials of segment 6: the longer replaces the shorter, the
        // whole segment replaces both.
        put(WalFile::Partial(seg(6)), Bytes::from_static(b"par")).await;
        put(WalFile::Partial(seg(6)), Bytes::from_static(b"partial")).await;
        let partials = |files: &[StoredWal]| {
            files
                .iter()
                .filter(|f| matches!(f.file, WalFile::Partial(_)))
                .count()
        };
        let files = repo.wal_files("app", SEG).await.unwrap();
        assert_eq!(partials(&files), 1);
        assert!(files.iter().any(|f| f.raw_blake3 == b3(b"partial")));
        put(WalFile::Segment(seg(6)), Bytes::from_static(b"whole six")).await;
        assert!(matches!(
            put(WalFile::Partial(seg(6)), Bytes::from_static(b"late")).await,
            PutWal::Superseded(_)
        ));
        put(
            WalFile::History(2),
            Bytes::from_static(b"1\t0/5000000\tx\n"),
        )
        .await;
        let files = repo.wal_files("app", SEG).await.unwrap();
        assert_eq!(partials(&files), 0);
        let mut names: Vec<String> = files
            .iter()
            .filter_map(|f| f.key.rsplit('/').next())
            .filter_map(|n| n.split_once('-'))
            .map(|(name, _)| name.to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "000000010000000000000005",
                "000000010000000000000006",
                "00000002.history"
            ]
        );
        // Every key is one start-up cleanup and rebuild recognise as ours.
        for k in storage.keys().await {
            assert!(keys::is_own_key(&k), "{k}");
        }
        // A checksum that is not one is refused before anything is written.
        assert!(repo
            .put_wal(
                "app",
                WalFile::Segment(seg(9)),
                SEG,
                "nope",
                "",
                Bytes::new()
            )
            .await
            .is_err());
    }
}
