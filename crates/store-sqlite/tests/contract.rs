//! The store contract suite on SQLite, each test on a fresh database file.

#![allow(clippy::expect_used)]

async fn fresh_store() -> Option<(
    std::sync::Arc<dyn otpgate_core::store::Store>,
    tempfile::TempDir,
)> {
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        otpgate_store_sqlite::SqliteStore::open(dir.path().join("otpgate.db")).expect("open store");
    Some((std::sync::Arc::new(store), dir))
}

otpgate_store_testkit::store_contract_tests!(fresh_store());
