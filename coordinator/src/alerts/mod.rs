//! Alerting: the rules (pure, `rules`), the state of each alert (open or
//! resolved, kept in the catalog by `store` so a restart neither repeats nor
//! forgets one) and the webhooks (`webhook`), delivered from `store`'s outbox
//! with retries, never in the way of a backup.

pub mod expiry;
pub mod rules;
pub mod store;
pub mod webhook;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::sync::Notify;

use crate::repo::Status;
use crate::Core;
use rules::{Attempt, Condition, Facts, Kind, Rules};
use store::{AlertRow, AlertStore};

/// Alerting settings, checked at start-up.
#[derive(Clone, Default)]
pub struct AlertConfig {
    pub webhook_urls: Vec<String>,
    pub secret: Option<String>,
    pub rules: Rules,
    /// Per-target dead man's switch windows (from the YAML file).
    pub alert_after: HashMap<String, chrono::Duration>,
}

impl std::fmt::Debug for AlertConfig {
    // Webhook URLs often carry tokens (Slack's do) and the secret is one:
    // neither may reach a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertConfig")
            .field("webhooks", &self.webhook_urls.len())
            .field("signed", &self.secret.is_some())
            .field("rules", &self.rules)
            .finish()
    }
}

impl AlertConfig {
    pub fn rules_for(&self, target: &str) -> Rules {
        let mut r = self.rules.clone();
        if let Some(a) = self.alert_after.get(target) {
            r.alert_after = Some(*a);
        }
        r
    }
}

/// Alert state (open alerts and the webhook outbox, in `store`) and the
/// wake-ups of the evaluation and delivery loops.
pub struct Alerter {
    pub store: AlertStore,
    pub wake: Notify,
    pub deliver: Notify,
    /// Certificates watched for `certificate.expiring` (see `expiry`).
    pub certificates: expiry::Certificates,
    started: DateTime<Utc>,
}

impl Alerter {
    pub fn new(store: AlertStore, started: DateTime<Utc>) -> Self {
        Self {
            store,
            wake: Notify::new(),
            deliver: Notify::new(),
            certificates: expiry::Certificates::default(),
            started,
        }
    }

    /// When this coordinator started.
    pub fn started(&self) -> DateTime<Utc> {
        self.started
    }
}

fn parse(t: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

pub fn stamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Every target alerting looks at: known to the catalog, with backups, or
/// named in the configuration.
pub async fn targets(core: &Core) -> Vec<String> {
    let mut names: BTreeSet<String> = BTreeSet::new();
    if let Ok(ts) = core.targets.list().await {
        names.extend(ts.into_iter().map(|t| t.name));
    }
    if let Ok(ts) = core.repo.targets().await {
        names.extend(ts);
    }
    names.extend(core.policies.targets.keys().cloned());
    names.into_iter().collect()
}

/// The rules for one target. A scheduled target without a dead man's switch
/// (neither `DATASAVER_ALERT_AFTER` nor its own `alert_after`) gets one: twice
/// the longest gap of its schedule plus an hour, so a schedule that silently
/// stops running is noticed even when nobody configured alerting.
pub fn rules_for(core: &Core, target: &str, now: DateTime<Utc>) -> Rules {
    let mut r = core.alert_config.rules_for(target);
    if r.alert_after.is_none() {
        r.alert_after = core
            .scheduler
            .longest_gap(target, now)
            .map(rules::default_alert_after);
    }
    r
}

/// The facts the rules need about one target.
pub async fn facts(core: &Core, target: &str) -> Facts {
    let rows = core.repo.list(Some(target)).await.unwrap_or_default();
    // Interrupted attempts (a planned agent stop) are neither successes nor
    // failures: only their retry counts.
    // Dumps only: a base backup's size and schedule are not a dump's.
    let recent: Vec<Attempt> = rows
        .iter()
        .filter(|r| r.kind == crate::repo::Kind::Logical)
        .filter(|r| r.status == Status::Completed || r.status == Status::Failed)
        .map(|r| Attempt {
            id: r.id.clone(),
            created_at: r.created_at,
            finished_at: r.finished_at.unwrap_or(r.created_at),
            ok: r.status == Status::Completed,
            raw_bytes: r.raw_bytes,
            error: r.error.clone(),
        })
        .take(50)
        .collect();
    let record = core.targets.get(target).await.ok().flatten();
    let first_seen = record.as_ref().and_then(|t| parse(&t.first_seen));
    // A target known from before this start counts from the start: its
    // earlier history is in the backups themselves.
    let started = core.alerter.started;
    let known_since = first_seen.map(|f| f.max(started)).unwrap_or(started);
    let disconnected_since = if core.fleet.is_connected(target) {
        None
    } else {
        Some(core.fleet.disconnected_since(target).unwrap_or(started))
    };
    let last_verify = rows
        .iter()
        .filter_map(|r| r.verification.as_ref().map(|v| (r, v)))
        .max_by_key(|(_, v)| v.at)
        .map(|(r, v)| (v.ok, r.id.clone(), v.result()));
    let last_drill = crate::repo::latest_drill(&rows, false);
    let last_drill_ok_at = crate::repo::latest_drill(&rows, true).map(|(_, v)| v.at);
    let last_missed = record.as_ref().and_then(|r| {
        let at = parse(r.last_missed_at.as_deref()?)?;
        Some((at, r.missed_slots))
    });
    let wal = crate::wal::view::targets(core, Some(target))
        .await
        .ok()
        .and_then(|v| v.into_iter().next());
    Facts {
        wal,
        target: target.to_string(),
        recent,
        known_since,
        disconnected_since,
        last_verify,
        last_missed,
        server_change: record.as_ref().and_then(|r| r.server_change()),
        last_drill: last_drill.map(|(r, v)| (v.ok, r.id.clone(), v.detail.clone())),
        last_drill_ok_at,
        drills_scheduled: core
            .policies
            .drill_schedule_for(
                target,
                record.as_ref().and_then(|r| r.drill_schedule.as_deref()),
            )
            .is_some(),
    }
}

fn body(
    event: &str,
    alert: Kind,
    target: &str,
    c: &Condition,
    at: DateTime<Utc>,
    resolved: bool,
) -> String {
    let text = if resolved {
        format!("[datasaver] resolved: {} on {target}", alert.event())
    } else {
        format!("[datasaver] {}: {}", alert.event(), c.message)
    };
    json!({
        "event": event,
        "alert": alert.event(),
        "status": if resolved { "resolved" } else { "firing" },
        "target": target,
        "backup_id": c.backup_id,
        "message": c.message,
        "at": at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        // Slack, Discord (/slack) and Mattermost incoming webhooks show this.
        "text": text,
    })
    .to_string()
}

/// One evaluation: opens alerts whose condition now holds, resolves those
/// whose condition cleared, and queues one notification per change.
pub async fn evaluate(core: &Core) -> Result<(), String> {
    let now = core.clock.now();
    let open = core
        .alerter
        .store
        .open_alerts()
        .await
        .map_err(|e| e.to_string())?;
    let mut changed = false;
    for target in targets(core).await {
        let f = facts(core, &target).await;
        let holds = rules::conditions(&f, &rules_for(core, &target, now), now);
        for c in &holds {
            let already = open
                .iter()
                .any(|a| a.target == target && a.kind == c.kind.event());
            if already {
                continue;
            }
            let notify: Vec<(String, String)> = core
                .alert_config
                .webhook_urls
                .iter()
                .map(|u| {
                    (
                        u.clone(),
                        body(c.kind.event(), c.kind, &target, c, now, false),
                    )
                })
                .collect();
            tracing::warn!(target = %target, alert = c.kind.event(), message = %c.message, "alert");
            core.alerter
                .store
                .open_alert(
                    AlertRow {
                        id: 0,
                        target: target.clone(),
                        kind: c.kind.event().to_string(),
                        message: c.message.clone(),
                        backup_id: c.backup_id.clone(),
                        opened_at: stamp(now),
                    },
                    notify,
                )
                .await
                .map_err(|e| e.to_string())?;
            changed = true;
        }
        for a in open.iter().filter(|a| a.target == target) {
            let Some(kind) = Kind::from_event(&a.kind) else {
                continue;
            };
            if holds.iter().any(|c| c.kind == kind) {
                continue;
            }
            let c = Condition {
                kind,
                message: format!(
                    "{} on {target} cleared (open since {})",
                    kind.event(),
                    a.opened_at
                ),
                backup_id: a.backup_id.clone(),
            };
            let notify: Vec<(String, String)> = core
                .alert_config
                .webhook_urls
                .iter()
                .map(|u| (u.clone(), body("resolved", kind, &target, &c, now, true)))
                .collect();
            tracing::info!(target = %target, alert = %a.kind, "alert resolved");
            core.alerter
                .store
                .resolve_alert(a.id, stamp(now), notify)
                .await
                .map_err(|e| e.to_string())?;
            changed = true;
        }
    }
    if changed {
        core.alerter.deliver.notify_one();
    }
    Ok(())
}

/// Evaluates every few seconds and whenever something happened, until shutdown.
pub async fn run(core: Arc<Core>) {
    let every = Duration::from_secs(5);
    loop {
        if let Err(e) = evaluate(&core).await {
            tracing::error!(error = %e, "alert evaluation failed");
        }
        if let Err(e) = expiry::evaluate(&core).await {
            tracing::error!(error = %e, "certificate expiry evaluation failed");
        }
        tokio::select! {
            _ = core.cancel.cancelled() => break,
            _ = core.alerter.wake.notified() => {}
            _ = tokio::time::sleep(every) => {}
        }
    }
}
