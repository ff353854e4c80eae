//! dsctl: the datasaver operator CLI. Talks only to the coordinator, over
//! mutual TLS with an operator certificate. Exit status: 0 success, 1 the
//! operation failed, 2 usage error.

mod certs;
mod client;
mod crl;
mod export;
mod output;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use datasaver_common::proto::{
    job_event, CancelRequest, CleanupRequest, CreateTokenRequest, DeleteBackupRequest,
    ExportRequest, GetBackupRequest, HealthRequest, JobDone, ListAgentsRequest, ListBackupsRequest,
    ListTargetsRequest, ListTokensRequest, PinRequest, RestoreRequest, RevokeTokenRequest,
    StartBackupRequest, VerifyRequest,
};
use progress::Progress;

#[derive(Parser)]
#[command(
    name = "dsctl",
    version,
    about = "Operate datasaver: list, back up, restore and verify PostgreSQL backups",
    long_about = "Operate datasaver: list, back up, restore and verify PostgreSQL backups.\n\n\
                  dsctl talks to the coordinator over mutual TLS with an operator certificate \
                  (create one with `dsctl certs init`).\n\
                  Results go to stdout, progress and errors to stderr: `id=$(dsctl backup app)` \
                  gets just the new id.\n\
                  Exit status: 0 success, 1 the operation failed, 2 usage error.",
    after_help = "Shell completion: `dsctl completion bash > /etc/bash_completion.d/dsctl` (or zsh, fish)."
)]
struct Cli {
    /// Coordinator address (https://HOST:PORT).
    #[arg(
        long,
        value_name = "URL",
        global = true,
        env = "DATASAVER_COORDINATOR_URL",
        default_value = "https://localhost:50051"
    )]
    coordinator: String,
    /// Fleet CA certificate (PEM), to check the coordinator's certificate.
    #[arg(long, global = true, env = "DATASAVER_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Operator certificate (PEM), issued by the fleet CA (`dsctl certs`).
    /// With no TLS setting at all, $DATASAVER_DATA_DIR/pki/operator.crt
    /// (what a coordinator with DATASAVER_TLS_AUTO made) is used if present.
    #[arg(long, global = true, env = "DATASAVER_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Operator private key (PEM).
    #[arg(long, global = true, env = "DATASAVER_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Machine-readable JSON output on stdout (a stable interface); no progress lines.
    #[arg(long, global = true)]
    json: bool,
    /// No progress on stderr: only the result (stdout) and, on failure, one error line.
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create or issue fleet certificates.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Join tokens: an agent started with one (DATASAVER_JOIN_TOKEN) makes
    /// its own key and gets its certificate from the coordinator, so no PEM
    /// files need copying. Needs an admin certificate and a coordinator with
    /// an enrollment CA (`dsctl certs init --enrollment`).
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Show connected agents and their targets.
    Agents,
    /// List targets: the agent bound to each, whether it is connected, its
    /// last contact and when its certificate expires.
    Targets {
        #[command(subcommand)]
        cmd: Option<TargetsCmd>,
    },
    /// Continuous WAL (DATASAVER_WAL=stream on the agent): per target the
    /// cluster it is bound to and, per timeline, the first and last stored
    /// segment, gaps and the partial; how far the stored WAL lags the server.
    Wal {
        /// Only this target.
        #[arg(long, value_name = "TARGET")]
        target: Option<String>,
    },
    /// List backups: ID TARGET DATE SIZE TYPE STATUS TAGS PINNED LABEL.
    List {
        /// Only this target.
        #[arg(long, value_name = "TARGET")]
        target: Option<String>,
    },
    /// Show one backup in full.
    Get {
        /// Backup id, e.g. app_20261202_010203.
        id: String,
    },
    /// Back up a target now; waits, shows progress on stderr, prints the new id on stdout.
    Backup {
        /// The target to back up (see `dsctl agents` or `dsctl health`).
        target: String,
        /// A note kept with the backup (shown by `list` and `get`).
        #[arg(long, value_name = "TEXT")]
        label: Option<String>,
        /// A base backup of the whole cluster (pg_basebackup) for
        /// point-in-time restores, instead of a pg_dump of the database. The
        /// agent must stream WAL (DATASAVER_WAL=stream): the backup is
        /// completed only when the WAL to its end is stored.
        #[arg(long)]
        physical: bool,
    },
    /// Restore a backup, or some of its tables or schemas, into a new database (default <dbname>_restored_<time>).
    Restore(RestoreArgs),
    /// Re-read a backup from storage, check its BLAKE3 checksum and its archive's table of contents; with --restore, prove it restores (a drill).
    Verify {
        /// Backup id.
        id: String,
        /// A restore drill: restore the backup into a scratch database
        /// (datasaver_drill_<id>, on DATASAVER_DRILL_DATABASE_URL's server when
        /// the agent has one, else on its own), check every table has the rows
        /// recorded at backup time, drop it. The result is kept with the backup
        /// (`dsctl list` PROVEN, `dsctl get`).
        #[arg(long)]
        restore: bool,
    },
    /// Write a backup's plain pg_dump archive to a file, to restore it without datasaver.
    ///
    /// The stored bytes are checked against their checksum, decrypted with
    /// --identity (for an encrypted backup), decompressed, and checked
    /// against the checksum of pg_dump's output recorded at backup time. FILE
    /// appears only when every check passed; it is never overwritten. Then:
    /// `pg_restore -d NEWDB FILE` (custom format).
    Export {
        /// Backup id.
        id: String,
        /// Where to write the archive (must not exist).
        #[arg(long, value_name = "FILE", required_unless_present = "globals")]
        out: Option<PathBuf>,
        /// Of a whole-server backup, the archive of this database (which
        /// ones it holds: `dsctl get ID`).
        #[arg(long, value_name = "NAME")]
        database: Option<String>,
        /// Where to write the backup's globals: the cluster's roles, their
        /// memberships and settings as SQL (`pg_dumpall --globals-only`;
        /// must not exist). Apply what you need with psql.
        #[arg(long, value_name = "FILE")]
        globals: Option<PathBuf>,
        /// The age identity file (AGE-SECRET-KEY-1…) for an encrypted backup.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
    /// Cancel a running job: the agent stops it, the job is recorded as cancelled, nothing is stored.
    ///
    /// ID is a backup id (running backups are listed by `dsctl list`; `dsctl
    /// backup` names its backup when it starts) or a job id; with --target,
    /// every running job of that target is cancelled.
    Cancel {
        /// Backup id (or job id) of the running job.
        #[arg(required_unless_present = "target", conflicts_with = "target")]
        id: Option<String>,
        /// Cancel every running job of this target.
        #[arg(long, value_name = "TARGET")]
        target: Option<String>,
    },
    /// Catalog maintenance: rebuild the catalog from the meta files in storage.
    #[command(subcommand)]
    Catalog(CatalogCmd),
    /// Apply retention now: delete what the GFS policy no longer keeps.
    ///
    /// With --dry-run, print every backup with the rule that keeps it or the
    /// reason it would go, and delete nothing.
    Cleanup {
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// Show what would be deleted and why; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Pin a backup: retention never deletes it.
    Pin {
        /// Backup id.
        id: String,
    },
    /// Unpin a backup: retention applies to it again.
    Unpin {
        /// Backup id.
        id: String,
    },
    /// Delete one backup (object, meta file and catalog row).
    Delete {
        /// Backup id.
        id: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Also delete the newest completed backup of its target.
        #[arg(long)]
        force: bool,
    },
    /// Per target: status, last and next backup, number of backups, storage used; then the fleet.
    ///
    /// STATUS is healthy, degraded or unhealthy; NOTE says why when it is not
    /// healthy (or that there is no backup yet). The last line sums up the
    /// fleet: targets by status, backups, bytes stored, agents connected and
    /// the backup queue. Times are UTC.
    Health,
    /// Print a new age identity (AGE-SECRET-KEY-1…) and its recipient (age1…) for backup encryption.
    ///
    /// Give the recipient to agents as DATASAVER_ENCRYPTION_RECIPIENT; keep the identity
    /// somewhere safe and hand it to the agent that restores as DATASAVER_ENCRYPTION_IDENTITY_FILE.
    /// Without it, encrypted backups cannot be restored by anyone.
    Keygen {
        /// Write the identity to this file (created 0600, never overwritten) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Print a shell completion script for dsctl on stdout.
    ///
    /// bash: dsctl completion bash > /etc/bash_completion.d/dsctl
    ///
    /// zsh:  dsctl completion zsh > "${fpath[1]}/_dsctl"
    ///
    /// fish: dsctl completion fish > ~/.config/fish/completions/dsctl.fish
    Completion {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
struct RestoreArgs {
    /// Backup id (or use --target with --latest / --at).
    id: Option<String>,
    /// Restore the newest backup of this target (with --latest or --at).
    #[arg(long, conflicts_with = "id")]
    target: Option<String>,
    /// With --target: the newest completed backup.
    #[arg(long, requires = "target", conflicts_with = "at")]
    latest: bool,
    /// With --target: the newest completed backup at or before this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long, requires = "target", value_name = "TIME")]
    at: Option<String>,
    /// Database to restore into (created if missing). Of a whole-server
    /// backup, with --database: the name that database gets.
    #[arg(long, value_name = "NAME")]
    target_db: Option<String>,
    /// Of a whole-server backup, only this database (without it, every
    /// database comes back under its own name).
    #[arg(long, value_name = "NAME")]
    database: Option<String>,
    /// Replace an existing non-empty database (its connections are terminated).
    #[arg(long)]
    force: bool,
    /// Download, checksum and list the archive; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Restore only this table (repeatable), with its indexes, constraints,
    /// triggers, grants and comments. Names are exact and case-sensitive.
    #[arg(long, value_name = "SCHEMA.NAME")]
    table: Vec<String>,
    /// Restore only this schema and everything in it (repeatable).
    #[arg(long, value_name = "NAME")]
    schema: Vec<String>,
    /// With --table/--schema: add them to an existing database (--target-db,
    /// default the agent's own) instead of a new one. Refused, changing
    /// nothing, when any of them already exists there.
    #[arg(long)]
    into_existing: bool,
    /// A point-in-time restore of the whole cluster (a base backup and the
    /// WAL after it) into --data-dir on the agent's host; the agent runs the
    /// recovery with the server's binaries and leaves a promoted data
    /// directory to start as usual. With a base backup's id: to its end;
    /// with --target: to --at TIME, --lsn LSN or --latest. Every WAL file
    /// needed is proven stored before anything is written.
    #[arg(long, requires = "data_dir")]
    physical: bool,
    /// With --physical: the data directory to write, absent or empty
    /// (--force replaces a stopped cluster's; refused while a postmaster runs on it).
    #[arg(long, value_name = "DIR", requires = "physical")]
    data_dir: Option<String>,
    /// With --physical --target: stop at this WAL position (e.g. 0/3000060).
    #[arg(long, value_name = "LSN", requires = "physical", requires = "target", conflicts_with_all = ["at", "latest"])]
    lsn: Option<String>,
}

#[derive(Subcommand)]
enum CatalogCmd {
    /// Re-read every meta file in storage and add the backups the catalog lacks.
    ///
    /// Objects without a meta file, and meta files whose object is missing or has
    /// the wrong size, are reported and not imported.
    Rebuild,
}

#[derive(Subcommand)]
enum TargetsCmd {
    /// Release a target from the cluster its WAL is bound to, so the next
    /// cluster that streams for it (a rebuilt server, a new `initdb`) starts
    /// a new WAL series. Until then, WAL from another cluster is refused
    /// (alert `wal.sysid_mismatch`). The old series stays stored.
    Rebind {
        /// The target.
        target: String,
    },
}

#[derive(Subcommand)]
enum TokensCmd {
    /// Create a token; it is printed once, on stdout (`T=$(dsctl tokens create --target app)`).
    ///
    /// The token holds the coordinator's address and the fingerprint of the
    /// fleet CA, so the agent checks it is talking to this coordinator
    /// before it sends the token's secret. The coordinator keeps only a hash.
    Create {
        /// A target agents joining with it may serve (repeat for more; `acme-*` matches by prefix).
        #[arg(long, value_name = "T", required = true)]
        target: Vec<String>,
        /// How long the token may be used to join (e.g. 30m, 24h, 7d).
        #[arg(long, default_value = "24h", value_name = "DURATION")]
        ttl: String,
        /// How many agents may join with it (0: any number until it expires).
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// The coordinator's address as agents reach it (default: --coordinator).
        /// An agent's DATASAVER_COORDINATOR_URL overrides it.
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
    /// List tokens: their targets, state, expiry, uses and the agents that joined.
    List,
    /// Revoke a token: no agent can join with it any more.
    Revoke {
        /// The token's id (from `dsctl tokens list`).
        id: String,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a fleet CA plus coordinator and operator certificates in DIR.
    Init {
        /// Directory to write ca.crt, ca.key, coordinator.crt/.key and operator.crt/.key to.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Coordinator host names / IPs (default: localhost, 127.0.0.1).
        #[arg(long, value_name = "NAME")]
        san: Vec<String>,
        /// Name in the operator certificate.
        #[arg(long, default_value = "admin", value_name = "NAME")]
        operator: String,
        /// Validity of the coordinator and operator certificates, in days
        /// (the CA itself is valid for at least ten years).
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
        /// Also write the enrollment CA (enrollment-ca.crt/.key), an
        /// intermediate of the fleet CA that the coordinator signs joining
        /// agents' certificates with (DATASAVER_ENROLLMENT_CA_CERT/_KEY), so
        /// agents join with `dsctl tokens create` tokens instead of PEM files.
        /// With an existing ca.crt/ca.key in DIR, only the enrollment CA is
        /// written.
        #[arg(long)]
        enrollment: bool,
    },
    /// Issue an agent or operator certificate from the CA in --ca DIR.
    ///
    /// An agent certificate names the targets the agent may serve (--target,
    /// patterns like `acme-*` allowed); the coordinator refuses any other.
    /// An operator certificate carries a role and a scope:
    ///   viewer    agents, list, get, health, targets
    ///   operator  also backup, verify, restore into a new database, pin/unpin, cancel
    ///   admin     also delete, cleanup, catalog rebuild, restore --force
    /// A scoped operator (--scope acme-*) sees and acts on matching targets only.
    Issue {
        /// Directory holding the fleet's ca.crt and ca.key.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Agent name (the identity its targets are bound to).
        #[arg(
            long,
            value_name = "NAME",
            conflicts_with = "operator",
            required_unless_present = "operator"
        )]
        agent: Option<String>,
        /// Operator name (a person or a script that runs dsctl).
        #[arg(long, value_name = "NAME")]
        operator: Option<String>,
        /// A target the agent may serve (repeat for more; `acme-*` matches by prefix).
        #[arg(long, value_name = "T", requires = "agent")]
        target: Vec<String>,
        /// The operator's role: viewer, operator or admin.
        #[arg(
            long,
            value_name = "ROLE",
            requires = "operator",
            default_value = "operator"
        )]
        role: String,
        /// Targets the operator may see and act on (repeat for more; default `*`).
        #[arg(long, value_name = "PATTERN", requires = "operator")]
        scope: Vec<String>,
        /// Directory to write NAME.crt, NAME.key and ca.crt to.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity of the certificate, in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Revoke a certificate: adds it to DIR/crl.pem, signed by the fleet CA.
    ///
    /// Coordinators whose DATASAVER_TLS_CRL names that file (or a copy of it)
    /// refuse the certificate from then on and close its open connections.
    /// Each revocation is also logged in DIR/revocations.log.
    Revoke {
        /// Directory holding the fleet's ca.crt, ca.key and crl.pem.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The certificate to revoke (PEM).
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "serial",
            required_unless_present = "serial"
        )]
        cert: Option<PathBuf>,
        /// Its serial number in hex (colons and any case allowed), when the file is gone.
        #[arg(long, value_name = "HEX")]
        serial: Option<String>,
        /// Why; a standard reason as first word (keyCompromise, superseded,
        /// affiliationChanged, cessationOfOperation, privilegeWithdrawn, ...)
        /// goes into the CRL, the whole text into revocations.log.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
}

fn print_revoked(o: &crl::Outcome, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "certificate": o.subject,
                "serial": o.serial,
                "already_revoked": o.already.is_some(),
                "reason": o.reason,
                "crl": o.crl,
                "crl_number": o.number,
                "revoked": o.count,
            })
        );
        return;
    }
    if let Some(at) = o.already {
        let since = chrono::DateTime::from_timestamp(at, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_else(|| at.to_string());
        println!(
            "{} (serial {}) is already revoked (since {since}, reason {}): {} is unchanged",
            o.subject,
            o.serial,
            o.reason,
            o.crl.display()
        );
        return;
    }
    println!(
        "revoked {} (serial {}), reason {}",
        o.subject, o.serial, o.reason
    );
    println!(
        "wrote {} (CRL number {}, {} revoked certificate{}); logged in {}",
        o.crl.display(),
        o.number,
        o.count,
        if o.count == 1 { "" } else { "s" },
        o.log.display()
    );
    println!(
        "coordinators with DATASAVER_TLS_CRL pointing at this file pick it up within {} seconds, refuse the certificate and close its open connections; copy it to coordinators that read it elsewhere",
        datasaver_common::crl::RELOAD_SECS
    );
}

/// With no TLS setting at all, the operator certificate a standalone
/// coordinator made for itself (`DATASAVER_TLS_AUTO`) in
/// `$DATASAVER_DATA_DIR/pki/`, if there is one: `dsctl` inside that
/// container needs no flags.
fn local_pki(
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>) {
    if ca.is_some() || cert.is_some() || key.is_some() {
        return (ca, cert, key);
    }
    let Some(dir) = std::env::var_os("DATASAVER_DATA_DIR").map(|d| PathBuf::from(d).join("pki"))
    else {
        return (ca, cert, key);
    };
    if !dir.join("operator.crt").is_file() {
        return (ca, cert, key);
    }
    (
        Some(dir.join("ca.crt")),
        Some(dir.join("operator.crt")),
        Some(dir.join("operator.key")),
    )
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    datasaver_common::tls::install_crypto_provider();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("dsctl: {msg}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    if let Cmd::Certs(c) = &cli.cmd {
        return match c {
            CertsCmd::Init {
                out,
                san,
                operator,
                days,
                force,
                enrollment,
            } => {
                let existing = out.join("ca.crt").exists() && out.join("ca.key").exists();
                if !(*enrollment && existing && !*force) {
                    certs::init(out, san, operator, *days, *force)?;
                    println!("wrote ca.crt ca.key coordinator.crt coordinator.key operator.crt operator.key crl.pem to {}", out.display());
                }
                if *enrollment {
                    certs::init_enrollment(out, *force)?;
                    println!(
                        "wrote {} {} to {}, signed by the fleet CA there",
                        certs::ENROLLMENT_CERT,
                        certs::ENROLLMENT_KEY,
                        out.display()
                    );
                    println!("give them to the coordinator (DATASAVER_ENROLLMENT_CA_CERT, DATASAVER_ENROLLMENT_CA_KEY); agents then join with a token from `dsctl tokens create`");
                }
                println!("keep ca.key offline if you can: whoever has it can issue certificates for your fleet");
                Ok(())
            }
            CertsCmd::Issue {
                ca,
                agent,
                operator,
                target,
                role,
                scope,
                out,
                days,
                force,
            } => {
                let (kind, name, grants) = match (agent, operator) {
                    (Some(a), _) => {
                        if target.is_empty() {
                            bail!("--agent {a} needs at least one --target T: the targets this agent may serve (a pattern like acme-* is allowed)");
                        }
                        let g = certs::Grants {
                            targets: target.clone(),
                            ..Default::default()
                        };
                        ("agent", a, g)
                    }
                    (None, Some(o)) => {
                        let access =
                            datasaver_common::tls::Access::parse(role).ok_or_else(|| {
                                anyhow::anyhow!("--role {role:?} is not viewer, operator or admin")
                            })?;
                        let g = certs::Grants {
                            access: Some(access),
                            scopes: scope.clone(),
                            ..Default::default()
                        };
                        ("operator", o, g)
                    }
                    (None, None) => bail!("give --agent NAME or --operator NAME"),
                };
                let expires = certs::issue(ca, kind, name, &grants, out, *days, *force)?;
                println!("wrote {name}.crt {name}.key ca.crt to {}", out.display());
                match kind {
                    "agent" => println!("agent {name} may serve: {}", grants.targets.join(", ")),
                    _ => println!(
                        "operator {name}: role {role}, scope {}",
                        if grants.scopes.is_empty() {
                            "*".to_string()
                        } else {
                            grants.scopes.join(", ")
                        }
                    ),
                }
                println!("expires {}", certs::format_expiry(expires));
                Ok(())
            }
            CertsCmd::Revoke {
                ca,
                cert,
                serial,
                reason,
            } => {
                let o = crl::revoke(ca, cert.as_deref(), serial.as_deref(), reason.as_deref())?;
                print_revoked(&o, cli.json);
                Ok(())
            }
        };
    }
    if let Cmd::Completion { shell } = cli.cmd {
        let mut cmd = Cli::command();
        clap_complete::generate(shell, &mut cmd, "dsctl", &mut std::io::stdout());
        return Ok(());
    }
    if let Cmd::Keygen { out } = &cli.cmd {
        let (secret, public) = datasaver_common::crypt::generate();
        let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let file = format!("# created: {created}\n# public key: {public}\n{secret}\n");
        match out {
            Some(path) => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .with_context(|| {
                        format!("cannot create {} (it must not exist yet)", path.display())
                    })?;
                f.write_all(file.as_bytes())
                    .with_context(|| format!("cannot write {}", path.display()))?;
                if cli.json {
                    println!(
                        "{}",
                        serde_json::json!({ "recipient": public, "identity_file": path })
                    );
                } else {
                    println!("{public}");
                }
            }
            None => {
                if cli.json {
                    println!(
                        "{}",
                        serde_json::json!({ "recipient": public, "identity": secret })
                    );
                } else {
                    print!("{file}");
                }
            }
        }
        return Ok(());
    }
    let (ca, cert, key) = local_pki(
        cli.tls_ca.clone(),
        cli.tls_cert.clone(),
        cli.tls_key.clone(),
    );
    let (mut c, why) = client::connect(&cli.coordinator, ca, cert, key).await?;
    let mode = progress::Mode::choose(cli.quiet, cli.json);
    match cli.cmd {
        Cmd::Certs(_) | Cmd::Keygen { .. } | Cmd::Completion { .. } => Ok(()),
        Cmd::Catalog(CatalogCmd::Rebuild) => {
            let r = why
                .answer(
                    c.rebuild_catalog(datasaver_common::proto::RebuildCatalogRequest {})
                        .await,
                )
                .await?;
            output::rebuild(&r.imported, r.already_known, &r.problems, cli.json);
            Ok(())
        }
        Cmd::Agents => {
            let agents = why
                .answer(c.list_agents(ListAgentsRequest {}).await)
                .await?
                .agents;
            output::agents(&agents, cli.json);
            Ok(())
        }
        Cmd::Tokens(TokensCmd::Create {
            target,
            ttl,
            uses,
            url,
        }) => {
            let ttl = datasaver_common::config::parse_duration("--ttl", &ttl)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let r = why
                .answer(
                    c.create_token(CreateTokenRequest {
                        targets: target,
                        ttl_seconds: ttl.as_secs(),
                        uses,
                        url: url.unwrap_or_else(|| cli.coordinator.clone()),
                    })
                    .await,
                )
                .await?;
            output::token_created(&r, cli.json);
            Ok(())
        }
        Cmd::Tokens(TokensCmd::List) => {
            let r = why
                .answer(c.list_tokens(ListTokensRequest {}).await)
                .await?;
            output::tokens(&r.tokens, cli.json);
            Ok(())
        }
        Cmd::Tokens(TokensCmd::Revoke { id }) => {
            let t = why
                .answer(c.revoke_token(RevokeTokenRequest { id }).await)
                .await?;
            output::token_revoked(&t, cli.json);
            Ok(())
        }
        Cmd::Targets {
            cmd: Some(TargetsCmd::Rebind { target }),
        } => {
            let r = why
                .answer(
                    c.rebind_target(datasaver_common::proto::RebindTargetRequest {
                        target: target.clone(),
                    })
                    .await,
                )
                .await?;
            output::rebound(&target, &r.previous_system_identifier, cli.json);
            Ok(())
        }
        Cmd::Wal { target } => {
            let r = why
                .answer(
                    c.list_wal(datasaver_common::proto::ListWalRequest {
                        target: target.unwrap_or_default(),
                    })
                    .await,
                )
                .await?;
            output::wal(&r.targets, cli.json);
            Ok(())
        }
        Cmd::Targets { cmd: None } => {
            let targets = why
                .answer(c.list_targets(ListTargetsRequest {}).await)
                .await?
                .targets;
            output::targets(&targets, cli.json);
            Ok(())
        }
        Cmd::List { target } => {
            let backups = why
                .answer(
                    c.list_backups(ListBackupsRequest {
                        target: target.unwrap_or_default(),
                    })
                    .await,
                )
                .await?
                .backups;
            output::backups(&backups, cli.json);
            Ok(())
        }
        Cmd::Get { id } => {
            let b = why
                .answer(c.get_backup(GetBackupRequest { id }).await)
                .await?;
            output::backup_detail(&b, cli.json);
            Ok(())
        }
        Cmd::Backup {
            target,
            label,
            physical,
        } => {
            let stream = why
                .answer(
                    c.start_backup(StartBackupRequest {
                        target,
                        label,
                        physical,
                    })
                    .await,
                )
                .await?;
            let mut p = Progress::new(mode, progress::Counter::Raw);
            let done = follow(stream, &why, &mut p).await?;
            let Some(b) = done.backup else {
                p.failed();
                bail!("the coordinator reported success without the backup: see `dsctl list`");
            };
            // The coordinator's message says what else there is to know
            // (a whole server's databases that came or went).
            let source = if physical { "pg_basebackup" } else { "pg_dump" };
            p.done(Some(format!(
                "{}: {} stored ({} from {source}) in {:.1} s",
                if done.message.is_empty() {
                    format!("backup {} completed", b.id)
                } else {
                    done.message.clone()
                },
                output::human_bytes(b.stored_bytes),
                output::human_bytes(b.raw_bytes),
                b.duration_ms as f64 / 1000.0
            )));
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&output::backup_json(&b))?
                );
            } else {
                println!("{}", b.id);
            }
            Ok(())
        }
        Cmd::Restore(a) => {
            if a.id.is_none() && a.target.is_none() {
                bail!("give a backup id, or --target T with --latest or --at TIME");
            }
            if a.target.is_some() && !a.latest && a.at.is_none() && a.lsn.is_none() {
                bail!("--target needs --latest or --at TIME (or, with --physical, --lsn LSN)");
            }
            datasaver_common::names::check_restore_part(
                &a.table,
                &a.schema,
                a.into_existing,
                a.force,
                a.dry_run,
            )
            .map_err(anyhow::Error::msg)?;
            let stream = why
                .answer(
                    c.restore(RestoreRequest {
                        id: a.id.unwrap_or_default(),
                        target: a.target.unwrap_or_default(),
                        latest: a.latest,
                        at: a.at.unwrap_or_default(),
                        target_db: a.target_db.unwrap_or_default(),
                        force: a.force,
                        dry_run: a.dry_run,
                        tables: a.table,
                        schemas: a.schema,
                        into_existing: a.into_existing,
                        database: a.database.unwrap_or_default(),
                        physical: a.physical,
                        data_dir: a.data_dir.unwrap_or_default(),
                        lsn: a.lsn.unwrap_or_default(),
                    })
                    .await,
                )
                .await?;
            let mut p = Progress::new(mode, progress::Counter::Stored);
            let done = follow(stream, &why, &mut p).await?;
            p.done(None);
            output::job_done(&done, cli.json, true);
            Ok(())
        }
        Cmd::Cleanup { target, dry_run } => {
            let r = why
                .answer(
                    c.cleanup(CleanupRequest {
                        target: target.unwrap_or_default(),
                        dry_run,
                    })
                    .await,
                )
                .await?;
            output::cleanup(&r, cli.json);
            if !r.errors.is_empty() {
                bail!(
                    "{} backup(s) could not be deleted: {}",
                    r.errors.len(),
                    r.errors.join("; ")
                );
            }
            Ok(())
        }
        cmd @ (Cmd::Pin { .. } | Cmd::Unpin { .. }) => {
            let (id, pinned) = match cmd {
                Cmd::Pin { id } => (id, true),
                Cmd::Unpin { id } => (id, false),
                _ => unreachable!("matched Pin or Unpin above"),
            };
            let b = why.answer(c.pin(PinRequest { id, pinned }).await).await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&output::backup_json(&b))?
                );
            } else {
                println!("{} {}", if pinned { "pinned" } else { "unpinned" }, b.id);
            }
            Ok(())
        }
        Cmd::Delete { id, yes, force } => {
            let b = why
                .answer(c.get_backup(GetBackupRequest { id: id.clone() }).await)
                .await?;
            if !yes {
                confirm(&format!(
                    "delete backup {} of {} ({}, {}, {})?",
                    b.id,
                    b.target,
                    b.created_at,
                    output::human_bytes(b.stored_bytes),
                    b.status
                ))?;
            }
            let r = why
                .answer(c.delete_backup(DeleteBackupRequest { id, force }).await)
                .await?;
            if cli.json {
                println!("{}", serde_json::json!({ "deleted": r.id }));
            } else {
                println!("deleted {}", r.id);
            }
            Ok(())
        }
        Cmd::Cancel { id, target } => {
            let r = why
                .answer(
                    c.cancel(CancelRequest {
                        id: id.unwrap_or_default(),
                        target: target.unwrap_or_default(),
                    })
                    .await,
                )
                .await?;
            output::cancelled(&r.jobs, cli.json);
            Ok(())
        }
        Cmd::Export {
            id,
            out,
            database,
            globals,
            identity,
        } => {
            let dump = match &database {
                Some(d) => {
                    datasaver_common::names::validate_database_name(d)
                        .map_err(|e| anyhow::anyhow!("--database: {e}"))?;
                    if out.is_none() {
                        bail!("--database {d} names the archive to write: add --out FILE");
                    }
                    datasaver_common::names::database_part(d)
                }
                None => String::new(),
            };
            let wanted: Vec<(&str, PathBuf)> = [(dump.as_str(), out), ("globals", globals)]
                .into_iter()
                .filter_map(|(part, f)| f.map(|f| (part, f)))
                .collect();
            if wanted.len() == 2 && wanted[0].1 == wanted[1].1 {
                bail!("--out and --globals name the same file");
            }
            for (_, f) in &wanted {
                export::check_out(f)?;
            }
            for (part, f) in wanted {
                let request = ExportRequest {
                    id: id.clone(),
                    part: part.into(),
                };
                let stream = why.answer(c.export(request).await).await?;
                let part = (!part.is_empty()).then_some(part);
                let done = export::run(stream, part, &f, identity.as_deref(), &why).await?;
                output::exported(&done, cli.json);
            }
            Ok(())
        }
        Cmd::Health => {
            let h = why.answer(c.health(HealthRequest {}).await).await?;
            output::health(&h, cli.json);
            Ok(())
        }
        Cmd::Verify { id, restore } => {
            let stream = why
                .answer(c.verify(VerifyRequest { id, restore }).await)
                .await?;
            let mut p = Progress::new(mode, progress::Counter::Stored);
            let done = follow(stream, &why, &mut p).await?;
            p.done(None);
            output::job_done(&done, cli.json, false);
            Ok(())
        }
    }
}

/// Asks on the terminal; without one, refuses (a script must say --yes).
fn confirm(question: &str) -> Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        bail!(
            "{question} not confirmed: stdin is not a terminal; add --yes to delete without asking"
        );
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        bail!("not deleted");
    }
}

/// Shows progress of a job until it ends; a failed job is an error.
async fn follow(
    mut stream: tonic::Streaming<datasaver_common::proto::JobEvent>,
    why: &client::Explainer,
    p: &mut Progress,
) -> Result<JobDone> {
    loop {
        let ev = match stream.message().await {
            Ok(Some(ev)) => ev,
            // The coordinator had answered, so TLS was fine: the connection
            // itself went away (a killed or restarting coordinator).
            Err(s) => {
                p.failed();
                return Err(why.stream_error(s));
            }
            Ok(None) => {
                p.failed();
                return Err(why.stream_ended());
            }
        };
        match ev.event {
            Some(job_event::Event::Progress(pr)) => p.update(&pr),
            Some(job_event::Event::Done(d)) => {
                if d.ok {
                    return Ok(d);
                }
                p.failed();
                bail!("{}", d.error);
            }
            None => {}
        }
    }
}
