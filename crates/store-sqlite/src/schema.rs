//! Embedded, append-only migrations, tracked in `PRAGMA user_version` and applied at open inside
//! one immediate transaction, so two processes opening a new file migrate it once.

use otpgate_core::StoreError;
use rusqlite::Connection;

use crate::map_error;

/// Every migration, in order. Index + 1 is the schema version it produces.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_recovery_codes.sql"),
    include_str!("../migrations/0003_tenant_keys_devices.sql"),
    include_str!("../migrations/0004_tenant_settings.sql"),
    include_str!("../migrations/0005_send_origin.sql"),
    include_str!("../migrations/0006_range_outcomes.sql"),
    include_str!("../migrations/0007_server_secrets.sql"),
    include_str!("../migrations/0008_sweep_indexes.sql"),
    include_str!("../migrations/0009_no_session_user_index.sql"),
    include_str!("../migrations/0010_challenges_by_destination.sql"),
    include_str!("../migrations/0011_audit_newest_first.sql"),
];

/// The schema version this build expects.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| map_error(e, "migration"))?;
    let current: i64 = tx
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|e| map_error(e, "migration"))?;
    let current = usize::try_from(current).unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(StoreError::Other(format!(
            "database schema version {current} is newer than this otpgate ({SCHEMA_VERSION})"
        )));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.execute_batch(sql)
            .map_err(|e| map_error(e, "migration"))?;
        tx.pragma_update(None, "user_version", (index + 1) as i64)
            .map_err(|e| map_error(e, "migration"))?;
        tracing::info!(version = index + 1, "applied SQLite migration");
    }
    tx.commit().map_err(|e| map_error(e, "migration"))
}
