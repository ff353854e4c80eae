//! Embedded agents: targets the coordinator backs up itself
//! (`targets.<name>.database_url` in its YAML file), for a single-container
//! setup and for managed databases (RDS, Cloud SQL) where no sidecar can
//! run. Each is the real agent (`datasaver_agent::run`) in this process,
//! connecting to this coordinator over loopback with mutual TLS, so it is
//! scheduled, retained, alerted on and listed like any other agent.
//!
//! Its identity is a certificate from the enrollment CA, named
//! `embedded-<target>` and kept like a joined agent's under
//! `<data dir>/embedded/<target>/` (issued at start when missing, unusable
//! or expired; renewed by the agent itself at half-life).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use datasaver_agent::config::AgentConfig;
use datasaver_common::config::Env;
use datasaver_common::proto::IssuedCertificate;
use datasaver_common::tls::TlsMaterial;
use tokio_util::sync::CancellationToken;

use crate::enrollment::Enroller;
use crate::policy::SecretText;

/// An embedded agent could not be set up; the message names the target.
#[derive(Debug, thiserror::Error)]
#[error("DATASAVER_CONFIG: targets.{target}: {message}")]
pub struct EmbeddedError {
    pub target: String,
    pub message: String,
}

/// Agent settings taken from the coordinator's environment (each also as
/// `_FILE` where the agent reads a secret that way).
const PASSED_THROUGH: [&str; 19] = [
    "PATH",
    "DATASAVER_PG_BIN_DIR",
    "DATASAVER_DB_PASSWORD",
    "DATASAVER_SCHEDULE",
    "DATASAVER_DRILL_SCHEDULE",
    "DATASAVER_DRILL_DATABASE_URL",
    "DATASAVER_COMPRESSION",
    "DATASAVER_COMPRESSION_LEVEL",
    "DATASAVER_COMPRESSION_THREADS",
    "DATASAVER_ENCRYPTION_RECIPIENT",
    "DATASAVER_ENCRYPTION_IDENTITY_FILE",
    "DATASAVER_KEEP_LAST",
    "DATASAVER_KEEP_DAILY",
    "DATASAVER_KEEP_WEEKLY",
    "DATASAVER_KEEP_MONTHLY",
    "DATASAVER_MAX_AGE_DAYS",
    "DATASAVER_DATABASES",
    "DATASAVER_EXCLUDE_DATABASES",
    "DATASAVER_LOCK_WAIT_TIMEOUT",
];

/// The agent name of `target`'s embedded agent.
pub fn agent_name(target: &str) -> String {
    let name = format!("embedded-{target}");
    if name.len() <= 64 {
        name
    } else {
        target.to_string()
    }
}

/// Where the coordinator can reach itself, and the name its certificate
/// answers to there.
fn loopback(grpc: SocketAddr, tls: &TlsMaterial) -> (String, String) {
    let ip = match grpc.ip() {
        IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    };
    let url = match ip {
        IpAddr::V4(v) => format!("https://{v}:{}", grpc.port()),
        IpAddr::V6(v) => format!("https://[{v}]:{}", grpc.port()),
    };
    (url, certificate_name(tls, ip))
}

/// A name in the coordinator's certificate to check it by: the address
/// connected to if listed, else `localhost`, else its first DNS name.
fn certificate_name(tls: &TlsMaterial, ip: IpAddr) -> String {
    use x509_parser::extensions::GeneralName;
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Some(cert) = tls.certs.first() {
        if let Ok((_, c)) = x509_parser::parse_x509_certificate(cert.as_ref()) {
            if let Ok(Some(alt)) = c.subject_alternative_name() {
                for n in &alt.value.general_names {
                    match n {
                        GeneralName::DNSName(d) => dns.push(d.to_string()),
                        GeneralName::IPAddress(b) => ips.push(b.to_vec()),
                        _ => {}
                    }
                }
            }
        }
    }
    let ip_bytes = match ip {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    };
    if ips.contains(&ip_bytes) {
        return ip.to_string();
    }
    if dns.iter().any(|d| d == "localhost") {
        return "localhost".into();
    }
    dns.into_iter().next().unwrap_or_else(|| ip.to_string())
}

/// Makes sure `dir` holds a usable certificate for `name` serving `target`.
fn ensure_identity(
    dir: &Path,
    name: &str,
    target: &str,
    enroller: &Enroller,
) -> Result<(), String> {
    datasaver_agent::enroll::check_state_dir(dir).map_err(|e| e.to_string())?;
    let now = chrono::Utc::now().timestamp();
    if let Ok(Some(m)) = datasaver_agent::enroll::stored(dir) {
        let same = m.identity.name == name && m.identity.targets == [target.to_string()];
        if same && m.identity.not_after > now {
            return Ok(());
        }
    }
    let (key, csr) = datasaver_common::pki::key_and_request(name).map_err(|e| e.to_string())?;
    let issued = enroller
        .issue(&csr, name, &[target.to_string()])
        .map_err(|e| format!("issuing its certificate: {e}"))?;
    let issued = IssuedCertificate {
        chain_pem: issued.chain_pem,
        ca_pem: enroller.fleet_ca_pem().to_string(),
        not_after_unix: issued.not_after_unix,
    };
    datasaver_agent::enroll::save(dir, &key.serialize_pem(), &issued).map_err(|e| e.to_string())
}

/// The agents' settings, checked: every embedded target's problem is an
/// error at start-up, like any other setting.
pub fn prepare(
    targets: &std::collections::BTreeMap<String, SecretText>,
    enroller: Option<&Enroller>,
    data_dir: &Path,
    grpc: SocketAddr,
    tls: &TlsMaterial,
) -> Result<Vec<AgentConfig>, EmbeddedError> {
    let mut out = Vec::new();
    let (url, host) = loopback(grpc, tls);
    for (target, db_url) in targets {
        let err = |message: String| EmbeddedError {
            target: target.clone(),
            message,
        };
        let Some(enroller) = enroller else {
            return Err(err("database_url needs the enrollment CA (DATASAVER_ENROLLMENT_CA_CERT and _KEY, from `dsctl certs init --enrollment`): the coordinator issues its embedded agents' certificates with it".into()));
        };
        let name = agent_name(target);
        let dir: PathBuf = data_dir.join("embedded").join(target);
        ensure_identity(&dir, &name, target, enroller).map_err(err)?;
        let mut vars: std::collections::HashMap<String, String> = [
            ("DATASAVER_TARGET", target.as_str()),
            ("DATASAVER_DATABASE_URL", db_url.0.as_str()),
            ("DATASAVER_COORDINATOR_URL", url.as_str()),
            ("DATASAVER_STATE_DIR", &dir.to_string_lossy()),
            ("DATASAVER_AGENT_NAME", name.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        // The agent settings in the coordinator's environment apply to its
        // embedded agents (the standalone container is configured that
        // way); the YAML file's per-target schedule still wins.
        let process = Env::from_process();
        for k in PASSED_THROUGH {
            for key in [k.to_string(), format!("{k}_FILE")] {
                if let Some(v) = process.get(&key) {
                    vars.insert(key, v.to_string());
                }
            }
        }
        let mut config = datasaver_agent::config::from_env(&Env(vars)).map_err(|errs| {
            err(errs
                .iter()
                .map(|e| {
                    // The URL came from the file, not that variable.
                    e.to_string().replace(
                        "DATASAVER_DATABASE_URL",
                        &format!("targets.{target}.database_url"),
                    )
                })
                .collect::<Vec<_>>()
                .join("; "))
        })?;
        config.coordinator_host.clone_from(&host);
        out.push(config);
    }
    Ok(out)
}

/// Runs each agent until `cancel`; an agent that stops with an error is
/// logged (the target's missed backups then alert like any agent's).
pub fn spawn(
    agents: Vec<AgentConfig>,
    cancel: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    agents
        .into_iter()
        .map(|config| {
            let cancel = cancel.clone();
            let target = config.target.name.clone();
            tokio::spawn(async move {
                tracing::info!(target = %target, "embedded agent starting");
                if let Err(e) = datasaver_agent::run(config, cancel).await {
                    tracing::error!(target = %target, error = %e, "embedded agent stopped");
                }
            })
        })
        .collect()
}
