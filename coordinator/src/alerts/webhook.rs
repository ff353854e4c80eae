//! Webhook delivery from the outbox (`alerts::store`): JSON POSTs signed with
//! HMAC-SHA256 under `DATASAVER_WEBHOOK_SECRET`
//! (`X-Datasaver-Signature: sha256=<hex of HMAC(timestamp + "." + body)>`,
//! `X-Datasaver-Timestamp: <unix seconds>`), retried with exponential backoff.
//! Runs on its own task: a slow or dead receiver never holds up a backup.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::stamp;
use super::store::Delivery;
use crate::Core;

/// Attempts per notification before it is given up (about 1.5 h of retries).
const MAX_ATTEMPTS: u32 = 12;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

type HttpClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// `sha256=<hex>` of HMAC-SHA256(secret, timestamp + "." + body).
pub fn signature(secret: &str, timestamp: i64, body: &str) -> String {
    let ts = timestamp.to_string();
    format!(
        "sha256={}",
        hmac_sha256_hex(secret.as_bytes(), &[ts.as_bytes(), b".", body.as_bytes()])
    )
}

fn hmac_sha256_hex(key: &[u8], parts: &[&[u8]]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut ctx = ring::hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    ctx.sign()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Scheme and host of a URL, for logs: the path of a webhook URL is often
/// its secret.
pub fn redact(url: &str) -> String {
    match url.parse::<hyper::Uri>() {
        Ok(u) => format!(
            "{}://{}/…",
            u.scheme_str().unwrap_or("?"),
            u.authority().map(|a| a.host()).unwrap_or("?")
        ),
        Err(_) => "(unparsable URL)".into(),
    }
}

fn client() -> Result<HttpClient, String> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| format!("cannot load the system's CA certificates: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

async fn send(c: &HttpClient, d: &Delivery, secret: Option<&str>, now: i64) -> Result<(), String> {
    let mut req = hyper::Request::post(d.url.as_str())
        .header("content-type", "application/json")
        .header(
            "user-agent",
            format!("datasaver/{}", datasaver_common::VERSION),
        )
        .header("x-datasaver-timestamp", now.to_string());
    if let Some(s) = secret {
        req = req.header("x-datasaver-signature", signature(s, now, &d.body));
    }
    let req = req
        .body(Full::new(Bytes::from(d.body.clone())))
        .map_err(|e| format!("bad request: {e}"))?;
    let resp = tokio::time::timeout(ATTEMPT_TIMEOUT, c.request(req))
        .await
        .map_err(|_| format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()))?
        .map_err(|e| datasaver_common::error_chain(&e))?;
    let code = resp.status();
    if code.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {code}"))
    }
}

fn backoff(attempts: u32) -> chrono::Duration {
    chrono::Duration::seconds((1i64 << attempts.min(20)).min(300))
}

/// Sends what the outbox holds, until shutdown.
pub async fn run(core: Arc<Core>) {
    let c = match client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhooks disabled");
            return;
        }
    };
    let secret = core.alert_config.secret.clone();
    loop {
        let now = core.clock.now();
        let due = core
            .alerter
            .store
            .due_deliveries(stamp(now))
            .await
            .unwrap_or_default();
        for d in due {
            let result = send(&c, &d, secret.as_deref(), core.clock.now().timestamp()).await;
            let at = core.clock.now();
            let attempts = d.attempts + 1;
            let (error, next) = match &result {
                Ok(()) => {
                    tracing::info!(to = %redact(&d.url), attempts, "webhook delivered");
                    (None, None)
                }
                Err(e) if attempts >= MAX_ATTEMPTS => {
                    tracing::error!(to = %redact(&d.url), attempts, error = %e, "webhook given up");
                    (Some(e.clone()), None)
                }
                Err(e) => {
                    let next = at + backoff(attempts);
                    tracing::warn!(to = %redact(&d.url), attempts, error = %e, retry_at = %stamp(next), "webhook failed; will retry");
                    (Some(e.clone()), Some(stamp(next)))
                }
            };
            if let Err(e) = core
                .alerter
                .store
                .delivery_done(d.id, stamp(at), error, next)
                .await
            {
                tracing::error!(error = %e, "could not record a webhook delivery");
            }
        }
        let wait = core
            .alerter
            .store
            .next_delivery_at()
            .await
            .ok()
            .flatten()
            .and_then(|t| super::parse(&t))
            .map(|t| (t - core.clock.now()).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(Duration::from_secs(60))
            .clamp(Duration::from_millis(50), Duration::from_secs(60));
        tokio::select! {
            _ = core.cancel.cancelled() => break,
            _ = core.alerter.deliver.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231, test case 2
        assert_eq!(
            hmac_sha256_hex(b"Jefe", &[b"what do ya want ", b"for nothing?"]),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            signature("Jefe", 1700000000, "{\"a\":1}"),
            format!(
                "sha256={}",
                hmac_sha256_hex(b"Jefe", &[b"1700000000.{\"a\":1}"])
            )
        );
    }

    #[test]
    fn urls_are_redacted_to_their_host() {
        assert_eq!(
            redact("https://hooks.slack.com/services/T000/B000/XXXXSECRET"),
            "https://hooks.slack.com/…"
        );
        assert!(!redact("http://127.0.0.1:9/x?token=abc").contains("abc"));
    }
}
