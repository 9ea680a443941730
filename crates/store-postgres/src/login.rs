//! Code logins completed in batches. Completing a login is one statement (consume the
//! challenge, spend the ticket, clear the failed-login count, insert the session, write the
//! audit rows); the logins that arrive together share it here, arrays bound per column, so
//! PostgreSQL starts, plans and commits one statement for all of them.
//!
//! Every change stays conditional exactly as in the single statement (`CODE_LOGIN`): a login
//! whose challenge or ticket changed under it gets `false`, and the core reads again and decides,
//! as without the batch. A ticket or challenge asked twice in one batch, and every login of a
//! batch whose statement failed, is completed alone, so one login's fault fails only itself.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use otpgate_core::model::AuditEvent;
use otpgate_core::store::{LoginCompletion, StoreResult};
use sqlx::AssertSqlSafe;
use tokio::sync::oneshot;

use crate::rows::ms;
use crate::store::{bind_audit, tagged_audit_insert};
use crate::{PgStore, db};

/// One caller's login completion, waiting for its batch.
pub(crate) struct LoginRequest {
    /// The store to write to.
    pub store: PgStore,
    pub done: LoginCompletion,
    pub ticket: [u8; 32],
    pub reply: oneshot::Sender<StoreResult<bool>>,
}

crate::batch::answered_through_reply!(LoginRequest);

/// Starts the batchers; completions go into the returned queue.
pub(crate) fn start(max_wait: Duration) -> crate::batch::Queue<LoginRequest> {
    crate::batch::start(
        Arc::new(|batch| Box::pin(complete_batch(batch))),
        Some(Arc::new(|request| Box::pin(complete_one(request)))),
        max_wait,
    )
}

async fn complete_batch(batch: Vec<LoginRequest>) {
    let Some(store) = batch.first().map(|r| r.store.clone()) else {
        return;
    };
    let (mut tickets, mut challenges) = (HashSet::new(), HashSet::new());
    let (mut batch, repeats): (Vec<_>, Vec<_>) = batch.into_iter().partition(|r| {
        let new_ticket = tickets.insert(r.ticket);
        let new_challenge = challenges.insert(r.done.challenge_id.clone());
        new_ticket && new_challenge
    });
    // The statement locks challenges, then tickets, then accounts, each in this order: two
    // batches in flight that share rows wait for each other instead of deadlocking.
    batch.sort_unstable_by(|a, b| {
        (a.done.user_id.as_str(), a.done.challenge_id.as_str())
            .cmp(&(b.done.user_id.as_str(), b.done.challenge_id.as_str()))
    });
    match store.complete_code_logins(&batch).await {
        Ok(spent) => {
            for request in batch {
                let _ = request.reply.send(Ok(spent.contains(&request.ticket)));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "a batch of logins failed; completing each alone");
            batch.into_iter().for_each(complete_alone);
        }
    }
    repeats.into_iter().for_each(complete_alone);
}

/// Completes one login with its own statement, on its own task.
fn complete_alone(request: LoginRequest) {
    tokio::spawn(complete_one(request));
}

/// Completes one login with its own statement.
async fn complete_one(request: LoginRequest) {
    let LoginRequest {
        store,
        done,
        ticket,
        reply,
    } = request;
    let _ = reply.send(store.complete_code_login(&done, &ticket).await);
}

/// `CODE_LOGIN` for many logins: the same conditions, each login's row of `logins` standing for
/// that statement's parameters; the hashes of the tickets spent come back.
pub(crate) static CODE_LOGINS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH logins AS ( \
         SELECT * FROM UNNEST($10::text[], $11::text[], $12::int8[], $13::text[], $14::int8[], \
             $15::bytea[], $16::bytea[], $17::int8[], $18::int8[]) \
         AS l(tenant_id, user_id, at, challenge_id, attempts, ticket, session_hash, \
             created_at, expires_at)), \
     consumed AS ( \
         UPDATE challenges c SET status = 'approved', resolved_at = l.at \
         FROM logins l \
         WHERE c.id = l.challenge_id AND c.attempts = l.attempts AND c.status = 'pending' \
         AND c.expires_at > l.at \
         AND EXISTS (SELECT 1 FROM login_tickets t \
             WHERE t.hash = l.ticket AND t.used_at IS NULL AND t.expires_at > l.at) \
         RETURNING l.ticket), \
     spent AS ( \
         UPDATE login_tickets t SET used_at = l.at \
         FROM logins l \
         WHERE t.hash = l.ticket AND t.used_at IS NULL AND t.expires_at > l.at \
         AND l.ticket IN (SELECT ticket FROM consumed) \
         RETURNING t.hash), \
     reset AS ( \
         UPDATE users u SET failed_logins = 0, locked_until = NULL \
         FROM logins l \
         WHERE u.id = l.user_id \
         AND (u.failed_logins <> 0 OR u.locked_until IS NOT NULL) \
         AND l.ticket IN (SELECT hash FROM spent)), \
     session AS ( \
         INSERT INTO sessions (hash, tenant_id, user_id, created_at, expires_at) \
         SELECT l.session_hash, l.tenant_id, l.user_id, l.created_at, l.expires_at \
         FROM logins l \
         WHERE l.session_hash IS NOT NULL AND l.ticket IN (SELECT hash FROM spent)), \
     audit AS ({}) \
     SELECT hash FROM spent",
        tagged_audit_insert(
            "$19::bytea[]",
            "ticket",
            "e.ticket IN (SELECT hash FROM spent)"
        )
    )
});

impl PgStore {
    /// Completes these logins (each ticket and challenge at most once) in one statement;
    /// answers the tickets spent.
    pub(crate) async fn complete_code_logins(
        &self,
        batch: &[LoginRequest],
    ) -> StoreResult<HashSet<[u8; 32]>> {
        let mut audit: Vec<AuditEvent> = Vec::new();
        let mut audit_of: Vec<Vec<u8>> = Vec::new();
        let mut columns = LoginColumns::default();
        for request in batch {
            let done = &request.done;
            let session = done.session.as_ref();
            columns.tenant.push(done.tenant_id.as_str());
            columns.user.push(done.user_id.as_str());
            columns.at.push(ms(done.now));
            columns.challenge.push(done.challenge_id.as_str());
            columns.attempts.push(i64::from(done.expected_attempts));
            columns.ticket.push(request.ticket.to_vec());
            columns.session.push(session.map(|s| s.hash.to_vec()));
            columns.created.push(session.map(|s| ms(s.created_at)));
            columns.expires.push(session.map(|s| ms(s.expires_at)));
            audit.extend(done.audit.iter().cloned());
            audit_of.extend(done.audit.iter().map(|_| request.ticket.to_vec()));
        }
        let spent = bind_audit(sqlx::query(AssertSqlSafe(CODE_LOGINS.as_str())), &audit)
            .bind(columns.tenant)
            .bind(columns.user)
            .bind(columns.at)
            .bind(columns.challenge)
            .bind(columns.attempts)
            .bind(columns.ticket)
            .bind(columns.session)
            .bind(columns.created)
            .bind(columns.expires)
            .bind(audit_of)
            .fetch_all(self.pool())
            .await
            .map_err(db)?;
        spent
            .iter()
            .map(|row| {
                let hash: Vec<u8> = sqlx::Row::try_get(row, 0).map_err(db)?;
                <[u8; 32]>::try_from(hash.as_slice())
                    .map_err(|_| otpgate_core::StoreError::Other("ticket hash length".into()))
            })
            .collect()
    }
}

/// The per-login arrays of `CODE_LOGINS`, in parameter order.
#[derive(Default)]
struct LoginColumns<'a> {
    tenant: Vec<&'a str>,
    user: Vec<&'a str>,
    at: Vec<i64>,
    challenge: Vec<&'a str>,
    attempts: Vec<i64>,
    ticket: Vec<Vec<u8>>,
    session: Vec<Option<Vec<u8>>>,
    created: Vec<Option<i64>>,
    expires: Vec<Option<i64>>,
}
