//! `datasaver-coordinator`: parses settings, sets up logging and signals,
//! and hands over to [`datasaver_coordinator::run`].

use clap::Parser;
use datasaver_coordinator::config::Args;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(datasaver_coordinator::config::Command::Healthcheck) = args.command {
        return datasaver_common::probe::healthcheck("datasaver-coordinator", &args.http_listen);
    }
    let config = match args.validate(&datasaver_common::config::Env::from_process()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("datasaver-coordinator: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // Kept until the end of main: flushes exported spans on the way out.
    let (_telemetry, warning) =
        datasaver_common::telemetry::init("datasaver-coordinator", config.log_json);
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    datasaver_common::tls::install_crypto_provider();
    let listener = match tokio::net::TcpListener::bind(config.grpc_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "datasaver-coordinator: DATASAVER_GRPC_LISTEN: cannot listen on {}: {e}",
                config.grpc_listen
            );
            return std::process::ExitCode::from(1);
        }
    };
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested");
        c2.cancel();
    });
    match datasaver_coordinator::run(config, listener, cancel).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("datasaver-coordinator: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
