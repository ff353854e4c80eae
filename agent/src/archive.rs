//! Row counts read from a `pg_dump --format=custom --compress=0` archive as
//! it streams past, so each backup records how many rows every table had in
//! the dump's own snapshot without a second pass over the database.
//!
//! The archive (pg_backup_archiver.c / pg_backup_custom.c) is a header, the
//! table of contents, then data blocks: `BLK_DATA` (a type byte, the TOC
//! entry's dump id, then chunks of COPY text, each an int length and its
//! bytes, ended by a zero length) and `BLK_BLOBS` (large objects: per
//! object an oid and chunks, ended by oid 0). Ints are a sign byte and
//! `intSize` little-endian bytes; strings an int length (-1: null) and bytes.
//! Without compression a COPY text row is exactly one newline-terminated
//! line (newlines inside values are escaped), so a table's rows are the
//! newlines of its chunks, less the end-of-data marker pg_dump writes after
//! them (`\.` and blank lines). Anything unexpected stops the counting (the
//! backup itself goes on; its row counts are then not recorded).

use std::collections::{BTreeMap, HashMap};

const BLK_DATA: u8 = 1;
const BLK_BLOBS: u8 = 3;

/// `K_VERS` of the archiver: (major * 256 + minor) * 256 + revision.
const fn vers(maj: u32, min: u32, rev: u32) -> u32 {
    (maj * 256 + min) * 256 + rev
}

/// The formats this reads: pg_dump 10 (1.12) to 17 (1.16).
const OLDEST: u32 = vers(1, 12, 0);
const NEWEST: u32 = vers(1, 16, 0);

/// Rows per table, as `(schema, table)`.
pub type Counts = BTreeMap<(String, String), u64>;

/// Where the reader is in the data section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Data {
    /// Next: a block's type byte and dump id.
    Block,
    /// Next: a chunk length; `into` is the dump id counted, if any.
    ChunkLen { into: Option<i64>, blobs: bool },
    /// Inside a chunk of `left` bytes.
    Chunk {
        left: usize,
        into: Option<i64>,
        blobs: bool,
    },
    /// Next: a large object's oid (0 ends the block).
    BlobOid,
}

#[derive(Debug)]
enum State {
    /// Header and table of contents, gathered until whole.
    Head,
    Data(Data),
    Failed(String),
}

/// Feed it the archive's bytes in order; ask for the counts at the end.
#[derive(Debug)]
pub struct RowCounter {
    state: State,
    buf: Vec<u8>,
    /// The head is parsed again only once `buf` has grown to this (a big
    /// table of contents arrives in many pieces).
    next_try: usize,
    int_size: usize,
    /// TABLE DATA entries: dump id → (schema, table).
    tables: HashMap<i64, (String, String)>,
    rows: HashMap<i64, u64>,
    /// The last bytes of the block being read, for its end-of-data marker.
    tail: Vec<u8>,
}

impl Default for RowCounter {
    fn default() -> Self {
        Self {
            state: State::Head,
            buf: Vec::new(),
            next_try: 0,
            int_size: 4,
            tables: HashMap::new(),
            rows: HashMap::new(),
            tail: Vec::new(),
        }
    }
}

/// Not enough bytes yet, or not an archive this reads.
enum Short {
    More,
    Bad(String),
}

/// A cursor over the gathered head bytes.
struct Cur<'a> {
    b: &'a [u8],
    at: usize,
    int_size: usize,
}

impl Cur<'_> {
    fn byte(&mut self) -> Result<u8, Short> {
        let v = *self.b.get(self.at).ok_or(Short::More)?;
        self.at += 1;
        Ok(v)
    }

    fn bytes(&mut self, n: usize) -> Result<&[u8], Short> {
        let end = self.at.checked_add(n).ok_or(Short::More)?;
        let s = self.b.get(self.at..end).ok_or(Short::More)?;
        self.at = end;
        Ok(s)
    }

    fn int(&mut self) -> Result<i64, Short> {
        let (v, used) = read_int(&self.b[self.at..], self.int_size).ok_or(Short::More)?;
        self.at += used;
        Ok(v)
    }

    fn string(&mut self) -> Result<Option<String>, Short> {
        let n = self.int()?;
        if n < 0 {
            return Ok(None);
        }
        let n = usize::try_from(n).map_err(|_| Short::Bad("a string length overflows".into()))?;
        if n > 1 << 30 {
            return Err(Short::Bad(format!("a string of {n} bytes")));
        }
        Ok(Some(String::from_utf8_lossy(self.bytes(n)?).into_owned()))
    }
}

/// Bytes kept of a block's end: the marker and a few blank lines.
const TAIL: usize = 16;

/// The lines of the end-of-data marker at the end of a table's data: a `\.`
/// line and the blank lines after it (0 when there is none).
fn end_marker_lines(tail: &[u8]) -> u64 {
    let text = tail.strip_suffix(b"\n").unwrap_or(tail);
    let blank = text.iter().rev().take_while(|&&c| c == b'\n').count();
    let line = &text[..text.len() - blank];
    let starts_line = line.len() == 2 || line.get(line.len().wrapping_sub(3)) == Some(&b'\n');
    if line.ends_with(b"\\.") && starts_line && tail.ends_with(b"\n") {
        1 + blank as u64
    } else {
        0
    }
}

/// An int at the start of `b` and the bytes it took; `None` when `b` is too
/// short.
fn read_int(b: &[u8], int_size: usize) -> Option<(i64, usize)> {
    let bytes = b.get(..1 + int_size)?;
    let mut v: i64 = 0;
    for (i, &x) in bytes[1..].iter().enumerate().take(8) {
        v |= i64::from(x) << (8 * i);
    }
    Some((if bytes[0] != 0 { -v } else { v }, 1 + int_size))
}

impl RowCounter {
    /// Takes the next bytes of the archive.
    pub fn feed(&mut self, mut data: &[u8]) {
        if let State::Head = self.state {
            self.buf.extend_from_slice(data);
            if self.buf.len() >= self.next_try {
                self.try_head();
            }
            return;
        }
        // A field cut between two feeds is gathered in `buf` first.
        if !self.buf.is_empty() {
            let need = self.need();
            let take = need.saturating_sub(self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() < need {
                return;
            }
            let field = std::mem::take(&mut self.buf);
            self.data(&field);
        }
        self.data(data);
    }

    fn try_head(&mut self) {
        match self.read_head() {
            Ok(at) => {
                let rest = std::mem::take(&mut self.buf);
                self.state = State::Data(Data::Block);
                self.data(&rest[at..]);
            }
            Err(Short::More) => self.next_try = self.buf.len() * 2,
            Err(Short::Bad(why)) => self.fail(why),
        }
    }

    /// The counts, if the whole archive was read as expected; otherwise why
    /// not.
    pub fn finish(mut self) -> Result<Counts, String> {
        if let State::Head = self.state {
            self.try_head();
        }
        match self.state {
            State::Failed(why) => Err(why),
            State::Head => Err("the archive ended inside its table of contents".into()),
            State::Data(Data::Block) if self.buf.is_empty() => {
                let mut counts = Counts::new();
                for (id, table) in self.tables {
                    counts.insert(table, self.rows.get(&id).copied().unwrap_or(0));
                }
                Ok(counts)
            }
            State::Data(_) => Err("the archive ended inside a data block".into()),
        }
    }

    fn fail(&mut self, why: String) {
        self.buf = Vec::new();
        self.state = State::Failed(why);
    }

    /// Bytes the field at the current data state takes.
    fn need(&self) -> usize {
        match self.state {
            State::Data(Data::Block) => 2 + self.int_size,
            _ => 1 + self.int_size,
        }
    }

    /// Parses header and TOC from `buf`; returns where the data begins.
    fn read_head(&mut self) -> Result<usize, Short> {
        let mut c = Cur {
            b: &self.buf,
            at: 0,
            int_size: 4,
        };
        if c.bytes(5)? != b"PGDMP" {
            return Err(Short::Bad("not a pg_dump custom-format archive".into()));
        }
        let (maj, min) = (c.byte()?, c.byte()?);
        let rev = if maj > 1 || (maj == 1 && min > 0) {
            c.byte()?
        } else {
            0
        };
        let version = vers(maj.into(), min.into(), rev.into());
        if !(OLDEST..=NEWEST + 255).contains(&version) {
            return Err(Short::Bad(format!(
                "archive format {maj}.{min}.{rev} is not one this agent reads (1.12 to 1.16)"
            )));
        }
        let int_size = c.byte()? as usize;
        let off_size = c.byte()? as usize;
        let format = c.byte()?;
        if !(1..=8).contains(&int_size) || format != 1 {
            return Err(Short::Bad(format!(
                "unexpected archive header (int size {int_size}, format {format})"
            )));
        }
        c.int_size = int_size;
        if version >= vers(1, 15, 0) {
            let algorithm = c.byte()?;
            if algorithm != 0 {
                return Err(Short::Bad("the archive is compressed".into()));
            }
        } else if c.int()? != 0 {
            return Err(Short::Bad("the archive is compressed".into()));
        }
        for _ in 0..7 {
            c.int()?; // creation time
        }
        c.string()?; // database name
        c.string()?; // server version
        c.string()?; // pg_dump version
        let entries = c.int()?;
        let mut tables = HashMap::new();
        for _ in 0..entries {
            let id = c.int()?;
            c.int()?; // had dumper
            c.string()?; // table oid
            c.string()?; // oid
            let tag = c.string()?.unwrap_or_default();
            let desc = c.string()?.unwrap_or_default();
            c.int()?; // section
            c.string()?; // definition
            c.string()?; // drop statement
            c.string()?; // copy statement
            let namespace = c.string()?.unwrap_or_default();
            c.string()?; // tablespace
            c.string()?; // table access method
            if version >= vers(1, 16, 0) {
                c.int()?; // relkind
            }
            c.string()?; // owner
            c.string()?; // "false": with oids
            while c.string()?.is_some() {} // dependencies
            c.byte()?; // data state
            c.bytes(off_size)?; // data offset
            if desc == "TABLE DATA" {
                tables.insert(id, (namespace, tag));
            }
        }
        self.int_size = int_size;
        self.tables = tables;
        Ok(c.at)
    }

    /// Walks data-section bytes; a field cut at the end is kept in `buf`.
    fn data(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            let State::Data(d) = self.state else { return };
            let next = match d {
                Data::Chunk { left, into, blobs } => {
                    let n = left.min(b.len());
                    if let Some(id) = into {
                        *self.rows.entry(id).or_default() +=
                            memchr::memchr_iter(b'\n', &b[..n]).count() as u64;
                        self.tail.extend_from_slice(&b[n.saturating_sub(TAIL)..n]);
                        let cut = self.tail.len().saturating_sub(TAIL);
                        self.tail.drain(..cut);
                    }
                    b = &b[n..];
                    if n == left {
                        Data::ChunkLen { into, blobs }
                    } else {
                        Data::Chunk {
                            left: left - n,
                            into,
                            blobs,
                        }
                    }
                }
                _ if b.len() < self.need() => {
                    self.buf.extend_from_slice(b);
                    return;
                }
                Data::Block => {
                    let kind = b[0];
                    let Some((id, used)) = read_int(&b[1..], self.int_size) else {
                        return;
                    };
                    b = &b[1 + used..];
                    match kind {
                        BLK_DATA => Data::ChunkLen {
                            into: self.tables.contains_key(&id).then_some(id),
                            blobs: false,
                        },
                        BLK_BLOBS => Data::BlobOid,
                        other => {
                            self.fail(format!("unknown data block type {other}"));
                            return;
                        }
                    }
                }
                Data::ChunkLen { into, blobs } => {
                    let Some((len, used)) = read_int(b, self.int_size) else {
                        return;
                    };
                    b = &b[used..];
                    match usize::try_from(len) {
                        Ok(0) if blobs => Data::BlobOid,
                        Ok(0) => {
                            if let Some(id) = into {
                                let marker = end_marker_lines(&self.tail);
                                if let Some(r) = self.rows.get_mut(&id) {
                                    *r = r.saturating_sub(marker);
                                }
                            }
                            self.tail.clear();
                            Data::Block
                        }
                        Ok(left) => Data::Chunk { left, into, blobs },
                        Err(_) => {
                            self.fail(format!("a data chunk of length {len}"));
                            return;
                        }
                    }
                }
                Data::BlobOid => {
                    let Some((oid, used)) = read_int(b, self.int_size) else {
                        return;
                    };
                    b = &b[used..];
                    if oid == 0 {
                        Data::Block
                    } else {
                        Data::ChunkLen {
                            into: None,
                            blobs: true,
                        }
                    }
                }
            };
            self.state = State::Data(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes an archive the way pg_dump 17 does (format 1.16, no
    /// compression): two tables, one of them empty, a large object.
    fn archive() -> Vec<u8> {
        let mut a = b"PGDMP".to_vec();
        a.extend([1, 16, 0, 4, 8, 1, 0]);
        let int = |a: &mut Vec<u8>, v: i64| {
            a.push(u8::from(v < 0));
            a.extend((v.unsigned_abs() as u32).to_le_bytes());
        };
        let string = |a: &mut Vec<u8>, s: Option<&str>| match s {
            None => {
                a.push(1);
                a.extend(1u32.to_le_bytes());
            }
            Some(s) => {
                a.push(0);
                a.extend((s.len() as u32).to_le_bytes());
                a.extend(s.as_bytes());
            }
        };
        for v in [0, 0, 12, 2, 0, 125, 0] {
            int(&mut a, v);
        }
        for s in ["shop", "17.2", "17.2"] {
            string(&mut a, Some(s));
        }
        let entries = [
            (1, "SCHEMA", "", "app"),
            (7, "TABLE DATA", "app", "orders"),
            (8, "TABLE DATA", "public", "empty"),
            (9, "BLOBS", "", "BLOBS"),
        ];
        int(&mut a, entries.len() as i64);
        for (id, desc, ns, tag) in entries {
            int(&mut a, id);
            int(&mut a, 1);
            string(&mut a, Some("0"));
            string(&mut a, Some("0"));
            string(&mut a, Some(tag));
            string(&mut a, Some(desc));
            int(&mut a, 2);
            string(&mut a, Some(""));
            string(&mut a, Some(""));
            string(&mut a, Some("COPY x FROM stdin;\n"));
            string(&mut a, Some(ns));
            string(&mut a, Some(""));
            string(&mut a, None);
            int(&mut a, 114);
            string(&mut a, Some("owner"));
            string(&mut a, Some("false"));
            string(&mut a, Some("3"));
            string(&mut a, None);
            a.push(2);
            a.extend([0u8; 8]);
        }
        // orders: 3 rows over two chunks (a row cut between them)
        a.push(BLK_DATA);
        int(&mut a, 7);
        for chunk in ["1\ta\n2\tb\\nstill b\n3\t", "c\n\\.\n\n", "\n"] {
            int(&mut a, chunk.len() as i64);
            a.extend(chunk.as_bytes());
        }
        int(&mut a, 0);
        a.push(BLK_DATA);
        int(&mut a, 8);
        int(&mut a, 5);
        a.extend(b"\\.\n\n\n");
        int(&mut a, 0);
        // a large object with newlines in it: not rows
        a.push(BLK_BLOBS);
        int(&mut a, 9);
        int(&mut a, 16400);
        int(&mut a, 3);
        a.extend(b"\n\n\n");
        int(&mut a, 0);
        int(&mut a, 0);
        a
    }

    #[test]
    fn rows_are_counted_however_the_stream_is_cut() {
        let a = archive();
        let want: Counts = [
            (("app".to_string(), "orders".to_string()), 3),
            (("public".to_string(), "empty".to_string()), 0),
        ]
        .into_iter()
        .collect();
        for step in [1, 2, 3, 5, 7, 64, a.len()] {
            let mut r = RowCounter::default();
            for piece in a.chunks(step) {
                r.feed(piece);
            }
            assert_eq!(r.finish(), Ok(want.clone()), "pieces of {step}");
        }
    }

    #[test]
    fn the_end_of_data_marker_is_not_rows() {
        assert_eq!(end_marker_lines(b"\\.\n\n\n"), 3);
        assert_eq!(end_marker_lines(b"1\ta\n\\.\n"), 1);
        assert_eq!(end_marker_lines(b"1\ta\n"), 0);
        assert_eq!(end_marker_lines(b"x\\.\n"), 0);
        assert_eq!(end_marker_lines(b""), 0);
    }

    #[test]
    fn anything_else_is_no_counts_with_a_reason() {
        let a = archive();
        let mut r = RowCounter::default();
        r.feed(&a[..a.len() - 3]);
        assert!(r.finish().unwrap_err().contains("inside a data block"));
        let mut r = RowCounter::default();
        r.feed(b"-- plain SQL\n");
        assert!(r
            .finish()
            .unwrap_err()
            .contains("not a pg_dump custom-format"));
        let mut compressed = a.clone();
        compressed[11] = 1; // the compression algorithm byte
        let mut r = RowCounter::default();
        r.feed(&compressed);
        assert!(r.finish().unwrap_err().contains("compressed"));
        let mut old = a;
        old[6] = 11;
        let mut r = RowCounter::default();
        r.feed(&old);
        assert!(r.finish().unwrap_err().contains("1.12 to 1.16"));
    }
}
