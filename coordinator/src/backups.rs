//! What operators do to stored backups that is not a job: pick the backup a
//! restore means, delete one (with the guards that keep the last good copy),
//! and run retention. The adapters call these; the rules live here.

use chrono::{DateTime, Utc};

use crate::repo::{BackupRecord, RepoError, Status};
use crate::retention::cleanup;
use crate::Core;

/// Why an operator's request was not carried out. The variant is what the
/// caller branches on (the gRPC code, dsctl's exit code); the text says what
/// to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// The request itself is wrong (a malformed id, a missing option).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The request is well formed but refused in the current state.
    #[error("{0}")]
    Refused(String),
    /// Storage or the catalog failed; trying again later may work.
    #[error("{0}")]
    Unavailable(String),
}

impl From<RepoError> for ActionError {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::NotFound(_) => Self::NotFound(e.to_string()),
            RepoError::Conflict(_) => Self::Refused(e.to_string()),
            _ => Self::Unavailable(e.to_string()),
        }
    }
}

/// Which backup a restore means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Id(String),
    /// The newest completed backup of the target (at or before a time).
    Latest {
        target: String,
        at: Option<DateTime<Utc>>,
    },
}

/// A backup by id, the id checked first.
pub async fn find(core: &Core, id: &str) -> Result<BackupRecord, ActionError> {
    datasaver_common::names::validate_backup_id(id).map_err(ActionError::Invalid)?;
    Ok(core.repo.find(id).await?)
}

/// The completed backup `sel` names; `what` ("restored", "verified") says
/// what was to be done with it when it is not completed.
pub async fn pick(core: &Core, sel: &Selector, what: &str) -> Result<BackupRecord, ActionError> {
    let row = match sel {
        Selector::Id(id) => find(core, id).await?,
        Selector::Latest { target, at } => core
            .repo
            .latest_completed(target, *at)
            .await
            .map_err(|e| ActionError::Unavailable(e.to_string()))?
            .ok_or_else(|| {
                ActionError::NotFound(match at {
                    Some(at) => format!(
                        "target {target} has no completed backup at or before {}",
                        crate::rfc3339(*at)
                    ),
                    None => format!("target {target} has no completed backup"),
                })
            })?,
    };
    if row.status != Status::Completed {
        return Err(ActionError::Refused(format!(
            "backup {} is {}, not completed; it cannot be {what}",
            row.id, row.status
        )));
    }
    if row.kind == crate::repo::Kind::Base {
        return Err(ActionError::Refused(format!(
            "backup {} is a base backup of the whole cluster; it cannot be {what} like a dump (restore it with `dsctl restore {} --physical --data-dir DIR`)",
            row.id, row.id
        )));
    }
    Ok(row)
}

/// Deletes backup `id` for operator `by`. Refused while it is pinned,
/// running or being read, and — unless `force` — when it is its target's
/// newest completed backup.
pub async fn delete(core: &Core, id: &str, force: bool, by: &str) -> Result<String, ActionError> {
    let row = find(core, id).await?;
    if row.pinned {
        return Err(ActionError::Refused(format!(
            "backup {} is pinned; `dsctl unpin {}` first",
            row.id, row.id
        )));
    }
    if row.status == Status::Running {
        return Err(ActionError::Refused(format!(
            "backup {} is still running",
            row.id
        )));
    }
    if core.fleet.backups_in_use().contains(&row.id) {
        return Err(ActionError::Refused(format!(
            "backup {} is in use by a restore, verify or export; try again when it has finished",
            row.id
        )));
    }
    if row.status == Status::Completed && !force {
        let newest = core
            .repo
            .latest_completed(&row.target, None)
            .await
            .map_err(|e| ActionError::Unavailable(e.to_string()))?;
        if newest.is_some_and(|n| n.id == row.id) {
            return Err(ActionError::Refused(format!(
                "backup {} is the newest completed backup of {}; add --force to delete it anyway",
                row.id, row.target
            )));
        }
    }
    tracing::info!(operator = %by, backup = %row.id, force, "delete requested");
    let reason = format!("deleted by operator {by}");
    match core.repo.delete(&row, &reason).await {
        Ok(true) => Ok(row.id),
        Ok(false) => Err(ActionError::Refused(format!(
            "backup {} changed meanwhile (pinned?); nothing deleted",
            row.id
        ))),
        Err(e) => Err(ActionError::Unavailable(format!(
            "backup {} is marked for deletion but {e}; `dsctl cleanup` finishes it",
            row.id
        ))),
    }
}

/// What a cleanup did or, dry, would do.
pub type CleanupReport = cleanup::Report;

/// Applies retention to `target` (or every target); `dry_run` only plans.
pub async fn cleanup(
    core: &Core,
    target: Option<&str>,
    dry_run: bool,
) -> Result<CleanupReport, ActionError> {
    if let Some(t) = target {
        datasaver_common::names::validate_target(t)
            .map_err(|e| ActionError::Invalid(e.to_string()))?;
    }
    cleanup::run(core, target, dry_run)
        .await
        .map_err(ActionError::Unavailable)
}
