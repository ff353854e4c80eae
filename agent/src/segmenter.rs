//! Cuts the replication stream into WAL segments (issue 14, being built).
//! The server sends WAL in messages of any size; the coordinator stores
//! segments. Bytes must arrive exactly in order: anything else is a gap,
//! refused rather than papered over. The segment in progress is kept so it
//! can be stored as a partial (a quiet database's last seconds).

use datasaver_common::wal::{Lsn, Segment};

/// Data that does not continue where the stream is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("WAL arrived at {got} while the stream is at {expected}: a gap or an overlap")]
pub struct OutOfOrder {
    pub expected: Lsn,
    pub got: Lsn,
}

/// A whole segment, ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Complete {
    pub segment: Segment,
    pub bytes: Vec<u8>,
}

/// The stream's position and the segment being filled.
pub struct Segmenter {
    timeline: u32,
    seg_size: u64,
    position: Lsn,
    current: Vec<u8>,
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
        })
    }

    /// Where the next byte belongs.
    pub fn position(&self) -> Lsn {
        self.position
    }

    /// Takes WAL starting at `start`; returns the segments it completed.
    pub fn push(&mut self, start: Lsn, mut bytes: &[u8]) -> Result<Vec<Complete>, OutOfOrder> {
        if start != self.position {
            return Err(OutOfOrder {
                expected: self.position,
                got: start,
            });
        }
        let mut done = Vec::new();
        while !bytes.is_empty() {
            let room = self.seg_size as usize - self.current.len();
            let take = room.min(bytes.len());
            self.current.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            self.position = Lsn(self.position.0 + take as u64);
            if self.current.len() as u64 == self.seg_size {
                let segment = Segment {
                    timeline: self.timeline,
                    segno: self.position.0 / self.seg_size - 1,
                };
                // The next one grows as WAL comes: not reserved while this
                // one is still being compressed and sent.
                let full = std::mem::take(&mut self.current);
                done.push(Complete {
                    segment,
                    bytes: full,
                });
            }
        }
        Ok(done)
    }

    /// The segment being filled and what it holds so far (to store as a
    /// partial), if anything.
    pub fn partial(&self) -> Option<(Segment, &[u8])> {
        (!self.current.is_empty()).then(|| {
            (
                Segment {
                    timeline: self.timeline,
                    segno: self.position.0 / self.seg_size,
                },
                &self.current[..],
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
        assert!(s.push(Lsn(3 * SEG), &[1, 2, 3]).unwrap().is_empty());
        let e = s.push(Lsn(3 * SEG + 10), &[4]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "WAL arrived at 0/30000A while the stream is at 0/300003: a gap or an overlap"
        );
        assert_eq!(s.position(), Lsn(3 * SEG + 3));
        let (seg, held) = s.partial().unwrap();
        assert_eq!((seg.segno, held), (3, &[1u8, 2, 3][..]));
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
                out.extend(s.push(Lsn(first * SEG + at as u64), &data[at..at + c]).unwrap());
                at += c;
            }
            let whole = total / SEG as usize;
            prop_assert_eq!(out.len(), whole);
            for (i, c) in out.iter().enumerate() {
                prop_assert_eq!(c.segment, Segment { timeline: 2, segno: first + i as u64 });
                prop_assert!(c.bytes[..] == data[i * SEG as usize..(i + 1) * SEG as usize]);
            }
            match s.partial() {
                None => prop_assert_eq!(total % SEG as usize, 0),
                Some((seg, held)) => {
                    prop_assert_eq!(seg.segno, first + whole as u64);
                    prop_assert!(held == &data[whole * SEG as usize..]);
                }
            }
        }
    }
}
