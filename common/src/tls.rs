//! TLS material and identities. Every gRPC connection is mutual TLS 1.3 with
//! certificates from one fleet CA; who a peer is comes from its certificate:
//! the subject's organizational unit names the role (`agent`, `operator`,
//! `coordinator`) and the common name names the peer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Role of a certificate holder, from the subject OU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A datasaver agent: may act only for its own targets.
    Agent,
    /// A person or script using dsctl: may list, back up, restore, delete.
    Operator,
    /// The coordinator's server certificate.
    Coordinator,
}

impl Role {
    /// The OU string written into certificates.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Coordinator => "coordinator",
        }
    }
}

/// What an operator certificate allows, from least to most. Each level may do
/// everything the levels below it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    /// agents, list, get, health, targets
    Viewer,
    /// also backup, verify, restore into a new database, pin/unpin, cancel
    Operator,
    /// also delete, cleanup, catalog rebuild, restore with `--force`
    Admin,
}

impl Access {
    /// The name used on the command line and in certificates.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Viewer => "viewer",
            Access::Operator => "operator",
            Access::Admin => "admin",
        }
    }

    /// Parses `viewer`, `operator` or `admin`.
    pub fn parse(s: &str) -> Option<Access> {
        match s {
            "viewer" => Some(Access::Viewer),
            "operator" => Some(Access::Operator),
            "admin" => Some(Access::Admin),
            _ => None,
        }
    }
}

/// URI subject-alternative-name prefixes that carry datasaver's grants in a
/// certificate (URIs, so any X.509 tool shows them and no private OID is needed).
pub mod san {
    /// an agent may serve targets matching the pattern after the prefix
    pub const TARGET: &str = "urn:datasaver:target:";
    /// an operator certificate's access level
    pub const ACCESS: &str = "urn:datasaver:role:";
    /// an operator may see and act on targets matching the pattern
    pub const SCOPE: &str = "urn:datasaver:scope:";
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// the role from the certificate
    pub role: Role,
    /// the name from the certificate (agent or operator name)
    pub name: String,
    /// agents: the target patterns the certificate allows it to serve
    /// (empty: none)
    pub targets: Vec<String>,
    /// operators: what the certificate allows (`Operator` when the
    /// certificate predates roles)
    pub access: Access,
    /// operators: the target patterns it may see and act on (`*` when the
    /// certificate names none)
    pub scopes: Vec<String>,
    /// the certificate's serial number, lowercase hex without separators
    pub serial: String,
    /// the certificate's expiry, Unix seconds
    pub not_after: i64,
}

impl PeerIdentity {
    /// Whether an agent certificate allows serving `target`.
    pub fn may_serve(&self, target: &str) -> bool {
        self.targets
            .iter()
            .any(|p| crate::names::pattern_matches(p, target))
    }

    /// Whether an operator certificate's scope covers `target`.
    pub fn in_scope(&self, target: &str) -> bool {
        self.scopes
            .iter()
            .any(|p| crate::names::pattern_matches(p, target))
    }

    /// Whether the operator scope is everything (`*`).
    pub fn unscoped(&self) -> bool {
        self.scopes.iter().any(|p| p == "*")
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.role.as_str(), self.name)
    }
}

/// A TLS file or its contents could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file named by a setting could not be read.
    #[error("{setting}: cannot read {path}: {source}")]
    Read {
        /// setting name
        setting: String,
        /// file path
        path: PathBuf,
        /// cause
        source: std::io::Error,
    },
    /// The file did not contain what the setting needs.
    #[error("{setting}: {path}: {message}")]
    Invalid {
        /// setting name
        setting: String,
        /// file path
        path: PathBuf,
        /// what is wrong
        message: String,
    },
    /// rustls refused the combination.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Paths to this process's identity and the fleet CA, with the names of the
/// settings they came from (for error messages).
#[derive(Debug, Clone)]
pub struct TlsPaths {
    /// fleet CA certificate (PEM)
    pub ca: PathBuf,
    /// this process's certificate chain (PEM)
    pub cert: PathBuf,
    /// this process's private key (PEM)
    pub key: PathBuf,
    /// setting names for ca, cert, key
    pub settings: [&'static str; 3],
}

impl TlsPaths {
    /// The usual setting names (`DATASAVER_TLS_CA`, `_CERT`, `_KEY`).
    pub fn new(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Self, crate::config::SettingError> {
        let settings = [
            "DATASAVER_TLS_CA",
            "DATASAVER_TLS_CERT",
            "DATASAVER_TLS_KEY",
        ];
        let need = |p: Option<PathBuf>, s: &str| {
            p.ok_or_else(|| {
                crate::config::SettingError::new(
                    s,
                    "not set: point it at a PEM file (create them with `dsctl certs init`)",
                )
            })
        };
        Ok(Self {
            ca: need(ca, settings[0])?,
            cert: need(cert, settings[1])?,
            key: need(key, settings[2])?,
            settings,
        })
    }

    /// Reads and parses all three files.
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        let ca_pem = read(self.settings[0], &self.ca)?;
        let cert_pem = read(self.settings[1], &self.cert)?;
        let key_pem = read(self.settings[2], &self.key)?;
        let ca_certs = parse_certs(self.settings[0], &self.ca, &ca_pem)?;
        let certs = parse_certs(self.settings[1], &self.cert, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Invalid {
            setting: self.settings[2].into(),
            path: self.key.clone(),
            message: format!("no usable PEM private key: {e}"),
        })?;
        let identity = identity_from_der(&certs[0]).map_err(|message| TlsError::Invalid {
            setting: self.settings[1].into(),
            path: self.cert.clone(),
            message,
        })?;
        Ok(TlsMaterial {
            ca_pem,
            cert_pem,
            key_pem,
            ca_certs,
            certs,
            key,
            identity,
        })
    }
}

fn read(setting: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        setting: setting.into(),
        path: path.into(),
        source,
    })
}

fn parse_certs(
    setting: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(|e| TlsError::Invalid {
        setting: setting.into(),
        path: path.into(),
        message: format!("not a PEM certificate file: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            setting: setting.into(),
            path: path.into(),
            message: "contains no PEM certificate".into(),
        });
    }
    Ok(certs)
}

/// Loaded, parsed TLS material.
pub struct TlsMaterial {
    /// CA certificate PEM, as read
    pub ca_pem: Vec<u8>,
    /// own certificate PEM, as read
    pub cert_pem: Vec<u8>,
    /// own key PEM, as read
    pub key_pem: Vec<u8>,
    /// parsed CA certificates
    pub ca_certs: Vec<CertificateDer<'static>>,
    /// parsed own chain
    pub certs: Vec<CertificateDer<'static>>,
    /// parsed own key
    pub key: PrivateKeyDer<'static>,
    /// who this process is, from its own certificate
    pub identity: PeerIdentity,
}

/// Installs ring as the process-wide rustls provider. Several dependencies use
/// rustls; with more than one provider compiled in, rustls refuses to guess.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Server side: TLS 1.3 only, a client certificate from the fleet CA required,
/// HTTP/2 negotiated for gRPC.
pub fn server_config(m: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_with(m, client_verifier(&m.ca_certs, Vec::new(), false)?)
}

/// The standard client-certificate check: issued by the fleet CA, valid now,
/// and (when `crls` is not empty) not revoked by them. Only the end-entity
/// certificate is checked for revocation: each CA (the fleet's, the
/// enrollment CA) signs its own CRL. A CRL's `nextUpdate` is not enforced (rustls'
/// default): `dsctl certs revoke` writes a new CRL only when something is
/// revoked, and a CRL that "expired" must not lock the whole fleet out.
/// `optional`: a client without a certificate completes the handshake (an
/// agent joining with a token); every service but enrollment refuses it.
pub fn client_verifier(
    ca_certs: &[CertificateDer<'static>],
    crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
    optional: bool,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in ca_certs {
        roots
            .add(c.clone())
            .map_err(|e| TlsError::Config(format!("fleet CA certificate unusable: {e}")))?;
    }
    let mut builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if !crls.is_empty() {
        builder = builder.with_crls(crls).only_check_end_entity_revocation();
    }
    if optional {
        builder = builder.allow_unauthenticated();
    }
    builder.build().map_err(|e| TlsError::Config(e.to_string()))
}

/// Like [`server_config`], with the client-certificate check given (the
/// coordinator's reloads its CRL).
pub fn server_config_with(
    m: &TlsMaterial,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.certs.clone(), m.key.clone_key())
        .map_err(|e| {
            TlsError::Config(format!(
                "certificate and key do not match or are unusable: {e}"
            ))
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client side, for tonic channels: trust only the fleet CA, present our own
/// certificate, and check the server name against `domain`.
pub fn client_config(m: &TlsMaterial, domain: &str) -> tonic::transport::ClientTlsConfig {
    tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&m.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &m.cert_pem,
            &m.key_pem,
        ))
        .domain_name(domain)
}

/// Reads the role and name from a certificate (DER).
pub fn identity_from_der(der: &[u8]) -> Result<PeerIdentity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("cannot parse certificate: {e}"))?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or("certificate has no subject common name")?
        .to_string();
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or(
            "certificate has no subject organizational unit (role); issue it with `dsctl certs`",
        )?;
    let role = match ou {
        "agent" => Role::Agent,
        "operator" => Role::Operator,
        "coordinator" => Role::Coordinator,
        other => {
            return Err(format!(
                "certificate role {other:?} is not agent, operator or coordinator"
            ))
        }
    };
    let mut targets = Vec::new();
    let mut scopes = Vec::new();
    let mut access = None;
    if let Ok(Some(alt)) = cert.subject_alternative_name() {
        for n in &alt.value.general_names {
            let x509_parser::extensions::GeneralName::URI(uri) = n else {
                continue;
            };
            if let Some(p) = uri.strip_prefix(san::TARGET) {
                crate::names::validate_pattern(p)
                    .map_err(|e| format!("certificate target {p:?}: {e}"))?;
                targets.push(p.to_string());
            } else if let Some(p) = uri.strip_prefix(san::SCOPE) {
                crate::names::validate_pattern(p)
                    .map_err(|e| format!("certificate scope {p:?}: {e}"))?;
                scopes.push(p.to_string());
            } else if let Some(r) = uri.strip_prefix(san::ACCESS) {
                access = Some(Access::parse(r).ok_or_else(|| {
                    format!("certificate role {r:?} is not viewer, operator or admin")
                })?);
            }
        }
    }
    if scopes.is_empty() {
        scopes.push("*".to_string());
    }
    let serial = cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    Ok(PeerIdentity {
        role,
        name: cn,
        targets,
        access: access.unwrap_or(Access::Operator),
        scopes,
        serial: normalize_serial(&serial),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// When a certificate (DER) becomes valid, Unix seconds.
pub fn not_before(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_before.timestamp())
}

/// A serial number as lowercase hex with no separators and no leading zero
/// bytes, so `00:AB:cd` from one tool and `abcd` from another compare equal.
pub fn normalize_serial(s: &str) -> String {
    let hex: String = s
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_string()
    } else {
        trimmed.to_string()
    }
}

/// The host part of a URL like `https://host:port`, for SNI and name checks.
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map(|(_, r)| r)?;
    let authority = rest.split('/').next()?;
    let host = if let Some(stripped) = authority.strip_prefix('[') {
        stripped.split(']').next()?.to_string()
    } else {
        authority
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(authority)
            .to_string()
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_urls() {
        assert_eq!(url_host("https://backup:50051").as_deref(), Some("backup"));
        assert_eq!(
            url_host("https://127.0.0.1:1").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(url_host("https://[::1]:1").as_deref(), Some("::1"));
        assert_eq!(url_host("backup:1"), None);
    }
}
