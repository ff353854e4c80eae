//! Schedules and retention per target, from three layers: the coordinator's
//! defaults (environment or the YAML file's top level), what the target's
//! agent asks for (held to the coordinator's floor, `crate::floors`), and the
//! YAML file's per-target section, which wins.

use std::collections::BTreeMap;
use std::path::Path;

use chrono_tz::Tz;
use datasaver_common::config::{parse_duration, Env, SettingError};
use datasaver_common::proto;
use serde::{Deserialize, Serialize};

use crate::floors::{Floors, Raise};
use crate::retention::gfs;
use crate::schedule::cron::{parse_tz, Schedule};
use crate::schedule::planner::RetryPolicy;

/// Retention settings where each field may be unset (then a lower layer's
/// value, or the built-in default, applies).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSpec {
    pub keep_last: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    /// 0 = off.
    pub max_age_days: Option<u32>,
    /// Days a labelled (manual) backup is kept; 0 = until deleted by hand.
    pub keep_manual_days: Option<u32>,
    /// How long failed attempts stay listed, e.g. `7d`.
    pub failed_grace: Option<String>,
}

impl RetentionSpec {
    /// `over`'s values where set, else ours.
    pub fn overlay(&self, over: &RetentionSpec) -> RetentionSpec {
        RetentionSpec {
            keep_last: over.keep_last.or(self.keep_last),
            keep_daily: over.keep_daily.or(self.keep_daily),
            keep_weekly: over.keep_weekly.or(self.keep_weekly),
            keep_monthly: over.keep_monthly.or(self.keep_monthly),
            max_age_days: over.max_age_days.or(self.max_age_days),
            keep_manual_days: over.keep_manual_days.or(self.keep_manual_days),
            failed_grace: over.failed_grace.clone().or(self.failed_grace.clone()),
        }
    }

    pub fn from_proto(r: &proto::Retention) -> RetentionSpec {
        RetentionSpec {
            keep_last: r.keep_last,
            keep_daily: r.keep_daily,
            keep_weekly: r.keep_weekly,
            keep_monthly: r.keep_monthly,
            max_age_days: r.max_age_days,
            ..Default::default()
        }
    }

    /// The effective policy (built-in defaults for what no layer set).
    pub fn to_policy(&self) -> gfs::Policy {
        let d = gfs::Policy::default();
        gfs::Policy {
            keep_last: self.keep_last.unwrap_or(d.keep_last),
            keep_daily: self.keep_daily.unwrap_or(d.keep_daily),
            keep_weekly: self.keep_weekly.unwrap_or(d.keep_weekly),
            keep_monthly: self.keep_monthly.unwrap_or(d.keep_monthly),
            max_age_days: self.max_age_days.filter(|d| *d > 0).or(d.max_age_days),
            manual_keep_days: self.keep_manual_days.filter(|d| *d > 0),
            failed_grace: self
                .failed_grace
                .as_deref()
                .and_then(|g| parse_duration("failed_grace", g).ok())
                .and_then(|g| chrono::Duration::from_std(g).ok())
                .unwrap_or(DEFAULT_FAILED_GRACE),
        }
    }

    fn check(&self, setting: &str) -> Result<(), SettingError> {
        if let Some(g) = &self.failed_grace {
            parse_duration(setting, g)?;
        }
        Ok(())
    }
}

/// Agents reconnect within seconds after a coordinator restart; a backup due
/// right then must not fail for that.
pub const DEFAULT_AGENT_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

pub use crate::retention::gfs::DEFAULT_FAILED_GRACE;

/// The longest a backup, restore or verify may run before it is cancelled
/// (`DATASAVER_JOB_TIMEOUT`): generous for big databases, but a `pg_dump`
/// stuck behind a lock must not hold a slot of the queue forever.
pub const DEFAULT_JOB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// `DATASAVER_MAX_TARGETS_PER_AGENT`: far above the one or few targets an
/// agent serves, far below what would let one host flood the catalog.
pub const DEFAULT_MAX_TARGETS_PER_AGENT: usize = 64;
/// How long an upload or download may move no byte before its job fails
/// (`DATASAVER_TRANSFER_IDLE_TIMEOUT`): a stopped agent or a dead network
/// path must not hold a slot until the job deadline.
pub const DEFAULT_TRANSFER_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// How long a stopping coordinator waits for its jobs to record how they
/// ended (`DATASAVER_SHUTDOWN_GRACE`, the agent's setting of the same name).
pub const DEFAULT_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetFile {
    /// Overrides the agent's DATASAVER_SCHEDULE; "off" disables scheduling.
    pub schedule: Option<String>,
    /// When to run a restore drill of the newest completed backup (cron,
    /// like `schedule`; "off" or absent: no scheduled drills).
    pub drill_schedule: Option<String>,
    /// When to take a base backup (`dsctl backup --physical`; cron, like
    /// `schedule`; overrides the agent's DATASAVER_BASE_SCHEDULE; "off":
    /// none). Needs the agent's WAL stream.
    pub base_schedule: Option<String>,
    /// Dead man's switch for this target, e.g. "26h" (overrides DATASAVER_ALERT_AFTER).
    pub alert_after: Option<String>,
    /// The longest one job of this target may run, e.g. "36h" (overrides
    /// DATASAVER_JOB_TIMEOUT).
    pub job_timeout: Option<String>,
    #[serde(default)]
    pub retention: RetentionSpec,
    /// The coordinator backs this database up itself with an embedded agent
    /// (a managed database no sidecar can run beside), e.g.
    /// `postgres://backup:${SHOP_DB_PASSWORD}@db.example:5432/shop`;
    /// `${VAR}` is taken from the coordinator's environment.
    pub database_url: Option<SecretText>,
    /// The same, read from a file (a mounted secret).
    pub database_url_file: Option<std::path::PathBuf>,
}

/// Text that may hold a password: never printed by `Debug`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretText(pub String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `${NAME}` replaced by the variable from `env`; an unset one is an error
/// naming it (never the text, which may hold a password).
pub fn expand_vars(text: &str, env: &Env) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or("has a ${ without its closing }")?;
        let name = &after[..end];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("${{{name}}} is not a variable name"));
        }
        let value = env
            .0
            .get(name)
            .ok_or_else(|| format!("${{{name}}} is not set in the coordinator's environment"))?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryFile {
    pub attempts: Option<u32>,
    pub backoff: Option<String>,
}

/// The coordinator's YAML file (`--config`, `DATASAVER_CONFIG`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub timezone: Option<String>,
    pub max_concurrent_backups: Option<usize>,
    /// The longest one job may run, e.g. "12h" (DATASAVER_JOB_TIMEOUT).
    pub job_timeout: Option<String>,
    #[serde(default)]
    pub retry: RetryFile,
    #[serde(default)]
    pub retention: RetentionSpec,
    #[serde(default)]
    pub targets: BTreeMap<String, TargetFile>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, SettingError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            SettingError::new(
                "DATASAVER_CONFIG",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        serde_yaml_ng::from_str(&text).map_err(|e| {
            SettingError::new(
                "DATASAVER_CONFIG",
                format!("{}: {}", path.display(), e.to_string().replace('\n', " ")),
            )
        })
    }
}

/// Everything about schedules and retention, resolved at start-up.
#[derive(Clone, Debug)]
pub struct Policies {
    pub tz: Tz,
    /// How long a due scheduled backup waits for its agent to connect before
    /// it is recorded as failed.
    pub agent_grace: std::time::Duration,
    pub max_concurrent: usize,
    pub retry: RetryPolicy,
    pub defaults: RetentionSpec,
    pub targets: BTreeMap<String, TargetFile>,
    /// A job still running after this is cancelled and fails (a target's
    /// own `job_timeout` in the file wins: `job_timeout_for`).
    pub job_timeout: std::time::Duration,
    /// An upload or download that moves no byte for this long fails its job.
    pub transfer_idle: std::time::Duration,
    /// How long shutdown waits for in-flight jobs to record their end.
    pub shutdown_grace: std::time::Duration,
    /// The most targets one agent may register (a bound on what one
    /// compromised host can make the coordinator track).
    pub max_targets_per_agent: usize,
    /// The least an agent's request may keep (`DATASAVER_MIN_*`).
    pub floors: Floors,
    /// Targets the coordinator backs up itself: name → database URL
    /// (`targets.<name>.database_url`, variables expanded, or `_file` read).
    pub embedded: BTreeMap<String, SecretText>,
    /// How far back every moment stays restorable (`DATASAVER_PITR_WINDOW`);
    /// `None`: base backups and WAL are all kept.
    pub pitr_window: Option<std::time::Duration>,
}

impl Default for Policies {
    fn default() -> Self {
        Self {
            tz: Tz::UTC,
            agent_grace: DEFAULT_AGENT_GRACE,
            max_concurrent: 4,
            retry: RetryPolicy::default(),
            defaults: RetentionSpec::default(),
            targets: BTreeMap::new(),
            job_timeout: DEFAULT_JOB_TIMEOUT,
            transfer_idle: DEFAULT_TRANSFER_IDLE_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_targets_per_agent: DEFAULT_MAX_TARGETS_PER_AGENT,
            floors: Floors::from_defaults(&RetentionSpec::default()),
            embedded: BTreeMap::new(),
            pitr_window: None,
        }
    }
}

fn positive(setting: &str, d: std::time::Duration) -> Result<std::time::Duration, SettingError> {
    if d.is_zero() {
        return Err(SettingError::new(setting, "must be longer than 0"));
    }
    Ok(d)
}

impl Policies {
    /// The YAML file (if any), then the environment on top of its top level.
    pub fn load(file: Option<&Path>, env: &Env) -> Result<Policies, SettingError> {
        let f = match file {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let tz_name = env
            .get("DATASAVER_TIMEZONE")
            .map(str::to_string)
            .or(f.timezone.clone());
        let tz = match tz_name {
            Some(n) => parse_tz(&n).map_err(|m| SettingError::new("DATASAVER_TIMEZONE", m))?,
            None => Tz::UTC,
        };
        let max_concurrent = env
            .parse_opt::<usize>("DATASAVER_MAX_CONCURRENT_BACKUPS")?
            .or(f.max_concurrent_backups)
            .unwrap_or(4);
        if max_concurrent == 0 {
            return Err(SettingError::new(
                "DATASAVER_MAX_CONCURRENT_BACKUPS",
                "must be at least 1",
            ));
        }
        let mut retry = RetryPolicy::default();
        if let Some(a) = env
            .parse_opt::<u32>("DATASAVER_RETRY_ATTEMPTS")?
            .or(f.retry.attempts)
        {
            if a == 0 {
                return Err(SettingError::new(
                    "DATASAVER_RETRY_ATTEMPTS",
                    "must be at least 1 (1 = no retries)",
                ));
            }
            retry.attempts = a;
        }
        let backoff = env
            .get("DATASAVER_RETRY_BACKOFF")
            .map(str::to_string)
            .or(f.retry.backoff.clone());
        if let Some(b) = backoff {
            let d = parse_duration("DATASAVER_RETRY_BACKOFF", &b)?;
            retry.first_backoff = chrono::Duration::from_std(d).map_err(|_| {
                SettingError::new("DATASAVER_RETRY_BACKOFF", format!("{b:?} is too long"))
            })?;
            // The doubling is capped at 30 minutes, but never below what was
            // asked for: a 2h backoff waits 2h.
            retry.max_backoff = retry.max_backoff.max(retry.first_backoff);
        }
        f.retention
            .check("DATASAVER_CONFIG: retention.failed_grace")?;
        let from_env = RetentionSpec {
            keep_last: env.parse_opt("DATASAVER_KEEP_LAST")?,
            keep_daily: env.parse_opt("DATASAVER_KEEP_DAILY")?,
            keep_weekly: env.parse_opt("DATASAVER_KEEP_WEEKLY")?,
            keep_monthly: env.parse_opt("DATASAVER_KEEP_MONTHLY")?,
            max_age_days: env.parse_opt("DATASAVER_MAX_AGE_DAYS")?,
            keep_manual_days: env.parse_opt("DATASAVER_KEEP_MANUAL_DAYS")?,
            failed_grace: env.get("DATASAVER_FAILED_GRACE").map(str::to_string),
        };
        from_env.check("DATASAVER_FAILED_GRACE")?;
        let defaults = f.retention.overlay(&from_env);
        let floors = Floors::load(env, &defaults)?;
        let mut embedded = BTreeMap::new();
        for (name, t) in &f.targets {
            datasaver_common::names::validate_target(name).map_err(|e| {
                SettingError::new("DATASAVER_CONFIG", format!("targets.{name}: {e}"))
            })?;
            if let Some(s) = &t.schedule {
                if !is_off(s) {
                    Schedule::parse(s, tz).map_err(|m| {
                        SettingError::new(
                            "DATASAVER_CONFIG",
                            format!("targets.{name}.schedule: {m}"),
                        )
                    })?;
                }
            }
            for (key, value) in [
                ("drill_schedule", &t.drill_schedule),
                ("base_schedule", &t.base_schedule),
            ] {
                if let Some(s) = value.as_ref().filter(|s| !is_off(s)) {
                    Schedule::parse(s, tz).map_err(|m| {
                        SettingError::new("DATASAVER_CONFIG", format!("targets.{name}.{key}: {m}"))
                    })?;
                }
            }
            if let Some(a) = &t.alert_after {
                parse_duration(&format!("DATASAVER_CONFIG: targets.{name}.alert_after"), a)?;
            }
            if let Some(j) = &t.job_timeout {
                let setting = format!("DATASAVER_CONFIG: targets.{name}.job_timeout");
                positive(&setting, parse_duration(&setting, j)?)?;
            }
            t.retention.check(&format!(
                "DATASAVER_CONFIG: targets.{name}.retention.failed_grace"
            ))?;
            let setting = |field: &str| format!("DATASAVER_CONFIG: targets.{name}.{field}");
            let url = match (&t.database_url, &t.database_url_file) {
                (Some(_), Some(_)) => {
                    return Err(SettingError::new(
                        setting("database_url"),
                        "give database_url or database_url_file, not both",
                    ))
                }
                (Some(u), None) => Some(
                    expand_vars(&u.0, env)
                        .map_err(|m| SettingError::new(setting("database_url"), m))?,
                ),
                (None, Some(p)) => Some(
                    std::fs::read_to_string(p)
                        .map(|s| s.trim().to_string())
                        .map_err(|e| {
                            SettingError::new(
                                setting("database_url_file"),
                                format!("cannot read {}: {e}", p.display()),
                            )
                        })?,
                ),
                (None, None) => None,
            };
            if let Some(u) = url {
                embedded.insert(name.clone(), SecretText(u));
            }
        }
        let agent_grace = match env.get("DATASAVER_AGENT_GRACE") {
            Some(v) => parse_duration("DATASAVER_AGENT_GRACE", v)?,
            None => DEFAULT_AGENT_GRACE,
        };
        let job_timeout = match env.get("DATASAVER_JOB_TIMEOUT") {
            Some(v) => positive(
                "DATASAVER_JOB_TIMEOUT",
                parse_duration("DATASAVER_JOB_TIMEOUT", v)?,
            )?,
            None => match &f.job_timeout {
                Some(v) => positive(
                    "DATASAVER_CONFIG: job_timeout",
                    parse_duration("DATASAVER_CONFIG: job_timeout", v)?,
                )?,
                None => DEFAULT_JOB_TIMEOUT,
            },
        };
        let transfer_idle = match env.get("DATASAVER_TRANSFER_IDLE_TIMEOUT") {
            Some(v) => positive(
                "DATASAVER_TRANSFER_IDLE_TIMEOUT",
                parse_duration("DATASAVER_TRANSFER_IDLE_TIMEOUT", v)?,
            )?,
            None => DEFAULT_TRANSFER_IDLE_TIMEOUT,
        };
        let shutdown_grace = match env.get("DATASAVER_SHUTDOWN_GRACE") {
            Some(v) => parse_duration("DATASAVER_SHUTDOWN_GRACE", v)?,
            None => DEFAULT_SHUTDOWN_GRACE,
        };
        let pitr_window = match env.get("DATASAVER_PITR_WINDOW") {
            Some(v) if !is_off(v) => Some(positive(
                "DATASAVER_PITR_WINDOW",
                parse_duration("DATASAVER_PITR_WINDOW", v)?,
            )?),
            _ => None,
        };
        let max_targets_per_agent = env
            .parse_opt::<usize>("DATASAVER_MAX_TARGETS_PER_AGENT")?
            .unwrap_or(DEFAULT_MAX_TARGETS_PER_AGENT);
        if max_targets_per_agent == 0 {
            return Err(SettingError::new(
                "DATASAVER_MAX_TARGETS_PER_AGENT",
                "must be at least 1",
            ));
        }
        Ok(Policies {
            tz,
            agent_grace,
            max_targets_per_agent,
            max_concurrent,
            retry,
            defaults,
            targets: f.targets,
            job_timeout,
            transfer_idle,
            shutdown_grace,
            floors,
            embedded,
            pitr_window,
        })
    }

    /// The deadline of a job of `target`: the file's per-target
    /// `job_timeout`, else DATASAVER_JOB_TIMEOUT (checked at load).
    pub fn job_timeout_for(&self, target: &str) -> std::time::Duration {
        self.targets
            .get(target)
            .and_then(|t| t.job_timeout.as_deref())
            .and_then(|j| parse_duration("job_timeout", j).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(self.job_timeout)
    }

    /// The schedule a target runs on: the file's, else the agent's request.
    /// `Err` carries why an agent's expression was not accepted.
    pub fn schedule_for(
        &self,
        target: &str,
        requested: Option<&str>,
    ) -> Result<Option<Schedule>, String> {
        let expr = match self.targets.get(target).and_then(|t| t.schedule.as_deref()) {
            Some(s) => Some(s),
            None => requested.filter(|s| !s.trim().is_empty()),
        };
        match expr {
            None => Ok(None),
            Some(s) if is_off(s) => Ok(None),
            Some(s) => Schedule::parse(s, self.tz).map(Some),
        }
    }

    /// The restore-drill schedule of `target`: the YAML file's
    /// `drill_schedule`, else what its agent asked for
    /// (`DATASAVER_DRILL_SCHEDULE`); `None` when it has none (or "off").
    pub fn drill_schedule_for(&self, target: &str, requested: Option<&str>) -> Option<Schedule> {
        let file = self
            .targets
            .get(target)
            .and_then(|t| t.drill_schedule.as_deref());
        self.file_else_agent(file, requested)
    }

    /// The base-backup schedule of `target`: the YAML file's
    /// `base_schedule`, else what its agent asked for
    /// (`DATASAVER_BASE_SCHEDULE`); `None` when it has none (or "off").
    pub fn base_schedule_for(&self, target: &str, requested: Option<&str>) -> Option<Schedule> {
        let file = self
            .targets
            .get(target)
            .and_then(|t| t.base_schedule.as_deref());
        self.file_else_agent(file, requested)
    }

    fn file_else_agent(&self, file: Option<&str>, requested: Option<&str>) -> Option<Schedule> {
        let expr = match file {
            Some(s) => s,
            None => requested.filter(|s| !s.trim().is_empty())?,
        };
        if is_off(expr) {
            return None;
        }
        Schedule::parse(expr, self.tz).ok()
    }

    /// Retention for a target: defaults, then the agent's request raised to
    /// the floor, then the file.
    pub fn retention_for(&self, target: &str, requested: Option<&RetentionSpec>) -> gfs::Policy {
        let mut spec = self.defaults.clone();
        if let Some(r) = requested {
            spec = spec.overlay(&self.floors.raise_retention(r).0);
        }
        if let Some(t) = self.targets.get(target) {
            spec = spec.overlay(&t.retention);
        }
        spec.to_policy()
    }
}

impl Policies {
    /// Whether the schedule in force for `target` is its agent's (the file's
    /// section names none): only then does the floor apply to it.
    fn schedule_is_agents(&self, target: &str) -> bool {
        self.targets
            .get(target)
            .and_then(|t| t.schedule.as_ref())
            .is_none()
    }

    /// The least time between two scheduled backups of `target` on
    /// `schedule`, when that is its agent's and fires more often than the
    /// floor allows.
    pub fn throttle_for(
        &self,
        target: &str,
        schedule: &Schedule,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<std::time::Duration> {
        if !self.schedule_is_agents(target) {
            return None;
        }
        self.floors.schedule_throttle(schedule, now).map(|(d, _)| d)
    }

    /// What of the agent's request for `target` is raised to the floor and
    /// in force (a field the file's section sets is not the agent's).
    pub fn floor_raises(
        &self,
        target: &str,
        schedule: Option<&str>,
        retention: Option<&RetentionSpec>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Vec<Raise> {
        let mut out = Vec::new();
        if let Some(r) = retention {
            let file = self.targets.get(target).map(|t| &t.retention);
            let set_by_file = |field: &str| {
                file.is_some_and(|f| match field {
                    "keep_last" => f.keep_last.is_some(),
                    "keep_daily" => f.keep_daily.is_some(),
                    "keep_weekly" => f.keep_weekly.is_some(),
                    "keep_monthly" => f.keep_monthly.is_some(),
                    "max_age_days" => f.max_age_days.is_some(),
                    _ => false,
                })
            };
            out.extend(
                self.floors
                    .raise_retention(r)
                    .1
                    .into_iter()
                    .filter(|raise| !set_by_file(&raise.setting)),
            );
        }
        if self.schedule_is_agents(target) {
            if let Ok(Some(s)) = self.schedule_for(target, schedule) {
                out.extend(self.floors.schedule_throttle(&s, now).map(|(_, r)| r));
            }
        }
        out
    }
}

pub fn is_off(s: &str) -> bool {
    matches!(s.trim().to_ascii_lowercase().as_str(), "off" | "none" | "")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_pairs(pairs)
    }

    #[test]
    fn variables_in_a_database_url_come_from_the_environment() {
        let e = env(&[("PW", "p@ss"), ("HOST", "db"), ("EMPTY", "")]);
        assert_eq!(
            expand_vars("postgres://u:${PW}@${HOST}:5432/app${EMPTY}", &e).unwrap(),
            "postgres://u:p@ss@db:5432/app"
        );
        assert_eq!(expand_vars("no vars $HOME", &e).unwrap(), "no vars $HOME");
        let err = expand_vars("postgres://u:${MISSING}@db/app", &e).unwrap_err();
        assert_eq!(
            err,
            "${MISSING} is not set in the coordinator's environment"
        );
        assert!(expand_vars("x${PW", &e).unwrap_err().contains("closing"));
        assert!(expand_vars("${a-b}", &e)
            .unwrap_err()
            .contains("not a variable name"));
        assert_eq!(format!("{:?}", SecretText("p@ss".into())), "<redacted>");
    }

    #[test]
    fn layers_resolve_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(
            &f,
            "timezone: Europe/Berlin\nretention:\n  keep_daily: 5\n  keep_weekly: 2\ntargets:\n  acme:\n    schedule: \"*/5 * * * *\"\n    retention:\n      keep_daily: 2\n  quiet:\n    schedule: off\n",
        )
        .unwrap();
        let p = Policies::load(Some(&f), &env(&[("DATASAVER_KEEP_WEEKLY", "3")])).unwrap();
        assert_eq!(p.tz, chrono_tz::Europe::Berlin);
        // file target > agent > env > file defaults > built-in
        let agent = RetentionSpec {
            keep_daily: Some(9),
            keep_monthly: Some(1),
            ..Default::default()
        };
        let acme = p.retention_for("acme", Some(&agent));
        // The agent's keep_monthly=1 is below the coordinator's floor (by
        // default its own keep_monthly, 6): raised to it.
        assert_eq!(
            (
                acme.keep_daily,
                acme.keep_weekly,
                acme.keep_monthly,
                acme.keep_last
            ),
            (2, 3, 6, 0)
        );
        let other = p.retention_for("other", Some(&agent));
        assert_eq!((other.keep_daily, other.keep_weekly), (9, 3));
        let plain = p.retention_for("plain", None);
        assert_eq!(
            (plain.keep_daily, plain.keep_weekly, plain.keep_monthly),
            (5, 3, 6)
        );
        assert_eq!(
            p.schedule_for("acme", Some("0 3 * * *"))
                .unwrap()
                .unwrap()
                .expr(),
            "*/5 * * * *"
        );
        assert!(p
            .schedule_for("quiet", Some("0 3 * * *"))
            .unwrap()
            .is_none());
        assert_eq!(
            p.schedule_for("other", Some("0 3 * * *"))
                .unwrap()
                .unwrap()
                .expr(),
            "0 3 * * *"
        );
        assert!(p.schedule_for("other", Some("every day")).is_err());
    }

    #[test]
    fn drill_schedules_come_from_the_file_else_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(
            &f,
            "targets:\n  acme:\n    drill_schedule: \"0 5 * * 0\"\n  quiet:\n    drill_schedule: \"off\"\n",
        )
        .unwrap();
        let p = Policies::load(Some(&f), &env(&[])).unwrap();
        let expr = |t: &str, asked: Option<&str>| {
            p.drill_schedule_for(t, asked).map(|s| s.expr().to_string())
        };
        assert_eq!(
            expr("acme", Some("0 1 * * *")).as_deref(),
            Some("0 5 * * 0")
        );
        assert_eq!(expr("quiet", Some("0 1 * * *")), None);
        assert_eq!(
            expr("other", Some("0 1 * * *")).as_deref(),
            Some("0 1 * * *")
        );
        assert_eq!(expr("other", Some("off")), None);
        assert_eq!(expr("other", Some("not cron")), None);
        assert_eq!(expr("other", None), None);
    }

    #[test]
    fn base_schedules_come_from_the_file_else_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(
            &f,
            "targets:\n  acme:\n    base_schedule: \"0 4 * * 6\"\n  quiet:\n    base_schedule: \"off\"\n",
        )
        .unwrap();
        let p = Policies::load(Some(&f), &env(&[])).unwrap();
        let expr = |t: &str, asked: Option<&str>| {
            p.base_schedule_for(t, asked).map(|s| s.expr().to_string())
        };
        assert_eq!(
            expr("acme", Some("0 1 * * *")).as_deref(),
            Some("0 4 * * 6")
        );
        assert_eq!(expr("acme", None).as_deref(), Some("0 4 * * 6"));
        assert_eq!(expr("quiet", Some("0 1 * * *")), None);
        assert_eq!(
            expr("other", Some("0 1 * * *")).as_deref(),
            Some("0 1 * * *")
        );
        assert_eq!(expr("other", Some("off")), None);
        assert_eq!(expr("other", None), None);
        // The drill schedule is another setting.
        assert_eq!(p.drill_schedule_for("acme", None), None);
    }

    #[test]
    fn bad_files_and_values_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        for (text, needle) in [
            (
                "targets:\n  acme:\n    schedule: \"99 * * * *\"\n",
                "targets.acme.schedule",
            ),
            ("targets:\n  acme:\n    shedule: \"0 2 * * *\"\n", "shedule"),
            (
                "targets:\n  acme:\n    drill_schedule: \"every sunday\"\n",
                "targets.acme.drill_schedule",
            ),
            (
                "targets:\n  acme:\n    base_schedule: \"weekly\"\n",
                "targets.acme.base_schedule",
            ),
            ("timezone: Mars/Base\n", "DATASAVER_TIMEZONE"),
            ("retention:\n  failed_grace: soon\n", "failed_grace"),
            (
                "targets:\n  acme:\n    job_timeout: forever\n",
                "targets.acme.job_timeout",
            ),
            (
                "targets:\n  acme:\n    job_timeout: 0s\n",
                "targets.acme.job_timeout",
            ),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = Policies::load(Some(&f), &env(&[])).unwrap_err();
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
        let e = Policies::load(None, &env(&[("DATASAVER_KEEP_DAILY", "-1")])).unwrap_err();
        assert_eq!(e.setting, "DATASAVER_KEEP_DAILY");
        let e = Policies::load(None, &env(&[("DATASAVER_RETRY_BACKOFF", "1")])).unwrap_err();
        assert_eq!(e.setting, "DATASAVER_RETRY_BACKOFF");
        for bad in ["0s", "soon"] {
            let e = Policies::load(None, &env(&[("DATASAVER_TRANSFER_IDLE_TIMEOUT", bad)]))
                .unwrap_err();
            assert_eq!(e.setting, "DATASAVER_TRANSFER_IDLE_TIMEOUT");
        }
        let p = Policies::load(None, &env(&[("DATASAVER_TRANSFER_IDLE_TIMEOUT", "3s")])).unwrap();
        assert_eq!(p.transfer_idle, std::time::Duration::from_secs(3));
        let e = Policies::load(Some(Path::new("/nonexistent.yaml")), &env(&[])).unwrap_err();
        assert_eq!(e.setting, "DATASAVER_CONFIG");
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
        let f = dir.path().join("coordinator.yaml");
        std::fs::write(&f, text).unwrap();
        f
    }

    #[test]
    fn defaults_without_a_file() {
        let p = Policies::load(None, &env(&[])).unwrap();
        assert_eq!(p.tz, Tz::UTC);
        assert_eq!(p.max_concurrent, 4);
        assert_eq!(p.retry, RetryPolicy::default());
        assert_eq!(p.retry.attempts, 3);
        assert_eq!(p.retry.first_backoff, chrono::Duration::seconds(60));
        assert_eq!(p.job_timeout, std::time::Duration::from_secs(43200));
        assert_eq!(p.shutdown_grace, std::time::Duration::from_secs(10));
        assert_eq!(p.transfer_idle, std::time::Duration::from_secs(300));
        assert_eq!(p.job_timeout_for("acme"), p.job_timeout);
        assert_eq!(p.agent_grace, std::time::Duration::from_secs(30));
        assert_eq!(p.defaults, RetentionSpec::default());
        assert!(p.targets.is_empty());
        // Policies::default() is the same as loading nothing
        let d = Policies::default();
        assert_eq!(
            (
                d.tz,
                d.max_concurrent,
                &d.retry,
                d.job_timeout,
                d.shutdown_grace
            ),
            (
                p.tz,
                p.max_concurrent,
                &p.retry,
                p.job_timeout,
                p.shutdown_grace
            )
        );
        assert_eq!(d.agent_grace, p.agent_grace);
        assert_eq!(p.retention_for("acme", None), gfs::Policy::default());
        assert_eq!(p.schedule_for("acme", None), Ok(None));
        assert_eq!(p.schedule_for("acme", Some("   ")), Ok(None));
    }

    #[test]
    fn every_file_field_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            &dir,
            "timezone: Europe/Berlin\n\
             max_concurrent_backups: 2\n\
             job_timeout: 3h\n\
             retry:\n  attempts: 5\n  backoff: 2m\n\
             retention:\n  keep_last: 1\n  keep_daily: 10\n  keep_weekly: 5\n  keep_monthly: 12\n  \
             max_age_days: 365\n  keep_manual_days: 30\n  failed_grace: 2d\n\
             targets:\n  acme-main:\n    schedule: \"0 2 * * *\"\n    alert_after: 26h\n    \
             job_timeout: 36h\n    retention:\n      keep_last: 24\n      failed_grace: 12h\n  \
             quiet:\n    schedule: \"off\"\n  keep-only:\n    retention:\n      keep_daily: 1\n",
        );
        let p = Policies::load(Some(&f), &env(&[])).unwrap();
        assert_eq!(p.tz, chrono_tz::Europe::Berlin);
        assert_eq!(p.max_concurrent, 2);
        assert_eq!(p.job_timeout, std::time::Duration::from_secs(3 * 3600));
        assert_eq!(
            p.retry,
            RetryPolicy {
                attempts: 5,
                first_backoff: chrono::Duration::minutes(2),
                max_backoff: chrono::Duration::minutes(30),
            }
        );
        assert_eq!(
            p.defaults,
            RetentionSpec {
                keep_last: Some(1),
                keep_daily: Some(10),
                keep_weekly: Some(5),
                keep_monthly: Some(12),
                max_age_days: Some(365),
                keep_manual_days: Some(30),
                failed_grace: Some("2d".into()),
            }
        );
        assert_eq!(
            p.targets.keys().collect::<Vec<_>>(),
            ["acme-main", "keep-only", "quiet"]
        );
        let acme = &p.targets["acme-main"];
        assert_eq!(acme.schedule.as_deref(), Some("0 2 * * *"));
        assert_eq!(acme.alert_after.as_deref(), Some("26h"));
        // a target's own deadline; the others keep the file's
        assert_eq!(
            p.job_timeout_for("acme-main"),
            std::time::Duration::from_secs(36 * 3600)
        );
        assert_eq!(
            p.job_timeout_for("quiet"),
            std::time::Duration::from_secs(3 * 3600)
        );
        assert_eq!(
            acme.retention,
            RetentionSpec {
                keep_last: Some(24),
                failed_grace: Some("12h".into()),
                ..Default::default()
            }
        );

        // the file's defaults apply to every target, its sections on top
        let defaults = gfs::Policy {
            keep_last: 1,
            keep_daily: 10,
            keep_weekly: 5,
            keep_monthly: 12,
            max_age_days: Some(365),
            manual_keep_days: Some(30),
            failed_grace: chrono::Duration::days(2),
        };
        assert_eq!(p.retention_for("other", None), defaults);
        assert_eq!(
            p.retention_for("acme-main", None),
            gfs::Policy {
                keep_last: 24,
                failed_grace: chrono::Duration::hours(12),
                ..defaults.clone()
            }
        );
        assert_eq!(
            p.retention_for("keep-only", None),
            gfs::Policy {
                keep_daily: 1,
                ..defaults
            }
        );

        // schedules are read in the file's time zone
        let s = p.schedule_for("acme-main", None).unwrap().unwrap();
        assert_eq!((s.expr(), s.tz()), ("0 2 * * *", chrono_tz::Europe::Berlin));
        assert_eq!(p.schedule_for("quiet", Some("0 3 * * *")), Ok(None));
        // a section without a schedule leaves the agent's
        let s = p
            .schedule_for("keep-only", Some("0 4 * * *"))
            .unwrap()
            .unwrap();
        assert_eq!((s.expr(), s.tz()), ("0 4 * * *", chrono_tz::Europe::Berlin));
    }

    #[test]
    fn the_readme_example_loads() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            &dir,
            r#"timezone: Europe/Berlin           # or DATASAVER_TIMEZONE; default UTC
max_concurrent_backups: 4
retry: { attempts: 3, backoff: 60s }
retention: { keep_daily: 7, keep_weekly: 4, keep_monthly: 6, max_age_days: 90 }
targets:
  acme-main:
    schedule: "0 2 * * *"         # overrides the agent's DATASAVER_SCHEDULE
    retention: { keep_last: 24 }
"#,
        );
        let p = Policies::load(Some(&f), &env(&[])).unwrap();
        assert_eq!(p.tz, chrono_tz::Europe::Berlin);
        assert_eq!(p.max_concurrent, 4);
        assert_eq!(p.retry, RetryPolicy::default());
        assert_eq!(
            p.retention_for("acme-main", None),
            gfs::Policy {
                keep_last: 24,
                max_age_days: Some(90),
                ..gfs::Policy::default()
            }
        );
    }

    #[test]
    fn environment_wins_over_the_files_top_level() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            &dir,
            "timezone: Europe/Berlin\nmax_concurrent_backups: 2\njob_timeout: 3h\n\
             retry: { attempts: 5, backoff: 2m }\n\
             retention: { keep_daily: 10, keep_weekly: 5, max_age_days: 365, failed_grace: 2d }\n",
        );
        let p = Policies::load(
            Some(&f),
            &env(&[
                ("DATASAVER_TIMEZONE", "Asia/Tokyo"),
                ("DATASAVER_MAX_CONCURRENT_BACKUPS", "8"),
                ("DATASAVER_JOB_TIMEOUT", "45m"),
                ("DATASAVER_RETRY_ATTEMPTS", "1"),
                ("DATASAVER_RETRY_BACKOFF", "30s"),
                ("DATASAVER_KEEP_DAILY", "3"),
                ("DATASAVER_MAX_AGE_DAYS", "0"),
                ("DATASAVER_FAILED_GRACE", "1d"),
            ]),
        )
        .unwrap();
        assert_eq!(p.tz, chrono_tz::Asia::Tokyo);
        assert_eq!(p.max_concurrent, 8);
        assert_eq!(p.job_timeout, std::time::Duration::from_secs(45 * 60));
        assert_eq!(p.retry.attempts, 1);
        assert_eq!(p.retry.first_backoff, chrono::Duration::seconds(30));
        assert_eq!(
            p.defaults,
            RetentionSpec {
                keep_daily: Some(3),
                keep_weekly: Some(5),
                max_age_days: Some(0),
                failed_grace: Some("1d".into()),
                ..Default::default()
            }
        );
        // MAX_AGE_DAYS=0 switches the file's age limit off
        assert_eq!(
            p.retention_for("acme", None),
            gfs::Policy {
                keep_daily: 3,
                keep_weekly: 5,
                max_age_days: None,
                failed_grace: chrono::Duration::days(1),
                ..gfs::Policy::default()
            }
        );
        // an empty variable is as if unset: the file's value stays
        let p = Policies::load(
            Some(&f),
            &env(&[
                ("DATASAVER_TIMEZONE", ""),
                ("DATASAVER_MAX_CONCURRENT_BACKUPS", " "),
            ]),
        )
        .unwrap();
        assert_eq!(
            (p.tz, p.max_concurrent, p.job_timeout),
            (
                chrono_tz::Europe::Berlin,
                2,
                std::time::Duration::from_secs(3 * 3600)
            )
        );
    }

    #[test]
    fn the_files_target_section_wins_over_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            &dir,
            "retention: { keep_daily: 10, max_age_days: 90, keep_manual_days: 30 }\n\
             targets:\n  acme:\n    schedule: \"0 1 * * *\"\n    \
             retention: { keep_daily: 2, max_age_days: 0, keep_manual_days: 0, failed_grace: 1h }\n  \
             beta:\n    schedule: NONE\n",
        );
        // Floors low enough to let the agent's layer through: this test is
        // about the layers (the floor is `agents_requests_are_held_to_the_floor`).
        let p = Policies::load(
            Some(&f),
            &env(&[
                ("DATASAVER_KEEP_WEEKLY", "3"),
                ("DATASAVER_MIN_KEEP_DAILY", "0"),
                ("DATASAVER_MIN_AGE_DAYS", "1"),
            ]),
        )
        .unwrap();
        let agent = RetentionSpec {
            keep_last: Some(5),
            keep_daily: Some(9),
            keep_weekly: Some(8),
            max_age_days: Some(60),
            ..Default::default()
        };
        // file section > agent > environment > file top level > built-in
        assert_eq!(
            p.retention_for("acme", Some(&agent)),
            gfs::Policy {
                keep_last: 5,
                keep_daily: 2,
                keep_weekly: 8,
                keep_monthly: 6,
                max_age_days: None,
                manual_keep_days: None,
                failed_grace: chrono::Duration::hours(1),
            }
        );
        assert_eq!(
            p.retention_for("gamma", Some(&agent)),
            gfs::Policy {
                keep_last: 5,
                keep_daily: 9,
                keep_weekly: 8,
                keep_monthly: 6,
                max_age_days: Some(60),
                manual_keep_days: Some(30),
                failed_grace: chrono::Duration::days(7),
            }
        );
        assert_eq!(
            p.retention_for("gamma", None),
            gfs::Policy {
                keep_daily: 10,
                keep_weekly: 3,
                max_age_days: Some(90),
                manual_keep_days: Some(30),
                ..gfs::Policy::default()
            }
        );
        // what an agent sends over the wire
        let wire = proto::Retention {
            keep_last: Some(4),
            keep_daily: Some(1),
            ..Default::default()
        };
        let from_wire = RetentionSpec::from_proto(&wire);
        assert_eq!(
            from_wire,
            RetentionSpec {
                keep_last: Some(4),
                keep_daily: Some(1),
                ..Default::default()
            }
        );
        let g = p.retention_for("acme", Some(&from_wire));
        assert_eq!((g.keep_last, g.keep_daily), (4, 2));

        // schedules: the file's, then the agent's; "off" in either disables
        let s = p.schedule_for("acme", Some("0 3 * * *")).unwrap().unwrap();
        assert_eq!((s.expr(), s.tz()), ("0 1 * * *", Tz::UTC));
        let s = p.schedule_for("acme", None).unwrap().unwrap();
        assert_eq!(s.expr(), "0 1 * * *");
        assert_eq!(p.schedule_for("beta", Some("0 3 * * *")), Ok(None));
        let s = p
            .schedule_for("gamma", Some(" 0  3 * * * "))
            .unwrap()
            .unwrap();
        assert_eq!(s.expr(), "0 3 * * *");
        assert_eq!(p.schedule_for("gamma", Some("off")), Ok(None));
        assert_eq!(p.schedule_for("gamma", Some("")), Ok(None));
        assert_eq!(p.schedule_for("gamma", None), Ok(None));
        let e = p.schedule_for("gamma", Some("0 3 * *")).unwrap_err();
        assert!(e.contains("4 fields"), "{e}");
        // a bad agent expression is the agent's problem, not the file's target
        assert!(p.schedule_for("acme", Some("0 3 * *")).is_ok());
    }

    #[test]
    fn misspelt_keys_and_bad_values_in_the_file_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for (text, setting, needles) in [
            (
                "max_concurent_backups: 3\n",
                "DATASAVER_CONFIG",
                &["max_concurent_backups"][..],
            ),
            (
                "retry:\n  attempt: 2\n",
                "DATASAVER_CONFIG",
                &["attempt"][..],
            ),
            (
                "retention:\n  keep_dayly: 2\n",
                "DATASAVER_CONFIG",
                &["keep_dayly"][..],
            ),
            (
                "targets:\n  acme:\n    retention:\n      keep_hourly: 2\n",
                "DATASAVER_CONFIG",
                &["keep_hourly"][..],
            ),
            (
                "targets:\n  acme:\n    shedule: \"0 2 * * *\"\n",
                "DATASAVER_CONFIG",
                &["shedule"][..],
            ),
            (
                "max_concurrent_backups: four\n",
                "DATASAVER_CONFIG",
                &["max_concurrent_backups"][..],
            ),
            (
                "targets:\n  acme:\n    schedule: \"0 25 * * *\"\n",
                "DATASAVER_CONFIG",
                &["targets.acme.schedule"][..],
            ),
            (
                "targets:\n  Acme_Prod:\n    schedule: \"0 2 * * *\"\n",
                "DATASAVER_CONFIG",
                &["targets.Acme_Prod"][..],
            ),
            (
                "targets:\n  \"acme/main\": {}\n",
                "DATASAVER_CONFIG",
                &["targets.acme/main"][..],
            ),
            (
                "targets:\n  acme:\n    alert_after: soon\n",
                "DATASAVER_CONFIG: targets.acme.alert_after",
                &[][..],
            ),
            (
                "targets:\n  acme:\n    retention:\n      failed_grace: a week\n",
                "DATASAVER_CONFIG: targets.acme.retention.failed_grace",
                &[][..],
            ),
            (
                "job_timeout: 0s\n",
                "DATASAVER_CONFIG: job_timeout",
                &["longer than 0"][..],
            ),
            (
                "job_timeout: abc\n",
                "DATASAVER_CONFIG: job_timeout",
                &["\"abc\""][..],
            ),
            (
                "timezone: Mars/Base\n",
                "DATASAVER_TIMEZONE",
                &["Mars/Base"][..],
            ),
            (
                "max_concurrent_backups: 0\n",
                "DATASAVER_MAX_CONCURRENT_BACKUPS",
                &[][..],
            ),
            (
                "retry: { attempts: 0 }\n",
                "DATASAVER_RETRY_ATTEMPTS",
                &[][..],
            ),
            (
                "retry: { backoff: soon }\n",
                "DATASAVER_RETRY_BACKOFF",
                &["\"soon\""][..],
            ),
        ] {
            let f = write(&dir, text);
            let e = Policies::load(Some(&f), &env(&[])).unwrap_err();
            assert_eq!(e.setting, setting, "{text:?}: {e}");
            for n in needles {
                assert!(e.message.contains(n), "{text:?}: {e}");
            }
            if setting == "DATASAVER_CONFIG" && !e.message.starts_with("targets.") {
                // a file that does not parse: the message says which file
                assert!(e.message.contains("coordinator.yaml"), "{text:?}: {e}");
            }
        }
    }

    #[test]
    fn bad_environment_values_are_named() {
        for (name, value) in [
            ("DATASAVER_MAX_CONCURRENT_BACKUPS", "0"),
            ("DATASAVER_RETRY_ATTEMPTS", "0"),
            ("DATASAVER_RETRY_BACKOFF", "soon"),
            ("DATASAVER_JOB_TIMEOUT", "0s"),
            ("DATASAVER_JOB_TIMEOUT", "abc"),
            ("DATASAVER_SHUTDOWN_GRACE", "10"),
            ("DATASAVER_AGENT_GRACE", "-1m"),
            ("DATASAVER_TIMEZONE", "Mars/Base"),
            ("DATASAVER_FAILED_GRACE", "x"),
            ("DATASAVER_KEEP_LAST", "many"),
            ("DATASAVER_KEEP_WEEKLY", "1.5"),
            ("DATASAVER_KEEP_MONTHLY", "-3"),
            ("DATASAVER_KEEP_MANUAL_DAYS", "forever"),
        ] {
            let e = Policies::load(None, &env(&[(name, value)])).unwrap_err();
            assert_eq!(e.setting, name, "{name}={value}: {e}");
        }
        // a bad environment value is refused even when the file has a good one
        let dir = tempfile::tempdir().unwrap();
        let f = write(&dir, "timezone: UTC\njob_timeout: 1h\n");
        let e = Policies::load(Some(&f), &env(&[("DATASAVER_JOB_TIMEOUT", "0s")])).unwrap_err();
        assert_eq!(e.setting, "DATASAVER_JOB_TIMEOUT");
        // shutdown grace 0 is allowed: stop without waiting
        let p = Policies::load(None, &env(&[("DATASAVER_SHUTDOWN_GRACE", "0s")])).unwrap();
        assert_eq!(p.shutdown_grace, std::time::Duration::ZERO);
    }

    #[test]
    fn retry_backoff_doubles_from_the_setting() {
        let p = Policies::load(None, &env(&[("DATASAVER_RETRY_BACKOFF", "90s")])).unwrap();
        assert_eq!(
            (p.retry.backoff(1), p.retry.backoff(2), p.retry.backoff(3)),
            (
                chrono::Duration::seconds(90),
                chrono::Duration::seconds(180),
                chrono::Duration::seconds(360)
            )
        );
    }

    #[test]
    fn empty_sections_and_files_mean_defaults() {
        let dir = tempfile::tempdir().unwrap();
        for text in ["", "# nothing yet\n", "retry:\nretention:\ntargets:\n"] {
            let f = write(&dir, text);
            let p = Policies::load(Some(&f), &env(&[])).unwrap();
            assert_eq!(
                (
                    p.tz,
                    p.max_concurrent,
                    &p.retry,
                    &p.defaults,
                    p.targets.len()
                ),
                (
                    Tz::UTC,
                    4,
                    &RetryPolicy::default(),
                    &RetentionSpec::default(),
                    0
                ),
                "{text:?}"
            );
        }
        // a target listed with nothing under it: the agent's wishes stand
        // (above the floor; below it they are raised)
        let f = write(&dir, "targets:\n  acme:\n");
        let p = Policies::load(Some(&f), &env(&[])).unwrap();
        assert_eq!(p.targets.keys().collect::<Vec<_>>(), ["acme"]);
        let s = p.schedule_for("acme", Some("0 3 * * *")).unwrap().unwrap();
        assert_eq!(s.expr(), "0 3 * * *");
        let agent = RetentionSpec {
            keep_daily: Some(9),
            ..Default::default()
        };
        assert_eq!(p.retention_for("acme", Some(&agent)).keep_daily, 9);
        let agent = RetentionSpec {
            keep_daily: Some(2),
            ..Default::default()
        };
        assert_eq!(p.retention_for("acme", Some(&agent)).keep_daily, 7);
    }

    #[test]
    fn agents_requests_are_held_to_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            &dir,
            "retention: { keep_daily: 10, max_age_days: 90 }\n\
             targets:\n  acme:\n    schedule: \"* * * * *\"\n    \
             retention: { keep_daily: 1, max_age_days: 2 }\n",
        );
        let p = Policies::load(
            Some(&f),
            &env(&[
                ("DATASAVER_MIN_KEEP_LAST", "3"),
                ("DATASAVER_MIN_SCHEDULE_INTERVAL", "10m"),
            ]),
        )
        .unwrap();
        let now = chrono::Utc::now();
        let agent = RetentionSpec {
            keep_last: Some(0),
            keep_daily: Some(0),
            keep_weekly: Some(0),
            max_age_days: Some(1),
            ..Default::default()
        };
        // Below the floor (keep_last: the variable; the rest: the
        // coordinator's own defaults) the agent's values are raised.
        let g = p.retention_for("globex", Some(&agent));
        assert_eq!(
            (g.keep_last, g.keep_daily, g.keep_weekly, g.max_age_days),
            (3, 10, 4, Some(90))
        );
        let said: Vec<String> = p
            .floor_raises("globex", Some("*/5 * * * *"), Some(&agent), now)
            .iter()
            .map(Raise::message)
            .collect();
        assert_eq!(
            said,
            [
                "agent asked keep_last=0, raised to the floor 3",
                "agent asked keep_daily=0, raised to the floor 10",
                "agent asked keep_weekly=0, raised to the floor 4",
                "agent asked max_age_days=1, raised to the floor 90",
                "agent asked schedule=\"*/5 * * * *\" (fires every 5m), raised to the floor of at most one backup every 10m",
            ]
        );
        let s = p
            .schedule_for("globex", Some("*/5 * * * *"))
            .unwrap()
            .unwrap();
        assert_eq!(
            p.throttle_for("globex", &s, now),
            Some(std::time::Duration::from_secs(600))
        );
        // The file's section is not held to the floor, and what it sets is
        // not the agent's request: neither raised nor reported.
        let a = p.retention_for("acme", Some(&agent));
        assert_eq!(
            (a.keep_last, a.keep_daily, a.keep_weekly, a.max_age_days),
            (3, 1, 4, Some(2))
        );
        let settings: Vec<String> = p
            .floor_raises("acme", Some("*/5 * * * *"), Some(&agent), now)
            .into_iter()
            .map(|r| r.setting)
            .collect();
        assert_eq!(settings, ["keep_last", "keep_weekly"]);
        let s = p
            .schedule_for("acme", Some("*/5 * * * *"))
            .unwrap()
            .unwrap();
        assert_eq!(s.expr(), "* * * * *");
        assert_eq!(p.throttle_for("acme", &s, now), None);
        // Nothing asked, nothing raised.
        assert!(p.floor_raises("globex", None, None, now).is_empty());
    }

    /// DATASAVER_RETRY_BACKOFF above the planner's 30-minute cap is
    /// honoured, not silently shortened: 2h waits 2h.
    #[test]
    fn retry_backoff_longer_than_30m_is_honoured_or_refused() {
        match Policies::load(None, &env(&[("DATASAVER_RETRY_BACKOFF", "2h")])) {
            Ok(p) => assert_eq!(p.retry.backoff(1), chrono::Duration::hours(2)),
            Err(e) => assert_eq!(e.setting, "DATASAVER_RETRY_BACKOFF"),
        }
    }
}
