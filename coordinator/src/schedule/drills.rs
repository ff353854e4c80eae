//! Restore drills on a schedule (`drill_schedule` per target in the YAML
//! file, else the agent's `DATASAVER_DRILL_SCHEDULE`): when a slot of a target's drill schedule has passed and no drill of
//! the target has finished since, a drill of its newest completed backup
//! starts (`jobs::start_read` with `Read::Drill`), one per target at a time.
//! When a drill last finished is read from the catalog (each backup keeps
//! its last drill), so a restart neither repeats a slot nor forgets one: a
//! slot missed while the coordinator was down gets one catch-up drill. A
//! drill that could not start (no agent) is tried again on the next look;
//! one cut off by a planned stop is not recorded and runs again.
//! Drills are not counted against `DATASAVER_MAX_CONCURRENT_BACKUPS`: they
//! never touch storage for writing and run on the agent's drill server.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::jobs::{self, Read};
use crate::repo::{BackupRecord, Status};
use crate::Core;

/// How often due drills are looked for.
const TICK: Duration = Duration::from_secs(2);

/// Whether a drill of `rows` (one target's backups, newest first) is due
/// for the slot `slot` (the last of its drill schedule at or before now);
/// the backup to drill when it is.
pub fn due(rows: &[BackupRecord], slot: Option<DateTime<Utc>>) -> Option<&BackupRecord> {
    let slot = slot?;
    if crate::repo::latest_drill(rows, false).is_some_and(|(_, v)| v.at >= slot) {
        return None;
    }
    rows.iter().find(|r| r.status == Status::Completed)
}

pub async fn run(core: Arc<Core>) {
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    // The slot each target was last found drilled for: the catalog is read
    // again only when a new slot comes (or while a drill is still owed).
    let mut drilled: std::collections::HashMap<String, DateTime<Utc>> = Default::default();
    loop {
        tokio::select! {
            _ = core.cancel.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        // The file's targets and every target an agent registered (with
        // what it asked for).
        let mut targets: std::collections::BTreeMap<String, Option<String>> = core
            .policies
            .targets
            .keys()
            .map(|t| (t.clone(), None))
            .collect();
        for t in core.targets.list().await.unwrap_or_default() {
            targets.insert(t.name, t.drill_schedule);
        }
        for (target, requested) in targets {
            if running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&target)
            {
                continue;
            }
            let Some(schedule) = core
                .policies
                .drill_schedule_for(&target, requested.as_deref())
            else {
                continue;
            };
            let slot = schedule.last_at_or_before(core.clock.now());
            if slot.is_none() || slot == drilled.get(&target).copied() {
                continue;
            }
            if !core.fleet.takes_jobs(&target) {
                continue;
            }
            let Ok(rows) = core.repo.list(Some(&target)).await else {
                continue;
            };
            let Some(row) = due(&rows, slot).cloned() else {
                // Drilled for this slot (not merely nothing to drill yet).
                if let (Some(slot), Some((_, v))) = (slot, crate::repo::latest_drill(&rows, false))
                {
                    if v.at >= slot {
                        drilled.insert(target, slot);
                    }
                }
                continue;
            };
            match jobs::start_read(&core, row.clone(), Read::Drill) {
                Ok(started) => {
                    tracing::info!(target = %target, backup = %row.id, "scheduled restore drill started");
                    running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(target.clone());
                    let running = running.clone();
                    tokio::spawn(async move {
                        // Nobody follows its progress; the result is kept
                        // with the backup and alerts on failure.
                        drop(started.events);
                        let _ = started.outcome.await;
                        running
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&target);
                    });
                }
                Err(e) => {
                    tracing::debug!(target = %target, error = %e, "scheduled restore drill could not start; trying again");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{Trigger, Verification};
    use chrono::TimeZone;

    fn at(h: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::hours(h)
    }

    fn row(id: &str, status: Status, drilled: Option<i64>) -> BackupRecord {
        let mut r = BackupRecord::running(id.into(), "t", Trigger::Scheduled, None, "a", at(0));
        r.status = status;
        r.drill = drilled.map(|h| Verification {
            at: at(h),
            ok: h % 2 == 0,
            detail: String::new(),
        });
        r
    }

    #[test]
    fn a_slot_is_drilled_once_and_the_newest_completed_backup_is_the_one() {
        let rows = vec![
            row("b3", Status::Failed, None),
            row("b2", Status::Completed, None),
            row("b1", Status::Completed, Some(10)),
        ];
        // No slot yet: nothing.
        assert!(due(&rows, None).is_none());
        // A slot before the last drill finished: done already.
        assert!(due(&rows, Some(at(9))).is_none());
        assert!(due(&rows, Some(at(10))).is_none());
        // A later slot: the newest completed backup, not the failed attempt.
        assert_eq!(due(&rows, Some(at(11))).map(|r| r.id.as_str()), Some("b2"));
        // A failed drill counts as done for its slot too (it alerts).
        let rows = vec![row("b2", Status::Completed, Some(13))];
        assert!(due(&rows, Some(at(12))).is_none());
        // Nothing completed: nothing to drill.
        assert!(due(&[row("b1", Status::Failed, None)], Some(at(1))).is_none());
    }
}
