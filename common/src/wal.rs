//! WAL positions and file names, as PostgreSQL writes them: an LSN is a
//! 64-bit byte position shown as `X/Y`; a segment is `seg_size` bytes of it,
//! named `TTTTTTTTXXXXXXXXYYYYYYYY` (timeline, then the segment number split
//! at 4 GiB); a timeline's history is `TTTTTTTT.history`; the segment in
//! progress, stored before it is full, is `<segment>.partial`. Shared by
//! the agent (which streams WAL) and the coordinator (which stores it).

use std::fmt;

/// The default (and most common) segment size: 16 MiB.
pub const DEFAULT_SEG_SIZE: u64 = 16 * 1024 * 1024;

/// A byte position in the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses `X/Y` (hex, as `pg_current_wal_lsn()` prints it).
    pub fn parse(s: &str) -> Result<Lsn, String> {
        let (hi, lo) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an LSN like 16/B374D848"))?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 {
                return Err(format!("{s:?} is not an LSN like 16/B374D848"));
            }
            u32::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not an LSN like 16/B374D848"))
        };
        Ok(Lsn((u64::from(part(hi)?) << 32) | u64::from(part(lo)?)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Whether `size` is a segment size PostgreSQL allows (a power of two from
/// 1 MiB to 1 GiB).
pub fn valid_seg_size(size: u64) -> bool {
    size.is_power_of_two() && ((1 << 20)..=(1 << 30)).contains(&size)
}

/// One WAL segment: its timeline and number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Segment {
    /// the timeline it belongs to
    pub timeline: u32,
    /// its number: its first byte's LSN divided by the segment size
    pub segno: u64,
}

impl Segment {
    /// The segment of `timeline` holding `lsn`.
    pub fn of(timeline: u32, lsn: Lsn, seg_size: u64) -> Segment {
        Segment {
            timeline,
            segno: lsn.0 / seg_size,
        }
    }

    /// Its file name for `seg_size`.
    pub fn name(&self, seg_size: u64) -> String {
        let per_id = 0x1_0000_0000 / seg_size;
        format!(
            "{:08X}{:08X}{:08X}",
            self.timeline,
            self.segno / per_id,
            self.segno % per_id
        )
    }

    /// Parses a segment file name (24 upper-case hex digits, as PostgreSQL
    /// writes them) for `seg_size`.
    pub fn parse(name: &str, seg_size: u64) -> Result<Segment, String> {
        let bad = || format!("{name:?} is not a WAL segment name");
        if name.len() != 24
            || !name
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
        {
            return Err(bad());
        }
        let num = |r: std::ops::Range<usize>| u64::from_str_radix(&name[r], 16).map_err(|_| bad());
        let timeline = num(0..8)? as u32;
        let (hi, lo) = (num(8..16)?, num(16..24)?);
        let per_id = 0x1_0000_0000 / seg_size;
        if timeline == 0 || lo >= per_id {
            return Err(bad());
        }
        Ok(Segment {
            timeline,
            segno: hi * per_id + lo,
        })
    }

    /// The first byte of the segment.
    pub fn start(&self, seg_size: u64) -> Lsn {
        Lsn(self.segno * seg_size)
    }
}

/// The name of timeline `tli`'s history file.
pub fn history_name(tli: u32) -> String {
    format!("{tli:08X}.history")
}

/// What a name in a timeline's WAL directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalFile {
    /// a whole segment
    Segment(Segment),
    /// the segment in progress, stored before it filled
    Partial(Segment),
    /// a timeline's history file
    History(u32),
}

impl WalFile {
    /// Parses a stored WAL file name; anything else is `None`.
    pub fn parse(name: &str, seg_size: u64) -> Option<WalFile> {
        if let Some(seg) = name.strip_suffix(".partial") {
            return Segment::parse(seg, seg_size).ok().map(WalFile::Partial);
        }
        if let Some(tli) = name.strip_suffix(".history") {
            if tli.len() == 8 && tli.bytes().all(|b| b.is_ascii_hexdigit()) {
                return u32::from_str_radix(tli, 16)
                    .ok()
                    .filter(|t| *t > 0)
                    .map(WalFile::History);
            }
            return None;
        }
        Segment::parse(name, seg_size).ok().map(WalFile::Segment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_and_positions_as_postgres_writes_them() {
        let lsn = Lsn::parse("16/B374D848").unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn::parse("0/0").unwrap(), Lsn(0));
        let seg = Segment::of(1, lsn, DEFAULT_SEG_SIZE);
        // As pg_walfile_name('16/B374D848') says on timeline 1.
        assert_eq!(seg.name(DEFAULT_SEG_SIZE), "0000000100000016000000B3");
        assert_eq!(
            Segment::parse("0000000100000016000000B3", DEFAULT_SEG_SIZE).unwrap(),
            seg
        );
        assert_eq!(seg.start(DEFAULT_SEG_SIZE), Lsn(0x16_B300_0000));
        // 1 GiB segments: four per 4 GiB.
        let big = 1 << 30;
        assert_eq!(
            Segment::of(2, lsn, big).name(big),
            "000000020000001600000002"
        );
        for bad in ["", "16", "x/1", "1/123456789", "1/"] {
            assert!(Lsn::parse(bad).is_err(), "{bad}");
        }
        for bad in [
            "0000000100000016000000b3",
            "000000010000001600000100",
            "000000000000001600000001",
            "00000001000000160000001",
        ] {
            assert!(Segment::parse(bad, DEFAULT_SEG_SIZE).is_err(), "{bad}");
        }
        assert_eq!(
            WalFile::parse("0000000200000016000000B3.partial", DEFAULT_SEG_SIZE),
            Some(WalFile::Partial(Segment {
                timeline: 2,
                segno: seg.segno
            }))
        );
        assert_eq!(
            WalFile::parse("00000002.history", DEFAULT_SEG_SIZE),
            Some(WalFile::History(2))
        );
        assert_eq!(history_name(10), "0000000A.history");
        assert_eq!(WalFile::parse("00000000.history", DEFAULT_SEG_SIZE), None);
        assert_eq!(WalFile::parse("backup_label", DEFAULT_SEG_SIZE), None);
        assert!(valid_seg_size(DEFAULT_SEG_SIZE) && !valid_seg_size(3 << 20));
    }

    proptest! {
        #[test]
        fn a_segment_name_round_trips(tli in 1u32..u32::MAX, lsn in any::<u64>(), shift in 20u32..=30) {
            let size = 1u64 << shift;
            let seg = Segment::of(tli, Lsn(lsn), size);
            prop_assert_eq!(Segment::parse(&seg.name(size), size).unwrap(), seg);
            prop_assert!(seg.start(size).0 <= lsn && lsn - seg.start(size).0 < size);
            prop_assert_eq!(Lsn::parse(&Lsn(lsn).to_string()).unwrap(), Lsn(lsn));
        }
    }
}
