//! The steps between the ends of a pipeline, over the codecs of
//! `datasaver_common`: compress and encrypt push-style on the way up, the
//! checksum over what is stored, and the pull-style mirror on the way down
//! (verify, decrypt, decompress). Push on the way up so one thread drives
//! the child's output through every step without extra buffers; pull on
//! the way down because the decoders are readers.

use std::io::Read;
use std::sync::atomic::Ordering;

use datasaver_common::checksum::Checksum;
use datasaver_common::codec::{Compression, Encoder, Input};
use datasaver_common::crypt::{Identity, Recipient};
use tokio::sync::mpsc;

use super::{Piece, PipelineError};
use crate::progress::Counters;

/// One push-style step: bytes in, the bytes it produced so far out.
pub trait Transform: Send {
    /// Feeds `input`; returns whatever output is ready (possibly none).
    fn push(&mut self, input: &[u8]) -> Result<Vec<u8>, PipelineError>;
    /// Ends the stream; returns the remaining output.
    fn finish(self: Box<Self>) -> Result<Vec<u8>, PipelineError>;
}

/// Compression (zstd, gzip, or none).
pub struct Compress(Encoder);

impl Compress {
    pub fn new(
        codec: Compression,
        level: i32,
        threads: u32,
        input: Input,
    ) -> Result<Self, PipelineError> {
        Encoder::with_input(codec, Some(level), threads, input)
            .map(Self)
            .map_err(|e| PipelineError::Failed(e.to_string()))
    }
}

impl Transform for Compress {
    fn push(&mut self, input: &[u8]) -> Result<Vec<u8>, PipelineError> {
        self.0
            .push(input)
            .map_err(|e| PipelineError::Failed(e.to_string()))?;
        Ok(self.0.take())
    }

    fn finish(self: Box<Self>) -> Result<Vec<u8>, PipelineError> {
        self.0
            .finish()
            .map_err(|e| PipelineError::Failed(e.to_string()))
    }
}

/// age encryption to one recipient.
pub struct Encrypt(datasaver_common::crypt::Encrypt);

impl Encrypt {
    pub fn new(recipient: &Recipient) -> Result<Self, PipelineError> {
        datasaver_common::crypt::Encrypt::new(recipient)
            .map(Self)
            .map_err(PipelineError::Failed)
    }
}

impl Transform for Encrypt {
    fn push(&mut self, input: &[u8]) -> Result<Vec<u8>, PipelineError> {
        self.0.push(input).map_err(PipelineError::Failed)?;
        Ok(self.0.take())
    }

    fn finish(self: Box<Self>) -> Result<Vec<u8>, PipelineError> {
        self.0.finish().map_err(PipelineError::Failed)
    }
}

/// Steps applied in order; the first sees the source's bytes.
pub struct Chain(Vec<Box<dyn Transform>>);

impl Chain {
    /// The stored form of a backup of `target` (dumps, globals and base
    /// backups alike): its codec, level and threads, and its recipient.
    pub fn for_target(target: &crate::config::TargetConfig) -> Result<Self, PipelineError> {
        Chain::encode(
            target.compression,
            target.compression_level,
            target.compression_threads,
            target.encrypt_to.as_ref().map(|e| &e.recipient),
        )
    }

    /// The stored form of a base backup or a WAL file: data pages,
    /// compressed with zstd's own parameters, by `threads` workers (0: on
    /// the calling thread).
    pub fn encode_pages(
        codec: Compression,
        level: i32,
        threads: u32,
        encrypt_to: Option<&Recipient>,
    ) -> Result<Self, PipelineError> {
        Self::encode_input(codec, level, threads, Input::Pages, encrypt_to)
    }

    /// The stored form of a backup: compressed, then encrypted when a
    /// recipient is given (ciphertext does not compress).
    pub fn encode(
        codec: Compression,
        level: i32,
        threads: u32,
        encrypt_to: Option<&Recipient>,
    ) -> Result<Self, PipelineError> {
        Self::encode_input(codec, level, threads, Input::Dump, encrypt_to)
    }

    fn encode_input(
        codec: Compression,
        level: i32,
        threads: u32,
        input: Input,
        encrypt_to: Option<&Recipient>,
    ) -> Result<Self, PipelineError> {
        let mut steps: Vec<Box<dyn Transform>> =
            vec![Box::new(Compress::new(codec, level, threads, input)?)];
        if let Some(r) = encrypt_to {
            steps.push(Box::new(Encrypt::new(r)?));
        }
        Ok(Self(steps))
    }

    /// Feeds `input` through every step.
    pub fn push(&mut self, input: &[u8]) -> Result<Vec<u8>, PipelineError> {
        let mut steps = self.0.iter_mut();
        let mut out = match steps.next() {
            Some(first) => first.push(input)?,
            None => return Ok(input.to_vec()),
        };
        for s in steps {
            out = s.push(&out)?;
        }
        Ok(out)
    }

    /// Ends every step in order, each one's tail going through the next.
    pub fn finish(self) -> Result<Vec<u8>, PipelineError> {
        let mut tail = Vec::new();
        for (i, s) in self.0.into_iter().enumerate() {
            let mut s = s;
            let mut out = if i == 0 { Vec::new() } else { s.push(&tail)? };
            out.extend(s.finish()?);
            tail = out;
        }
        Ok(tail)
    }
}

/// The BLAKE3 checksum and length of what is stored, as it passes.
#[derive(Default)]
pub struct Digest(Checksum);

impl Digest {
    pub fn update(&mut self, stored: &[u8]) {
        self.0.update(stored);
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `blake3:<hex>` of everything so far.
    pub fn checksum(&self) -> String {
        self.0.finish()
    }
}

/// What a download must match: the checksum and length recorded when the
/// backup was stored.
#[derive(Clone)]
pub struct Expected {
    pub backup_id: String,
    pub checksum: String,
    pub stored_bytes: u64,
}

/// The downloaded bytes as a `Read`, hashed as they pass. At the end of the
/// stream it compares the checksum and length and fails the read if they do
/// not match, so nothing downstream can see a clean end of a bad object.
pub struct Verify<'a> {
    rx: mpsc::Receiver<Piece>,
    buf: Vec<u8>,
    pos: usize,
    digest: Digest,
    ended: bool,
    verified: bool,
    expected: &'a Expected,
    counters: &'a Counters,
    /// Set when the whole object was read and does not match its checksum.
    mismatch: Option<String>,
}

impl<'a> Verify<'a> {
    pub fn new(rx: mpsc::Receiver<Piece>, expected: &'a Expected, counters: &'a Counters) -> Self {
        Self {
            rx,
            buf: Vec::new(),
            pos: 0,
            digest: Digest::default(),
            ended: false,
            verified: false,
            expected,
            counters,
            mismatch: None,
        }
    }

    fn verify(&mut self) -> std::io::Result<()> {
        let got = self.digest.checksum();
        let e = self.expected;
        if got != e.checksum || self.digest.len() != e.stored_bytes {
            let m = format!(
                "backup {} is corrupt: its stored bytes have checksum {got} ({} bytes) but {} ({} bytes) was recorded when it was stored; nothing was committed",
                e.backup_id,
                self.digest.len(),
                e.checksum,
                e.stored_bytes
            );
            self.mismatch = Some(m.clone());
            return Err(std::io::Error::other(m));
        }
        self.verified = true;
        Ok(())
    }

    /// Reads whatever a decoder left unread, so the checksum covers it all.
    pub fn drain(&mut self) -> std::io::Result<()> {
        let mut sink = [0u8; 64 * 1024];
        while self.read(&mut sink)? > 0 {}
        Ok(())
    }

    /// Every stored byte was read and matched.
    pub fn verified(&self) -> bool {
        self.verified
    }

    /// The end of the download was seen.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The mismatch found, if the whole object was read and is corrupt.
    pub fn take_mismatch(&mut self) -> Option<String> {
        self.mismatch.take()
    }
}

impl Read for Verify<'_> {
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
                    self.digest.update(&d);
                    self.counters
                        .stored
                        .store(self.digest.len(), Ordering::Relaxed);
                    self.buf = d;
                    self.pos = 0;
                }
                Some(Piece::End) => self.ended = true,
                None => return Err(std::io::Error::other("download interrupted")),
            }
        }
    }
}

/// How to turn stored bytes back into what the source produced.
#[derive(Clone)]
pub struct Decode {
    pub codec: Compression,
    /// Present when the backup is encrypted.
    pub identities: Option<std::sync::Arc<Vec<Identity>>>,
}

impl Decode {
    /// Wraps the stored bytes in decryption (when encrypted) and
    /// decompression. `backup_id` names the backup in messages.
    pub fn reader<'r, R: Read + 'r>(
        &self,
        stored: R,
        backup_id: &str,
    ) -> Result<Box<dyn Read + 'r>, PipelineError> {
        use datasaver_common::crypt::{stored_reader, StoredError};
        stored_reader(stored, self.codec, self.identities.as_ref().map(|i| &i[..])).map_err(|e| {
            PipelineError::Failed(match e {
                StoredError::Decrypt(m) => format!("backup {backup_id}: {m}"),
                StoredError::Decode(m) => format!("backup {backup_id} cannot be read: {m}"),
            })
        })
    }
}
