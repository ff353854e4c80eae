//! Property tests for [`super::gfs`] over simulated years of backups.
//!
//! `plan` is checked against a reference model written here from the
//! definitions alone, by brute force: every question ("is this the first of
//! its day?", "is it among the newest N daily?") is answered by scanning the
//! whole list again. It is slow and obviously right, and shares no code with
//! `plan` beyond the public types.

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, TimeDelta, TimeZone, Utc};
use proptest::prelude::*;

use super::gfs::{plan, tags, Candidate, Decision, Policy, Reason, Status, Tag};

/// The zone the calendar is read in. `Utc` and a zero `FixedOffset` are
/// different types and both are tried.
#[derive(Clone, Copy, Debug)]
enum Zone {
    Utc,
    Fixed(i32),
}

fn zone() -> impl Strategy<Value = Zone> {
    prop_oneof![
        Just(Zone::Utc),
        Just(Zone::Fixed(0)),
        Just(Zone::Fixed(2 * 3600)),
        Just(Zone::Fixed(-5 * 3600)),
        Just(Zone::Fixed(5 * 3600 + 1800)),
        Just(Zone::Fixed(14 * 3600)),
        Just(Zone::Fixed(-12 * 3600)),
    ]
}

fn plan_in(z: Zone, bs: &[Candidate], p: &Policy, now: DateTime<Utc>) -> Vec<Decision> {
    match z {
        Zone::Utc => plan(bs, p, now, &Utc),
        Zone::Fixed(s) => plan(bs, p, now, &FixedOffset::east_opt(s).unwrap()),
    }
}

// ---------------------------------------------------------------------------
// Reference model.

/// Day, ISO (week-year, week) and (year, month) of a moment in a zone.
type Periods = (NaiveDate, (i32, u32), (i32, u32));

fn periods_in<Tz: TimeZone>(t: DateTime<Utc>, tz: &Tz) -> Periods {
    let l = t.with_timezone(tz);
    let w = l.iso_week();
    (l.date_naive(), (w.year(), w.week()), (l.year(), l.month()))
}

fn periods(z: Zone, t: DateTime<Utc>) -> Periods {
    match z {
        Zone::Utc => periods_in(t, &Utc),
        Zone::Fixed(s) => periods_in(t, &FixedOffset::east_opt(s).unwrap()),
    }
}

/// `a` comes after `b` (newer, or same time and greater id).
fn newer(a: &Candidate, b: &Candidate) -> bool {
    (a.created_at, &a.id) > (b.created_at, &b.id)
}

fn counts(c: &Candidate) -> bool {
    c.status == Status::Completed && !c.manual
}

struct Expected {
    keep: bool,
    tags: Vec<Tag>,
}

fn model(bs: &[Candidate], p: &Policy, now: DateTime<Utc>, z: Zone) -> Vec<Expected> {
    let per: Vec<Periods> = bs.iter().map(|b| periods(z, b.created_at)).collect();
    let same = |tag: Tag, i: usize, j: usize| match tag {
        Tag::Daily => per[i].0 == per[j].0,
        Tag::Weekly => per[i].1 == per[j].1,
        Tag::Monthly => per[i].2 == per[j].2,
    };
    // first of its period: counts, and no counting backup of the same period before it
    let tagged: Vec<Vec<Tag>> = (0..bs.len())
        .map(|i| {
            Tag::ALL
                .into_iter()
                .filter(|&t| {
                    counts(&bs[i])
                        && !(0..bs.len())
                            .any(|j| counts(&bs[j]) && same(t, i, j) && newer(&bs[i], &bs[j]))
                })
                .collect()
        })
        .collect();
    // among the newest n of those satisfying `f`: fewer than n of them are newer
    let among_newest = |i: usize, n: u32, f: &dyn Fn(usize) -> bool| {
        f(i) && (0..bs.len())
            .filter(|&j| f(j) && newer(&bs[j], &bs[i]))
            .count()
            < n as usize
    };
    let older_than_days = |b: &Candidate, d: u32| now - b.created_at > TimeDelta::days(d.into());

    (0..bs.len())
        .map(|i| {
            let b = &bs[i];
            let newest_completed = b.status == Status::Completed
                && !bs
                    .iter()
                    .any(|c| c.status == Status::Completed && newer(c, b));
            let safe = newest_completed || b.pinned || b.in_use || b.status == Status::Running;
            let policy_keeps = match b.status {
                Status::Running => true,
                Status::Failed => now - b.created_at <= p.failed_grace,
                Status::Completed if b.manual => {
                    p.manual_keep_days.is_none_or(|d| !older_than_days(b, d))
                }
                Status::Completed => {
                    let too_old = p.max_age_days.is_some_and(|d| older_than_days(b, d));
                    let in_slot = among_newest(i, p.keep_last, &|j| counts(&bs[j]))
                        || among_newest(i, p.keep_daily, &|j| tagged[j].contains(&Tag::Daily))
                        || among_newest(i, p.keep_weekly, &|j| tagged[j].contains(&Tag::Weekly))
                        || among_newest(i, p.keep_monthly, &|j| tagged[j].contains(&Tag::Monthly));
                    !too_old && in_slot
                }
            };
            Expected {
                keep: safe || policy_keeps,
                tags: tagged[i].clone(),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Generators.

/// 2015-01-01 .. 2030-01-01: leap years, 53-week ISO years, both sides of
/// many year boundaries.
fn start() -> impl Strategy<Value = i64> {
    1_420_070_400i64..1_893_456_000i64
}

/// Seconds to the next backup: a tie now and then, several a day, a daily
/// schedule with jitter, and outages of days to weeks.
fn gap() -> impl Strategy<Value = i64> {
    prop_oneof![
        2 => Just(0i64),
        25 => 60i64..6 * 3600,
        53 => 20 * 3600i64..28 * 3600,
        20 => 2 * 86_400i64..21 * 86_400,
    ]
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![
        85 => Just(Status::Completed),
        11 => Just(Status::Failed),
        4 => Just(Status::Running),
    ]
}

prop_compose! {
    fn entry()(
        gap in gap(),
        status in status(),
        pinned in prop::bool::weighted(0.04),
        manual in prop::bool::weighted(0.1),
        in_use in prop::bool::weighted(0.03),
        // Ids sort independently of time so the tie-break is exercised.
        prefix in 0u16..1000,
    ) -> (i64, Status, bool, bool, bool, u16) {
        (gap, status, pinned, manual, in_use, prefix)
    }
}

/// Backups in time order (a simulated history), then shuffled: `plan` must
/// not depend on the order it is given.
fn history(max: usize) -> impl Strategy<Value = Vec<Candidate>> {
    (start(), prop::collection::vec(entry(), 1..max))
        .prop_map(|(start, entries)| {
            let mut t = start;
            entries
                .into_iter()
                .enumerate()
                .map(|(n, (gap, status, pinned, manual, in_use, prefix))| {
                    t += gap;
                    Candidate {
                        id: format!("{prefix:03}-{n}"),
                        created_at: DateTime::from_timestamp(t, 0).unwrap(),
                        status,
                        pinned,
                        manual,
                        in_use,
                    }
                })
                .collect::<Vec<_>>()
        })
        .prop_shuffle()
}

prop_compose! {
    fn policy()(
        keep_last in 0u32..10,
        keep_daily in 0u32..10,
        keep_weekly in 0u32..10,
        keep_monthly in 0u32..10,
        max_age_days in prop::option::of(1u32..400),
        manual_keep_days in prop::option::of(1u32..60),
        grace_minutes in 1i64..(4 * 24 * 60),
    ) -> Policy {
        Policy {
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
            max_age_days,
            manual_keep_days,
            failed_grace: TimeDelta::minutes(grace_minutes),
        }
    }
}

fn is_keep_reason(r: &Reason) -> bool {
    matches!(
        r,
        Reason::NewestCompleted
            | Reason::Pinned
            | Reason::InUse
            | Reason::Running
            | Reason::Last { .. }
            | Reason::Slot { .. }
            | Reason::ManualKept { .. }
            | Reason::FailedWithinGrace { .. }
    )
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        // No regression files written into the source tree from a test run;
        // a failure prints its minimal case, which belongs in a fixed test.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn plan_matches_the_reference_model(
        bs in history(250),
        p in policy(),
        z in zone(),
        after in 0i64..(90 * 86_400),
    ) {
        let last = bs.iter().map(|b| b.created_at).max().unwrap();
        let now = last + TimeDelta::seconds(after);
        let ds = plan_in(z, &bs, &p, now);
        let want = model(&bs, &p, now, z);

        prop_assert_eq!(ds.len(), bs.len());
        let newest_completed = bs
            .iter()
            .filter(|b| b.status == Status::Completed)
            .max_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)))
            .map(|b| b.id.clone());
        for ((b, d), w) in bs.iter().zip(&ds).zip(&want) {
            prop_assert_eq!(&d.id, &b.id, "decisions follow input order");
            prop_assert_eq!(d.keep, w.keep, "{} {:?}: reasons {:?}", b.id, b, d.reasons);
            prop_assert_eq!(&d.tags, &w.tags, "tags of {}", b.id);

            if Some(&b.id) == newest_completed.as_ref() {
                prop_assert!(d.keep && d.reasons.contains(&Reason::NewestCompleted));
            }
            if b.pinned || b.in_use || b.status == Status::Running {
                prop_assert!(d.keep, "{} is pinned/in use/running", b.id);
            }
            if d.keep {
                prop_assert!(!d.reasons.is_empty(), "{} kept for no reason", b.id);
                prop_assert!(d.reasons.iter().all(is_keep_reason), "{:?}", d.reasons);
            } else {
                prop_assert_eq!(d.reasons.len(), 1, "{} deleted: {:?}", b.id, d.reasons);
                prop_assert!(!is_keep_reason(&d.reasons[0]), "{:?}", d.reasons);
            }
            for r in &d.reasons {
                if let Reason::Slot { rank, of, .. } | Reason::Last { rank, of } = r {
                    prop_assert!(1 <= *rank && rank <= of, "{r:?}");
                }
                prop_assert!(!r.to_string().is_empty());
            }
        }
        // Each slot is handed out at most once per rank.
        for tag in Tag::ALL {
            let mut ranks: Vec<u32> = ds
                .iter()
                .flat_map(|d| &d.reasons)
                .filter_map(|r| match r {
                    Reason::Slot { tag: t, rank, .. } if *t == tag => Some(*rank),
                    _ => None,
                })
                .collect();
            ranks.sort_unstable();
            let expected: Vec<u32> = (1..=ranks.len() as u32).collect();
            prop_assert_eq!(ranks, expected, "{} ranks", tag);
        }

        // `tags` agrees with `plan`, and has entries for scheduled completed only.
        let t = match z {
            Zone::Utc => tags(&bs, &Utc),
            Zone::Fixed(s) => tags(&bs, &FixedOffset::east_opt(s).unwrap()),
        };
        prop_assert_eq!(t.len(), bs.iter().filter(|b| counts(b)).count());
        for (b, d) in bs.iter().zip(&ds) {
            if counts(b) {
                prop_assert_eq!(&t[&b.id], &d.tags);
            }
        }

        // The outcome depends on the set of backups, not on their order.
        let mut reversed = bs.clone();
        reversed.reverse();
        let mut again = plan_in(z, &reversed, &p, now);
        again.reverse();
        prop_assert_eq!(again, ds);
    }

    #[test]
    fn one_backup_a_day_keeps_exactly_the_newest_n_daily(
        start in start(),
        days in 1usize..120,
        n in 0u32..10,
        z in zone(),
        after in 0i64..86_400,
    ) {
        let bs: Vec<Candidate> = (0..days)
            .map(|d| Candidate {
                id: format!("day-{d:03}"),
                created_at: DateTime::from_timestamp(start + d as i64 * 86_400, 0).unwrap(),
                status: Status::Completed,
                pinned: false,
                manual: false,
                in_use: false,
            })
            .collect();
        let p = Policy {
            keep_last: 0,
            keep_daily: n,
            keep_weekly: 0,
            keep_monthly: 0,
            max_age_days: None,
            manual_keep_days: None,
            failed_grace: TimeDelta::hours(24),
        };
        let now = bs[days - 1].created_at + TimeDelta::seconds(after);
        let ds = plan_in(z, &bs, &p, now);
        // With n = 0 the newest still stays: the safety rule.
        let keep_count = (n as usize).max(1).min(days);
        let kept: Vec<&str> = ds.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect();
        let want: Vec<&str> = bs[days - keep_count..].iter().map(|b| b.id.as_str()).collect();
        prop_assert_eq!(kept, want);
        for d in ds.iter().filter(|d| !d.keep) {
            let text = d.reasons[0].to_string();
            if n == 0 {
                prop_assert!(text.starts_with("no rule keeps it"), "{}", text);
            } else {
                prop_assert_eq!(text, format!("beyond {n} daily"));
            }
        }
    }
}
