//! The single end-to-end test binary. Each area lives in its own module under `tests/e2e/`
//! (declared inside the inline `mod e2e` below, so `tests/e2e/<name>.rs` is found without
//! Cargo mistaking it for another test target). Run a subset with a name filter, e.g.
//! `cargo test -p datasaver-tests --test e2e harness`.
//!
//! Tests that need the workspace binaries (`dsctl`, `datasaver-agent`,
//! `datasaver-coordinator`) expect them built first (`cargo build --bins`); see
//! `datasaver_tests::bin_dir`.

mod e2e {
    mod agent_stop;
    mod cli_text;
    mod codecs;
    mod containers;
    mod deadlines;
    mod disaster;
    mod embedded;
    mod enrollment;
    mod faults;
    mod floors;
    mod harness_selftest;
    mod limits;
    mod monitoring;
    mod pitr;
    mod queue;
    mod rebuild;
    mod retention;
    mod revocation;
    mod roundtrip;
    mod s3;
    mod security;
    mod traces;
    mod two_agents;
    mod wal_continuous;
    mod wal_stream;
}
