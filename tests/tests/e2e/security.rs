//! Who may do what: agents serve only the targets their certificate names
//! (also after the catalog is rebuilt), a second certificate for a target
//! waits while the first agent is connected, and operator certificates are
//! limited by role and scope. Every refusal is one line and exit 1.

use std::time::Duration;

use datasaver_tests::{
    assert_one_line_error, wait_until, Fleet, FleetOptions, PgCluster, ProcSpec,
};

/// An agent for `target` on `pg`/`db` using the certificate of agent `cert_name`.
fn agent_with_cert(
    fleet: &Fleet,
    target: &str,
    pg: &PgCluster,
    db: &str,
    cert_name: &str,
) -> ProcSpec {
    let dir = fleet.dir().join("agents").join(cert_name);
    fleet
        .agent_spec(target, pg, db)
        .env("DATASAVER_TLS_CERT", dir.join(format!("{cert_name}.crt")))
        .env("DATASAVER_TLS_KEY", dir.join(format!("{cert_name}.key")))
}

fn targets_json(fleet: &Fleet) -> Vec<serde_json::Value> {
    fleet
        .dsctl_json(&["targets"])
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("dsctl --json targets did not print an array"))
}

#[test]
fn an_agent_serves_only_the_targets_its_certificate_names_even_after_a_rebuild() {
    let pg = PgCluster::new();
    pg.create_small_db("acme", 500);
    pg.create_small_db("globex", 300);
    let mut fleet = Fleet::start();
    fleet.issue_agent_cert_for("acme-db", &["acme-*"]);

    // The acme certificate serves acme-main (named by the pattern).
    let spec = agent_with_cert(&fleet, "acme-main", &pg, "acme", "acme-db");
    fleet.add_agent_spec("acme-main", spec);
    let b = fleet.backup("acme-main", None);
    assert!(b.is_completed());

    // ... but not globex-main: refused with one line naming both.
    let spec = agent_with_cert(&fleet, "globex-main", &pg, "globex", "acme-db");
    fleet.spawn_agent_unchecked("globex-main", spec);
    let refused = "certificate of agent acme-db";
    assert!(
        fleet
            .coordinator()
            .wait_for_log(refused, Duration::from_secs(30)),
        "coordinator did not refuse globex-main:\n{}",
        fleet.coordinator().log()
    );
    let log = fleet.coordinator().log();
    let line = log
        .lines()
        .find(|l| l.contains(refused) || l.contains("does not name the target"))
        .unwrap_or_default();
    assert!(line.contains("globex-main"), "{line}");
    assert!(
        fleet
            .agent("globex-main")
            .proc
            .log()
            .contains("globex-main"),
        "the agent does not say why it was refused:\n{}",
        fleet.agent("globex-main").proc.log()
    );
    assert!(!fleet.agent_listed("globex-main"));
    let out = fleet
        .dsctl(&["backup", "globex-main"])
        .expect_code(1, "backup of an unserved target");
    assert_one_line_error(&out.stderr, "globex-main");

    // `dsctl targets` (human and JSON): acme-main bound to acme-db, connected,
    // with the certificate's expiry a year out; globex-main never registered.
    let out = fleet.dsctl(&["targets"]).expect_success("dsctl targets");
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with("acme-main"))
        .unwrap_or_else(|| panic!("no acme-main row:\n{}", out.stdout));
    assert!(row.contains("acme-db") && row.contains("yes"), "{row}");
    assert!(
        out.stdout
            .lines()
            .next()
            .unwrap_or_default()
            .contains("CERT EXPIRES"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("globex-main"), "{}", out.stdout);
    let t = targets_json(&fleet);
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(t[0]["agent"], "acme-db");
    let expires = t[0]["cert_expires"].as_str().unwrap_or_default();
    let next_year = (chrono::Utc::now() + chrono::Duration::days(364))
        .format("%Y-%m-%d")
        .to_string();
    assert!(
        expires >= next_year.as_str(),
        "certificate expiry {expires:?}"
    );

    // Lose the catalog: the rebuild brings back the backup and its owner,
    // and the certificate still decides.
    fleet.stop_coordinator();
    for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let _ = std::fs::remove_file(fleet.data_dir().join(f));
    }
    fleet.start_coordinator();
    let got = fleet.dsctl_json(&["get", &b.id]);
    assert_eq!(got["agent"], "acme-db", "{got}");
    let t = targets_json(&fleet);
    let acme = t
        .iter()
        .find(|r| r["name"] == "acme-main")
        .expect("acme-main after rebuild");
    assert_eq!(acme["agent"], "acme-db");
    fleet.wait_agent_listed("acme-main", Duration::from_secs(60));
    // The refused agent keeps being refused after the rebuild.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!fleet.agent_listed("globex-main"));
    assert!(!targets_json(&fleet)
        .iter()
        .any(|r| r["name"] == "globex-main"));
    assert!(fleet.backup("acme-main", None).is_completed());
}

#[test]
fn a_second_certificate_for_a_target_waits_while_the_first_agent_is_connected() {
    let pg = PgCluster::new();
    pg.create_small_db("shop", 200);
    let mut fleet = Fleet::start_with(FleetOptions {
        coordinator_env: vec![("DATASAVER_AGENT_GRACE".into(), "5s".into())],
        ..Default::default()
    });
    fleet.issue_agent_cert_for("shop-old", &["shop"]);
    fleet.issue_agent_cert_for("shop-new", &["shop"]);
    let spec = agent_with_cert(&fleet, "shop", &pg, "shop", "shop-old");
    fleet.add_agent_spec("shop", spec);

    let spec = agent_with_cert(&fleet, "shop", &pg, "shop", "shop-new");
    fleet.spawn_agent_unchecked("shop-2", spec);
    assert!(
        fleet.coordinator().wait_for_log(
            "target shop is served by agent shop-old; agent shop-new may take over once shop-old has been disconnected",
            Duration::from_secs(30)
        ),
        "{}",
        fleet.coordinator().log()
    );
    let t = targets_json(&fleet);
    assert_eq!(t[0]["agent"], "shop-old", "{t:?}");

    // The old agent goes away (moved host); after the grace the new
    // certificate takes over without anyone editing the catalog.
    fleet.remove_agent("shop");
    assert!(
        wait_until(Duration::from_secs(90), || {
            targets_json(&fleet)
                .first()
                .is_some_and(|r| r["agent"] == "shop-new" && r["connected"] == true)
        }),
        "the new agent did not take over:\n{}",
        fleet.coordinator().log()
    );
    assert!(fleet
        .coordinator()
        .log()
        .contains("agent took over the target"));
    let b = fleet.backup("shop", None);
    assert!(b.is_completed());
    assert_eq!(fleet.dsctl_json(&["get", &b.id])["agent"], "shop-new");
}

#[test]
fn operators_act_only_within_their_role_and_scope() {
    let pg = PgCluster::new();
    pg.create_small_db("acme", 300);
    pg.create_small_db("globex", 200);
    let mut fleet = Fleet::start();
    fleet.add_agent("acme-main", &pg, "acme");
    fleet.add_agent("globex-main", &pg, "globex");
    let acme = fleet.backup("acme-main", None);
    let globex = fleet.backup("globex-main", None);
    let viewer = fleet.issue_operator_cert_with("vera", "viewer", &[]);
    let operator = fleet.issue_operator_cert_with("otto", "operator", &[]);
    let scoped = fleet.issue_operator_cert_with("sam", "admin", &["acme-*"]);

    // viewer: reads, nothing else.
    let out = fleet
        .dsctl_as(&viewer, "vera", &["list"])
        .expect_success("viewer list");
    assert!(
        out.stdout.contains(&acme.id) && out.stdout.contains(&globex.id),
        "{}",
        out.stdout
    );
    fleet
        .dsctl_as(&viewer, "vera", &["targets"])
        .expect_success("viewer targets");
    fleet
        .dsctl_as(&viewer, "vera", &["health"])
        .expect_success("viewer health");
    let export_to = fleet.dir().join("viewer-export.dump");
    let export_to = export_to.to_str().expect("utf-8 path").to_string();
    for (args, verb) in [
        (vec!["backup", "acme-main"], "may not start a backup"),
        (
            vec!["export", acme.id.as_str(), "--out", export_to.as_str()],
            "may not export a backup",
        ),
        (
            vec!["restore", acme.id.as_str(), "--target-db", "v_copy"],
            "may not restore a backup",
        ),
        (
            vec!["delete", "--yes", acme.id.as_str()],
            "may not delete a backup",
        ),
    ] {
        let out = fleet
            .dsctl_as(&viewer, "vera", &args)
            .expect_code(1, &format!("viewer {args:?}"));
        let line = assert_one_line_error(&out.stderr, verb);
        assert!(line.contains("operator vera (role viewer)"), "{line}");
    }
    assert!(!pg.db_exists("v_copy"));
    assert!(!std::path::Path::new(&export_to).exists());

    // operator: backs up and restores into a new database, but neither
    // deletes nor restores with --force over an existing one.
    let b = fleet
        .dsctl_as(&operator, "otto", &["--quiet", "backup", "acme-main"])
        .expect_success("operator backup");
    assert!(b.stdout.trim().starts_with("acme-main_"), "{}", b.stdout);
    fleet
        .dsctl_as(
            &operator,
            "otto",
            &["restore", &acme.id, "--target-db", "o_copy"],
        )
        .expect_success("operator restore into a new database");
    assert!(pg.db_exists("o_copy"));
    let out = fleet
        .dsctl_as(&operator, "otto", &["delete", "--yes", &acme.id])
        .expect_code(1, "operator delete");
    let line = assert_one_line_error(&out.stderr, "may not delete a backup");
    assert!(
        line.contains("role operator") && line.contains("needs role admin"),
        "{line}"
    );
    let out = fleet
        .dsctl_as(
            &operator,
            "otto",
            &["restore", &acme.id, "--target-db", "acme", "--force"],
        )
        .expect_code(1, "operator restore --force");
    assert_one_line_error(
        &out.stderr,
        "may not restore with --force over an existing database",
    );
    let out = fleet
        .dsctl_as(&operator, "otto", &["cleanup"])
        .expect_code(1, "operator cleanup");
    assert_one_line_error(&out.stderr, "may not run a cleanup");
    assert!(
        fleet.list_backups(None).iter().any(|x| x.id == acme.id),
        "nothing was deleted"
    );

    // scoped admin: acme-* exists, globex-main does not.
    let out = fleet
        .dsctl_as(&scoped, "sam", &["list"])
        .expect_success("scoped list");
    assert!(out.stdout.contains(&acme.id), "{}", out.stdout);
    assert!(!out.stdout.contains("globex"), "{}", out.stdout);
    let out = fleet
        .dsctl_as(&scoped, "sam", &["--json", "targets"])
        .expect_success("scoped targets");
    assert!(!out.stdout.contains("globex"), "{}", out.stdout);
    let out = fleet
        .dsctl_as(&scoped, "sam", &["health"])
        .expect_success("scoped health");
    assert!(!out.stdout.contains("globex"), "{}", out.stdout);
    let out = fleet
        .dsctl_as(&scoped, "sam", &["agents"])
        .expect_success("scoped agents");
    assert!(!out.stdout.contains("globex"), "{}", out.stdout);
    let out = fleet
        .dsctl_as(&scoped, "sam", &["list", "--target", "globex-main"])
        .expect_code(1, "scoped list of another target");
    let line = assert_one_line_error(&out.stderr, "target globex-main is outside its scope");
    assert!(line.contains("operator sam (scope acme-*)"), "{line}");
    let out = fleet
        .dsctl_as(
            &scoped,
            "sam",
            &["restore", "--target", "globex-main", "--latest"],
        )
        .expect_code(1, "scoped restore of another target");
    assert_one_line_error(&out.stderr, "outside its scope");
    // By id the backup is "not found", word for word as a missing one.
    let hidden = fleet
        .dsctl_as(
            &scoped,
            "sam",
            &["restore", &globex.id, "--target-db", "s_copy"],
        )
        .expect_code(1, "scoped restore by id");
    let missing_id = globex.id.replace("globex-main", "globex-gone");
    let missing = fleet
        .dsctl_as(&scoped, "sam", &["get", &missing_id])
        .expect_code(1, "missing id");
    assert_eq!(
        assert_one_line_error(&hidden.stderr, &globex.id).replace(&globex.id, "ID"),
        assert_one_line_error(&missing.stderr, &missing_id).replace(&missing_id, "ID")
    );
    fleet
        .dsctl_as(&scoped, "sam", &["delete", "--yes", &globex.id])
        .expect_code(1, "scoped delete");
    assert!(!pg.db_exists("s_copy"));
    assert!(fleet.list_backups(None).iter().any(|x| x.id == globex.id));
    // ... and may do everything to its own.
    fleet
        .dsctl_as(&scoped, "sam", &["delete", "--yes", &acme.id])
        .expect_success("scoped admin delete");
    assert!(!fleet.list_backups(None).iter().any(|x| x.id == acme.id));

    // Each refusal was logged with the identity and counted.
    let log = fleet.coordinator().log();
    assert!(
        log.contains("request refused") && log.contains("vera") && log.contains("sam"),
        "{log}"
    );
    let metrics = fleet.http_get("/metrics").expect("metrics").body;
    for needle in [
        r#"datasaver_refusals_total{who="viewer",action="backup"} 1"#,
        r#"datasaver_refusals_total{who="operator",action="delete"} 1"#,
        r#"datasaver_refusals_total{who="operator",action="restore_force"} 1"#,
    ] {
        assert!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }
}

/// The id of the newest job of `kind` ("Backup"; "List" for a verify) for `target`, from
/// the coordinator's log line that assigns it to its agent.
fn job_id_in_log(log: &str, kind: &str, target: &str, not: &str) -> Option<(String, String)> {
    log.lines()
        .rev()
        .filter(|l| l.contains("job assigned to its agent"))
        .filter(|l| l.contains(&format!("kind={kind}")) && l.contains(&format!("target={target}")))
        .filter_map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .map(|v| v.trim_matches('"').to_string())
            };
            Some((field("job")?, field("backup")?))
        })
        .find(|(_, backup)| backup != not || kind != "Backup")
}

/// A gRPC client of the agent service with agent certificate `name` from `fleet`.
async fn agent_client(
    fleet: &Fleet,
    name: &str,
) -> datasaver_common::proto::agent_service_client::AgentServiceClient<tonic::transport::Channel> {
    let dir = fleet.dir().join("agents").join(name);
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.crt")))
        .identity(tonic::transport::Identity::from_pem(
            read(&format!("{name}.crt")),
            read(&format!("{name}.key")),
        ))
        .domain_name("localhost");
    let channel = tonic::transport::Channel::from_shared(fleet.coordinator_url())
        .expect("coordinator url")
        .tls_config(tls)
        .expect("tls config")
        .connect()
        .await
        .expect("connect to the coordinator");
    datasaver_common::proto::agent_service_client::AgentServiceClient::new(channel)
}

#[test]
fn an_agent_cannot_upload_or_download_for_another_agents_job() {
    use datasaver_common::proto::{upload_request, DownloadRequest, UploadHeader, UploadRequest};
    use datasaver_tests::procs::{send_signal, Sig};

    datasaver_common::tls::install_crypto_provider();
    let pg = PgCluster::new();
    pg.create_small_db("alpha", 100);
    pg.create_small_db("beta", 2000);
    let mut fleet = Fleet::start();
    fleet.add_agent("alpha", &pg, "alpha");
    fleet.add_agent("beta", &pg, "beta");
    let first = fleet.backup("beta", None);

    // Hold beta's agent still so its jobs stay open while alpha tries them.
    let beta_pid = fleet.agent("beta").proc.pid();
    send_signal(beta_pid, Sig::Stop).expect("SIGSTOP beta's agent");
    let (verify, backup) = std::thread::scope(|s| {
        let f = &fleet;
        let id = first.id.clone();
        let verify = s.spawn(move || f.dsctl(&["verify", &id]));
        let backup = s.spawn(move || f.dsctl(&["--quiet", "backup", "beta"]));
        let mut jobs = None;
        wait_until(Duration::from_secs(30), || {
            let log = f.coordinator().log();
            jobs = job_id_in_log(&log, "List", "beta", "")
                .zip(job_id_in_log(&log, "Backup", "beta", &first.id));
            jobs.is_some()
        });
        let ((verify_job, verify_backup), (backup_job, backup_id)) =
            jobs.unwrap_or_else(|| panic!("no beta jobs in the log:\n{}", f.coordinator().log()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut alpha = agent_client(f, "alpha").await;
            let e = alpha
                .download(DownloadRequest {
                    job_id: verify_job.clone(),
                    backup_id: verify_backup.clone(),
                    part: "globals".into(),
                })
                .await
                .expect_err("alpha reading beta's backup");
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
            assert!(
                e.message().contains("agent alpha may not read backup"),
                "{e:?}"
            );
            let header = UploadRequest {
                msg: Some(upload_request::Msg::Header(UploadHeader {
                    job_id: backup_job.clone(),
                    backup_id: backup_id.clone(),
                    target: "beta".into(),
                    ..Default::default()
                })),
            };
            let chunk = UploadRequest {
                msg: Some(upload_request::Msg::Chunk(b"not beta's data".to_vec())),
            };
            let e = alpha
                .upload(tokio_stream::iter(vec![header, chunk]))
                .await
                .expect_err("alpha uploading for beta's job");
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
            assert!(
                e.message()
                    .contains("agent alpha may not upload for target beta"),
                "{e:?}"
            );
        });
        send_signal(beta_pid, Sig::Cont).expect("SIGCONT beta's agent");
        (
            verify.join().expect("verify thread"),
            backup.join().expect("backup thread"),
        )
    });
    // beta's own jobs were untouched by alpha's attempts.
    verify.expect_success("beta's verify");
    let id = backup
        .expect_success("beta's backup")
        .stdout
        .trim()
        .to_string();
    let b = fleet.get_backup(&id);
    assert!(b.is_completed(), "{}", b.raw);
    assert_eq!(fleet.dsctl_json(&["get", &id])["agent"], "beta");
}
