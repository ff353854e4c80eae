//! Compression choices and client-side encryption, through the real binaries:
//! each codec round-trips, the codec is in the object name and the catalog,
//! and an encrypted backup is unreadable without the identity.

use std::time::Duration;

use datasaver_tests::fidelity::{compare_databases, load_fidelity};
use datasaver_tests::{Fleet, PgCluster};

#[test]
fn gzip_and_none_round_trip() {
    let pg = PgCluster::new();
    load_fidelity(&pg, "shop");
    let mut fleet = Fleet::start();
    fleet.add_agent_with("shop-gz", &pg, "shop", &[("DATASAVER_COMPRESSION", "gzip")]);
    fleet.add_agent_with(
        "shop-raw",
        &pg,
        "shop",
        &[("DATASAVER_COMPRESSION", "none")],
    );
    for (target, codec, ext, magic) in [
        ("shop-gz", "gzip", ".dump.gz", &b"\x1f\x8b"[..]),
        ("shop-raw", "none", ".dump", &b"PGDMP"[..]),
    ] {
        let b = fleet.backup(target, None);
        assert_eq!(b.compression.as_deref(), Some(codec), "{}", b.raw);
        let object = fleet
            .storage_dir()
            .join(format!("{target}/logical/{}{ext}", b.id));
        let bytes = std::fs::read(&object).unwrap_or_else(|e| panic!("{}: {e}", object.display()));
        assert!(
            bytes.starts_with(magic),
            "{codec} object does not start with its magic"
        );
        if codec == "none" {
            assert_eq!(b.raw_bytes, b.stored_bytes);
        }
        // Every table's rows, as counted from the archive, are the source's
        // (the fidelity data holds empty tables, newlines, tabs and
        // backslashes in values, large objects).
        let counted: Vec<String> = b.raw["tables"]
            .as_array()
            .unwrap_or_else(|| panic!("no row counts: {}", b.raw))
            .iter()
            .map(|t| {
                format!(
                    "{}.{}={}",
                    t["schema"].as_str().unwrap_or(""),
                    t["name"].as_str().unwrap_or(""),
                    t["rows"]
                )
            })
            .collect();
        let mut actual: Vec<String> = pg
            .query_rows(
                "shop",
                "SELECT n.nspname || '.' || c.relname, format('%I.%I', n.nspname, c.relname)
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                    AND n.nspname NOT LIKE 'pg_toast%'",
            )
            .into_iter()
            .map(|r| {
                let n = pg.query_one("shop", &format!("SELECT count(*) FROM ONLY {}", r[1]));
                format!("{}={n}", r[0])
            })
            .collect();
        actual.sort();
        let mut counted_sorted = counted.clone();
        counted_sorted.sort();
        assert_eq!(counted_sorted, actual, "{codec}");
        let db = format!("restored_{codec}");
        fleet.restore(&b.id, &db, &[]);
        compare_databases(&pg, "shop", &pg, &db).unwrap_or_else(|e| panic!("{codec}: {e}"));
    }
}

#[test]
fn encrypted_backups_need_the_identity() {
    let pg = PgCluster::new();
    load_fidelity(&pg, "shop");
    let mut fleet = Fleet::start();
    let keys = fleet.dir().join("keys");
    std::fs::create_dir_all(&keys).expect("keys dir");
    let id_file = keys.join("backup.agekey");
    let wrong_file = keys.join("wrong.agekey");
    let out = fleet
        .dsctl(&["keygen", "--out", id_file.to_str().unwrap()])
        .expect_success("dsctl keygen --out");
    let recipient = out.stdout.trim().to_string();
    assert!(recipient.starts_with("age1"), "{recipient}");
    let text = std::fs::read_to_string(&id_file).expect("identity file");
    assert!(
        text.contains("AGE-SECRET-KEY-1"),
        "identity file holds the secret"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&id_file).unwrap().permissions().mode() & 0o077,
        0
    );
    fleet
        .dsctl(&["keygen", "--out", wrong_file.to_str().unwrap()])
        .expect_success("second keygen");
    // never overwrites an identity
    fleet
        .dsctl(&["keygen", "--out", id_file.to_str().unwrap()])
        .expect_code(1, "keygen over an existing file");
    assert_eq!(std::fs::read_to_string(&id_file).unwrap(), text);
    let printed = fleet.dsctl(&["keygen"]).expect_success("keygen to stdout");
    assert!(
        printed.stdout.contains("AGE-SECRET-KEY-1")
            && printed.stdout.contains("# public key: age1")
    );

    let spec = fleet
        .agent_spec("vault", &pg, "shop")
        .env("DATASAVER_ENCRYPTION_RECIPIENT", &recipient)
        .env("DATASAVER_ENCRYPTION_IDENTITY_FILE", &id_file);
    fleet.add_agent_spec("vault", spec.clone());
    let b = fleet.backup("vault", None);
    assert!(b.encrypted, "{}", b.raw);

    // the stored bytes are age ciphertext: not an archive, not zstd
    let object = fleet
        .storage_dir()
        .join(format!("vault/logical/{}.dump.zst.age", b.id));
    let bytes = std::fs::read(&object).expect("encrypted object");
    assert!(bytes.starts_with(b"age-encryption.org/v1"));
    assert!(!bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]));
    assert!(!bytes.windows(5).any(|w| w == b"PGDMP"));
    assert!(!bytes.windows(12).any(|w| w == b"Weird Schema"));
    // the meta file names the recipient by fingerprint only
    let meta = std::fs::read_to_string(
        fleet
            .storage_dir()
            .join(format!("vault/logical/{}.meta.json", b.id)),
    )
    .expect("meta");
    let v: serde_json::Value = serde_json::from_str(&meta).expect("meta JSON");
    let fp = v["encryption"]["recipient"]
        .as_str()
        .expect("recipient fingerprint")
        .to_string();
    assert!(fp.starts_with("age:"), "{fp}");
    assert!(
        !meta.contains("AGE-SECRET-KEY") && !meta.contains(&recipient),
        "{meta}"
    );

    // with the identity: verify and restore give back identical data
    fleet
        .dsctl(&["verify", &b.id])
        .expect_success("verify an encrypted backup");
    fleet.restore(&b.id, "shop_decrypted", &[]);
    compare_databases(&pg, "shop", &pg, "shop_decrypted")
        .expect("decrypted restore equals the source");

    // with the wrong identity: a clear refusal that names the recipient; nothing touched
    fleet.remove_agent("vault");
    let wrong = spec
        .clone()
        .env("DATASAVER_ENCRYPTION_IDENTITY_FILE", &wrong_file);
    fleet.add_agent_spec("vault", wrong);
    let out = fleet
        .dsctl(&["--quiet", "restore", &b.id, "--target-db", "shop_wrong"])
        .expect_code(1, "restore with the wrong identity");
    assert!(
        out.stderr.contains(&fp),
        "must name the recipient: {}",
        out.stderr
    );
    assert!(!pg.db_exists("shop_wrong"));

    // with no identity at all
    fleet.remove_agent("vault");
    let none = fleet
        .agent_spec("vault", &pg, "shop")
        .env("DATASAVER_ENCRYPTION_RECIPIENT", &recipient);
    fleet.add_agent_spec("vault", none);
    let out = fleet
        .dsctl_with(
            &["--quiet", "restore", &b.id, "--target-db", "shop_none"],
            &[],
            Duration::from_secs(120),
        )
        .expect_code(1, "restore without an identity");
    assert!(
        out.stderr.contains("DATASAVER_ENCRYPTION_IDENTITY_FILE"),
        "{}",
        out.stderr
    );
    assert!(!pg.db_exists("shop_none"));
}
