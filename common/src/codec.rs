//! Compression codecs for backup streams: a push-style [`Encoder`] (feed
//! input chunks in, take output bytes out) for the backup path, and a
//! pull-style [`decode_reader`] for the restore path. Neither buffers more
//! than the codec's own window.

use std::fmt;
use std::io::Write;
use std::str::FromStr;

/// Compression applied to a backup stream before it leaves the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// zstd (the default): fast and compact.
    Zstd,
    /// gzip, for tools that only speak gzip.
    Gzip,
    /// Stored as pg_dump wrote it.
    None,
}

/// An unknown compression name.
#[derive(Debug, thiserror::Error)]
#[error("unknown compression {0:?} (expected zstd, gzip or none)")]
pub struct UnknownCompression(pub String);

impl FromStr for Compression {
    type Err = UnknownCompression;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "zstd" | "zst" => Ok(Self::Zstd),
            "gzip" | "gz" => Ok(Self::Gzip),
            "none" | "off" => Ok(Self::None),
            _ => Err(UnknownCompression(s.to_string())),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Compression {
    /// The name recorded in the catalog and meta files.
    pub fn name(self) -> &'static str {
        match self {
            Self::Zstd => "zstd",
            Self::Gzip => "gzip",
            Self::None => "none",
        }
    }

    /// Object name suffix after `.dump`.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Zstd => ".zst",
            Self::Gzip => ".gz",
            Self::None => "",
        }
    }

    /// Default level for this codec.
    pub fn default_level(self) -> i32 {
        match self {
            Self::Zstd => DEFAULT_ZSTD_LEVEL,
            Self::Gzip => 6,
            Self::None => 0,
        }
    }

    /// Checks a level for this codec; returns a message naming the range.
    pub fn check_level(self, level: i32) -> Result<(), String> {
        let (lo, hi) = match self {
            Self::Zstd => (1, 22),
            Self::Gzip => (1, 9),
            Self::None => (0, 0),
        };
        if self == Self::None || (lo..=hi).contains(&level) {
            Ok(())
        } else {
            Err(format!(
                "level {level} is out of range {lo}..={hi} for {self}"
            ))
        }
    }
}

/// Errors from a codec.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The underlying compressor or decompressor failed.
    #[error("{codec} {op} failed: {source}")]
    Io {
        /// codec name
        codec: &'static str,
        /// "compression" or "decompression"
        op: &'static str,
        /// cause
        source: std::io::Error,
    },
}

/// zstd's level when none is configured.
const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Bytes of input per zstd worker job when compressing with threads. On a
/// base backup's tar, two workers with 1 MiB jobs came out smaller than one
/// stream on one thread (113.65 against 113.82 MB) in half the time; 2 MiB
/// jobs took the agent's peak from 56 to 76 MiB.
const ZSTD_JOB_SIZE: u32 = 1024 * 1024;

enum EncInner {
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    None(Vec<u8>),
}

/// What is compressed: zstd's search at the default level is tuned for
/// pg_dump's text; data pages (a base backup's files, WAL) compress better
/// with zstd's own parameters (a base backup's tar came out 2 % smaller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// pg_dump's archives and SQL
    Dump,
    /// a cluster's files and WAL
    Pages,
}

/// Streaming compressor: `push` input, `take` whatever output is ready.
pub struct Encoder {
    codec: Compression,
    inner: EncInner,
}

impl Encoder {
    /// A compressor for `codec` at `level` (`None`: the codec's default).
    pub fn new(codec: Compression, level: Option<i32>) -> Result<Self, CodecError> {
        Self::with_threads(codec, level, 0)
    }

    /// Like [`Encoder::new`], with `threads` zstd worker threads (0: compress
    /// on the calling thread). Workers let compression overlap with reading
    /// pg_dump's output; the output is identical in format either way.
    pub fn with_threads(
        codec: Compression,
        level: Option<i32>,
        threads: u32,
    ) -> Result<Self, CodecError> {
        Self::with_input(codec, level, threads, Input::Dump)
    }

    /// Like [`Encoder::with_threads`], for `input` of the given kind.
    pub fn with_input(
        codec: Compression,
        level: Option<i32>,
        threads: u32,
        input: Input,
    ) -> Result<Self, CodecError> {
        let level = level.unwrap_or(codec.default_level());
        let err = |source| CodecError::Io {
            codec: codec.name(),
            op: "compression",
            source,
        };
        let inner = match codec {
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(Vec::new(), level).map_err(err)?;
                // A checksum inside the frame catches corruption even if the
                // outer BLAKE3 check were skipped by some other tool.
                e.include_checksum(true).map_err(err)?;
                if level == DEFAULT_ZSTD_LEVEL && input == Input::Dump {
                    // pg_dump's output (row text, repeated column values)
                    // gains little from level 3's larger chain table and
                    // 5-byte matches: with these, a 920 MB realistic dump
                    // compressed with 14% less CPU and came out 0.8% smaller
                    // (bench/backup.sh data). CPU next to pg_dump is what
                    // bounds backup time on small hosts.
                    use zstd::zstd_safe::CParameter;
                    e.set_parameter(CParameter::ChainLog(14)).map_err(err)?;
                    e.set_parameter(CParameter::MinMatch(6)).map_err(err)?;
                }
                if threads > 0 {
                    e.multithread(threads).map_err(err)?;
                    // zstd's default job size at these levels is many MiB
                    // per worker; small jobs keep the agent's memory flat.
                    e.set_parameter(zstd::zstd_safe::CParameter::JobSize(ZSTD_JOB_SIZE))
                        .map_err(err)?;
                }
                EncInner::Zstd(e)
            }
            Compression::Gzip => EncInner::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(level.clamp(0, 9) as u32),
            )),
            Compression::None => EncInner::None(Vec::new()),
        };
        Ok(Self { codec, inner })
    }

    fn err(&self, source: std::io::Error) -> CodecError {
        CodecError::Io {
            codec: self.codec.name(),
            op: "compression",
            source,
        }
    }

    /// Feeds input; compressed output accumulates until `take`.
    pub fn push(&mut self, data: &[u8]) -> Result<(), CodecError> {
        let r = match &mut self.inner {
            EncInner::Zstd(e) => e.write_all(data),
            EncInner::Gzip(e) => e.write_all(data),
            EncInner::None(v) => {
                v.extend_from_slice(data);
                Ok(())
            }
        };
        r.map_err(|e| self.err(e))
    }

    /// Takes the compressed bytes produced so far.
    pub fn take(&mut self) -> Vec<u8> {
        match &mut self.inner {
            EncInner::Zstd(e) => std::mem::take(e.get_mut()),
            EncInner::Gzip(e) => std::mem::take(e.get_mut()),
            EncInner::None(v) => std::mem::take(v),
        }
    }

    /// Ends the stream and returns the remaining output.
    pub fn finish(self) -> Result<Vec<u8>, CodecError> {
        let codec = self.codec;
        let err = |source| CodecError::Io {
            codec: codec.name(),
            op: "compression",
            source,
        };
        match self.inner {
            EncInner::Zstd(e) => e.finish().map_err(err),
            EncInner::Gzip(e) => e.finish().map_err(err),
            EncInner::None(v) => Ok(v),
        }
    }
}

/// Wraps a reader of stored bytes in a reader of the original stream; the
/// mirror of [`Encoder`]. Pull-style so it can sit behind decryption and in
/// front of any consumer without buffering the stream.
pub fn decode_reader<'a, R: std::io::Read + 'a>(
    codec: Compression,
    input: R,
) -> Result<Box<dyn std::io::Read + 'a>, CodecError> {
    Ok(match codec {
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(input).map_err(
            |source| CodecError::Io {
                codec: codec.name(),
                op: "decompression",
                source,
            },
        )?),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(input)),
        Compression::None => Box::new(input),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Read;

    /// Hands out at most `chunk` bytes per read, like a network stream.
    struct Chunked<'a> {
        data: &'a [u8],
        chunk: usize,
    }

    impl Read for Chunked<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = out.len().min(self.chunk).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn decode(codec: Compression, stored: &[u8], chunk: usize) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        decode_reader(
            codec,
            Chunked {
                data: stored,
                chunk: chunk.max(1),
            },
        )
        .unwrap()
        .read_to_end(&mut out)?;
        Ok(out)
    }

    fn roundtrip(codec: Compression, data: &[u8], chunk: usize) -> Vec<u8> {
        let mut enc = Encoder::new(codec, None).unwrap();
        let mut stored = Vec::new();
        for part in data.chunks(chunk.max(1)) {
            enc.push(part).unwrap();
            stored.extend(enc.take());
        }
        stored.extend(enc.finish().unwrap());
        decode(codec, &stored, chunk).unwrap()
    }

    #[test]
    fn names_parse_and_reject() {
        assert_eq!("zstd".parse::<Compression>().unwrap(), Compression::Zstd);
        assert_eq!("GZIP".parse::<Compression>().unwrap(), Compression::Gzip);
        assert_eq!("none".parse::<Compression>().unwrap(), Compression::None);
        let e = "lz5".parse::<Compression>().unwrap_err();
        assert!(e.to_string().contains("lz5"));
        assert!(Compression::Zstd.check_level(23).is_err());
        assert!(Compression::Gzip.check_level(6).is_ok());
    }

    #[test]
    fn multithreaded_zstd_roundtrips() {
        let data: Vec<u8> = (0..6_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 % 17)
            .collect();
        let mut enc = Encoder::with_threads(Compression::Zstd, Some(3), 2).unwrap();
        let mut stored = Vec::new();
        for part in data.chunks(1 << 20) {
            enc.push(part).unwrap();
            stored.extend(enc.take());
        }
        stored.extend(enc.finish().unwrap());
        assert!(stored.len() < data.len());
        let out = decode(Compression::Zstd, &stored, 1 << 20).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_actually_compresses() {
        let data = vec![b'a'; 1 << 20];
        let mut enc = Encoder::new(Compression::Zstd, Some(3)).unwrap();
        enc.push(&data).unwrap();
        let mut out = enc.take();
        out.extend(enc.finish().unwrap());
        assert!(out.len() < 1000, "{} bytes", out.len());
    }

    #[test]
    fn corrupt_zstd_is_an_error() {
        let mut enc = Encoder::new(Compression::Zstd, None).unwrap();
        enc.push(&[7u8; 100_000]).unwrap();
        let mut stored = enc.take();
        stored.extend(enc.finish().unwrap());
        let mid = stored.len() / 2;
        stored[mid] ^= 0xff;
        let r = decode(Compression::Zstd, &stored, stored.len());
        assert!(r.is_err());
    }

    proptest! {
        #[test]
        fn every_codec_roundtrips(data in proptest::collection::vec(any::<u8>(), 0..20_000), chunk in 1usize..5000) {
            for codec in [Compression::Zstd, Compression::Gzip, Compression::None] {
                prop_assert_eq!(roundtrip(codec, &data, chunk), data.clone());
            }
        }
    }
}
