//! Agent settings from `DATASAVER_*` variables (SPEC §13). Everything is
//! checked at start; each problem is reported on its own line naming the
//! setting, and the process does not start with any of them.

use std::path::{Path, PathBuf};

use datasaver_common::codec::Compression;
use datasaver_common::config::{Env, SettingError};
use datasaver_common::proto;
use datasaver_common::tls::TlsPaths;

/// How to reach the database. The password is only ever handed to child
/// processes through their environment.
#[derive(Clone)]
pub struct DbConn {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub password: Option<String>,
    pub sslmode: Option<String>,
}

impl std::fmt::Debug for DbConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbConn")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl DbConn {
    /// libpq environment for a child process, connecting to `dbname`.
    pub fn env_for(&self, dbname: &str) -> Vec<(String, String)> {
        let mut v = vec![
            ("PGHOST".to_string(), self.host.clone()),
            ("PGPORT".to_string(), self.port.to_string()),
            ("PGUSER".to_string(), self.user.clone()),
            ("PGDATABASE".to_string(), dbname.to_string()),
            ("PGAPPNAME".to_string(), "datasaver-agent".to_string()),
            ("PGCONNECT_TIMEOUT".to_string(), "15".to_string()),
        ];
        if let Some(p) = &self.password {
            v.push(("PGPASSWORD".to_string(), p.clone()));
        }
        if let Some(s) = &self.sslmode {
            v.push(("PGSSLMODE".to_string(), s.clone()));
        }
        v
    }

    /// "user@host:port/db", for messages.
    pub fn describe(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }
}

/// Where backups are encrypted to (public; safe to log its fingerprint).
#[derive(Clone)]
pub struct EncryptTo {
    pub recipient: datasaver_common::crypt::Recipient,
    pub fingerprint: String,
}

impl std::fmt::Debug for EncryptTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncryptTo({})", self.fingerprint)
    }
}

/// Identities for decrypting on restore. Never printed.
#[derive(Clone, Default)]
pub struct Identities(pub std::sync::Arc<Vec<datasaver_common::crypt::Identity>>);

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identities({} redacted)", self.0.len())
    }
}

impl Identities {
    /// Fingerprints of the recipients these identities decrypt for.
    pub fn fingerprints(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|i| datasaver_common::crypt::fingerprint(&i.to_public()))
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub name: String,
    pub db: DbConn,
    pub schedule: Option<String>,
    pub retention: proto::Retention,
    pub compression: Compression,
    pub compression_level: i32,
    /// zstd worker threads (0: compress on the reading thread).
    pub compression_threads: u32,
    /// Encrypt backups to this recipient (None: stored unencrypted).
    pub encrypt_to: Option<EncryptTo>,
    /// Identities to decrypt backups on restore and verify.
    pub identities: Identities,
    /// How long pg_dump waits for each table's lock before the backup fails
    /// (`DATASAVER_LOCK_WAIT_TIMEOUT`).
    pub lock_wait_timeout: std::time::Duration,
    /// Where restore drills run (`DATASAVER_DRILL_DATABASE_URL`; its
    /// database is where the agent connects to create and drop the scratch
    /// database); `None`: on the target's own server.
    pub drill_db: Option<DbConn>,
    /// The restore-drill schedule this agent asks for
    /// (`DATASAVER_DRILL_SCHEDULE`; the coordinator's file wins).
    pub drill_schedule: Option<String>,
    /// The base-backup schedule this agent asks for
    /// (`DATASAVER_BASE_SCHEDULE`; needs the WAL stream; the coordinator's
    /// file wins).
    pub base_schedule: Option<String>,
    /// A whole server (`DATASAVER_DATABASES`): these of its databases, found
    /// afresh at each backup; `None`: only `db`'s database.
    pub databases: Option<DatabaseSelection>,
    /// Continuous WAL (`DATASAVER_WAL=stream`); `None`: off.
    pub wal: Option<WalSettings>,
}

/// How the agent streams its server's WAL (issue 14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalSettings {
    /// The physical replication slot (`DATASAVER_WAL_SLOT`, default
    /// `datasaver`), created if missing: the server keeps WAL for it while
    /// the agent or the coordinator is away.
    pub slot: String,
    /// How often the segment in progress is stored as a partial
    /// (`DATASAVER_WAL_SYNC_INTERVAL`, default 10 s): the most a quiet
    /// database can lose.
    pub sync_interval: std::time::Duration,
}

/// `DATASAVER_WAL_SYNC_INTERVAL`'s default.
pub const DEFAULT_WAL_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

fn wal_settings(env: &Env) -> Result<Option<WalSettings>, Vec<SettingError>> {
    let mut errs = Vec::new();
    let on = match env.get("DATASAVER_WAL").map(str::trim) {
        None | Some("") | Some("off") => false,
        Some("stream") => true,
        Some(v) => {
            errs.push(SettingError::new(
                "DATASAVER_WAL",
                format!("{v:?} is not one of: stream, off"),
            ));
            false
        }
    };
    let slot = env
        .get("DATASAVER_WAL_SLOT")
        .unwrap_or("datasaver")
        .trim()
        .to_string();
    if slot.is_empty()
        || slot.len() > 63
        || !slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        errs.push(SettingError::new(
            "DATASAVER_WAL_SLOT",
            format!("{slot:?} is not a replication slot name (lower-case letters, digits and _, at most 63)"),
        ));
    }
    let sync_interval = match env.get("DATASAVER_WAL_SYNC_INTERVAL") {
        None => DEFAULT_WAL_SYNC_INTERVAL,
        Some(v) => match datasaver_common::config::parse_duration("DATASAVER_WAL_SYNC_INTERVAL", v)
        {
            Ok(d) if d < std::time::Duration::from_millis(200) => {
                errs.push(SettingError::new(
                    "DATASAVER_WAL_SYNC_INTERVAL",
                    "must be at least 200ms",
                ));
                DEFAULT_WAL_SYNC_INTERVAL
            }
            Ok(d) => d,
            Err(e) => {
                errs.push(e);
                DEFAULT_WAL_SYNC_INTERVAL
            }
        },
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(on.then_some(WalSettings {
        slot,
        sync_interval,
    }))
}

/// Which databases of its server a whole-server agent backs up
/// (`DATASAVER_DATABASES`, `DATASAVER_EXCLUDE_DATABASES`): names or
/// patterns where `*` stands for any run of characters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatabaseSelection {
    /// Empty: every database (`all`).
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl DatabaseSelection {
    /// From the two settings' values (`include` unset: no selection).
    pub fn parse(
        include: Option<&str>,
        exclude: Option<&str>,
    ) -> Result<Option<Self>, SettingError> {
        let list = |setting: &'static str, v: &str| -> Result<Vec<String>, SettingError> {
            let items: Vec<String> = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            if items.is_empty() {
                return Err(SettingError::new(
                    setting,
                    "is empty: give database names or patterns, comma-separated (e.g. app,shop_*)",
                ));
            }
            for i in &items {
                datasaver_common::names::validate_database_name(i)
                    .map_err(|e| SettingError::new(setting, e))?;
            }
            Ok(items)
        };
        let Some(include) = include else {
            return match exclude {
                Some(_) => Err(SettingError::new(
                    "DATASAVER_EXCLUDE_DATABASES",
                    "only applies to a whole-server agent: set DATASAVER_DATABASES (e.g. all) too",
                )),
                None => Ok(None),
            };
        };
        let include = if include.trim() == "all" {
            Vec::new()
        } else {
            list("DATASAVER_DATABASES", include)?
        };
        let exclude = match exclude {
            Some(v) => list("DATASAVER_EXCLUDE_DATABASES", v)?,
            None => Vec::new(),
        };
        Ok(Some(Self { include, exclude }))
    }

    /// Whether database `name` is backed up.
    pub fn matches(&self, name: &str) -> bool {
        let any = |ps: &[String]| {
            ps.iter()
                .any(|p| datasaver_common::names::pattern_matches(p, name))
        };
        (self.include.is_empty() || any(&self.include)) && !any(&self.exclude)
    }

    /// The selection as the settings say it, for messages.
    pub fn describe(&self) -> String {
        let include = if self.include.is_empty() {
            "all".to_string()
        } else {
            self.include.join(",")
        };
        if self.exclude.is_empty() {
            format!("DATASAVER_DATABASES={include}")
        } else {
            format!(
                "DATASAVER_DATABASES={include}, DATASAVER_EXCLUDE_DATABASES={}",
                self.exclude.join(",")
            )
        }
    }
}

/// Where the agent's certificate comes from.
#[derive(Debug, Clone)]
pub enum Identity {
    /// `DATASAVER_TLS_CA`, `_CERT`, `_KEY`: files someone issued with
    /// `dsctl certs issue`.
    Files(TlsPaths),
    /// `DATASAVER_JOIN_TOKEN` and `DATASAVER_STATE_DIR`: the agent's own
    /// key and the certificate the coordinator issued for it, kept there.
    Join(crate::enroll::JoinSettings),
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub coordinator_url: String,
    pub coordinator_host: String,
    pub target: TargetConfig,
    pub identity: Identity,
    pub pg_bin_dir: PathBuf,
    pub log_json: bool,
    /// `GET /health` here, when set.
    pub http_listen: Option<std::net::SocketAddr>,
    /// How long a SIGTERM may take: running jobs are interrupted and reported,
    /// the control stream is closed, then the process exits.
    pub shutdown_grace: std::time::Duration,
}

/// A table held by another session's exclusive lock fails the backup after
/// this long instead of holding a scheduler slot until the job deadline.
pub const DEFAULT_LOCK_WAIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Docker's default stop timeout: the agent has finished (its own work ends a
/// second earlier) before `docker stop` resorts to SIGKILL.
pub const DEFAULT_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and checks every setting; returns all problems, not just the first.
pub fn from_env(env: &Env) -> Result<AgentConfig, Vec<SettingError>> {
    let mut errs = Vec::new();
    macro_rules! take {
        ($e:expr) => {
            match $e {
                Ok(v) => Some(v),
                Err(e) => {
                    errs.push(e);
                    None
                }
            }
        };
    }

    let token = match env.secret("DATASAVER_JOIN_TOKEN") {
        Ok(None) => None,
        Ok(Some(t)) => take!(datasaver_common::enroll::JoinToken::parse(&t)
            .map_err(|m| SettingError::new("DATASAVER_JOIN_TOKEN", m))),
        Err(e) => {
            errs.push(e);
            None
        }
    };
    let url = env.get("DATASAVER_COORDINATOR_URL");
    let coord = match (url, &token) {
        (None, None) => {
            errs.push(SettingError::new(
                "DATASAVER_COORDINATOR_URL",
                "not set: the coordinator's address, e.g. https://backup-host:50051 (or give DATASAVER_JOIN_TOKEN, which carries it)",
            ));
            None
        }
        (Some(u), _) => take!(parse_coordinator_url(u)),
        (None, Some(t)) => take!(parse_coordinator_url(&t.url).map_err(|e| SettingError::new(
            "DATASAVER_JOIN_TOKEN",
            format!("its coordinator address: {}", e.message)
        ))),
    };

    let target = match env.get("DATASAVER_TARGET") {
        None => {
            errs.push(SettingError::new(
                "DATASAVER_TARGET",
                "not set: the name of the database being backed up, e.g. acme-main",
            ));
            None
        }
        Some(t) => take!(datasaver_common::names::validate_target(t)
            .map(|_| t.to_string())
            .map_err(|e| SettingError::new("DATASAVER_TARGET", e.to_string()))),
    };

    let db = take!(db_from_env(env));

    let compression = take!(env
        .get("DATASAVER_COMPRESSION")
        .unwrap_or("zstd")
        .parse::<Compression>()
        .map_err(|e| SettingError::new("DATASAVER_COMPRESSION", e.to_string())));
    let level = take!(env.parse_opt::<i32>("DATASAVER_COMPRESSION_LEVEL")).flatten();
    let level = match (compression, level) {
        (Some(c), Some(l)) => take!(c
            .check_level(l)
            .map(|_| l)
            .map_err(|m| SettingError::new("DATASAVER_COMPRESSION_LEVEL", m))),
        (Some(c), None) => Some(c.default_level()),
        _ => None,
    };

    // Worker threads let zstd run beside pg_dump instead of in series with
    // it; more than a few buys nothing for one stream.
    let default_threads = std::thread::available_parallelism()
        .map(|n| n.get().min(4) as u32)
        .unwrap_or(1);
    let threads = take!(env.parse_or::<u32>("DATASAVER_COMPRESSION_THREADS", default_threads));
    if threads.is_some_and(|t| t > 64) {
        errs.push(SettingError::new(
            "DATASAVER_COMPRESSION_THREADS",
            "at most 64 (0 compresses on the reading thread)",
        ));
    }

    let encrypt_to = match env.get("DATASAVER_ENCRYPTION_RECIPIENT") {
        None => Some(None),
        Some(r) => take!(datasaver_common::crypt::parse_recipient(r)
            .map(|recipient| {
                Some(EncryptTo {
                    fingerprint: datasaver_common::crypt::fingerprint(&recipient),
                    recipient,
                })
            })
            .map_err(|m| SettingError::new("DATASAVER_ENCRYPTION_RECIPIENT", m))),
    };
    let identities = match env.get("DATASAVER_ENCRYPTION_IDENTITY_FILE") {
        None => Some(Identities::default()),
        Some(path) => take!(datasaver_common::crypt::load_identities(path)
            .map(|ids| Identities(std::sync::Arc::new(ids)))
            .map_err(|m| SettingError::new("DATASAVER_ENCRYPTION_IDENTITY_FILE", m))),
    };

    let schedule = env.get("DATASAVER_SCHEDULE").map(str::to_string);
    let drill_schedule = env.get("DATASAVER_DRILL_SCHEDULE").map(str::to_string);
    let base_schedule = env
        .get("DATASAVER_BASE_SCHEDULE")
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "off")
        .map(str::to_string);
    let databases = take!(DatabaseSelection::parse(
        env.get("DATASAVER_DATABASES"),
        env.get("DATASAVER_EXCLUDE_DATABASES")
    ))
    .flatten();
    let retention = proto::Retention {
        keep_last: take!(env.parse_opt("DATASAVER_KEEP_LAST")).flatten(),
        keep_daily: take!(env.parse_opt("DATASAVER_KEEP_DAILY")).flatten(),
        keep_weekly: take!(env.parse_opt("DATASAVER_KEEP_WEEKLY")).flatten(),
        keep_monthly: take!(env.parse_opt("DATASAVER_KEEP_MONTHLY")).flatten(),
        max_age_days: take!(env.parse_opt("DATASAVER_MAX_AGE_DAYS")).flatten(),
    };

    let files_given = [
        "DATASAVER_TLS_CA",
        "DATASAVER_TLS_CERT",
        "DATASAVER_TLS_KEY",
    ]
    .iter()
    .any(|s| env.get(s).is_some());
    let state_dir = env.get("DATASAVER_STATE_DIR").map(PathBuf::from);
    let join = token.is_some() || (state_dir.is_some() && !files_given);
    if join && files_given {
        errs.push(SettingError::new(
            "DATASAVER_JOIN_TOKEN",
            "set, and so are DATASAVER_TLS_CA/_CERT/_KEY: use either the token (the agent gets and keeps its own certificate) or certificate files, not both",
        ));
    }
    let agent_name = env
        .get("DATASAVER_AGENT_NAME")
        .map(str::to_string)
        .or_else(|| target.clone());
    if let Some(n) = env.get("DATASAVER_AGENT_NAME") {
        if let Err(e) = datasaver_common::pki::check_name("agent", n) {
            errs.push(SettingError::new("DATASAVER_AGENT_NAME", e.to_string()));
        }
    }
    let tls = if join {
        None
    } else {
        take!(TlsPaths::new(
            env.get("DATASAVER_TLS_CA").map(PathBuf::from),
            env.get("DATASAVER_TLS_CERT").map(PathBuf::from),
            env.get("DATASAVER_TLS_KEY").map(PathBuf::from),
        )
        .map_err(|e| SettingError::new(
            &e.setting,
            format!(
                "{} (or join with a token: DATASAVER_JOIN_TOKEN from `dsctl tokens create`)",
                e.message
            )
        )))
    };
    let identity = if join {
        Some(Identity::Join(crate::enroll::JoinSettings {
            token,
            state_dir: state_dir.unwrap_or_else(|| PathBuf::from(crate::enroll::DEFAULT_STATE_DIR)),
            agent_name: agent_name.unwrap_or_default(),
            // DATASAVER_RENEWAL_CHECK (undocumented, for tests): look more often.
            renewal_check: env
                .get("DATASAVER_RENEWAL_CHECK")
                .and_then(|v| {
                    datasaver_common::config::parse_duration("DATASAVER_RENEWAL_CHECK", v).ok()
                })
                .unwrap_or(crate::enroll::RENEWAL_CHECK),
        }))
    } else {
        tls.clone().map(Identity::Files)
    };
    if let Some(tls) = &tls {
        for (setting, path) in [
            ("DATASAVER_TLS_CA", &tls.ca),
            ("DATASAVER_TLS_CERT", &tls.cert),
            ("DATASAVER_TLS_KEY", &tls.key),
        ] {
            if let Err(e) = std::fs::File::open(path) {
                errs.push(SettingError::new(
                    setting,
                    format!("cannot read {}: {e}", path.display()),
                ));
            }
        }
    }

    let pg_bin_dir = take!(find_pg_bin_dir(env));

    let log_json = match env.get("DATASAVER_LOG_FORMAT").unwrap_or("text") {
        "text" => false,
        "json" => true,
        other => {
            errs.push(SettingError::new(
                "DATASAVER_LOG_FORMAT",
                format!("{other:?} is not text or json"),
            ));
            false
        }
    };

    let http_listen = match env.get("DATASAVER_HTTP_LISTEN") {
        None => None,
        Some(v) => take!(v.trim().parse::<std::net::SocketAddr>().map_err(|_| {
            SettingError::new(
                "DATASAVER_HTTP_LISTEN",
                format!("{v:?} is not an address like 127.0.0.1:9091"),
            )
        })),
    };

    let shutdown_grace = match env.get("DATASAVER_SHUTDOWN_GRACE") {
        None => Some(DEFAULT_SHUTDOWN_GRACE),
        Some(v) => take!(datasaver_common::config::parse_duration(
            "DATASAVER_SHUTDOWN_GRACE",
            v
        )),
    };

    let lock_wait_timeout = match env.get("DATASAVER_LOCK_WAIT_TIMEOUT") {
        None => DEFAULT_LOCK_WAIT_TIMEOUT,
        Some(v) => match datasaver_common::config::parse_duration("DATASAVER_LOCK_WAIT_TIMEOUT", v)
        {
            // pg_dump takes whole milliseconds; 0 would mean "wait forever".
            Ok(d) if d.as_millis() == 0 => {
                errs.push(SettingError::new(
                    "DATASAVER_LOCK_WAIT_TIMEOUT",
                    "must be at least 1ms (pg_dump would wait forever on 0)",
                ));
                DEFAULT_LOCK_WAIT_TIMEOUT
            }
            Ok(d) => d,
            Err(e) => {
                errs.push(e);
                DEFAULT_LOCK_WAIT_TIMEOUT
            }
        },
    };

    let drill_db = match env.secret("DATASAVER_DRILL_DATABASE_URL") {
        Ok(None) => None,
        Ok(Some(url)) => match parse_database_url_for("DATASAVER_DRILL_DATABASE_URL", &url) {
            Ok(d) => Some(d),
            Err(e) => {
                errs.push(e);
                None
            }
        },
        Err(e) => {
            errs.push(e);
            None
        }
    };

    let wal = match wal_settings(env) {
        Ok(w) => w,
        Err(e) => {
            errs.extend(e);
            None
        }
    };
    if base_schedule.is_some()
        && wal.is_none()
        && !errs.iter().any(|e| e.setting == "DATASAVER_WAL")
    {
        errs.push(SettingError::new(
            "DATASAVER_BASE_SCHEDULE",
            "base backups need the WAL stream: set DATASAVER_WAL=stream too",
        ));
    }

    if !errs.is_empty() {
        return Err(errs);
    }
    match (
        coord,
        target,
        db,
        compression,
        level,
        identity,
        pg_bin_dir,
        threads,
        encrypt_to,
        identities,
    ) {
        (
            Some((url, host)),
            Some(name),
            Some(db),
            Some(compression),
            Some(level),
            Some(identity),
            Some(bin),
            Some(compression_threads),
            Some(encrypt_to),
            Some(identities),
        ) => Ok(AgentConfig {
            coordinator_url: url,
            coordinator_host: host,
            target: TargetConfig {
                name,
                db,
                schedule,
                retention,
                compression,
                compression_level: level,
                compression_threads,
                encrypt_to,
                identities,
                lock_wait_timeout,
                drill_db,
                drill_schedule,
                base_schedule,
                databases,
                wal,
            },
            identity,
            pg_bin_dir: bin,
            log_json,
            http_listen,
            shutdown_grace: shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
        }),
        _ => Err(vec![SettingError::new("configuration", "incomplete")]),
    }
}

/// Accepts `https://host:port` (port required: there is no sensible default
/// to guess for a private service).
pub fn parse_coordinator_url(u: &str) -> Result<(String, String), SettingError> {
    let bad = |why: &str| {
        SettingError::new(
            "DATASAVER_COORDINATOR_URL",
            format!("{u:?} {why} (expected https://HOST:PORT, e.g. https://backup-host:50051)"),
        )
    };
    let rest = match u.split_once("://") {
        Some(("https", r)) => r,
        Some(("http", _)) => return Err(bad("is plain-text; datasaver requires TLS")),
        Some(_) | None => return Err(bad("is not an https URL")),
    };
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') || authority.contains('@') || authority.contains('?') {
        return Err(bad("must be only scheme, host and port"));
    }
    let host = datasaver_common::tls::url_host(u).ok_or_else(|| bad("has no host"))?;
    let port = authority
        .rsplit_once(':')
        .map(|(_, p)| p)
        .ok_or_else(|| bad("has no port"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad("has an invalid port")),
    }
    if host.is_empty() || host.contains(' ') {
        return Err(bad("has an invalid host"));
    }
    Ok((format!("https://{authority}"), host))
}

fn db_from_env(env: &Env) -> Result<DbConn, SettingError> {
    let password = env.secret("DATASAVER_DB_PASSWORD")?;
    if let Some(url) = env.secret("DATASAVER_DATABASE_URL")? {
        let mut db = parse_database_url(&url)?;
        if db.password.is_none() {
            db.password = password;
        }
        return Ok(db);
    }
    let port = env.parse_or::<u16>("DATASAVER_DB_PORT", 5432)?;
    let dbname = env
        .get("DATASAVER_DB_NAME")
        .ok_or_else(|| {
            SettingError::new(
                "DATASAVER_DB_NAME",
                "not set: give DATASAVER_DB_NAME (with _HOST, _PORT, _USER, _PASSWORD) or DATASAVER_DATABASE_URL",
            )
        })?
        .to_string();
    Ok(DbConn {
        host: env
            .get("DATASAVER_DB_HOST")
            .unwrap_or("localhost")
            .to_string(),
        port,
        dbname,
        user: env
            .get("DATASAVER_DB_USER")
            .unwrap_or("postgres")
            .to_string(),
        password,
        sslmode: env.get("DATASAVER_DB_SSLMODE").map(str::to_string),
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `postgres://user:password@host:port/dbname?sslmode=require`. Errors never
/// repeat the URL: it may hold the password.
pub fn parse_database_url(url: &str) -> Result<DbConn, SettingError> {
    parse_database_url_for("DATASAVER_DATABASE_URL", url)
}

/// [`parse_database_url`] for the setting named `setting`.
pub fn parse_database_url_for(setting: &str, url: &str) -> Result<DbConn, SettingError> {
    let bad = |why: &str| {
        SettingError::new(
            setting,
            format!("{why} (expected postgres://USER:PASSWORD@HOST:PORT/DBNAME)"),
        )
    };
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| bad("does not start with postgres://"))?;
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = main
        .split_once('/')
        .ok_or_else(|| bad("has no database name"))?;
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        None => ("postgres".to_string(), None),
        Some(ui) => match ui.split_once(':') {
            Some((u, p)) => (
                percent_decode(u).ok_or_else(|| bad("has a badly encoded user"))?,
                Some(percent_decode(p).ok_or_else(|| bad("has a badly encoded password"))?),
            ),
            None => (
                percent_decode(ui).ok_or_else(|| bad("has a badly encoded user"))?,
                None,
            ),
        },
    };
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, rest) = h
            .split_once(']')
            .ok_or_else(|| bad("has a malformed IPv6 host"))?;
        (h.to_string(), rest.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    let port = match port {
        None | Some("") => 5432,
        Some(p) => p.parse().map_err(|_| bad("has an invalid port"))?,
    };
    let dbname = percent_decode(path).ok_or_else(|| bad("has a badly encoded database name"))?;
    if dbname.is_empty() {
        return Err(bad("has no database name"));
    }
    let mut sslmode = None;
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=') {
            Some(("sslmode", v)) => sslmode = Some(v.to_string()),
            _ => {
                return Err(bad(
                    "has an unsupported query parameter (only sslmode is accepted)",
                ))
            }
        }
    }
    Ok(DbConn {
        host: if host.is_empty() {
            "localhost".into()
        } else {
            host
        },
        port,
        dbname,
        user,
        password,
        sslmode,
    })
}

fn has_tools(dir: &Path) -> bool {
    ["pg_dump", "pg_restore", "psql"]
        .iter()
        .all(|t| dir.join(t).is_file())
}

/// Where pg_dump, pg_restore and psql live: `DATASAVER_PG_BIN_DIR`, else the
/// directory of `pg_dump` on PATH, else the newest `/usr/lib/postgresql/N/bin`.
pub fn find_pg_bin_dir(env: &Env) -> Result<PathBuf, SettingError> {
    if let Some(d) = env.get("DATASAVER_PG_BIN_DIR") {
        let p = PathBuf::from(d);
        if has_tools(&p) {
            return Ok(p);
        }
        return Err(SettingError::new(
            "DATASAVER_PG_BIN_DIR",
            format!("{d} does not contain pg_dump, pg_restore and psql"),
        ));
    }
    if let Some(path) = env.get("PATH") {
        for dir in path.split(':') {
            let p = PathBuf::from(dir);
            if has_tools(&p) {
                return Ok(p);
            }
        }
    }
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        for e in rd.flatten() {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok();
            let bin = e.path().join("bin");
            if let Some(v) = v {
                if has_tools(&bin) && best.as_ref().is_none_or(|(b, _)| v > *b) {
                    best = Some((v, bin));
                }
            }
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| {
        SettingError::new(
            "DATASAVER_PG_BIN_DIR",
            "pg_dump, pg_restore and psql were not found on PATH or in /usr/lib/postgresql/*/bin; install the PostgreSQL client or set this",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_pairs(pairs)
    }

    #[test]
    fn a_join_token_carries_the_address_and_replaces_the_certificate_files() {
        let token = datasaver_common::enroll::JoinToken::generate(b"ca", "https://coord:50051")
            .unwrap()
            .encode();
        let base = vec![
            ("DATASAVER_TARGET", "app"),
            ("DATASAVER_DB_NAME", "app"),
            ("DATASAVER_PG_BIN_DIR", "/usr/bin"),
            ("DATASAVER_JOIN_TOKEN", token.as_str()),
        ];
        let c = from_env(&env(&base)).unwrap();
        assert_eq!(c.coordinator_url, "https://coord:50051");
        let Identity::Join(j) = &c.identity else {
            panic!("not joining: {:?}", c.identity);
        };
        assert_eq!(j.state_dir, PathBuf::from(crate::enroll::DEFAULT_STATE_DIR));
        assert_eq!(j.agent_name, "app");
        // DATASAVER_COORDINATOR_URL wins over the token's address.
        let mut other = base.clone();
        other.push(("DATASAVER_COORDINATOR_URL", "https://backup.internal:443"));
        other.push(("DATASAVER_AGENT_NAME", "app-sidecar"));
        let c = from_env(&env(&other)).unwrap();
        assert_eq!(c.coordinator_host, "backup.internal");
        assert!(matches!(&c.identity, Identity::Join(j) if j.agent_name == "app-sidecar"));
        // Both a token and certificate files: refused, naming the token.
        let mut both = base.clone();
        both.push(("DATASAVER_TLS_CERT", "/pki/a.crt"));
        let errs = from_env(&env(&both)).unwrap_err();
        assert!(
            errs.iter().any(|e| e.setting == "DATASAVER_JOIN_TOKEN"),
            "{errs:?}"
        );
        // A damaged token: refused without being echoed.
        let mut bad = base[..3].to_vec();
        let cut = &token[..30];
        bad.push(("DATASAVER_JOIN_TOKEN", cut));
        let errs = from_env(&env(&bad)).unwrap_err();
        let e = errs
            .iter()
            .find(|e| e.setting == "DATASAVER_JOIN_TOKEN")
            .expect("token error");
        assert!(!e.to_string().contains(cut), "{e}");
        // Neither a token nor files nor an address: each is named.
        let errs = from_env(&env(&base[..3])).unwrap_err();
        let named: Vec<&str> = errs.iter().map(|e| e.setting.as_str()).collect();
        assert!(named.contains(&"DATASAVER_COORDINATOR_URL"), "{named:?}");
        assert!(named.contains(&"DATASAVER_TLS_CA"), "{named:?}");
    }

    #[test]
    fn coordinator_urls() {
        assert_eq!(
            parse_coordinator_url("https://backup:50051").unwrap(),
            ("https://backup:50051".into(), "backup".into())
        );
        assert!(parse_coordinator_url("https://[::1]:5").is_ok());
        for bad in [
            "backup:50051",
            "http://backup:1",
            "https://backup",
            "https://b:0",
            "https://b:x",
            "https://u@b:1",
            "https://b:1/p",
        ] {
            let e = parse_coordinator_url(bad).unwrap_err();
            assert_eq!(e.setting, "DATASAVER_COORDINATOR_URL", "{bad}");
        }
    }

    #[test]
    fn a_whole_server_selection_takes_what_it_names_and_not_what_it_excludes() {
        assert_eq!(DatabaseSelection::parse(None, None), Ok(None));
        let all = DatabaseSelection::parse(Some("all"), Some("postgres, scratch_*"))
            .unwrap()
            .unwrap();
        let taken: Vec<&str> = ["app", "crm", "postgres", "scratch_1", "scratchy"]
            .into_iter()
            .filter(|d| all.matches(d))
            .collect();
        assert_eq!(taken, ["app", "crm", "scratchy"]);
        assert_eq!(
            all.describe(),
            "DATASAVER_DATABASES=all, DATASAVER_EXCLUDE_DATABASES=postgres,scratch_*"
        );
        let some = DatabaseSelection::parse(Some("shop_*,crm"), None)
            .unwrap()
            .unwrap();
        assert!(some.matches("shop_eu") && some.matches("crm") && !some.matches("crm2"));
        for (include, exclude, setting) in [
            (None, Some("x"), "DATASAVER_EXCLUDE_DATABASES"),
            (Some(" , "), None, "DATASAVER_DATABASES"),
            (Some("all"), Some(""), "DATASAVER_EXCLUDE_DATABASES"),
        ] {
            let e = DatabaseSelection::parse(include, exclude).unwrap_err();
            assert_eq!(e.setting, setting, "{e}");
        }
    }

    #[test]
    fn database_urls_never_echo_the_password() {
        let db =
            parse_database_url("postgresql://app:p%40ss:w@db.example:6543/my%20db?sslmode=require")
                .unwrap();
        assert_eq!(db.user, "app");
        assert_eq!(db.password.as_deref(), Some("p@ss:w"));
        assert_eq!(db.host, "db.example");
        assert_eq!(db.port, 6543);
        assert_eq!(db.dbname, "my db");
        assert_eq!(db.sslmode.as_deref(), Some("require"));
        assert!(!format!("{db:?}").contains("p@ss"));
        let e = parse_database_url("postgres://u:hunter2@h:99999/db").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(parse_database_url("mysql://x/y").is_err());
        let db = parse_database_url("postgres://h/d").unwrap();
        assert_eq!((db.user.as_str(), db.port), ("postgres", 5432));
    }

    #[test]
    fn every_problem_is_reported_with_its_setting() {
        let errs = from_env(&env(&[
            ("DATASAVER_COORDINATOR_URL", "not a url"),
            ("DATASAVER_TARGET", "Bad Name"),
            ("DATASAVER_COMPRESSION", "lz5"),
            ("DATASAVER_DB_NAME", "app"),
            ("DATASAVER_TLS_CA", "/nonexistent/ca.crt"),
            ("DATASAVER_TLS_CERT", "/nonexistent/a.crt"),
            ("DATASAVER_TLS_KEY", "/nonexistent/a.key"),
            ("DATASAVER_KEEP_DAILY", "-1"),
            ("DATASAVER_LOCK_WAIT_TIMEOUT", "forever"),
            ("DATASAVER_WAL", "archive"),
            ("DATASAVER_WAL_SLOT", "Data-Saver"),
            ("DATASAVER_WAL_SYNC_INTERVAL", "10ms"),
        ]))
        .unwrap_err();
        let settings: Vec<&str> = errs.iter().map(|e| e.setting.as_str()).collect();
        for s in [
            "DATASAVER_COORDINATOR_URL",
            "DATASAVER_TARGET",
            "DATASAVER_COMPRESSION",
            "DATASAVER_TLS_CA",
            "DATASAVER_KEEP_DAILY",
            "DATASAVER_LOCK_WAIT_TIMEOUT",
            "DATASAVER_WAL",
            "DATASAVER_WAL_SLOT",
            "DATASAVER_WAL_SYNC_INTERVAL",
        ] {
            assert!(settings.contains(&s), "{s} missing from {settings:?}");
        }
        for e in &errs {
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }

    #[test]
    fn a_base_schedule_needs_the_wal_stream() {
        let dir = std::env::temp_dir().join(format!("ds-agent-base-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["ca.crt", "a.crt", "a.key"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
        let (ca, cert, key) = (p("ca.crt"), p("a.crt"), p("a.key"));
        let base = vec![
            ("DATASAVER_COORDINATOR_URL", "https://backup:50051"),
            ("DATASAVER_TARGET", "app"),
            ("DATASAVER_DB_NAME", "app"),
            ("DATASAVER_TLS_CA", ca.as_str()),
            ("DATASAVER_TLS_CERT", cert.as_str()),
            ("DATASAVER_TLS_KEY", key.as_str()),
            ("DATASAVER_PG_BIN_DIR", "/usr/bin"),
            ("DATASAVER_BASE_SCHEDULE", "0 4 * * 6"),
        ];
        let errs = from_env(&env(&base)).unwrap_err();
        assert!(
            errs.iter().any(|e| e.setting == "DATASAVER_BASE_SCHEDULE"
                && e.message.contains("DATASAVER_WAL=stream")),
            "{errs:?}"
        );
        let mut with = base.clone();
        with.push(("DATASAVER_WAL", "stream"));
        let c = from_env(&env(&with)).unwrap();
        assert_eq!(c.target.base_schedule.as_deref(), Some("0 4 * * 6"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn wal_streaming_is_off_unless_asked_for() {
        assert_eq!(wal_settings(&env(&[])), Ok(None));
        assert_eq!(
            wal_settings(&env(&[("DATASAVER_WAL", "stream")])),
            Ok(Some(WalSettings {
                slot: "datasaver".into(),
                sync_interval: DEFAULT_WAL_SYNC_INTERVAL
            }))
        );
        assert_eq!(
            wal_settings(&env(&[
                ("DATASAVER_WAL", "stream"),
                ("DATASAVER_WAL_SLOT", "shop_1"),
                ("DATASAVER_WAL_SYNC_INTERVAL", "2s")
            ])),
            Ok(Some(WalSettings {
                slot: "shop_1".into(),
                sync_interval: std::time::Duration::from_secs(2)
            }))
        );
    }

    #[test]
    fn lock_wait_timeout() {
        let dir = std::env::temp_dir().join(format!("ds-agent-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["ca.crt", "a.crt", "a.key"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
        let (ca, cert, key) = (path("ca.crt"), path("a.crt"), path("a.key"));
        let base = vec![
            ("DATASAVER_COORDINATOR_URL", "https://backup:50051"),
            ("DATASAVER_TARGET", "app"),
            ("DATASAVER_DB_NAME", "app"),
            ("DATASAVER_TLS_CA", ca.as_str()),
            ("DATASAVER_TLS_CERT", cert.as_str()),
            ("DATASAVER_TLS_KEY", key.as_str()),
            ("DATASAVER_PG_BIN_DIR", "/usr/bin"),
        ];
        let c = from_env(&env(&base)).unwrap();
        assert_eq!(c.target.lock_wait_timeout, DEFAULT_LOCK_WAIT_TIMEOUT);
        let mut with = base.clone();
        with.push(("DATASAVER_LOCK_WAIT_TIMEOUT", "3s"));
        let c = from_env(&env(&with)).unwrap();
        assert_eq!(
            c.target.lock_wait_timeout,
            std::time::Duration::from_secs(3)
        );
        let mut zero = base;
        zero.push(("DATASAVER_LOCK_WAIT_TIMEOUT", "0s"));
        let errs = from_env(&env(&zero)).unwrap_err();
        assert_eq!(errs[0].setting, "DATASAVER_LOCK_WAIT_TIMEOUT");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn db_settings_and_password_file() {
        let dir = std::env::temp_dir().join(format!("ds-agent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let db = db_from_env(&env(&[
            ("DATASAVER_DB_HOST", "10.0.0.5"),
            ("DATASAVER_DB_NAME", "app"),
            ("DATASAVER_DB_PASSWORD_FILE", pw.to_str().unwrap()),
        ]))
        .unwrap();
        assert_eq!(db.password.as_deref(), Some("s3cret"));
        assert_eq!(db.port, 5432);
        let e = db_from_env(&env(&[
            ("DATASAVER_DB_NAME", "app"),
            ("DATASAVER_DB_PORT", "x"),
        ]))
        .unwrap_err();
        assert_eq!(e.setting, "DATASAVER_DB_PORT");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
