//! `datasaver-coordinator`: parses settings, sets up logging and signals,
//! and hands over to [`datasaver_coordinator::run`].

use clap::Parser;
use datasaver_coordinator::config::Args;
use tokio_util::sync::CancellationToken;

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DATASAVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.with_ansi(false).init();
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = match args.validate(&datasaver_common::config::Env::from_process()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("datasaver-coordinator: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(config.log_json);
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
