//! The backup path: pg_dump → compress → BLAKE3 → upload, as one pipeline.
//! A dedicated thread reads pg_dump's stdout, compresses and hashes it and
//! hands chunks to the upload stream through a small bounded channel, so a
//! slow coordinator slows pg_dump down instead of filling memory. End of
//! stdout is not success: the trailer is sent only after pg_dump exited 0.

use std::io::Read;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use datasaver_common::checksum::Checksum;
use datasaver_common::codec::Encoder;
use datasaver_common::proto::agent_service_client::AgentServiceClient;
use datasaver_common::proto::{
    upload_request, BackupJob, UploadAbort, UploadHeader, UploadRequest, UploadTrailer,
};
use datasaver_common::CHUNK_SIZE;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::child;
use crate::config::TargetConfig;
use crate::pg::{summarize_stderr, PgTools};
use crate::progress::{Counters, Reporter};

enum DumpError {
    /// pg_dump (or compression) failed; the message says how.
    Failed(String),
    /// The upload stream went away; its own error says why.
    UploadClosed,
    /// Stopped because the agent is stopping on purpose.
    Interrupted(String),
}

fn fill(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn dump_thread(
    mut cmd: std::process::Command,
    target: TargetConfig,
    tx: mpsc::Sender<UploadRequest>,
    counters: Arc<Counters>,
    child_slot: Arc<Mutex<Option<Arc<Mutex<std::process::Child>>>>>,
) -> Result<UploadTrailer, DumpError> {
    let started = Instant::now();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| DumpError::Failed(format!("cannot start pg_dump: {e}")))?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| DumpError::Failed("pg_dump has no stdout".into()))?;
    let stderr = child.stderr.take().map(child::drain_stderr);
    let child = Arc::new(Mutex::new(child));
    *child_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(child.clone());

    let mut enc = match Encoder::with_threads(
        target.compression,
        Some(target.compression_level),
        target.compression_threads,
    ) {
        Ok(e) => e,
        Err(e) => {
            child::kill_and_reap(&child);
            return Err(DumpError::Failed(e.to_string()));
        }
    };
    let mut crypt = match &target.encrypt_to {
        None => None,
        Some(e) => match datasaver_common::crypt::Encrypt::new(&e.recipient) {
            Ok(c) => Some(c),
            Err(m) => {
                child::kill_and_reap(&child);
                return Err(DumpError::Failed(m));
            }
        },
    };
    let mut hash = Checksum::new();
    let mut raw = 0u64;
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut out: Vec<u8> = Vec::with_capacity(CHUNK_SIZE * 2);
    let send = |data: Vec<u8>, hash: &mut Checksum| -> Result<(), DumpError> {
        hash.update(&data);
        counters
            .stored
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        tx.blocking_send(UploadRequest {
            msg: Some(upload_request::Msg::Chunk(data)),
        })
        .map_err(|_| DumpError::UploadClosed)
    };
    let result: Result<(), DumpError> = (|| {
        loop {
            let n = fill(&mut stdout, &mut buf)
                .map_err(|e| DumpError::Failed(format!("reading pg_dump output: {e}")))?;
            if n == 0 {
                break;
            }
            raw += n as u64;
            counters.raw.store(raw, Ordering::Relaxed);
            enc.push(&buf[..n])
                .map_err(|e| DumpError::Failed(e.to_string()))?;
            let compressed = enc.take();
            match crypt.as_mut() {
                None => out.extend(compressed),
                Some(c) => {
                    c.push(&compressed).map_err(DumpError::Failed)?;
                    out.extend(c.take());
                }
            }
            while out.len() >= CHUNK_SIZE {
                let rest = out.split_off(CHUNK_SIZE);
                let chunk = std::mem::replace(&mut out, rest);
                send(chunk, &mut hash)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        child::kill_and_reap(&child);
        return Err(e);
    }
    let tail = enc.finish().map_err(|e| DumpError::Failed(e.to_string()));
    let tail = match tail {
        Ok(t) => t,
        Err(e) => {
            child::kill_and_reap(&child);
            return Err(e);
        }
    };
    let tail = match crypt {
        None => Ok(tail),
        Some(mut c) => c.push(&tail).and_then(|_| {
            let mut t = c.take();
            t.extend(c.finish()?);
            Ok(t)
        }),
    };
    let tail = match tail {
        Ok(t) => t,
        Err(m) => {
            child::kill_and_reap(&child);
            return Err(DumpError::Failed(m));
        }
    };
    out.extend(tail);
    let status =
        child::wait(&child).map_err(|e| DumpError::Failed(format!("waiting for pg_dump: {e}")))?;
    let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    if !status.success() {
        let what = match status.code() {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_string(),
        };
        return Err(DumpError::Failed(format!(
            "pg_dump failed ({what}): {}",
            summarize_stderr(&stderr)
        )));
    }
    if raw == 0 {
        return Err(DumpError::Failed("pg_dump produced no output".into()));
    }
    for part in out.chunks(CHUNK_SIZE) {
        send(part.to_vec(), &mut hash)?;
    }
    Ok(UploadTrailer {
        checksum: hash.finish(),
        raw_bytes: raw,
        stored_bytes: hash.len(),
        dump_duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Runs one backup job; returns a summary or a one-line error.
pub async fn run(
    client: AgentServiceClient<Channel>,
    job: BackupJob,
    target: TargetConfig,
    tools: PgTools,
    reporter: Reporter,
    cancel: CancellationToken,
    stopping: CancellationToken,
) -> Result<String, String> {
    reporter.phase("probe", "checking the database and pg_dump versions");
    let (dump_v, server_v) = tools.probe(&target.db).await?;
    let header = UploadHeader {
        job_id: job.job_id.clone(),
        backup_id: job.backup_id.clone(),
        target: target.name.clone(),
        compression: target.compression.name().into(),
        compression_level: target.compression_level,
        format: "pg_dump-custom".into(),
        database: target.db.dbname.clone(),
        db_host: format!("{}:{}", target.db.host, target.db.port),
        server_version: server_v.text.clone(),
        pg_dump_version: dump_v.text.clone(),
        encrypted: target.encrypt_to.is_some(),
        encryption_recipient: target
            .encrypt_to
            .as_ref()
            .map(|e| e.fingerprint.clone())
            .unwrap_or_default(),
    };
    let (tx, rx) = mpsc::channel::<UploadRequest>(4);
    tx.send(UploadRequest {
        msg: Some(upload_request::Msg::Header(header)),
    })
    .await
    .map_err(|_| "upload channel closed".to_string())?;
    let mut upload_client = client.clone();
    // The upload carries this span's trace context, so the coordinator's
    // spans for storing it join the same trace.
    let upload_span = tracing::info_span!("agent.upload", backup = %job.backup_id);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    datasaver_common::telemetry::inject_metadata(&upload_span, request.metadata_mut());
    let upload = tokio::spawn(tracing::Instrument::instrument(
        async move { upload_client.upload(request).await },
        upload_span,
    ));

    let counters = Arc::new(Counters::default());
    let progress = reporter.start_ticker("dump", counters.clone());
    let child_slot = Arc::new(Mutex::new(None));
    let cmd = tools.pg_dump(&target.db);
    let (tx2, counters2, slot2, target2) = (
        tx.clone(),
        counters.clone(),
        child_slot.clone(),
        target.clone(),
    );
    let mut dump =
        tokio::task::spawn_blocking(move || dump_thread(cmd, target2, tx2, counters2, slot2));
    let dumped = tokio::select! {
        r = &mut dump => r.map_err(|e| DumpError::Failed(format!("dump worker failed: {e}"))).and_then(|r| r),
        _ = cancel.cancelled() => {
            if let Some(c) = child_slot.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                child::kill(c);
            }
            let _ = dump.await;
            if stopping.is_cancelled() {
                Err(DumpError::Interrupted("backup interrupted: the agent is stopping".into()))
            } else {
                Err(DumpError::Failed("backup cancelled (connection to the coordinator lost)".into()))
            }
        }
    };
    progress.abort();
    let dump_error = match dumped {
        Ok(trailer) => {
            let _ = tx
                .send(UploadRequest {
                    msg: Some(upload_request::Msg::Trailer(trailer)),
                })
                .await;
            None
        }
        Err(DumpError::Failed(msg)) => {
            let _ = tx
                .send(UploadRequest {
                    msg: Some(upload_request::Msg::Abort(UploadAbort {
                        reason: msg.clone(),
                        interrupted: false,
                    })),
                })
                .await;
            Some(msg)
        }
        Err(DumpError::Interrupted(msg)) => {
            let _ = tx
                .send(UploadRequest {
                    msg: Some(upload_request::Msg::Abort(UploadAbort {
                        reason: msg.clone(),
                        interrupted: true,
                    })),
                })
                .await;
            Some(msg)
        }
        Err(DumpError::UploadClosed) => None,
    };
    drop(tx);
    let uploaded = upload
        .await
        .map_err(|e| format!("upload task failed: {e}"))?;
    if let Some(msg) = dump_error {
        return Err(msg);
    }
    let resp = uploaded
        .map_err(|s| format!("upload failed: {}", s.message()))?
        .into_inner();
    Ok(format!(
        "backup {} stored: {} bytes from {} bytes of pg_dump output ({})",
        resp.backup_id,
        resp.stored_bytes,
        counters.raw.load(Ordering::Relaxed),
        resp.checksum
    ))
}
