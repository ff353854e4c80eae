//! Human and JSON renderings. The JSON shape is a stable interface (SPEC §13);
//! the human tables are for reading and grepping: plain columns separated by
//! spaces, one header row, no colours, no box drawing.

use datasaver_common::proto::{
    AgentInfo, Backup, CancelledJob, CleanupItem, CleanupResponse, CreateTokenResponse,
    HealthResponse, JobDone, JoinToken, TargetHealth, TargetInfoRow,
};
use serde_json::{json, Value};

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `n thing` or `n things`.
fn count(n: impl Into<u64>, thing: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

fn opt(s: &Option<String>) -> Value {
    s.as_ref()
        .map(|v| Value::String(v.clone()))
        .unwrap_or(Value::Null)
}

/// The columns of a table: each one's header and how a row's cell is made.
/// Header and cells come from the same list, so a row can never have more or
/// fewer cells than the header.
pub struct Columns<'a, T> {
    cols: Vec<(&'static str, Cell<'a, T>)>,
}

/// Makes one cell of a column from a row's item.
type Cell<'a, T> = Box<dyn Fn(&T) -> String + 'a>;

impl<'a, T> Columns<'a, T> {
    pub fn new() -> Self {
        Self { cols: Vec::new() }
    }

    pub fn col(mut self, header: &'static str, cell: impl Fn(&T) -> String + 'a) -> Self {
        self.cols.push((header, Box::new(cell)));
        self
    }

    /// Renders `items` as a plain table: columns separated by two spaces, no
    /// trailing spaces, no trailing newline.
    pub fn render(&self, items: &[T], with_header: bool) -> String {
        let mut t = comfy_table::Table::new();
        // Spaces only: no borders, no line under the header.
        t.load_preset(comfy_table::presets::NOTHING);
        if with_header {
            t.set_header(self.cols.iter().map(|c| c.0).collect::<Vec<_>>());
        }
        for item in items {
            t.add_row(self.cols.iter().map(|c| (c.1)(item)).collect::<Vec<_>>());
        }
        for c in t.column_iter_mut() {
            c.set_padding((0, 2));
        }
        t.trim_fmt()
    }

    fn print(&self, items: &[T]) {
        println!("{}", self.render(items, true));
    }
}

/// `dsctl export`'s result.
pub fn exported(e: &crate::export::Exported, as_json: bool) {
    if as_json {
        println!(
            "{}",
            json!({
                "id": e.backup.id,
                "out": e.out.display().to_string(),
                "bytes": e.bytes,
                "checksum": e.checksum,
                "checked_against_backup": e.checked_against_backup,
                "database": exported_database(e),
                "part": e.part.clone().unwrap_or_else(|| "dump".into()),
            })
        );
        return;
    }
    let database_part = e
        .part
        .as_deref()
        .and_then(datasaver_common::names::part_database);
    if let Some(part) = e.part.as_ref().filter(|_| database_part.is_none()) {
        let passwords = e
            .backup
            .parts
            .iter()
            .any(|p| &p.name == part && p.role_passwords);
        println!(
            "exported the {part} of backup {} to {}: {}, SQL from pg_dumpall --globals-only ({})",
            e.backup.id,
            e.out.display(),
            human_bytes(e.bytes),
            if passwords {
                "with role passwords: keep the file secret"
            } else {
                "without role passwords"
            }
        );
        println!(
            "checksum {} matches pg_dumpall's output at backup time; it holds every role of the old server: review it and apply the statements you need with psql (run whole, it would also alter roles that already exist)",
            e.checksum
        );
        return;
    }
    println!(
        "exported backup {} (database {}) to {}: {}, pg_dump custom format",
        e.backup.id,
        exported_database(e),
        e.out.display(),
        human_bytes(e.bytes)
    );
    if e.checked_against_backup {
        println!(
            "checksum {} matches pg_dump's output at backup time",
            e.checksum
        );
    } else {
        println!(
            "checksum {} (no checksum of pg_dump's output was recorded for this backup; the stored bytes were checked)",
            e.checksum
        );
    }
    println!(
        "restore it with: createdb NEWDB && pg_restore -d NEWDB {}",
        e.out.display()
    );
}

/// The database an export holds: the backup's, or the one of a
/// whole-server backup's that was asked for.
fn exported_database(e: &crate::export::Exported) -> String {
    e.part
        .as_deref()
        .and_then(datasaver_common::names::part_database)
        .unwrap_or(&e.backup.database)
        .to_string()
}

/// The databases a backup holds: its one, or a whole server's.
fn databases_of(b: &Backup) -> Vec<String> {
    if b.whole_server {
        b.parts
            .iter()
            .filter(|p| !p.database.is_empty())
            .map(|p| p.database.clone())
            .collect()
    } else if b.database.is_empty() {
        Vec::new()
    } else {
        vec![b.database.clone()]
    }
}

/// The databases a backup holds, as a list column shows them: at most
/// three names, then how many more.
fn databases_column(b: &Backup) -> String {
    let all = databases_of(b);
    if all.len() <= 3 {
        return all.join(",");
    }
    format!("{} (+{})", all[..3].join(","), all.len() - 3)
}

/// A list of the backup's (`own`), or for a whole server every name its
/// databases' lists hold (`of`), once each.
fn every(
    b: &Backup,
    of: impl Fn(&datasaver_common::proto::BackupPart) -> &Vec<String>,
    own: &[String],
) -> String {
    if !b.whole_server {
        return own.join(", ");
    }
    let mut all: Vec<&String> = b.parts.iter().flat_map(of).collect();
    all.sort();
    all.dedup();
    all.into_iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `N rows in M tables`.
fn rows_in(tables: &[datasaver_common::proto::TableRows]) -> String {
    format!(
        "{} rows in {} table{}",
        tables.iter().map(|t| t.rows).sum::<u64>(),
        tables.len(),
        if tables.len() == 1 { "" } else { "s" }
    )
}

/// `dsctl get`'s rows about a whole-server backup's databases.
fn server_rows(b: &Backup) -> Vec<(&'static str, String)> {
    let mut rows = vec![(
        "database",
        format!(
            "whole server on {} (PostgreSQL {})",
            b.db_host, b.server_version
        ),
    )];
    for p in b.parts.iter().filter(|p| !p.database.is_empty()) {
        let rows_text = if !p.tables.is_empty() {
            rows_in(&p.tables)
        } else if !p.rows_not_counted.is_empty() {
            format!("rows not counted: {}", p.rows_not_counted)
        } else {
            "no tables".into()
        };
        let owner = p
            .database_shape
            .as_ref()
            .map(|s| s.owner.clone())
            .filter(|o| !o.is_empty())
            .map(|o| format!(", owner {o}"))
            .unwrap_or_default();
        rows.push((
            "  database",
            format!(
                "{}: {} stored, {}{owner}",
                p.database,
                human_bytes(p.stored_bytes),
                rows_text
            ),
        ));
    }
    if !b.databases_appeared.is_empty() {
        rows.push(("new since previous", b.databases_appeared.join(", ")));
    }
    if !b.databases_disappeared.is_empty() {
        rows.push(("gone since previous", b.databases_disappeared.join(", ")));
    }
    rows
}

/// Each table's rows, as `--json` shows them.
fn tables_json(tables: &[datasaver_common::proto::TableRows]) -> Value {
    tables
        .iter()
        .map(|t| json!({ "schema": t.schema, "name": t.name, "rows": t.rows }))
        .collect()
}

fn part_json(p: &datasaver_common::proto::BackupPart) -> Value {
    json!({
        "name": p.name,
        "stored_bytes": p.stored_bytes,
        "checksum": p.checksum,
        "raw_bytes": p.raw_bytes,
        "raw_checksum": p.raw_checksum,
        "role_passwords": p.role_passwords,
        "database": p.database,
        "extensions": p.extensions,
        "roles": p.roles,
        "tables": tables_json(&p.tables),
    })
}

pub fn backup_json(b: &Backup) -> Value {
    json!({
        "id": b.id,
        "target": b.target,
        "agent": b.agent,
        "created_at": b.created_at,
        "finished_at": opt(&b.finished_at),
        "kind": b.kind,
        "status": b.status,
        "trigger": b.trigger,
        "raw_bytes": b.raw_bytes,
        "stored_bytes": b.stored_bytes,
        "checksum": b.checksum,
        "raw_checksum": b.raw_checksum,
        "compression": b.compression,
        "encrypted": b.encrypted,
        "tags": b.tags,
        "label": opt(&b.label),
        "pinned": b.pinned,
        "duration_ms": b.duration_ms,
        "database": b.database,
        "db_host": b.db_host,
        "server_version": b.server_version,
        "pg_dump_version": b.pg_dump_version,
        "extensions": b.extensions,
        "roles": b.roles,
        "system_identifier": b.system_identifier,
        "object_key": b.object_key,
        "parts": b.parts.iter().map(part_json).collect::<Vec<_>>(),
        "whole_server": b.whole_server,
        "databases": databases_of(b),
        "databases_appeared": b.databases_appeared,
        "databases_disappeared": b.databases_disappeared,
        "tables": tables_json(&b.tables),
        "rows_not_counted": b.rows_not_counted,
        "error": opt(&b.error),
        "verified_at": opt(&b.verified_at),
        "verify_result": opt(&b.verify_result),
        "drilled_at": opt(&b.drilled_at),
        "drill_result": opt(&b.drill_result),
        "next_backup_at": opt(&b.next_backup_at),
    })
}

pub fn cleanup(r: &CleanupResponse, as_json: bool) {
    if as_json {
        let targets: Vec<Value> = r
            .targets
            .iter()
            .map(|t| {
                json!({
                    "target": t.target,
                    "policy": t.policy,
                    "backups": t.items.iter().map(|i| json!({
                        "id": i.id,
                        "created_at": i.created_at,
                        "status": i.status,
                        "action": if i.keep { "keep" } else { "delete" },
                        "reasons": i.reasons,
                        "tags": i.tags,
                        "label": opt(&i.label),
                        "pinned": i.pinned,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let v = json!({
            "dry_run": r.dry_run,
            "targets": targets,
            "deleted": r.deleted,
            "finished": r.finished,
            "errors": r.errors,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!("{}", cleanup_text(r));
}

fn cleanup_text(r: &CleanupResponse) -> String {
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    let mut out = Vec::new();
    for t in &r.targets {
        out.push(format!("target {}: keep {}", t.target, t.policy));
        if t.items.is_empty() {
            out.push("  no backups".into());
            continue;
        }
        let rows = Columns::<CleanupItem>::new()
            .col("ACTION", |i| if i.keep { "keep" } else { verb }.to_string())
            .col("ID", |i| i.id.clone())
            .col("CREATED", |i| short_time(&i.created_at))
            .col("STATUS", |i| i.status.clone())
            .col("WHY", |i| i.reasons.join("; "))
            .render(&t.items, true);
        out.extend(rows.lines().map(|l| format!("  {l}")));
    }
    let gone = r
        .targets
        .iter()
        .flat_map(|t| &t.items)
        .filter(|i| !i.keep)
        .count();
    if r.dry_run {
        out.push(format!(
            "dry run: {} would be deleted, nothing changed",
            count(gone as u64, "backup")
        ));
    } else {
        out.push(format!(
            "deleted {}",
            count(r.deleted.len() as u64, "backup")
        ));
    }
    for f in &r.finished {
        out.push(format!("finished an interrupted deletion of {f}"));
    }
    for e in &r.errors {
        out.push(format!("not deleted: {e}"));
    }
    out.join("\n")
}

pub fn health(h: &HealthResponse, as_json: bool) {
    if as_json {
        let v: Vec<Value> = h
            .targets
            .iter()
            .map(|t| {
                json!({
                    "target": t.target,
                    "status": t.status,
                    "status_reason": t.status_reason,
                    "schedule": if t.schedule.is_empty() { Value::Null } else { t.schedule.clone().into() },
                    "next_backup_at": opt(&t.next_backup_at),
                    "last_backup_at": opt(&t.last_backup_at),
                    "last_backup_id": opt(&t.last_backup_id),
                    "last_backup_status": opt(&t.last_backup_status),
                    "last_backup_error": opt(&t.last_backup_error),
                    "last_success_at": opt(&t.last_success_at),
                    "drill_schedule": if t.drill_schedule.is_empty() { Value::Null } else { t.drill_schedule.clone().into() },
                    "last_drill_success_at": opt(&t.last_drill_success_at),
                    "recovery_window": if t.recovery_from.is_empty() { Value::Null } else { json!({ "from": t.recovery_from, "to": t.recovery_to }) },
                    "backups": t.backups,
                    "stored_bytes": t.stored_bytes,
                    "agent_connected": t.agent_connected,
                    "missed_slots": t.missed_slots,
                    "raised_to_floor": t.raised_to_floor.iter().map(|r| json!({
                        "setting": r.setting,
                        "asked": r.asked,
                        "floor": r.floor,
                        "message": r.message,
                    })).collect::<Vec<_>>(),
                    "alerts": t.alerts.iter().map(|a| json!({
                        "event": a.event,
                        "message": a.message,
                        "since": a.since,
                        "backup_id": opt(&a.backup_id),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let queue = h.queue.unwrap_or_default();
        let out = json!({
            "status": h.status,
            "time_zone": h.time_zone,
            "agents_connected": h.agents_connected,
            "queue": { "running": queue.running, "waiting": queue.waiting, "limit": queue.limit },
            "targets": v,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return;
    }
    println!("{}", health_text(h));
}

fn health_text(h: &HealthResponse) -> String {
    let mut cols = Columns::<TargetHealth>::new()
        .col("TARGET", |t| t.target.clone())
        .col("STATUS", |t| t.status.clone())
        .col("LAST BACKUP", |t| {
            t.last_backup_at
                .as_deref()
                .map(short_time)
                .unwrap_or_else(|| "no backup yet".into())
        })
        .col("RESULT", |t| {
            t.last_backup_status.clone().unwrap_or_else(|| "-".into())
        })
        .col("NEXT BACKUP", |t| {
            t.next_backup_at
                .as_deref()
                .map(short_time)
                .unwrap_or_else(|| "not scheduled".into())
        })
        .col("BACKUPS", |t| t.backups.to_string())
        .col("STORED", |t| human_bytes(t.stored_bytes))
        .col("AGENT", |t| {
            if t.agent_connected { "yes" } else { "no" }.to_string()
        });
    if h.targets.iter().any(|t| !t.drill_schedule.is_empty()) {
        cols = cols.col("LAST DRILL OK", |t| {
            match (&t.last_drill_success_at, t.drill_schedule.is_empty()) {
                (Some(at), _) => short_time(at),
                (None, false) => "never".into(),
                (None, true) => "-".into(),
            }
        });
    }
    if h.targets.iter().any(|t| !t.recovery_from.is_empty()) {
        cols = cols.col("RECOVERABLE", |t| {
            if t.recovery_from.is_empty() {
                "-".into()
            } else {
                format!(
                    "{} .. {}",
                    short_time(&t.recovery_from),
                    short_time(&t.recovery_to)
                )
            }
        });
    }
    if h.targets.iter().any(|t| !t.status_reason.is_empty()) {
        cols = cols.col("NOTE", |t| t.status_reason.clone());
    }
    let mut out = Vec::new();
    if h.targets.is_empty() {
        out.push("no targets yet".to_string());
    } else {
        out.push(cols.render(&h.targets, true));
    }
    // What the coordinator's floor changed in the agents' requests, one line
    // each, so that a weakened retention or schedule is never silent.
    for t in &h.targets {
        for r in &t.raised_to_floor {
            out.push(format!("{}: {}", t.target, r.message));
        }
    }
    out.push(health_summary(h));
    out.join("\n")
}

/// One line for the whole fleet, e.g. `3 targets: 1 healthy, 2 degraded, 0
/// unhealthy; 14 backups, 24.6 MiB stored; 2 agents connected; queue: 1
/// running, 0 waiting (limit 4); times UTC`.
fn health_summary(h: &HealthResponse) -> String {
    let of = |s: &str| h.targets.iter().filter(|t| t.status == s).count();
    let backups: u64 = h.targets.iter().map(|t| u64::from(t.backups)).sum();
    let stored: u64 = h.targets.iter().map(|t| t.stored_bytes).sum();
    let agents = if h.agents_connected == 1 {
        "1 agent connected".to_string()
    } else {
        format!("{} agents connected", h.agents_connected)
    };
    let mut parts = vec![
        format!(
            "{}: {} healthy, {} degraded, {} unhealthy",
            count(h.targets.len() as u64, "target"),
            of("healthy"),
            of("degraded"),
            of("unhealthy")
        ),
        format!(
            "{}, {} stored",
            count(backups, "backup"),
            human_bytes(stored)
        ),
        agents,
    ];
    if let Some(q) = h.queue {
        parts.push(format!(
            "queue: {} running, {} waiting (limit {})",
            q.running, q.waiting, q.limit
        ));
    }
    parts.push("times UTC".into());
    parts.join("; ")
}

/// The result of a restore or verify: its message, or JSON with the backup
/// (and, for restores, the database written).
/// `dsctl cancel`: one line per cancelled job.
pub fn cancelled(jobs: &[CancelledJob], as_json: bool) {
    if as_json {
        let v: Vec<Value> = jobs
            .iter()
            .map(|j| {
                json!({
                    "job_id": j.job_id,
                    "kind": j.kind,
                    "target": j.target,
                    "backup_id": j.backup_id,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "cancelled": v })).unwrap_or_default()
        );
        return;
    }
    for j in jobs {
        println!(
            "cancelled {} of {} (backup {}, job {})",
            j.kind, j.target, j.backup_id, j.job_id
        );
    }
}

pub fn job_done(done: &JobDone, as_json: bool, with_target_db: bool) {
    if !as_json {
        println!("{}", done.message);
        return;
    }
    let mut v = json!({
        "ok": true,
        "message": done.message,
        "backup": done.backup.as_ref().map(backup_json),
    });
    if with_target_db {
        v["target_db"] = if done.target_db.is_empty() {
            Value::Null
        } else {
            done.target_db.clone().into()
        };
    }
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

fn short_time(rfc: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc)
        .map(|d| {
            d.with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|_| rfc.to_string())
}

pub fn backups(list: &[Backup], as_json: bool) {
    if as_json {
        let v: Vec<Value> = list.iter().map(backup_json).collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    if list.is_empty() {
        println!("no backups");
        return;
    }
    Columns::<Backup>::new()
        .col("ID", |b| b.id.clone())
        .col("TARGET", |b| b.target.clone())
        .col("DATABASES", databases_column)
        .col("DATE", |b| short_time(&b.created_at))
        .col("SIZE", |b| human_bytes(b.stored_bytes))
        .col("TYPE", |b| b.kind.clone())
        .col("STATUS", |b| b.status.clone())
        .col("TAGS", |b| b.tags.join(","))
        .col("PINNED", |b| if b.pinned { "yes" } else { "" }.to_string())
        .col("PROVEN", |b| match (&b.drilled_at, &b.drill_result) {
            (Some(at), Some(r)) if r.starts_with("ok") => short_time(at),
            (Some(_), Some(_)) => "FAILED".into(),
            _ => String::new(),
        })
        .col("LABEL", |b| b.label.clone().unwrap_or_default())
        .print(list);
}

pub fn backup_detail(b: &Backup, as_json: bool) {
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&backup_json(b)).unwrap_or_default()
        );
        return;
    }
    let mut rows: Vec<(&str, String)> = vec![
        ("id", b.id.clone()),
        ("target", b.target.clone()),
        ("agent", b.agent.clone()),
        ("status", b.status.clone()),
        ("kind", b.kind.clone()),
        ("trigger", b.trigger.clone()),
        ("label", b.label.clone().unwrap_or_default()),
        ("created", b.created_at.clone()),
        ("finished", b.finished_at.clone().unwrap_or_default()),
        (
            "duration",
            format!("{:.1} s", b.duration_ms as f64 / 1000.0),
        ),
    ];
    if b.whole_server {
        rows.extend(server_rows(b));
    } else {
        rows.push((
            "database",
            format!(
                "{} on {} (PostgreSQL {})",
                b.database, b.db_host, b.server_version
            ),
        ));
    }
    rows.extend([
        ("pg_dump", b.pg_dump_version.clone()),
        ("extensions", every(b, |p| &p.extensions, &b.extensions)),
        ("roles", every(b, |p| &p.roles, &b.roles)),
        ("system identifier", b.system_identifier.clone()),
        (
            "size",
            format!(
                "{} stored, {} from pg_dump",
                human_bytes(b.stored_bytes),
                human_bytes(b.raw_bytes)
            ),
        ),
        ("compression", b.compression.clone()),
        ("encrypted", b.encrypted.to_string()),
        ("checksum", b.checksum.clone()),
        ("pg_dump checksum", b.raw_checksum.clone()),
        (
            "object",
            if b.whole_server {
                "one per database (dsctl export ID --database NAME)".into()
            } else {
                b.object_key.clone()
            },
        ),
        (
            "globals",
            match b.parts.iter().find(|p| p.name == "globals") {
                None => "not captured (backup from before globals were taken)".into(),
                Some(p) => format!(
                    "{} stored, {} of SQL ({}), checksum {}",
                    human_bytes(p.stored_bytes),
                    human_bytes(p.raw_bytes),
                    if p.role_passwords {
                        "roles with passwords"
                    } else {
                        "roles without passwords: the agent's role is not a superuser"
                    },
                    p.checksum
                ),
            },
        ),
        (
            "rows",
            if b.whole_server {
                let tables = b.parts.iter().map(|p| p.tables.len()).sum::<usize>();
                format!(
                    "{} in {tables} table{} of {} databases at backup time (dsctl --json get lists them)",
                    b.parts.iter().flat_map(|p| &p.tables).map(|t| t.rows).sum::<u64>(),
                    if tables == 1 { "" } else { "s" },
                    databases_of(b).len()
                )
            } else if !b.tables.is_empty() {
                format!(
                    "{} at backup time (dsctl --json get lists them)",
                    rows_in(&b.tables)
                )
            } else if !b.rows_not_counted.is_empty() {
                format!("not counted: {}", b.rows_not_counted)
            } else {
                "not counted (no tables, or a backup from before rows were counted)".into()
            },
        ),
        ("tags", b.tags.join(",")),
        ("pinned", b.pinned.to_string()),
        (
            "next backup",
            b.next_backup_at
                .clone()
                .unwrap_or_else(|| "not scheduled".into()),
        ),
    ]);
    if let Some(e) = &b.error {
        rows.push(("error", e.clone()));
    }
    if let Some(v) = &b.verified_at {
        rows.push((
            "verified",
            format!("{v}: {}", b.verify_result.clone().unwrap_or_default()),
        ));
    }
    rows.push((
        "last proven",
        match (&b.drilled_at, &b.drill_result) {
            (Some(at), Some(r)) => format!("{at}: {r}"),
            _ => "never (dsctl verify --restore ID runs a restore drill)".into(),
        },
    ));
    let kv = Columns::<(&str, String)>::new()
        .col("", |r| r.0.to_string())
        .col("", |r| r.1.clone());
    println!("{}", kv.render(&rows, false));
}

pub fn agents(list: &[AgentInfo], as_json: bool) {
    if as_json {
        let v: Vec<Value> = list
            .iter()
            .map(|a| {
                json!({
                    "name": a.name,
                    "version": a.version,
                    "targets": a.targets,
                    "connected_since": a.connected_since,
                    "last_seen": a.last_seen,
                    "peer_addr": a.peer_addr,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    if list.is_empty() {
        println!("no agents connected");
        return;
    }
    Columns::<AgentInfo>::new()
        .col("AGENT", |a| a.name.clone())
        .col("TARGETS", |a| a.targets.join(","))
        .col("VERSION", |a| a.version.clone())
        .col("CONNECTED SINCE", |a| short_time(&a.connected_since))
        .col("LAST SEEN", |a| short_time(&a.last_seen))
        .col("ADDRESS", |a| a.peer_addr.clone())
        .print(list);
}

/// `dsctl targets`.
pub fn targets(list: &[TargetInfoRow], as_json: bool) {
    if as_json {
        let v: Vec<Value> = list
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "agent": t.agent,
                    "connected": t.connected,
                    "last_contact": t.last_contact,
                    "cert_expires": t.cert_expires,
                    "first_seen": t.first_seen,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    if list.is_empty() {
        println!("no targets yet (an agent registers its targets when it connects)");
        return;
    }
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            short_time(s)
        }
    };
    Columns::<TargetInfoRow>::new()
        .col("TARGET", |t| t.name.clone())
        .col("AGENT", |t| {
            if t.agent.is_empty() {
                "-".to_string()
            } else {
                t.agent.clone()
            }
        })
        .col("CONNECTED", |t| {
            if t.connected { "yes" } else { "no" }.to_string()
        })
        .col("LAST CONTACT", |t| dash(&t.last_contact))
        .col("CERT EXPIRES", |t| dash(&t.cert_expires))
        .print(list);
}

/// Catalog rebuild: what was imported and what was not.
pub fn rebuild(imported: &[String], already_known: u32, problems: &[String], as_json: bool) {
    if as_json {
        let v = json!({
            "imported": imported,
            "already_known": already_known,
            "problems": problems,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!(
        "imported {}, {} already in the catalog, {}",
        count(imported.len() as u64, "backup"),
        already_known,
        count(problems.len() as u64, "problem")
    );
    for id in imported {
        println!("imported  {id}");
    }
    for p in problems {
        println!("problem   {p}");
    }
}

fn unix_time(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| t.to_string())
}

/// A token's state as `dsctl tokens list` shows it.
fn token_status(t: &JoinToken, now: i64) -> &'static str {
    if t.revoked_unix != 0 {
        "revoked"
    } else if now >= t.expires_unix {
        "expired"
    } else if t.uses_allowed > 0 && t.uses >= t.uses_allowed {
        "used up"
    } else {
        "active"
    }
}

fn token_json(t: &JoinToken, now: i64) -> Value {
    let time = |v: i64| {
        (v != 0)
            .then(|| chrono::DateTime::from_timestamp(v, 0).map(|d| d.to_rfc3339()))
            .flatten()
    };
    json!({
        "id": t.id,
        "targets": t.targets,
        "status": token_status(t, now),
        "created": time(t.created_unix),
        "created_by": t.created_by,
        "expires": time(t.expires_unix),
        "uses_allowed": (t.uses_allowed > 0).then_some(t.uses_allowed),
        "uses": t.uses,
        "revoked": time(t.revoked_unix),
        "last_used": time(t.last_used_unix),
        "agents": t.agents,
    })
}

fn uses_text(t: &JoinToken) -> String {
    if t.uses_allowed == 0 {
        format!("{} (no limit)", t.uses)
    } else {
        format!("{} of {}", t.uses, t.uses_allowed)
    }
}

/// `dsctl tokens create`: the token alone on stdout (`T=$(dsctl tokens
/// create ...)`), what it allows on stderr.
pub fn token_created(r: &CreateTokenResponse, as_json: bool) {
    let now = chrono::Utc::now().timestamp();
    let Some(t) = &r.info else {
        println!("{}", r.token);
        return;
    };
    if as_json {
        let mut v = token_json(t, now);
        v["token"] = json!(r.token);
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!("{}", r.token);
    let hours = (t.expires_unix - now).max(0) as f64 / 3600.0;
    eprintln!(
        "join token {} for target{} {}: expires {} UTC (in {:.1} h), {}",
        t.id,
        if t.targets.len() == 1 { "" } else { "s" },
        t.targets.join(", "),
        unix_time(t.expires_unix),
        hours,
        if t.uses_allowed == 0 {
            "any number of agents".to_string()
        } else if t.uses_allowed == 1 {
            "one agent".to_string()
        } else {
            format!("up to {} agents", t.uses_allowed)
        }
    );
    eprintln!("it is shown only now and works like a password: give it to the agent as DATASAVER_JOIN_TOKEN (or DATASAVER_JOIN_TOKEN_FILE), with DATASAVER_STATE_DIR on a volume that keeps the agent's certificate");
}

/// `dsctl tokens list`.
pub fn tokens(list: &[JoinToken], as_json: bool) {
    let now = chrono::Utc::now().timestamp();
    if as_json {
        let v: Vec<Value> = list.iter().map(|t| token_json(t, now)).collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    if list.is_empty() {
        println!("no join tokens (create one with `dsctl tokens create --target T`)");
        return;
    }
    Columns::<JoinToken>::new()
        .col("ID", |t| t.id.clone())
        .col("TARGETS", |t| t.targets.join(","))
        .col("STATUS", |t| token_status(t, now).to_string())
        .col("EXPIRES", |t| unix_time(t.expires_unix))
        .col("USES", uses_text)
        .col("AGENTS", |t| {
            if t.agents.is_empty() {
                "-".to_string()
            } else {
                t.agents.join(",")
            }
        })
        .col("CREATED BY", |t| t.created_by.clone())
        .print(list);
}

/// `dsctl tokens revoke`.
pub fn token_revoked(t: &JoinToken, as_json: bool) {
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&token_json(t, chrono::Utc::now().timestamp()))
                .unwrap_or_default()
        );
        return;
    }
    println!(
        "revoked join token {} (targets {}; used {})",
        t.id,
        t.targets.join(", "),
        uses_text(t)
    );
    if !t.agents.is_empty() {
        println!(
            "agents that joined with it keep their certificates: {}",
            t.agents.join(", ")
        );
    }
}

/// `dsctl targets rebind`.
pub fn rebound(target: &str, previous: &str, as_json: bool) {
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "target": target,
                "previous_system_identifier": previous,
            }))
            .unwrap_or_default()
        );
        return;
    }
    println!(
        "target {target} released from cluster {previous}: the next cluster that streams WAL for it starts a new series (the old one stays stored)"
    );
}

/// `dsctl wal`.
pub fn wal(list: &[datasaver_common::proto::WalTarget], as_json: bool) {
    if as_json {
        let v: Vec<Value> = list
            .iter()
            .map(|t| {
                json!({
                    "target": t.target,
                    "system_identifier": t.system_identifier,
                    "bound_at": t.bound_at,
                    "streaming": t.streaming,
                    "stored_end_lsn": t.stored_end_lsn,
                    "server_lsn": t.server_lsn,
                    "lag_bytes": t.lag_bytes,
                    "lag_seconds": t.lag_seconds,
                    "last_stored_at": t.last_stored_at,
                    "refused": t.refused,
                    "conflict": t.conflict,
                    "latest_recoverable": t.latest_recoverable,
                    "earliest_recoverable": t.earliest_recoverable,
                    "slot_status": t.slot_status,
                    "timelines": t.timelines.iter().map(|l| json!({
                        "timeline": l.timeline,
                        "first_segment": l.first_segment,
                        "last_segment": l.last_segment,
                        "segments": l.segments,
                        "gaps": l.gaps,
                        "partial": l.partial,
                        "stored_bytes": l.stored_bytes,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    if list.is_empty() {
        println!("no target streams WAL (set DATASAVER_WAL=stream on an agent)");
        return;
    }
    for (i, t) in list.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let state = if t.streaming {
            "streaming"
        } else {
            "not streaming"
        };
        let slot = if t.slot_status.is_empty() {
            String::new()
        } else {
            format!("  slot {}", t.slot_status)
        };
        println!(
            "{}  cluster {}  {state}{slot}",
            t.target, t.system_identifier
        );
        let lag = if t.server_lsn.is_empty() {
            "server position unknown".to_string()
        } else {
            format!(
                "server at {}, lag {} ({} s)",
                t.server_lsn,
                human_bytes(t.lag_bytes),
                t.lag_seconds
            )
        };
        let last = if t.last_stored_at.is_empty() {
            "-".to_string()
        } else {
            short_time(&t.last_stored_at)
        };
        println!("  stored up to {}, last at {last}; {lag}", t.stored_end_lsn);
        if !t.latest_recoverable.is_empty() {
            println!(
                "  everything written up to {} is stored",
                short_time(&t.latest_recoverable)
            );
        }
        match (
            t.earliest_recoverable.as_str(),
            t.latest_recoverable.as_str(),
        ) {
            ("", _) => println!(
                "  no base backup yet: nothing to restore from (dsctl backup {} --physical)",
                t.target
            ),
            (from, "") => println!("  recoverable from {}", short_time(from)),
            (from, to) => println!(
                "  recovery window: {} .. {}",
                short_time(from),
                short_time(to)
            ),
        }
        if t.timelines.is_empty() {
            println!("  nothing stored yet");
        }
        for l in &t.timelines {
            let range = if l.first_segment.is_empty() {
                "no whole segment".to_string()
            } else {
                format!(
                    "{} .. {} ({} segments)",
                    l.first_segment, l.last_segment, l.segments
                )
            };
            let partial = if l.partial.is_empty() {
                String::new()
            } else {
                format!(", then {}", l.partial)
            };
            println!(
                "  timeline {}: {range}{partial}, {} stored",
                l.timeline,
                human_bytes(l.stored_bytes)
            );
            for g in &l.gaps {
                println!("    GAP: {g} missing: no restore can pass it");
            }
        }
        if !t.refused.is_empty() {
            println!(
                "  REFUSED: {} presented itself as {}; run `dsctl targets rebind {}` if the target moved to it",
                t.refused, t.target, t.target
            );
        }
        if !t.conflict.is_empty() {
            println!("  CONFLICT: {}", t.conflict);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datasaver_common::proto::{JobQueue, OpenAlert};

    fn target(name: &str, status: &str, reason: &str, backups: u32) -> TargetHealth {
        TargetHealth {
            target: name.into(),
            status: status.into(),
            status_reason: reason.into(),
            backups,
            stored_bytes: u64::from(backups) * 1024 * 1024,
            agent_connected: backups > 0,
            last_backup_at: (backups > 0).then(|| "2026-12-02T01:02:03Z".into()),
            last_backup_status: (backups > 0).then(|| "completed".into()),
            next_backup_at: Some("2026-12-03T01:00:00+00:00".into()),
            ..Default::default()
        }
    }

    #[test]
    fn health_table_has_a_cell_for_every_header_and_one_summary_line() {
        let h = HealthResponse {
            targets: vec![
                target("app", "healthy", "", 3),
                target("crm", "degraded", "no backup yet", 0),
                TargetHealth {
                    alerts: vec![OpenAlert {
                        event: "backup.failed".into(),
                        ..Default::default()
                    }],
                    ..target("erp", "unhealthy", "backup.failed", 11)
                },
            ],
            time_zone: "UTC".into(),
            status: "unhealthy".into(),
            agents_connected: 2,
            queue: Some(JobQueue {
                running: 1,
                waiting: 0,
                limit: 4,
            }),
        };
        let text = health_text(&h);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        let header: Vec<&str> = lines[0].split("  ").filter(|c| !c.is_empty()).collect();
        assert_eq!(
            header.iter().map(|c| c.trim()).collect::<Vec<_>>(),
            [
                "TARGET",
                "STATUS",
                "LAST BACKUP",
                "RESULT",
                "NEXT BACKUP",
                "BACKUPS",
                "STORED",
                "AGENT",
                "NOTE"
            ]
        );
        assert!(lines[1].starts_with("app  ") && lines[1].contains("healthy"));
        assert!(lines[2].contains("no backup yet") && lines[2].contains("degraded"));
        assert!(lines[3].ends_with("backup.failed"), "{}", lines[3]);
        assert_eq!(
            lines[4],
            "3 targets: 1 healthy, 1 degraded, 1 unhealthy; 14 backups, 14.0 MiB stored; \
             2 agents connected; queue: 1 running, 0 waiting (limit 4); times UTC"
        );
        assert!(text.lines().all(|l| l == l.trim_end()));
    }

    #[test]
    fn health_names_each_request_raised_to_the_floor_under_the_table() {
        use datasaver_common::proto::FloorRaise;
        let h = HealthResponse {
            targets: vec![
                TargetHealth {
                    raised_to_floor: vec![
                        FloorRaise {
                            setting: "keep_daily".into(),
                            asked: "0".into(),
                            floor: "7".into(),
                            message: "agent asked keep_daily=0, raised to the floor 7".into(),
                        },
                        FloorRaise {
                            message: "agent asked max_age_days=1, raised to the floor 30".into(),
                            ..Default::default()
                        },
                    ],
                    ..target("acme-main", "healthy", "", 2)
                },
                target("globex-main", "healthy", "", 1),
            ],
            time_zone: "UTC".into(),
            status: "healthy".into(),
            agents_connected: 2,
            queue: None,
        };
        let text = health_text(&h);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert_eq!(
            lines[3],
            "acme-main: agent asked keep_daily=0, raised to the floor 7"
        );
        assert_eq!(
            lines[4],
            "acme-main: agent asked max_age_days=1, raised to the floor 30"
        );
        assert!(lines[5].starts_with("2 targets: 2 healthy"), "{text}");
    }

    #[test]
    fn health_without_notes_has_no_note_column() {
        let h = HealthResponse {
            targets: vec![target("app", "healthy", "", 1)],
            agents_connected: 1,
            ..Default::default()
        };
        let text = health_text(&h);
        assert!(!text.contains("NOTE"), "{text}");
        assert!(
            text.ends_with("1 target: 1 healthy, 0 degraded, 0 unhealthy; 1 backup, 1.0 MiB stored; 1 agent connected; times UTC"),
            "{text}"
        );
    }

    #[test]
    fn empty_fleet_still_says_so_in_one_summary() {
        let text = health_text(&HealthResponse::default());
        assert_eq!(
            text,
            "no targets yet\n0 targets: 0 healthy, 0 degraded, 0 unhealthy; 0 backups, 0 B stored; 0 agents connected; times UTC"
        );
    }

    #[test]
    fn tables_align_columns_with_spaces_only() {
        let rows = vec![("a", "1"), ("long-name", "22")];
        let t = Columns::<(&str, &str)>::new()
            .col("NAME", |r| r.0.to_string())
            .col("N", |r| r.1.to_string())
            .render(&rows, true);
        assert_eq!(t, "NAME       N\na          1\nlong-name  22");
    }
}
