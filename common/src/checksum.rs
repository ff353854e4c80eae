//! BLAKE3 checksums over stored bytes, written as `blake3:<hex>`.

/// Incremental BLAKE3 over a byte stream.
#[derive(Default, Clone)]
pub struct Checksum {
    hasher: blake3::Hasher,
    len: u64,
}

impl Checksum {
    /// A checksum over zero bytes so far.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes to the checksum.
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }

    /// Number of bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no byte has been hashed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The checksum in its stored form, `blake3:<64 hex digits>`.
    pub fn finish(&self) -> String {
        format!("blake3:{}", self.hasher.finalize().to_hex())
    }
}

/// The BLAKE3 of `data` as bare lower-case hex (the form in WAL keys).
pub fn blake3_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// True when `s` looks like a checksum this crate writes.
pub fn is_valid(s: &str) -> bool {
    s.strip_prefix("blake3:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_equals_one_shot() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut c = Checksum::new();
        for part in data.chunks(777) {
            c.update(part);
        }
        assert_eq!(
            c.finish(),
            format!("blake3:{}", blake3::hash(&data).to_hex())
        );
        assert_eq!(c.len(), data.len() as u64);
        assert!(is_valid(&c.finish()));
        assert!(!is_valid("blake3:xyz"));
    }
}
