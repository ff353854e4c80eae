//! Issuing datasaver certificates (feature `pki`): the one shape of a leaf
//! certificate — subject OU the role, CN the name, URI SANs the grants —
//! shared by `dsctl certs` (from the fleet CA's files) and the coordinator's
//! enrollment (from the enrollment CA it holds), and the key and request an
//! agent makes for itself when it joins with a token.

use rcgen::{
    CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::names::validate_pattern;
use crate::tls::{san, Access};

/// A certificate could not be made; the message says which input.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PkiError(pub String);

fn err(e: impl std::fmt::Display) -> PkiError {
    PkiError(e.to_string())
}

/// Checks an agent or operator name: 1-64 letters, digits, `-`, `_`, `.`.
pub fn check_name(kind: &str, name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        return Err(PkiError(format!(
            "{kind} name {name:?} is not valid: use 1-64 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

/// What a certificate grants beyond its role and name.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    /// agent: target patterns it may serve
    pub targets: Vec<String>,
    /// operator: access level
    pub access: Option<Access>,
    /// operator: target patterns it may see and act on
    pub scopes: Vec<String>,
}

impl Grants {
    /// The grants as URI subject alternative names.
    pub fn uris(&self) -> Result<Vec<SanType>, PkiError> {
        let mut out = Vec::new();
        let mut push = |prefix: &str, v: &str| -> Result<(), PkiError> {
            let uri = format!("{prefix}{v}");
            out.push(SanType::URI(uri.clone().try_into().map_err(|_| {
                PkiError(format!("{uri:?} cannot be written into a certificate"))
            })?));
            Ok(())
        };
        for t in &self.targets {
            validate_pattern(t).map_err(|e| PkiError(format!("--target: {e}")))?;
            push(san::TARGET, t)?;
        }
        if let Some(a) = self.access {
            push(san::ACCESS, a.as_str())?;
        }
        for s in &self.scopes {
            validate_pattern(s).map_err(|e| PkiError(format!("--scope: {e}")))?;
            push(san::SCOPE, s)?;
        }
        Ok(out)
    }
}

/// The parameters of a leaf certificate: `role` in the OU, `name` in the CN,
/// valid from an hour ago (clock skew) for `days`, DNS/IP `sans` for a
/// server, then `grants`.
pub fn leaf_params(
    role: &str,
    name: &str,
    days: i64,
    sans: &[String],
    server: bool,
    grants: &Grants,
) -> Result<CertificateParams, PkiError> {
    if days < 1 {
        return Err(PkiError(format!(
            "--days {days}: a certificate must be valid for at least 1 day"
        )));
    }
    leaf_params_for(role, name, Duration::days(days), sans, server, grants)
}

/// [`leaf_params`] valid for `validity` from now.
pub fn leaf_params_for(
    role: &str,
    name: &str,
    validity: Duration,
    sans: &[String],
    server: bool,
    grants: &Grants,
) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "datasaver");
    dn.push(DnType::OrganizationalUnitName, role);
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + validity;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = if server {
        vec![ExtendedKeyUsagePurpose::ServerAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    let mut alt = Vec::new();
    for s in sans {
        alt.push(match s.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                s.clone()
                    .try_into()
                    .map_err(|_| PkiError(format!("--san {s:?} is not a DNS name or IP")))?,
            ),
        });
    }
    alt.extend(grants.uris()?);
    p.subject_alt_names = alt;
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// The parameters of a CA certificate named `cn`, valid for `days`, that may
/// have `path_len` CAs below it.
pub fn ca_params(cn: &str, days: i64, path_len: u8) -> CertificateParams {
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "datasaver");
    dn.push(DnType::CommonName, cn);
    ca.distinguished_name = dn;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(path_len));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    ca.not_before = now - Duration::hours(1);
    ca.not_after = now + Duration::days(days);
    ca.use_authority_key_identifier_extension = true;
    ca
}

/// The PEM files of a new fleet.
pub struct NewFleet {
    /// the fleet CA (path length 1: the enrollment CA sits below it)
    pub ca_cert: String,
    pub ca_key: String,
    pub coordinator_cert: String,
    pub coordinator_key: String,
    /// an admin operator (scope `*`): whoever set up the fleet
    pub operator_cert: String,
    pub operator_key: String,
}

/// A new fleet CA, the coordinator's certificate for `sans` (default
/// `localhost`, `127.0.0.1`) and an admin operator's, each valid `days`
/// (the CA at least ten years); and the CA as an issuer for more.
pub fn new_fleet(
    sans: &[String],
    operator: &str,
    days: i64,
) -> Result<(NewFleet, Issuer<'static, KeyPair>), PkiError> {
    check_name("operator", operator)?;
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca = ca_params("datasaver fleet CA", days.max(3650), 1);
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);
    let sans: Vec<String> = if sans.is_empty() {
        vec!["localhost".into(), "127.0.0.1".into()]
    } else {
        sans.to_vec()
    };
    let coord_key = KeyPair::generate().map_err(err)?;
    let coord = leaf_params(
        "coordinator",
        "coordinator",
        days,
        &sans,
        true,
        &Grants::default(),
    )?
    .signed_by(&coord_key, &issuer)
    .map_err(err)?;
    let op_key = KeyPair::generate().map_err(err)?;
    let admin = Grants {
        access: Some(Access::Admin),
        ..Grants::default()
    };
    let op = leaf_params("operator", operator, days, &[], false, &admin)?
        .signed_by(&op_key, &issuer)
        .map_err(err)?;
    Ok((
        NewFleet {
            ca_cert: ca_cert.pem(),
            ca_key: ca_key_pem,
            coordinator_cert: coord.pem(),
            coordinator_key: coord_key.serialize_pem(),
            operator_cert: op.pem(),
            operator_key: op_key.serialize_pem(),
        },
        issuer,
    ))
}

/// The enrollment CA below `fleet` (path length 0: it issues agents'
/// certificates, never another CA): certificate and key PEM.
pub fn enrollment_ca(fleet: &Issuer<'_, KeyPair>) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(err)?;
    let cert = ca_params("datasaver enrollment CA", 3650, 0)
        .signed_by(&key, fleet)
        .map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A CRL of `issuer` that revokes nothing, numbered `number`: what a
/// CA that has revoked nothing publishes, so a verifier that checks
/// revocation knows its certificates' status.
pub fn empty_crl(issuer: &Issuer<'_, KeyPair>, number: u64) -> Result<Vec<u8>, PkiError> {
    let now = OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now - Duration::minutes(5),
        next_update: now + Duration::days(3650),
        crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: Vec::new(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(issuer).map_err(err)?.der().to_vec())
}

/// A new key and a certificate request for it (the subject is ignored by
/// the coordinator, which names the certificate itself).
pub fn key_and_request(name: &str) -> Result<(KeyPair, String), PkiError> {
    let key = KeyPair::generate().map_err(err)?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    let csr = p.serialize_request(&key).map_err(err)?;
    Ok((key, csr.pem().map_err(err)?))
}

/// Signs an agent certificate for the key in `csr_pem` (its signature is
/// checked: proof the requester holds the key), named `name`, serving
/// `targets`, valid for `validity`. Returns the certificate's PEM and expiry.
pub fn sign_agent_request(
    csr_pem: &str,
    name: &str,
    targets: &[String],
    validity: Duration,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, OffsetDateTime), PkiError> {
    check_name("agent", name)?;
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| PkiError(format!("the certificate request is not usable: {e}")))?;
    let grants = Grants {
        targets: targets.to_vec(),
        ..Grants::default()
    };
    let params = leaf_params_for("agent", name, validity, &[], false, &grants)?;
    let not_after = params.not_after;
    let cert = params.signed_by(&csr.public_key, issuer).map_err(err)?;
    Ok((cert.pem(), not_after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_request_becomes_a_certificate_with_the_coordinators_names() {
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params("test CA", 30, 0);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let (_key, csr) = key_and_request("what-the-agent-says").unwrap();
        let (pem, _) = sign_agent_request(
            &csr,
            "app-agent",
            &["app".into(), "app-*".into()],
            Duration::days(7),
            &issuer,
        )
        .unwrap();
        let der = crate::crl::cert_der_from_pem(pem.as_bytes()).unwrap();
        let id = crate::tls::identity_from_der(&der).unwrap();
        assert_eq!(id.role, crate::tls::Role::Agent);
        assert_eq!(id.name, "app-agent");
        assert_eq!(id.targets, vec!["app".to_string(), "app-*".to_string()]);
        crate::crl::issued_by(&der, ca_cert.der()).unwrap();

        let e =
            sign_agent_request("not a request", "a", &[], Duration::days(7), &issuer).unwrap_err();
        assert!(e.0.contains("certificate request"), "{e}");
        let e = sign_agent_request(&csr, "no spaces", &[], Duration::days(7), &issuer).unwrap_err();
        assert!(e.0.contains("agent name"), "{e}");
    }
}
