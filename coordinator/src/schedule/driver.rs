//! Runs the planner against the real fleet: feeds it the clock, starts the
//! backups it asks for, reports their outcomes back, and persists how far it
//! got so a restart neither repeats nor forgets a slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use datasaver_common::proto::job_event;
use tokio::sync::{mpsc, Notify};

use super::planner::{Planner, Start};
use crate::jobs::{self, StartError, Trigger};
use crate::policy::Policies;
use crate::Core;

/// How long a run whose target is busy (a manual backup) waits.
const BUSY_RETRY: chrono::Duration = chrono::Duration::seconds(15);

pub struct Scheduler {
    planner: Mutex<Planner>,
    wake: Notify,
}

enum Outcome {
    Ok,
    Failed,
    Busy,
}

macro_rules! planner {
    ($s:expr) => {
        $s.planner.lock().unwrap_or_else(|p| p.into_inner())
    };
}

impl Scheduler {
    pub fn new(p: &Policies) -> Self {
        Self {
            planner: Mutex::new(Planner::new(p.max_concurrent, p.retry.clone())),
            wake: Notify::new(),
        }
    }

    /// When the target's next scheduled backup starts, if it has a schedule.
    pub fn next_run(&self, target: &str) -> Option<DateTime<Utc>> {
        planner!(self).next_run(target)
    }

    /// The cron expression a target runs on.
    pub fn schedule_of(&self, target: &str) -> Option<String> {
        planner!(self)
            .schedule(target)
            .map(|s| s.expr().to_string())
    }

    /// (Re)computes a target's schedule from the configuration and what its
    /// agent asked for, and tells the loop.
    pub async fn update_target(&self, core: &Core, target: &str, requested: Option<&str>) {
        let schedule = match core.policies.schedule_for(target, requested) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(target = %target, error = %e, "the schedule the agent asked for is invalid; the target is not scheduled (fix DATASAVER_SCHEDULE on the agent, or set one in the coordinator's config)");
                None
            }
        };
        let last_slot = core
            .catalog
            .target(target)
            .await
            .ok()
            .flatten()
            .and_then(|t| t.last_slot)
            .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
            .map(|d| d.with_timezone(&Utc));
        let now = core.clock.now();
        let accounted = {
            let mut p = planner!(self);
            p.set_schedule(target, schedule, last_slot, now);
            p.accounted(target)
        };
        if let Some(a) = accounted.filter(|a| Some(*a) != last_slot) {
            persist(core, target, a).await;
        }
        self.wake.notify_one();
    }
}

async fn persist(core: &Core, target: &str, slot: DateTime<Utc>) {
    let s = slot.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    if let Err(e) = core.catalog.set_last_slot(target, s).await {
        tracing::error!(target = %target, error = %e, "could not record the scheduler's progress");
    }
}

/// The scheduler loop, until the coordinator shuts down.
pub async fn run(core: Arc<Core>) {
    // Targets known from earlier runs (their agents may not be back yet) and
    // targets only the config file names.
    let mut known: Vec<(String, Option<String>)> = core
        .catalog
        .targets()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.name, t.schedule))
        .collect();
    for name in core.policies.targets.keys() {
        if !known.iter().any(|(n, _)| n == name) {
            known.push((name.clone(), None));
        }
    }
    for (name, schedule) in &known {
        core.scheduler
            .update_target(&core, name, schedule.as_deref())
            .await;
    }
    let (done_tx, mut done_rx) = mpsc::channel::<(String, Outcome)>(64);
    let mut persisted: HashMap<String, DateTime<Utc>> = HashMap::new();
    loop {
        let now = core.clock.now();
        let (starts, accounted, next) = {
            let mut p = planner!(core.scheduler);
            let starts = p.poll(now);
            let accounted: Vec<(String, DateTime<Utc>)> = p
                .targets()
                .into_iter()
                .filter_map(|t| p.accounted(&t).map(|a| (t, a)))
                .collect();
            (starts, accounted, p.next_wakeup())
        };
        for (t, a) in accounted {
            if persisted.get(&t) != Some(&a) {
                persist(&core, &t, a).await;
                persisted.insert(t, a);
            }
        }
        for s in starts {
            let span = tracing::info_span!("schedule", target = %s.target, slot = %crate::rfc3339(s.slot), attempt = s.attempt);
            tokio::spawn(tracing::Instrument::instrument(
                run_one(core.clone(), s, done_tx.clone()),
                span,
            ));
        }
        let wait = next
            .map(|n| (n - core.clock.now()).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(Duration::from_secs(60))
            .clamp(Duration::from_millis(20), Duration::from_secs(60));
        tokio::select! {
            _ = core.cancel.cancelled() => break,
            _ = core.scheduler.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            Some((target, outcome)) = done_rx.recv() => {
                let now = core.clock.now();
                let mut p = planner!(core.scheduler);
                match outcome {
                    Outcome::Ok => { p.finished(&target, true, now); }
                    Outcome::Failed => {
                        if let Some(at) = p.finished(&target, false, now) {
                            tracing::info!(target = %target, retry_at = %at, "scheduled backup failed; will retry");
                        }
                    }
                    Outcome::Busy => p.postpone(&target, now + BUSY_RETRY),
                }
            }
        }
    }
}

async fn run_one(core: Arc<Core>, s: Start, done: mpsc::Sender<(String, Outcome)>) {
    tracing::info!(target = %s.target, slot = %crate::rfc3339(s.slot), attempt = s.attempt, "scheduled backup due");
    let deadline = tokio::time::Instant::now() + core.policies.agent_grace;
    while !core.fleet.is_connected(&s.target) && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = core.cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    let outcome = match jobs::start_backup(&core, &s.target, Trigger::Scheduled, None).await {
        Ok(mut started) => {
            let mut ok = false;
            while let Some(ev) = started.events.recv().await {
                if let Ok(ev) = ev {
                    if let Some(job_event::Event::Done(d)) = ev.event {
                        ok = d.ok;
                    }
                }
            }
            if ok {
                Outcome::Ok
            } else {
                Outcome::Failed
            }
        }
        Err(StartError::Busy(_)) => Outcome::Busy,
        Err(StartError::NoAgent(_)) => {
            let why = format!(
                "agent not connected: no agent serving {} was connected when its scheduled backup was due",
                s.target
            );
            tracing::warn!(target = %s.target, "{why}");
            if let Err(e) =
                jobs::record_failed_attempt(&core, &s.target, Trigger::Scheduled, &why).await
            {
                tracing::error!(target = %s.target, error = %e, "could not record the failed attempt");
            }
            Outcome::Failed
        }
        Err(StartError::Internal(e)) => {
            tracing::error!(target = %s.target, error = %e, "scheduled backup could not start");
            Outcome::Failed
        }
    };
    let _ = done.send((s.target, outcome)).await;
}
