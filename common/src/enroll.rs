//! Join tokens: how an agent with no certificate joins the fleet.
//!
//! A token (`dsctl tokens create`) is `dsj1.<id>.<secret>.<ca>@<url>`: the
//! coordinator's address, the SHA-256 of the fleet CA certificate (DER, in
//! hex), and an id and secret the coordinator stores only hashed. The agent
//! connects to the URL and accepts the coordinator only if the chain it
//! presents contains a CA with that fingerprint and its certificate is
//! signed by it for that host ([`PinnedCa`], kubeadm's discovery-token pin);
//! only then does it send the secret and a certificate request for a key it
//! made itself. A man in the middle never sees the secret.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The prefix of every token this version writes.
pub const PREFIX: &str = "dsj1.";

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// public id, shown by `dsctl tokens list`
    pub id: String,
    /// the secret the coordinator stores only hashed
    pub secret: String,
    /// SHA-256 of the fleet CA certificate (DER), lowercase hex
    pub ca_sha256: String,
    /// the coordinator's address, `https://host:port`
    pub url: String,
}

// Never print the secret, even in a debug log.
impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("ca_sha256", &self.ca_sha256)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Length of a token id in hex characters.
pub const ID_LEN: usize = 12;
/// Length of a token secret in hex characters (128 bits).
pub const SECRET_LEN: usize = 32;

impl JoinToken {
    /// A fresh token for the CA `ca_der` and address `url`.
    pub fn generate(ca_der: &[u8], url: &str) -> Result<Self, String> {
        let rng = ring::rand::SystemRandom::new();
        let mut bytes = [0u8; (ID_LEN + SECRET_LEN) / 2];
        ring::rand::SecureRandom::fill(&rng, &mut bytes)
            .map_err(|_| "the system's random number generator failed".to_string())?;
        let hex = crate::crl::hex(&bytes);
        Ok(Self {
            id: hex[..ID_LEN].to_string(),
            secret: hex[ID_LEN..].to_string(),
            ca_sha256: sha256_hex(ca_der),
            url: url.to_string(),
        })
    }

    /// Parses a token; the error says what is wrong without repeating it.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let rest = s.strip_prefix(PREFIX).ok_or_else(|| {
            format!("not a datasaver join token (it must start with {PREFIX:?}; create one with `dsctl tokens create`)")
        })?;
        let (creds, url) = rest
            .split_once('@')
            .ok_or("has no coordinator address after '@'")?;
        let mut parts = creds.split('.');
        let (Some(id), Some(secret), Some(ca), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("is cut short or has extra parts (copy it whole)".into());
        };
        if !is_hex(id, ID_LEN) || !is_hex(secret, SECRET_LEN) || !is_hex(ca, 64) {
            return Err("is damaged: its id, secret or CA fingerprint is not what `dsctl tokens create` writes (copy it whole)".into());
        }
        if !url.starts_with("https://") {
            return Err(format!(
                "coordinator address {url:?} is not an https:// URL"
            ));
        }
        Ok(Self {
            id: id.into(),
            secret: secret.into(),
            ca_sha256: ca.into(),
            url: url.into(),
        })
    }

    /// The token as the agent takes it.
    pub fn encode(&self) -> String {
        format!(
            "{PREFIX}{}.{}.{}@{}",
            self.id, self.secret, self.ca_sha256, self.url
        )
    }
}

/// SHA-256 of `bytes`, lowercase hex: a CA's fingerprint, a secret's hash.
pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::crl::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Whether `secret` hashes to `hash` (constant time).
pub fn secret_matches(secret: &str, hash: &str) -> bool {
    let got = sha256_hex(secret.as_bytes());
    got.len() == hash.len()
        && got
            .bytes()
            .zip(hash.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The server check of an agent that has a token but no CA yet: the chain
/// the server presents must contain a certificate whose SHA-256 is the
/// token's fingerprint, and the server's certificate must be valid for the
/// host under that CA. The CA found is kept for the agent to store.
#[derive(Debug)]
pub struct PinnedCa {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    found: Mutex<Option<CertificateDer<'static>>>,
    refused: Mutex<Option<String>>,
}

impl PinnedCa {
    /// A check for the CA whose SHA-256 (hex) is `pin`.
    pub fn new(pin: &str) -> Self {
        Self {
            pin: pin.to_string(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            found: Mutex::new(None),
            refused: Mutex::new(None),
        }
    }

    /// Why the last server was refused for not holding the pinned CA.
    pub fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The CA certificate the last successful check found.
    pub fn found(&self) -> Option<CertificateDer<'static>> {
        self.found.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| sha256_hex(c.as_ref()) == self.pin)
        else {
            let why = format!(
                "the server's certificate chain has no CA with the join token's fingerprint sha256:{}: it is not the coordinator the token was made for (or something between replaces its certificate); nothing was sent",
                self.pin
            );
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
            return Err(rustls::Error::General(why));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("the pinned CA is unusable: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let ok =
            inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        *self.found.lock().unwrap_or_else(|p| p.into_inner()) = Some(ca.clone().into_owned());
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_survives_encoding_and_hides_its_secret() {
        let t = JoinToken::generate(b"ca", "https://coordinator:50051").unwrap();
        let s = t.encode();
        assert!(s.starts_with(PREFIX));
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert_eq!(JoinToken::parse(&format!("  {s}\n")).unwrap(), t);
        assert!(!format!("{t:?}").contains(&t.secret));
        assert!(secret_matches(&t.secret, &sha256_hex(t.secret.as_bytes())));
        assert!(!secret_matches("0", &sha256_hex(t.secret.as_bytes())));
        let other = JoinToken::generate(b"ca", "https://c:1").unwrap();
        assert_ne!(other.id, t.id);
        assert_ne!(other.secret, t.secret);
    }

    #[test]
    fn damaged_tokens_are_refused_without_echoing_them() {
        let t = JoinToken::generate(b"ca", "https://c:1").unwrap().encode();
        let cut = &t[..t.len() / 2];
        for bad in [
            "",
            "hello",
            cut,
            &t.replace("https://", "http://"),
            &t.replacen('.', "", 2),
            &t.replace('@', "#"),
        ] {
            let e = JoinToken::parse(bad).unwrap_err();
            assert!(
                !e.contains(&t[PREFIX.len()..PREFIX.len() + ID_LEN + 1 + SECRET_LEN]),
                "{e}"
            );
        }
    }
}
