//! Two agents for two databases (on two Postgres servers) backing up through
//! one coordinator at the same time; each backup restores to its own data.

use datasaver_tests::fidelity::{compare_databases_min_rows, load_fidelity};
use datasaver_tests::{Fleet, PgCluster};

#[test]
fn two_agents_back_up_concurrently() {
    let pg_a = PgCluster::new();
    let pg_b = PgCluster::new();
    load_fidelity(&pg_a, "alpha");
    pg_b.create_db("beta");
    pg_b.psql(
        "beta",
        "CREATE TABLE items (id bigint PRIMARY KEY, name text, doc jsonb);
         INSERT INTO items SELECT g, 'item ' || g, jsonb_build_object('g', g, 'sq', g::bigint * g)
           FROM generate_series(1, 50000) g;",
    );
    let mut fleet = Fleet::start();
    fleet.add_agent("alpha", &pg_a, "alpha");
    fleet.add_agent("beta", &pg_b, "beta");
    let agents = fleet.dsctl_json(&["agents"]);
    assert_eq!(agents.as_array().map(|a| a.len()), Some(2), "{agents}");

    let (a, b) = std::thread::scope(|s| {
        let fa = &fleet;
        let ha = s.spawn(move || fa.backup("alpha", None));
        let hb = s.spawn(move || fa.backup("beta", None));
        (
            ha.join().expect("alpha backup"),
            hb.join().expect("beta backup"),
        )
    });
    assert!(a.is_completed() && b.is_completed());
    assert_ne!(a.checksum, b.checksum);
    let all = fleet.list_backups(None);
    assert_eq!(all.len(), 2);
    assert_eq!(fleet.list_backups(Some("beta")).len(), 1);

    fleet.restore(&a.id, "alpha_copy", &[]);
    fleet.restore(&b.id, "beta_copy", &[]);
    compare_databases_min_rows(&pg_a, "alpha", &pg_a, "alpha_copy", 100_000)
        .expect("alpha restored faithfully");
    compare_databases_min_rows(&pg_b, "beta", &pg_b, "beta_copy", 50_000)
        .expect("beta restored faithfully");
    // each restore went to its own agent's server
    assert!(!pg_a.db_exists("beta_copy") && !pg_b.db_exists("alpha_copy"));
}
