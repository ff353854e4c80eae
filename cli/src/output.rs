//! Human and JSON renderings. The JSON shape is a stable interface (SPEC §13).

use std::io::{IsTerminal, Write};

use datasaver_common::proto::{
    AgentInfo, Backup, CleanupResponse, HealthResponse, JobDone, JobProgress,
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

fn opt(s: &Option<String>) -> Value {
    s.as_ref()
        .map(|v| Value::String(v.clone()))
        .unwrap_or(Value::Null)
}

pub fn backup_json(b: &Backup) -> Value {
    json!({
        "id": b.id,
        "target": b.target,
        "created_at": b.created_at,
        "finished_at": opt(&b.finished_at),
        "kind": b.kind,
        "status": b.status,
        "trigger": b.trigger,
        "raw_bytes": b.raw_bytes,
        "stored_bytes": b.stored_bytes,
        "checksum": b.checksum,
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
        "object_key": b.object_key,
        "error": opt(&b.error),
        "verified_at": opt(&b.verified_at),
        "verify_result": opt(&b.verify_result),
        "next_scheduled_run": opt(&b.next_scheduled_run),
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
    let verb = if r.dry_run { "would delete" } else { "delete" };
    for t in &r.targets {
        println!("{}  ({})", t.target, t.policy);
        for i in &t.items {
            let action = if i.keep { "keep" } else { verb };
            println!("  {action:<12} {:<40} {}", i.id, i.reasons.join("; "));
        }
    }
    let gone = r
        .targets
        .iter()
        .flat_map(|t| &t.items)
        .filter(|i| !i.keep)
        .count();
    if r.dry_run {
        println!("dry run: {gone} backup(s) would be deleted, nothing changed");
    } else {
        println!("deleted {} backup(s)", r.deleted.len());
    }
    for f in &r.finished {
        println!("finished an interrupted deletion of {f}");
    }
    for e in &r.errors {
        println!("not deleted: {e}");
    }
}

pub fn health(h: &HealthResponse, as_json: bool) {
    if as_json {
        let v: Vec<Value> = h
            .targets
            .iter()
            .map(|t| {
                json!({
                    "target": t.target,
                    "schedule": if t.schedule.is_empty() { Value::Null } else { t.schedule.clone().into() },
                    "next_run": opt(&t.next_run),
                    "last_backup_at": opt(&t.last_backup_at),
                    "last_status": opt(&t.last_status),
                    "last_error": opt(&t.last_error),
                    "last_success_at": opt(&t.last_success_at),
                    "backups": t.backups,
                    "stored_bytes": t.stored_bytes,
                    "agent_connected": t.agent_connected,
                    "status": t.status,
                    "alerts": t.alerts,
                })
            })
            .collect();
        let out = json!({ "status": h.status, "time_zone": h.time_zone, "targets": v });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return;
    }
    if h.targets.is_empty() {
        println!("no targets yet");
        return;
    }
    let total: u64 = h.targets.iter().map(|t| t.stored_bytes).sum();
    let count: u32 = h.targets.iter().map(|t| t.backups).sum();
    let rows = h
        .targets
        .iter()
        .map(|t| {
            vec![
                t.target.clone(),
                t.status.clone(),
                t.last_status.clone().unwrap_or_else(|| "-".into()),
                t.last_backup_at
                    .as_deref()
                    .map(short_time)
                    .unwrap_or_else(|| "-".into()),
                t.next_run
                    .as_deref()
                    .map(short_time)
                    .unwrap_or_else(|| "-".into()),
                t.backups.to_string(),
                human_bytes(t.stored_bytes),
                if t.agent_connected {
                    "yes".into()
                } else {
                    "no".into()
                },
            ]
        })
        .collect();
    table(
        &[
            "TARGET",
            "LAST STATUS",
            "LAST BACKUP",
            "NEXT BACKUP",
            "BACKUPS",
            "STORED",
            "AGENT",
        ],
        rows,
    );
    println!(
        "{} target(s), {count} backup(s), {} stored; times UTC",
        h.targets.len(),
        human_bytes(total)
    );
}

/// The result of a restore or verify: its message, or JSON with the backup
/// (and, for restores, the database written).
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

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for r in rows {
        line(r);
    }
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
    let rows = list
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                b.target.clone(),
                short_time(&b.created_at),
                human_bytes(b.stored_bytes),
                b.kind.clone(),
                b.status.clone(),
                b.tags.join(","),
            ]
        })
        .collect();
    table(
        &["ID", "TARGET", "DATE", "SIZE", "TYPE", "STATUS", "TAGS"],
        rows,
    );
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
        (
            "database",
            format!(
                "{} on {} (PostgreSQL {})",
                b.database, b.db_host, b.server_version
            ),
        ),
        ("pg_dump", b.pg_dump_version.clone()),
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
        ("object", b.object_key.clone()),
        ("tags", b.tags.join(",")),
        ("pinned", b.pinned.to_string()),
        (
            "next run",
            b.next_scheduled_run
                .clone()
                .unwrap_or_else(|| "not scheduled".into()),
        ),
    ];
    if let Some(e) = &b.error {
        rows.push(("error", e.clone()));
    }
    if let Some(v) = &b.verified_at {
        rows.push((
            "verified",
            format!("{v}: {}", b.verify_result.clone().unwrap_or_default()),
        ));
    }
    for (k, v) in rows {
        println!("{k:<12} {v}");
    }
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
    let rows = list
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.targets.join(","),
                a.version.clone(),
                short_time(&a.connected_since),
                short_time(&a.last_seen),
                a.peer_addr.clone(),
            ]
        })
        .collect();
    table(
        &[
            "AGENT",
            "TARGETS",
            "VERSION",
            "CONNECTED SINCE",
            "LAST SEEN",
            "ADDRESS",
        ],
        rows,
    );
}

/// Progress on stderr, only when it is a terminal: scripts and logs get the
/// result (stdout) and, on failure, one error line (stderr), nothing else.
pub struct Progress {
    tty: bool,
    live: bool,
    last_phase: String,
}

impl Progress {
    pub fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            live: false,
            last_phase: String::new(),
        }
    }

    pub fn update(&mut self, p: &JobProgress) {
        if !self.tty {
            return;
        }
        let mut err = std::io::stderr();
        if !p.message.is_empty() {
            if self.live {
                let _ = writeln!(err);
                self.live = false;
            }
            let _ = writeln!(err, "{}", p.message);
            self.last_phase = p.phase.clone();
            return;
        }
        {
            let _ = write!(
                err,
                "\r{}: {} read, {} transferred   ",
                p.phase,
                human_bytes(p.raw_bytes),
                human_bytes(p.stored_bytes)
            );
            let _ = err.flush();
            self.live = true;
        }
    }

    pub fn finish(&mut self) {
        if self.live {
            let _ = writeln!(std::io::stderr());
            self.live = false;
        }
    }
}
