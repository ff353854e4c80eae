//! The scheduler's decisions as a pure state machine over an injected "now":
//! the one queue every backup waits in (scheduled slots, their retries and
//! manual `dsctl backup` requests), the global concurrency limit, fair
//! ordering, missed slots and retries. The async driver (`schedule::driver`)
//! only feeds it the clock, which agents are connected and the outcomes, so
//! catch-up, the limit, fairness and retries are tested over simulated time
//! without sleeping.
//!
//! Order: a waiting job keeps the time it became due (a scheduled slot keeps
//! its slot time even when the next slot of the same target comes), jobs
//! start oldest-due first, and jobs that became due at the same moment start
//! in the order of their targets' last start (never started first, then the
//! longest ago), so when demand exceeds capacity every target gets its turn
//! instead of the same ones winning every tie.
//!
//! Throttle (the coordinator's floor under an agent's schedule, see
//! `crate::floors`): a throttled target's scheduled backup — first attempt,
//! retry or a run again after an interruption — never starts sooner than the
//! interval after the previous scheduled backup of that target started, and
//! the schedule's slots in between are skipped (not counted as missed): the
//! next slot taken is the first one at least the interval after that start.
//! Manual backups are the operator's and are not throttled.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};

use super::cron::Schedule;

/// How failed scheduled runs are retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per slot, the first included (1 = no retries).
    pub attempts: u32,
    /// Wait before the second attempt; doubles for each further one.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            first_backoff: Duration::seconds(60),
            max_backoff: Duration::minutes(30),
        }
    }
}

impl RetryPolicy {
    /// Wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1i32 << attempt.saturating_sub(1).min(20);
        (self.first_backoff * factor).min(self.max_backoff)
    }
}

/// Identifies one request (a scheduled slot or a manual backup) across its
/// attempts.
pub type Ticket = u64;

/// What a queued job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// The run of a cron slot.
    Scheduled { slot: DateTime<Utc> },
    /// `dsctl backup`.
    Manual,
}

/// A backup the driver should start now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    pub ticket: Ticket,
    pub target: String,
    pub kind: JobKind,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When it became due; `now - due` is how long it waited.
    pub due: DateTime<Utc>,
}

/// A scheduled slot that could not start before the next slot of the same
/// target came due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missed {
    pub target: String,
    pub slot: DateTime<Utc>,
    /// The slot that took its place in the queue.
    pub next: DateTime<Utc>,
}

/// A waiting job given up because no agent serving its target was connected
/// for the agent grace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expired {
    pub ticket: Ticket,
    pub target: String,
    pub kind: JobKind,
    pub attempt: u32,
    /// When it is tried again, if it is.
    pub retry_at: Option<DateTime<Utc>>,
}

/// Everything one `poll` decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Poll {
    pub starts: Vec<Start>,
    pub missed: Vec<Missed>,
    pub expired: Vec<Expired>,
}

/// How a started job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    /// Stopped by a planned agent stop: tried again once the agent is back.
    Interrupted,
}

/// What `finished` decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Nothing more for this request.
    Done,
    /// Queued again; attempt `attempt` starts at `at` at the earliest.
    Retry { at: DateTime<Utc>, attempt: u32 },
}

#[derive(Clone, Debug)]
struct Waiting {
    ticket: Ticket,
    target: String,
    kind: JobKind,
    attempt: u32,
    due: DateTime<Utc>,
    not_before: DateTime<Utc>,
    /// Since when it has been ready but its target had no agent.
    unreachable_since: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug)]
struct Running {
    target: String,
    kind: JobKind,
    attempt: u32,
    due: DateTime<Utc>,
}

#[derive(Clone, Debug, Default)]
struct Entry {
    schedule: Option<Schedule>,
    next_slot: Option<DateTime<Utc>>,
    /// Every slot up to this one has been acted on (persisted by the driver).
    accounted: Option<DateTime<Utc>>,
    /// When a backup of this target last started: the tie-breaker.
    last_started: Option<DateTime<Utc>>,
    /// The least time between two scheduled starts (see the module doc).
    throttle: Option<Duration>,
    /// When a scheduled backup of this target last started.
    last_scheduled_start: Option<DateTime<Utc>>,
}

impl Entry {
    /// A throttled target's scheduled backups start no sooner than this.
    fn throttle_until(&self) -> Option<DateTime<Utc>> {
        Some(self.last_scheduled_start? + self.throttle?)
    }

    /// The first slot after `now` that the throttle lets through.
    fn first_slot_after(&self, s: &Schedule, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let next = s.next_after(now)?;
        match self.throttle_until() {
            Some(until) if next < until => s.at_or_after(until),
            _ => Some(next),
        }
    }
}

/// When a waiting job may start at the earliest: its own `not_before`, and
/// for a scheduled run of a throttled target the throttle.
fn ready_at(entries: &BTreeMap<String, Entry>, w: &Waiting) -> DateTime<Utc> {
    let throttle = match w.kind {
        JobKind::Scheduled { .. } => entries.get(&w.target).and_then(Entry::throttle_until),
        JobKind::Manual => None,
    };
    throttle.map_or(w.not_before, |t| t.max(w.not_before))
}

#[derive(Debug)]
pub struct Planner {
    entries: BTreeMap<String, Entry>,
    waiting: Vec<Waiting>,
    running: BTreeMap<Ticket, Running>,
    next_ticket: Ticket,
    max_concurrent: usize,
    retry: RetryPolicy,
    agent_grace: Duration,
}

impl Planner {
    pub fn new(max_concurrent: usize, retry: RetryPolicy, agent_grace: Duration) -> Self {
        Self {
            entries: BTreeMap::new(),
            waiting: Vec::new(),
            running: BTreeMap::new(),
            next_ticket: 1,
            max_concurrent: max_concurrent.max(1),
            retry,
            agent_grace,
        }
    }

    fn ticket(&mut self) -> Ticket {
        let t = self.next_ticket;
        self.next_ticket += 1;
        t
    }

    fn waiting_scheduled(&self, target: &str) -> Option<usize> {
        self.waiting
            .iter()
            .position(|w| w.target == target && matches!(w.kind, JobKind::Scheduled { .. }))
    }

    /// Sets or changes a target's schedule. `accounted` is the last slot acted
    /// on before (from the catalog); if a slot was missed since — the
    /// coordinator was down — exactly one run is due at once, however many
    /// slots were missed. A target seen for the first time (`None`) starts
    /// from now: nothing was missed.
    pub fn set_schedule(
        &mut self,
        target: &str,
        schedule: Option<Schedule>,
        accounted: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) {
        self.set_throttled_schedule(target, schedule, None, accounted, now)
    }

    /// [`Planner::set_schedule`] with a throttle: scheduled backups of the
    /// target start at least `throttle` apart (see the module doc).
    pub fn set_throttled_schedule(
        &mut self,
        target: &str,
        schedule: Option<Schedule>,
        throttle: Option<Duration>,
        accounted: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) {
        let e = self.entries.entry(target.to_string()).or_default();
        if e.schedule == schedule && e.schedule.is_some() && e.throttle == throttle {
            return;
        }
        e.schedule = schedule;
        e.throttle = throttle;
        let Some(s) = e.schedule.clone() else {
            e.next_slot = None;
            self.drop_waiting_scheduled(target);
            return;
        };
        e.next_slot = e.first_slot_after(&s, now);
        let last = s.last_at_or_before(now);
        let accounted = accounted.or(e.accounted);
        let until = e.throttle_until();
        let too_soon = |slot: DateTime<Utc>| until.is_some_and(|u| slot < u);
        let catch_up = match (accounted, last) {
            // A missed slot within the throttle is skipped, not caught up.
            (Some(acc), Some(last)) if last > acc && too_soon(last) => {
                e.accounted = Some(last);
                None
            }
            (Some(acc), Some(last)) if last > acc => {
                e.accounted = Some(last);
                Some(last)
            }
            (Some(acc), _) => {
                e.accounted = Some(acc);
                None
            }
            (None, last) => {
                e.accounted = last;
                None
            }
        };
        if let Some(slot) = catch_up {
            if self.waiting_scheduled(target).is_none() {
                let ticket = self.ticket();
                self.waiting.push(Waiting {
                    ticket,
                    target: target.to_string(),
                    kind: JobKind::Scheduled { slot },
                    attempt: 1,
                    due: slot,
                    not_before: now,
                    unreachable_since: None,
                });
            }
        }
    }

    /// When a scheduled backup of `target` last started, if the planner does
    /// not know better (after a restart: the newest scheduled backup in the
    /// catalog), so the throttle holds across a restart.
    pub fn seed_last_scheduled_start(&mut self, target: &str, at: DateTime<Utc>) {
        let e = self.entries.entry(target.to_string()).or_default();
        if e.last_scheduled_start.is_none_or(|t| t < at) {
            e.last_scheduled_start = Some(at);
            if let Some(s) = e.schedule.clone() {
                if let (Some(next), Some(until)) = (e.next_slot, e.throttle_until()) {
                    if next < until {
                        e.next_slot = s.at_or_after(until);
                    }
                }
            }
        }
    }

    fn drop_waiting_scheduled(&mut self, target: &str) {
        self.waiting
            .retain(|w| !(w.target == target && matches!(w.kind, JobKind::Scheduled { .. })));
    }

    /// Removes a target's schedule and its waiting scheduled run (a running
    /// one and manual requests are kept).
    pub fn unschedule(&mut self, target: &str) {
        if let Some(e) = self.entries.get_mut(target) {
            e.schedule = None;
            e.next_slot = None;
        }
        self.drop_waiting_scheduled(target);
    }

    /// The last slot acted on, for the driver to persist.
    pub fn accounted(&self, target: &str) -> Option<DateTime<Utc>> {
        self.entries.get(target).and_then(|e| e.accounted)
    }

    /// Queues a manual backup of `target`; it waits its turn like any other.
    pub fn enqueue_manual(&mut self, target: &str, now: DateTime<Utc>) -> Ticket {
        self.entries.entry(target.to_string()).or_default();
        let ticket = self.ticket();
        self.waiting.push(Waiting {
            ticket,
            target: target.to_string(),
            kind: JobKind::Manual,
            attempt: 1,
            due: now,
            not_before: now,
            unreachable_since: None,
        });
        ticket
    }

    /// Takes a request that has not started out of the queue (its requester
    /// went away). Returns whether it was waiting.
    pub fn withdraw(&mut self, ticket: Ticket) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|w| w.ticket != ticket);
        self.waiting.len() != before
    }

    fn order_key(&self, w: &Waiting) -> (DateTime<Utc>, Option<DateTime<Utc>>, Ticket) {
        let last = self.entries.get(&w.target).and_then(|e| e.last_started);
        (w.due, last, w.ticket)
    }

    fn target_running(&self, target: &str) -> bool {
        self.running.values().any(|r| r.target == target)
    }

    /// Advances to `now`: slots that came due join the queue (one waiting run
    /// per target: a slot still waiting when the next one comes is missed),
    /// jobs whose agent stayed away for the grace are given up, and ready jobs
    /// start, oldest-due first, while fewer than the limit run. `connected`
    /// says whether an agent serving a target is connected: a job of a target
    /// without one never takes a slot.
    pub fn poll(&mut self, now: DateTime<Utc>, connected: &dyn Fn(&str) -> bool) -> Poll {
        let mut out = Poll::default();
        let due_slots: Vec<(String, DateTime<Utc>)> = self
            .entries
            .iter_mut()
            .filter_map(|(t, e)| {
                let (Some(s), Some(next)) = (&e.schedule, e.next_slot) else {
                    return None;
                };
                if next > now {
                    return None;
                }
                let slot = s.last_at_or_before(now).unwrap_or(next).max(next);
                e.accounted = Some(slot);
                e.next_slot = e.first_slot_after(s, now);
                Some((t.clone(), slot))
            })
            .collect();
        for (target, slot) in due_slots {
            match self.waiting_scheduled(&target) {
                Some(i) if self.waiting[i].attempt == 1 => {
                    // Never started: that slot is missed. The queued run now
                    // stands for the new slot and keeps its place. A run that
                    // waits for its agent is not a queue miss: the agent
                    // grace decides what becomes of it.
                    let w = &mut self.waiting[i];
                    if let (JobKind::Scheduled { slot: old }, None) = (w.kind, w.unreachable_since)
                    {
                        out.missed.push(Missed {
                            target: target.clone(),
                            slot: old,
                            next: slot,
                        });
                    }
                    w.kind = JobKind::Scheduled { slot };
                }
                Some(i) => {
                    // A retry of an older slot waiting for its backoff: the
                    // new slot supersedes it.
                    let ticket = self.waiting[i].ticket;
                    self.waiting[i] = Waiting {
                        ticket,
                        target: target.clone(),
                        kind: JobKind::Scheduled { slot },
                        attempt: 1,
                        due: slot,
                        not_before: slot,
                        unreachable_since: None,
                    };
                }
                None => {
                    let ticket = self.ticket();
                    self.waiting.push(Waiting {
                        ticket,
                        target,
                        kind: JobKind::Scheduled { slot },
                        attempt: 1,
                        due: slot,
                        not_before: slot,
                        unreachable_since: None,
                    });
                }
            }
        }

        // Jobs whose target has no agent: wait for it, up to the grace.
        let grace = self.agent_grace;
        let mut expired = Vec::new();
        let entries = &self.entries;
        for w in self
            .waiting
            .iter_mut()
            .filter(|w| ready_at(entries, w) <= now)
        {
            if connected(&w.target) {
                w.unreachable_since = None;
            } else {
                let since = *w.unreachable_since.get_or_insert(now);
                if now - since >= grace {
                    expired.push(w.ticket);
                }
            }
        }
        for ticket in expired {
            let Some(i) = self.waiting.iter().position(|w| w.ticket == ticket) else {
                continue;
            };
            let w = self.waiting.remove(i);
            let retry_at = match w.kind {
                JobKind::Scheduled { .. }
                    if w.attempt < self.retry.attempts
                        && self
                            .entries
                            .get(&w.target)
                            .is_some_and(|e| e.schedule.is_some()) =>
                {
                    let at = now + self.retry.backoff(w.attempt);
                    self.waiting.push(Waiting {
                        attempt: w.attempt + 1,
                        due: at,
                        not_before: at,
                        unreachable_since: None,
                        ..w.clone()
                    });
                    Some(at)
                }
                _ => None,
            };
            out.expired.push(Expired {
                ticket: w.ticket,
                target: w.target,
                kind: w.kind,
                attempt: w.attempt,
                retry_at,
            });
        }

        // Admission, oldest due first, fair among equals.
        let mut ready: Vec<(_, Ticket)> = self
            .waiting
            .iter()
            .filter(|w| ready_at(&self.entries, w) <= now && connected(&w.target))
            .map(|w| (self.order_key(w), w.ticket))
            .collect();
        ready.sort();
        for (_, ticket) in ready {
            if self.running.len() >= self.max_concurrent {
                break;
            }
            let Some(i) = self.waiting.iter().position(|w| w.ticket == ticket) else {
                continue;
            };
            if self.target_running(&self.waiting[i].target) {
                continue;
            }
            let w = self.waiting.remove(i);
            if let Some(e) = self.entries.get_mut(&w.target) {
                e.last_started = Some(now);
                if matches!(w.kind, JobKind::Scheduled { .. }) {
                    e.last_scheduled_start = Some(now);
                    // Slots closer than the throttle to this start are skipped.
                    if let (Some(s), Some(next), Some(until)) =
                        (e.schedule.clone(), e.next_slot, e.throttle_until())
                    {
                        if next < until {
                            e.next_slot = s.at_or_after(until);
                        }
                    }
                }
            }
            self.running.insert(
                w.ticket,
                Running {
                    target: w.target.clone(),
                    kind: w.kind,
                    attempt: w.attempt,
                    due: w.due,
                },
            );
            out.starts.push(Start {
                ticket: w.ticket,
                target: w.target,
                kind: w.kind,
                attempt: w.attempt,
                due: w.due,
            });
        }
        out
    }

    /// Records how a started job ended. A failed scheduled run is retried with
    /// exponential backoff until the attempts are used up (unless a newer
    /// slot already waits); an interrupted one, scheduled or manual, is queued
    /// again at its old place and starts once its agent is back.
    pub fn finished(&mut self, ticket: Ticket, outcome: Outcome, now: DateTime<Utc>) -> After {
        let Some(run) = self.running.remove(&ticket) else {
            return After::Done;
        };
        if outcome == Outcome::Succeeded || run.attempt >= self.retry.attempts {
            return After::Done;
        }
        let scheduled = matches!(run.kind, JobKind::Scheduled { .. });
        if scheduled {
            let still_scheduled = self
                .entries
                .get(&run.target)
                .is_some_and(|e| e.schedule.is_some());
            if !still_scheduled || self.waiting_scheduled(&run.target).is_some() {
                return After::Done;
            }
        }
        let (due, at) = match (outcome, scheduled) {
            (Outcome::Interrupted, _) => (run.due, now),
            (Outcome::Failed, true) => {
                let at = now + self.retry.backoff(run.attempt);
                (at, at)
            }
            // A manual backup that failed is reported, not retried.
            _ => return After::Done,
        };
        self.waiting.push(Waiting {
            ticket,
            target: run.target,
            kind: run.kind,
            attempt: run.attempt + 1,
            due,
            not_before: at,
            unreachable_since: None,
        });
        After::Retry {
            at,
            attempt: run.attempt + 1,
        }
    }

    /// How many ready jobs would start before `ticket` (`None`: it is not
    /// waiting).
    pub fn ahead_of(
        &self,
        ticket: Ticket,
        now: DateTime<Utc>,
        connected: &dyn Fn(&str) -> bool,
    ) -> Option<usize> {
        let me = self.waiting.iter().find(|w| w.ticket == ticket)?;
        let key = self.order_key(me);
        Some(
            self.waiting
                .iter()
                .filter(|w| {
                    w.ticket != ticket && ready_at(&self.entries, w) <= now && connected(&w.target)
                })
                .filter(|w| self.order_key(w) < key)
                .count(),
        )
    }

    /// Tickets of the manual requests still waiting.
    pub fn waiting_manual(&self) -> Vec<Ticket> {
        self.waiting
            .iter()
            .filter(|w| w.kind == JobKind::Manual)
            .map(|w| w.ticket)
            .collect()
    }

    /// Jobs running now.
    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    /// Jobs waiting (ready or not).
    pub fn waiting_count(&self) -> usize {
        self.waiting.len()
    }

    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    /// When `poll` next has something to do (a finished job also wakes it).
    pub fn next_wakeup(&self) -> Option<DateTime<Utc>> {
        let slots = self.entries.values().filter_map(|e| e.next_slot);
        let waits = self.waiting.iter().map(|w| match w.unreachable_since {
            Some(since) => since + self.agent_grace,
            None => ready_at(&self.entries, w),
        });
        slots.chain(waits).min()
    }

    /// When the target's next scheduled backup starts (at the earliest).
    pub fn next_run(&self, target: &str) -> Option<DateTime<Utc>> {
        let e = self.entries.get(target)?;
        let waiting = self
            .waiting
            .iter()
            .filter(|w| w.target == target && matches!(w.kind, JobKind::Scheduled { .. }))
            .map(|w| ready_at(&self.entries, w))
            .min();
        match (waiting, e.next_slot) {
            (Some(w), Some(n)) => Some(w.min(n)),
            (w, n) => w.or(n),
        }
    }

    /// Every target the planner knows.
    pub fn targets(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    pub fn schedule(&self, target: &str) -> Option<&Schedule> {
        self.entries.get(target).and_then(|e| e.schedule.as_ref())
    }

    pub fn is_running(&self, target: &str) -> bool {
        self.target_running(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use chrono_tz::Tz;
    use std::collections::{BTreeMap, HashMap};

    fn t(d: u32, h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 3, d, h, m, s).unwrap()
    }

    fn daily() -> Schedule {
        Schedule::parse("0 2 * * *", Tz::UTC).unwrap()
    }

    fn planner(max: usize) -> Planner {
        Planner::new(max, RetryPolicy::default(), Duration::seconds(30))
    }

    const ALL: &dyn Fn(&str) -> bool = &|_| true;

    fn starts(p: &mut Planner, now: DateTime<Utc>) -> Vec<Start> {
        p.poll(now, ALL).starts
    }

    fn names(s: &[Start]) -> Vec<&str> {
        s.iter().map(|s| s.target.as_str()).collect()
    }

    fn ticket_of(p: &Planner, target: &str) -> Ticket {
        *p.running
            .iter()
            .find(|(_, r)| r.target == target)
            .map(|(t, _)| t)
            .unwrap_or_else(|| panic!("{target} is not running"))
    }

    fn finish(p: &mut Planner, target: &str, o: Outcome, now: DateTime<Utc>) -> After {
        let ticket = ticket_of(p, target);
        p.finished(ticket, o, now)
    }

    #[test]
    fn missed_slots_run_once_at_start_up() {
        let mut p = planner(4);
        // last run was on the 1st; the coordinator comes back on the 4th at 10:00
        p.set_schedule("a", Some(daily()), Some(t(1, 2, 0, 0)), t(4, 10, 0, 0));
        let s = starts(&mut p, t(4, 10, 0, 0));
        assert_eq!(s.len(), 1);
        assert_eq!(
            (s[0].target.as_str(), s[0].kind, s[0].attempt),
            (
                "a",
                JobKind::Scheduled {
                    slot: t(4, 2, 0, 0)
                },
                1
            )
        );
        assert_eq!(p.accounted("a"), Some(t(4, 2, 0, 0)));
        finish(&mut p, "a", Outcome::Succeeded, t(4, 10, 5, 0));
        assert!(starts(&mut p, t(4, 10, 6, 0)).is_empty());
        assert_eq!(p.next_wakeup(), Some(t(5, 2, 0, 0)));

        // nothing missed: no catch-up
        let mut p = planner(4);
        p.set_schedule("a", Some(daily()), Some(t(4, 2, 0, 0)), t(4, 10, 0, 0));
        assert!(starts(&mut p, t(4, 10, 0, 0)).is_empty());
        // a new target starts from now
        p.set_schedule("b", Some(daily()), None, t(4, 10, 0, 0));
        assert!(starts(&mut p, t(4, 10, 0, 0)).is_empty());
        assert_eq!(p.accounted("b"), Some(t(4, 2, 0, 0)));
        assert_eq!(p.next_run("b"), Some(t(5, 2, 0, 0)));
    }

    #[test]
    fn every_slot_runs_exactly_once_however_often_it_is_polled() {
        let every10 = Schedule::parse("*/10 * * * * *", Tz::UTC).unwrap();
        let mut p = planner(4);
        let start = t(1, 0, 0, 1);
        p.set_schedule("a", Some(every10), None, start);
        let mut now = start;
        let mut slots = Vec::new();
        // an hour, polled at irregular intervals of 1..7 s; runs take 2 s
        let mut i = 0u64;
        while now < start + Duration::hours(1) {
            let poll = p.poll(now, ALL);
            assert!(poll.missed.is_empty(), "{:?}", poll.missed);
            for s in poll.starts {
                match s.kind {
                    JobKind::Scheduled { slot } => slots.push(slot),
                    JobKind::Manual => panic!("no manual jobs here"),
                }
            }
            if p.is_running("a") {
                finish(&mut p, "a", Outcome::Succeeded, now + Duration::seconds(2));
            }
            i += 1;
            now += Duration::seconds(1 + (i * 7919 % 7) as i64);
        }
        let mut dedup = slots.clone();
        dedup.dedup();
        assert_eq!(dedup, slots, "a slot ran twice");
        // polls up to 7 s apart never skip a 10 s slot
        assert_eq!(slots.len(), 360, "{:?}", &slots[..5]);
        assert!(slots.iter().all(|s| s.timestamp() % 10 == 0));
    }

    #[test]
    fn concurrency_limit_queues_the_rest() {
        let mut p = planner(2);
        let now = t(1, 1, 0, 0);
        for name in ["a", "b", "c", "d"] {
            p.set_schedule(name, Some(daily()), None, now);
        }
        let first = starts(&mut p, t(1, 2, 0, 0));
        assert_eq!(first.len(), 2);
        assert!(
            starts(&mut p, t(1, 2, 0, 30)).is_empty(),
            "limit of 2 is held"
        );
        assert_eq!((p.running_count(), p.waiting_count()), (2, 2));
        let first_done = first[0].target.clone();
        finish(&mut p, &first_done, Outcome::Succeeded, t(1, 2, 1, 0));
        let next = starts(&mut p, t(1, 2, 1, 0));
        assert_eq!(next.len(), 1);
        assert_eq!(
            next[0].kind,
            JobKind::Scheduled {
                slot: t(1, 2, 0, 0)
            }
        );
        assert_eq!(next[0].due, t(1, 2, 0, 0), "it kept its due time");
        finish(&mut p, &first[1].target, Outcome::Succeeded, t(1, 2, 2, 0));
        finish(&mut p, &next[0].target, Outcome::Succeeded, t(1, 2, 2, 0));
        let last = starts(&mut p, t(1, 2, 2, 0));
        let mut all: Vec<&str> = names(&first);
        all.extend(names(&next));
        all.extend(names(&last));
        all.sort();
        assert_eq!(all, vec!["a", "b", "c", "d"]);
        assert!(starts(&mut p, t(1, 3, 0, 0)).is_empty());
    }

    #[test]
    fn manual_and_scheduled_share_the_limit_in_due_order() {
        let mut p = planner(1);
        p.set_schedule("s", Some(daily()), None, t(1, 1, 0, 0));
        let m1 = p.enqueue_manual("m", t(1, 1, 59, 0));
        let m2 = p.enqueue_manual("n", t(1, 2, 0, 30));
        // m became due first
        let s = starts(&mut p, t(1, 2, 1, 0));
        assert_eq!(names(&s), vec!["m"]);
        assert_eq!(s[0].ticket, m1);
        assert_eq!(
            p.ahead_of(m2, t(1, 2, 1, 0), ALL),
            Some(1),
            "the 2:00 slot is ahead"
        );
        assert_eq!(
            p.finished(m1, Outcome::Succeeded, t(1, 2, 2, 0)),
            After::Done
        );
        assert_eq!(names(&starts(&mut p, t(1, 2, 2, 0))), vec!["s"]);
        assert_eq!(p.ahead_of(m2, t(1, 2, 2, 0), ALL), Some(0));
        finish(&mut p, "s", Outcome::Succeeded, t(1, 2, 3, 0));
        let s = starts(&mut p, t(1, 2, 3, 0));
        assert_eq!((s[0].ticket, s[0].kind), (m2, JobKind::Manual));
        // a failed manual backup is reported, not retried
        assert_eq!(p.finished(m2, Outcome::Failed, t(1, 2, 4, 0)), After::Done);
        assert_eq!(p.waiting_count(), 0);
    }

    #[test]
    fn one_backup_per_target_at_a_time() {
        let mut p = planner(4);
        let a1 = p.enqueue_manual("a", t(1, 0, 0, 0));
        let a2 = p.enqueue_manual("a", t(1, 0, 0, 1));
        let b = p.enqueue_manual("b", t(1, 0, 0, 2));
        let s = starts(&mut p, t(1, 0, 0, 3));
        assert_eq!(s.iter().map(|s| s.ticket).collect::<Vec<_>>(), vec![a1, b]);
        assert!(starts(&mut p, t(1, 0, 0, 4)).is_empty());
        p.finished(a1, Outcome::Succeeded, t(1, 0, 0, 5));
        assert_eq!(starts(&mut p, t(1, 0, 0, 5))[0].ticket, a2);
    }

    #[test]
    fn a_withdrawn_request_never_starts() {
        let mut p = planner(1);
        let a = p.enqueue_manual("a", t(1, 0, 0, 0));
        let b = p.enqueue_manual("b", t(1, 0, 0, 1));
        assert_eq!(starts(&mut p, t(1, 0, 0, 2))[0].ticket, a);
        assert!(p.withdraw(b));
        assert!(!p.withdraw(b));
        p.finished(a, Outcome::Succeeded, t(1, 0, 0, 3));
        assert!(starts(&mut p, t(1, 0, 0, 3)).is_empty());
    }

    #[test]
    fn failures_retry_with_backoff_then_give_up() {
        let mut p = planner(4);
        p.set_schedule("a", Some(daily()), None, t(1, 1, 0, 0));
        let s = starts(&mut p, t(1, 2, 0, 0));
        assert_eq!(s[0].attempt, 1);
        assert_eq!(
            finish(&mut p, "a", Outcome::Failed, t(1, 2, 0, 10)),
            After::Retry {
                at: t(1, 2, 1, 10),
                attempt: 2
            }
        );
        assert!(
            starts(&mut p, t(1, 2, 1, 9)).is_empty(),
            "not before the backoff"
        );
        let s = starts(&mut p, t(1, 2, 1, 10));
        assert_eq!(
            (s[0].attempt, s[0].kind),
            (
                2,
                JobKind::Scheduled {
                    slot: t(1, 2, 0, 0)
                }
            )
        );
        assert_eq!(
            finish(&mut p, "a", Outcome::Failed, t(1, 2, 1, 20)),
            After::Retry {
                at: t(1, 2, 3, 20),
                attempt: 3
            }
        );
        let s = starts(&mut p, t(1, 2, 3, 20));
        assert_eq!(s[0].attempt, 3);
        assert_eq!(
            finish(&mut p, "a", Outcome::Failed, t(1, 2, 3, 30)),
            After::Done,
            "3 attempts used"
        );
        assert!(starts(&mut p, t(1, 12, 0, 0)).is_empty());
        // the next slot starts afresh
        assert_eq!(starts(&mut p, t(2, 2, 0, 0))[0].attempt, 1);
        // a success stops retrying
        assert_eq!(
            finish(&mut p, "a", Outcome::Succeeded, t(2, 2, 0, 5)),
            After::Done
        );
        assert!(starts(&mut p, t(2, 3, 0, 0)).is_empty());
    }

    #[test]
    fn a_slot_that_comes_while_running_waits_for_the_run() {
        let hourly = Schedule::parse("0 * * * *", Tz::UTC).unwrap();
        let mut p = planner(4);
        p.set_schedule("a", Some(hourly), None, t(1, 0, 30, 0));
        assert_eq!(starts(&mut p, t(1, 1, 0, 0)).len(), 1);
        // still running at 2:00 and 3:00: one run queued, not two; the 2:00
        // slot never started before 3:00 came, so it is missed
        let two = p.poll(t(1, 2, 0, 0), ALL);
        assert!(two.starts.is_empty() && two.missed.is_empty());
        let three = p.poll(t(1, 3, 0, 0), ALL);
        assert!(three.starts.is_empty());
        assert_eq!(
            three.missed,
            vec![Missed {
                target: "a".into(),
                slot: t(1, 2, 0, 0),
                next: t(1, 3, 0, 0)
            }]
        );
        finish(&mut p, "a", Outcome::Succeeded, t(1, 3, 10, 0));
        let s = starts(&mut p, t(1, 3, 10, 0));
        assert_eq!(s.len(), 1);
        assert_eq!(
            s[0].kind,
            JobKind::Scheduled {
                slot: t(1, 3, 0, 0)
            }
        );
        assert_eq!(s[0].due, t(1, 2, 0, 0), "kept the place of the 2:00 slot");
        assert!(starts(&mut p, t(1, 3, 20, 0)).is_empty());
    }

    #[test]
    fn interrupted_runs_wait_for_their_agent_and_keep_their_place() {
        let mut p = planner(1);
        p.set_schedule("a", Some(daily()), None, t(1, 1, 0, 0));
        let s = starts(&mut p, t(1, 2, 0, 0));
        let m = p.enqueue_manual("b", t(1, 2, 0, 5));
        // the agent of a stops on purpose mid-backup
        assert_eq!(
            p.finished(s[0].ticket, Outcome::Interrupted, t(1, 2, 0, 10)),
            After::Retry {
                at: t(1, 2, 0, 10),
                attempt: 2
            }
        );
        // while it is away, b goes first (a never takes the slot)
        let away: &dyn Fn(&str) -> bool = &|t| t != "a";
        let s2 = p.poll(t(1, 2, 0, 11), away).starts;
        assert_eq!(s2[0].ticket, m);
        p.finished(m, Outcome::Succeeded, t(1, 2, 0, 20));
        // back within the grace: a runs again, the same request, attempt 2
        let s3 = starts(&mut p, t(1, 2, 0, 25));
        assert_eq!(
            (s3[0].ticket, s3[0].attempt, s3[0].due),
            (s[0].ticket, 2, t(1, 2, 0, 0))
        );
        // an interrupted manual backup is queued again too
        let m2 = p.enqueue_manual("b", t(1, 2, 1, 0));
        p.finished(s3[0].ticket, Outcome::Succeeded, t(1, 2, 1, 0));
        assert_eq!(starts(&mut p, t(1, 2, 1, 0))[0].ticket, m2);
        assert!(matches!(
            p.finished(m2, Outcome::Interrupted, t(1, 2, 1, 5)),
            After::Retry { attempt: 2, .. }
        ));
        assert_eq!(starts(&mut p, t(1, 2, 1, 6))[0].ticket, m2);
    }

    #[test]
    fn a_job_whose_agent_stays_away_is_given_up_after_the_grace() {
        let mut p = planner(2);
        p.set_schedule("a", Some(daily()), None, t(1, 1, 0, 0));
        let m = p.enqueue_manual("a", t(1, 1, 59, 50));
        let none: &dyn Fn(&str) -> bool = &|_| false;
        let first = p.poll(t(1, 2, 0, 0), none);
        assert!(first.starts.is_empty() && first.expired.is_empty());
        assert_eq!(p.next_wakeup(), Some(t(1, 2, 0, 0) + Duration::seconds(30)));
        assert!(p.poll(t(1, 2, 0, 29), none).expired.is_empty());
        let gone = p.poll(t(1, 2, 0, 31), none).expired;
        let kinds: Vec<_> = gone.iter().map(|e| (e.ticket == m, e.retry_at)).collect();
        assert_eq!(
            kinds,
            vec![(true, None), (false, Some(t(1, 2, 1, 31)))],
            "the manual request is dropped, the slot retried after the backoff"
        );
        assert_eq!(p.waiting_count(), 1);
        assert_eq!(p.running_count(), 0, "nothing took a slot");
    }

    #[test]
    fn slots_of_a_target_waiting_for_its_agent_are_not_queue_misses() {
        let every10 = Schedule::parse("*/10 * * * * *", Tz::UTC).unwrap();
        let mut p = planner(1);
        p.set_schedule("a", Some(every10), None, t(1, 0, 0, 1));
        let none: &dyn Fn(&str) -> bool = &|_| false;
        let mut missed = 0;
        for s in (10..=25).step_by(5) {
            missed += p.poll(t(1, 0, 0, s), none).missed.len();
        }
        assert_eq!(missed, 0);
        assert_eq!(p.waiting_count(), 1, "one run still waits for the agent");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let r = RetryPolicy {
            attempts: 10,
            first_backoff: Duration::seconds(10),
            max_backoff: Duration::seconds(100),
        };
        let waits: Vec<i64> = (1..=6).map(|a| r.backoff(a).num_seconds()).collect();
        assert_eq!(waits, vec![10, 20, 40, 80, 100, 100]);
    }

    /// The fleet of the issue: 60 targets on a 5-second schedule, far more
    /// work than the limit allows. Every target is served in turn, nobody
    /// starves, and each slot is exactly either started or counted missed.
    #[test]
    fn when_demand_exceeds_capacity_no_target_starves_and_missed_slots_are_exact() {
        let every5 = Schedule::parse("*/5 * * * * *", Tz::UTC).unwrap();
        let names: Vec<String> = (0..60).map(|i| format!("t{i:02}")).collect();
        let start = t(1, 0, 0, 1);
        let mut p = planner(4);
        for n in &names {
            p.set_schedule(n, Some(every5.clone()), None, start);
        }
        let mut slots: HashMap<String, u32> = HashMap::new();
        let mut started: HashMap<String, u32> = HashMap::new();
        let mut missed: HashMap<String, u32> = HashMap::new();
        let mut max_wait = Duration::zero();
        // running: ticket -> (target, ends at); runs take 1..3 s
        let mut running: BTreeMap<Ticket, (String, DateTime<Utc>)> = BTreeMap::new();
        let mut now = start;
        let end = start + Duration::seconds(600);
        let mut k = 0u64;
        let mut last_slot: Option<DateTime<Utc>> = None;
        while now < end {
            // finish what is done
            let done: Vec<Ticket> = running
                .iter()
                .filter(|(_, (_, until))| *until <= now)
                .map(|(t, _)| *t)
                .collect();
            for ticket in done {
                running.remove(&ticket);
                p.finished(ticket, Outcome::Succeeded, now);
            }
            let poll = p.poll(now, ALL);
            let this_slot = every5.last_at_or_before(now);
            if this_slot != last_slot && this_slot.is_some_and(|s| s > start) {
                for n in &names {
                    *slots.entry(n.clone()).or_default() += 1;
                }
                last_slot = this_slot;
            }
            for m in poll.missed {
                *missed.entry(m.target).or_default() += 1;
            }
            assert!(p.running_count() <= 4);
            for s in poll.starts {
                max_wait = max_wait.max(now - s.due);
                *started.entry(s.target.clone()).or_default() += 1;
                k += 1;
                running.insert(
                    s.ticket,
                    (s.target, now + Duration::seconds(1 + (k * 7919 % 3) as i64)),
                );
            }
            now += Duration::milliseconds(250);
        }
        let counts: Vec<u32> = names
            .iter()
            .map(|n| started.get(n).copied().unwrap_or(0))
            .collect();
        let (min, max) = (
            counts.iter().copied().min().unwrap_or(0),
            counts.iter().copied().max().unwrap_or(0),
        );
        assert!(min >= 10, "a target starved: {counts:?}");
        assert!(max - min <= 1, "unfair: {counts:?}");
        // Every slot of every target either started, was missed, or is the one
        // still waiting (or running) at the end.
        for n in &names {
            let s = slots[n];
            let st = started.get(n).copied().unwrap_or(0);
            let mi = missed.get(n).copied().unwrap_or(0);
            let pending = p.waiting.iter().filter(|w| &w.target == n).count() as u32;
            assert_eq!(
                s,
                st + mi + pending,
                "{n}: slots {s}, started {st}, missed {mi}, waiting {pending}"
            );
        }
        // Nothing waits much longer than one round of the whole fleet.
        assert!(max_wait <= Duration::seconds(60), "waited {max_wait}");
    }

    /// Drives a planner like the driver does, over simulated time: polls at
    /// `step`, runs take `run` and end with `outcome(k)` for the k-th start.
    /// Returns the scheduled starts of target `a` (attempt, time) and the
    /// missed slots.
    fn simulate(
        p: &mut Planner,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        step: Duration,
        run: Duration,
        outcome: &dyn Fn(usize) -> Outcome,
    ) -> (Vec<(u32, DateTime<Utc>)>, usize) {
        let mut starts = Vec::new();
        let mut missed = 0;
        let mut running: Vec<(Ticket, DateTime<Utc>, Outcome)> = Vec::new();
        let mut now = from;
        let mut k = 0;
        while now < until {
            for (ticket, _, o) in running.iter().filter(|(_, end, _)| *end <= now) {
                p.finished(*ticket, *o, now);
            }
            running.retain(|(_, end, _)| *end > now);
            let poll = p.poll(now, ALL);
            missed += poll.missed.len();
            for s in poll.starts {
                if matches!(s.kind, JobKind::Scheduled { .. }) && s.target == "a" {
                    starts.push((s.attempt, now));
                }
                k += 1;
                running.push((s.ticket, now + run, outcome(k)));
            }
            now += step;
        }
        (starts, missed)
    }

    fn min_gap(starts: &[(u32, DateTime<Utc>)]) -> Duration {
        starts
            .windows(2)
            .map(|w| w[1].1 - w[0].1)
            .min()
            .unwrap_or(Duration::MAX)
    }

    #[test]
    fn a_throttled_schedule_starts_no_more_often_than_its_interval() {
        let every_second = Schedule::parse("* * * * * *", Tz::UTC).unwrap();
        let from = t(1, 0, 0, 0) + Duration::milliseconds(300);
        let mut p = planner(4);
        p.set_throttled_schedule(
            "a",
            Some(every_second),
            Some(Duration::seconds(5)),
            None,
            from,
        );
        // polls that are a little late, as real ones are
        let (starts, missed) = simulate(
            &mut p,
            from,
            from + Duration::seconds(60),
            Duration::milliseconds(70),
            Duration::milliseconds(400),
            &|_| Outcome::Succeeded,
        );
        assert!(min_gap(&starts) >= Duration::seconds(5), "{starts:?}");
        // and no less often: the first slot at least 5 s after each start
        // (whole seconds, so every 6 s here), none missed
        assert!((10..=12).contains(&starts.len()), "{starts:?}");
        assert_eq!(missed, 0, "skipped slots are not missed slots");
        // the next run says when the throttle lets it
        let last = starts.last().unwrap().1;
        assert!(p.next_run("a").unwrap() >= last + Duration::seconds(5));
    }

    #[test]
    fn retries_and_interrupted_runs_wait_for_the_throttle_too() {
        // Two slots a second apart each minute: the second is within the
        // throttle, so a failed run's retry (1 s backoff) is what comes next.
        let twice_a_minute = Schedule::parse("0,1 * * * * *", Tz::UTC).unwrap();
        let from = t(1, 0, 0, 0);
        let mut p = Planner::new(
            1,
            RetryPolicy {
                attempts: 3,
                first_backoff: Duration::seconds(1),
                max_backoff: Duration::seconds(1),
            },
            Duration::seconds(30),
        );
        p.set_throttled_schedule(
            "a",
            Some(twice_a_minute),
            Some(Duration::seconds(10)),
            None,
            from,
        );
        let (starts, _) = simulate(
            &mut p,
            from,
            from + Duration::seconds(200),
            Duration::milliseconds(100),
            Duration::milliseconds(200),
            &|k| match k % 3 {
                1 => Outcome::Failed,
                2 => Outcome::Interrupted,
                _ => Outcome::Succeeded,
            },
        );
        // a retry after the failure and a run again after the interruption
        assert!(starts.iter().any(|(a, _)| *a == 3), "{starts:?}");
        assert!(min_gap(&starts) >= Duration::seconds(10), "{starts:?}");
    }

    #[test]
    fn after_a_restart_the_previous_start_still_counts() {
        let every_second = Schedule::parse("* * * * * *", Tz::UTC).unwrap();
        let started = t(1, 0, 0, 0);
        let now = t(1, 0, 0, 4);
        let mut p = planner(4);
        // the catalog says the last scheduled backup started 4 s ago and the
        // last slot acted on was then; a catch-up now would be too soon
        p.seed_last_scheduled_start("a", started);
        p.set_throttled_schedule(
            "a",
            Some(every_second.clone()),
            Some(Duration::seconds(10)),
            Some(started),
            now,
        );
        assert!(starts(&mut p, now).is_empty());
        assert_eq!(p.next_run("a"), Some(t(1, 0, 0, 10)));
        assert!(starts(&mut p, t(1, 0, 0, 9)).is_empty());
        assert_eq!(starts(&mut p, t(1, 0, 0, 10)).len(), 1);

        // without a throttle the same restart catches up at once
        let mut q = planner(4);
        q.seed_last_scheduled_start("a", started);
        q.set_schedule("a", Some(every_second), Some(started), now);
        assert_eq!(starts(&mut q, now).len(), 1);
    }

    #[test]
    fn manual_backups_are_not_throttled_and_do_not_move_the_schedule() {
        let every_minute = Schedule::parse("0 * * * * *", Tz::UTC).unwrap();
        let mut p = planner(4);
        p.set_throttled_schedule(
            "a",
            Some(every_minute),
            Some(Duration::minutes(2)),
            None,
            t(1, 0, 0, 30),
        );
        let s = starts(&mut p, t(1, 0, 1, 0));
        assert_eq!(s.len(), 1);
        p.finished(s[0].ticket, Outcome::Succeeded, t(1, 0, 1, 5));
        p.enqueue_manual("a", t(1, 0, 1, 10));
        let m = starts(&mut p, t(1, 0, 1, 10));
        assert_eq!(m.len(), 1, "a manual backup starts at once");
        p.finished(m[0].ticket, Outcome::Succeeded, t(1, 0, 1, 20));
        assert!(
            starts(&mut p, t(1, 0, 2, 0)).is_empty(),
            "01:00 + 2m > 02:00"
        );
        assert_eq!(p.next_run("a"), Some(t(1, 0, 3, 0)));
        assert_eq!(starts(&mut p, t(1, 0, 3, 0)).len(), 1);
    }

    proptest::proptest! {
        /// Whatever the schedule, interval, poll rhythm, run length and
        /// outcomes, two scheduled starts of a throttled target are never
        /// closer than the interval.
        #[test]
        fn throttled_starts_are_never_closer_than_the_interval(
            expr in proptest::sample::select(vec![
                "* * * * * *", "*/2 * * * * *", "*/7 * * * * *", "0,1,2 * * * * *",
                "*/3 * * * * *", "0 * * * * *",
            ]),
            interval_s in 1i64..40,
            step_ms in 50i64..1500,
            run_ms in 10i64..20_000,
            outcomes in proptest::collection::vec(0u8..3, 1..16),
            max in 1usize..3,
        ) {
            let s = Schedule::parse(expr, Tz::UTC).unwrap();
            let from = t(1, 0, 0, 0) + Duration::milliseconds(123);
            let mut p = Planner::new(max, RetryPolicy {
                attempts: 3,
                first_backoff: Duration::seconds(1),
                max_backoff: Duration::seconds(4),
            }, Duration::seconds(30));
            p.set_throttled_schedule("a", Some(s.clone()), Some(Duration::seconds(interval_s)), None, from);
            // a second, unthrottled target shares the queue
            p.set_schedule("b", Some(s), None, from);
            let (starts, _) = simulate(
                &mut p,
                from,
                from + Duration::seconds(240),
                Duration::milliseconds(step_ms),
                Duration::milliseconds(run_ms),
                &|k| match outcomes[k % outcomes.len()] {
                    0 => Outcome::Succeeded,
                    1 => Outcome::Failed,
                    _ => Outcome::Interrupted,
                },
            );
            proptest::prop_assert!(
                min_gap(&starts) >= Duration::seconds(interval_s),
                "{:?}", starts
            );
        }
    }
}
