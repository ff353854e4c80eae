//! What an agent's connection means beyond the live fleet: the targets it
//! names are claimed for it (only targets its certificate names; a target
//! belongs to the agent that served it first, and another certificate naming
//! it takes over only after that agent has been gone for the agent grace),
//! and what it asks for (schedule, retention) is remembered so schedules and
//! retention hold while it is away.

use datasaver_common::proto::TargetInfo;
use datasaver_common::tls::PeerIdentity;

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

/// Claims every target the agent names, or refuses the whole registration.
pub async fn claim_targets(
    core: &Core,
    who: &PeerIdentity,
    targets: &[TargetInfo],
) -> Result<(), JoinError> {
    let agent = who.name.as_str();
    if targets.is_empty() {
        return Err(JoinError::Invalid("agent registered no targets".into()));
    }
    let max = core.policies.max_targets_per_agent;
    if targets.len() > max {
        return Err(JoinError::Invalid(format!(
            "agent {agent} registered {} targets, more than DATASAVER_MAX_TARGETS_PER_AGENT ({max})",
            targets.len()
        )));
    }
    // Every name is checked before anything is claimed: a refused
    // registration claims nothing.
    for t in targets {
        datasaver_common::names::validate_target(&t.name)
            .map_err(|e| JoinError::Invalid(e.to_string()))?;
        if !who.may_serve(&t.name) {
            let allowed = if who.targets.is_empty() {
                "none (re-issue it with `dsctl certs issue --agent NAME --target T`)".to_string()
            } else {
                who.targets.join(", ")
            };
            let msg = format!(
                "certificate of agent {agent} (serial {}) does not name target {}; it may serve: {allowed}",
                who.serial, t.name
            );
            tracing::warn!(%agent, serial = %who.serial, target = %t.name, "agent refused: {msg}");
            core.metrics.refused("agent", "register");
            return Err(JoinError::Refused(msg));
        }
    }
    let expires = chrono::DateTime::from_timestamp(who.not_after, 0)
        .map(crate::repo::record::format_time)
        .unwrap_or_default();
    for t in targets {
        claim_one(core, agent, &t.name).await?;
        if let Err(e) = core
            .targets
            .note_certificate(&t.name, expires.clone())
            .await
        {
            tracing::warn!(target = %t.name, error = %e, "could not record the agent certificate's expiry");
        }
    }
    Ok(())
}

async fn claim_one(core: &Core, agent: &str, target: &str) -> Result<(), JoinError> {
    let now = core.clock.now();
    let stamp = crate::repo::record::format_time(now);
    let unavailable = |e: crate::catalog::CatalogError| JoinError::Unavailable(e.to_string());
    let Some(owner) = core
        .targets
        .claim(target, agent, stamp.clone())
        .await
        .map_err(unavailable)?
    else {
        return Ok(());
    };
    // Another certificate names the same target. It waits while the owner
    // is connected, and takes over once the owner has been gone for the
    // grace: a re-issued certificate or a moved agent then keeps working
    // without anyone editing the catalog.
    let grace = core.policies.agent_grace;
    let refuse = |why: String| {
        let msg = format!("target {target} is served by agent {owner}; agent {agent} {why}");
        tracing::warn!(%agent, %target, %owner, "agent refused: {msg}");
        core.metrics.refused("agent", "register");
        Err(JoinError::Refused(msg))
    };
    let Some(since) = core.fleet.unserved_since(target) else {
        return refuse(format!(
            "may take over once {owner} has been disconnected for {} (DATASAVER_AGENT_GRACE)",
            datasaver_common::config::format_duration(grace)
        ));
    };
    let gone = (now - since).to_std().unwrap_or_default();
    if gone < grace {
        return refuse(format!(
            "may take over in {} ({owner} disconnected {} ago; DATASAVER_AGENT_GRACE is {})",
            datasaver_common::config::format_duration(grace - gone),
            datasaver_common::config::format_duration(gone),
            datasaver_common::config::format_duration(grace)
        ));
    }
    if !core
        .targets
        .transfer(target, &owner, agent, stamp)
        .await
        .map_err(unavailable)?
    {
        return Err(JoinError::Refused(format!(
            "target {target} was just taken over by another agent; agent {agent} may not act for it"
        )));
    }
    tracing::warn!(%agent, %target, previous = %owner, "agent took over the target: its previous agent has been gone longer than DATASAVER_AGENT_GRACE");
    Ok(())
}

/// A target as `dsctl targets` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetView {
    pub name: String,
    /// The agent bound to it (empty: only the config file names it).
    pub agent: String,
    pub connected: bool,
    /// The agent's last contact (RFC 3339): now while connected.
    pub last_contact: Option<String>,
    /// The agent certificate's expiry as last seen (RFC 3339).
    pub cert_expires: Option<String>,
    pub first_seen: String,
}

/// Every target the catalog or the config file knows, with its agent.
pub async fn targets(core: &Core) -> Result<Vec<TargetView>, crate::catalog::CatalogError> {
    let mut out = Vec::new();
    let rows = core.targets.list().await?;
    for r in rows {
        let connected = core.fleet.is_connected(&r.name);
        let last_contact = if connected {
            core.fleet.last_seen(&r.name)
        } else {
            core.fleet.disconnected_since(&r.name)
        }
        .map(crate::rfc3339)
        .or_else(|| (!r.agent.is_empty()).then(|| r.last_seen.clone()));
        out.push(TargetView {
            name: r.name,
            agent: r.agent,
            connected,
            last_contact,
            cert_expires: r.agent_cert_expires,
            first_seen: r.first_seen,
        });
    }
    for name in core.policies.targets.keys() {
        if !out.iter().any(|t| &t.name == name) {
            out.push(TargetView {
                name: name.clone(),
                agent: String::new(),
                connected: false,
                last_contact: None,
                cert_expires: None,
                first_seen: String::new(),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// After a catalog rebuild: each target's owner is the agent of its newest
/// backup (the meta files record it), so ownership survives losing the
/// catalog.
pub async fn restore_owners(core: &Core) {
    let backups = match core.repo.list(None).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "could not read backups to restore target owners");
            return;
        }
    };
    let mut newest: std::collections::BTreeMap<String, (String, String)> = Default::default();
    for b in backups.iter().filter(|b| !b.agent.is_empty()) {
        let at = crate::repo::record::format_time(b.created_at);
        match newest.get(&b.target) {
            Some((_, seen)) if *seen >= at => {}
            _ => {
                newest.insert(b.target.clone(), (b.agent.clone(), at));
            }
        }
    }
    let owners = newest.into_iter().map(|(t, (a, at))| (t, a, at)).collect();
    match core.targets.adopt_owners(owners).await {
        Ok(n) if n > 0 => tracing::info!(
            targets = n,
            "target owners restored from the backups' meta files"
        ),
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "could not restore target owners"),
    }
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
        let drill_schedule = Some(t.drill_schedule.clone()).filter(|s| !s.trim().is_empty());
        if let Some(Err(e)) = drill_schedule
            .as_deref()
            .filter(|s| !crate::policy::is_off(s))
            .map(|s| crate::schedule::cron::Schedule::parse(s, core.policies.tz))
        {
            tracing::warn!(target = %t.name, error = %e, "the agent's DATASAVER_DRILL_SCHEDULE is not a schedule; no drills are scheduled from it");
        }
        let base_schedule = Some(t.base_schedule.clone()).filter(|s| !s.trim().is_empty());
        if let Some(Err(e)) = base_schedule
            .as_deref()
            .filter(|s| !crate::policy::is_off(s))
            .map(|s| crate::schedule::cron::Schedule::parse(s, core.policies.tz))
        {
            tracing::warn!(target = %t.name, error = %e, "the agent's DATASAVER_BASE_SCHEDULE is not a schedule; no base backups are scheduled from it");
        }
        if let Err(e) = core
            .targets
            .set_request(
                &t.name,
                schedule.clone(),
                retention,
                drill_schedule,
                base_schedule,
            )
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

    fn agent(name: &str, targets: &[&str]) -> PeerIdentity {
        PeerIdentity {
            role: datasaver_common::tls::Role::Agent,
            name: name.into(),
            targets: targets.iter().map(|t| t.to_string()).collect(),
            access: datasaver_common::tls::Access::Viewer,
            scopes: vec![],
            serial: "0a".into(),
            not_after: 0,
        }
    }

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
        let a1 = agent("a1", &["shop"]);
        let a2 = agent("a2", &["crm", "sho*"]);
        claim_targets(&f.core, &a1, &[target("shop", "")])
            .await
            .expect("first claim");
        // The same agent again (a restart) is fine.
        claim_targets(&f.core, &a1, &[target("shop", "")])
            .await
            .expect("same agent");
        // Another certificate naming it: refused within the grace (the
        // coordinator just started, so the owner has not been gone long).
        let e = claim_targets(&f.core, &a2, &[target("crm", ""), target("shop", "")])
            .await
            .expect_err("another agent");
        assert!(
            matches!(&e, JoinError::Refused(m) if m.starts_with("target shop is served by agent a1; agent a2 may take over in ")),
            "{e}"
        );
        let e = claim_targets(&f.core, &a2, &[])
            .await
            .expect_err("no targets");
        assert!(matches!(e, JoinError::Invalid(_)));
        let e = claim_targets(&f.core, &a2, &[target("bad name", "")])
            .await
            .expect_err("bad name");
        assert!(matches!(e, JoinError::Invalid(m) if m.contains("bad name")));
    }

    #[tokio::test]
    async fn an_agent_serves_only_what_its_certificate_names() {
        let f = fixture(Policies::default());
        let acme = agent("acme", &["acme-*"]);
        claim_targets(
            &f.core,
            &acme,
            &[target("acme-main", ""), target("acme-crm", "")],
        )
        .await
        .expect("named by pattern");
        let e = claim_targets(
            &f.core,
            &acme,
            &[target("acme-x", ""), target("globex-main", "")],
        )
        .await
        .expect_err("not named");
        assert_eq!(
            e,
            JoinError::Refused(
                "certificate of agent acme (serial 0a) does not name target globex-main; it may serve: acme-*".into()
            )
        );
        // Refused as a whole: nothing of it was claimed.
        assert!(f.core.targets.get("acme-x").await.expect("read").is_none());
        let e = claim_targets(&f.core, &agent("old", &[]), &[target("old", "")])
            .await
            .expect_err("no targets in the certificate");
        assert!(
            matches!(&e, JoinError::Refused(m) if m.contains("--target")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn another_certificate_takes_over_after_the_owner_is_gone_for_the_grace() {
        let f = fixture(Policies::default());
        let old = agent("db1-old", &["shop"]);
        let new = agent("db1-new", &["shop"]);
        claim_targets(&f.core, &old, &[target("shop", "")])
            .await
            .expect("first claim");
        f.clock.advance(chrono::Duration::seconds(10));
        claim_targets(&f.core, &new, &[target("shop", "")])
            .await
            .expect_err("within the grace");
        f.clock.advance(chrono::Duration::seconds(25));
        claim_targets(&f.core, &new, &[target("shop", "")])
            .await
            .expect("after the grace (30 s)");
        let row = f
            .core
            .targets
            .get("shop")
            .await
            .expect("read")
            .expect("row");
        assert_eq!(row.agent, "db1-new");
    }

    #[tokio::test]
    async fn too_many_targets_are_refused() {
        let f = fixture(Policies {
            max_targets_per_agent: 2,
            ..Policies::default()
        });
        let a = agent("a", &["*"]);
        let three = [target("a1", ""), target("a2", ""), target("a3", "")];
        let e = claim_targets(&f.core, &a, &three).await.expect_err("3 > 2");
        assert!(
            matches!(&e, JoinError::Invalid(m) if m.contains("DATASAVER_MAX_TARGETS_PER_AGENT (2)")),
            "{e}"
        );
        claim_targets(&f.core, &a, &three[..2]).await.expect("2");
    }

    #[tokio::test]
    async fn requests_are_remembered_and_scheduled() {
        let f = fixture(Policies::default());
        claim_targets(
            &f.core,
            &agent("a1", &["shop"]),
            &[target("shop", "0 3 * * *")],
        )
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
