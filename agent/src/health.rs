//! The agent's own `GET /health` (when `DATASAVER_HTTP_LISTEN` is set): is it
//! connected to the coordinator, and can it reach its database? 200 when both,
//! 503 otherwise, for a sidecar's Docker HEALTHCHECK.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::pg::PgTools;

/// What the control session knows, shared with the endpoint.
#[derive(Default)]
pub struct State {
    pub connected: AtomicBool,
}

async fn check(config: &AgentConfig, state: &State) -> (StatusCode, String) {
    let connected = state.connected.load(Ordering::Relaxed);
    let tools = PgTools::new(config.pg_bin_dir.clone());
    let db = &config.target.db;
    let reach = tokio::time::timeout(Duration::from_secs(5), tools.ping(db)).await;
    let (reachable, error) = match reach {
        Ok(Ok(_)) => (true, None),
        Ok(Err(e)) => (false, Some(e)),
        Err(_) => (false, Some("no answer within 5 s".to_string())),
    };
    let ok = connected && reachable;
    let body = serde_json::json!({
        "status": if ok { "healthy" } else { "unhealthy" },
        "target": config.target.name,
        "coordinator_connected": connected,
        "database_reachable": reachable,
        "database_error": error,
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body.to_string() + "\n")
}

pub async fn serve(
    listener: TcpListener,
    config: Arc<AgentConfig>,
    state: Arc<State>,
    cancel: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => match a {
                Ok(s) => s,
                Err(_) => continue,
            },
        };
        let (config, state) = (config.clone(), state.clone());
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (config, state) = (config.clone(), state.clone());
                    async move {
                        let (code, body) = if req.uri().path() == "/health" {
                            check(&config, &state).await
                        } else {
                            (
                                StatusCode::NOT_FOUND,
                                "not found: try /health\n".to_string(),
                            )
                        };
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = code;
                        Ok::<_, Infallible>(r)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
