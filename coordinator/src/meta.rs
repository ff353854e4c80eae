//! The `<id>.meta.json` file written beside each backup object. It holds
//! everything the catalog knows about a completed backup, so the catalog can
//! be rebuilt from storage alone. It never contains key material.

use serde::{Deserialize, Serialize};

use crate::catalog::BackupRow;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseInfo {
    pub name: String,
    pub host: String,
    pub server_version: String,
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
    pub tags: Vec<String>,
    pub object_key: String,
    pub meta_key: String,
    pub agent: String,
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub verified_at: Option<String>,
    #[serde(default)]
    pub verify_result: Option<String>,
}

impl Meta {
    pub fn from_row(b: &BackupRow) -> Self {
        Self {
            meta_version: 1,
            id: b.id.clone(),
            target: b.target.clone(),
            created_at: b.created_at.clone(),
            finished_at: b.finished_at.clone(),
            kind: b.kind.clone(),
            trigger: b.trigger.clone(),
            label: b.label.clone(),
            database: DatabaseInfo {
                name: b.database.clone(),
                host: b.db_host.clone(),
                server_version: b.server_version.clone(),
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
            tags: b.tags.clone(),
            object_key: b.object_key.clone(),
            meta_key: b.meta_key.clone(),
            agent: b.agent.clone(),
            pinned: b.pinned,
            verified_at: b.verified_at.clone(),
            verify_result: b.verify_result.clone(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_documented_fields_and_no_secret() {
        let row = BackupRow {
            id: "a_20240101_000000".into(),
            target: "a".into(),
            encrypted: true,
            encryption_recipient: "age1xyz".into(),
            checksum: "blake3:ab".into(),
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_slice(&Meta::from_row(&row).to_json()).unwrap();
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
        let back: Meta = serde_json::from_value(v).unwrap();
        assert_eq!(back.id, row.id);
    }
}
