//! Stored WAL (issue 14): segments, partials and history files of a series
//! (one cluster's WAL for a target) under
//! `<target>/wal/<system id>/<timeline>/` (`keys::wal_key`), and the
//! series' `series.json`. A name is written once: the same content again is
//! a retry and accepted without a write; different content under a stored
//! name is refused and the original kept (the caller raises
//! `wal.conflict`). A partial is replaced by a longer one and dropped once
//! its segment is whole. Storage is the source of truth:
//! [`Repository::wal_files`] and [`Repository::wal_series`] list it; the
//! catalog's index (`wal::index`) is rebuilt from them.

use std::collections::BTreeMap;

use bytes::Bytes;
use datasaver_common::wal::{Segment, WalFile};
use serde::{Deserialize, Serialize};

use super::{keys, RepoError, Repository};

/// One cluster's WAL for a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Series {
    pub target: String,
    pub system_identifier: String,
    /// bytes per segment (`wal_segment_size`)
    pub seg_size: u64,
    /// when the target was bound to this cluster (RFC 3339)
    pub bound_at: String,
    /// each later timeline's history file, as the server gave it (raw:
    /// the coordinator plans restores across timeline switches with it)
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub histories: BTreeMap<u32, String>,
}

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

impl PutWal {
    /// The file written, if one was.
    pub fn stored(&self) -> Option<&StoredWal> {
        match self {
            PutWal::Stored(s) => Some(s),
            _ => None,
        }
    }
}

fn segment_of(f: &WalFile) -> Option<Segment> {
    match f {
        WalFile::Segment(s) | WalFile::Partial(s) => Some(*s),
        WalFile::History(_) => None,
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Repository {
    /// Every series of `target` in storage (their `series.json`).
    pub async fn wal_series(&self, target: &str) -> Result<Vec<Series>, RepoError> {
        let mut out = Vec::new();
        for o in self.storage.list(&format!("{target}/wal/")).await? {
            let Some((t, sysid)) = keys::parse_wal_series_key(&o.key) else {
                continue;
            };
            if t != target {
                continue;
            }
            let bytes = match self.read_small(&o.key).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(key = %o.key, error = %e, "WAL series description not readable");
                    continue;
                }
            };
            match serde_json::from_slice::<Series>(&bytes) {
                Ok(s) if s.target == target && s.system_identifier == sysid => out.push(s),
                _ => tracing::warn!(key = %o.key, "unreadable WAL series description skipped"),
            }
        }
        Ok(out)
    }

    /// Writes a series' `series.json` (before any of its WAL).
    pub async fn put_wal_series(&self, series: &Series) -> Result<(), RepoError> {
        let key = keys::wal_series_key(&series.target, &series.system_identifier);
        let json = serde_json::to_vec_pretty(series)
            .map_err(|e| RepoError::Conflict(format!("cannot describe WAL series: {e}")))?;
        self.storage.put(&key, Bytes::from(json)).await?;
        Ok(())
    }

    /// The stored bytes of WAL file `key` (one of [`Repository::wal_files`]'s).
    pub async fn open_wal(&self, key: &str) -> Result<crate::storage::ByteStream, RepoError> {
        if key.split('/').nth(1) != Some("wal") || !keys::is_own_key(key) {
            return Err(RepoError::Conflict(format!(
                "{key:?} is not a stored WAL file"
            )));
        }
        Ok(self.storage.get(key).await?)
    }

    /// Deletes WAL files (retention: no kept base backup needs them).
    pub async fn delete_wal(&self, keys_: &[String]) -> Result<(), RepoError> {
        if let Some(k) = keys_
            .iter()
            .find(|k| k.split('/').nth(1) != Some("wal") || !keys::is_own_key(k))
        {
            return Err(RepoError::Conflict(format!(
                "{k:?} is not a stored WAL file"
            )));
        }
        Ok(self.storage.delete(keys_).await?)
    }

    /// Every WAL file of a series, as storage lists them (keys of another
    /// shape are skipped).
    pub async fn wal_files(&self, series: &Series) -> Result<Vec<StoredWal>, RepoError> {
        let prefix = keys::wal_series_prefix(&series.target, &series.system_identifier);
        let mut out = Vec::new();
        for o in self.storage.list(&prefix).await? {
            if let Some(k) = keys::parse_wal_key(&o.key, series.seg_size) {
                if k.target == series.target && k.system_identifier == series.system_identifier {
                    out.push(StoredWal {
                        file: k.file,
                        raw_blake3: k.raw_blake3.to_string(),
                        key: o.key.clone(),
                        size: o.size,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Stores one WAL file of `series` whose raw bytes hash to
    /// `raw_blake3`, as `data` (already compressed/encrypted, named by
    /// `extension`), unless the rules above say otherwise. `known` is what
    /// the index holds of the series (at least the file's segment or name);
    /// returns what was done and the keys removed.
    pub async fn put_wal(
        &self,
        series: &Series,
        file: WalFile,
        raw_blake3: &str,
        extension: &str,
        data: Bytes,
        known: &[StoredWal],
    ) -> Result<(PutWal, Vec<String>), RepoError> {
        if !is_hex64(raw_blake3) {
            return Err(RepoError::Conflict(format!(
                "WAL checksum {raw_blake3:?} is not a BLAKE3 in lower-case hex"
            )));
        }
        let key = keys::wal_key(
            &series.target,
            &series.system_identifier,
            &file,
            series.seg_size,
            raw_blake3,
            extension,
        );
        if keys::parse_wal_key(&key, series.seg_size).is_none() {
            return Err(RepoError::Conflict(format!(
                "cannot store WAL for target {:?} under {key:?}",
                series.target
            )));
        }
        let stored = StoredWal {
            file,
            raw_blake3: raw_blake3.to_string(),
            key: key.clone(),
            size: data.len() as u64,
        };
        match file {
            WalFile::Segment(_) | WalFile::History(_) => {
                if let Some(e) = known.iter().find(|e| e.file == file) {
                    return Ok((
                        if e.raw_blake3 == raw_blake3 {
                            PutWal::Identical(e.clone())
                        } else {
                            PutWal::Conflict {
                                existing: e.clone(),
                            }
                        },
                        Vec::new(),
                    ));
                }
                self.storage.put(&key, data).await?;
                // The segment is whole now: its partials are not needed.
                let mut removed = Vec::new();
                if let WalFile::Segment(s) = file {
                    removed = known
                        .iter()
                        .filter(|e| e.file == WalFile::Partial(s))
                        .map(|e| e.key.clone())
                        .collect();
                    if !removed.is_empty() {
                        self.storage.delete(&removed).await?;
                    }
                }
                Ok((PutWal::Stored(stored), removed))
            }
            WalFile::Partial(s) => {
                if let Some(whole) = known.iter().find(|e| e.file == WalFile::Segment(s)) {
                    return Ok((PutWal::Superseded(whole.clone()), Vec::new()));
                }
                if let Some(e) = known
                    .iter()
                    .find(|e| e.file == file && e.raw_blake3 == raw_blake3)
                {
                    return Ok((PutWal::Identical(e.clone()), Vec::new()));
                }
                // The new partial first, then the older ones: there is
                // always one in storage.
                self.storage.put(&key, data).await?;
                let older: Vec<String> = known
                    .iter()
                    .filter(|e| e.file == file && segment_of(&e.file) == Some(s) && e.key != key)
                    .map(|e| e.key.clone())
                    .collect();
                if !older.is_empty() {
                    self.storage.delete(&older).await?;
                }
                Ok((PutWal::Stored(stored), older))
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
        let series = Series {
            target: "app".into(),
            system_identifier: "7301".into(),
            seg_size: SEG,
            bound_at: "2026-12-03T00:00:00Z".into(),
            histories: [(
                2,
                "1\t0/3000158\tno recovery target specified\n".to_string(),
            )]
            .into(),
        };
        repo.put_wal_series(&series).await.unwrap();
        assert_eq!(repo.wal_series("app").await.unwrap(), vec![series.clone()]);
        let one = Bytes::from_static(b"segment one");
        // As the index would: what storage lists.
        let put = |file, data: Bytes| {
            let (repo, series) = (&repo, &series);
            async move {
                let known = repo.wal_files(series).await.unwrap();
                repo.put_wal(series, file, &b3(&data), ".zst", data, &known)
                    .await
                    .unwrap()
                    .0
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
        let files = repo.wal_files(&series).await.unwrap();
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
        let files = repo.wal_files(&series).await.unwrap();
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
                &series,
                WalFile::Segment(seg(9)),
                "nope",
                "",
                Bytes::new(),
                &[]
            )
            .await
            .is_err());
    }
}
