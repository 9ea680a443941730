//! Embedded, append-only migrations, applied at start inside one transaction that holds a
//! transaction-scoped advisory lock: of several instances starting at once, one migrates and the
//! others wait, then find nothing to do.

use otpgate_core::StoreError;
use sqlx::PgPool;

use crate::db;

/// Every migration, in order. Index + 1 is the version it produces.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_recovery_codes.sql"),
    include_str!("../migrations/0003_tenant_keys_devices.sql"),
    include_str!("../migrations/0004_tenant_settings.sql"),
    include_str!("../migrations/0005_send_origin.sql"),
    include_str!("../migrations/0006_range_outcomes.sql"),
    include_str!("../migrations/0007_server_secrets.sql"),
    include_str!("../migrations/0008_no_tenant_foreign_keys.sql"),
    include_str!("../migrations/0009_sweep_indexes.sql"),
    include_str!("../migrations/0010_no_session_user_index.sql"),
    include_str!("../migrations/0011_room_for_hot_updates.sql"),
    include_str!("../migrations/0012_unambiguous_send_indexes.sql"),
    include_str!("../migrations/0013_challenges_by_destination.sql"),
];

/// An arbitrary constant naming otpgate's migration lock.
const MIGRATION_LOCK: i64 = 0x6f74_7067_6174_6531; // "otpgate1"

pub(crate) async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(db)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS otpgate_schema (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM otpgate_schema")
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
    let current = usize::try_from(current.unwrap_or(0)).unwrap_or(0);
    if current > MIGRATIONS.len() {
        return Err(StoreError::Other(format!(
            "database schema version {current} is newer than this otpgate ({})",
            MIGRATIONS.len()
        )));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(db)?;
        sqlx::query("INSERT INTO otpgate_schema (version) VALUES ($1)")
            .bind((index + 1) as i64)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tracing::info!(version = index + 1, "applied PostgreSQL migration");
    }
    tx.commit().await.map_err(db)
}
