//! The SQLite catalog: one connection (WAL, owner-only file, every call on
//! tokio's blocking pool) and the migration runner. The tables, their SQL and
//! their migrations belong to the stores on this connection:
//! `repo::store` (backups), `targets` (targets and scheduler progress) and
//! `alerts::store` (alert state and the webhook outbox).
//!
//! Migrations are one ordered sequence tracked by `PRAGMA user_version`; each
//! store lists its own steps as `(version, SQL)` and [`plan`] merges them by
//! version, refusing gaps and duplicates.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

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
    #[error("catalog migrations are inconsistent (a bug in this build): {0}")]
    Migrations(String),
}

/// One store's migrations: `(version, SQL)`, in version order.
pub(crate) type Migrations = &'static [(u32, &'static str)];

/// Every store on the catalog and its migrations. A store that owns tables
/// is listed here; the order is the order of the parts of a shared version.
const OWNERS: &[(&str, Migrations)] = &[
    ("repo::store", crate::repo::store::MIGRATIONS),
    ("targets", crate::targets::MIGRATIONS),
    ("alerts::store", crate::alerts::store::MIGRATIONS),
    ("tokens", crate::tokens::MIGRATIONS),
    ("wal::index", crate::wal::index::MIGRATIONS),
];

/// Version 1 predates the split into stores: it created `backups` and
/// `targets` in one step. It stays one version, made of one part from each
/// of those two owners, applied together (in [`OWNERS`] order) in one
/// transaction, so a file at `user_version` 1 still has both tables. It is
/// the only version that may have parts from more than one owner: every
/// later version belongs to exactly one store, and two stores claiming the
/// same version (say, added on two branches) is refused rather than merged.
const SHARED_BASELINE: u32 = 1;

/// One step of the merged sequence: its version and its parts, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    pub version: u32,
    pub parts: Vec<&'static str>,
}

/// Merges the owners' migrations into one sequence by version. The versions
/// must be exactly `1..=N`: no gap, and no version claimed twice (other than
/// [`SHARED_BASELINE`], once per owner).
pub(crate) fn plan(owners: &[(&str, Migrations)]) -> Result<Vec<Step>, String> {
    let mut claims: std::collections::BTreeMap<u32, Vec<(&str, &'static str)>> =
        std::collections::BTreeMap::new();
    for (owner, migrations) in owners {
        for (version, sql) in migrations.iter() {
            let parts = claims.entry(*version).or_default();
            if let Some((other, _)) = parts
                .iter()
                .find(|(o, _)| *version != SHARED_BASELINE || o == owner)
            {
                return Err(format!(
                    "version {version} is claimed by both {other} and {owner}"
                ));
            }
            parts.push((owner, sql));
        }
    }
    let mut steps = Vec::with_capacity(claims.len());
    for (expected, (version, parts)) in (1u32..).zip(claims) {
        if version != expected {
            return Err(format!(
                "version {expected} is missing (the next one is {version})"
            ));
        }
        steps.push(Step {
            version,
            parts: parts.into_iter().map(|(_, sql)| sql).collect(),
        });
    }
    Ok(steps)
}

/// The connection every store shares.
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
        let steps = plan(OWNERS).map_err(CatalogError::Migrations)?;
        migrate(&conn, &steps)?;
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
}

/// Applies the steps after the file's `user_version`, each (all its parts)
/// in one transaction with its version.
fn migrate(c: &Connection, steps: &[Step]) -> Result<(), CatalogError> {
    let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = steps.last().map_or(0, |s| i64::from(s.version));
    if version > known {
        return Err(CatalogError::TooNew {
            found: version,
            known,
        });
    }
    for step in steps.iter().filter(|s| i64::from(s.version) > version) {
        let tx = c.unchecked_transaction()?;
        for sql in &step.parts {
            tx.execute_batch(sql)?;
        }
        tx.pragma_update(None, "user_version", i64::from(step.version))?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The migrations exactly as the catalog ran them before the stores were
    /// split out (files in the field are at version 4 of this).
    const BEFORE_SPLIT: &[&str] = &[
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

    fn squash(sql: &str) -> String {
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// A catalog file as the code before the split left it at `version`.
    fn before_split(path: &Path, version: usize) -> Connection {
        let c = Connection::open(path).unwrap();
        for (i, sql) in BEFORE_SPLIT.iter().enumerate().take(version) {
            let tx = c.unchecked_transaction().unwrap();
            tx.execute_batch(sql).unwrap();
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .unwrap();
            tx.commit().unwrap();
        }
        c
    }

    /// Every table and index with its SQL (whitespace squashed).
    fn schema(c: &Connection) -> Vec<(String, String, Option<String>)> {
        let mut st = c
            .prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
            .unwrap();
        st.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get::<_, Option<String>>(2)?.map(|s| squash(&s)),
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    fn user_version(c: &Connection) -> i64 {
        c.query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn the_stores_migrations_merge_into_the_previous_sequence() {
        let steps = plan(OWNERS).unwrap();
        assert_eq!(
            steps.iter().map(|s| s.version).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
        );
        assert_eq!(steps[0].parts.len(), 2, "version 1: backups, then targets");
        for (step, before) in steps.iter().zip(BEFORE_SPLIT) {
            let merged: Vec<String> = step.parts.iter().map(|p| squash(p)).collect();
            assert_eq!(merged.join(" "), squash(before), "version {}", step.version);
        }
    }

    #[test]
    fn the_plan_refuses_gaps_and_duplicates() {
        let ok = plan(&[
            ("a", &[(1, "a1"), (2, "a2")]),
            ("b", &[(1, "b1"), (3, "b3")]),
        ])
        .unwrap();
        assert_eq!(
            ok,
            vec![
                Step {
                    version: 1,
                    parts: vec!["a1", "b1"]
                },
                Step {
                    version: 2,
                    parts: vec!["a2"]
                },
                Step {
                    version: 3,
                    parts: vec!["b3"]
                },
            ]
        );
        assert_eq!(plan(&[]).unwrap(), vec![]);

        let err = |owners: &[(&str, Migrations)]| plan(owners).unwrap_err();
        assert!(err(&[("a", &[(1, "x"), (3, "y")])]).contains("version 2 is missing"));
        assert!(err(&[("a", &[(2, "x")])]).contains("version 1 is missing"));
        assert!(err(&[("a", &[(1, "x"), (2, "y")]), ("b", &[(2, "z")])])
            .contains("version 2 is claimed by both a and b"));
        assert!(err(&[("a", &[(1, "x"), (2, "y"), (2, "z")])]).contains("version 2"));
        assert!(err(&[("a", &[(1, "x"), (1, "y")])]).contains("version 1"));
    }

    #[tokio::test]
    async fn files_written_before_the_split_open_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("fresh.db");
        drop(Catalog::open(&fresh).unwrap());
        let fresh = schema(&Connection::open(&fresh).unwrap());

        for version in 0..=BEFORE_SPLIT.len() {
            let path = dir.path().join(format!("v{version}.db"));
            drop(before_split(&path, version));
            drop(Catalog::open(&path).unwrap());
            let c = Connection::open(&path).unwrap();
            assert_eq!(user_version(&c), 20, "from version {version}");
            assert_eq!(schema(&c), fresh, "from version {version}");
        }

        // A file in use at version 4 keeps every row, readable by its store.
        let path = dir.path().join("in-use.db");
        let old = before_split(&path, 4);
        old.execute_batch(
            "INSERT INTO backups(id, target, kind, status, trigger, created_at)
                 VALUES ('app_1', 'app', 'logical', 'completed', 'scheduled', '2024-01-01T00:00:00Z');
             INSERT INTO targets(name, agent, first_seen, last_seen, schedule, last_slot, missed_slots)
                 VALUES ('app', 'agent1', 't0', 't1', '@daily', '2024-01-01T00:00:00Z', 2);
             INSERT INTO alerts(target, kind, message, opened_at)
                 VALUES ('app', 'backup.failed', 'it failed', 't2');
             INSERT INTO deliveries(url, body, created_at, next_at)
                 VALUES ('http://hook', '{}', 't2', 't2');",
        )
        .unwrap();
        drop(old);
        let db = Catalog::open(&path).unwrap();
        let b = crate::repo::store::BackupStore::new(db.clone())
            .get("app_1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (b.target.as_str(), b.status),
            ("app", crate::repo::Status::Completed)
        );
        let t = crate::targets::TargetStore::new(db.clone())
            .get("app")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (t.agent.as_str(), t.schedule.as_deref(), t.missed_slots),
            ("agent1", Some("@daily"), 2)
        );
        let alerts = crate::alerts::store::AlertStore::new(db);
        assert_eq!(alerts.open_alerts().await.unwrap()[0].message, "it failed");
        assert_eq!(alerts.due_deliveries("t9".into()).await.unwrap().len(), 1);
    }

    #[test]
    fn a_newer_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let c = before_split(&path, 4);
        c.pragma_update(None, "user_version", 21).unwrap();
        drop(c);
        assert!(matches!(
            Catalog::open(&path),
            Err(CatalogError::TooNew {
                found: 21,
                known: 20
            })
        ));
    }

    #[tokio::test]
    async fn the_file_is_private_and_reopening_runs_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        drop(Catalog::open(&path).unwrap());
        // a second open would fail on "table exists" if it re-ran a step
        let db = Catalog::open(&path).unwrap();
        let mode: String = db
            .call(|c| Ok(c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
