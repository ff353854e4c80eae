//! Rebuilding the catalog from storage. Storage is the source of truth: every
//! `<id>.meta.json` whose object exists with the recorded size becomes a
//! completed backup again. Anything that does not add up is reported, never
//! imported as a good backup.

use std::collections::{HashMap, HashSet};

use futures::TryStreamExt;

use crate::catalog::{status, BackupRow};
use crate::meta::Meta;
use crate::Core;

#[derive(Debug, Default)]
pub struct Report {
    pub imported: Vec<String>,
    pub already_known: u32,
    pub problems: Vec<String>,
}

pub fn row_from_meta(m: &Meta) -> BackupRow {
    BackupRow {
        id: m.id.clone(),
        target: m.target.clone(),
        kind: m.kind.clone(),
        status: status::COMPLETED.into(),
        trigger: m.trigger.clone(),
        label: m.label.clone(),
        created_at: m.created_at.clone(),
        finished_at: m.finished_at.clone(),
        duration_ms: m.duration_ms,
        raw_bytes: m.raw_bytes,
        stored_bytes: m.stored_bytes,
        checksum: m.checksum.clone(),
        compression: m.compression.clone(),
        encrypted: m.encryption.is_some(),
        encryption_recipient: m
            .encryption
            .as_ref()
            .map(|e| e.recipient.clone())
            .unwrap_or_default(),
        format: m.format.clone(),
        object_key: m.object_key.clone(),
        meta_key: m.meta_key.clone(),
        database: m.database.name.clone(),
        db_host: m.database.host.clone(),
        server_version: m.database.server_version.clone(),
        pg_dump_version: m.pg_dump_version.clone(),
        error: None,
        pinned: m.pinned,
        tags: m.tags.clone(),
        agent: m.agent.clone(),
        verified_at: m.verified_at.clone(),
        verify_result: m.verify_result.clone(),
    }
}

async fn read_small(core: &Core, key: &str) -> Result<Vec<u8>, String> {
    let chunks: Vec<bytes::Bytes> = core
        .storage
        .get(key)
        .await
        .map_err(|e| e.to_string())?
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(chunks.concat())
}

pub async fn rebuild(core: &Core) -> Result<Report, String> {
    let objects = core.storage.list("").await.map_err(|e| e.to_string())?;
    let sizes: HashMap<String, u64> = objects.iter().map(|o| (o.key.clone(), o.size)).collect();
    let known: HashSet<String> = core
        .catalog
        .list(None)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|b| b.id)
        .collect();
    let mut report = Report::default();
    let mut claimed: HashSet<String> = HashSet::new();
    for o in objects.iter().filter(|o| o.key.ends_with(".meta.json")) {
        let meta: Meta = match read_small(core, &o.key).await.and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| format!("not a datasaver meta file: {e}"))
        }) {
            Ok(m) => m,
            Err(e) => {
                report.problems.push(format!("{}: {e}", o.key));
                continue;
            }
        };
        claimed.insert(o.key.clone());
        claimed.insert(meta.object_key.clone());
        if meta.meta_key != o.key || datasaver_common::names::validate_backup_id(&meta.id).is_err()
        {
            report.problems.push(format!(
                "{}: its contents describe another backup ({})",
                o.key, meta.meta_key
            ));
            continue;
        }
        match sizes.get(&meta.object_key) {
            None => {
                report.problems.push(format!(
                    "{}: its object {} is missing; not imported",
                    o.key, meta.object_key
                ));
                continue;
            }
            Some(size) if *size != meta.stored_bytes => {
                report.problems.push(format!(
                    "{}: its object {} has {size} bytes, the meta file records {}; not imported",
                    o.key, meta.object_key, meta.stored_bytes
                ));
                continue;
            }
            Some(_) => {}
        }
        if known.contains(&meta.id) {
            report.already_known += 1;
            continue;
        }
        core.catalog
            .insert(row_from_meta(&meta))
            .await
            .map_err(|e| format!("catalog insert of {} failed: {e}", meta.id))?;
        report.imported.push(meta.id.clone());
    }
    for o in &objects {
        if !claimed.contains(&o.key) && !o.key.starts_with(".datasaver") {
            report.problems.push(format!(
                "{}: object without a meta file ({} bytes); not imported",
                o.key, o.size
            ));
        }
    }
    report.imported.sort();
    Ok(report)
}
