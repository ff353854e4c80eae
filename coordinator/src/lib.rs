//! The datasaver coordinator: one per backup host. It owns storage, the SQLite
//! catalog and the jobs it sends to agents, and serves dsctl. Agents and
//! operators reach it over gRPC with mutual TLS; who they are comes from
//! their certificates.

pub mod agents;
pub mod alerts;
pub mod api;
pub mod authz;
pub mod backups;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod embedded;
pub mod enrollment;
pub mod fleet;
pub mod floors;
pub mod health;
pub mod jobs;
pub mod listener;
pub mod lock;
pub mod metrics;
pub mod policy;
pub mod repo;
pub mod retention;
pub mod revocation;
pub mod schedule;
pub mod storage;
pub mod targets;
#[cfg(test)]
pub(crate) mod testing;
pub mod tls_auto;
pub mod tokens;
pub mod wal;

use std::sync::Arc;
use std::time::Duration;

use datasaver_common::proto::agent_service_server::AgentServiceServer;
use datasaver_common::proto::enrollment_service_server::EnrollmentServiceServer;
use datasaver_common::proto::operator_service_server::OperatorServiceServer;
use datasaver_common::tls::Role;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

use crate::catalog::Catalog;
use crate::config::{Backend, Config};
use crate::fleet::Fleet;
use crate::repo::{BackupRecord, Repository};
use crate::storage::Storage;
use crate::targets::TargetStore;

/// Everything the services share.
pub struct Core {
    /// Targets: owner agent, what it asked for, scheduler progress.
    pub targets: TargetStore,
    /// Everything stored about backups: the only way to storage.
    pub repo: Repository,
    pub fleet: Fleet,
    pub cancel: CancellationToken,
    pub policies: policy::Policies,
    pub clock: Arc<dyn clock::Clock>,
    pub scheduler: schedule::driver::Scheduler,
    pub metrics: metrics::Metrics,
    pub alert_config: alerts::AlertConfig,
    /// Alert state and the webhook outbox.
    pub alerter: alerts::Alerter,
    /// One retention run at a time (see `retention::cleanup::run`).
    pub cleanup: tokio::sync::Mutex<()>,
    /// Every job's task: shutdown waits here for them to record their end.
    pub tasks: tokio_util::task::TaskTracker,
    /// Agents' requests raised to the floor that were logged already.
    pub floors_logged: floors::Logged,
    /// Join tokens and the enrollment CA, when `DATASAVER_ENROLLMENT_CA_*`
    /// are set.
    pub enrollment: Option<Arc<enrollment::Enrollment>>,
    /// The catalog's index of stored WAL and each target's cluster binding.
    pub wal_index: wal::index::WalIndex,
    /// WAL streams open now and the servers' positions.
    pub wal_live: wal::live::Live,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Tls(#[from] datasaver_common::tls::TlsError),
    #[error("{0}")]
    Storage(#[from] storage::StorageError),
    #[error("{0}")]
    Catalog(#[from] catalog::CatalogError),
    #[error("{0}")]
    Repo(repo::RepoError),
    #[error("storage check failed (the coordinator must be able to write, read, list and delete before it accepts backups): {0}")]
    Probe(storage::StorageError),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Lock(#[from] lock::LockError),
    #[error("DATASAVER_TLS_CERT: the certificate's role is {0}, not coordinator (use coordinator.crt from `dsctl certs init`)")]
    WrongRole(String),
    /// `DATASAVER_TLS_CRL` unusable (the message names the setting).
    #[error("{0}")]
    Crl(String),
    #[error("{0}")]
    Enrollment(#[from] enrollment::EnrollmentError),
    #[error("{0}")]
    Embedded(#[from] embedded::EmbeddedError),
    #[error("{0}")]
    TlsAuto(#[from] tls_auto::AutoError),
    #[error("DATASAVER_GRPC_LISTEN: the listening socket has no address: {0}")]
    GrpcAddr(std::io::Error),
    #[error("DATASAVER_HTTP_LISTEN: cannot listen on {addr}: {source}")]
    Http {
        addr: String,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// RFC 3339 in UTC, to the second: how the API shows times.
pub fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn to_proto(b: &BackupRecord) -> datasaver_common::proto::Backup {
    datasaver_common::proto::Backup {
        id: b.id.clone(),
        target: b.target.clone(),
        created_at: repo::record::format_time(b.created_at),
        kind: b.kind.as_str().into(),
        status: b.status.as_str().into(),
        raw_bytes: b.raw_bytes,
        stored_bytes: b.stored_bytes,
        checksum: b.checksum.clone(),
        compression: b.compression.clone(),
        encrypted: b.encrypted,
        tags: b.tags.clone(),
        label: b.label.clone(),
        pinned: b.pinned,
        trigger: b.trigger.as_str().into(),
        finished_at: b.finished_at.map(repo::record::format_time),
        duration_ms: b.duration_ms,
        database: b.database.clone(),
        db_host: b.db_host.clone(),
        server_version: b.server_version.clone(),
        pg_dump_version: b.pg_dump_version.clone(),
        object_key: b.object_key.clone(),
        error: b.error.clone(),
        encryption_recipient: b.encryption_recipient.clone(),
        verified_at: b
            .verification
            .as_ref()
            .map(|v| repo::record::format_time(v.at)),
        verify_result: b.verification.as_ref().map(repo::Verification::result),
        next_backup_at: None,
        agent: b.agent.clone(),
        extensions: b.extensions.clone(),
        system_identifier: b.system_identifier.clone(),
        raw_checksum: b.raw_checksum.clone(),
        roles: b.roles.clone(),
        parts: b.parts.iter().map(part_to_proto).collect(),
        tables: tables_to_proto(&b.row_counts.tables),
        rows_not_counted: b.row_counts.not_counted.clone(),
        drilled_at: b.drill.as_ref().map(|v| repo::record::format_time(v.at)),
        drill_result: b.drill.as_ref().map(repo::Verification::result),
        whole_server: b.is_whole_server(),
        databases_appeared: Vec::new(),
        databases_disappeared: Vec::new(),
    }
}

pub fn tables_to_proto(t: &[repo::TableRows]) -> Vec<datasaver_common::proto::TableRows> {
    t.iter()
        .map(|r| datasaver_common::proto::TableRows {
            schema: r.schema.clone(),
            name: r.name.clone(),
            rows: r.rows,
        })
        .collect()
}

pub fn part_to_proto(p: &repo::PartRecord) -> datasaver_common::proto::BackupPart {
    datasaver_common::proto::BackupPart {
        name: p.name.clone(),
        stored_bytes: p.stored_bytes,
        checksum: p.checksum.clone(),
        raw_bytes: p.raw_bytes,
        raw_checksum: p.raw_checksum.clone(),
        role_passwords: p.role_passwords,
        database: p
            .dump
            .as_ref()
            .map(|d| d.database.clone())
            .unwrap_or_default(),
        extensions: p
            .dump
            .as_ref()
            .map(|d| d.extensions.clone())
            .unwrap_or_default(),
        roles: p.dump.as_ref().map(|d| d.roles.clone()).unwrap_or_default(),
        database_shape: p.dump.as_ref().map(|d| (&d.shape).into()),
        tables: p
            .dump
            .as_ref()
            .map(|d| tables_to_proto(&d.row_counts.tables))
            .unwrap_or_default(),
        rows_not_counted: p
            .dump
            .as_ref()
            .map(|d| d.row_counts.not_counted.clone())
            .unwrap_or_default(),
    }
}

/// Opens storage and the catalog, repairs what an earlier crash left, and
/// serves gRPC on `grpc` until `cancel` fires.
pub async fn run(
    config: Config,
    grpc: TcpListener,
    cancel: CancellationToken,
) -> Result<(), StartError> {
    if let Some(dir) = &config.tls_auto {
        if tls_auto::ensure(dir)? {
            tracing::info!(pki = %dir.display(), "DATASAVER_TLS_AUTO: made a fleet CA, this coordinator's and an admin operator's certificate, and the enrollment CA");
        }
    }
    let mut tls = config.tls.load()?;
    if tls.identity.role != Role::Coordinator {
        return Err(StartError::WrongRole(tls.identity.role.as_str().into()));
    }
    let enroller = match (&config.enrollment, tls.ca_certs.first()) {
        (Some(paths), Some(ca)) => Some(enrollment::Enroller::load(paths, ca, &tls.ca_pem)?),
        _ => None,
    };
    let mut enrolled = revocation::Enrolled::default();
    if let Some(e) = &enroller {
        enrolled.anchor = Some(e.anchor());
        enrolled.crl =
            Some(e.crl().map_err(|err| {
                StartError::Crl(format!("signing the enrollment CA's CRL: {err}"))
            })?);
    }
    // A joining agent finds the CA its token pins in the chain we serve
    // (always: one without an enrollment CA then hears why it is refused).
    if let Some(ca) = tls.ca_certs.first().cloned() {
        if !tls.certs.contains(&ca) {
            tls.certs.push(ca);
        }
    }
    // The client-certificate check, with the CRL when DATASAVER_TLS_CRL is
    // set; `revocation::watch` reloads it when the file changes.
    let revocation =
        revocation::Revocation::start(&tls.ca_certs, config.tls_crl.clone(), enrolled)?;
    let server_tls = datasaver_common::tls::server_config_with(&tls, revocation.verifier.clone())?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    // Before anything touches storage or the catalog: start-up repair below
    // would otherwise fail the running backups of another coordinator on the
    // same directory and remove its temp files. Held until `run` returns.
    let _lock = lock::DataDirLock::acquire(&config.data_dir)?;
    // Targets this coordinator backs up itself: checked, and their
    // identities made, before anything else starts.
    let grpc_addr = grpc.local_addr().map_err(StartError::GrpcAddr)?;
    let embedded_agents = embedded::prepare(
        &config.policies.embedded,
        enroller.as_ref(),
        &config.data_dir,
        grpc_addr,
        &tls,
    )?;
    let storage: Arc<dyn Storage> = match &config.backend {
        Backend::Local {
            path,
            min_free_bytes,
        } => Arc::new(
            storage::local::LocalStorage::open(path.clone())?.with_min_free(*min_free_bytes),
        ),
        Backend::S3(settings) => {
            let s3 = storage::s3::S3Storage::new((**settings).clone())?;
            s3.probe().await.map_err(StartError::Probe)?;
            Arc::new(s3)
        }
    };
    let catalog = Catalog::open(&config.data_dir.join("catalog.db"))?;
    let clock: Arc<dyn clock::Clock> = Arc::new(clock::SystemClock);
    let started = clock.now();
    let repo = Repository::new(catalog.clone(), storage, clock.clone());

    // What a crash or kill left: partial objects, attempts cut off anywhere
    // in object -> meta -> row (adopted if whole and verified, else removed).
    let r = repo
        .reconcile("interrupted: the coordinator stopped while this backup was running")
        .await
        .map_err(StartError::Repo)?;
    if r.removed_partial > 0 {
        tracing::warn!(
            removed = r.removed_partial,
            "removed partial objects left by an interrupted upload"
        );
    }
    if !r.failed.is_empty() {
        tracing::warn!(failed = ?r.failed, removed = ?r.removed, "marked interrupted backups as failed");
    }
    if !r.adopted.is_empty() {
        tracing::warn!(adopted = ?r.adopted, "completed backups whose object and meta file were stored before the coordinator stopped");
    }
    for p in &r.problems {
        tracing::error!(problem = %p, "could not reconcile storage with the catalog");
    }

    let core = Arc::new(Core {
        targets: TargetStore::new(catalog.clone()),
        repo,
        fleet: Fleet::new(clock.clone()),
        cancel: cancel.clone(),
        scheduler: schedule::driver::Scheduler::new(&config.policies),
        policies: config.policies.clone(),
        clock,
        metrics: metrics::Metrics::new(),
        alert_config: config.alerts.clone(),
        alerter: alerts::Alerter::new(alerts::store::AlertStore::new(catalog.clone()), started),
        cleanup: tokio::sync::Mutex::new(()),
        tasks: tokio_util::task::TaskTracker::new(),
        floors_logged: floors::Logged::default(),
        enrollment: enroller.map(|enroller| {
            Arc::new(enrollment::Enrollment {
                enroller,
                tokens: tokens::TokenStore::new(catalog.clone()),
            })
        }),
        wal_index: wal::index::WalIndex::new(catalog.clone()),
        wal_live: wal::live::Live::default(),
    });
    core.alerter.certificates.seen(
        alerts::expiry::Cert::of(alerts::expiry::CertKind::Coordinator, &tls.identity),
        &core.metrics,
    );
    // Losing the backup host must not lose the backups: an empty catalog over
    // a non-empty storage is rebuilt from the meta files before serving.
    if !core.repo.has_backups().await.map_err(StartError::Repo)? {
        match core.repo.rebuild().await {
            Ok(r) if r.imported.is_empty() && r.problems.is_empty() => {}
            Ok(r) => {
                tracing::warn!(
                    imported = r.imported.len(),
                    problems = r.problems.len(),
                    "catalog was empty: rebuilt it from storage"
                );
                for p in &r.problems {
                    tracing::warn!(problem = %p, "not imported during catalog rebuild");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "catalog rebuild from storage failed; run `dsctl catalog rebuild`")
            }
        }
    }
    // Targets without an owner row (a rebuilt or lost catalog) go back to the
    // agent that made their newest backup.
    agents::restore_owners(&core).await;
    // A cleanup killed half-way left rows marked `deleting`: finish them.
    match core.repo.finish_deletions(None).await {
        Ok((done, errors)) => {
            if !done.is_empty() {
                tracing::warn!(
                    finished = done.len(),
                    "finished deletions an interrupted cleanup had started"
                );
            }
            for e in errors {
                tracing::error!(error = %e, "could not finish an interrupted deletion; `dsctl cleanup` retries");
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "could not finish interrupted deletions; `dsctl cleanup` retries")
        }
    }
    let http = TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| StartError::Http {
            addr: config.http_listen.to_string(),
            source,
        })?;
    let http_addr = http.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let sched = tokio::spawn(schedule::driver::run(core.clone()));
    let background = [
        tokio::spawn(api::http::serve(core.clone(), http, config.http)),
        tokio::spawn(alerts::run(core.clone())),
        tokio::spawn(alerts::webhook::run(core.clone())),
        tokio::spawn(schedule::drills::run(core.clone())),
        tokio::spawn(schedule::bases::run(core.clone())),
        tokio::spawn(revocation::watch(revocation.clone(), cancel.clone())),
    ];
    let addr = grpc.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(grpc = %addr, http = %http_addr, storage = %core.repo.describe_storage(), identity = %tls.identity, webhooks = core.alert_config.webhook_urls.len(), "coordinator ready");

    let incoming = listener::incoming(grpc, server_tls, revocation, cancel.clone());
    let _embedded = embedded::spawn(embedded_agents, &cancel);
    let max = datasaver_common::MAX_MESSAGE_SIZE;
    // Who calls is read from the certificate once, by each service's
    // interceptor, and passed down as a typed `api::Caller`.
    let agent_svc = InterceptedService::new(
        AgentServiceServer::new(api::agent::AgentSvc { core: core.clone() })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        api::require(Role::Agent),
    );
    let op_svc = InterceptedService::new(
        OperatorServiceServer::new(api::operator::OperatorSvc { core: core.clone() })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        api::require(Role::Operator),
    );
    // No interceptor: this is what a client without a certificate may call.
    let enroll_svc = core.enrollment.clone().map(|enrollment| {
        EnrollmentServiceServer::new(api::enrollment::EnrollmentSvc {
            enrollment,
            clock: core.clock.clone(),
        })
    });
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .initial_stream_window_size(datasaver_common::H2_STREAM_WINDOW)
        .initial_connection_window_size(datasaver_common::H2_CONNECTION_WINDOW)
        .max_frame_size(datasaver_common::H2_MAX_FRAME)
        .add_service(agent_svc)
        .add_service(op_svc)
        .add_optional_service(enroll_svc)
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await?;
    let _ = sched.await;
    for b in background {
        let _ = b.await;
    }

    // Every job saw the cancel, told its agent to stop and records how it
    // ended; wait for that (within the grace), then fail what did not.
    core.tasks.close();
    if tokio::time::timeout(core.policies.shutdown_grace, core.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace = %datasaver_common::config::format_duration(core.policies.shutdown_grace),
            "jobs still running after DATASAVER_SHUTDOWN_GRACE"
        );
    }
    let failed = core
        .repo
        .fail_all_running("interrupted: the coordinator shut down while this backup was running")
        .await
        .map_err(StartError::Repo)?;
    if !failed.is_empty() {
        tracing::warn!(
            failed = failed.len(),
            "marked backups still running at shutdown as failed"
        );
    }
    tracing::info!("coordinator stopped");
    Ok(())
}
