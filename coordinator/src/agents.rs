//! What an agent's connection means beyond the live fleet: the targets it
//! names are claimed for it (a target belongs to the first agent that served
//! it), and what it asks for (schedule, retention) is remembered so schedules
//! and retention hold while it is away.

use datasaver_common::proto::TargetInfo;

use crate::policy::RetentionSpec;
use crate::Core;

/// Why an agent may not join with the targets it named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Invalid(String),
    /// A target belongs to another agent.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Claims every target `agent` names, or refuses the whole registration.
pub async fn claim_targets(
    core: &Core,
    agent: &str,
    targets: &[TargetInfo],
) -> Result<(), JoinError> {
    if targets.is_empty() {
        return Err(JoinError::Invalid("agent registered no targets".into()));
    }
    for t in targets {
        datasaver_common::names::validate_target(&t.name)
            .map_err(|e| JoinError::Invalid(e.to_string()))?;
        let owner = core
            .targets
            .claim(
                &t.name,
                agent,
                crate::repo::record::format_time(core.clock.now()),
            )
            .await
            .map_err(|e| JoinError::Unavailable(e.to_string()))?;
        if let Some(owner) = owner {
            tracing::warn!(%agent, target = %t.name, %owner, "agent refused: target belongs to another agent");
            return Err(JoinError::Refused(format!(
                "target {} belongs to agent {owner}; agent {agent} may not act for it",
                t.name
            )));
        }
    }
    Ok(())
}

/// Remembers what the agent asks for each target and reschedules it. The
/// request is stored as asked; the floor is applied where it is used
/// (`Policies::retention_for`, the scheduler's throttle), so a changed floor
/// holds for requests already stored. What the floor raised is logged once
/// per target and distinct request.
pub async fn remember_requests(core: &Core, targets: &[TargetInfo]) {
    for t in targets {
        let asked = t.retention.as_ref().map(RetentionSpec::from_proto);
        let retention = asked.as_ref().and_then(|r| serde_json::to_string(r).ok());
        let schedule = Some(t.schedule.clone()).filter(|s| !s.trim().is_empty());
        let raised = core.policies.floor_raises(
            &t.name,
            schedule.as_deref(),
            asked.as_ref(),
            core.clock.now(),
        );
        for r in core.floors_logged.fresh(&t.name, &raised) {
            tracing::warn!(
                target = %t.name,
                setting = %r.setting,
                asked = %r.asked,
                floor = %r.floor,
                "{}: {} (DATASAVER_MIN_* on the coordinator; see `dsctl health`)",
                t.name,
                r.message()
            );
        }
        if let Err(e) = core
            .targets
            .set_request(&t.name, schedule.clone(), retention)
            .await
        {
            tracing::error!(target = %t.name, error = %e, "could not record the agent's settings");
        }
        core.scheduler
            .update_target(core, &t.name, schedule.as_deref())
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policies;
    use crate::testing::fixture;

    fn target(name: &str, schedule: &str) -> TargetInfo {
        TargetInfo {
            name: name.into(),
            schedule: schedule.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_target_is_served_by_the_agent_that_claimed_it_first() {
        let f = fixture(Policies::default());
        claim_targets(&f.core, "a1", &[target("shop", "")])
            .await
            .expect("first claim");
        // The same agent again (a restart) is fine.
        claim_targets(&f.core, "a1", &[target("shop", "")])
            .await
            .expect("same agent");
        let e = claim_targets(&f.core, "a2", &[target("crm", ""), target("shop", "")])
            .await
            .expect_err("another agent");
        assert_eq!(
            e,
            JoinError::Refused(
                "target shop belongs to agent a1; agent a2 may not act for it".into()
            )
        );
        let e = claim_targets(&f.core, "a2", &[])
            .await
            .expect_err("no targets");
        assert!(matches!(e, JoinError::Invalid(_)));
        let e = claim_targets(&f.core, "a2", &[target("bad name", "")])
            .await
            .expect_err("bad name");
        assert!(matches!(e, JoinError::Invalid(m) if m.contains("bad name")));
    }

    #[tokio::test]
    async fn requests_are_remembered_and_scheduled() {
        let f = fixture(Policies::default());
        claim_targets(&f.core, "a1", &[target("shop", "0 3 * * *")])
            .await
            .expect("claim");
        remember_requests(&f.core, &[target("shop", "0 3 * * *")]).await;
        let t = f
            .core
            .targets
            .get("shop")
            .await
            .expect("read")
            .expect("row");
        assert_eq!(t.schedule.as_deref(), Some("0 3 * * *"));
        let next = f.core.scheduler.next_run("shop").expect("scheduled");
        assert_eq!(next.format("%H:%M:%S").to_string(), "03:00:00");
    }
}
