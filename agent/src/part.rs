//! Taking back a part of a backup (`--table`, `--schema`): "someone dropped
//! the orders table". pg_restore's own `--table` leaves out a table's
//! indexes, constraints and triggers, so the whole archive is restored into a
//! scratch database on the same server first; there the selection is checked
//! and `pg_dump --table/--schema` of it (which brings each table's indexes,
//! constraints, triggers, grants and comments) is piped into one `psql`
//! transaction on the destination. The scratch database is dropped whatever
//! happens. Into an existing database (`--into-existing`) nothing is changed
//! when any restored object already exists there; into a new database,
//! foreign keys to tables that are not restored are left out and named.

use std::sync::Arc;

use datasaver_common::proto::agent_service_client::AgentServiceClient;
use datasaver_common::proto::RestoreJob;
use tonic::transport::Channel;

use crate::config::DbConn;
use crate::jobs::{JobCancel, JobError};
use crate::pg::{quote_ident, sql, PgTools};
use crate::pipeline::transform::Decode;
use crate::progress::{Counters, Reporter};
use crate::restore::{stopped, stream_into, valid_db_name, Outcome};

/// What a partial restore takes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub tables: Vec<(String, String)>,
    pub schemas: Vec<String>,
    pub into_existing: bool,
}

impl Selection {
    /// The job's selection; `None` for a whole restore.
    pub fn of(job: &RestoreJob) -> Result<Option<Self>, String> {
        datasaver_common::names::check_restore_part(
            &job.tables,
            &job.schemas,
            job.into_existing,
            job.force,
            false,
        )?;
        if job.tables.is_empty() && job.schemas.is_empty() {
            return Ok(None);
        }
        let tables = job
            .tables
            .iter()
            .map(|t| datasaver_common::names::parse_table(t))
            .collect::<Result<_, _>>()?;
        Ok(Some(Self {
            tables,
            schemas: job.schemas.clone(),
            into_existing: job.into_existing,
        }))
    }

    /// "table public.orders, schema sales", for messages.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .tables
            .iter()
            .map(|(s, t)| format!("table {s}.{t}"))
            .collect();
        parts.extend(self.schemas.iter().map(|s| format!("schema {s}")));
        parts.join(", ")
    }

    /// The schemas of selected tables that are not selected themselves:
    /// created in the destination when missing (`pg_dump --table` does not).
    fn table_schemas(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .tables
            .iter()
            .map(|(s, _)| s.clone())
            .filter(|s| !self.schemas.contains(s))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Everything a partial restore needs from its job.
pub struct Context<'a> {
    pub client: &'a mut AgentServiceClient<Channel>,
    pub job: &'a RestoreJob,
    pub decode: Decode,
    pub db: &'a DbConn,
    pub tools: &'a PgTools,
    pub reporter: &'a Reporter,
    pub cancel: &'a JobCancel,
}

/// Restores `sel` of the job's backup (see the module doc).
pub async fn run(cx: Context<'_>, sel: &Selection) -> Result<Outcome, JobError> {
    let (db, tools, job, cancel) = (cx.db, cx.tools, cx.job, cx.cancel);
    let name = if !job.target_db.is_empty() {
        job.target_db.clone()
    } else if sel.into_existing {
        db.dbname.clone()
    } else {
        datasaver_common::names::default_restore_db(&db.dbname, chrono::Utc::now())
    };
    valid_db_name(&name)?;
    let admin_db = crate::pg::admin_db(db, &name);
    let what = sel.describe();
    let exists = tokio::select! {
        r = tools.database_exists(db, &admin_db, &name) => r.map_err(|e| format!("cannot connect to the server at {}:{}: {e}", db.host, db.port))?,
        _ = cancel.cancelled() => return Err(stopped(cancel)),
    };
    if sel.into_existing {
        if !exists {
            return Err(format!(
                "database {name} does not exist; --into-existing adds {what} to an existing database (leave it out to restore into a new one); nothing was changed"
            )
            .into());
        }
        // The named objects themselves are checked before the long
        // restore; their indexes and sequences once they are known.
        refuse_existing(tools, db, &name, &sel.tables, &sel.schemas).await?;
    } else if exists && !tools.is_empty(db, &name).await? {
        return Err(format!(
            "database {name} already exists and is not empty; nothing was changed. Restore {what} into a new database with --target-db, or add it to this one with --into-existing"
        )
        .into());
    }

    let mut base = db.dbname.clone();
    base.truncate(40);
    let scratch = format!("{base}_dspart_{:08x}", rand::random::<u32>());
    let shape = job.database_shape.clone().unwrap_or_default();
    tools
        .create_database_like(db, &admin_db, &scratch, &shape)
        .await
        .map_err(|e| format!("cannot create the scratch database {scratch}: {e}"))?;
    let result = take_part(cx, sel, &name, &admin_db, exists, &scratch).await;
    if let Err(e) = tools.drop_database(db, &admin_db, &scratch).await {
        tracing::error!(database = %scratch, error = %e, "could not drop the scratch database of a partial restore");
        if result.is_ok() {
            return Err(format!(
                "{what} restored into {name}, but the scratch database {scratch} could not be dropped: {e}; drop it by hand"
            )
            .into());
        }
    }
    result
}

/// Refuses when database `name` already has any of `relations` or
/// `schemas`, naming them.
async fn refuse_existing(
    tools: &PgTools,
    db: &DbConn,
    name: &str,
    relations: &[(String, String)],
    schemas: &[String],
) -> Result<(), JobError> {
    let clash = tools
        .lines(db, name, &sql::existing_part(relations, schemas))
        .await
        .map_err(|e| format!("cannot inspect database {name}: {e}"))?;
    if clash.is_empty() {
        return Ok(());
    }
    Err(format!(
        "database {name} already has {}; nothing was changed. Drop or rename them first, or restore into a new database (without --into-existing)",
        clash.join(", ")
    )
    .into())
}

/// From the scratch database (already created) to database `name`.
async fn take_part(
    cx: Context<'_>,
    sel: &Selection,
    name: &str,
    admin_db: &str,
    exists: bool,
    scratch: &str,
) -> Result<Outcome, JobError> {
    let (db, tools, job, cancel, reporter) = (cx.db, cx.tools, cx.job, cx.cancel, cx.reporter);
    let what = sel.describe();
    reporter.phase(
        "restore",
        &format!(
            "restoring {} into the scratch database {scratch}, to take {what} from it",
            job.backup_id
        ),
    );
    let counters = Arc::new(Counters::default());
    let ticker = reporter.start_ticker("restore", counters.clone());
    let restored = stream_into(
        tools.pg_restore_into(db, scratch),
        cx.client,
        job,
        cx.decode,
        counters,
        cancel,
        false,
    )
    .await;
    ticker.abort();
    restored?;
    if cancel.is_cancelled() {
        return Err(stopped(cancel));
    }
    let q = |st| async move {
        tools.lines(db, scratch, &st).await.map_err(|e| {
            JobError::from(format!(
                "cannot inspect the scratch database {scratch}: {e}"
            ))
        })
    };
    let missing = q(sql::missing_part(&sel.tables, &sel.schemas)).await?;
    if !missing.is_empty() {
        return Err(format!(
            "backup {} has no {}; nothing was changed",
            job.backup_id,
            missing.join(", ")
        )
        .into());
    }
    let mut notes = Vec::new();
    if sel.into_existing {
        let relations: Vec<(String, String)> = q(sql::part_relations(&sel.tables))
            .await?
            .iter()
            .filter_map(|l| {
                let mut f = l.splitn(3, '|');
                let _kind = f.next()?;
                Some((f.next()?.to_string(), f.next()?.to_string()))
            })
            .collect();
        refuse_existing(tools, db, name, &relations, &sel.schemas).await?;
    } else {
        // In a new database the tables they point to are not there; the
        // restore would fail on them, so they are left out and named.
        for fk in q(sql::outside_foreign_keys(&sel.tables, &sel.schemas)).await? {
            let f: Vec<&str> = fk.splitn(4, '|').collect();
            if let [schema, table, constraint, referenced] = f[..] {
                q(sql::drop_constraint(schema, table, constraint)).await?;
                notes.push(format!(
                    "foreign key {constraint} of {schema}.{table} (to {referenced}) was not created: {referenced} was not restored"
                ));
            }
        }
    }
    if cancel.is_cancelled() {
        return Err(stopped(cancel));
    }
    let created = !exists;
    if created {
        let shape = job.database_shape.clone().unwrap_or_default();
        if let Some(n) = tools
            .create_database_like(db, admin_db, name, &shape)
            .await
            .map_err(|e| format!("cannot create database {name}: {e}"))?
        {
            notes.push(n);
        }
    }
    let mut prelude = String::new();
    for s in sel.table_schemas() {
        prelude.push_str(&format!(
            "CREATE SCHEMA IF NOT EXISTS {};\n",
            quote_ident(&s)
        ));
    }
    if !sel.into_existing {
        // A new database has its own empty `public`; a selected schema is
        // created by the copy itself.
        for s in &sel.schemas {
            prelude.push_str(&format!("DROP SCHEMA IF EXISTS {};\n", quote_ident(s)));
        }
    }
    reporter.phase("copy", &format!("copying {what} into database {name}"));
    let copied = tools
        .copy_part(db, scratch, name, sel, prelude, cancel.token())
        .await;
    if let Err(e) = copied {
        if created {
            if let Err(de) = tools.drop_database(db, admin_db, name).await {
                tracing::error!(database = %name, error = %de, "could not drop the incomplete restore database");
            }
        }
        if cancel.is_cancelled() {
            return Err(stopped(cancel));
        }
        let hint = if sel.into_existing {
            ""
        } else {
            " (restored alone, a table needs what it uses — types, functions, extensions — to exist in the new database: restore with --into-existing into the database that has them, or restore its schema with --schema)"
        };
        return Err(format!(
            "restoring {what} into database {name} failed: {e}{hint}; nothing was changed"
        )
        .into());
    }
    let mut message = format!(
        "restored {what} of backup {} into database {name}, with indexes, constraints, triggers, grants and comments",
        job.backup_id
    );
    for n in notes {
        message.push_str("; ");
        message.push_str(&n);
    }
    Ok(Outcome {
        message,
        target_db: name.to_string(),
        toc_entries: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_from_jobs() {
        let job = |tables: &[&str], schemas: &[&str], into_existing, force| RestoreJob {
            tables: tables.iter().map(|s| s.to_string()).collect(),
            schemas: schemas.iter().map(|s| s.to_string()).collect(),
            into_existing,
            force,
            ..Default::default()
        };
        assert_eq!(Selection::of(&job(&[], &[], false, true)), Ok(None));
        assert!(Selection::of(&job(&[], &[], true, false)).is_err());
        assert!(Selection::of(&job(&["public.t"], &[], false, true)).is_err());
        assert!(Selection::of(&job(&["t"], &[], false, false)).is_err());
        let sel = Selection::of(&job(&["sales.orders", "public.t"], &["audit"], true, false))
            .unwrap()
            .unwrap();
        assert_eq!(
            sel.describe(),
            "table sales.orders, table public.t, schema audit"
        );
        assert_eq!(sel.table_schemas(), vec!["public", "sales"]);
        let sel = Selection::of(&job(&["audit.log"], &["audit"], false, false))
            .unwrap()
            .unwrap();
        assert!(sel.table_schemas().is_empty());
    }
}
