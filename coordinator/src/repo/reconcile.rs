//! Start-up reconciliation of storage against the catalog, after a crash or
//! a kill. Nothing can be running when the coordinator starts, so each row
//! still marked running is an attempt that was cut off somewhere in
//! object → meta file → row: if its object and meta file were both stored and
//! the object's checksum verifies, the backup is adopted (completed from its
//! meta file); otherwise whatever it left in storage is removed and the row is
//! failed. Partial writes (temp files, unfinished uploads) go too. Afterwards
//! no completed row lacks its object and no failed attempt leaves an object.

use datasaver_common::checksum::Checksum;
use futures::StreamExt;

use super::meta::Meta;
#[cfg(test)]
use super::record::Kind;
use super::record::{BackupRecord, Status};
use super::{hash_off_thread, keys, RepoError, Repository};

#[derive(Debug, Default)]
pub struct ReconcileReport {
    /// Partial objects of interrupted writes that were removed.
    pub removed_partial: usize,
    /// Attempts cut off before their backup was whole: now failed.
    pub failed: Vec<String>,
    /// Attempts whose object and meta file were whole and verified: now
    /// completed.
    pub adopted: Vec<String>,
    /// Objects and meta files of failed attempts that were removed.
    pub removed: Vec<String>,
    /// What could not be done (the attempt is failed, its objects kept).
    pub problems: Vec<String>,
}

impl Repository {
    /// Reconciles storage with the catalog; `reason` is recorded on the rows
    /// that are failed.
    pub async fn reconcile(&self, reason: &str) -> Result<ReconcileReport, RepoError> {
        let mut report = ReconcileReport {
            removed_partial: self.storage.cleanup_incomplete(&keys::is_own_key).await?,
            ..Default::default()
        };
        for r in self.store.running().await? {
            match self.settle(&r).await {
                Ok(Some(done)) => {
                    self.store.complete(done).await?;
                    report.adopted.push(r.id.clone());
                }
                Ok(None) => {}
                Err(e) => report.problems.push(format!("{}: {e}", r.id)),
            }
        }
        for r in self.store.fail_all_running(reason, self.now()).await? {
            report.failed.push(r.id.clone());
            let prefix = format!("{}/logical/{}.", r.target, r.id);
            let left: Vec<String> = match self.storage.list(&prefix).await {
                Ok(objs) => objs.into_iter().map(|o| o.key).collect(),
                Err(e) => {
                    report
                        .problems
                        .push(format!("{}: listing {prefix}: {e}", r.id));
                    continue;
                }
            };
            if left.is_empty() {
                continue;
            }
            match self.storage.delete(&left).await {
                Ok(()) => report.removed.extend(left),
                Err(e) => report.problems.push(format!("{}: {e}", r.id)),
            }
        }
        Ok(report)
    }

    /// The completed form of a cut-off attempt if storage holds all of it
    /// (meta file, object of the recorded size and checksum); `None` if not.
    async fn settle(&self, r: &BackupRecord) -> Result<Option<BackupRecord>, String> {
        let meta_key = keys::meta_key(r.kind, &r.target, &r.id);
        let Some(_) = self
            .storage
            .head(&meta_key)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let meta = match self
            .read_small(&meta_key)
            .await
            .and_then(|b| Meta::parse(&b))
        {
            Ok(m) => m,
            Err(_) => return Ok(None),
        };
        // Only a meta file that describes this very place is believed (its
        // object key could name another target's object).
        if super::rebuild::check_own_key(&meta_key, &meta).is_err() {
            return Ok(None);
        }
        let Ok(mut done) = meta.to_record() else {
            return Ok(None);
        };
        if done.id != r.id || done.target != r.target {
            return Ok(None);
        }
        // A whole-server backup has no dump of its own: its parts are all.
        if !done.is_whole_server() {
            let Some(info) = self
                .storage
                .head(&done.object_key)
                .await
                .map_err(|e| e.to_string())?
            else {
                return Ok(None);
            };
            if info.size != done.stored_bytes || !self.checksum_matches(&done).await {
                return Ok(None);
            }
        }
        for part in &done.parts {
            let whole = self
                .storage
                .head(&part.key)
                .await
                .map_err(|e| e.to_string())?
                .is_some_and(|i| i.size == part.stored_bytes);
            if !whole {
                return Ok(None);
            }
        }
        done.status = Status::Completed;
        // What the catalog knew of the attempt stays (its label, trigger).
        done.label = r.label.clone();
        done.trigger = r.trigger;
        Ok(Some(done))
    }

    /// Reads the whole object and compares it with its recorded checksum.
    async fn checksum_matches(&self, b: &BackupRecord) -> bool {
        let Ok(mut stream) = self.storage.get(&b.object_key).await else {
            return false;
        };
        let mut hash = Checksum::new();
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { return false };
            if hash_off_thread(&mut hash, chunk).await.is_err() {
                return false;
            }
        }
        hash.finish() == b.checksum && hash.len() == b.stored_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{header, repo_with, upload, Fault, FaultyStorage};
    use super::super::Trigger;
    use super::*;

    #[tokio::test]
    async fn a_whole_attempt_is_adopted_and_a_cut_off_one_leaves_nothing() {
        let (repo, storage, _dir) = repo_with(FaultyStorage::new());
        // Cut off after the object and meta file were stored, before the row
        // was completed: the catalog completion "never happened".
        let whole = repo
            .begin(
                "app",
                Trigger::Manual,
                Some("keep".into()),
                "agent1",
                Kind::Logical,
            )
            .await
            .unwrap();
        let done = repo
            .ingest(
                &whole.id,
                header(),
                futures::stream::iter(upload(b"whole backup")),
                vec![],
            )
            .await
            .unwrap();
        repo.store
            .db_for_tests()
            .call({
                let id = whole.id.clone();
                move |c| {
                    c.execute("UPDATE backups SET status = 'running' WHERE id = ?1", [id])?;
                    Ok(())
                }
            })
            .await
            .unwrap();
        // Cut off after the object was stored, before its meta file.
        let cut = repo
            .begin("app", Trigger::Scheduled, None, "agent1", Kind::Logical)
            .await
            .unwrap();
        storage.set(Fault::FailCall { op: "put", nth: 1 });
        let cut_key = keys::object_key(Kind::Logical, "app", &cut.id, "");
        let _ = repo
            .ingest(
                &cut.id,
                header(),
                futures::stream::iter(upload(b"cut off")),
                vec![],
            )
            .await;
        // The failed meta write rolled the object back; put one back as a
        // crash would have left it.
        storage.set(Fault::None);
        storage.inner_put_raw(&cut_key, b"cut off").await;
        // A damaged whole-looking attempt: meta and object, wrong bytes.
        let damaged = repo
            .begin("app", Trigger::Scheduled, None, "agent1", Kind::Logical)
            .await
            .unwrap();
        let d = repo
            .ingest(
                &damaged.id,
                header(),
                futures::stream::iter(upload(b"original bytes")),
                vec![],
            )
            .await
            .unwrap();
        storage
            .inner_put_raw(&d.object_key, b"originaL bytes")
            .await;
        repo.store
            .db_for_tests()
            .call({
                let id = damaged.id.clone();
                move |c| {
                    c.execute("UPDATE backups SET status = 'running' WHERE id = ?1", [id])?;
                    Ok(())
                }
            })
            .await
            .unwrap();

        let report = repo
            .reconcile("interrupted: coordinator stopped")
            .await
            .unwrap();
        assert_eq!(report.adopted, vec![whole.id.clone()]);
        let mut failed = report.failed.clone();
        failed.sort();
        let mut want = vec![cut.id.clone(), damaged.id.clone()];
        want.sort();
        assert_eq!(failed, want);
        assert!(report.problems.is_empty(), "{:?}", report.problems);

        let adopted = repo.find(&whole.id).await.unwrap();
        assert_eq!(adopted.status, Status::Completed);
        assert_eq!(adopted.label.as_deref(), Some("keep"));
        assert_eq!(adopted.checksum, done.checksum);
        // Storage holds exactly the adopted backup; no failed row kept objects.
        assert_eq!(storage.keys().await, vec![done.object_key, done.meta_key]);
        for id in [&cut.id, &damaged.id] {
            let r = repo.find(id).await.unwrap();
            assert_eq!(r.status, Status::Failed);
            assert!(r.error.unwrap_or_default().contains("coordinator stopped"));
        }
    }
}
