//! The restore path: download → BLAKE3 → decompress → pg_restore, reading
//! the stored object once. The agent checks the checksum as the bytes arrive
//! and holds back the tail of the archive until it is confirmed, so
//! pg_restore (in one transaction) can never commit a restore of bytes that
//! do not match; a mismatch is reported as such (`ChecksumMismatch`), and the
//! database a failed restore created is dropped.

use std::io::{Read, Write};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use datasaver_common::checksum::Checksum;
use datasaver_common::codec::Compression;
use datasaver_common::proto::agent_service_client::AgentServiceClient;
use datasaver_common::proto::{DownloadRequest, RestoreJob, RestoreMode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::child;
use crate::config::{Identities, TargetConfig};
use crate::pg::{quote_ident, summarize_stderr, PgTools};
use crate::progress::{Counters, Reporter};
use crate::JobError;
use datasaver_common::proto::JobErrorKind;

/// Bytes of decompressed archive withheld from pg_restore until the whole
/// download is verified. The archive's last block is always in here.
const HOLD_BACK: usize = 256 * 1024;

pub struct Outcome {
    pub message: String,
    pub target_db: String,
    pub toc_entries: u64,
}

enum Piece {
    Data(Vec<u8>),
    End,
}

/// The downloaded bytes as a `Read`, hashed as they pass. At the end of the
/// stream it compares the checksum and length and fails the read if they do
/// not match, so nothing downstream can see a clean end of a bad object.
struct VerifyingReader<'a> {
    rx: mpsc::Receiver<Piece>,
    buf: Vec<u8>,
    pos: usize,
    hash: Checksum,
    ended: bool,
    verified: bool,
    backup_id: &'a str,
    expected: &'a str,
    expected_len: u64,
    counters: &'a Counters,
    /// Set when the whole object was read and does not match its checksum.
    mismatch: Option<String>,
}

impl VerifyingReader<'_> {
    fn verify(&mut self) -> std::io::Result<()> {
        let got = self.hash.finish();
        if got != self.expected || self.hash.len() != self.expected_len {
            let m = format!(
                "backup {} is corrupt: its stored bytes have checksum {got} ({} bytes) but {} ({} bytes) was recorded when it was stored; nothing was committed",
                self.backup_id,
                self.hash.len(),
                self.expected,
                self.expected_len
            );
            self.mismatch = Some(m.clone());
            return Err(std::io::Error::other(m));
        }
        self.verified = true;
        Ok(())
    }

    /// Reads whatever a decoder left unread, so the checksum covers it all.
    fn drain(&mut self) -> std::io::Result<()> {
        let mut sink = [0u8; 64 * 1024];
        while self.read(&mut sink)? > 0 {}
        Ok(())
    }
}

impl Read for VerifyingReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.pos < self.buf.len() {
                let n = out.len().min(self.buf.len() - self.pos);
                out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.ended {
                if !self.verified {
                    self.verify()?;
                }
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Piece::Data(d)) => {
                    self.hash.update(&d);
                    self.counters
                        .stored
                        .store(self.hash.len(), Ordering::Relaxed);
                    self.buf = d;
                    self.pos = 0;
                }
                Some(Piece::End) => self.ended = true,
                None => return Err(std::io::Error::other("download interrupted")),
            }
        }
    }
}

/// How to turn stored bytes back into a pg_dump archive.
#[derive(Clone)]
struct Unpack {
    codec: Compression,
    identities: Option<Identities>,
}

/// How feeding a child failed: on the reading side (download, decryption,
/// decompression — possibly a corrupt object) or on the writing side (the
/// child stopped reading).
enum FeedError {
    Read(String),
    Write(String),
}

/// Feeds verified, decrypted, decompressed bytes to a child's stdin.
#[allow(clippy::too_many_arguments)]
fn feed(
    rx: mpsc::Receiver<Piece>,
    mut stdin: std::process::ChildStdin,
    child: &Mutex<std::process::Child>,
    unpack: Unpack,
    backup_id: &str,
    expected: &str,
    expected_len: u64,
    counters: &Counters,
    reads_prefix_only: bool,
) -> Result<(), JobError> {
    let mut source = VerifyingReader {
        rx,
        buf: Vec::new(),
        pos: 0,
        hash: Checksum::new(),
        ended: false,
        verified: false,
        backup_id,
        expected,
        expected_len,
        counters,
        mismatch: None,
    };
    // `pg_restore --list` stops reading after the table of contents; the
    // rest of the stream is still read and hashed so the whole object is
    // verified.
    let mut sink_closed = false;
    let write = |stdin: &mut std::process::ChildStdin,
                 data: &[u8],
                 closed: &mut bool|
     -> Result<(), FeedError> {
        if *closed {
            return Ok(());
        }
        match stdin.write_all(data) {
            Ok(()) => Ok(()),
            Err(e) if reads_prefix_only && e.kind() == std::io::ErrorKind::BrokenPipe => {
                *closed = true;
                Ok(())
            }
            Err(e) => Err(FeedError::Write(format!(
                "pg_restore stopped reading its input ({e})"
            ))),
        }
    };
    let unreadable = |e: std::io::Error| {
        // the verifying reader's own errors are already complete sentences
        let m = e.to_string();
        FeedError::Read(
            if m.contains("corrupt") || m.contains("download interrupted") {
                m
            } else {
                format!("backup {backup_id} cannot be read: {m}")
            },
        )
    };
    let result = (|| {
        let mut pending: Vec<u8> = Vec::new();
        {
            let decrypted: Box<dyn Read + '_> = match &unpack.identities {
                None => Box::new(&mut source),
                Some(ids) => Box::new(
                    datasaver_common::crypt::decrypt_reader(&mut source, &ids.0)
                        .map_err(|m| FeedError::Read(format!("backup {backup_id}: {m}")))?,
                ),
            };
            let mut plain = datasaver_common::codec::decode_reader(unpack.codec, decrypted)
                .map_err(|e| FeedError::Read(format!("backup {backup_id} cannot be read: {e}")))?;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = plain.read(&mut buf).map_err(unreadable)?;
                if n == 0 {
                    break;
                }
                pending.extend_from_slice(&buf[..n]);
                if pending.len() > 2 * HOLD_BACK {
                    let keep = pending.split_off(pending.len() - HOLD_BACK);
                    write(&mut stdin, &pending, &mut sink_closed)?;
                    counters
                        .raw
                        .fetch_add(pending.len() as u64, Ordering::Relaxed);
                    pending = keep;
                }
            }
        }
        // Only once every stored byte has been read and checked does the
        // archive's tail reach pg_restore.
        source.drain().map_err(unreadable)?;
        if !source.verified {
            return Err(FeedError::Read(format!(
                "backup {backup_id}: the download ended without being verified"
            )));
        }
        write(&mut stdin, &pending, &mut sink_closed)?;
        counters
            .raw
            .fetch_add(pending.len() as u64, Ordering::Relaxed);
        Ok(())
    })();
    if result.is_err() {
        // kill before closing stdin: pg_restore must not see a clean EOF
        child::kill(child);
    }
    drop(stdin);
    match result {
        Ok(()) => Ok(()),
        Err(FeedError::Write(m)) => Err(m.into()),
        Err(FeedError::Read(m)) => {
            // A decoder that chokes mid-stream usually means damaged bytes:
            // read the rest so the checksum, not a codec message, says so.
            if source.mismatch.is_none() && !source.ended {
                let _ = source.drain();
            }
            match source.mismatch.take() {
                Some(corrupt) => Err(JobError::checksum_mismatch(corrupt)),
                None => Err(m.into()),
            }
        }
    }
}

/// Streams the backup into a freshly spawned child (pg_restore); returns
/// the child's stdout.
#[allow(clippy::too_many_arguments)]
async fn stream_into(
    mut cmd: std::process::Command,
    client: &mut AgentServiceClient<Channel>,
    job: &RestoreJob,
    unpack: Unpack,
    counters: Arc<Counters>,
    cancel: &CancellationToken,
    reads_prefix_only: bool,
) -> Result<String, JobError> {
    let mut download = client
        .download(DownloadRequest {
            job_id: job.job_id.clone(),
            backup_id: job.backup_id.clone(),
        })
        .await
        .map_err(|s| format!("download failed: {}", s.message()))?
        .into_inner();
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start pg_restore: {e}"))?;
    let stdin = child.stdin.take().ok_or("pg_restore has no stdin")?;
    let stdout = child.stdout.take().ok_or("pg_restore has no stdout")?;
    let stderr = child.stderr.take().map(child::drain_stderr);
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::BufReader::new(stdout).read_to_string(&mut s);
        s
    });
    let child = Arc::new(Mutex::new(child));
    let (tx, rx) = mpsc::channel::<Piece>(4);
    let (child2, job2) = (child.clone(), job.clone());
    let feeder = tokio::task::spawn_blocking(move || {
        feed(
            rx,
            stdin,
            &child2,
            unpack,
            &job2.backup_id,
            &job2.checksum,
            job2.stored_bytes,
            &counters,
            reads_prefix_only,
        )
    });
    let transfer: Result<(), JobError> = loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => break Err("restore cancelled (agent shutting down or connection lost)".into()),
            m = download.message() => m,
        };
        match msg {
            Ok(Some(chunk)) => {
                if tx.send(Piece::Data(chunk.data)).await.is_err() {
                    break Ok(()); // the feeder stopped; its error says why
                }
            }
            Ok(None) => {
                let _ = tx.send(Piece::End).await;
                break Ok(());
            }
            // The coordinator checks the bytes as it reads them too, and says
            // DATA_LOSS when they do not match what was stored.
            Err(s) if s.code() == tonic::Code::DataLoss => {
                break Err(JobError::checksum_mismatch(format!(
                    "{}; nothing was committed",
                    s.message()
                )))
            }
            Err(s) => break Err(format!("download interrupted: {}", s.message()).into()),
        }
    };
    drop(tx);
    if transfer.is_err() {
        child::kill(&child);
    }
    let fed = feeder
        .await
        .map_err(|e| format!("restore worker failed: {e}"))?;
    let child3 = child.clone();
    let status = tokio::task::spawn_blocking(move || child::wait(&child3))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("waiting for pg_restore: {e}"))?;
    let stderr = match stderr {
        Some(h) => tokio::task::spawn_blocking(move || h.join().unwrap_or_default())
            .await
            .unwrap_or_default(),
        None => String::new(),
    };
    let stdout = tokio::task::spawn_blocking(move || out_reader.join().unwrap_or_default())
        .await
        .unwrap_or_default();
    // A corrupt object is the cause whatever else went wrong after it.
    if let Err(e) = &fed {
        if e.kind == JobErrorKind::ChecksumMismatch {
            return Err(e.clone());
        }
    }
    transfer?;
    fed?;
    if !status.success() {
        return Err(format!("pg_restore failed: {}", summarize_stderr(&stderr)).into());
    }
    Ok(stdout)
}

fn valid_db_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--target-db {name:?} is not accepted: use 1-63 letters, digits, '_' or '-'"
        ))
    }
}

pub async fn run(
    mut client: AgentServiceClient<Channel>,
    job: RestoreJob,
    target: TargetConfig,
    tools: PgTools,
    reporter: Reporter,
    cancel: CancellationToken,
) -> Result<Outcome, JobError> {
    let codec: Compression = job
        .compression
        .parse()
        .map_err(|e| format!("backup {}: {e}", job.backup_id))?;
    // Decide before touching anything whether this agent can decrypt it.
    let identities = if job.encrypted {
        let fps = target.identities.fingerprints();
        if fps.is_empty() {
            return Err(format!(
                "backup {} is encrypted to recipient {}; set DATASAVER_ENCRYPTION_IDENTITY_FILE on the agent to the matching identity (nothing was changed)",
                job.backup_id, job.encryption_recipient
            ).into());
        }
        if !job.encryption_recipient.is_empty() && !fps.contains(&job.encryption_recipient) {
            return Err(format!(
                "backup {} is encrypted to recipient {}, but the agent's identity file holds {}; nothing was changed",
                job.backup_id,
                job.encryption_recipient,
                fps.join(", ")
            ).into());
        }
        Some(target.identities.clone())
    } else {
        None
    };
    let unpack = Unpack { codec, identities };
    let db = &target.db;
    let counters = Arc::new(Counters::default());

    if job.mode == RestoreMode::List as i32 {
        reporter.phase("list", "reading the archive's table of contents");
        let ticker = reporter.start_ticker("list", counters.clone());
        let out = stream_into(
            tools.pg_restore_list(db),
            &mut client,
            &job,
            unpack.clone(),
            counters,
            &cancel,
            true,
        )
        .await;
        ticker.abort();
        let out = out?;
        let entries = out
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with(';'))
            .count() as u64;
        if entries == 0 {
            return Err(format!(
                "backup {}: the archive's table of contents is empty",
                job.backup_id
            )
            .into());
        }
        return Ok(Outcome {
            message: format!(
                "backup {}: checksum {} verified; archive readable, {entries} table-of-contents entries",
                job.backup_id, job.checksum
            ),
            target_db: String::new(),
            toc_entries: entries,
        });
    }

    let name = if job.target_db.is_empty() {
        datasaver_common::names::default_restore_db(&db.dbname, chrono::Utc::now())
    } else {
        job.target_db.clone()
    };
    valid_db_name(&name)?;
    // Admin statements run from a database we are not about to drop.
    let admin_db = if name == db.dbname {
        "postgres".to_string()
    } else {
        db.dbname.clone()
    };
    reporter.phase("prepare", &format!("preparing database {name}"));
    let exists = tools
        .psql(
            db,
            &admin_db,
            "SELECT count(*) FROM pg_database WHERE datname = :'name';",
            &[("name", &name)],
        )
        .await
        .map_err(|e| {
            format!(
                "cannot connect to the server at {}:{}: {e}",
                db.host, db.port
            )
        })?
        == "1";
    let nonempty = if exists {
        let n = tools
            .psql(
                db,
                &name,
                "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                            AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%')
                      + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema'))
                      + (SELECT count(*) FROM pg_largeobject_metadata);",
                &[],
            )
            .await
            .map_err(|e| format!("cannot inspect existing database {name}: {e}"))?;
        n.trim() != "0"
    } else {
        false
    };
    if nonempty && !job.force {
        return Err(format!(
            "database {name} already exists and is not empty; nothing was changed. Restore into a new database with --target-db, or pass --force to replace it"
        ).into());
    }
    // With --force the backup goes into a scratch database first; the
    // existing one is replaced only after the restore fully succeeded.
    let (restore_into, created) = if nonempty {
        let mut base = name.clone();
        base.truncate(40);
        (
            format!("{base}_dsrestore_{:08x}", rand::random::<u32>()),
            true,
        )
    } else if exists {
        (name.clone(), false)
    } else {
        (name.clone(), true)
    };
    if created {
        tools
            .psql(
                db,
                &admin_db,
                &format!(
                    "CREATE DATABASE {} TEMPLATE template0;",
                    quote_ident(&restore_into)
                ),
                &[],
            )
            .await
            .map_err(|e| format!("cannot create database {restore_into}: {e}"))?;
    }
    reporter.phase(
        "restore",
        &format!("restoring {} into {restore_into}", job.backup_id),
    );
    let ticker = reporter.start_ticker("restore", counters.clone());
    let restored = stream_into(
        tools.pg_restore_into(db, &restore_into),
        &mut client,
        &job,
        unpack,
        counters.clone(),
        &cancel,
        false,
    )
    .await;
    ticker.abort();
    if let Err(e) = restored {
        if created {
            if let Err(de) = tools
                .psql(
                    db,
                    &admin_db,
                    &format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE);",
                        quote_ident(&restore_into)
                    ),
                    &[],
                )
                .await
            {
                tracing::error!(database = %restore_into, error = %de, "could not drop the incomplete restore database");
            }
        }
        return Err(e);
    }
    if nonempty {
        tools
            .psql(
                db,
                &admin_db,
                &format!(
                    "DROP DATABASE {} WITH (FORCE);\nALTER DATABASE {} RENAME TO {};",
                    quote_ident(&name),
                    quote_ident(&restore_into),
                    quote_ident(&name)
                ),
                &[],
            )
            .await
            .map_err(|e| {
                format!("restored into {restore_into}, but replacing {name} failed: {e}")
            })?;
    }
    Ok(Outcome {
        message: format!(
            "restored backup {} into database {name} ({} bytes of archive)",
            job.backup_id,
            counters.raw.load(Ordering::Relaxed)
        ),
        target_db: name,
        toc_entries: 0,
    })
}
