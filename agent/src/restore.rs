//! The restore job (and verify, as `pg_restore --list`): decide whether this
//! agent can read the backup, prepare the database through [`crate::pg`],
//! and run the pipeline from the download into pg_restore (see
//! [`crate::pipeline`]), reading the stored object once. The checksum is
//! checked as the bytes arrive and the archive's tail is held back until it
//! is confirmed, so pg_restore (in one transaction) can never commit a
//! restore of bytes that do not match; a mismatch is reported as such
//! (`ChecksumMismatch`). A database the restore created is dropped whenever
//! the restore does not succeed — failed, corrupt or cancelled — and with
//! `--force` the existing database is replaced only after a full success.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use datasaver_common::codec::Compression;
use datasaver_common::proto::agent_service_client::AgentServiceClient;
use datasaver_common::proto::{BackupPart, DownloadRequest, JobResult, RestoreJob, RestoreMode};
use tonic::transport::Channel;

use crate::config::TargetConfig;
use crate::jobs::{Job, JobCancel, JobContext, JobError, Stop};
use crate::pg::PgTools;
use crate::pipeline::transform::{Decode, Expected};
use crate::pipeline::{self, Feed, PipelineError};
use crate::progress::{Counters, Reporter};

pub struct Outcome {
    pub message: String,
    pub target_db: String,
    pub toc_entries: u64,
}

impl Job for RestoreJob {
    const WHAT: &'static str = "restore job";

    fn job_id(&self) -> &str {
        &self.job_id
    }

    fn span(&self) -> tracing::Span {
        let span = tracing::info_span!("agent.restore", target = %self.target, backup = %self.backup_id, mode = self.mode);
        datasaver_common::telemetry::set_parent(&span, &self.trace_context);
        span
    }

    async fn run(self, ctx: JobContext) -> Result<JobResult, JobError> {
        // A whole-server backup is read one database at a time.
        let (c, t, tools, r, cancel) =
            (ctx.client, ctx.target, ctx.tools, ctx.reporter, ctx.cancel);
        if self.physical.is_some() {
            let message = crate::pitr::run(c, self, t, tools, r, cancel).await?;
            return Ok(JobResult {
                message,
                ..Default::default()
            });
        }
        let o = if self.databases.is_empty() {
            run(c, self, t, tools, r, cancel).await?
        } else {
            crate::server::run(c, self, t, tools, r, cancel).await?
        };
        Ok(JobResult {
            message: o.message,
            target_db: o.target_db,
            toc_entries: o.toc_entries,
            ..Default::default()
        })
    }
}

/// How to read the backup of `job` back, decided before anything is
/// touched: its codec, and the identities when it is encrypted (refused
/// when this agent cannot decrypt it).
pub(crate) fn decode_for(job: &RestoreJob, target: &TargetConfig) -> Result<Decode, JobError> {
    let codec: Compression = job
        .compression
        .parse()
        .map_err(|e| format!("backup {}: {e}", job.backup_id))?;
    // Decide before touching anything whether this agent can decrypt it.
    let identities = if job.encrypted {
        let fps = target.identities.fingerprints();
        if fps.is_empty() {
            return Err(format!(
                "backup {} is encrypted to recipient {}; set DATASAVER_ENCRYPTION_IDENTITY_FILE on the agent to the matching identity (nothing was changed)",
                job.backup_id, job.encryption_recipient
            ).into());
        }
        if !job.encryption_recipient.is_empty() && !fps.contains(&job.encryption_recipient) {
            return Err(format!(
                "backup {} is encrypted to recipient {}, but the agent's identity file holds {}; nothing was changed",
                job.backup_id,
                job.encryption_recipient,
                fps.join(", ")
            ).into());
        }
        Some(target.identities.0.clone())
    } else {
        None
    };
    Ok(Decode { codec, identities })
}

/// The error of a restore stopped by `cancel`.
pub(crate) fn stopped(cancel: &JobCancel) -> JobError {
    match cancel.stop() {
        Some(stop @ Stop::Coordinator(_)) => stop.message("restore").into(),
        _ => "restore cancelled (agent shutting down or connection lost)".into(),
    }
}

/// Streams the backup into a freshly started `cmd` (pg_restore); returns
/// what it wrote to stdout.
pub(crate) async fn stream_into(
    cmd: std::process::Command,
    client: &mut AgentServiceClient<Channel>,
    job: &RestoreJob,
    decode: Decode,
    counters: Arc<Counters>,
    cancel: &JobCancel,
    reads_prefix_only: bool,
) -> Result<String, JobError> {
    let request = DownloadRequest {
        job_id: job.job_id.clone(),
        backup_id: job.backup_id.clone(),
        part: job.dump_part.clone(),
    };
    let download = tokio::select! {
        r = client.download(request) => r
            .map_err(|s| format!("download failed: {}", s.message()))?
            .into_inner(),
        _ = cancel.cancelled() => return Err(stopped(cancel)),
    };
    let expected = Expected {
        backup_id: job.backup_id.clone(),
        checksum: job.checksum.clone(),
        stored_bytes: job.stored_bytes,
    };
    let into = Feed {
        cmd,
        name: "pg_restore",
        reads_prefix_only,
    };
    pipeline::download_into(download, &expected, decode, into, counters, cancel.token())
        .await
        .map_err(|e| match e {
            PipelineError::Corrupt(m) => JobError::checksum_mismatch(m),
            PipelineError::Cancelled => stopped(cancel),
            e @ (PipelineError::Failed(_)
            | PipelineError::ChildStopped(_)
            | PipelineError::UploadClosed) => e.to_string().into(),
        })
}

/// The scratch database of a drill of `backup_id`: `datasaver_drill_` and
/// as much of the id as fits.
fn drill_db_name(backup_id: &str) -> String {
    let mut n = format!("datasaver_drill_{backup_id}");
    n.truncate(63);
    n
}

/// Compares the rows of every table in database `name` with the counts
/// recorded at backup time; a summary, or what differs.
async fn check_rows(
    tools: &PgTools,
    db: &crate::config::DbConn,
    name: &str,
    job: &RestoreJob,
) -> Result<String, String> {
    use crate::pg::sql;
    if job.table_rows.is_empty() {
        return Ok("its row counts were not recorded (a backup from before they were counted, or no tables): only the restore itself was proven".into());
    }
    let tables: Vec<(String, String)> = job
        .table_rows
        .iter()
        .map(|t| (t.schema.clone(), t.name.clone()))
        .collect();
    let missing = tools
        .lines(db, name, &sql::missing_part(&tables, &[]))
        .await
        .map_err(|e| format!("cannot inspect the scratch database: {e}"))?;
    if !missing.is_empty() {
        return Err(format!(
            "the restored database lacks {}",
            missing.join(", ")
        ));
    }
    let counts = tools
        .lines(db, name, &sql::row_counts(&tables))
        .await
        .map_err(|e| format!("cannot count the restored rows: {e}"))?;
    let mut wrong = Vec::new();
    let mut total = 0u64;
    for (t, line) in job.table_rows.iter().zip(&counts) {
        let got: u64 = line.trim().parse().unwrap_or(u64::MAX);
        total += t.rows;
        if got != t.rows {
            wrong.push(format!(
                "{}.{} has {got} rows, {} were recorded",
                t.schema, t.name, t.rows
            ));
        }
    }
    if counts.len() != job.table_rows.len() {
        return Err(format!(
            "counted {} tables, {} were recorded",
            counts.len(),
            job.table_rows.len()
        ));
    }
    if !wrong.is_empty() {
        let more = wrong.len().saturating_sub(5);
        wrong.truncate(5);
        return Err(format!(
            "{}{}",
            wrong.join("; "),
            if more > 0 {
                format!(" (and {more} more)")
            } else {
                String::new()
            }
        ));
    }
    Ok(format!(
        "every table's rows as recorded ({} tables, {total} rows)",
        job.table_rows.len()
    ))
}

/// The most a part (the globals) may hold; it is read into memory.
const MAX_PART_BYTES: u64 = 64 << 20;

/// Downloads part `part` of the job's backup into memory, checks it against
/// its checksum and returns it decrypted and decompressed.
async fn fetch_part(
    client: &mut AgentServiceClient<Channel>,
    job: &RestoreJob,
    part: &BackupPart,
    decode: &Decode,
    cancel: &JobCancel,
) -> Result<Vec<u8>, JobError> {
    let what = format!("the {} of backup {}", part.name, job.backup_id);
    if part.stored_bytes > MAX_PART_BYTES {
        return Err(format!(
            "{what} hold {} bytes, more than the {MAX_PART_BYTES} a restore reads into memory; nothing was changed",
            part.stored_bytes
        )
        .into());
    }
    let request = DownloadRequest {
        job_id: job.job_id.clone(),
        backup_id: job.backup_id.clone(),
        part: part.name.clone(),
    };
    let mut stream = tokio::select! {
        r = client.download(request) => r
            .map_err(|s| format!("download of {what} failed: {}", s.message()))?
            .into_inner(),
        _ = cancel.cancelled() => return Err(stopped(cancel)),
    };
    let mut stored = Vec::new();
    loop {
        let next = tokio::select! {
            m = stream.message() => m,
            _ = cancel.cancelled() => return Err(stopped(cancel)),
        };
        match next {
            Ok(Some(c)) => {
                stored.extend_from_slice(&c.data);
                if stored.len() as u64 > part.stored_bytes {
                    break;
                }
            }
            Ok(None) => break,
            Err(s) if s.code() == tonic::Code::DataLoss => {
                return Err(JobError::checksum_mismatch(s.message().to_string()))
            }
            Err(s) => return Err(format!("download of {what} failed: {}", s.message()).into()),
        }
    }
    let (part, decode, backup_id) = (part.clone(), decode.clone(), job.backup_id.clone());
    tokio::task::spawn_blocking(move || {
        let mut sum = datasaver_common::checksum::Checksum::new();
        sum.update(&stored);
        let got = sum.finish();
        if got != part.checksum || stored.len() as u64 != part.stored_bytes {
            return Err(JobError::checksum_mismatch(format!(
                "the {} of backup {backup_id} are corrupt: checksum {got} ({} bytes), {} ({} bytes) recorded; nothing was changed",
                part.name,
                stored.len(),
                part.checksum,
                part.stored_bytes
            )));
        }
        let mut plain = Vec::new();
        std::io::Read::read_to_end(
            &mut decode.reader(&stored[..], &backup_id).map_err(|e| e.to_string())?,
            &mut plain,
        )
        .map_err(|e| format!("the {} of backup {backup_id} cannot be read: {e}", part.name))?;
        Ok(plain)
    })
    .await
    .map_err(|e| JobError::from(format!("reading {what} failed: {e}")))?
}

pub(crate) fn valid_db_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--target-db {name:?} is not accepted: use 1-63 letters, digits, '_' or '-'"
        ))
    }
}

pub async fn run(
    mut client: AgentServiceClient<Channel>,
    job: RestoreJob,
    target: TargetConfig,
    tools: PgTools,
    reporter: Reporter,
    cancel: JobCancel,
) -> Result<Outcome, JobError> {
    let decode = decode_for(&job, &target)?;
    let drill = job.mode == RestoreMode::Drill as i32;
    // A drill runs on the drill server when the agent has one.
    let db = match (&target.drill_db, drill) {
        (Some(d), true) => d,
        _ => &target.db,
    };
    let started = std::time::Instant::now();
    let counters = Arc::new(Counters::default());

    if job.mode == RestoreMode::List as i32 {
        reporter.phase("list", "reading the archive's table of contents");
        let ticker = reporter.start_ticker("list", counters.clone());
        let out = stream_into(
            tools.pg_restore_list(db),
            &mut client,
            &job,
            decode,
            counters,
            &cancel,
            true,
        )
        .await;
        ticker.abort();
        let out = out?;
        let entries = out
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with(';'))
            .count() as u64;
        if entries == 0 {
            return Err(format!(
                "backup {}: the archive's table of contents is empty",
                job.backup_id
            )
            .into());
        }
        return Ok(Outcome {
            message: format!(
                "backup {}: checksum {} verified; archive readable, {entries} table-of-contents entries",
                job.backup_id, job.checksum
            ),
            target_db: String::new(),
            toc_entries: entries,
        });
    }

    let name = if drill {
        drill_db_name(&job.backup_id)
    } else if job.target_db.is_empty() {
        datasaver_common::names::default_restore_db(&db.dbname, chrono::Utc::now())
    } else {
        job.target_db.clone()
    };
    valid_db_name(&name)?;
    let admin_db = crate::pg::admin_db(db, &name);
    reporter.phase("prepare", &format!("preparing database {name}"));
    // A server or pg_restore too old for this backup is refused before
    // anything is created, naming both versions (not pg_restore's failure
    // halfway through).
    let versions = async {
        let server = tools.server_version(db).await?;
        let pg_restore = tools.tool_version("pg_restore").await?;
        let available = if job.extensions.is_empty() {
            Vec::new()
        } else {
            tools.available_extensions(db, &admin_db).await?
        };
        let roles = if job.roles.is_empty() {
            Vec::new()
        } else {
            tools.roles(db, &admin_db).await?
        };
        Ok::<_, String>((server, pg_restore, available, roles))
    };
    let (server, pg_restore, available, mut roles) = tokio::select! {
        r = versions => r.map_err(|e| format!("cannot check the server before restoring: {e}"))?,
        _ = cancel.cancelled() => return Err(stopped(&cancel)),
    };
    if let Some(problem) = crate::pg::restore_version_problem(
        &job.backup_id,
        &job.server_version,
        &job.pg_dump_version,
        &server,
        &pg_restore,
    ) {
        return Err(problem.into());
    }
    if let Some(problem) =
        crate::pg::missing_extensions(&job.backup_id, &job.extensions, &available, &server)
    {
        return Err(problem.into());
    }
    // Roles the archive needs and the server lacks come from the backup's
    // globals when it has them; only what they cannot supply is refused.
    let mut roles_note = None;
    let lacking = job.roles.iter().any(|r| !roles.contains(r));
    if let (true, Some(part)) = (lacking, &job.globals) {
        reporter.phase(
            "roles",
            "reading the backup's globals for the roles it needs",
        );
        let script = fetch_part(&mut client, &job, part, &decode, &cancel).await?;
        let plan = crate::globals::plan(
            &crate::globals::parse(&String::from_utf8_lossy(&script)),
            &job.roles,
            &roles,
        );
        if !plan.create.is_empty() {
            if cancel.is_cancelled() {
                return Err(stopped(&cancel));
            }
            tools
                .run_script(db, &admin_db, &plan.script)
                .await
                .map_err(|e| {
                    format!(
                        "creating roles {} from backup {}'s globals failed: {e}; nothing was changed",
                        plan.create.join(", "),
                        job.backup_id
                    )
                })?;
            tracing::info!(roles = ?plan.create, "created the roles the backup needs from its globals");
            roles_note = Some(format!(
                "created roles {} from the backup's globals{}",
                plan.create.join(", "),
                if part.role_passwords {
                    ""
                } else {
                    " (the backup holds no role passwords: set them with ALTER ROLE ... PASSWORD)"
                }
            ));
            roles.extend(plan.create);
        }
    }
    if let Some(problem) = crate::pg::missing_roles(&job.backup_id, &job.roles, &roles) {
        return Err(problem.into());
    }
    // Roles created above stay when what follows fails: the error says so.
    let created_roles = roles_note.clone();
    let restored = async {
        if let Some(sel) = crate::part::Selection::of(&job)? {
            let cx = crate::part::Context {
                client: &mut client,
                job: &job,
                decode,
                db,
                tools: &tools,
                reporter: &reporter,
                cancel: &cancel,
            };
            let mut o = crate::part::run(cx, &sel).await?;
            if let Some(n) = roles_note {
                o.message.push_str("; ");
                o.message.push_str(&n);
            }
            return Ok(o);
        }
        // A drill's scratch database left by an earlier drill that was cut off
        // (it is ours by its name) goes first.
        if drill {
            tools
                .drop_database(db, &admin_db, &name)
                .await
                .map_err(|e| format!("cannot drop the drill database {name} left earlier: {e}"))?;
        }
        // Looking is harmless to stop; creating, dropping and swapping run to
        // their end so no database is left half done.
        let exists = tokio::select! {
            r = tools.database_exists(db, &admin_db, &name) => r.map_err(|e| {
                format!(
                    "cannot connect to the server at {}:{}: {e}",
                    db.host, db.port
                )
            })?,
            _ = cancel.cancelled() => return Err(stopped(&cancel)),
        };
        let nonempty = if exists {
            let empty = tokio::select! {
                r = tools.is_empty(db, &name) => r.map_err(|e| format!("cannot inspect existing database {name}: {e}"))?,
                _ = cancel.cancelled() => return Err(stopped(&cancel)),
            };
            !empty
        } else {
            false
        };
        if nonempty && !job.force {
            return Err(format!(
                "database {name} already exists and is not empty; nothing was changed. Restore into a new database with --target-db, or pass --force to replace it"
            ).into());
        }
        // With --force the backup goes into a scratch database first; the
        // existing one is replaced only after the restore fully succeeded.
        let (restore_into, created) = if nonempty {
            let mut base = name.clone();
            base.truncate(40);
            (
                format!("{base}_dsrestore_{:08x}", rand::random::<u32>()),
                true,
            )
        } else if exists {
            (name.clone(), false)
        } else {
            (name.clone(), true)
        };
        if cancel.is_cancelled() {
            return Err(stopped(&cancel));
        }
        // Created the way the original was (owner, encoding, locale), so the
        // restored database is the one that was lost, not one shaped by this
        // server's defaults.
        let mut note = None;
        if created {
            let shape = job.database_shape.clone().unwrap_or_default();
            note = tools
                .create_database_like(db, &admin_db, &restore_into, &shape)
                .await
                .map_err(|e| format!("cannot create database {restore_into}: {e}"))?;
        }
        reporter.phase(
            "restore",
            &format!("restoring {} into {restore_into}", job.backup_id),
        );
        let ticker = reporter.start_ticker("restore", counters.clone());
        let restored = stream_into(
            tools.pg_restore_into(db, &restore_into),
            &mut client,
            &job,
            decode,
            counters.clone(),
            &cancel,
            false,
        )
        .await;
        ticker.abort();
        // A cancel that came as pg_restore finished still wins before the swap.
        let restored = match restored {
            Ok(_) if nonempty && cancel.is_cancelled() => Err(stopped(&cancel)),
            r => r,
        };
        if let Err(e) = restored {
            // Failed, corrupt or cancelled: a database this restore created goes.
            if created {
                if let Err(de) = tools.drop_database(db, &admin_db, &restore_into).await {
                    tracing::error!(database = %restore_into, error = %de, "could not drop the incomplete restore database");
                }
            }
            return Err(e);
        }
        if drill {
            reporter.phase(
                "check",
                "checking every table's rows against the backup's counts",
            );
            let checked = check_rows(&tools, db, &name, &job).await;
            let dropped = tools.drop_database(db, &admin_db, &name).await;
            let summary =
                checked.map_err(|e| format!("drill of backup {} failed: {e}", job.backup_id))?;
            dropped.map_err(|e| {
                format!(
                    "drill of backup {} passed ({summary}), but its scratch database {name} could not be dropped: {e}",
                    job.backup_id
                )
            })?;
            return Ok(Outcome {
                message: format!(
                    "drill of backup {} passed in {:.1} s on {}:{}: restored into a scratch database, {summary}; the scratch database was dropped",
                    job.backup_id,
                    started.elapsed().as_secs_f64(),
                    db.host,
                    db.port
                ),
                target_db: String::new(),
                toc_entries: 0,
            });
        }
        if nonempty {
            tools
                .swap_database(db, &admin_db, &name, &restore_into)
                .await
                .map_err(|e| {
                    format!("restored into {restore_into}, but replacing {name} failed: {e}")
                })?;
        }
        let mut message = format!(
            "restored backup {} into database {name} ({} bytes of archive)",
            job.backup_id,
            counters.raw.load(Ordering::Relaxed)
        );
        if let Some(n) = note {
            message.push_str("; ");
            message.push_str(&n.replace(&restore_into, &name));
        }
        if let Some(n) = roles_note {
            message.push_str("; ");
            message.push_str(&n);
        }
        Ok(Outcome {
            message,
            target_db: name,
            toc_entries: 0,
        })
    }
    .await;
    match (restored, created_roles) {
        (Err(mut e), Some(n)) if !drill => {
            e.message.push_str(&format!(" ({n}; they stay)"));
            Err(e)
        }
        (r, _) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DbConn, Identities};
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};
    use tokio_util::sync::CancellationToken;

    #[test]
    fn database_names_accepted() {
        for ok in ["app", "app_restored-2", &"a".repeat(63)] {
            assert!(valid_db_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a\"b", "a;b", &"a".repeat(64)] {
            let e = valid_db_name(bad).unwrap_err();
            assert!(e.contains("--target-db"), "{e}");
        }
    }

    fn script(path: &std::path::Path, body: &str) {
        std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A restore cancelled by the coordinator while it waits for the
    /// download drops the database it created, and says who cancelled it.
    /// psql is a stand-in that logs the SQL it is given; the coordinator is
    /// a socket that never answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_restore_drops_the_database_it_created() {
        let dir = std::env::temp_dir().join(format!(
            "ds-agent-restore-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("psql.log");
        script(
            &dir.join("psql"),
            &format!(
                "sql=$(cat)\nprintf '%s\\n' \"$sql\" >> '{}'\ncase \"$sql\" in *pg_database*) echo 0;; *server_version_num*) echo '150010|15.10';; esac",
                log.display()
            ),
        );
        script(
            &dir.join("pg_restore"),
            "[ \"$1\" = --version ] && { echo 'pg_restore (PostgreSQL) 15.10'; exit 0; }\nexec sleep 30",
        );
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let channel = tonic::transport::Endpoint::from_shared(format!(
            "http://{}",
            silent.local_addr().unwrap()
        ))
        .unwrap()
        .connect_lazy();
        let target = TargetConfig {
            name: "app".into(),
            db: DbConn {
                host: "127.0.0.1".into(),
                port: 1,
                dbname: "app".into(),
                user: "u".into(),
                password: None,
                sslmode: None,
            },
            schedule: None,
            retention: Default::default(),
            compression: Compression::Zstd,
            compression_level: 3,
            compression_threads: 0,
            encrypt_to: None,
            identities: Identities::default(),
            lock_wait_timeout: crate::config::DEFAULT_LOCK_WAIT_TIMEOUT,
            drill_db: None,
            drill_schedule: None,
            base_schedule: None,
            databases: None,
            wal: None,
        };
        let job = RestoreJob {
            job_id: "j1".into(),
            backup_id: "app_20260101_000000".into(),
            target: "app".into(),
            mode: RestoreMode::Restore as i32,
            target_db: "app_new".into(),
            compression: "zstd".into(),
            checksum: "blake3:00".into(),
            stored_bytes: 10,
            ..Default::default()
        };
        let (tx, _rx) = tokio::sync::mpsc::channel(64);
        let reporter = Reporter {
            job_id: "j1".into(),
            tx,
        };
        let session = CancellationToken::new();
        let cancel = JobCancel::new(&session, &CancellationToken::new());
        let c2 = cancel.clone();
        let stop = async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            c2.cancel_by_coordinator("the job's deadline passed");
            Instant::now()
        };
        let restore = run(
            AgentServiceClient::new(channel),
            job,
            target,
            PgTools::new(dir.clone()),
            reporter,
            cancel,
        );
        let (r, cancelled_at) = tokio::join!(restore, stop);
        let e = r.err().expect("a cancelled restore fails");
        assert_eq!(
            e.message,
            "cancelled by the coordinator: the job's deadline passed"
        );
        assert!(cancelled_at.elapsed() < Duration::from_secs(2));
        let sql = std::fs::read_to_string(&log).unwrap();
        let created = sql
            .find("CREATE DATABASE \"app_new\" TEMPLATE template0;")
            .expect(&sql);
        let dropped = sql
            .find("DROP DATABASE IF EXISTS \"app_new\" WITH (FORCE);")
            .expect(&sql);
        assert!(created < dropped, "{sql}");
        drop(silent);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
