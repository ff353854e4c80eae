//! Which alert conditions hold for a target, as a pure function of facts and
//! a clock reading. The stateful part (open/resolve, one notification per
//! change, persistence) is in `alerts::Alerter`; keeping the rules pure lets
//! them be tested over simulated days in microseconds.

use chrono::{DateTime, Duration, Utc};

/// What kind of trouble; the `event` name of its webhook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    BackupFailed,
    BackupOverdue,
    ConsecutiveFailures,
    SizeAnomaly,
    AgentDisconnected,
    VerifyFailed,
    ScheduleMissed,
    ServerChanged,
    DrillFailed,
    DrillStale,
    WalGap,
    WalLag,
    WalConflict,
    WalSysidMismatch,
    WalSlotAtRisk,
}

impl Kind {
    pub const ALL: [Kind; 15] = [
        Kind::BackupFailed,
        Kind::BackupOverdue,
        Kind::ConsecutiveFailures,
        Kind::SizeAnomaly,
        Kind::AgentDisconnected,
        Kind::VerifyFailed,
        Kind::ScheduleMissed,
        Kind::ServerChanged,
        Kind::DrillFailed,
        Kind::DrillStale,
        Kind::WalGap,
        Kind::WalLag,
        Kind::WalConflict,
        Kind::WalSysidMismatch,
        Kind::WalSlotAtRisk,
    ];

    pub fn event(self) -> &'static str {
        match self {
            Kind::BackupFailed => "backup.failed",
            Kind::BackupOverdue => "backup.overdue",
            Kind::ConsecutiveFailures => "backup.consecutive_failures",
            Kind::SizeAnomaly => "backup.size_anomaly",
            Kind::AgentDisconnected => "agent.disconnected",
            Kind::VerifyFailed => "verify.failed",
            Kind::ScheduleMissed => "schedule.missed",
            Kind::ServerChanged => "target.server_changed",
            Kind::DrillFailed => "drill.failed",
            Kind::DrillStale => "drill.stale",
            Kind::WalGap => "wal.gap",
            Kind::WalLag => "wal.lag",
            Kind::WalConflict => "wal.conflict",
            Kind::WalSysidMismatch => "wal.sysid_mismatch",
            Kind::WalSlotAtRisk => "wal.slot_at_risk",
        }
    }

    pub fn from_event(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.event() == s)
    }

    /// Whether this makes a target unhealthy (not just degraded).
    pub fn is_critical(self) -> bool {
        matches!(
            self,
            Kind::BackupOverdue
                | Kind::ConsecutiveFailures
                | Kind::WalGap
                | Kind::WalConflict
                | Kind::WalSysidMismatch
        )
    }
}

/// One finished backup attempt, newest first in [`Facts::recent`].
#[derive(Clone, Debug)]
pub struct Attempt {
    pub id: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub ok: bool,
    pub raw_bytes: u64,
    pub error: Option<String>,
}

/// The server behind a target changed (see `targets::TargetStore::note_server`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerChange {
    pub old: String,
    pub new: String,
    /// The first backup of the new server.
    pub backup_id: String,
}

#[derive(Clone, Debug)]
pub struct Facts {
    pub target: String,
    /// Finished attempts (completed or failed), newest first.
    pub recent: Vec<Attempt>,
    /// Since when the target has existed for us (first agent registration,
    /// or coordinator start): the dead man's switch counts from here when no
    /// backup ever succeeded.
    pub known_since: DateTime<Utc>,
    /// `None` while an agent serving it is connected.
    pub disconnected_since: Option<DateTime<Utc>>,
    /// Latest verify: (ok, backup id, message).
    pub last_verify: Option<(bool, String, String)>,
    /// The last scheduled slot that could not start before the next one,
    /// and how many were missed in all.
    pub last_missed: Option<(DateTime<Utc>, u64)>,
    /// A change of server not yet confirmed by a second backup of it.
    pub server_change: Option<ServerChange>,
    /// The latest restore drill: (ok, backup id, result).
    pub last_drill: Option<(bool, String, String)>,
    /// When a drill last passed.
    pub last_drill_ok_at: Option<DateTime<Utc>>,
    /// Whether drills run on a schedule for it (only then can they go stale).
    pub drills_scheduled: bool,
    /// Its continuous WAL, when it streams any.
    pub wal: Option<crate::wal::view::TargetWal>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rules {
    /// Dead man's switch: alert when no success for this long. `None` = off.
    pub alert_after: Option<Duration>,
    /// Alert after this many failures in a row.
    pub consecutive_failures: u32,
    /// Fraction off the median of recent successful sizes that is an anomaly.
    pub size_tolerance: f64,
    /// How many earlier successful backups make the median.
    pub size_window: usize,
    /// Agent away longer than this is an alert.
    pub agent_grace: Duration,
    /// A target with scheduled drills and no passing one for this long is
    /// degraded (`DATASAVER_DRILL_MAX_AGE`).
    pub drill_max_age: Duration,
    /// The stored WAL may be this far behind a server that moved on
    /// (`DATASAVER_ALERT_WAL_LAG`).
    pub wal_lag: Duration,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            alert_after: None,
            consecutive_failures: 3,
            size_tolerance: 0.5,
            size_window: 5,
            agent_grace: Duration::minutes(5),
            drill_max_age: Duration::days(7),
            wal_lag: Duration::minutes(5),
        }
    }
}

/// The dead man's switch of a scheduled target nobody configured one for:
/// twice the longest gap between its slots plus an hour, so one late or
/// failed run is not yet an alarm but a schedule that stopped running is.
pub fn default_alert_after(longest_gap: Duration) -> Duration {
    longest_gap * 2 + Duration::hours(1)
}

/// A condition that holds now.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub kind: Kind,
    pub message: String,
    pub backup_id: Option<String>,
}

fn hours(d: Duration) -> String {
    let s = d.num_seconds();
    if s % 3600 == 0 {
        format!("{} h", s / 3600)
    } else if s >= 3600 {
        format!("{:.1} h", s as f64 / 3600.0)
    } else {
        format!("{s} s")
    }
}

fn median(mut v: Vec<u64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2] as f64
    } else {
        (v[n / 2 - 1] as f64 + v[n / 2] as f64) / 2.0
    })
}

/// Every condition that holds for `f` at `now`.
pub fn conditions(f: &Facts, r: &Rules, now: DateTime<Utc>) -> Vec<Condition> {
    let mut out = Vec::new();
    let t = &f.target;
    if let Some(last) = f.recent.first() {
        if !last.ok {
            out.push(Condition {
                kind: Kind::BackupFailed,
                message: format!(
                    "backup {} of {t} failed: {}",
                    last.id,
                    last.error.as_deref().unwrap_or("no reason recorded")
                ),
                backup_id: Some(last.id.clone()),
            });
        }
    }
    let failures = f.recent.iter().take_while(|a| !a.ok).count() as u32;
    if r.consecutive_failures > 0 && failures >= r.consecutive_failures {
        out.push(Condition {
            kind: Kind::ConsecutiveFailures,
            message: format!("the last {failures} backups of {t} failed"),
            backup_id: f.recent.first().map(|a| a.id.clone()),
        });
    }
    let last_ok = f.recent.iter().find(|a| a.ok);
    if let Some(after) = r.alert_after {
        let since = last_ok.map(|a| a.finished_at).unwrap_or(f.known_since);
        if now - since > after {
            out.push(Condition {
                kind: Kind::BackupOverdue,
                message: match last_ok {
                    Some(a) => format!(
                        "no successful backup of {t} for {} (last: {} at {}); the limit is {}",
                        hours(now - a.finished_at),
                        a.id,
                        a.finished_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        hours(after)
                    ),
                    None => format!(
                        "{t} has had no successful backup in the {} since it was first seen; the limit is {}",
                        hours(now - since),
                        hours(after)
                    ),
                },
                backup_id: last_ok.map(|a| a.id.clone()),
            });
        }
    }
    // Size: the newest success against the median of the ones before it.
    let oks: Vec<&Attempt> = f.recent.iter().filter(|a| a.ok).collect();
    if let Some((newest, earlier)) = oks.split_first() {
        let window: Vec<u64> = earlier
            .iter()
            .take(r.size_window)
            .map(|a| a.raw_bytes)
            .collect();
        if let Some(m) = median(window) {
            if m > 0.0 {
                let off = (newest.raw_bytes as f64 - m) / m;
                if off.abs() > r.size_tolerance {
                    out.push(Condition {
                        kind: Kind::SizeAnomaly,
                        message: format!(
                            "backup {} of {t} is {} bytes, {:+.0}% off the median {} of the {} before it",
                            newest.id,
                            newest.raw_bytes,
                            off * 100.0,
                            m as u64,
                            earlier.len().min(r.size_window)
                        ),
                        backup_id: Some(newest.id.clone()),
                    });
                }
            }
        }
    }
    // A new server behind the target (rebuilt, failed over, restored
    // elsewhere): open until the next backup of that same server.
    if let Some(c) = &f.server_change {
        out.push(Condition {
            kind: Kind::ServerChanged,
            message: format!(
                "{t} is now a different server: backup {} has system identifier {}, the backup before it had {}; backups continue, and a logical restore onto the new server still works",
                c.backup_id, c.new, c.old
            ),
            backup_id: Some(c.backup_id.clone()),
        });
    }
    if let Some(since) = f.disconnected_since {
        if now - since > r.agent_grace {
            out.push(Condition {
                kind: Kind::AgentDisconnected,
                message: format!(
                    "no agent serving {t} has been connected for {}",
                    hours(now - since)
                ),
                backup_id: None,
            });
        }
    }
    // Missed slots: open until a backup succeeds after the last one missed.
    if let Some((missed_at, total)) = f.last_missed {
        if last_ok.is_none_or(|a| a.finished_at < missed_at) {
            out.push(Condition {
                kind: Kind::ScheduleMissed,
                message: format!(
                    "a scheduled backup of {t} could not start before its next slot (last at {}; {total} missed in all): the queue is full — raise DATASAVER_MAX_CONCURRENT_BACKUPS or spread the schedules",
                    missed_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
                backup_id: None,
            });
        }
    }
    if let Some((false, id, msg)) = &f.last_drill {
        out.push(Condition {
            kind: Kind::DrillFailed,
            message: format!("restore drill of {id} failed: {msg}"),
            backup_id: Some(id.clone()),
        });
    }
    if f.drills_scheduled {
        let since = f.last_drill_ok_at.unwrap_or(f.known_since);
        if now - since > r.drill_max_age {
            out.push(Condition {
                kind: Kind::DrillStale,
                message: match f.last_drill_ok_at {
                    Some(at) => format!(
                        "no restore drill of {t} has passed for {} (last at {}); the limit is {} (DATASAVER_DRILL_MAX_AGE)",
                        hours(now - at),
                        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        hours(r.drill_max_age)
                    ),
                    None => format!(
                        "no restore drill of {t} has passed in the {} since it was first seen; the limit is {} (DATASAVER_DRILL_MAX_AGE)",
                        hours(now - since),
                        hours(r.drill_max_age)
                    ),
                },
                backup_id: None,
            });
        }
    }
    if let Some((false, id, msg)) = &f.last_verify {
        out.push(Condition {
            kind: Kind::VerifyFailed,
            message: format!("verify of {id} failed: {msg}"),
            backup_id: Some(id.clone()),
        });
    }
    if let Some(w) = &f.wal {
        out.extend(wal_conditions(w, r));
    }
    out
}

/// The WAL conditions of one target.
fn wal_conditions(w: &crate::wal::view::TargetWal, r: &Rules) -> Vec<Condition> {
    let t = &w.target;
    let mut out = Vec::new();
    let gaps: Vec<String> = w
        .timelines
        .iter()
        .flat_map(|l| l.gaps.iter().map(|(a, b)| format!("{a}..{b}")))
        .collect();
    if !gaps.is_empty() {
        out.push(Condition {
            kind: Kind::WalGap,
            message: format!(
                "the WAL of {t} has a gap ({}): no point-in-time restore can pass it; take a base backup",
                gaps.join(", ")
            ),
            backup_id: None,
        });
    }
    if let (Some(bytes), Some(secs)) = (w.lag_bytes, w.lag_seconds) {
        if bytes > 0 && secs as i64 >= r.wal_lag.num_seconds() {
            out.push(Condition {
                kind: Kind::WalLag,
                message: format!(
                    "the stored WAL of {t} is {bytes} bytes behind its server and nothing was stored for {}; the limit is {} (DATASAVER_ALERT_WAL_LAG)",
                    hours(Duration::seconds(secs as i64)),
                    hours(r.wal_lag)
                ),
                backup_id: None,
            });
        }
    }
    if let Some((m, at)) = &w.conflict {
        out.push(Condition {
            kind: Kind::WalConflict,
            message: format!("{t}: {m} (at {at}); nothing after it is stored"),
            backup_id: None,
        });
    }
    if let Some(s) = w
        .slot_status
        .as_deref()
        .filter(|s| matches!(*s, "extended" | "unreserved" | "lost"))
    {
        out.push(Condition {
            kind: Kind::WalSlotAtRisk,
            message: format!(
                "the replication slot of {t} is {s}: the server keeps more WAL than max_wal_size for it{}",
                if s == "extended" {
                    " (the agent or the coordinator is far behind)"
                } else {
                    "; past max_slot_wal_keep_size it loses WAL the stream has not stored, a gap until the next base backup"
                }
            ),
            backup_id: None,
        });
    }
    if let Some((sysid, at)) = &w.refused {
        out.push(Condition {
            kind: Kind::WalSysidMismatch,
            message: format!(
                "{t} is bound to cluster {} but cluster {sysid} streamed WAL as it (at {at}); its WAL is refused. If the target moved, run `dsctl targets rebind {t}`",
                w.system_identifier
            ),
            backup_id: None,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap() + Duration::hours(h)
    }

    fn attempt(i: i64, ok: bool, size: u64) -> Attempt {
        Attempt {
            id: format!("b{i}"),
            created_at: at(i),
            finished_at: at(i),
            ok,
            raw_bytes: size,
            error: (!ok).then(|| "pg_dump failed".to_string()),
        }
    }

    fn facts(mut recent: Vec<Attempt>) -> Facts {
        recent.reverse();
        Facts {
            target: "t".into(),
            recent,
            known_since: at(0),
            disconnected_since: None,
            last_verify: None,
            last_missed: None,
            server_change: None,
            last_drill: None,
            last_drill_ok_at: None,
            drills_scheduled: false,
            wal: None,
        }
    }

    /// The WAL conditions: a gap, a lag past the limit (not below it, and
    /// not while caught up), a conflict, another cluster.
    #[test]
    fn wal_gaps_lag_conflicts_and_other_clusters_are_conditions() {
        use crate::wal::view::{TargetWal, Timeline};
        let r = Rules::default();
        let mut w = TargetWal {
            target: "t".into(),
            system_identifier: "7301".into(),
            bound_at: "x".into(),
            streaming: true,
            timelines: vec![Timeline {
                timeline: 1,
                first: Some("a".into()),
                last: Some("d".into()),
                segments: 2,
                gaps: vec![],
                partial: None,
                stored_bytes: 1,
            }],
            stored_end: 100,
            last_stored_at: None,
            server_lsn: Some(100),
            lag_bytes: Some(0),
            lag_seconds: Some(0),
            refused: None,
            conflict: None,
            latest_recoverable: None,
            earliest_recoverable: None,
            slot_status: Some("reserved".into()),
        };
        let kinds = |w: &TargetWal| -> Vec<Kind> {
            let mut f = facts(vec![attempt(1, true, 100)]);
            f.wal = Some(w.clone());
            conditions(&f, &r, at(2))
                .into_iter()
                .map(|c| c.kind)
                .collect()
        };
        assert!(kinds(&w).is_empty());
        w.lag_bytes = Some(10);
        w.lag_seconds = Some(r.wal_lag.num_seconds() as u64 - 1);
        assert!(kinds(&w).is_empty());
        w.lag_seconds = Some(r.wal_lag.num_seconds() as u64);
        assert_eq!(kinds(&w), [Kind::WalLag]);
        w.lag_bytes = Some(0);
        w.timelines[0].gaps = vec![("b".into(), "c".into())];
        w.conflict = Some(("differs".into(), "x".into()));
        w.refused = Some(("4242".into(), "x".into()));
        assert_eq!(
            kinds(&w),
            [Kind::WalGap, Kind::WalConflict, Kind::WalSysidMismatch]
        );
        w.timelines[0].gaps.clear();
        w.conflict = None;
        w.refused = None;
        for (status, at_risk) in [
            ("reserved", false),
            ("extended", true),
            ("unreserved", true),
            ("lost", true),
        ] {
            w.slot_status = Some(status.into());
            assert_eq!(
                kinds(&w).contains(&Kind::WalSlotAtRisk),
                at_risk,
                "{status}"
            );
        }
    }

    /// A failed drill alerts until one passes; with drills on a schedule,
    /// no passing drill within the limit is a condition of its own — from
    /// when the target was first seen, and from the last passing drill —
    /// over simulated weeks.
    #[test]
    fn drills_that_fail_or_go_stale_are_conditions() {
        let r = Rules::default();
        let mut f = facts(vec![attempt(1, true, 100)]);
        assert!(
            conditions(&f, &r, at(24 * 30)).is_empty(),
            "no drill schedule, nothing stale"
        );
        f.drills_scheduled = true;
        assert!(conditions(&f, &r, at(24 * 7)).is_empty());
        let c = conditions(&f, &r, at(24 * 7 + 1));
        assert_eq!(kinds(&c), [Kind::DrillStale]);
        assert!(
            c[0].message.contains("since it was first seen"),
            "{}",
            c[0].message
        );
        f.last_drill = Some((true, "b1".into(), "ok: passed".into()));
        f.last_drill_ok_at = Some(at(24 * 7 + 2));
        assert!(conditions(&f, &r, at(24 * 14 + 2)).is_empty());
        let c = conditions(&f, &r, at(24 * 14 + 3));
        assert_eq!(kinds(&c), [Kind::DrillStale]);
        assert!(c[0].message.contains("last at"), "{}", c[0].message);
        f.last_drill = Some((false, "b1".into(), "table t has 3 rows".into()));
        let c = conditions(&f, &r, at(24 * 8));
        assert_eq!(kinds(&c), [Kind::DrillFailed]);
        assert!(
            c[0].message.contains("restore drill of b1 failed"),
            "{}",
            c[0].message
        );
    }

    fn kinds(c: &[Condition]) -> Vec<Kind> {
        c.iter().map(|c| c.kind).collect()
    }

    #[test]
    fn a_changed_server_is_a_condition_naming_both_identifiers() {
        let r = Rules::default();
        let mut f = facts(vec![attempt(1, true, 100), attempt(2, true, 100)]);
        assert!(!kinds(&conditions(&f, &r, at(3))).contains(&Kind::ServerChanged));
        f.server_change = Some(ServerChange {
            old: "7001".into(),
            new: "7002".into(),
            backup_id: "b2".into(),
        });
        let c = conditions(&f, &r, at(3));
        let sc: Vec<_> = c.iter().filter(|c| c.kind == Kind::ServerChanged).collect();
        assert_eq!(sc.len(), 1, "{c:?}");
        assert!(
            sc[0].message.contains("7001") && sc[0].message.contains("7002"),
            "{}",
            sc[0].message
        );
        assert_eq!(sc[0].backup_id.as_deref(), Some("b2"));
        assert!(!Kind::ServerChanged.is_critical());
    }

    #[test]
    fn overdue_after_the_window_and_cleared_by_a_success() {
        let r = Rules {
            alert_after: Some(Duration::hours(26)),
            ..Default::default()
        };
        let f = facts(vec![attempt(1, true, 100)]);
        assert!(conditions(&f, &r, at(27)).is_empty());
        let c = conditions(&f, &r, at(28));
        assert_eq!(kinds(&c), vec![Kind::BackupOverdue]);
        assert!(c[0].message.contains("26 h"), "{}", c[0].message);
        // never succeeded: counted from when the target was first seen
        let f = facts(vec![]);
        assert_eq!(
            kinds(&conditions(&f, &r, at(27))),
            vec![Kind::BackupOverdue]
        );
        assert!(conditions(&f, &r, at(25)).is_empty());
        // off when not configured
        assert!(conditions(&f, &Rules::default(), at(1000)).is_empty());
    }

    #[test]
    fn failures_single_and_consecutive() {
        let r = Rules::default();
        let f = facts(vec![attempt(1, true, 100), attempt(2, false, 0)]);
        assert_eq!(kinds(&conditions(&f, &r, at(3))), vec![Kind::BackupFailed]);
        let f = facts(vec![
            attempt(1, true, 100),
            attempt(2, false, 0),
            attempt(3, false, 0),
            attempt(4, false, 0),
        ]);
        assert_eq!(
            kinds(&conditions(&f, &r, at(5))),
            vec![Kind::BackupFailed, Kind::ConsecutiveFailures]
        );
        let f = facts(vec![attempt(1, false, 0), attempt(2, true, 100)]);
        assert!(conditions(&f, &r, at(3)).is_empty());
    }

    #[test]
    fn size_anomaly_on_a_drop_not_on_growth() {
        let r = Rules::default();
        // steady growth of 10% a day: fine
        let grow: Vec<Attempt> = (1..=8)
            .map(|i| attempt(i, true, (1000.0 * 1.1f64.powi(i as i32)) as u64))
            .collect();
        assert!(conditions(&facts(grow.clone()), &r, at(9)).is_empty());
        // a truncated table: the newest is a third of the median
        let mut drop = grow.clone();
        drop.push(attempt(9, true, 700));
        let c = conditions(&facts(drop.clone()), &r, at(10));
        assert_eq!(kinds(&c), vec![Kind::SizeAnomaly]);
        assert!(c[0].message.contains("b9"), "{}", c[0].message);
        // a failed attempt after it does not hide it, a normal one clears it
        drop.push(attempt(10, true, 2000));
        assert!(conditions(&facts(drop), &r, at(11)).is_empty());
        // with one earlier backup it already compares
        let two = vec![attempt(1, true, 1000), attempt(2, true, 100)];
        assert_eq!(
            kinds(&conditions(&facts(two), &r, at(3))),
            vec![Kind::SizeAnomaly]
        );
        // a first backup has nothing to compare with
        assert!(conditions(&facts(vec![attempt(1, true, 5)]), &r, at(2)).is_empty());
    }

    #[test]
    fn a_schedule_gets_a_dead_mans_switch_of_twice_its_gap_plus_an_hour() {
        // nightly: overdue after 49 h without a success, not after 48
        let r = Rules {
            alert_after: Some(default_alert_after(Duration::days(1))),
            ..Default::default()
        };
        let f = facts(vec![attempt(1, true, 100)]);
        assert!(conditions(&f, &r, at(1 + 48)).is_empty());
        assert_eq!(
            kinds(&conditions(&f, &r, at(1 + 50))),
            vec![Kind::BackupOverdue]
        );
        // never succeeded: counted from when the target was first seen
        assert_eq!(
            kinds(&conditions(&facts(vec![]), &r, at(50))),
            vec![Kind::BackupOverdue]
        );
        assert_eq!(
            default_alert_after(Duration::seconds(5)),
            Duration::seconds(3610)
        );
    }

    #[test]
    fn missed_slots_alert_until_the_next_success() {
        let r = Rules::default();
        let mut f = facts(vec![attempt(1, true, 100)]);
        f.last_missed = Some((at(2), 3));
        let c = conditions(&f, &r, at(3));
        assert_eq!(kinds(&c), vec![Kind::ScheduleMissed]);
        assert!(c[0].message.contains("3 missed"), "{}", c[0].message);
        // a success after the miss clears it
        let mut f = facts(vec![attempt(1, true, 100), attempt(3, true, 100)]);
        f.last_missed = Some((at(2), 3));
        assert!(conditions(&f, &r, at(4)).is_empty());
        // never succeeded: it holds
        let mut f = facts(vec![]);
        f.last_missed = Some((at(2), 1));
        assert_eq!(
            kinds(&conditions(&f, &r, at(3))),
            vec![Kind::ScheduleMissed]
        );
    }

    #[test]
    fn agent_away_and_verify() {
        let r = Rules::default();
        let mut f = facts(vec![attempt(1, true, 100)]);
        f.disconnected_since = Some(at(2));
        assert!(conditions(&f, &r, at(2) + Duration::minutes(4)).is_empty());
        assert_eq!(
            kinds(&conditions(&f, &r, at(2) + Duration::minutes(6))),
            vec![Kind::AgentDisconnected]
        );
        f.disconnected_since = None;
        f.last_verify = Some((false, "b1".into(), "checksum mismatch".into()));
        assert_eq!(kinds(&conditions(&f, &r, at(3))), vec![Kind::VerifyFailed]);
        f.last_verify = Some((true, "b1".into(), "ok".into()));
        assert!(conditions(&f, &r, at(3)).is_empty());
    }
}
