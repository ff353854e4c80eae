//! Connecting to the coordinator and turning gRPC/TLS failures into one line
//! that says what went wrong and what to check.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use datasaver_common::proto::operator_service_client::OperatorServiceClient;
use datasaver_common::proto::ListAgentsRequest;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const NEEDS_CLIENT_CERT: &str = " (the coordinator requires a client certificate: set DATASAVER_TLS_CERT and DATASAVER_TLS_KEY to an operator certificate)";

/// How long the follow-up call that tells a dropped connection from a refused
/// certificate may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A hint for a TLS failure that is about certificates, or for a refused
/// connection; empty for anything else.
fn hint(text: &str) -> &'static str {
    let t = text.to_ascii_lowercase();
    if t.contains("certificaterequired") || t.contains("certificate required") {
        NEEDS_CLIENT_CERT
    } else if t.contains("certificaterevoked") || t.contains("certificate revoked") {
        " (the coordinator refused this client's certificate: it has been revoked with `dsctl certs revoke`; ask for a new one)"
    } else if t.contains("certificateexpired") || t.contains("certificate expired") {
        " (the coordinator refused this client's certificate: it has expired; issue a new one with `dsctl certs issue`)"
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

/// Whether a transport error means the connection went away under the call
/// (the coordinator was killed, restarted or stopped), as opposed to a
/// refusal or a certificate problem.
fn connection_closed(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "connection reset",
        "broken pipe",
        "connection closed",
        "connection aborted",
        "error reading a body from connection",
        "unexpected end of file",
        "unexpected eof",
        "close_notify",
        "stream closed",
        "stream no longer needed",
        "h2 protocol error",
        "goaway",
        "go away",
        "operation was canceled",
    ]
    .iter()
    .any(|p| t.contains(p))
}

/// The one line for a call the coordinator stopped answering half way.
fn closed_error(url: &str, what: &str) -> anyhow::Error {
    anyhow!(
        "the coordinator at {url} closed the connection during the call (is it restarting or stopped?): {}",
        tidy(what)
    )
}

/// rustls appends a link to its manual to an unexpected EOF; the operator
/// needs to know what happened, not how TLS handles EOF.
fn tidy(text: &str) -> String {
    text.split(": ")
        .filter(|part| !part.starts_with("https://"))
        .collect::<Vec<_>>()
        .join(": ")
}

/// What a failed call's status says, before any follow-up.
enum Verdict {
    /// The error line is clear from the status alone.
    Clear(anyhow::Error),
    /// The connection closed before the coordinator answered: either it went
    /// away, or (TLS 1.3 checks the client's certificate after the client
    /// considers the handshake done) it refused this client's certificate
    /// and the refusal arrived as a plain close. Holds the transport's text.
    ClosedBeforeAnswer(String),
}

fn classify(url: &str, s: tonic::Status, answered: bool, no_client_cert: bool) -> Verdict {
    use tonic::Code;
    // A status with a source came from the transport (TCP, TLS, HTTP/2),
    // not from the coordinator's own answer.
    let source = std::error::Error::source(&s);
    let transport = source.is_some()
        || (s.code() == Code::Cancelled && s.message().contains("operation was canceled"));
    let text = datasaver_common::error_chain_after(s.message(), source);
    if transport {
        if !answered {
            if no_client_cert {
                return Verdict::Clear(anyhow!(
                    "cannot talk to the coordinator at {url}: {}{NEEDS_CLIENT_CERT}",
                    tidy(&text)
                ));
            }
            let h = hint(&text);
            if !h.is_empty() {
                return Verdict::Clear(anyhow!(
                    "cannot talk to the coordinator at {url}: {}{h}",
                    tidy(&text)
                ));
            }
            if connection_closed(&text) {
                return Verdict::ClosedBeforeAnswer(text);
            }
        }
        if answered {
            return Verdict::Clear(closed_error(url, &text));
        }
        return Verdict::Clear(anyhow!(
            "cannot talk to the coordinator at {url}: {}",
            tidy(&text)
        ));
    }
    Verdict::Clear(match s.code() {
        Code::Unavailable | Code::Unknown | Code::Internal if connection_closed(&text) => {
            closed_error(url, &text)
        }
        Code::Unauthenticated | Code::PermissionDenied => {
            anyhow!("refused by the coordinator: {}", s.message())
        }
        _ if s.message().is_empty() => anyhow!("coordinator error ({:?})", s.code()),
        _ => anyhow!("{}", s.message()),
    })
}

/// Turns failed calls into one line. Kept apart from the client so that a
/// call's result can be explained while the client is borrowed for the call.
pub struct Explainer {
    url: String,
    endpoint: Endpoint,
    no_client_cert: bool,
}

impl Explainer {
    /// The answer of a call, or one line saying why there is none.
    pub async fn answer<T>(&self, r: Result<tonic::Response<T>, tonic::Status>) -> Result<T> {
        match r {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.call_error(s).await),
        }
    }

    /// One line for a call that failed before the coordinator answered.
    pub async fn call_error(&self, s: tonic::Status) -> anyhow::Error {
        match classify(&self.url, s, false, self.no_client_cert) {
            Verdict::Clear(e) => e,
            Verdict::ClosedBeforeAnswer(text) => self.closed_before_answer(&text).await,
        }
    }

    /// One line for a job stream that broke after the coordinator had
    /// answered: TLS and certificates were fine, so a transport failure here
    /// is a connection that went away.
    pub fn stream_error(&self, s: tonic::Status) -> anyhow::Error {
        match classify(&self.url, s, true, self.no_client_cert) {
            Verdict::Clear(e) => e,
            Verdict::ClosedBeforeAnswer(text) => closed_error(&self.url, &text),
        }
    }

    /// A job stream that ended without its result.
    pub fn stream_ended(&self) -> anyhow::Error {
        closed_error(&self.url, "the job stream ended without a result")
    }

    /// A connection that closed before any answer: one more, harmless call
    /// on a new connection tells a coordinator that went away from one that
    /// refuses this client.
    async fn closed_before_answer(&self, text: &str) -> anyhow::Error {
        let url = &self.url;
        let probe = || async {
            let channel = self.endpoint.connect().await.map_err(|e| {
                let text = datasaver_common::error_chain(&e);
                (false, text)
            })?;
            OperatorServiceClient::new(channel)
                .list_agents(ListAgentsRequest {})
                .await
                .map_err(|s| {
                    let source = std::error::Error::source(&s);
                    (
                        true,
                        datasaver_common::error_chain_after(s.message(), source),
                    )
                })
        };
        let mut answer = tokio::time::timeout(PROBE_TIMEOUT, probe()).await;
        // A refusal's alert can still be lost to a close that races it: one
        // more look before saying only "closed".
        if matches!(&answer, Ok(Err((true, again))) if hint(again).is_empty() && connection_closed(again))
        {
            answer = tokio::time::timeout(PROBE_TIMEOUT, probe()).await;
        }
        match answer {
            // It answers (again): the first connection went away under the call.
            Ok(Ok(_)) => closed_error(url, text),
            // It does not listen any more: stopped, or not back yet.
            Ok(Err((false, _))) | Err(_) => anyhow!(
                "the coordinator at {url} closed the connection during the call and does not answer now (is it restarting or stopped?): {}",
                tidy(text)
            ),
            Ok(Err((true, again))) => {
                let h = hint(&again);
                if !h.is_empty() {
                    anyhow!("cannot talk to the coordinator at {url}: {}{h}", tidy(&again))
                } else if connection_closed(&again) {
                    anyhow!(
                        "cannot talk to the coordinator at {url}: {} (it accepts connections but closes this client's before answering: check that DATASAVER_TLS_CERT/KEY are an operator certificate issued by the fleet CA)",
                        tidy(text)
                    )
                } else {
                    closed_error(url, text)
                }
            }
        }
    }
}

pub async fn connect(
    url: &str,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<(OperatorServiceClient<Channel>, Explainer)> {
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
    let no_client_cert = match (cert, key) {
        (Some(c), Some(k)) => {
            let cert_pem = std::fs::read(&c)
                .with_context(|| format!("DATASAVER_TLS_CERT: cannot read {}", c.display()))?;
            let key_pem = std::fs::read(&k)
                .with_context(|| format!("DATASAVER_TLS_KEY: cannot read {}", k.display()))?;
            tls = tls.identity(Identity::from_pem(cert_pem, key_pem));
            false
        }
        (Some(_), None) => {
            bail!("DATASAVER_TLS_KEY (or --tls-key) is not set but DATASAVER_TLS_CERT is")
        }
        (None, Some(_)) => {
            bail!("DATASAVER_TLS_CERT (or --tls-cert) is not set but DATASAVER_TLS_KEY is")
        }
        // Without a certificate the coordinator will refuse us; let it say
        // so, and add what to set.
        (None, None) => true,
    };
    let endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("--coordinator {url:?} is not a valid URL"))?
        .tls_config(tls)
        .map_err(|e| anyhow!("TLS configuration: {}", datasaver_common::error_chain(&e)))?
        .connect_timeout(Duration::from_secs(10));
    let channel = endpoint.connect().await.map_err(|e| {
        let text = datasaver_common::error_chain(&e);
        anyhow!(
            "cannot connect to the coordinator at {url}: {}{}",
            tidy(&text),
            hint(&text)
        )
    })?;
    let max = datasaver_common::MAX_MESSAGE_SIZE;
    let client = OperatorServiceClient::new(channel)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    Ok((
        client,
        Explainer {
            url: url.to_string(),
            endpoint,
            no_client_cert,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(r: Verdict) -> String {
        match r {
            Verdict::Clear(e) => e.to_string(),
            Verdict::ClosedBeforeAnswer(t) => format!("ambiguous: {t}"),
        }
    }

    #[test]
    fn a_broken_job_stream_is_a_closed_connection_without_certificate_hints() {
        let s = tonic::Status::unknown(
            "h2 protocol error: error reading a body from connection: peer closed connection \
             without sending TLS close_notify: https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof",
        );
        let l = line(classify("https://h:1", s, true, false));
        assert_eq!(
            l,
            "the coordinator at https://h:1 closed the connection during the call (is it \
             restarting or stopped?): h2 protocol error: error reading a body from connection: \
             peer closed connection without sending TLS close_notify"
        );
    }

    #[test]
    fn coordinator_answers_are_passed_on() {
        let s = tonic::Status::not_found("no backup app_x");
        assert_eq!(
            line(classify("https://h:1", s, false, false)),
            "no backup app_x"
        );
        let s = tonic::Status::permission_denied("agent:x is not an operator");
        assert_eq!(
            line(classify("https://h:1", s, false, false)),
            "refused by the coordinator: agent:x is not an operator"
        );
    }
}
