//! The catalog's backup table: its schema (`MIGRATIONS`), the one mapping
//! between a [`BackupRecord`] and its SQLite row, and the queries the
//! repository needs. Only `repo` uses it.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::record::{format_time, parse_time, BackupRecord, Kind, Status, Trigger, Verification};
use crate::catalog::{Catalog, CatalogError};

/// The backup table's migrations (see `catalog::plan`). Version 1 is shared
/// with `targets`: both tables were created in one step before the stores
/// were split.
pub(crate) const MIGRATIONS: &[(u32, &str)] = &[
    (
        1,
        "CREATE TABLE backups (
        id TEXT PRIMARY KEY,
        target TEXT NOT NULL,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        trigger TEXT NOT NULL,
        label TEXT,
        created_at TEXT NOT NULL,
        finished_at TEXT,
        duration_ms INTEGER NOT NULL DEFAULT 0,
        raw_bytes INTEGER NOT NULL DEFAULT 0,
        stored_bytes INTEGER NOT NULL DEFAULT 0,
        checksum TEXT NOT NULL DEFAULT '',
        compression TEXT NOT NULL DEFAULT '',
        encrypted INTEGER NOT NULL DEFAULT 0,
        encryption_recipient TEXT NOT NULL DEFAULT '',
        format TEXT NOT NULL DEFAULT '',
        object_key TEXT NOT NULL DEFAULT '',
        meta_key TEXT NOT NULL DEFAULT '',
        database TEXT NOT NULL DEFAULT '',
        db_host TEXT NOT NULL DEFAULT '',
        server_version TEXT NOT NULL DEFAULT '',
        pg_dump_version TEXT NOT NULL DEFAULT '',
        error TEXT,
        pinned INTEGER NOT NULL DEFAULT 0,
        tags TEXT NOT NULL DEFAULT '',
        agent TEXT NOT NULL DEFAULT '',
        verified_at TEXT,
        verify_result TEXT
    );
    CREATE INDEX backups_by_target ON backups(target, created_at);",
    ),
    // 6: the extensions a backup's database uses (checked before a restore)
    (
        6,
        "ALTER TABLE backups ADD COLUMN extensions TEXT NOT NULL DEFAULT '';",
    ),
    // 7: the server's system_identifier (a new server behind a target)
    (
        7,
        "ALTER TABLE backups ADD COLUMN system_identifier TEXT NOT NULL DEFAULT '';",
    ),
    // 8: the checksum of the plain pg_dump output (`dsctl export` checks it)
    (
        8,
        "ALTER TABLE backups ADD COLUMN raw_checksum TEXT NOT NULL DEFAULT '';",
    ),
    // 9: the roles a backup's database names (checked before a restore)
    (
        9,
        "ALTER TABLE backups ADD COLUMN roles TEXT NOT NULL DEFAULT '';",
    ),
    // 11: how the database was created (JSON of `DatabaseShape`)
    (
        11,
        "ALTER TABLE backups ADD COLUMN database_shape TEXT NOT NULL DEFAULT '';",
    ),
    // 12: further objects stored with the dump (JSON list of `PartRecord`)
    (
        12,
        "ALTER TABLE backups ADD COLUMN parts TEXT NOT NULL DEFAULT '';",
    ),
    // 13: each table's rows at backup time (JSON of `RowCounts`)
    (
        13,
        "ALTER TABLE backups ADD COLUMN row_counts TEXT NOT NULL DEFAULT '';",
    ),
    // 14: the last restore drill of each backup
    (
        14,
        "ALTER TABLE backups ADD COLUMN drilled_at TEXT;
         ALTER TABLE backups ADD COLUMN drill_result TEXT;",
    ),
    // 18: a base backup's place in the WAL (JSON of `Physical`)
    (
        18,
        "ALTER TABLE backups ADD COLUMN physical TEXT NOT NULL DEFAULT '';",
    ),
];

const COLUMNS: &str =
    "id, target, kind, status, trigger, label, created_at, finished_at, duration_ms,
    raw_bytes, stored_bytes, checksum, compression, encrypted, encryption_recipient, format,
    object_key, meta_key, database, db_host, server_version, pg_dump_version, error, pinned, tags,
    agent, verified_at, verify_result, extensions, system_identifier, raw_checksum, roles, database_shape, parts, row_counts,
    drilled_at, drill_result, physical";

fn bad(col: usize, what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        rusqlite::types::Type::Text,
        format!("unknown {what} {value:?} in the catalog (written by a newer datasaver?)").into(),
    )
}

fn time(col: usize, s: &str) -> rusqlite::Result<chrono::DateTime<chrono::Utc>> {
    parse_time(s).ok_or_else(|| bad(col, "time", s))
}

/// A JSON column (shape, parts, row counts): empty when nothing was
/// recorded, so rows from before the column read back as the default.
fn json_column<T: serde::Serialize + ?Sized>(v: &T, nothing: bool) -> String {
    if nothing {
        String::new()
    } else {
        serde_json::to_string(v).unwrap_or_default()
    }
}

fn shape_json(s: &super::record::DatabaseShape) -> String {
    json_column(s, *s == super::record::DatabaseShape::default())
}

fn rows_json(r: &super::record::RowCounts) -> String {
    json_column(r, r.is_empty())
}

fn parts_json(p: &[super::record::PartRecord]) -> String {
    json_column(p, p.is_empty())
}

/// Unlike the shape (a restore works without it), parts name objects the
/// backup owns: one that cannot be read must not be forgotten.
fn parts_from(col: usize, s: &str) -> rusqlite::Result<Vec<super::record::PartRecord>> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(s).map_err(|_| bad(col, "parts", s))
}

fn physical_json(p: &Option<super::record::Physical>) -> String {
    json_column(p, p.is_none())
}

/// A base backup's place in the WAL: like parts, one that cannot be read
/// must not be taken for a dump.
fn physical_from(col: usize, s: &str) -> rusqlite::Result<Option<super::record::Physical>> {
    if s.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(s)
        .map(Some)
        .map_err(|_| bad(col, "physical", s))
}

/// A comma-joined list column (names never hold commas: see the agent API).
fn list(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<BackupRecord> {
    let kind: String = r.get(2)?;
    let status: String = r.get(3)?;
    let trigger: String = r.get(4)?;
    let created: String = r.get(6)?;
    let finished: Option<String> = r.get(7)?;
    let tags: String = r.get(24)?;
    let verified_at: Option<String> = r.get(26)?;
    let verify_result: Option<String> = r.get(27)?;
    let extensions: String = r.get(28)?;
    Ok(BackupRecord {
        id: r.get(0)?,
        target: r.get(1)?,
        kind: Kind::parse(&kind).ok_or_else(|| bad(2, "kind", &kind))?,
        status: Status::parse(&status).ok_or_else(|| bad(3, "status", &status))?,
        trigger: Trigger::parse(&trigger).ok_or_else(|| bad(4, "trigger", &trigger))?,
        label: r.get(5)?,
        created_at: time(6, &created)?,
        finished_at: finished.as_deref().map(|f| time(7, f)).transpose()?,
        duration_ms: r.get::<_, i64>(8)? as u64,
        raw_bytes: r.get::<_, i64>(9)? as u64,
        stored_bytes: r.get::<_, i64>(10)? as u64,
        checksum: r.get(11)?,
        compression: r.get(12)?,
        encrypted: r.get(13)?,
        encryption_recipient: r.get(14)?,
        format: r.get(15)?,
        object_key: r.get(16)?,
        meta_key: r.get(17)?,
        database: r.get(18)?,
        db_host: r.get(19)?,
        server_version: r.get(20)?,
        pg_dump_version: r.get(21)?,
        error: r.get(22)?,
        pinned: r.get(23)?,
        tags: tags
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        agent: r.get(25)?,
        verification: Verification::parse(verified_at.as_deref(), verify_result.as_deref()),
        extensions: list(&extensions),
        system_identifier: r.get(29)?,
        raw_checksum: r.get(30)?,
        roles: list(&r.get::<_, String>(31)?),
        database_shape: serde_json::from_str(&r.get::<_, String>(32)?).unwrap_or_default(),
        parts: parts_from(33, &r.get::<_, String>(33)?)?,
        row_counts: serde_json::from_str(&r.get::<_, String>(34)?).unwrap_or_default(),
        drill: Verification::parse(
            r.get::<_, Option<String>>(35)?.as_deref(),
            r.get::<_, Option<String>>(36)?.as_deref(),
        ),
        physical: physical_from(37, &r.get::<_, String>(37)?)?,
    })
}

fn insert(c: &Connection, b: &BackupRecord) -> Result<(), CatalogError> {
    c.execute(
        &format!("INSERT INTO backups ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33, ?34, ?35, ?36, ?37, ?38)"),
        params![
            b.id,
            b.target,
            b.kind.as_str(),
            b.status.as_str(),
            b.trigger.as_str(),
            b.label,
            format_time(b.created_at),
            b.finished_at.map(format_time),
            b.duration_ms as i64,
            b.raw_bytes as i64,
            b.stored_bytes as i64,
            b.checksum,
            b.compression,
            b.encrypted,
            b.encryption_recipient,
            b.format,
            b.object_key,
            b.meta_key,
            b.database,
            b.db_host,
            b.server_version,
            b.pg_dump_version,
            b.error,
            b.pinned,
            b.tags.join(","),
            b.agent,
            b.verification.as_ref().map(|v| format_time(v.at)),
            b.verification.as_ref().map(Verification::result),
            b.extensions.join(","),
            b.system_identifier,
            b.raw_checksum,
            b.roles.join(","),
            shape_json(&b.database_shape),
            parts_json(&b.parts),
            rows_json(&b.row_counts),
            b.drill.as_ref().map(|v| format_time(v.at)),
            b.drill.as_ref().map(Verification::result),
            physical_json(&b.physical),
        ],
    )?;
    Ok(())
}

fn get(c: &Connection, id: &str) -> Result<Option<BackupRecord>, CatalogError> {
    let sql = format!("SELECT {COLUMNS} FROM backups WHERE id = ?1");
    Ok(c.query_row(&sql, [id], from_row).optional()?)
}

/// The backup table, on the catalog's connection.
#[derive(Clone)]
pub struct BackupStore {
    db: Catalog,
}

impl BackupStore {
    pub fn new(db: Catalog) -> Self {
        Self { db }
    }

    #[cfg(test)]
    pub fn db_for_tests(&self) -> &Catalog {
        &self.db
    }

    pub async fn insert(&self, b: BackupRecord) -> Result<(), CatalogError> {
        self.db.call(move |c| insert(c, &b)).await
    }

    pub async fn get(&self, id: &str) -> Result<Option<BackupRecord>, CatalogError> {
        let id = id.to_string();
        self.db.call(move |c| get(c, &id)).await
    }

    /// Backups, newest first, optionally of one target.
    pub async fn list(&self, target: Option<String>) -> Result<Vec<BackupRecord>, CatalogError> {
        self.db
            .call(move |c| {
                let sql = format!(
                    "SELECT {COLUMNS} FROM backups WHERE (?1 IS NULL OR target = ?1) ORDER BY created_at DESC, id DESC"
                );
                let mut st = c.prepare(&sql)?;
                let rows = st.query_map(params![target], from_row)?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// Whether the catalog holds any backup row at all.
    pub async fn has_backups(&self) -> Result<bool, CatalogError> {
        self.db
            .call(|c| Ok(c.query_row("SELECT EXISTS(SELECT 1 FROM backups)", [], |r| r.get(0))?))
            .await
    }

    /// Inserts a running record under `base` or, if that id is taken,
    /// `<base>_2`, `_3`... (in one transaction, so two can't take the same).
    pub async fn insert_unique(
        &self,
        base: String,
        mut b: BackupRecord,
    ) -> Result<BackupRecord, CatalogError> {
        self.db
            .call(move |c| {
                let tx = c.unchecked_transaction()?;
                let mut n = 1;
                loop {
                    let id = if n == 1 {
                        base.clone()
                    } else {
                        format!("{base}_{n}")
                    };
                    let taken: bool = tx.query_row(
                        "SELECT EXISTS(SELECT 1 FROM backups WHERE id = ?1)",
                        [&id],
                        |r| r.get(0),
                    )?;
                    if !taken {
                        b.id = id;
                        insert(&tx, &b)?;
                        tx.commit()?;
                        return Ok(b);
                    }
                    n += 1;
                }
            })
            .await
    }

    /// Replaces a running row with its completed form.
    pub async fn complete(&self, b: BackupRecord) -> Result<(), CatalogError> {
        self.db
            .call(move |c| {
                let n = c.execute(
                    "UPDATE backups SET status = 'completed', finished_at = ?2, duration_ms = ?3, raw_bytes = ?4,
                       stored_bytes = ?5, checksum = ?6, compression = ?7, encrypted = ?8, encryption_recipient = ?9,
                       format = ?10, object_key = ?11, meta_key = ?12, database = ?13, db_host = ?14,
                       server_version = ?15, pg_dump_version = ?16, tags = ?17, error = NULL,
                       extensions = ?18, system_identifier = ?19, raw_checksum = ?20,
                       roles = ?21, database_shape = ?22, parts = ?23, row_counts = ?24,
                       physical = ?25
                     WHERE id = ?1 AND status = 'running'",
                    params![
                        b.id,
                        b.finished_at.map(format_time),
                        b.duration_ms as i64,
                        b.raw_bytes as i64,
                        b.stored_bytes as i64,
                        b.checksum,
                        b.compression,
                        b.encrypted,
                        b.encryption_recipient,
                        b.format,
                        b.object_key,
                        b.meta_key,
                        b.database,
                        b.db_host,
                        b.server_version,
                        b.pg_dump_version,
                        b.tags.join(","),
                        b.extensions.join(","),
                        b.system_identifier,
                        b.raw_checksum,
                        b.roles.join(","),
                        shape_json(&b.database_shape),
                        parts_json(&b.parts),
                        rows_json(&b.row_counts),
                        physical_json(&b.physical),
                    ],
                )?;
                if n == 1 {
                    Ok(())
                } else {
                    Err(CatalogError::Worker(format!(
                        "backup {} is no longer running",
                        b.id
                    )))
                }
            })
            .await
    }

    /// Ends a running row as `failed` or `interrupted`; returns false if it
    /// was not running. For a failure, a reason noted earlier (`note_error`,
    /// e.g. the upload's own error) is kept: it is the first and most
    /// precise one.
    pub async fn finish(
        &self,
        id: &str,
        status: Status,
        reason: &str,
        finished_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, CatalogError> {
        let (id, reason) = (id.to_string(), reason.to_string());
        let sql = match status {
            Status::Failed => {
                "UPDATE backups SET status = 'failed', error = COALESCE(error, ?2), finished_at = ?3
                 WHERE id = ?1 AND status = 'running'"
            }
            Status::Interrupted => {
                "UPDATE backups SET status = 'interrupted', error = ?2, finished_at = ?3
                 WHERE id = ?1 AND status = 'running'"
            }
            other => {
                return Err(CatalogError::Worker(format!(
                    "a running backup cannot end as {other}"
                )))
            }
        };
        self.db
            .call(move |c| {
                let n = c.execute(sql, params![id, reason, format_time(finished_at)])?;
                Ok(n == 1)
            })
            .await
    }

    /// Remembers why a running backup went wrong without deciding its
    /// outcome; the first reason noted wins.
    pub async fn note_error(&self, id: &str, error: &str) -> Result<(), CatalogError> {
        let (id, error) = (id.to_string(), error.to_string());
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE backups SET error = ?2 WHERE id = ?1 AND status = 'running' AND error IS NULL",
                    params![id, error],
                )?;
                Ok(())
            })
            .await
    }

    /// Records the parts a running backup has stored so far, so whatever
    /// later removes the attempt (its failure, a cleanup of failed rows)
    /// knows their keys.
    pub async fn note_parts(
        &self,
        id: &str,
        parts: &[super::record::PartRecord],
    ) -> Result<(), CatalogError> {
        let (id, parts) = (id.to_string(), parts_json(parts));
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE backups SET parts = ?2 WHERE id = ?1 AND status = 'running'",
                    params![id, parts],
                )?;
                Ok(())
            })
            .await
    }

    /// Rows still marked running.
    pub async fn running(&self) -> Result<Vec<BackupRecord>, CatalogError> {
        self.db
            .call(|c| {
                let sql = format!("SELECT {COLUMNS} FROM backups WHERE status = 'running'");
                let mut st = c.prepare(&sql)?;
                let rows = st.query_map([], from_row)?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// At start-up and shutdown: nothing can still be running, so every
    /// running row is a failed attempt. Returns the rows it ended.
    pub async fn fail_all_running(
        &self,
        error: &str,
        finished_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<BackupRecord>, CatalogError> {
        let error = error.to_string();
        self.db
            .call(move |c| {
                let tx = c.unchecked_transaction()?;
                let running: Vec<BackupRecord> = {
                    let sql = format!("SELECT {COLUMNS} FROM backups WHERE status = 'running'");
                    let mut st = tx.prepare(&sql)?;
                    let rows = st.query_map([], from_row)?;
                    rows.collect::<Result<Vec<_>, _>>()?
                };
                tx.execute(
                    "UPDATE backups SET status = 'failed', error = COALESCE(error, ?1), finished_at = ?2 WHERE status = 'running'",
                    params![error, format_time(finished_at)],
                )?;
                tx.commit()?;
                Ok(running)
            })
            .await
    }

    /// Newest completed backup of `target` created at or before `at`.
    pub async fn latest_completed(
        &self,
        target: &str,
        at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Option<BackupRecord>, CatalogError> {
        let target = target.to_string();
        let at = at.map(format_time);
        self.db
            .call(move |c| {
                let sql = format!(
                    "SELECT {COLUMNS} FROM backups WHERE target = ?1 AND status = 'completed' AND kind = 'logical'
                       AND (?2 IS NULL OR created_at <= ?2) ORDER BY created_at DESC, id DESC LIMIT 1"
                );
                Ok(c.query_row(&sql, params![target, at], from_row)
                    .optional()?)
            })
            .await
    }

    /// Completed backups of `target` older than `id`, newest first.
    pub async fn older_completed(
        &self,
        target: &str,
        id: &str,
    ) -> Result<Vec<BackupRecord>, CatalogError> {
        let (target, id) = (target.to_string(), id.to_string());
        self.db
            .call(move |c| {
                let sql = format!(
                    "SELECT {COLUMNS} FROM backups WHERE target = ?1 AND status = 'completed' AND id <> ?2
                       AND kind = (SELECT kind FROM backups WHERE id = ?2)
                       AND created_at <= (SELECT created_at FROM backups WHERE id = ?2)
                     ORDER BY created_at DESC, id DESC"
                );
                let mut st = c.prepare(&sql)?;
                let rows = st.query_map(params![target, id], from_row)?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// Keeps the result of a verify (or, with `drill`, of a restore drill)
    /// of backup `id`.
    pub async fn set_check(
        &self,
        id: &str,
        v: Verification,
        drill: bool,
    ) -> Result<(), CatalogError> {
        let id = id.to_string();
        let sql = if drill {
            "UPDATE backups SET drilled_at = ?2, drill_result = ?3 WHERE id = ?1"
        } else {
            "UPDATE backups SET verified_at = ?2, verify_result = ?3 WHERE id = ?1"
        };
        self.db
            .call(move |c| {
                c.execute(sql, params![id, format_time(v.at), v.result()])?;
                Ok(())
            })
            .await
    }

    /// Every target that has a backup row (a target whose agent is gone
    /// still has backups to rotate).
    pub async fn targets(&self) -> Result<Vec<String>, CatalogError> {
        self.db
            .call(|c| {
                let mut st = c.prepare("SELECT DISTINCT target FROM backups ORDER BY target")?;
                let rows = st.query_map([], |r| r.get(0))?;
                Ok(rows.collect::<Result<Vec<String>, _>>()?)
            })
            .await
    }

    /// First step of a deletion: the row says it is going (and why), so a
    /// crash before the objects are gone is finished later. Returns false if
    /// the row changed meanwhile (pinned, or gone).
    pub async fn mark_deleting(&self, id: &str, reason: &str) -> Result<bool, CatalogError> {
        let (id, reason) = (id.to_string(), reason.to_string());
        self.db
            .call(move |c| {
                let n = c.execute(
                    "UPDATE backups SET status = 'deleting', error = ?2
                     WHERE id = ?1 AND pinned = 0 AND status IN ('completed', 'failed', 'interrupted', 'deleting')",
                    params![id, reason],
                )?;
                Ok(n == 1)
            })
            .await
    }

    /// Last step of a deletion, once the objects are gone.
    pub async fn delete_row(&self, id: &str) -> Result<(), CatalogError> {
        let id = id.to_string();
        self.db
            .call(move |c| {
                c.execute(
                    "DELETE FROM backups WHERE id = ?1 AND status = 'deleting'",
                    [id],
                )?;
                Ok(())
            })
            .await
    }

    pub async fn set_pinned(&self, id: &str, pinned: bool) -> Result<bool, CatalogError> {
        let id = id.to_string();
        self.db
            .call(move |c| {
                let n = c.execute(
                    "UPDATE backups SET pinned = ?2 WHERE id = ?1 AND status <> 'deleting'",
                    params![id, pinned],
                )?;
                Ok(n == 1)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(d: u32) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc.with_ymd_and_hms(2024, 1, d, 0, 0, 0).unwrap()
    }

    fn running(id: &str, target: &str, d: u32) -> BackupRecord {
        BackupRecord::running(id.into(), target, Trigger::Manual, None, "agent1", at(d))
    }

    #[tokio::test]
    async fn lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let store = BackupStore::new(Catalog::open(&path).unwrap());
        let a1 = store
            .insert_unique("a_1".into(), running("", "a", 1))
            .await
            .unwrap();
        assert_eq!(a1.id, "a_1");
        let a1b = store
            .insert_unique("a_1".into(), running("", "a", 1))
            .await
            .unwrap();
        assert_eq!(a1b.id, "a_1_2", "a taken id gets a suffix");
        store.insert(running("a_2", "a", 2)).await.unwrap();
        store.insert(running("b_1", "b", 3)).await.unwrap();

        let mut done = running("a_1", "a", 1);
        done.checksum = "blake3:00".into();
        done.tags = vec!["manual".into()];
        done.finished_at = Some(at(1));
        store.complete(done).await.unwrap();
        assert!(
            !store
                .finish("a_1", Status::Failed, "x", at(5))
                .await
                .unwrap(),
            "completed rows cannot fail"
        );
        store.note_error("a_2", "first reason").await.unwrap();
        store.note_error("a_2", "second reason").await.unwrap();
        let ended = store.fail_all_running("interrupted", at(6)).await.unwrap();
        assert_eq!(ended.len(), 3);

        let got = store.get("a_1").await.unwrap().unwrap();
        assert_eq!(got.status, Status::Completed);
        assert_eq!(got.tags, vec!["manual"]);
        let a2 = store.get("a_2").await.unwrap().unwrap();
        assert_eq!(a2.status, Status::Failed);
        assert_eq!(a2.error.as_deref(), Some("first reason"));
        assert_eq!(store.list(Some("a".into())).await.unwrap().len(), 3);
        assert_eq!(store.list(None).await.unwrap()[0].id, "b_1");
        let latest = store.latest_completed("a", None).await.unwrap().unwrap();
        assert_eq!(latest.id, "a_1");
        assert!(store
            .latest_completed("a", Some(at(1) - chrono::Duration::days(1)))
            .await
            .unwrap()
            .is_none());

        // verification and pins survive a reopen, with their types
        store
            .set_check(
                "a_1",
                Verification {
                    at: at(7),
                    ok: false,
                    detail: "corrupt".into(),
                },
                false,
            )
            .await
            .unwrap();
        let drilled = Verification {
            at: at(8),
            ok: true,
            detail: "drill passed".into(),
        };
        store.set_check("a_1", drilled.clone(), true).await.unwrap();
        assert!(store.set_pinned("a_1", true).await.unwrap());
        drop(store);
        let store = BackupStore::new(Catalog::open(&path).unwrap());
        let got = store.get("a_1").await.unwrap().unwrap();
        assert!(got.pinned && got.known_bad());
        assert_eq!(got.drill, Some(drilled));
        assert_eq!(store.list(None).await.unwrap().len(), 4);
        assert_eq!(store.targets().await.unwrap(), vec!["a", "b"]);
    }
}
