//! Who may do what. An operator certificate carries an access level
//! (viewer < operator < admin) and a scope (target patterns); every operator
//! action is checked here, in one table, before the domain is asked. A target
//! outside the caller's scope is treated as if it did not exist. Refusals are
//! one line naming the identity, its role or scope and the action; each is
//! logged with the identity and counted in `/metrics`.

use datasaver_common::tls::{Access, PeerIdentity};

use crate::Core;

/// What an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    ListAgents,
    List,
    Get,
    Health,
    Targets,
    CleanupDryRun,
    Backup,
    Verify,
    Restore,
    Pin,
    Cancel,
    Export,
    RestoreForce,
    RestoreIntoExisting,
    Delete,
    Cleanup,
    RebuildCatalog,
    Tokens,
    Wal,
    Rebind,
}

/// One row of the table: what an action needs and how it is named.
struct Rule {
    /// The least access level that may do it.
    needs: Access,
    /// As said in a refusal: "may not <verb>".
    verb: &'static str,
    /// The label in `datasaver_refusals_total`.
    metric: &'static str,
}

impl Action {
    /// The table: every action's role, refusal wording and metric label.
    fn rule(self) -> Rule {
        use Access::{Admin, Operator, Viewer};
        use Action::*;
        let (needs, verb, metric) = match self {
            ListAgents => (Viewer, "list agents", "list_agents"),
            List => (Viewer, "list backups", "list"),
            Get => (Viewer, "show a backup", "get"),
            Health => (Viewer, "read health", "health"),
            Targets => (Viewer, "list targets", "targets"),
            CleanupDryRun => (Viewer, "preview a cleanup", "cleanup_dry_run"),
            Backup => (Operator, "start a backup", "backup"),
            Verify => (Operator, "verify a backup", "verify"),
            Restore => (Operator, "restore a backup", "restore"),
            Pin => (Operator, "pin or unpin a backup", "pin"),
            Cancel => (Operator, "cancel a job", "cancel"),
            Export => (Operator, "export a backup", "export"),
            RestoreForce => (
                Admin,
                "restore with --force over an existing database",
                "restore_force",
            ),
            RestoreIntoExisting => (
                Admin,
                "restore tables into an existing database",
                "restore_into_existing",
            ),
            Delete => (Admin, "delete a backup", "delete"),
            Cleanup => (Admin, "run a cleanup", "cleanup"),
            RebuildCatalog => (Admin, "rebuild the catalog", "catalog_rebuild"),
            Tokens => (Admin, "create, list or revoke join tokens", "tokens"),
            Wal => (Viewer, "show WAL", "wal"),
            Rebind => (
                Admin,
                "rebind a target to another cluster",
                "targets_rebind",
            ),
        };
        Rule {
            needs,
            verb,
            metric,
        }
    }

    /// The least access level that may do it.
    pub fn needs(self) -> Access {
        self.rule().needs
    }

    /// As said in a refusal: "may not <verb>".
    pub fn verb(self) -> &'static str {
        self.rule().verb
    }

    /// The label in `datasaver_refusals_total`.
    pub fn metric(self) -> &'static str {
        self.rule().metric
    }

    /// Actions over every target at once: only an unscoped certificate may
    /// do them, as a scoped one would reach targets it cannot see.
    fn fleet_wide(self, target: Option<&str>) -> bool {
        // A join token makes agent identities: only whoever may act on the
        // whole fleet hands them out.
        matches!(self, Action::RebuildCatalog | Action::Tokens)
            || (target.is_none() && matches!(self, Action::Cleanup | Action::CleanupDryRun))
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The certificate's role is too low.
    #[error("{0}")]
    Role(String),
    /// The target is outside the certificate's scope.
    #[error("{0}")]
    Scope(String),
    /// Said as the domain says "not found", so a scoped caller cannot tell
    /// an out-of-scope object from a missing one.
    #[error("{0}")]
    Hidden(String),
}

/// May `who` do `action` (on `target`, when the action is about one)?
pub fn check(
    core: &Core,
    who: &PeerIdentity,
    action: Action,
    target: Option<&str>,
) -> Result<(), Denied> {
    if who.access < action.needs() {
        return Err(refuse(
            core,
            who,
            action,
            Denied::Role(format!(
                "operator {} (role {}) may not {}: that needs role {} (issue a certificate with `dsctl certs issue --operator NAME --role {}`)",
                who.name,
                who.access.as_str(),
                action.verb(),
                action.needs().as_str(),
                action.needs().as_str()
            )),
        ));
    }
    if action.fleet_wide(target) && !who.unscoped() {
        return Err(refuse(
            core,
            who,
            action,
            Denied::Scope(format!(
                "operator {} (scope {}) may not {} of every target: that needs scope * (name a target)",
                who.name,
                who.scopes.join(","),
                action.verb()
            )),
        ));
    }
    if let Some(t) = target {
        if !who.in_scope(t) {
            return Err(refuse(
                core,
                who,
                action,
                Denied::Scope(format!(
                    "operator {} (scope {}) may not {}: target {t} is outside its scope",
                    who.name,
                    who.scopes.join(","),
                    action.verb()
                )),
            ));
        }
    }
    Ok(())
}

/// Like [`check`] for an action on an existing object of `target` (a backup
/// by id): out of scope, the caller is told `not_found`, word for word what
/// it would hear if the object did not exist.
pub fn check_object(
    core: &Core,
    who: &PeerIdentity,
    action: Action,
    target: &str,
    not_found: impl FnOnce() -> String,
) -> Result<(), Denied> {
    match check(core, who, action, Some(target)) {
        Err(Denied::Scope(_)) => Err(Denied::Hidden(not_found())),
        other => other,
    }
}

fn refuse(core: &Core, who: &PeerIdentity, action: Action, d: Denied) -> Denied {
    tracing::warn!(operator = %who.name, role = who.access.as_str(), scope = %who.scopes.join(","), serial = %who.serial, action = action.metric(), refusal = %d, "request refused");
    core.metrics.refused(who.access.as_str(), action.metric());
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policies;
    use crate::testing::fixture;

    fn op(access: Access, scopes: &[&str]) -> PeerIdentity {
        PeerIdentity {
            role: datasaver_common::tls::Role::Operator,
            name: "alice".into(),
            targets: vec![],
            access,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            serial: "1f".into(),
            not_after: 0,
        }
    }

    #[test]
    fn each_role_may_do_its_own_actions_and_those_below() {
        use Action::*;
        let all = [
            ListAgents,
            List,
            Get,
            Health,
            Targets,
            CleanupDryRun,
            Backup,
            Verify,
            Restore,
            Pin,
            Cancel,
            RestoreForce,
            RestoreIntoExisting,
            Delete,
            Cleanup,
            RebuildCatalog,
            Tokens,
            Wal,
            Rebind,
        ];
        let f = fixture(Policies::default());
        let allowed = |a: Access| -> Vec<Action> {
            all.iter()
                .copied()
                .filter(|x| check(&f.core, &op(a, &["*"]), *x, Some("t")).is_ok())
                .collect()
        };
        assert_eq!(
            allowed(Access::Viewer),
            [ListAgents, List, Get, Health, Targets, CleanupDryRun, Wal]
        );
        assert_eq!(
            allowed(Access::Operator),
            [
                ListAgents,
                List,
                Get,
                Health,
                Targets,
                CleanupDryRun,
                Backup,
                Verify,
                Restore,
                Pin,
                Cancel,
                Wal
            ]
        );
        assert_eq!(allowed(Access::Admin), all);
        let refused = f.core.metrics.encode();
        assert!(
            refused.contains(r#"datasaver_refusals_total{who="viewer",action="delete"} 1"#),
            "{refused}"
        );
    }

    #[test]
    fn refusals_name_the_identity_its_role_or_scope_and_the_action() {
        let f = fixture(Policies::default());
        let e = check(
            &f.core,
            &op(Access::Viewer, &["*"]),
            Action::Backup,
            Some("t"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "operator alice (role viewer) may not start a backup: that needs role operator (issue a certificate with `dsctl certs issue --operator NAME --role operator`)"
        );
        let scoped = op(Access::Admin, &["acme-*"]);
        assert!(check(&f.core, &scoped, Action::Delete, Some("acme-main")).is_ok());
        let e = check(&f.core, &scoped, Action::Restore, Some("globex-main")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "operator alice (scope acme-*) may not restore a backup: target globex-main is outside its scope"
        );
        let e = check(&f.core, &scoped, Action::RebuildCatalog, None).unwrap_err();
        assert!(matches!(e, Denied::Scope(_)), "{e}");
        let e = check_object(&f.core, &scoped, Action::Get, "globex-main", || {
            "no backup x".into()
        })
        .unwrap_err();
        assert_eq!(e, Denied::Hidden("no backup x".into()));
    }
}
