//! Wrong codes and failed logins counted in batches. Each was one statement and one commit of
//! its own (the challenge's attempt, then the account's failure count, each with its event), so
//! a flood of wrong codes, which is what an attacker sends, cost PostgreSQL two commits per
//! request; the ones that arrive together share a statement here (the wrong codes the one the
//! batched code checks carry out their changes with, `settle::CARRY_OUT`).
//!
//! Each change keeps the condition of its single statement: an attempt is counted only against
//! the attempt count the core saw (READ COMMITTED re-checks it after waiting for a concurrent
//! writer), so of two checks that saw the same count one is counted and the other told so, as
//! without the batch. A challenge or account asked twice in one batch, a failure count whose
//! account did not answer, and every request of a batch whose statement failed are carried out
//! alone, so each count stays exact and one request's fault fails only itself.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use otpgate_core::model::{AuditEvent, ChallengeId, TenantId, UserId};
use otpgate_core::store::StoreResult;
use sqlx::AssertSqlSafe;
use time::OffsetDateTime;
use tokio::sync::oneshot;

use crate::batch::Queue;
use crate::settle::ChallengeChange;
use crate::store::{bind_audit, tagged_audit_insert};
use crate::{PgStore, db};

/// One wrong code, waiting for its batch.
pub(crate) struct FailedCheck {
    /// The store to write to.
    pub store: PgStore,
    pub id: ChallengeId,
    pub expected_attempts: u32,
    pub now: OffsetDateTime,
    pub audit: Vec<AuditEvent>,
    pub reply: oneshot::Sender<StoreResult<bool>>,
}

/// One failed login, waiting for its batch.
pub(crate) struct LoginFailure {
    /// The store to write to.
    pub store: PgStore,
    pub tenant: TenantId,
    pub user: UserId,
    pub audit: Vec<AuditEvent>,
    pub reply: oneshot::Sender<StoreResult<u32>>,
}

crate::batch::answered_through_reply!(FailedCheck, LoginFailure);

/// Starts the batchers of wrong codes.
pub(crate) fn start_failed_checks(max_wait: Duration) -> Queue<FailedCheck> {
    crate::batch::start(
        Arc::new(|batch| Box::pin(check_batch(batch))),
        Some(Arc::new(|request| Box::pin(check_one(request)))),
        max_wait,
    )
}

/// Starts the batchers of failed logins.
pub(crate) fn start_login_failures(max_wait: Duration) -> Queue<LoginFailure> {
    crate::batch::start(
        Arc::new(|batch| Box::pin(count_batch(batch))),
        Some(Arc::new(|request| Box::pin(count_one(request)))),
        max_wait,
    )
}

/// `COUNT_LOGIN_FAILURE` for many accounts (each at most once): their new counts come back,
/// and only the events of the accounts counted are written.
pub(crate) static LOGIN_FAILURES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH failures AS ( \
             SELECT * FROM UNNEST($10::text[], $11::text[]) AS f(tenant_id, user_id)), \
         counted AS ( \
             UPDATE users u SET failed_logins = u.failed_logins + 1 \
             FROM failures f \
             WHERE u.id = f.user_id AND u.tenant_id IS NOT DISTINCT FROM f.tenant_id \
             RETURNING u.id, u.failed_logins), \
         audit AS ({}) \
         SELECT id, failed_logins FROM counted",
        tagged_audit_insert(
            "$12::text[]",
            "account",
            "e.account IN (SELECT id FROM counted)"
        )
    )
});

async fn check_batch(batch: Vec<FailedCheck>) {
    let Some(store) = batch.first().map(|r| r.store.clone()) else {
        return;
    };
    let mut first_of_each = HashSet::new();
    let (batch, repeats): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .partition(|r| first_of_each.insert(r.id.clone()));
    match store.count_failed_checks(&batch).await {
        Ok(counted) => {
            for request in batch {
                let _ = request
                    .reply
                    .send(Ok(counted.contains(request.id.as_str())));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "a batch of wrong codes failed; counting each alone");
            batch
                .into_iter()
                .for_each(|r| drop(tokio::spawn(check_one(r))));
        }
    }
    repeats
        .into_iter()
        .for_each(|r| drop(tokio::spawn(check_one(r))));
}

async fn check_one(request: FailedCheck) {
    let counted = request
        .store
        .count_failed_check(
            &request.id,
            request.expected_attempts,
            request.now,
            &request.audit,
        )
        .await;
    let _ = request.reply.send(counted);
}

async fn count_batch(batch: Vec<LoginFailure>) {
    let Some(store) = batch.first().map(|r| r.store.clone()) else {
        return;
    };
    let mut first_of_each = HashSet::new();
    let (mut batch, mut alone): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .partition(|r| first_of_each.insert(r.user.as_str().to_owned()));
    // The statement locks the accounts in this order: two batches in flight that share some
    // wait for each other instead of deadlocking.
    batch.sort_unstable_by(|a, b| a.user.as_str().cmp(b.user.as_str()));
    match store.count_login_failures(&batch).await {
        Ok(counts) => {
            for request in batch {
                match counts.get(request.user.as_str()) {
                    Some(&failures) => {
                        let _ = request.reply.send(Ok(failures));
                    }
                    // Not counted (no such account here): the single statement says why.
                    None => alone.push(request),
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "a batch of failed logins failed; counting each alone");
            alone.extend(batch);
        }
    }
    alone
        .into_iter()
        .for_each(|r| drop(tokio::spawn(count_one(r))));
}

async fn count_one(request: LoginFailure) {
    let counted = request
        .store
        .count_login_failure(&request.tenant, &request.user, &request.audit)
        .await;
    let _ = request.reply.send(counted);
}

impl PgStore {
    /// Counts these wrong codes (each challenge at most once) with the code checks' own batch
    /// statement; answers the ids of the challenges counted.
    async fn count_failed_checks(&self, batch: &[FailedCheck]) -> StoreResult<HashSet<String>> {
        let mut changes: Vec<ChallengeChange<'_>> = batch
            .iter()
            .map(|r| ChallengeChange {
                id: r.id.as_str(),
                attempts: r.expected_attempts,
                consume: false,
                now: r.now,
                audit: &r.audit,
            })
            .collect();
        self.change_challenges(&mut changes).await
    }

    /// Counts a failed login of each of these accounts (each at most once) in one statement;
    /// answers the new count of each account counted.
    async fn count_login_failures(
        &self,
        batch: &[LoginFailure],
    ) -> StoreResult<HashMap<String, u32>> {
        let audit: Vec<AuditEvent> = batch.iter().flat_map(|r| r.audit.iter().cloned()).collect();
        let audit_of: Vec<&str> = batch
            .iter()
            .flat_map(|r| r.audit.iter().map(|_| r.user.as_str()))
            .collect();
        let rows = bind_audit(sqlx::query(AssertSqlSafe(LOGIN_FAILURES.as_str())), &audit)
            .bind(batch.iter().map(|r| r.tenant.as_str()).collect::<Vec<_>>())
            .bind(batch.iter().map(|r| r.user.as_str()).collect::<Vec<_>>())
            .bind(audit_of)
            .fetch_all(self.pool())
            .await
            .map_err(db)?;
        rows.iter()
            .map(|row| {
                let id: String = sqlx::Row::try_get(row, 0).map_err(db)?;
                let failures: i64 = sqlx::Row::try_get(row, 1).map_err(db)?;
                Ok((id, u32::try_from(failures).unwrap_or(u32::MAX)))
            })
            .collect()
    }
}
