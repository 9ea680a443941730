//! The send path's writes in batches: new challenges with their first message and audit rows,
//! and messages marked sent by the delivery worker. Each was one statement and one commit per
//! code, and `send` spent its PostgreSQL time starting, planning and committing them; the
//! writes that arrive together share one statement here (arrays bound per column, `UNNEST`),
//! answered only once that statement has committed, as before.
//!
//! A batch whose statement fails (a challenge id already taken, say) is written again one
//! request at a time, so one request's fault fails only itself.

use std::sync::Arc;
use std::time::Duration;

use otpgate_core::model::{AuditEvent, Challenge, MessageId, OutboxMessage};
use otpgate_core::store::StoreResult;
use sqlx::AssertSqlSafe;
use tokio::sync::oneshot;

use crate::batch::Queue;
use crate::rows::ms;
use crate::store::{CHALLENGE_INSERT_COLUMNS, INSERT_AUDIT, MESSAGE_INSERT_COLUMNS, bind_audit};
use crate::{PgStore, db, map_error};

/// One new challenge, waiting for its batch.
pub(crate) struct NewChallenge {
    /// The store to write to.
    pub store: PgStore,
    pub challenge: Challenge,
    pub message: Option<OutboxMessage>,
    pub audit: Vec<AuditEvent>,
    pub reply: oneshot::Sender<StoreResult<()>>,
}

/// One delivered message, waiting for its batch.
pub(crate) struct SentMark {
    /// The store to write to.
    pub store: PgStore,
    pub id: MessageId,
    pub provider_message_id: Option<String>,
    pub audit: Vec<AuditEvent>,
    pub reply: oneshot::Sender<StoreResult<()>>,
}

crate::batch::answered_through_reply!(NewChallenge, SentMark);

/// Starts the batchers of new challenges.
pub(crate) fn start_new_challenges(max_wait: Duration) -> Queue<NewChallenge> {
    crate::batch::start(
        Arc::new(|batch| Box::pin(insert_batch(batch))),
        Some(Arc::new(|request| Box::pin(insert_one(request)))),
        max_wait,
    )
}

/// Starts the batchers of sent marks.
pub(crate) fn start_sent_marks(max_wait: Duration) -> Queue<SentMark> {
    crate::batch::start(
        Arc::new(|batch| Box::pin(mark_batch(batch))),
        Some(Arc::new(|request| Box::pin(mark_one(request)))),
        max_wait,
    )
}

/// The arrays of one column each, after the audit events' nine.
const NEW_CHALLENGE_ARRAYS: &str = "$10::text[], $11::text[], $12::text[], $13::text[], \
     $14::text[], $15::text[], $16::bytea[], $17::text[], $18::int8[], $19::int8[], $20::int8[], \
     $21::int8[], $22::int8[], $23::int8[], $24::text[]";
const NEW_MESSAGE_ARRAYS: &str = "$25::text[], $26::text[], $27::text[], $28::text[], \
     $29::text[], $30::text[], $31::text[], $32::text[], $33::text[], $34::text[], $35::int8[], \
     $36::int8[], $37::int8[], $38::text[], $39::text[]";

/// Many new challenges, their messages and their audit rows in one statement.
static NEW_CHALLENGES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH challenge AS (INSERT INTO challenges ({CHALLENGE_INSERT_COLUMNS}) \
             SELECT * FROM UNNEST({NEW_CHALLENGE_ARRAYS})), \
         message AS (INSERT INTO outbox ({MESSAGE_INSERT_COLUMNS}) \
             SELECT * FROM UNNEST({NEW_MESSAGE_ARRAYS})), \
         audit AS ({INSERT_AUDIT}) \
         SELECT 1"
    )
});

/// Many messages marked sent, with their audit rows, in one statement; as the single
/// statement does, the audit rows are written whether or not the message was still there.
pub(crate) static SENT_MARKS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH sent AS ( \
             UPDATE outbox o SET status = 'sent', body = NULL, code = NULL, \
             provider_message_id = s.provider_message_id, sent_at = s.at, last_error = NULL \
             FROM UNNEST($10::text[], $11::text[], $12::int8[]) \
                 AS s(id, provider_message_id, at) \
             WHERE o.id = s.id), \
         audit AS ({INSERT_AUDIT}) \
         SELECT 1"
    )
});

async fn insert_batch(batch: Vec<NewChallenge>) {
    let Some(store) = batch.first().map(|r| r.store.clone()) else {
        return;
    };
    let written = store.insert_new_challenges(&batch).await;
    answer_batch(batch, written, "new challenges", |r| r.reply, insert_one);
}

/// Answers every request of a batch whose statement committed; when it failed, writes each
/// request again alone, on its own task.
fn answer_batch<R, Alone>(
    batch: Vec<R>,
    written: StoreResult<()>,
    what: &str,
    reply: fn(R) -> oneshot::Sender<StoreResult<()>>,
    alone: fn(R) -> Alone,
) where
    R: Send + 'static,
    Alone: std::future::Future<Output = ()> + Send + 'static,
{
    match written {
        Ok(()) => {
            for request in batch {
                let _ = reply(request).send(Ok(()));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "a batch of {what} failed; writing each alone");
            for request in batch {
                tokio::spawn(alone(request));
            }
        }
    }
}

async fn insert_one(request: NewChallenge) {
    let written = request
        .store
        .insert_new_challenge(&request.challenge, request.message.as_ref(), &request.audit)
        .await;
    let _ = request.reply.send(written);
}

async fn mark_batch(batch: Vec<SentMark>) {
    let Some(store) = batch.first().map(|r| r.store.clone()) else {
        return;
    };
    let marked = store.mark_messages_sent(&batch).await;
    answer_batch(batch, marked, "sent marks", |r| r.reply, mark_one);
}

async fn mark_one(request: SentMark) {
    let marked = request
        .store
        .mark_one_message_sent(
            &request.id,
            request.provider_message_id.as_deref(),
            &request.audit,
        )
        .await;
    let _ = request.reply.send(marked);
}

impl PgStore {
    /// Writes these challenges, their messages and audit rows in one statement.
    async fn insert_new_challenges(&self, batch: &[NewChallenge]) -> StoreResult<()> {
        let challenges: Vec<&Challenge> = batch.iter().map(|r| &r.challenge).collect();
        let messages: Vec<&OutboxMessage> =
            batch.iter().filter_map(|r| r.message.as_ref()).collect();
        let audit: Vec<AuditEvent> = batch.iter().flat_map(|r| r.audit.iter().cloned()).collect();
        let c = |f: fn(&Challenge) -> Option<&str>| -> Vec<Option<&str>> {
            challenges.iter().map(|c| f(c)).collect()
        };
        let int =
            |f: fn(&Challenge) -> i64| -> Vec<i64> { challenges.iter().map(|c| f(c)).collect() };
        let m = |f: fn(&OutboxMessage) -> Option<&str>| -> Vec<Option<&str>> {
            messages.iter().map(|m| f(m)).collect()
        };
        bind_audit(sqlx::query(AssertSqlSafe(NEW_CHALLENGES.as_str())), &audit)
            .bind(c(|c| Some(c.id.as_str())))
            .bind(c(|c| Some(c.tenant_id.as_str())))
            .bind(c(|c| c.user_id.as_ref().map(|u| u.as_str())))
            .bind(c(|c| Some(c.purpose.as_str())))
            .bind(c(|c| Some(c.channel.as_str())))
            .bind(c(|c| Some(c.destination.as_str())))
            .bind(
                challenges
                    .iter()
                    .map(|c| c.code_hash.as_slice())
                    .collect::<Vec<_>>(),
            )
            .bind(c(|c| Some(c.locale.as_str())))
            .bind(int(|c| ms(c.created_at)))
            .bind(int(|c| ms(c.expires_at)))
            .bind(int(|c| ms(c.last_sent_at)))
            .bind(int(|c| i64::from(c.send_count)))
            .bind(int(|c| i64::from(c.attempts)))
            .bind(int(|c| i64::from(c.max_attempts)))
            .bind(c(|c| Some(c.status.as_str())))
            .bind(m(|m| Some(m.id.as_str())))
            .bind(m(|m| Some(m.tenant_id.as_str())))
            .bind(m(|m| m.challenge_id.as_ref().map(|c| c.as_str())))
            .bind(m(|m| Some(m.channel.as_str())))
            .bind(m(|m| Some(m.destination.as_str())))
            .bind(m(|m| Some(m.purpose.as_str())))
            .bind(m(|m| Some(m.locale.as_str())))
            .bind(m(|m| m.body.as_deref()))
            .bind(m(|m| m.code.as_deref()))
            .bind(m(|m| Some(m.status.as_str())))
            .bind(
                messages
                    .iter()
                    .map(|m| i64::from(m.attempts))
                    .collect::<Vec<_>>(),
            )
            .bind(
                messages
                    .iter()
                    .map(|m| ms(m.next_attempt_at))
                    .collect::<Vec<_>>(),
            )
            .bind(
                messages
                    .iter()
                    .map(|m| ms(m.created_at))
                    .collect::<Vec<_>>(),
            )
            .bind(m(|m| m.client_ip.as_deref()))
            .bind(m(|m| m.user_id.as_ref().map(|u| u.as_str())))
            .execute(self.pool())
            .await
            .map_err(|e| map_error(e, "challenge"))?;
        Ok(())
    }

    /// Marks these messages sent and writes their audit rows in one statement.
    async fn mark_messages_sent(&self, batch: &[SentMark]) -> StoreResult<()> {
        let mut audit: Vec<AuditEvent> = Vec::new();
        for request in batch {
            audit.extend(request.audit.iter().cloned());
        }
        bind_audit(sqlx::query(AssertSqlSafe(SENT_MARKS.as_str())), &audit)
            .bind(batch.iter().map(|r| r.id.as_str()).collect::<Vec<_>>())
            .bind(
                batch
                    .iter()
                    .map(|r| r.provider_message_id.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                batch
                    .iter()
                    .map(|r| r.audit.first().map(|e| ms(e.at)))
                    .collect::<Vec<_>>(),
            )
            .execute(self.pool())
            .await
            .map_err(db)?;
        Ok(())
    }
}
