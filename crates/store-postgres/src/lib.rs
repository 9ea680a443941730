//! The PostgreSQL store, for several otpgate instances behind one load balancer. Every rule that
//! must hold across instances (single use, attempt counters, TOTP steps, cool-downs, lock-outs,
//! revocation) is one conditional statement or one transaction here, never process memory.
//! Conditional `UPDATE`s at READ COMMITTED re-check their `WHERE` after waiting for a concurrent
//! writer of the same row, so "consume if attempts are still N" succeeds for one caller only.

mod batch;
mod failures;
mod login;
mod lookup;
mod nodelay;
mod rows;
mod schema;
mod send_writes;
mod settle;
mod store;

use std::str::FromStr;
use std::time::Duration;

use otpgate_core::StoreError;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

/// Connection settings.
#[derive(Debug, Clone)]
pub struct PgSettings {
    /// `postgres://user:pass@host:port/db?sslmode=…`.
    pub url: String,
    /// Most connections this instance opens.
    pub max_connections: u32,
    /// How long a request waits for a free connection before failing (503).
    pub acquire_timeout: Duration,
    /// Server-side limit per statement.
    pub statement_timeout: Duration,
}

impl PgSettings {
    /// Defaults for a URL: 16 connections, 3 s to acquire, 5 s per statement.
    pub fn new(url: impl Into<String>) -> Self {
        PgSettings {
            url: url.into(),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(5),
        }
    }
}

/// The PostgreSQL implementation of [`otpgate_core::store::Store`].
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Code checks waiting to be settled in a batch (see the `settle` module).
    settles: batch::Queue<settle::SettleRequest>,
    /// Code logins waiting to be completed in a batch (see the `login` module).
    logins: batch::Queue<login::LoginRequest>,
    /// Login steps waiting to be read, judged and completed in a batch (the `login` module).
    login_settles: batch::Queue<login::SettleLoginRequest>,
    /// New challenges and sent marks waiting for their batch (see the `send_writes` module).
    new_challenges: batch::Queue<send_writes::NewChallenge>,
    sent_marks: batch::Queue<send_writes::SentMark>,
    /// Wrong codes and failed logins waiting to be counted in a batch (see `failures`).
    failed_checks: batch::Queue<failures::FailedCheck>,
    login_failures: batch::Queue<failures::LoginFailure>,
    /// Point reads waiting to share a statement (see the `lookup` module).
    tickets: lookup::LookupQueue<[u8; 32], otpgate_core::model::LoginTicket>,
    /// A login step's ticket, user and challenge, read together.
    login_contexts: lookup::LookupQueue<[u8; 32], otpgate_core::store::LoginContext>,
    users: lookup::LookupQueue<String, otpgate_core::model::User>,
    challenges: lookup::LookupQueue<String, otpgate_core::model::Challenge>,
    /// The send path's reads (a destination's pending challenge, its two send counts).
    pending: lookup::LookupQueue<store::PendingOf, otpgate_core::model::Challenge>,
    destination_sends: lookup::LookupQueue<store::DestinationWindows, (i64, i64)>,
}

/// Maps a driver error; unique violations become `Conflict(what)`, lost connections
/// `Unavailable`.
pub(crate) fn map_error(e: sqlx::Error, what: &'static str) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
            StoreError::Conflict(what)
        }
        // 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now,
        // 53300 too many connections, 08xxx connection exceptions, 3D000 database gone.
        sqlx::Error::Database(db)
            if db.code().is_some_and(|c| {
                c.starts_with("08") || c.starts_with("57P") || c == "53300" || c == "3D000"
            }) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Other(e.to_string()),
    }
}

pub(crate) fn db(e: sqlx::Error) -> StoreError {
    map_error(e, "row")
}

impl PgStore {
    /// Connects, then runs the embedded migrations under an advisory lock (so several instances
    /// starting at once migrate once).
    pub async fn connect(settings: &PgSettings) -> Result<Self, StoreError> {
        let timeout_ms = settings.statement_timeout.as_millis().to_string();
        let options = PgConnectOptions::from_str(&settings.url)
            .map_err(|e| StoreError::Other(format!("invalid DATABASE_URL: {e}")))?
            .application_name("otpgate")
            .options([("statement_timeout", timeout_ms.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections.max(1))
            .acquire_timeout(settings.acquire_timeout)
            // No ping before each use: it doubled the round trips of every request. A
            // connection killed by the server (restart, pg_terminate_backend) fails the one
            // request that meets it (503, nothing half-written) and is dropped from the pool.
            .test_before_acquire(false)
            .after_connect(|conn, _| Box::pin(nodelay::disable_nagle(conn)))
            .connect_with(options)
            .await
            .map_err(db)?;
        schema::migrate(&pool).await?;
        Ok(PgStore {
            pool,
            settles: settle::start(settings.acquire_timeout),
            logins: login::start(settings.acquire_timeout),
            login_settles: login::start_settles(settings.acquire_timeout),
            new_challenges: send_writes::start_new_challenges(settings.acquire_timeout),
            sent_marks: send_writes::start_sent_marks(settings.acquire_timeout),
            failed_checks: failures::start_failed_checks(settings.acquire_timeout),
            login_failures: failures::start_login_failures(settings.acquire_timeout),
            tickets: lookup::start(store::fetch_tickets, settings.acquire_timeout),
            login_contexts: lookup::start(store::fetch_login_contexts, settings.acquire_timeout),
            users: lookup::start(store::fetch_users, settings.acquire_timeout),
            challenges: lookup::start(store::fetch_challenges, settings.acquire_timeout),
            pending: lookup::start(store::fetch_pending, settings.acquire_timeout),
            destination_sends: lookup::start(
                store::fetch_destination_sends,
                settings.acquire_timeout,
            ),
        })
    }

    /// The pool (for tests and diagnostics).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[doc(hidden)]
pub mod testing;
