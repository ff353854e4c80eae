//! Retention of base backups and WAL by `DATASAVER_PITR_WINDOW` (issue 14),
//! as pure functions over the base backups, the stored WAL and a clock.
//! Every moment of the window stays restorable: the newest base backup
//! consistent at or before the window's start (the anchor), every newer one
//! and all WAL from the anchor's start on are kept. Older base backups go,
//! unless pinned, being read, or kept by the target's GFS counts (they keep
//! the WAL from their start to their end). WAL no kept base backup needs goes — of an older cluster (after a
//! rebind) all of it once none of its base backups is kept. History files
//! are never deleted. Without any base backup of the current cluster
//! nothing is deleted.

use chrono::{DateTime, Duration, Utc};

/// A completed base backup as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub id: String,
    pub sysid: String,
    pub start: u64,
    pub end: u64,
    pub consistent_at: DateTime<Utc>,
    /// pinned, or being read by a restore: kept whatever the window says
    pub held: bool,
}

/// A stored WAL segment (or partial): the range of WAL it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wal {
    pub key: String,
    pub sysid: String,
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// the base backup every moment of the window replays from
    pub anchor: Option<String>,
    /// where the window's WAL starts (the anchor's start): below it only
    /// held base backups' own ranges stay, so a missing run there is
    /// retention's doing, not a gap
    pub wal_from: Option<u64>,
    pub delete_bases: Vec<String>,
    pub delete_wal: Vec<String>,
}

/// What to delete for one target whose current cluster is `current`.
pub fn plan(
    bases: &[Base],
    wal: &[Wal],
    current: &str,
    window: Duration,
    now: DateTime<Utc>,
) -> Plan {
    let ours: Vec<&Base> = bases.iter().filter(|b| b.sysid == current).collect();
    if ours.is_empty() {
        return Plan::default();
    }
    let cutoff = now - window;
    let anchor = ours
        .iter()
        .filter(|b| b.consistent_at <= cutoff)
        .max_by_key(|b| b.consistent_at)
        .copied();
    // Without an anchor the window reaches past every base backup: all are
    // kept, and the WAL from the oldest on.
    let from = anchor.map_or_else(
        || ours.iter().map(|b| b.consistent_at).min().unwrap_or(cutoff),
        |a| a.consistent_at,
    );
    let window_bases: Vec<&Base> = ours
        .iter()
        .filter(|b| b.consistent_at >= from)
        .copied()
        .collect();
    let floor = window_bases.iter().map(|b| b.start).min();
    let kept = |b: &Base| b.held || (b.sysid == current && b.consistent_at >= from);
    let delete_bases: Vec<String> = bases
        .iter()
        .filter(|b| !kept(b))
        .map(|b| b.id.clone())
        .collect();
    // What kept base backups need: the window's, from the floor on; a held
    // older one, its own range.
    let needed = |w: &Wal| {
        if w.sysid == current && floor.is_some_and(|f| w.end > f) {
            return true;
        }
        bases
            .iter()
            .filter(|b| kept(b) && b.sysid == w.sysid)
            .any(|b| w.end > b.start && w.start < b.end.max(b.start + 1))
    };
    let delete_wal = wal
        .iter()
        .filter(|w| !needed(w))
        .map(|w| w.key.clone())
        .collect();
    Plan {
        anchor: anchor.map(|a| a.id.clone()),
        wal_from: floor,
        delete_bases,
        delete_wal,
    }
}

/// Applies the window to `target` (after each backup and on `dsctl
/// cleanup`); returns the base backups deleted and how many WAL files.
pub async fn run(
    core: &crate::Core,
    target: &str,
    dry_run: bool,
) -> Result<(Vec<String>, usize), String> {
    use datasaver_common::wal::WalFile;
    let Some(window) = core.policies.pitr_window else {
        return Ok((Vec::new(), 0));
    };
    let window = Duration::from_std(window).map_err(|e| e.to_string())?;
    let Some(binding) = core
        .wal_index
        .binding(target)
        .await
        .map_err(|e| e.to_string())?
        .filter(|b| !b.system_identifier.is_empty())
    else {
        return Ok((Vec::new(), 0));
    };
    let in_use = core.fleet.backups_in_use();
    let rows: Vec<crate::repo::BackupRecord> = core
        .repo
        .list(Some(target))
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|r| r.kind == crate::repo::Kind::Base && r.status == crate::repo::Status::Completed)
        .collect();
    // Beyond the window, base backups follow the target's GFS counts
    // (manual or scheduled alike: each is a whole copy of the cluster); one
    // kept stays restorable to its end with its own WAL.
    let policy = super::cleanup::policy_for(core, target).await;
    let candidates: Vec<super::gfs::Candidate> = rows
        .iter()
        .map(|r| super::gfs::Candidate {
            id: r.id.clone(),
            created_at: r.created_at,
            status: super::gfs::Status::Completed,
            pinned: r.pinned,
            manual: false,
            in_use: in_use.contains(&r.id),
        })
        .collect();
    let gfs_kept: std::collections::HashSet<String> =
        super::gfs::plan(&candidates, &policy, core.clock.now(), &core.policies.tz)
            .into_iter()
            .filter(|d| {
                d.keep
                    && d.reasons.iter().any(|r| {
                        matches!(
                            r,
                            super::gfs::Reason::Slot { .. } | super::gfs::Reason::Last { .. }
                        )
                    })
            })
            .map(|d| d.id)
            .collect();
    let bases: Vec<Base> = rows
        .iter()
        .filter_map(|r| {
            let p = r.physical?;
            Some(Base {
                id: r.id.clone(),
                sysid: r.system_identifier.clone(),
                start: p.start_lsn,
                end: p.end_lsn,
                consistent_at: DateTime::from_timestamp_micros(p.consistent_at_micros)?,
                held: r.pinned || in_use.contains(&r.id) || gfs_kept.contains(&r.id),
            })
        })
        .collect();
    let mut wal = Vec::new();
    let series = core
        .repo
        .wal_series(target)
        .await
        .map_err(|e| e.to_string())?;
    for s in &series {
        for f in core
            .wal_index
            .files(target, &s.system_identifier, s.seg_size)
            .await
            .map_err(|e| e.to_string())?
        {
            let (seg, end) = match f.stored.file {
                WalFile::Segment(seg) => (seg, seg.start(s.seg_size).0 + s.seg_size),
                WalFile::Partial(seg) => (
                    seg,
                    f.end_lsn.unwrap_or(seg.start(s.seg_size).0 + s.seg_size),
                ),
                WalFile::History(_) => continue,
            };
            wal.push(Wal {
                key: f.stored.key.clone(),
                sysid: s.system_identifier.clone(),
                start: seg.start(s.seg_size).0,
                end,
            });
        }
    }
    let p = plan(
        &bases,
        &wal,
        &binding.system_identifier,
        window,
        core.clock.now(),
    );
    if dry_run {
        return Ok((p.delete_bases, p.delete_wal.len()));
    }
    core.wal_index
        .set_retained_from(target, &binding.system_identifier, p.wal_from)
        .await
        .map_err(|e| e.to_string())?;
    let mut deleted = Vec::new();
    for id in &p.delete_bases {
        let Some(row) = rows.iter().find(|r| &r.id == id) else {
            continue;
        };
        if core.fleet.backups_in_use().contains(id) {
            continue;
        }
        match core
            .repo
            .delete(row, "older than DATASAVER_PITR_WINDOW needs")
            .await
        {
            Ok(true) => {
                tracing::info!(target = %target, backup = %id, "base backup deleted: the recovery window no longer needs it");
                deleted.push(id.clone());
            }
            Ok(false) => {}
            Err(e) => return Err(format!("{id}: {e}")),
        }
    }
    // WAL only after the base backups that needed it are gone.
    let n = p.delete_wal.len();
    if n > 0 {
        core.repo
            .delete_wal(&p.delete_wal)
            .await
            .map_err(|e| e.to_string())?;
        for s in &series {
            core.wal_index
                .forget_files(target, &s.system_identifier, &p.delete_wal)
                .await
                .map_err(|e| e.to_string())?;
        }
        tracing::info!(target = %target, files = n, anchor = ?p.anchor, "WAL deleted: no kept base backup needs it");
    }
    Ok((deleted, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const SEG: u64 = 16 << 20;

    fn day(d: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + Duration::days(d)
    }

    fn base(id: &str, sysid: &str, segno: u64, d: i64) -> Base {
        Base {
            id: id.into(),
            sysid: sysid.into(),
            start: segno * SEG + 40,
            end: (segno + 1) * SEG + 100,
            consistent_at: day(d),
            held: false,
        }
    }

    fn wal(sysid: &str, from: u64, to: u64) -> Vec<Wal> {
        (from..=to)
            .map(|n| Wal {
                key: format!("{sysid}/{n}"),
                sysid: sysid.into(),
                start: n * SEG,
                end: (n + 1) * SEG,
            })
            .collect()
    }

    /// Weekly base backups and continuous WAL over two months, a 7-day
    /// window checked every day: what is deleted is exactly what no moment
    /// of the window needs, and every moment of the window keeps a base
    /// backup consistent before it and all WAL from its start.
    #[test]
    fn a_window_keeps_exactly_what_reaches_every_moment_in_it() {
        for today in 10..60 {
            let bases: Vec<Base> = (0..=today / 7)
                .map(|w| base(&format!("b{w}"), "A", (w * 7 * 10) as u64, w * 7))
                .collect();
            let all_wal = wal("A", 0, (today * 10) as u64);
            let p = plan(&bases, &all_wal, "A", Duration::days(7), day(today));
            let kept_bases: Vec<&Base> = bases
                .iter()
                .filter(|b| !p.delete_bases.contains(&b.id))
                .collect();
            let kept_wal: Vec<&Wal> = all_wal
                .iter()
                .filter(|w| !p.delete_wal.contains(&w.key))
                .collect();
            // Every moment in the window: a kept base consistent before it,
            // and every segment from that base's start on kept.
            let anchor = kept_bases
                .iter()
                .filter(|b| b.consistent_at <= day(today) - Duration::days(7))
                .max_by_key(|b| b.consistent_at)
                .expect("an anchor");
            assert_eq!(p.anchor.as_deref(), Some(anchor.id.as_str()));
            for w in &all_wal {
                if w.end > anchor.start {
                    assert!(kept_wal.contains(&w), "day {today}: {} deleted", w.key);
                } else {
                    assert!(!kept_wal.contains(&w), "day {today}: {} kept", w.key);
                }
            }
            // Exactly the bases older than the anchor go.
            for b in &bases {
                assert_eq!(
                    p.delete_bases.contains(&b.id),
                    b.consistent_at < anchor.consistent_at,
                    "day {today}: {}",
                    b.id
                );
            }
        }
    }

    #[test]
    fn held_bases_keep_their_range_and_older_clusters_go_when_unneeded() {
        let mut old = base("old", "A", 2, 1);
        old.held = true;
        let bases = vec![
            old,
            base("mid", "A", 20, 10),
            base("new", "A", 40, 30),
            base("gone", "B", 1, 0),
        ];
        let mut all = wal("A", 0, 50);
        all.extend(wal("B", 0, 5));
        let p = plan(&bases, &all, "A", Duration::days(7), day(40));
        assert_eq!(p.anchor.as_deref(), Some("new"));
        assert_eq!(p.delete_bases, ["mid", "gone"]);
        let kept: Vec<&str> = all
            .iter()
            .filter(|w| !p.delete_wal.contains(&w.key))
            .map(|w| w.key.as_str())
            .collect();
        // the held base's own segments (2 and 3), and 40 on
        let mut want = vec!["A/2".to_string(), "A/3".to_string()];
        want.extend((40..=50).map(|n| format!("A/{n}")));
        assert_eq!(kept, want.iter().map(String::as_str).collect::<Vec<_>>());
        // No base of the current cluster: nothing is deleted at all.
        let p = plan(&bases, &all, "C", Duration::days(7), day(40));
        assert_eq!(p, Plan::default());
        // The window reaches past every base: all kept, WAL from the oldest.
        let p = plan(
            &bases[1..3],
            &wal("A", 0, 50),
            "A",
            Duration::days(365),
            day(40),
        );
        assert_eq!(p.anchor, None);
        assert!(p.delete_bases.is_empty());
        assert_eq!(p.delete_wal.len(), 20);
    }
}
