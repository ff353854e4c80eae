//! Plain HTTP for probes and scrapers: `GET /live` (200 while serving with
//! the catalog and storage answering: liveness, the image's HEALTHCHECK),
//! `GET /health` (200 when the fleet is healthy, 503 otherwise: readiness and
//! monitoring) and
//! `GET /metrics` (Prometheus text format). No secrets are served here, and
//! no error texts: they can name a database's user, host and port (see
//! `health::Report::public`).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::config::HttpLimits;
use crate::Core;

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(core: Arc<Core>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/health" | "/healthz" => match crate::health::report(&core).await.map(|r| r.public()) {
            Ok(r) => {
                let code = if r.status == crate::health::Level::Healthy {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let body = serde_json::to_string_pretty(&r).unwrap_or_default();
                reply(code, "application/json", body + "\n")
            }
            Err(e) => {
                // The text (paths, SQLite's words) is for the log only.
                tracing::error!(error = %e, "GET /health could not read the catalog");
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application/json",
                    serde_json::json!({ "status": "unhealthy", "error": "catalog unavailable" })
                        .to_string(),
                )
            }
        },
        // Liveness, for a container HEALTHCHECK or a Kubernetes liveness
        // probe: serving, with the catalog and storage answering. Not the
        // fleet's verdict (/health): restarting a coordinator never fixes a
        // failed backup.
        "/live" | "/livez" => match core.repo.reachable().await {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            Err(e) => {
                tracing::warn!(error = %e, "GET /live: not live");
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not live: the catalog or storage does not answer (see the log)\n".into(),
                )
            }
        },
        "/metrics" => {
            if let Ok(r) = crate::health::report(&core).await {
                let open: Vec<(String, String)> = r
                    .targets
                    .iter()
                    .flat_map(|t| t.alerts.iter().map(|a| (t.target.clone(), a.event.clone())))
                    .collect();
                core.metrics
                    .refresh(&r.targets, r.agents_connected, &r.queue, &open);
            }
            if let Ok(w) = crate::wal::view::targets(&core, None).await {
                core.metrics.refresh_wal(&w);
            }
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                core.metrics.encode(),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /health, /live or /metrics\n".into(),
        ),
    }
}

/// Serves until the coordinator shuts down. Anyone who can reach the port
/// can connect, so one client cannot hold the server: a connection that has
/// not sent its request headers within `limits.header_timeout` is closed,
/// and at most `limits.max_connections` are served at once (the next ones
/// wait in the listen backlog until one ends).
pub async fn serve(core: Arc<Core>, listener: TcpListener, limits: HttpLimits) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    loop {
        let slot = tokio::select! {
            _ = core.cancel.cancelled() => break,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let (stream, _) = tokio::select! {
            _ = core.cancel.cancelled() => break,
            a = listener.accept() => match a {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    continue;
                }
            },
        };
        let core = core.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req| {
                let core = core.clone();
                async move { Ok::<_, Infallible>(handle(core, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
