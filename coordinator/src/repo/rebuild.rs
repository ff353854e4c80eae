//! Rebuilding the catalog from storage. Storage is the source of truth: every
//! `<id>.meta.json` whose object exists with the recorded size becomes a
//! completed backup again. Anything that does not add up is reported, never
//! imported as a good backup.
//!
//! A meta file is believed only about the place it was found at: its target,
//! id and object key must be the ones its own key names (a file copied into
//! another target's directory, or edited to name another target, would
//! otherwise give that target's backups away), and files over
//! [`MAX_META_BYTES`] are not read at all.

use std::collections::{HashMap, HashSet};

use super::meta::Meta;
use super::record::Kind;
use super::{keys, RepoError, Repository};

/// The largest meta file read (ours are about 1 KiB); anything bigger is
/// reported instead of read into memory.
pub const MAX_META_BYTES: u64 = 1 << 20;

#[derive(Debug, Default)]
pub struct RebuildReport {
    pub imported: Vec<String>,
    pub already_known: u32,
    pub problems: Vec<String>,
}

impl Repository {
    /// Reads a small object (a meta file) whole; more than
    /// [`MAX_META_BYTES`] is refused without reading it all. (A whole-object
    /// read, stopped early: a range past the end is an error on some S3
    /// servers.)
    pub(super) async fn read_small(&self, key: &str) -> Result<Vec<u8>, String> {
        use futures::StreamExt;
        let mut stream = self.storage.get(key).await.map_err(|e| e.to_string())?;
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
            if bytes.len() as u64 > MAX_META_BYTES {
                return Err(too_big());
            }
        }
        Ok(bytes)
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
            if o.size > MAX_META_BYTES {
                claimed.insert(o.key.clone());
                report
                    .problems
                    .push(format!("{}: {}; not imported", o.key, too_big()));
                continue;
            }
            let meta = match self.read_small(&o.key).await.and_then(|b| Meta::parse(&b)) {
                Ok(m) => m,
                Err(e) => {
                    report.problems.push(format!("{}: {e}", o.key));
                    continue;
                }
            };
            claimed.insert(o.key.clone());
            if let Err(e) = check_own_key(&o.key, &meta) {
                report
                    .problems
                    .push(format!("{}: {e}; not imported", o.key));
                continue;
            }
            // A whole-server backup has no dump of its own (its databases
            // are parts, checked below).
            let whole_server = meta.object_key.is_empty();
            claimed.insert(meta.object_key.clone());
            match sizes.get(&meta.object_key) {
                None if whole_server => {}
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
            // Each part must be there, whole, too.
            let mut parts_ok = true;
            for part in &meta.parts {
                claimed.insert(part.key.clone());
                let problem = match sizes.get(&part.key) {
                    None => Some(format!("its {} part {} is missing", part.name, part.key)),
                    Some(size) if *size != part.stored_bytes => Some(format!(
                        "its {} part {} has {size} bytes, the meta file records {}",
                        part.name, part.key, part.stored_bytes
                    )),
                    Some(_) => None,
                };
                if let Some(p) = problem {
                    report
                        .problems
                        .push(format!("{}: {p}; not imported", o.key));
                    parts_ok = false;
                }
            }
            if !parts_ok {
                continue;
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

fn too_big() -> String {
    format!("larger than {MAX_META_BYTES} bytes, too big to be a datasaver meta file (not read)")
}

/// Whether `meta`, found at `found_at`, describes the backup that key
/// belongs to: its target, id, meta key and object key are the layout's for
/// that place. `Err` says what differs.
pub(super) fn check_own_key(found_at: &str, meta: &Meta) -> Result<(), String> {
    // The target first: the likeliest tampering (a file moved or edited to
    // hand a backup to another target) gets the plainest message.
    let dir = found_at.split('/').next().unwrap_or_default();
    if meta.target != dir {
        return Err(format!(
            "records target {:?} but lies under {dir:?}",
            meta.target
        ));
    }
    let file = found_at.rsplit('/').next().unwrap_or_default();
    let file_id = file.strip_suffix(keys::META_SUFFIX).unwrap_or(file);
    if meta.id != file_id {
        return Err(format!(
            "records backup {:?} but its file name is {file:?}",
            meta.id
        ));
    }
    let Some((kind, target, id)) = keys::parse_meta_key(found_at) else {
        return Err(format!(
            "is not at a meta file's place for target {dir:?} (<target>/logical/<target>_<time>{})",
            keys::META_SUFFIX
        ));
    };
    if Kind::parse(&meta.kind) != Some(kind) {
        return Err(format!(
            "records kind {:?} but lies in a {} directory",
            meta.kind,
            kind.as_str()
        ));
    }
    if meta.meta_key != found_at {
        return Err(format!("records its own key as {:?}", meta.meta_key));
    }
    let codec: datasaver_common::codec::Compression =
        meta.compression.parse().map_err(|e| format!("{e}"))?;
    let extension = if meta.encryption.is_some() {
        format!("{}.age", codec.extension())
    } else {
        codec.extension().to_string()
    };
    let expected = keys::object_key(kind, target, id, &extension);
    let whole_server = meta.object_key.is_empty()
        && meta
            .parts
            .iter()
            .any(|p| datasaver_common::names::part_database(&p.name).is_some());
    if meta.object_key != expected && !whole_server {
        return Err(format!(
            "names object {:?}, not {expected:?} (its target, id and format)",
            meta.object_key
        ));
    }
    for part in &meta.parts {
        let expected = keys::part_key(kind, target, id, &part.name, &extension);
        if !keys::is_part_name(&part.name) || part.key != expected {
            return Err(format!(
                "names part {:?} at {:?}, not a part of its own",
                part.name, part.key
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{header, repo_with, upload, FaultyStorage};
    use super::super::Trigger;
    use super::*;

    #[tokio::test]
    async fn a_meta_file_that_does_not_describe_its_own_place_is_reported_not_imported() {
        let (repo, storage, _dir) = repo_with(FaultyStorage::new());
        let b = repo
            .begin("acme", Trigger::Manual, None, "agent1", Kind::Logical)
            .await
            .unwrap();
        let done = repo
            .ingest(
                &b.id,
                header(),
                futures::stream::iter(upload(b"acme data")),
                vec![],
            )
            .await
            .unwrap();
        let good = storage.read(&done.meta_key).await;
        let meta: Meta = Meta::parse(&good).unwrap();

        // copied into another target's directory, target edited to match it
        let id = b.id.replace("acme_", "globex_");
        let mut planted = meta.clone();
        planted.target = "globex".into();
        planted.id = id.clone();
        planted.meta_key = keys::meta_key(Kind::Logical, "globex", &id);
        storage
            .inner_put_vec(
                &keys::meta_key(Kind::Logical, "globex", &id),
                planted.to_json(),
            )
            .await;
        // a target that differs from its directory
        let mut wrong_target = meta.clone();
        wrong_target.target = "globex".into();
        let key2 = keys::meta_key(Kind::Logical, "acme", "acme_20200101_000000");
        wrong_target.id = "acme_20200101_000000".into();
        wrong_target.meta_key = key2.clone();
        storage.inner_put_vec(&key2, wrong_target.to_json()).await;
        // an oversized meta file
        let key3 = keys::meta_key(Kind::Logical, "acme", "acme_20200102_000000");
        storage
            .inner_put_vec(&key3, vec![b' '; MAX_META_BYTES as usize + 1])
            .await;

        // lose the catalog rows, rebuild
        repo.store
            .db_for_tests()
            .call(|c| {
                c.execute("DELETE FROM backups", [])?;
                Ok(())
            })
            .await
            .unwrap();
        let r = repo.rebuild().await.unwrap();
        assert_eq!(r.imported, vec![b.id.clone()]);
        let problems = r.problems.join("\n");
        assert!(
            problems.contains(&format!(
                "globex/logical/{id}.meta.json: names object \"{}\"",
                done.object_key
            )),
            "{problems}"
        );
        assert!(
            problems.contains(&format!(
                "{key2}: records target \"globex\" but lies under \"acme\""
            )),
            "{problems}"
        );
        assert!(
            problems.contains(&format!("{key3}: larger than")),
            "{problems}"
        );
        assert_eq!(r.problems.len(), 3, "{problems}");
        let ids: Vec<String> = repo
            .list(None)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec![b.id.clone()]);
    }
}
