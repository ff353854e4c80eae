//! The `<id>.meta.json` file written beside each backup object: the one
//! mapping between a [`BackupRecord`] and its JSON. It holds everything the
//! catalog knows about a completed backup, so the catalog can be rebuilt from
//! storage alone. It never contains key material.

use serde::{Deserialize, Serialize};

use super::record::{format_time, parse_time, BackupRecord, Kind, Status, Trigger, Verification};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseInfo {
    pub name: String,
    pub host: String,
    pub server_version: String,
    /// The extensions the database uses (absent in older meta files).
    #[serde(default)]
    pub extensions: Vec<String>,
    /// The server's `system_identifier` (absent in older meta files).
    #[serde(default)]
    pub system_identifier: String,
    /// The roles the database's objects name (absent in older meta files).
    #[serde(default)]
    pub roles: Vec<String>,
    /// Owner, encoding and locale of the database (absent in older files).
    #[serde(default, flatten)]
    pub shape: super::record::DatabaseShape,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionInfo {
    /// The public recipient the agent encrypted to (never a secret).
    pub recipient: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub meta_version: u32,
    pub id: String,
    pub target: String,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub kind: String,
    pub trigger: String,
    pub label: Option<String>,
    pub database: DatabaseInfo,
    pub pg_dump_version: String,
    pub format: String,
    pub compression: String,
    pub encryption: Option<EncryptionInfo>,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub duration_ms: u64,
    pub checksum: String,
    /// Of the plain pg_dump output (absent in older meta files).
    #[serde(default)]
    pub raw_checksum: String,
    pub tags: Vec<String>,
    pub object_key: String,
    /// Further objects stored with the dump (absent in older meta files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<super::record::PartRecord>,
    /// Each table's rows at backup time (absent in older meta files).
    #[serde(default, skip_serializing_if = "super::record::RowCounts::is_empty")]
    pub row_counts: super::record::RowCounts,
    pub meta_key: String,
    pub agent: String,
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub verified_at: Option<String>,
    #[serde(default)]
    pub verify_result: Option<String>,
    /// The last restore drill (absent in older meta files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drilled_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill_result: Option<String>,
    /// A base backup's place in the WAL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical: Option<super::record::Physical>,
}

impl Meta {
    pub fn from_record(b: &BackupRecord) -> Self {
        Self {
            meta_version: 1,
            id: b.id.clone(),
            target: b.target.clone(),
            created_at: format_time(b.created_at),
            finished_at: b.finished_at.map(format_time),
            kind: b.kind.as_str().into(),
            trigger: b.trigger.as_str().into(),
            label: b.label.clone(),
            database: DatabaseInfo {
                name: b.database.clone(),
                host: b.db_host.clone(),
                server_version: b.server_version.clone(),
                extensions: b.extensions.clone(),
                system_identifier: b.system_identifier.clone(),
                roles: b.roles.clone(),
                shape: b.database_shape.clone(),
            },
            pg_dump_version: b.pg_dump_version.clone(),
            format: b.format.clone(),
            compression: b.compression.clone(),
            encryption: b.encrypted.then(|| EncryptionInfo {
                recipient: b.encryption_recipient.clone(),
            }),
            raw_bytes: b.raw_bytes,
            stored_bytes: b.stored_bytes,
            duration_ms: b.duration_ms,
            checksum: b.checksum.clone(),
            raw_checksum: b.raw_checksum.clone(),
            tags: b.tags.clone(),
            object_key: b.object_key.clone(),
            parts: b.parts.clone(),
            row_counts: b.row_counts.clone(),
            meta_key: b.meta_key.clone(),
            agent: b.agent.clone(),
            pinned: b.pinned,
            verified_at: b.verification.as_ref().map(|v| format_time(v.at)),
            verify_result: b.verification.as_ref().map(Verification::result),
            drilled_at: b.drill.as_ref().map(|v| format_time(v.at)),
            drill_result: b.drill.as_ref().map(Verification::result),
            physical: b.physical,
        }
    }

    /// The completed backup this file describes; `Err` says what does not
    /// add up (a field this build does not know, a bad time).
    pub fn to_record(&self) -> Result<BackupRecord, String> {
        let time = |what: &str, s: &str| {
            parse_time(s).ok_or_else(|| format!("{what} {s:?} is not an RFC 3339 time"))
        };
        Ok(BackupRecord {
            id: self.id.clone(),
            target: self.target.clone(),
            kind: Kind::parse(&self.kind).ok_or_else(|| format!("unknown kind {:?}", self.kind))?,
            status: Status::Completed,
            trigger: Trigger::parse(&self.trigger)
                .ok_or_else(|| format!("unknown trigger {:?}", self.trigger))?,
            label: self.label.clone(),
            created_at: time("created_at", &self.created_at)?,
            finished_at: self
                .finished_at
                .as_deref()
                .map(|f| time("finished_at", f))
                .transpose()?,
            duration_ms: self.duration_ms,
            raw_bytes: self.raw_bytes,
            stored_bytes: self.stored_bytes,
            checksum: self.checksum.clone(),
            compression: self.compression.clone(),
            encrypted: self.encryption.is_some(),
            encryption_recipient: self
                .encryption
                .as_ref()
                .map(|e| e.recipient.clone())
                .unwrap_or_default(),
            format: self.format.clone(),
            object_key: self.object_key.clone(),
            meta_key: self.meta_key.clone(),
            database: self.database.name.clone(),
            db_host: self.database.host.clone(),
            server_version: self.database.server_version.clone(),
            pg_dump_version: self.pg_dump_version.clone(),
            extensions: self.database.extensions.clone(),
            system_identifier: self.database.system_identifier.clone(),
            raw_checksum: self.raw_checksum.clone(),
            roles: self.database.roles.clone(),
            database_shape: self.database.shape.clone(),
            parts: self.parts.clone(),
            row_counts: self.row_counts.clone(),
            error: None,
            pinned: self.pinned,
            tags: self.tags.clone(),
            agent: self.agent.clone(),
            verification: Verification::parse(
                self.verified_at.as_deref(),
                self.verify_result.as_deref(),
            ),
            drill: Verification::parse(self.drilled_at.as_deref(), self.drill_result.as_deref()),
            physical: self.physical,
        })
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    pub fn parse(bytes: &[u8]) -> Result<Meta, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not a datasaver meta file: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn json_has_the_documented_fields_no_secret_and_reads_back() {
        let mut b = BackupRecord::running(
            "a_20240101_000000".into(),
            "a",
            Trigger::Manual,
            Some("before upgrade".into()),
            "agent1",
            chrono::Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap(),
        );
        b.status = Status::Completed;
        b.encrypted = true;
        b.encryption_recipient = "age1xyz".into();
        b.checksum = "blake3:ab".into();
        b.extensions = vec!["hstore".into(), "plpgsql".into()];
        b.system_identifier = "7312345678901234567".into();
        b.raw_checksum = "blake3:cd".into();
        b.roles = vec!["app_owner".into(), "postgres".into()];
        b.database_shape = super::super::record::DatabaseShape {
            owner: "app_owner".into(),
            encoding: "UTF8".into(),
            collate: "C".into(),
            ctype: "C.UTF-8".into(),
            explicit_acl: true,
            grants: vec![super::super::record::DatabaseGrant {
                grantee: "app_reader".into(),
                privilege: "CONNECT".into(),
                grantable: false,
            }],
            settings: vec![
                super::super::record::DatabaseSetting {
                    role: String::new(),
                    config: "search_path=app, public".into(),
                },
                super::super::record::DatabaseSetting {
                    role: "app_reader".into(),
                    config: "statement_timeout=3s".into(),
                },
            ],
        };
        b.parts = vec![super::super::record::PartRecord {
            name: "globals".into(),
            key: "a/logical/a_20240101_000000.globals.sql".into(),
            stored_bytes: 10,
            checksum: "blake3:ef".into(),
            raw_bytes: 10,
            raw_checksum: "blake3:ef".into(),
            role_passwords: true,
            dump: None,
        }];
        b.finished_at = Some(b.created_at + chrono::Duration::milliseconds(1500));
        b.verification = Some(Verification {
            at: b.created_at,
            ok: true,
            detail: "checksum matches".into(),
        });
        b.drill = Some(Verification {
            at: b.created_at,
            ok: false,
            detail: "table public.t has 3 rows, 4 were recorded".into(),
        });
        let v: serde_json::Value =
            serde_json::from_slice(&Meta::from_record(&b).to_json()).unwrap();
        for field in [
            "id",
            "target",
            "created_at",
            "kind",
            "trigger",
            "label",
            "database",
            "pg_dump_version",
            "format",
            "compression",
            "encryption",
            "raw_bytes",
            "stored_bytes",
            "duration_ms",
            "checksum",
            "tags",
            "object_key",
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert_eq!(v["encryption"]["recipient"], "age1xyz");
        assert_eq!(v["database"]["extensions"][0], "hstore");
        assert_eq!(v["database"]["settings"][1]["role"], "app_reader");
        assert_eq!(v["parts"][0]["name"], "globals");
        let back = Meta::parse(&serde_json::to_vec(&v).unwrap())
            .unwrap()
            .to_record()
            .unwrap();
        assert_eq!(back, b, "the meta file gives back the same record");

        // Meta files written before extensions were recorded still read.
        let mut old = v.clone();
        old["database"]
            .as_object_mut()
            .unwrap()
            .remove("extensions");
        let back = Meta::parse(&serde_json::to_vec(&old).unwrap())
            .unwrap()
            .to_record()
            .unwrap();
        assert!(back.extensions.is_empty());
    }
}
