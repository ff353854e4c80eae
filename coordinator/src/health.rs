//! The fleet's health, per target and overall: what `GET /health`,
//! `dsctl health` and the metrics' state gauges report. The JSON field names
//! here are the shared vocabulary (README "Field names"): `dsctl health
//! --json` prints the same ones.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::repo::{record::format_time, Status};
use crate::Core;

/// Overall and per-target level. Unhealthy: backups are not happening (the
/// dead man's switch fired, or failures in a row). Degraded: something needs a
/// look (a failed backup, an agent away, a missed slot, a size anomaly, a
/// failed verify, a scheduled target that has no backup yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Healthy,
    Degraded,
    Unhealthy,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Healthy => "healthy",
            Level::Degraded => "degraded",
            Level::Unhealthy => "unhealthy",
        }
    }
}

/// What a target's status says when it has never had a successful backup.
pub const NO_BACKUP_YET: &str = "no backup yet";

#[derive(Clone, Debug, Serialize)]
pub struct OpenAlert {
    pub event: String,
    pub message: String,
    pub since: String,
    pub backup_id: Option<String>,
}

/// A part of the agent's request raised to the coordinator's floor.
#[derive(Clone, Debug, Serialize)]
pub struct FloorNote {
    pub setting: String,
    pub asked: String,
    pub floor: String,
    /// e.g. "agent asked keep_daily=0, raised to the floor 7"
    pub message: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TargetStatus {
    pub target: String,
    pub status: Level,
    /// Why the status is what it is ("" when healthy and backed up).
    pub status_reason: String,
    pub schedule: Option<String>,
    pub next_backup_at: Option<String>,
    pub last_backup_at: Option<String>,
    pub last_backup_id: Option<String>,
    pub last_backup_status: Option<String>,
    pub last_backup_error: Option<String>,
    pub last_success_at: Option<String>,
    #[serde(skip)]
    pub last_success_unix: Option<i64>,
    /// The restore-drill schedule, and when a drill last passed.
    pub drill_schedule: Option<String>,
    pub last_drill_success_at: Option<String>,
    #[serde(skip)]
    pub last_drill_success_unix: Option<i64>,
    pub backups: u32,
    pub stored_bytes: u64,
    pub agent_connected: bool,
    pub missed_slots: u64,
    pub alerts: Vec<OpenAlert>,
    pub raised_to_floor: Vec<FloorNote>,
    /// With continuous WAL: the times a point-in-time restore can reach
    /// (null without; the same fields as `dsctl health --json`).
    pub recovery_window: Option<RecoveryWindow>,
}

/// From the end of the oldest usable base backup to the newest time whose
/// WAL is all stored (the server's clock).
#[derive(Clone, Debug, Serialize)]
pub struct RecoveryWindow {
    pub from: String,
    pub to: String,
}

/// The recovery window of `target`, when it has a base backup and WAL.
async fn recovery_window(core: &Core, target: &str) -> Option<RecoveryWindow> {
    let w = crate::wal::view::targets(core, Some(target))
        .await
        .ok()?
        .into_iter()
        .next()?;
    let (from, to) = (w.earliest_recoverable?, w.latest_recoverable?);
    (from <= to).then(|| RecoveryWindow {
        from: format_time(from),
        to: format_time(to),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct Queue {
    pub running: usize,
    pub waiting: usize,
    pub limit: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub status: Level,
    pub time_zone: String,
    pub agents_connected: usize,
    pub queue: Queue,
    pub targets: Vec<TargetStatus>,
}

/// Where the full error texts are: `dsctl health`, over mutual TLS.
const DETAILS: &str = "details: dsctl health";

impl Report {
    /// What the unauthenticated `GET /health` shows: the same report with
    /// every error text (which can name a database's user, host, port and
    /// name) replaced by its class. Operators read the texts with `dsctl
    /// health`.
    pub fn public(mut self) -> Report {
        use crate::alerts::rules::Kind;
        for t in &mut self.targets {
            t.last_backup_error = t.last_backup_error.as_deref().map(public_error);
            for a in &mut t.alerts {
                let id = a.backup_id.as_deref().unwrap_or("?");
                a.message = match Kind::from_event(&a.event) {
                    // Built from names, ids, times and numbers only.
                    Some(
                        Kind::BackupOverdue
                        | Kind::ConsecutiveFailures
                        | Kind::SizeAnomaly
                        | Kind::AgentDisconnected
                        | Kind::ScheduleMissed
                        | Kind::ServerChanged
                        | Kind::DrillStale
                        | Kind::WalGap
                        | Kind::WalLag
                        | Kind::WalConflict
                        | Kind::WalSysidMismatch
                        | Kind::WalSlotAtRisk,
                    ) => std::mem::take(&mut a.message),
                    Some(Kind::BackupFailed) => format!(
                        "backup {id} of {} failed: {}",
                        t.target,
                        t.last_backup_error
                            .clone()
                            .unwrap_or_else(|| public_error(""))
                    ),
                    Some(Kind::VerifyFailed) => format!("verify of {id} failed ({DETAILS})"),
                    Some(Kind::DrillFailed) => {
                        format!("restore drill of {id} failed ({DETAILS})")
                    }
                    None => format!("{} ({DETAILS})", a.event),
                };
            }
        }
        self
    }
}

/// The class of a backup's error, without its text: what `/health` may
/// show to anyone who can reach it.
pub fn public_error(error: &str) -> String {
    let e = error.to_ascii_lowercase();
    let connection = [
        "cannot connect to database",
        "connection to server",
        "password",
        "could not connect",
        "could not translate host name",
        "no pg_hba.conf entry",
    ];
    let class = if connection.iter().any(|c| e.contains(c)) {
        "database unreachable"
    } else {
        match crate::metrics::failure_reason(error) {
            "agent_not_connected" => "agent not connected",
            "interrupted" => "interrupted",
            "database_unreachable" => "database unreachable",
            "pg_dump" => "pg_dump failed",
            "checksum" => "checksum mismatch",
            "storage" => "storage error",
            "agent_lost" => "agent connection lost",
            _ => "failed",
        }
    };
    format!("{class} ({DETAILS})")
}

fn parse(t: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

pub async fn report(core: &Core) -> Result<Report, String> {
    let now = core.clock.now();
    let open = core
        .alerter
        .store
        .open_alerts()
        .await
        .map_err(|e| e.to_string())?;
    let mut targets = Vec::new();
    for name in crate::alerts::targets(core).await {
        let rows = core
            .repo
            .list(Some(&name))
            .await
            .map_err(|e| e.to_string())?;
        let record = core.targets.get(&name).await.map_err(|e| e.to_string())?;
        let last = rows.iter().find(|r| r.status.is_finished());
        let last_ok = rows.iter().find(|r| r.status == Status::Completed);
        let last_drill_ok = crate::repo::latest_drill(&rows, true).map(|(_, v)| v.at);
        let completed: Vec<_> = rows
            .iter()
            .filter(|r| r.status == Status::Completed)
            .collect();
        let alerts: Vec<OpenAlert> = open
            .iter()
            .filter(|a| a.target == name)
            .map(|a| OpenAlert {
                event: a.kind.clone(),
                message: a.message.clone(),
                since: a.opened_at.clone(),
                backup_id: a.backup_id.clone(),
            })
            .collect();
        let connected = core.fleet.is_connected(&name);
        let mut level = Level::Healthy;
        let mut reasons: Vec<String> = Vec::new();
        for a in &alerts {
            let critical =
                crate::alerts::rules::Kind::from_event(&a.event).is_some_and(|k| k.is_critical());
            level = level.max(if critical {
                Level::Unhealthy
            } else {
                Level::Degraded
            });
            reasons.push(a.event.clone());
        }
        if last.is_some_and(|r| r.status == Status::Failed) {
            level = level.max(Level::Degraded);
            if !reasons.iter().any(|r| r == "backup.failed") {
                reasons.push("last backup failed".into());
            }
        }
        if last_ok.is_none() {
            // A scheduled target whose first slot has passed without a
            // success is not healthy, whatever else is configured.
            // A target only the config file names counts from this start.
            let first_seen = record
                .as_ref()
                .and_then(|r| parse(&r.first_seen))
                .unwrap_or(core.alerter.started());
            let first_due = core.scheduler.first_slot_after(&name, first_seen);
            if first_due.is_some_and(|d| d <= now) {
                level = level.max(Level::Degraded);
            }
            reasons.push(NO_BACKUP_YET.into());
        }
        let last_success = last_ok.map(|r| r.finished_at.unwrap_or(r.created_at));
        let asked_retention: Option<crate::policy::RetentionSpec> = record
            .as_ref()
            .and_then(|r| r.retention.as_deref())
            .and_then(|j| serde_json::from_str(j).ok());
        let raised_to_floor = core
            .policies
            .floor_raises(
                &name,
                record.as_ref().and_then(|r| r.schedule.as_deref()),
                asked_retention.as_ref(),
                now,
            )
            .into_iter()
            .map(|r| FloorNote {
                message: r.message(),
                setting: r.setting,
                asked: r.asked,
                floor: r.floor,
            })
            .collect();
        let recovery_window = recovery_window(core, &name).await;
        targets.push(TargetStatus {
            recovery_window,
            schedule: core.scheduler.schedule_of(&name),
            next_backup_at: core.scheduler.next_run(&name).map(crate::rfc3339),
            last_backup_at: last.map(|r| format_time(r.created_at)),
            last_backup_id: last.map(|r| r.id.clone()),
            last_backup_status: last.map(|r| r.status.as_str().to_string()),
            last_backup_error: last.and_then(|r| r.error.clone()),
            last_success_unix: last_success.map(|d| d.timestamp()),
            last_success_at: last_success.map(format_time),
            drill_schedule: core
                .policies
                .drill_schedule_for(
                    &name,
                    record.as_ref().and_then(|r| r.drill_schedule.as_deref()),
                )
                .map(|s| s.expr().to_string()),
            last_drill_success_at: last_drill_ok.map(format_time),
            last_drill_success_unix: last_drill_ok.map(|d| d.timestamp()),
            backups: completed.len() as u32,
            stored_bytes: completed.iter().map(|r| r.stored_bytes).sum(),
            agent_connected: connected,
            missed_slots: record.as_ref().map(|r| r.missed_slots).unwrap_or(0),
            alerts,
            raised_to_floor,
            status: level,
            status_reason: reasons.join("; "),
            target: name,
        });
    }
    let status = targets
        .iter()
        .map(|t| t.status)
        .max()
        .unwrap_or(Level::Healthy);
    let (running, waiting, limit) = core.scheduler.queue_counts();
    Ok(Report {
        status,
        time_zone: core.policies.tz.name().to_string(),
        agents_connected: core.fleet.agent_count(),
        queue: Queue {
            running,
            waiting,
            limit,
        },
        targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(error: &str, alerts: Vec<OpenAlert>) -> TargetStatus {
        TargetStatus {
            recovery_window: None,
            target: "app".into(),
            status: Level::Degraded,
            status_reason: "backup.failed".into(),
            schedule: None,
            next_backup_at: None,
            last_backup_at: None,
            last_backup_id: Some("app_20240101_000000".into()),
            last_backup_status: Some("failed".into()),
            last_backup_error: Some(error.into()),
            last_success_at: None,
            last_success_unix: None,
            drill_schedule: None,
            last_drill_success_at: None,
            last_drill_success_unix: None,
            backups: 0,
            stored_bytes: 0,
            agent_connected: true,
            missed_slots: 0,
            alerts,
            raised_to_floor: vec![],
        }
    }

    #[test]
    fn the_public_report_names_no_connection_detail() {
        let error = "pg_dump failed: pg_dump: error: connection to server at \"10.1.2.3\", port 6543 failed: FATAL:  password authentication failed for user \"billing_ro\"";
        let alert = |event: &str, message: &str| OpenAlert {
            event: event.into(),
            message: message.into(),
            since: "2024-01-01T00:00:00Z".into(),
            backup_id: Some("app_20240101_000000".into()),
        };
        let r = Report {
            status: Level::Degraded,
            time_zone: "UTC".into(),
            agents_connected: 1,
            queue: Queue {
                running: 0,
                waiting: 0,
                limit: 4,
            },
            targets: vec![target(
                error,
                vec![
                    alert(
                        "backup.failed",
                        &format!("backup app_20240101_000000 of app failed: {error}"),
                    ),
                    alert("verify.failed", &format!("verify of x failed: {error}")),
                    alert("some.future_kind", error),
                    alert("backup.overdue", "no successful backup of app for 27 h"),
                ],
            )],
        };
        let text = serde_json::to_string(&r.public()).unwrap();
        for secret in ["10.1.2.3", "6543", "billing_ro", "FATAL"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(
            text.contains("database unreachable (details: dsctl health)"),
            "{text}"
        );
        assert!(
            text.contains("backup app_20240101_000000 of app failed: database unreachable"),
            "{text}"
        );
        assert!(
            text.contains("no successful backup of app for 27 h"),
            "{text}"
        );
    }

    #[test]
    fn errors_are_classed() {
        for (error, class) in [
            (
                "cannot connect to database app at db:5432 as u: refused",
                "database unreachable",
            ),
            (
                "checksum mismatch on upload: agent sent blake3:1",
                "checksum mismatch",
            ),
            (
                "storage write \"a/logical/x\": only 1 MiB free",
                "storage error",
            ),
            ("agent not connected", "agent not connected"),
            ("something else at host db.internal", "failed"),
        ] {
            assert_eq!(
                public_error(error),
                format!("{class} (details: dsctl health)"),
                "{error}"
            );
        }
    }
}
