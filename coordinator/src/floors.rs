//! The coordinator's floor under what agents ask for.
//!
//! An agent runs on the database host it backs up; if that host is
//! compromised, its Register request must not be able to wipe the target's
//! history (`keep_*=0`, `max_age_days=1`) or flood the coordinator (a
//! per-second schedule). So what an agent asks for may only keep *more* than
//! the floor: a retention field below it is raised to it, and a schedule that
//! fires more often than `DATASAVER_MIN_SCHEDULE_INTERVAL` is throttled (see
//! `schedule::planner`). The person running the coordinator is not limited:
//! the coordinator's defaults and the YAML file's per-target sections may set
//! anything, so the floor applies to the agent's layer only.
//!
//! Everything here is pure: the raise, the shortest gap of a schedule, the
//! notes `dsctl health` shows. Logging each distinct raise once is
//! [`Logged`]'s job.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use datasaver_common::config::{format_duration, parse_duration, Env, SettingError};
use serde::Serialize;

use crate::policy::RetentionSpec;
use crate::schedule::cron::Schedule;

/// Agents' schedules may not fire more often than this by default: frequent
/// enough for any logical backup, rare enough that a hostile agent cannot
/// keep the queue busy or rotate the history out quickly.
pub const DEFAULT_MIN_SCHEDULE_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// The least an agent's request may keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Floors {
    pub keep_last: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    /// The shortest age limit an agent may ask for. 0 means the floor is
    /// "no age limit": agents may not set one at all (an age limit deletes
    /// backups the GFS slots would keep).
    pub max_age_days: u32,
    /// The shortest time between two scheduled backups of an agent's
    /// schedule; zero switches the schedule floor off.
    pub schedule_interval: Duration,
}

impl Floors {
    /// The floors when no `DATASAVER_MIN_*` is set: the coordinator's own
    /// retention defaults (`defaults`, i.e. `DATASAVER_KEEP_*` and the YAML
    /// file's top level over the built-in ones), so by default an agent
    /// cannot ask for less than the coordinator keeps when nobody asks.
    pub fn from_defaults(defaults: &RetentionSpec) -> Floors {
        let p = defaults.to_policy();
        Floors {
            keep_last: p.keep_last,
            keep_daily: p.keep_daily,
            keep_weekly: p.keep_weekly,
            keep_monthly: p.keep_monthly,
            max_age_days: p.max_age_days.unwrap_or(0),
            schedule_interval: DEFAULT_MIN_SCHEDULE_INTERVAL,
        }
    }

    /// `DATASAVER_MIN_KEEP_LAST`, `_DAILY`, `_WEEKLY`, `_MONTHLY`,
    /// `DATASAVER_MIN_AGE_DAYS` and `DATASAVER_MIN_SCHEDULE_INTERVAL` over
    /// [`Floors::from_defaults`].
    pub fn load(env: &Env, defaults: &RetentionSpec) -> Result<Floors, SettingError> {
        let d = Floors::from_defaults(defaults);
        let schedule_interval = match env.get("DATASAVER_MIN_SCHEDULE_INTERVAL") {
            Some(v) => parse_duration("DATASAVER_MIN_SCHEDULE_INTERVAL", v)?,
            None => d.schedule_interval,
        };
        Ok(Floors {
            keep_last: env
                .parse_opt("DATASAVER_MIN_KEEP_LAST")?
                .unwrap_or(d.keep_last),
            keep_daily: env
                .parse_opt("DATASAVER_MIN_KEEP_DAILY")?
                .unwrap_or(d.keep_daily),
            keep_weekly: env
                .parse_opt("DATASAVER_MIN_KEEP_WEEKLY")?
                .unwrap_or(d.keep_weekly),
            keep_monthly: env
                .parse_opt("DATASAVER_MIN_KEEP_MONTHLY")?
                .unwrap_or(d.keep_monthly),
            max_age_days: env
                .parse_opt("DATASAVER_MIN_AGE_DAYS")?
                .unwrap_or(d.max_age_days),
            schedule_interval,
        })
    }

    /// The agent's retention request raised to the floor, and what was
    /// raised. Fields the agent did not set stay unset (the coordinator's
    /// defaults apply to them, floor or not).
    pub fn raise_retention(&self, asked: &RetentionSpec) -> (RetentionSpec, Vec<Raise>) {
        let mut out = asked.clone();
        let mut raised = Vec::new();
        for (name, field, floor) in [
            ("keep_last", &mut out.keep_last, self.keep_last),
            ("keep_daily", &mut out.keep_daily, self.keep_daily),
            ("keep_weekly", &mut out.keep_weekly, self.keep_weekly),
            ("keep_monthly", &mut out.keep_monthly, self.keep_monthly),
        ] {
            if let Some(n) = *field {
                if n < floor {
                    *field = Some(floor);
                    raised.push(Raise::new(name, n.to_string(), floor.to_string()));
                }
            }
        }
        // 0 is "no age limit", which keeps the most; any limit keeps less
        // than a longer one.
        if let Some(n) = asked.max_age_days.filter(|n| *n > 0) {
            let floor = self.max_age_days;
            if floor == 0 || n < floor {
                out.max_age_days = Some(floor);
                raised.push(Raise::new("max_age_days", n.to_string(), age_text(floor)));
            }
        }
        (out, raised)
    }

    /// How a schedule the agent asked for is held to the floor: `None` if
    /// its fires are never closer than the interval (or the floor is off),
    /// else the interval the scheduler enforces and what was raised.
    pub fn schedule_throttle(
        &self,
        schedule: &Schedule,
        now: DateTime<Utc>,
    ) -> Option<(Duration, Raise)> {
        if self.schedule_interval.is_zero() {
            return None;
        }
        let floor = chrono::Duration::from_std(self.schedule_interval).ok()?;
        let shortest = schedule.shortest_gap(now)?;
        if shortest >= floor {
            return None;
        }
        let every = shortest.to_std().map(format_duration).unwrap_or_default();
        Some((
            self.schedule_interval,
            Raise::new(
                "schedule",
                format!("\"{}\" (fires every {every})", schedule.expr()),
                format!(
                    "of at most one backup every {}",
                    format_duration(self.schedule_interval)
                ),
            ),
        ))
    }
}

fn age_text(days: u32) -> String {
    if days == 0 {
        "0 (no age limit)".into()
    } else {
        days.to_string()
    }
}

/// One part of an agent's request that was raised to the floor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Raise {
    /// `keep_last`, `keep_daily`, `keep_weekly`, `keep_monthly`,
    /// `max_age_days` or `schedule`.
    pub setting: String,
    /// What the agent asked for.
    pub asked: String,
    /// What applies instead.
    pub floor: String,
}

impl Raise {
    fn new(setting: &str, asked: String, floor: String) -> Raise {
        Raise {
            setting: setting.into(),
            asked,
            floor,
        }
    }

    /// e.g. `agent asked keep_daily=0, raised to the floor 7`.
    pub fn message(&self) -> String {
        format!(
            "agent asked {}={}, raised to the floor {}",
            self.setting, self.asked, self.floor
        )
    }
}

/// Which raises were logged, per target, so that each distinct one is logged
/// once and not on every reconnect of the agent.
#[derive(Debug, Default)]
pub struct Logged(Mutex<HashMap<String, Vec<Raise>>>);

impl Logged {
    /// The raises of `target` not logged yet (all of them when they differ
    /// from the ones logged last for it); records them as logged.
    pub fn fresh(&self, target: &str, raised: &[Raise]) -> Vec<Raise> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let before = m.get(target).map(Vec::as_slice).unwrap_or_default();
        let fresh: Vec<Raise> = raised
            .iter()
            .filter(|r| !before.contains(r))
            .cloned()
            .collect();
        m.insert(target.to_string(), raised.to_vec());
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use chrono_tz::Tz;
    use proptest::prelude::*;

    fn floors() -> Floors {
        Floors {
            keep_last: 3,
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 6,
            max_age_days: 30,
            schedule_interval: Duration::from_secs(15 * 60),
        }
    }

    #[test]
    fn defaults_are_the_coordinators_own_retention() {
        assert_eq!(
            Floors::load(&Env::default(), &RetentionSpec::default()).unwrap(),
            Floors {
                keep_last: 0,
                keep_daily: 7,
                keep_weekly: 4,
                keep_monthly: 6,
                max_age_days: 0,
                schedule_interval: DEFAULT_MIN_SCHEDULE_INTERVAL,
            }
        );
        let defaults = RetentionSpec {
            keep_last: Some(2),
            keep_daily: Some(10),
            max_age_days: Some(90),
            ..Default::default()
        };
        let f = Floors::load(&Env::default(), &defaults).unwrap();
        assert_eq!(
            (f.keep_last, f.keep_daily, f.keep_weekly, f.max_age_days),
            (2, 10, 4, 90)
        );
        // each variable replaces its default; 0s switches the schedule floor off
        let f = Floors::load(
            &Env::from_pairs(&[
                ("DATASAVER_MIN_KEEP_LAST", "5"),
                ("DATASAVER_MIN_KEEP_DAILY", "1"),
                ("DATASAVER_MIN_KEEP_WEEKLY", "0"),
                ("DATASAVER_MIN_KEEP_MONTHLY", "12"),
                ("DATASAVER_MIN_AGE_DAYS", "14"),
                ("DATASAVER_MIN_SCHEDULE_INTERVAL", "0s"),
            ]),
            &defaults,
        )
        .unwrap();
        assert_eq!(
            f,
            Floors {
                keep_last: 5,
                keep_daily: 1,
                keep_weekly: 0,
                keep_monthly: 12,
                max_age_days: 14,
                schedule_interval: Duration::ZERO,
            }
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (name, value) in [
            ("DATASAVER_MIN_KEEP_LAST", "-1"),
            ("DATASAVER_MIN_KEEP_DAILY", "seven"),
            ("DATASAVER_MIN_KEEP_WEEKLY", "1.5"),
            ("DATASAVER_MIN_KEEP_MONTHLY", "x"),
            ("DATASAVER_MIN_AGE_DAYS", "30d"),
            ("DATASAVER_MIN_SCHEDULE_INTERVAL", "15"),
            ("DATASAVER_MIN_SCHEDULE_INTERVAL", "-5m"),
        ] {
            let e = Floors::load(
                &Env::from_pairs(&[(name, value)]),
                &RetentionSpec::default(),
            )
            .unwrap_err();
            assert_eq!(e.setting, name, "{name}={value}: {e}");
        }
    }

    #[test]
    fn a_request_below_the_floor_is_raised_and_said() {
        let f = floors();
        let asked = RetentionSpec {
            keep_last: Some(0),
            keep_daily: Some(0),
            keep_weekly: Some(10),
            keep_monthly: None,
            max_age_days: Some(1),
            ..Default::default()
        };
        let (raised, notes) = f.raise_retention(&asked);
        assert_eq!(
            raised,
            RetentionSpec {
                keep_last: Some(3),
                keep_daily: Some(7),
                keep_weekly: Some(10),
                keep_monthly: None,
                max_age_days: Some(30),
                ..Default::default()
            }
        );
        let messages: Vec<String> = notes.iter().map(Raise::message).collect();
        assert_eq!(
            messages,
            [
                "agent asked keep_last=0, raised to the floor 3",
                "agent asked keep_daily=0, raised to the floor 7",
                "agent asked max_age_days=1, raised to the floor 30",
            ]
        );
        // no age limit keeps the most: never raised
        let (r, n) = f.raise_retention(&RetentionSpec {
            max_age_days: Some(0),
            ..Default::default()
        });
        assert_eq!((r.max_age_days, n.len()), (Some(0), 0));
        // a floor of "no age limit" refuses any limit
        let f0 = Floors {
            max_age_days: 0,
            ..floors()
        };
        let (r, n) = f0.raise_retention(&RetentionSpec {
            max_age_days: Some(3650),
            ..Default::default()
        });
        assert_eq!(r.max_age_days, Some(0));
        assert_eq!(
            n[0].message(),
            "agent asked max_age_days=3650, raised to the floor 0 (no age limit)"
        );
    }

    #[test]
    fn schedules_more_frequent_than_the_floor_are_throttled() {
        let now = Utc.with_ymd_and_hms(2024, 3, 1, 0, 0, 0).unwrap();
        let f = floors();
        let every_second = Schedule::parse("* * * * * *", Tz::UTC).unwrap();
        let (every, raise) = f.schedule_throttle(&every_second, now).unwrap();
        assert_eq!(every, Duration::from_secs(900));
        assert_eq!(
            raise.message(),
            "agent asked schedule=\"* * * * * *\" (fires every 1s), raised to the floor of at most one backup every 15m"
        );
        // two fires close together once a day: the shortest gap counts
        let twice = Schedule::parse("0 0,5 2 * * *", Tz::UTC).unwrap();
        assert!(f.schedule_throttle(&twice, now).is_some());
        // exactly at the floor, or slower: untouched
        for ok in ["*/15 * * * *", "0 2 * * *", "0 3 1 * *"] {
            let s = Schedule::parse(ok, Tz::UTC).unwrap();
            assert_eq!(f.schedule_throttle(&s, now), None, "{ok}");
        }
        // the floor switched off
        let off = Floors {
            schedule_interval: Duration::ZERO,
            ..floors()
        };
        assert_eq!(off.schedule_throttle(&every_second, now), None);
    }

    #[test]
    fn each_distinct_raise_is_logged_once() {
        let logged = Logged::default();
        let f = floors();
        let (_, a) = f.raise_retention(&RetentionSpec {
            keep_daily: Some(0),
            ..Default::default()
        });
        assert_eq!(logged.fresh("acme", &a), a);
        // the agent reconnects with the same request: nothing new
        assert!(logged.fresh("acme", &a).is_empty());
        // another target is its own
        assert_eq!(logged.fresh("globex", &a), a);
        // a different request: only what is new
        let (_, b) = f.raise_retention(&RetentionSpec {
            keep_daily: Some(0),
            keep_last: Some(1),
            ..Default::default()
        });
        let fresh = logged.fresh("acme", &b);
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].setting, "keep_last");
        // back to the first request after a change: said again
        assert!(logged.fresh("acme", &[]).is_empty());
        assert_eq!(logged.fresh("acme", &a), a);
    }

    fn count() -> impl Strategy<Value = Option<u32>> {
        prop_oneof![Just(None), (0u32..40).prop_map(Some)]
    }

    proptest! {
        /// Whatever the agent asks, the result keeps at least the floor on
        /// every field it set, changes nothing at or above the floor, and
        /// reports exactly the fields it changed.
        #[test]
        fn raising_never_keeps_less_than_the_floor_nor_less_than_asked(
            keep_last in count(), keep_daily in count(), keep_weekly in count(),
            keep_monthly in count(), max_age_days in count(),
            fl in (0u32..20, 0u32..20, 0u32..20, 0u32..20, 0u32..40),
        ) {
            let f = Floors {
                keep_last: fl.0, keep_daily: fl.1, keep_weekly: fl.2, keep_monthly: fl.3,
                max_age_days: fl.4, schedule_interval: Duration::ZERO,
            };
            let asked = RetentionSpec { keep_last, keep_daily, keep_weekly, keep_monthly, max_age_days, ..Default::default() };
            let (out, raised) = f.raise_retention(&asked);
            let pairs = [
                ("keep_last", asked.keep_last, out.keep_last, f.keep_last),
                ("keep_daily", asked.keep_daily, out.keep_daily, f.keep_daily),
                ("keep_weekly", asked.keep_weekly, out.keep_weekly, f.keep_weekly),
                ("keep_monthly", asked.keep_monthly, out.keep_monthly, f.keep_monthly),
            ];
            for (name, a, o, floor) in pairs {
                prop_assert_eq!(a.is_some(), o.is_some());
                if let (Some(a), Some(o)) = (a, o) {
                    prop_assert!(o >= floor && o >= a);
                    prop_assert_eq!(o, a.max(floor));
                    prop_assert_eq!(raised.iter().any(|r| r.setting == name), a < floor);
                }
            }
            // age: 0 is "no limit", the most; the result is never a shorter
            // limit than asked nor than the floor
            let keeps = |d: u32| if d == 0 { u32::MAX } else { d };
            if let Some(a) = asked.max_age_days {
                let o = out.max_age_days.unwrap_or(0);
                prop_assert!(keeps(o) >= keeps(a));
                prop_assert!(keeps(o) >= keeps(f.max_age_days));
                prop_assert_eq!(raised.iter().any(|r| r.setting == "max_age_days"), o != a);
            } else {
                prop_assert_eq!(out.max_age_days, None);
            }
        }
    }
}
