//! Names of things in the fleet: targets and backup ids (SPEC §3).

use chrono::{DateTime, Utc};

/// Why a target name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid target name {name:?}: {why} (use 1-63 of a-z, 0-9, '_' and '-', starting with a letter or digit)")]
pub struct InvalidTarget {
    /// the refused name
    pub name: String,
    /// what is wrong with it
    pub why: &'static str,
}

/// Checks a target name: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn validate_target(name: &str) -> Result<(), InvalidTarget> {
    let bad = |why| {
        Err(InvalidTarget {
            name: name.to_string(),
            why,
        })
    };
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return bad("it is empty");
    }
    if bytes.len() > 63 {
        return bad("it is longer than 63 characters");
    }
    if !(bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit()) {
        return bad("it must start with a lowercase letter or digit");
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
    {
        return bad("it contains a character other than a-z, 0-9, '_' or '-'");
    }
    Ok(())
}

/// Checks a target pattern from a certificate or the command line: a target
/// name in which `*` stands for any run of characters (`acme-*`, `*`).
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    let ok = !pattern.is_empty()
        && pattern.len() <= 63
        && pattern
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-*".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid target pattern {pattern:?}: use a-z, 0-9, '_', '-' and '*' (any characters), e.g. acme-*"
        ))
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters
/// (including none) and everything else matches itself.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    // Greedy match with backtracking to the last star: linear for the
    // patterns certificates hold, and no regex engine needed.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// What the part holding database `name` of a whole-server backup is called.
pub const DATABASE_PART_PREFIX: &str = "database:";

/// The part of a whole-server backup that holds database `name`.
pub fn database_part(name: &str) -> String {
    format!("{DATABASE_PART_PREFIX}{name}")
}

/// The database a part holds, when it is one of a whole-server backup's.
pub fn part_database(part: &str) -> Option<&str> {
    part.strip_prefix(DATABASE_PART_PREFIX)
        .filter(|n| validate_database_name(n).is_ok())
}

/// Checks a database name as Postgres can hold it: 1-63 bytes, no control
/// characters.
pub fn validate_database_name(name: &str) -> Result<(), String> {
    if !name.is_empty() && name.len() <= 63 && !name.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a database name (1-63 bytes, no control characters)"
        ))
    }
}

/// The base backup id for `target` at `at`: `<target>_<YYYYMMDD>_<HHMMSS>`.
/// Callers append `_2`, `_3`... when that id is already taken.
pub fn backup_id(target: &str, at: DateTime<Utc>) -> String {
    format!("{target}_{}", at.format("%Y%m%d_%H%M%S"))
}

/// Checks that `id` could be a backup id (it is used in object keys, so
/// nothing that could escape a directory is accepted).
pub fn validate_backup_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 100
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && !id.starts_with(['_', '-']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{id:?} is not a backup id (expected <target>_<YYYYMMDD>_<HHMMSS>, e.g. acme-main_20240111_020015)"
        ))
    }
}

/// The name of the database an agent restores into by default.
pub fn default_restore_db(dbname: &str, at: DateTime<Utc>) -> String {
    // Postgres truncates identifiers at 63 bytes; keep the timestamp intact.
    let suffix = format!("_restored_{}", at.format("%Y%m%d_%H%M%S"));
    let mut base: String = dbname.to_string();
    while base.len() + suffix.len() > 63 {
        base.pop();
    }
    format!("{base}{suffix}")
}

/// Whether `name` is accepted as a Postgres object name in a partial
/// restore: 1-63 ASCII letters, digits, `_`, `$` or `-`, taken exactly as
/// stored (case-sensitive, never a pattern), so it reaches `pg_dump` and SQL
/// as that one object.
fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_$-".contains(&b))
}

/// Splits a `--table` argument, `schema.name`, into its two parts.
pub fn parse_table(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('.') {
        Some((schema, name)) if is_object_name(schema) && is_object_name(name) => {
            Ok((schema.to_string(), name.to_string()))
        }
        _ => Err(format!(
            "--table {arg:?} is not accepted: give SCHEMA.NAME (e.g. public.orders), each part 1-63 letters, digits, '_', '$' or '-', exactly as stored (case-sensitive)"
        )),
    }
}

/// Checks a `--schema` argument.
pub fn validate_schema(arg: &str) -> Result<(), String> {
    if is_object_name(arg) {
        Ok(())
    } else {
        Err(format!(
            "--schema {arg:?} is not accepted: give a schema name of 1-63 letters, digits, '_', '$' or '-', exactly as stored (case-sensitive)"
        ))
    }
}

/// Checks a partial restore's request (`--table`, `--schema`,
/// `--into-existing`) against the rest of it: the same rules for dsctl, the
/// coordinator and the agent.
pub fn check_restore_part(
    tables: &[String],
    schemas: &[String],
    into_existing: bool,
    force: bool,
    dry_run: bool,
) -> Result<(), String> {
    for t in tables {
        parse_table(t)?;
    }
    for s in schemas {
        validate_schema(s)?;
    }
    let partial = !tables.is_empty() || !schemas.is_empty();
    if into_existing && !partial {
        return Err(
            "--into-existing adds tables or schemas to a database: give --table SCHEMA.NAME or --schema NAME"
                .into(),
        );
    }
    if partial && force {
        return Err("--force replaces a whole database and cannot be combined with --table or --schema; use --into-existing to add them to an existing database".into());
    }
    if partial && dry_run {
        return Err(
            "--dry-run checks the whole archive and cannot be combined with --table or --schema"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    #[test]
    fn database_parts_name_their_database() {
        assert_eq!(database_part("shop"), "database:shop");
        assert_eq!(part_database("database:my db"), Some("my db"));
        assert_eq!(part_database("globals"), None);
        assert_eq!(part_database("database:"), None);
        assert!(validate_database_name(&"d".repeat(64)).is_err());
        assert!(validate_database_name("a\nb").is_err());
    }

    #[test]
    fn partial_restore_names() {
        assert_eq!(
            parse_table("public.orders"),
            Ok(("public".into(), "orders".into()))
        );
        assert_eq!(
            parse_table("Sales.Order-Items$2"),
            Ok(("Sales".into(), "Order-Items$2".into()))
        );
        for bad in [
            "orders",
            ".orders",
            "public.",
            "a.b.c",
            "public.ord*",
            "public.\"x\"",
            "public.a b",
            "public.a;drop",
            &format!("public.{}", "x".repeat(64)),
        ] {
            let e = parse_table(bad).unwrap_err();
            assert!(e.starts_with("--table"), "{bad}: {e}");
        }
        assert!(validate_schema("sales").is_ok());
        for bad in ["", "a.b", "s*", "a'b"] {
            assert!(validate_schema(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "acme-main"));
        assert!(pattern_matches("acme-*", "acme-main"));
        assert!(pattern_matches("acme-*", "acme-"));
        assert!(!pattern_matches("acme-*", "acme"));
        assert!(!pattern_matches("acme-*", "globex-main"));
        assert!(pattern_matches("acme-main", "acme-main"));
        assert!(!pattern_matches("acme-main", "acme-main2"));
        assert!(pattern_matches("*-main", "globex-main"));
        assert!(pattern_matches("a*b*c", "axxbyyc"));
        assert!(!pattern_matches("a*b*c", "axxbyy"));
        assert!(validate_pattern("acme-*").is_ok());
        assert!(validate_pattern("").is_err());
        assert!(validate_pattern("Acme").is_err());
        assert!(validate_pattern("a/b").is_err());
    }

    proptest! {
        #[test]
        fn a_pattern_without_stars_matches_only_itself(a in "[a-z0-9_-]{1,20}", b in "[a-z0-9_-]{1,20}") {
            prop_assert_eq!(pattern_matches(&a, &b), a == b);
            prop_assert!(pattern_matches("*", &b));
        }

        #[test]
        fn a_prefix_pattern_matches_exactly_the_names_with_that_prefix(p in "[a-z0-9_-]{0,8}", n in "[a-z0-9_-]{1,20}") {
            prop_assert_eq!(pattern_matches(&format!("{p}*"), &n), n.starts_with(&p));
        }
    }

    #[test]
    fn targets() {
        for ok in ["acme-main", "a", "0db", "x_y-z", &"a".repeat(63)] {
            assert_eq!(validate_target(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Acme", "-a", "_a", "a b", "a/b", "ä", &"a".repeat(64)] {
            let e = validate_target(bad).unwrap_err();
            assert!(e.to_string().contains("invalid target name"), "{e}");
        }
    }

    #[test]
    fn ids() {
        let at = Utc.with_ymd_and_hms(2024, 1, 11, 2, 0, 15).unwrap();
        let id = backup_id("acme-main", at);
        assert_eq!(id, "acme-main_20240111_020015");
        assert!(validate_backup_id(&id).is_ok());
        assert!(validate_backup_id("../etc").is_err());
        assert_eq!(
            default_restore_db("app", at),
            "app_restored_20240111_020015"
        );
        assert!(default_restore_db(&"d".repeat(70), at).len() <= 63);
    }
}
