//! What a WAL stream from an agent may store, decided in one place: who may
//! stream for a target, the binding of the target to one cluster (its
//! `system_identifier`; another cluster is refused and noted for
//! `wal.sysid_mismatch`), and each file's fate (`Repository::put_wal`: a
//! conflict is refused, noted for `wal.conflict`, and ends the stream so
//! nothing after it is acknowledged). The gRPC adapter (`api::agent`) only
//! moves bytes.

use std::sync::Arc;

use bytes::Bytes;
use datasaver_common::wal::{valid_seg_size, WalFile};

use super::index::{Binding, IndexedWal};
use crate::repo::keys;
use crate::repo::wal::{PutWal, Series};
use crate::Core;

/// What an agent says when it starts streaming.
#[derive(Debug, Clone)]
pub struct Hello {
    pub target: String,
    pub system_identifier: String,
    pub timeline: u32,
    pub seg_size: u64,
    pub extension: String,
    /// each later timeline's history file (timeline, content)
    pub histories: Vec<(u32, String)>,
}

/// Why a stream or a file is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("agent {agent} does not serve target {target}: only its own agent may stream its WAL")]
    NotOwner { agent: String, target: String },
    #[error("target {target} streams WAL of cluster {bound} (bound {bound_at}); this server is cluster {got}. If the target really moved to a new cluster, run `dsctl targets rebind {target}` to start a new series")]
    OtherCluster {
        target: String,
        bound: String,
        bound_at: String,
        got: String,
    },
    #[error("WAL file {name} of target {target} differs from the one stored under that name, which is kept (two servers streaming as one target, or a damaged file); nothing after it is stored until an operator looks (`dsctl wal`)")]
    Conflict { target: String, name: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<crate::catalog::CatalogError> for Refusal {
    fn from(e: crate::catalog::CatalogError) -> Self {
        Refusal::Unavailable(e.to_string())
    }
}

impl From<crate::repo::RepoError> for Refusal {
    fn from(e: crate::repo::RepoError) -> Self {
        Refusal::Unavailable(e.to_string())
    }
}

/// An open stream of one target's WAL.
pub struct Receiver {
    core: Arc<Core>,
    pub series: Series,
    known: Vec<IndexedWal>,
    /// the last mark recorded: (server time, position)
    last_mark: Option<(i64, u64)>,
    _live: super::live::Streaming,
}

/// A stored (or already stored) file, as the agent is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub name: String,
    pub outcome: &'static str,
    pub end_lsn: u64,
}

const EXTENSIONS: [&str; 2] = [".zst", ".zst.age"];

/// How long after a commit its WAL is surely flushed, even with
/// `synchronous_commit=off` (see [`Receiver::server_position`]).
const ASYNC_COMMIT_MARGIN_MICROS: i64 = 1_000_000;

/// The most a stored file may take: a segment that compression grew a
/// little, plus the encryption's framing.
pub fn max_file_bytes(seg_size: u64) -> u64 {
    seg_size + seg_size / 64 + (1 << 20)
}

/// Opens a stream for `agent`: checks it serves the target and binds the
/// target to the cluster (or refuses another one), then indexes what
/// storage holds of the series. Returns the end of the WAL stored for the
/// hello's timeline.
pub async fn open(core: &Arc<Core>, agent: &str, hello: Hello) -> Result<(Receiver, u64), Refusal> {
    datasaver_common::names::validate_target(&hello.target)
        .map_err(|e| Refusal::Invalid(e.to_string()))?;
    if !keys::is_system_identifier(&hello.system_identifier) {
        return Err(Refusal::Invalid(format!(
            "system identifier {:?} is not a number",
            hello.system_identifier
        )));
    }
    if !valid_seg_size(hello.seg_size) || hello.timeline == 0 {
        return Err(Refusal::Invalid(format!(
            "segment size {} or timeline {} is not one Postgres uses",
            hello.seg_size, hello.timeline
        )));
    }
    if !EXTENSIONS.contains(&hello.extension.as_str()) {
        return Err(Refusal::Invalid(format!(
            "WAL extension {:?} is not one of {EXTENSIONS:?}",
            hello.extension
        )));
    }
    let target = hello.target.clone();
    let owner = core.targets.get(&target).await?.map(|t| t.agent);
    if owner.as_deref() != Some(agent) {
        return Err(Refusal::NotOwner {
            agent: agent.to_string(),
            target,
        });
    }
    let now = crate::alerts::stamp(core.clock.now());
    let binding = bind(core, &hello, &now).await?;
    if binding.system_identifier != hello.system_identifier {
        core.wal_index
            .note_refused(&target, Some(hello.system_identifier.clone()), now)
            .await?;
        core.alerter.wake.notify_one();
        return Err(Refusal::OtherCluster {
            target,
            bound: binding.system_identifier,
            bound_at: binding.bound_at,
            got: hello.system_identifier,
        });
    }
    if binding.seg_size != hello.seg_size {
        return Err(Refusal::Invalid(format!(
            "target {target}'s cluster had {} byte WAL segments and now says {}",
            binding.seg_size, hello.seg_size
        )));
    }
    if binding.refused.is_some() {
        core.wal_index
            .note_refused(&target, None, now.clone())
            .await?;
    }
    let series = Series {
        target: target.clone(),
        system_identifier: binding.system_identifier.clone(),
        seg_size: binding.seg_size,
        bound_at: binding.bound_at.clone(),
        histories: Default::default(),
    };
    if !hello.histories.is_empty() {
        record_histories(core, &series, &hello.histories).await?;
    }
    // Storage is the source of truth: what it lists is what is indexed.
    let listed = core.repo.wal_files(&series).await?;
    core.wal_index
        .replace_files(
            &target,
            &series.system_identifier,
            series.seg_size,
            listed,
            now,
        )
        .await?;
    let known = core
        .wal_index
        .files(&target, &series.system_identifier, series.seg_size)
        .await?;
    let end = known
        .iter()
        .filter(|f| timeline_of(&f.stored.file) == hello.timeline)
        .filter_map(|f| f.end_lsn)
        .max()
        .unwrap_or(0);
    let live = core.wal_live.start(&target);
    Ok((
        Receiver {
            core: core.clone(),
            series,
            known,
            last_mark: None,
            _live: live,
        },
        end,
    ))
}

/// Adds the server's timeline histories to the series' description, where
/// restores plan with them. A history differing from the stored one of the
/// same timeline is a conflict: two branches of the cluster under one name.
async fn record_histories(
    core: &Core,
    series: &Series,
    histories: &[(u32, String)],
) -> Result<(), Refusal> {
    let target = &series.target;
    let mut stored = core
        .repo
        .wal_series(target)
        .await?
        .into_iter()
        .find(|s| s.system_identifier == series.system_identifier)
        .unwrap_or_else(|| series.clone());
    let mut changed = false;
    for (tli, text) in histories {
        super::history::History::parse(*tli, text).map_err(|e| {
            Refusal::Invalid(format!(
                "the server's history of timeline {tli} is unreadable: {e}"
            ))
        })?;
        match stored.histories.get(tli) {
            Some(t) if t == text => {}
            Some(_) => {
                let name = datasaver_common::wal::history_name(*tli);
                let now = crate::alerts::stamp(core.clock.now());
                core.wal_index
                    .note_conflict(
                        target,
                        format!(
                            "the server's history of timeline {tli} differs from the stored {name}"
                        ),
                        now,
                    )
                    .await?;
                core.alerter.wake.notify_one();
                return Err(Refusal::Conflict {
                    target: target.clone(),
                    name,
                });
            }
            None => {
                stored.histories.insert(*tli, text.clone());
                changed = true;
            }
        }
    }
    if changed {
        core.repo.put_wal_series(&stored).await?;
    }
    Ok(())
}

fn timeline_of(f: &WalFile) -> u32 {
    match f {
        WalFile::Segment(s) | WalFile::Partial(s) => s.timeline,
        WalFile::History(t) => *t,
    }
}

/// The binding in force for the hello's target: the catalog's; without one
/// (a new target, or a catalog rebuilt), the newest series storage holds;
/// without that, a new series for the hello's cluster.
async fn bind(core: &Core, hello: &Hello, now: &str) -> Result<Binding, Refusal> {
    if let Some(b) = core.wal_index.binding(&hello.target).await? {
        if !b.system_identifier.is_empty() {
            return Ok(b);
        }
    } else if let Some(newest) = core
        .repo
        .wal_series(&hello.target)
        .await?
        .into_iter()
        .max_by(|a, b| a.bound_at.cmp(&b.bound_at))
    {
        return Ok(core
            .wal_index
            .bind(
                &newest.target,
                &newest.system_identifier,
                newest.seg_size,
                newest.bound_at,
            )
            .await?);
    }
    let series = Series {
        target: hello.target.clone(),
        system_identifier: hello.system_identifier.clone(),
        seg_size: hello.seg_size,
        bound_at: now.to_string(),
        histories: Default::default(),
    };
    // Its description first: a rebuild must find the segment size.
    core.repo.put_wal_series(&series).await?;
    let b = core
        .wal_index
        .bind(
            &series.target,
            &series.system_identifier,
            series.seg_size,
            series.bound_at.clone(),
        )
        .await?;
    tracing::info!(target = %series.target, system_identifier = %b.system_identifier, "target bound to its cluster for WAL");
    Ok(b)
}

impl Receiver {
    /// Stores one file the agent sent as `data`, whose raw bytes hash to
    /// `raw_blake3`; `end_lsn` is where a partial's WAL ends. `checksum`
    /// is the BLAKE3 of `data` as the agent computed it.
    pub async fn store(
        &mut self,
        name: &str,
        raw_blake3: &str,
        end_lsn: u64,
        checksum: &str,
        extension: &str,
        data: Bytes,
    ) -> Result<Stored, Refusal> {
        let seg_size = self.series.seg_size;
        let file = WalFile::parse(name, seg_size)
            .ok_or_else(|| Refusal::Invalid(format!("{name:?} is not a WAL file name")))?;
        let got = blake3::hash(&data).to_hex().to_string();
        if got != checksum {
            return Err(Refusal::Invalid(format!(
                "WAL file {name} arrived damaged (checksum {got}, the agent sent {checksum})"
            )));
        }
        let end = match file {
            WalFile::Segment(s) => Some(s.start(seg_size).0 + seg_size),
            WalFile::Partial(s) => {
                let start = s.start(seg_size).0;
                if end_lsn <= start || end_lsn >= start + seg_size {
                    return Err(Refusal::Invalid(format!(
                        "partial {name} says it ends at {end_lsn:#X}, outside its segment"
                    )));
                }
                Some(end_lsn)
            }
            WalFile::History(_) => None,
        };
        // Only what bears on this name: its own entry, and its segment's
        // whole file and partials (not the whole series per file).
        let segment = |f: &WalFile| match f {
            WalFile::Segment(s) | WalFile::Partial(s) => Some(*s),
            WalFile::History(_) => None,
        };
        let known: Vec<_> = self
            .known
            .iter()
            .filter(|f| {
                f.stored.file == file
                    || (segment(&file).is_some() && segment(&f.stored.file) == segment(&file))
            })
            .map(|f| f.stored.clone())
            .collect();
        let (put, removed) = self
            .core
            .repo
            .put_wal(&self.series, file, raw_blake3, extension, data, &known)
            .await?;
        let target = self.series.target.clone();
        let outcome = match put {
            PutWal::Conflict { existing } => {
                let now = crate::alerts::stamp(self.core.clock.now());
                let message = format!(
                    "WAL file {name} differs from the stored one ({} vs {})",
                    &raw_blake3[..12.min(raw_blake3.len())],
                    &existing.raw_blake3[..12]
                );
                tracing::error!(target = %target, file = %name, "{message}");
                self.core
                    .wal_index
                    .note_conflict(&target, message, now)
                    .await?;
                self.core.alerter.wake.notify_one();
                return Err(Refusal::Conflict {
                    target,
                    name: name.to_string(),
                });
            }
            PutWal::Identical(_) => "identical",
            PutWal::Superseded(_) => "superseded",
            PutWal::Stored(stored) => {
                let row = IndexedWal {
                    stored,
                    end_lsn: end,
                    stored_at: crate::alerts::stamp(self.core.clock.now()),
                };
                self.core
                    .wal_index
                    .record(
                        &target,
                        &self.series.system_identifier,
                        seg_size,
                        row.clone(),
                        removed.clone(),
                    )
                    .await?;
                self.known.retain(|f| !removed.contains(&f.stored.key));
                self.known.push(row);
                "stored"
            }
        };
        Ok(Stored {
            name: name.to_string(),
            outcome,
            end_lsn: end.unwrap_or(0),
        })
    }

    /// The server's WAL end at `time` (its clock, Unix microseconds), as
    /// the agent last saw it.
    pub async fn server_position(
        &mut self,
        lsn: u64,
        time: i64,
        slot_status: &str,
    ) -> Result<(), Refusal> {
        self.core
            .wal_live
            .server_position(&self.series.target, lsn, self.core.clock.now());
        let status: String = slot_status
            .chars()
            .filter(|c| c.is_ascii_lowercase())
            .take(20)
            .collect();
        self.core.wal_live.slot_status(&self.series.target, &status);
        if time <= ASYNC_COMMIT_MARGIN_MICROS {
            return Ok(());
        }
        // The stream's end is the server's flushed WAL; a commit with
        // synchronous_commit=off is flushed by the WAL writer within three
        // wal_writer_delay (200 ms by default). So the mark says: what was
        // committed before a second earlier ends at or before `lsn`.
        let time = time - ASYNC_COMMIT_MARGIN_MICROS;
        let (target, sysid) = (&self.series.target, &self.series.system_identifier);
        match self.last_mark {
            Some((t, _)) if time <= t => {}
            // Nothing written since: the server's WAL still ended there at
            // this later time, so the mark moves (a quiet server keeps one).
            Some((t, l)) if l == lsn => {
                self.core
                    .wal_index
                    .move_mark(target, sysid, t, time)
                    .await?;
                self.last_mark = Some((time, lsn));
            }
            _ => {
                self.core
                    .wal_index
                    .add_mark(target, sysid, time, lsn)
                    .await?;
                self.last_mark = Some((time, lsn));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::rules::{conditions, Kind};
    use crate::testing::fixture;
    use datasaver_common::checksum::blake3_hex;
    use datasaver_common::wal::DEFAULT_SEG_SIZE as SEG;

    fn hello(sysid: &str) -> Hello {
        Hello {
            target: "app".into(),
            system_identifier: sysid.into(),
            timeline: 1,
            seg_size: SEG,
            extension: ".zst".into(),
            histories: Vec::new(),
        }
    }

    async fn put(r: &mut Receiver, name: &str, raw: &[u8], end: u64) -> Result<Stored, Refusal> {
        // The "stored form" here is the raw bytes: the coordinator never
        // looks inside.
        let data = Bytes::copy_from_slice(raw);
        r.store(name, &blake3_hex(raw), end, &blake3_hex(raw), ".zst", data)
            .await
    }

    #[tokio::test]
    async fn owners_clusters_retries_and_conflicts() {
        let f = fixture(Default::default());
        let core = &f.core;
        core.targets
            .claim("app", "agent-a", "t0".into())
            .await
            .unwrap();
        // Only the target's agent.
        assert!(matches!(
            open(core, "agent-b", hello("7301")).await,
            Err(Refusal::NotOwner { .. })
        ));
        let (mut r, end) = open(core, "agent-a", hello("7301")).await.unwrap();
        assert_eq!(end, 0);
        let seg1 = "000000010000000000000001";
        assert_eq!(
            put(&mut r, seg1, b"one", 0).await.unwrap().outcome,
            "stored"
        );
        assert_eq!(
            put(&mut r, seg1, b"one", 0).await.unwrap().outcome,
            "identical"
        );
        // Bytes damaged on the way: refused, nothing stored.
        let e = r
            .store(
                seg1,
                &blake3_hex(b"x"),
                0,
                "0000",
                ".zst",
                Bytes::from_static(b"x"),
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("arrived damaged"), "{e}");
        // A partial must end inside its segment.
        let p = "000000010000000000000002.partial";
        assert!(put(&mut r, p, b"pp", 3 * SEG).await.is_err());
        let s = put(&mut r, p, b"pp", 2 * SEG + 2).await.unwrap();
        assert_eq!((s.outcome, s.end_lsn), ("stored", 2 * SEG + 2));
        drop(r);
        // A reconnect sees where the stored WAL ends.
        let (mut r, end) = open(core, "agent-a", hello("7301")).await.unwrap();
        assert_eq!(end, 2 * SEG + 2);

        // A different file under a stored name: refused, the original kept,
        // the condition raised.
        let e = put(&mut r, seg1, b"not one", 0).await.unwrap_err();
        assert!(matches!(e, Refusal::Conflict { .. }), "{e}");
        let files = core.repo.wal_files(&r.series).await.unwrap();
        assert!(files.iter().any(|w| w.raw_blake3 == blake3_hex(b"one")));
        assert!(!files.iter().any(|w| w.raw_blake3 == blake3_hex(b"not one")));
        let facts = crate::alerts::facts(core, "app").await;
        let now = core.clock.now();
        let kinds: Vec<Kind> = conditions(&facts, &Default::default(), now)
            .into_iter()
            .map(|c| c.kind)
            .collect();
        assert!(kinds.contains(&Kind::WalConflict), "{kinds:?}");

        // Another cluster: refused and noted; the bound one clears it.
        assert!(matches!(
            open(core, "agent-a", hello("4242")).await,
            Err(Refusal::OtherCluster { .. })
        ));
        let facts = crate::alerts::facts(core, "app").await;
        assert!(conditions(&facts, &Default::default(), now)
            .iter()
            .any(|c| c.kind == Kind::WalSysidMismatch));
        open(core, "agent-a", hello("7301")).await.unwrap();
        let facts = crate::alerts::facts(core, "app").await;
        assert!(!conditions(&facts, &Default::default(), now)
            .iter()
            .any(|c| c.kind == Kind::WalSysidMismatch));

        // A timeline's history goes into the series' description; the same
        // again changes nothing; another history of that timeline is a
        // conflict, and the stored one is kept.
        let h2 = "1\t0/3000158\tno recovery target specified\n".to_string();
        let mut h = hello("7301");
        h.histories = vec![(2, h2.clone())];
        open(core, "agent-a", h.clone()).await.unwrap();
        open(core, "agent-a", h.clone()).await.unwrap();
        let stored = |core: &Arc<Core>| {
            let core = core.clone();
            async move {
                core.repo.wal_series("app").await.unwrap()[0]
                    .histories
                    .clone()
            }
        };
        assert_eq!(stored(core).await.get(&2), Some(&h2));
        h.histories = vec![(2, "1\t0/4000000\tanother branch\n".into())];
        assert!(matches!(
            open(core, "agent-a", h.clone()).await,
            Err(Refusal::Conflict { .. })
        ));
        assert_eq!(stored(core).await.get(&2), Some(&h2));
        h.histories = vec![(2, "garbage".into())];
        let e = open(core, "agent-a", h).await.err().expect("refused");
        assert!(
            e.to_string()
                .contains("history of timeline 2 is unreadable"),
            "{e}"
        );

        // A lost catalog binds to the series storage holds, not the caller.
        core.wal_index.forget("app").await;
        assert!(matches!(
            open(core, "agent-a", hello("4242")).await,
            Err(Refusal::OtherCluster { .. })
        ));
    }
}
