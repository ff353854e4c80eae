//! Coordinator settings: flags that mirror `DATASAVER_*` variables, checked
//! once at start-up so a bad value stops the process with one line naming it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use datasaver_common::config::{parse_bool, Env, SettingError};
use datasaver_common::tls::TlsPaths;

use crate::policy::Policies;
use crate::storage::s3::{S3Settings, Sse, MAX_PART_SIZE, MIN_PART_SIZE};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "datasaver-coordinator",
    version,
    about = "datasaver coordinator: receives backups from agents, stores them and keeps the catalog",
    long_about = "datasaver coordinator: receives backups from agents over mutual TLS, stores them \
                  (a local directory or an S3-compatible bucket), keeps the SQLite catalog and \
                  serves dsctl.\n\n\
                  Every flag can also be given as the DATASAVER_* variable shown. Secrets \
                  (DATASAVER_S3_SECRET_KEY) are read only from the environment or from a file \
                  named by the *_FILE variable, never from the command line.\n\n\
                  From the environment only (see the README): retention \
                  DATASAVER_KEEP_LAST / _DAILY / _WEEKLY / _MONTHLY, DATASAVER_MAX_AGE_DAYS, \
                  DATASAVER_KEEP_MANUAL_DAYS, DATASAVER_FAILED_GRACE; scheduling \
                  DATASAVER_TIMEZONE, DATASAVER_MAX_CONCURRENT_BACKUPS, DATASAVER_RETRY_ATTEMPTS, \
                  DATASAVER_RETRY_BACKOFF, DATASAVER_AGENT_GRACE; jobs DATASAVER_JOB_TIMEOUT, \
                  DATASAVER_SHUTDOWN_GRACE; alerting DATASAVER_WEBHOOK_URL, \
                  DATASAVER_WEBHOOK_SECRET (both also *_FILE), DATASAVER_ALERT_AFTER or \
                  DATASAVER_ALERT_AFTER_HOURS, DATASAVER_ALERT_CONSECUTIVE_FAILURES, \
                  DATASAVER_ALERT_AGENT_GRACE; OTEL_EXPORTER_OTLP_ENDPOINT for traces; \
                  DATASAVER_LOG for the log level."
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
    /// Storage backend: local or s3.
    #[arg(long, env = "DATASAVER_STORAGE_BACKEND", default_value = "local")]
    pub storage_backend: String,
    /// Root of the local backend (default: DATA_DIR/backups).
    #[arg(long, env = "DATASAVER_STORAGE_PATH")]
    pub storage_path: Option<PathBuf>,
    /// S3: bucket name (must exist).
    #[arg(long, env = "DATASAVER_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// S3: endpoint URL for S3-compatible servers (MinIO, B2, R2, Wasabi); unset = AWS.
    #[arg(long, env = "DATASAVER_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3: region.
    #[arg(long, env = "DATASAVER_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// S3: key prefix under which everything is stored (e.g. "datasaver/").
    #[arg(long, env = "DATASAVER_S3_PREFIX", default_value = "")]
    pub s3_prefix: String,
    /// S3: path-style requests (http://host/bucket/key), needed by MinIO-like servers.
    #[arg(long, env = "DATASAVER_S3_FORCE_PATH_STYLE", default_value = "false")]
    pub s3_force_path_style: String,
    /// S3: multipart part size in MiB (5..=5120).
    #[arg(long, env = "DATASAVER_S3_PART_SIZE_MB", default_value_t = 16)]
    pub s3_part_size_mb: u64,
    /// S3: parts uploaded at the same time per backup (memory ≈ (this + 1) × part size).
    #[arg(long, env = "DATASAVER_S3_PARTS_IN_FLIGHT", default_value_t = 2)]
    pub s3_parts_in_flight: usize,
    /// S3: attempts per request before a transient error (5xx, throttling, network) fails.
    #[arg(long, env = "DATASAVER_S3_MAX_ATTEMPTS", default_value_t = 5)]
    pub s3_max_attempts: u32,
    /// S3: server-side encryption: AES256 or aws:kms.
    #[arg(long, env = "DATASAVER_S3_SSE")]
    pub s3_sse: Option<String>,
    /// S3: KMS key id for DATASAVER_S3_SSE=aws:kms (default: the bucket's AWS-managed key).
    #[arg(long, env = "DATASAVER_S3_SSE_KMS_KEY_ID")]
    pub s3_sse_kms_key_id: Option<String>,
    /// S3: storage class of backup objects (e.g. STANDARD_IA); meta files stay STANDARD.
    #[arg(long, env = "DATASAVER_S3_STORAGE_CLASS")]
    pub s3_storage_class: Option<String>,
    /// S3: extra CA certificate (PEM) to trust for an endpoint with a private CA.
    #[arg(long, env = "DATASAVER_S3_CA_FILE")]
    pub s3_ca_file: Option<PathBuf>,
    /// Fleet CA certificate (PEM).
    #[arg(long, env = "DATASAVER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This coordinator's certificate (PEM).
    #[arg(long, env = "DATASAVER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This coordinator's private key (PEM).
    #[arg(long, env = "DATASAVER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// YAML file with per-target schedules and retention, time zone, limits.
    #[arg(long, env = "DATASAVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "DATASAVER_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

#[derive(Debug, Clone)]
pub enum Backend {
    Local { path: PathBuf },
    S3(Box<S3Settings>),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub backend: Backend,
    pub tls: TlsPaths,
    pub log_json: bool,
    pub policies: Policies,
    pub alerts: crate::alerts::AlertConfig,
}

impl Args {
    /// Checks every setting; secrets come from `env` (`NAME` or `NAME_FILE`).
    pub fn validate(self, env: &Env) -> Result<Config, SettingError> {
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
            "s3" => Backend::S3(Box::new(self.s3_settings(env)?)),
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
        let policies = Policies::load(self.config.as_deref(), env)?;
        let alerts = alert_config(env, &policies)?;
        Ok(Config {
            alerts,
            policies,
            grpc_listen,
            http_listen,
            data_dir: self.data_dir,
            backend,
            tls,
            log_json,
        })
    }
}

impl Args {
    fn s3_settings(&self, env: &Env) -> Result<S3Settings, SettingError> {
        let nonempty = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let bucket = nonempty(&self.s3_bucket).ok_or_else(|| {
            SettingError::new(
                "DATASAVER_S3_BUCKET",
                "required with DATASAVER_STORAGE_BACKEND=s3",
            )
        })?;
        let endpoint = nonempty(&self.s3_endpoint);
        if let Some(e) = &endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(SettingError::new(
                    "DATASAVER_S3_ENDPOINT",
                    format!("{e:?} is not a URL like https://s3.example.com"),
                ));
            }
        }
        let access_key = env.secret("DATASAVER_S3_ACCESS_KEY")?.ok_or_else(|| {
            SettingError::new(
                "DATASAVER_S3_ACCESS_KEY",
                "required with DATASAVER_STORAGE_BACKEND=s3 (or DATASAVER_S3_ACCESS_KEY_FILE)",
            )
        })?;
        let secret_key = env.secret("DATASAVER_S3_SECRET_KEY")?.ok_or_else(|| {
            SettingError::new(
                "DATASAVER_S3_SECRET_KEY",
                "required with DATASAVER_STORAGE_BACKEND=s3 (or DATASAVER_S3_SECRET_KEY_FILE)",
            )
        })?;
        let mut prefix = self.s3_prefix.trim().trim_matches('/').to_string();
        if !prefix.is_empty() {
            if prefix
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
            {
                return Err(SettingError::new(
                    "DATASAVER_S3_PREFIX",
                    format!("{:?} has an empty, . or .. part", self.s3_prefix),
                ));
            }
            prefix.push('/');
        }
        let part_size =
            usize::try_from(self.s3_part_size_mb.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX);
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part_size) {
            return Err(SettingError::new(
                "DATASAVER_S3_PART_SIZE_MB",
                format!(
                    "{} is outside 5..=5120 (S3's limits on a part)",
                    self.s3_part_size_mb
                ),
            ));
        }
        if !(1..=64).contains(&self.s3_parts_in_flight) {
            return Err(SettingError::new(
                "DATASAVER_S3_PARTS_IN_FLIGHT",
                format!("{} is outside 1..=64", self.s3_parts_in_flight),
            ));
        }
        if !(1..=20).contains(&self.s3_max_attempts) {
            return Err(SettingError::new(
                "DATASAVER_S3_MAX_ATTEMPTS",
                format!("{} is outside 1..=20", self.s3_max_attempts),
            ));
        }
        let kms_key = nonempty(&self.s3_sse_kms_key_id);
        let sse = match nonempty(&self.s3_sse).as_deref() {
            None => None,
            Some(v) if v.eq_ignore_ascii_case("AES256") => Some(Sse::Aes256),
            Some(v) if v.eq_ignore_ascii_case("aws:kms") => Some(Sse::Kms {
                key_id: kms_key.clone(),
            }),
            Some(v) => {
                return Err(SettingError::new(
                    "DATASAVER_S3_SSE",
                    format!("{v:?} is not AES256 or aws:kms"),
                ))
            }
        };
        if kms_key.is_some() && !matches!(sse, Some(Sse::Kms { .. })) {
            return Err(SettingError::new(
                "DATASAVER_S3_SSE_KMS_KEY_ID",
                "set only together with DATASAVER_S3_SSE=aws:kms",
            ));
        }
        let storage_class = match nonempty(&self.s3_storage_class) {
            None => None,
            Some(c) => {
                let c = c.to_ascii_uppercase();
                match c.as_str() {
                    "STANDARD" | "STANDARD_IA" | "ONEZONE_IA" | "INTELLIGENT_TIERING"
                    | "REDUCED_REDUNDANCY" | "GLACIER_IR" | "EXPRESS_ONEZONE" => Some(c),
                    "GLACIER" | "DEEP_ARCHIVE" => {
                        return Err(SettingError::new(
                            "DATASAVER_S3_STORAGE_CLASS",
                            format!(
                                "{c} objects cannot be read without a Glacier restore first, so restores and verifies would fail; use GLACIER_IR or a bucket lifecycle rule"
                            ),
                        ))
                    }
                    _ => {
                        return Err(SettingError::new(
                            "DATASAVER_S3_STORAGE_CLASS",
                            format!("{c:?} is not an S3 storage class (e.g. STANDARD, STANDARD_IA, INTELLIGENT_TIERING)"),
                        ))
                    }
                }
            }
        };
        let ca_pem = match &self.s3_ca_file {
            None => None,
            Some(p) => Some(std::fs::read(p).map_err(|e| {
                SettingError::new(
                    "DATASAVER_S3_CA_FILE",
                    format!("cannot read {}: {e}", p.display()),
                )
            })?),
        };
        Ok(S3Settings {
            bucket,
            endpoint: endpoint.map(|e| e.trim_end_matches('/').to_string()),
            region: self.s3_region.trim().to_string(),
            access_key,
            secret_key,
            prefix,
            force_path_style: parse_bool(
                "DATASAVER_S3_FORCE_PATH_STYLE",
                &self.s3_force_path_style,
            )?,
            part_size,
            parts_in_flight: self.s3_parts_in_flight,
            max_attempts: self.s3_max_attempts,
            sse,
            storage_class,
            ca_pem,
        })
    }
}

fn alert_config(
    env: &Env,
    policies: &Policies,
) -> Result<crate::alerts::AlertConfig, SettingError> {
    use datasaver_common::config::parse_duration;
    let to_chrono = |setting: &str, d: std::time::Duration| {
        chrono::Duration::from_std(d).map_err(|_| SettingError::new(setting, "is too long"))
    };
    let webhook_urls: Vec<String> = env
        .secret("DATASAVER_WEBHOOK_URL")?
        .map(|v| {
            v.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    for u in &webhook_urls {
        let ok = (u.starts_with("https://") || u.starts_with("http://"))
            && u.parse::<hyper::Uri>().is_ok_and(|p| p.host().is_some());
        if !ok {
            // The URL itself is not echoed: webhook URLs often embed a token.
            return Err(SettingError::new(
                "DATASAVER_WEBHOOK_URL",
                format!(
                    "{} is not an http(s) URL with a host",
                    crate::alerts::webhook::redact(u)
                ),
            ));
        }
    }
    let secret = env.secret("DATASAVER_WEBHOOK_SECRET")?;
    let alert_after_all =
        match (
            env.get("DATASAVER_ALERT_AFTER"),
            env.get("DATASAVER_ALERT_AFTER_HOURS"),
        ) {
            (Some(_), Some(_)) => return Err(SettingError::new(
                "DATASAVER_ALERT_AFTER",
                "both DATASAVER_ALERT_AFTER and DATASAVER_ALERT_AFTER_HOURS are set; set only one",
            )),
            (Some(v), None) => Some(to_chrono(
                "DATASAVER_ALERT_AFTER",
                parse_duration("DATASAVER_ALERT_AFTER", v)?,
            )?),
            (None, Some(h)) => {
                let hours: f64 = h.trim().parse().map_err(|_| {
                    SettingError::new(
                        "DATASAVER_ALERT_AFTER_HOURS",
                        format!("{h:?} is not a number of hours (e.g. 26 or 1.5)"),
                    )
                })?;
                if !(hours > 0.0 && hours < 24.0 * 3650.0) {
                    return Err(SettingError::new(
                        "DATASAVER_ALERT_AFTER_HOURS",
                        format!("{h} is not a positive number of hours"),
                    ));
                }
                Some(to_chrono(
                    "DATASAVER_ALERT_AFTER_HOURS",
                    std::time::Duration::from_secs_f64(hours * 3600.0),
                )?)
            }
            (None, None) => None,
        };
    let mut rules = crate::alerts::rules::Rules {
        alert_after: alert_after_all,
        ..Default::default()
    };
    if let Some(n) = env.parse_opt::<u32>("DATASAVER_ALERT_CONSECUTIVE_FAILURES")? {
        rules.consecutive_failures = n;
    }
    if let Some(v) = env.get("DATASAVER_ALERT_AGENT_GRACE") {
        rules.agent_grace = to_chrono(
            "DATASAVER_ALERT_AGENT_GRACE",
            parse_duration("DATASAVER_ALERT_AGENT_GRACE", v)?,
        )?;
    }
    let mut alert_after = std::collections::HashMap::new();
    for (name, t) in &policies.targets {
        if let Some(a) = &t.alert_after {
            let setting = format!("DATASAVER_CONFIG: targets.{name}.alert_after");
            alert_after.insert(
                name.clone(),
                to_chrono(&setting, parse_duration(&setting, a)?)?,
            );
        }
    }
    Ok(crate::alerts::AlertConfig {
        webhook_urls,
        secret,
        rules,
        alert_after,
    })
}
