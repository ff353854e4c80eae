//! The agent's replication client against a real server (issue 14, the
//! first piece of the WAL stream): it logs in with SCRAM as a standby
//! would, identifies the cluster, keeps a slot, streams a whole segment
//! byte for byte as the server wrote it, and the slot moves only as far as
//! the position the client reports as flushed.

use std::time::Duration;

use datasaver_agent::config::DbConn;
use datasaver_agent::replication::{Event, ReplConn};
use datasaver_common::wal::{Lsn, Segment, DEFAULT_SEG_SIZE};
use datasaver_tests::{wait_until, PgCluster};

fn db(pg: &PgCluster) -> DbConn {
    DbConn {
        host: "127.0.0.1".into(),
        port: pg.port(),
        dbname: "postgres".into(),
        user: "postgres".into(),
        password: Some(pg.password().to_string()),
        sslmode: None,
    }
}

#[test]
fn the_replication_client_streams_a_segment_as_the_server_wrote_it() {
    let pg = PgCluster::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = ReplConn::connect(&db(&pg))
            .await
            .expect("replication login");
        let sys = c.identify_system().await.expect("IDENTIFY_SYSTEM");
        assert_eq!(
            sys.system_id,
            pg.query_one(
                "postgres",
                "SELECT system_identifier FROM pg_control_system()"
            )
        );
        assert_eq!(sys.timeline, 1);
        assert!(c.ensure_slot("datasaver").await.expect("create slot"));
        assert!(!c.ensure_slot("datasaver").await.expect("slot exists"));
        let e = c.ensure_slot("Bad Name").await.unwrap_err().to_string();
        assert!(e.contains("DATASAVER_WAL_SLOT"), "{e}");
        let e = c.timeline_history(1).await.unwrap_err().to_string();
        assert!(e.contains("SQLSTATE"), "{e}");

        // Fill and close the segment the slot starts in.
        let slot_start = Lsn::parse(&pg.query_one(
            "postgres",
            "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'datasaver'",
        ))
        .expect("restart_lsn");
        pg.psql(
            "postgres",
            "CREATE TABLE w AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
             SELECT pg_switch_wal();",
        );
        let seg = Segment::of(1, slot_start, DEFAULT_SEG_SIZE);
        let name = seg.name(DEFAULT_SEG_SIZE);
        let on_disk =
            std::fs::read(pg.data_dir().join("pg_wal").join(&name)).expect("segment file");

        let mut stream = c
            .start("datasaver", seg.start(DEFAULT_SEG_SIZE), 1)
            .await
            .expect("START_REPLICATION");
        let mut got: Vec<u8> = Vec::with_capacity(DEFAULT_SEG_SIZE as usize);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while (got.len() as u64) < DEFAULT_SEG_SIZE {
            let ev = tokio::time::timeout_at(deadline, stream.next())
                .await
                .expect("the segment within a minute")
                .expect("stream");
            match ev {
                Event::Data { start, bytes, .. } => {
                    assert_eq!(
                        start.0,
                        seg.start(DEFAULT_SEG_SIZE).0 + got.len() as u64,
                        "data out of order"
                    );
                    got.extend_from_slice(&bytes);
                }
                Event::Keepalive { end, reply, .. } => {
                    if reply {
                        stream.report(end, slot_start, false).await.expect("reply");
                    }
                }
                Event::TimelineEnd => panic!("timeline ended"),
            }
        }
        got.truncate(DEFAULT_SEG_SIZE as usize);
        assert!(
            got == on_disk,
            "segment {name} differs from the server's file"
        );

        // Flushed = what the coordinator stored: the slot follows only that.
        let stored = Lsn(seg.start(DEFAULT_SEG_SIZE).0 + DEFAULT_SEG_SIZE);
        stream.report(stored, stored, false).await.expect("report");
        let moved = wait_until(Duration::from_secs(20), || {
            let now = pg.query_one(
                "postgres",
                "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'datasaver'",
            );
            Lsn::parse(&now).is_ok_and(|l| l == stored)
        });
        assert!(
            moved,
            "the slot did not move to the reported flush position {stored}"
        );
    });
}

#[test]
fn a_wrong_password_and_tls_are_refused_with_one_line() {
    let pg = PgCluster::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut bad = db(&pg);
        bad.password = Some("not-the-password".into());
        let e = ReplConn::connect(&bad)
            .await
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("28P01"), "{e}");
        assert!(!e.contains("not-the-password"), "{e}");
        let mut tls = db(&pg);
        tls.sslmode = Some("require".into());
        let e = ReplConn::connect(&tls)
            .await
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("sslmode=require"), "{e}");
    });
}
