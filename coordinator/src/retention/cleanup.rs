//! Cleanup: applies the GFS plan to the catalog and storage. Deleting is
//! crash-safe and idempotent — mark the row `deleting`, delete its objects,
//! delete the row — so a cleanup killed half-way is finished by the next one,
//! and no `completed` row ever points at a missing object.

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use crate::catalog::{status, BackupRow};
use crate::policy::RetentionSpec;
use crate::retention::gfs::{self, Candidate, Decision};
use crate::Core;

/// The plan for one target.
#[derive(Debug, Clone)]
pub struct TargetPlan {
    pub target: String,
    pub policy: gfs::Policy,
    /// Every backup of the target with its verdict, newest first.
    pub decisions: Vec<(BackupRow, Decision)>,
}

/// What a cleanup did (or, dry, would do).
#[derive(Debug, Default)]
pub struct Report {
    pub plans: Vec<TargetPlan>,
    /// Deleted now (empty on a dry run).
    pub deleted: Vec<String>,
    /// Deletions an earlier, interrupted cleanup had started, finished now.
    pub finished: Vec<String>,
    /// Backups that could not be deleted, with why (they stay).
    pub errors: Vec<String>,
}

/// One cleanup at a time: two would race on the same rows.
static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn candidate(b: &BackupRow, in_use: &HashSet<String>) -> Option<Candidate> {
    let status = match b.status.as_str() {
        status::COMPLETED => gfs::Status::Completed,
        status::FAILED => gfs::Status::Failed,
        status::RUNNING => gfs::Status::Running,
        _ => return None,
    };
    let created_at = DateTime::parse_from_rfc3339(&b.created_at)
        .ok()?
        .with_timezone(&Utc);
    Some(Candidate {
        id: b.id.clone(),
        created_at,
        status,
        pinned: b.pinned,
        manual: is_manual(b),
        in_use: in_use.contains(&b.id),
    })
}

/// A manual backup in the GFS sense: asked for by hand with a label. An
/// unlabelled `dsctl backup` (from an operator's own cron, say) rotates like
/// a scheduled one.
pub fn is_manual(b: &BackupRow) -> bool {
    b.trigger == "manual" && b.label.is_some()
}

/// The retention that applies to `target` now.
pub async fn policy_for(core: &Core, target: &str) -> gfs::Policy {
    let requested: Option<RetentionSpec> = core
        .catalog
        .target(target)
        .await
        .ok()
        .flatten()
        .and_then(|t| t.retention)
        .and_then(|j| serde_json::from_str(&j).ok());
    core.policies.retention_for(target, requested.as_ref())
}

/// GFS tags a newly completed backup gets, given the target's other backups.
pub async fn tags_for_new(core: &Core, row: &BackupRow) -> Vec<String> {
    let mut tags = Vec::new();
    if is_manual(row) {
        tags.push("manual".to_string());
        return tags;
    }
    let mut rows = core
        .catalog
        .list(Some(row.target.clone()))
        .await
        .unwrap_or_default();
    rows.retain(|r| r.id != row.id);
    let mut completed = row.clone();
    completed.status = status::COMPLETED.into();
    rows.push(completed);
    let none = HashSet::new();
    let candidates: Vec<Candidate> = rows.iter().filter_map(|r| candidate(r, &none)).collect();
    if let Some(t) = gfs::tags(&candidates, &core.policies.tz).get(&row.id) {
        tags.extend(t.iter().map(|t| t.as_str().to_string()));
    }
    tags
}

/// Plans (and unless `dry_run`, carries out) retention for one target or all.
pub async fn run(core: &Core, target: Option<&str>, dry_run: bool) -> Result<Report, String> {
    let _one = LOCK.lock().await;
    let targets = match target {
        Some(t) => vec![t.to_string()],
        None => core
            .catalog
            .backup_targets()
            .await
            .map_err(|e| e.to_string())?,
    };
    let now = core.clock.now();
    let mut report = Report::default();
    for t in targets {
        let rows = core
            .catalog
            .list(Some(t.clone()))
            .await
            .map_err(|e| e.to_string())?;
        if !dry_run {
            for r in rows.iter().filter(|r| r.status == status::DELETING) {
                match delete_objects(core, r).await {
                    Ok(()) => report.finished.push(r.id.clone()),
                    Err(e) => report.errors.push(format!("{}: {e}", r.id)),
                }
            }
        }
        let plan = plan_target(core, &t, rows, now).await;
        if !dry_run {
            for (row, d) in &plan.decisions {
                if d.keep {
                    continue;
                }
                let reason = d.reasons.first().map(|r| r.to_string()).unwrap_or_default();
                // Checked again right before: a restore may have started.
                if core.fleet.backups_in_use().contains(&row.id) {
                    report
                        .errors
                        .push(format!("{}: in use by a restore or verify, kept", row.id));
                    continue;
                }
                match delete(core, row, &reason).await {
                    Ok(true) => {
                        tracing::info!(target = %t, backup = %row.id, reason = %reason, "deleted by retention");
                        report.deleted.push(row.id.clone());
                    }
                    Ok(false) => {}
                    Err(e) => report.errors.push(format!("{}: {e}", row.id)),
                }
            }
        }
        report.plans.push(plan);
    }
    for e in &report.errors {
        tracing::warn!(error = %e, "cleanup could not delete a backup");
    }
    Ok(report)
}

/// The policy in words, for `dsctl cleanup`.
pub fn describe_policy(p: &gfs::Policy) -> String {
    let mut s = format!(
        "last {}, daily {}, weekly {}, monthly {}",
        p.keep_last, p.keep_daily, p.keep_weekly, p.keep_monthly
    );
    if let Some(d) = p.max_age_days {
        s.push_str(&format!(", max age {d} days"));
    }
    match p.manual_keep_days {
        Some(d) => s.push_str(&format!(", manual backups {d} days")),
        None => s.push_str(", manual backups until deleted"),
    }
    s.push_str(&format!(
        ", failed attempts {} h",
        p.failed_grace.num_hours()
    ));
    s
}

/// Finishes deletions an interrupted cleanup started (rows left `deleting`).
pub async fn finish_interrupted(core: &Core) -> Result<usize, String> {
    let _one = LOCK.lock().await;
    let rows = core.catalog.list(None).await.map_err(|e| e.to_string())?;
    let mut n = 0;
    for r in rows.iter().filter(|r| r.status == status::DELETING) {
        delete_objects(core, r).await?;
        n += 1;
    }
    Ok(n)
}

async fn plan_target(
    core: &Core,
    target: &str,
    rows: Vec<BackupRow>,
    now: DateTime<Utc>,
) -> TargetPlan {
    let policy = policy_for(core, target).await;
    let in_use = core.fleet.backups_in_use();
    let (rows, candidates): (Vec<BackupRow>, Vec<Candidate>) = rows
        .into_iter()
        .filter_map(|r| candidate(&r, &in_use).map(|c| (r, c)))
        .unzip();
    let decisions = gfs::plan(&candidates, &policy, now, &core.policies.tz);
    TargetPlan {
        target: target.to_string(),
        policy,
        decisions: rows.into_iter().zip(decisions).collect(),
    }
}

/// Deletes one backup: mark, objects, row. Returns false if the row changed
/// under us (pinned meanwhile), in which case nothing was deleted.
pub async fn delete(core: &Core, row: &BackupRow, reason: &str) -> Result<bool, String> {
    if !core
        .catalog
        .mark_deleting(&row.id, reason)
        .await
        .map_err(|e| e.to_string())?
    {
        return Ok(false);
    }
    delete_objects(core, row).await?;
    Ok(true)
}

/// The object and meta file, then the row. Deleting what is already gone is
/// not an error, so this can be repeated.
async fn delete_objects(core: &Core, row: &BackupRow) -> Result<(), String> {
    let keys: Vec<String> = [&row.meta_key, &row.object_key]
        .into_iter()
        .filter(|k| !k.is_empty())
        .cloned()
        .collect();
    if !keys.is_empty() {
        core.storage
            .delete(&keys)
            .await
            .map_err(|e| format!("deleting its objects failed (will retry): {e}"))?;
    }
    core.catalog
        .delete_row(&row.id)
        .await
        .map_err(|e| e.to_string())
}
