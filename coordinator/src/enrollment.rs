//! The enrollment CA the coordinator holds (`DATASAVER_ENROLLMENT_CA_CERT` /
//! `_KEY`): an intermediate of the fleet CA that signs the certificates of
//! agents joining with a token and their renewals, so the fleet's root key
//! never has to be on the coordinator. Tokens themselves are in `tokens`.
//!
//! The TLS server trusts it as a client-certificate anchor of its own (so it
//! works below a fleet CA made before `dsctl certs init` allowed an
//! intermediate) and, when a CRL is in use, checks its certificates against
//! an empty CRL it signs itself: rustls refuses a certificate whose issuer
//! has no CRL once any CRL is configured.

use std::path::Path;

use datasaver_common::pki::{empty_crl, sign_agent_request, PkiError};
use rcgen::{Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};

use crate::config::EnrollmentPaths;

/// The enrollment CA files cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {path}: {message}")]
pub struct EnrollmentError {
    pub setting: &'static str,
    pub path: String,
    pub message: String,
}

/// A certificate issued to an agent.
#[derive(Debug, Clone)]
pub struct Issued {
    /// the agent's certificate, then the enrollment CA's
    pub chain_pem: String,
    pub not_after_unix: i64,
}

pub struct Enroller {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    fleet_ca_der: CertificateDer<'static>,
    fleet_ca_pem: String,
    validity: time::Duration,
}

impl Enroller {
    /// Reads the enrollment CA and checks it is a CA issued by the fleet CA
    /// `fleet_ca` and that the key is its key.
    pub fn load(
        paths: &EnrollmentPaths,
        fleet_ca: &CertificateDer<'_>,
        fleet_ca_pem: &[u8],
    ) -> Result<Self, EnrollmentError> {
        let cert_err = |message: String| EnrollmentError {
            setting: "DATASAVER_ENROLLMENT_CA_CERT",
            path: paths.cert.display().to_string(),
            message,
        };
        let key_err = |message: String| EnrollmentError {
            setting: "DATASAVER_ENROLLMENT_CA_KEY",
            path: paths.key.display().to_string(),
            message,
        };
        let cert_pem = read(&paths.cert).map_err(cert_err)?;
        let key_pem = read(&paths.key).map_err(key_err)?;
        let der =
            datasaver_common::crl::cert_der_from_pem(cert_pem.as_bytes()).map_err(cert_err)?;
        datasaver_common::crl::issued_by(&der, fleet_ca.as_ref()).map_err(|m| {
            cert_err(format!(
                "{m}: it must be the enrollment-ca.crt `dsctl certs init --enrollment` wrote beside this fleet's ca.crt"
            ))
        })?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| cert_err(format!("cannot parse it: {e}")))?;
        if !parsed.is_ca() {
            return Err(cert_err("is not a CA certificate".into()));
        }
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| key_err(format!("not a usable private key: {e}")))?;
        if key.public_key_raw() != parsed.public_key().subject_public_key.data.as_ref() {
            return Err(key_err(format!(
                "is not the key of {}",
                paths.cert.display()
            )));
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| cert_err(format!("not a usable CA certificate: {e}")))?;
        Ok(Self {
            issuer,
            cert_der: CertificateDer::from(der),
            cert_pem,
            fleet_ca_der: fleet_ca.clone().into_owned(),
            fleet_ca_pem: String::from_utf8_lossy(fleet_ca_pem).into_owned(),
            validity: time::Duration::seconds(paths.validity.as_secs() as i64),
        })
    }

    /// The certificate to trust joined agents by.
    pub fn anchor(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// The fleet CA (its fingerprint goes into every token).
    pub fn fleet_ca_der(&self) -> &CertificateDer<'static> {
        &self.fleet_ca_der
    }

    /// The fleet CA, as the agent should trust the coordinator from now on.
    pub fn fleet_ca_pem(&self) -> &str {
        &self.fleet_ca_pem
    }

    /// The enrollment CA's own CRL (it revokes nothing).
    pub fn crl(&self) -> Result<CertificateRevocationListDer<'static>, PkiError> {
        let now = chrono::Utc::now().timestamp().max(1) as u64;
        Ok(CertificateRevocationListDer::from(empty_crl(
            &self.issuer,
            now,
        )?))
    }

    /// Whether the certificate `der` was issued by this enrollment CA.
    pub fn issued(&self, der: &[u8]) -> bool {
        datasaver_common::crl::issued_by(der, self.cert_der.as_ref()).is_ok()
    }

    /// Signs the key in `csr_pem` as agent `name` serving `targets`.
    pub fn issue(&self, csr_pem: &str, name: &str, targets: &[String]) -> Result<Issued, PkiError> {
        let (pem, not_after) =
            sign_agent_request(csr_pem, name, targets, self.validity, &self.issuer)?;
        Ok(Issued {
            chain_pem: format!("{pem}{}", self.cert_pem),
            not_after_unix: not_after.unix_timestamp(),
        })
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))
}

/// Why a token could not be made or used, or a certificate not renewed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// the request itself is wrong (names, targets, durations)
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Refused(#[from] crate::tokens::Refused),
    #[error("{0}")]
    Internal(String),
}

impl From<crate::tokens::TokenError> for EnrollError {
    fn from(e: crate::tokens::TokenError) -> Self {
        match e {
            crate::tokens::TokenError::Refused(r) => EnrollError::Refused(r),
            crate::tokens::TokenError::Catalog(c) => EnrollError::Internal(c.to_string()),
        }
    }
}

/// The longest a token may live: joining is a set-up step, not a standing
/// credential.
pub const MAX_TTL_SECS: u64 = 365 * 86_400;

/// Join tokens and the enrollment CA: what `dsctl tokens` and joining
/// agents talk to.
pub struct Enrollment {
    pub enroller: Enroller,
    pub tokens: crate::tokens::TokenStore,
}

impl Enrollment {
    /// Makes a token for agents serving `targets` that reach the coordinator
    /// at `url`; returns the whole token (shown once) and its record.
    pub async fn create_token(
        &self,
        targets: &[String],
        ttl_secs: u64,
        uses: u32,
        url: &str,
        created_by: &str,
        now: i64,
    ) -> Result<(String, crate::tokens::TokenRecord), EnrollError> {
        if targets.is_empty() {
            return Err(EnrollError::Invalid(
                "give at least one --target T: the targets agents joining with this token may serve (a pattern like acme-* is allowed)".into(),
            ));
        }
        for t in targets {
            datasaver_common::names::validate_pattern(t)
                .map_err(|e| EnrollError::Invalid(format!("--target {t:?}: {e}")))?;
        }
        if ttl_secs == 0 || ttl_secs > MAX_TTL_SECS {
            return Err(EnrollError::Invalid(format!(
                "--ttl must be between 1s and 365d (got {ttl_secs}s)"
            )));
        }
        if !url.starts_with("https://") || datasaver_common::tls::url_host(url).is_none() {
            return Err(EnrollError::Invalid(format!(
                "--url {url:?} is not the coordinator's address as agents reach it (https://HOST:PORT)"
            )));
        }
        let token = datasaver_common::enroll::JoinToken::generate(
            self.enroller.fleet_ca_der().as_ref(),
            url,
        )
        .map_err(EnrollError::Internal)?;
        let record = crate::tokens::TokenRecord {
            id: token.id.clone(),
            targets: targets.to_vec(),
            created_at: now,
            created_by: created_by.to_string(),
            expires_at: now.saturating_add(ttl_secs as i64),
            uses_allowed: uses,
            uses: 0,
            revoked_at: None,
            last_used_at: None,
            agents: Vec::new(),
        };
        let record = self
            .tokens
            .create(
                record,
                datasaver_common::enroll::sha256_hex(token.secret.as_bytes()),
            )
            .await
            .map_err(|e| EnrollError::Internal(e.to_string()))?;
        Ok((token.encode(), record))
    }

    /// An agent proves token `id` with `secret`: one use is taken and its
    /// key in `csr_pem` is certified as `agent_name` for the token's targets.
    pub async fn enroll(
        &self,
        id: &str,
        secret: &str,
        agent_name: &str,
        targets: &[String],
        csr_pem: &str,
        now: i64,
    ) -> Result<(Issued, crate::tokens::TokenRecord), EnrollError> {
        datasaver_common::pki::check_name("agent", agent_name)
            .map_err(|e| EnrollError::Invalid(e.to_string()))?;
        if targets.is_empty() {
            return Err(EnrollError::Invalid(
                "the agent named no target to serve".into(),
            ));
        }
        for t in targets {
            datasaver_common::names::validate_target(t)
                .map_err(|e| EnrollError::Invalid(format!("target {t:?}: {e}")))?;
        }
        if csr_pem.len() > 16 * 1024 {
            return Err(EnrollError::Invalid(
                "the certificate request is too large".into(),
            ));
        }
        let token = self
            .tokens
            .take_use(id, secret, agent_name, targets, now)
            .await?;
        let issued = self
            .enroller
            .issue(csr_pem, agent_name, &token.targets)
            .map_err(|e| EnrollError::Invalid(e.to_string()))?;
        Ok((issued, token))
    }

    /// A joined agent's new certificate, for a new key, with the name and
    /// targets of the one it connected with (`cert_der`).
    pub fn renew(
        &self,
        cert_der: &[u8],
        identity: &datasaver_common::tls::PeerIdentity,
        csr_pem: &str,
    ) -> Result<Issued, EnrollError> {
        if !self.enroller.issued(cert_der) {
            return Err(EnrollError::Invalid(format!(
                "{identity}'s certificate was not issued by this coordinator's enrollment CA: renew it the way it was made (`dsctl certs issue`)"
            )));
        }
        self.enroller
            .issue(csr_pem, &identity.name, &identity.targets)
            .map_err(|e| EnrollError::Invalid(e.to_string()))
    }
}
