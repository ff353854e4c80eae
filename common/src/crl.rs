//! Certificate revocation lists of the fleet CA: read by `dsctl certs revoke`
//! (to keep earlier entries and bump the CRL number) and by the coordinator
//! (`DATASAVER_TLS_CRL`), which accepts only a CRL the fleet CA signed.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateRevocationListDer;
use x509_parser::prelude::FromDer;

/// One revoked certificate as listed in a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// serial as [`crate::tls::normalize_serial`] writes it
    pub serial: String,
    /// the serial's big-endian magnitude, as the CRL holds it
    pub serial_bytes: Vec<u8>,
    /// when it was revoked, Unix seconds
    pub revoked_at: i64,
    /// RFC 5280 reason code, when the entry carries one
    pub reason: Option<u8>,
}

/// What a CRL says, parsed.
#[derive(Debug, Clone)]
pub struct CrlInfo {
    /// the CRL number (big-endian magnitude; empty when absent)
    pub number: Vec<u8>,
    /// when it was issued, Unix seconds
    pub this_update: i64,
    /// the revoked certificates, in the CRL's order
    pub revoked: Vec<Revoked>,
}

impl CrlInfo {
    /// The entry for `serial` (any spelling [`crate::tls::normalize_serial`] accepts).
    pub fn find(&self, serial: &str) -> Option<&Revoked> {
        let s = crate::tls::normalize_serial(serial);
        self.revoked.iter().find(|r| r.serial == s)
    }
}

/// How often a coordinator looks for a new CRL file (`dsctl certs revoke`
/// tells the operator when it takes effect).
pub const RELOAD_SECS: u64 = 5;

/// The first certificate in a PEM file, as DER.
pub fn cert_der_from_pem(pem: &[u8]) -> Result<Vec<u8>, String> {
    use rustls::pki_types::CertificateDer;
    match CertificateDer::pem_slice_iter(pem).next() {
        Some(Ok(c)) => Ok(c.as_ref().to_vec()),
        Some(Err(e)) => Err(format!("not a PEM certificate file: {e}")),
        None => Err("contains no PEM certificate".into()),
    }
}

/// The one CRL in a PEM file (`-----BEGIN X509 CRL-----`).
pub fn from_pem(pem: &[u8]) -> Result<CertificateRevocationListDer<'static>, String> {
    let mut all = CertificateRevocationListDer::pem_slice_iter(pem);
    let first = match all.next() {
        Some(Ok(c)) => c,
        Some(Err(e)) => return Err(format!("not a PEM CRL file: {e}")),
        None => return Err("contains no PEM CRL (-----BEGIN X509 CRL-----)".into()),
    };
    if all.next().is_some() {
        return Err("contains more than one CRL; keep only the fleet CA's".into());
    }
    Ok(first)
}

/// Parses a DER CRL.
pub fn inspect(der: &[u8]) -> Result<CrlInfo, String> {
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
        .map_err(|e| format!("not a valid CRL: {e}"))?;
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| {
            let bytes = r.user_certificate.to_bytes_be();
            Revoked {
                serial: crate::tls::normalize_serial(&hex(&bytes)),
                serial_bytes: bytes,
                revoked_at: r.revocation_date.timestamp(),
                reason: r.reason_code().map(|(_, c)| c.0),
            }
        })
        .collect();
    Ok(CrlInfo {
        number: crl
            .crl_number()
            .map(|n| n.to_bytes_be())
            .unwrap_or_default(),
        this_update: crl.last_update().timestamp(),
        revoked,
    })
}

/// Checks that the CRL `der` was issued and signed by the CA certificate
/// `ca_der`: a CRL from another CA (or a forged one) must never decide who
/// may connect.
pub fn verify(der: &[u8], ca_der: &[u8]) -> Result<(), String> {
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
        .map_err(|e| format!("not a valid CRL: {e}"))?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der)
        .map_err(|e| format!("the fleet CA certificate cannot be parsed: {e}"))?;
    if crl.issuer().as_raw() != ca.subject().as_raw() {
        return Err(format!(
            "issued by {:?}, not by the fleet CA {:?}",
            crl.issuer().to_string(),
            ca.subject().to_string()
        ));
    }
    crl.verify_signature(ca.public_key())
        .map_err(|_| "its signature does not verify with the fleet CA's key".to_string())
}

/// Checks that the certificate `cert_der` was issued and signed by `ca_der`.
pub fn issued_by(cert_der: &[u8], ca_der: &[u8]) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der)
        .map_err(|e| format!("the fleet CA certificate cannot be parsed: {e}"))?;
    if cert.issuer().as_raw() != ca.subject().as_raw() {
        return Err("it was not issued by this fleet CA".into());
    }
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| "it was not signed by this fleet CA's key".to_string())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The RFC 5280 name of a reason code (`keyCompromise`, ...).
pub fn reason_name(code: u8) -> &'static str {
    match code {
        0 => "unspecified",
        1 => "keyCompromise",
        2 => "cACompromise",
        3 => "affiliationChanged",
        4 => "superseded",
        5 => "cessationOfOperation",
        6 => "certificateHold",
        8 => "removeFromCRL",
        9 => "privilegeWithdrawn",
        10 => "aACompromise",
        _ => "unknown",
    }
}

/// The reason code a free-text reason names by its first word
/// (`keyCompromise: laptop stolen`, `superseded`, `key-compromise`), any
/// case; `None` when it names none (the CRL then says unspecified).
pub fn reason_code(text: &str) -> Option<u8> {
    let first: String = text
        .split(|c: char| c.is_whitespace() || c == ':' || c == ',' || c == ';')
        .find(|w| !w.is_empty())?
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    // certificateHold and removeFromCRL are deliberately absent: a revoked
    // datasaver certificate is revoked for good.
    [0u8, 1, 2, 3, 4, 5, 9, 10]
        .into_iter()
        .find(|c| reason_name(*c).to_ascii_lowercase() == first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_by_their_first_word() {
        assert_eq!(reason_code("keyCompromise"), Some(1));
        assert_eq!(reason_code("key-compromise: laptop stolen"), Some(1));
        assert_eq!(reason_code("  Superseded by a new cert"), Some(4));
        assert_eq!(reason_code("cessationOfOperation"), Some(5));
        assert_eq!(reason_code("laptop stolen"), None);
        assert_eq!(reason_code(""), None);
        assert_eq!(reason_code("certificateHold"), None);
        assert_eq!(reason_name(9), "privilegeWithdrawn");
    }

    #[test]
    fn not_a_crl() {
        assert!(from_pem(b"nothing here").is_err());
        assert!(inspect(b"\x30\x03\x02\x01\x01").is_err());
    }
}
