//! `dsctl export`: a backup's plain `pg_dump` archive on the operator's
//! machine, so anyone can `pg_restore` it without datasaver. The stored bytes
//! are checked against their checksum as they arrive (the coordinator checks
//! them too), decrypted with the operator's age identity, decompressed, and
//! checked against the checksum of pg_dump's own output recorded at backup
//! time. The file appears only when every check passed: until then it is a
//! hidden temporary file beside it, removed on any failure.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use datasaver_common::checksum::Checksum;
use datasaver_common::codec::Compression;
use datasaver_common::proto::{export_chunk, Backup, ExportChunk};
use tokio::sync::mpsc;

/// What was written.
pub struct Exported {
    pub backup: Backup,
    /// The part exported (`globals`), `None` for the dump.
    pub part: Option<String>,
    pub out: PathBuf,
    pub bytes: u64,
    /// `blake3:<hex>` of the file.
    pub checksum: String,
    /// Whether a checksum of pg_dump's output had been recorded to compare.
    pub checked_against_backup: bool,
}

/// Refuses an output path that exists (nothing is overwritten) or whose
/// directory is missing, before anything is downloaded.
pub fn check_out(out: &Path) -> Result<()> {
    if out.exists() {
        bail!(
            "--out {}: the file exists; export never overwrites (choose another name or remove it)",
            out.display()
        );
    }
    let dir = parent(out);
    if !dir.is_dir() {
        bail!(
            "--out {}: directory {} does not exist",
            out.display(),
            dir.display()
        );
    }
    Ok(())
}

fn parent(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The hidden temporary file, removed unless `keep` moved it into place.
struct Partial {
    path: PathBuf,
    kept: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Streams the export answer into `out`: the dump, or with `part` that part
/// of the backup (`globals`). `identity` is the age identity file for an
/// encrypted backup. `why` explains a broken stream.
pub async fn run(
    mut stream: tonic::Streaming<ExportChunk>,
    part: Option<&str>,
    out: &Path,
    identity: Option<&Path>,
    why: &crate::client::Explainer,
) -> Result<Exported> {
    let backup = match stream.message().await {
        Ok(Some(ExportChunk {
            msg: Some(export_chunk::Msg::Backup(b)),
        })) => b,
        Ok(_) => bail!("the coordinator's export answer did not start with the backup"),
        Err(s) => return Err(why.stream_error(s)),
    };
    // What the file must match: the dump's checksums or the part's.
    let (what, stored_sum, stored_size, raw_sum) = match part {
        None => (
            format!("backup {}", backup.id),
            backup.checksum.clone(),
            backup.stored_bytes,
            backup.raw_checksum.clone(),
        ),
        Some(name) => {
            let Some(p) = backup.parts.iter().find(|p| p.name == name) else {
                bail!(
                    "backup {} has no {name} (it was taken before they were captured); nothing was written",
                    backup.id
                );
            };
            (
                format!("the {name} of backup {}", backup.id),
                p.checksum.clone(),
                p.stored_bytes,
                p.raw_checksum.clone(),
            )
        }
    };
    let codec: Compression = backup
        .compression
        .parse()
        .map_err(|e| anyhow::anyhow!("backup {}: {e}", backup.id))?;
    let identities = match (backup.encrypted, identity) {
        (false, _) => None,
        (true, None) => bail!(
            "backup {} is encrypted to recipient {}; pass --identity FILE with the matching age identity (AGE-SECRET-KEY-1…); nothing was written",
            backup.id,
            backup.encryption_recipient
        ),
        (true, Some(path)) => {
            let text = path
                .to_str()
                .with_context(|| format!("--identity {}: not a UTF-8 path", path.display()))?;
            Some(
                datasaver_common::crypt::load_identities(text)
                    .map_err(|e| anyhow::anyhow!("--identity {}: {e}", path.display()))?,
            )
        }
    };

    let dir = parent(out);
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    let mut partial = Partial {
        path: dir.join(format!(".{name}.partial-{}", std::process::id())),
        kept: false,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial.path)
        .with_context(|| format!("cannot create {}", partial.path.display()))?;

    // Bytes go to a blocking worker (decryption and decompression are
    // synchronous readers); a few chunks in flight bound the memory.
    let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
    let worker = {
        let backup = backup.clone();
        tokio::task::spawn_blocking(move || decode(rx, file, &backup, codec, identities))
    };
    let mut failed = None;
    loop {
        match stream.message().await {
            Ok(Some(ExportChunk {
                msg: Some(export_chunk::Msg::Data(d)),
            })) => {
                if tx.send(d).await.is_err() {
                    break; // the worker stopped; its error says why
                }
            }
            Ok(Some(_)) => {
                failed = Some(anyhow::anyhow!(
                    "the coordinator's export answer had a second header"
                ));
                break;
            }
            Ok(None) => break,
            Err(s) if s.code() == tonic::Code::DataLoss => {
                failed = Some(anyhow::anyhow!(
                    "backup {} is corrupt: {}; nothing was written",
                    backup.id,
                    s.message()
                ));
                break;
            }
            Err(s) => {
                failed = Some(why.stream_error(s));
                break;
            }
        }
    }
    drop(tx);
    let decoded = worker.await.context("export worker failed")?;
    if let Some(e) = failed {
        return Err(e);
    }
    let d = decoded.map_err(|e| anyhow::anyhow!("{e}; nothing was written"))?;
    if d.stored != stored_sum || d.stored_bytes != stored_size {
        bail!(
            "{what} is corrupt: its stored bytes hash to {} ({} bytes), the catalog recorded {stored_sum} ({stored_size} bytes); nothing was written",
            d.stored,
            d.stored_bytes,
        );
    }
    let checked = !raw_sum.is_empty();
    if checked && d.raw != raw_sum {
        bail!(
            "{what}: the exported file hashes to {}, but the output it was made from hashed to {raw_sum} at backup time; nothing was written",
            d.raw,
        );
    }
    // A link, not a rename: a file created at FILE meanwhile is never
    // replaced.
    match std::fs::hard_link(&partial.path, out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
            "--out {}: the file appeared during the export; export never overwrites (nothing was written)",
            out.display()
        ),
        // A filesystem without hard links.
        Err(_) if !out.exists() => {
            std::fs::rename(&partial.path, out).with_context(|| {
                format!("cannot move the export into place at {}", out.display())
            })?;
            partial.kept = true;
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot move the export into place at {}", out.display())
            })
        }
    }
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(Exported {
        backup,
        part: part.map(String::from),
        out: out.to_path_buf(),
        bytes: d.raw_bytes,
        checksum: d.raw,
        checked_against_backup: checked,
    })
}

/// Checksums of what the worker saw.
struct Decoded {
    stored: String,
    stored_bytes: u64,
    raw: String,
    raw_bytes: u64,
}

/// The stored bytes as a reader, hashed as they pass.
struct Incoming {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    at: usize,
    sum: Checksum,
}

impl Read for Incoming {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.sum.update(&b);
                    self.buf = b;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn decode(
    rx: mpsc::Receiver<Vec<u8>>,
    file: std::fs::File,
    backup: &Backup,
    codec: Compression,
    identities: Option<Vec<datasaver_common::crypt::Identity>>,
) -> std::result::Result<Decoded, String> {
    let mut incoming = Incoming {
        rx,
        buf: Vec::new(),
        at: 0,
        sum: Checksum::new(),
    };
    let mut raw = Checksum::new();
    let mut out = std::io::BufWriter::new(file);
    let copied = (|| -> std::result::Result<(), String> {
        use datasaver_common::crypt::{stored_reader, StoredError};
        let mut plain =
            stored_reader(&mut incoming, codec, identities.as_deref()).map_err(|e| match e {
                StoredError::Decrypt(m) => format!("backup {} cannot be decrypted: {m}", backup.id),
                StoredError::Decode(m) => format!("backup {} cannot be read: {m}", backup.id),
            })?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = plain
                .read(&mut buf)
                .map_err(|e| format!("backup {} cannot be read: {e}", backup.id))?;
            if n == 0 {
                return Ok(());
            }
            raw.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| format!("writing the export failed: {e}"))?;
        }
    })();
    // The rest of the stored bytes, so a damaged object is named corrupt by
    // its checksum rather than by a decoder's complaint.
    let _ = std::io::copy(&mut incoming, &mut std::io::sink());
    let stored = incoming.sum.finish();
    let stored_bytes = incoming.sum.len();
    if let Err(e) = copied {
        if stored != backup.checksum {
            return Err(format!(
                "backup {} is corrupt: its stored bytes hash to {stored}, the catalog recorded {}",
                backup.id, backup.checksum
            ));
        }
        return Err(e);
    }
    let file = out
        .into_inner()
        .map_err(|e| format!("writing the export failed: {e}"))?;
    file.sync_all()
        .map_err(|e| format!("writing the export failed: {e}"))?;
    Ok(Decoded {
        stored,
        stored_bytes,
        raw: raw.finish(),
        raw_bytes: raw.len(),
    })
}
