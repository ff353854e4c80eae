//! Test support shared by the domain modules' unit tests.

use std::sync::Arc;

use crate::policy::Policies;
use crate::repo::testing::FaultyStorage;
use crate::repo::Repository;
use crate::Core;

/// A whole `Core` on a temp-dir catalog and a failure-injecting storage,
/// with no services running: domain code is called directly.
pub struct Fixture {
    pub core: Arc<Core>,
    /// The core's clock: it moves only when a test advances it.
    pub clock: Arc<crate::clock::ManualClock>,
    _dir: tempfile::TempDir,
}

pub fn fixture(policies: Policies) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let catalog = crate::catalog::Catalog::open(&dir.path().join("catalog.db")).expect("catalog");
    let manual = Arc::new(crate::clock::ManualClock::new(chrono::Utc::now()));
    let clock: Arc<dyn crate::clock::Clock> = manual.clone();
    let repo = Repository::new(
        catalog.clone(),
        Arc::new(FaultyStorage::new()),
        clock.clone(),
    );
    let core = Arc::new(Core {
        targets: crate::targets::TargetStore::new(catalog.clone()),
        repo,
        fleet: crate::fleet::Fleet::new(clock.clone()),
        cancel: tokio_util::sync::CancellationToken::new(),
        scheduler: crate::schedule::driver::Scheduler::new(&policies),
        policies,
        alerter: crate::alerts::Alerter::new(
            crate::alerts::store::AlertStore::new(catalog.clone()),
            clock.now(),
        ),
        clock,
        metrics: crate::metrics::Metrics::new(),
        alert_config: crate::alerts::AlertConfig::default(),
        cleanup: tokio::sync::Mutex::new(()),
        tasks: tokio_util::task::TaskTracker::new(),
        floors_logged: crate::floors::Logged::default(),
        enrollment: None,
        wal_index: crate::wal::index::WalIndex::new(catalog),
        wal_live: crate::wal::live::Live::default(),
    });
    Fixture {
        core,
        clock: manual,
        _dir: dir,
    }
}
