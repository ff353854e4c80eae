//! Runs the planner against the real fleet: feeds it the clock and which
//! agents are connected, starts the backups it lets through (scheduled and
//! manual alike), reports their outcomes back, records missed slots, tells
//! each waiting `dsctl backup` its place in the queue, and persists how far
//! the schedules got so a restart neither repeats nor forgets a slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use datasaver_common::proto::{job_event, JobEvent, JobProgress};
use tokio::sync::{mpsc, Notify};
use tonic::Status;

use super::planner::{After, Expired, JobKind, Missed, Outcome, Planner, Start, Ticket};
use crate::jobs::{self, StartError, Trigger};
use crate::policy::Policies;
use crate::Core;

type Events = mpsc::Sender<Result<JobEvent, Status>>;

/// A `dsctl backup` waiting for its backup.
struct Waiter {
    target: String,
    label: Option<String>,
    /// a dump, or a base backup (`dsctl backup --physical`)
    kind: crate::repo::Kind,
    /// manual (`dsctl backup`), or scheduled (base backups: `schedule::bases`)
    trigger: Trigger,
    events: Events,
    /// The last `queued (N ahead)` sent, to send only changes.
    told_ahead: Option<usize>,
}

pub struct Scheduler {
    planner: Mutex<Planner>,
    waiters: Mutex<HashMap<Ticket, Waiter>>,
    wake: Notify,
}

/// A started job's end, sent back to the loop.
struct Finished {
    ticket: Ticket,
    target: String,
    outcome: Outcome,
    /// The final event for a waiting `dsctl backup`, unless it is retried.
    done: Option<JobEvent>,
}

macro_rules! lock {
    ($m:expr) => {
        $m.lock().unwrap_or_else(|p| p.into_inner())
    };
}

impl Scheduler {
    pub fn new(p: &Policies) -> Self {
        let grace = chrono::Duration::from_std(p.agent_grace)
            .unwrap_or_else(|_| chrono::Duration::seconds(30));
        Self {
            planner: Mutex::new(Planner::new(p.max_concurrent, p.retry.clone(), grace)),
            waiters: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        }
    }

    /// When the target's next scheduled backup starts, if it has a schedule.
    pub fn next_run(&self, target: &str) -> Option<DateTime<Utc>> {
        lock!(self.planner).next_run(target)
    }

    /// The cron expression a target runs on.
    pub fn schedule_of(&self, target: &str) -> Option<String> {
        lock!(self.planner)
            .schedule(target)
            .map(|s| s.expr().to_string())
    }

    /// The first slot of the target's schedule after `t`.
    pub fn first_slot_after(&self, target: &str, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        lock!(self.planner).schedule(target)?.next_after(t)
    }

    /// The longest time between two slots of the target's schedule.
    pub fn longest_gap(&self, target: &str, now: DateTime<Utc>) -> Option<chrono::Duration> {
        lock!(self.planner).schedule(target)?.longest_gap(now)
    }

    /// (running, waiting, limit) of the job queue.
    pub fn queue_counts(&self) -> (usize, usize, usize) {
        let p = lock!(self.planner);
        (p.running_count(), p.waiting_count(), p.max_concurrent())
    }

    /// Queues a manual backup of `target`; the returned stream says
    /// `queued (N ahead)` while it waits, then carries the backup's progress
    /// and its result. An interrupted backup (its agent was stopped) is tried
    /// again when the agent is back, on the same stream.
    pub fn request_backup(
        &self,
        core: &Core,
        target: &str,
        label: Option<String>,
        kind: crate::repo::Kind,
    ) -> Result<mpsc::Receiver<Result<JobEvent, Status>>, StartError> {
        self.request(core, target, label, kind, Trigger::Manual)
    }

    /// Queues a scheduled backup of `kind` the way a manual one waits (base
    /// backups on their schedule: `schedule::bases`); recorded as scheduled.
    pub fn request_scheduled(
        &self,
        core: &Core,
        target: &str,
        kind: crate::repo::Kind,
    ) -> Result<mpsc::Receiver<Result<JobEvent, Status>>, StartError> {
        self.request(core, target, None, kind, Trigger::Scheduled)
    }

    fn request(
        &self,
        core: &Core,
        target: &str,
        label: Option<String>,
        kind: crate::repo::Kind,
        trigger: Trigger,
    ) -> Result<mpsc::Receiver<Result<JobEvent, Status>>, StartError> {
        if !core.fleet.takes_jobs(target) {
            return Err(StartError::NoAgent(target.to_string()));
        }
        let (tx, rx) = mpsc::channel(32);
        // The waiter is in place before the loop can see the request: lock
        // order waiters -> planner (nothing locks them the other way round).
        let mut waiters = lock!(self.waiters);
        let ticket = lock!(self.planner).enqueue_manual(target, core.clock.now());
        waiters.insert(
            ticket,
            Waiter {
                target: target.to_string(),
                label,
                kind,
                trigger,
                events: tx,
                told_ahead: None,
            },
        );
        drop(waiters);
        self.wake.notify_one();
        Ok(rx)
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
            .targets
            .get(target)
            .await
            .ok()
            .flatten()
            .and_then(|t| t.last_slot)
            .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
            .map(|d| d.with_timezone(&Utc));
        let now = core.clock.now();
        let throttle = schedule
            .as_ref()
            .and_then(|s| core.policies.throttle_for(target, s, now))
            .and_then(|d| chrono::Duration::from_std(d).ok());
        // The throttle counts from the previous scheduled start, which after
        // a restart only the catalog knows.
        let last_scheduled = match throttle {
            Some(_) => core
                .repo
                .list(Some(target))
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|b| b.trigger == Trigger::Scheduled && b.kind == crate::repo::Kind::Logical)
                .map(|b| b.created_at)
                .max(),
            None => None,
        };
        let accounted = {
            let mut p = lock!(self.planner);
            if let Some(at) = last_scheduled {
                p.seed_last_scheduled_start(target, at);
            }
            p.set_throttled_schedule(target, schedule, throttle, last_slot, now);
            p.accounted(target)
        };
        if let Some(a) = accounted.filter(|a| Some(*a) != last_slot) {
            persist(core, target, a).await;
        }
        self.wake.notify_one();
    }

    /// Wakes the loop (an agent connected, say).
    pub fn nudge(&self) {
        self.wake.notify_one();
    }
}

async fn persist(core: &Core, target: &str, slot: DateTime<Utc>) {
    let s = slot.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    if let Err(e) = core.targets.set_last_slot(target, s).await {
        tracing::error!(target = %target, error = %e, "could not record the scheduler's progress");
    }
}

fn queued_event(ahead: usize) -> JobEvent {
    JobEvent {
        event: Some(job_event::Event::Progress(JobProgress {
            phase: "queued".into(),
            message: format!("queued ({ahead} ahead)"),
            queue_ahead: Some(ahead as u32),
            ..Default::default()
        })),
    }
}

/// The scheduler loop, until the coordinator shuts down.
pub async fn run(core: Arc<Core>) {
    // Targets known from earlier runs (their agents may not be back yet) and
    // targets only the config file names.
    let mut known: Vec<(String, Option<String>)> = core
        .targets
        .list()
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
    let (done_tx, mut done_rx) = mpsc::channel::<Finished>(64);
    let mut persisted: HashMap<String, DateTime<Utc>> = HashMap::new();
    loop {
        let now = core.clock.now();
        let connected = |t: &str| core.fleet.takes_jobs(t);
        let (poll, accounted, next, places) = {
            let mut p = lock!(core.scheduler.planner);
            let poll = p.poll(now, &connected);
            // Places of the manual requests this poll could not start (one
            // that arrives after it is told on the next turn, when it may
            // simply start).
            let places: Vec<(Ticket, usize)> = p
                .waiting_manual()
                .into_iter()
                .map(|t| (t, p.ahead_of(t, now, &connected).unwrap_or(0)))
                .collect();
            let accounted: Vec<(String, DateTime<Utc>)> = p
                .targets()
                .into_iter()
                .filter_map(|t| p.accounted(&t).map(|a| (t, a)))
                .collect();
            (poll, accounted, p.next_wakeup(), places)
        };
        for (t, a) in accounted {
            if persisted.get(&t) != Some(&a) {
                persist(&core, &t, a).await;
                persisted.insert(t, a);
            }
        }
        for m in poll.missed {
            missed(&core, m).await;
        }
        for e in poll.expired {
            expired(&core, e).await;
        }
        for s in poll.starts {
            admitted(&core, s, done_tx.clone());
        }
        tell_waiters(&core, places);
        let wait = next
            .map(|n| (n - core.clock.now()).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(Duration::from_secs(60))
            .clamp(Duration::from_millis(20), Duration::from_secs(60));
        tokio::select! {
            _ = core.cancel.cancelled() => break,
            _ = core.scheduler.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            Some(f) = done_rx.recv() => finished(&core, f),
        }
    }
}

async fn missed(core: &Core, m: Missed) {
    tracing::warn!(
        target = %m.target,
        slot = %crate::rfc3339(m.slot),
        next = %crate::rfc3339(m.next),
        "scheduled backup missed: it could not start before the next slot (the queue is full; see `dsctl health` and DATASAVER_MAX_CONCURRENT_BACKUPS)"
    );
    core.metrics.schedule_missed(&m.target);
    let at = core
        .clock
        .now()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    if let Err(e) = core.targets.record_missed(&m.target, at).await {
        tracing::error!(target = %m.target, error = %e, "could not record the missed slot");
    }
    core.alerter.wake.notify_one();
}

async fn expired(core: &Core, e: Expired) {
    let grace = core.policies.agent_grace.as_secs();
    match e.kind {
        JobKind::Scheduled { slot } => {
            let why = format!(
                "agent not connected: no agent serving {} was connected when its scheduled backup was due (waited {grace} s)",
                e.target
            );
            tracing::warn!(target = %e.target, slot = %crate::rfc3339(slot), attempt = e.attempt, retry_at = ?e.retry_at.map(crate::rfc3339), "{why}");
            if let Err(err) =
                jobs::record_failed_attempt(core, &e.target, Trigger::Scheduled, &why).await
            {
                tracing::error!(target = %e.target, error = %err, "could not record the failed attempt");
            }
        }
        JobKind::Manual => {
            let why = format!(
                "no agent serving {} was connected for {grace} s while the backup waited; nothing was started (see `dsctl agents`)",
                e.target
            );
            tracing::warn!(target = %e.target, "{why}");
            if let Some(w) = lock!(core.scheduler.waiters).remove(&e.ticket) {
                let _ = w.events.try_send(Ok(jobs::failed(why)));
            }
        }
    }
}

fn admitted(core: &Arc<Core>, s: Start, done: mpsc::Sender<Finished>) {
    let (running, waiting, limit) = core.scheduler.queue_counts();
    let waited = (core.clock.now() - s.due).num_milliseconds().max(0) as f64 / 1000.0;
    let (trigger, label, events, kind) = match s.kind {
        JobKind::Scheduled { .. } => (Trigger::Scheduled, None, None, crate::repo::Kind::Logical),
        JobKind::Manual => {
            let w = lock!(core.scheduler.waiters);
            let waiter = w.get(&s.ticket);
            (
                waiter.map_or(Trigger::Manual, |w| w.trigger),
                waiter.and_then(|w| w.label.clone()),
                waiter.map(|w| w.events.clone()),
                waiter.map_or(crate::repo::Kind::Logical, |w| w.kind),
            )
        }
    };
    tracing::info!(target = %s.target, trigger = trigger.as_str(), attempt = s.attempt, waited_s = waited, running, waiting, limit, "backup admitted");
    let span = match s.kind {
        JobKind::Scheduled { slot } => {
            tracing::info_span!("schedule", target = %s.target, slot = %crate::rfc3339(slot), attempt = s.attempt)
        }
        JobKind::Manual => tracing::Span::current(),
    };
    if let JobKind::Scheduled { slot } = s.kind {
        span.in_scope(|| tracing::info!(target = %s.target, slot = %crate::rfc3339(slot), attempt = s.attempt, "scheduled backup due"));
    }
    tokio::spawn(tracing::Instrument::instrument(
        run_one(core.clone(), s, (trigger, kind), label, events, done),
        span,
    ));
}

async fn run_one(
    core: Arc<Core>,
    s: Start,
    (trigger, kind): (Trigger, crate::repo::Kind),
    label: Option<String>,
    events: Option<Events>,
    done: mpsc::Sender<Finished>,
) {
    let (outcome, final_event) = match jobs::start_backup(&core, &s.target, trigger, label, kind)
        .await
    {
        Ok(mut started) => {
            let mut last = None;
            while let Some(ev) = started.events.recv().await {
                let is_done = matches!(
                    &ev,
                    Ok(JobEvent {
                        event: Some(job_event::Event::Done(_))
                    })
                );
                match (is_done, &events) {
                    (true, _) => last = ev.ok(),
                    (false, Some(tx)) => {
                        let _ = tx.try_send(ev);
                    }
                    (false, None) => {}
                }
            }
            let outcome = started.outcome.await.unwrap_or(Outcome::Failed);
            (outcome, last)
        }
        Err(StartError::NoAgent(_))
            if trigger == Trigger::Scheduled && kind == crate::repo::Kind::Logical =>
        {
            let why = format!(
                "agent not connected: no agent serving {} was connected when its scheduled backup was due",
                s.target
            );
            tracing::warn!(target = %s.target, "{why}");
            if let Err(e) = jobs::record_failed_attempt(&core, &s.target, trigger, &why).await {
                tracing::error!(target = %s.target, error = %e, "could not record the failed attempt");
            }
            (Outcome::Failed, None)
        }
        Err(e) => {
            tracing::error!(target = %s.target, error = %e, "backup could not start");
            (Outcome::Failed, Some(jobs::failed(e.to_string())))
        }
    };
    let _ = done
        .send(Finished {
            ticket: s.ticket,
            target: s.target,
            outcome,
            done: final_event,
        })
        .await;
}

fn finished(core: &Core, f: Finished) {
    let now = core.clock.now();
    let after = lock!(core.scheduler.planner).finished(f.ticket, f.outcome, now);
    match (&after, f.outcome) {
        (After::Retry { at, attempt }, Outcome::Interrupted) => {
            tracing::info!(target = %f.target, attempt, "backup interrupted by a planned agent stop; it runs again when the agent is back");
            let _ = at;
        }
        (After::Retry { at, .. }, _) => {
            tracing::info!(target = %f.target, retry_at = %crate::rfc3339(*at), "scheduled backup failed; will retry");
        }
        (After::Done, _) => {}
    }
    let mut waiters = lock!(core.scheduler.waiters);
    match after {
        After::Retry { attempt, .. } => {
            if let Some(w) = waiters.get_mut(&f.ticket) {
                w.told_ahead = None;
                let _ = w.events.try_send(Ok(jobs::progress(
                    "queued",
                    format!(
                        "the backup was interrupted (its agent stopped); attempt {attempt} starts when the agent is back"
                    ),
                )));
            }
        }
        After::Done => {
            if let Some(w) = waiters.remove(&f.ticket) {
                let event = f.done.unwrap_or_else(|| {
                    jobs::failed(format!("backup of {} ended without a result", w.target))
                });
                let _ = w.events.try_send(Ok(event));
            }
        }
    }
}

/// Sends each waiting `dsctl backup` its place when it changed; a requester
/// that went away before its backup started is taken out of the queue.
fn tell_waiters(core: &Core, places: Vec<(Ticket, usize)>) {
    let mut gone = Vec::new();
    {
        let mut waiters = lock!(core.scheduler.waiters);
        for (ticket, ahead) in places {
            let Some(w) = waiters.get_mut(&ticket) else {
                continue;
            };
            if w.events.is_closed() {
                gone.push(ticket);
            } else if w.told_ahead != Some(ahead) {
                w.told_ahead = Some(ahead);
                let _ = w.events.try_send(Ok(queued_event(ahead)));
            }
        }
    }
    for ticket in gone {
        let mut waiters = lock!(core.scheduler.waiters);
        if lock!(core.scheduler.planner).withdraw(ticket) {
            if let Some(w) = waiters.remove(&ticket) {
                tracing::info!(target = %w.target, "manual backup withdrawn: dsctl went away before it started");
            }
        }
    }
}
