//! The fleet's health, per target and overall: what `GET /health`,
//! `dsctl health` and the metrics' state gauges report.

use serde::Serialize;

use crate::catalog::status;
use crate::Core;

/// Overall and per-target level. Unhealthy: backups are not happening (the
/// dead man's switch fired, or failures in a row). Degraded: something needs a
/// look (a failed backup, an agent away, a size anomaly, a failed verify).
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

#[derive(Clone, Debug, Serialize)]
pub struct OpenAlert {
    pub event: String,
    pub message: String,
    pub since: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TargetStatus {
    pub target: String,
    pub status: Level,
    pub schedule: Option<String>,
    pub next_run: Option<String>,
    pub last_backup_at: Option<String>,
    pub last_result: Option<String>,
    pub last_error: Option<String>,
    pub last_success_at: Option<String>,
    #[serde(skip)]
    pub last_success_unix: Option<i64>,
    pub backups: u32,
    pub bytes_stored: u64,
    pub agent_connected: bool,
    pub alerts: Vec<OpenAlert>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub status: Level,
    pub time_zone: String,
    pub agents_connected: usize,
    pub targets: Vec<TargetStatus>,
}

pub async fn report(core: &Core) -> Result<Report, String> {
    let open = core
        .catalog
        .open_alerts()
        .await
        .map_err(|e| e.to_string())?;
    let mut targets = Vec::new();
    for name in crate::alerts::targets(core).await {
        let rows = core
            .catalog
            .list(Some(name.clone()))
            .await
            .map_err(|e| e.to_string())?;
        let last = rows
            .iter()
            .find(|r| r.status == status::COMPLETED || r.status == status::FAILED);
        let last_ok = rows.iter().find(|r| r.status == status::COMPLETED);
        let completed: Vec<_> = rows
            .iter()
            .filter(|r| r.status == status::COMPLETED)
            .collect();
        let alerts: Vec<OpenAlert> = open
            .iter()
            .filter(|a| a.target == name)
            .map(|a| OpenAlert {
                event: a.kind.clone(),
                message: a.message.clone(),
                since: a.opened_at.clone(),
            })
            .collect();
        let connected = core.fleet.is_connected(&name);
        let mut level = Level::Healthy;
        for a in &alerts {
            let critical =
                crate::alerts::rules::Kind::from_event(&a.event).is_some_and(|k| k.is_critical());
            level = level.max(if critical {
                Level::Unhealthy
            } else {
                Level::Degraded
            });
        }
        if last.is_some_and(|r| r.status == status::FAILED) {
            level = level.max(Level::Degraded);
        }
        let last_success_at =
            last_ok.map(|r| r.finished_at.clone().unwrap_or(r.created_at.clone()));
        targets.push(TargetStatus {
            schedule: core.scheduler.schedule_of(&name),
            next_run: core.scheduler.next_run(&name).map(crate::rfc3339),
            last_backup_at: last.map(|r| r.created_at.clone()),
            last_result: last.map(|r| r.status.clone()),
            last_error: last.and_then(|r| r.error.clone()),
            last_success_unix: last_success_at
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|d| d.timestamp()),
            last_success_at,
            backups: completed.len() as u32,
            bytes_stored: completed.iter().map(|r| r.stored_bytes).sum(),
            agent_connected: connected,
            alerts,
            status: level,
            target: name,
        });
    }
    let status = targets
        .iter()
        .map(|t| t.status)
        .max()
        .unwrap_or(Level::Healthy);
    Ok(Report {
        status,
        time_zone: core.policies.tz.name().to_string(),
        agents_connected: core.fleet.agent_count(),
        targets,
    })
}
