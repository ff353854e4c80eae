//! Join tokens with the real binaries: an agent given only a token (no PEM
//! files, no coordinator address) joins, backs up and restores; it keeps its
//! certificate across its own and the coordinator's restarts without spending
//! the token again, and renews it. Every bad token is refused with one line
//! and leaves the state directory empty; a coordinator that is not the one
//! the token pins never receives the secret.

use std::path::Path;
use std::time::Duration;

use datasaver_tests::procs::run;
use datasaver_tests::{wait_until, Fleet, FleetOptions, PgCluster};

fn enrollment_fleet(extra: &[(&str, &str)]) -> Fleet {
    Fleet::start_with(FleetOptions {
        enrollment: true,
        tls_crl: true,
        coordinator_env: extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
}

/// `dsctl tokens create ARGS`: the token (stdout) and what was said of it (stderr).
#[track_caller]
fn create_token(fleet: &Fleet, args: &[&str]) -> (String, String) {
    let mut full = vec!["tokens", "create"];
    full.extend_from_slice(args);
    let out = fleet.dsctl(&full).expect_success("dsctl tokens create");
    let token = out.stdout.trim().to_string();
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.describe());
    assert!(token.starts_with("dsj1."), "{}", out.describe());
    (token, out.stderr)
}

fn token_id(token: &str) -> String {
    token["dsj1.".len().."dsj1.".len() + 12].to_string()
}

/// Files in `dir` (none when it does not exist).
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Runs an agent that must fail to start; returns its last stderr line.
#[track_caller]
fn refused_agent(spec: datasaver_tests::procs::ProcSpec) -> String {
    let out = run(spec.command(), Duration::from_secs(60));
    assert!(
        !out.success() && !out.timed_out,
        "the agent should have exited with an error\n{}",
        out.describe()
    );
    let last = out
        .stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .to_string();
    assert!(
        last.starts_with("datasaver-agent: "),
        "the agent's last line is not its error: {}",
        out.describe()
    );
    last
}

fn rows(pg: &PgCluster, db: &str) -> Vec<Vec<String>> {
    pg.query_rows(db, "SELECT id, v FROM t ORDER BY id")
}

#[test]
fn an_agent_joins_with_a_token_alone_and_keeps_its_certificate() {
    let pg = PgCluster::new();
    pg.create_small_db("app", 500);
    let mut fleet = enrollment_fleet(&[]);

    let (token, said) = create_token(&fleet, &["--target", "app", "--ttl", "1h"]);
    let id = token_id(&token);
    assert!(
        said.contains(&format!("join token {id} for target app: expires "))
            && said.contains("one agent")
            && said.contains("DATASAVER_JOIN_TOKEN"),
        "{said}"
    );
    assert!(
        token.ends_with(&format!("@{}", fleet.coordinator_url())),
        "{token}"
    );

    let state = fleet.dir().join("state-app");
    let spec = fleet.join_agent_spec("app", &pg, "app", &token, &state);
    fleet.add_agent_spec("app", spec);
    assert_eq!(files(&state), ["agent.crt", "agent.key", "ca.crt"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state.join("agent.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the key is readable by others: {mode:o}");
    // The certificate names the token's target and was signed by the
    // enrollment CA, not the fleet root.
    let pem = std::fs::read(state.join("agent.crt")).expect("agent.crt");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("PEM");
    let cert = pem.parse_x509().expect("certificate");
    assert!(
        cert.issuer()
            .to_string()
            .contains("datasaver enrollment CA"),
        "{}",
        cert.issuer()
    );
    assert!(
        cert.subject().to_string().contains("CN=app"),
        "{}",
        cert.subject()
    );

    let b = fleet.backup("app", None);
    assert!(b.is_completed(), "{:?}", b.raw);
    fleet
        .restore(&b.id, "app_back", &[])
        .expect_success("restore");
    assert_eq!(rows(&pg, "app_back"), rows(&pg, "app"));

    // The token is used up now: a restarted agent connects with what it kept.
    let list = fleet
        .dsctl(&["tokens", "list"])
        .expect_success("tokens list");
    let line = list
        .stdout
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} not listed:\n{}", list.stdout));
    for part in ["app", "used up", "1 of 1", "admin"] {
        assert!(line.contains(part), "{part:?} missing: {line}");
    }
    assert!(list.stdout.starts_with("ID"), "{}", list.stdout);
    fleet.restart_agent("app");
    fleet.restart_coordinator();
    fleet.wait_agent_listed("app", Duration::from_secs(60));
    let b2 = fleet.backup("app", None);
    assert!(b2.is_completed(), "{:?}", b2.raw);
    let again = fleet.dsctl_json(&["tokens", "list"]);
    assert_eq!(again[0]["uses"], 1, "{again}");
    assert_eq!(again[0]["agents"], serde_json::json!(["app"]), "{again}");

    // A second agent with the used-up token: refused, nothing written.
    let other = fleet.dir().join("state-second");
    let last = refused_agent(fleet.join_agent_spec("app", &pg, "app", &token, &other));
    assert!(
        last.contains(&format!("join token {id} is used up")),
        "{last}"
    );
    assert!(files(&other).is_empty(), "{:?}", files(&other));
}

#[test]
fn bad_tokens_are_refused_with_one_line_and_write_nothing() {
    let pg = PgCluster::new();
    pg.create_small_db("app", 10);
    let fleet = enrollment_fleet(&[]);
    let dir = fleet.dir().to_path_buf();

    // Another target than the token allows.
    let (token, _) = create_token(&fleet, &["--target", "app"]);
    let state = dir.join("s-target");
    let last = refused_agent(fleet.join_agent_spec("billing", &pg, "app", &token, &state));
    assert!(
        last.contains("does not allow target billing (it allows app)"),
        "{last}"
    );
    assert!(files(&state).is_empty());

    // Expired.
    let (token, _) = create_token(&fleet, &["--target", "app", "--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    let state = dir.join("s-expired");
    let last = refused_agent(fleet.join_agent_spec("app", &pg, "app", &token, &state));
    assert!(last.contains("expired at"), "{last}");
    assert!(files(&state).is_empty());

    // Revoked.
    let (token, _) = create_token(&fleet, &["--target", "app", "--uses", "0"]);
    let id = token_id(&token);
    let out = fleet
        .dsctl(&["tokens", "revoke", &id])
        .expect_success("tokens revoke");
    assert_eq!(
        out.stdout.trim(),
        format!("revoked join token {id} (targets app; used 0 (no limit))")
    );
    let state = dir.join("s-revoked");
    let last = refused_agent(fleet.join_agent_spec("app", &pg, "app", &token, &state));
    assert!(
        last.contains(&format!("join token {id} was revoked at")),
        "{last}"
    );
    assert!(files(&state).is_empty());

    // A wrong secret reads as an unknown token (nothing about the real one).
    let (token, _) = create_token(&fleet, &["--target", "app"]);
    let forged = {
        let p = "dsj1.".len() + 13;
        let flipped = if &token[p..p + 1] == "0" { "1" } else { "0" };
        format!("{}{flipped}{}", &token[..p], &token[p + 1..])
    };
    let state = dir.join("s-forged");
    let last = refused_agent(fleet.join_agent_spec("app", &pg, "app", &forged, &state));
    assert!(last.contains("is not known to this coordinator"), "{last}");
    assert!(files(&state).is_empty());

    // A damaged token never leaves the machine: refused at start-up.
    let state = dir.join("s-damaged");
    let spec = fleet.join_agent_spec("app", &pg, "app", &token[..40], &state);
    let out = run(spec.command(), Duration::from_secs(30));
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(
        out.stderr
            .contains("datasaver-agent: DATASAVER_JOIN_TOKEN: "),
        "{}",
        out.describe()
    );
    assert!(!out.stderr.contains(&token[..40]), "{}", out.describe());

    // A state directory that cannot be written: named, and the token's one
    // use is not spent.
    let blocker = dir.join("a-file");
    std::fs::write(&blocker, b"x").expect("write");
    let last =
        refused_agent(fleet.join_agent_spec("app", &pg, "app", &token, &blocker.join("state")));
    assert!(
        last.contains("DATASAVER_STATE_DIR: ") && last.contains("a-file/state is not writable"),
        "{last}"
    );
    let listed = fleet.dsctl_json(&["tokens", "list"]);
    let t = listed
        .as_array()
        .and_then(|a| a.iter().find(|t| t["id"] == token_id(&token)))
        .cloned()
        .expect("token listed");
    assert_eq!(t["uses"], 0, "{t}");
    assert_eq!(t["status"], "active", "{t}");

    // No secret in the coordinator's log, whatever happened.
    let log = fleet.coordinator().log();
    assert!(!log.contains(&token["dsj1.".len() + 13..]), "secret logged");
}

#[test]
fn a_coordinator_without_an_enrollment_ca_refuses_a_token_with_one_line() {
    let pg = PgCluster::new();
    pg.create_small_db("app", 10);
    let fleet = Fleet::start();
    // A well-formed token for this coordinator's CA (as if its enrollment CA
    // had been removed since).
    let ca = std::fs::read(fleet.certs_dir().join("ca.crt")).expect("ca.crt");
    let der = datasaver_common::crl::cert_der_from_pem(&ca).expect("CA");
    let token = datasaver_common::enroll::JoinToken::generate(&der, &fleet.coordinator_url())
        .expect("token")
        .encode();
    let state = fleet.dir().join("s-none");
    let last = refused_agent(fleet.join_agent_spec("app", &pg, "app", &token, &state));
    assert!(
        last.contains("the coordinator does not accept join tokens"),
        "{last}"
    );
    assert!(files(&state).is_empty());
}

#[test]
fn an_agent_refuses_a_coordinator_the_token_does_not_pin() {
    let pg = PgCluster::new();
    pg.create_small_db("app", 10);
    let real = enrollment_fleet(&[]);
    let impostor = enrollment_fleet(&[]);
    let (token, _) = create_token(&real, &["--target", "app"]);
    // The agent is sent to another coordinator (its own CA, joins enabled):
    // what a man in the middle presents.
    let state = real.dir().join("s-mitm");
    let spec = real
        .join_agent_spec("app", &pg, "app", &token, &state)
        .env("DATASAVER_COORDINATOR_URL", impostor.coordinator_url());
    let last = refused_agent(spec);
    assert!(
        last.contains("refused the server at")
            && last.contains("no CA with the join token's fingerprint"),
        "{last}"
    );
    assert!(files(&state).is_empty());
    // The impostor never saw a join request, and the real token is unused.
    assert!(
        !impostor.coordinator().log().contains("join"),
        "{}",
        impostor.coordinator().log()
    );
    let listed = real.dsctl_json(&["tokens", "list"]);
    assert_eq!(listed[0]["uses"], 0, "{listed}");
}

#[test]
fn a_joined_agent_renews_its_certificate_and_reconnects_with_it() {
    // (Certificates this short are due for renewal again at once, so the
    // agent keeps renewing: this test checks the renewal, not backups.)
    let pg = PgCluster::new();
    pg.create_small_db("app", 10);
    // Certificates past half their life from the start: renewed at once.
    let mut fleet = enrollment_fleet(&[("DATASAVER_ENROLLMENT_CERT_TTL", "50m")]);
    let (token, _) = create_token(&fleet, &["--target", "app"]);
    let state = fleet.dir().join("state");
    let spec = fleet
        .join_agent_spec("app", &pg, "app", &token, &state)
        .env("DATASAVER_RENEWAL_CHECK", "1s");
    fleet.add_agent_spec("app", spec);
    let first = std::fs::read(state.join("agent.crt")).expect("agent.crt");
    let renewed = wait_until(Duration::from_secs(60), || {
        std::fs::read(state.join("agent.crt")).is_ok_and(|c| c != first)
    });
    assert!(renewed, "{}", fleet.agent("app").proc.log());
    let reconnected = wait_until(Duration::from_secs(60), || {
        fleet
            .agent("app")
            .proc
            .log()
            .contains("connecting with the renewed certificate")
    });
    assert!(reconnected, "{}", fleet.agent("app").proc.log());
    fleet.wait_agent_listed("app", Duration::from_secs(60));
    // Renewal took no token use.
    let listed = fleet.dsctl_json(&["tokens", "list"]);
    assert_eq!(listed[0]["uses"], 1, "{listed}");
}

#[test]
fn without_a_certificate_only_enrollment_answers() {
    use datasaver_common::proto::agent_service_client::AgentServiceClient;
    use datasaver_common::proto::enrollment_service_client::EnrollmentServiceClient;
    use datasaver_common::proto::operator_service_client::OperatorServiceClient;
    use datasaver_common::proto::{
        DownloadRequest, EnrollRequest, ListBackupsRequest, ListTokensRequest,
        RenewCertificateRequest,
    };

    datasaver_common::tls::install_crypto_provider();
    let fleet = enrollment_fleet(&[]);
    let ca = std::fs::read(fleet.certs_dir().join("ca.crt")).expect("ca.crt");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // The fleet CA to check the coordinator, but no client certificate.
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("localhost");
        let channel = tonic::transport::Channel::from_shared(fleet.coordinator_url())
            .expect("url")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .expect("a client without a certificate completes the handshake");
        let mut op = OperatorServiceClient::new(channel.clone());
        let e = op
            .list_backups(ListBackupsRequest::default())
            .await
            .expect_err("listing backups without a certificate");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let e = op
            .list_tokens(ListTokensRequest {})
            .await
            .expect_err("listing tokens without a certificate");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let mut agent = AgentServiceClient::new(channel.clone());
        let e = agent
            .download(DownloadRequest::default())
            .await
            .expect_err("downloading without a certificate");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let e = agent
            .renew_certificate(RenewCertificateRequest::default())
            .await
            .expect_err("renewing without a certificate");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let e = EnrollmentServiceClient::new(channel)
            .enroll(EnrollRequest {
                token_id: "0123456789ab".into(),
                secret: "0".repeat(32),
                agent_name: "intruder".into(),
                targets: vec!["app".into()],
                csr_pem: String::new(),
            })
            .await
            .expect_err("enrolling with a made-up token");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("is not known"), "{e:?}");
    });
    // An operator certificate without admin may not hand out tokens.
    let dir = fleet.issue_operator_cert_with("ops", "operator", &[]);
    let out = fleet.dsctl_as(&dir, "ops", &["tokens", "create", "--target", "app"]);
    assert!(!out.success(), "{}", out.describe());
    datasaver_tests::assert_one_line_error(
        &out.stderr,
        "may not create, list or revoke join tokens",
    );
}
