//! Coordinator settings: flags that mirror `DATASAVER_*` variables, checked
//! once at start-up so a bad value stops the process with one line naming it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use datasaver_common::config::{parse_bool, parse_size, Env, SettingError};
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
                  DATASAVER_TRANSFER_IDLE_TIMEOUT, DATASAVER_MAX_TARGETS_PER_AGENT, \
                  DATASAVER_SHUTDOWN_GRACE; local storage DATASAVER_MIN_FREE_BYTES; alerting DATASAVER_WEBHOOK_URL, \
                  DATASAVER_WEBHOOK_SECRET (both also *_FILE), DATASAVER_ALERT_AFTER or \
                  DATASAVER_ALERT_AFTER_HOURS, DATASAVER_ALERT_CONSECUTIVE_FAILURES, \
                  DATASAVER_ALERT_AGENT_GRACE, DATASAVER_ALERT_WAL_LAG, DATASAVER_DRILL_MAX_AGE; OTEL_EXPORTER_OTLP_ENDPOINT for traces; \
                  DATASAVER_LOG for the log level."
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// gRPC address for agents and dsctl.
    #[arg(long, env = "DATASAVER_GRPC_LISTEN", default_value = "0.0.0.0:50051")]
    pub grpc_listen: String,
    /// HTTP address for /health, /live and /metrics.
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
    /// Certificate revocation list (PEM) of the fleet CA, e.g. crl.pem from
    /// `dsctl certs init`/`revoke`; reloaded when it changes.
    #[arg(long, env = "DATASAVER_TLS_CRL")]
    pub tls_crl: Option<PathBuf>,
    /// Standalone: with no DATASAVER_TLS_* files, create a fleet CA, the
    /// coordinator's and an admin operator's certificate and the enrollment
    /// CA in <data dir>/pki/ at the first start (dsctl inside the container
    /// finds them through DATASAVER_DATA_DIR).
    #[arg(long, env = "DATASAVER_TLS_AUTO", default_value = "false")]
    pub tls_auto: String,
    /// The enrollment CA's certificate (PEM, `dsctl certs init --enrollment`):
    /// with its key, agents join with tokens from `dsctl tokens create`.
    #[arg(long, env = "DATASAVER_ENROLLMENT_CA_CERT")]
    pub enrollment_ca_cert: Option<PathBuf>,
    /// The enrollment CA's private key (PEM).
    #[arg(long, env = "DATASAVER_ENROLLMENT_CA_KEY")]
    pub enrollment_ca_key: Option<PathBuf>,
    /// Validity of a joined agent's certificate, in days; the agent renews
    /// it when half of that has passed (before `certificate.expiring`'s
    /// 30 days).
    #[arg(long, env = "DATASAVER_ENROLLMENT_CERT_DAYS", default_value_t = 90)]
    pub enrollment_cert_days: i64,
    /// YAML file with per-target schedules and retention, time zone, limits.
    #[arg(long, env = "DATASAVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "DATASAVER_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

#[derive(Debug, Clone)]
pub enum Backend {
    Local {
        path: PathBuf,
        /// A backup fails when the filesystem's free space drops under this
        /// (`DATASAVER_MIN_FREE_BYTES`); 0 = no check.
        min_free_bytes: u64,
    },
    S3(Box<S3Settings>),
}

/// What the binary does instead of serving.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Exit 0 when the running coordinator's GET /live (on
    /// DATASAVER_HTTP_LISTEN) answers 200: it serves, and its catalog and
    /// storage answer. For an image's HEALTHCHECK or a liveness probe.
    Healthcheck,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub backend: Backend,
    pub tls: TlsPaths,
    /// `DATASAVER_TLS_CRL`, checked when the TLS material is loaded
    pub tls_crl: Option<PathBuf>,
    /// `DATASAVER_ENROLLMENT_CA_*`: join tokens are accepted
    pub enrollment: Option<EnrollmentPaths>,
    /// `DATASAVER_TLS_AUTO`: the directory to create the TLS files in when
    /// they do not exist yet
    pub tls_auto: Option<PathBuf>,
    pub log_json: bool,
    pub policies: Policies,
    pub alerts: crate::alerts::AlertConfig,
    /// Limits of the plain-HTTP server (`/health`, `/metrics`).
    pub http: HttpLimits,
}

/// The enrollment CA's files and what it issues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// validity of an issued certificate
    pub validity: std::time::Duration,
}

/// `DATASAVER_TARGET` and `DATASAVER_DATABASE_URL` on the coordinator: one
/// more target it backs up itself (the standalone setup), as if the YAML
/// file named it with `database_url`.
fn add_env_target(policies: &mut Policies, env: &Env) -> Result<(), SettingError> {
    let url = env.secret("DATASAVER_DATABASE_URL")?;
    let Some(target) = env.get("DATASAVER_TARGET") else {
        if url.is_some() {
            return Err(SettingError::new(
                "DATASAVER_TARGET",
                "not set, but DATASAVER_DATABASE_URL is: name the target the coordinator backs up itself",
            ));
        }
        return Ok(());
    };
    datasaver_common::names::validate_target(target)
        .map_err(|e| SettingError::new("DATASAVER_TARGET", e.to_string()))?;
    let url = url.ok_or_else(|| {
        SettingError::new(
            "DATASAVER_DATABASE_URL",
            format!("not set, but DATASAVER_TARGET is: the database the coordinator backs up as {target} (also as DATASAVER_DATABASE_URL_FILE)"),
        )
    })?;
    if policies.embedded.contains_key(target) {
        return Err(SettingError::new(
            "DATASAVER_TARGET",
            format!("{target} already has a database_url in DATASAVER_CONFIG"),
        ));
    }
    policies
        .embedded
        .insert(target.to_string(), crate::policy::SecretText(url));
    Ok(())
}

/// The default of `DATASAVER_MIN_FREE_BYTES`: room for the catalog, logs and
/// the system, whatever the backups take.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 1 << 30;

/// What one client may take of the unauthenticated HTTP server: it must send
/// its request headers within `header_timeout`, and at most
/// `max_connections` connections are served at once (more wait in the
/// listen backlog).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub header_timeout: std::time::Duration,
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: std::time::Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

impl HttpLimits {
    /// The defaults; `DATASAVER_HTTP_HEADER_TIMEOUT` (undocumented, for
    /// tests) shortens the header timeout.
    fn from_env(env: &Env) -> Result<HttpLimits, SettingError> {
        let mut l = HttpLimits::default();
        if let Some(v) = env.get("DATASAVER_HTTP_HEADER_TIMEOUT") {
            let d = datasaver_common::config::parse_duration("DATASAVER_HTTP_HEADER_TIMEOUT", v)?;
            if d.is_zero() {
                return Err(SettingError::new(
                    "DATASAVER_HTTP_HEADER_TIMEOUT",
                    "must be longer than 0",
                ));
            }
            l.header_timeout = d;
        }
        Ok(l)
    }
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
                min_free_bytes: match env.get("DATASAVER_MIN_FREE_BYTES") {
                    None => DEFAULT_MIN_FREE_BYTES,
                    Some(v) => parse_size("DATASAVER_MIN_FREE_BYTES", v)?,
                },
            },
            "s3" => Backend::S3(Box::new(self.s3_settings(env)?)),
            other => {
                return Err(SettingError::new(
                    "DATASAVER_STORAGE_BACKEND",
                    format!("unknown backend {other:?} (expected local or s3)"),
                ))
            }
        };
        let tls_auto = match self.tls_auto.trim().to_ascii_lowercase().as_str() {
            "" | "false" | "0" | "no" => None,
            "true" | "1" | "yes" => Some(self.data_dir.join("pki")),
            other => {
                return Err(SettingError::new(
                    "DATASAVER_TLS_AUTO",
                    format!("{other:?} is not true or false"),
                ))
            }
        };
        let unset = |p: &Option<PathBuf>| p.as_ref().is_none_or(|p| p.as_os_str().is_empty());
        let (tls_ca, tls_cert, tls_key, mut enrollment_ca_cert, mut enrollment_ca_key) =
            match &tls_auto {
                Some(dir) if unset(&self.tls_ca) && unset(&self.tls_cert) && unset(&self.tls_key) => (
                    Some(dir.join("ca.crt")),
                    Some(dir.join("coordinator.crt")),
                    Some(dir.join("coordinator.key")),
                    Some(dir.join("enrollment-ca.crt")),
                    Some(dir.join("enrollment-ca.key")),
                ),
                Some(_) => {
                    return Err(SettingError::new(
                        "DATASAVER_TLS_AUTO",
                        "set together with DATASAVER_TLS_CA/_CERT/_KEY: use your own certificate files or let the coordinator make them, not both",
                    ))
                }
                None => (self.tls_ca, self.tls_cert, self.tls_key, None, None),
            };
        if enrollment_ca_cert.is_none() {
            enrollment_ca_cert = self.enrollment_ca_cert;
            enrollment_ca_key = self.enrollment_ca_key;
        }
        let tls = TlsPaths::new(tls_ca, tls_cert, tls_key)?;
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
        let http = HttpLimits::from_env(env)?;
        let set = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        let enrollment = match (set(enrollment_ca_cert), set(enrollment_ca_key)) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                if !(1..=3650).contains(&self.enrollment_cert_days) {
                    return Err(SettingError::new(
                        "DATASAVER_ENROLLMENT_CERT_DAYS",
                        format!("{} is not between 1 and 3650", self.enrollment_cert_days),
                    ));
                }
                // DATASAVER_ENROLLMENT_CERT_TTL (undocumented, for tests):
                // certificates short enough to be renewed at once.
                let validity = match env.get("DATASAVER_ENROLLMENT_CERT_TTL") {
                    Some(v) => datasaver_common::config::parse_duration(
                        "DATASAVER_ENROLLMENT_CERT_TTL",
                        v,
                    )?,
                    None => std::time::Duration::from_secs(
                        self.enrollment_cert_days as u64 * 86_400,
                    ),
                };
                Some(EnrollmentPaths {
                    cert,
                    key,
                    validity,
                })
            }
            (Some(_), None) => {
                return Err(SettingError::new(
                    "DATASAVER_ENROLLMENT_CA_KEY",
                    "not set, but DATASAVER_ENROLLMENT_CA_CERT is: give both (enrollment-ca.key from `dsctl certs init --enrollment`)",
                ))
            }
            (None, Some(_)) => {
                return Err(SettingError::new(
                    "DATASAVER_ENROLLMENT_CA_CERT",
                    "not set, but DATASAVER_ENROLLMENT_CA_KEY is: give both (enrollment-ca.crt from `dsctl certs init --enrollment`)",
                ))
            }
        };
        let mut policies = policies;
        add_env_target(&mut policies, env)?;
        Ok(Config {
            tls_auto,
            enrollment,
            http,
            alerts,
            policies,
            grpc_listen,
            http_listen,
            data_dir: self.data_dir,
            backend,
            tls,
            tls_crl: self.tls_crl.filter(|p| !p.as_os_str().is_empty()),
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
    if let Some(v) = env.get("DATASAVER_ALERT_WAL_LAG") {
        rules.wal_lag = to_chrono(
            "DATASAVER_ALERT_WAL_LAG",
            parse_duration("DATASAVER_ALERT_WAL_LAG", v)?,
        )?;
    }
    if let Some(v) = env.get("DATASAVER_DRILL_MAX_AGE") {
        rules.drill_max_age = to_chrono(
            "DATASAVER_DRILL_MAX_AGE",
            parse_duration("DATASAVER_DRILL_MAX_AGE", v)?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::gfs;
    use crate::schedule::planner::RetryPolicy;
    use std::time::Duration;

    const TLS: [&str; 6] = [
        "--tls-ca",
        "/pki/ca.pem",
        "--tls-cert",
        "/pki/coordinator.pem",
        "--tls-key",
        "/pki/coordinator.key",
    ];

    /// Parsed the way `main` parses, so the defaults are clap's real ones
    /// (no DATASAVER_* variable is set in the test process).
    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["datasaver-coordinator"];
        v.extend_from_slice(&TLS);
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_pairs(pairs)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn s3(c: &Config) -> &S3Settings {
        match &c.backend {
            Backend::S3(s) => s,
            other => panic!("expected the S3 backend, got {other:?}"),
        }
    }

    #[test]
    fn the_enrollment_ca_needs_both_files() {
        let none = args(&[]).validate(&env(&[])).unwrap();
        assert_eq!(none.enrollment, None);
        let both = args(&[
            "--enrollment-ca-cert",
            "/pki/e.crt",
            "--enrollment-ca-key",
            "/pki/e.key",
        ])
        .validate(&env(&[]))
        .unwrap();
        assert_eq!(
            both.enrollment,
            Some(EnrollmentPaths {
                cert: "/pki/e.crt".into(),
                key: "/pki/e.key".into(),
                validity: Duration::from_secs(90 * 86_400),
            })
        );
        let e = args(&["--enrollment-ca-cert", "/pki/e.crt"])
            .validate(&env(&[]))
            .unwrap_err();
        assert_eq!(e.setting, "DATASAVER_ENROLLMENT_CA_KEY");
        let e = args(&["--enrollment-ca-key", "/pki/e.key"])
            .validate(&env(&[]))
            .unwrap_err();
        assert_eq!(e.setting, "DATASAVER_ENROLLMENT_CA_CERT");
        let e = args(&[
            "--enrollment-ca-cert",
            "/pki/e.crt",
            "--enrollment-ca-key",
            "/pki/e.key",
            "--enrollment-cert-days",
            "0",
        ])
        .validate(&env(&[]))
        .unwrap_err();
        assert_eq!(e.setting, "DATASAVER_ENROLLMENT_CERT_DAYS");
    }

    const S3_ARGS: [&str; 4] = ["--storage-backend", "s3", "--s3-bucket", "backups-eu"];
    const ACCESS: &str = "AKIAEXAMPLEACCESS7Q";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY";

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = args(&[]).validate(&env(&[])).unwrap();
        assert_eq!(c.grpc_listen, addr("0.0.0.0:50051"));
        assert_eq!(c.http_listen, addr("0.0.0.0:9090"));
        assert_eq!(c.data_dir, PathBuf::from("./datasaver-data"));
        match &c.backend {
            Backend::Local {
                path,
                min_free_bytes,
            } => {
                assert_eq!(path, &PathBuf::from("./datasaver-data/backups"));
                assert_eq!(*min_free_bytes, 1 << 30);
            }
            other => panic!("expected the local backend, got {other:?}"),
        }
        assert_eq!(c.http.header_timeout, Duration::from_secs(10));
        assert_eq!(c.http.max_connections, 64);
        assert_eq!(c.tls.ca, PathBuf::from("/pki/ca.pem"));
        assert_eq!(c.tls.cert, PathBuf::from("/pki/coordinator.pem"));
        assert_eq!(c.tls.key, PathBuf::from("/pki/coordinator.key"));
        assert!(!c.log_json);

        let p = &c.policies;
        assert_eq!(p.tz, chrono_tz::Tz::UTC);
        assert_eq!(p.max_concurrent, 4);
        assert_eq!(
            p.retry,
            RetryPolicy {
                attempts: 3,
                first_backoff: chrono::Duration::seconds(60),
                max_backoff: chrono::Duration::minutes(30),
            }
        );
        assert_eq!(p.job_timeout, Duration::from_secs(12 * 3600));
        assert_eq!(p.shutdown_grace, Duration::from_secs(10));
        assert_eq!(p.agent_grace, Duration::from_secs(30));
        assert_eq!(p.defaults, crate::policy::RetentionSpec::default());
        assert!(p.targets.is_empty());
        assert_eq!(
            p.retention_for("acme", None),
            gfs::Policy {
                keep_last: 0,
                keep_daily: 7,
                keep_weekly: 4,
                keep_monthly: 6,
                max_age_days: None,
                manual_keep_days: None,
                failed_grace: chrono::Duration::days(7),
            }
        );
        assert_eq!(p.schedule_for("acme", None), Ok(None));

        assert!(c.alerts.webhook_urls.is_empty());
        assert_eq!(c.alerts.secret, None);
        assert_eq!(c.alerts.rules.alert_after, None);
        assert!(c.alerts.alert_after.is_empty());
    }

    #[test]
    fn flags_and_environment_reach_the_config() {
        let c = args(&[
            "--grpc-listen",
            "127.0.0.1:7000",
            "--http-listen",
            "[::1]:7001",
            "--data-dir",
            "/var/lib/datasaver",
            "--log-format",
            "json",
        ])
        .validate(&env(&[
            ("DATASAVER_TIMEZONE", "America/New_York"),
            ("DATASAVER_MAX_CONCURRENT_BACKUPS", "2"),
            ("DATASAVER_RETRY_ATTEMPTS", "1"),
            ("DATASAVER_RETRY_BACKOFF", "5m"),
            ("DATASAVER_JOB_TIMEOUT", "90m"),
            ("DATASAVER_SHUTDOWN_GRACE", "1m"),
            ("DATASAVER_AGENT_GRACE", "2m"),
            ("DATASAVER_KEEP_LAST", "2"),
            ("DATASAVER_KEEP_DAILY", "3"),
            ("DATASAVER_KEEP_WEEKLY", "0"),
            ("DATASAVER_KEEP_MONTHLY", "12"),
            ("DATASAVER_MAX_AGE_DAYS", "400"),
            ("DATASAVER_KEEP_MANUAL_DAYS", "30"),
            ("DATASAVER_FAILED_GRACE", "36h"),
        ]))
        .unwrap();
        assert_eq!(c.grpc_listen, addr("127.0.0.1:7000"));
        assert_eq!(c.http_listen, addr("[::1]:7001"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/datasaver"));
        match &c.backend {
            // the local backend follows the data directory
            Backend::Local { path, .. } => {
                assert_eq!(path, &PathBuf::from("/var/lib/datasaver/backups"))
            }
            other => panic!("expected the local backend, got {other:?}"),
        }
        assert!(c.log_json);
        let p = &c.policies;
        assert_eq!(p.tz, chrono_tz::America::New_York);
        assert_eq!(p.max_concurrent, 2);
        assert_eq!(p.retry.attempts, 1);
        assert_eq!(p.retry.first_backoff, chrono::Duration::minutes(5));
        assert_eq!(p.job_timeout, Duration::from_secs(90 * 60));
        assert_eq!(p.shutdown_grace, Duration::from_secs(60));
        assert_eq!(p.agent_grace, Duration::from_secs(120));
        assert_eq!(
            p.retention_for("acme", None),
            gfs::Policy {
                keep_last: 2,
                keep_daily: 3,
                keep_weekly: 0,
                keep_monthly: 12,
                max_age_days: Some(400),
                manual_keep_days: Some(30),
                failed_grace: chrono::Duration::hours(36),
            }
        );

        let c = args(&["--storage-path", "/mnt/backups"])
            .validate(&env(&[]))
            .unwrap();
        match &c.backend {
            Backend::Local { path, .. } => assert_eq!(path, &PathBuf::from("/mnt/backups")),
            other => panic!("expected the local backend, got {other:?}"),
        }
        for (v, want) in [("500MiB", 500u64 << 20), ("0", 0), ("2000000", 2_000_000)] {
            let c = args(&[])
                .validate(&env(&[("DATASAVER_MIN_FREE_BYTES", v)]))
                .unwrap();
            match &c.backend {
                Backend::Local { min_free_bytes, .. } => assert_eq!(*min_free_bytes, want, "{v}"),
                other => panic!("expected the local backend, got {other:?}"),
            }
        }
        // the backend's name is read case-insensitively
        let c = args(&["--storage-backend", " LOCAL "])
            .validate(&env(&[]))
            .unwrap();
        assert!(matches!(c.backend, Backend::Local { .. }));
    }

    #[test]
    fn each_bad_value_names_its_setting() {
        let dir = tempfile::tempdir().unwrap();
        // (flags, environment, the setting the error names)
        type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
        let cases: Vec<Case> = vec![
            (
                vec![],
                vec![("DATASAVER_MAX_CONCURRENT_BACKUPS", "0")],
                "DATASAVER_MAX_CONCURRENT_BACKUPS",
            ),
            (
                vec![],
                vec![("DATASAVER_MAX_CONCURRENT_BACKUPS", "many")],
                "DATASAVER_MAX_CONCURRENT_BACKUPS",
            ),
            (
                vec![],
                vec![("DATASAVER_RETRY_ATTEMPTS", "0")],
                "DATASAVER_RETRY_ATTEMPTS",
            ),
            (
                vec![],
                vec![("DATASAVER_RETRY_ATTEMPTS", "-2")],
                "DATASAVER_RETRY_ATTEMPTS",
            ),
            (
                vec![],
                vec![("DATASAVER_RETRY_BACKOFF", "soon")],
                "DATASAVER_RETRY_BACKOFF",
            ),
            (
                vec![],
                vec![("DATASAVER_JOB_TIMEOUT", "0s")],
                "DATASAVER_JOB_TIMEOUT",
            ),
            (
                vec![],
                vec![("DATASAVER_JOB_TIMEOUT", "abc")],
                "DATASAVER_JOB_TIMEOUT",
            ),
            (
                vec![],
                vec![("DATASAVER_SHUTDOWN_GRACE", "later")],
                "DATASAVER_SHUTDOWN_GRACE",
            ),
            (
                vec![],
                vec![("DATASAVER_AGENT_GRACE", "30")],
                "DATASAVER_AGENT_GRACE",
            ),
            (
                vec![],
                vec![("DATASAVER_TIMEZONE", "Mars/Base")],
                "DATASAVER_TIMEZONE",
            ),
            (
                vec![],
                vec![("DATASAVER_FAILED_GRACE", "x")],
                "DATASAVER_FAILED_GRACE",
            ),
            (
                vec![],
                vec![("DATASAVER_KEEP_DAILY", "-1")],
                "DATASAVER_KEEP_DAILY",
            ),
            (
                vec![],
                vec![("DATASAVER_MAX_AGE_DAYS", "ninety")],
                "DATASAVER_MAX_AGE_DAYS",
            ),
            (
                vec!["--storage-backend", "ftp"],
                vec![],
                "DATASAVER_STORAGE_BACKEND",
            ),
            (
                vec![],
                vec![("DATASAVER_MIN_FREE_BYTES", "lots")],
                "DATASAVER_MIN_FREE_BYTES",
            ),
            (
                vec![],
                vec![("DATASAVER_MIN_FREE_BYTES", "-1GiB")],
                "DATASAVER_MIN_FREE_BYTES",
            ),
            (
                vec![],
                vec![("DATASAVER_HTTP_HEADER_TIMEOUT", "0s")],
                "DATASAVER_HTTP_HEADER_TIMEOUT",
            ),
            (
                vec!["--grpc-listen", "localhost"],
                vec![],
                "DATASAVER_GRPC_LISTEN",
            ),
            (
                vec!["--http-listen", "0.0.0.0:http"],
                vec![],
                "DATASAVER_HTTP_LISTEN",
            ),
            (vec!["--log-format", "xml"], vec![], "DATASAVER_LOG_FORMAT"),
            (
                vec!["--storage-backend", "s3"],
                vec![
                    ("DATASAVER_S3_ACCESS_KEY", ACCESS),
                    ("DATASAVER_S3_SECRET_KEY", SECRET),
                ],
                "DATASAVER_S3_BUCKET",
            ),
            (
                vec!["--storage-backend", "s3", "--s3-bucket", "  "],
                vec![
                    ("DATASAVER_S3_ACCESS_KEY", ACCESS),
                    ("DATASAVER_S3_SECRET_KEY", SECRET),
                ],
                "DATASAVER_S3_BUCKET",
            ),
            (S3_ARGS.to_vec(), vec![], "DATASAVER_S3_ACCESS_KEY"),
            (
                S3_ARGS.to_vec(),
                vec![("DATASAVER_S3_ACCESS_KEY", ACCESS)],
                "DATASAVER_S3_SECRET_KEY",
            ),
            (
                S3_ARGS.to_vec(),
                vec![
                    ("DATASAVER_S3_ACCESS_KEY", ACCESS),
                    ("DATASAVER_S3_SECRET_KEY_FILE", "/nonexistent/secret"),
                ],
                "DATASAVER_S3_SECRET_KEY_FILE",
            ),
            (
                [&S3_ARGS[..], &["--s3-endpoint", "minio:9000"]].concat(),
                vec![
                    ("DATASAVER_S3_ACCESS_KEY", ACCESS),
                    ("DATASAVER_S3_SECRET_KEY", SECRET),
                ],
                "DATASAVER_S3_ENDPOINT",
            ),
            (
                [&S3_ARGS[..], &["--s3-prefix", "a//b"]].concat(),
                vec![
                    ("DATASAVER_S3_ACCESS_KEY", ACCESS),
                    ("DATASAVER_S3_SECRET_KEY", SECRET),
                ],
                "DATASAVER_S3_PREFIX",
            ),
            (
                [&S3_ARGS[..], &["--s3-part-size-mb", "4"]].concat(),
                vec![
                    ("DATASAVER_S3_ACCESS_KEY", ACCESS),
                    ("DATASAVER_S3_SECRET_KEY", SECRET),
                ],
                "DATASAVER_S3_PART_SIZE_MB",
            ),
            (
                [&S3_ARGS[..], &["--s3-parts-in-flight", "0"]].concat(),
                vec![
                    ("DATASAVER_S3_ACCESS_KEY", ACCESS),
                    ("DATASAVER_S3_SECRET_KEY", SECRET),
                ],
                "DATASAVER_S3_PARTS_IN_FLIGHT",
            ),
            (
                [&S3_ARGS[..], &["--s3-max-attempts", "21"]].concat(),
                vec![
                    ("DATASAVER_S3_ACCESS_KEY", ACCESS),
                    ("DATASAVER_S3_SECRET_KEY", SECRET),
                ],
                "DATASAVER_S3_MAX_ATTEMPTS",
            ),
            (
                [&S3_ARGS[..], &["--s3-sse", "rot13"]].concat(),
                vec![
                    ("DATASAVER_S3_ACCESS_KEY", ACCESS),
                    ("DATASAVER_S3_SECRET_KEY", SECRET),
                ],
                "DATASAVER_S3_SSE",
            ),
            (
                [&S3_ARGS[..], &["--s3-sse-kms-key-id", "alias/backups"]].concat(),
                vec![
                    ("DATASAVER_S3_ACCESS_KEY", ACCESS),
                    ("DATASAVER_S3_SECRET_KEY", SECRET),
                ],
                "DATASAVER_S3_SSE_KMS_KEY_ID",
            ),
            (
                [&S3_ARGS[..], &["--s3-storage-class", "deep_archive"]].concat(),
                vec![
                    ("DATASAVER_S3_ACCESS_KEY", ACCESS),
                    ("DATASAVER_S3_SECRET_KEY", SECRET),
                ],
                "DATASAVER_S3_STORAGE_CLASS",
            ),
            (
                [&S3_ARGS[..], &["--s3-force-path-style", "maybe"]].concat(),
                vec![
                    ("DATASAVER_S3_ACCESS_KEY", ACCESS),
                    ("DATASAVER_S3_SECRET_KEY", SECRET),
                ],
                "DATASAVER_S3_FORCE_PATH_STYLE",
            ),
            (
                vec![],
                vec![
                    ("DATASAVER_ALERT_AFTER", "26h"),
                    ("DATASAVER_ALERT_AFTER_HOURS", "26"),
                ],
                "DATASAVER_ALERT_AFTER",
            ),
            (
                vec![],
                vec![("DATASAVER_ALERT_AFTER_HOURS", "0")],
                "DATASAVER_ALERT_AFTER_HOURS",
            ),
            (
                vec![],
                vec![("DATASAVER_WEBHOOK_URL", "hooks.example.com/x")],
                "DATASAVER_WEBHOOK_URL",
            ),
        ];
        for (flags, vars, setting) in cases {
            let e = args(&flags).validate(&env(&vars)).unwrap_err();
            assert_eq!(e.setting, setting, "{flags:?} {vars:?}: {e}");
            assert!(
                e.to_string().starts_with(&format!("{setting}: ")),
                "{flags:?} {vars:?}: {e}"
            );
        }

        // the YAML file's errors name DATASAVER_CONFIG
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "targets:\n  acme:\n    alert_after: soonish\n").unwrap();
        let e = args(&["--config", f.to_str().unwrap()])
            .validate(&env(&[]))
            .unwrap_err();
        assert_eq!(e.setting, "DATASAVER_CONFIG: targets.acme.alert_after");

        // without TLS the coordinator does not start
        let e = Args::try_parse_from(["datasaver-coordinator"])
            .unwrap()
            .validate(&env(&[]))
            .unwrap_err();
        assert_eq!(e.setting, "DATASAVER_TLS_CA");
    }

    #[test]
    fn s3_settings_with_secrets_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let ak = dir.path().join("access");
        let sk = dir.path().join("secret");
        std::fs::write(&ak, format!("{ACCESS}\n")).unwrap();
        std::fs::write(&sk, format!("{SECRET}\r\n")).unwrap();
        let flags = [
            &S3_ARGS[..],
            &[
                "--s3-endpoint",
                "http://minio:9000/",
                "--s3-region",
                " eu-central-1 ",
                "--s3-prefix",
                "/datasaver/prod/",
                "--s3-force-path-style",
                "yes",
                "--s3-part-size-mb",
                "8",
                "--s3-parts-in-flight",
                "3",
                "--s3-max-attempts",
                "7",
                "--s3-sse",
                "AWS:KMS",
                "--s3-sse-kms-key-id",
                "alias/backups",
                "--s3-storage-class",
                "standard_ia",
            ],
        ]
        .concat();
        let vars = [
            ("DATASAVER_S3_ACCESS_KEY_FILE", ak.to_str().unwrap()),
            ("DATASAVER_S3_SECRET_KEY_FILE", sk.to_str().unwrap()),
        ];
        let c = args(&flags).validate(&env(&vars)).unwrap();
        let s = s3(&c);
        assert_eq!(s.bucket, "backups-eu");
        assert_eq!(s.endpoint.as_deref(), Some("http://minio:9000"));
        assert_eq!(s.region, "eu-central-1");
        // one trailing newline (and its \r) is dropped, nothing else
        assert_eq!(s.access_key, ACCESS);
        assert_eq!(s.secret_key, SECRET);
        assert_eq!(s.prefix, "datasaver/prod/");
        assert!(s.force_path_style);
        assert_eq!(s.part_size, 8 * 1024 * 1024);
        assert_eq!(s.parts_in_flight, 3);
        assert_eq!(s.max_attempts, 7);
        assert_eq!(
            s.sse,
            Some(Sse::Kms {
                key_id: Some("alias/backups".into())
            })
        );
        assert_eq!(s.storage_class.as_deref(), Some("STANDARD_IA"));
        assert_eq!(s.ca_pem, None);

        // the whole config printed for a log names the bucket but no key
        let printed = format!("{c:?}");
        assert!(printed.contains("backups-eu"), "{printed}");
        assert!(!printed.contains(SECRET), "{printed}");
        assert!(!printed.contains(ACCESS), "{printed}");

        // S3 defaults
        let c = args(&S3_ARGS)
            .validate(&env(&[
                ("DATASAVER_S3_ACCESS_KEY", ACCESS),
                ("DATASAVER_S3_SECRET_KEY", SECRET),
            ]))
            .unwrap();
        let s = s3(&c);
        assert_eq!(s.endpoint, None);
        assert_eq!(s.region, "us-east-1");
        assert_eq!(s.prefix, "");
        assert!(!s.force_path_style);
        assert_eq!(s.part_size, 16 * 1024 * 1024);
        assert_eq!(s.parts_in_flight, 2);
        assert_eq!(s.max_attempts, 5);
        assert_eq!(s.sse, None);
        assert_eq!(s.storage_class, None);
        assert!(!format!("{c:?}").contains(SECRET));
    }

    #[test]
    fn secrets_never_appear_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let sk = dir.path().join("secret");
        std::fs::write(&sk, SECRET).unwrap();
        let keys = [
            ("DATASAVER_S3_ACCESS_KEY", ACCESS),
            ("DATASAVER_S3_SECRET_KEY", SECRET),
        ];
        for (flags, vars) in [
            // both the value and a file
            (
                S3_ARGS.to_vec(),
                vec![
                    ("DATASAVER_S3_ACCESS_KEY", ACCESS),
                    ("DATASAVER_S3_SECRET_KEY", SECRET),
                    ("DATASAVER_S3_SECRET_KEY_FILE", sk.to_str().unwrap()),
                ],
            ),
            // errors found after the keys were read
            (
                [&S3_ARGS[..], &["--s3-part-size-mb", "6000"]].concat(),
                keys.to_vec(),
            ),
            (
                [&S3_ARGS[..], &["--s3-storage-class", "vault"]].concat(),
                keys.to_vec(),
            ),
            (
                [&S3_ARGS[..], &["--s3-ca-file", "/nonexistent/ca.pem"]].concat(),
                keys.to_vec(),
            ),
            (
                [&S3_ARGS[..], &["--log-format", "yaml"]].concat(),
                keys.to_vec(),
            ),
        ] {
            let e = args(&flags).validate(&env(&vars)).unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(e.setting.starts_with("DATASAVER_"), "{shown}");
            assert!(!shown.contains(SECRET), "{shown}");
            assert!(!shown.contains(ACCESS), "{shown}");
        }

        // a webhook URL's path (often a token) is not echoed, nor the secret
        let e = args(&[])
            .validate(&env(&[
                (
                    "DATASAVER_WEBHOOK_URL",
                    "ftp://hooks.example.com/T0KEN-abc123",
                ),
                ("DATASAVER_WEBHOOK_SECRET", "hmac-s3cr3t"),
            ]))
            .unwrap_err();
        assert_eq!(e.setting, "DATASAVER_WEBHOOK_URL");
        let shown = format!("{e} {e:?}");
        assert!(shown.contains("hooks.example.com"), "{shown}");
        assert!(!shown.contains("T0KEN-abc123"), "{shown}");
        assert!(!shown.contains("hmac-s3cr3t"), "{shown}");

        // and a valid one is kept out of the printed config too
        let c = args(&[])
            .validate(&env(&[
                (
                    "DATASAVER_WEBHOOK_URL",
                    "https://hooks.example.com/T0KEN-abc123",
                ),
                ("DATASAVER_WEBHOOK_SECRET", "hmac-s3cr3t"),
            ]))
            .unwrap();
        assert_eq!(
            c.alerts.webhook_urls,
            vec!["https://hooks.example.com/T0KEN-abc123".to_string()]
        );
        assert_eq!(c.alerts.secret.as_deref(), Some("hmac-s3cr3t"));
        let printed = format!("{c:?}");
        assert!(!printed.contains("T0KEN-abc123"), "{printed}");
        assert!(!printed.contains("hmac-s3cr3t"), "{printed}");
    }

    #[test]
    fn yaml_file_reaches_policies_and_alerts() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("coordinator.yaml");
        std::fs::write(
            &f,
            "timezone: Europe/Berlin\nmax_concurrent_backups: 6\njob_timeout: 3h\n\
             targets:\n  acme-main:\n    schedule: \"0 2 * * *\"\n    alert_after: 26h\n",
        )
        .unwrap();
        let c = args(&["--config", f.to_str().unwrap()])
            .validate(&env(&[("DATASAVER_MAX_CONCURRENT_BACKUPS", "3")]))
            .unwrap();
        assert_eq!(c.policies.tz, chrono_tz::Europe::Berlin);
        // the environment wins over the file's top level
        assert_eq!(c.policies.max_concurrent, 3);
        assert_eq!(c.policies.job_timeout, Duration::from_secs(3 * 3600));
        assert_eq!(
            c.alerts.alert_after.get("acme-main"),
            Some(&chrono::Duration::hours(26))
        );
        assert_eq!(c.alerts.alert_after.len(), 1);
        let s = c.policies.schedule_for("acme-main", None).unwrap().unwrap();
        assert_eq!((s.expr(), s.tz()), ("0 2 * * *", chrono_tz::Europe::Berlin));
    }
}
