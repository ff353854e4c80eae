//! Restores, dry runs and verifies: jobs that read one stored backup on its
//! target's agent. The object is read once: the coordinator streams it
//! verified (`repo.open_verified`), the agent checks the checksum as the
//! bytes arrive and holds back the archive's tail until it matches, so a
//! corrupt object never commits anything; its verify result is kept with the
//! backup and the error names the next good backup.

use std::sync::Arc;

use datasaver_common::proto::{coordinator_message, JobDone, RestoreJob, RestoreMode};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::{
    done, failed, progress, AgentJob, Expected, FailureKind, JobFailure, StartError, Started,
};
use crate::fleet::JobKind;
use crate::repo::{BackupRecord, PartRecord};
use crate::schedule::planner::Outcome;
use crate::{to_proto, Core};

/// What a read job does with the backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// Restore into `target_db` (empty: the agent picks a new name);
    /// `force` replaces an existing database (through a scratch database);
    /// `part` limits it to some tables or schemas.
    Restore {
        target_db: String,
        force: bool,
        part: Part,
    },
    /// Read the whole archive and list it; change nothing (of a
    /// whole-server backup, `part.database` or every database).
    DryRun { part: Part },
    /// A dry run whose result is kept as the backup's verification.
    Verify,
    /// A restore drill: into a scratch database, rows checked, dropped; the
    /// result kept as the backup's last drill.
    Drill,
    /// A point-in-time restore of a base backup into `data_dir` (issue 14),
    /// along a plan proven before the job starts.
    Physical {
        plan: Box<crate::wal::restore::Plan>,
        data_dir: String,
        force: bool,
        /// only read and check the base backup and every WAL file of the
        /// plan (`dsctl verify` of a base backup); the result is kept as
        /// the backup's verification
        verify: bool,
    },
}

/// A part of a backup to restore (empty: all of it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Part {
    /// `schema.name` of each table.
    pub tables: Vec<String>,
    pub schemas: Vec<String>,
    /// Add them to an existing database instead of a new one.
    pub into_existing: bool,
    /// Of a whole-server backup, only this database.
    pub database: Option<String>,
}

impl Part {
    /// Checks a requested part against the rest of the restore request,
    /// before any job starts.
    pub fn new(
        tables: Vec<String>,
        schemas: Vec<String>,
        into_existing: bool,
        force: bool,
        dry_run: bool,
    ) -> Result<Self, String> {
        datasaver_common::names::check_restore_part(
            &tables,
            &schemas,
            into_existing,
            force,
            dry_run,
        )?;
        let part = Self {
            tables,
            schemas,
            into_existing,
            database: None,
        };
        Ok(part)
    }

    /// Only database `name` of a whole-server backup (empty: all of them).
    pub fn of_database(self, name: &str) -> Self {
        Self {
            database: (!name.is_empty()).then(|| name.to_string()),
            ..self
        }
    }

    pub fn is_partial(&self) -> bool {
        !self.tables.is_empty() || !self.schemas.is_empty()
    }

    /// The databases of `row` a restore into `target_db` reads: those of a
    /// whole-server backup (all, or the one named), none for a
    /// single-database backup. Refuses what does not fit the backup.
    pub fn databases_of<'a>(
        &self,
        row: &'a BackupRecord,
        target_db: &str,
    ) -> Result<Vec<&'a PartRecord>, String> {
        let all = row.databases();
        if !row.is_whole_server() {
            return match &self.database {
                Some(d) => Err(format!(
                    "backup {} holds one database ({}); --database {d:?} is for whole-server backups",
                    row.id, row.database
                )),
                None => Ok(Vec::new()),
            };
        }
        let names = row.database_names();
        let Some(name) = &self.database else {
            if !target_db.is_empty() {
                return Err(format!(
                    "backup {} holds {} databases ({}); --target-db renames one: add --database NAME",
                    row.id,
                    names.len(),
                    names.join(", ")
                ));
            }
            if self.is_partial() {
                return Err(format!(
                    "backup {} holds {} databases ({}); say which one holds the tables or schemas with --database NAME",
                    row.id,
                    names.len(),
                    names.join(", ")
                ));
            }
            return Ok(all);
        };
        all.into_iter()
            .find(|p| p.dump.as_ref().is_some_and(|d| &d.database == name))
            .map(|p| vec![p])
            .ok_or_else(|| {
                format!(
                    "backup {} holds no database {name:?}; it holds {}",
                    row.id,
                    names.join(", ")
                )
            })
    }
}

/// What the agent is told of a physical restore's plan.
fn physical_job(
    plan: &crate::wal::restore::Plan,
    data_dir: &str,
    force: bool,
) -> datasaver_common::proto::PhysicalRestore {
    use crate::wal::restore::Goal;
    let p = plan.base.physical.unwrap_or(crate::repo::record::Physical {
        start_lsn: 0,
        end_lsn: 0,
        timeline: plan.timeline,
        consistent_at_micros: 0,
    });
    datasaver_common::proto::PhysicalRestore {
        data_dir: data_dir.to_string(),
        force,
        segment_size: plan.seg_size,
        timeline: plan.timeline,
        wal: plan
            .wal
            .iter()
            .map(|w| datasaver_common::proto::PlannedWal {
                name: w.name.clone(),
                raw_blake3: w.raw_blake3.clone(),
                partial: w.partial,
            })
            .collect(),
        target_time: match &plan.goal {
            Goal::Time(t) => t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string(),
            _ => String::new(),
        },
        target_lsn: match &plan.goal {
            Goal::Lsn(l) => l.to_string(),
            _ => String::new(),
        },
        immediate: plan.goal == Goal::BaseEnd,
        consistent_lsn: datasaver_common::wal::Lsn(p.end_lsn).to_string(),
    }
}

impl Read {
    fn name(&self) -> &'static str {
        match self {
            Read::Restore { .. } => "restore",
            Read::DryRun { .. } => "list",
            Read::Verify => "verify",
            Read::Drill => "drill",
            Read::Physical { verify: true, .. } => "verify",
            Read::Physical { .. } => "physical restore",
        }
    }
}

/// Starts `read` of completed backup `row` on its target's agent.
pub fn start_read(core: &Arc<Core>, row: BackupRecord, read: Read) -> Result<Started, StartError> {
    let kind = match read {
        Read::Physical { verify: true, .. } => JobKind::List,
        Read::Restore { .. } | Read::Drill | Read::Physical { .. } => JobKind::Restore,
        Read::DryRun { .. } | Read::Verify => JobKind::List,
    };
    // Registered now so the backup counts as in use from the start.
    let mut job = AgentJob::register(core, kind, &row.target, &row.id, &row.object_key)?;
    let (tx, rx) = mpsc::channel(16);
    let (outcome_tx, outcome_rx) = oneshot::channel();
    let span = tracing::info_span!(
        "restore",
        target = %row.target,
        backup = %row.id,
        mode = read.name()
    );
    let id = job.id.clone();
    let core = core.clone();
    core.clone().tasks.spawn(
        async move {
            let reading = if row.is_whole_server() {
                format!(
                    "reading the databases of {} from storage; the agent checks each against its checksum as it arrives",
                    row.id
                )
            } else {
                format!(
                    "reading {} from storage; the agent checks it against {} as it arrives",
                    row.id, row.checksum
                )
            };
            let _ = tx.send(Ok(progress("download", reading))).await;
            let (mode, target_db, force, part) = match &read {
                Read::Restore {
                    target_db,
                    force,
                    part,
                } => (RestoreMode::Restore, target_db.clone(), *force, part.clone()),
                Read::DryRun { part } => (RestoreMode::List, String::new(), false, part.clone()),
                Read::Verify => (RestoreMode::List, String::new(), false, Part::default()),
                Read::Drill => (RestoreMode::Drill, String::new(), false, Part::default()),
                Read::Physical { verify: true, .. } => {
                    (RestoreMode::List, String::new(), false, Part::default())
                }
                Read::Physical { force, .. } => {
                    (RestoreMode::Restore, String::new(), *force, Part::default())
                }
            };
            let physical = match &read {
                Read::Physical {
                    plan,
                    data_dir,
                    force,
                    ..
                } => Some(physical_job(plan, data_dir, *force)),
                _ => None,
            };
            // Checked by the request's handler; all of them if it was not.
            let databases: Vec<_> = part
                .databases_of(&row, &target_db)
                .unwrap_or_else(|_| row.databases())
                .into_iter()
                .map(crate::part_to_proto)
                .collect();
            let stored_bytes = if databases.is_empty() {
                row.stored_bytes
            } else {
                databases.iter().map(|d| d.stored_bytes).sum()
            };
            let msg = coordinator_message::Msg::Restore(RestoreJob {
                trace_context: datasaver_common::telemetry::context_of(&tracing::Span::current()),
                job_id: job.id.clone(),
                backup_id: row.id.clone(),
                target: row.target.clone(),
                mode: mode as i32,
                target_db,
                force,
                compression: row.compression.clone(),
                checksum: row.checksum.clone(),
                stored_bytes,
                encrypted: row.encrypted,
                encryption_recipient: row.encryption_recipient.clone(),
                server_version: row.server_version.clone(),
                pg_dump_version: row.pg_dump_version.clone(),
                extensions: row.extensions.clone(),
                roles: row.roles.clone(),
                database_shape: Some((&row.database_shape).into()),
                tables: part.tables,
                schemas: part.schemas,
                into_existing: part.into_existing,
                globals: row.part(crate::repo::GLOBALS).map(crate::part_to_proto),
                table_rows: crate::tables_to_proto(&row.row_counts.tables),
                databases,
                dump_part: String::new(),
                physical,
            });
            // A verify reads and checks the parts (globals) here, first:
            // the agent checks the dump, and may not even hold the key.
            let parts = match read {
                Read::Verify => match core.repo.check_parts(&row).await {
                    Ok(()) => Ok(()),
                    Err(crate::repo::ReadError::Corrupt(m)) => {
                        Err(JobFailure::new(FailureKind::Corrupt, m))
                    }
                    Err(crate::repo::ReadError::Storage(m)) => Err(JobFailure::failed(m)),
                },
                _ => Ok(()),
            };
            let result = match parts {
                Err(f) => Err(f),
                Ok(()) => job.send(msg).await,
            };
            let result = match result {
                Err(f) => Err(f),
                Ok(()) => {
                    let expected = Expected { raw: 0, stored: stored_bytes };
                    let what = format!("{} of backup {}", read.name(), row.id);
                    job.wait(&tx, expected, &what).await
                }
            };

            drop(job);
            match read {
                Read::Verify => core.metrics.verify_finished(&row.target, result.is_ok()),
                Read::Physical { verify: true, .. } => {
                    core.metrics.verify_finished(&row.target, result.is_ok())
                }
                Read::Restore { .. } | Read::Physical { .. } => {
                    core.metrics.restore_finished(&row.target, result.is_ok())
                }
                Read::DryRun { .. } | Read::Drill => {}
            }
            let corrupt = matches!(&result, Err(f) if f.kind == FailureKind::Corrupt);
            // A verify, and any read that found the object corrupt, is kept
            // with the backup (catalog and meta file), so the next restore
            // and `dsctl list` know.
            let physical_verify = matches!(read, Read::Physical { verify: true, .. });
            // A base backup's verify also reads the WAL after it: a bad WAL
            // file fails the verify (named) but is not the base's fault, so
            // only its result or a corrupt base object is kept with it.
            if read == Read::Verify || corrupt || (physical_verify && result.is_ok()) {
                let (ok, detail) = match &result {
                    Ok(r) if physical_verify => (true, r.message.clone()),
                    Ok(r) => (
                        true,
                        format!(
                            "checksum matches, {} archive entries{}{}",
                            r.toc_entries,
                            if row.is_whole_server() {
                                format!(" in {} databases", row.databases().len())
                            } else {
                                String::new()
                            },
                            if row.parts.is_empty() { "" } else { "; globals checksum matches" }
                        ),
                    ),
                    Err(f) => (false, f.message.clone()),
                };
                if let Err(e) = core.repo.record_verification(&row.id, ok, &detail).await {
                    tracing::warn!(backup = %row.id, error = %e, "could not record the verify result");
                }
            }
            // A drill's result is kept as the backup's last drill (a corrupt
            // object also as its verification, above).
            if read == Read::Drill && !matches!(&result, Err(f) if f.kind == FailureKind::Interrupted || f.kind == FailureKind::Cancelled) {
                let (ok, detail) = match &result {
                    Ok(r) => (true, r.message.clone()),
                    Err(f) => (false, f.message.clone()),
                };
                if let Err(e) = core.repo.record_drill(&row.id, ok, &detail).await {
                    tracing::warn!(backup = %row.id, error = %e, "could not record the drill result");
                }
            }
            let outcome = match &result {
                Ok(_) => Outcome::Succeeded,
                Err(f) if f.kind == FailureKind::Interrupted => Outcome::Interrupted,
                Err(_) => Outcome::Failed,
            };
            let event = match result {
                Ok(r) => {
                    tracing::info!(backup = %row.id, message = %r.message, "agent job finished");
                    let backup = core.repo.get(&row.id).await.ok().flatten().map(|b| to_proto(&b));
                    done(JobDone {
                        ok: true,
                        message: r.message,
                        backup,
                        target_db: r.target_db,
                        ..Default::default()
                    })
                }
                Err(f) => {
                    let error = if f.kind == FailureKind::Corrupt {
                        format!("{}; {}", f.message, next_good(&core, &row).await)
                    } else {
                        f.message
                    };
                    tracing::warn!(backup = %row.id, %error, "agent job failed");
                    failed(error)
                }
            };
            let _ = outcome_tx.send(outcome);
            let _ = tx.send(Ok(event)).await;
            core.alerter.wake.notify_one();
        }
        .instrument(span),
    );
    Ok(Started {
        id,
        events: rx,
        outcome: outcome_rx,
    })
}

/// Names the backup to restore instead of a corrupt one, from the catalog
/// alone (no extra reads), saying whether it was verified.
async fn next_good(core: &Core, row: &BackupRecord) -> String {
    match core.repo.next_good(row).await {
        Ok(Some(b)) => match &b.verification {
            Some(v) if v.ok => format!(
                "the next-oldest good backup is {} (verified {}; dsctl restore {})",
                b.id,
                crate::rfc3339(v.at),
                b.id
            ),
            _ => format!(
                "the next-oldest good backup is {} (not verified since it was stored: `dsctl verify {}`, then `dsctl restore {}`)",
                b.id, b.id, b.id
            ),
        },
        Ok(None) => format!("no older good backup of {} is known", row.target),
        Err(e) => format!("the catalog could not name an older backup: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::Part;

    fn part(
        tables: &[&str],
        schemas: &[&str],
        into: bool,
        force: bool,
        dry: bool,
    ) -> Result<Part, String> {
        Part::new(
            tables.iter().map(|s| s.to_string()).collect(),
            schemas.iter().map(|s| s.to_string()).collect(),
            into,
            force,
            dry,
        )
    }

    #[test]
    fn a_part_is_checked_against_the_rest_of_the_request() {
        assert!(!part(&[], &[], false, true, false).unwrap().is_partial());
        assert!(part(&["public.orders"], &["sales"], true, false, false)
            .unwrap()
            .is_partial());
        for (bad, says) in [
            (part(&[], &[], true, false, false), "--into-existing adds"),
            (
                part(&["public.t"], &[], false, true, false),
                "--force replaces",
            ),
            (part(&[], &["s"], false, false, true), "--dry-run checks"),
            (
                part(&["orders"], &[], false, false, false),
                "--table \"orders\"",
            ),
            (part(&[], &["a.b"], false, false, false), "--schema \"a.b\""),
        ] {
            let e = bad.unwrap_err();
            assert!(e.starts_with(says), "{e}");
        }
    }
}
