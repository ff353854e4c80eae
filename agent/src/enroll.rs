//! Joining with a token (`DATASAVER_JOIN_TOKEN`) and keeping what it gives
//! in the state directory (`DATASAVER_STATE_DIR`).
//!
//! - First start: the agent makes its own key, connects to the token's
//!   address accepting only a server whose chain holds the CA the token pins
//!   (`common::enroll::PinnedCa`; nothing is sent to any other), proves the
//!   token and receives a certificate for its target(s). Key, certificate
//!   and fleet CA are then written to the state directory, each file whole
//!   (temp file, fsync, rename), the key 0600. A refused token writes nothing.
//! - Later starts use the stored certificate: no token use is spent, and
//!   the token may be gone or expired.
//! - Renewal: once half of its validity has passed, the agent asks for a new
//!   certificate for a new key over its normal mutual-TLS connection.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use datasaver_common::enroll::{JoinToken, PinnedCa};
use datasaver_common::proto::enrollment_service_client::EnrollmentServiceClient;
use datasaver_common::proto::{EnrollRequest, IssuedCertificate};
use datasaver_common::tls::{TlsMaterial, TlsPaths};
use tonic::transport::{Endpoint, Uri};

/// Where a joined agent keeps its key and certificate unless told otherwise
/// (a volume in the image).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/datasaver";

const KEY: &str = "agent.key";
const CERT: &str = "agent.crt";
const CA: &str = "ca.crt";

/// How a joining agent is set up.
#[derive(Clone)]
pub struct JoinSettings {
    pub token: Option<JoinToken>,
    pub state_dir: PathBuf,
    /// the name the certificate will carry (`DATASAVER_AGENT_NAME`, else
    /// the target's name)
    pub agent_name: String,
    /// how often the certificate's age is looked at
    pub renewal_check: Duration,
}

/// How often a joined agent looks at its certificate's age.
pub const RENEWAL_CHECK: Duration = Duration::from_secs(600);

impl std::fmt::Debug for JoinSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinSettings")
            .field("token", &self.token)
            .field("state_dir", &self.state_dir)
            .field("agent_name", &self.agent_name)
            .field("renewal_check", &self.renewal_check)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("DATASAVER_STATE_DIR: {path} is not writable ({source}): the agent keeps its key and certificate there; mount a volume the agent's user may write (uid 10001 in the image)")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("DATASAVER_STATE_DIR: {0}")]
    Stored(String),
    #[error("DATASAVER_JOIN_TOKEN: {0}")]
    Refused(String),
    #[error("DATASAVER_JOIN_TOKEN: refused the server at {url}: {message}")]
    Pin { url: String, message: String },
    #[error("DATASAVER_JOIN_TOKEN: cannot reach the coordinator at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("DATASAVER_STATE_DIR: {dir} holds no usable certificate{why} and DATASAVER_JOIN_TOKEN is not set: create a token with `dsctl tokens create --target T` and give it to the agent")]
    NoToken { dir: String, why: String },
    #[error("{0}")]
    Internal(String),
}

impl EnrollError {
    /// A refusal the coordinator gave: retrying with the same token cannot
    /// help (as opposed to a coordinator not reachable yet).
    pub fn is_final(&self) -> bool {
        !matches!(self, EnrollError::Connect { .. })
    }
}

fn state_err(dir: &Path, source: std::io::Error) -> EnrollError {
    EnrollError::StateDir {
        path: dir.display().to_string(),
        source,
    }
}

/// Creates the state directory if needed and proves it can be written,
/// before any key is made or token spent.
pub fn check_state_dir(dir: &Path) -> Result<(), EnrollError> {
    std::fs::create_dir_all(dir).map_err(|e| state_err(dir, e))?;
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| state_err(dir, e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn paths(dir: &Path) -> TlsPaths {
    TlsPaths {
        ca: dir.join(CA),
        cert: dir.join(CERT),
        key: dir.join(KEY),
        settings: [
            "DATASAVER_STATE_DIR",
            "DATASAVER_STATE_DIR",
            "DATASAVER_STATE_DIR",
        ],
    }
}

/// The certificate in the state directory: `Ok(None)` when there is none
/// yet, an error when the files are there but unusable.
pub fn stored(dir: &Path) -> Result<Option<TlsMaterial>, EnrollError> {
    if !dir.join(CERT).exists() {
        return Ok(None);
    }
    paths(dir)
        .load()
        .map(Some)
        .map_err(|e| EnrollError::Stored(e.to_string()))
}

/// Writes `data` to `dir/name` whole: a temp file, fsync, rename.
fn write_whole(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<(), EnrollError> {
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| state_err(dir, e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| state_err(dir, e))?;
    std::fs::rename(&tmp, dir.join(name)).map_err(|e| state_err(dir, e))
}

/// Stores a key and the certificate issued for it. The key goes first and
/// the certificate last: a crash in between leaves a certificate that does
/// not match the key, which [`stored`] refuses loudly, never a silent mix.
pub fn save(dir: &Path, key_pem: &str, issued: &IssuedCertificate) -> Result<(), EnrollError> {
    write_whole(dir, CA, issued.ca_pem.as_bytes(), 0o644)?;
    write_whole(dir, KEY, key_pem.as_bytes(), 0o600)?;
    write_whole(dir, CERT, issued.chain_pem.as_bytes(), 0o644)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Whether a certificate valid from `not_before` to `not_after` (Unix
/// seconds) should be renewed at `now`: past half of its life.
pub fn renewal_due(not_before: i64, not_after: i64, now: i64) -> bool {
    now >= not_before + (not_after - not_before) / 2
}

/// The identity to connect with: the stored one, or a new one from the
/// token when there is none (or it expired).
pub async fn identity(
    s: &JoinSettings,
    url: &str,
    host: &str,
    targets: &[String],
) -> Result<TlsMaterial, EnrollError> {
    check_state_dir(&s.state_dir)?;
    let now = chrono::Utc::now().timestamp();
    let why = match stored(&s.state_dir)? {
        Some(m) if m.identity.not_after > now => return Ok(m),
        Some(m) => format!(
            " (the one there expired at {})",
            chrono::DateTime::from_timestamp(m.identity.not_after, 0)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default()
        ),
        None => String::new(),
    };
    let Some(token) = &s.token else {
        return Err(EnrollError::NoToken {
            dir: s.state_dir.display().to_string(),
            why,
        });
    };
    let (key, csr) = datasaver_common::pki::key_and_request(&s.agent_name)
        .map_err(|e| EnrollError::Internal(e.to_string()))?;
    let issued = enroll(token, url, host, &s.agent_name, targets, &csr).await?;
    save(&s.state_dir, &key.serialize_pem(), &issued)?;
    tracing::info!(
        state_dir = %s.state_dir.display(),
        token = %token.id,
        agent = %s.agent_name,
        "joined the fleet with the token; key and certificate stored"
    );
    stored(&s.state_dir)?
        .ok_or_else(|| EnrollError::Stored("the certificate just written is gone".into()))
}

/// Connects with the token's pin and asks for a certificate.
async fn enroll(
    token: &JoinToken,
    url: &str,
    host: &str,
    agent_name: &str,
    targets: &[String],
    csr_pem: &str,
) -> Result<IssuedCertificate, EnrollError> {
    let connect_err = |message: String| EnrollError::Connect {
        url: url.to_string(),
        message,
    };
    let pin = Arc::new(PinnedCa::new(&token.ca_sha256));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| EnrollError::Internal(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(pin.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let server_name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| connect_err(format!("{host:?} is not a host name: {e}")))?;
    let connector = PinnedConnector {
        tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        server_name,
    };
    // http://: the connector below makes the TLS connection itself (tonic
    // refuses an https:// endpoint without its own TLS settings).
    let plain = format!("http://{}", url.trim_start_matches("https://"));
    let channel = Endpoint::from_shared(plain)
        .map_err(|e| connect_err(datasaver_common::error_chain(&e)))?
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .map_err(|e| match pin.refused() {
            Some(message) => EnrollError::Pin {
                url: url.to_string(),
                message,
            },
            None => {
                let text = datasaver_common::error_chain(&e);
                if text.contains("CertificateRequired") {
                    EnrollError::Refused(NO_ENROLLMENT.into())
                } else {
                    connect_err(text)
                }
            }
        })?;
    let r = EnrollmentServiceClient::new(channel)
        .enroll(EnrollRequest {
            token_id: token.id.clone(),
            secret: token.secret.clone(),
            agent_name: agent_name.to_string(),
            targets: targets.to_vec(),
            csr_pem: csr_pem.to_string(),
        })
        .await;
    match r {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => match s.code() {
            tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => {
                Err(EnrollError::Refused(s.message().to_string()))
            }
            tonic::Code::Unimplemented => Err(EnrollError::Refused(NO_ENROLLMENT.into())),
            _ => {
                // A coordinator without an enrollment CA wants a client
                // certificate: it ends the connection with that alert.
                let text = datasaver_common::error_chain(&s);
                if text.contains("CertificateRequired") {
                    Err(EnrollError::Refused(NO_ENROLLMENT.into()))
                } else {
                    Err(connect_err(text))
                }
            }
        },
    }
}

const NO_ENROLLMENT: &str = "the coordinator does not accept join tokens: it has no enrollment CA (set DATASAVER_ENROLLMENT_CA_CERT and _KEY, from `dsctl certs init --enrollment`)";

/// A TCP connection wrapped in TLS checked by the token's pin, for tonic.
#[derive(Clone)]
struct PinnedConnector {
    tls: tokio_rustls::TlsConnector,
    server_name: rustls::pki_types::ServerName<'static>,
}

impl tower_service::Service<Uri> for PinnedConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host, port)).await?;
            let _ = tcp.set_nodelay(true);
            let tls = this.tls.connect(this.server_name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// Asks the coordinator for a new certificate for a new key and stores it;
/// returns the new expiry.
pub async fn renew(
    client: &mut datasaver_common::proto::agent_service_client::AgentServiceClient<
        tonic::transport::Channel,
    >,
    s: &JoinSettings,
) -> Result<i64, EnrollError> {
    check_state_dir(&s.state_dir)?;
    let (key, csr) = datasaver_common::pki::key_and_request(&s.agent_name)
        .map_err(|e| EnrollError::Internal(e.to_string()))?;
    let issued = client
        .renew_certificate(datasaver_common::proto::RenewCertificateRequest { csr_pem: csr })
        .await
        .map_err(|st| EnrollError::Refused(format!("renewal refused: {}", st.message())))?
        .into_inner();
    save(&s.state_dir, &key.serialize_pem(), &issued)?;
    Ok(issued.not_after_unix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_half_life() {
        assert!(!renewal_due(0, 100, 49));
        assert!(renewal_due(0, 100, 50));
        assert!(renewal_due(0, 100, 150));
    }

    #[test]
    fn an_unwritable_state_dir_is_named_and_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let e = check_state_dir(&file.join("state"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("DATASAVER_STATE_DIR: "), "{e}");
        assert!(e.contains("a-file/state is not writable"), "{e}");
        assert!(stored(dir.path()).unwrap().is_none());
    }
}
