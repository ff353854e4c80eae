//! Revocation and expiry with real certificates: `dsctl certs revoke` writes the fleet CA's
//! CRL, a coordinator with `DATASAVER_TLS_CRL` picks it up without a restart (a revoked
//! operator is refused, a revoked agent is disconnected and its reconnects refused), an
//! expired certificate is refused, and certificate expiry shows in `/metrics` and as a
//! `certificate.expiring` webhook.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use datasaver_tests::procs::{bin_path, clean_command, run};
use datasaver_tests::webhook::WebhookReceiver;
use datasaver_tests::{assert_one_line_error, wait_until, Fleet, FleetOptions, PgCluster};

/// The issue's promise: refused within a minute of `dsctl certs revoke`.
const WITHIN: Duration = Duration::from_secs(60);

fn dsctl_certs(args: &[&str]) -> datasaver_tests::procs::Output {
    let mut cmd = clean_command(bin_path("dsctl"));
    cmd.args(args);
    run(cmd, Duration::from_secs(60))
}

/// The serial of a PEM certificate as `AB:CD:...` (upper case with colons: `--serial`
/// must take it as `openssl` prints it).
fn serial_of(cert: &Path) -> String {
    let pem = std::fs::read(cert).expect("read certificate");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("PEM certificate");
    let cert = pem.parse_x509().expect("parse certificate");
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Lowercase hex without separators or leading zeros (how datasaver prints a serial).
fn plain(serial: &str) -> String {
    let s: String = serial
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect::<String>()
        .to_ascii_lowercase();
    s.trim_start_matches('0').to_string()
}

#[test]
fn a_revoked_operator_is_refused_and_a_revoked_agent_is_cut_off_without_a_restart() {
    let pg = PgCluster::new();
    pg.create_small_db("app", 1000);
    let mut fleet = Fleet::start_with(FleetOptions {
        tls_crl: true,
        ..Default::default()
    });
    let certs = fleet.certs_dir().to_path_buf();
    assert!(
        certs.join("crl.pem").is_file(),
        "dsctl certs init wrote no crl.pem"
    );
    fleet.add_agent("app", &pg, "app");
    let coordinator_pid = fleet.coordinator().pid();

    let alice = fleet.issue_operator_cert("alice");
    fleet
        .dsctl_as(&alice, "alice", &["list"])
        .expect_success("dsctl list as alice before revocation");

    // Revoke alice by file.
    let alice_crt = alice.join("alice.crt");
    let ca = certs.to_str().expect("utf-8 path");
    let out = dsctl_certs(&[
        "certs",
        "revoke",
        "--ca",
        ca,
        "--cert",
        alice_crt.to_str().expect("utf-8 path"),
        "--reason",
        "keyCompromise: laptop stolen",
    ])
    .expect_success("dsctl certs revoke --cert alice.crt");
    let revoked_at = Instant::now();
    let serial = plain(&serial_of(&alice_crt));
    let text = out.stdout.clone();
    assert!(
        text.contains(&format!("revoked operator:alice (serial {serial})")),
        "revoke names the certificate and its serial:\n{text}"
    );
    assert!(text.contains("reason keyCompromise"), "{text}");
    assert!(
        text.contains("DATASAVER_TLS_CRL") && text.contains("within 5 seconds"),
        "revoke says when coordinators pick it up:\n{text}"
    );
    let log = std::fs::read_to_string(certs.join("revocations.log")).expect("revocations.log");
    assert!(
        log.contains(&serial) && log.contains("operator:alice") && log.contains("laptop stolen"),
        "{log}"
    );

    // Twice is a no-op that says so.
    let again = dsctl_certs(&[
        "certs",
        "revoke",
        "--ca",
        ca,
        "--serial",
        &serial.to_uppercase(),
    ])
    .expect_success("revoking the same serial again");
    assert!(
        again.stdout.contains("already revoked") && again.stdout.contains("operator:alice"),
        "{}",
        again.stdout
    );

    // Refused within a minute, without a restart; the fleet's own admin still works.
    let mut last = None;
    let refused = wait_until(WITHIN, || {
        let o = fleet.dsctl_as(&alice, "alice", &["list"]);
        let done = !o.success();
        last = Some(o);
        done
    });
    let last = last.expect("dsctl ran");
    assert!(
        refused,
        "alice still works {WITHIN:?} after revocation:\n{}",
        last.describe()
    );
    assert!(revoked_at.elapsed() < WITHIN);
    assert_eq!(last.code, Some(1), "{}", last.describe());
    assert_one_line_error(&last.stderr, "revoked");
    fleet
        .dsctl(&["list"])
        .expect_success("dsctl list as the fleet admin");
    assert_eq!(fleet.coordinator().pid(), coordinator_pid, "no restart");
    assert!(
        fleet.coordinator().log().contains(&serial),
        "the coordinator logs the refused serial:\n{}",
        fleet.coordinator().log()
    );

    // An agent revoked while connected: disconnected within a minute, its reconnects
    // refused. By serial as openssl prints it (upper case, colons).
    let agent_crt = fleet.agent("app").cert();
    let agent_serial = serial_of(&agent_crt);
    let out = dsctl_certs(&[
        "certs",
        "revoke",
        "--ca",
        ca,
        "--serial",
        &agent_serial,
        "--reason",
        "host decommissioned",
    ])
    .expect_success("dsctl certs revoke --serial");
    assert!(
        out.stdout
            .contains(&format!("(serial {})", plain(&agent_serial)))
            && out.stdout.contains("reason unspecified"),
        "{}",
        out.stdout
    );
    let gone = wait_until(WITHIN, || !fleet.agent_listed("app"));
    assert!(
        gone,
        "the revoked agent is still listed by dsctl agents {WITHIN:?} later"
    );
    // It keeps trying; each reconnect is refused (the agent retries every few seconds).
    std::thread::sleep(Duration::from_secs(10));
    assert!(!fleet.agent_listed("app"), "a revoked agent reconnected");
    fleet.agent_mut("app").proc.assert_running();
    let refusals = fleet
        .coordinator()
        .log()
        .lines()
        .filter(|l| l.contains("client certificate refused") && l.contains(&plain(&agent_serial)))
        .count();
    assert!(
        refusals >= 1,
        "the agent's reconnects are refused by serial:\n{}",
        fleet.coordinator().log()
    );

    // A broken CRL file is logged and the one in force kept: alice stays refused.
    std::fs::write(certs.join("crl.pem"), "not a CRL\n").expect("overwrite crl.pem");
    assert!(
        fleet.coordinator().wait_for_log(
            "cannot be used; keeping the one loaded",
            Duration::from_secs(30)
        ),
        "no error logged for a broken CRL:\n{}",
        fleet.coordinator().log()
    );
    let still = fleet.dsctl_as(&alice, "alice", &["list"]);
    assert_eq!(still.code, Some(1), "{}", still.describe());
    assert_one_line_error(&still.stderr, "revoked");
}

#[test]
fn a_missing_or_foreign_crl_stops_the_coordinator_with_one_line() {
    let fleet = Fleet::start();
    let other = fleet.dir().join("other-ca");
    dsctl_certs(&[
        "certs",
        "init",
        "--out",
        other.to_str().expect("utf-8 path"),
    ])
    .expect_success("dsctl certs init for another fleet");
    let data = fleet.dir().join("second-data");
    for (crl, needle) in [
        (fleet.dir().join("nowhere.pem"), "cannot read"),
        (other.join("crl.pem"), "fleet CA"),
        (fleet.certs_dir().join("ca.crt"), "no PEM CRL"),
    ] {
        let mut cmd = fleet.coordinator_command(&data);
        cmd.env("DATASAVER_TLS_CRL", &crl);
        let out = run(cmd, Duration::from_secs(60));
        assert_eq!(out.code, Some(1), "{}", out.describe());
        let line = assert_one_line_error(&out.stderr, "DATASAVER_TLS_CRL");
        assert!(line.contains(needle), "{line}");
    }
}

/// An operator certificate signed by the fleet CA whose validity ended yesterday.
fn expired_operator(certs: &Path, out: &Path) -> PathBuf {
    let ca_pem = std::fs::read_to_string(certs.join("ca.crt")).expect("ca.crt");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key")).expect("ca.key"))
            .expect("ca.key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("CA");
    let mut p = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "datasaver");
    dn.push(rcgen::DnType::OrganizationalUnitName, "operator");
    dn.push(rcgen::DnType::CommonName, "bob");
    p.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(30);
    p.not_after = now - time::Duration::days(1);
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = p.signed_by(&key, &issuer).expect("sign");
    std::fs::create_dir_all(out).expect("mkdir");
    std::fs::write(out.join("bob.crt"), cert.pem()).expect("write bob.crt");
    std::fs::write(out.join("bob.key"), key.serialize_pem()).expect("write bob.key");
    out.to_path_buf()
}

#[test]
fn an_expired_certificate_is_refused() {
    let fleet = Fleet::start();
    let dir = expired_operator(fleet.certs_dir(), &fleet.dir().join("expired"));
    let out = fleet.dsctl_as(&dir, "bob", &["list"]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert_one_line_error(&out.stderr, "expired");
    fleet
        .dsctl(&["list"])
        .expect_success("a valid certificate still works");
    assert!(
        wait_until(Duration::from_secs(10), || fleet
            .coordinator()
            .log()
            .contains("operator:bob")),
        "the coordinator logs whose certificate it refused:\n{}",
        fleet.coordinator().log()
    );
}

fn scrape(fleet: &Fleet) -> Vec<prometheus_parse::Sample> {
    let r = fleet.http_get("/metrics").expect("GET /metrics");
    assert_eq!(r.status, 200);
    let lines = r.body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines)
        .expect("/metrics parses as Prometheus text")
        .samples
}

fn expiry(samples: &[prometheus_parse::Sample], kind: &str, name: &str) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.metric == "datasaver_certificate_expiry_timestamp_seconds")
        .find(|s| s.labels.get("kind") == Some(kind) && s.labels.get("name") == Some(name))
        .and_then(|s| match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

#[test]
fn certificate_expiry_is_in_metrics_and_announced_thirty_days_ahead() {
    let hook = WebhookReceiver::start();
    let pg = PgCluster::new();
    pg.create_small_db("app", 1000);
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: vec![("DATASAVER_WEBHOOK_URL".into(), hook.url("/hook"))],
        ..Default::default()
    });
    // The agent's certificate is valid for 10 days: inside the 30-day window.
    let agent_dir = fleet.dir().join("agents").join("app");
    let ca = fleet.certs_dir().to_str().expect("utf-8 path").to_string();
    let issued = dsctl_certs(&[
        "certs",
        "issue",
        "--ca",
        &ca,
        "--agent",
        "app",
        "--target",
        "app",
        "--days",
        "10",
        "--out",
        agent_dir.to_str().expect("utf-8 path"),
    ])
    .expect_success("dsctl certs issue --days 10");
    assert!(
        issued.stdout.contains("in 10 days") || issued.stdout.contains("in 9 days"),
        "{}",
        issued.stdout
    );
    let serial = plain(&serial_of(&agent_dir.join("app.crt")));
    fleet.add_agent("app", &pg, "app");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let day = 86400.0;
    let samples = scrape(&fleet);
    let agent = expiry(&samples, "agent", "app").expect("agent certificate expiry in /metrics");
    assert!(
        (agent - (now + 10.0 * day)).abs() < day,
        "agent expiry {agent}, now {now}"
    );
    let own = expiry(&samples, "coordinator", "coordinator")
        .expect("coordinator certificate expiry in /metrics");
    assert!(
        (own - (now + 365.0 * day)).abs() < 2.0 * day,
        "coordinator expiry {own}"
    );

    assert!(
        wait_until(Duration::from_secs(60), || !hook
            .events("certificate.expiring")
            .is_empty()),
        "no certificate.expiring webhook: {:?}",
        hook.received()
    );
    // Evaluated every few seconds, announced once (the next one is due in a day).
    std::thread::sleep(Duration::from_secs(12));
    let events = hook.events("certificate.expiring");
    assert_eq!(
        events.len(),
        1,
        "one announcement per certificate per day: {events:?}"
    );
    let e = &events[0];
    assert_eq!(e["certificate"]["kind"], "agent", "{e}");
    assert_eq!(e["certificate"]["name"], "app", "{e}");
    assert_eq!(e["certificate"]["serial"], serial.as_str(), "{e}");
    let message = e["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("agent app")
            && message.contains(&serial)
            && message.contains("expires on"),
        "{e}"
    );
    let not_after = e["certificate"]["not_after"].as_str().unwrap_or_default();
    let date = &not_after[..10.min(not_after.len())];
    assert!(
        message.contains(date),
        "the message names the expiry date {date}: {e}"
    );
}
