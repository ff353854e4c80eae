//! A point-in-time restore's plan, decided before anything is written: the
//! base backup (the newest that is consistent before the target, on the
//! target's cluster), the WAL position the target needs (a mark at or
//! after the target time, an LSN, the base's end, or the end of the stored
//! WAL), and every WAL file from the base's start to there — each one
//! stored, in order, or the restore is refused naming the first missing
//! one. A target outside the recovery window is refused naming the window.

use chrono::{DateTime, Utc};
use datasaver_common::wal::{history_name, Lsn, Segment, WalFile};

use super::history::History;
use super::index::IndexedWal;
use crate::repo::{BackupRecord, Kind, Status};
use crate::Core;

/// Where a restore should stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Goal {
    /// the base backup's own end (a restore of one base backup by id)
    BaseEnd,
    Time(DateTime<Utc>),
    Lsn(Lsn),
    /// everything stored
    Latest,
}

/// One WAL file to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub name: String,
    pub raw_blake3: String,
    /// a partial, the last file of the plan
    pub partial: bool,
}

/// What the agent is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub base: BackupRecord,
    pub goal: Goal,
    pub seg_size: u64,
    pub timeline: u32,
    pub wal: Vec<Planned>,
    /// the WAL position recovery replays to
    pub upto: Lsn,
}

/// Why a restore cannot be done; said before anything is written.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<crate::catalog::CatalogError> for Refused {
    fn from(e: crate::catalog::CatalogError) -> Self {
        Refused::Unavailable(e.to_string())
    }
}

fn stamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn micros(t: i64) -> String {
    DateTime::from_timestamp_micros(t)
        .map(stamp)
        .unwrap_or_else(|| t.to_string())
}

/// The base backups of `target` a restore may start from, newest first.
fn usable(rows: Vec<BackupRecord>) -> Vec<BackupRecord> {
    let mut v: Vec<BackupRecord> = rows
        .into_iter()
        .filter(|r| r.kind == Kind::Base && r.status == Status::Completed)
        .filter(|r| r.physical.is_some())
        .collect();
    v.sort_by_key(|r| std::cmp::Reverse(r.physical.map(|p| p.end_lsn)));
    v
}

/// Plans a restore of `target` (or of base backup `base_id`) to `goal`.
pub async fn plan(
    core: &Core,
    target: &str,
    base_id: Option<&str>,
    goal: Goal,
) -> Result<Plan, Refused> {
    let rows = core
        .repo
        .list(Some(target))
        .await
        .map_err(|e| Refused::Unavailable(e.to_string()))?;
    let bases = usable(rows);
    let binding = core.wal_index.binding(target).await?;
    let named = match base_id {
        Some(id) => Some(bases.iter().find(|b| b.id == id).cloned().ok_or_else(|| {
            Refused::NotFound(format!(
                "{id} is not a completed base backup of {target} (see `dsctl list --target {target}`)"
            ))
        })?),
        None => None,
    };
    let sysid = match (&named, &binding) {
        (Some(b), _) => b.system_identifier.clone(),
        (None, Some(b)) => b.system_identifier.clone(),
        (None, None) => String::new(),
    };
    let Some(series) = series_of(core, target, &sysid).await? else {
        return Err(match &named {
            Some(b) => Refused::Refused(format!(
                "no WAL of cluster {sysid} is stored for {target}: base backup {} cannot be replayed",
                b.id
            )),
            None => Refused::NotFound(format!(
                "target {target} has no stored WAL: turn on DATASAVER_WAL=stream on its agent and take a base backup with `dsctl backup {target} --physical`"
            )),
        });
    };
    let seg_size = series.seg_size;
    // What storage holds now, not what the index last heard: a file lost
    // since is a gap, named here, before anything is written.
    let listed = core
        .repo
        .wal_files(&series)
        .await
        .map_err(|e| Refused::Unavailable(e.to_string()))?;
    core.wal_index
        .replace_files(
            target,
            &sysid,
            seg_size,
            listed,
            crate::alerts::stamp(core.clock.now()),
        )
        .await?;
    let files = core.wal_index.files(target, &sysid, seg_size).await?;
    // The timeline to recover to: the newest stored, or for a base
    // backup's own end its timeline. Its history says which WAL leads
    // there.
    let newest = files
        .iter()
        .map(|f| timeline_of(&f.stored.file))
        .max()
        .unwrap_or(1);
    let on_the_way = |h: &History, b: &BackupRecord| {
        b.physical
            .is_some_and(|p| h.leads_through(p.timeline, Lsn(p.end_lsn)))
    };
    let timeline = match (&named, &goal) {
        (Some(b), Goal::BaseEnd) => b.physical.map_or(1, |p| p.timeline),
        // A named base backup (a verify) goes as far as any timeline it
        // leads to: the newest such, or its own.
        (Some(b), _) => {
            let mut tlis: Vec<u32> = files.iter().map(|f| timeline_of(&f.stored.file)).collect();
            tlis.sort_unstable();
            tlis.dedup();
            tlis.into_iter()
                .rev()
                .find(|t| history_of(&series, *t).is_ok_and(|h| on_the_way(&h, b)))
                .unwrap_or_else(|| b.physical.map_or(1, |p| p.timeline))
        }
        _ => newest,
    };
    let history = history_of(&series, timeline)?;
    let leads = |b: &BackupRecord| on_the_way(&history, b);
    let base = match named {
        Some(b) if leads(&b) => b,
        Some(b) => {
            let p = b.physical.expect("usable bases have one");
            return Err(Refused::Refused(format!(
                "base backup {} (timeline {} to {}) is not on the way to timeline {timeline}, where {target}'s WAL continues: it was taken after the switch or on another branch; restore it alone with `dsctl restore {} --physical`",
                b.id,
                p.timeline,
                Lsn(p.end_lsn),
                b.id
            )));
        }
        None => {
            // Chosen for the user: never one a verify found bad (named by
            // id, it is tried: a verify may have been wrong, or repaired).
            let ours: Vec<&BackupRecord> = bases
                .iter()
                .filter(|b| b.system_identifier == sysid && !b.known_bad() && leads(b))
                .collect();
            let Some(oldest) = ours.last() else {
                if let Some(bad) = bases
                    .iter()
                    .find(|b| b.system_identifier == sysid && leads(b))
                {
                    return Err(Refused::Refused(format!(
                        "every base backup of {target} failed its last verify (the newest, {}: {}); take a new one with `dsctl backup {target} --physical`, or name one by id",
                        bad.id,
                        bad.verification.as_ref().map(|v| v.result()).unwrap_or_default()
                    )));
                }
                if bases.iter().any(|b| b.system_identifier == sysid) {
                    return Err(Refused::Refused(format!(
                        "no base backup of {target} is on the way to timeline {timeline}, where its WAL continues (each was taken after a switch or on another branch): take one with `dsctl backup {target} --physical`"
                    )));
                }
                return Err(Refused::NotFound(format!(
                    "target {target} has no completed base backup of its cluster: take one with `dsctl backup {target} --physical`"
                )));
            };
            let fits = |b: &&&BackupRecord| {
                let p = b.physical.expect("usable bases have one");
                match &goal {
                    Goal::Time(t) => p.consistent_at_micros <= t.timestamp_micros(),
                    Goal::Lsn(l) => p.end_lsn <= l.0,
                    Goal::Latest | Goal::BaseEnd => true,
                }
            };
            match ours.iter().find(fits) {
                Some(b) => (**b).clone(),
                None => {
                    let p = oldest.physical.expect("usable bases have one");
                    return Err(Refused::Refused(format!(
                        "{} is before the earliest recoverable point of {target}: {} ({}, the end of its oldest base backup {})",
                        match &goal {
                            Goal::Time(t) => stamp(*t),
                            Goal::Lsn(l) => l.to_string(),
                            _ => "the target".into(),
                        },
                        micros(p.consistent_at_micros),
                        Lsn(p.end_lsn),
                        oldest.id
                    )));
                }
            }
        }
    };
    let p = base.physical.expect("usable bases have one");
    let stored_end = contiguous_end(&files, &history, Lsn(p.start_lsn), seg_size);
    // Everything stored on the way, gaps or not: a target past a gap is
    // refused naming the missing segment, never cut short at it.
    let max_end = files
        .iter()
        .filter(|f| match f.stored.file {
            WalFile::Segment(s) | WalFile::Partial(s) => {
                s.timeline == history.timeline_of_segment(s.segno, seg_size)
            }
            WalFile::History(_) => false,
        })
        .filter_map(|f| f.end_lsn)
        .max()
        .map_or(stored_end, |e| Lsn(e).max(stored_end));
    let latest_time = core
        .wal_index
        .latest_mark_within(target, &sysid, stored_end.0)
        .await?;
    let window = || {
        format!(
            "the recovery window of {target} from base backup {} is {} to {}",
            base.id,
            micros(p.consistent_at_micros),
            latest_time
                .map(|(t, _)| micros(t))
                .unwrap_or_else(|| format!("the WAL stored up to {stored_end}"))
        )
    };
    // The last byte recovery must read (exclusive end).
    let upto = match &goal {
        Goal::BaseEnd => Lsn(p.end_lsn),
        Goal::Latest => max_end,
        Goal::Lsn(l) => {
            if l.0 < p.end_lsn {
                return Err(Refused::Refused(format!(
                    "{l} is before base backup {}'s end {}; {}",
                    base.id,
                    Lsn(p.end_lsn),
                    window()
                )));
            }
            Lsn(l.0 + 1)
        }
        Goal::Time(t) => {
            // All WAL written before `t` ends at the first mark from `t`.
            match core
                .wal_index
                .first_mark_from(target, &sysid, t.timestamp_micros())
                .await?
            {
                Some((_, lsn)) if lsn <= max_end.0 => Lsn(lsn.max(p.end_lsn)),
                _ => {
                    return Err(Refused::Refused(format!(
                        "{} is after the latest recoverable time: {}",
                        stamp(*t),
                        window()
                    )))
                }
            }
        }
    };
    if upto.0 < p.end_lsn {
        return Err(Refused::Refused(format!(
            "the WAL of {target} is stored only to {stored_end}, before base backup {}'s end {}: it cannot be restored yet",
            base.id,
            Lsn(p.end_lsn)
        )));
    }
    let mut wal = histories(&files, &history)?;
    wal.extend(segments(
        &files,
        &history,
        Lsn(p.start_lsn),
        upto,
        seg_size,
    )?);
    tracing::info!(target = %target, base = %base.id, start = %Lsn(p.start_lsn), base_end = %Lsn(p.end_lsn), upto = %upto, timeline, stored_end = %stored_end, files = wal.len(), "restore planned");
    Ok(Plan {
        base,
        goal,
        seg_size,
        timeline,
        wal,
        upto,
    })
}

fn timeline_of(f: &WalFile) -> u32 {
    match f {
        WalFile::Segment(s) | WalFile::Partial(s) => s.timeline,
        WalFile::History(t) => *t,
    }
}

/// Cluster `sysid`'s series of `target` as storage describes it (with its
/// timeline histories).
async fn series_of(
    core: &Core,
    target: &str,
    sysid: &str,
) -> Result<Option<crate::repo::wal::Series>, Refused> {
    Ok(core
        .repo
        .wal_series(target)
        .await
        .map_err(|e| Refused::Unavailable(e.to_string()))?
        .into_iter()
        .find(|s| s.system_identifier == sysid))
}

/// Timeline `tli`'s history, as the series holds it.
fn history_of(series: &crate::repo::wal::Series, tli: u32) -> Result<History, Refused> {
    if tli == 1 {
        return Ok(History::first(1));
    }
    let text = series.histories.get(&tli).ok_or_else(|| {
        Refused::Refused(format!(
            "the history of timeline {tli} of {} is not stored (the agent sends it when it streams from a server on that timeline): a restore cannot follow that timeline",
            series.target
        ))
    })?;
    History::parse(tli, text).map_err(|e| {
        Refused::Refused(format!(
            "the stored history of timeline {tli} of {} is damaged ({e}): a restore cannot follow that timeline",
            series.target
        ))
    })
}

/// The history files a recovery to `history`'s timeline reads: its own
/// (the server asks for it first), and every other one stored, so that the
/// timeline the server promotes to is one no stored branch uses.
fn histories(files: &[IndexedWal], history: &History) -> Result<Vec<Planned>, Refused> {
    let mut out: Vec<(u32, Planned)> = files
        .iter()
        .filter_map(|f| match f.stored.file {
            WalFile::History(t) => Some((
                t,
                Planned {
                    name: history_name(t),
                    raw_blake3: f.stored.raw_blake3.clone(),
                    partial: false,
                },
            )),
            _ => None,
        })
        .collect();
    out.sort_by_key(|(t, _)| *t);
    if history.timeline > 1 && !out.iter().any(|(t, _)| *t == history.timeline) {
        return Err(Refused::Refused(format!(
            "{} is not stored: a recovery to timeline {} needs it; nothing was written (see `dsctl wal`)",
            history_name(history.timeline),
            history.timeline
        )));
    }
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

/// The segment size of cluster `sysid`'s WAL for `target`: the binding's
/// when it is bound to that cluster, else its series description.
async fn seg_size_of(
    core: &Core,
    target: &str,
    sysid: &str,
    binding: Option<&super::index::Binding>,
) -> Result<Option<u64>, Refused> {
    if let Some(b) = binding.filter(|b| b.system_identifier == sysid) {
        return Ok(Some(b.seg_size));
    }
    Ok(core
        .repo
        .wal_series(target)
        .await
        .map_err(|e| Refused::Unavailable(e.to_string()))?
        .into_iter()
        .find(|s| s.system_identifier == sysid)
        .map(|s| s.seg_size))
}

/// The stored file a physical restore job of base backup `base` asks for
/// by name: a history file, or by segment name the whole segment or its
/// partial.
pub async fn wal_for_job(
    core: &Core,
    base: &BackupRecord,
    name: &str,
) -> Result<IndexedWal, Refused> {
    let sysid = &base.system_identifier;
    let binding = core.wal_index.binding(&base.target).await?;
    let seg_size = seg_size_of(core, &base.target, sysid, binding.as_ref())
        .await?
        .ok_or_else(|| Refused::NotFound(format!("no WAL of cluster {sysid} is stored")))?;
    let files = core.wal_index.files(&base.target, sysid, seg_size).await?;
    if let Some(WalFile::History(t)) = WalFile::parse(name, seg_size) {
        return files
            .iter()
            .find(|f| f.stored.file == WalFile::History(t))
            .cloned()
            .ok_or_else(|| Refused::NotFound(format!("{name} is not stored")));
    }
    let seg = Segment::parse(name, seg_size).map_err(Refused::Refused)?;
    files
        .iter()
        .find(|f| f.stored.file == WalFile::Segment(seg))
        .or_else(|| {
            files
                .iter()
                .find(|f| f.stored.file == WalFile::Partial(seg))
        })
        .cloned()
        .ok_or_else(|| Refused::NotFound(format!("WAL segment {name} is not stored")))
}

/// Where the WAL stored on the way to `history`'s timeline runs from
/// `start` without a gap to.
pub fn contiguous_end(files: &[IndexedWal], history: &History, start: Lsn, seg_size: u64) -> Lsn {
    let mut segno = start.0 / seg_size;
    let has = |f: WalFile| files.iter().find(|x| x.stored.file == f);
    loop {
        let s = Segment {
            timeline: history.timeline_of_segment(segno, seg_size),
            segno,
        };
        if has(WalFile::Segment(s)).is_some() {
            segno += 1;
            continue;
        }
        if let Some(p) = has(WalFile::Partial(s)) {
            return Lsn(p.end_lsn.unwrap_or(s.start(seg_size).0));
        }
        return s.start(seg_size).max(start);
    }
}

/// Every segment from `start` to `upto` (exclusive) on the way to
/// `history`'s timeline, each from the timeline that holds it there (the
/// segment of a switch from the newer one): whole segments, and a partial
/// only as the last one and only if it reaches `upto`.
pub fn segments(
    files: &[IndexedWal],
    history: &History,
    start: Lsn,
    upto: Lsn,
    seg_size: u64,
) -> Result<Vec<Planned>, Refused> {
    let last = upto.0.saturating_sub(1).max(start.0) / seg_size;
    let mut out = Vec::new();
    for segno in start.0 / seg_size..=last {
        let s = Segment {
            timeline: history.timeline_of_segment(segno, seg_size),
            segno,
        };
        let name = s.name(seg_size);
        let whole = files.iter().find(|f| f.stored.file == WalFile::Segment(s));
        let partial = files.iter().find(|f| {
            f.stored.file == WalFile::Partial(s)
                && segno == last
                && f.end_lsn.is_some_and(|e| e >= upto.0)
        });
        match (whole, partial) {
            (Some(f), _) => out.push(Planned {
                name,
                raw_blake3: f.stored.raw_blake3.clone(),
                partial: false,
            }),
            (None, Some(f)) => out.push(Planned {
                name,
                raw_blake3: f.stored.raw_blake3.clone(),
                partial: true,
            }),
            (None, None) => {
                return Err(Refused::Refused(format!(
                    "WAL segment {name} is missing (needed from {start} to {upto}): no restore can pass it; nothing was written (see `dsctl wal`)"
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::wal::StoredWal;
    use datasaver_common::wal::DEFAULT_SEG_SIZE as SEG;

    fn row(file: WalFile, end: u64) -> IndexedWal {
        IndexedWal {
            stored: StoredWal {
                file,
                raw_blake3: format!("{file:?}"),
                key: String::new(),
                size: 1,
            },
            end_lsn: Some(end),
            stored_at: String::new(),
        }
    }

    fn seg(n: u64) -> Segment {
        Segment {
            timeline: 1,
            segno: n,
        }
    }

    fn one() -> History {
        History::first(1)
    }

    #[test]
    fn a_plan_names_the_first_missing_segment_and_ends_on_a_partial() {
        let files = vec![
            row(WalFile::Segment(seg(2)), 3 * SEG),
            row(WalFile::Segment(seg(3)), 4 * SEG),
            row(WalFile::Segment(seg(5)), 6 * SEG),
            row(WalFile::Partial(seg(6)), 6 * SEG + 100),
        ];
        let h = one();
        let start = Lsn(2 * SEG + 40);
        assert_eq!(contiguous_end(&files, &h, start, SEG), Lsn(4 * SEG));
        let p = segments(&files, &h, start, Lsn(4 * SEG), SEG).unwrap();
        assert_eq!(p.len(), 2);
        let e = segments(&files, &h, start, Lsn(5 * SEG + 1), SEG)
            .unwrap_err()
            .to_string();
        assert!(e.contains("000000010000000000000004 is missing"), "{e}");
        // From after the gap: the partial ends the plan when it reaches far
        // enough, not otherwise.
        let from5 = Lsn(5 * SEG);
        assert_eq!(contiguous_end(&files, &h, from5, SEG), Lsn(6 * SEG + 100));
        let p = segments(&files, &h, from5, Lsn(6 * SEG + 100), SEG).unwrap();
        assert_eq!(
            p.iter().map(|w| w.partial).collect::<Vec<_>>(),
            [false, true]
        );
        assert!(segments(&files, &h, from5, Lsn(6 * SEG + 101), SEG).is_err());
    }

    fn on(timeline: u32, segno: u64) -> Segment {
        Segment { timeline, segno }
    }

    #[test]
    fn a_plan_crosses_a_timeline_switch_from_the_segment_of_the_switch() {
        // Timeline 1 until 0/3000158, then 2: segment 3 is read from
        // timeline 2, which holds timeline 1's WAL up to the switch; the
        // old timeline's partial of it and its later WAL (a branch left
        // behind) are not part of the way.
        let h = History::parse(2, "1\t0/3000158\tno recovery target specified\n").unwrap();
        let mut files = vec![
            row(WalFile::Segment(on(1, 1)), 2 * SEG),
            row(WalFile::Segment(on(1, 2)), 3 * SEG),
            row(WalFile::Partial(on(1, 3)), 3 * SEG + 0x200),
            row(WalFile::History(2), 0),
            row(WalFile::Segment(on(2, 3)), 4 * SEG),
            row(WalFile::Segment(on(2, 4)), 5 * SEG),
            row(WalFile::Partial(on(2, 5)), 5 * SEG + 0x100),
        ];
        let start = Lsn(SEG + 40);
        assert_eq!(contiguous_end(&files, &h, start, SEG), Lsn(5 * SEG + 0x100));
        let plan = segments(&files, &h, start, Lsn(5 * SEG + 0x100), SEG).unwrap();
        let names: Vec<&str> = plan.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "000000010000000000000001",
                "000000010000000000000002",
                "000000020000000000000003",
                "000000020000000000000004",
                "000000020000000000000005"
            ]
        );
        // Timeline 1 stays readable on its own up to its partial.
        assert_eq!(
            contiguous_end(&files, &one(), start, SEG),
            Lsn(3 * SEG + 0x200)
        );
        // The history files lead the plan; without the target's it is refused.
        let hs = histories(&files, &h).unwrap();
        assert_eq!(hs[0].name, "00000002.history");
        files.retain(|f| f.stored.file != WalFile::History(2));
        let e = histories(&files, &h).unwrap_err().to_string();
        assert!(e.starts_with("00000002.history is not stored"), "{e}");
        // A missing segment after the switch is named on its timeline.
        files.retain(|f| f.stored.file != WalFile::Segment(on(2, 4)));
        let e = segments(&files, &h, start, Lsn(5 * SEG), SEG)
            .unwrap_err()
            .to_string();
        assert!(e.contains("000000020000000000000004 is missing"), "{e}");
    }

    proptest::proptest! {
        /// Removing any one needed segment makes the plan fail naming
        /// exactly that segment; with all present it lists each once, from
        /// the timeline the history says.
        #[test]
        fn any_missing_segment_is_the_one_named(
            first in 0u64..50,
            len in 1u64..40,
            switch in 0u64..40,
            hole in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let switch_seg = first + switch % len;
            let h = History::parse(2, &format!("1\t{}\tx", Lsn(switch_seg * SEG + 0x80))).unwrap();
            let all: Vec<IndexedWal> = (first..first + len)
                .map(|n| row(WalFile::Segment(on(if n < switch_seg { 1 } else { 2 }, n)), (n + 1) * SEG))
                .collect();
            let start = Lsn(first * SEG + 40);
            let upto = Lsn((first + len - 1) * SEG + 100);
            let plan = segments(&all, &h, start, upto, SEG).unwrap();
            proptest::prop_assert_eq!(plan.len() as u64, len);
            let gone = hole.index(len as usize);
            let mut some = all.clone();
            let removed = some.remove(gone);
            let WalFile::Segment(s) = removed.stored.file else { unreachable!() };
            let e = segments(&some, &h, start, upto, SEG).unwrap_err().to_string();
            proptest::prop_assert!(e.contains(&format!("{} is missing", s.name(SEG))), "{}", e);
        }
    }
}
