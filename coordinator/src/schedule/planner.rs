//! The scheduler's decisions as a pure state machine over an injected "now":
//! which target's backup to start, when to retry, what waits for a free slot.
//! The async driver (`schedule::driver`) only feeds it the clock and the
//! outcomes, so missed-run catch-up, the concurrency limit and retries are
//! tested over simulated time without sleeping.

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

/// A backup the driver should start now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    pub target: String,
    /// The cron slot this run belongs to.
    pub slot: DateTime<Utc>,
    /// 1 for the first attempt of the slot.
    pub attempt: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Run {
    slot: DateTime<Utc>,
    attempt: u32,
    not_before: DateTime<Utc>,
}

#[derive(Clone, Debug, Default)]
struct Entry {
    schedule: Option<Schedule>,
    next_slot: Option<DateTime<Utc>>,
    /// Every slot up to this one has been acted on (persisted by the driver).
    accounted: Option<DateTime<Utc>>,
    /// A run waiting to start: a new slot, a retry, or one held back by the
    /// concurrency limit.
    pending: Option<Run>,
    running: Option<Run>,
}

#[derive(Debug)]
pub struct Planner {
    entries: BTreeMap<String, Entry>,
    max_concurrent: usize,
    retry: RetryPolicy,
}

impl Planner {
    pub fn new(max_concurrent: usize, retry: RetryPolicy) -> Self {
        Self {
            entries: BTreeMap::new(),
            max_concurrent: max_concurrent.max(1),
            retry,
        }
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
        let e = self.entries.entry(target.to_string()).or_default();
        if e.schedule == schedule && e.schedule.is_some() {
            return;
        }
        e.schedule = schedule;
        let Some(s) = &e.schedule else {
            e.next_slot = None;
            e.pending = None;
            return;
        };
        e.next_slot = s.next_after(now);
        let last = s.last_at_or_before(now);
        let accounted = accounted.or(e.accounted);
        match (accounted, last) {
            (Some(acc), Some(last)) if last > acc => {
                if e.pending.is_none() {
                    e.pending = Some(Run {
                        slot: last,
                        attempt: 1,
                        not_before: now,
                    });
                }
                e.accounted = Some(last);
            }
            (Some(acc), _) => e.accounted = Some(acc),
            (None, last) => e.accounted = last,
        }
    }

    /// Removes a target's schedule (keeps a running job's bookkeeping).
    pub fn unschedule(&mut self, target: &str) {
        if let Some(e) = self.entries.get_mut(target) {
            e.schedule = None;
            e.next_slot = None;
            e.pending = None;
        }
    }

    /// The last slot acted on, for the driver to persist.
    pub fn accounted(&self, target: &str) -> Option<DateTime<Utc>> {
        self.entries.get(target).and_then(|e| e.accounted)
    }

    /// Advances to `now`: slots that came due become pending (one per target,
    /// however many passed), and pending runs start while fewer than
    /// `max_concurrent` run, oldest first.
    pub fn poll(&mut self, now: DateTime<Utc>) -> Vec<Start> {
        for e in self.entries.values_mut() {
            let (Some(s), Some(next)) = (&e.schedule, e.next_slot) else {
                continue;
            };
            if next > now {
                continue;
            }
            let slot = s.last_at_or_before(now).unwrap_or(next).max(next);
            e.accounted = Some(slot);
            e.next_slot = s.next_after(now);
            // A new slot supersedes a retry of an older one.
            e.pending = Some(Run {
                slot,
                attempt: 1,
                not_before: slot.min(now),
            });
        }
        let mut running = self
            .entries
            .values()
            .filter(|e| e.running.is_some())
            .count();
        let mut ready: Vec<(DateTime<Utc>, String)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.running.is_none())
            .filter_map(|(t, e)| {
                e.pending
                    .as_ref()
                    .filter(|p| p.not_before <= now)
                    .map(|p| (p.not_before, t.clone()))
            })
            .collect();
        ready.sort();
        let mut out = Vec::new();
        for (_, target) in ready {
            if running >= self.max_concurrent {
                break;
            }
            let Some(e) = self.entries.get_mut(&target) else {
                continue;
            };
            let Some(run) = e.pending.take() else {
                continue;
            };
            out.push(Start {
                target: target.clone(),
                slot: run.slot,
                attempt: run.attempt,
            });
            e.running = Some(run);
            running += 1;
        }
        out
    }

    /// Records the outcome of a started run; a failure is retried with
    /// exponential backoff until the attempts are used up. Returns when the
    /// retry is due, if there is one.
    pub fn finished(
        &mut self,
        target: &str,
        ok: bool,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let e = self.entries.get_mut(target)?;
        let run = e.running.take()?;
        if ok || run.attempt >= self.retry.attempts || e.pending.is_some() || e.schedule.is_none() {
            return None;
        }
        let at = now + self.retry.backoff(run.attempt);
        e.pending = Some(Run {
            slot: run.slot,
            attempt: run.attempt + 1,
            not_before: at,
        });
        Some(at)
    }

    /// Puts a started run back without using up an attempt (the target was
    /// busy with a manual backup, say), to be tried again at `at`.
    pub fn postpone(&mut self, target: &str, at: DateTime<Utc>) {
        if let Some(e) = self.entries.get_mut(target) {
            if let Some(mut run) = e.running.take() {
                if e.pending.is_none() {
                    run.not_before = at;
                    e.pending = Some(run);
                }
            }
        }
    }

    /// When `poll` next has something to do.
    pub fn next_wakeup(&self) -> Option<DateTime<Utc>> {
        self.entries
            .values()
            .flat_map(|e| [e.next_slot, e.pending.as_ref().map(|p| p.not_before)])
            .flatten()
            .min()
    }

    /// When the target's next scheduled backup will start (at the earliest).
    pub fn next_run(&self, target: &str) -> Option<DateTime<Utc>> {
        let e = self.entries.get(target)?;
        match (&e.pending, e.next_slot) {
            (Some(p), Some(n)) => Some(p.not_before.min(n)),
            (Some(p), None) => Some(p.not_before),
            (None, n) => n,
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
        self.entries
            .get(target)
            .is_some_and(|e| e.running.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use chrono_tz::Tz;

    fn t(d: u32, h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 3, d, h, m, s).unwrap()
    }

    fn daily() -> Schedule {
        Schedule::parse("0 2 * * *", Tz::UTC).unwrap()
    }

    #[test]
    fn missed_slots_run_once_at_start_up() {
        let mut p = Planner::new(4, RetryPolicy::default());
        // last run was on the 1st; the coordinator comes back on the 4th at 10:00
        p.set_schedule("a", Some(daily()), Some(t(1, 2, 0, 0)), t(4, 10, 0, 0));
        let starts = p.poll(t(4, 10, 0, 0));
        assert_eq!(
            starts,
            vec![Start {
                target: "a".into(),
                slot: t(4, 2, 0, 0),
                attempt: 1
            }]
        );
        assert_eq!(p.accounted("a"), Some(t(4, 2, 0, 0)));
        p.finished("a", true, t(4, 10, 5, 0));
        assert!(p.poll(t(4, 10, 6, 0)).is_empty());
        assert_eq!(p.next_wakeup(), Some(t(5, 2, 0, 0)));

        // nothing missed: no catch-up
        let mut p = Planner::new(4, RetryPolicy::default());
        p.set_schedule("a", Some(daily()), Some(t(4, 2, 0, 0)), t(4, 10, 0, 0));
        assert!(p.poll(t(4, 10, 0, 0)).is_empty());
        // a new target starts from now
        p.set_schedule("b", Some(daily()), None, t(4, 10, 0, 0));
        assert!(p.poll(t(4, 10, 0, 0)).is_empty());
        assert_eq!(p.accounted("b"), Some(t(4, 2, 0, 0)));
        assert_eq!(p.next_run("b"), Some(t(5, 2, 0, 0)));
    }

    #[test]
    fn every_slot_runs_exactly_once_however_often_it_is_polled() {
        let every10 = Schedule::parse("*/10 * * * * *", Tz::UTC).unwrap();
        let mut p = Planner::new(4, RetryPolicy::default());
        let start = t(1, 0, 0, 1);
        p.set_schedule("a", Some(every10), None, start);
        let mut now = start;
        let mut slots = Vec::new();
        // an hour, polled at irregular intervals of 1..7 s; runs take 2 s
        let mut i = 0u64;
        while now < start + Duration::hours(1) {
            for s in p.poll(now) {
                slots.push(s.slot);
            }
            if p.is_running("a") {
                p.finished("a", true, now + Duration::seconds(2));
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
        let mut p = Planner::new(2, RetryPolicy::default());
        let now = t(1, 1, 0, 0);
        for name in ["a", "b", "c", "d"] {
            p.set_schedule(name, Some(daily()), None, now);
        }
        let first = p.poll(t(1, 2, 0, 0));
        assert_eq!(
            first.iter().map(|s| s.target.as_str()).collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        assert!(p.poll(t(1, 2, 0, 30)).is_empty(), "limit of 2 is held");
        assert_eq!(p.next_run("c"), Some(t(1, 2, 0, 0)), "c waits, due");
        p.finished("a", true, t(1, 2, 1, 0));
        let next = p.poll(t(1, 2, 1, 0));
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].target, "c");
        assert_eq!(next[0].slot, t(1, 2, 0, 0));
        p.finished("b", true, t(1, 2, 2, 0));
        p.finished("c", true, t(1, 2, 2, 0));
        assert_eq!(p.poll(t(1, 2, 2, 0))[0].target, "d");
        assert!(p.poll(t(1, 3, 0, 0)).is_empty());
    }

    #[test]
    fn failures_retry_with_backoff_then_give_up() {
        let retry = RetryPolicy {
            attempts: 3,
            first_backoff: Duration::seconds(60),
            max_backoff: Duration::minutes(30),
        };
        let mut p = Planner::new(4, retry);
        p.set_schedule("a", Some(daily()), None, t(1, 1, 0, 0));
        let s = p.poll(t(1, 2, 0, 0));
        assert_eq!(s[0].attempt, 1);
        assert_eq!(p.finished("a", false, t(1, 2, 0, 10)), Some(t(1, 2, 1, 10)));
        assert!(p.poll(t(1, 2, 1, 9)).is_empty(), "not before the backoff");
        let s = p.poll(t(1, 2, 1, 10));
        assert_eq!((s[0].attempt, s[0].slot), (2, t(1, 2, 0, 0)));
        assert_eq!(p.finished("a", false, t(1, 2, 1, 20)), Some(t(1, 2, 3, 20)));
        let s = p.poll(t(1, 2, 3, 20));
        assert_eq!(s[0].attempt, 3);
        assert_eq!(
            p.finished("a", false, t(1, 2, 3, 30)),
            None,
            "3 attempts used"
        );
        assert!(p.poll(t(1, 12, 0, 0)).is_empty());
        // the next slot starts afresh
        assert_eq!(p.poll(t(2, 2, 0, 0))[0].attempt, 1);
        // a success stops retrying
        assert_eq!(p.finished("a", true, t(2, 2, 0, 5)), None);
        assert!(p.poll(t(2, 3, 0, 0)).is_empty());
    }

    #[test]
    fn a_slot_that_comes_while_running_waits_for_the_run() {
        let hourly = Schedule::parse("0 * * * *", Tz::UTC).unwrap();
        let mut p = Planner::new(4, RetryPolicy::default());
        p.set_schedule("a", Some(hourly), None, t(1, 0, 30, 0));
        assert_eq!(p.poll(t(1, 1, 0, 0)).len(), 1);
        // still running at 2:00 and 3:00: one run queued, not two
        assert!(p.poll(t(1, 2, 0, 0)).is_empty());
        assert!(p.poll(t(1, 3, 0, 0)).is_empty());
        p.finished("a", true, t(1, 3, 10, 0));
        let s = p.poll(t(1, 3, 10, 0));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].slot, t(1, 3, 0, 0));
        assert!(p.poll(t(1, 3, 20, 0)).is_empty());
    }

    #[test]
    fn postponed_runs_keep_their_attempt() {
        let mut p = Planner::new(4, RetryPolicy::default());
        p.set_schedule("a", Some(daily()), None, t(1, 1, 0, 0));
        assert_eq!(p.poll(t(1, 2, 0, 0))[0].attempt, 1);
        p.postpone("a", t(1, 2, 0, 30));
        assert!(p.poll(t(1, 2, 0, 29)).is_empty());
        let s = p.poll(t(1, 2, 0, 30));
        assert_eq!((s[0].attempt, s[0].slot), (1, t(1, 2, 0, 0)));
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
}
