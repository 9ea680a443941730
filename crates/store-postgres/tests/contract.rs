//! The store contract suite on PostgreSQL, each test in a database of its own.

use otpgate_store_postgres::testing::{TestDatabase, test_server_url};

#[allow(clippy::expect_used)]
async fn fresh_store() -> Option<(std::sync::Arc<dyn otpgate_core::store::Store>, TestDatabase)> {
    let server = test_server_url().expect("test configuration")?;
    let database = TestDatabase::create(&server).await.expect("test database");
    let store = database.store().await.expect("connect and migrate");
    Some((std::sync::Arc::new(store), database))
}

otpgate_store_testkit::store_contract_tests!(fresh_store());
