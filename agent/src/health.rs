//! The agent's own `GET /health` (when `DATASAVER_HTTP_LISTEN` is set): is it
//! connected to the coordinator, and can it reach its database? 200 when both,
//! 503 otherwise, for readiness and monitoring. `GET /live` asks only for the
//! database (liveness, the image's HEALTHCHECK). The database check is
//! cached for [`DB_CHECK_TTL`]; its error text stays in the log.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::pg::PgTools;

/// How long one database check answers `/health`: a probe hammering the
/// endpoint must not open a Postgres connection per request.
pub const DB_CHECK_TTL: Duration = Duration::from_secs(10);

/// The outcome of one database check and when it was made.
type DbCheck = (Instant, Result<(), String>);

/// What the control session knows, shared with the endpoint.
#[derive(Default)]
pub struct State {
    pub connected: AtomicBool,
    /// The WAL the coordinator acknowledged (shared by the stream and the
    /// base backups that wait for it).
    pub wal: std::sync::Arc<crate::walstream::WalState>,
    /// The last database check; the lock is held while checking, so
    /// concurrent requests wait for one check instead of starting their own.
    db_check: tokio::sync::Mutex<Option<DbCheck>>,
}

impl State {
    /// The database check's result: the cached one while younger than
    /// [`DB_CHECK_TTL`] at `now`, else a new `check`.
    async fn db_reachable<F, Fut>(&self, now: Instant, check: F) -> Result<(), String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let mut cached = self.db_check.lock().await;
        if let Some((at, result)) = cached.as_ref() {
            if now.saturating_duration_since(*at) < DB_CHECK_TTL {
                return result.clone();
            }
        }
        let result = check().await;
        *cached = Some((now, result.clone()));
        result
    }
}

/// `/health` (`live` false): connected and the database answers; `/live`:
/// the database answers — a lost coordinator is not fixed by restarting
/// the agent, so liveness does not ask for it.
async fn check(config: &AgentConfig, state: &State, live: bool) -> (StatusCode, String) {
    let connected = state.connected.load(Ordering::Relaxed);
    let reach = state
        .db_reachable(Instant::now(), || async {
            let tools = PgTools::new(config.pg_bin_dir.clone());
            let db = &config.target.db;
            let r = match tokio::time::timeout(Duration::from_secs(5), tools.ping(db)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err("no answer within 5 s".to_string()),
            };
            if let Err(e) = &r {
                // The detail (user, host, port) goes to the log, never to
                // the unauthenticated endpoint.
                tracing::warn!(error = %e, "health check: the database is not reachable");
            }
            r
        })
        .await;
    let reachable = reach.is_ok();
    let error = reach
        .err()
        .map(|_| "database unreachable (details in the agent's log)");
    let ok = reachable && (connected || live);
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
                        let (code, body) = match req.uri().path() {
                            "/health" => check(&config, &state, false).await,
                            "/live" => check(&config, &state, true).await,
                            _ => (
                                StatusCode::NOT_FOUND,
                                "not found: try /health or /live\n".to_string(),
                            ),
                        };
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = code;
                        Ok::<_, Infallible>(r)
                    }
                });
            // A client that never finishes its headers is dropped.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[tokio::test]
    async fn the_database_check_is_cached_for_ten_seconds() {
        let state = Arc::new(State::default());
        let checks = Arc::new(AtomicU32::new(0));
        let check = |result: Result<(), String>| {
            let checks = checks.clone();
            move || async move {
                checks.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                result
            }
        };
        let t0 = Instant::now();
        // many requests at once: one check
        let mut all = Vec::new();
        for _ in 0..20 {
            let (state, c) = (state.clone(), check(Err("refused".into())));
            all.push(tokio::spawn(async move { state.db_reachable(t0, c).await }));
        }
        for h in all {
            assert_eq!(h.await.unwrap(), Err("refused".into()));
        }
        assert_eq!(checks.load(Ordering::SeqCst), 1);
        // within the TTL: the cached answer
        let r = state
            .db_reachable(t0 + Duration::from_secs(9), check(Ok(())))
            .await;
        assert_eq!(r, Err("refused".into()));
        assert_eq!(checks.load(Ordering::SeqCst), 1);
        // after it: a new check
        let r = state.db_reachable(t0 + DB_CHECK_TTL, check(Ok(()))).await;
        assert_eq!(r, Ok(()));
        assert_eq!(checks.load(Ordering::SeqCst), 2);
    }
}
