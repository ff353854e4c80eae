//! Base backups on a schedule (`base_schedule` per target in the YAML file,
//! else the agent's `DATASAVER_BASE_SCHEDULE`; issue 14): when a slot of a
//! target's base schedule has passed and no base backup of the target was
//! started since, one is queued as `dsctl backup --physical` would be —
//! through the scheduler's queue, so `DATASAVER_MAX_CONCURRENT_BACKUPS`
//! holds — one per target at a time, recorded as scheduled. Whether a slot
//! is done is read from the catalog (the newest base backup's start, failed
//! or not), so a restart neither repeats a slot nor forgets one: a slot
//! missed while the coordinator was down gets one catch-up backup. A base
//! backup that fails is not tried again before the next slot; it is kept as
//! failed and `dsctl list` shows why.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use datasaver_common::proto::job_event;

use crate::repo::{BackupRecord, Kind};
use crate::Core;

/// How often due base backups are looked for.
const TICK: Duration = Duration::from_secs(2);

/// Whether a base backup of a target whose backups are `rows` is due for
/// `slot` (the last of its base schedule at or before now).
pub fn due(rows: &[BackupRecord], slot: Option<DateTime<Utc>>) -> bool {
    let Some(slot) = slot else {
        return false;
    };
    !rows
        .iter()
        .any(|r| r.kind == Kind::Base && r.created_at >= slot)
}

pub async fn run(core: Arc<Core>) {
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    // The slot each target was last found done for: the catalog is read
    // again only when a new slot comes.
    let mut done: std::collections::HashMap<String, DateTime<Utc>> = Default::default();
    let busy = |running: &Mutex<HashSet<String>>, t: &str| {
        running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(t)
    };
    loop {
        tokio::select! {
            _ = core.cancel.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        let mut targets: std::collections::BTreeMap<String, Option<String>> = core
            .policies
            .targets
            .keys()
            .map(|t| (t.clone(), None))
            .collect();
        for t in core.targets.list().await.unwrap_or_default() {
            targets.insert(t.name, t.base_schedule);
        }
        for (target, requested) in targets {
            if busy(&running, &target) {
                continue;
            }
            let Some(schedule) = core
                .policies
                .base_schedule_for(&target, requested.as_deref())
            else {
                continue;
            };
            let slot = schedule.last_at_or_before(core.clock.now());
            if slot.is_none() || slot == done.get(&target).copied() {
                continue;
            }
            if !core.fleet.takes_jobs(&target) {
                continue;
            }
            let Ok(rows) = core.repo.list(Some(&target)).await else {
                continue;
            };
            if !due(&rows, slot) {
                if let Some(slot) = slot {
                    done.insert(target, slot);
                }
                continue;
            }
            match core.scheduler.request_scheduled(&core, &target, Kind::Base) {
                Ok(mut events) => {
                    tracing::info!(target = %target, slot = ?slot.map(crate::rfc3339), "scheduled base backup queued");
                    running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(target.clone());
                    let running = running.clone();
                    tokio::spawn(async move {
                        // Nobody follows its progress: its result is in
                        // the catalog; a failure is logged here too.
                        while let Some(ev) = events.recv().await {
                            if let Ok(datasaver_common::proto::JobEvent {
                                event: Some(job_event::Event::Done(d)),
                            }) = ev
                            {
                                if !d.ok {
                                    tracing::error!(target = %target, error = %d.error, "scheduled base backup failed");
                                }
                            }
                        }
                        running
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&target);
                    });
                }
                Err(e) => {
                    tracing::debug!(target = %target, error = %e, "scheduled base backup could not be queued; trying again");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{Status, Trigger};
    use chrono::TimeZone;

    fn at(h: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::hours(h)
    }

    fn row(kind: Kind, status: Status, created: i64) -> BackupRecord {
        let mut r =
            BackupRecord::running("b".into(), "t", Trigger::Scheduled, None, "a", at(created));
        r.kind = kind;
        r.status = status;
        r
    }

    #[test]
    fn a_slot_gets_one_base_backup_started_after_it() {
        // No slot yet: nothing.
        assert!(!due(&[], None));
        // A slot and no base backup at all: one (a catch-up, too).
        assert!(due(&[], Some(at(4))));
        // Dumps do not count.
        assert!(due(
            &[row(Kind::Logical, Status::Completed, 5)],
            Some(at(4))
        ));
        // A base backup started at or after the slot: done, failed or not.
        assert!(!due(&[row(Kind::Base, Status::Completed, 4)], Some(at(4))));
        assert!(!due(&[row(Kind::Base, Status::Failed, 6)], Some(at(4))));
        // One from before the slot: due again.
        assert!(due(&[row(Kind::Base, Status::Completed, 3)], Some(at(4))));
    }
}
