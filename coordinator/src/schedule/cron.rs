//! Cron expressions: standard 5 fields (minute hour day-of-month month
//! day-of-week) or 6 with a leading seconds field, evaluated in a time zone
//! (UTC unless one is configured), through `croner`.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};

/// A parsed schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    expr: String,
    cron: croner::Cron,
    tz: Tz,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.expr == other.expr && self.tz == other.tz
    }
}

impl Schedule {
    /// Parses `expr`; the error says what is wrong with it.
    pub fn parse(expr: &str, tz: Tz) -> Result<Schedule, String> {
        let expr = expr.split_whitespace().collect::<Vec<_>>().join(" ");
        let fields = expr.split(' ').count();
        if !(5..=6).contains(&fields) {
            return Err(format!(
                "{expr:?} has {fields} fields; use 5 (minute hour day month weekday, e.g. \"0 2 * * *\") or 6 with leading seconds"
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(&expr)
            .map_err(|e| format!("{expr:?} is not a valid cron expression: {e}"))?;
        let s = Schedule { expr, cron, tz };
        // An expression that never fires (e.g. 30 February) is a mistake.
        if s.next_after(Utc::now()).is_none() {
            return Err(format!("{:?} never fires", s.expr));
        }
        Ok(s)
    }

    pub fn expr(&self) -> &str {
        &self.expr
    }

    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// The first slot strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The last slot at or before `t`.
    pub fn last_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The longest gap between consecutive slots over the next 32 from `t`
    /// (a weekday schedule's weekend, a monthly one's longest month): how
    /// long a healthy target can go without a backup.
    pub fn longest_gap(&self, t: DateTime<Utc>) -> Option<chrono::Duration> {
        let mut prev = self.next_after(t)?;
        let mut longest = chrono::Duration::zero();
        for _ in 0..32 {
            let Some(next) = self.next_after(prev) else {
                break;
            };
            longest = longest.max(next - prev);
            prev = next;
        }
        Some(longest).filter(|d| *d > chrono::Duration::zero())
    }
}

impl Schedule {
    /// The first slot at or after `t`.
    pub fn at_or_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self.last_at_or_before(t) {
            Some(s) if s == t => Some(s),
            _ => self.next_after(t),
        }
    }

    /// The shortest gap between consecutive slots from the first one after
    /// `t`, over the next year or [`SHORTEST_GAP_FIRES`] slots, whichever
    /// ends first (real instants, so a time zone's clock changes count as
    /// they happen). `None` for a schedule with fewer than two slots in
    /// that horizon. A cron expression is a product of its fields, so a gap
    /// that occurs at all occurs within this horizon in practice.
    pub fn shortest_gap(&self, t: DateTime<Utc>) -> Option<chrono::Duration> {
        let mut prev = self.next_after(t)?;
        let end = prev + chrono::Duration::days(366);
        let one_second = chrono::Duration::seconds(1);
        let mut shortest: Option<chrono::Duration> = None;
        for _ in 0..SHORTEST_GAP_FIRES {
            let Some(next) = self.next_after(prev).filter(|n| *n <= end) else {
                break;
            };
            let gap = next - prev;
            shortest = Some(shortest.map_or(gap, |s| s.min(gap)));
            // Slots are whole seconds: nothing is shorter than one.
            if gap <= one_second {
                break;
            }
            prev = next;
        }
        shortest
    }
}

/// How many slots [`Schedule::shortest_gap`] looks at, at most.
pub const SHORTEST_GAP_FIRES: usize = 2000;

/// Parses a time zone name such as `Europe/Berlin` or `UTC`.
pub fn parse_tz(name: &str) -> Result<Tz, String> {
    name.trim().parse::<Tz>().map_err(|_| {
        format!("{name:?} is not a time zone name from the IANA database (e.g. UTC, Europe/Berlin)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn five_and_six_fields() {
        let s = Schedule::parse("0 2 * * *", Tz::UTC).unwrap();
        assert_eq!(
            s.next_after(utc(2024, 1, 1, 2, 0, 0)),
            Some(utc(2024, 1, 2, 2, 0, 0))
        );
        assert_eq!(
            s.last_at_or_before(utc(2024, 1, 1, 2, 0, 0)),
            Some(utc(2024, 1, 1, 2, 0, 0))
        );
        let s = Schedule::parse("*/5 * * * * *", Tz::UTC).unwrap();
        assert_eq!(
            s.next_after(utc(2024, 1, 1, 0, 0, 3)),
            Some(utc(2024, 1, 1, 0, 0, 5))
        );
    }

    #[test]
    fn time_zone_and_dst() {
        let tz = parse_tz("Europe/Berlin").unwrap();
        let s = Schedule::parse("30 2 * * *", tz).unwrap();
        // 02:30 Berlin in winter is 01:30 UTC
        assert_eq!(
            s.next_after(utc(2024, 1, 10, 0, 0, 0)),
            Some(utc(2024, 1, 10, 1, 30, 0))
        );
        // and in summer 00:30 UTC
        assert_eq!(
            s.next_after(utc(2024, 7, 10, 0, 0, 0)),
            Some(utc(2024, 7, 10, 0, 30, 0))
        );
    }

    #[test]
    fn longest_gap_covers_weekends_and_months() {
        let s = Schedule::parse("0 2 * * 1-5", Tz::UTC).unwrap();
        assert_eq!(
            s.longest_gap(utc(2024, 1, 1, 0, 0, 0)),
            Some(chrono::Duration::days(3))
        );
        let s = Schedule::parse("*/5 * * * * *", Tz::UTC).unwrap();
        assert_eq!(
            s.longest_gap(utc(2024, 1, 1, 0, 0, 0)),
            Some(chrono::Duration::seconds(5))
        );
        let s = Schedule::parse("0 3 1 * *", Tz::UTC).unwrap();
        assert_eq!(
            s.longest_gap(utc(2024, 1, 1, 0, 0, 0)),
            Some(chrono::Duration::days(31))
        );
    }

    #[test]
    fn shortest_gap_finds_the_closest_pair() {
        let at = utc(2024, 1, 1, 0, 0, 0);
        let gap = |e: &str, tz: Tz| Schedule::parse(e, tz).unwrap().shortest_gap(at);
        assert_eq!(
            gap("* * * * * *", Tz::UTC),
            Some(chrono::Duration::seconds(1))
        );
        assert_eq!(
            gap("*/5 * * * *", Tz::UTC),
            Some(chrono::Duration::minutes(5))
        );
        assert_eq!(gap("0 2 * * *", Tz::UTC), Some(chrono::Duration::days(1)));
        // two close slots once a day, the rest far apart
        assert_eq!(
            gap("0 0,7 3 * * *", Tz::UTC),
            Some(chrono::Duration::minutes(7))
        );
        // a burst only in one month of the year, looked for from another
        assert_eq!(
            gap("0,1 0 1 6 *", Tz::UTC),
            Some(chrono::Duration::minutes(1))
        );
        // weekdays only: the weekend does not hide the daily gap
        assert_eq!(gap("0 2 * * 1-5", Tz::UTC), Some(chrono::Duration::days(1)));
        // monthly: the shortest month
        assert_eq!(gap("0 3 1 * *", Tz::UTC), Some(chrono::Duration::days(29)));
        // once a year: at most one gap in the horizon, a year long
        assert!(gap("0 3 1 1 *", Tz::UTC).is_none_or(|g| g >= chrono::Duration::days(365)));
        // in a time zone with clock changes the gaps are real time: 02:30
        // Berlin does not exist on the last Sunday of March, 01:30 and 03:30
        // are then one hour apart in real time
        let berlin = parse_tz("Europe/Berlin").unwrap();
        assert_eq!(
            gap("30 1,3 * * *", berlin),
            Some(chrono::Duration::hours(1))
        );
    }

    #[test]
    fn at_or_after_includes_a_slot_exactly_at_t() {
        let s = Schedule::parse("*/5 * * * * *", Tz::UTC).unwrap();
        let t = utc(2024, 1, 1, 0, 0, 5);
        assert_eq!(s.at_or_after(t), Some(t));
        assert_eq!(
            s.at_or_after(t + chrono::Duration::milliseconds(1)),
            Some(utc(2024, 1, 1, 0, 0, 10))
        );
    }

    #[test]
    fn bad_expressions_say_why() {
        for bad in ["", "* * *", "61 * * * *", "0 2 * * * * *", "daily"] {
            let e = Schedule::parse(bad, Tz::UTC).unwrap_err();
            assert!(e.contains("cron") || e.contains("fields"), "{bad:?}: {e}");
        }
        assert!(parse_tz("Mars/Olympus").is_err());
    }
}
