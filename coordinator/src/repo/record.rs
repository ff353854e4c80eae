//! The typed backup record: what the repository stores about one backup, in
//! one shape. The catalog row (`store`) and the meta file (`meta`) are its two
//! encodings, each written in exactly one place.

use chrono::{DateTime, Utc};

/// Where a backup is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Running,
    Completed,
    Failed,
    /// Stopped by a planned agent stop (SIGTERM): not a failure of the
    /// backup; the request is tried again once the agent is back.
    Interrupted,
    /// Chosen for deletion; the row goes once its objects are gone (a crash
    /// in between is finished later).
    Deleting,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Interrupted => "interrupted",
            Status::Deleting => "deleting",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        [
            Status::Running,
            Status::Completed,
            Status::Failed,
            Status::Interrupted,
            Status::Deleting,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// An attempt that ended (the newest of these is a target's last backup).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Failed | Status::Interrupted
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of artifact a backup is. One kind today; globals, base backups
/// and WAL segments join here without new copies of the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A `pg_dump` custom-format archive of one database.
    Logical,
    /// A base backup of the whole cluster (`pg_basebackup` tar), restored
    /// with the WAL stream to a point in time (issue 14).
    Base,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Logical => "logical",
            Kind::Base => "base",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "logical" => Some(Kind::Logical),
            "base" => Some(Kind::Base),
            _ => None,
        }
    }
}

/// Where a base backup sits in its cluster's WAL: a restore needs the WAL
/// from `start_lsn` and is consistent from `end_lsn` on. The agent reads
/// both from the server just before and just after `pg_basebackup`, so they
/// bound the backup's own start and end points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Physical {
    pub start_lsn: u64,
    pub end_lsn: u64,
    pub timeline: u32,
    /// The server's clock when it ended (Unix microseconds): the earliest
    /// time a restore from it can stop at.
    pub consistent_at_micros: i64,
}

/// Who asked for a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    Manual,
    Scheduled,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::Scheduled => "scheduled",
        }
    }

    pub fn parse(s: &str) -> Option<Trigger> {
        match s {
            "manual" => Some(Trigger::Manual),
            "scheduled" => Some(Trigger::Scheduled),
            _ => None,
        }
    }
}

/// The outcome of the last read of a stored object that checked it (a
/// verify, or a restore that found it corrupt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub at: DateTime<Utc>,
    pub ok: bool,
    /// What was found, e.g. "checksum matches, 42 archive entries".
    pub detail: String,
}

impl Verification {
    /// As the API and the catalog show it: `ok: …` or `failed: …`.
    pub fn result(&self) -> String {
        format!("{}: {}", if self.ok { "ok" } else { "failed" }, self.detail)
    }

    /// From the stored pair; `None` when never verified.
    pub fn parse(at: Option<&str>, result: Option<&str>) -> Option<Verification> {
        let at = parse_time(at?)?;
        let result = result?;
        let (ok, detail) = match result.split_once(": ") {
            Some(("ok", d)) => (true, d),
            Some(("failed", d)) => (false, d),
            _ => (result.starts_with("ok"), result),
        };
        Some(Verification {
            at,
            ok,
            detail: detail.to_string(),
        })
    }
}

/// The newest restore drill among `rows` (one target's backups), with its
/// backup; with `passed`, the newest that passed.
pub fn latest_drill(rows: &[BackupRecord], passed: bool) -> Option<(&BackupRecord, &Verification)> {
    rows.iter()
        .filter_map(|r| r.drill.as_ref().filter(|v| v.ok || !passed).map(|v| (r, v)))
        .max_by_key(|(_, v)| v.at)
}

/// How the backed-up database was created (owner, encoding, locale); empty
/// fields were not recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatabaseShape {
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub encoding: String,
    #[serde(default)]
    pub collate: String,
    #[serde(default)]
    pub ctype: String,
    /// The database's privileges were set explicitly: `grants` are all of them.
    #[serde(default)]
    pub explicit_acl: bool,
    #[serde(default)]
    pub grants: Vec<DatabaseGrant>,
    /// Its settings (`ALTER DATABASE ... SET`, per role too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settings: Vec<DatabaseSetting>,
}

/// One setting of the database (`role` empty: for everyone).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatabaseSetting {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub role: String,
    /// `name=value`.
    pub config: String,
}

impl From<datasaver_common::proto::DatabaseShape> for DatabaseShape {
    fn from(s: datasaver_common::proto::DatabaseShape) -> Self {
        Self {
            owner: s.owner,
            encoding: s.encoding,
            collate: s.collate,
            ctype: s.ctype,
            explicit_acl: s.explicit_acl,
            grants: s
                .grants
                .into_iter()
                .map(|g| DatabaseGrant {
                    grantee: g.grantee,
                    privilege: g.privilege,
                    grantable: g.grantable,
                })
                .collect(),
            settings: s
                .settings
                .into_iter()
                .map(|x| DatabaseSetting {
                    role: x.role,
                    config: x.config,
                })
                .collect(),
        }
    }
}

impl From<&DatabaseShape> for datasaver_common::proto::DatabaseShape {
    fn from(s: &DatabaseShape) -> Self {
        Self {
            owner: s.owner.clone(),
            encoding: s.encoding.clone(),
            collate: s.collate.clone(),
            ctype: s.ctype.clone(),
            explicit_acl: s.explicit_acl,
            grants: s
                .grants
                .iter()
                .map(|g| datasaver_common::proto::DatabaseGrant {
                    grantee: g.grantee.clone(),
                    privilege: g.privilege.clone(),
                    grantable: g.grantable,
                })
                .collect(),
            settings: s
                .settings
                .iter()
                .map(|x| datasaver_common::proto::DatabaseSetting {
                    role: x.role.clone(),
                    config: x.config.clone(),
                })
                .collect(),
        }
    }
}

/// One privilege on the database itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatabaseGrant {
    /// Empty: PUBLIC.
    pub grantee: String,
    pub privilege: String,
    #[serde(default)]
    pub grantable: bool,
}

/// A further object of a backup, stored beside its dump under the same id
/// and checked the same way. Today: `globals`, the cluster's roles, role
/// memberships and role settings (`pg_dumpall --globals-only`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartRecord {
    pub name: String,
    pub key: String,
    pub stored_bytes: u64,
    /// `blake3:<hex>` of the stored bytes.
    pub checksum: String,
    pub raw_bytes: u64,
    /// `blake3:<hex>` of the plain output.
    pub raw_checksum: String,
    /// Globals only: whether role passwords are in it (taken by a
    /// superuser; otherwise with `--no-role-passwords`).
    #[serde(default)]
    pub role_passwords: bool,
    /// A database of a whole-server backup (`database:<name>` parts): what
    /// the dump it holds needs and counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump: Option<DatabaseDump>,
}

/// One database's dump in a whole-server backup: what a single-database
/// backup records on the backup itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatabaseDump {
    pub database: String,
    #[serde(default)]
    pub extensions: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub shape: DatabaseShape,
    #[serde(default)]
    pub row_counts: RowCounts,
}

/// How many rows a table had in the dump's snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableRows {
    pub schema: String,
    pub name: String,
    pub rows: u64,
}

/// The row counts of a backup, read from its archive as it was stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RowCounts {
    #[serde(default)]
    pub tables: Vec<TableRows>,
    /// Why there are none, when they could not be read.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub not_counted: String,
}

impl RowCounts {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty() && self.not_counted.is_empty()
    }
}

/// The name of the globals part.
pub const GLOBALS: &str = "globals";

/// One backup, as the repository knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRecord {
    pub id: String,
    pub target: String,
    pub kind: Kind,
    pub status: Status,
    pub trigger: Trigger,
    pub label: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// `blake3:<hex>` of the stored bytes.
    pub checksum: String,
    pub compression: String,
    pub encrypted: bool,
    /// Fingerprint of the public recipient (`age:…`), never key material.
    pub encryption_recipient: String,
    pub format: String,
    pub object_key: String,
    pub meta_key: String,
    pub database: String,
    pub db_host: String,
    pub server_version: String,
    pub pg_dump_version: String,
    /// The extensions the backed-up database uses (pg_extension names).
    pub extensions: Vec<String>,
    /// The server's `system_identifier` (empty when not recorded).
    pub system_identifier: String,
    /// `blake3:<hex>` of the plain pg_dump output (empty when not recorded).
    pub raw_checksum: String,
    /// The roles the database's objects name (owners, grantees).
    pub roles: Vec<String>,
    /// How the database was created, for a restore to do the same.
    pub database_shape: DatabaseShape,
    /// Further objects stored with the dump.
    pub parts: Vec<PartRecord>,
    /// Each table's rows at backup time.
    pub row_counts: RowCounts,
    pub error: Option<String>,
    pub pinned: bool,
    pub tags: Vec<String>,
    /// The agent that made it.
    pub agent: String,
    pub verification: Option<Verification>,
    /// The last restore drill (`dsctl verify --restore`).
    pub drill: Option<Verification>,
    /// A base backup's place in the WAL.
    pub physical: Option<Physical>,
}

impl BackupRecord {
    /// Its part called `name`, if it has one.
    pub fn part(&self, name: &str) -> Option<&PartRecord> {
        self.parts.iter().find(|p| p.name == name)
    }

    /// The databases of a whole-server backup (its `database:` parts), in
    /// the order they were dumped; empty for a single-database backup.
    pub fn databases(&self) -> Vec<&PartRecord> {
        self.parts.iter().filter(|p| p.dump.is_some()).collect()
    }

    /// The names of its databases (whole-server backups).
    pub fn database_names(&self) -> Vec<String> {
        self.databases()
            .iter()
            .filter_map(|p| p.dump.as_ref().map(|d| d.database.clone()))
            .collect()
    }

    /// A whole-server backup: its databases are parts, it has no dump of
    /// its own.
    pub fn is_whole_server(&self) -> bool {
        self.object_key.is_empty() && self.parts.iter().any(|p| p.dump.is_some())
    }

    /// Every storage key it owns: meta file, dump and parts.
    pub fn keys(&self) -> Vec<String> {
        [&self.meta_key, &self.object_key]
            .into_iter()
            .chain(self.parts.iter().map(|p| &p.key))
            .filter(|k| !k.is_empty())
            .cloned()
            .collect()
    }

    /// A backup that is about to run.
    pub fn running(
        id: String,
        target: &str,
        trigger: Trigger,
        label: Option<String>,
        agent: &str,
        created_at: DateTime<Utc>,
    ) -> BackupRecord {
        BackupRecord {
            id,
            target: target.to_string(),
            kind: Kind::Logical,
            status: Status::Running,
            trigger,
            label,
            created_at,
            finished_at: None,
            duration_ms: 0,
            raw_bytes: 0,
            stored_bytes: 0,
            checksum: String::new(),
            compression: String::new(),
            encrypted: false,
            encryption_recipient: String::new(),
            format: String::new(),
            object_key: String::new(),
            meta_key: String::new(),
            database: String::new(),
            db_host: String::new(),
            server_version: String::new(),
            pg_dump_version: String::new(),
            extensions: Vec::new(),
            system_identifier: String::new(),
            raw_checksum: String::new(),
            roles: Vec::new(),
            database_shape: DatabaseShape::default(),
            parts: Vec::new(),
            row_counts: RowCounts::default(),
            error: None,
            pinned: false,
            tags: Vec::new(),
            agent: agent.to_string(),
            verification: None,
            drill: None,
            physical: None,
        }
    }

    /// A manual backup in the GFS sense: asked for by hand with a label. An
    /// unlabelled `dsctl backup` (from an operator's own cron, say) rotates
    /// like a scheduled one.
    pub fn is_manual(&self) -> bool {
        self.trigger == Trigger::Manual && self.label.is_some()
    }

    /// Whether the last check of its stored bytes found them bad.
    pub fn known_bad(&self) -> bool {
        self.verification.as_ref().is_some_and(|v| !v.ok)
    }
}

/// RFC 3339 in UTC with milliseconds: how records store and show times.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Parses an RFC 3339 time (any offset) into UTC.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in ["running", "completed", "failed", "interrupted", "deleting"] {
            assert_eq!(Status::parse(s).map(Status::as_str), Some(s));
        }
        assert_eq!(Status::parse("done"), None);
        assert_eq!(Trigger::parse("scheduled"), Some(Trigger::Scheduled));
        assert_eq!(Kind::parse("logical"), Some(Kind::Logical));
    }

    #[test]
    fn verification_results_parse_back() {
        let v = Verification::parse(
            Some("2024-01-01T00:00:00Z"),
            Some("failed: backup x is corrupt: got a, expected b"),
        )
        .unwrap();
        assert!(!v.ok);
        assert_eq!(v.detail, "backup x is corrupt: got a, expected b");
        assert_eq!(v.result(), "failed: backup x is corrupt: got a, expected b");
        let ok = Verification::parse(Some("2024-01-01T00:00:00Z"), Some("ok: 5 entries")).unwrap();
        assert!(ok.ok);
        assert_eq!(ok.result(), "ok: 5 entries");
        assert!(Verification::parse(None, Some("ok")).is_none());
    }
}
