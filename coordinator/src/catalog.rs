//! The SQLite catalog: the connection and its migrations, which agent owns
//! which target (with the scheduler's progress), alert state and the webhook
//! outbox. The backup table is the repository's (`repo::store`): an index
//! rebuildable from the `.meta.json` files in storage. All calls run on
//! tokio's blocking pool; the connection is in WAL mode and migrated by
//! `PRAGMA user_version`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Row};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn targets_are_claimed_once_and_the_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let cat = Catalog::open(&path).unwrap();
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
        // a target only the config file named (no owner yet) is claimable
        cat.record_missed("cfg", "t".into()).await.unwrap();
        assert_eq!(
            cat.claim_target("cfg", "agent2", "t".into()).await.unwrap(),
            None
        );
        assert_eq!(cat.target("cfg").await.unwrap().unwrap().missed_slots, 1);

        // reopening keeps everything and does not re-run migrations
        drop(cat);
        let cat = Catalog::open(&path).unwrap();
        assert_eq!(cat.targets().await.unwrap().len(), 2);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
