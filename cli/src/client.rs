//! Connecting to the coordinator and turning gRPC/TLS failures into one line
//! that says what went wrong and what to check.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use datasaver_common::proto::operator_service_client::OperatorServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Set when dsctl connects without a client certificate, so the inevitable
/// refusal can say what is missing.
static NO_CLIENT_CERT: AtomicBool = AtomicBool::new(false);

const NEEDS_CLIENT_CERT: &str = " (the coordinator requires a client certificate: set DATASAVER_TLS_CERT and DATASAVER_TLS_KEY to an operator certificate)";

fn hint(text: &str) -> &'static str {
    let t = text.to_ascii_lowercase();
    if t.contains("certificaterequired") || t.contains("certificate required") {
        NEEDS_CLIENT_CERT
    } else if t.contains("unknownca")
        || t.contains("unknown ca")
        || t.contains("badcertificate")
        || t.contains("bad certificate")
        || t.contains("decrypterror")
    {
        " (the coordinator refused this client's certificate: it must be issued by the fleet CA)"
    } else if t.contains("invalid peer certificate") || t.contains("unknownissuer") {
        " (the coordinator's certificate is not trusted: check DATASAVER_TLS_CA is the fleet CA and the URL's host is in the coordinator's --san list)"
    } else if t.contains("connection refused") {
        " (is the coordinator running and listening there?)"
    } else {
        ""
    }
}

/// One-line error for a failed call.
pub fn status_error(url: &str, s: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    // A status with a source came from the transport (TCP, TLS, HTTP/2),
    // not from the coordinator's own answer.
    let source = std::error::Error::source(&s);
    if source.is_some()
        || (s.code() == Code::Cancelled && s.message().contains("operation was canceled"))
    {
        let text = datasaver_common::error_chain_after(s.message(), source);
        let mut h = hint(&text);
        if NO_CLIENT_CERT.load(Ordering::Relaxed) {
            h = NEEDS_CLIENT_CERT;
        } else if h.is_empty() {
            h = " (the connection was dropped during the TLS handshake or the request: check that DATASAVER_TLS_CERT/KEY were issued by the fleet CA)";
        }
        return anyhow!("cannot talk to the coordinator at {url}: {text}{h}");
    }
    match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            anyhow!("refused by the coordinator: {}", s.message())
        }
        _ if s.message().is_empty() => anyhow!("coordinator error ({:?})", s.code()),
        _ => anyhow!("{}", s.message()),
    }
}

pub async fn connect(
    url: &str,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<OperatorServiceClient<Channel>> {
    if !url.starts_with("https://") {
        bail!("--coordinator {url:?} must be an https:// URL, e.g. https://backup-host:50051");
    }
    let host = datasaver_common::tls::url_host(url)
        .with_context(|| format!("--coordinator {url:?} has no host"))?;
    let ca =
        ca.context("DATASAVER_TLS_CA (or --tls-ca) is not set: point it at the fleet ca.crt")?;
    let ca_pem = std::fs::read(&ca)
        .with_context(|| format!("DATASAVER_TLS_CA: cannot read {}", ca.display()))?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(host);
    match (cert, key) {
        (Some(c), Some(k)) => {
            let cert_pem = std::fs::read(&c)
                .with_context(|| format!("DATASAVER_TLS_CERT: cannot read {}", c.display()))?;
            let key_pem = std::fs::read(&k)
                .with_context(|| format!("DATASAVER_TLS_KEY: cannot read {}", k.display()))?;
            tls = tls.identity(Identity::from_pem(cert_pem, key_pem));
        }
        (Some(_), None) => {
            bail!("DATASAVER_TLS_KEY (or --tls-key) is not set but DATASAVER_TLS_CERT is")
        }
        (None, Some(_)) => {
            bail!("DATASAVER_TLS_CERT (or --tls-cert) is not set but DATASAVER_TLS_KEY is")
        }
        // Without a certificate the coordinator will refuse us; let it say
        // so, and add what to set.
        (None, None) => NO_CLIENT_CERT.store(true, Ordering::Relaxed),
    }
    let endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("--coordinator {url:?} is not a valid URL"))?
        .tls_config(tls)
        .map_err(|e| anyhow!("TLS configuration: {}", datasaver_common::error_chain(&e)))?
        .connect_timeout(Duration::from_secs(10));
    let channel = endpoint.connect().await.map_err(|e| {
        let text = datasaver_common::error_chain(&e);
        anyhow!(
            "cannot connect to the coordinator at {url}: {text}{}",
            hint(&text)
        )
    })?;
    let max = datasaver_common::MAX_MESSAGE_SIZE;
    Ok(OperatorServiceClient::new(channel)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max))
}
