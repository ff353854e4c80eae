//! Everything the agent says to Postgres: the client programs it drives
//! (`pg_dump`, `pg_restore`, `psql`) as typed argv builders, version checks,
//! and every SQL statement it runs, by name. Identifiers are quoted with
//! [`quote_ident`]; values reach SQL only as psql variables (`:'name'`),
//! never by interpolation. Passwords go to children through `PGPASSWORD` in
//! their environment only.

use datasaver_common::wal::Lsn;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::config::DbConn;

#[derive(Debug, Clone)]
pub struct PgTools {
    pub bin_dir: PathBuf,
}

/// A version like 15.18 → (15, "15.18").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgVersion {
    pub major: u32,
    pub text: String,
}

/// The last lines of a child's stderr, trimmed to one readable line.
pub fn summarize_stderr(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let tail = if lines.len() > 3 {
        &lines[lines.len() - 3..]
    } else {
        &lines[..]
    };
    let s = tail.join(" | ");
    if s.len() > 600 {
        let mut cut = 600;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &s[..cut])
    } else {
        s
    }
}

/// Postgres's own first error in a client's stderr (pg_restore, psql):
/// the first line that reports an error and up to two lines after it (the
/// command, detail or hint), joined with " | " and capped. With
/// `--single-transaction` pg_restore stops at that first error; later lines
/// ("errors ignored on restore", the rollback) only repeat that it failed.
/// `None` when no line reports an error.
pub fn postgres_errors(stderr: &str) -> Option<String> {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let first = lines
        .iter()
        .position(|l| l.contains("ERROR:") || l.contains("FATAL:") || l.contains(": error:"))?;
    let follows = |l: &&&str| {
        let l = l
            .trim_start_matches("pg_restore: ")
            .trim_start_matches("psql: ");
        [
            "Command was:",
            "DETAIL:",
            "HINT:",
            "LINE ",
            "detail:",
            "hint:",
            "CONTEXT:",
        ]
        .iter()
        .any(|p| l.starts_with(p))
    };
    let mut picked = vec![lines[first]];
    picked.extend(lines[first + 1..].iter().take_while(follows).take(2));
    Some(summarize_stderr(&picked.join("\n")))
}

/// pg_dump's failure to lock a table within `--lock-wait-timeout`, from its
/// stderr (`summary`: [`summarize_stderr`]'s line), as one line naming the
/// table and the setting; `None` for any other failure. pg_dump 15 says
/// "canceling statement due to statement timeout ... Query was: LOCK TABLE
/// public.x IN ACCESS SHARE MODE"; servers with lock_timeout say "lock
/// timeout", NOWAIT says "could not obtain lock on relation".
pub fn lock_wait_failure(summary: &str, lock_wait: Duration) -> Option<String> {
    let table = summary
        .split("LOCK TABLE ")
        .nth(1)
        .and_then(|rest| rest.split(" IN ").next())
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let timed_out = ["statement timeout", "lock timeout", "could not obtain lock"]
        .iter()
        .any(|m| summary.contains(m));
    if !timed_out || (table.is_none() && !summary.contains("could not obtain lock")) {
        return None;
    }
    Some(format!(
        "pg_dump could not lock table {} within {} (DATASAVER_LOCK_WAIT_TIMEOUT): another session holds a conflicting lock (see pg_locks); pg_dump said: {summary}",
        table.unwrap_or("(unknown)"),
        datasaver_common::config::format_duration(lock_wait)
    ))
}

/// A name the server sent hex-encoded (UTF-8 bytes).
fn decode_hex_name(hex: &str) -> Result<String, String> {
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| format!("unexpected database name reply {hex:?}"))?;
    String::from_utf8(bytes).map_err(|_| format!("database name {hex:?} is not UTF-8"))
}

/// The database admin statements about database `name` (create, drop,
/// rename) run from: the agent's own, unless that is `name`, which is
/// about to be dropped or replaced.
pub fn admin_db(db: &DbConn, name: &str) -> String {
    match (name == db.dbname, name == "postgres") {
        (false, _) => db.dbname.clone(),
        (true, false) => "postgres".into(),
        (true, true) => "template1".into(),
    }
}

/// Parses `pg_dump (PostgreSQL) 15.18 (Debian ...)`.
pub fn parse_tool_version(out: &str) -> Option<PgVersion> {
    let v = out.split_whitespace().nth(2)?;
    let major = v.split(['.', 'b', 'r']).next()?.parse().ok()?;
    Some(PgVersion {
        major,
        text: v.to_string(),
    })
}

/// The major version in a version string as recorded with a backup
/// ("15.10", "17.2 (Debian 17.2-1)", "16beta1"); `None` when there is none
/// (an old backup) or it cannot be read.
pub fn major_of(v: &str) -> Option<u32> {
    let digits: String = v
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok().filter(|m| *m >= 10)
}

/// Why a backup cannot be restored onto `server` with `pg_restore`, checked
/// before anything is created: a server older than the one the backup came
/// from (`source_server`) cannot load what a newer one dumped, and a
/// pg_restore older than the archive's pg_dump (`archive_pg_dump`) cannot
/// read it. `None` when both fit or a version was not recorded.
pub fn restore_version_problem(
    backup_id: &str,
    source_server: &str,
    archive_pg_dump: &str,
    server: &PgVersion,
    pg_restore: &PgVersion,
) -> Option<String> {
    if let Some(src) = major_of(source_server) {
        if server.major < src {
            return Some(format!(
                "backup {backup_id} comes from PostgreSQL {source_server}, and this server runs PostgreSQL {} (older): restore onto PostgreSQL {src} or newer; nothing was changed",
                server.text
            ));
        }
    }
    if let Some(dump) = major_of(archive_pg_dump) {
        if pg_restore.major < dump {
            return Some(format!(
                "backup {backup_id} was written by pg_dump {archive_pg_dump}, and the agent's pg_restore is {} (older, it cannot read the archive): install pg_restore {dump} or newer and point DATASAVER_PG_BIN_DIR at it; nothing was changed",
                pg_restore.text
            ));
        }
    }
    None
}

/// What of `needs` is not in `have`, in order; `None` when nothing is.
fn not_in<'a>(needs: &'a [String], have: &[String]) -> Option<Vec<&'a str>> {
    let missing: Vec<&str> = needs
        .iter()
        .filter(|n| !have.contains(n))
        .map(String::as_str)
        .collect();
    (!missing.is_empty()).then_some(missing)
}

/// Why a backup cannot be restored onto a server offering `available`
/// extensions: the ones it `needs` that the server lacks, named, with what
/// to do. `None` when nothing is missing.
pub fn missing_extensions(
    backup_id: &str,
    needs: &[String],
    available: &[String],
    server: &PgVersion,
) -> Option<String> {
    let missing = not_in(needs, available)?;
    Some(format!(
        "backup {backup_id} uses extension{} {} that this server (PostgreSQL {}) does not have: install {} on the server (its PostgreSQL {} package) or restore onto a server that has {}; nothing was changed",
        if missing.len() == 1 { "" } else { "s" },
        missing.join(", "),
        server.text,
        if missing.len() == 1 { "it" } else { "them" },
        server.major,
        if missing.len() == 1 { "it" } else { "them" },
    ))
}

/// Why a backup cannot be restored onto a server with `existing` roles: the
/// ones the archive `needs` (owners, grantees) that it lacks, named, with
/// what to do. `None` when none is missing.
pub fn missing_roles(backup_id: &str, needs: &[String], existing: &[String]) -> Option<String> {
    let missing = not_in(needs, existing)?;
    let create: Vec<String> = missing
        .iter()
        .map(|r| format!("CREATE ROLE {};", quote_ident(r)))
        .collect();
    Some(format!(
        "backup {backup_id} needs role{} {} that this server does not have (a pg_dump archive names the roles that own and are granted objects but does not create them): create {} first ({}; with LOGIN and a password where the application logs in), then restore again; nothing was changed",
        if missing.len() == 1 { "" } else { "s" },
        missing.join(", "),
        if missing.len() == 1 { "it" } else { "them" },
        create.join(" "),
    ))
}

/// Quotes an identifier for SQL.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A SQL script and the values it reads as psql variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub sql: String,
    pub vars: Vec<(&'static str, String)>,
}

impl Statement {
    fn new(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            vars: Vec::new(),
        }
    }

    fn var(mut self, name: &'static str, value: &str) -> Self {
        self.vars.push((name, value.to_string()));
        self
    }
}

/// How a database is created (owner, encoding, locale, its own privileges;
/// empty fields: the server's default), as recorded with a backup.
pub use datasaver_common::proto::{DatabaseGrant, DatabaseSetting, DatabaseShape as Shape};

/// The statements, built without a connection so they can be checked.
pub mod sql {
    use super::{quote_ident, DatabaseGrant, Shape, Statement};

    /// `server_version_num|server_version`.
    pub fn server_version() -> Statement {
        Statement::new(
            "SELECT current_setting('server_version_num') || '|' || current_setting('server_version');",
        )
    }

    /// The extensions installed in the database connected to, one per line.
    pub fn extensions() -> Statement {
        Statement::new("SELECT extname FROM pg_extension ORDER BY 1;")
    }

    /// The roles the connected database's objects name, one per line: the
    /// database's owner and grantees, the owners of schemas, relations,
    /// functions and types outside the system schemas, the grantees of
    /// their privileges, and default privileges. A pg_dump archive says
    /// `OWNER TO` and `GRANT ... TO` these but does not create them. Built-in
    /// `pg_*` roles exist on any server as new as the source.
    pub fn referenced_roles() -> Statement {
        Statement::new(
            "WITH user_ns AS (
                SELECT oid, nspowner, nspacl FROM pg_namespace
                 WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
             ), used(oid) AS (
                SELECT datdba FROM pg_database WHERE datname = current_database()
                UNION SELECT (aclexplode(datacl)).grantee FROM pg_database
                      WHERE datname = current_database() AND datacl IS NOT NULL
                UNION SELECT nspowner FROM user_ns
                UNION SELECT (aclexplode(nspacl)).grantee FROM user_ns WHERE nspacl IS NOT NULL
                UNION SELECT relowner FROM pg_class WHERE relnamespace IN (SELECT oid FROM user_ns)
                UNION SELECT (aclexplode(relacl)).grantee FROM pg_class
                      WHERE relacl IS NOT NULL AND relnamespace IN (SELECT oid FROM user_ns)
                UNION SELECT (aclexplode(attacl)).grantee FROM pg_attribute a
                      JOIN pg_class c ON c.oid = a.attrelid
                      WHERE attacl IS NOT NULL AND c.relnamespace IN (SELECT oid FROM user_ns)
                UNION SELECT proowner FROM pg_proc WHERE pronamespace IN (SELECT oid FROM user_ns)
                UNION SELECT (aclexplode(proacl)).grantee FROM pg_proc
                      WHERE proacl IS NOT NULL AND pronamespace IN (SELECT oid FROM user_ns)
                UNION SELECT typowner FROM pg_type WHERE typnamespace IN (SELECT oid FROM user_ns)
                UNION SELECT defaclrole FROM pg_default_acl
                UNION SELECT (aclexplode(defaclacl)).grantee FROM pg_default_acl
             )
             SELECT rolname FROM pg_roles WHERE oid IN (SELECT oid FROM used)
                AND rolname NOT LIKE 'pg\\_%' ORDER BY 1;",
        )
    }

    /// `owner|encoding|collate|ctype|explicit` of the connected database,
    /// then one `grantee|privilege|grantable` line per privilege on it (an
    /// empty grantee is PUBLIC).
    pub fn database_shape() -> Statement {
        Statement::new(
            "SELECT pg_get_userbyid(datdba) || '|' || pg_encoding_to_char(encoding) || '|' || datcollate
                    || '|' || datctype || '|' || (datacl IS NOT NULL)::text
               FROM pg_database WHERE datname = current_database();
             SELECT coalesce(r.rolname, '') || '|' || a.privilege_type || '|' || a.is_grantable::text
               FROM pg_database d CROSS JOIN LATERAL aclexplode(d.datacl) a
               LEFT JOIN pg_roles r ON r.oid = a.grantee
              WHERE d.datname = current_database()
              ORDER BY 1;",
        )
    }

    /// The database's settings (`ALTER DATABASE ... SET`, also per role),
    /// as one line of JSON: `[{"role": "", "config": "name=value"}, ...]`.
    pub fn database_settings() -> Statement {
        Statement::new(
            "SELECT coalesce(json_agg(json_build_object('role', coalesce(r.rolname, ''), 'config', c)
                                      ORDER BY coalesce(r.rolname, ''), c), '[]')
               FROM pg_db_role_setting s
               LEFT JOIN pg_roles r ON r.oid = s.setrole
               CROSS JOIN LATERAL unnest(s.setconfig) c
              WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database());",
        )
    }

    /// `E'...'`: a string literal whatever `standard_conforming_strings` is.
    fn literal_e(s: &str) -> String {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    }

    /// Settings whose value is a list, each item quoted on its own (as
    /// pg_dump does): one quoted string would be one item.
    const LIST_SETTINGS: &[&str] = &[
        "search_path",
        "temp_tablespaces",
        "session_preload_libraries",
        "shared_preload_libraries",
        "local_preload_libraries",
        "unix_socket_directories",
    ];

    /// `name TO value` for a `name=value` setting as Postgres keeps it;
    /// `None` for a name that is not a setting name.
    pub fn setting_clause(config: &str) -> Option<String> {
        let (name, value) = config.split_once('=')?;
        let ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
        if !ok {
            return None;
        }
        if !LIST_SETTINGS.contains(&name.to_ascii_lowercase().as_str()) {
            return Some(format!("{name} TO {}", literal_e(value)));
        }
        // Items split at commas outside double quotes; quoted ones lose
        // their quotes ("" inside is one ").
        let mut items = Vec::new();
        let (mut cur, mut quoted, mut chars) = (String::new(), false, value.chars().peekable());
        while let Some(c) = chars.next() {
            match c {
                '"' if quoted && chars.peek() == Some(&'"') => {
                    cur.push('"');
                    chars.next();
                }
                '"' => quoted = !quoted,
                ',' if !quoted => items.push(std::mem::take(&mut cur)),
                c if c.is_whitespace() && !quoted && cur.is_empty() => {}
                c => cur.push(c),
            }
        }
        items.push(cur);
        let items: Vec<String> = items.iter().map(|i| literal_e(i.trim_end())).collect();
        Some(format!("{name} TO {}", items.join(", ")))
    }

    /// The database's privileges as recorded: PUBLIC's defaults revoked,
    /// then each grant. Privileges outside CONNECT/CREATE/TEMPORARY are
    /// not database privileges and are skipped.
    pub fn database_grants(name: &str, grants: &[DatabaseGrant]) -> Statement {
        let mut sql = format!("REVOKE ALL ON DATABASE {} FROM PUBLIC;", quote_ident(name));
        for g in grants {
            let privilege = match g.privilege.as_str() {
                p @ ("CONNECT" | "CREATE" | "TEMPORARY") => p,
                _ => continue,
            };
            let to = if g.grantee.is_empty() {
                "PUBLIC".to_string()
            } else {
                quote_ident(&g.grantee)
            };
            sql.push_str(&format!(
                "\nGRANT {privilege} ON DATABASE {} TO {to}{};",
                quote_ident(name),
                if g.grantable {
                    " WITH GRANT OPTION"
                } else {
                    ""
                }
            ));
        }
        Statement::new(sql)
    }

    /// `t` when the connected role may create a database owned by `owner`
    /// (a superuser, or a member of that role).
    pub fn may_own_as(owner: &str) -> Statement {
        Statement::new(
            "SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                 OR pg_has_role(current_user, :'owner', 'MEMBER');",
        )
        .var("owner", owner)
    }

    /// `CREATE DATABASE name` shaped like the original: owner (when given),
    /// encoding and locale (when recorded), from template0 so any encoding
    /// and locale the server supports can be used.
    pub fn create_database_like(name: &str, shape: &Shape) -> Statement {
        let mut sql = format!("CREATE DATABASE {} TEMPLATE template0", quote_ident(name));
        let mut st = Statement::new(String::new());
        if !shape.owner.is_empty() {
            sql.push_str(" OWNER :\"owner\"");
            st = st.var("owner", &shape.owner);
        }
        if !shape.encoding.is_empty() {
            sql.push_str(" ENCODING :'encoding'");
            st = st.var("encoding", &shape.encoding);
        }
        if !shape.collate.is_empty() {
            sql.push_str(" LC_COLLATE :'collate'");
            st = st.var("collate", &shape.collate);
        }
        if !shape.ctype.is_empty() {
            sql.push_str(" LC_CTYPE :'ctype'");
            st = st.var("ctype", &shape.ctype);
        }
        sql.push(';');
        st.sql = sql;
        st
    }

    /// The databases a whole-server backup may take, one per line: every
    /// database but the templates and those that refuse connections.
    /// Hex-encoded, so a name with spaces at its ends (or any other byte)
    /// comes back exactly.
    pub fn databases() -> Statement {
        Statement::new(
            "SELECT encode(convert_to(datname, 'UTF8'), 'hex') FROM pg_database WHERE NOT datistemplate AND datallowconn ORDER BY datname;",
        )
    }

    /// Every role on the server, one per line.
    pub fn roles() -> Statement {
        Statement::new("SELECT rolname FROM pg_roles ORDER BY 1;")
    }

    /// `t` when the connected role is a superuser.
    pub fn is_superuser() -> Statement {
        Statement::new("SELECT rolsuper FROM pg_roles WHERE rolname = current_user;")
    }

    /// The server's WAL position, clock (Unix microseconds) and timeline,
    /// on one line separated by `|`: the bounds of a base backup.
    pub fn wal_point() -> Statement {
        Statement::new(
            "SELECT pg_current_wal_lsn(), (extract(epoch FROM clock_timestamp()) * 1000000)::bigint, \
             timeline_id FROM pg_control_checkpoint();",
        )
    }

    /// A replication slot's `wal_status` (`reserved`, `extended`,
    /// `unreserved`, `lost`; empty when unknown).
    pub fn slot_status(slot: &str) -> Statement {
        Statement::new(
            "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = :'slot';",
        )
        .var("slot", slot)
    }

    /// Tablespaces besides the two every cluster has, one per line.
    pub fn extra_tablespaces() -> Statement {
        Statement::new(
            "SELECT spcname FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY 1;",
        )
    }

    /// The server's `system_identifier`.
    pub fn system_identifier() -> Statement {
        Statement::new("SELECT system_identifier FROM pg_control_system();")
    }

    /// The extensions the server could install, one per line.
    pub fn available_extensions() -> Statement {
        Statement::new("SELECT name FROM pg_available_extensions ORDER BY 1;")
    }

    /// Answers at all.
    pub fn ping() -> Statement {
        Statement::new("SELECT 1;")
    }

    /// `1` when a database `name` exists, else `0`.
    pub fn database_exists(name: &str) -> Statement {
        Statement::new("SELECT count(*) FROM pg_database WHERE datname = :'name';")
            .var("name", name)
    }

    /// Counts, in the database connected to, what a restore would collide
    /// with: user relations, functions and large objects.
    pub fn user_objects() -> Statement {
        Statement::new(
            "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                        AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%')
                  + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                      WHERE n.nspname NOT IN ('pg_catalog', 'information_schema'))
                  + (SELECT count(*) FROM pg_largeobject_metadata);",
        )
    }

    /// Drops `name` if it exists, ending its sessions.
    pub fn drop_database(name: &str) -> Statement {
        Statement::new(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE);",
            quote_ident(name)
        ))
    }

    /// `'text'` with quotes doubled. Only for names already validated
    /// (`names::parse_table`), in lists psql variables cannot carry.
    fn literal(s: &str) -> String {
        format!("'{}'", s.replace('\'', "''"))
    }

    /// SQL true when the relation `nsp`.`rel` is in the selection (one of
    /// `tables`, or in one of `schemas`).
    fn selected(nsp: &str, rel: &str, tables: &[(String, String)], schemas: &[String]) -> String {
        let mut any = Vec::new();
        if !tables.is_empty() {
            let pairs: Vec<String> = tables
                .iter()
                .map(|(s, t)| format!("({}, {})", literal(s), literal(t)))
                .collect();
            any.push(format!("({nsp}, {rel}) IN ({})", pairs.join(", ")));
        }
        if !schemas.is_empty() {
            let names: Vec<String> = schemas.iter().map(|s| literal(s)).collect();
            any.push(format!("{nsp} IN ({})", names.join(", ")));
        }
        if any.is_empty() {
            "false".into()
        } else {
            format!("({})", any.join(" OR "))
        }
    }

    /// Of `tables` and `schemas`, those the connected database lacks, one
    /// per line (`table schema.name`, `schema NAME`).
    pub fn missing_part(tables: &[(String, String)], schemas: &[String]) -> Statement {
        presence(
            tables,
            schemas,
            false,
            "table ",
            "AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
        )
    }

    /// The rows of each of `tables`, one count per line in their order.
    pub fn row_counts(tables: &[(String, String)]) -> Statement {
        let parts: Vec<String> = tables
            .iter()
            .enumerate()
            .map(|(i, (s, t))| {
                format!(
                    "SELECT {i} AS i, (SELECT count(*) FROM ONLY {}.{}) AS n",
                    quote_ident(s),
                    quote_ident(t)
                )
            })
            .collect();
        Statement::new(format!(
            "SELECT n FROM ({}) c ORDER BY i;",
            parts.join("\nUNION ALL ")
        ))
    }

    /// What a restore of `tables` creates besides schemas: each table, its
    /// indexes and the sequences it owns (serial and identity columns), as
    /// `kind|schema|name`, one per line.
    pub fn part_relations(tables: &[(String, String)]) -> Statement {
        let sel = selected("n.nspname", "c.relname", tables, &[]);
        Statement::new(format!(
            "WITH t AS (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {sel})
             SELECT CASE c.relkind WHEN 'i' THEN 'index' WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view' ELSE 'table' END,
                    n.nspname, c.relname
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid IN (SELECT oid FROM t)
                 OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid IN (SELECT oid FROM t))
                 OR (c.relkind = 'S' AND c.oid IN (
                        SELECT objid FROM pg_depend
                         WHERE classid = 'pg_class'::regclass AND refclassid = 'pg_class'::regclass
                           AND refobjid IN (SELECT oid FROM t) AND deptype IN ('a', 'i')))
              ORDER BY 2, 3;"
        ))
    }

    /// Of `relations` (`schema`, `name`) and `schemas`, those the connected
    /// database already has, as `schema.name` / `schema NAME` lines.
    pub fn existing_part(relations: &[(String, String)], schemas: &[String]) -> Statement {
        presence(relations, schemas, true, "", "")
    }

    /// Those of `relations` (`label` before each, `and_kind` narrowing
    /// them) and `schemas` that exist (`exist`) or do not.
    fn presence(
        relations: &[(String, String)],
        schemas: &[String],
        exist: bool,
        label: &str,
        and_kind: &str,
    ) -> Statement {
        let test = if exist { "EXISTS" } else { "NOT EXISTS" };
        let mut parts = vec!["SELECT NULL::text WHERE false".to_string()];
        for (s, r) in relations {
            parts.push(format!(
                "SELECT '{label}' || {s} || '.' || {r} WHERE {test} (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = {s} AND c.relname = {r} {and_kind})",
                s = literal(s),
                r = literal(r)
            ));
        }
        for s in schemas {
            parts.push(format!(
                "SELECT 'schema ' || {s} WHERE {test} (SELECT 1 FROM pg_namespace WHERE nspname = {s})",
                s = literal(s)
            ));
        }
        Statement::new(format!("{};", parts.join("\nUNION ALL ")))
    }

    /// Foreign keys from the selection to tables outside it, as
    /// `schema|table|constraint|referenced table` lines.
    pub fn outside_foreign_keys(tables: &[(String, String)], schemas: &[String]) -> Statement {
        let from = selected("n.nspname", "c.relname", tables, schemas);
        let to = selected("fn.nspname", "fc.relname", tables, schemas);
        Statement::new(format!(
            "SELECT n.nspname, c.relname, con.conname, fn.nspname || '.' || fc.relname
               FROM pg_constraint con
               JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_class fc ON fc.oid = con.confrelid JOIN pg_namespace fn ON fn.oid = fc.relnamespace
              WHERE con.contype = 'f' AND {from} AND NOT {to}
              ORDER BY 1, 2, 3;"
        ))
    }

    /// Drops constraint `name` of table `schema.table`.
    pub fn drop_constraint(schema: &str, table: &str, name: &str) -> Statement {
        Statement::new(format!(
            "ALTER TABLE {}.{} DROP CONSTRAINT {};",
            quote_ident(schema),
            quote_ident(table),
            quote_ident(name)
        ))
    }

    /// Replaces database `name` with database `with` (renamed to `name`).
    pub fn swap_database(name: &str, with: &str) -> Statement {
        Statement::new(format!(
            "DROP DATABASE {} WITH (FORCE);\nALTER DATABASE {} RENAME TO {};",
            quote_ident(name),
            quote_ident(with),
            quote_ident(name)
        ))
    }
}

impl PgTools {
    pub fn new(bin_dir: PathBuf) -> Self {
        Self { bin_dir }
    }

    pub fn path(&self, tool: &str) -> PathBuf {
        self.bin_dir.join(tool)
    }

    fn command(&self, tool: &str, db: &DbConn, dbname: &str) -> std::process::Command {
        let mut c = std::process::Command::new(self.path(tool));
        c.env_clear();
        // libpq needs little; a clean environment keeps stray PG* settings
        // of the agent's own environment from redirecting a dump.
        for k in ["PATH", "HOME", "LANG", "LC_ALL", "TZ"] {
            if let Ok(v) = std::env::var(k) {
                c.env(k, v);
            }
        }
        for (k, v) in db.env_for(dbname) {
            c.env(k, v);
        }
        c
    }

    /// `pg_dump` writing a custom-format archive, uncompressed, to stdout;
    /// giving up on a table lock it cannot get within `lock_wait`.
    pub fn pg_dump(&self, db: &DbConn, lock_wait: Duration) -> std::process::Command {
        let mut c = self.command("pg_dump", db, &db.dbname);
        c.args(["--format=custom", "--compress=0", "--no-password"]);
        // Milliseconds, at least 1: 0 would wait forever.
        c.arg(format!(
            "--lock-wait-timeout={}",
            lock_wait.as_millis().max(1)
        ));
        c
    }

    /// `pg_basebackup` writing the cluster as one tar to stdout (with its
    /// manifest inside), without WAL: the WAL comes from the agent's
    /// stream, which the backup waits for.
    pub fn pg_basebackup(&self, db: &DbConn) -> std::process::Command {
        let mut c = self.command("pg_basebackup", db, &db.dbname);
        c.args([
            "--pgdata=-",
            "--format=tar",
            "--wal-method=none",
            "--checkpoint=fast",
            "--label=datasaver",
            "--no-password",
        ]);
        c
    }

    /// `pg_dumpall --globals-only` (roles, memberships, role settings,
    /// tablespaces) as SQL to stdout; role passwords only with `passwords`
    /// (reading them takes a superuser).
    pub fn pg_dumpall_globals(&self, db: &DbConn, passwords: bool) -> std::process::Command {
        let mut c = self.command("pg_dumpall", db, &db.dbname);
        c.args(["--globals-only", "--no-password"]);
        c.arg(format!("--database={}", db.dbname));
        if !passwords {
            c.arg("--no-role-passwords");
        }
        c
    }

    /// `pg_restore` reading an archive from stdin into `dbname`.
    pub fn pg_restore_into(&self, db: &DbConn, dbname: &str) -> std::process::Command {
        let mut c = self.command("pg_restore", db, dbname);
        c.args([
            "--exit-on-error",
            "--single-transaction",
            "--no-password",
            &format!("--dbname={dbname}"),
        ]);
        c
    }

    /// `pg_dump` of only `tables` and `schemas` of `dbname`, as a plain SQL
    /// script to stdout. Each name is quoted, so it is that one object, not
    /// a pattern; `--strict-names` fails on one that is not there.
    pub fn pg_dump_part(
        &self,
        db: &DbConn,
        dbname: &str,
        tables: &[(String, String)],
        schemas: &[String],
    ) -> std::process::Command {
        let mut c = self.command("pg_dump", db, dbname);
        c.args(["--format=plain", "--no-password", "--strict-names"]);
        for (s, t) in tables {
            c.arg(format!("--table={}.{}", quote_ident(s), quote_ident(t)));
        }
        for s in schemas {
            c.arg(format!("--schema={}", quote_ident(s)));
        }
        c
    }

    /// `psql` running the script on its stdin in `dbname` in one
    /// transaction, stopping at the first error, its query output
    /// discarded.
    pub fn psql_script(&self, db: &DbConn, dbname: &str) -> std::process::Command {
        let mut c = self.command("psql", db, dbname);
        c.args([
            "-X",
            "-q",
            "--no-password",
            "--single-transaction",
            "-v",
            "ON_ERROR_STOP=1",
            "-o",
            "/dev/null",
            "-f",
            "-",
        ]);
        c
    }

    /// `pg_restore --list` reading an archive from stdin.
    pub fn pg_restore_list(&self, db: &DbConn) -> std::process::Command {
        let mut c = self.command("pg_restore", db, &db.dbname);
        c.arg("--list");
        c
    }

    pub async fn tool_version(&self, tool: &str) -> Result<PgVersion, String> {
        let out = tokio::process::Command::new(self.path(tool))
            .arg("--version")
            .output()
            .await
            .map_err(|e| format!("cannot run {}: {e}", self.path(tool).display()))?;
        let s = String::from_utf8_lossy(&out.stdout);
        parse_tool_version(&s)
            .ok_or_else(|| format!("cannot read the version of {tool} from {s:?}"))
    }

    /// Runs a statement through `psql` in `dbname` (script on stdin, so
    /// `:'var'` interpolation works and nothing lands in argv) and returns
    /// unaligned output.
    async fn psql(&self, db: &DbConn, dbname: &str, st: &Statement) -> Result<String, String> {
        let (sql, vars) = (&st.sql, &st.vars);
        let mut c = tokio::process::Command::from(self.command("psql", db, dbname));
        c.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "--no-password",
            "-v",
            "ON_ERROR_STOP=1",
        ]);
        for (k, v) in vars {
            c.arg("-v").arg(format!("{k}={v}"));
        }
        c.args(["-f", "-"]);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c.kill_on_drop(true);
        let mut child = c.spawn().map_err(|e| format!("cannot run psql: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(sql.as_bytes())
                .await
                .map_err(|e| format!("psql: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(summarize_stderr(&String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Connects to the database and runs a trivial query.
    pub async fn ping(&self, db: &DbConn) -> Result<(), String> {
        self.psql(db, &db.dbname, &sql::ping()).await.map(|_| ())
    }

    /// Whether database `name` exists, asked from `admin_db`.
    pub async fn database_exists(
        &self,
        db: &DbConn,
        admin_db: &str,
        name: &str,
    ) -> Result<bool, String> {
        Ok(self
            .psql(db, admin_db, &sql::database_exists(name))
            .await?
            .trim()
            == "1")
    }

    /// Whether database `name` holds nothing a restore would collide with.
    pub async fn is_empty(&self, db: &DbConn, name: &str) -> Result<bool, String> {
        Ok(self.psql(db, name, &sql::user_objects()).await?.trim() == "0")
    }

    /// Drops database `name` (if it exists), from `admin_db`.
    pub async fn drop_database(
        &self,
        db: &DbConn,
        admin_db: &str,
        name: &str,
    ) -> Result<(), String> {
        self.psql(db, admin_db, &sql::drop_database(name))
            .await
            .map(|_| ())
    }

    /// Replaces database `name` with database `with`, from `admin_db`.
    pub async fn swap_database(
        &self,
        db: &DbConn,
        admin_db: &str,
        name: &str,
        with: &str,
    ) -> Result<(), String> {
        self.psql(db, admin_db, &sql::swap_database(name, with))
            .await
            .map(|_| ())
    }

    /// Connects to the database and compares versions: a pg_dump older than
    /// the server refuses to dump (or worse, in old scripts, is ignored), so
    /// it is caught here with both versions named.
    pub async fn probe(&self, db: &DbConn) -> Result<(PgVersion, PgVersion), String> {
        let dump_v = self.tool_version("pg_dump").await?;
        let server = self.server_version(db).await?;
        if dump_v.major < server.major {
            return Err(format!(
                "pg_dump {} is older than the server (PostgreSQL {}): a dump needs pg_dump {} or newer; install it on the agent host and point DATASAVER_PG_BIN_DIR at it",
                dump_v.text, server.text, server.major
            ));
        }
        Ok((dump_v, server))
    }

    /// Whether the connected role is a superuser.
    pub async fn is_superuser(&self, db: &DbConn) -> Result<bool, String> {
        Ok(self
            .psql(db, &db.dbname, &sql::is_superuser())
            .await?
            .trim()
            == "t")
    }

    /// Runs `script` (one transaction of its own) in `dbname`. For scripts
    /// that carry secrets (role passwords): they go to psql on stdin, and
    /// an error that quotes them back is redacted.
    pub async fn run_script(&self, db: &DbConn, dbname: &str, script: &str) -> Result<(), String> {
        self.psql(db, dbname, &Statement::new(script.to_string()))
            .await
            .map(drop)
            .map_err(|e| crate::globals::redact_passwords(&e))
    }

    /// The server's WAL position, its clock (Unix microseconds) and its
    /// timeline now.
    pub async fn wal_point(&self, db: &DbConn) -> Result<(Lsn, i64, u32), String> {
        let out = self.psql(db, &db.dbname, &sql::wal_point()).await?;
        let line = out.trim();
        let mut f = line.split('|');
        let (Some(lsn), Some(t), Some(tli)) = (f.next(), f.next(), f.next()) else {
            return Err(format!(
                "unexpected answer to the WAL position query: {line:?}"
            ));
        };
        Ok((
            Lsn::parse(lsn.trim())?,
            t.trim()
                .parse()
                .map_err(|_| format!("server clock {t:?} is not a number"))?,
            tli.trim()
                .parse()
                .map_err(|_| format!("timeline {tli:?} is not a number"))?,
        ))
    }

    /// Slot `slot`'s `wal_status`, or `None` when it cannot be read.
    pub async fn slot_status(&self, db: &DbConn, slot: &str) -> Option<String> {
        self.psql(db, &db.dbname, &sql::slot_status(slot))
            .await
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// Tablespaces besides `pg_default` and `pg_global`.
    pub async fn extra_tablespaces(&self, db: &DbConn) -> Result<Vec<String>, String> {
        let out = self.psql(db, &db.dbname, &sql::extra_tablespaces()).await?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// The server's `system_identifier`, or `None` when this role may not
    /// read it (it is recorded when it can be; its absence fails nothing).
    pub async fn system_identifier(&self, db: &DbConn) -> Option<String> {
        match self.psql(db, &db.dbname, &sql::system_identifier()).await {
            Ok(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
            Ok(_) => None,
            Err(e) => {
                tracing::info!(error = %e, "cannot read the server's system_identifier; a change of server will not be noticed");
                None
            }
        }
    }

    /// How `db` was created (recorded with each backup).
    pub async fn database_shape(&self, db: &DbConn) -> Result<Shape, String> {
        let out = self.psql(db, &db.dbname, &sql::database_shape()).await?;
        let mut lines = out.lines().map(str::trim).filter(|l| !l.is_empty());
        let first = lines.next().unwrap_or_default();
        let mut f = first.splitn(5, '|').map(String::from);
        let mut next = || f.next().unwrap_or_default();
        let (owner, encoding, collate, ctype) = (next(), next(), next(), next());
        let explicit_acl = next() == "true";
        let grants = lines
            .filter_map(|l| {
                let mut p = l.rsplitn(3, '|');
                let grantable = p.next()? == "true";
                let privilege = p.next()?.to_string();
                let grantee = p.next()?.to_string();
                Some(DatabaseGrant {
                    grantee,
                    privilege,
                    grantable,
                })
            })
            .collect();
        let settings = self.psql(db, &db.dbname, &sql::database_settings()).await?;
        let settings: Vec<DatabaseSetting> =
            serde_json::from_str::<Vec<serde_json::Value>>(settings.trim())
                .map_err(|e| format!("cannot read the database's settings: {e}"))?
                .iter()
                .map(|v| DatabaseSetting {
                    role: v["role"].as_str().unwrap_or_default().to_string(),
                    config: v["config"].as_str().unwrap_or_default().to_string(),
                })
                .collect();
        Ok(Shape {
            owner,
            encoding,
            collate,
            ctype,
            explicit_acl,
            grants,
            settings,
        })
    }

    /// Creates database `name` shaped like `shape`, from `admin_db`. The
    /// owner is set only when the connected role may hand the database to
    /// it; otherwise the database belongs to the connected role (said in
    /// the returned note).
    pub async fn create_database_like(
        &self,
        db: &DbConn,
        admin_db: &str,
        name: &str,
        shape: &Shape,
    ) -> Result<Option<String>, String> {
        let mut shape = shape.clone();
        let mut note = None;
        if !shape.owner.is_empty() {
            let may = self
                .psql(db, admin_db, &sql::may_own_as(&shape.owner))
                .await?;
            if may.trim() != "t" {
                note = Some(format!(
                    "database {name} belongs to {} (not to its original owner {}: the agent's role may not create databases for it)",
                    db.user, shape.owner
                ));
                shape.owner.clear();
            }
        }
        self.psql(db, admin_db, &sql::create_database_like(name, &shape))
            .await?;
        if shape.explicit_acl {
            self.psql(db, admin_db, &sql::database_grants(name, &shape.grants))
                .await?;
        }
        if !shape.settings.is_empty() {
            let roles = self.roles(db, admin_db).await?;
            let mut script = String::new();
            let mut skipped = Vec::new();
            for st in &shape.settings {
                let Some(clause) = sql::setting_clause(&st.config) else {
                    skipped.push(format!("{} (not a setting)", st.config));
                    continue;
                };
                if st.role.is_empty() {
                    script.push_str(&format!(
                        "ALTER DATABASE {} SET {clause};\n",
                        quote_ident(name)
                    ));
                } else if roles.contains(&st.role) {
                    script.push_str(&format!(
                        "ALTER ROLE {} IN DATABASE {} SET {clause};\n",
                        quote_ident(&st.role),
                        quote_ident(name)
                    ));
                } else {
                    skipped.push(format!("{} for role {} (no such role)", st.config, st.role));
                }
            }
            if !script.is_empty() {
                self.psql(db, admin_db, &Statement::new(script)).await?;
            }
            if !skipped.is_empty() {
                let s = format!("settings not restored: {}", skipped.join(", "));
                note = Some(match note {
                    Some(n) => format!("{n}; {s}"),
                    None => s,
                });
            }
        }
        Ok(note)
    }

    /// The roles `db`'s objects name (recorded with each backup).
    pub async fn referenced_roles(&self, db: &DbConn) -> Result<Vec<String>, String> {
        self.lines(db, &db.dbname, &sql::referenced_roles()).await
    }

    /// The databases of the server behind `db` a whole-server backup may
    /// take (no templates), asked from `db`'s own database.
    pub async fn databases(&self, db: &DbConn) -> Result<Vec<String>, String> {
        self.lines(db, &db.dbname, &sql::databases())
            .await?
            .iter()
            .map(|h| decode_hex_name(h))
            .collect()
    }

    /// Every role of the server behind `db`, asked from `dbname`.
    pub async fn roles(&self, db: &DbConn, dbname: &str) -> Result<Vec<String>, String> {
        self.lines(db, dbname, &sql::roles()).await
    }

    /// The extensions installed in `db` (recorded with each backup).
    pub async fn extensions(&self, db: &DbConn) -> Result<Vec<String>, String> {
        self.lines(db, &db.dbname, &sql::extensions()).await
    }

    /// The extensions the server behind `db` could install, asked from
    /// `dbname`.
    pub async fn available_extensions(
        &self,
        db: &DbConn,
        dbname: &str,
    ) -> Result<Vec<String>, String> {
        self.lines(db, dbname, &sql::available_extensions()).await
    }

    /// Copies the tables and schemas of `sel` from database `from` into database `to`
    /// on the same server: `pg_dump` piped into `psql` in one transaction,
    /// after `prelude` (SQL run first, in that transaction). Both are
    /// stopped when `cancel` fires. The error is Postgres's own first error
    /// when there is one.
    pub async fn copy_part(
        &self,
        db: &DbConn,
        from: &str,
        to: &str,
        sel: &crate::part::Selection,
        prelude: String,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(), String> {
        use crate::child::Proc;
        let (dump, dump_pipes) = Proc::spawn(
            self.pg_dump_part(db, from, &sel.tables, &sel.schemas),
            "pg_dump",
            false,
        )
        .map_err(|e| e.to_string())?;
        let (apply, apply_pipes) = match Proc::spawn(self.psql_script(db, to), "psql", true) {
            Ok(p) => p,
            Err(e) => {
                dump.kill_and_reap();
                return Err(e.to_string());
            }
        };
        let _stop_dump = dump.kill_on(cancel);
        let _stop_apply = apply.kill_on(cancel);
        let (d, a) = (dump.clone(), apply.clone());
        let joined = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut out = dump_pipes.stdout;
            // psql writes nothing to stdout (-o /dev/null, -q).
            drop(apply_pipes.stdout);
            let Some(mut stdin) = apply_pipes.stdin else {
                d.kill_and_reap();
                a.kill_and_reap();
                return (
                    Err(std::io::Error::other("psql has no stdin")),
                    d.wait(),
                    a.wait(),
                );
            };
            let wrote = stdin
                .write_all(prelude.as_bytes())
                .and_then(|()| std::io::copy(&mut out, &mut stdin).map(drop));
            // A psql that quit early ends pg_dump too.
            drop(out);
            if wrote.is_err() {
                d.stop_and_reap();
            }
            let dumped = d.wait();
            // psql commits at the end of its input, so it sees the end only
            // after pg_dump succeeded; otherwise it is killed first and its
            // transaction rolls back with its connection.
            if !matches!(&dumped, Ok(e) if e.status.success()) || wrote.is_err() {
                a.kill();
            }
            drop(stdin);
            (wrote, dumped, a.wait())
        })
        .await
        .map_err(|e| format!("copying the tables failed: {e}"))?;
        let (wrote, dumped, applied) = joined;
        let applied = applied.map_err(|e| e.to_string())?;
        // psql's own error first: a psql that failed made pg_dump stop.
        if !applied.status.success() {
            if let Some(e) = postgres_errors(&applied.stderr) {
                return Err(e);
            }
        }
        let dumped = dumped.map_err(|e| e.to_string())?;
        if !dumped.status.success() {
            return Err(format!(
                "pg_dump of the restored tables failed ({}): {}",
                dumped.describe(),
                summarize_stderr(&dumped.stderr)
            ));
        }
        if !applied.status.success() {
            return Err(format!(
                "psql failed ({}): {}",
                applied.describe(),
                summarize_stderr(&applied.stderr)
            ));
        }
        wrote.map_err(|e| format!("feeding psql failed: {e}"))
    }

    /// Runs `st` in `dbname` and returns its non-empty output lines.
    pub async fn lines(
        &self,
        db: &DbConn,
        dbname: &str,
        st: &Statement,
    ) -> Result<Vec<String>, String> {
        Ok(self
            .psql(db, dbname, st)
            .await?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// The server's version, asked over a connection to `db`.
    pub async fn server_version(&self, db: &DbConn) -> Result<PgVersion, String> {
        let out = self
            .psql(db, &db.dbname, &sql::server_version())
            .await
            .map_err(|e| format!("cannot connect to database {}: {e}", db.describe()))?;
        let (num, text) = out
            .split_once('|')
            .ok_or_else(|| format!("unexpected server version reply {out:?}"))?;
        let num: u32 = num
            .trim()
            .parse()
            .map_err(|_| format!("unexpected server_version_num {num:?}"))?;
        Ok(PgVersion {
            major: if num >= 100_000 {
                num / 10_000
            } else {
                num / 100
            },
            text: text.split_whitespace().next().unwrap_or(text).to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_come_back_exactly() {
        assert_eq!(decode_hex_name("2073686f7020").unwrap(), " shop ");
        assert_eq!(decode_hex_name("c3a9").unwrap(), "é");
        assert!(decode_hex_name("7").is_err());
        assert!(decode_hex_name("zz").is_err());
        assert!(decode_hex_name("ff").is_err());
    }

    #[test]
    fn missing_roles_are_named_with_what_to_run() {
        let s = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let existing = s(&["postgres", "app_owner"]);
        assert_eq!(missing_roles("b1", &s(&["postgres"]), &existing), None);
        assert_eq!(missing_roles("b1", &[], &existing), None);
        let m = missing_roles(
            "b1",
            &s(&["app_owner", "app_reader", "Weird \"Role\""]),
            &existing,
        )
        .expect("refused");
        assert!(
            m.starts_with(
                "backup b1 needs roles app_reader, Weird \"Role\" that this server does not have"
            ) && m.contains(r#"CREATE ROLE "app_reader"; CREATE ROLE "Weird ""Role""";"#)
                && m.ends_with("nothing was changed"),
            "{m}"
        );
    }

    #[test]
    fn missing_extensions_are_named() {
        let v = PgVersion {
            major: 17,
            text: "17.10".into(),
        };
        let s = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let available = s(&["plpgsql", "pgcrypto", "hstore"]);
        assert_eq!(
            missing_extensions("b1", &s(&["plpgsql", "hstore"]), &available, &v),
            None
        );
        assert_eq!(missing_extensions("b1", &[], &available, &v), None);
        let one = missing_extensions("b1", &s(&["plpgsql", "old_snapshot"]), &available, &v)
            .expect("refused");
        assert_eq!(
            one,
            "backup b1 uses extension old_snapshot that this server (PostgreSQL 17.10) does not have: install it on the server (its PostgreSQL 17 package) or restore onto a server that has it; nothing was changed"
        );
        let two = missing_extensions("b1", &s(&["postgis", "old_snapshot"]), &available, &v)
            .expect("refused");
        assert!(
            two.contains("extensions postgis, old_snapshot that"),
            "{two}"
        );
    }

    #[test]
    fn database_settings_are_set_again_quoted_like_pg_dump_does() {
        assert_eq!(
            sql::setting_clause("work_mem=8MB").as_deref(),
            Some("work_mem TO E'8MB'")
        );
        assert_eq!(
            sql::setting_clause(r#"search_path="$user", app, "Odd ""x"", y""#).as_deref(),
            Some(r#"search_path TO E'$user', E'app', E'Odd "x", y'"#)
        );
        assert_eq!(
            sql::setting_clause(r"app.note=it's a \ path").as_deref(),
            Some(r"app.note TO E'it''s a \\ path'")
        );
        assert_eq!(sql::setting_clause("bad name=1"), None);
        assert_eq!(sql::setting_clause("x;DROP=1"), None);
        assert_eq!(sql::setting_clause("novalue"), None);
    }

    #[test]
    fn restores_onto_older_servers_or_with_older_pg_restore_are_refused() {
        let v = |major, text: &str| PgVersion {
            major,
            text: text.into(),
        };
        assert_eq!(major_of("15.10"), Some(15));
        assert_eq!(major_of("17.2 (Debian 17.2-1.pgdg120+1)"), Some(17));
        assert_eq!(major_of("16beta1"), Some(16));
        assert_eq!(major_of(""), None);
        assert_eq!(major_of("9.6.24"), None);
        let ok = restore_version_problem("b1", "15.10", "15.10", &v(15, "15.4"), &v(15, "15.4"));
        assert_eq!(ok, None);
        let newer_server =
            restore_version_problem("b1", "15.10", "15.10", &v(17, "17.2"), &v(17, "17.2"));
        assert_eq!(newer_server, None);
        let old_server =
            restore_version_problem("b1", "17.2", "17.2", &v(15, "15.10"), &v(17, "17.2"))
                .expect("refused");
        assert!(
            old_server.contains("backup b1 comes from PostgreSQL 17.2")
                && old_server.contains("PostgreSQL 15.10 (older)")
                && old_server.contains("nothing was changed"),
            "{old_server}"
        );
        let old_tool =
            restore_version_problem("b1", "15.10", "17.2", &v(17, "17.2"), &v(15, "15.10"))
                .expect("refused");
        assert!(
            old_tool.contains("pg_dump 17.2")
                && old_tool.contains("pg_restore is 15.10")
                && old_tool.contains("DATASAVER_PG_BIN_DIR"),
            "{old_tool}"
        );
        assert_eq!(
            restore_version_problem("b1", "", "", &v(15, "15.10"), &v(15, "15.10")),
            None,
            "old backups without recorded versions are not refused"
        );
    }

    #[test]
    fn postgres_errors_are_the_first_error_and_its_context() {
        let restore = "pg_restore: error: could not execute query: ERROR:  role \"app_owner\" does not exist\nCommand was: ALTER TABLE public.t OWNER TO app_owner;\n\npg_restore: warning: errors ignored on restore: 1\n";
        assert_eq!(
            postgres_errors(restore).as_deref(),
            Some("pg_restore: error: could not execute query: ERROR:  role \"app_owner\" does not exist | Command was: ALTER TABLE public.t OWNER TO app_owner;")
        );
        let extension = "pg_restore: while PROCESSING TOC:\npg_restore: from TOC entry 2; 3079 16385 EXTENSION postgis\npg_restore: error: could not execute query: ERROR:  could not open extension control file \"/usr/share/postgresql/15/extension/postgis.control\": No such file or directory\nCommand was: CREATE EXTENSION IF NOT EXISTS postgis WITH SCHEMA public;\n";
        let got = postgres_errors(extension).expect("an error line");
        assert!(
            got.contains("postgis.control") && got.contains("CREATE EXTENSION"),
            "{got}"
        );
        assert!(!got.contains("PROCESSING TOC"), "{got}");
        let psql =
            "psql:globals.sql:3: ERROR:  role \"x\" already exists\nLINE 1: CREATE ROLE x;\n";
        assert_eq!(
            postgres_errors(psql).as_deref(),
            Some("psql:globals.sql:3: ERROR:  role \"x\" already exists | LINE 1: CREATE ROLE x;")
        );
        assert_eq!(postgres_errors("pg_restore: warning: something\n"), None);
        assert_eq!(postgres_errors(""), None);
    }

    fn db() -> DbConn {
        DbConn {
            host: "h".into(),
            port: 1,
            dbname: "app".into(),
            user: "u".into(),
            password: Some("hunter2".into()),
            sslmode: None,
        }
    }

    #[test]
    fn password_only_in_environment() {
        let tools = PgTools::new("/usr/bin".into());
        for cmd in [
            tools.pg_dump(&db(), Duration::from_secs(600)),
            tools.pg_restore_into(&db(), "x"),
            tools.pg_restore_list(&db()),
        ] {
            let argv: Vec<String> = cmd
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            assert!(argv.iter().all(|a| !a.contains("hunter2")), "{argv:?}");
            let env: Vec<(String, String)> = cmd
                .get_envs()
                .filter_map(|(k, v)| {
                    Some((
                        k.to_string_lossy().into_owned(),
                        v?.to_string_lossy().into_owned(),
                    ))
                })
                .collect();
            assert!(env.contains(&("PGPASSWORD".into(), "hunter2".into())));
        }
        let argv: Vec<String> = tools
            .pg_dump(&db(), Duration::from_secs(600))
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            argv,
            [
                "--format=custom",
                "--compress=0",
                "--no-password",
                "--lock-wait-timeout=600000"
            ]
        );
    }

    #[test]
    fn a_lock_wait_names_the_table_and_the_setting() {
        let pg15 = summarize_stderr(
            "pg_dump: error: query failed: ERROR:  canceling statement due to statement timeout\n\
             pg_dump: detail: Query was: LOCK TABLE public.x IN ACCESS SHARE MODE\n",
        );
        let m = lock_wait_failure(&pg15, Duration::from_secs(2)).unwrap();
        assert!(
            m.starts_with(
                "pg_dump could not lock table public.x within 2s (DATASAVER_LOCK_WAIT_TIMEOUT)"
            ),
            "{m}"
        );
        assert!(m.contains("Query was: LOCK TABLE public.x"), "{m}");
        assert!(!m.contains('\n'));
        let nowait = "pg_dump: error: could not obtain lock on relation \"x\"";
        assert!(lock_wait_failure(nowait, Duration::from_secs(600))
            .unwrap()
            .contains("within 10m"));
        // other failures stay as they are
        for other in [
            "pg_dump: error: connection to server failed",
            "pg_dump: error: query failed: ERROR:  canceling statement due to statement timeout | Query was: SELECT 1",
            "pg_dump: error: query failed: ERROR: permission denied for table x | Query was: LOCK TABLE public.x IN ACCESS SHARE MODE",
        ] {
            assert_eq!(lock_wait_failure(other, Duration::from_secs(1)), None, "{other}");
        }
    }

    #[test]
    fn versions() {
        let v =
            parse_tool_version("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n").unwrap();
        assert_eq!(
            v,
            PgVersion {
                major: 15,
                text: "15.18".into()
            }
        );
        assert_eq!(
            parse_tool_version("pg_dump (PostgreSQL) 17beta1")
                .unwrap()
                .major,
            17
        );
        assert!(parse_tool_version("garbage").is_none());
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(summarize_stderr("a\n\nb\nc\nd\n"), "b | c | d");
    }

    /// Names with quotes, spaces and SQL in them stay one identifier.
    #[test]
    fn names_are_quoted_identifiers() {
        let odd = "my \"db\"; DROP DATABASE x; --";
        let quoted = "\"my \"\"db\"\"; DROP DATABASE x; --\"";
        assert_eq!(quote_ident(odd), quoted);
        assert_eq!(
            sql::create_database_like(odd, &Shape::default()).sql,
            format!("CREATE DATABASE {quoted} TEMPLATE template0;")
        );
        assert_eq!(
            sql::drop_database("with space").sql,
            "DROP DATABASE IF EXISTS \"with space\" WITH (FORCE);"
        );
        assert_eq!(
            sql::swap_database("app", "app_dsrestore_1\"x").sql,
            "DROP DATABASE \"app\" WITH (FORCE);\nALTER DATABASE \"app_dsrestore_1\"\"x\" RENAME TO \"app\";"
        );
        for st in [
            sql::create_database_like(odd, &Shape::default()),
            sql::drop_database(odd),
            sql::swap_database(odd, odd),
        ] {
            assert!(st.vars.is_empty());
            // every quote of the name is doubled: none ends the identifier
            let inner = st.sql.replace(quoted, "");
            assert!(!inner.contains("DROP DATABASE x"), "{}", st.sql);
        }
    }

    /// The original database's owner, encoding and locale are variables too.
    #[test]
    fn a_database_is_created_like_the_original() {
        let shape = Shape {
            owner: "app \"owner\"".into(),
            encoding: "LATIN1".into(),
            collate: "de_DE'; DROP".into(),
            ctype: "C".into(),
            ..Shape::default()
        };
        let st = sql::create_database_like("shop", &shape);
        assert_eq!(
            st.sql,
            "CREATE DATABASE \"shop\" TEMPLATE template0 OWNER :\"owner\" ENCODING :'encoding' LC_COLLATE :'collate' LC_CTYPE :'ctype';"
        );
        assert_eq!(
            st.vars,
            vec![
                ("owner", "app \"owner\"".to_string()),
                ("encoding", "LATIN1".to_string()),
                ("collate", "de_DE'; DROP".to_string()),
                ("ctype", "C".to_string()),
            ]
        );
        let partial = Shape {
            encoding: "UTF8".into(),
            ..Shape::default()
        };
        assert_eq!(
            sql::create_database_like("x", &partial).sql,
            "CREATE DATABASE \"x\" TEMPLATE template0 ENCODING :'encoding';"
        );
    }

    #[test]
    fn database_privileges_are_regranted_exactly() {
        let g = |grantee: &str, privilege: &str, grantable| DatabaseGrant {
            grantee: grantee.into(),
            privilege: privilege.into(),
            grantable,
        };
        let grants = vec![
            g("app_reader", "CONNECT", false),
            g("", "TEMPORARY", false),
            g("odd \"r\"", "CREATE", true),
            g("x", "DROP TABLE y; --", false),
        ];
        assert_eq!(
            sql::database_grants("shop", &grants).sql,
            "REVOKE ALL ON DATABASE \"shop\" FROM PUBLIC;\nGRANT CONNECT ON DATABASE \"shop\" TO \"app_reader\";\nGRANT TEMPORARY ON DATABASE \"shop\" TO PUBLIC;\nGRANT CREATE ON DATABASE \"shop\" TO \"odd \"\"r\"\"\" WITH GRANT OPTION;"
        );
    }

    /// Values are psql variables, never part of the SQL text.
    #[test]
    fn values_are_variables() {
        let name = "it's \"odd\"";
        let st = sql::database_exists(name);
        assert!(!st.sql.contains("odd"), "{}", st.sql);
        assert!(st.sql.contains(":'name'"));
        assert_eq!(st.vars, vec![("name", name.to_string())]);
        for st in [sql::user_objects(), sql::server_version(), sql::ping()] {
            assert!(st.vars.is_empty() && st.sql.ends_with(';'), "{}", st.sql);
        }
    }
}
