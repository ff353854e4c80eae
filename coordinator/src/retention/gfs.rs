//! Grandfather-father-son rotation for the backups of one target.
//!
//! [`tags`] says which backups are the first of their day, ISO week and month;
//! [`plan`] decides, for every backup, keep or delete and the reasons. Both are
//! pure functions of their arguments (no clock, no catalog, no I/O) so that a
//! dry run and the real cleanup cannot disagree, and so that the rules can be
//! checked against a brute-force model over simulated years.
//!
//! Order of precedence, strongest first:
//! 1. safety: the newest completed backup, pinned, in use, running — never deleted;
//! 2. status: failed attempts follow their grace period, manual backups their
//!    own keep period (neither is tagged nor counts against the GFS slots);
//! 3. `max_age_days` deletes old scheduled backups even if a slot would keep them;
//! 4. the GFS slots and `keep_last` keep; a scheduled backup no slot keeps goes.

use std::collections::{HashMap, HashSet};
use std::fmt;

use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, TimeZone, Utc};

/// How many backups of one target to keep. Counts of 0 switch a rule off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The newest N completed scheduled backups whatever their period (for
    /// schedules that run more than once a day).
    pub keep_last: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    /// Scheduled backups older than this are deleted even if a slot keeps them.
    pub max_age_days: Option<u32>,
    /// Manual backups are kept this long; `None` keeps them until deleted by hand.
    pub manual_keep_days: Option<u32>,
    /// Failed attempts are deleted once older than this; until then they stay
    /// so that an operator can look at what went wrong.
    pub failed_grace: TimeDelta,
}

/// Failed attempts stay visible this long by default (a week of history for
/// whoever looks into why backups failed). The one default: the policy
/// layers (`crate::policy`) fall back to it too.
pub const DEFAULT_FAILED_GRACE: TimeDelta = TimeDelta::days(7);

impl Default for Policy {
    fn default() -> Self {
        Self {
            keep_last: 0,
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 6,
            max_age_days: None,
            manual_keep_days: None,
            failed_grace: DEFAULT_FAILED_GRACE,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Completed,
    Failed,
    Running,
}

/// What retention needs to know about one backup.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Unique within the list; also breaks ties between identical timestamps.
    pub id: String,
    pub created_at: DateTime<Utc>,
    pub status: Status,
    pub pinned: bool,
    /// Made by `dsctl backup --label` or by hand, not by the schedule.
    pub manual: bool,
    /// A restore or verify is reading it right now.
    pub in_use: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tag {
    Daily,
    Weekly,
    Monthly,
}

impl Tag {
    pub const ALL: [Tag; 3] = [Tag::Daily, Tag::Weekly, Tag::Monthly];

    /// The name stored in the catalog and the meta file.
    pub fn as_str(self) -> &'static str {
        match self {
            Tag::Daily => "daily",
            Tag::Weekly => "weekly",
            Tag::Monthly => "monthly",
        }
    }

    /// The calendar period the tag is the first of, for messages.
    fn period(self) -> &'static str {
        match self {
            Tag::Daily => "day",
            Tag::Weekly => "week",
            Tag::Monthly => "month",
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a backup is kept or deleted. `Display` gives the text `dsctl cleanup
/// --dry-run` prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    // Reasons to keep.
    NewestCompleted,
    Pinned,
    InUse,
    Running,
    /// Among the newest `of` completed scheduled backups, at 1-based `rank`.
    Last {
        rank: u32,
        of: u32,
    },
    /// Among the newest `of` backups tagged `tag`, at 1-based `rank`.
    Slot {
        tag: Tag,
        rank: u32,
        of: u32,
    },
    /// A manual backup within its keep period (`None`: kept forever).
    ManualKept {
        days: Option<u32>,
    },
    FailedWithinGrace {
        grace: TimeDelta,
    },

    // Reasons to delete.
    /// A completed scheduled backup that no slot keeps. `tags` are its own
    /// tags; the limits are the policy's, so the text can name exactly the
    /// rules it fell out of.
    NotKept {
        tags: Vec<Tag>,
        keep_last: u32,
        keep_daily: u32,
        keep_weekly: u32,
        keep_monthly: u32,
    },
    MaxAge {
        days: u32,
    },
    ManualExpired {
        days: u32,
    },
    FailedExpired {
        grace: TimeDelta,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NewestCompleted => f.write_str("newest completed backup"),
            Reason::Pinned => f.write_str("pinned"),
            Reason::InUse => f.write_str("in use by a restore, verify or export"),
            Reason::Running => f.write_str("running"),
            Reason::Last { rank, of } => write!(f, "last {rank} of {of}"),
            Reason::Slot { tag, rank, of } => write!(f, "{tag} {rank} of {of}"),
            Reason::ManualKept { days: Some(d) } => write!(f, "manual, kept {}", days(*d)),
            Reason::ManualKept { days: None } => f.write_str("manual, kept forever"),
            Reason::FailedWithinGrace { grace } => {
                write!(f, "failed attempt, within {} grace", span(*grace))
            }
            Reason::NotKept {
                tags,
                keep_last,
                keep_daily,
                keep_weekly,
                keep_monthly,
            } => {
                let limit = |t: Tag| match t {
                    Tag::Daily => *keep_daily,
                    Tag::Weekly => *keep_weekly,
                    Tag::Monthly => *keep_monthly,
                };
                // Only rules that are switched on are worth naming: "beyond 0
                // weekly" would only confuse.
                let mut beyond = Vec::new();
                if *keep_last > 0 {
                    beyond.push(format!("the last {keep_last}"));
                }
                for &t in tags {
                    if limit(t) > 0 {
                        beyond.push(format!("{} {t}", limit(t)));
                    }
                }
                let missing: Vec<Tag> = Tag::ALL
                    .into_iter()
                    .filter(|t| !tags.contains(t) && limit(*t) > 0)
                    .collect();
                let mut parts = Vec::new();
                if !beyond.is_empty() {
                    parts.push(format!("beyond {}", and_list(&beyond)));
                }
                if !missing.is_empty() {
                    let names: Vec<&str> = if tags.is_empty() {
                        missing.iter().map(|t| t.period()).collect()
                    } else {
                        missing.iter().map(|t| t.as_str()).collect()
                    };
                    parts.push(if tags.is_empty() {
                        format!("not the first of its {}", names.join("/"))
                    } else {
                        format!("not {}", names.join("/"))
                    });
                }
                if parts.is_empty() {
                    f.write_str("no rule keeps it (keep_last, keep_daily, keep_weekly and keep_monthly are all 0)")
                } else {
                    f.write_str(&parts.join(", "))
                }
            }
            Reason::MaxAge { days } => write!(f, "older than max_age_days={days}"),
            Reason::ManualExpired { days: d } => write!(f, "manual, older than {}", days(*d)),
            Reason::FailedExpired { grace } => {
                write!(f, "failed attempt older than {}", span(*grace))
            }
        }
    }
}

fn days(n: u32) -> String {
    if n == 1 {
        "1 day".into()
    } else {
        format!("{n} days")
    }
}

/// A grace period the way an operator configured it: "24h", "3d", "90min".
fn span(d: TimeDelta) -> String {
    let s = d.num_seconds();
    if s != 0 && s % 86_400 == 0 && s / 86_400 > 1 {
        format!("{}d", s / 86_400)
    } else if s != 0 && s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s != 0 && s % 60 == 0 {
        format!("{}min", s / 60)
    } else {
        format!("{s}s")
    }
}

/// "a", "a and b", "a, b and c".
fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// The verdict on one backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub keep: bool,
    /// Kept: every rule that keeps it (at least one). Deleted: exactly one,
    /// the reason it goes.
    pub reasons: Vec<Reason>,
    /// Its GFS tags (empty for manual, failed and running backups).
    pub tags: Vec<Tag>,
}

/// Only these are tagged and fill GFS / keep_last slots: a failed attempt is
/// not a backup, and a manual one must not push a scheduled one out of a slot.
fn scheduled_completed(b: &Candidate) -> bool {
    b.status == Status::Completed && !b.manual
}

/// Total order "older first"; the id makes equal timestamps deterministic.
fn key(b: &Candidate) -> (DateTime<Utc>, &str) {
    (b.created_at, b.id.as_str())
}

/// Per input index, the tags of that backup (sorted Daily, Weekly, Monthly).
fn tag_by_index<Tz: TimeZone>(backups: &[Candidate], tz: &Tz) -> Vec<Vec<Tag>> {
    let mut order: Vec<usize> = (0..backups.len())
        .filter(|&i| scheduled_completed(&backups[i]))
        .collect();
    order.sort_by(|&a, &b| key(&backups[a]).cmp(&key(&backups[b])));

    let mut days: HashSet<NaiveDate> = HashSet::new();
    // The ISO week-year, not the calendar year: 2021-01-01 is in 2020-W53.
    let mut weeks: HashSet<(i32, u32)> = HashSet::new();
    let mut months: HashSet<(i32, u32)> = HashSet::new();
    let mut tags = vec![Vec::new(); backups.len()];
    for i in order {
        let local = backups[i].created_at.with_timezone(tz);
        let week = local.iso_week();
        if days.insert(local.date_naive()) {
            tags[i].push(Tag::Daily);
        }
        if weeks.insert((week.year(), week.week())) {
            tags[i].push(Tag::Weekly);
        }
        if months.insert((local.year(), local.month())) {
            tags[i].push(Tag::Monthly);
        }
    }
    tags
}

/// GFS tags of every completed, non-manual backup, computed in `tz`: daily =
/// first completed non-manual backup of its calendar day, weekly = first of
/// its ISO week (Monday start, ISO week-year), monthly = first of its calendar
/// month. Every completed non-manual backup has an entry (possibly empty);
/// other backups have none. Ids are assumed unique.
pub fn tags<Tz: TimeZone>(backups: &[Candidate], tz: &Tz) -> HashMap<String, Vec<Tag>> {
    backups
        .iter()
        .zip(tag_by_index(backups, tz))
        .filter(|(b, _)| scheduled_completed(b))
        .map(|(b, t)| (b.id.clone(), t))
        .collect()
}

/// Whole days as a duration; a limit too large to represent never expires.
fn days_span(n: u32) -> TimeDelta {
    TimeDelta::try_days(i64::from(n)).unwrap_or(TimeDelta::MAX)
}

/// One decision per input backup, in input order, for ONE target's backups.
/// The input order does not matter to the outcome.
pub fn plan<Tz: TimeZone>(
    backups: &[Candidate],
    policy: &Policy,
    now: DateTime<Utc>,
    tz: &Tz,
) -> Vec<Decision> {
    let tags = tag_by_index(backups, tz);

    let mut newest_first: Vec<usize> = (0..backups.len())
        .filter(|&i| scheduled_completed(&backups[i]))
        .collect();
    newest_first.sort_by(|&a, &b| key(&backups[b]).cmp(&key(&backups[a])));

    let mut slots: Vec<Vec<Reason>> = vec![Vec::new(); backups.len()];
    for (rank, &i) in (1..=policy.keep_last).zip(&newest_first) {
        slots[i].push(Reason::Last {
            rank,
            of: policy.keep_last,
        });
    }
    for tag in Tag::ALL {
        let of = match tag {
            Tag::Daily => policy.keep_daily,
            Tag::Weekly => policy.keep_weekly,
            Tag::Monthly => policy.keep_monthly,
        };
        let tagged = newest_first.iter().filter(|&&i| tags[i].contains(&tag));
        for (rank, &i) in (1..=of).zip(tagged) {
            slots[i].push(Reason::Slot { tag, rank, of });
        }
    }

    // Manual ones included: deleting the newest completed backup of any kind
    // could leave a target with nothing restorable newer than it.
    let newest_completed = (0..backups.len())
        .filter(|&i| backups[i].status == Status::Completed)
        .max_by(|&a, &b| key(&backups[a]).cmp(&key(&backups[b])));

    backups
        .iter()
        .enumerate()
        .zip(slots)
        .map(|((i, b), slot_reasons)| {
            let age = now - b.created_at;
            let mut reasons = Vec::new();
            if newest_completed == Some(i) {
                reasons.push(Reason::NewestCompleted);
            }
            if b.pinned {
                reasons.push(Reason::Pinned);
            }
            if b.in_use {
                reasons.push(Reason::InUse);
            }
            if b.status == Status::Running {
                reasons.push(Reason::Running);
            }
            let by_policy: Result<Vec<Reason>, Reason> = match b.status {
                Status::Running => Ok(Vec::new()),
                Status::Failed if age > policy.failed_grace => Err(Reason::FailedExpired {
                    grace: policy.failed_grace,
                }),
                Status::Failed => Ok(vec![Reason::FailedWithinGrace {
                    grace: policy.failed_grace,
                }]),
                Status::Completed if b.manual => match policy.manual_keep_days {
                    Some(d) if age > days_span(d) => Err(Reason::ManualExpired { days: d }),
                    days => Ok(vec![Reason::ManualKept { days }]),
                },
                Status::Completed => match policy.max_age_days {
                    Some(d) if age > days_span(d) => Err(Reason::MaxAge { days: d }),
                    _ if !slot_reasons.is_empty() => Ok(slot_reasons),
                    _ => Err(Reason::NotKept {
                        tags: tags[i].clone(),
                        keep_last: policy.keep_last,
                        keep_daily: policy.keep_daily,
                        keep_weekly: policy.keep_weekly,
                        keep_monthly: policy.keep_monthly,
                    }),
                },
            };
            let keep = match by_policy {
                Ok(kept_by) => {
                    reasons.extend(kept_by);
                    true
                }
                // A safety rule overrides the policy; the policy's reason to
                // delete is then moot and not shown.
                Err(_) if !reasons.is_empty() => true,
                Err(why) => {
                    reasons.push(why);
                    false
                }
            };
            Decision {
                id: b.id.clone(),
                keep,
                reasons,
                tags: tags[i].clone(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{FixedOffset, Weekday};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn completed(id: &str, when: &str) -> Candidate {
        Candidate {
            id: id.into(),
            created_at: at(when),
            status: Status::Completed,
            pinned: false,
            manual: false,
            in_use: false,
        }
    }

    fn with(mut c: Candidate, f: impl FnOnce(&mut Candidate)) -> Candidate {
        f(&mut c);
        c
    }

    fn kept(ds: &[Decision]) -> Vec<&str> {
        ds.iter()
            .filter(|d| d.keep)
            .map(|d| d.id.as_str())
            .collect()
    }

    fn deleted(ds: &[Decision]) -> Vec<&str> {
        ds.iter()
            .filter(|d| !d.keep)
            .map(|d| d.id.as_str())
            .collect()
    }

    fn decision<'a>(ds: &'a [Decision], id: &str) -> &'a Decision {
        ds.iter().find(|d| d.id == id).unwrap()
    }

    fn texts(d: &Decision) -> Vec<String> {
        d.reasons.iter().map(ToString::to_string).collect()
    }

    /// One scheduled backup a day at 02:00 UTC from 2024-01-01 (a Monday),
    /// ids d01.. by day number.
    fn daily_from_2024_01_01(days: u32) -> Vec<Candidate> {
        let start = at("2024-01-01T02:00:00Z");
        (1..=days)
            .map(|n| Candidate {
                id: format!("d{n:02}"),
                created_at: start + TimeDelta::days(i64::from(n) - 1),
                status: Status::Completed,
                pinned: false,
                manual: false,
                in_use: false,
            })
            .collect()
    }

    fn ids(range: impl IntoIterator<Item = u32>) -> Vec<String> {
        range.into_iter().map(|n| format!("d{n:02}")).collect()
    }

    #[test]
    fn worked_example_after_day_8() {
        // Days 1..8 = Mon 2024-01-01 .. Mon 2024-01-08. Day 1 is the first of
        // ISO week 2024-W01 and of January; day 8 is the first of W02. The
        // seed document says day 1 goes after day 8 ("exceeded 7 daily"), but
        // by its own definitions the very first backup is always the first of
        // its week and month, so weekly/monthly keep it: nothing is deleted.
        assert_eq!(
            chrono::NaiveDate::from_ymd_opt(2024, 1, 1)
                .unwrap()
                .weekday(),
            Weekday::Mon
        );
        let backups = daily_from_2024_01_01(8);
        let ds = plan(
            &backups,
            &Policy::default(),
            at("2024-01-08T03:00:00Z"),
            &Utc,
        );
        assert_eq!(kept(&ds), ids(1..=8));
        assert!(deleted(&ds).is_empty());
        assert_eq!(
            decision(&ds, "d01").reasons,
            vec![
                Reason::Slot {
                    tag: Tag::Weekly,
                    rank: 2,
                    of: 4
                },
                Reason::Slot {
                    tag: Tag::Monthly,
                    rank: 1,
                    of: 6
                },
            ],
            "day 1 is out of the 7 daily slots, kept only as weekly/monthly"
        );
        assert_eq!(
            decision(&ds, "d01").tags,
            vec![Tag::Daily, Tag::Weekly, Tag::Monthly]
        );
        assert_eq!(texts(decision(&ds, "d02")), vec!["daily 7 of 7"]);
        assert_eq!(
            texts(decision(&ds, "d08")),
            vec!["newest completed backup", "daily 1 of 7", "weekly 1 of 4"]
        );

        // The rule the seed meant, visible once weekly/monthly are off.
        let daily_only = Policy {
            keep_weekly: 0,
            keep_monthly: 0,
            ..Policy::default()
        };
        let ds = plan(&backups, &daily_only, at("2024-01-08T03:00:00Z"), &Utc);
        assert_eq!(kept(&ds), ids(2..=8));
        assert_eq!(deleted(&ds), vec!["d01"]);
        assert_eq!(texts(decision(&ds, "d01")), vec!["beyond 7 daily"]);
    }

    #[test]
    fn worked_example_after_day_35() {
        // Days 1..35 = Mon 2024-01-01 .. Sun 2024-02-04.
        // Weekly (ISO Mondays): d01 01-01 (W01), d08 01-08, d15 01-15,
        //   d22 01-22, d29 01-29 (W05; Sun 02-04 = d35 is still W05).
        // Monthly: d01 (January), d32 = Thu 2024-02-01 (February).
        // Kept: daily d29..d35; weekly newest 4 = d29, d22, d15, d08 (the
        // seed's "weeks 2, 3, 4, 5"); monthly d32 and d01 (only 2 of 6 exist).
        // The seed's "monthly from day 30" is d32 on a real calendar.
        let backups = daily_from_2024_01_01(35);
        let ds = plan(
            &backups,
            &Policy::default(),
            at("2024-02-04T03:00:00Z"),
            &Utc,
        );
        let mut want_kept = ids([1, 8, 15, 22]);
        want_kept.extend(ids(29..=35));
        assert_eq!(kept(&ds), want_kept);
        let mut want_deleted = ids(2..=7);
        want_deleted.extend(ids(9..=14));
        want_deleted.extend(ids(16..=21));
        want_deleted.extend(ids(23..=28));
        assert_eq!(deleted(&ds), want_deleted);

        let t = tags(&backups, &Utc);
        let weekly: Vec<String> = ids(1..=35)
            .into_iter()
            .filter(|id| t[id].contains(&Tag::Weekly))
            .collect();
        assert_eq!(weekly, ids([1, 8, 15, 22, 29]));
        let monthly: Vec<String> = ids(1..=35)
            .into_iter()
            .filter(|id| t[id].contains(&Tag::Monthly))
            .collect();
        assert_eq!(monthly, ids([1, 32]));

        assert_eq!(texts(decision(&ds, "d01")), vec!["monthly 2 of 6"]);
        assert_eq!(texts(decision(&ds, "d08")), vec!["weekly 4 of 4"]);
        assert_eq!(
            texts(decision(&ds, "d29")),
            vec!["daily 7 of 7", "weekly 1 of 4"]
        );
        assert_eq!(
            texts(decision(&ds, "d32")),
            vec!["daily 4 of 7", "monthly 1 of 6"]
        );
        assert_eq!(
            texts(decision(&ds, "d35")),
            vec!["newest completed backup", "daily 1 of 7"]
        );
        for id in &want_deleted {
            assert_eq!(
                texts(decision(&ds, id)),
                vec!["beyond 7 daily, not weekly/monthly"],
                "{id}"
            );
        }
    }

    #[test]
    fn iso_week_year_boundaries() {
        // 2020-12-28 is Monday of 2020-W53; 12-31, 2021-01-01 and (Sunday)
        // 01-03 are in that week too; 2021-01-04 starts 2021-W01. A week keyed
        // on the calendar year would wrongly make 2021-01-01 weekly, a Sunday
        // start would make 01-03 weekly.
        let backups = vec![
            completed("a", "2020-12-28T02:00:00Z"),
            completed("b", "2020-12-31T02:00:00Z"),
            completed("c", "2021-01-01T02:00:00Z"),
            completed("d", "2021-01-03T02:00:00Z"),
            completed("e", "2021-01-04T02:00:00Z"),
            // 2024-12-30 (Mon) is 2025-W01, so 2025-01-02 shares its week.
            completed("f", "2024-12-30T02:00:00Z"),
            completed("g", "2025-01-02T02:00:00Z"),
            completed("h", "2025-01-06T02:00:00Z"),
        ];
        let t = tags(&backups, &Utc);
        use Tag::*;
        assert_eq!(t["a"], vec![Daily, Weekly, Monthly]);
        assert_eq!(t["b"], vec![Daily]);
        assert_eq!(t["c"], vec![Daily, Monthly]);
        assert_eq!(t["d"], vec![Daily]);
        assert_eq!(t["e"], vec![Daily, Weekly]);
        assert_eq!(t["f"], vec![Daily, Weekly, Monthly]);
        assert_eq!(t["g"], vec![Daily, Monthly]);
        assert_eq!(t["h"], vec![Daily, Weekly]);

        let policy = Policy {
            keep_daily: 0,
            keep_weekly: 10,
            keep_monthly: 0,
            ..Policy::default()
        };
        let ds = plan(&backups, &policy, at("2025-01-06T03:00:00Z"), &Utc);
        assert_eq!(kept(&ds), vec!["a", "e", "f", "h"]);
        assert_eq!(
            texts(decision(&ds, "c")),
            vec!["not weekly"],
            "monthly-tagged but monthly is off"
        );
        assert_eq!(
            texts(decision(&ds, "b")),
            vec!["not weekly"],
            "daily-tagged but daily is off"
        );
    }

    #[test]
    fn time_zone_decides_first_of_the_day() {
        // A 23:30Z, B 00:30Z next day, C 10:00Z.
        //   UTC:    A Mar 10 | B, C Mar 11       -> daily A, B
        //   +02:00: A, B, C all Mar 11           -> daily A
        //   -03:00: A, B Mar 10 | C Mar 11       -> daily A, C
        let backups = vec![
            completed("A", "2024-03-10T23:30:00Z"),
            completed("B", "2024-03-11T00:30:00Z"),
            completed("C", "2024-03-11T10:00:00Z"),
        ];
        let daily = |t: &HashMap<String, Vec<Tag>>| {
            let mut v: Vec<String> = t
                .iter()
                .filter(|(_, tags)| tags.contains(&Tag::Daily))
                .map(|(id, _)| id.clone())
                .collect();
            v.sort();
            v
        };
        let east = FixedOffset::east_opt(2 * 3600).unwrap();
        let west = FixedOffset::west_opt(3 * 3600).unwrap();
        assert_eq!(daily(&tags(&backups, &Utc)), vec!["A", "B"]);
        assert_eq!(daily(&tags(&backups, &east)), vec!["A"]);
        assert_eq!(daily(&tags(&backups, &west)), vec!["A", "C"]);

        let policy = Policy {
            keep_daily: 1,
            keep_weekly: 0,
            keep_monthly: 0,
            ..Policy::default()
        };
        let now = at("2024-03-11T12:00:00Z");
        let ds = plan(&backups, &policy, now, &Utc);
        assert_eq!(kept(&ds), vec!["B", "C"]);
        assert_eq!(texts(decision(&ds, "A")), vec!["beyond 1 daily"]);
        let ds = plan(&backups, &policy, now, &west);
        assert_eq!(kept(&ds), vec!["C"]);
        assert_eq!(texts(decision(&ds, "B")), vec!["not the first of its day"]);
        let ds = plan(&backups, &policy, now, &east);
        assert_eq!(kept(&ds), vec!["A", "C"]);
    }

    #[test]
    fn safety_beats_max_age() {
        let policy = Policy {
            max_age_days: Some(1),
            ..Policy::default()
        };
        let backups = vec![
            completed("plain", "2024-01-01T02:00:00Z"),
            with(completed("pinned", "2024-01-02T02:00:00Z"), |c| {
                c.pinned = true
            }),
            with(completed("in-use", "2024-01-03T02:00:00Z"), |c| {
                c.in_use = true
            }),
            with(completed("pinned-failed", "2024-01-03T03:00:00Z"), |c| {
                c.status = Status::Failed;
                c.pinned = true;
            }),
            completed("newest", "2024-01-04T02:00:00Z"),
            // Stuck for months: still never deleted while it runs.
            with(completed("running", "2024-01-05T02:00:00Z"), |c| {
                c.status = Status::Running
            }),
        ];
        let ds = plan(&backups, &policy, at("2024-06-01T00:00:00Z"), &Utc);
        assert_eq!(deleted(&ds), vec!["plain"]);
        assert_eq!(
            texts(decision(&ds, "plain")),
            vec!["older than max_age_days=1"]
        );
        assert_eq!(texts(decision(&ds, "pinned")), vec!["pinned"]);
        assert_eq!(
            texts(decision(&ds, "in-use")),
            vec!["in use by a restore, verify or export"]
        );
        assert_eq!(texts(decision(&ds, "pinned-failed")), vec!["pinned"]);
        assert_eq!(
            texts(decision(&ds, "newest")),
            vec!["newest completed backup"]
        );
        assert_eq!(texts(decision(&ds, "running")), vec!["running"]);

        // Within max age, GFS reasons are listed alongside safety ones.
        let ds = plan(&backups, &policy, at("2024-01-04T12:00:00Z"), &Utc);
        assert_eq!(
            texts(decision(&ds, "newest")),
            vec!["newest completed backup", "daily 1 of 7"]
        );
    }

    #[test]
    fn max_age_beats_gfs_and_counts_whole_days() {
        let policy = Policy {
            max_age_days: Some(2),
            ..Policy::default()
        };
        let backups = vec![
            completed("old", "2024-01-01T00:00:00Z"),
            completed("edge", "2024-01-02T00:00:00Z"),
            completed("new", "2024-01-03T00:00:00Z"),
        ];
        // "edge" is exactly 2 days old: not older than max_age, kept.
        let ds = plan(&backups, &policy, at("2024-01-04T00:00:00Z"), &Utc);
        assert_eq!(kept(&ds), vec!["edge", "new"]);
        assert_eq!(
            decision(&ds, "old").tags,
            vec![Tag::Daily, Tag::Weekly, Tag::Monthly],
            "tags stay even when max age deletes it"
        );
        assert_eq!(
            texts(decision(&ds, "old")),
            vec!["older than max_age_days=2"]
        );
    }

    #[test]
    fn failed_attempts_have_a_grace_period_and_are_not_tagged() {
        let backups = vec![
            with(completed("f-old", "2024-01-01T01:00:00Z"), |c| {
                c.status = Status::Failed
            }),
            with(completed("f-edge", "2024-01-01T01:30:00Z"), |c| {
                c.status = Status::Failed
            }),
            with(completed("f-new", "2024-01-01T02:00:00Z"), |c| {
                c.status = Status::Failed
            }),
            completed("ok", "2024-01-01T03:00:00Z"),
        ];
        let day = Policy {
            failed_grace: TimeDelta::hours(24),
            ..Policy::default()
        };
        let ds = plan(&backups, &day, at("2024-01-02T01:30:00Z"), &Utc);
        assert_eq!(deleted(&ds), vec!["f-old"]);
        assert_eq!(
            texts(decision(&ds, "f-old")),
            vec!["failed attempt older than 24h"]
        );
        assert_eq!(
            texts(decision(&ds, "f-edge")),
            vec!["failed attempt, within 24h grace"]
        );
        assert!(decision(&ds, "f-new").tags.is_empty());
        assert_eq!(
            decision(&ds, "ok").tags,
            vec![Tag::Daily, Tag::Weekly, Tag::Monthly],
            "a failed attempt is never the first backup of the day"
        );
        let t = tags(&backups, &Utc);
        assert_eq!(t.len(), 1, "failed backups have no tag entry");

        let short = Policy {
            failed_grace: TimeDelta::minutes(90),
            ..Policy::default()
        };
        let ds = plan(&backups, &short, at("2024-01-01T03:00:00Z"), &Utc);
        assert_eq!(deleted(&ds), vec!["f-old"]);
        assert_eq!(
            texts(decision(&ds, "f-old")),
            vec!["failed attempt older than 90min"]
        );
    }

    #[test]
    fn manual_backups_have_their_own_rule_and_take_no_slot() {
        let policy = Policy {
            keep_daily: 2,
            keep_weekly: 0,
            keep_monthly: 0,
            manual_keep_days: Some(30),
            ..Policy::default()
        };
        let manual = |id: &str, when: &str| with(completed(id, when), |c| c.manual = true);
        let backups = vec![
            manual("m-expired", "2024-01-01T00:00:00Z"),
            // Exactly 30 days before `now`: not older than 30 days yet.
            manual("m-edge", "2024-02-03T00:00:00Z"),
            completed("s1", "2024-03-01T02:00:00Z"),
            completed("s2", "2024-03-02T02:00:00Z"),
            // Earlier in the day than s3: must not take s3's daily tag.
            manual("m-kept", "2024-03-03T01:00:00Z"),
            completed("s3", "2024-03-03T02:00:00Z"),
            // The newest completed backup overall is manual and protected.
            manual("m-newest", "2024-03-03T05:00:00Z"),
        ];
        let now = at("2024-03-04T00:00:00Z");
        let ds = plan(&backups, &policy, now, &Utc);
        assert_eq!(kept(&ds), vec!["m-edge", "s2", "m-kept", "s3", "m-newest"]);
        assert_eq!(deleted(&ds), vec!["m-expired", "s1"]);
        assert_eq!(
            texts(decision(&ds, "m-expired")),
            vec!["manual, older than 30 days"]
        );
        assert_eq!(texts(decision(&ds, "m-kept")), vec!["manual, kept 30 days"]);
        assert_eq!(
            texts(decision(&ds, "m-newest")),
            vec!["newest completed backup", "manual, kept 30 days"]
        );
        assert_eq!(texts(decision(&ds, "s3")), vec!["daily 1 of 2"]);
        assert_eq!(texts(decision(&ds, "s1")), vec!["beyond 2 daily"]);
        assert!(decision(&ds, "m-kept").tags.is_empty());
        assert!(!tags(&backups, &Utc).contains_key("m-kept"));

        // Expired and newest at once: safety still wins.
        let ds = plan(&backups, &policy, at("2025-01-01T00:00:00Z"), &Utc);
        assert_eq!(
            texts(decision(&ds, "m-newest")),
            vec!["newest completed backup"]
        );

        let forever = Policy {
            manual_keep_days: None,
            ..policy
        };
        let ds = plan(&backups, &forever, at("2034-01-01T00:00:00Z"), &Utc);
        assert!(decision(&ds, "m-expired").keep);
        assert_eq!(
            texts(decision(&ds, "m-expired")),
            vec!["manual, kept forever"]
        );
    }

    #[test]
    fn keep_last_for_hourly_backups() {
        // h00..h47 hourly from 2024-05-01T00:00Z: May 1 and May 2.
        let start = at("2024-05-01T00:00:00Z");
        let backups: Vec<Candidate> = (0..48)
            .map(|h| Candidate {
                id: format!("h{h:02}"),
                created_at: start + TimeDelta::hours(h),
                status: Status::Completed,
                pinned: false,
                manual: false,
                in_use: false,
            })
            .collect();
        let policy = Policy {
            keep_last: 5,
            keep_daily: 2,
            keep_weekly: 0,
            keep_monthly: 0,
            ..Policy::default()
        };
        let ds = plan(&backups, &policy, at("2024-05-02T23:30:00Z"), &Utc);
        assert_eq!(
            kept(&ds),
            vec!["h00", "h24", "h43", "h44", "h45", "h46", "h47"]
        );
        assert_eq!(texts(decision(&ds, "h00")), vec!["daily 2 of 2"]);
        assert_eq!(texts(decision(&ds, "h24")), vec!["daily 1 of 2"]);
        assert_eq!(texts(decision(&ds, "h43")), vec!["last 5 of 5"]);
        assert_eq!(
            texts(decision(&ds, "h47")),
            vec!["newest completed backup", "last 1 of 5"]
        );
        assert_eq!(
            texts(decision(&ds, "h42")),
            vec!["beyond the last 5, not the first of its day"]
        );
    }

    #[test]
    fn identical_timestamps_break_ties_by_id() {
        let backups = vec![
            completed("b", "2024-01-01T02:00:00Z"),
            completed("a", "2024-01-01T02:00:00Z"),
            completed("c", "2024-01-01T02:00:00Z"),
        ];
        let t = tags(&backups, &Utc);
        assert_eq!(t["a"], vec![Tag::Daily, Tag::Weekly, Tag::Monthly]);
        assert!(t["b"].is_empty() && t["c"].is_empty());
        let policy = Policy {
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
            ..Policy::default()
        };
        let ds = plan(&backups, &policy, at("2024-01-02T00:00:00Z"), &Utc);
        assert_eq!(kept(&ds), vec!["c"], "the newest is the greatest id");
        assert_eq!(
            texts(decision(&ds, "a")),
            vec![
                "no rule keeps it (keep_last, keep_daily, keep_weekly and keep_monthly are all 0)"
            ]
        );
    }

    #[test]
    fn deletion_text_names_only_the_rules_in_force() {
        let r = |tags: &[Tag], last, d, w, m| {
            Reason::NotKept {
                tags: tags.to_vec(),
                keep_last: last,
                keep_daily: d,
                keep_weekly: w,
                keep_monthly: m,
            }
            .to_string()
        };
        use Tag::*;
        assert_eq!(
            r(&[Daily], 0, 7, 4, 6),
            "beyond 7 daily, not weekly/monthly"
        );
        assert_eq!(r(&[Daily], 0, 7, 0, 6), "beyond 7 daily, not monthly");
        assert_eq!(r(&[Daily], 0, 7, 0, 0), "beyond 7 daily");
        assert_eq!(
            r(&[Daily, Weekly], 0, 7, 4, 6),
            "beyond 7 daily and 4 weekly, not monthly"
        );
        assert_eq!(
            r(&[Daily, Weekly, Monthly], 3, 7, 4, 6),
            "beyond the last 3, 7 daily, 4 weekly and 6 monthly"
        );
        assert_eq!(r(&[], 0, 7, 4, 6), "not the first of its day/week/month");
        assert_eq!(r(&[], 0, 0, 4, 0), "not the first of its week");
        assert_eq!(
            r(&[], 2, 7, 0, 0),
            "beyond the last 2, not the first of its day"
        );
        assert_eq!(r(&[], 2, 0, 0, 0), "beyond the last 2");
        assert_eq!(
            Reason::ManualKept { days: Some(1) }.to_string(),
            "manual, kept 1 day"
        );
        assert_eq!(
            Reason::FailedWithinGrace {
                grace: TimeDelta::days(3)
            }
            .to_string(),
            "failed attempt, within 3d grace"
        );
    }

    #[test]
    fn decisions_follow_input_order() {
        let backups = vec![
            completed("z", "2024-01-03T02:00:00Z"),
            completed("x", "2024-01-01T02:00:00Z"),
            completed("y", "2024-01-02T02:00:00Z"),
        ];
        let ds = plan(
            &backups,
            &Policy::default(),
            at("2024-01-04T00:00:00Z"),
            &Utc,
        );
        let order: Vec<&str> = ds.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(order, vec!["z", "x", "y"]);
        assert!(plan(&[], &Policy::default(), at("2024-01-04T00:00:00Z"), &Utc).is_empty());
    }
}
