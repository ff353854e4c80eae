//! Reading a whole-server backup (`DATASAVER_DATABASES`): each of its
//! databases is a part holding one `pg_dump` archive, read by the one
//! database restore ([`crate::restore::run`]) as if it were a backup of its
//! own. Before a restore changes anything, every database it would write is
//! checked, so a refusal of the third database does not come after the
//! first two were restored.

use datasaver_common::proto::agent_service_client::AgentServiceClient;
use datasaver_common::proto::{BackupPart, RestoreJob, RestoreMode};
use tonic::transport::Channel;

use crate::config::TargetConfig;
use crate::jobs::{JobCancel, JobError};
use crate::pg::PgTools;
use crate::progress::Reporter;
use crate::restore::{stopped, Outcome};

/// The job that reads database `part` of whole-server backup `job` as if it
/// were a single-database backup, restored into `into`.
fn database_job(job: &RestoreJob, part: &BackupPart, into: String) -> RestoreJob {
    RestoreJob {
        target_db: into,
        checksum: part.checksum.clone(),
        stored_bytes: part.stored_bytes,
        extensions: part.extensions.clone(),
        roles: part.roles.clone(),
        database_shape: part.database_shape.clone(),
        table_rows: part.tables.clone(),
        databases: Vec::new(),
        dump_part: part.name.clone(),
        ..job.clone()
    }
}

/// Where database `part` goes: `--target-db` when one database is restored
/// and it was given, else the database's own name; a part (tables or
/// schemas) into a new database gets a new name.
fn target_of(job: &RestoreJob, part: &BackupPart) -> String {
    if !job.target_db.is_empty() && job.databases.len() == 1 {
        job.target_db.clone()
    } else if (!job.tables.is_empty() || !job.schemas.is_empty()) && !job.into_existing {
        datasaver_common::names::default_restore_db(&part.database, chrono::Utc::now())
    } else {
        part.database.clone()
    }
}

pub async fn run(
    client: AgentServiceClient<Channel>,
    job: RestoreJob,
    target: TargetConfig,
    tools: PgTools,
    reporter: Reporter,
    cancel: JobCancel,
) -> Result<Outcome, JobError> {
    let mode = job.mode;
    let restore = mode == RestoreMode::Restore as i32;
    let partial = !job.tables.is_empty() || !job.schemas.is_empty();
    let plan: Vec<(&BackupPart, String)> = job
        .databases
        .iter()
        .map(|p| (p, target_of(&job, p)))
        .collect();
    // Every name is checked before the first database is written.
    if restore {
        for (part, name) in &plan {
            if crate::restore::valid_db_name(name).is_err() {
                return Err(format!(
                    "database {name:?} of backup {} cannot be restored under that name (restores take 1-63 letters, digits, '_' or '-'); restore it alone with --database {:?} --target-db NEW_NAME; nothing was changed",
                    job.backup_id, part.database
                )
                .into());
            }
        }
    }
    // Every database a full restore writes is checked first; a part's own
    // checks are as for one database.
    if restore && !partial && !job.force {
        let mut taken = Vec::new();
        for (_, name) in &plan {
            let admin = crate::pg::admin_db(&target.db, name);
            let exists = tokio::select! {
                r = tools.database_exists(&target.db, &admin, name) => r.map_err(|e| format!("cannot connect to the server at {}:{}: {e}", target.db.host, target.db.port))?,
                _ = cancel.cancelled() => return Err(stopped(&cancel)),
            };
            if exists && !tools.is_empty(&target.db, name).await? {
                taken.push(name.clone());
            }
        }
        if !taken.is_empty() {
            return Err(format!(
                "database{} {} already exist{} and {} not empty; nothing was changed. Restore one database under a new name with --database NAME --target-db NEW, or pass --force to replace {}",
                if taken.len() == 1 { "" } else { "s" },
                taken.join(", "),
                if taken.len() == 1 { "s" } else { "" },
                if taken.len() == 1 { "is" } else { "are" },
                if taken.len() == 1 { "it" } else { "them" },
            )
            .into());
        }
    }
    let mut done: Vec<String> = Vec::new();
    let mut messages = Vec::new();
    let mut entries = 0;
    for (part, into) in plan {
        if cancel.is_cancelled() {
            return Err(stopped(&cancel));
        }
        reporter.phase(
            "database",
            &format!("database {} of backup {}", part.database, job.backup_id),
        );
        let sub = database_job(&job, part, into);
        let outcome = crate::restore::run(
            client.clone(),
            sub,
            target.clone(),
            tools.clone(),
            reporter.clone(),
            cancel.clone(),
        )
        .await;
        match outcome {
            Ok(o) => {
                entries += o.toc_entries;
                messages.push(format!("{}: {}", part.database, o.message));
                if !o.target_db.is_empty() {
                    done.push(o.target_db);
                }
            }
            Err(mut e) => {
                e.message = format!("database {}: {}", part.database, e.message);
                if restore && !done.is_empty() {
                    e.message.push_str(&format!(
                        " (restored before it, and kept: {})",
                        done.join(", ")
                    ));
                }
                return Err(e);
            }
        }
    }
    let what = match RestoreMode::try_from(mode) {
        Ok(RestoreMode::List) => "verified",
        Ok(RestoreMode::Drill) => "drilled",
        _ => "restored",
    };
    Ok(Outcome {
        message: format!(
            "backup {}: {} database{} {what}: {}",
            job.backup_id,
            job.databases.len(),
            if job.databases.len() == 1 { "" } else { "s" },
            messages.join("; ")
        ),
        target_db: done.join(","),
        toc_entries: entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(name: &str) -> BackupPart {
        BackupPart {
            name: datasaver_common::names::database_part(name),
            database: name.into(),
            checksum: format!("blake3:{name}"),
            stored_bytes: 7,
            roles: vec![format!("{name}_owner")],
            ..Default::default()
        }
    }

    #[test]
    fn each_database_is_read_as_its_own_backup_under_its_own_name() {
        let job = RestoreJob {
            backup_id: "srv_20260101_000000".into(),
            checksum: String::new(),
            databases: vec![part("shop"), part("crm")],
            ..Default::default()
        };
        let names: Vec<String> = job.databases.iter().map(|p| target_of(&job, p)).collect();
        assert_eq!(names, ["shop", "crm"]);
        let sub = database_job(&job, &job.databases[1], "crm".into());
        assert_eq!(sub.dump_part, "database:crm");
        assert_eq!(sub.checksum, "blake3:crm");
        assert_eq!(sub.roles, ["crm_owner"]);
        assert!(sub.databases.is_empty());
        // One database may be renamed; a part goes to a new database.
        let one = RestoreJob {
            target_db: "shop_copy".into(),
            databases: vec![part("shop")],
            ..Default::default()
        };
        assert_eq!(target_of(&one, &one.databases[0]), "shop_copy");
        let tables = RestoreJob {
            tables: vec!["public.orders".into()],
            databases: vec![part("shop")],
            ..Default::default()
        };
        assert!(target_of(&tables, &tables.databases[0]).starts_with("shop_restored_"));
    }
}
