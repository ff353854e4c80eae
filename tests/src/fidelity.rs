//! Proving that a restored database equals its source.
//!
//! [`FIDELITY_SQL`] builds a database full of awkward objects and data (see
//! `tests/sql/fidelity.sql`); [`compare_databases`] compares two databases four ways:
//! 1. per-table row counts and content checksums of every ordinary table, partition and
//!    populated materialized view (names the differing tables);
//! 2. large objects (oid + md5 of contents) and sequences (last_value, is_called, options);
//! 3. a catalog inventory (relations, columns, constraints, indexes, triggers, functions,
//!    types, policies, comments), which also works across major versions;
//! 4. full plain-format `pg_dump`s of both, normalized (`\restrict` lines and version
//!    comments removed, rows of each COPY block sorted) and compared line by line.

use crate::pg::{tool_major, PgCluster};
use crate::procs::{cmdline, run};
use crate::quote_literal;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// The fidelity fixture (run it with [`load_fidelity`] or `cluster.psql(db, FIDELITY_SQL)`).
pub const FIDELITY_SQL: &str = include_str!("../sql/fidelity.sql");

/// [`compare_databases`] refuses to call a comparison good when the source has fewer rows
/// than this in ordinary tables (the fidelity fixture has ~125k).
pub const FIDELITY_MIN_ROWS: u64 = 100_000;

const QUERY_PRELUDE: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; \
                             SET extra_float_digits = 1; SET bytea_output = 'hex'; SET row_security = off;\n";

/// Create database `db` on `cluster` and load [`FIDELITY_SQL`] into it.
pub fn load_fidelity(cluster: &PgCluster, db: &str) {
    cluster.create_db(db);
    cluster.psql(db, FIDELITY_SQL);
}

/// `pg_dump -Fc src_db | pg_restore -d dst_db` (dst_db must exist), using the source
/// cluster's client pg_dump and the destination's pg_restore. Independent of datasaver: a
/// reference restore for comparisons.
pub fn dump_restore(
    src: &PgCluster,
    src_db: &str,
    dst: &PgCluster,
    dst_db: &str,
) -> Result<(), String> {
    let mut dump = src.client_command("pg_dump");
    dump.args(["--format=custom", "--compress=0", "-d", src_db]);
    let mut restore = dst.client_command("pg_restore");
    restore.args(["--exit-on-error", "-d", dst_db]);
    let dump_line = cmdline(&dump);
    let restore_line = cmdline(&restore);
    dump.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut dump_child = dump
        .spawn()
        .map_err(|e| format!("spawn {dump_line}: {e}"))?;
    let dump_out = dump_child.stdout.take().ok_or("no pg_dump stdout")?;
    let mut dump_err = dump_child.stderr.take().ok_or("no pg_dump stderr")?;
    restore
        .stdin(Stdio::from(dump_out))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let restore_child = restore
        .spawn()
        .map_err(|e| format!("spawn {restore_line}: {e}"))?;
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = dump_err.read_to_string(&mut s);
        s
    });
    let restore_out = restore_child
        .wait_with_output()
        .map_err(|e| format!("wait pg_restore: {e}"))?;
    let dump_status = dump_child
        .wait()
        .map_err(|e| format!("wait pg_dump: {e}"))?;
    let dump_stderr = err_thread.join().unwrap_or_default();
    if !dump_status.success() {
        return Err(format!(
            "{dump_line} failed with {dump_status}: {dump_stderr}"
        ));
    }
    if !restore_out.status.success() {
        return Err(format!(
            "{restore_line} failed with {}: {}",
            restore_out.status,
            String::from_utf8_lossy(&restore_out.stderr)
        ));
    }
    Ok(())
}

/// Compare source `(a, db_a)` with restored `(b, db_b)`; Ok when they are equal in content,
/// schema, large objects and sequences. The source must hold at least
/// [`FIDELITY_MIN_ROWS`] rows. The error describes every difference found (table names
/// quoted as `"schema"."table"`).
pub fn compare_databases(
    a: &PgCluster,
    db_a: &str,
    b: &PgCluster,
    db_b: &str,
) -> Result<(), String> {
    compare_databases_min_rows(a, db_a, b, db_b, FIDELITY_MIN_ROWS)
}

/// [`compare_databases`] with a custom minimum number of source rows (0 to allow empty).
pub fn compare_databases_min_rows(
    a: &PgCluster,
    db_a: &str,
    b: &PgCluster,
    db_b: &str,
    min_rows: u64,
) -> Result<(), String> {
    let mut problems: Vec<String> = Vec::new();

    // 1. Tables: counts + checksums.
    let ta = table_checksums(a, db_a)?;
    let tb = table_checksums(b, db_b)?;
    let total: u64 = ta.values().filter(|t| t.kind == 'r').map(|t| t.rows).sum();
    if total < min_rows {
        problems.push(format!(
            "source {db_a} has only {total} rows in ordinary tables (need >= {min_rows}): nothing meaningful to compare"
        ));
    }
    diff_maps("table", &ta, &tb, &mut problems, |_, x, y| {
        if x.rows != y.rows {
            Some(format!("row count {} vs {}", x.rows, y.rows))
        } else if x.md5 != y.md5 {
            Some(format!(
                "same row count {} but different content (md5 {} vs {})",
                x.rows, x.md5, y.md5
            ))
        } else {
            None
        }
    });

    // 2. Large objects and sequences.
    let la = large_objects(a, db_a)?;
    let lb = large_objects(b, db_b)?;
    diff_maps("large object", &la, &lb, &mut problems, |_, x, y| {
        (x != y).then(|| format!("md5 {x} vs {y}"))
    });
    let sa = sequences(a, db_a)?;
    let sb = sequences(b, db_b)?;
    diff_maps("sequence", &sa, &sb, &mut problems, |_, x, y| {
        (x != y).then(|| format!("{x} vs {y}"))
    });

    // 3. Catalog inventory.
    let ia = inventory(a, db_a)?;
    let ib = inventory(b, db_b)?;
    // Deparsed view and function bodies may be worded differently by another major version;
    // so may default ACLs (17 added the MAINTAIN privilege): compare them within a version only.
    let same_major = a.major() == b.major();
    let strip_acl = |v: &str| -> String {
        if same_major {
            v.to_string()
        } else {
            v.split(" acl=").next().unwrap_or(v).to_string()
        }
    };
    diff_maps("catalog object", &ia, &ib, &mut problems, |k, x, y| {
        let deparsed = k.starts_with("view ") || k.starts_with("function ");
        (strip_acl(x) != strip_acl(y) && (same_major || !deparsed))
            .then(|| format!("{x:?} vs {y:?}"))
    });

    // 4. Plain dumps.
    match dump_tool_for(a, b) {
        Some(bindir) => {
            let (da, db) = std::thread::scope(|s| {
                let ha = s.spawn(|| plain_dump(&bindir, a, db_a));
                let hb = s.spawn(|| plain_dump(&bindir, b, db_b));
                (ha.join().unwrap_or_else(|_| Err("dump thread panicked".into())), hb.join().unwrap_or_else(|_| Err("dump thread panicked".into())))
            });
            let (mut da, mut db) = (da?, db?);
            if !same_major {
                // Across major versions the schema parts are deparsed differently: compare
                // only data (COPY blocks, sequence values, large object contents).
                da = data_lines(&da);
                db = data_lines(&db);
            }
            if let Some(d) = diff_dumps(&da, &db) {
                problems.push(format!("plain pg_dump output differs ({db_a} vs {db_b}):\n{d}"));
            }
        }
        None => eprintln!(
            "harness: no pg_dump at least as new as both servers ({} and {}); skipping the dump comparison",
            a.major(),
            b.major()
        ),
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{db_a} and {db_b} differ:\n- {}",
            problems.join("\n- ")
        ))
    }
}

/// Rows in ordinary tables of `db` (sum over tables and partitions).
pub fn total_rows(cluster: &PgCluster, db: &str) -> Result<u64, String> {
    Ok(table_checksums(cluster, db)?
        .values()
        .filter(|t| t.kind == 'r')
        .map(|t| t.rows)
        .sum())
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct TableSum {
    kind: char,
    rows: u64,
    md5: String,
}

fn diff_maps<V>(
    what: &str,
    a: &BTreeMap<String, V>,
    b: &BTreeMap<String, V>,
    out: &mut Vec<String>,
    cmp: impl Fn(&str, &V, &V) -> Option<String>,
) {
    const MAX: usize = 30;
    let mut n = 0;
    let mut push = |s: String, out: &mut Vec<String>| {
        n += 1;
        if n <= MAX {
            out.push(s);
        } else if n == MAX + 1 {
            out.push(format!("... more {what} differences cut"));
        }
    };
    for (k, va) in a {
        match b.get(k) {
            None => push(
                format!("{what} {k} is missing from the restored database"),
                out,
            ),
            Some(vb) => {
                if let Some(d) = cmp(k, va, vb) {
                    push(format!("{what} {k}: {d}"), out);
                }
            }
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            push(
                format!("{what} {k} exists only in the restored database"),
                out,
            );
        }
    }
}

const USER_NAMESPACES: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";

fn table_checksums(cluster: &PgCluster, db: &str) -> Result<BTreeMap<String, TableSum>, String> {
    let tables = cluster.try_query_rows(
        db,
        &format!(
            "SELECT format('%I.%I', n.nspname, c.relname), c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'm') AND (c.relkind <> 'm' OR c.relispopulated) AND {USER_NAMESPACES} ORDER BY 1"
        ),
    )?;
    let mut out = BTreeMap::new();
    if tables.is_empty() {
        return Ok(out);
    }
    // One query for all tables: name, kind, count, md5 of the sorted row texts.
    let parts: Vec<String> = tables
        .iter()
        .filter(|r| r.len() == 2)
        .map(|r| {
            let (name, kind) = (&r[0], &r[1]);
            let only = if kind == "r" { "ONLY " } else { "" };
            format!(
                "SELECT {}, {}, count(*), coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text COLLATE \"C\")), '') FROM {only}{name} t",
                quote_literal(name),
                quote_literal(kind)
            )
        })
        .collect();
    let sql = format!("{QUERY_PRELUDE}{};", parts.join("\nUNION ALL\n"));
    for row in cluster.try_query_rows(db, &sql)? {
        if let [name, kind, count, md5] = row.as_slice() {
            let rows = count
                .parse()
                .map_err(|e| format!("bad count {count:?} for {name}: {e}"))?;
            out.insert(
                name.clone(),
                TableSum {
                    kind: kind.chars().next().unwrap_or('?'),
                    rows,
                    md5: md5.clone(),
                },
            );
        } else {
            return Err(format!("unexpected checksum row {row:?}"));
        }
    }
    Ok(out)
}

fn large_objects(cluster: &PgCluster, db: &str) -> Result<BTreeMap<String, String>, String> {
    let rows = cluster.try_query_rows(
        db,
        "SELECT m.oid::text, md5(lo_get(m.oid)) || ' comment=' || coalesce(obj_description(m.oid, 'pg_largeobject'), '<none>') \
         FROM pg_largeobject_metadata m ORDER BY m.oid",
    )?;
    Ok(rows
        .into_iter()
        .filter(|r| r.len() == 2)
        .map(|r| (format!("oid {}", r[0]), r[1].clone()))
        .collect())
}

fn sequences(cluster: &PgCluster, db: &str) -> Result<BTreeMap<String, String>, String> {
    let seqs = cluster.try_query_rows(
        db,
        &format!(
            "SELECT format('%I.%I', n.nspname, c.relname), \
             format('type=%s start=%s inc=%s min=%s max=%s cache=%s cycle=%s', format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle) \
             FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_NAMESPACES} ORDER BY 1"
        ),
    )?;
    let mut out = BTreeMap::new();
    if seqs.is_empty() {
        return Ok(out);
    }
    let parts: Vec<String> = seqs
        .iter()
        .map(|r| {
            format!(
                "SELECT {}, last_value::text, is_called::text FROM {}",
                quote_literal(&r[0]),
                r[0]
            )
        })
        .collect();
    let state: BTreeMap<String, (String, String)> = cluster
        .try_query_rows(db, &format!("{};", parts.join("\nUNION ALL\n")))?
        .into_iter()
        .filter(|r| r.len() == 3)
        .map(|r| (r[0].clone(), (r[1].clone(), r[2].clone())))
        .collect();
    for r in seqs {
        let (last, called) = state.get(&r[0]).cloned().unwrap_or_default();
        out.insert(
            r[0].clone(),
            format!("last_value={last} is_called={called} {}", r[1]),
        );
    }
    Ok(out)
}

/// A version-independent listing of user objects: key = "kind name", value = definition.
fn inventory(cluster: &PgCluster, db: &str) -> Result<BTreeMap<String, String>, String> {
    let sql = format!(
        "{QUERY_PRELUDE}\
        SELECT 'schema ' || quote_ident(n.nspname), coalesce(obj_description(n.oid, 'pg_namespace'), '') || ' acl=' || coalesce(n.nspacl::text, '') \
          FROM pg_namespace n WHERE {USER_NAMESPACES} AND n.nspname <> 'public' \
        UNION ALL \
        SELECT 'relation ' || format('%I.%I', n.nspname, c.relname), \
               format('kind=%s persistence=%s rls=%s partbound=%s comment=%s acl=%s', c.relkind, c.relpersistence, c.relrowsecurity, \
                      coalesce(pg_get_expr(c.relpartbound, c.oid), ''), coalesce(obj_description(c.oid, 'pg_class'), ''), coalesce(c.relacl::text, '')) \
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_NAMESPACES} AND c.relkind IN ('r','p','v','m','S','f') \
        UNION ALL \
        SELECT 'column ' || format('%I.%I.%I', n.nspname, c.relname, a.attname), \
               format('type=%s notnull=%s default=%s identity=%s generated=%s storage=%s stats=%s comment=%s', format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                      coalesce(pg_get_expr(d.adbin, d.adrelid), ''), a.attidentity, a.attgenerated, a.attstorage, \
                      CASE WHEN a.attstattarget > 0 THEN a.attstattarget::text ELSE 'default' END, coalesce(col_description(c.oid, a.attnum), '')) \
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
          WHERE {USER_NAMESPACES} AND c.relkind IN ('r','p','v','m','f') AND a.attnum > 0 AND NOT a.attisdropped \
        UNION ALL \
        SELECT 'constraint ' || format('%I.%I.%I', n.nspname, coalesce(c.relname, t.typname), co.conname), pg_get_constraintdef(co.oid) \
          FROM pg_constraint co JOIN pg_namespace n ON n.oid = co.connamespace \
          LEFT JOIN pg_class c ON c.oid = co.conrelid LEFT JOIN pg_type t ON t.oid = co.contypid \
          WHERE {USER_NAMESPACES} AND co.contype <> 'n' \
        UNION ALL \
        SELECT 'index ' || format('%I.%I', n.nspname, c.relname), pg_get_indexdef(c.oid) \
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_NAMESPACES} \
        UNION ALL \
        SELECT 'trigger ' || format('%I.%I.%I', n.nspname, c.relname, tg.tgname), format('%s enabled=%s', pg_get_triggerdef(tg.oid), tg.tgenabled) \
          FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
          WHERE {USER_NAMESPACES} AND NOT tg.tgisinternal \
        UNION ALL \
        SELECT 'function ' || format('%I.%I(%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)), \
               format('%s kind=%s comment=%s', md5(CASE WHEN p.prokind = 'a' THEN '' ELSE pg_get_functiondef(p.oid) END), p.prokind, obj_description(p.oid, 'pg_proc')) \
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {USER_NAMESPACES} \
        UNION ALL \
        SELECT 'type ' || format('%I.%I', n.nspname, t.typname), \
               format('typtype=%s enum=%s comment=%s', t.typtype, \
                      (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid), \
                      coalesce(obj_description(t.oid, 'pg_type'), '')) \
          FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
          WHERE {USER_NAMESPACES} AND t.typtype IN ('e','d','c','r','m') \
            AND (t.typtype <> 'c' OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c') \
        UNION ALL \
        SELECT 'view ' || format('%I.%I', n.nspname, c.relname), md5(pg_get_viewdef(c.oid)) \
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_NAMESPACES} AND c.relkind IN ('v','m') \
        UNION ALL \
        SELECT 'policy ' || format('%I.%I.%I', p.schemaname, p.tablename, p.policyname), format('%s %s %s %s', p.cmd, p.roles, p.qual, p.with_check) \
          FROM pg_policies p \
        UNION ALL \
        SELECT 'statistics ' || format('%I.%I', n.nspname, s.stxname), s.stxkind::text \
          FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace;"
    );
    let rows = cluster.try_query_rows(db, &sql)?;
    Ok(rows
        .into_iter()
        .filter(|r| r.len() == 2)
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect())
}

/// A bindir whose pg_dump can dump both servers: the highest-major pg_dump among the two
/// clusters' bindirs and the default bindir, if it is at least as new as both servers.
fn dump_tool_for(a: &PgCluster, b: &PgCluster) -> Option<PathBuf> {
    let need = a.major().max(b.major());
    let mut candidates = vec![
        a.client_bindir().to_path_buf(),
        b.client_bindir().to_path_buf(),
        a.bindir().to_path_buf(),
        b.bindir().to_path_buf(),
    ];
    candidates.push(PgCluster::default_bindir());
    candidates
        .into_iter()
        .filter_map(|d| tool_major(&d, "pg_dump").map(|m| (m, d)))
        .filter(|(m, _)| *m >= need)
        .max_by_key(|(m, _)| *m)
        .map(|(_, d)| d)
}

fn plain_dump(bindir: &std::path::Path, cluster: &PgCluster, db: &str) -> Result<String, String> {
    let mut cmd = cluster.tool_command(bindir.join("pg_dump"));
    cmd.args(["--format=plain", "--no-sync", "-d", db]);
    let out = run(cmd, Duration::from_secs(600));
    if !out.success() {
        return Err(format!("plain pg_dump of {db} failed\n{}", out.describe()));
    }
    Ok(normalize_dump(&out.stdout))
}

/// Drop lines that legitimately differ between two dumps of equal databases, and sort the
/// rows of every COPY block (physical row order is not part of a database's content).
pub fn normalize_dump(dump: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut copy_rows: Option<Vec<&str>> = None;
    for line in dump.lines() {
        if let Some(rows) = copy_rows.as_mut() {
            if line == "\\." {
                rows.sort_unstable();
                out.append(rows);
                copy_rows = None;
                out.push(line);
            } else {
                rows.push(line);
            }
            continue;
        }
        if line.starts_with("\\restrict ")
            || line.starts_with("\\unrestrict ")
            || line.starts_with("-- Dumped from database version")
            || line.starts_with("-- Dumped by pg_dump version")
        {
            continue;
        }
        if line.starts_with("COPY ") && line.ends_with(" FROM stdin;") {
            copy_rows = Some(Vec::new());
        }
        out.push(line);
    }
    if let Some(mut rows) = copy_rows {
        rows.sort_unstable();
        out.append(&mut rows);
    }
    out.join("\n")
}

/// Only the data-carrying lines of a normalized plain dump: COPY blocks, `setval` calls and
/// large object contents.
pub fn data_lines(dump: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut in_copy = false;
    for line in dump.lines() {
        if in_copy {
            out.push(line);
            in_copy = line != "\\.";
        } else if line.starts_with("COPY ") && line.ends_with(" FROM stdin;") {
            out.push(line);
            in_copy = true;
        } else if line.starts_with("SELECT pg_catalog.setval(")
            || line.starts_with("SELECT pg_catalog.lo_open(")
            || line.starts_with("SELECT pg_catalog.lowrite(")
            || line.starts_with("SELECT pg_catalog.lo_create(")
        {
            out.push(line);
        }
    }
    out.join("\n")
}

/// None when equal; else a report on the first difference with context and the enclosing
/// object (the last `COPY ...` or `-- Name: ...` line above it).
fn diff_dumps(a: &str, b: &str) -> Option<String> {
    if a == b {
        return None;
    }
    let la: Vec<&str> = a.lines().collect();
    let lb: Vec<&str> = b.lines().collect();
    let first = la
        .iter()
        .zip(lb.iter())
        .position(|(x, y)| x != y)
        .unwrap_or(la.len().min(lb.len()));
    let context = |lines: &[&str]| -> String {
        let start = first.saturating_sub(3);
        let end = (first + 4).min(lines.len());
        (start..end)
            .map(|i| {
                format!(
                    "{}{:>7}: {}",
                    if i == first { ">" } else { " " },
                    i + 1,
                    shorten(lines[i], 300)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let section = la[..first.min(la.len())]
        .iter()
        .rev()
        .find(|l| l.starts_with("COPY ") || l.starts_with("-- Name: "))
        .map(|l| shorten(l, 300))
        .unwrap_or_else(|| "(start of dump)".to_string());
    let differing =
        la.iter().zip(lb.iter()).filter(|(x, y)| x != y).count() + la.len().abs_diff(lb.len());
    Some(format!(
        "first difference at line {} (in section: {section}); {} vs {} lines, ~{differing} differing\n  source:\n{}\n  restored:\n{}",
        first + 1,
        la.len(),
        lb.len(),
        context(&la),
        context(&lb)
    ))
}

fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &s[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_dumps() {
        let d = "\\restrict abc\n-- Dumped from database version 15.1\nCOPY a.b (x) FROM stdin;\n2\n1\n\\.\n\\unrestrict abc\n";
        assert_eq!(normalize_dump(d), "COPY a.b (x) FROM stdin;\n1\n2\n\\.");
    }

    #[test]
    fn reports_first_difference() {
        let a = "x\nCOPY s.t (a) FROM stdin;\n1\n2\n\\.";
        let b = "x\nCOPY s.t (a) FROM stdin;\n1\n3\n\\.";
        let d = diff_dumps(a, b).expect("differs");
        assert!(d.contains("line 4"), "{d}");
        assert!(d.contains("COPY s.t"), "{d}");
        assert!(diff_dumps(a, a).is_none());
    }
}
