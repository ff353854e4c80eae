//! `datasaver-agent`: reads `DATASAVER_*` settings, reports every problem
//! with them at once, then runs [`datasaver_agent::run`] until SIGTERM.

use clap::Parser;
use datasaver_common::config::Env;
use tokio_util::sync::CancellationToken;

/// datasaver agent: runs beside one PostgreSQL database, dumps it with
/// pg_dump and streams the backup to the coordinator over mutual TLS.
///
/// All settings come from the environment (every secret also as NAME_FILE):
///   DATASAVER_COORDINATOR_URL   https://backup-host:50051
///   DATASAVER_TARGET            this database's fleet-unique name, e.g. acme-main
///   DATASAVER_DATABASE_URL      postgres://user:password@host:5432/dbname
///     or DATASAVER_DB_HOST / _PORT / _NAME / _USER / _PASSWORD
///   DATASAVER_TLS_CA / _CERT / _KEY   fleet CA and this agent's certificate (dsctl certs issue)
///   DATASAVER_COMPRESSION       zstd (default), gzip or none; DATASAVER_COMPRESSION_LEVEL
///   DATASAVER_COMPRESSION_THREADS  zstd worker threads (default: CPUs, at most 4; 0 = none)
///   DATASAVER_PG_BIN_DIR        where pg_dump, pg_dumpall, pg_restore and psql are (default: PATH)
///   DATASAVER_SCHEDULE, DATASAVER_KEEP_*  schedule and retention this agent asks for
///   DATASAVER_DRILL_SCHEDULE    when to run restore drills (cron), as this agent asks
///   DATASAVER_WAL               stream: send the server's WAL continuously (point-in-time
///                               restores; needs a role with REPLICATION); off (default)
///   DATASAVER_WAL_SLOT          the physical replication slot (default datasaver)
///   DATASAVER_WAL_SYNC_INTERVAL how often the segment in progress is stored (default 10s)
///   DATASAVER_BASE_SCHEDULE     when to take base backups (cron), as this agent asks; needs
///                               DATASAVER_WAL=stream
///   DATASAVER_DATABASES         a whole server: all, or names/patterns (shop_*,crm); every
///                               matching database (no templates), found at each backup, in
///                               one backup; unset: only the database of the settings above
///   DATASAVER_EXCLUDE_DATABASES names/patterns a whole server leaves out (postgres,scratch_*)
///   DATASAVER_LOCK_WAIT_TIMEOUT how long pg_dump waits for a table's lock (default 10m)
///                               before the backup fails naming the table
///   DATASAVER_DRILL_DATABASE_URL  a server for restore drills (postgres://...; default: the
///                               target's own server): scratch databases are made there
///   DATASAVER_HTTP_LISTEN       serve GET /health here (e.g. 127.0.0.1:9091): 200 when
///                               connected to the coordinator and the database answers
///   DATASAVER_SHUTDOWN_GRACE    how long SIGTERM may take (default 10s): the running backup
///                               is interrupted (retried once the agent is back), the
///                               coordinator told, then the agent exits
///   DATASAVER_LOG_FORMAT        text (default) or json; DATASAVER_LOG sets the level
///   OTEL_EXPORTER_OTLP_ENDPOINT export traces over OTLP/gRPC (e.g. http://collector:4317)
#[derive(Parser)]
#[command(name = "datasaver-agent", version, verbatim_doc_comment)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Exit 0 when the running agent's GET /live (on DATASAVER_HTTP_LISTEN)
    /// answers 200: it serves and its database answers. For an image's
    /// HEALTHCHECK or a liveness probe.
    Healthcheck,
}

/// `datasaver-agent healthcheck`.
fn healthcheck() -> std::process::ExitCode {
    let Ok(listen) = std::env::var("DATASAVER_HTTP_LISTEN") else {
        eprintln!("datasaver-agent healthcheck: DATASAVER_HTTP_LISTEN is not set, so the agent serves no /live to ask");
        return std::process::ExitCode::from(2);
    };
    datasaver_common::probe::healthcheck("datasaver-agent", &listen)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    if let Some(Cmd::Healthcheck) = Args::parse().command {
        return healthcheck();
    }
    let config = match datasaver_agent::config::from_env(&Env::from_process()) {
        Ok(c) => c,
        Err(errs) => {
            for e in errs {
                eprintln!("datasaver-agent: {e}");
            }
            return std::process::ExitCode::from(2);
        }
    };
    // Kept until the end of main: flushes exported spans on the way out.
    let (_telemetry, warning) =
        datasaver_common::telemetry::init("datasaver-agent", config.log_json);
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    datasaver_common::tls::install_crypto_provider();
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        } else {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown requested");
        c2.cancel();
    });
    // A stop never takes longer than the grace: whatever is still running
    // then is abandoned (the coordinator sees the connection drop).
    let grace = config.shutdown_grace;
    let deadline = async {
        cancel.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = datasaver_agent::run(config, cancel.clone()) => match r {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("datasaver-agent: {e}");
                std::process::ExitCode::from(1)
            }
        },
        _ = deadline => {
            tracing::warn!(grace = ?grace, "DATASAVER_SHUTDOWN_GRACE passed before the agent finished stopping; exiting now");
            std::process::ExitCode::from(1)
        }
    }
}
