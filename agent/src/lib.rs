//! The datasaver agent: runs beside one Postgres, keeps a control stream open
//! to the coordinator, and runs the jobs it is sent (pg_dump up, pg_restore
//! down). It holds no state of its own: it can be killed at any moment and
//! restarted, and it reconnects with capped exponential backoff.
//!
//! Who owns what: this file the connection and the control session;
//! [`jobs`] starting, cancelling and reporting jobs; [`backup`] and
//! [`restore`] what each job does; [`pipeline`] the byte streams between
//! Postgres programs and the coordinator; [`child`] the programs' processes;
//! [`pg`] every Postgres command line and SQL statement; [`config`] the
//! settings; [`health`] and [`progress`] what the agent tells others.

pub mod archive;
pub mod backup;
pub mod basebackup;
pub mod child;
pub mod config;
pub mod enroll;
pub mod globals;
pub mod health;
pub mod jobs;
pub mod part;
pub mod pg;
pub mod pipeline;
pub mod pitr;
pub mod progress;
pub mod replication;
pub mod restore;
pub mod segmenter;
pub mod server;
pub mod walspool;
pub mod walstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use datasaver_common::proto::agent_service_client::AgentServiceClient;
use datasaver_common::proto::{
    agent_message, coordinator_message, AgentMessage, Goodbye, Heartbeat, Register, TargetInfo,
};
use datasaver_common::tls::{Role, TlsMaterial};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::config::{AgentConfig, Identity};
use crate::jobs::Jobs;
use crate::pg::PgTools;

pub use crate::jobs::JobError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Tls(#[from] datasaver_common::tls::TlsError),
    #[error("DATASAVER_TLS_CERT: the certificate's role is {0}, not agent (issue one with `dsctl certs issue --agent NAME`)")]
    WrongRole(String),
    #[error("{0}")]
    Enroll(#[from] enroll::EnrollError),
    #[error("DATASAVER_HTTP_LISTEN: cannot listen on {addr}: {source}")]
    Http {
        addr: String,
        source: std::io::Error,
    },
}

/// The certificate to connect with: the files', or the stored one of a
/// joined agent (joining first when there is none). A token the coordinator
/// refuses, or a state directory that cannot be used, ends the agent; a
/// coordinator not reachable yet is waited for.
async fn load_identity(
    config: &AgentConfig,
    cancel: &CancellationToken,
) -> Result<Option<TlsMaterial>, AgentError> {
    let s = match &config.identity {
        Identity::Files(paths) => return Ok(Some(paths.load()?)),
        Identity::Join(s) => s,
    };
    enroll::check_state_dir(&s.state_dir)?;
    let targets = vec![config.target.name.clone()];
    let mut backoff = Duration::from_secs(1);
    loop {
        match enroll::identity(
            s,
            &config.coordinator_url,
            &config.coordinator_host,
            &targets,
        )
        .await
        {
            Ok(m) => return Ok(Some(m)),
            Err(e) if e.is_final() => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot join the fleet yet");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Connects, serves, and reconnects until `cancel` fires.
pub async fn run(config: AgentConfig, cancel: CancellationToken) -> Result<(), AgentError> {
    let state = Arc::new(health::State::default());
    let config = Arc::new(config);
    // Before joining: the liveness probe answers while the agent waits for
    // its coordinator.
    if let Some(addr) = config.http_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Http {
                addr: addr.to_string(),
                source,
            })?;
        tracing::info!(http = %addr, "health endpoint listening");
        tokio::spawn(health::serve(
            l,
            config.clone(),
            state.clone(),
            cancel.clone(),
        ));
    }
    let Some(mut tls) = load_identity(&config, &cancel).await? else {
        return Ok(());
    };
    if tls.identity.role != Role::Agent {
        return Err(AgentError::WrongRole(tls.identity.role.as_str().into()));
    }
    tracing::info!(
        identity = %tls.identity,
        coordinator = %config.coordinator_url,
        target = %config.target.name,
        database = %config.target.db.describe(),
        pg_bin_dir = %config.pg_bin_dir.display(),
        "agent starting"
    );
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let result = session(&config, &tls, &cancel, &state).await;
        if let Identity::Join(s) = &config.identity {
            // A renewed or re-joined certificate is in the state directory.
            match enroll::stored(&s.state_dir) {
                Ok(Some(m)) if m.identity.serial != tls.identity.serial => {
                    tracing::info!(serial = %m.identity.serial, "connecting with the renewed certificate");
                    tls = m;
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "keeping the certificate in use"),
            }
            // Away longer than its certificate lived: join again (with the
            // token, if it is still set and valid).
            if tls.identity.not_after <= chrono::Utc::now().timestamp() {
                tracing::warn!("the stored certificate expired; joining again");
                match load_identity(&config, &cancel).await? {
                    Some(m) => tls = m,
                    None => return Ok(()),
                }
            }
        }
        state
            .connected
            .store(false, std::sync::atomic::Ordering::Relaxed);
        if cancel.is_cancelled() {
            tracing::info!("agent stopped");
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        let err = match result {
            Ok(()) => "coordinator closed the connection".to_string(),
            Err(SessionEnd::Renewed) => continue,
            Err(SessionEnd::Error(e)) => e,
        };
        // Jitter spreads a fleet's reconnects after a coordinator restart.
        let jitter = Duration::from_millis(rand::random::<u64>() % 500);
        tracing::warn!(error = %err, retry_in = ?backoff, "not connected to the coordinator");
        tokio::select! {
            _ = cancel.cancelled() => { tracing::info!("agent stopped"); return Ok(()); }
            _ = tokio::time::sleep(backoff + jitter) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn connect(config: &AgentConfig, tls: &TlsMaterial) -> Result<Channel, String> {
    let tls_cfg = datasaver_common::tls::client_config(tls, &config.coordinator_host);
    Endpoint::from_shared(config.coordinator_url.clone())
        .map_err(|e| datasaver_common::error_chain(&e))?
        .tls_config(tls_cfg)
        .map_err(|e| datasaver_common::error_chain(&e))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(datasaver_common::H2_STREAM_WINDOW)
        .initial_connection_window_size(datasaver_common::H2_CONNECTION_WINDOW)
        .max_frame_size(datasaver_common::H2_MAX_FRAME)
        .connect()
        .await
        .map_err(|e| datasaver_common::error_chain(&e))
}

/// Why a session ended early.
enum SessionEnd {
    /// the connection failed or broke
    Error(String),
    /// a joined agent renewed its certificate and, with no job running,
    /// reconnects with it
    Renewed,
}

impl From<String> for SessionEnd {
    fn from(s: String) -> Self {
        SessionEnd::Error(s)
    }
}

async fn session(
    config: &Arc<AgentConfig>,
    tls: &TlsMaterial,
    cancel: &CancellationToken,
    state: &health::State,
) -> Result<(), SessionEnd> {
    let channel = connect(config, tls).await?;
    let max = datasaver_common::MAX_MESSAGE_SIZE;
    let mut client = AgentServiceClient::new(channel.clone())
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let (tx, rx) = mpsc::channel::<AgentMessage>(64);
    let t = &config.target;
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Register(Register {
            agent_version: datasaver_common::VERSION.into(),
            targets: vec![TargetInfo {
                name: t.name.clone(),
                schedule: t.schedule.clone().unwrap_or_default(),
                retention: Some(t.retention),
                compression: t.compression.name().into(),
                encrypted: t.encrypt_to.is_some(),
                database: t.db.dbname.clone(),
                db_host: format!("{}:{}", t.db.host, t.db.port),
                drill_schedule: t.drill_schedule.clone().unwrap_or_default(),
                base_schedule: t.base_schedule.clone().unwrap_or_default(),
            }],
        })),
    })
    .await
    .map_err(|_| SessionEnd::Error("control channel closed".into()))?;
    let mut inbound = client
        .control(ReceiverStream::new(rx))
        .await
        .map_err(|s| {
            SessionEnd::Error(format!(
                "coordinator refused the control stream: {}",
                s.message()
            ))
        })?
        .into_inner();
    // Jobs of this session stop when it ends: the coordinator has already
    // failed them, and a dump nobody receives only loads the database. Not a
    // child of `cancel`: on SIGTERM the goodbye goes out before jobs stop.
    let jobs = Jobs::new(tx.clone(), cancel.clone());
    let _guard = jobs.cancel_on_drop();
    // The WAL stream lives as long as the session: the coordinator knows
    // this agent serves the target once it registered.
    let wal_stop = cancel.child_token();
    let wal_state = state.wal.clone();
    let _wal_guard = wal_stop.clone().drop_guard();
    let wal = config.target.wal.clone().map(|w| {
        tokio::spawn(walstream::run(
            config.clone(),
            w,
            channel.clone(),
            wal_state.clone(),
            wal_stop.clone(),
        ))
    });
    let tools = PgTools::new(config.pg_bin_dir.clone());
    let mut heartbeat = tokio::time::interval(Duration::from_secs(10));
    let every = match &config.identity {
        Identity::Join(s) => s.renewal_check,
        Identity::Files(_) => Duration::from_secs(86_400),
    };
    let mut renewal = tokio::time::interval(every);
    let mut renewed = false;
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => {
                leave(config, jobs, tx, inbound).await;
                // The WAL stream stores its last partial before the exit.
                if let Some(w) = wal {
                    let _ = tokio::time::timeout(Duration::from_secs(8), w).await;
                }
                return Ok(());
            }
            _ = renewal.tick(), if !renewed => {
                if let Identity::Join(s) = &config.identity {
                    renewed = renew_if_due(&mut client, s, tls).await;
                }
                continue;
            }
            _ = heartbeat.tick() => {
                let hb = AgentMessage { msg: Some(agent_message::Msg::Heartbeat(Heartbeat {
                    unix_ms: chrono::Utc::now().timestamp_millis(),
                    wal_server_lsn: if config.target.wal.is_some() { wal_state.server() } else { 0 },
                })) };
                if tx.send(hb).await.is_err() {
                    return Err(SessionEnd::Error("control stream closed".into()));
                }
                if renewed && jobs.is_empty() {
                    tracing::info!("reconnecting with the renewed certificate (no job running)");
                    return Err(SessionEnd::Renewed);
                }
                continue;
            }
            m = inbound.message() => m,
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(s) => {
                return Err(SessionEnd::Error(format!(
                    "control stream broke: {}",
                    s.message()
                )))
            }
        };
        match msg.msg {
            Some(coordinator_message::Msg::Registered(r)) => {
                tracing::info!(as_agent = %r.agent_name, coordinator_version = %r.coordinator_version, "connected to the coordinator");
                state
                    .connected
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Some(coordinator_message::Msg::Backup(job)) => {
                jobs.dispatch(job, &client, &config.target, &tools, &wal_state);
            }
            Some(coordinator_message::Msg::Restore(job)) => {
                jobs.dispatch(job, &client, &config.target, &tools, &wal_state);
            }
            Some(coordinator_message::Msg::Cancel(c)) => {
                if jobs.cancel_job(&c.job_id, &c.reason) {
                    tracing::warn!(job = %c.job_id, reason = %c.reason, "job cancelled by the coordinator");
                } else {
                    tracing::info!(job = %c.job_id, reason = %c.reason, "cancel for a job this agent is not running; ignored");
                }
            }
            None => {}
        }
    }
}

/// Renews a joined agent's certificate once half its life has passed;
/// whether it did. A failure is logged and tried again at the next check:
/// the current certificate still has half its life.
async fn renew_if_due(
    client: &mut AgentServiceClient<Channel>,
    s: &enroll::JoinSettings,
    tls: &TlsMaterial,
) -> bool {
    let Some(nb) = tls
        .certs
        .first()
        .and_then(|c| datasaver_common::tls::not_before(c.as_ref()))
    else {
        return false;
    };
    let now = chrono::Utc::now().timestamp();
    if !enroll::renewal_due(nb, tls.identity.not_after, now) {
        return false;
    }
    match enroll::renew(client, s).await {
        Ok(not_after) => {
            tracing::info!(
                not_after = %chrono::DateTime::from_timestamp(not_after, 0).map(|t| t.to_rfc3339()).unwrap_or_default(),
                "certificate renewed and stored"
            );
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot renew the certificate; trying again later");
            false
        }
    }
}

/// A planned stop (SIGTERM): say goodbye, interrupt the running jobs and let
/// them report, end the control stream and wait for the coordinator to end
/// its side — all within the shutdown grace (less a second for the exit), so
/// the coordinator records an interruption, not a failure or a broken
/// connection.
async fn leave(
    config: &AgentConfig,
    jobs: Jobs,
    tx: mpsc::Sender<AgentMessage>,
    mut inbound: tonic::Streaming<datasaver_common::proto::CoordinatorMessage>,
) {
    let deadline = tokio::time::Instant::now()
        + config
            .shutdown_grace
            .saturating_sub(Duration::from_secs(1))
            .max(Duration::from_millis(500));
    let running = jobs.len();
    tracing::info!(
        running_jobs = running,
        "stopping: interrupting running jobs and leaving the coordinator"
    );
    let _ = tx
        .send(AgentMessage {
            msg: Some(agent_message::Msg::Goodbye(Goodbye {
                reason: "the agent received SIGTERM".into(),
            })),
        })
        .await;
    jobs.cancel_all();
    if !jobs.wait_until(deadline).await {
        tracing::warn!("jobs did not finish within DATASAVER_SHUTDOWN_GRACE; leaving anyway");
    }
    // The request stream ends when the last sender is gone; the coordinator
    // then ends its response stream.
    drop(jobs);
    drop(tx);
    loop {
        match tokio::time::timeout_at(deadline, inbound.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => {
                tracing::info!("left the coordinator");
                break;
            }
            Ok(Err(s)) => {
                tracing::warn!(error = %s.message(), "control stream ended with an error while leaving");
                break;
            }
            Err(_) => {
                tracing::warn!(
                    "the coordinator did not close the control stream in time; leaving anyway"
                );
                break;
            }
        }
    }
}
