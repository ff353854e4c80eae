//! Rebuilding the catalog from storage. Storage is the source of truth: every
//! `<id>.meta.json` whose object exists with the recorded size becomes a
//! completed backup again. Anything that does not add up is reported, never
//! imported as a good backup.

use std::collections::{HashMap, HashSet};

use futures::TryStreamExt;

use super::meta::Meta;
use super::{keys, RepoError, Repository};

#[derive(Debug, Default)]
pub struct RebuildReport {
    pub imported: Vec<String>,
    pub already_known: u32,
    pub problems: Vec<String>,
}

impl Repository {
    /// Reads a small object (a meta file) whole.
    pub(super) async fn read_small(&self, key: &str) -> Result<Vec<u8>, String> {
        let chunks: Vec<bytes::Bytes> = self
            .storage
            .get(key)
            .await
            .map_err(|e| e.to_string())?
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(chunks.concat())
    }

    /// Adds to the catalog every backup storage holds that it lacks.
    pub async fn rebuild(&self) -> Result<RebuildReport, RepoError> {
        let objects = self.storage.list("").await?;
        let sizes: HashMap<String, u64> = objects.iter().map(|o| (o.key.clone(), o.size)).collect();
        let known: HashSet<String> = self
            .store
            .list(None)
            .await?
            .into_iter()
            .map(|b| b.id)
            .collect();
        let mut report = RebuildReport::default();
        let mut claimed: HashSet<String> = HashSet::new();
        for o in objects
            .iter()
            .filter(|o| o.key.ends_with(keys::META_SUFFIX))
        {
            let meta = match self.read_small(&o.key).await.and_then(|b| Meta::parse(&b)) {
                Ok(m) => m,
                Err(e) => {
                    report.problems.push(format!("{}: {e}", o.key));
                    continue;
                }
            };
            claimed.insert(o.key.clone());
            claimed.insert(meta.object_key.clone());
            if meta.meta_key != o.key
                || datasaver_common::names::validate_backup_id(&meta.id).is_err()
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
            let record = match meta.to_record() {
                Ok(r) => r,
                Err(e) => {
                    report
                        .problems
                        .push(format!("{}: {e}; not imported", o.key));
                    continue;
                }
            };
            self.store.insert(record).await?;
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
}
