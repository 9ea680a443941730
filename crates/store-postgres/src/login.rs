//! Code logins settled and completed in batches. Completing a login is one statement (consume
//! the challenge, spend the ticket, clear the failed-login count, insert the session, write the
//! audit rows); the logins that arrive together share it here, arrays bound per column, so
//! PostgreSQL starts, plans and commits one statement for all of them.
//!
//! A login's second step ([`Store::settle_login`]) is settled here whole: one batch reads the
//! tickets with their users and challenges (one `ANY` statement), the core's judge decides each,
//! and the right codes are completed by one more statement, on the same task. Before, the read
//! and the completion were two queues of their own, and each login waited for, and was woken
//! by, both.
//!
//! Every change stays conditional exactly as in the single statement (`CODE_LOGIN`): a login
//! whose challenge or ticket changed under it gets `false` (a settled one `Leave`), and the core
//! reads again and decides, as without the batch. A ticket or challenge asked twice in one
//! batch, and every login of a batch whose statement failed, is completed alone, so one login's
//! fault fails only itself.
//!
//! [`Store::settle_login`]: otpgate_core::store::Store::settle_login

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use otpgate_core::model::{AuditEvent, User};
use otpgate_core::store::{
    LoginCompletion, LoginContext, LoginJudge, LoginVerdict, SettledLogin, Store, StoreResult,
    settle_login_by_read_and_write,
};
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

/// One caller's login step, waiting for its batch to be read, judged and completed.
pub(crate) struct SettleLoginRequest {
    /// The store to settle in.
    pub store: PgStore,
    pub ticket: [u8; 32],
    pub judge: LoginJudge,
    pub reply: oneshot::Sender<StoreResult<Option<SettledLogin>>>,
}

crate::batch::answered_through_reply!(LoginRequest, SettleLoginRequest);

/// The ticket of a completion that [`CODE_LOGINS`] can carry out: a right SMS or e-mail code
/// for a login ticket (no authenticator step, recovery code or contact to mark).
pub(crate) fn code_login_ticket(done: &LoginCompletion) -> Option<[u8; 32]> {
    done.ticket_hash.filter(|_| {
        done.recovery_code.is_none() && done.totp_step.is_none() && done.verified.is_none()
    })
}

/// Starts the batchers of completions; they go into the returned queue.
pub(crate) fn start(max_wait: Duration) -> crate::batch::Queue<LoginRequest> {
    crate::batch::start(
        Arc::new(|batch| Box::pin(complete_batch(batch))),
        Some(Arc::new(|request| Box::pin(complete_one(request)))),
        max_wait,
    )
}

/// Starts the batchers of login steps; they go into the returned queue. A step that arrives
/// alone takes the same path: its read is the batch read (whose plan PostgreSQL keeps), and a
/// lone completion is the single statement.
pub(crate) fn start_settles(max_wait: Duration) -> crate::batch::Queue<SettleLoginRequest> {
    crate::batch::start(
        Arc::new(|batch| Box::pin(settle_batch(batch))),
        None,
        max_wait,
    )
}

/// A completion with its ticket, to be carried out with others, and how its outcome is
/// answered.
trait Completing: Send + Sized + 'static {
    fn completion(&self) -> (&LoginCompletion, [u8; 32]);
    /// Whether the account's failed-login count and lock are to be cleared: false only for
    /// an account this login has just read with neither.
    fn reset_failures(&self) -> bool {
        true
    }
    fn answer(self, outcome: StoreResult<bool>);
}

/// One login of [`CODE_LOGINS`]: its completion, its ticket, and whether to clear the account's
/// failures ([`Completing::reset_failures`]).
pub(crate) struct CodeLogin<'a> {
    pub done: &'a LoginCompletion,
    pub ticket: [u8; 32],
    pub reset_failures: bool,
}

impl Completing for LoginRequest {
    fn completion(&self) -> (&LoginCompletion, [u8; 32]) {
        (&self.done, self.ticket)
    }
    fn answer(self, outcome: StoreResult<bool>) {
        let _ = self.reply.send(outcome);
    }
}

/// A login step the core judged right: its rows as read, and the completion to carry out.
struct JudgedLogin {
    request: SettleLoginRequest,
    context: LoginContext,
    done: Box<LoginCompletion>,
    ticket: [u8; 32],
}

impl Completing for JudgedLogin {
    fn completion(&self) -> (&LoginCompletion, [u8; 32]) {
        (&self.done, self.ticket)
    }
    /// The judge saw the account a moment ago. Read clean, its reset is skipped (an index
    /// search of the account a login): a failure counted since, by a concurrent wrong code,
    /// stays counted, as if it had come just after this login, which is the stricter outcome.
    fn reset_failures(&self) -> bool {
        has_failures(self.context.user.as_ref())
    }
    fn answer(self, outcome: StoreResult<bool>) {
        answer_settled(self.request, self.context, self.done, outcome);
    }
}

/// Whether an account as read has failures to clear (or was not read, and may have).
fn has_failures(user: Option<&User>) -> bool {
    user.is_none_or(|u| u.failed_logins != 0 || u.locked_until.is_some())
}

/// Answers a login step whose completion was tried. One whose conditions no longer held
/// changed nothing: the caller decides again on the rows it was shown, as after
/// [`settle_login_by_read_and_write`].
fn answer_settled(
    request: SettleLoginRequest,
    context: LoginContext,
    done: Box<LoginCompletion>,
    outcome: StoreResult<bool>,
) {
    let settled = outcome.map(|completed| {
        Some(SettledLogin {
            context,
            verdict: if completed {
                LoginVerdict::Complete(done)
            } else {
                LoginVerdict::Leave
            },
        })
    });
    let _ = request.reply.send(settled);
}

async fn complete_batch(batch: Vec<LoginRequest>) {
    let Some(store) = batch.first().map(|r| r.store.clone()) else {
        return;
    };
    complete_together(&store, batch).await;
}

/// Carries out these completions: each ticket and challenge once in one statement, the rest
/// (and all of them, if that statement fails) each alone.
async fn complete_together<C: Completing>(store: &PgStore, batch: Vec<C>) {
    let (mut tickets, mut challenges) = (HashSet::new(), HashSet::new());
    let (mut batch, repeats): (Vec<_>, Vec<_>) = batch.into_iter().partition(|c| {
        let (done, ticket) = c.completion();
        let new_ticket = tickets.insert(ticket);
        let new_challenge = challenges.insert(done.challenge_id.clone());
        new_ticket && new_challenge
    });
    // The statement locks challenges, then tickets, then accounts, each in this order: two
    // batches in flight that share rows wait for each other instead of deadlocking.
    batch.sort_unstable_by(|a, b| {
        let (a, b) = (a.completion().0, b.completion().0);
        (a.user_id.as_str(), a.challenge_id.as_str())
            .cmp(&(b.user_id.as_str(), b.challenge_id.as_str()))
    });
    if batch.len() == 1 {
        // One login: the single statement, whose plan PostgreSQL keeps (a batch statement is
        // planned afresh for each call).
        batch.into_iter().for_each(|c| complete_alone(store, c));
    } else if !batch.is_empty() {
        let logins: Vec<_> = batch
            .iter()
            .map(|c| {
                let (done, ticket) = c.completion();
                CodeLogin {
                    done,
                    ticket,
                    reset_failures: c.reset_failures(),
                }
            })
            .collect();
        match store.complete_code_logins(&logins).await {
            Ok(spent) => {
                for c in batch {
                    let spent = spent.contains(&c.completion().1);
                    c.answer(Ok(spent));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "a batch of logins failed; completing each alone");
                batch.into_iter().for_each(|c| complete_alone(store, c));
            }
        }
    }
    repeats.into_iter().for_each(|c| complete_alone(store, c));
}

/// Completes one login with its own statement, on its own task.
fn complete_alone<C: Completing>(store: &PgStore, c: C) {
    let store = store.clone();
    tokio::spawn(async move {
        let outcome = {
            let (done, ticket) = c.completion();
            store.complete_code_login(done, &ticket).await
        };
        c.answer(outcome);
    });
}

/// Completes one login with its own statement.
async fn complete_one(request: LoginRequest) {
    let outcome = {
        let (done, ticket) = request.completion();
        request.store.complete_code_login(done, &ticket).await
    };
    request.answer(outcome);
}

/// Reads the batch's tickets with their users and challenges, lets each step's judge decide,
/// and completes the right codes together.
async fn settle_batch(batch: Vec<SettleLoginRequest>) {
    let Some(store) = batch.first().map(|r| r.store.clone()) else {
        return;
    };
    let Some((batch, repeats, mut contexts)) = crate::batch::read_distinct(
        batch,
        |r| r.ticket,
        |hashes| crate::store::fetch_login_contexts(store.clone(), hashes),
    )
    .await
    else {
        return;
    };
    let mut judged = Vec::new();
    for request in batch {
        let Some(context) = contexts.remove(&request.ticket) else {
            let _ = request.reply.send(Ok(None));
            continue;
        };
        let judge = &request.judge;
        let Some(verdict) = crate::batch::run_judge(|| judge(&context), "login") else {
            let _ = request.reply.send(Err(crate::batch::judge_panicked()));
            continue;
        };
        match verdict {
            LoginVerdict::Complete(done) => match code_login_ticket(&done) {
                Some(ticket) => judged.push(JudgedLogin {
                    request,
                    context,
                    done,
                    ticket,
                }),
                // Nothing the batch statement carries out: the store's general completion.
                None => {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let outcome = Store::complete_login(&store, &done).await;
                        answer_settled(request, context, done, outcome);
                    });
                }
            },
            LoginVerdict::Leave => {
                let _ = request.reply.send(Ok(Some(SettledLogin {
                    context,
                    verdict: LoginVerdict::Leave,
                })));
            }
        }
    }
    complete_together(&store, judged).await;
    // A second step with the same ticket is read after the first's batch, as it would be
    // after a concurrent step's write.
    for SettleLoginRequest {
        store,
        ticket,
        judge,
        reply,
    } in repeats
    {
        tokio::spawn(async move {
            let _ = reply.send(settle_login_by_read_and_write(&store, &ticket, &judge).await);
        });
    }
}

/// `CODE_LOGIN` for many logins: the same conditions, each login's row of `logins` standing for
/// that statement's parameters; the hashes of the tickets spent come back.
///
/// The ticket is searched for once: the challenge's update joins it (unused, unexpired) and
/// returns its row's address, and `spent` updates the row there (a TID scan, where it searched
/// the key again: one index search of five a login, by `pg_stat_user_tables`). Only another
/// completion of the same login changes a ticket, and it must consume the same challenge, which
/// this statement has just locked (one that changed the ticket first ends in a deadlock that
/// PostgreSQL breaks, as before). Should the row have changed all the same, its new version no
/// longer has that address and the login is not spent: its challenge stays consumed, the login
/// answers `false`, and the core reads again, as after any lost race.
pub(crate) static CODE_LOGINS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH logins AS ( \
         SELECT * FROM UNNEST($10::text[], $11::text[], $12::int8[], $13::text[], $14::int8[], \
             $15::bytea[], $16::bytea[], $17::int8[], $18::int8[], $20::bool[]) \
         AS l(tenant_id, user_id, at, challenge_id, attempts, ticket, session_hash, \
             created_at, expires_at, reset)), \
     consumed AS ( \
         UPDATE challenges c SET status = 'approved', resolved_at = l.at \
         FROM logins l JOIN login_tickets t \
             ON t.hash = l.ticket AND t.used_at IS NULL AND t.expires_at > l.at \
         WHERE c.id = l.challenge_id AND c.attempts = l.attempts AND c.status = 'pending' \
         AND c.expires_at > l.at \
         RETURNING t.ctid AS ticket_row, l.at), \
     spent AS ( \
         UPDATE login_tickets t SET used_at = k.at \
         FROM consumed k \
         WHERE t.ctid = k.ticket_row AND t.used_at IS NULL AND t.expires_at > k.at \
         RETURNING t.hash), \
     reset AS ( \
         UPDATE users u SET failed_logins = 0, locked_until = NULL \
         FROM logins l \
         WHERE u.id = l.user_id \
         AND l.reset AND (u.failed_logins <> 0 OR u.locked_until IS NOT NULL) \
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
        logins: &[CodeLogin<'_>],
    ) -> StoreResult<HashSet<[u8; 32]>> {
        let mut audit: Vec<AuditEvent> = Vec::new();
        let mut audit_of: Vec<Vec<u8>> = Vec::new();
        let mut columns = LoginColumns::default();
        for CodeLogin {
            done,
            ticket,
            reset_failures,
        } in logins
        {
            let session = done.session.as_ref();
            columns.tenant.push(done.tenant_id.as_str());
            columns.user.push(done.user_id.as_str());
            columns.at.push(ms(done.now));
            columns.challenge.push(done.challenge_id.as_str());
            columns.attempts.push(i64::from(done.expected_attempts));
            columns.ticket.push(ticket.to_vec());
            columns.session.push(session.map(|s| s.hash.to_vec()));
            columns.created.push(session.map(|s| ms(s.created_at)));
            columns.expires.push(session.map(|s| ms(s.expires_at)));
            columns.reset.push(*reset_failures);
            audit.extend(done.audit.iter().cloned());
            audit_of.extend(done.audit.iter().map(|_| ticket.to_vec()));
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
            .bind(columns.reset)
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
    reset: Vec<bool>,
}

#[cfg(test)]
mod tests {
    use otpgate_core::StoreError;
    use otpgate_core::model::{Challenge, Session};
    use otpgate_core::store::{Contact, LoginCompletion, LoginJudge, LoginVerdict, Store};
    use otpgate_store_testkit::contract;
    use time::Duration;

    use super::*;
    use crate::testing::fixtures::{fresh_store, pending_logins, ticket_hash};

    /// A judge that completes the login it is shown with a session of hash `[session; 32]`,
    /// marking the phone verified when `verify` (which the batch statement cannot do).
    fn completing(challenge: &Challenge, session: u8, verify: bool) -> LoginJudge {
        let challenge_id = challenge.id.clone();
        Arc::new(move |found: &LoginContext| {
            let (Some(user), Some(challenge)) = (&found.user, &found.challenge) else {
                return LoginVerdict::Leave;
            };
            assert_eq!(challenge.id, challenge_id, "shown another login's rows");
            let now = contract::t0();
            LoginVerdict::Complete(Box::new(LoginCompletion {
                tenant_id: user.tenant_id.clone(),
                user_id: user.id.clone(),
                ticket_hash: Some(found.ticket.hash),
                challenge_id: challenge.id.clone(),
                expected_attempts: challenge.attempts,
                totp_step: None,
                recovery_code: None,
                verified: verify.then_some(Contact::Phone),
                session: Some(Session {
                    hash: [session; 32],
                    tenant_id: user.tenant_id.clone(),
                    user_id: user.id.clone(),
                    created_at: now,
                    expires_at: now + Duration::hours(10),
                    revoked_at: None,
                }),
                now,
                audit: Vec::new(),
            }))
        })
    }

    #[test]
    fn only_an_account_read_clean_skips_the_reset() {
        let tenant = otpgate_core::model::Tenant {
            id: otpgate_core::model::TenantId::generate().unwrap(),
            name: "reset".into(),
            is_default: false,
            settings: Default::default(),
            created_at: contract::t0(),
        };
        let clean = contract::user(&tenant, "ali");
        assert!(!has_failures(Some(&clean)));
        let failed = User {
            failed_logins: 1,
            ..clean.clone()
        };
        let locked = User {
            locked_until: Some(contract::t0()),
            ..clean
        };
        assert!(has_failures(Some(&failed)));
        assert!(has_failures(Some(&locked)));
        assert!(has_failures(None));
    }

    /// The account's failed-login count, set to `n` when `Some`.
    async fn failures(store: &PgStore, challenge: &Challenge, n: Option<i64>) -> u32 {
        let user = challenge.user_id.clone().unwrap();
        if let Some(n) = n {
            sqlx::query("UPDATE users SET failed_logins = $1 WHERE id = $2")
                .bind(n)
                .bind(user.as_str())
                .execute(store.pool())
                .await
                .unwrap();
        }
        let user = store.get_user(&challenge.tenant_id, &user).await.unwrap();
        user.unwrap().failed_logins
    }

    #[tokio::test]
    async fn a_batch_clears_the_failures_of_an_account_read_with_them_and_only_then() {
        // Arrange: four pending logins of one user, who has two failed logins.
        let Some((_db, store)) = fresh_store().await else {
            return;
        };
        let challenges = pending_logins(&store, 4).await;
        assert_eq!(failures(&store, &challenges[0], Some(2)).await, 2);
        // Act: two steps judged together (one batch statement) on the account read with its
        // failures.
        let tickets: Vec<[u8; 32]> = (0..4).map(ticket_hash).collect();
        let (first, second) = tokio::join!(
            store.settle_login(&tickets[0], completing(&challenges[0], 10, false)),
            store.settle_login(&tickets[1], completing(&challenges[1], 11, false)),
        );
        // Assert: both completed and the count is cleared.
        for settled in [first, second] {
            let verdict = settled.unwrap().unwrap().verdict;
            assert!(matches!(verdict, LoginVerdict::Complete(_)));
        }
        assert_eq!(failures(&store, &challenges[0], None).await, 0);
        // A batch told the account was read clean leaves a count it finds (one counted since
        // the read); told otherwise, it clears it.
        assert_eq!(failures(&store, &challenges[0], Some(1)).await, 1);
        let user_id = challenges[0].user_id.clone().unwrap();
        let user = store.get_user(&challenges[0].tenant_id, &user_id).await;
        let user = user.unwrap().unwrap();
        let completions: Vec<LoginCompletion> = (2..4)
            .map(|i| {
                let judge = completing(&challenges[i], 20 + i as u8, false);
                let context = LoginContext {
                    ticket: otpgate_core::model::LoginTicket {
                        hash: tickets[i],
                        tenant_id: challenges[i].tenant_id.clone(),
                        user_id: challenges[i].user_id.clone().unwrap(),
                        challenge_id: challenges[i].id.clone(),
                        channel: otpgate_core::model::Channel::Sms,
                        created_at: challenges[i].created_at,
                        expires_at: challenges[i].expires_at,
                        used_at: None,
                    },
                    user: Some(user.clone()),
                    challenge: Some(challenges[i].clone()),
                };
                match judge(&context) {
                    LoginVerdict::Complete(done) => *done,
                    LoginVerdict::Leave => panic!("not completed"),
                }
            })
            .collect();
        let clean_read = [CodeLogin {
            done: &completions[0],
            ticket: tickets[2],
            reset_failures: false,
        }];
        assert_eq!(
            store.complete_code_logins(&clean_read).await.unwrap().len(),
            1
        );
        assert_eq!(failures(&store, &challenges[0], None).await, 1);
        let failed_read = [CodeLogin {
            done: &completions[1],
            ticket: tickets[3],
            reset_failures: true,
        }];
        assert_eq!(
            store
                .complete_code_logins(&failed_read)
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(failures(&store, &challenges[0], None).await, 0);
    }

    #[tokio::test]
    async fn a_batch_of_login_steps_survives_a_panicking_judge_and_completes_the_rest() {
        // Arrange: four pending logins of one user; their steps are queued together (this
        // runtime has one thread, so the batcher runs only once all four are in its queue).
        let Some((_db, store)) = fresh_store().await else {
            return;
        };
        let challenges = pending_logins(&store, 4).await;
        let panicking: LoginJudge = Arc::new(|_: &LoginContext| panic!("a judge's bug"));
        let leaving: LoginJudge = Arc::new(|_: &LoginContext| LoginVerdict::Leave);
        let tickets: Vec<[u8; 32]> = (0..4).map(ticket_hash).collect();
        // Act
        let (right, broken, verifying, wrong) = tokio::join!(
            store.settle_login(&tickets[0], completing(&challenges[0], 10, false)),
            store.settle_login(&tickets[1], panicking),
            store.settle_login(&tickets[2], completing(&challenges[2], 12, true)),
            store.settle_login(&tickets[3], leaving),
        );
        // Assert: the panic failed its own step only; the code login went through the batch
        // statement and the one marking a contact through the general completion.
        assert!(matches!(broken, Err(StoreError::Other(_))), "{broken:?}");
        for (settled, session) in [(right, 10), (verifying, 12)] {
            let settled = settled.unwrap().unwrap();
            assert!(matches!(settled.verdict, LoginVerdict::Complete(_)));
            assert!(store.get_session(&[session; 32]).await.unwrap().is_some());
        }
        let wrong = wrong.unwrap().unwrap();
        assert!(matches!(wrong.verdict, LoginVerdict::Leave));
        for (i, spent) in [(0, true), (1, false), (2, true), (3, false)] {
            let ticket = store.get_login_ticket(&ticket_hash(i)).await.unwrap();
            assert_eq!(ticket.unwrap().used_at.is_some(), spent, "ticket {i}");
        }
        let user = challenges[2].user_id.clone().unwrap();
        let user = store.get_user(&challenges[2].tenant_id, &user).await;
        assert!(user.unwrap().unwrap().mobile_verified_at.is_some());
        // A step of a ticket that is spent now is shown its rows and changes nothing.
        let again = store
            .settle_login(&ticket_hash(0), completing(&challenges[0], 13, false))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(again.verdict, LoginVerdict::Leave));
        assert!(store.get_session(&[13; 32]).await.unwrap().is_none());
    }
}
