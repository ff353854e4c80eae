//! Cuts the replication stream into WAL segments (issue 14).
//! The server sends WAL in messages of any size; the coordinator stores
//! segments. Bytes must arrive exactly in order: anything else is a gap,
//! refused rather than papered over. The segment in progress is kept so it
//! can be stored as a partial (a quiet database's last seconds).

use bytes::Bytes;
use datasaver_common::wal::{Lsn, Segment};

/// Data that does not continue where the stream is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("WAL arrived at {got} while the stream is at {expected}: a gap or an overlap")]
pub struct OutOfOrder {
    pub expected: Lsn,
    pub got: Lsn,
}

/// WAL bytes as they came from the server: the pieces of its messages,
/// shared, never copied into one buffer (no 16 MiB reallocations, and a
/// partial costs no copy).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pieces(Vec<Bytes>);

impl Pieces {
    /// How many bytes.
    pub fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Bytes::is_empty)
    }

    /// The pieces, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.0.iter().map(|b| &b[..])
    }

    /// All of it in one buffer (tests).
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.concat()
    }
}

impl From<Vec<u8>> for Pieces {
    fn from(v: Vec<u8>) -> Self {
        Pieces(vec![Bytes::from(v)])
    }
}

/// A whole segment, ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Complete {
    pub segment: Segment,
    pub bytes: Pieces,
}

/// The stream's position and the segment being filled.
pub struct Segmenter {
    timeline: u32,
    seg_size: u64,
    position: Lsn,
    current: Vec<Bytes>,
    filled: usize,
}

impl Segmenter {
    /// A stream of `timeline` starting at `start`, which must be a segment
    /// boundary (streaming is started at one, so every segment is whole).
    pub fn new(timeline: u32, start: Lsn, seg_size: u64) -> Result<Segmenter, String> {
        if !start.0.is_multiple_of(seg_size) {
            return Err(format!("{start} is not at a segment boundary"));
        }
        Ok(Segmenter {
            timeline,
            seg_size,
            position: start,
            current: Vec::new(),
            filled: 0,
        })
    }

    /// Where the next byte belongs.
    pub fn position(&self) -> Lsn {
        self.position
    }

    /// Takes WAL starting at `start`; returns the segments it completed.
    pub fn push(&mut self, start: Lsn, mut bytes: Bytes) -> Result<Vec<Complete>, OutOfOrder> {
        if start != self.position {
            return Err(OutOfOrder {
                expected: self.position,
                got: start,
            });
        }
        let mut done = Vec::new();
        while !bytes.is_empty() {
            let room = self.seg_size as usize - self.filled;
            let piece = bytes.split_to(room.min(bytes.len()));
            self.filled += piece.len();
            self.position = Lsn(self.position.0 + piece.len() as u64);
            self.current.push(piece);
            if self.filled as u64 == self.seg_size {
                let segment = Segment {
                    timeline: self.timeline,
                    segno: self.position.0 / self.seg_size - 1,
                };
                done.push(Complete {
                    segment,
                    bytes: Pieces(std::mem::take(&mut self.current)),
                });
                self.filled = 0;
            }
        }
        Ok(done)
    }

    /// The segment being filled and what it holds so far (to store as a
    /// partial), if anything: the pieces shared, not copied.
    pub fn partial(&self) -> Option<(Segment, Pieces)> {
        (self.filled > 0).then(|| {
            (
                Segment {
                    timeline: self.timeline,
                    segno: self.position.0 / self.seg_size,
                },
                Pieces(self.current.clone()),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEG: u64 = 1 << 20;

    #[test]
    fn out_of_order_data_is_refused_and_changes_nothing() {
        let mut s = Segmenter::new(1, Lsn(3 * SEG), SEG).unwrap();
        assert!(Segmenter::new(1, Lsn(3 * SEG + 1), SEG).is_err());
        assert!(s
            .push(Lsn(3 * SEG), Bytes::from_static(&[1, 2, 3]))
            .unwrap()
            .is_empty());
        let e = s
            .push(Lsn(3 * SEG + 10), Bytes::from_static(&[4]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "WAL arrived at 0/30000A while the stream is at 0/300003: a gap or an overlap"
        );
        assert_eq!(s.position(), Lsn(3 * SEG + 3));
        let (seg, held) = s.partial().unwrap();
        assert_eq!((seg.segno, held.to_vec()), (3, vec![1u8, 2, 3]));
    }

    proptest! {
        /// However the stream is cut into messages, the same segments come
        /// out, each whole, in order, with the right numbers, and the rest
        /// is the partial.
        #[test]
        fn any_message_sizes_give_the_same_segments(
            cuts in prop::collection::vec(1usize..300_000, 1..40),
            first in 0u64..1000,
        ) {
            let total: usize = cuts.iter().sum();
            let data: Vec<u8> = (0..total).map(|i| (i * 31 % 251) as u8).collect();
            let mut s = Segmenter::new(2, Lsn(first * SEG), SEG).unwrap();
            let mut out = Vec::new();
            let mut at = 0usize;
            for c in &cuts {
                let piece = Bytes::copy_from_slice(&data[at..at + c]);
                out.extend(s.push(Lsn(first * SEG + at as u64), piece).unwrap());
                at += c;
            }
            let whole = total / SEG as usize;
            prop_assert_eq!(out.len(), whole);
            for (i, c) in out.iter().enumerate() {
                prop_assert_eq!(c.segment, Segment { timeline: 2, segno: first + i as u64 });
                prop_assert_eq!(c.bytes.len(), SEG as usize);
                prop_assert!(c.bytes.to_vec()[..] == data[i * SEG as usize..(i + 1) * SEG as usize]);
            }
            match s.partial() {
                None => prop_assert_eq!(total % SEG as usize, 0),
                Some((seg, held)) => {
                    prop_assert_eq!(seg.segno, first + whole as u64);
                    prop_assert!(held.to_vec()[..] == data[whole * SEG as usize..]);
                }
            }
        }
    }
}
