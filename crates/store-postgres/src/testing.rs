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
