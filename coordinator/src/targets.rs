//! The catalog's `targets` table: which agent owns which target, what its
//! agent asked for (schedule, retention), the scheduler's progress (the last
//! slot acted on) and the slots it missed. Kept between restarts, so a target
//! stays bound to its agent and scheduled while that agent is away.

use rusqlite::{params, OptionalExtension, Row};

use crate::catalog::{Catalog, CatalogError};

/// The targets table's migrations (see `catalog::plan`). Version 1 is shared
/// with `repo::store`: both tables were created in one step before the
/// stores were split.
pub(crate) const MIGRATIONS: &[(u32, &str)] = &[
    // 1: target ownership
    (
        1,
        "CREATE TABLE targets (
        name TEXT PRIMARY KEY,
        agent TEXT NOT NULL,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL
    );",
    ),
    // 2: what agents ask for, and the scheduler's progress
    (
        2,
        "ALTER TABLE targets ADD COLUMN schedule TEXT;
    ALTER TABLE targets ADD COLUMN retention TEXT;
    ALTER TABLE targets ADD COLUMN last_slot TEXT;",
    ),
    // 4: missed scheduled slots (the schedule.missed alert survives a restart)
    (
        4,
        "ALTER TABLE targets ADD COLUMN missed_slots INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE targets ADD COLUMN last_missed_at TEXT;",
    ),
    // 5: the owning agent's certificate expiry, as last seen (`dsctl targets`)
    (5, "ALTER TABLE targets ADD COLUMN agent_cert_expires TEXT;"),
    // 10: the server behind the target (system_identifier) and an
    // unconfirmed change of it: "old new backup_id"
    (
        10,
        "ALTER TABLE targets ADD COLUMN system_identifier TEXT;
    ALTER TABLE targets ADD COLUMN server_change TEXT;",
    ),
    // 15: the restore-drill schedule the agent asks for
    (15, "ALTER TABLE targets ADD COLUMN drill_schedule TEXT;"),
    // 19: the base-backup schedule the agent asks for
    (19, "ALTER TABLE targets ADD COLUMN base_schedule TEXT;"),
];

/// What the catalog remembers about a target between restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetRecord {
    pub name: String,
    /// The owning agent; empty for a target only the config file names.
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
    /// The owner's last contact (RFC 3339): its last registration.
    pub last_seen: String,
    /// The owner's certificate expiry as last seen (RFC 3339).
    pub agent_cert_expires: Option<String>,
    /// The `system_identifier` of the server its last backup came from.
    pub system_identifier: Option<String>,
    /// A change of server not confirmed yet: "old new backup_id".
    pub server_change: Option<String>,
    /// The restore-drill schedule the agent asked for.
    pub drill_schedule: Option<String>,
    /// The base-backup schedule the agent asked for.
    pub base_schedule: Option<String>,
}

impl TargetRecord {
    /// The unconfirmed change of server, if any.
    pub fn server_change(&self) -> Option<crate::alerts::rules::ServerChange> {
        let mut parts = self.server_change.as_deref()?.split(' ');
        let (old, new, backup_id) = (parts.next()?, parts.next()?, parts.next()?);
        Some(crate::alerts::rules::ServerChange {
            old: old.into(),
            new: new.into(),
            backup_id: backup_id.into(),
        })
    }
}

const COLUMNS: &str = "name, agent, schedule, retention, last_slot, first_seen, missed_slots, \
     last_missed_at, last_seen, agent_cert_expires, system_identifier, server_change, drill_schedule, \
     base_schedule";

fn from_row(r: &Row<'_>) -> rusqlite::Result<TargetRecord> {
    Ok(TargetRecord {
        name: r.get(0)?,
        agent: r.get(1)?,
        schedule: r.get(2)?,
        retention: r.get(3)?,
        last_slot: r.get(4)?,
        first_seen: r.get(5)?,
        missed_slots: r.get::<_, i64>(6)? as u64,
        last_missed_at: r.get(7)?,
        last_seen: r.get(8)?,
        agent_cert_expires: r.get(9)?,
        system_identifier: r.get(10)?,
        server_change: r.get(11)?,
        drill_schedule: r.get(12)?,
        base_schedule: r.get(13)?,
    })
}

/// The targets table, on the catalog's connection.
#[derive(Clone)]
pub struct TargetStore {
    db: Catalog,
}

impl TargetStore {
    pub fn new(db: Catalog) -> Self {
        Self { db }
    }

    /// Binds `target` to `agent` on first sight. Returns the owning agent if
    /// another agent already owns it.
    pub async fn claim(
        &self,
        target: &str,
        agent: &str,
        now: String,
    ) -> Result<Option<String>, CatalogError> {
        let (target, agent) = (target.to_string(), agent.to_string());
        self.db
            .call(move |c| {
                let owner: Option<String> = c
                    .query_row("SELECT agent FROM targets WHERE name = ?1", [&target], |r| {
                        r.get(0)
                    })
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

    /// Moves `target` from agent `from` to agent `to`; false when `from` no
    /// longer owns it (another agent took it over first).
    pub async fn transfer(
        &self,
        target: &str,
        from: &str,
        to: &str,
        now: String,
    ) -> Result<bool, CatalogError> {
        let (target, from, to) = (target.to_string(), from.to_string(), to.to_string());
        self.db
            .call(move |c| {
                let n = c.execute(
                    "UPDATE targets SET agent = ?3, last_seen = ?4 WHERE name = ?1 AND agent = ?2",
                    params![target, from, to, now],
                )?;
                Ok(n == 1)
            })
            .await
    }

    /// Records `agent` as the owner of each target that has no row yet (a
    /// rebuilt catalog: ownership comes back from the backups' meta files).
    pub async fn adopt_owners(
        &self,
        owners: Vec<(String, String, String)>,
    ) -> Result<usize, CatalogError> {
        self.db
            .call(move |c| {
                let mut n = 0;
                for (target, agent, seen) in owners {
                    n += c.execute(
                        "INSERT INTO targets(name, agent, first_seen, last_seen) VALUES (?1, ?2, ?3, ?3)
                         ON CONFLICT(name) DO UPDATE SET agent = excluded.agent WHERE targets.agent = ''",
                        params![target, agent, seen],
                    )?;
                }
                Ok(n)
            })
            .await
    }

    /// Records the server backup `backup_id` of `target` came from. A new
    /// identifier opens a change ("old new backup_id"); the next backup of
    /// the same server confirms it and clears the change.
    pub async fn note_server(
        &self,
        target: &str,
        system_identifier: &str,
        backup_id: &str,
    ) -> Result<(), CatalogError> {
        let (target, sys, id) = (
            target.to_string(),
            system_identifier.to_string(),
            backup_id.to_string(),
        );
        if sys.is_empty() || sys.contains(' ') {
            return Ok(());
        }
        self.db
            .call(move |c| {
                let known: Option<(Option<String>, Option<String>)> = c
                    .query_row(
                        "SELECT system_identifier, server_change FROM targets WHERE name = ?1",
                        [&target],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let Some((old, change)) = known else {
                    return Ok(());
                };
                let change = match old {
                    Some(old) if !old.is_empty() && old != sys => Some(format!("{old} {sys} {id}")),
                    // The same server again: a pending change is confirmed.
                    _ => change.filter(|c| c.ends_with(&format!(" {id}"))),
                };
                c.execute(
                    "UPDATE targets SET system_identifier = ?2, server_change = ?3 WHERE name = ?1",
                    params![target, sys, change],
                )?;
                Ok(())
            })
            .await
    }

    /// Records the owning agent's certificate expiry, seen as it registered.
    pub async fn note_certificate(
        &self,
        target: &str,
        expires: String,
    ) -> Result<(), CatalogError> {
        let target = target.to_string();
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE targets SET agent_cert_expires = ?2 WHERE name = ?1",
                    params![target, expires],
                )?;
                Ok(())
            })
            .await
    }

    /// Records the schedules (backups, drills) and retention an agent asks
    /// for its target.
    pub async fn set_request(
        &self,
        target: &str,
        schedule: Option<String>,
        retention: Option<String>,
        drill_schedule: Option<String>,
        base_schedule: Option<String>,
    ) -> Result<(), CatalogError> {
        let target = target.to_string();
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE targets SET schedule = ?2, retention = ?3, drill_schedule = ?4, base_schedule = ?5 WHERE name = ?1",
                    params![target, schedule, retention, drill_schedule, base_schedule],
                )?;
                Ok(())
            })
            .await
    }

    /// Records the last cron slot the scheduler acted on.
    pub async fn set_last_slot(&self, target: &str, slot: String) -> Result<(), CatalogError> {
        let target = target.to_string();
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE targets SET last_slot = ?2 WHERE name = ?1",
                    params![target, slot],
                )?;
                Ok(())
            })
            .await
    }

    /// Counts a missed scheduled slot of `target`.
    pub async fn record_missed(&self, target: &str, at: String) -> Result<(), CatalogError> {
        let target = target.to_string();
        self.db
            .call(move |c| {
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

    /// Every target the catalog knows, by name.
    pub async fn list(&self) -> Result<Vec<TargetRecord>, CatalogError> {
        self.db
            .call(|c| {
                let mut st = c.prepare(&format!("SELECT {COLUMNS} FROM targets ORDER BY name"))?;
                let rows = st.query_map([], from_row)?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// One target's record, if the catalog knows it.
    pub async fn get(&self, name: &str) -> Result<Option<TargetRecord>, CatalogError> {
        let name = name.to_string();
        self.db
            .call(move |c| {
                Ok(c.query_row(
                    &format!("SELECT {COLUMNS} FROM targets WHERE name = ?1"),
                    [name],
                    from_row,
                )
                .optional()?)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> TargetStore {
        TargetStore::new(Catalog::open(path).unwrap())
    }

    #[tokio::test]
    async fn a_target_belongs_to_the_first_agent_that_claims_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("catalog.db"));
        assert_eq!(store.claim("a", "agent1", "t1".into()).await.unwrap(), None);
        // the owner again: accepted, and seen later
        assert_eq!(store.claim("a", "agent1", "t2".into()).await.unwrap(), None);
        assert_eq!(
            store
                .claim("a", "evil", "t3".into())
                .await
                .unwrap()
                .as_deref(),
            Some("agent1")
        );
        let a = store.get("a").await.unwrap().unwrap();
        assert_eq!((a.agent.as_str(), a.first_seen.as_str()), ("agent1", "t1"));
        assert_eq!(store.get("nope").await.unwrap(), None);

        // A target only the config file named (a missed slot gave it a row
        // without an owner) goes to the first agent that claims it.
        store.record_missed("cfg", "t4".into()).await.unwrap();
        assert_eq!(store.get("cfg").await.unwrap().unwrap().agent, "");
        assert_eq!(
            store.claim("cfg", "agent2", "t5".into()).await.unwrap(),
            None
        );
        assert_eq!(
            store
                .claim("cfg", "agent1", "t6".into())
                .await
                .unwrap()
                .as_deref(),
            Some("agent2")
        );
        let cfg = store.get("cfg").await.unwrap().unwrap();
        assert_eq!(
            (cfg.agent.as_str(), cfg.first_seen.as_str()),
            ("agent2", "t4")
        );
        assert_eq!(cfg.missed_slots, 1, "claiming keeps the count");
    }

    #[tokio::test]
    async fn requests_progress_and_missed_slots_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let store = open(&path);
        store.claim("b", "agent1", "t0".into()).await.unwrap();
        store.claim("a", "agent1", "t0".into()).await.unwrap();
        store
            .set_request(
                "a",
                Some("0 3 * * *".into()),
                Some("{\"daily\":7}".into()),
                None,
                None,
            )
            .await
            .unwrap();
        store
            .set_last_slot("a", "2024-01-01T03:00:00Z".into())
            .await
            .unwrap();
        store
            .set_last_slot("a", "2024-01-02T03:00:00Z".into())
            .await
            .unwrap();
        // what the store does not know is not invented
        store
            .set_request("ghost", Some("@daily".into()), None, None, None)
            .await
            .unwrap();
        store.set_last_slot("ghost", "x".into()).await.unwrap();
        assert_eq!(store.get("ghost").await.unwrap(), None);

        // Missed slots are a running total with the time of the last one;
        // nothing here resets them (the alert clears on the next success).
        store
            .record_missed("a", "2024-01-03T03:00:01.000Z".into())
            .await
            .unwrap();
        store
            .record_missed("a", "2024-01-04T03:00:01.000Z".into())
            .await
            .unwrap();
        store
            .set_request(
                "a",
                Some("0 3 * * *".into()),
                None,
                Some("0 5 * * 0".into()),
                Some("0 4 * * 6".into()),
            )
            .await
            .unwrap();
        store.claim("a", "agent1", "t9".into()).await.unwrap();
        store
            .note_certificate("a", "2027-01-01T00:00:00Z".into())
            .await
            .unwrap();
        // a transfer only from the owner it expects
        assert!(!store
            .transfer("a", "agent9", "agent2", "t10".into())
            .await
            .unwrap());
        // owners from meta files fill only what has no owner
        assert_eq!(
            store
                .adopt_owners(vec![
                    ("a".into(), "agent7".into(), "t1".into()),
                    ("c".into(), "agent7".into(), "t1".into()),
                ])
                .await
                .unwrap(),
            1
        );
        assert_eq!(store.get("c").await.unwrap().unwrap().agent, "agent7");

        drop(store);
        let store = open(&path);
        let all = store.list().await.unwrap();
        assert_eq!(
            all.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(
            all[0],
            TargetRecord {
                name: "a".into(),
                agent: "agent1".into(),
                schedule: Some("0 3 * * *".into()),
                retention: None,
                last_slot: Some("2024-01-02T03:00:00Z".into()),
                first_seen: "t0".into(),
                missed_slots: 2,
                last_missed_at: Some("2024-01-04T03:00:01.000Z".into()),
                last_seen: "t9".into(),
                agent_cert_expires: Some("2027-01-01T00:00:00Z".into()),
                system_identifier: None,
                server_change: None,
                drill_schedule: Some("0 5 * * 0".into()),
                base_schedule: Some("0 4 * * 6".into()),
            }
        );
        assert_eq!(
            all[1],
            TargetRecord {
                name: "b".into(),
                agent: "agent1".into(),
                first_seen: "t0".into(),
                last_seen: "t0".into(),
                ..Default::default()
            }
        );
    }

    #[tokio::test]
    async fn a_new_server_is_a_change_until_its_second_backup() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("catalog.db"));
        store.claim("a", "agent1", "t0".into()).await.unwrap();
        let change = |store: TargetStore| async move {
            store.get("a").await.unwrap().unwrap().server_change()
        };
        store.note_server("a", "7001", "a_1").await.unwrap();
        store.note_server("a", "7001", "a_2").await.unwrap();
        assert_eq!(change(store.clone()).await, None, "same server");
        store.note_server("a", "7002", "a_3").await.unwrap();
        assert_eq!(
            change(store.clone()).await,
            Some(crate::alerts::rules::ServerChange {
                old: "7001".into(),
                new: "7002".into(),
                backup_id: "a_3".into(),
            })
        );
        // Unknown identifiers (a role that may not read it) change nothing.
        store.note_server("a", "", "a_4").await.unwrap();
        assert!(change(store.clone()).await.is_some());
        // The second backup of the new server confirms it.
        store.note_server("a", "7002", "a_5").await.unwrap();
        assert_eq!(change(store.clone()).await, None);
        assert_eq!(
            store
                .get("a")
                .await
                .unwrap()
                .unwrap()
                .system_identifier
                .as_deref(),
            Some("7002")
        );
    }
}
