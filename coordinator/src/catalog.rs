//! The SQLite catalog: an index of backups (rebuildable from the `.meta.json`
//! files in storage) plus which agent owns which target. All calls run on
//! tokio's blocking pool; the connection is in WAL mode and migrated by
//! `PRAGMA user_version`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("catalog query failed: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("catalog worker failed: {0}")]
    Worker(String),
    #[error("catalog was written by a newer datasaver (schema {found}, this build knows {known}); upgrade the coordinator")]
    TooNew { found: i64, known: i64 },
}

/// Status values stored in `backups.status`.
pub mod status {
    pub const RUNNING: &str = "running";
    pub const COMPLETED: &str = "completed";
    pub const FAILED: &str = "failed";
    /// Stopped by a planned agent stop (SIGTERM): not a failure of the
    /// backup; the request is tried again once the agent is back.
    pub const INTERRUPTED: &str = "interrupted";
    /// Chosen for deletion by cleanup; the row goes once its objects are gone
    /// (a crash in between is finished by the next cleanup).
    pub const DELETING: &str = "deleting";
}

/// What the catalog remembers about a target between restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetRecord {
    pub name: String,
    pub agent: String,
    /// The schedule the agent asked for (may be overridden by the config).
    pub schedule: Option<String>,
    /// The retention the agent asked for, as JSON of `policy::RetentionSpec`.
    pub retention: Option<String>,
    /// The last cron slot the scheduler acted on (RFC 3339).
    pub last_slot: Option<String>,
    pub first_seen: String,
    /// Scheduled slots that could not start before the next one came.
    pub missed_slots: u64,
    /// When the last slot was missed (RFC 3339).
    pub last_missed_at: Option<String>,
}

/// One backup as the catalog knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRow {
    pub id: String,
    pub target: String,
    pub kind: String,
    pub status: String,
    pub trigger: String,
    pub label: Option<String>,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub duration_ms: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub checksum: String,
    pub compression: String,
    pub encrypted: bool,
    pub encryption_recipient: String,
    pub format: String,
    pub object_key: String,
    pub meta_key: String,
    pub database: String,
    pub db_host: String,
    pub server_version: String,
    pub pg_dump_version: String,
    pub error: Option<String>,
    pub pinned: bool,
    pub tags: Vec<String>,
    pub agent: String,
    pub verified_at: Option<String>,
    pub verify_result: Option<String>,
}

const MIGRATIONS: &[&str] = &[
    // 1: backups and target ownership
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
    CREATE INDEX backups_by_target ON backups(target, created_at);
    CREATE TABLE targets (
        name TEXT PRIMARY KEY,
        agent TEXT NOT NULL,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL
    );",
    // 2: what agents ask for, and the scheduler's progress
    "ALTER TABLE targets ADD COLUMN schedule TEXT;
    ALTER TABLE targets ADD COLUMN retention TEXT;
    ALTER TABLE targets ADD COLUMN last_slot TEXT;",
    // 3: alert state (one open row per target and kind) and the webhook outbox
    "CREATE TABLE alerts (
        id INTEGER PRIMARY KEY,
        target TEXT NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        backup_id TEXT,
        opened_at TEXT NOT NULL,
        resolved_at TEXT
    );
    CREATE UNIQUE INDEX alerts_open ON alerts(target, kind) WHERE resolved_at IS NULL;
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        url TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at TEXT NOT NULL,
        delivered_at TEXT,
        last_error TEXT
    );
    CREATE INDEX deliveries_pending ON deliveries(next_at) WHERE delivered_at IS NULL;",
    // 4: missed scheduled slots (the schedule.missed alert survives a restart)
    "ALTER TABLE targets ADD COLUMN missed_slots INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE targets ADD COLUMN last_missed_at TEXT;",
];

/// An alert as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRow {
    pub id: i64,
    pub target: String,
    pub kind: String,
    pub message: String,
    pub backup_id: Option<String>,
    pub opened_at: String,
}

/// A webhook delivery waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: i64,
    pub url: String,
    pub body: String,
    pub attempts: u32,
}

const COLUMNS: &str =
    "id, target, kind, status, trigger, label, created_at, finished_at, duration_ms,
    raw_bytes, stored_bytes, checksum, compression, encrypted, encryption_recipient, format,
    object_key, meta_key, database, db_host, server_version, pg_dump_version, error, pinned, tags,
    agent, verified_at, verify_result";

fn row_to_backup(r: &Row<'_>) -> rusqlite::Result<BackupRow> {
    let tags: String = r.get(24)?;
    Ok(BackupRow {
        id: r.get(0)?,
        target: r.get(1)?,
        kind: r.get(2)?,
        status: r.get(3)?,
        trigger: r.get(4)?,
        label: r.get(5)?,
        created_at: r.get(6)?,
        finished_at: r.get(7)?,
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
        verified_at: r.get(26)?,
        verify_result: r.get(27)?,
    })
}

#[derive(Clone)]
pub struct Catalog {
    conn: Arc<Mutex<Connection>>,
}

impl Catalog {
    /// Opens (creating and migrating) the catalog at `path`, owner-only.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        let open_err = |source| CatalogError::Open {
            path: path.display().to_string(),
            source,
        };
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| CatalogError::Open {
                    path: path.display().to_string(),
                    source: rusqlite::Error::InvalidPath(format!("{e}").into()),
                })?;
        }
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        migrate(&conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<R, F>(&self, f: F) -> Result<R, CatalogError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, CatalogError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let guard = conn
                .lock()
                .map_err(|_| CatalogError::Worker("catalog lock poisoned".into()))?;
            f(&guard)
        })
        .await
        .map_err(|e| CatalogError::Worker(e.to_string()))?
    }

    pub async fn insert(&self, b: BackupRow) -> Result<(), CatalogError> {
        self.call(move |c| insert(c, &b)).await
    }

    pub async fn get(&self, id: &str) -> Result<Option<BackupRow>, CatalogError> {
        let id = id.to_string();
        self.call(move |c| get(c, &id)).await
    }

    /// Backups, newest first, optionally of one target.
    pub async fn list(&self, target: Option<String>) -> Result<Vec<BackupRow>, CatalogError> {
        self.call(move |c| {
            let sql = format!(
                "SELECT {COLUMNS} FROM backups WHERE (?1 IS NULL OR target = ?1) ORDER BY created_at DESC, id DESC"
            );
            let mut st = c.prepare(&sql)?;
            let rows = st.query_map(params![target], row_to_backup)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Whether the catalog holds any backup row at all.
    pub async fn has_backups(&self) -> Result<bool, CatalogError> {
        self.call(|c| Ok(c.query_row("SELECT EXISTS(SELECT 1 FROM backups)", [], |r| r.get(0))?))
            .await
    }

    /// Picks an id for a new backup: the base id, or `<base>_2`, `_3`...
    pub async fn unused_id(&self, base: String) -> Result<String, CatalogError> {
        self.call(move |c| {
            let mut n = 1;
            loop {
                let id = if n == 1 {
                    base.clone()
                } else {
                    format!("{base}_{n}")
                };
                let taken: bool = c.query_row(
                    "SELECT EXISTS(SELECT 1 FROM backups WHERE id = ?1)",
                    [&id],
                    |r| r.get(0),
                )?;
                if !taken {
                    return Ok(id);
                }
                n += 1;
            }
        })
        .await
    }

    /// Replaces a running row with its completed form.
    pub async fn complete(&self, b: BackupRow) -> Result<(), CatalogError> {
        self.call(move |c| {
            let n = c.execute(
                "UPDATE backups SET status = 'completed', finished_at = ?2, duration_ms = ?3, raw_bytes = ?4,
                   stored_bytes = ?5, checksum = ?6, compression = ?7, encrypted = ?8, encryption_recipient = ?9,
                   format = ?10, object_key = ?11, meta_key = ?12, database = ?13, db_host = ?14,
                   server_version = ?15, pg_dump_version = ?16, tags = ?17, error = NULL
                 WHERE id = ?1 AND status = 'running'",
                params![
                    b.id,
                    b.finished_at,
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
                ],
            )?;
            if n == 1 {
                Ok(())
            } else {
                Err(CatalogError::Worker(format!("backup {} is no longer running", b.id)))
            }
        })
        .await
    }

    /// Marks a running backup failed; returns false if it was not running.
    /// A reason noted earlier (`note_error`, e.g. the upload's own error) is
    /// kept: it is the first and most precise one.
    pub async fn fail(
        &self,
        id: &str,
        error: &str,
        finished_at: String,
    ) -> Result<bool, CatalogError> {
        let (id, error) = (id.to_string(), error.to_string());
        self.call(move |c| {
            let n = c.execute(
                "UPDATE backups SET status = 'failed', error = COALESCE(error, ?2), finished_at = ?3
                 WHERE id = ?1 AND status = 'running'",
                params![id, error, finished_at],
            )?;
            Ok(n == 1)
        })
        .await
    }

    /// Marks a running backup interrupted (a planned agent stop); returns
    /// false if it was not running.
    pub async fn interrupt(
        &self,
        id: &str,
        reason: &str,
        finished_at: String,
    ) -> Result<bool, CatalogError> {
        let (id, reason) = (id.to_string(), reason.to_string());
        self.call(move |c| {
            let n = c.execute(
                "UPDATE backups SET status = 'interrupted', error = ?2, finished_at = ?3
                 WHERE id = ?1 AND status = 'running'",
                params![id, reason, finished_at],
            )?;
            Ok(n == 1)
        })
        .await
    }

    /// Remembers why a running backup went wrong without deciding its
    /// outcome (the job does that); the first reason noted wins.
    pub async fn note_error(&self, id: &str, error: &str) -> Result<(), CatalogError> {
        let (id, error) = (id.to_string(), error.to_string());
        self.call(move |c| {
            c.execute(
                "UPDATE backups SET error = ?2 WHERE id = ?1 AND status = 'running' AND error IS NULL",
                params![id, error],
            )?;
            Ok(())
        })
        .await
    }

    /// Counts a missed scheduled slot of `target`.
    pub async fn record_missed(&self, target: &str, at: String) -> Result<(), CatalogError> {
        let target = target.to_string();
        self.call(move |c| {
            // A target only the config file names has no row yet.
            c.execute(
                "INSERT INTO targets(name, agent, first_seen, last_seen) VALUES (?1, '', ?2, ?2)
                 ON CONFLICT(name) DO NOTHING",
                params![target, at],
            )?;
            c.execute(
                "UPDATE targets SET missed_slots = missed_slots + 1, last_missed_at = ?2 WHERE name = ?1",
                params![target, at],
            )?;
            Ok(())
        })
        .await
    }

    /// At start-up: nothing can still be running, so every running row is an
    /// interrupted attempt.
    pub async fn fail_all_running(
        &self,
        error: &str,
        finished_at: String,
    ) -> Result<usize, CatalogError> {
        let error = error.to_string();
        self.call(move |c| {
            Ok(c.execute(
                "UPDATE backups SET status = 'failed', error = ?1, finished_at = ?2 WHERE status = 'running'",
                params![error, finished_at],
            )?)
        })
        .await
    }

    /// Newest completed backup of `target` created at or before `at` (RFC 3339).
    pub async fn latest_completed(
        &self,
        target: &str,
        at: Option<String>,
    ) -> Result<Option<BackupRow>, CatalogError> {
        let target = target.to_string();
        self.call(move |c| {
            let sql = format!(
                "SELECT {COLUMNS} FROM backups WHERE target = ?1 AND status = 'completed'
                   AND (?2 IS NULL OR created_at <= ?2) ORDER BY created_at DESC, id DESC LIMIT 1"
            );
            Ok(c.query_row(&sql, params![target, at], row_to_backup)
                .optional()?)
        })
        .await
    }

    /// Completed backups of `target` older than `id`, newest first.
    pub async fn older_completed(
        &self,
        target: &str,
        id: &str,
    ) -> Result<Vec<BackupRow>, CatalogError> {
        let (target, id) = (target.to_string(), id.to_string());
        self.call(move |c| {
            let sql = format!(
                "SELECT {COLUMNS} FROM backups WHERE target = ?1 AND status = 'completed' AND id <> ?2
                   AND created_at <= (SELECT created_at FROM backups WHERE id = ?2)
                 ORDER BY created_at DESC, id DESC"
            );
            let mut st = c.prepare(&sql)?;
            let rows = st.query_map(params![target, id], row_to_backup)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    pub async fn set_verified(
        &self,
        id: &str,
        at: String,
        result: String,
    ) -> Result<(), CatalogError> {
        let id = id.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE backups SET verified_at = ?2, verify_result = ?3 WHERE id = ?1",
                params![id, at, result],
            )?;
            Ok(())
        })
        .await
    }

    /// Records the schedule and retention an agent asks for its target.
    pub async fn set_target_request(
        &self,
        target: &str,
        schedule: Option<String>,
        retention: Option<String>,
    ) -> Result<(), CatalogError> {
        let target = target.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE targets SET schedule = ?2, retention = ?3 WHERE name = ?1",
                params![target, schedule, retention],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn set_last_slot(&self, target: &str, slot: String) -> Result<(), CatalogError> {
        let target = target.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE targets SET last_slot = ?2 WHERE name = ?1",
                params![target, slot],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn targets(&self) -> Result<Vec<TargetRecord>, CatalogError> {
        self.call(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {TARGET_COLUMNS} FROM targets ORDER BY name"
            ))?;
            let rows = st.query_map([], row_to_target)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// One target's record, if the catalog knows it.
    pub async fn target(&self, name: &str) -> Result<Option<TargetRecord>, CatalogError> {
        let name = name.to_string();
        self.call(move |c| {
            Ok(c.query_row(
                &format!("SELECT {TARGET_COLUMNS} FROM targets WHERE name = ?1"),
                [name],
                row_to_target,
            )
            .optional()?)
        })
        .await
    }

    /// Every target that has a backup row (a target whose agent is gone
    /// still has backups to rotate).
    pub async fn backup_targets(&self) -> Result<Vec<String>, CatalogError> {
        self.call(|c| {
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
        self.call(move |c| {
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
        self.call(move |c| {
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
        self.call(move |c| {
            let n = c.execute(
                "UPDATE backups SET pinned = ?2 WHERE id = ?1 AND status <> 'deleting'",
                params![id, pinned],
            )?;
            Ok(n == 1)
        })
        .await
    }

    /// Open alerts, oldest first.
    pub async fn open_alerts(&self) -> Result<Vec<AlertRow>, CatalogError> {
        self.call(|c| {
            let mut st = c.prepare(
                "SELECT id, target, kind, message, backup_id, opened_at FROM alerts
                 WHERE resolved_at IS NULL ORDER BY id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(AlertRow {
                    id: r.get(0)?,
                    target: r.get(1)?,
                    kind: r.get(2)?,
                    message: r.get(3)?,
                    backup_id: r.get(4)?,
                    opened_at: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Opens an alert and queues its notifications in one transaction, so a
    /// crash can neither notify without the alert nor open it silently.
    pub async fn open_alert(
        &self,
        a: AlertRow,
        notify: Vec<(String, String)>,
    ) -> Result<(), CatalogError> {
        self.call(move |c| {
            let tx = c.unchecked_transaction()?;
            tx.execute(
                "INSERT INTO alerts(target, kind, message, backup_id, opened_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![a.target, a.kind, a.message, a.backup_id, a.opened_at],
            )?;
            queue(&tx, &notify, &a.opened_at)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Resolves an alert and queues its notifications, atomically.
    pub async fn resolve_alert(
        &self,
        id: i64,
        at: String,
        notify: Vec<(String, String)>,
    ) -> Result<(), CatalogError> {
        self.call(move |c| {
            let tx = c.unchecked_transaction()?;
            tx.execute(
                "UPDATE alerts SET resolved_at = ?2 WHERE id = ?1 AND resolved_at IS NULL",
                params![id, at],
            )?;
            queue(&tx, &notify, &at)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Deliveries due at `now` (RFC 3339), oldest first.
    pub async fn due_deliveries(&self, now: String) -> Result<Vec<Delivery>, CatalogError> {
        self.call(move |c| {
            let mut st = c.prepare(
                "SELECT id, url, body, attempts FROM deliveries
                 WHERE delivered_at IS NULL AND next_at <= ?1 ORDER BY id LIMIT 100",
            )?;
            let rows = st.query_map([now], |r| {
                Ok(Delivery {
                    id: r.get(0)?,
                    url: r.get(1)?,
                    body: r.get(2)?,
                    attempts: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// When the next undelivered notification is due.
    pub async fn next_delivery_at(&self) -> Result<Option<String>, CatalogError> {
        self.call(|c| {
            Ok(c.query_row(
                "SELECT min(next_at) FROM deliveries WHERE delivered_at IS NULL",
                [],
                |r| r.get(0),
            )?)
        })
        .await
    }

    pub async fn delivery_done(
        &self,
        id: i64,
        at: String,
        error: Option<String>,
        next_at: Option<String>,
    ) -> Result<(), CatalogError> {
        self.call(move |c| {
            match next_at {
                None if error.is_none() => c.execute(
                    "UPDATE deliveries SET delivered_at = ?2, attempts = attempts + 1, last_error = NULL WHERE id = ?1",
                    params![id, at],
                )?,
                None => c.execute(
                    // given up: kept, with the reason, for whoever looks
                    "UPDATE deliveries SET delivered_at = 'never', attempts = attempts + 1, last_error = ?2 WHERE id = ?1",
                    params![id, error],
                )?,
                Some(next) => c.execute(
                    "UPDATE deliveries SET attempts = attempts + 1, last_error = ?2, next_at = ?3 WHERE id = ?1",
                    params![id, error, next],
                )?,
            };
            Ok(())
        })
        .await
    }

    /// Binds `target` to `agent` on first sight. Returns the owning agent if
    /// another agent already owns it.
    pub async fn claim_target(
        &self,
        target: &str,
        agent: &str,
        now: String,
    ) -> Result<Option<String>, CatalogError> {
        let (target, agent) = (target.to_string(), agent.to_string());
        self.call(move |c| {
            let owner: Option<String> = c
                .query_row("SELECT agent FROM targets WHERE name = ?1", [&target], |r| r.get(0))
                .optional()?;
            match owner {
                // An empty owner: a target first known from the config file.
                Some(o) if !o.is_empty() && o != agent => Ok(Some(o)),
                Some(_) => {
                    c.execute(
                        "UPDATE targets SET agent = ?2, last_seen = ?3 WHERE name = ?1",
                        params![target, agent, now],
                    )?;
                    Ok(None)
                }
                None => {
                    c.execute(
                        "INSERT INTO targets(name, agent, first_seen, last_seen) VALUES (?1, ?2, ?3, ?3)",
                        params![target, agent, now],
                    )?;
                    Ok(None)
                }
            }
        })
        .await
    }
}

const TARGET_COLUMNS: &str =
    "name, agent, schedule, retention, last_slot, first_seen, missed_slots, last_missed_at";

fn row_to_target(r: &Row<'_>) -> rusqlite::Result<TargetRecord> {
    Ok(TargetRecord {
        name: r.get(0)?,
        agent: r.get(1)?,
        schedule: r.get(2)?,
        retention: r.get(3)?,
        last_slot: r.get(4)?,
        first_seen: r.get(5)?,
        missed_slots: r.get::<_, i64>(6)? as u64,
        last_missed_at: r.get(7)?,
    })
}

fn queue(c: &Connection, notify: &[(String, String)], at: &str) -> Result<(), CatalogError> {
    for (url, body) in notify {
        c.execute(
            "INSERT INTO deliveries(url, body, created_at, next_at) VALUES (?1, ?2, ?3, ?3)",
            params![url, body, at],
        )?;
    }
    Ok(())
}

fn migrate(c: &Connection) -> Result<(), CatalogError> {
    let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(CatalogError::TooNew {
            found: version,
            known,
        });
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = c.unchecked_transaction()?;
        tx.execute_batch(m)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

fn insert(c: &Connection, b: &BackupRow) -> Result<(), CatalogError> {
    c.execute(
        &format!("INSERT INTO backups ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28)"),
        params![
            b.id,
            b.target,
            b.kind,
            b.status,
            b.trigger,
            b.label,
            b.created_at,
            b.finished_at,
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
            b.verified_at,
            b.verify_result,
        ],
    )?;
    Ok(())
}

fn get(c: &Connection, id: &str) -> Result<Option<BackupRow>, CatalogError> {
    let sql = format!("SELECT {COLUMNS} FROM backups WHERE id = ?1");
    Ok(c.query_row(&sql, [id], row_to_backup).optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, target: &str, at: &str) -> BackupRow {
        BackupRow {
            id: id.into(),
            target: target.into(),
            kind: "logical".into(),
            status: status::RUNNING.into(),
            trigger: "manual".into(),
            created_at: at.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let cat = Catalog::open(&path).unwrap();
        cat.insert(row("a_1", "a", "2024-01-01T00:00:00Z"))
            .await
            .unwrap();
        cat.insert(row("a_2", "a", "2024-01-02T00:00:00Z"))
            .await
            .unwrap();
        cat.insert(row("b_1", "b", "2024-01-03T00:00:00Z"))
            .await
            .unwrap();
        assert_eq!(cat.unused_id("a_1".into()).await.unwrap(), "a_1_2");
        assert_eq!(cat.unused_id("a_9".into()).await.unwrap(), "a_9");

        let mut done = row("a_1", "a", "2024-01-01T00:00:00Z");
        done.checksum = "blake3:00".into();
        done.tags = vec!["manual".into()];
        cat.complete(done).await.unwrap();
        assert!(
            !cat.fail("a_1", "x", "t".into()).await.unwrap(),
            "completed rows cannot fail"
        );
        assert_eq!(
            cat.fail_all_running("interrupted", "t".into())
                .await
                .unwrap(),
            2
        );

        let got = cat.get("a_1").await.unwrap().unwrap();
        assert_eq!(got.status, "completed");
        assert_eq!(got.tags, vec!["manual"]);
        assert_eq!(cat.get("a_2").await.unwrap().unwrap().status, "failed");
        assert_eq!(cat.list(Some("a".into())).await.unwrap().len(), 2);
        assert_eq!(cat.list(None).await.unwrap()[0].id, "b_1");
        let latest = cat.latest_completed("a", None).await.unwrap().unwrap();
        assert_eq!(latest.id, "a_1");
        assert!(cat
            .latest_completed("a", Some("2023-12-31T00:00:00Z".into()))
            .await
            .unwrap()
            .is_none());

        assert_eq!(
            cat.claim_target("a", "agent1", "t".into()).await.unwrap(),
            None
        );
        assert_eq!(
            cat.claim_target("a", "agent1", "t".into()).await.unwrap(),
            None
        );
        assert_eq!(
            cat.claim_target("a", "evil", "t".into())
                .await
                .unwrap()
                .as_deref(),
            Some("agent1")
        );

        // reopening keeps everything and does not re-run migrations
        drop(cat);
        let cat = Catalog::open(&path).unwrap();
        assert_eq!(cat.list(None).await.unwrap().len(), 3);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
