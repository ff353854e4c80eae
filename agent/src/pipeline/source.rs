//! Where a pipeline's bytes come from: a child's stdout (pg_dump, and the
//! next sources such as pg_dumpall or pg_basebackup), whose end is not its
//! success until it exited 0; or the coordinator's download stream.

use std::io::Read;
use std::process::ChildStdout;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use datasaver_common::proto::DownloadChunk;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::{Piece, PipelineError};
use crate::child::Proc;
use crate::pg::summarize_stderr;
use crate::progress::Counters;

/// A child's stdout, read in full buffers on a blocking thread.
pub struct ChildOutput {
    proc: Proc,
    stdout: ChildStdout,
    raw: u64,
    counters: Arc<Counters>,
}

impl ChildOutput {
    pub fn new(proc: Proc, stdout: ChildStdout, counters: Arc<Counters>) -> Self {
        Self {
            proc,
            stdout,
            raw: 0,
            counters,
        }
    }

    /// Fills `buf` as far as the child's output goes; 0 at its end.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, PipelineError> {
        let mut n = 0;
        while n < buf.len() {
            match self.stdout.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(PipelineError::Failed(format!(
                        "reading {} output: {e}",
                        self.proc.name()
                    )))
                }
            }
        }
        self.raw += n as u64;
        self.counters.raw.store(self.raw, Ordering::Relaxed);
        Ok(n)
    }

    /// Waits for the child: its output counts only if it exited 0 and said
    /// something. Returns how many bytes it wrote.
    pub fn finish(self) -> Result<u64, PipelineError> {
        let name = self.proc.name();
        let exit = self
            .proc
            .wait()
            .map_err(|e| PipelineError::Failed(e.to_string()))?;
        if !exit.status.success() {
            return Err(PipelineError::Failed(format!(
                "{name} failed ({}): {}",
                exit.describe(),
                summarize_stderr(&exit.stderr)
            )));
        }
        if self.raw == 0 {
            return Err(PipelineError::Failed(format!("{name} produced no output")));
        }
        Ok(self.raw)
    }

    /// Stops the child when the pipeline failed downstream (or was
    /// cancelled): interrupted first, so its server session ends too.
    pub fn abort(self) {
        self.proc.stop_and_reap();
    }
}

/// The coordinator's download stream (any stream of chunks, so tests can
/// stand in for it).
pub struct Download<S> {
    stream: S,
}

impl<S> Download<S>
where
    S: Stream<Item = Result<DownloadChunk, tonic::Status>> + Unpin,
{
    pub fn new(stream: S) -> Self {
        Self { stream }
    }

    /// Moves the chunks to a blocking consumer through `tx` (bounded, so a
    /// slow child slows the download) until the end, an error, or
    /// `cancel`. `End` is sent only after the last chunk arrived whole.
    pub async fn pump(
        mut self,
        tx: mpsc::Sender<Piece>,
        cancel: &CancellationToken,
    ) -> Result<(), PipelineError> {
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return Err(PipelineError::Cancelled),
                m = self.stream.next() => m,
            };
            match msg {
                Some(Ok(chunk)) => {
                    let sent = tokio::select! {
                        _ = cancel.cancelled() => return Err(PipelineError::Cancelled),
                        r = tx.send(Piece::Data(chunk.data)) => r,
                    };
                    if sent.is_err() {
                        return Ok(()); // the consumer stopped; its error says why
                    }
                }
                None => {
                    let _ = tx.send(Piece::End).await;
                    return Ok(());
                }
                // The coordinator checks the bytes as it reads them too, and
                // says DATA_LOSS when they do not match what was stored.
                Some(Err(s)) if s.code() == tonic::Code::DataLoss => {
                    return Err(PipelineError::Corrupt(format!(
                        "{}; nothing was committed",
                        s.message()
                    )))
                }
                Some(Err(s)) => {
                    return Err(PipelineError::Failed(format!(
                        "download interrupted: {}",
                        s.message()
                    )))
                }
            }
        }
    }
}
