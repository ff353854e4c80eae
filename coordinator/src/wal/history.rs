//! A timeline's history (`TTTTTTTT.history`): which timelines came before
//! it and where each one was left. It answers which timeline a position,
//! or a segment file, belongs to on the way to a given timeline, and
//! whether a base backup taken on an older timeline is an ancestor of it
//! (taken before the fork) — the checks a restore plan makes before it
//! writes anything.

use super::name::Lsn;

/// Where the WAL switched from `parent` to the next timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    pub parent: u32,
    pub at: Lsn,
}

/// Timeline `timeline` and the switches that led to it, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    pub timeline: u32,
    pub switches: Vec<Switch>,
}

impl History {
    /// A timeline with no past (timeline 1 of a new cluster).
    pub fn first(timeline: u32) -> History {
        History {
            timeline,
            switches: Vec::new(),
        }
    }

    /// Parses the history file of `timeline`: lines `parent<TAB>X/Y<TAB>reason`,
    /// `#` comments and blank lines skipped. Parents must increase and stay
    /// below `timeline`; switch points must not go back.
    pub fn parse(timeline: u32, text: &str) -> Result<History, String> {
        let mut switches: Vec<Switch> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| format!("line {}: {why}", n + 1);
            let mut fields = line.split_whitespace();
            let parent = fields
                .next()
                .and_then(|f| f.parse::<u32>().ok())
                .ok_or_else(|| bad("no parent timeline"))?;
            let at = fields
                .next()
                .ok_or_else(|| bad("no switch point"))
                .and_then(|f| Lsn::parse(f).map_err(|e| bad(&e)))?;
            if parent == 0 || parent >= timeline {
                return Err(bad(&format!(
                    "parent timeline {parent} is not below {timeline}"
                )));
            }
            if let Some(last) = switches.last() {
                if parent <= last.parent || at < last.at {
                    return Err(bad("timelines or switch points go backwards"));
                }
            }
            switches.push(Switch { parent, at });
        }
        Ok(History { timeline, switches })
    }

    /// Each timeline on the way here, oldest first, with the position it
    /// begins at and (but for this one) the position it was left at.
    pub fn spans(&self) -> Vec<(u32, Lsn, Option<Lsn>)> {
        let mut out = Vec::new();
        let mut begin = Lsn(0);
        for s in &self.switches {
            out.push((s.parent, begin, Some(s.at)));
            begin = s.at;
        }
        out.push((self.timeline, begin, None));
        out
    }

    /// The timeline that holds position `lsn` on the way to this one.
    pub fn timeline_at(&self, lsn: Lsn) -> u32 {
        self.spans()
            .into_iter()
            .find(|(_, _, end)| end.is_none_or(|e| lsn < e))
            .map_or(self.timeline, |(t, _, _)| t)
    }

    /// The timeline whose file holds segment `segno`: the newest one that
    /// begins in or before it (the segment a switch falls in is read from
    /// the new timeline, which holds the old WAL up to the switch).
    pub fn timeline_of_segment(&self, segno: u64, seg_size: u64) -> u32 {
        self.spans()
            .into_iter()
            .rev()
            .find(|(_, begin, _)| begin.0 / seg_size <= segno)
            .map_or(self.timeline, |(t, _, _)| t)
    }

    /// Whether WAL of timeline `tli` up to `lsn` is part of this history:
    /// `tli` is this timeline, or an ancestor left at or after `lsn`.
    pub fn leads_through(&self, tli: u32, lsn: Lsn) -> bool {
        self.spans()
            .into_iter()
            .any(|(t, _, end)| t == tli && end.is_none_or(|e| lsn <= e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = super::super::name::DEFAULT_SEG_SIZE;

    fn three() -> History {
        History::parse(
            3,
            "1\t0/3000158\tno recovery target specified\n\n# a comment\n2\t0/5000060\tbefore 2026-12-02 14:02:59+00\n",
        )
        .unwrap()
    }

    #[test]
    fn which_timeline_holds_a_position_and_a_segment() {
        let h = three();
        assert_eq!(h.timeline_at(Lsn(0x100)), 1);
        assert_eq!(h.timeline_at(Lsn::parse("0/3000157").unwrap()), 1);
        assert_eq!(h.timeline_at(Lsn::parse("0/3000158").unwrap()), 2);
        assert_eq!(h.timeline_at(Lsn::parse("0/6000000").unwrap()), 3);
        // segment 3 holds the switch from 1 to 2: read from timeline 2
        assert_eq!(h.timeline_of_segment(2, SEG), 1);
        assert_eq!(h.timeline_of_segment(3, SEG), 2);
        assert_eq!(h.timeline_of_segment(4, SEG), 2);
        assert_eq!(h.timeline_of_segment(5, SEG), 3);
        assert_eq!(History::first(1).timeline_of_segment(99, SEG), 1);
    }

    #[test]
    fn a_base_backup_belongs_to_a_history_only_before_its_fork() {
        let h = three();
        assert!(h.leads_through(1, Lsn::parse("0/2000000").unwrap()));
        assert!(!h.leads_through(1, Lsn::parse("0/4000000").unwrap()));
        assert!(h.leads_through(2, Lsn::parse("0/5000060").unwrap()));
        assert!(h.leads_through(3, Lsn::parse("9/0").unwrap()));
        assert!(!h.leads_through(4, Lsn(0)));
    }

    #[test]
    fn a_damaged_history_is_refused_with_its_line() {
        for (text, why) in [
            ("x\t0/1\treason", "line 1: no parent timeline"),
            ("1\tnope", "line 1:"),
            ("3\t0/1", "parent timeline 3 is not below 3"),
            (
                "1\t0/5\n1\t0/6",
                "line 2: timelines or switch points go backwards",
            ),
            ("1\t0/5\n2\t0/4", "line 2:"),
        ] {
            let e = History::parse(3, text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }
}
