//! Schedules and retention per target, from three layers: the coordinator's
//! defaults (environment or the YAML file's top level), what the target's
//! agent asks for, and the YAML file's per-target section, which wins.

use std::collections::BTreeMap;
use std::path::Path;

use chrono_tz::Tz;
use datasaver_common::config::{parse_duration, Env, SettingError};
use datasaver_common::proto;
use serde::{Deserialize, Serialize};

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

/// How long a stopping coordinator waits for its jobs to record how they
/// ended (`DATASAVER_SHUTDOWN_GRACE`, the agent's setting of the same name).
pub const DEFAULT_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetFile {
    /// Overrides the agent's DATASAVER_SCHEDULE; "off" disables scheduling.
    pub schedule: Option<String>,
    /// Dead man's switch for this target, e.g. "26h" (overrides DATASAVER_ALERT_AFTER).
    pub alert_after: Option<String>,
    #[serde(default)]
    pub retention: RetentionSpec,
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
    /// A job still running after this is cancelled and fails.
    pub job_timeout: std::time::Duration,
    /// How long shutdown waits for in-flight jobs to record their end.
    pub shutdown_grace: std::time::Duration,
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
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
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
            if let Some(a) = &t.alert_after {
                parse_duration(&format!("DATASAVER_CONFIG: targets.{name}.alert_after"), a)?;
            }
            t.retention.check(&format!(
                "DATASAVER_CONFIG: targets.{name}.retention.failed_grace"
            ))?;
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
        let shutdown_grace = match env.get("DATASAVER_SHUTDOWN_GRACE") {
            Some(v) => parse_duration("DATASAVER_SHUTDOWN_GRACE", v)?,
            None => DEFAULT_SHUTDOWN_GRACE,
        };
        Ok(Policies {
            tz,
            agent_grace,
            max_concurrent,
            retry,
            defaults,
            targets: f.targets,
            job_timeout,
            shutdown_grace,
        })
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

    /// Retention for a target: defaults, then the agent's request, then the file.
    pub fn retention_for(&self, target: &str, requested: Option<&RetentionSpec>) -> gfs::Policy {
        let mut spec = self.defaults.clone();
        if let Some(r) = requested {
            spec = spec.overlay(r);
        }
        if let Some(t) = self.targets.get(target) {
            spec = spec.overlay(&t.retention);
        }
        spec.to_policy()
    }
}

fn is_off(s: &str) -> bool {
    matches!(s.trim().to_ascii_lowercase().as_str(), "off" | "none" | "")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_pairs(pairs)
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
        assert_eq!(
            (
                acme.keep_daily,
                acme.keep_weekly,
                acme.keep_monthly,
                acme.keep_last
            ),
            (2, 3, 1, 0)
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
    fn bad_files_and_values_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        for (text, needle) in [
            (
                "targets:\n  acme:\n    schedule: \"99 * * * *\"\n",
                "targets.acme.schedule",
            ),
            ("targets:\n  acme:\n    shedule: \"0 2 * * *\"\n", "shedule"),
            ("timezone: Mars/Base\n", "DATASAVER_TIMEZONE"),
            ("retention:\n  failed_grace: soon\n", "failed_grace"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = Policies::load(Some(&f), &env(&[])).unwrap_err();
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
        let e = Policies::load(None, &env(&[("DATASAVER_KEEP_DAILY", "-1")])).unwrap_err();
        assert_eq!(e.setting, "DATASAVER_KEEP_DAILY");
        let e = Policies::load(None, &env(&[("DATASAVER_RETRY_BACKOFF", "1")])).unwrap_err();
        assert_eq!(e.setting, "DATASAVER_RETRY_BACKOFF");
        let e = Policies::load(Some(Path::new("/nonexistent.yaml")), &env(&[])).unwrap_err();
        assert_eq!(e.setting, "DATASAVER_CONFIG");
    }
}
