//! A database of its own for each test, on the server named by `OTPGATE_TEST_DATABASE_URL`,
//! dropped when the test ends. Without the variable the tests are skipped, unless `CI` is set:
//! CI must never pass by skipping PostgreSQL.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::{PgSettings, PgStore};

/// The environment variable naming the test server.
pub const TEST_DATABASE_URL: &str = "OTPGATE_TEST_DATABASE_URL";

/// The server URL for tests, or `None` to skip; an error in CI without one.
pub fn test_server_url() -> Result<Option<String>, String> {
    match std::env::var(TEST_DATABASE_URL) {
        Ok(url) if !url.trim().is_empty() => Ok(Some(url)),
        _ if std::env::var_os("CI").is_some() => Err(format!(
            "{TEST_DATABASE_URL} must be set in CI: PostgreSQL tests may not be skipped"
        )),
        _ => Ok(None),
    }
}

/// A throw-away database; dropped (with its connections) when this value is.
#[derive(Debug)]
pub struct TestDatabase {
    admin_url: String,
    name: String,
    /// The URL of the new database.
    pub url: String,
}

fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let prefix = base.rsplit_once('/').map_or(base, |(p, _)| p);
    match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
    }
}

impl TestDatabase {
    /// Creates a fresh, empty database next to the one `server_url` names.
    pub async fn create(server_url: &str) -> Result<Self, String> {
        let mut admin = PgConnection::connect(server_url)
            .await
            .map_err(|e| format!("cannot reach PostgreSQL at {server_url}: {e}"))?;
        let suffix: [u8; 8] = otpgate_core::crypto::random_bytes().map_err(|e| e.to_string())?;
        let name = format!("otpgate_test_{}", hex_lower(&suffix));
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .map_err(|e| format!("create database: {e}"))?;
        let _ = admin.close().await;
        Ok(TestDatabase {
            admin_url: server_url.to_owned(),
            url: with_database(server_url, &name),
            name,
        })
    }

    /// A store on this database.
    pub async fn store(&self) -> Result<PgStore, String> {
        let mut settings = PgSettings::new(self.url.clone());
        settings.max_connections = 8;
        PgStore::connect(&settings).await.map_err(|e| e.to_string())
    }

    /// Runs a `CHECKPOINT` on its server (a superuser's or `pg_checkpoint`'s right), so what was
    /// written so far is on disk and the next writes start a checkpoint cycle afresh.
    pub async fn checkpoint(&self) -> Result<(), String> {
        let mut conn = PgConnection::connect(&self.url)
            .await
            .map_err(|e| format!("cannot reach PostgreSQL: {e}"))?;
        let done = sqlx::raw_sql("CHECKPOINT")
            .execute(&mut conn)
            .await
            .map(drop)
            .map_err(|e| format!("checkpoint: {e}"));
        let _ = conn.close().await;
        done
    }

    /// Connection options of this database (for tests that poke at it directly).
    pub fn options(&self) -> Result<PgConnectOptions, String> {
        PgConnectOptions::from_str(&self.url).map_err(|e| e.to_string())
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside a test's runtime; use a thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ = sqlx::raw_sql(AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                    let _ = admin.close().await;
                }
            });
        });
        let _ = dropped.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_swapped_keeping_the_query() {
        assert_eq!(
            with_database("postgres://u@h:5432/test?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://u@h/test", "x"),
            "postgres://u@h/x"
        );
    }
}

/// Stores and rows for this crate's own tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use otpgate_core::model::{Challenge, Channel, LoginTicket, Purpose, Tenant, TenantId};
    use otpgate_core::store::Store;
    use otpgate_store_testkit::contract;

    use super::{TestDatabase, test_server_url};
    use crate::PgStore;

    /// A store on a database of its own, or `None` when PostgreSQL tests are skipped.
    pub(crate) async fn fresh_store() -> Option<(TestDatabase, PgStore)> {
        let url = test_server_url().unwrap()?;
        let db = TestDatabase::create(&url).await.unwrap();
        let store = db.store().await.unwrap();
        Some((db, store))
    }

    /// The hash of the `i`th ticket [`pending_logins`] writes.
    pub(crate) fn ticket_hash(i: u64) -> [u8; 32] {
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&i.to_be_bytes());
        hash
    }

    /// Pending login tickets, each with its challenge, written one after the other as logins
    /// write them, at [`contract::t0`].
    pub(crate) async fn pending_logins(store: &PgStore, count: usize) -> Vec<Challenge> {
        let tenant = Tenant {
            id: TenantId::generate().unwrap(),
            name: "pages".into(),
            is_default: false,
            settings: Default::default(),
            created_at: contract::t0(),
        };
        store.insert_tenant(&tenant).await.unwrap();
        let user = contract::user(&tenant, "ali");
        store.insert_user(&user, &[]).await.unwrap();
        let mut challenges = Vec::with_capacity(count);
        for i in 0..count {
            let challenge = Challenge {
                user_id: Some(user.id.clone()),
                purpose: Purpose::Login,
                ..contract::challenge(&tenant, &format!("+98912{i:07}"))
            };
            let ticket = LoginTicket {
                hash: ticket_hash(i as u64),
                tenant_id: tenant.id.clone(),
                user_id: user.id.clone(),
                challenge_id: challenge.id.clone(),
                channel: Channel::Sms,
                created_at: challenge.created_at,
                expires_at: challenge.expires_at,
                used_at: None,
            };
            store
                .insert_login_ticket(&ticket, &challenge, None, &[])
                .await
                .unwrap();
            challenges.push(challenge);
        }
        challenges
    }
}
