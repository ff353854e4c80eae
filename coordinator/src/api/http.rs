//! Plain HTTP for probes and scrapers: `GET /health` (200 when healthy, 503
//! otherwise, so it works as a Docker HEALTHCHECK or a Kubernetes probe) and
//! `GET /metrics` (Prometheus text format). No secrets are served here.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

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
        "/health" | "/healthz" => match crate::health::report(&core).await {
            Ok(r) => {
                let code = if r.status == crate::health::Level::Healthy {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let body = serde_json::to_string_pretty(&r).unwrap_or_default();
                reply(code, "application/json", body + "\n")
            }
            Err(e) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                serde_json::json!({ "status": "unhealthy", "error": e }).to_string(),
            ),
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
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                core.metrics.encode(),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /health or /metrics\n".into(),
        ),
    }
}

/// Serves until the coordinator shuts down.
pub async fn serve(core: Arc<Core>, listener: TcpListener) {
    loop {
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
            let svc = hyper::service::service_fn(move |req| {
                let core = core.clone();
                async move { Ok::<_, Infallible>(handle(core, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
