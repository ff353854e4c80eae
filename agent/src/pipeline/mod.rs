//! The byte pipelines between Postgres programs and the coordinator, built
//! from stages any job can assemble:
//!
//! - up: a child's stdout ([`source::ChildOutput`]) → compress → encrypt
//!   ([`transform::Chain`]) → the upload stream in hashed chunks
//!   ([`sink::UploadSink`]); the trailer only after the child exited 0.
//!   Another kind of backup (pg_dumpall, pg_basebackup) is another command.
//! - down: the download stream ([`source::Download`]) → checksum check
//!   ([`transform::Verify`]) → decrypt → decompress ([`transform::Decode`])
//!   → a child's stdin with the tail held back until the checksum passed
//!   ([`sink::HeldBack`]).
//!
//! Memory stays bounded whatever the size of the stream: the async side and
//! the one blocking worker per pipeline meet in small bounded channels, so
//! the slowest end sets the pace. A job's cancellation kills the child
//! (see [`crate::child::Proc::kill_on`]) and unblocks the worker.

pub mod sink;
pub mod source;
pub mod transform;

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use datasaver_common::proto::{DownloadChunk, TableRows, UploadRequest, UploadTrailer};
use datasaver_common::CHUNK_SIZE;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;

use crate::child::Proc;
use crate::pg::{postgres_errors, summarize_stderr};
use crate::progress::Counters;
use sink::{HeldBack, UploadSink, HOLD_BACK};
use source::{ChildOutput, Download};
use transform::{Chain, Decode, Expected, Verify};

/// Why a pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A stage or a child failed; the message says how, for the operator.
    #[error("{0}")]
    Failed(String),
    /// The stored bytes do not match their recorded checksum.
    #[error("{0}")]
    Corrupt(String),
    /// The child stopped reading its input (it exited, usually on an
    /// error of its own: its stderr, not the broken pipe, is the cause).
    #[error("{0}")]
    ChildStopped(String),
    /// The upload stream went away; the upload's own error says why.
    #[error("the upload stream closed")]
    UploadClosed,
    /// The job's cancellation fired; the job knows why.
    #[error("cancelled")]
    Cancelled,
}

/// Downloaded bytes on their way to the blocking worker.
pub enum Piece {
    Data(Vec<u8>),
    End,
}

/// Runs `cmd` (`name` in messages) and streams its stdout through `chain`
/// onto the upload behind `tx`. Returns the trailer once the child exited
/// 0; the caller sends it. With `count_rows` (a pg_dump archive) the
/// trailer carries each table's rows. Every failure after `cancel` fired
/// is `Cancelled`.
pub async fn upload_child_output(
    cmd: std::process::Command,
    name: &'static str,
    count_rows: bool,
    chain: Chain,
    tx: mpsc::Sender<UploadRequest>,
    counters: Arc<Counters>,
    cancel: &CancellationToken,
) -> Result<UploadTrailer, PipelineError> {
    let started = Instant::now();
    let (proc, pipes) =
        Proc::spawn(cmd, name, false).map_err(|e| PipelineError::Failed(e.to_string()))?;
    let _kill = proc.kill_on(cancel);
    let source = ChildOutput::new(proc, pipes.stdout, counters.clone());
    let sink = UploadSink::new(tx, cancel.clone(), counters);
    let rows = count_rows.then(crate::archive::RowCounter::default);
    let result = tokio::task::spawn_blocking(move || pump(source, chain, sink, rows, started))
        .await
        .map_err(|e| PipelineError::Failed(format!("{name} worker failed: {e}")))
        .and_then(|r| r);
    match result {
        Err(_) if cancel.is_cancelled() => Err(PipelineError::Cancelled),
        r => r,
    }
}

/// The upload's worker: one thread drives the child's output through every
/// stage, a buffer of `CHUNK_SIZE` at a time.
fn pump(
    mut source: ChildOutput,
    mut chain: Chain,
    mut sink: UploadSink,
    mut rows: Option<crate::archive::RowCounter>,
    started: Instant,
) -> Result<UploadTrailer, PipelineError> {
    let mut buf = vec![0u8; CHUNK_SIZE];
    // Over the plain pg_dump output, so an exported archive can be checked
    // against what pg_dump wrote.
    let mut raw_sum = datasaver_common::checksum::Checksum::new();
    let streamed = (|| {
        loop {
            let n = source.read(&mut buf)?;
            if n == 0 {
                break;
            }
            raw_sum.update(&buf[..n]);
            if let Some(r) = rows.as_mut() {
                r.feed(&buf[..n]);
            }
            sink.write(chain.push(&buf[..n])?)?;
        }
        chain.finish()
    })();
    let tail = match streamed {
        Ok(t) => t,
        Err(e) => {
            source.abort();
            return Err(e);
        }
    };
    // End of output is not success: the end of the stream waits for the
    // child's exit status.
    let raw = source.finish()?;
    let elapsed = started.elapsed();
    sink.write(tail)?;
    let (checksum, stored) = sink.finish()?;
    let (tables, rows_not_counted) = match rows.map(crate::archive::RowCounter::finish) {
        None => (Vec::new(), String::new()),
        Some(Ok(counts)) => (
            counts
                .into_iter()
                .map(|((schema, name), rows)| TableRows { schema, name, rows })
                .collect(),
            String::new(),
        ),
        Some(Err(why)) => {
            tracing::warn!(reason = %why, "the table row counts of this backup could not be read from its archive");
            (Vec::new(), why)
        }
    };
    Ok(UploadTrailer {
        checksum,
        raw_bytes: raw,
        stored_bytes: stored,
        dump_duration_ms: elapsed.as_millis() as u64,
        raw_checksum: raw_sum.finish(),
        tables,
        rows_not_counted,
        ..Default::default()
    })
}

/// The child at the end of a download.
pub struct Feed {
    pub cmd: std::process::Command,
    /// What messages call it ("pg_restore").
    pub name: &'static str,
    /// It may stop reading once it has what it needs (`pg_restore --list`);
    /// the rest is still read and verified.
    pub reads_prefix_only: bool,
}

/// Streams `download` (stored as `decode` says, to match `expected`) into
/// a freshly started child; returns what the child wrote to stdout. The
/// child gets the archive's last `HOLD_BACK` bytes only after every stored
/// byte matched, and is killed, never given a clean end, otherwise.
pub async fn download_into<S>(
    download: S,
    expected: &Expected,
    decode: Decode,
    into: Feed,
    counters: Arc<Counters>,
    cancel: &CancellationToken,
) -> Result<String, PipelineError>
where
    S: Stream<Item = Result<DownloadChunk, tonic::Status>> + Unpin,
{
    let name = into.name;
    let (proc, pipes) =
        Proc::spawn(into.cmd, name, true).map_err(|e| PipelineError::Failed(e.to_string()))?;
    let Some(stdin) = pipes.stdin else {
        proc.kill_and_reap();
        return Err(PipelineError::Failed(format!("{name} has no stdin")));
    };
    let stdout = pipes.stdout;
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::BufReader::new(stdout).read_to_string(&mut s);
        s
    });
    let _kill = proc.kill_on(cancel);
    let (tx, rx) = mpsc::channel::<Piece>(4);
    let feeder = {
        let (proc, expected) = (proc.clone(), expected.clone());
        let sink = HeldBack::new(
            stdin,
            name,
            HOLD_BACK,
            into.reads_prefix_only,
            counters.clone(),
        );
        tokio::task::spawn_blocking(move || feed(rx, sink, &proc, &decode, &expected, &counters))
    };
    let transfer = Download::new(download).pump(tx, cancel).await;
    if transfer.is_err() {
        proc.kill();
    }
    let fed = feeder
        .await
        .map_err(|e| PipelineError::Failed(format!("restore worker failed: {e}")))?;
    let waited = proc.clone();
    let exit = tokio::task::spawn_blocking(move || waited.wait())
        .await
        .map_err(|e| PipelineError::Failed(e.to_string()))?
        .map_err(|e| PipelineError::Failed(e.to_string()))?;
    let stdout = tokio::task::spawn_blocking(move || out_reader.join().unwrap_or_default())
        .await
        .unwrap_or_default();
    let result = match (fed, transfer) {
        // A corrupt object is the cause whatever else went wrong after it.
        (Err(e @ PipelineError::Corrupt(_)), _) | (_, Err(e @ PipelineError::Corrupt(_))) => Err(e),
        // The child quit (pg_restore stops at its first error): what it said
        // is the cause, not the pipe it left.
        (Err(PipelineError::ChildStopped(m)), _) => {
            Err(PipelineError::Failed(match postgres_errors(&exit.stderr) {
                Some(said) => format!("{name} failed: {said}"),
                None if !exit.stderr.trim().is_empty() => {
                    format!("{name} failed: {}", summarize_stderr(&exit.stderr))
                }
                None => m,
            }))
        }
        (_, Err(e)) | (Err(e), Ok(())) => Err(e),
        (Ok(()), Ok(())) if !exit.status.success() => Err(PipelineError::Failed(format!(
            "{name} failed: {}",
            postgres_errors(&exit.stderr).unwrap_or_else(|| summarize_stderr(&exit.stderr))
        ))),
        (Ok(()), Ok(())) => Ok(stdout),
    };
    match result {
        Err(e) if cancel.is_cancelled() && !matches!(e, PipelineError::Corrupt(_)) => {
            Err(PipelineError::Cancelled)
        }
        r => r,
    }
}

/// The download's worker: verified, decrypted, decompressed bytes into the
/// child's stdin.
fn feed<W: std::io::Write>(
    rx: mpsc::Receiver<Piece>,
    mut sink: HeldBack<W>,
    proc: &Proc,
    decode: &Decode,
    expected: &Expected,
    counters: &Counters,
) -> Result<(), PipelineError> {
    /// Which side failed: reading (download, decryption, decompression —
    /// possibly a corrupt object) or writing (the child stopped reading).
    enum Side {
        Read(PipelineError),
        Write(PipelineError),
    }
    let backup_id = expected.backup_id.as_str();
    let mut source = Verify::new(rx, expected, counters);
    let unreadable = |e: std::io::Error| {
        // the verifying reader's own errors are already complete sentences
        let m = e.to_string();
        Side::Read(PipelineError::Failed(
            if m.contains("corrupt") || m.contains("download interrupted") {
                m
            } else {
                format!("backup {backup_id} cannot be read: {m}")
            },
        ))
    };
    let result = (|| {
        {
            let mut plain = decode.reader(&mut source, backup_id).map_err(Side::Read)?;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = plain.read(&mut buf).map_err(unreadable)?;
                if n == 0 {
                    break;
                }
                sink.write(&buf[..n]).map_err(Side::Write)?;
            }
        }
        // Only once every stored byte has been read and checked does the
        // tail reach the child.
        source.drain().map_err(unreadable)?;
        if !source.verified() {
            return Err(Side::Read(PipelineError::Failed(format!(
                "backup {backup_id}: the download ended without being verified"
            ))));
        }
        sink.release().map_err(Side::Write)
    })();
    if result.is_err() {
        // kill before closing stdin: the child must not see a clean end
        proc.kill();
    }
    drop(sink);
    // A decoder that chokes mid-stream, or a child that quits on what it
    // was fed, usually means damaged bytes: read the rest so the checksum,
    // not a codec's or pg_restore's complaint, says so.
    let (Err(Side::Read(e)) | Err(Side::Write(e))) = result else {
        return Ok(());
    };
    if !source.ended() {
        let _ = source.drain();
    }
    match source.take_mismatch() {
        Some(corrupt) => Err(PipelineError::Corrupt(corrupt)),
        None => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datasaver_common::checksum::Checksum;
    use datasaver_common::codec::Compression;
    use datasaver_common::crypt::{Identity, Recipient};
    use datasaver_common::proto::upload_request;
    use std::path::{Path, PathBuf};
    use std::str::FromStr;
    use std::time::{Duration, Instant};

    const CODECS: [Compression; 3] = [Compression::Zstd, Compression::Gzip, Compression::None];

    /// A scratch directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir().join(format!(
                "ds-agent-pipeline-{}-{name}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// 3.5 MiB: incompressible bytes then text, so every codec's output
    /// spans several chunks.
    fn sample() -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut data: Vec<u8> = (0..5 * 512 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut i = 0u32;
        while data.len() < 7 * 512 * 1024 {
            data.extend_from_slice(format!("row {i}\tname-{}\n", i % 977).as_bytes());
            i += 1;
        }
        data
    }

    fn keys() -> (Recipient, Identity) {
        let (secret, public) = datasaver_common::crypt::generate();
        (
            datasaver_common::crypt::parse_recipient(&public).unwrap(),
            Identity::from_str(&secret).unwrap(),
        )
    }

    fn cat(file: &Path) -> std::process::Command {
        let mut c = std::process::Command::new("cat");
        c.arg(file);
        c
    }

    /// Runs the upload pipeline; returns the chunks sent and the result.
    async fn upload(
        cmd: std::process::Command,
        chain: Chain,
        cancel: &CancellationToken,
    ) -> (Vec<Vec<u8>>, Result<UploadTrailer, PipelineError>) {
        let (tx, mut rx) = mpsc::channel::<UploadRequest>(4);
        let collect = tokio::spawn(async move {
            let mut chunks = Vec::new();
            while let Some(m) = rx.recv().await {
                match m.msg {
                    Some(upload_request::Msg::Chunk(c)) => chunks.push(c),
                    other => panic!("the pipeline sends only chunks: {other:?}"),
                }
            }
            chunks
        });
        let counters = Arc::new(Counters::default());
        let r = upload_child_output(cmd, "pg_dump", false, chain, tx, counters, cancel).await;
        (collect.await.unwrap(), r)
    }

    /// A child that writes its stdin to `out`, and creates `out.eof` only
    /// when its input ended cleanly.
    fn writer(out: &Path) -> Feed {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "cat > \"$0\" && touch \"$0.eof\""])
            .arg(out);
        Feed {
            cmd,
            name: "writer",
            reads_prefix_only: false,
        }
    }

    fn saw_eof(out: &Path) -> bool {
        Path::new(&format!("{}.eof", out.display())).exists()
    }

    /// The stored bytes as a download stream, in pieces of uneven size.
    fn download_of(
        stored: &[u8],
    ) -> impl Stream<Item = Result<DownloadChunk, tonic::Status>> + Unpin {
        let mut pieces = Vec::new();
        let mut rest = stored;
        let mut size = 100_000;
        while !rest.is_empty() {
            let n = size.min(rest.len());
            pieces.push(Ok(DownloadChunk {
                data: rest[..n].to_vec(),
            }));
            rest = &rest[n..];
            size = size * 3 % 700_001 + 1;
        }
        tokio_stream::iter(pieces)
    }

    async fn download(
        stored: &[u8],
        expected: &Expected,
        decode: Decode,
        into: Feed,
        cancel: &CancellationToken,
    ) -> Result<String, PipelineError> {
        let counters = Arc::new(Counters::default());
        download_into(
            download_of(stored),
            expected,
            decode,
            into,
            counters,
            cancel,
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_codec_round_trips_with_and_without_encryption() {
        let dir = Scratch::new("roundtrip");
        let data = sample();
        let input = dir.0.join("input");
        std::fs::write(&input, &data).unwrap();
        let (recipient, identity) = keys();
        let never = CancellationToken::new();
        for codec in CODECS {
            for encrypted in [false, true] {
                let case = format!("{codec} encrypted={encrypted}");
                let threads = if codec == Compression::Zstd { 2 } else { 0 };
                let chain = Chain::encode(
                    codec,
                    codec.default_level(),
                    threads,
                    encrypted.then_some(&recipient),
                )
                .unwrap();
                let (chunks, r) = upload(cat(&input), chain, &never).await;
                let trailer = r.unwrap_or_else(|e| panic!("{case}: {e}"));
                let (last, whole) = chunks.split_last().expect("chunks");
                assert!(
                    whole.iter().all(|c| c.len() == CHUNK_SIZE)
                        && !last.is_empty()
                        && last.len() <= CHUNK_SIZE,
                    "{case}: chunk sizes {:?}",
                    chunks.iter().map(Vec::len).collect::<Vec<_>>()
                );
                let stored = chunks.concat();
                let mut sum = Checksum::new();
                sum.update(&stored);
                assert_eq!(trailer.checksum, sum.finish(), "{case}");
                assert_eq!(trailer.stored_bytes, stored.len() as u64, "{case}");
                assert_eq!(trailer.raw_bytes, data.len() as u64, "{case}");
                let mut plain = Checksum::new();
                plain.update(&data);
                assert_eq!(trailer.raw_checksum, plain.finish(), "{case}");
                if encrypted {
                    assert!(stored.starts_with(b"age-encryption.org/v1"), "{case}");
                }

                let out = dir.0.join(format!("out-{codec}-{encrypted}"));
                let expected = Expected {
                    backup_id: "b1".into(),
                    checksum: trailer.checksum.clone(),
                    stored_bytes: trailer.stored_bytes,
                };
                let decode = Decode {
                    codec,
                    identities: encrypted.then(|| Arc::new(vec![identity.clone()])),
                };
                download(&stored, &expected, decode, writer(&out), &never)
                    .await
                    .unwrap_or_else(|e| panic!("{case}: {e}"));
                assert!(std::fs::read(&out).unwrap() == data, "{case}: bytes differ");
                assert!(
                    saw_eof(&out),
                    "{case}: the child's input did not end cleanly"
                );
            }
        }
    }

    /// A child that quits on an error of its own (pg_restore stops at its
    /// first failed statement) fails the job with what it said, not with
    /// the broken pipe it left behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_that_quits_is_reported_by_its_own_error() {
        let dir = Scratch::new("quits");
        let data = sample();
        let input = dir.0.join("input");
        std::fs::write(&input, &data).unwrap();
        let never = CancellationToken::new();
        let chain = Chain::encode(Compression::None, 0, 0, None).unwrap();
        let (chunks, r) = upload(cat(&input), chain, &never).await;
        let trailer = r.unwrap();
        let expected = Expected {
            backup_id: "b9".into(),
            checksum: trailer.checksum.clone(),
            stored_bytes: trailer.stored_bytes,
        };
        let script = r#"head -c 1000 >/dev/null
echo 'pg_restore: error: could not execute query: ERROR:  role "app_owner" does not exist' >&2
echo 'Command was: ALTER TABLE public.orders OWNER TO app_owner;' >&2
echo 'pg_restore: warning: errors ignored on restore: 1' >&2
exit 1"#;
        // pg_restore that reads a little, says why it stops, and exits 1.
        let quitter = || {
            let mut cmd = std::process::Command::new("sh");
            cmd.args(["-c", script]);
            Feed {
                cmd,
                name: "pg_restore",
                reads_prefix_only: false,
            }
        };
        let plain = || Decode {
            codec: Compression::None,
            identities: None,
        };
        let e = download(&chunks.concat(), &expected, plain(), quitter(), &never)
            .await
            .expect_err("the child failed");
        let m = e.to_string();
        assert!(
            matches!(e, PipelineError::Failed(_))
                && m.starts_with("pg_restore failed: ")
                && m.contains(r#"role "app_owner" does not exist"#)
                && m.contains("ALTER TABLE public.orders OWNER TO app_owner")
                && !m.contains("Broken pipe")
                && !m.contains("errors ignored"),
            "{e:?}"
        );

        // The same child on damaged bytes: the checksum names the cause.
        let mut flipped = chunks.concat();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x01;
        let e = download(&flipped, &expected, plain(), quitter(), &never)
            .await
            .expect_err("a damaged object fails");
        assert!(
            matches!(&e, PipelineError::Corrupt(m) if m.contains("backup b9 is corrupt")),
            "{e:?}"
        );
    }

    /// A flipped byte or a cut-off object fails as corrupt, and the child
    /// never gets the archive's tail nor a clean end of its input.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn damaged_bytes_never_reach_the_child_whole() {
        let dir = Scratch::new("damaged");
        let data = sample();
        let input = dir.0.join("input");
        std::fs::write(&input, &data).unwrap();
        let never = CancellationToken::new();
        for codec in CODECS {
            let chain = Chain::encode(codec, codec.default_level(), 0, None).unwrap();
            let (chunks, r) = upload(cat(&input), chain, &never).await;
            let trailer = r.unwrap();
            let stored = chunks.concat();
            let expected = Expected {
                backup_id: "b7".into(),
                checksum: trailer.checksum.clone(),
                stored_bytes: trailer.stored_bytes,
            };
            let mut flipped = stored.clone();
            let mid = flipped.len() / 2;
            flipped[mid] ^= 0x01;
            let truncated = &stored[..stored.len() * 6 / 10];
            for (how, bytes) in [("flipped", &flipped[..]), ("truncated", truncated)] {
                let case = format!("{codec} {how}");
                let out = dir.0.join(format!("out-{codec}-{how}"));
                let decode = Decode {
                    codec,
                    identities: None,
                };
                let e = download(bytes, &expected, decode, writer(&out), &never)
                    .await
                    .expect_err(&case);
                match &e {
                    PipelineError::Corrupt(m) => assert!(
                        m.contains("backup b7 is corrupt") && m.contains(&trailer.checksum),
                        "{case}: {m}"
                    ),
                    other => panic!("{case}: not a checksum mismatch: {other:?}"),
                }
                let got = std::fs::read(&out).unwrap_or_default();
                assert!(
                    got.len() + HOLD_BACK <= data.len(),
                    "{case}: the child got {} of {} bytes",
                    got.len(),
                    data.len()
                );
                assert!(
                    !saw_eof(&out),
                    "{case}: the child saw a clean end of its input"
                );
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_upload_ends_only_after_the_child_exited_zero() {
        let dir = Scratch::new("exit");
        let input = dir.0.join("input");
        std::fs::write(&input, sample()).unwrap();
        let never = CancellationToken::new();
        let mut failing = std::process::Command::new("sh");
        failing
            .args([
                "-c",
                "cat \"$0\"; echo 'pg_dump: error: query failed' >&2; exit 3",
            ])
            .arg(&input);
        let chain = Chain::encode(Compression::Zstd, 3, 0, None).unwrap();
        let (_, r) = upload(failing, chain, &never).await;
        let e = r.expect_err("a child that failed");
        assert_eq!(
            e.to_string(),
            "pg_dump failed (exit status 3): pg_dump: error: query failed"
        );
        let chain = Chain::encode(Compression::Zstd, 3, 0, None).unwrap();
        let (chunks, r) = upload(std::process::Command::new("true"), chain, &never).await;
        assert_eq!(
            r.expect_err("no output").to_string(),
            "pg_dump produced no output"
        );
        assert!(chunks.is_empty(), "nothing of an empty stream is sent");
    }

    /// A cancelled upload stops within a second even when nobody reads the
    /// upload stream any more, and its child is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_upload_stops_though_the_upload_stalled() {
        let (tx, rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let chain = Chain::encode(Compression::None, 0, 0, None).unwrap();
        let mut endless = std::process::Command::new("cat");
        endless.arg("/dev/zero");
        let counters = Arc::new(Counters::default());
        let run = upload_child_output(
            endless,
            "pg_dump",
            false,
            chain,
            tx,
            counters.clone(),
            &cancel,
        );
        let c2 = cancel.clone();
        let stop = async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            c2.cancel();
            Instant::now()
        };
        let (r, cancelled_at) = tokio::join!(run, stop);
        assert!(cancelled_at.elapsed() < Duration::from_secs(1));
        assert!(matches!(r, Err(PipelineError::Cancelled)), "{r:?}");
        assert!(counters.raw.load(std::sync::atomic::Ordering::Relaxed) > 0);
        drop(rx);
    }

    /// A cancelled download kills its child within a second, even while the
    /// download is waiting for bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_download_kills_its_child() {
        let dir = Scratch::new("cancel");
        let out = dir.0.join("out");
        let cancel = CancellationToken::new();
        let expected = Expected {
            backup_id: "b".into(),
            checksum: "blake3:00".into(),
            stored_bytes: 1,
        };
        let decode = Decode {
            codec: Compression::None,
            identities: None,
        };
        let stalled = tokio_stream::pending::<Result<DownloadChunk, tonic::Status>>();
        let counters = Arc::new(Counters::default());
        let run = download_into(stalled, &expected, decode, writer(&out), counters, &cancel);
        let c2 = cancel.clone();
        let stop = async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            c2.cancel();
            Instant::now()
        };
        let (r, cancelled_at) = tokio::join!(run, stop);
        assert!(cancelled_at.elapsed() < Duration::from_secs(1));
        assert!(matches!(r, Err(PipelineError::Cancelled)), "{r:?}");
        assert!(!saw_eof(&out));
    }
}
