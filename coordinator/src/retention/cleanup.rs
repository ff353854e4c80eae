//! Cleanup: applies the GFS plan to the catalog and storage. Deleting is
//! crash-safe and idempotent — mark the row `deleting`, delete its objects,
//! delete the row — so a cleanup killed half-way is finished by the next one,
//! and no `completed` row ever points at a missing object.

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use crate::policy::RetentionSpec;
use crate::repo::{BackupRecord, Status};
use crate::retention::gfs::{self, Candidate, Decision};
use crate::Core;

/// The plan for one target.
#[derive(Debug, Clone)]
pub struct TargetPlan {
    pub target: String,
    pub policy: gfs::Policy,
    /// Every backup of the target with its verdict, newest first.
    pub decisions: Vec<(BackupRecord, Decision)>,
}

impl TargetPlan {
    /// The policy in words, as `dsctl cleanup` shows it.
    pub fn policy_text(&self) -> String {
        describe_policy(&self.policy)
    }
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

fn candidate(b: &BackupRecord, in_use: &HashSet<String>) -> Option<Candidate> {
    // Completed base backups are not rotated with the dumps: what a
    // point-in-time restore needs is a window of its own
    // (`retention::pitr`). A failed or interrupted attempt is kept for its
    // grace like a dump's.
    if b.kind == crate::repo::Kind::Base && matches!(b.status, Status::Completed | Status::Running)
    {
        return None;
    }
    let status = match b.status {
        Status::Completed => gfs::Status::Completed,
        // An interrupted attempt is kept like a failed one, for its grace.
        Status::Failed | Status::Interrupted => gfs::Status::Failed,
        Status::Running => gfs::Status::Running,
        Status::Deleting => return None,
    };
    Some(Candidate {
        id: b.id.clone(),
        created_at: b.created_at,
        status,
        pinned: b.pinned,
        manual: b.is_manual(),
        in_use: in_use.contains(&b.id),
    })
}

/// The retention that applies to `target` now.
pub async fn policy_for(core: &Core, target: &str) -> gfs::Policy {
    let requested: Option<RetentionSpec> = core
        .targets
        .get(target)
        .await
        .ok()
        .flatten()
        .and_then(|t| t.retention)
        .and_then(|j| serde_json::from_str(&j).ok());
    core.policies.retention_for(target, requested.as_ref())
}

/// GFS tags a newly completed backup gets, given the target's other backups.
pub async fn tags_for_new(core: &Core, row: &BackupRecord) -> Vec<String> {
    let mut tags = Vec::new();
    if row.is_manual() {
        tags.push("manual".to_string());
        return tags;
    }
    let mut rows = core.repo.list(Some(&row.target)).await.unwrap_or_default();
    rows.retain(|r| r.id != row.id);
    let mut completed = row.clone();
    completed.status = Status::Completed;
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
    // One cleanup at a time: two plans made side by side could each delete
    // what the other counted on keeping.
    let _one = core.cleanup.lock().await;
    let targets = match target {
        Some(t) => vec![t.to_string()],
        None => core.repo.targets().await.map_err(|e| e.to_string())?,
    };
    let now = core.clock.now();
    let mut report = Report::default();
    for t in targets {
        if !dry_run {
            // Deletions a crash or a storage error left half-done go first.
            let (done, errors) = core
                .repo
                .finish_deletions(Some(&t))
                .await
                .map_err(|e| e.to_string())?;
            report.finished.extend(done);
            report.errors.extend(errors);
        }
        let rows = core.repo.list(Some(&t)).await.map_err(|e| e.to_string())?;
        let plan = plan_target(core, &t, rows, now).await;
        if !dry_run {
            for (row, d) in &plan.decisions {
                if d.keep {
                    continue;
                }
                let reason = d.reasons.first().map(|r| r.to_string()).unwrap_or_default();
                // Checked again right before: a restore may have started.
                if core.fleet.backups_in_use().contains(&row.id) {
                    report.errors.push(format!(
                        "{}: in use by a restore, verify or export, kept",
                        row.id
                    ));
                    continue;
                }
                match core.repo.delete(row, &reason).await {
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
        // Base backups and WAL follow the recovery window, not GFS.
        match super::pitr::run(core, &t, dry_run).await {
            // A dry run's plan shows the dumps only (the window's is logged).
            Ok((bases, wal)) if dry_run => {
                if !bases.is_empty() || wal > 0 {
                    tracing::info!(target = %t, bases = ?bases, wal_files = wal, "a cleanup would delete these base backups and WAL files (DATASAVER_PITR_WINDOW)");
                }
            }
            Ok((bases, _)) => report.deleted.extend(bases),
            Err(e) => report
                .errors
                .push(format!("{t}: point-in-time retention: {e}")),
        }
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

async fn plan_target(
    core: &Core,
    target: &str,
    rows: Vec<BackupRecord>,
    now: DateTime<Utc>,
) -> TargetPlan {
    let policy = policy_for(core, target).await;
    let in_use = core.fleet.backups_in_use();
    let (rows, candidates): (Vec<BackupRecord>, Vec<Candidate>) = rows
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
