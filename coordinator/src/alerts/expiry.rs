//! `certificate.expiring`: the coordinator's own certificate and each agent's
//! (as seen when it connects) are watched; from [`WINDOW`] before its expiry
//! a certificate is announced through the webhooks, again at most once a day
//! while it stays unrenewed, and resolved when the same agent comes back with
//! a new certificate. What to do is decided by [`plan`], a pure function of
//! the certificates, the open alerts and the time; the alert rows (one open
//! per certificate) make a restart neither repeat nor forget one.

use std::collections::BTreeMap;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};
use serde_json::json;

use super::stamp;
use super::store::AlertRow;
use crate::Core;

/// The webhook event and alert kind.
pub const EVENT: &str = "certificate.expiring";

/// How long before its expiry a certificate is announced.
pub const WINDOW: Duration = Duration::days(30);

/// How often an unrenewed certificate is announced again.
pub const REMIND_EVERY: Duration = Duration::days(1);

/// Prefix of the alert rows' `target` column for certificates (never a
/// target name: those cannot contain `:`).
const KEY_PREFIX: &str = "certificate:";

/// Whose certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CertKind {
    Agent,
    Coordinator,
}

impl CertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CertKind::Agent => "agent",
            CertKind::Coordinator => "coordinator",
        }
    }
}

/// A certificate the coordinator knows of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cert {
    pub kind: CertKind,
    pub name: String,
    pub serial: String,
    pub not_after: DateTime<Utc>,
}

impl Cert {
    /// From a peer identity (`not_after` in Unix seconds).
    pub fn of(kind: CertKind, id: &datasaver_common::tls::PeerIdentity) -> Cert {
        Cert {
            kind,
            name: id.name.clone(),
            serial: id.serial.clone(),
            not_after: DateTime::from_timestamp(id.not_after, 0)
                .unwrap_or(DateTime::<Utc>::MIN_UTC),
        }
    }

    /// The alert row's key: one per certificate.
    fn key(&self) -> String {
        format!(
            "{KEY_PREFIX}{}:{}:{}",
            self.kind.as_str(),
            self.name,
            self.serial
        )
    }

    fn describe(&self) -> String {
        match self.kind {
            CertKind::Agent => format!("the certificate of agent {}", self.name),
            CertKind::Coordinator => "the coordinator's own certificate".to_string(),
        }
    }
}

/// (kind, name, serial) of an alert row's key.
fn parse_key(key: &str) -> Option<(&str, &str, &str)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let mut it = rest.splitn(3, ':');
    Some((it.next()?, it.next()?, it.next()?))
}

/// The newest certificate seen per agent, and the coordinator's own.
#[derive(Default)]
pub struct Certificates {
    inner: Mutex<BTreeMap<(CertKind, String), Cert>>,
}

impl Certificates {
    /// Records the certificate `c` (replacing an older one of the same
    /// name: a renewed certificate) and exports its expiry in `/metrics`.
    pub fn seen(&self, c: Cert, metrics: &crate::metrics::Metrics) {
        metrics.certificate_expiry(c.kind.as_str(), &c.name, c.not_after.timestamp());
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((c.kind, c.name.clone()), c);
    }

    pub fn all(&self) -> Vec<Cert> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// An open `certificate.expiring` alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub id: i64,
    pub key: String,
    pub opened_at: DateTime<Utc>,
}

/// What to do about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Announce it (first time).
    Notify(Cert, String),
    /// Announce it again: the open alert `id` is a day old.
    Remind(i64, Cert, String),
    /// The certificate was replaced by `renewed`: resolve alert `id`.
    Resolve(i64, String, Cert),
}

/// The message for a certificate inside the window.
pub fn message(c: &Cert, now: DateTime<Utc>) -> String {
    let when = c.not_after.format("%Y-%m-%d %H:%M UTC");
    let left = c.not_after - now;
    let what = c.describe();
    let renew = match c.kind {
        CertKind::Agent => format!(
            "issue a new one with `dsctl certs issue --agent {}` and install it on the agent",
            c.name
        ),
        CertKind::Coordinator => {
            "issue a new coordinator certificate from the fleet CA and restart the coordinator"
                .to_string()
        }
    };
    if left <= Duration::zero() {
        format!("{what} (serial {}) expired on {when}: {renew}", c.serial)
    } else {
        format!(
            "{what} (serial {}) expires on {when}, in {} days: {renew}",
            c.serial,
            left.num_days()
        )
    }
}

/// Whether `c` is inside the warning window at `now` (expired ones too).
pub fn expiring(c: &Cert, now: DateTime<Utc>) -> bool {
    c.not_after - now <= WINDOW
}

/// What to do at `now`, given the known certificates and the open alerts.
pub fn plan(certs: &[Cert], open: &[Open], now: DateTime<Utc>) -> Vec<Action> {
    let mut out = Vec::new();
    for c in certs.iter().filter(|c| expiring(c, now)) {
        let key = c.key();
        match open.iter().find(|o| o.key == key) {
            None => out.push(Action::Notify(c.clone(), message(c, now))),
            Some(o) if now - o.opened_at >= REMIND_EVERY => {
                out.push(Action::Remind(o.id, c.clone(), message(c, now)))
            }
            Some(_) => {}
        }
    }
    // An alert whose certificate was replaced by a newer one of the same
    // name is over. One whose holder has not been seen since a restart
    // stays open: it may still come back with the old certificate.
    for o in open {
        let Some((kind, name, serial)) = parse_key(&o.key) else {
            continue;
        };
        if let Some(now_cert) = certs
            .iter()
            .find(|c| c.kind.as_str() == kind && c.name == name)
        {
            if now_cert.serial != serial && !expiring(now_cert, now) {
                out.push(Action::Resolve(o.id, o.key.clone(), now_cert.clone()));
            }
        }
    }
    out
}

fn body(c: &Cert, message: &str, at: DateTime<Utc>, resolved: bool) -> String {
    let text = if resolved {
        format!("[datasaver] resolved: {EVENT}: {message}")
    } else {
        format!("[datasaver] {EVENT}: {message}")
    };
    json!({
        "event": if resolved { "resolved" } else { EVENT },
        "alert": EVENT,
        "status": if resolved { "resolved" } else { "firing" },
        "certificate": {
            "kind": c.kind.as_str(),
            "name": c.name,
            "serial": c.serial,
            "not_after": c.not_after.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        },
        "message": message,
        "at": at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "text": text,
    })
    .to_string()
}

fn parse(t: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

/// One evaluation at the clock's time.
pub async fn evaluate(core: &Core) -> Result<(), String> {
    evaluate_at(core, core.clock.now()).await
}

async fn evaluate_at(core: &Core, now: DateTime<Utc>) -> Result<(), String> {
    let store = &core.alerter.store;
    let open: Vec<Open> = store
        .open_alerts()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|a| a.kind == EVENT)
        .map(|a| Open {
            id: a.id,
            opened_at: parse(&a.opened_at).unwrap_or(now),
            key: a.target,
        })
        .collect();
    let actions = plan(&core.alerter.certificates.all(), &open, now);
    let notify = |body: String| -> Vec<(String, String)> {
        core.alert_config
            .webhook_urls
            .iter()
            .map(|u| (u.clone(), body.clone()))
            .collect()
    };
    let row = |c: &Cert, message: &str| AlertRow {
        id: 0,
        target: c.key(),
        kind: EVENT.to_string(),
        message: message.to_string(),
        backup_id: None,
        opened_at: stamp(now),
    };
    for a in &actions {
        match a {
            Action::Notify(c, m) => {
                tracing::warn!(certificate = %format!("{}:{}", c.kind.as_str(), c.name), serial = %c.serial, alert = EVENT, message = %m, "alert");
                store
                    .open_alert(row(c, m), notify(body(c, m, now, false)))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Action::Remind(id, c, m) => {
                tracing::warn!(certificate = %format!("{}:{}", c.kind.as_str(), c.name), serial = %c.serial, alert = EVENT, message = %m, "alert (daily reminder)");
                // The day-old row closes silently and a new one opens with
                // the notification: its opened_at is when the next reminder
                // is due from.
                store
                    .resolve_alert(*id, stamp(now), Vec::new())
                    .await
                    .map_err(|e| e.to_string())?;
                store
                    .open_alert(row(c, m), notify(body(c, m, now, false)))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Action::Resolve(id, key, renewed) => {
                let m = format!(
                    "{} was renewed: serial {} now, valid until {}",
                    renewed.describe(),
                    renewed.serial,
                    renewed.not_after.format("%Y-%m-%d %H:%M UTC")
                );
                tracing::info!(alert = EVENT, old = %key, message = %m, "alert resolved");
                store
                    .resolve_alert(*id, stamp(now), notify(body(renewed, &m, now, true)))
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    if !actions.is_empty() {
        core.alerter.deliver.notify_one();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
    }

    fn cert(name: &str, serial: &str, expires_in_days: i64) -> Cert {
        Cert {
            kind: CertKind::Agent,
            name: name.into(),
            serial: serial.into(),
            not_after: t0() + Duration::days(expires_in_days),
        }
    }

    /// Runs `plan` hour by hour from `from` to `to`, applying its actions to
    /// an in-memory set of open alerts; returns (hour, action kind, name).
    fn simulate(
        certs: &dyn Fn(DateTime<Utc>) -> Vec<Cert>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Vec<(i64, &'static str, String)> {
        let mut open: Vec<Open> = Vec::new();
        let mut next_id = 1;
        let mut log = Vec::new();
        let mut now = from;
        while now <= to {
            for a in plan(&certs(now), &open, now) {
                let h = (now - t0()).num_hours();
                match a {
                    Action::Notify(c, _) => {
                        open.push(Open {
                            id: next_id,
                            key: c.key(),
                            opened_at: now,
                        });
                        next_id += 1;
                        log.push((h, "notify", c.name));
                    }
                    Action::Remind(id, c, _) => {
                        open.retain(|o| o.id != id);
                        open.push(Open {
                            id: next_id,
                            key: c.key(),
                            opened_at: now,
                        });
                        next_id += 1;
                        log.push((h, "remind", c.name));
                    }
                    Action::Resolve(id, _, c) => {
                        open.retain(|o| o.id != id);
                        log.push((h, "resolve", c.name));
                    }
                }
            }
            now += Duration::hours(1);
        }
        log
    }

    #[test]
    fn announced_thirty_days_before_then_once_a_day() {
        // expires at day 40: quiet until day 10, then one a day
        let c = cert("acme", "ab12", 40);
        let log = simulate(&|_| vec![c.clone()], t0(), t0() + Duration::days(13));
        assert_eq!(
            log,
            vec![
                (10 * 24, "notify", "acme".into()),
                (11 * 24, "remind", "acme".into()),
                (12 * 24, "remind", "acme".into()),
                (13 * 24, "remind", "acme".into()),
            ]
        );
        let m = message(&c, t0() + Duration::days(10));
        assert!(
            m.contains("agent acme") && m.contains("serial ab12") && m.contains("2026-04-10"),
            "{m}"
        );
        assert!(m.contains("in 30 days"), "{m}");
    }

    #[test]
    fn far_from_expiry_nothing_and_expired_still_announced() {
        let far = cert("far", "01", 365);
        assert!(plan(&[far], &[], t0()).is_empty());
        let gone = cert("gone", "02", -3);
        let a = plan(std::slice::from_ref(&gone), &[], t0());
        match a.as_slice() {
            [Action::Notify(c, m)] => {
                assert_eq!(c, &gone);
                assert!(m.contains("expired on 2026-02-26"), "{m}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_renewed_certificate_resolves_the_alert() {
        let old = cert("acme", "0aa", 5);
        let new = cert("acme", "0bb", 400);
        // renewed at hour 30
        let log = simulate(
            &|now| {
                if now < t0() + Duration::hours(30) {
                    vec![old.clone()]
                } else {
                    vec![new.clone()]
                }
            },
            t0(),
            t0() + Duration::days(3),
        );
        assert_eq!(
            log,
            vec![
                (0, "notify", "acme".into()),
                (24, "remind", "acme".into()),
                (30, "resolve", "acme".into()),
            ]
        );
    }

    #[test]
    fn an_alert_of_a_holder_not_seen_since_a_restart_stays_open() {
        let open = vec![Open {
            id: 7,
            key: cert("acme", "0aa", 5).key(),
            opened_at: t0(),
        }];
        assert!(plan(&[], &open, t0() + Duration::hours(2)).is_empty());
        // another agent's certificate does not resolve it
        assert!(plan(&[cert("other", "0cc", 400)], &open, t0()).is_empty());
    }

    #[test]
    fn keys_round_trip() {
        let c = Cert {
            kind: CertKind::Coordinator,
            name: "coordinator".into(),
            serial: "5f".into(),
            not_after: t0(),
        };
        assert_eq!(
            parse_key(&c.key()),
            Some(("coordinator", "coordinator", "5f"))
        );
        assert_eq!(parse_key("acme-main"), None);
    }

    #[tokio::test]
    async fn evaluation_notifies_once_and_reminds_a_day_later() {
        let f = crate::testing::fixture(crate::policy::Policies::default());
        let core = &f.core;
        core.alerter
            .certificates
            .seen(cert("acme", "ab12", 10), &core.metrics);
        evaluate_at(core, t0()).await.unwrap();
        evaluate_at(core, t0() + Duration::hours(23)).await.unwrap();
        let open = core.alerter.store.open_alerts().await.unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].kind, EVENT);
        assert!(
            open[0].message.contains("serial ab12"),
            "{}",
            open[0].message
        );
        let first = open[0].id;
        evaluate_at(core, t0() + Duration::hours(24)).await.unwrap();
        let open = core.alerter.store.open_alerts().await.unwrap();
        assert_eq!(open.len(), 1);
        assert_ne!(open[0].id, first, "a day later: a new reminder");
        assert!(core.metrics.encode().contains(
            "datasaver_certificate_expiry_timestamp_seconds{kind=\"agent\",name=\"acme\"}"
        ));
    }
}
