//! The catalog's alert state and webhook outbox: the `alerts` table (at most
//! one open row per target and kind, so a restart neither repeats nor
//! forgets an alert) and the `deliveries` table (notifications queued in the
//! same transaction as the change they announce, sent and retried by
//! `webhook`).

use rusqlite::{params, Connection};

use crate::catalog::{Catalog, CatalogError};

/// The alert tables' migrations (see `catalog::plan`).
pub(crate) const MIGRATIONS: &[(u32, &str)] = &[
    // 3: alert state (one open row per target and kind) and the webhook outbox
    (
        3,
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
    ),
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

/// The alert and delivery tables, on the catalog's connection.
#[derive(Clone)]
pub struct AlertStore {
    db: Catalog,
}

impl AlertStore {
    pub fn new(db: Catalog) -> Self {
        Self { db }
    }

    /// Open alerts, oldest first.
    pub async fn open_alerts(&self) -> Result<Vec<AlertRow>, CatalogError> {
        self.db
            .call(|c| {
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

    /// Opens an alert and queues its notifications (`(url, body)`) in one
    /// transaction, so a crash can neither notify without the alert nor open
    /// it silently. Fails, queueing nothing, if the same target and kind
    /// already has an open alert.
    pub async fn open_alert(
        &self,
        a: AlertRow,
        notify: Vec<(String, String)>,
    ) -> Result<(), CatalogError> {
        self.db
            .call(move |c| {
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
        self.db
            .call(move |c| {
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

    /// Deliveries due at `now` (RFC 3339), oldest first, at most 100.
    pub async fn due_deliveries(&self, now: String) -> Result<Vec<Delivery>, CatalogError> {
        self.db
            .call(move |c| {
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
        self.db
            .call(|c| {
                Ok(c.query_row(
                    "SELECT min(next_at) FROM deliveries WHERE delivered_at IS NULL",
                    [],
                    |r| r.get(0),
                )?)
            })
            .await
    }

    /// Records an attempt: delivered (no error, no `next_at`), to be retried
    /// at `next_at`, or given up (an error and no `next_at`).
    pub async fn delivery_done(
        &self,
        id: i64,
        at: String,
        error: Option<String>,
        next_at: Option<String>,
    ) -> Result<(), CatalogError> {
        self.db
            .call(move |c| {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> AlertStore {
        AlertStore::new(Catalog::open(path).unwrap())
    }

    fn alert(target: &str, kind: &str, at: &str) -> AlertRow {
        AlertRow {
            id: 0,
            target: target.into(),
            kind: kind.into(),
            message: format!("{kind} on {target}"),
            backup_id: Some(format!("{target}_1")),
            opened_at: at.into(),
        }
    }

    fn hook(body: &str) -> Vec<(String, String)> {
        vec![("http://hook/a".into(), body.into())]
    }

    /// (delivered_at, attempts, last_error, next_at) of a delivery.
    async fn row(store: &AlertStore, id: i64) -> (Option<String>, u32, Option<String>, String) {
        store
            .db
            .call(move |c| {
                Ok(c.query_row(
                    "SELECT delivered_at, attempts, last_error, next_at FROM deliveries WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )?)
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn one_open_alert_per_target_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let store = open(&path);
        let t1 = "2024-01-01T00:00:00.000Z";
        store
            .open_alert(alert("a", "backup.failed", t1), hook("opened"))
            .await
            .unwrap();
        store
            .open_alert(alert("a", "backup.overdue", t1), vec![])
            .await
            .unwrap();
        store
            .open_alert(alert("b", "backup.failed", t1), vec![])
            .await
            .unwrap();
        // the same target and kind again: refused, and nothing is queued
        assert!(store
            .open_alert(alert("a", "backup.failed", t1), hook("twice"))
            .await
            .is_err());
        let due = store.due_deliveries(t1.into()).await.unwrap();
        assert_eq!(
            due.iter().map(|d| d.body.as_str()).collect::<Vec<_>>(),
            ["opened"]
        );

        let open_now = store.open_alerts().await.unwrap();
        assert_eq!(
            open_now
                .iter()
                .map(|a| (a.target.as_str(), a.kind.as_str()))
                .collect::<Vec<_>>(),
            [
                ("a", "backup.failed"),
                ("a", "backup.overdue"),
                ("b", "backup.failed")
            ]
        );
        let first = open_now[0].clone();
        assert_eq!(
            first,
            AlertRow {
                id: first.id,
                ..alert("a", "backup.failed", t1)
            }
        );

        // Resolved once (a second resolve changes nothing), then the same
        // kind may open again.
        let t2 = "2024-01-02T00:00:00.000Z";
        store
            .resolve_alert(first.id, t2.into(), hook("resolved"))
            .await
            .unwrap();
        store
            .resolve_alert(first.id, "2024-01-03T00:00:00.000Z".into(), vec![])
            .await
            .unwrap();
        let resolved_at: String = store
            .db
            .call(move |c| {
                Ok(c.query_row(
                    "SELECT resolved_at FROM alerts WHERE id = ?1",
                    [first.id],
                    |r| r.get(0),
                )?)
            })
            .await
            .unwrap();
        assert_eq!(resolved_at, t2);
        assert_eq!(store.open_alerts().await.unwrap().len(), 2);
        store
            .open_alert(alert("a", "backup.failed", t2), vec![])
            .await
            .unwrap();

        // what is open survives a reopen
        drop(store);
        let store = open(&path);
        let open_now = store.open_alerts().await.unwrap();
        assert_eq!(open_now.len(), 3);
        assert_eq!(open_now[2].opened_at, t2);
        assert_eq!(store.due_deliveries(t2.into()).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn the_outbox_sends_when_due_retries_and_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("catalog.db"));
        assert_eq!(store.next_delivery_at().await.unwrap(), None);
        assert!(store.due_deliveries("9".into()).await.unwrap().is_empty());

        let (t1, t2) = ("2024-01-01T00:00:00.000Z", "2024-01-01T00:00:05.000Z");
        store
            .open_alert(
                alert("a", "backup.failed", t1),
                vec![
                    ("http://hook/a".into(), "one".into()),
                    ("http://hook/b".into(), "two".into()),
                ],
            )
            .await
            .unwrap();
        store
            .open_alert(alert("b", "backup.failed", t2), hook("three"))
            .await
            .unwrap();
        assert_eq!(store.next_delivery_at().await.unwrap().as_deref(), Some(t1));
        let due = store.due_deliveries(t1.into()).await.unwrap();
        assert_eq!(
            due.iter()
                .map(|d| (d.url.as_str(), d.body.as_str(), d.attempts))
                .collect::<Vec<_>>(),
            [("http://hook/a", "one", 0), ("http://hook/b", "two", 0)],
            "only what is due, oldest first"
        );
        let (one, two) = (due[0].id, due[1].id);

        // delivered: done for good
        store
            .delivery_done(one, t2.into(), None, None)
            .await
            .unwrap();
        assert_eq!(
            row(&store, one).await,
            (Some(t2.into()), 1, None, t1.into())
        );

        // failed: retried later, counting attempts
        let t3 = "2024-01-01T00:01:00.000Z";
        store
            .delivery_done(two, t2.into(), Some("HTTP 500".into()), Some(t3.into()))
            .await
            .unwrap();
        let due = store.due_deliveries(t2.into()).await.unwrap();
        assert_eq!(
            due.iter().map(|d| d.body.as_str()).collect::<Vec<_>>(),
            ["three"]
        );
        let three = due[0].id;
        store
            .delivery_done(three, t2.into(), None, None)
            .await
            .unwrap();
        assert_eq!(store.next_delivery_at().await.unwrap().as_deref(), Some(t3));
        let due = store.due_deliveries(t3.into()).await.unwrap();
        assert_eq!((due[0].id, due[0].attempts), (two, 1));
        assert_eq!(
            row(&store, two).await,
            (None, 1, Some("HTTP 500".into()), t3.into())
        );

        // given up: kept with its reason, never due again
        store
            .delivery_done(two, t3.into(), Some("no answer".into()), None)
            .await
            .unwrap();
        assert_eq!(
            row(&store, two).await,
            (Some("never".into()), 2, Some("no answer".into()), t3.into())
        );
        assert!(store.due_deliveries("9".into()).await.unwrap().is_empty());
        assert_eq!(store.next_delivery_at().await.unwrap(), None);
    }
}
