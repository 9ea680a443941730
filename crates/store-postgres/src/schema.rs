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
    include_str!("../migrations/0014_room_for_a_batch_of_hot_updates.sql"),
    include_str!("../migrations/0015_no_session_user_foreign_key.sql"),
    include_str!("../migrations/0016_one_audit_index.sql"),
    include_str!("../migrations/0017_no_outbox_challenge_foreign_key.sql"),
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use otpgate_core::store::LoginCompletion;
    use otpgate_store_testkit::contract;
    use sqlx::{Connection, PgConnection};

    use crate::PgStore;
    use crate::settle::ChallengeChange;
    use crate::testing::fixtures::{fresh_store, pending_logins, ticket_hash};

    /// The page (block of the ctid) each row of `table` is on, by `key` as text.
    async fn pages_of(store: &PgStore, table: &str, key: &str) -> HashMap<String, i64> {
        let sql = format!("SELECT {key}, (ctid::text::point)[0]::int8 FROM {table}");
        sqlx::query_as::<_, (String, i64)>(sqlx::AssertSqlSafe(sql))
            .fetch_all(store.pool())
            .await
            .unwrap()
            .into_iter()
            .collect()
    }

    #[tokio::test]
    async fn a_batch_that_changes_every_row_of_a_page_keeps_each_row_on_its_page() {
        // Arrange: 600 logins written in order, so each page holds many of them.
        let Some((_db, store)) = fresh_store().await else {
            return;
        };
        let challenges = pending_logins(&store, 600).await;
        let (checked, logged_in) = challenges.split_at(300);
        let challenge_pages = pages_of(&store, "challenges", "id").await;
        let ticket_pages = pages_of(&store, "login_tickets", "encode(hash, 'hex')").await;
        // Act: 300 codes consumed by the code checks' batch statement, and 300 logins completed
        // (challenge consumed, ticket spent) by the login batch's statement.
        let now = contract::t0();
        let mut changes: Vec<ChallengeChange<'_>> = checked
            .iter()
            .map(|c| ChallengeChange {
                id: c.id.as_str(),
                attempts: 0,
                consume: true,
                now,
                audit: &[],
            })
            .collect();
        let consumed = store.change_challenges(&mut changes).await.unwrap();
        let logins: Vec<LoginCompletion> = logged_in
            .iter()
            .zip(300u64..)
            .map(|(c, i)| LoginCompletion {
                tenant_id: c.tenant_id.clone(),
                user_id: c.user_id.clone().unwrap(),
                ticket_hash: Some(ticket_hash(i)),
                challenge_id: c.id.clone(),
                expected_attempts: 0,
                totp_step: None,
                recovery_code: None,
                verified: None,
                session: None,
                now,
                audit: Vec::new(),
            })
            .collect();
        let logins: Vec<_> = logins
            .iter()
            .map(|done| crate::login::CodeLogin {
                done,
                ticket: done.ticket_hash.unwrap(),
                reset_failures: true,
            })
            .collect();
        let spent = store.complete_code_logins(&logins).await.unwrap();
        // Assert: the pages held many rows each, and every new version stayed on its row's
        // page, which a HOT update (no index entry) needs.
        assert_eq!((consumed.len(), spent.len()), (300, 300));
        for (before, table, key) in [
            (&challenge_pages, "challenges", "id"),
            (&ticket_pages, "login_tickets", "encode(hash, 'hex')"),
        ] {
            let distinct: std::collections::HashSet<_> = before.values().collect();
            assert!(distinct.len() * 5 <= before.len(), "{table}: {distinct:?}");
            let after = pages_of(&store, table, key).await;
            let moved = before
                .iter()
                .filter(|(k, p)| after.get(*k) != Some(*p))
                .count();
            assert_eq!(
                moved,
                0,
                "{table}: {moved} of {} rows left their page",
                before.len()
            );
        }
    }

    /// Whether a statement of this database waits for a row lock now.
    async fn a_statement_waits_for_a_lock(store: &PgStore) -> bool {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(store.pool())
        .await
        .unwrap()
            > 0
    }

    #[tokio::test]
    async fn a_batch_locks_its_challenges_in_the_order_of_their_ids() {
        // Arrange: a table of the size where PostgreSQL plans the statement as it does in
        // service (an index lookup per id, in the order given; on a table of a few rows it may
        // hash the ids and lock in the table's order instead), two challenges whose ids are in
        // the opposite order to the table's, so that locking in the table's order fails too,
        // and another transaction holding the one with the later id.
        let Some((db, store)) = fresh_store().await else {
            return;
        };
        let ids: Vec<String> = pending_logins(&store, 1000)
            .await
            .iter()
            .map(|c| c.id.as_str().to_owned())
            .collect();
        sqlx::raw_sql("ANALYZE challenges")
            .execute(store.pool())
            .await
            .unwrap();
        let (later, earlier) = ids
            .windows(2)
            .find_map(|pair| (pair[1] < pair[0]).then(|| (pair[0].clone(), pair[1].clone())))
            .expect("1,000 random ids are not all in order");
        let mut holder = PgConnection::connect(&db.url).await.unwrap();
        sqlx::raw_sql("BEGIN").execute(&mut holder).await.unwrap();
        sqlx::query("SELECT 1 FROM challenges WHERE id = $1 FOR UPDATE")
            .bind(&later)
            .execute(&mut holder)
            .await
            .unwrap();
        // Act: a batch that names the later one first, until it waits for the holder; then
        // another connection asks for the earlier one without waiting.
        let batch = {
            let (store, earlier, later) = (store.clone(), earlier.clone(), later.clone());
            tokio::spawn(async move {
                let mut changes: Vec<ChallengeChange<'_>> = [&later, &earlier]
                    .into_iter()
                    .map(|id| ChallengeChange {
                        id,
                        attempts: 0,
                        consume: true,
                        now: contract::t0(),
                        audit: &[],
                    })
                    .collect();
                store.change_challenges(&mut changes).await
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !a_statement_waits_for_a_lock(&store).await {
            assert!(
                std::time::Instant::now() < deadline,
                "the batch never waited"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let mut prober = PgConnection::connect(&db.url).await.unwrap();
        sqlx::raw_sql("BEGIN").execute(&mut prober).await.unwrap();
        let probe = sqlx::query("SELECT 1 FROM challenges WHERE id = $1 FOR UPDATE NOWAIT")
            .bind(&earlier)
            .execute(&mut prober)
            .await;
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut prober)
            .await
            .unwrap();
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut holder)
            .await
            .unwrap();
        // Assert: the batch had taken the earlier row before it waited for the later one, so
        // a batch holding the later row and wanting the earlier can never be what it waits on.
        let refused = probe.expect_err("the earlier row was free while the batch waited");
        let code = refused.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("55P03"), "{refused}");
        assert_eq!(batch.await.unwrap().unwrap().len(), 2);
    }

    /// Pages the statement's top plan node touched (`Buffers:` of `EXPLAIN (ANALYZE, BUFFERS)`,
    /// its children's included): what running it read, whatever plan was chosen.
    fn pages_touched(plan: &[String]) -> u64 {
        let Some(buffers) = plan
            .iter()
            .find(|line| line.trim_start().starts_with("Buffers:"))
        else {
            return 0;
        };
        buffers
            .split_whitespace()
            .filter_map(|part| part.split_once('='))
            .filter(|(name, _)| matches!(*name, "hit" | "read"))
            .filter_map(|(_, count)| count.trim_end_matches(',').parse::<u64>().ok())
            .sum()
    }

    /// A query of `EXPLAIN (ANALYZE, BUFFERS)` lines, its parameters bound.
    type Explain<'q> =
        sqlx::query::QueryScalar<'q, sqlx::Postgres, String, sqlx::postgres::PgArguments>;

    /// Runs `sql` under the plan cache mode `mode` (`force_custom_plan`, `force_generic_plan`),
    /// with its parameters bound by `bind`, in a transaction then rolled back; answers nothing
    /// when it read between 1 and `most` pages, else how many and its plan.
    async fn too_many_pages(
        store: &PgStore,
        mode: &str,
        sql: &str,
        bind: impl FnOnce(Explain<'static>) -> Explain<'static>,
        most: u64,
    ) -> Option<String> {
        let mut tx = store.pool().begin().await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET LOCAL plan_cache_mode = {mode}"
        )))
        .execute(&mut *tx)
        .await
        .unwrap();
        let explain = format!("EXPLAIN (ANALYZE, BUFFERS) {sql}");
        let plan: Vec<String> = bind(sqlx::query_scalar(sqlx::AssertSqlSafe(explain)))
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        let pages = pages_touched(&plan);
        (!(1..=most).contains(&pages)).then(|| format!("{pages} pages\n{}", plan.join("\n")))
    }

    #[tokio::test]
    async fn the_audit_listing_reads_a_few_pages_however_many_events_its_tenant_has() {
        // Arrange: a small tenant's 4,000 events, then 36,000 of a busy one, analysed. Walking
        // the `id` key back from the newest event would step over all the busy tenant's; a
        // `(tenant_id, …)` index in another order would fetch and sort all the small one's.
        let Some((_db, store)) = fresh_store().await else {
            return;
        };
        sqlx::query(
            "INSERT INTO audit_events (tenant_id, user_id, kind, detail, at) \
             SELECT CASE WHEN g <= 4000 THEN 'small' ELSE 'busy' END, 'u' || (g % 100), \
             'login_succeeded', '', g FROM generate_series(1, 40000) g",
        )
        .execute(store.pool())
        .await
        .unwrap();
        sqlx::raw_sql("ANALYZE audit_events")
            .execute(store.pool())
            .await
            .unwrap();
        let mut too_many = Vec::new();
        for mode in ["force_custom_plan", "force_generic_plan"] {
            for tenant in ["small", "busy"] {
                // Act: the newest 20 of the tenant's events, as listed.
                let bind = |q: Explain<'static>| q.bind(tenant).bind(None::<&str>).bind(20_i64);
                let sql = crate::store::AUDIT_NEWEST_FIRST.as_str();
                if let Some(plan) = too_many_pages(&store, mode, sql, bind, 30).await {
                    too_many.push(format!("{tenant} ({mode}): {plan}"));
                }
            }
        }
        // Assert: each read a few pages, from the tenant's newest event back.
        assert!(too_many.is_empty(), "{}", too_many.join("\n\n"));
    }

    #[tokio::test]
    async fn a_sweep_that_finds_nothing_to_delete_reads_a_few_pages_of_tables_without_statistics() {
        // Arrange: 20,000 live rows in every table the sweeper deletes from, none expired or
        // past the retention, written in bulk and never analysed: the planner knows nothing of
        // their expiry times (a new database, or one where autovacuum is off).
        let Some((_db, store)) = fresh_store().await else {
            return;
        };
        let template = pending_logins(&store, 1).await.remove(0);
        let rows = 20_000_i64;
        for sql in [
            "INSERT INTO challenges (id, tenant_id, user_id, purpose, channel, destination, \
             code_hash, locale, created_at, expires_at, last_sent_at, send_count, attempts, \
             max_attempts, status) \
             SELECT c.id || '-' || g, c.tenant_id, c.user_id, c.purpose, c.channel, \
             c.destination, c.code_hash, c.locale, c.created_at, c.expires_at, c.last_sent_at, \
             c.send_count, c.attempts, c.max_attempts, c.status \
             FROM challenges c, generate_series(1, $2) g WHERE c.id = $1",
            "INSERT INTO login_tickets (hash, tenant_id, user_id, challenge_id, channel, \
             created_at, expires_at) \
             SELECT sha256(('t' || g)::bytea), c.tenant_id, c.user_id, c.id || '-' || g, \
             c.channel, c.created_at, c.expires_at \
             FROM challenges c, generate_series(1, $2) g WHERE c.id = $1",
            "INSERT INTO sessions (hash, tenant_id, user_id, created_at, expires_at) \
             SELECT sha256(('s' || g)::bytea), c.tenant_id, c.user_id, c.created_at, \
             c.expires_at FROM challenges c, generate_series(1, $2) g WHERE c.id = $1",
            "INSERT INTO outbox (id, tenant_id, challenge_id, channel, destination, purpose, \
             locale, status, next_attempt_at, created_at) \
             SELECT 'm-' || g, c.tenant_id, c.id || '-' || g, c.channel, c.destination, \
             c.purpose, c.locale, 'sent', c.created_at, c.created_at \
             FROM challenges c, generate_series(1, $2) g WHERE c.id = $1",
            "INSERT INTO revoked_tokens (jti, tenant_id, revoked_at, expires_at) \
             SELECT 'j-' || g, c.tenant_id, c.created_at, c.expires_at \
             FROM challenges c, generate_series(1, $2) g WHERE c.id = $1",
        ] {
            sqlx::query(sql)
                .bind(template.id.as_str())
                .bind(rows)
                .execute(store.pool())
                .await
                .unwrap();
        }
        let now = crate::rows::ms(contract::t0());
        let retention_ago = now - 24 * 60 * 60 * 1000;
        let mut too_many = Vec::new();
        for mode in ["force_custom_plan", "force_generic_plan"] {
            for (purpose, sql, cutoff) in crate::store::SWEEP_STATEMENTS {
                let cutoff = match cutoff {
                    crate::store::SweepCutoff::Now => now,
                    crate::store::SweepCutoff::RetentionAgo => retention_ago,
                };
                // Act: the sweep statement as the sweeper runs it, measured, then undone.
                let bind = |q: Explain<'static>| q.bind(cutoff).bind(100_i64);
                if let Some(plan) = too_many_pages(&store, mode, sql, bind, 30).await {
                    too_many.push(format!("{purpose} ({mode}): {plan}"));
                }
            }
        }
        // Assert: each read a few index pages, where reading a table is hundreds.
        assert!(too_many.is_empty(), "{}", too_many.join("\n\n"));
    }
}
