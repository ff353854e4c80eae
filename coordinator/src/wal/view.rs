//! What a target's WAL looks like to an operator (`dsctl wal`), to the
//! alert rules (`wal.gap`, `wal.lag`) and to `/metrics`: per timeline the
//! first and last segment, the gaps and the partial; where the stored WAL
//! ends; the lag behind the server. Pure over the index's rows, the
//! server's last reported position and a clock reading.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use datasaver_common::wal::{Segment, WalFile};

use super::index::{Binding, IndexedWal};
use super::plan::gaps;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline {
    pub timeline: u32,
    pub first: Option<String>,
    pub last: Option<String>,
    pub segments: u64,
    /// each run missing: (first, last) segment names
    pub gaps: Vec<(String, String)>,
    pub partial: Option<String>,
    pub stored_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetWal {
    pub target: String,
    pub system_identifier: String,
    pub bound_at: String,
    pub streaming: bool,
    pub timelines: Vec<Timeline>,
    /// where the stored WAL of the newest timeline ends
    pub stored_end: u64,
    pub last_stored_at: Option<DateTime<Utc>>,
    /// the server's position as last reported
    pub server_lsn: Option<u64>,
    pub lag_bytes: Option<u64>,
    /// how long the server has had WAL not stored (since the newest stored
    /// file), while it is ahead
    pub lag_seconds: Option<u64>,
    pub refused: Option<(String, String)>,
    pub conflict: Option<(String, String)>,
    /// the newest time (the server's clock) whose WAL is all stored
    pub latest_recoverable: Option<DateTime<Utc>>,
    /// the oldest time a restore can reach: when the oldest usable base
    /// backup of the bound cluster became consistent (the window's start)
    pub earliest_recoverable: Option<DateTime<Utc>>,
    /// the slot's `wal_status` as last reported
    pub slot_status: Option<String>,
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The view of one target.
pub fn summarize(
    binding: &Binding,
    files: &[IndexedWal],
    streaming: bool,
    server_lsn: Option<u64>,
    now: DateTime<Utc>,
) -> TargetWal {
    let seg_size = binding.seg_size;
    let mut by_tli: BTreeMap<u32, (BTreeSet<u64>, Option<Segment>, u64)> = BTreeMap::new();
    let mut stored_end = 0u64;
    let mut newest_tli = 0u32;
    let mut last_stored_at: Option<DateTime<Utc>> = None;
    for f in files {
        if let Some(t) = parse_time(&f.stored_at) {
            last_stored_at = Some(last_stored_at.map_or(t, |l| l.max(t)));
        }
        match f.stored.file {
            WalFile::Segment(s) => {
                let e = by_tli.entry(s.timeline).or_default();
                e.0.insert(s.segno);
                e.2 += f.stored.size;
            }
            WalFile::Partial(s) => {
                let e = by_tli.entry(s.timeline).or_default();
                e.1 = Some(s);
                e.2 += f.stored.size;
            }
            WalFile::History(t) => {
                by_tli.entry(t).or_default().2 += f.stored.size;
            }
        }
    }
    for (tli, (_, _, _)) in by_tli.iter() {
        newest_tli = newest_tli.max(*tli);
    }
    for f in files {
        let tli = match f.stored.file {
            WalFile::Segment(s) | WalFile::Partial(s) => s.timeline,
            WalFile::History(_) => continue,
        };
        if tli == newest_tli {
            stored_end = stored_end.max(f.end_lsn.unwrap_or(0));
        }
    }
    let name = |tli: u32, segno: u64| {
        Segment {
            timeline: tli,
            segno,
        }
        .name(seg_size)
    };
    let timelines = by_tli
        .into_iter()
        .map(|(tli, (segs, partial, bytes))| Timeline {
            timeline: tli,
            first: segs.first().map(|s| name(tli, *s)),
            last: segs.last().map(|s| name(tli, *s)),
            segments: segs.len() as u64,
            // Below where retention keeps the WAL whole, only held base
            // backups' own ranges stay: the runs between are not gaps.
            gaps: gaps(&segs)
                .into_iter()
                .filter(|(_, last)| binding.retained_from.is_none_or(|f| *last >= f / seg_size))
                .map(|(a, b)| (name(tli, a), name(tli, b)))
                .collect(),
            // A partial only counts after the last whole segment.
            partial: partial
                .filter(|p| segs.last().is_none_or(|l| p.segno > *l))
                .map(|p| format!("{}.partial", p.name(seg_size))),
            stored_bytes: bytes,
        })
        .collect();
    let lag_bytes = server_lsn.map(|s| s.saturating_sub(stored_end));
    let lag_seconds = match lag_bytes {
        Some(b) if b > 0 => {
            Some(last_stored_at.map_or(0, |t| (now - t).num_seconds().max(0) as u64))
        }
        Some(_) => Some(0),
        None => None,
    };
    TargetWal {
        target: binding.target.clone(),
        system_identifier: binding.system_identifier.clone(),
        bound_at: binding.bound_at.clone(),
        streaming,
        timelines,
        stored_end,
        last_stored_at,
        server_lsn,
        lag_bytes,
        lag_seconds,
        refused: binding.refused.clone(),
        conflict: binding.conflict.clone(),
        latest_recoverable: None,
        earliest_recoverable: None,
        slot_status: None,
    }
}

/// The view of every target streaming WAL (or only `target`).
pub async fn targets(
    core: &crate::Core,
    target: Option<&str>,
) -> Result<Vec<TargetWal>, crate::catalog::CatalogError> {
    let mut out = Vec::new();
    for b in core.wal_index.bindings().await? {
        if target.is_some_and(|t| t != b.target) || b.system_identifier.is_empty() {
            continue;
        }
        let files = core
            .wal_index
            .files(&b.target, &b.system_identifier, b.seg_size)
            .await?;
        let live = core.wal_live.get(&b.target);
        let mut v = summarize(
            &b,
            &files,
            live.streams > 0,
            live.server.map(|(l, _)| l),
            core.clock.now(),
        );
        v.latest_recoverable = core
            .wal_index
            .latest_mark_within(&b.target, &b.system_identifier, v.stored_end)
            .await?
            .and_then(|(t, _)| DateTime::from_timestamp_micros(t));
        v.slot_status = live.slot_status.clone();
        v.earliest_recoverable = core
            .repo
            .list(Some(&b.target))
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| {
                r.kind == crate::repo::Kind::Base
                    && r.status == crate::repo::Status::Completed
                    && r.system_identifier == b.system_identifier
                    && !r.known_bad()
            })
            .filter_map(|r| r.physical)
            .map(|p| p.consistent_at_micros)
            .min()
            .and_then(DateTime::from_timestamp_micros);
        out.push(v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::wal::StoredWal;
    use datasaver_common::wal::DEFAULT_SEG_SIZE as SEG;

    fn row(file: WalFile, end: Option<u64>, at: &str) -> IndexedWal {
        IndexedWal {
            stored: StoredWal {
                file,
                raw_blake3: "a".repeat(64),
                key: format!("{file:?}"),
                size: 100,
            },
            end_lsn: end,
            stored_at: at.into(),
        }
    }

    fn seg(tli: u32, segno: u64) -> Segment {
        Segment {
            timeline: tli,
            segno,
        }
    }

    #[test]
    fn timelines_gaps_partials_and_lag() {
        let b = Binding {
            target: "app".into(),
            system_identifier: "7301".into(),
            seg_size: SEG,
            bound_at: "2026-12-01T00:00:00Z".into(),
            refused: None,
            conflict: None,
            retained_from: None,
        };
        let files = vec![
            row(
                WalFile::Segment(seg(1, 1)),
                Some(2 * SEG),
                "2026-12-01T00:01:00Z",
            ),
            row(
                WalFile::Segment(seg(1, 2)),
                Some(3 * SEG),
                "2026-12-01T00:02:00Z",
            ),
            row(
                WalFile::Segment(seg(1, 5)),
                Some(6 * SEG),
                "2026-12-01T00:03:00Z",
            ),
            row(WalFile::History(2), None, "2026-12-01T00:04:00Z"),
            row(
                WalFile::Segment(seg(2, 6)),
                Some(7 * SEG),
                "2026-12-01T00:05:00Z",
            ),
            row(
                WalFile::Partial(seg(2, 7)),
                Some(7 * SEG + 500),
                "2026-12-01T00:06:00Z",
            ),
        ];
        let now = parse_time("2026-12-01T00:10:00Z").unwrap();
        let v = summarize(&b, &files, true, Some(7 * SEG + 1500), now);
        assert_eq!(v.timelines.len(), 2);
        let t1 = &v.timelines[0];
        assert_eq!(t1.first.as_deref(), Some("000000010000000000000001"));
        assert_eq!(t1.last.as_deref(), Some("000000010000000000000005"));
        assert_eq!(t1.segments, 3);
        assert_eq!(
            t1.gaps,
            [(
                "000000010000000000000003".to_string(),
                "000000010000000000000004".to_string()
            )]
        );
        assert_eq!(t1.partial, None);
        let t2 = &v.timelines[1];
        assert_eq!(
            t2.partial.as_deref(),
            Some("000000020000000000000007.partial")
        );
        assert!(t2.gaps.is_empty());
        assert_eq!(v.stored_end, 7 * SEG + 500);
        assert_eq!(v.lag_bytes, Some(1000));
        // Behind since the newest stored file, four minutes ago.
        assert_eq!(v.lag_seconds, Some(240));
        // Caught up: no lag, however old the newest file.
        let v = summarize(&b, &files, true, Some(7 * SEG + 500), now);
        assert_eq!((v.lag_bytes, v.lag_seconds), (Some(0), Some(0)));
        // Position unknown: lag unknown.
        let v = summarize(&b, &files, false, None, now);
        assert_eq!((v.lag_bytes, v.lag_seconds), (None, None));
        // Retention keeps the WAL whole from segment 5: segments 3-4 went
        // with a base backup no longer kept, not a gap.
        let kept = Binding {
            retained_from: Some(5 * SEG + 40),
            ..b.clone()
        };
        let v = summarize(&kept, &files, true, None, now);
        assert!(v.timelines[0].gaps.is_empty(), "{:?}", v.timelines[0]);
        let later = Binding {
            retained_from: Some(4 * SEG),
            ..b
        };
        let v = summarize(&later, &files, true, None, now);
        assert_eq!(v.timelines[0].gaps.len(), 1);
    }
}
