//! Prometheus metrics (`GET /metrics`). Counters and the duration histogram
//! move as events happen; gauges that describe state (bytes stored, last
//! success, agents connected) are refreshed from the catalog and the fleet at
//! each scrape, so they are right after a restart too.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub struct Metrics {
    registry: Registry,
    backups: Family<Labels, Counter>,
    backup_duration: Family<Labels, Histogram>,
    backup_size: Family<Labels, Gauge<f64, AtomicU64>>,
    backup_raw_size: Family<Labels, Gauge<f64, AtomicU64>>,
    upload_bytes: Family<Labels, Counter>,
    restores: Family<Labels, Counter>,
    verifies: Family<Labels, Counter>,
    last_success: Family<Labels, Gauge<f64, AtomicU64>>,
    last_drill_success: Family<Labels, Gauge<f64, AtomicU64>>,
    stored_bytes: Family<Labels, Gauge<f64, AtomicU64>>,
    backups_stored: Family<Labels, Gauge>,
    agents_connected: Gauge,
    alerts_open: Family<Labels, Gauge>,
    schedule_missed: Family<Labels, Counter>,
    queue_running: Gauge,
    queue_waiting: Gauge,
    refusals: Family<Labels, Counter>,
    certificate_expiry: Family<Labels, Gauge>,
    wal_lag_bytes: Family<Labels, Gauge>,
    wal_lag_seconds: Family<Labels, Gauge>,
    wal_latest_recoverable: Family<Labels, Gauge<f64, AtomicU64>>,
    wal_earliest_recoverable: Family<Labels, Gauge<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("datasaver");
        let backups = Family::<Labels, Counter>::default();
        registry.register(
            "backups",
            "Backups finished, by target and result (success, failure) and failure reason",
            backups.clone(),
        );
        let backup_duration = Family::<Labels, Histogram>::new_with_constructor(|| {
            // 1 s .. ~4.5 h
            Histogram::new(exponential_buckets(1.0, 2.0, 15))
        });
        registry.register_with_unit(
            "backup_duration",
            "Duration of successful backups",
            prometheus_client::registry::Unit::Seconds,
            backup_duration.clone(),
        );
        let backup_size = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "backup_size",
            "Stored size of the latest successful backup",
            prometheus_client::registry::Unit::Bytes,
            backup_size.clone(),
        );
        let backup_raw_size = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "backup_raw_size",
            "Size of the latest successful backup as pg_dump wrote it, before compression",
            prometheus_client::registry::Unit::Bytes,
            backup_raw_size.clone(),
        );
        let upload_bytes = Family::<Labels, Counter>::default();
        registry.register_with_unit(
            "upload",
            "Bytes received from agents and written to storage (rate() gives throughput)",
            prometheus_client::registry::Unit::Bytes,
            upload_bytes.clone(),
        );
        let restores = Family::<Labels, Counter>::default();
        registry.register(
            "restores",
            "Restores finished, by target and result",
            restores.clone(),
        );
        let verifies = Family::<Labels, Counter>::default();
        registry.register(
            "verifies",
            "Verifies finished, by target and result",
            verifies.clone(),
        );
        let last_success = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "last_success_timestamp",
            "Unix time of the latest successful backup",
            prometheus_client::registry::Unit::Seconds,
            last_success.clone(),
        );
        let last_drill_success = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "last_drill_success_timestamp",
            "Unix time of the latest passing restore drill",
            prometheus_client::registry::Unit::Seconds,
            last_drill_success.clone(),
        );
        let stored_bytes = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "stored",
            "Bytes of completed backups held in storage",
            prometheus_client::registry::Unit::Bytes,
            stored_bytes.clone(),
        );
        let backups_stored = Family::<Labels, Gauge>::default();
        registry.register(
            "backups_stored",
            "Completed backups held in storage",
            backups_stored.clone(),
        );
        let agents_connected = Gauge::default();
        registry.register(
            "agents_connected",
            "Agents connected to the coordinator now",
            agents_connected.clone(),
        );
        let alerts_open = Family::<Labels, Gauge>::default();
        registry.register(
            "alerts_open",
            "Open alerts, by target and kind",
            alerts_open.clone(),
        );
        let schedule_missed = Family::<Labels, Counter>::default();
        registry.register(
            "schedule_missed",
            "Scheduled slots that could not start before the target's next slot (the queue was full)",
            schedule_missed.clone(),
        );
        let queue_running = Gauge::default();
        registry.register(
            "queue_running",
            "Backups running now (at most DATASAVER_MAX_CONCURRENT_BACKUPS)",
            queue_running.clone(),
        );
        let queue_waiting = Gauge::default();
        registry.register(
            "queue_waiting",
            "Backups waiting in the queue (scheduled, retries and dsctl backup)",
            queue_waiting.clone(),
        );
        let refusals = Family::<Labels, Counter>::default();
        registry.register(
            "refusals",
            "Requests refused for lack of a grant, by who (agent, or the operator's role) and action",
            refusals.clone(),
        );
        let certificate_expiry = Family::<Labels, Gauge>::default();
        registry.register_with_unit(
            "certificate_expiry_timestamp",
            "Unix time a certificate expires: the coordinator's own (kind=coordinator) and each agent's as last seen (kind=agent)",
            prometheus_client::registry::Unit::Seconds,
            certificate_expiry.clone(),
        );
        let wal_lag_bytes = Family::<Labels, Gauge>::default();
        registry.register_with_unit(
            "wal_lag",
            "WAL the server has that is not stored yet, as its agent last reported (targets streaming WAL)",
            prometheus_client::registry::Unit::Bytes,
            wal_lag_bytes.clone(),
        );
        let wal_lag_seconds = Family::<Labels, Gauge>::default();
        registry.register_with_unit(
            "wal_lag",
            "How long the server has had WAL that is not stored (0 when caught up)",
            prometheus_client::registry::Unit::Seconds,
            wal_lag_seconds.clone(),
        );
        let wal_latest_recoverable = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "wal_latest_recoverable_timestamp",
            "Unix time (the server's clock) up to which everything written is stored: the end of the recovery window",
            prometheus_client::registry::Unit::Seconds,
            wal_latest_recoverable.clone(),
        );
        let wal_earliest_recoverable = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "wal_earliest_recoverable_timestamp",
            "Unix time (the server's clock) when the oldest usable base backup became consistent: the start of the recovery window",
            prometheus_client::registry::Unit::Seconds,
            wal_earliest_recoverable.clone(),
        );
        Self {
            wal_lag_bytes,
            wal_lag_seconds,
            wal_latest_recoverable,
            wal_earliest_recoverable,
            certificate_expiry,
            registry,
            refusals,
            schedule_missed,
            queue_running,
            queue_waiting,
            backups,
            backup_duration,
            backup_size,
            backup_raw_size,
            upload_bytes,
            restores,
            verifies,
            last_success,
            last_drill_success,
            stored_bytes,
            backups_stored,
            agents_connected,
            alerts_open,
        }
    }

    pub fn backup_succeeded(&self, target: &str, seconds: f64, stored: u64, raw: u64) {
        self.backups
            .get_or_create(&labels(&[
                ("target", target),
                ("result", "success"),
                ("reason", ""),
            ]))
            .inc();
        self.backup_duration
            .get_or_create(&labels(&[("target", target)]))
            .observe(seconds);
        self.backup_size
            .get_or_create(&labels(&[("target", target)]))
            .set(stored as f64);
        self.backup_raw_size
            .get_or_create(&labels(&[("target", target)]))
            .set(raw as f64);
    }

    pub fn backup_failed(&self, target: &str, error: &str) {
        self.backups
            .get_or_create(&labels(&[
                ("target", target),
                ("result", "failure"),
                ("reason", failure_reason(error)),
            ]))
            .inc();
    }

    /// A backup stopped by a planned agent stop: neither success nor failure.
    pub fn backup_interrupted(&self, target: &str) {
        self.backups
            .get_or_create(&labels(&[
                ("target", target),
                ("result", "interrupted"),
                ("reason", ""),
            ]))
            .inc();
    }

    /// A request refused by authorization: `who` is `agent` or the
    /// operator's role, `action` what was asked.
    pub fn refused(&self, who: &str, action: &str) {
        self.refusals
            .get_or_create(&labels(&[("who", who), ("action", action)]))
            .inc();
    }

    pub fn schedule_missed(&self, target: &str) {
        self.schedule_missed
            .get_or_create(&labels(&[("target", target)]))
            .inc();
    }

    pub fn uploaded(&self, target: &str, bytes: u64) {
        self.upload_bytes
            .get_or_create(&labels(&[("target", target)]))
            .inc_by(bytes);
    }

    pub fn restore_finished(&self, target: &str, ok: bool) {
        self.restores
            .get_or_create(&labels(&[("target", target), ("result", result(ok))]))
            .inc();
    }

    pub fn verify_finished(&self, target: &str, ok: bool) {
        self.verifies
            .get_or_create(&labels(&[("target", target), ("result", result(ok))]))
            .inc();
    }

    /// A certificate's expiry (`kind` agent or coordinator).
    pub fn certificate_expiry(&self, kind: &str, name: &str, not_after: i64) {
        self.certificate_expiry
            .get_or_create(&labels(&[("kind", kind), ("name", name)]))
            .set(not_after);
    }

    /// Sets the state gauges from a fresh look at catalog and fleet.
    pub fn refresh(
        &self,
        targets: &[crate::health::TargetStatus],
        agents: usize,
        queue: &crate::health::Queue,
        alerts: &[(String, String)],
    ) {
        self.agents_connected.set(agents as i64);
        self.queue_running.set(queue.running as i64);
        self.queue_waiting.set(queue.waiting as i64);
        for t in targets {
            let l = labels(&[("target", &t.target)]);
            self.stored_bytes
                .get_or_create(&l)
                .set(t.stored_bytes as f64);
            self.backups_stored.get_or_create(&l).set(t.backups as i64);
            if let Some(ts) = t.last_success_unix {
                self.last_success.get_or_create(&l).set(ts as f64);
            }
            if let Some(ts) = t.last_drill_success_unix {
                self.last_drill_success.get_or_create(&l).set(ts as f64);
            }
        }
        self.alerts_open.clear();
        for (target, kind) in alerts {
            self.alerts_open
                .get_or_create(&labels(&[("target", target), ("kind", kind)]))
                .inc();
        }
    }

    /// Sets the WAL gauges of the targets streaming WAL.
    pub fn refresh_wal(&self, wal: &[crate::wal::view::TargetWal]) {
        for w in wal {
            let l = labels(&[("target", &w.target)]);
            if let Some(b) = w.lag_bytes {
                self.wal_lag_bytes.get_or_create(&l).set(b as i64);
            }
            if let Some(s) = w.lag_seconds {
                self.wal_lag_seconds.get_or_create(&l).set(s as i64);
            }
            if let Some(t) = w.latest_recoverable {
                self.wal_latest_recoverable
                    .get_or_create(&l)
                    .set(t.timestamp_micros() as f64 / 1e6);
            }
            if let Some(t) = w.earliest_recoverable {
                self.wal_earliest_recoverable
                    .get_or_create(&l)
                    .set(t.timestamp_micros() as f64 / 1e6);
            }
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

fn result(ok: bool) -> &'static str {
    if ok {
        "success"
    } else {
        "failure"
    }
}

/// A short, fixed set of failure reasons (label values must stay few).
pub fn failure_reason(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if e.contains("agent not connected") || e.contains("no agent is connected") {
        "agent_not_connected"
    } else if e.contains("interrupted") || e.contains("shut down") || e.contains("shutting down") {
        "interrupted"
    } else if e.contains("cannot connect to database") || e.contains("password") {
        "database_unreachable"
    } else if e.contains("pg_dump") {
        "pg_dump"
    } else if e.contains("checksum") {
        "checksum"
    } else if e.contains("storage") || e.contains("s3") {
        "storage"
    } else if e.contains("disconnected") || e.contains("upload") {
        "agent_lost"
    } else {
        "other"
    }
}
