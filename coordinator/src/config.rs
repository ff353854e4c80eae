//! Coordinator settings: flags that mirror `DATASAVER_*` variables, checked
//! once at start-up so a bad value stops the process with one line naming it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use datasaver_common::config::SettingError;
use datasaver_common::tls::TlsPaths;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "datasaver-coordinator",
    version,
    about = "datasaver coordinator: receives backups from agents, stores them and keeps the catalog",
    long_about = "datasaver coordinator: receives backups from agents over mutual TLS, stores them \
                  (local directory), keeps the SQLite catalog and serves dsctl.\n\n\
                  Every flag can also be given as the DATASAVER_* variable shown."
)]
pub struct Args {
    /// gRPC address for agents and dsctl.
    #[arg(long, env = "DATASAVER_GRPC_LISTEN", default_value = "0.0.0.0:50051")]
    pub grpc_listen: String,
    /// HTTP address for /health and /metrics.
    #[arg(long, env = "DATASAVER_HTTP_LISTEN", default_value = "0.0.0.0:9090")]
    pub http_listen: String,
    /// Directory for catalog.db and (local backend) backups.
    #[arg(long, env = "DATASAVER_DATA_DIR", default_value = "./datasaver-data")]
    pub data_dir: PathBuf,
    /// Storage backend: local.
    #[arg(long, env = "DATASAVER_STORAGE_BACKEND", default_value = "local")]
    pub storage_backend: String,
    /// Root of the local backend (default: DATA_DIR/backups).
    #[arg(long, env = "DATASAVER_STORAGE_PATH")]
    pub storage_path: Option<PathBuf>,
    /// Fleet CA certificate (PEM).
    #[arg(long, env = "DATASAVER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This coordinator's certificate (PEM).
    #[arg(long, env = "DATASAVER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This coordinator's private key (PEM).
    #[arg(long, env = "DATASAVER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "DATASAVER_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

#[derive(Debug, Clone)]
pub enum Backend {
    Local { path: PathBuf },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub backend: Backend,
    pub tls: TlsPaths,
    pub log_json: bool,
}

impl Args {
    pub fn validate(self) -> Result<Config, SettingError> {
        let addr = |name: &str, v: &str| {
            v.parse::<SocketAddr>().map_err(|_| {
                SettingError::new(name, format!("{v:?} is not an address like 0.0.0.0:50051"))
            })
        };
        let grpc_listen = addr("DATASAVER_GRPC_LISTEN", &self.grpc_listen)?;
        let http_listen = addr("DATASAVER_HTTP_LISTEN", &self.http_listen)?;
        let backend = match self.storage_backend.trim().to_ascii_lowercase().as_str() {
            "local" => Backend::Local {
                path: self
                    .storage_path
                    .clone()
                    .unwrap_or_else(|| self.data_dir.join("backups")),
            },
            "s3" => {
                return Err(SettingError::new(
                    "DATASAVER_STORAGE_BACKEND",
                    "the s3 backend is not available in this build yet; use local",
                ))
            }
            other => {
                return Err(SettingError::new(
                    "DATASAVER_STORAGE_BACKEND",
                    format!("unknown backend {other:?} (expected local or s3)"),
                ))
            }
        };
        let tls = TlsPaths::new(self.tls_ca, self.tls_cert, self.tls_key)?;
        let log_json = match self.log_format.as_str() {
            "text" => false,
            "json" => true,
            other => {
                return Err(SettingError::new(
                    "DATASAVER_LOG_FORMAT",
                    format!("{other:?} is not text or json"),
                ))
            }
        };
        Ok(Config {
            grpc_listen,
            http_listen,
            data_dir: self.data_dir,
            backend,
            tls,
            log_json,
        })
    }
}
