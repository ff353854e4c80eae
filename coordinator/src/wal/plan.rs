//! What a point-in-time restore needs, decided before anything is written:
//! the base backup's timeline must lead to the target timeline (taken
//! before its fork), and every segment from the base's start to the target
//! must be stored — named, in order, across timeline switches. And, for
//! `dsctl wal` and `wal.gap`, the gaps in what a timeline has stored.

use std::collections::BTreeSet;

use super::history::History;
use super::name::{Lsn, Segment};

/// Why a restore cannot reach its target from a base backup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the base backup is on timeline {base_tli} at {base_lsn}, which does not lead to timeline {target_tli} (it forked off before, or is another branch)")]
    NotAncestor {
        base_tli: u32,
        base_lsn: Lsn,
        target_tli: u32,
    },
    #[error("the target {target} is before the base backup's start {start}")]
    BeforeBase { start: Lsn, target: Lsn },
    #[error("WAL segment {name} is missing (needed from the base backup at {start} to {target}): a restore past it is impossible")]
    Missing {
        name: String,
        start: Lsn,
        target: Lsn,
    },
}

/// The segments that replay from `start` (a base backup's start, on
/// timeline `base_tli`) to `target` along `history`, or why not; each must
/// be in `stored`.
pub fn segments(
    history: &History,
    base_tli: u32,
    start: Lsn,
    target: Lsn,
    seg_size: u64,
    stored: &BTreeSet<Segment>,
) -> Result<Vec<Segment>, PlanError> {
    if !history.leads_through(base_tli, start) {
        return Err(PlanError::NotAncestor {
            base_tli,
            base_lsn: start,
            target_tli: history.timeline,
        });
    }
    if target < start {
        return Err(PlanError::BeforeBase { start, target });
    }
    let mut out = Vec::new();
    for segno in start.0 / seg_size..=target.0 / seg_size {
        let seg = Segment {
            timeline: history.timeline_of_segment(segno, seg_size),
            segno,
        };
        if !stored.contains(&seg) {
            return Err(PlanError::Missing {
                name: seg.name(seg_size),
                start,
                target,
            });
        }
        out.push(seg);
    }
    Ok(out)
}

/// The runs of segment numbers missing between the first and the last of
/// `stored` (one timeline's), as inclusive ranges.
pub fn gaps(stored: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut prev: Option<u64> = None;
    for &s in stored {
        if let Some(p) = prev {
            if s > p + 1 {
                out.push((p + 1, s - 1));
            }
        }
        prev = Some(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEG: u64 = super::super::name::DEFAULT_SEG_SIZE;

    fn seg(timeline: u32, segno: u64) -> Segment {
        Segment { timeline, segno }
    }

    #[test]
    fn a_plan_crosses_a_timeline_switch_and_names_what_is_missing() {
        // Timeline 1 until 0/3000158, then 2.
        let h = History::parse(2, "1\t0/3000158\treason").unwrap();
        let mut stored: BTreeSet<Segment> = [
            seg(1, 1),
            seg(1, 2),
            seg(1, 3),
            seg(2, 3),
            seg(2, 4),
            seg(2, 5),
        ]
        .into_iter()
        .collect();
        let start = Lsn::parse("0/1000028").unwrap();
        let target = Lsn::parse("0/5000100").unwrap();
        let plan = segments(&h, 1, start, target, SEG, &stored).unwrap();
        assert_eq!(
            plan,
            [seg(1, 1), seg(1, 2), seg(2, 3), seg(2, 4), seg(2, 5)]
        );

        stored.remove(&seg(2, 4));
        let e = segments(&h, 1, start, target, SEG, &stored).unwrap_err();
        assert_eq!(
            e.to_string(),
            "WAL segment 000000020000000000000004 is missing (needed from the base backup at 0/1000028 to 0/5000100): a restore past it is impossible"
        );
        // A base taken on timeline 1 after the fork cannot reach timeline 2.
        let late = Lsn::parse("0/4000000").unwrap();
        assert!(matches!(
            segments(&h, 1, late, target, SEG, &stored),
            Err(PlanError::NotAncestor { .. })
        ));
        assert!(matches!(
            segments(&h, 1, start, Lsn(0x100), SEG, &stored),
            Err(PlanError::BeforeBase { .. })
        ));
    }

    #[test]
    fn gaps_are_the_missing_runs_between_first_and_last() {
        let s: BTreeSet<u64> = [3, 4, 7, 8, 10].into_iter().collect();
        assert_eq!(gaps(&s), [(5, 6), (9, 9)]);
        assert!(gaps(&BTreeSet::new()).is_empty());
    }

    proptest! {
        /// Removing any one needed segment makes the plan fail naming
        /// exactly that segment; with all present it lists each once.
        #[test]
        fn any_missing_segment_is_the_one_named(first in 0u64..50, len in 1u64..40, hole in any::<prop::sample::Index>()) {
            let h = History::first(1);
            let all: BTreeSet<Segment> = (first..first + len).map(|n| seg(1, n)).collect();
            let start = Lsn(first * SEG + 40);
            let target = Lsn((first + len - 1) * SEG + 100);
            let plan = segments(&h, 1, start, target, SEG, &all).unwrap();
            prop_assert_eq!(plan.len() as u64, len);
            let gone = seg(1, first + hole.index(len as usize) as u64);
            let mut some = all.clone();
            some.remove(&gone);
            match segments(&h, 1, start, target, SEG, &some) {
                Err(PlanError::Missing { name, .. }) => prop_assert_eq!(name, gone.name(SEG)),
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
