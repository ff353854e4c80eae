//! The cluster's globals in a backup (`pg_dumpall --globals-only`: roles,
//! their attributes and passwords, role settings, role memberships), and
//! what a restore takes from them: the roles the archive needs that the
//! server lacks, with the roles connected to them by membership (a login
//! role that reads through a group), created as they were. An existing role
//! is never altered: no password, attribute, setting or membership of a
//! role the server already has is touched. Pure: parsing and planning only;
//! the statements hold password hashes and are never logged.

use std::collections::{BTreeMap, BTreeSet};

/// What a globals script says about roles.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Globals {
    /// Each role's own statements (CREATE ROLE, ALTER ROLE ... WITH / SET,
    /// COMMENT ON ROLE), in script order.
    pub roles: BTreeMap<String, Vec<String>>,
    pub memberships: Vec<Membership>,
}

/// `GRANT granted TO member ...`.
#[derive(Debug, PartialEq, Eq)]
pub struct Membership {
    pub granted: String,
    pub member: String,
    /// The statement without its `GRANTED BY` clause (the grantor of the
    /// old server may not exist on the new one).
    pub sql: String,
}

/// One identifier at the start of `s` (quoted or not), and the rest.
fn ident(s: &str) -> Option<(String, &str)> {
    if let Some(rest) = s.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if rest[i + 1..].starts_with('"') {
                    name.push('"');
                    chars.next();
                } else {
                    return Some((name, &rest[i + 1..]));
                }
            } else {
                name.push(c);
            }
        }
        None
    } else {
        let end = s.find([' ', ';']).unwrap_or(s.len());
        (end > 0).then(|| (s[..end].to_string(), &s[end..]))
    }
}

/// Reads the role statements of a `pg_dumpall --globals-only` script.
/// Statements are one per line there; anything else (SET, tablespaces,
/// comments, a statement spread over lines) is left out.
pub fn parse(script: &str) -> Globals {
    let mut g = Globals::default();
    for line in script.lines() {
        let line = line.trim_end();
        if !line.ends_with(';') {
            continue;
        }
        let role_of = |prefix: &str| line.strip_prefix(prefix).and_then(ident);
        if let Some((role, rest)) = role_of("CREATE ROLE ") {
            if rest == ";" {
                g.roles.entry(role).or_default().push(line.to_string());
            }
        } else if let Some((role, _)) = role_of("ALTER ROLE ") {
            if let Some(stmts) = g.roles.get_mut(&role) {
                stmts.push(line.to_string());
            }
        } else if let Some((role, rest)) = role_of("COMMENT ON ROLE ") {
            if rest.starts_with(" IS ") {
                if let Some(stmts) = g.roles.get_mut(&role) {
                    stmts.push(line.to_string());
                }
            }
        } else if let Some((granted, rest)) = role_of("GRANT ") {
            let Some((member, _)) = rest.strip_prefix(" TO ").and_then(ident) else {
                continue;
            };
            let sql = match line.find(" GRANTED BY ") {
                Some(i) => format!("{};", &line[..i]),
                None => line.to_string(),
            };
            g.memberships.push(Membership {
                granted,
                member,
                sql,
            });
        }
    }
    g
}

/// What a restore creates from the globals.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The roles to create, sorted.
    pub create: Vec<String>,
    /// One transaction: the roles, then the memberships of created roles.
    pub script: String,
}

/// The roles of `g` connected by membership to `needed` (the roles the
/// archive names) that are not in `existing`, and the script creating them.
pub fn plan(g: &Globals, needed: &[String], existing: &[String]) -> Plan {
    let existing: BTreeSet<&str> = existing.iter().map(String::as_str).collect();
    let mut component: BTreeSet<&str> = needed.iter().map(String::as_str).collect();
    loop {
        let before = component.len();
        for m in &g.memberships {
            if component.contains(m.granted.as_str()) || component.contains(m.member.as_str()) {
                component.insert(&m.granted);
                component.insert(&m.member);
            }
        }
        if component.len() == before {
            break;
        }
    }
    let create: Vec<String> = component
        .into_iter()
        .filter(|r| !existing.contains(r) && g.roles.contains_key(*r))
        .map(String::from)
        .collect();
    if create.is_empty() {
        return Plan::default();
    }
    let mut script = String::from("BEGIN;\n");
    for r in &create {
        for st in &g.roles[r] {
            script.push_str(st);
            script.push('\n');
        }
    }
    let will_exist = |r: &str| existing.contains(r) || create.iter().any(|c| c == r);
    for m in &g.memberships {
        if create.contains(&m.member) && will_exist(&m.granted) {
            script.push_str(&m.sql);
            script.push('\n');
        }
    }
    script.push_str("COMMIT;\n");
    Plan { create, script }
}

/// `s` with every quoted string after `PASSWORD` replaced, for an error
/// that quotes a statement back.
pub fn redact_passwords(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("PASSWORD '") {
        out.push_str(&rest[..i + "PASSWORD '".len()]);
        rest = &rest[i + "PASSWORD '".len()..];
        out.push_str("[redacted]'");
        rest = match rest.find('\'') {
            Some(j) => &rest[j + 1..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `pg_dumpall --globals-only` 15 and 17 write (abridged).
    const SCRIPT: &str = r#"--
-- PostgreSQL database cluster dump
--

SET default_transaction_read_only = off;

--
-- Roles
--

CREATE ROLE app_owner;
ALTER ROLE app_owner WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN NOREPLICATION NOBYPASSRLS PASSWORD 'SCRAM-SHA-256$4096:abc=';
CREATE ROLE app_reader;
ALTER ROLE app_reader WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB NOLOGIN NOREPLICATION NOBYPASSRLS;
CREATE ROLE "Report Bot";
ALTER ROLE "Report Bot" WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN NOREPLICATION NOBYPASSRLS;
COMMENT ON ROLE "Report Bot" IS 'reads the dashboards';
CREATE ROLE other_app;
ALTER ROLE other_app WITH LOGIN;
CREATE ROLE postgres;
ALTER ROLE postgres WITH SUPERUSER INHERIT CREATEROLE CREATEDB LOGIN REPLICATION BYPASSRLS;

--
-- User Configurations
--

ALTER ROLE app_owner SET search_path TO 'app', 'public';

--
-- Role memberships
--

GRANT app_reader TO "Report Bot" WITH INHERIT TRUE GRANTED BY postgres;
GRANT app_reader TO postgres GRANTED BY postgres;

CREATE TABLESPACE fast OWNER postgres LOCATION '/srv/fast';
"#;

    #[test]
    fn the_roles_a_restore_needs_are_created_with_their_members_and_nothing_else() {
        let g = parse(SCRIPT);
        assert_eq!(
            g.roles.keys().collect::<Vec<_>>(),
            [
                "Report Bot",
                "app_owner",
                "app_reader",
                "other_app",
                "postgres"
            ]
        );
        assert_eq!(g.roles["app_owner"].len(), 3);
        assert_eq!(
            g.memberships[0],
            Membership {
                granted: "app_reader".into(),
                member: "Report Bot".into(),
                sql: r#"GRANT app_reader TO "Report Bot" WITH INHERIT TRUE;"#.into(),
            }
        );
        // A new server: only postgres exists. The archive names app_owner
        // and app_reader; the bot reads through app_reader. other_app has
        // nothing to do with this database.
        let p = plan(
            &g,
            &["app_owner".into(), "app_reader".into()],
            &["postgres".into()],
        );
        assert_eq!(p.create, ["Report Bot", "app_owner", "app_reader"]);
        assert!(
            p.script.starts_with("BEGIN;\nCREATE ROLE \"Report Bot\";"),
            "{}",
            p.script
        );
        assert!(p.script.contains("PASSWORD 'SCRAM-SHA-256$4096:abc='"));
        assert!(p.script.contains("ALTER ROLE app_owner SET search_path"));
        assert!(p.script.contains("COMMENT ON ROLE \"Report Bot\""));
        assert!(p
            .script
            .contains("GRANT app_reader TO \"Report Bot\" WITH INHERIT TRUE;\n"));
        // postgres exists: neither altered nor given a membership.
        assert!(!p.script.contains("ALTER ROLE postgres"), "{}", p.script);
        assert!(!p.script.contains("TO postgres"), "{}", p.script);
        assert!(!p.script.contains("other_app") && !p.script.contains("TABLESPACE"));
        assert!(p.script.ends_with("COMMIT;\n"));
    }

    #[test]
    fn nothing_is_planned_when_the_roles_exist() {
        let g = parse(SCRIPT);
        let all: Vec<String> = g.roles.keys().cloned().collect();
        assert_eq!(plan(&g, &["app_owner".into()], &all), Plan::default());
        // A role the globals do not define is not invented.
        assert_eq!(plan(&g, &["ghost".into()], &[]), Plan::default());
    }

    #[test]
    fn identifiers_and_redaction() {
        assert_eq!(ident(r#""a ""b"" c";"#), Some((r#"a "b" c"#.into(), ";")));
        assert_eq!(ident("abc WITH"), Some(("abc".into(), " WITH")));
        assert_eq!(ident(r#""open"#), None);
        assert_eq!(
            redact_passwords("LINE 1: ALTER ROLE a WITH LOGIN PASSWORD 'SCRAM-SHA-256$x' VALID"),
            "LINE 1: ALTER ROLE a WITH LOGIN PASSWORD '[redacted]' VALID"
        );
        assert_eq!(redact_passwords("no secret"), "no secret");
    }
}
