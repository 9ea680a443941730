//! Code checks settled in batches. Each check used to be two round trips of its own (read the
//! challenge, then a conditional change with its audit rows), and PostgreSQL spent most of its
//! time starting, planning and committing those tiny statements. Here the checks that arrive
//! together share them: one `SELECT … WHERE id = ANY` reads every challenge, the core's judge
//! decides each, and one statement changes them all (arrays bound per column, `UNNEST`) with
//! their audit rows, in one commit.
//!
//! The rules stay the core's and the guarantees stay the single-check ones: the change of each
//! challenge is conditional on the attempts the judge saw (READ COMMITTED re-checks the
//! condition after waiting for a concurrent writer of the row), and a check whose condition no
//! longer held — another check, here or on another instance, got there first — is settled
//! alone again by [`settle_by_read_and_write`], as it would have been without the batch. So is
//! the second check of one challenge in the same batch.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use otpgate_core::model::{AuditEvent, Challenge, ChallengeId, TenantId};
use otpgate_core::store::{
    ChallengeJudge, Settled, StoreResult, Verdict, settle_by_read_and_write,
};
use sqlx::AssertSqlSafe;
use time::OffsetDateTime;
use tokio::sync::oneshot;

use crate::batch::{Queue, Request as _};

use crate::rows::ms;
use crate::store::{bind_audit, tagged_audit_insert};
use crate::{PgStore, db};

/// One caller's check, waiting for its batch.
pub(crate) struct SettleRequest {
    /// The store to settle in.
    pub store: PgStore,
    pub tenant: TenantId,
    pub id: ChallengeId,
    pub judge: ChallengeJudge,
    pub reply: oneshot::Sender<StoreResult<Option<Settled>>>,
}

crate::batch::answered_through_reply!(SettleRequest);

/// Starts the batchers; checks go into the returned queue.
pub(crate) fn start(max_wait: Duration) -> Queue<SettleRequest> {
    crate::batch::start(
        Arc::new(|batch| Box::pin(settle_batch(batch))),
        Some(Arc::new(|request| Box::pin(settle_one(request)))),
        max_wait,
    )
}

/// A check the core judged, to be carried out.
struct Judged {
    request: SettleRequest,
    challenge: Challenge,
    verdict: Verdict,
}

async fn settle_batch(batch: Vec<SettleRequest>) {
    let Some(store) = batch.first().map(|r| r.store.clone()) else {
        return;
    };
    let Some((batch, repeats, mut challenges)) = crate::batch::read_distinct(
        batch,
        |r| r.id.as_str().to_owned(),
        |ids| crate::store::fetch_challenges(store.clone(), ids),
    )
    .await
    else {
        return;
    };
    let mut judged = Vec::new();
    for request in batch {
        let Some(challenge) = challenges
            .remove(request.id.as_str())
            .filter(|c| c.tenant_id == request.tenant)
        else {
            let _ = request.reply.send(Ok(None));
            continue;
        };
        let judge = &request.judge;
        let Some(verdict) = crate::batch::run_judge(|| judge(&challenge), "code check") else {
            let _ = request.reply.send(Err(crate::batch::judge_panicked()));
            continue;
        };
        if let Verdict::Leave(_) = verdict {
            let _ = request.reply.send(Ok(Some(Settled { challenge, verdict })));
            continue;
        }
        judged.push(Judged {
            request,
            challenge,
            verdict,
        });
    }
    if !judged.is_empty() {
        match store.carry_out(&judged).await {
            Ok(changed) => {
                for Judged {
                    request,
                    challenge,
                    verdict,
                } in judged
                {
                    if changed.contains(request.id.as_str()) {
                        let _ = request.reply.send(Ok(Some(Settled { challenge, verdict })));
                    } else {
                        settle_alone(request);
                    }
                }
            }
            Err(e) => judged.into_iter().for_each(|j| j.request.fail(&e)),
        }
    }
    for request in repeats {
        settle_alone(request);
    }
}

/// Settles one check on its own task, as a store without batches would.
fn settle_alone(request: SettleRequest) {
    tokio::spawn(settle_one(request));
}

/// Settles one check by itself: read, judge, conditional change.
async fn settle_one(request: SettleRequest) {
    let SettleRequest {
        store,
        tenant,
        id,
        judge,
        reply,
    } = request;
    let _ = reply.send(settle_by_read_and_write(&store, &tenant, &id, &judge).await);
}

/// Every consume and every counted failure of a batch, with their audit rows, in one statement.
/// Each change is conditional as in the single-check statements (`CONSUME_WITH_AUDIT` and
/// `record_failed_check`); the audit rows of a check are written only if its change was, and
/// the ids that changed come back.
pub(crate) static CARRY_OUT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH checks AS ( \
         SELECT * FROM UNNEST($10::text[], $11::int8[], $12::bool[], $13::int8[]) \
         AS c(id, attempts, consume, at)), \
     changed AS ( \
         UPDATE challenges ch SET \
             status = CASE WHEN c.consume THEN 'approved' \
                 WHEN ch.attempts + 1 >= ch.max_attempts THEN 'max_attempts_reached' \
                 ELSE ch.status END, \
             attempts = CASE WHEN c.consume THEN ch.attempts ELSE ch.attempts + 1 END, \
             resolved_at = CASE WHEN c.consume OR ch.attempts + 1 >= ch.max_attempts \
                 THEN c.at ELSE ch.resolved_at END \
         FROM checks c \
         WHERE ch.id = c.id AND ch.attempts = c.attempts AND ch.status = 'pending' \
         AND ch.expires_at > c.at \
         RETURNING ch.id), \
     audit AS ({}) \
     SELECT id FROM changed",
        tagged_audit_insert(
            "$14::text[]",
            "challenge",
            "e.challenge IN (SELECT id FROM changed)"
        )
    )
});

/// One conditional change of a challenge, as [`CARRY_OUT`] makes it: consumed, or one wrong
/// attempt counted, if its attempts are still `attempts`.
pub(crate) struct ChallengeChange<'a> {
    pub id: &'a str,
    pub attempts: u32,
    pub consume: bool,
    pub now: OffsetDateTime,
    pub audit: &'a [AuditEvent],
}

impl PgStore {
    /// Carries out the judged checks; answers the ids whose change was made.
    async fn carry_out(&self, judged: &[Judged]) -> StoreResult<HashSet<String>> {
        let mut changes: Vec<ChallengeChange<'_>> = judged
            .iter()
            .filter_map(|j| {
                let (consume, now, audit) = match &j.verdict {
                    Verdict::Consume { now, audit } => (true, now, audit),
                    Verdict::CountFailure { now, audit } => (false, now, audit),
                    Verdict::Leave(_) => return None,
                };
                Some(ChallengeChange {
                    id: j.challenge.id.as_str(),
                    attempts: j.challenge.attempts,
                    consume,
                    now: *now,
                    audit,
                })
            })
            .collect();
        self.change_challenges(&mut changes).await
    }

    /// Makes these changes (each challenge at most once) in one statement; answers the ids of
    /// the challenges changed. The statement locks the rows in the order it is given them, so
    /// they are sorted by id first: two batches in flight that share challenges then wait for
    /// each other instead of deadlocking.
    pub(crate) async fn change_challenges(
        &self,
        changes: &mut [ChallengeChange<'_>],
    ) -> StoreResult<HashSet<String>> {
        changes.sort_unstable_by(|a, b| a.id.cmp(b.id));
        let audit: Vec<AuditEvent> = changes
            .iter()
            .flat_map(|c| c.audit.iter().cloned())
            .collect();
        let audit_of: Vec<&str> = changes
            .iter()
            .flat_map(|c| c.audit.iter().map(|_| c.id))
            .collect();
        let changed: Vec<String> =
            bind_audit(sqlx::query(AssertSqlSafe(CARRY_OUT.as_str())), &audit)
                .bind(changes.iter().map(|c| c.id).collect::<Vec<_>>())
                .bind(
                    changes
                        .iter()
                        .map(|c| i64::from(c.attempts))
                        .collect::<Vec<_>>(),
                )
                .bind(changes.iter().map(|c| c.consume).collect::<Vec<_>>())
                .bind(changes.iter().map(|c| ms(c.now)).collect::<Vec<_>>())
                .bind(audit_of)
                .fetch_all(self.pool())
                .await
                .map_err(db)?
                .iter()
                .map(|row| sqlx::Row::try_get(row, 0))
                .collect::<Result<_, _>>()
                .map_err(db)?;
        Ok(changed.into_iter().collect())
    }
}
