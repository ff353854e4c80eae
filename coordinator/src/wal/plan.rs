//! The gaps in what a timeline has stored, for `dsctl wal` and `wal.gap`.
//! (What a restore needs is planned in `wal::restore`.)

use std::collections::BTreeSet;

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

    #[test]
    fn gaps_are_the_missing_runs_between_first_and_last() {
        let s: BTreeSet<u64> = [3, 4, 7, 8, 10].into_iter().collect();
        assert_eq!(gaps(&s), [(5, 6), (9, 9)]);
        assert!(gaps(&BTreeSet::new()).is_empty());
    }
}
