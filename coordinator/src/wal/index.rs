//! The catalog's index of stored WAL (tables `wal_targets`, `wal_files`):
//! which cluster each target is bound to (its `system_identifier`), the
//! troubles that raise alerts until an operator acts (a refused cluster, a
//! conflicting segment), and every WAL file of every series. Storage is the
//! source of truth: [`WalIndex::replace_files`] rebuilds a series' rows from
//! a listing (`Repository::wal_files`), done whenever an agent starts
//! streaming. And the marks (`wal_marks`): the server's WAL end at a time
//! of its clock, as the stream reported it — all WAL written before that
//! time ends there or earlier, which maps a restore's target time to the
//! WAL it needs and gives the latest recoverable time.

use rusqlite::{params, OptionalExtension, Row};

use crate::catalog::{Catalog, CatalogError};
use crate::repo::wal::StoredWal;
use datasaver_common::wal::WalFile;

pub(crate) const MIGRATIONS: &[(u32, &str)] = &[
    // 17: continuous WAL (issue 14)
    (
        17,
        "CREATE TABLE wal_targets (
        target TEXT PRIMARY KEY,
        system_identifier TEXT NOT NULL,
        seg_size INTEGER NOT NULL,
        bound_at TEXT NOT NULL,
        refused_sysid TEXT,
        refused_at TEXT,
        conflict TEXT,
        conflict_at TEXT
    );
    CREATE TABLE wal_files (
        target TEXT NOT NULL,
        system_identifier TEXT NOT NULL,
        name TEXT NOT NULL,
        timeline INTEGER NOT NULL,
        segno INTEGER,
        partial INTEGER NOT NULL DEFAULT 0,
        raw_blake3 TEXT NOT NULL,
        key TEXT NOT NULL,
        size INTEGER NOT NULL,
        end_lsn INTEGER,
        stored_at TEXT NOT NULL,
        PRIMARY KEY (target, system_identifier, name)
    );
    CREATE TABLE wal_marks (
        target TEXT NOT NULL,
        system_identifier TEXT NOT NULL,
        server_time INTEGER NOT NULL,
        server_lsn INTEGER NOT NULL,
        PRIMARY KEY (target, system_identifier, server_time)
    );",
    ),
    // 20: where retention by window last left the bound cluster's WAL
    (
        20,
        "ALTER TABLE wal_targets ADD COLUMN retained_from INTEGER;",
    ),
];

/// A target's binding to one cluster, and what is wrong with its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub target: String,
    pub system_identifier: String,
    pub seg_size: u64,
    pub bound_at: String,
    /// another cluster that presented itself as this target, and when
    pub refused: Option<(String, String)>,
    /// a WAL file refused because a different one is stored under its
    /// name: (message, when)
    pub conflict: Option<(String, String)>,
    /// where retention by window last started the WAL it keeps whole
    /// (below it only held base backups' own ranges stay): missing runs
    /// below are retention's doing, not gaps
    pub retained_from: Option<u64>,
}

/// One indexed WAL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedWal {
    pub stored: StoredWal,
    /// where its WAL ends: a segment's end, a partial's filled length (the
    /// segment's start when only a listing said so), none for a history
    pub end_lsn: Option<u64>,
    pub stored_at: String,
}

fn name_of(f: &WalFile, seg_size: u64) -> String {
    match f {
        WalFile::Segment(s) => s.name(seg_size),
        WalFile::Partial(s) => format!("{}.partial", s.name(seg_size)),
        WalFile::History(t) => datasaver_common::wal::history_name(*t),
    }
}

fn binding_row(r: &Row<'_>) -> rusqlite::Result<Binding> {
    let pair = |a: Option<String>, b: Option<String>| a.zip(b);
    Ok(Binding {
        target: r.get(0)?,
        system_identifier: r.get(1)?,
        seg_size: r.get::<_, i64>(2)? as u64,
        bound_at: r.get(3)?,
        refused: pair(r.get(4)?, r.get(5)?),
        conflict: pair(r.get(6)?, r.get(7)?),
        retained_from: r.get::<_, Option<i64>>(8)?.map(|v| v as u64),
    })
}

const BINDING: &str = "target, system_identifier, seg_size, bound_at, refused_sysid, refused_at, \
     conflict, conflict_at, retained_from";

#[derive(Clone)]
pub struct WalIndex {
    db: Catalog,
}

impl WalIndex {
    pub fn new(db: Catalog) -> Self {
        Self { db }
    }

    /// The binding of `target`, if it streams WAL.
    pub async fn binding(&self, target: &str) -> Result<Option<Binding>, CatalogError> {
        let target = target.to_string();
        self.db
            .call(move |c| {
                Ok(c.query_row(
                    &format!("SELECT {BINDING} FROM wal_targets WHERE target = ?1"),
                    [&target],
                    binding_row,
                )
                .optional()?)
            })
            .await
    }

    /// Every binding.
    pub async fn bindings(&self) -> Result<Vec<Binding>, CatalogError> {
        self.db
            .call(move |c| {
                let mut st = c.prepare(&format!(
                    "SELECT {BINDING} FROM wal_targets ORDER BY target"
                ))?;
                let rows = st.query_map([], binding_row)?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// Binds `target` to a cluster unless it is bound already (a binding
    /// with an empty system identifier is one an operator released);
    /// returns the binding in force.
    pub async fn bind(
        &self,
        target: &str,
        system_identifier: &str,
        seg_size: u64,
        now: String,
    ) -> Result<Binding, CatalogError> {
        let (t, s) = (target.to_string(), system_identifier.to_string());
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO wal_targets(target, system_identifier, seg_size, bound_at)
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT(target) DO UPDATE SET
                       system_identifier = excluded.system_identifier,
                       seg_size = excluded.seg_size,
                       bound_at = excluded.bound_at
                     WHERE wal_targets.system_identifier = ''",
                    params![t, s, seg_size as i64, now],
                )?;
                Ok(c.query_row(
                    &format!("SELECT {BINDING} FROM wal_targets WHERE target = ?1"),
                    [&t],
                    binding_row,
                )?)
            })
            .await
    }

    /// Releases `target`'s binding (`dsctl targets rebind`): the next
    /// cluster streaming for it starts a new series. The row stays, with an
    /// empty system identifier, so the older series in storage is not
    /// adopted again; its WAL stays indexed under its system identifier.
    pub async fn unbind(&self, target: &str) -> Result<Option<Binding>, CatalogError> {
        let target = target.to_string();
        self.db
            .call(move |c| {
                let old = c
                    .query_row(
                        &format!("SELECT {BINDING} FROM wal_targets WHERE target = ?1"),
                        [&target],
                        binding_row,
                    )
                    .optional()?;
                c.execute(
                    "UPDATE wal_targets SET system_identifier = '', refused_sysid = NULL,
                       refused_at = NULL, conflict = NULL, conflict_at = NULL,
                       retained_from = NULL
                     WHERE target = ?1",
                    [&target],
                )?;
                Ok(old)
            })
            .await
    }

    /// Notes where retention by window left the WAL of `target`'s bound
    /// cluster `sysid` (`None`: it keeps everything), and forgets the marks
    /// below it: no kept base backup replays to a time there by mark.
    pub async fn set_retained_from(
        &self,
        target: &str,
        sysid: &str,
        from: Option<u64>,
    ) -> Result<(), CatalogError> {
        let (t, s) = (target.to_string(), sysid.to_string());
        self.db
            .call(move |c| {
                let tx = c.unchecked_transaction()?;
                tx.execute(
                    "UPDATE wal_targets SET retained_from = ?3
                     WHERE target = ?1 AND system_identifier = ?2",
                    params![t, s, from.map(|v| v as i64)],
                )?;
                if let Some(from) = from {
                    tx.execute(
                        "DELETE FROM wal_marks
                         WHERE target = ?1 AND system_identifier = ?2 AND server_lsn < ?3",
                        params![t, s, from as i64],
                    )?;
                }
                tx.commit()?;
                Ok(())
            })
            .await
    }

    /// Drops the binding row, as a lost catalog would.
    #[cfg(test)]
    pub async fn forget(&self, target: &str) {
        let target = target.to_string();
        self.db
            .call(move |c| {
                c.execute("DELETE FROM wal_targets WHERE target = ?1", [&target])?;
                Ok(())
            })
            .await
            .expect("forget binding");
    }

    /// Notes that another cluster presented itself as `target` (or, with
    /// `None`, that the bound one is back, which clears it).
    pub async fn note_refused(
        &self,
        target: &str,
        sysid: Option<String>,
        now: String,
    ) -> Result<(), CatalogError> {
        let target = target.to_string();
        self.db
            .call(move |c| {
                let at = sysid.as_ref().map(|_| now);
                c.execute(
                    "UPDATE wal_targets SET refused_sysid = ?2, refused_at = ?3 WHERE target = ?1",
                    params![target, sysid, at],
                )?;
                Ok(())
            })
            .await
    }

    /// Notes a conflicting WAL file for `target`.
    pub async fn note_conflict(
        &self,
        target: &str,
        message: String,
        now: String,
    ) -> Result<(), CatalogError> {
        let target = target.to_string();
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE wal_targets SET conflict = ?2, conflict_at = ?3 WHERE target = ?1",
                    params![target, message, now],
                )?;
                Ok(())
            })
            .await
    }

    /// Records a mark: at `time` (the server's clock, Unix microseconds)
    /// the server's WAL ended at `lsn`.
    pub async fn add_mark(
        &self,
        target: &str,
        system_identifier: &str,
        time: i64,
        lsn: u64,
    ) -> Result<(), CatalogError> {
        let (t, s) = (target.to_string(), system_identifier.to_string());
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT OR REPLACE INTO wal_marks(target, system_identifier, server_time, server_lsn)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![t, s, time, lsn as i64],
                )?;
                Ok(())
            })
            .await
    }

    /// Moves the mark at `from` to the later time `to` (the position did
    /// not change in between).
    pub async fn move_mark(
        &self,
        target: &str,
        system_identifier: &str,
        from: i64,
        to: i64,
    ) -> Result<(), CatalogError> {
        let (t, s) = (target.to_string(), system_identifier.to_string());
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE wal_marks SET server_time = ?4
                     WHERE target = ?1 AND system_identifier = ?2 AND server_time = ?3",
                    params![t, s, from, to],
                )?;
                Ok(())
            })
            .await
    }

    /// The newest mark at or below `stored_end`: the latest time whose WAL
    /// is all stored.
    pub async fn latest_mark_within(
        &self,
        target: &str,
        system_identifier: &str,
        stored_end: u64,
    ) -> Result<Option<(i64, u64)>, CatalogError> {
        self.one_mark(
            "server_lsn <= ?3 ORDER BY server_time DESC",
            target,
            system_identifier,
            stored_end as i64,
        )
        .await
    }

    /// The first mark at or after `time`: the WAL written before `time`
    /// ends at its position.
    pub async fn first_mark_from(
        &self,
        target: &str,
        system_identifier: &str,
        time: i64,
    ) -> Result<Option<(i64, u64)>, CatalogError> {
        self.one_mark(
            "server_time >= ?3 ORDER BY server_time",
            target,
            system_identifier,
            time,
        )
        .await
    }

    /// The first mark of a series matching `condition_and_order` (on ?3).
    async fn one_mark(
        &self,
        condition_and_order: &'static str,
        target: &str,
        system_identifier: &str,
        value: i64,
    ) -> Result<Option<(i64, u64)>, CatalogError> {
        let (t, s) = (target.to_string(), system_identifier.to_string());
        self.db
            .call(move |c| {
                Ok(c.query_row(
                    &format!(
                        "SELECT server_time, server_lsn FROM wal_marks
                         WHERE target = ?1 AND system_identifier = ?2 AND {condition_and_order} LIMIT 1"
                    ),
                    params![t, s, value],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64)),
                )
                .optional()?)
            })
            .await
    }

    /// The indexed files of one series.
    pub async fn files(
        &self,
        target: &str,
        system_identifier: &str,
        seg_size: u64,
    ) -> Result<Vec<IndexedWal>, CatalogError> {
        let (t, s) = (target.to_string(), system_identifier.to_string());
        self.db
            .call(move |c| {
                let mut st = c.prepare(
                    "SELECT name, raw_blake3, key, size, end_lsn, stored_at FROM wal_files
                     WHERE target = ?1 AND system_identifier = ?2 ORDER BY name",
                )?;
                let rows = st.query_map(params![t, s], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, String>(5)?,
                    ))
                })?;
                let mut out = Vec::new();
                for row in rows {
                    let (name, raw_blake3, key, size, end, stored_at) = row?;
                    // A name this build does not know is skipped, not fatal.
                    let Some(file) = WalFile::parse(&name, seg_size) else {
                        continue;
                    };
                    out.push(IndexedWal {
                        stored: StoredWal {
                            file,
                            raw_blake3,
                            key,
                            size: size as u64,
                        },
                        end_lsn: end.map(|e| e as u64),
                        stored_at,
                    });
                }
                Ok(out)
            })
            .await
    }

    /// Records a stored file and forgets the keys the put removed, in one
    /// transaction.
    pub async fn record(
        &self,
        target: &str,
        system_identifier: &str,
        seg_size: u64,
        file: IndexedWal,
        removed: Vec<String>,
    ) -> Result<(), CatalogError> {
        let (t, s) = (target.to_string(), system_identifier.to_string());
        self.db
            .call(move |c| {
                let tx = c.unchecked_transaction()?;
                for k in &removed {
                    tx.execute(
                        "DELETE FROM wal_files WHERE target = ?1 AND system_identifier = ?2 AND key = ?3",
                        params![t, s, k],
                    )?;
                }
                insert(&tx, &t, &s, seg_size, &file)?;
                tx.commit()?;
                Ok(())
            })
            .await
    }

    /// Forgets stored files (deleted by retention).
    pub async fn forget_files(
        &self,
        target: &str,
        system_identifier: &str,
        keys: &[String],
    ) -> Result<(), CatalogError> {
        let (t, s, keys) = (
            target.to_string(),
            system_identifier.to_string(),
            keys.to_vec(),
        );
        self.db
            .call(move |c| {
                let tx = c.unchecked_transaction()?;
                for k in &keys {
                    tx.execute(
                        "DELETE FROM wal_files WHERE target = ?1 AND system_identifier = ?2 AND key = ?3",
                        params![t, s, k],
                    )?;
                }
                tx.commit()?;
                Ok(())
            })
            .await
    }

    /// Replaces a series' rows with what storage lists (`files`), keeping
    /// what the index knew of a file that did not change (its end and
    /// when it was stored).
    pub async fn replace_files(
        &self,
        target: &str,
        system_identifier: &str,
        seg_size: u64,
        files: Vec<StoredWal>,
        now: String,
    ) -> Result<(), CatalogError> {
        let old = self.files(target, system_identifier, seg_size).await?;
        let (t, s) = (target.to_string(), system_identifier.to_string());
        self.db
            .call(move |c| {
                let tx = c.unchecked_transaction()?;
                tx.execute(
                    "DELETE FROM wal_files WHERE target = ?1 AND system_identifier = ?2",
                    params![t, s],
                )?;
                for f in files {
                    let known = old.iter().find(|o| o.stored.key == f.key);
                    let end_lsn = known.and_then(|o| o.end_lsn).or(match f.file {
                        WalFile::Segment(seg) => Some(seg.start(seg_size).0 + seg_size),
                        WalFile::Partial(seg) => Some(seg.start(seg_size).0),
                        WalFile::History(_) => None,
                    });
                    let stored_at = known
                        .map(|o| o.stored_at.clone())
                        .unwrap_or_else(|| now.clone());
                    insert(
                        &tx,
                        &t,
                        &s,
                        seg_size,
                        &IndexedWal {
                            stored: f,
                            end_lsn,
                            stored_at,
                        },
                    )?;
                }
                tx.commit()?;
                Ok(())
            })
            .await
    }
}

fn insert(
    c: &rusqlite::Connection,
    target: &str,
    sysid: &str,
    seg_size: u64,
    f: &IndexedWal,
) -> rusqlite::Result<()> {
    let (timeline, segno, partial) = match f.stored.file {
        WalFile::Segment(s) => (s.timeline, Some(s.segno as i64), false),
        WalFile::Partial(s) => (s.timeline, Some(s.segno as i64), true),
        WalFile::History(t) => (t, None, false),
    };
    c.execute(
        "INSERT OR REPLACE INTO wal_files(target, system_identifier, name, timeline, segno, partial,
             raw_blake3, key, size, end_lsn, stored_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            target,
            sysid,
            name_of(&f.stored.file, seg_size),
            timeline,
            segno,
            partial,
            f.stored.raw_blake3,
            f.stored.key,
            f.stored.size as i64,
            f.end_lsn.map(|e| e as i64),
            f.stored_at
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datasaver_common::wal::{Segment, DEFAULT_SEG_SIZE as SEG};

    fn file(f: WalFile, hash: &str) -> StoredWal {
        StoredWal {
            file: f,
            raw_blake3: hash.repeat(64),
            key: format!("app/wal/1/{f:?}-{hash}"),
            size: 10,
        }
    }

    #[tokio::test]
    async fn binding_refusals_and_files_survive_and_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let index = WalIndex::new(Catalog::open(&dir.path().join("c.db")).unwrap());
        assert_eq!(index.binding("app").await.unwrap(), None);
        let b = index.bind("app", "7301", SEG, "t1".into()).await.unwrap();
        assert_eq!(b.system_identifier, "7301");
        // A second bind does not move it.
        let b2 = index.bind("app", "9999", SEG, "t2".into()).await.unwrap();
        assert_eq!(b2, b);
        index
            .note_refused("app", Some("9999".into()), "t3".into())
            .await
            .unwrap();
        index
            .note_conflict("app", "segment X differs".into(), "t4".into())
            .await
            .unwrap();
        let b = index.binding("app").await.unwrap().unwrap();
        assert_eq!(b.refused, Some(("9999".into(), "t3".into())));
        assert_eq!(b.conflict, Some(("segment X differs".into(), "t4".into())));
        index.note_refused("app", None, "t5".into()).await.unwrap();
        assert_eq!(index.binding("app").await.unwrap().unwrap().refused, None);

        let s1 = Segment {
            timeline: 1,
            segno: 1,
        };
        let partial = IndexedWal {
            stored: file(WalFile::Partial(s1), "a"),
            end_lsn: Some(SEG + 100),
            stored_at: "t6".into(),
        };
        index
            .record("app", "7301", SEG, partial.clone(), vec![])
            .await
            .unwrap();
        assert_eq!(
            index.files("app", "7301", SEG).await.unwrap(),
            vec![partial.clone()]
        );
        // The whole segment replaces its partial.
        let whole = IndexedWal {
            stored: file(WalFile::Segment(s1), "b"),
            end_lsn: Some(2 * SEG),
            stored_at: "t7".into(),
        };
        index
            .record(
                "app",
                "7301",
                SEG,
                whole.clone(),
                vec![partial.stored.key.clone()],
            )
            .await
            .unwrap();
        assert_eq!(
            index.files("app", "7301", SEG).await.unwrap(),
            vec![whole.clone()]
        );
        // A listing replaces the rows; what it adds gets the listing's
        // time and the end its name implies.
        let s2 = Segment {
            timeline: 1,
            segno: 2,
        };
        index
            .replace_files(
                "app",
                "7301",
                SEG,
                vec![whole.stored.clone(), file(WalFile::Segment(s2), "c")],
                "t8".into(),
            )
            .await
            .unwrap();
        let files = index.files("app", "7301", SEG).await.unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0], whole);
        assert_eq!(files[1].end_lsn, Some(3 * SEG));
        assert_eq!(files[1].stored_at, "t8");
        // Marks: the latest within what is stored, the first from a time.
        for (t, l) in [(100, SEG), (200, 2 * SEG), (300, 3 * SEG + 5)] {
            index.add_mark("app", "7301", t, l).await.unwrap();
        }
        assert_eq!(
            index
                .latest_mark_within("app", "7301", 3 * SEG)
                .await
                .unwrap(),
            Some((200, 2 * SEG))
        );
        assert_eq!(
            index.first_mark_from("app", "7301", 150).await.unwrap(),
            Some((200, 2 * SEG))
        );
        assert_eq!(
            index.first_mark_from("app", "7301", 301).await.unwrap(),
            None
        );
        index.move_mark("app", "7301", 300, 400).await.unwrap();
        assert_eq!(
            index.first_mark_from("app", "7301", 301).await.unwrap(),
            Some((400, 3 * SEG + 5))
        );
        // Another series of the target is separate.
        assert!(index.files("app", "42", SEG).await.unwrap().is_empty());
        let old = index.unbind("app").await.unwrap().unwrap();
        assert_eq!(old.system_identifier, "7301");
        let released = index.binding("app").await.unwrap().unwrap();
        assert_eq!(released.system_identifier, "");
        assert_eq!(released.conflict, None);
        // The next cluster binds it.
        let b = index.bind("app", "9999", SEG, "t9".into()).await.unwrap();
        assert_eq!(b.system_identifier, "9999");
        assert_eq!(index.files("app", "7301", SEG).await.unwrap().len(), 2);
    }
}
