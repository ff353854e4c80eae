//! Where a pipeline's bytes go: the upload stream, in chunks of
//! `CHUNK_SIZE` hashed as they leave, or a child's stdin with the tail held
//! back until the download it came from is verified.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use datasaver_common::proto::{upload_request, UploadRequest};
use datasaver_common::CHUNK_SIZE;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::transform::Digest;
use super::PipelineError;
use crate::progress::Counters;

/// The upload stream as a sink for a blocking worker: whole chunks of
/// `CHUNK_SIZE` go out through a small bounded channel, so a slow
/// coordinator slows the source down instead of filling memory.
pub struct UploadSink {
    tx: mpsc::Sender<UploadRequest>,
    /// A job's cancellation must not wait for a coordinator that stopped
    /// reading: a send blocked on a full channel gives up when it fires.
    cancel: CancellationToken,
    rt: tokio::runtime::Handle,
    /// Less than one chunk, waiting for more.
    pending: Vec<u8>,
    digest: Digest,
    counters: Arc<Counters>,
}

impl UploadSink {
    /// Call from within the runtime; the sink is then used on a blocking
    /// thread.
    pub fn new(
        tx: mpsc::Sender<UploadRequest>,
        cancel: CancellationToken,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            tx,
            cancel,
            rt: tokio::runtime::Handle::current(),
            pending: Vec::new(),
            digest: Digest::default(),
            counters,
        }
    }

    /// Queues stored bytes and sends every whole chunk.
    pub fn write(&mut self, data: Vec<u8>) -> Result<(), PipelineError> {
        if self.pending.is_empty() {
            self.pending = data;
        } else {
            self.pending.extend_from_slice(&data);
        }
        while self.pending.len() >= CHUNK_SIZE {
            let rest = self.pending.split_off(CHUNK_SIZE);
            let chunk = std::mem::replace(&mut self.pending, rest);
            self.send(chunk)?;
        }
        Ok(())
    }

    /// Sends what is left; returns the checksum and length of everything
    /// sent. The caller sends the trailer once the source has succeeded.
    pub fn finish(mut self) -> Result<(String, u64), PipelineError> {
        let rest = std::mem::take(&mut self.pending);
        if !rest.is_empty() {
            self.send(rest)?;
        }
        Ok((self.digest.checksum(), self.digest.len()))
    }

    fn send(&mut self, chunk: Vec<u8>) -> Result<(), PipelineError> {
        self.digest.update(&chunk);
        self.counters
            .stored
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        let msg = UploadRequest {
            msg: Some(upload_request::Msg::Chunk(chunk)),
        };
        let (tx, cancel) = (&self.tx, &self.cancel);
        self.rt.block_on(async {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => Err(PipelineError::Cancelled),
                r = tx.send(msg) => r.map_err(|_| PipelineError::UploadClosed),
            }
        })
    }
}

/// Bytes of decoded archive withheld from the child until the whole
/// download is verified. An archive's last block is always in here, so a
/// child in one transaction never sees a complete archive of bad bytes.
pub const HOLD_BACK: usize = 256 * 1024;

/// A child's stdin that receives everything but the last `hold` bytes until
/// [`HeldBack::release`].
pub struct HeldBack<W: Write> {
    stdin: W,
    name: &'static str,
    hold: usize,
    pending: Vec<u8>,
    /// The child may stop reading once it has what it needs
    /// (`pg_restore --list` after the table of contents).
    reads_prefix_only: bool,
    closed: bool,
    counters: Arc<Counters>,
}

impl<W: Write> HeldBack<W> {
    pub fn new(
        stdin: W,
        name: &'static str,
        hold: usize,
        reads_prefix_only: bool,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            stdin,
            name,
            hold,
            pending: Vec::with_capacity(2 * hold + 256 * 1024),
            reads_prefix_only,
            closed: false,
            counters,
        }
    }

    /// Takes decoded bytes; passes on all but the last `hold` of them once
    /// twice that much is waiting.
    pub fn write(&mut self, data: &[u8]) -> Result<(), PipelineError> {
        self.pending.extend_from_slice(data);
        if self.pending.len() > 2 * self.hold {
            let n = self.pending.len() - self.hold;
            self.pass_on(n)?;
            self.pending.drain(..n);
        }
        Ok(())
    }

    /// Passes on the withheld tail: call only once the source is verified.
    pub fn release(&mut self) -> Result<(), PipelineError> {
        self.pass_on(self.pending.len())?;
        self.pending.clear();
        Ok(())
    }

    /// Gives the stdin back (to be dropped once the child may see EOF).
    pub fn into_inner(self) -> W {
        self.stdin
    }

    fn pass_on(&mut self, n: usize) -> Result<(), PipelineError> {
        if !self.closed {
            match self.stdin.write_all(&self.pending[..n]) {
                Ok(()) => {}
                Err(e) if self.reads_prefix_only && e.kind() == std::io::ErrorKind::BrokenPipe => {
                    // The rest is still read and hashed, so the whole
                    // object is verified.
                    self.closed = true;
                }
                Err(e) => {
                    return Err(PipelineError::ChildStopped(format!(
                        "{} stopped reading its input ({e})",
                        self.name
                    )))
                }
            }
        }
        self.counters.raw.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_waits_for_release() {
        let mut out = Vec::new();
        let counters = Arc::new(Counters::default());
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        {
            let mut s = HeldBack::new(&mut out, "child", 1000, false, counters.clone());
            for part in data.chunks(700) {
                s.write(part).unwrap();
            }
            let w = s.pending.len();
            assert!((1000..=2700).contains(&w), "{w} bytes withheld");
            s.release().unwrap();
        }
        assert_eq!(out, data);
        assert_eq!(counters.raw.load(Ordering::Relaxed), data.len() as u64);
    }

    /// A child that stops reading is an error, unless it only ever needed
    /// the start (then the rest is skipped, not an error).
    #[test]
    fn a_closed_input() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let c = Arc::new(Counters::default());
        let mut s = HeldBack::new(Closed, "pg_restore", 10, false, c.clone());
        let e = s.write(&[0; 100]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("pg_restore stopped reading its input"),
            "{e}"
        );
        let mut s = HeldBack::new(Closed, "pg_restore", 10, true, c);
        s.write(&[0; 100]).unwrap();
        s.release().unwrap();
    }
}
