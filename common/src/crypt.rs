//! Client-side encryption with age (X25519 recipients). The agent encrypts
//! after compressing, so the coordinator and the storage only ever see
//! ciphertext; restore decrypts on the agent with an identity file. Only a
//! fingerprint of the recipient is ever recorded, never key material.

use std::io::Write;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use age::secrecy::ExposeSecret;
pub use age::x25519::{Identity, Recipient};

/// Parses an `age1…` recipient.
pub fn parse_recipient(s: &str) -> Result<Recipient, String> {
    Recipient::from_str(s.trim()).map_err(|e| format!("not an age X25519 recipient (age1…): {e}"))
}

/// Reads identities (`AGE-SECRET-KEY-1…` lines; `#` comments and blank
/// lines ignored) from a file. Errors never include the file's contents.
pub fn load_identities(path: &str) -> Result<Vec<Identity>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let id = Identity::from_str(l).map_err(|_| {
            format!(
                "{path}: line {} is not an age identity (AGE-SECRET-KEY-1…)",
                n + 1
            )
        })?;
        out.push(id);
    }
    if out.is_empty() {
        return Err(format!(
            "{path} contains no age identity (AGE-SECRET-KEY-1…)"
        ));
    }
    Ok(out)
}

/// A short, stable, non-secret name for a recipient: `age:` and the first
/// 16 hex digits of BLAKE3 over its `age1…` form.
pub fn fingerprint(r: &Recipient) -> String {
    let h = blake3::hash(r.to_string().as_bytes()).to_hex();
    format!("age:{}", &h[..16])
}

/// A new identity and its recipient, in age's own text formats.
pub fn generate() -> (String, String) {
    let id = Identity::generate();
    let secret = id.to_string().expose_secret().to_string();
    (secret, id.to_public().to_string())
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Push-style age encryption: `push` plaintext, `take` ciphertext.
pub struct Encrypt {
    sink: Sink,
    writer: age::stream::StreamWriter<Sink>,
}

impl Encrypt {
    /// Starts an age stream to `recipient`.
    pub fn new(recipient: &Recipient) -> Result<Self, String> {
        let enc =
            age::Encryptor::with_recipients(std::iter::once(recipient as &dyn age::Recipient))
                .map_err(|e| format!("age: {e}"))?;
        let sink = Sink::default();
        let writer = enc
            .wrap_output(sink.clone())
            .map_err(|e| format!("age: {e}"))?;
        Ok(Self { sink, writer })
    }

    /// Feeds plaintext.
    pub fn push(&mut self, data: &[u8]) -> Result<(), String> {
        self.writer
            .write_all(data)
            .map_err(|e| format!("age encryption failed: {e}"))
    }

    /// Takes the ciphertext produced so far.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut *self.sink.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Ends the stream and returns the remaining ciphertext.
    pub fn finish(self) -> Result<Vec<u8>, String> {
        let sink = self
            .writer
            .finish()
            .map_err(|e| format!("age encryption failed: {e}"))?;
        let out = std::mem::take(&mut *sink.0.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(out)
    }
}

/// Why stored bytes cannot be turned back into what was backed up.
#[derive(Debug)]
pub enum StoredError {
    /// Decryption could not start (wrong identity, not an age stream).
    Decrypt(String),
    /// Decompression could not start.
    Decode(String),
}

/// The stored bytes of a backup as the plain stream that was backed up:
/// decrypted with `identities` (when encrypted), then decompressed. Shared by
/// the agent's restores and `dsctl export`.
pub fn stored_reader<'r, R: std::io::Read + 'r>(
    stored: R,
    codec: crate::codec::Compression,
    identities: Option<&[Identity]>,
) -> Result<Box<dyn std::io::Read + 'r>, StoredError> {
    let decrypted: Box<dyn std::io::Read + 'r> = match identities {
        None => Box::new(stored),
        Some(ids) => Box::new(decrypt_reader(stored, ids).map_err(StoredError::Decrypt)?),
    };
    crate::codec::decode_reader(codec, decrypted).map_err(|e| StoredError::Decode(e.to_string()))
}

/// Wraps a reader of ciphertext into a reader of plaintext.
pub fn decrypt_reader<R: std::io::Read>(
    input: R,
    identities: &[Identity],
) -> Result<age::stream::StreamReader<R>, String> {
    let d = age::Decryptor::new(input).map_err(|e| format!("not a readable age stream: {e}"))?;
    d.decrypt(identities.iter().map(|i| i as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => {
                "none of the agent's age identities can decrypt it".to_string()
            }
            other => format!("age decryption failed: {other}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn roundtrip_and_wrong_identity() {
        let (secret, public) = generate();
        assert!(secret.starts_with("AGE-SECRET-KEY-1"), "{secret}");
        assert!(public.starts_with("age1"), "{public}");
        let r = parse_recipient(&public).unwrap();
        let id = Identity::from_str(&secret).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut e = Encrypt::new(&r).unwrap();
        let mut ct = Vec::new();
        for part in data.chunks(70_000) {
            e.push(part).unwrap();
            ct.extend(e.take());
        }
        ct.extend(e.finish().unwrap());
        assert!(ct.starts_with(b"age-encryption.org/v1"));
        assert!(!ct.windows(data.len().min(64)).any(|w| w == &data[..64]));
        let mut pt = Vec::new();
        decrypt_reader(&ct[..], std::slice::from_ref(&id))
            .unwrap()
            .read_to_end(&mut pt)
            .unwrap();
        assert_eq!(pt, data);

        let other = Identity::generate();
        let err = decrypt_reader(&ct[..], &[other]).err().unwrap();
        assert!(err.contains("can decrypt it"), "{err}");
        assert_eq!(fingerprint(&r), fingerprint(&id.to_public()));
        assert!(fingerprint(&r).starts_with("age:") && fingerprint(&r).len() == 20);
        assert!(parse_recipient("age1notakey").is_err());
    }

    #[test]
    fn identity_files() {
        let dir = std::env::temp_dir().join(format!("ds-age-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (secret, _) = generate();
        let f = dir.join("id.txt");
        std::fs::write(&f, format!("# created: now\n# public key: x\n{secret}\n")).unwrap();
        assert_eq!(load_identities(f.to_str().unwrap()).unwrap().len(), 1);
        std::fs::write(&f, "garbage-with-SECRET\n").unwrap();
        let e = load_identities(f.to_str().unwrap()).err().unwrap();
        assert!(
            !e.contains("garbage"),
            "errors must not echo file contents: {e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
