//! The store contract: every method's rules, run against each back-end. The `service_*` cases
//! drive the core's service over the store, for the properties that span both (single use under
//! concurrency, attempt limits, replay).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration;

use otpgate_core::clock::Clock;
use otpgate_core::crypto::MasterKey;
use otpgate_core::model::{
    ApiKey, ApiKeyId, AuditEvent, AuditKind, Challenge, ChallengeId, ChallengeStatus, Channel,
    DeliveryStatus, Device, FactorId, JwtKey, KeyId, LoginTicket, MessageId, OutboxMessage,
    Purpose, RequestContext, Role, Session, Tenant, TenantId, TotpFactor, User, UserId,
};
use otpgate_core::otp::TotpParams;
use otpgate_core::password::PasswordHasher;
use otpgate_core::policy::Policy;
use otpgate_core::service::{NewUser, StartVerification};
use otpgate_core::store::{
    ChallengeJudge, CodeReplacement, Contact, LoginCompletion, LoginContext, LoginJudge,
    LoginVerdict, PhoneCompletion, RangeOutcomes, SealedKind, SendScope, Store, Verdict,
};
use otpgate_core::{Otpgate, StoreError};
use secrecy::SecretString;
use time::OffsetDateTime;

use crate::FakeClock;

/// Generates one `#[tokio::test]` per contract case; `$make` is an async expression giving a
/// fresh `Some((Arc<dyn Store>, guard))` for each test, the guard (a temp dir, a database) kept
/// alive until the test ends, or `None` when the back-end is not configured on this machine (the
/// test then passes as skipped; CI configures every back-end).
#[macro_export]
macro_rules! store_contract_tests {
    ($make:expr) => {
        $crate::store_contract_tests!(@cases $make;
            tenants_are_unique_by_name_and_found_by_id,
            the_default_tenant_is_created_once,
            tenant_settings_are_stored_and_replaced,
            usernames_are_unique_per_tenant_only,
            api_keys_are_found_by_hash,
            a_challenge_is_consumed_at_most_once,
            a_stale_attempt_count_cannot_consume,
            an_expired_challenge_can_be_neither_consumed_nor_failed,
            the_last_allowed_failure_kills_the_challenge,
            only_pending_challenges_can_be_canceled,
            a_resend_wins_only_against_the_send_count_it_saw,
            challenges_are_isolated_by_tenant,
            fifty_concurrent_consumes_give_exactly_one_success,
            a_settled_check_sees_the_challenge_and_changes_it_once,
            concurrent_checks_of_many_challenges_each_settle_once,
            concurrent_reads_each_get_their_own_row,
            a_login_context_holds_the_tickets_own_user_and_challenge,
            concurrent_settled_logins_complete_each_ticket_once,
            concurrent_new_challenges_are_each_stored_once,
            a_failed_login_completion_changes_nothing,
            a_login_completion_spends_ticket_challenge_and_step,
            concurrent_login_completions_each_complete_once,
            totp_steps_only_move_forward,
            sessions_are_revoked_once,
            outbox_claims_are_leases_and_delivery_erases_the_code,
            concurrent_sent_marks_each_mark_their_own_message,
            sends_are_counted_per_destination,
            sends_in_several_windows_are_each_windows_own_count,
            concurrent_send_reads_of_many_numbers_are_each_numbers_own,
            sms_range_outcomes_count_only_settled_codes_of_the_range,
            sealed_secrets_are_listed_and_resealed_all_or_nothing,
            login_failures_count_up_and_locks_never_shorten,
            concurrent_wrong_codes_and_failed_logins_are_each_counted_once,
            audit_events_are_listed_newest_first,
            the_sweeper_deletes_only_what_can_no_longer_matter,
            every_hot_and_sweep_statement_goes_through_an_index,
            challenges_are_inserted_in_bulk,
            recovery_codes_are_replaced_counted_and_spent_once,
            removing_totp_takes_factors_and_recovery_codes,
            service_recovery_codes_log_in_once,
            a_phone_verification_finds_or_creates_one_user_per_phone_and_type,
            concurrent_phone_verifications_of_a_new_number_make_one_user,
            jwt_keys_rotate_and_retiring_keys_verify_until_their_time,
            jtis_and_api_keys_are_revoked_once,
            service_fifty_concurrent_right_codes_approve_once,
            service_wrong_codes_kill_the_verification_after_five,
            service_malformed_codes_touch_no_counter,
            service_two_step_login_issues_one_session,
            service_a_session_stored_under_its_plain_hash_still_opens,
            service_a_locked_accounts_right_code_is_refused_and_counted,
            service_totp_codes_work_once,
            service_the_code_checks_futures_stay_small,
        );
    };
    (@cases $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let Some((store, _guard)) = $make.await else {
                    eprintln!("skipped: back-end not configured");
                    return;
                };
                let store: std::sync::Arc<dyn otpgate_core::store::Store> = store;
                $crate::contract::$name(store).await;
            }
        )*
    };
}

/// The moment the fixtures are written at (the [`FakeClock`]'s start).
pub fn t0() -> OffsetDateTime {
    FakeClock::new().now()
}

fn ctx() -> RequestContext {
    RequestContext {
        ip: Some("127.0.0.1".into()),
        mode: Some("test".into()),
        ..RequestContext::default()
    }
}

async fn tenant(store: &Arc<dyn Store>, name: &str) -> Tenant {
    let t = Tenant {
        id: TenantId::generate().unwrap(),
        name: name.into(),
        is_default: false,
        settings: Default::default(),
        created_at: t0(),
    };
    store.insert_tenant(&t).await.unwrap();
    t
}

/// A user of `tenant` without failures or verified contacts.
pub fn user(tenant: &Tenant, name: &str) -> User {
    User {
        id: UserId::generate().unwrap(),
        tenant_id: tenant.id.clone(),
        username: otpgate_core::identity::Username::parse(name).unwrap(),
        email: Some(otpgate_core::identity::Email::parse("ali@example.com").unwrap()),
        phone: Some(otpgate_core::identity::E164Phone::parse("+989121234567").unwrap()),
        role: Role::User,
        user_type: None,
        password_hash: "$argon2id$not-a-real-hash".into(),
        mobile_verified_at: None,
        email_verified_at: None,
        failed_logins: 0,
        locked_until: None,
        created_at: t0(),
    }
}

/// A pending SMS code of `tenant` to `destination`, sent at [`t0`], live for five minutes.
pub fn challenge(tenant: &Tenant, destination: &str) -> Challenge {
    Challenge {
        id: ChallengeId::generate().unwrap(),
        tenant_id: tenant.id.clone(),
        user_id: None,
        purpose: Purpose::Verify,
        channel: Channel::Sms,
        destination: destination.into(),
        code_hash: vec![1; 32],
        locale: "en".into(),
        created_at: t0(),
        expires_at: t0() + Duration::from_secs(300),
        last_sent_at: t0(),
        send_count: 1,
        attempts: 0,
        max_attempts: 5,
        status: ChallengeStatus::Pending,
    }
}

fn message(ch: &Challenge, at: OffsetDateTime) -> OutboxMessage {
    OutboxMessage {
        id: MessageId::generate().unwrap(),
        tenant_id: ch.tenant_id.clone(),
        challenge_id: Some(ch.id.clone()),
        channel: ch.channel,
        destination: ch.destination.clone(),
        purpose: ch.purpose,
        locale: "en".into(),
        body: Some("Your code is 123456".into()),
        code: Some("123456".into()),
        status: DeliveryStatus::Queued,
        attempts: 0,
        next_attempt_at: at,
        created_at: at,
        provider_message_id: None,
        last_error: None,
        client_ip: Some("203.0.113.7".into()),
        user_id: ch.user_id.clone(),
    }
}

fn event(tenant: &Tenant, kind: AuditKind, detail: &str) -> AuditEvent {
    AuditEvent {
        tenant_id: tenant.id.clone(),
        user_id: None,
        kind,
        detail: detail.into(),
        context: ctx(),
        at: t0(),
    }
}

async fn stored(store: &Arc<dyn Store>, ch: &Challenge) -> Challenge {
    store
        .get_challenge(&ch.tenant_id, &ch.id)
        .await
        .unwrap()
        .unwrap()
}

pub async fn tenants_are_unique_by_name_and_found_by_id(store: Arc<dyn Store>) {
    // Arrange
    let t = tenant(&store, "acme").await;
    // Act
    let again = Tenant {
        id: TenantId::generate().unwrap(),
        ..t.clone()
    };
    let dup = store.insert_tenant(&again).await;
    // Assert
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    let found = store.get_tenant(&t.id).await.unwrap().unwrap();
    assert_eq!(found.name, "acme");
    assert!(
        store
            .get_tenant(&TenantId::generate().unwrap())
            .await
            .unwrap()
            .is_none()
    );
}

pub async fn tenant_settings_are_stored_and_replaced(store: Arc<dyn Store>) {
    let t = tenant(&store, "settings").await;
    assert_eq!(
        store.get_tenant(&t.id).await.unwrap().unwrap().settings,
        Default::default()
    );
    let settings = otpgate_core::policy::PolicyOverrides {
        code_length: Some(8),
        product_name: Some("Acme".into()),
        ..Default::default()
    };
    assert!(store.set_tenant_settings(&t.id, &settings).await.unwrap());
    assert_eq!(
        store.get_tenant(&t.id).await.unwrap().unwrap().settings,
        settings
    );
    assert!(
        !store
            .set_tenant_settings(&TenantId::generate().unwrap(), &settings)
            .await
            .unwrap()
    );
}

pub async fn the_default_tenant_is_created_once(store: Arc<dyn Store>) {
    let make = || Tenant {
        id: TenantId::generate().unwrap(),
        name: "default".into(),
        is_default: true,
        settings: Default::default(),
        created_at: t0(),
    };
    let first = store.ensure_default_tenant(&make()).await.unwrap();
    let second = store.ensure_default_tenant(&make()).await.unwrap();
    assert_eq!(first.id, second.id);
    assert!(first.is_default);
}

pub async fn usernames_are_unique_per_tenant_only(store: Arc<dyn Store>) {
    let a = tenant(&store, "a").await;
    let b = tenant(&store, "b").await;
    store.insert_user(&user(&a, "ali"), &[]).await.unwrap();
    let dup = store.insert_user(&user(&a, "ali"), &[]).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    store.insert_user(&user(&b, "ali"), &[]).await.unwrap();
    let found = store
        .find_user_by_username(&a.id, "ali")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.tenant_id, a.id);
    assert_eq!(found.phone.unwrap().as_str(), "+989121234567");
    assert!(
        store
            .find_user_by_username(&a.id, "reza")
            .await
            .unwrap()
            .is_none()
    );
    // A failed insert left nothing behind.
    assert!(store.get_user(&a.id, &found.id).await.unwrap().is_some());
}

pub async fn api_keys_are_found_by_hash(store: Arc<dyn Store>) {
    let t = tenant(&store, "keys").await;
    let key = ApiKey {
        id: ApiKeyId::generate().unwrap(),
        tenant_id: t.id.clone(),
        name: "ci".into(),
        hash: [9; 32],
        created_at: t0(),
        revoked_at: None,
    };
    store
        .insert_api_key(&key, &[event(&t, AuditKind::ApiKeyCreated, "k")])
        .await
        .unwrap();
    assert_eq!(
        store
            .find_api_key(&[9; 32])
            .await
            .unwrap()
            .unwrap()
            .tenant_id,
        t.id
    );
    assert!(store.find_api_key(&[8; 32]).await.unwrap().is_none());
}

pub async fn a_challenge_is_consumed_at_most_once(store: Arc<dyn Store>) {
    let t = tenant(&store, "c").await;
    let ch = challenge(&t, "+989121234567");
    store
        .insert_challenge(&ch, Some(&message(&ch, t0())), &[])
        .await
        .unwrap();
    let now = t0() + Duration::from_secs(10);
    assert!(store.consume_challenge(&ch.id, 0, now, &[]).await.unwrap());
    assert!(!store.consume_challenge(&ch.id, 0, now, &[]).await.unwrap());
    assert_eq!(stored(&store, &ch).await.status, ChallengeStatus::Approved);
    assert!(
        !store
            .record_failed_check(&ch.id, 0, now, &[])
            .await
            .unwrap()
    );
}

pub async fn a_stale_attempt_count_cannot_consume(store: Arc<dyn Store>) {
    let t = tenant(&store, "c").await;
    let ch = challenge(&t, "+989121234567");
    store.insert_challenge(&ch, None, &[]).await.unwrap();
    let now = t0() + Duration::from_secs(10);
    assert!(
        store
            .record_failed_check(&ch.id, 0, now, &[])
            .await
            .unwrap()
    );
    assert!(!store.consume_challenge(&ch.id, 0, now, &[]).await.unwrap());
    assert!(
        !store
            .record_failed_check(&ch.id, 0, now, &[])
            .await
            .unwrap()
    );
    assert!(store.consume_challenge(&ch.id, 1, now, &[]).await.unwrap());
}

pub async fn an_expired_challenge_can_be_neither_consumed_nor_failed(store: Arc<dyn Store>) {
    let t = tenant(&store, "c").await;
    let ch = challenge(&t, "+989121234567");
    store.insert_challenge(&ch, None, &[]).await.unwrap();
    let late = ch.expires_at;
    assert!(!store.consume_challenge(&ch.id, 0, late, &[]).await.unwrap());
    assert!(
        !store
            .record_failed_check(&ch.id, 0, late, &[])
            .await
            .unwrap()
    );
    assert!(!store.cancel_challenge(&ch.id, late, &[]).await.unwrap());
    let s = stored(&store, &ch).await;
    assert_eq!(s.status_at(late), ChallengeStatus::Expired);
    assert!(
        store
            .find_pending_challenge(&t.id, "verify", &ch.destination, late)
            .await
            .unwrap()
            .is_none()
    );
}

pub async fn the_last_allowed_failure_kills_the_challenge(store: Arc<dyn Store>) {
    let t = tenant(&store, "c").await;
    let ch = challenge(&t, "+989121234567");
    store.insert_challenge(&ch, None, &[]).await.unwrap();
    let now = t0();
    let rejected = [event(&t, AuditKind::OtpRejected, "wrong code")];
    for n in 0..5 {
        assert!(
            store
                .record_failed_check(&ch.id, n, now, &rejected)
                .await
                .unwrap()
        );
    }
    let s = stored(&store, &ch).await;
    assert_eq!(s.attempts, 5);
    assert_eq!(s.status, ChallengeStatus::MaxAttemptsReached);
    assert!(!store.consume_challenge(&ch.id, 5, now, &[]).await.unwrap());
    assert!(
        !store
            .record_failed_check(&ch.id, 5, now, &rejected)
            .await
            .unwrap()
    );
    // A stale count is refused too; only the five counted failures left an event.
    assert!(
        !store
            .record_failed_check(&ch.id, 2, now, &rejected)
            .await
            .unwrap()
    );
    let events = store.list_audit(&t.id, None, 20).await.unwrap();
    assert_eq!(events.len(), 5);
}

pub async fn only_pending_challenges_can_be_canceled(store: Arc<dyn Store>) {
    let t = tenant(&store, "c").await;
    let ch = challenge(&t, "+989121234567");
    store.insert_challenge(&ch, None, &[]).await.unwrap();
    assert!(store.cancel_challenge(&ch.id, t0(), &[]).await.unwrap());
    assert!(!store.cancel_challenge(&ch.id, t0(), &[]).await.unwrap());
    assert_eq!(stored(&store, &ch).await.status, ChallengeStatus::Canceled);
    assert!(!store.consume_challenge(&ch.id, 0, t0(), &[]).await.unwrap());
}

pub async fn a_resend_wins_only_against_the_send_count_it_saw(store: Arc<dyn Store>) {
    let t = tenant(&store, "c").await;
    let ch = challenge(&t, "+989121234567");
    store
        .insert_challenge(&ch, Some(&message(&ch, t0())), &[])
        .await
        .unwrap();
    let later = t0() + Duration::from_secs(40);
    let expiry = later + Duration::from_secs(300);
    let replace = |hash: u8| CodeReplacement {
        id: ch.id.clone(),
        expected_sends: 1,
        code_hash: vec![hash; 32],
        sent_at: later,
        expires_at: expiry,
    };
    let won = store
        .resend_challenge(&replace(2), &message(&ch, later), &[])
        .await;
    assert!(won.unwrap());
    let lost = store
        .resend_challenge(&replace(3), &message(&ch, later), &[])
        .await;
    assert!(!lost.unwrap());
    let s = stored(&store, &ch).await;
    assert_eq!(s.send_count, 2);
    assert_eq!(s.code_hash, vec![2; 32]);
    assert_eq!(s.expires_at, expiry);
    // The losing resend queued nothing.
    assert_eq!(
        store
            .count_sends(
                &t.id,
                &SendScope::Destination(ch.destination.clone()),
                t0() - Duration::from_secs(1),
                100
            )
            .await
            .unwrap(),
        2
    );
}

pub async fn challenges_are_isolated_by_tenant(store: Arc<dyn Store>) {
    let a = tenant(&store, "a").await;
    let b = tenant(&store, "b").await;
    let ch = challenge(&a, "+989121234567");
    store
        .insert_challenge(&ch, Some(&message(&ch, t0())), &[])
        .await
        .unwrap();
    assert!(store.get_challenge(&b.id, &ch.id).await.unwrap().is_none());
    assert!(
        store
            .find_pending_challenge(&b.id, "verify", &ch.destination, t0())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store
            .count_sends(
                &b.id,
                &SendScope::Destination(ch.destination.clone()),
                t0() - Duration::from_secs(1),
                100
            )
            .await
            .unwrap(),
        0
    );
}

pub async fn fifty_concurrent_consumes_give_exactly_one_success(store: Arc<dyn Store>) {
    let t = tenant(&store, "c").await;
    let ch = challenge(&t, "+989121234567");
    store.insert_challenge(&ch, None, &[]).await.unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = Arc::clone(&store);
            let id = ch.id.clone();
            tokio::spawn(async move { store.consume_challenge(&id, 0, t0(), &[]).await.unwrap() })
        })
        .collect();
    let mut wins = 0;
    for task in tasks {
        wins += usize::from(task.await.unwrap());
    }
    assert_eq!(wins, 1);
}

/// A judge that counts a wrong code, or consumes, while the challenge is pending.
fn judge(consume: bool) -> ChallengeJudge {
    Arc::new(move |c: &Challenge| match c.status_at(t0()) {
        ChallengeStatus::Pending if consume => Verdict::Consume {
            now: t0(),
            audit: vec![],
        },
        ChallengeStatus::Pending => Verdict::CountFailure {
            now: t0(),
            audit: vec![],
        },
        other => Verdict::Leave(other),
    })
}

pub async fn a_settled_check_sees_the_challenge_and_changes_it_once(store: Arc<dyn Store>) {
    // Arrange
    let t = tenant(&store, "settle").await;
    let other = tenant(&store, "settle-other").await;
    let ch = challenge(&t, "+989121234567");
    store.insert_challenge(&ch, None, &[]).await.unwrap();
    // Unknown, or another tenant's: nothing to judge.
    let unknown = ChallengeId::generate().unwrap();
    assert!(
        store
            .settle_challenge(&t.id, &unknown, judge(true))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .settle_challenge(&other.id, &ch.id, judge(true))
            .await
            .unwrap()
            .is_none()
    );
    // A wrong code: the judge saw 0 attempts, the store counted one.
    let failed = store
        .settle_challenge(&t.id, &ch.id, judge(false))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failed.challenge.attempts, 0);
    assert!(matches!(failed.verdict, Verdict::CountFailure { .. }));
    // Act: twenty right codes at once.
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (store, tenant, id) = (Arc::clone(&store), t.id.clone(), ch.id.clone());
            tokio::spawn(async move { store.settle_challenge(&tenant, &id, judge(true)).await })
        })
        .collect();
    let mut consumed = 0;
    let mut left_approved = 0;
    for task in tasks {
        let settled = task.await.unwrap().unwrap().unwrap();
        match settled.verdict {
            Verdict::Consume { .. } => {
                assert_eq!(settled.challenge.attempts, 1, "judged a stale read");
                consumed += 1;
            }
            Verdict::Leave(ChallengeStatus::Approved) => left_approved += 1,
            other => panic!("unexpected verdict {other:?}"),
        }
    }
    // Assert: exactly one consumed it; every other one saw it approved.
    assert_eq!((consumed, left_approved), (1, 19));
    let stored = store.get_challenge(&t.id, &ch.id).await.unwrap().unwrap();
    assert_eq!(
        (stored.status, stored.attempts),
        (ChallengeStatus::Approved, 1)
    );
}

/// A judge that consumes or counts a failure, with one audit event naming the challenge.
fn audited_judge(tenant: &Tenant, consume: bool) -> ChallengeJudge {
    let tenant = tenant.clone();
    Arc::new(move |c: &Challenge| {
        let detail = format!("challenge {}", c.id);
        match c.status_at(t0()) {
            ChallengeStatus::Pending if consume => Verdict::Consume {
                now: t0(),
                audit: vec![event(&tenant, AuditKind::OtpAccepted, &detail)],
            },
            ChallengeStatus::Pending => Verdict::CountFailure {
                now: t0(),
                audit: vec![event(&tenant, AuditKind::OtpRejected, &detail)],
            },
            other => Verdict::Leave(other),
        }
    })
}

pub async fn concurrent_checks_of_many_challenges_each_settle_once(store: Arc<dyn Store>) {
    // Arrange: thirty challenges; ten get the right code, ten a wrong one, ten a wrong one at
    // their last attempt. Beside them, checks of another tenant's challenges and of unknown ids.
    let t = tenant(&store, "many").await;
    let other = tenant(&store, "many-other").await;
    let mut checks = Vec::new();
    for n in 0..30 {
        let mut ch = challenge(&t, &format!("+9891212{n:05}"));
        if n >= 20 {
            ch.attempts = ch.max_attempts - 1;
        }
        store.insert_challenge(&ch, None, &[]).await.unwrap();
        checks.push((t.id.clone(), ch, n < 10));
    }
    let foreign = challenge(&other, "+989121299999");
    store.insert_challenge(&foreign, None, &[]).await.unwrap();
    let strays: Vec<ChallengeId> = (0..5)
        .map(|n| {
            if n == 0 {
                foreign.id.clone()
            } else {
                ChallengeId::generate().unwrap()
            }
        })
        .collect();
    // Act: all at once.
    let tasks: Vec<_> = checks
        .iter()
        .map(|(tenant, ch, right)| {
            let (store, tenant, id) = (Arc::clone(&store), tenant.clone(), ch.id.clone());
            let judge = audited_judge(&t, *right);
            tokio::spawn(async move { store.settle_challenge(&tenant, &id, judge).await })
        })
        .collect();
    let stray_tasks: Vec<_> = strays
        .iter()
        .map(|id| {
            let (store, tenant, id) = (Arc::clone(&store), t.id.clone(), id.clone());
            tokio::spawn(async move { store.settle_challenge(&tenant, &id, judge(true)).await })
        })
        .collect();
    // Assert: every check got its own challenge's verdict, and the store holds exactly that.
    for ((_, ch, right), task) in checks.iter().zip(tasks) {
        let settled = task.await.unwrap().unwrap().unwrap();
        assert_eq!(settled.challenge.id, ch.id);
        assert_eq!(settled.challenge.attempts, ch.attempts);
        let now = stored(&store, ch).await;
        if *right {
            assert!(matches!(settled.verdict, Verdict::Consume { .. }));
            assert_eq!((now.status, now.attempts), (ChallengeStatus::Approved, 0));
        } else {
            assert!(matches!(settled.verdict, Verdict::CountFailure { .. }));
            let status = if ch.attempts + 1 >= ch.max_attempts {
                ChallengeStatus::MaxAttemptsReached
            } else {
                ChallengeStatus::Pending
            };
            assert_eq!((now.status, now.attempts), (status, ch.attempts + 1));
        }
    }
    for task in stray_tasks {
        assert!(task.await.unwrap().unwrap().is_none());
    }
    assert_eq!(
        stored(&store, &foreign).await.status,
        ChallengeStatus::Pending
    );
    // One audit event per check, each naming its own challenge with its own verdict.
    let events = store.list_audit(&t.id, None, 100).await.unwrap();
    assert_eq!(events.len(), 30);
    for (_, ch, right) in &checks {
        let kind = if *right {
            AuditKind::OtpAccepted
        } else {
            AuditKind::OtpRejected
        };
        let detail = format!("challenge {}", ch.id);
        assert_eq!(
            events
                .iter()
                .filter(|e| e.detail == detail && e.kind == kind)
                .count(),
            1,
            "{detail}"
        );
    }
}

pub async fn concurrent_reads_each_get_their_own_row(store: Arc<dyn Store>) {
    // Arrange: twenty users and their challenges, another tenant's user.
    let t = tenant(&store, "reads").await;
    let other = tenant(&store, "reads-other").await;
    let mut users = Vec::new();
    for n in 0..20 {
        let u = user(&t, &format!("reader{n}"));
        store.insert_user(&u, &[]).await.unwrap();
        let ch = challenge(&t, &format!("+9891213{n:05}"));
        store.insert_challenge(&ch, None, &[]).await.unwrap();
        users.push((u, ch));
    }
    let foreign = user(&other, "reader-other");
    store.insert_user(&foreign, &[]).await.unwrap();
    // Act: each user and challenge asked three times at once, beside unknown and foreign keys.
    let tasks: Vec<_> = (0..3)
        .flat_map(|_| users.iter())
        .map(|(u, ch)| {
            let (store, tenant, uid, cid) = (
                Arc::clone(&store),
                t.id.clone(),
                u.id.clone(),
                ch.id.clone(),
            );
            tokio::spawn(async move {
                let user = store.get_user(&tenant, &uid).await.unwrap();
                let challenge = store.get_challenge(&tenant, &cid).await.unwrap();
                (uid, cid, user, challenge)
            })
        })
        .collect();
    let strays: Vec<_> = (0..5)
        .map(|n| {
            let (store, tenant) = (Arc::clone(&store), t.id.clone());
            let id = if n == 0 {
                foreign.id.clone()
            } else {
                UserId::generate().unwrap()
            };
            tokio::spawn(async move { store.get_user(&tenant, &id).await.unwrap() })
        })
        .collect();
    // Assert
    for task in tasks {
        let (uid, cid, user, challenge) = task.await.unwrap();
        assert_eq!(user.map(|u| u.id), Some(uid));
        assert_eq!(challenge.map(|c| c.id), Some(cid));
    }
    for task in strays {
        assert!(task.await.unwrap().is_none());
    }
}

async fn login_fixture(store: &Arc<dyn Store>) -> (Tenant, User, Challenge, LoginTicket) {
    let t = tenant(store, "login").await;
    let u = user(&t, "ali");
    store.insert_user(&u, &[]).await.unwrap();
    let (ch, ticket) = pending_login(store, &u, "+989121234567", [5; 32]).await;
    (t, u, ch, ticket)
}

/// A pending SMS login of `u` (its challenge, message and ticket stored).
async fn pending_login(
    store: &Arc<dyn Store>,
    u: &User,
    destination: &str,
    hash: [u8; 32],
) -> (Challenge, LoginTicket) {
    let tenant = store.get_tenant(&u.tenant_id).await.unwrap().unwrap();
    let mut ch = challenge(&tenant, destination);
    ch.user_id = Some(u.id.clone());
    ch.purpose = Purpose::Login;
    let ticket = LoginTicket {
        hash,
        tenant_id: u.tenant_id.clone(),
        user_id: u.id.clone(),
        challenge_id: ch.id.clone(),
        channel: Channel::Sms,
        created_at: t0(),
        expires_at: t0() + Duration::from_secs(300),
        used_at: None,
    };
    store
        .insert_login_ticket(&ticket, &ch, Some(&message(&ch, t0())), &[])
        .await
        .unwrap();
    (ch, ticket)
}

fn completion(
    u: &User,
    ch: &Challenge,
    attempts: u32,
    totp: Option<(FactorId, i64)>,
) -> LoginCompletion {
    LoginCompletion {
        tenant_id: u.tenant_id.clone(),
        user_id: u.id.clone(),
        ticket_hash: Some([5; 32]),
        verified: None,
        challenge_id: ch.id.clone(),
        expected_attempts: attempts,
        totp_step: totp,
        recovery_code: None,
        session: Some(Session {
            hash: [6; 32],
            tenant_id: u.tenant_id.clone(),
            user_id: u.id.clone(),
            created_at: t0(),
            expires_at: t0() + Duration::from_secs(36_000),
            revoked_at: None,
        }),
        now: t0() + Duration::from_secs(5),
        audit: vec![],
    }
}

pub async fn concurrent_new_challenges_are_each_stored_once(store: Arc<dyn Store>) {
    // As a busy send endpoint inserts: each stored once with its message and event, and an
    // insert that breaks a constraint refused alone (a store that shares statements between
    // inserts must not let one fault take the others down).
    // Arrange: thirty challenges, two of every three with a message, each with an event; and
    // one id inserted twice at once.
    let t = tenant(&store, "inserts").await;
    let fresh: Vec<(Challenge, Option<OutboxMessage>)> = (0..30)
        .map(|n| {
            let ch = challenge(&t, &format!("+9891277{n:05}"));
            let m = (n % 3 != 0).then(|| message(&ch, t0()));
            (ch, m)
        })
        .collect();
    let twice = challenge(&t, "+989127799999");
    let insert = |ch: Challenge, m: Option<OutboxMessage>| {
        let store = Arc::clone(&store);
        let audit = [event(&t, AuditKind::OtpSent, &format!("sent {}", ch.id))];
        tokio::spawn(async move { store.insert_challenge(&ch, m.as_ref(), &audit).await })
    };
    // Act: the fresh ones at once, then the repeated id with others beside it.
    let tasks: Vec<_> = fresh
        .iter()
        .map(|(ch, m)| insert(ch.clone(), m.clone()))
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let beside = challenge(&t, "+989127799998");
    let doubles = [
        insert(twice.clone(), None),
        insert(beside.clone(), None),
        insert(twice.clone(), None),
    ];
    // Assert: every fresh one stored with its message and event; the repeated id once, the
    // other insert refused as a conflict, the one beside them stored.
    let mut outcomes = Vec::new();
    for task in doubles {
        outcomes.push(task.await.unwrap());
    }
    assert_eq!(
        outcomes.iter().filter(|o| o.is_ok()).count(),
        2,
        "{outcomes:?}"
    );
    assert_eq!(
        stored(&store, &beside).await.destination,
        beside.destination
    );
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o, Err(StoreError::Conflict(_)))),
        "{outcomes:?}"
    );
    for (ch, m) in &fresh {
        assert_eq!(stored(&store, ch).await.destination, ch.destination);
        let queued = store.latest_message_for(&ch.id).await.unwrap();
        assert_eq!(queued.map(|q| q.id), m.as_ref().map(|m| m.id.clone()));
    }
    let events = store.list_audit(&t.id, None, 100).await.unwrap();
    assert_eq!(events.len(), 32, "one event per stored challenge");
}

pub async fn a_login_context_holds_the_tickets_own_user_and_challenge(store: Arc<dyn Store>) {
    // Arrange: a login, and a ticket of another tenant naming this tenant's user and challenge.
    let (_, u, ch, ticket) = login_fixture(&store).await;
    let other = tenant(&store, "login-other").await;
    let mut foreign_ch = challenge(
        &store.get_tenant(&u.tenant_id).await.unwrap().unwrap(),
        "+989121239999",
    );
    foreign_ch.purpose = Purpose::Login;
    let foreign = LoginTicket {
        hash: [8; 32],
        tenant_id: other.id.clone(),
        challenge_id: foreign_ch.id.clone(),
        ..ticket.clone()
    };
    store
        .insert_login_ticket(&foreign, &foreign_ch, None, &[])
        .await
        .unwrap();
    // Act: each asked ten times at once, beside an unknown ticket.
    let tasks: Vec<_> = (0..10)
        .flat_map(|_| [[5u8; 32], [8; 32], [9; 32]])
        .map(|hash| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { (hash, store.get_login_context(&hash).await.unwrap()) })
        })
        .collect();
    // Assert
    for task in tasks {
        match task.await.unwrap() {
            (hash, Some(found)) if hash == [5; 32] => {
                assert_eq!(found.ticket.hash, ticket.hash);
                assert_eq!(found.user.map(|x| x.id), Some(u.id.clone()));
                assert_eq!(found.challenge.map(|c| c.id), Some(ch.id.clone()));
            }
            (hash, Some(found)) if hash == [8; 32] => {
                assert_eq!(found.ticket.tenant_id, other.id);
                assert!(found.user.is_none(), "another tenant's user");
                assert!(found.challenge.is_none(), "another tenant's challenge");
            }
            (hash, found) => {
                assert_eq!(hash, [9; 32]);
                assert!(found.is_none());
            }
        }
    }
}

/// The session a settle judge of `round` creates for `ticket` in the test below.
fn settle_session_hash(ticket: &[u8; 32], round: u8) -> [u8; 32] {
    let mut hash = [1; 32];
    hash[0] = ticket[0];
    hash[1] = round;
    hash
}

pub async fn concurrent_settled_logins_complete_each_ticket_once(store: Arc<dyn Store>) {
    // Arrange: twenty pending logins, each settled three times at once by a judge that
    // completes whenever it is shown a pending challenge (each call with its own session),
    // beside a judge that leaves, and an unknown ticket.
    let t = tenant(&store, "settled-logins").await;
    let mut logins = Vec::new();
    for n in 0..20_u8 {
        let u = user(&t, &format!("settle{n}"));
        store.insert_user(&u, &[]).await.unwrap();
        store.record_login_failure(&t.id, &u.id, &[]).await.unwrap();
        let (ch, ticket) =
            pending_login(&store, &u, &format!("+9891215{n:05}"), [150 + n; 32]).await;
        logins.push((u, ch, ticket.hash));
    }
    let judge_for = |round: u8, complete: bool| -> LoginJudge {
        Arc::new(move |found: &LoginContext| {
            let (Some(u), Some(ch)) = (&found.user, &found.challenge) else {
                return LoginVerdict::Leave;
            };
            if !complete || ch.status != ChallengeStatus::Pending || found.ticket.used_at.is_some()
            {
                return LoginVerdict::Leave;
            }
            let mut done = completion(u, ch, ch.attempts, None);
            done.ticket_hash = Some(found.ticket.hash);
            if let Some(session) = done.session.as_mut() {
                session.hash = settle_session_hash(&found.ticket.hash, round);
            }
            LoginVerdict::Complete(Box::new(done))
        })
    };
    // Act
    let mut tasks = Vec::new();
    for (_, _, ticket) in &logins {
        for round in 0..4_u8 {
            let (store, ticket) = (Arc::clone(&store), *ticket);
            let judge = judge_for(round, round < 3);
            tasks.push(tokio::spawn(async move {
                store.settle_login(&ticket, judge).await.unwrap()
            }));
        }
    }
    let unknown = store.settle_login(&[149; 32], judge_for(0, true)).await;
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    // Assert: of each ticket's three completing judges one completed, and every call was shown
    // its own ticket's rows; what was completed is changed once.
    assert!(unknown.unwrap().is_none());
    for (calls, (u, ch, ticket)) in outcomes.chunks(4).zip(&logins) {
        let mut completed = 0;
        for (round, call) in calls.iter().enumerate() {
            let settled = call.as_ref().expect("a known ticket");
            assert_eq!(settled.context.ticket.hash, *ticket);
            assert_eq!(settled.context.user.as_ref().map(|x| &x.id), Some(&u.id));
            assert_eq!(
                settled.context.challenge.as_ref().map(|c| &c.id),
                Some(&ch.id)
            );
            let session = settle_session_hash(ticket, round as u8);
            let stored_session = store.get_session(&session).await.unwrap();
            if let LoginVerdict::Complete(_) = &settled.verdict {
                assert!(round < 3, "the leaving judge completed");
                completed += 1;
                assert!(stored_session.is_some(), "the completion's session");
            } else {
                assert!(
                    stored_session.is_none(),
                    "a session of a login that did not complete"
                );
            }
        }
        assert_eq!(completed, 1, "{}", ch.id);
        assert!(
            store
                .get_login_ticket(ticket)
                .await
                .unwrap()
                .unwrap()
                .used_at
                .is_some()
        );
        assert_eq!(stored(&store, ch).await.status, ChallengeStatus::Approved);
        let user = store.get_user(&t.id, &u.id).await.unwrap().unwrap();
        assert_eq!(
            user.failed_logins, 0,
            "a completed login resets the failures"
        );
    }
}

pub async fn a_failed_login_completion_changes_nothing(store: Arc<dyn Store>) {
    let (_, u, ch, _) = login_fixture(&store).await;
    // Stale attempts: the challenge condition fails after the ticket update ran.
    assert!(
        !store
            .complete_login(&completion(&u, &ch, 3, None))
            .await
            .unwrap()
    );
    let ticket = store.get_login_ticket(&[5; 32]).await.unwrap().unwrap();
    assert!(
        ticket.used_at.is_none(),
        "the ticket update was not rolled back"
    );
    assert!(store.get_session(&[6; 32]).await.unwrap().is_none());
    assert_eq!(stored(&store, &ch).await.status, ChallengeStatus::Pending);
    // A spent ticket: its pending challenge is not consumed and no session is created.
    let other = challenge(
        &store.get_tenant(&u.tenant_id).await.unwrap().unwrap(),
        "+989125550000",
    );
    store.insert_challenge(&other, None, &[]).await.unwrap();
    let mut spend = completion(&u, &other, 0, None);
    if let Some(s) = spend.session.as_mut() {
        s.hash = [7; 32];
    }
    assert!(store.complete_login(&spend).await.unwrap());
    assert!(
        !store
            .complete_login(&completion(&u, &ch, 0, None))
            .await
            .unwrap()
    );
    assert_eq!(stored(&store, &ch).await.status, ChallengeStatus::Pending);
    assert!(store.get_session(&[6; 32]).await.unwrap().is_none());
}

pub async fn a_login_completion_spends_ticket_challenge_and_step(store: Arc<dyn Store>) {
    let (t, u, ch, _) = login_fixture(&store).await;
    store.record_login_failure(&t.id, &u.id, &[]).await.unwrap();
    assert!(
        store
            .complete_login(&completion(&u, &ch, 0, None))
            .await
            .unwrap()
    );
    assert!(
        store
            .get_login_ticket(&[5; 32])
            .await
            .unwrap()
            .unwrap()
            .used_at
            .is_some()
    );
    assert_eq!(stored(&store, &ch).await.status, ChallengeStatus::Approved);
    assert!(
        store
            .get_session(&[6; 32])
            .await
            .unwrap()
            .unwrap()
            .is_active(t0())
    );
    assert_eq!(
        store
            .get_user(&t.id, &u.id)
            .await
            .unwrap()
            .unwrap()
            .failed_logins,
        0
    );
    // The same ticket cannot be spent twice.
    let mut again = completion(&u, &ch, 0, None);
    if let Some(session) = again.session.as_mut() {
        session.hash = [7; 32];
    }
    assert!(!store.complete_login(&again).await.unwrap());
    assert!(store.get_session(&[7; 32]).await.unwrap().is_none());
}

pub async fn concurrent_login_completions_each_complete_once(store: Arc<dyn Store>) {
    // Arrange: twenty logins, each with a failed attempt on its account, each completed twice at
    // once (two sessions competing for one ticket).
    let t = tenant(&store, "logins").await;
    let mut logins = Vec::new();
    for n in 0..20_u8 {
        let u = user(&t, &format!("login{n}"));
        store.insert_user(&u, &[]).await.unwrap();
        store.record_login_failure(&t.id, &u.id, &[]).await.unwrap();
        let (ch, ticket) =
            pending_login(&store, &u, &format!("+9891214{n:05}"), [100 + n; 32]).await;
        logins.push((u, ch, ticket.hash));
    }
    // Act
    let (tenant_ref, store_ref) = (&t, &store);
    let tasks: Vec<_> = logins
        .iter()
        .flat_map(|(u, ch, ticket)| {
            (0..2_u8).map(move |round| {
                let (t, store) = (tenant_ref, store_ref);
                let mut done = completion(u, ch, 0, None);
                done.ticket_hash = Some(*ticket);
                if let Some(session) = done.session.as_mut() {
                    session.hash = [
                        ticket[0], round, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
                    ];
                }
                done.audit = vec![event(t, AuditKind::TokenIssued, &format!("{}", ch.id))];
                let store = Arc::clone(store);
                tokio::spawn(async move { store.complete_login(&done).await.unwrap() })
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    // Assert: one completion of each pair won, and everything it changes is changed once.
    for (pair, (u, ch, ticket)) in outcomes.chunks(2).zip(&logins) {
        assert_eq!(pair.iter().filter(|won| **won).count(), 1, "{}", ch.id);
        let spent = store.get_login_ticket(ticket).await.unwrap().unwrap();
        assert!(spent.used_at.is_some());
        assert_eq!(stored(&store, ch).await.status, ChallengeStatus::Approved);
        let mut sessions = 0;
        for round in 0..2_u8 {
            let mut hash = [0_u8; 32];
            (hash[0], hash[1], hash[31]) = (ticket[0], round, 1);
            if let Some(session) = store.get_session(&hash).await.unwrap() {
                assert_eq!(session.user_id, u.id);
                sessions += 1;
            }
        }
        assert_eq!(sessions, 1);
        let user = store.get_user(&t.id, &u.id).await.unwrap().unwrap();
        assert_eq!(user.failed_logins, 0);
    }
    let events = store.list_audit(&t.id, None, 100).await.unwrap();
    for (_, ch, _) in &logins {
        let detail = ch.id.to_string();
        assert_eq!(events.iter().filter(|e| e.detail == detail).count(), 1);
    }
}

fn factor(u: &User, confirmed: bool) -> TotpFactor {
    TotpFactor {
        id: FactorId::generate().unwrap(),
        tenant_id: u.tenant_id.clone(),
        user_id: u.id.clone(),
        secret_sealed: vec![1, 2, 3],
        params: TotpParams::default(),
        confirmed_at: confirmed.then(t0),
        last_step: None,
        created_at: t0(),
    }
}

pub async fn totp_steps_only_move_forward(store: Arc<dyn Store>) {
    let t = tenant(&store, "totp").await;
    let u = user(&t, "ali");
    store.insert_user(&u, &[]).await.unwrap();
    let f = factor(&u, false);
    store.insert_totp_factor(&f, &[]).await.unwrap();
    assert!(store.accept_totp_step(&f.id, 100, t0(), &[]).await.unwrap());
    assert!(!store.accept_totp_step(&f.id, 100, t0(), &[]).await.unwrap());
    assert!(!store.accept_totp_step(&f.id, 99, t0(), &[]).await.unwrap());
    assert!(store.accept_totp_step(&f.id, 101, t0(), &[]).await.unwrap());
    let listed = store.list_totp_factors(&t.id, &u.id).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].last_step, Some(101));
    assert!(
        listed[0].confirmed_at.is_some(),
        "the first accepted step confirms the factor"
    );
    assert_eq!(listed[0].secret_sealed, vec![1, 2, 3]);
}

pub async fn sessions_are_revoked_once(store: Arc<dyn Store>) {
    let (_, u, ch, _) = login_fixture(&store).await;
    assert!(
        store
            .complete_login(&completion(&u, &ch, 0, None))
            .await
            .unwrap()
    );
    assert!(store.revoke_session(&[6; 32], t0(), &[]).await.unwrap());
    assert!(!store.revoke_session(&[6; 32], t0(), &[]).await.unwrap());
    assert!(
        !store
            .get_session(&[6; 32])
            .await
            .unwrap()
            .unwrap()
            .is_active(t0())
    );
}

pub async fn outbox_claims_are_leases_and_delivery_erases_the_code(store: Arc<dyn Store>) {
    let t = tenant(&store, "outbox").await;
    let ch = challenge(&t, "+989121234567");
    let m = message(&ch, t0());
    store.insert_challenge(&ch, Some(&m), &[]).await.unwrap();
    let lease = t0() + Duration::from_secs(60);
    let claimed = store.claim_outbox(t0(), lease, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].attempts, 1);
    assert_eq!(claimed[0].code.as_deref(), Some("123456"));
    // Held by the lease: nobody else gets it meanwhile, and it comes back when the lease lapses.
    assert!(
        store
            .claim_outbox(t0(), lease, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let relapsed = store
        .claim_outbox(lease, lease + Duration::from_secs(60), 10)
        .await
        .unwrap();
    assert_eq!(relapsed.len(), 1);
    assert_eq!(relapsed[0].attempts, 2);
    store
        .mark_message_sent(
            &m.id,
            Some("prov-1"),
            &[event(&t, AuditKind::MessageSent, "m")],
        )
        .await
        .unwrap();
    let latest = store.latest_message_for(&ch.id).await.unwrap().unwrap();
    assert_eq!(latest.status, DeliveryStatus::Sent);
    assert_eq!(latest.provider_message_id.as_deref(), Some("prov-1"));
    assert!(
        latest.body.is_none() && latest.code.is_none(),
        "code left in the outbox"
    );
    assert!(
        store
            .claim_outbox(lease + Duration::from_secs(3600), lease, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn concurrent_sent_marks_each_mark_their_own_message(store: Arc<dyn Store>) {
    // As a delivery worker marks the messages it sent side by side: each message ends sent
    // with its own provider id and its code erased, with its own event, and a mark of a message
    // that is gone takes no other mark down (a store that shares statements between marks
    // must keep each mark its own).
    // Arrange: twenty queued messages.
    let t = tenant(&store, "marks").await;
    let mut queued = Vec::new();
    for n in 0..20 {
        let ch = challenge(&t, &format!("+9891288{n:05}"));
        let m = message(&ch, t0());
        store.insert_challenge(&ch, Some(&m), &[]).await.unwrap();
        queued.push((ch, m));
    }
    // Act: every mark at once, with one of a message that was never queued among them.
    let mark = |id: MessageId, provider: String| {
        let store = Arc::clone(&store);
        let audit = [event(&t, AuditKind::MessageSent, &format!("sent {id}"))];
        tokio::spawn(async move { store.mark_message_sent(&id, Some(&provider), &audit).await })
    };
    let mut tasks: Vec<_> = queued
        .iter()
        .map(|(_, m)| mark(m.id.clone(), format!("prov-{}", m.id)))
        .collect();
    tasks.push(mark(MessageId::generate().unwrap(), "prov-none".into()));
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    // Assert: each message sent under its own provider id, its code gone; an event per mark.
    for (ch, m) in &queued {
        let latest = store.latest_message_for(&ch.id).await.unwrap().unwrap();
        assert_eq!(latest.status, DeliveryStatus::Sent);
        assert_eq!(
            latest.provider_message_id,
            Some(format!("prov-{}", m.id)),
            "a mark landed on another message"
        );
        assert!(latest.body.is_none() && latest.code.is_none());
    }
    assert!(
        store
            .claim_outbox(t0() + Duration::from_secs(3600), t0(), 100)
            .await
            .unwrap()
            .is_empty(),
        "a marked message is still queued"
    );
    let events = store.list_audit(&t.id, None, 100).await.unwrap();
    assert_eq!(events.len(), 21, "one event per mark");
}

pub async fn sms_range_outcomes_count_only_settled_codes_of_the_range(store: Arc<dyn Store>) {
    let t = tenant(&store, "range").await;
    let other = tenant(&store, "other").await;
    let insert = |ch: Challenge| {
        let store = Arc::clone(&store);
        async move {
            store
                .insert_challenge(&ch, Some(&message(&ch, ch.created_at)), &[])
                .await
                .unwrap();
            ch
        }
    };
    // In the range +98912: one verified, one expired unverified, one dead by attempts, one
    // canceled (not counted), one still pending in its lifetime (not counted yet).
    let verified = insert(challenge(&t, "+989121230001")).await;
    assert!(
        store
            .consume_challenge(&verified.id, 0, t0(), &[])
            .await
            .unwrap()
    );
    insert(challenge(&t, "+989121230002")).await;
    let dead = insert(challenge(&t, "+989121230003")).await;
    for attempts in 0..5 {
        store
            .record_failed_check(&dead.id, attempts, t0(), &[])
            .await
            .unwrap();
    }
    let canceled = insert(challenge(&t, "+989121230004")).await;
    assert!(
        store
            .cancel_challenge(&canceled.id, t0(), &[])
            .await
            .unwrap()
    );
    let mut young = challenge(&t, "+989121230005");
    young.created_at = t0() + Duration::from_secs(200);
    young.expires_at = t0() + Duration::from_secs(500);
    insert(young).await;
    // Outside the range, the tenant, the channel or the window: not counted.
    insert(challenge(&t, "+989351230001")).await;
    insert(challenge(&other, "+989121230009")).await;
    let mut email = challenge(&t, "+989121230010");
    email.channel = Channel::Email;
    insert(email).await;
    let mut old = challenge(&t, "+989121230011");
    old.created_at = t0() - Duration::from_secs(7200);
    old.expires_at = old.created_at + Duration::from_secs(300);
    insert(old).await;

    let now = t0() + Duration::from_secs(301);
    let outcomes = store
        .sms_range_outcomes(&t.id, "+98912", t0() - Duration::from_secs(3600), now)
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        RangeOutcomes {
            settled: 3,
            verified: 1
        }
    );
}

pub async fn sealed_secrets_are_listed_and_resealed_all_or_nothing(store: Arc<dyn Store>) {
    let first = store.ensure_server_secret("k", b"sealed-1").await.unwrap();
    let again = store.ensure_server_secret("k", b"sealed-2").await.unwrap();
    assert_eq!(
        (first.as_slice(), again.as_slice()),
        (&b"sealed-1"[..], &b"sealed-1"[..])
    );
    let all = store.sealed_secrets().await.unwrap();
    let server: Vec<_> = all
        .iter()
        .filter(|s| s.kind == SealedKind::ServerSecret)
        .collect();
    assert_eq!(server.len(), 1);
    let current = server[0].clone();
    // A change computed from a stale value is refused, and so is the whole batch with it.
    let mut stale = current.clone();
    stale.sealed = b"stale".to_vec();
    let refused = store
        .reseal_secrets(&[
            (current.clone(), b"new-1".to_vec()),
            (stale, b"new-2".to_vec()),
        ])
        .await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    assert_eq!(
        store.ensure_server_secret("k", b"x").await.unwrap(),
        b"sealed-1"
    );
    store
        .reseal_secrets(&[(current, b"new-1".to_vec())])
        .await
        .unwrap();
    assert_eq!(
        store.ensure_server_secret("k", b"x").await.unwrap(),
        b"new-1"
    );
}

pub async fn sends_are_counted_per_destination(store: Arc<dyn Store>) {
    let t = tenant(&store, "sends").await;
    for _ in 0..3 {
        let ch = challenge(&t, "+989121234567");
        store
            .insert_challenge(&ch, Some(&message(&ch, t0())), &[])
            .await
            .unwrap();
    }
    let other = challenge(&t, "+989120000000");
    store
        .insert_challenge(&other, Some(&message(&other, t0())), &[])
        .await
        .unwrap();
    let since = t0() - Duration::from_secs(1);
    assert_eq!(
        store
            .count_sends(
                &t.id,
                &SendScope::Destination("+989121234567".into()),
                since,
                100
            )
            .await
            .unwrap(),
        3
    );
    let count = |scope: SendScope| {
        let store = Arc::clone(&store);
        let tenant = t.id.clone();
        async move {
            store
                .count_sends(&tenant, &scope, since, 100)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        count(SendScope::Destination("+989121234567".into())).await,
        3
    );
    assert_eq!(count(SendScope::CountryPrefix("+98".into())).await, 4);
    assert_eq!(count(SendScope::CountryPrefix("+9".into())).await, 4);
    assert_eq!(count(SendScope::CountryPrefix("+1".into())).await, 0);
    assert_eq!(count(SendScope::Ip("203.0.113.7".into())).await, 4);
    assert_eq!(count(SendScope::Ip("203.0.113.8".into())).await, 0);
    // Counted only up to the limit asked about, and exactly below it.
    for (at_most, counted) in [(2, 2), (4, 4), (5, 4)] {
        let n = store
            .count_sends(
                &t.id,
                &SendScope::CountryPrefix("+98".into()),
                since,
                at_most,
            )
            .await
            .unwrap();
        assert_eq!(n, counted, "at most {at_most}");
    }
    let stranger = tenant(&store, "other-sends").await;
    let same_ip = SendScope::Ip("203.0.113.7".into());
    let elsewhere = store
        .count_sends(&stranger.id, &same_ip, since, 100)
        .await
        .unwrap();
    assert_eq!(elsewhere, 0);
    assert_eq!(
        store
            .count_sends(
                &t.id,
                &SendScope::Destination("+989121234567".into()),
                t0(),
                100
            )
            .await
            .unwrap(),
        0
    );
}

pub async fn sends_in_several_windows_are_each_windows_own_count(store: Arc<dyn Store>) {
    // Arrange: three sends ten seconds ago and two half an hour ago, to one number.
    let t = tenant(&store, "windows").await;
    let number = "+989121234567";
    for ago in [10, 10, 10, 1800, 1800] {
        let at = t0() - Duration::from_secs(ago);
        let ch = challenge(&t, number);
        store
            .insert_challenge(&ch, Some(&message(&ch, at)), &[])
            .await
            .unwrap();
    }
    let minute = t0() - Duration::from_secs(60);
    let hour = t0() - Duration::from_secs(3600);
    let scopes = [
        SendScope::Destination(number.into()),
        SendScope::CountryPrefix("+98".into()),
        SendScope::Ip("203.0.113.7".into()),
    ];
    let cases: [&[(OffsetDateTime, u32)]; 5] = [
        &[(minute, 100), (hour, 100)],
        &[(hour, 100), (minute, 100)],
        // Each window stops at its own limit.
        &[(minute, 2), (hour, 4)],
        &[(minute, 100), (hour, 5)],
        &[(minute, 100), (hour, 100), (t0(), 100)],
    ];
    let expected: [&[u32]; 5] = [&[3, 5], &[5, 3], &[2, 4], &[3, 5], &[3, 5, 0]];
    for scope in &scopes {
        for (windows, want) in cases.iter().zip(expected) {
            // Act
            let counts = store
                .count_sends_in_windows(&t.id, scope, windows)
                .await
                .unwrap();
            // Assert: as many counts as windows, each the window's own.
            assert_eq!(counts, want, "{scope:?} {windows:?}");
        }
    }
    let stranger = tenant(&store, "windows-other").await;
    let elsewhere = store
        .count_sends_in_windows(&stranger.id, &scopes[0], cases[0])
        .await
        .unwrap();
    assert_eq!(elsewhere, [0, 0]);
}

pub async fn concurrent_send_reads_of_many_numbers_are_each_numbers_own(store: Arc<dyn Store>) {
    // Arrange: forty numbers, number i with i % 4 sends ten seconds ago and, for every third,
    // a newer pending challenge beside an older one; the same numbers in another tenant, with
    // one pending challenge each.
    let t = tenant(&store, "send-reads").await;
    let other = tenant(&store, "send-reads-other").await;
    let number = |i: usize| format!("+98912300{i:04}");
    let mut newest = Vec::new();
    for i in 0..40 {
        for _ in 0..i % 4 {
            let ch = challenge(&t, &number(i));
            let sent = t0() - Duration::from_secs(10);
            store
                .insert_challenge(&ch, Some(&message(&ch, sent)), &[])
                .await
                .unwrap();
        }
        let pending = if i % 3 == 0 {
            let older = challenge(&t, &number(i));
            let mut newer = challenge(&t, &number(i));
            newer.created_at = t0() + Duration::from_secs(1);
            store.insert_challenge(&older, None, &[]).await.unwrap();
            store.insert_challenge(&newer, None, &[]).await.unwrap();
            Some(newer.id)
        } else {
            None
        };
        newest.push(pending);
        store
            .insert_challenge(&challenge(&other, &number(i)), None, &[])
            .await
            .unwrap();
    }
    // Act: every number's reads at once, each number asked twice.
    let minute = t0() - Duration::from_secs(60);
    let asks = (0..80).map(|n| {
        let (store, tenant, destination) = (Arc::clone(&store), t.id.clone(), number(n % 40));
        async move {
            let windows = [(minute, 100), (minute, 2)];
            let scope = SendScope::Destination(destination.clone());
            let counts = store.count_sends_in_windows(&tenant, &scope, &windows);
            let pending = store.find_pending_challenge(&tenant, "verify", &destination, t0());
            let (counts, pending) = tokio::join!(counts, pending);
            (counts.unwrap(), pending.unwrap())
        }
    });
    let answers = futures_util::future::join_all(asks).await;
    // Assert: each number's own counts (the second stopped at its limit) and newest pending.
    for (n, (counts, pending)) in answers.into_iter().enumerate() {
        let i = n % 40;
        let sent = u32::try_from(i % 4).unwrap();
        assert_eq!(counts, [sent, sent.min(2)], "number {i}");
        match (&newest[i], pending) {
            (Some(id), Some(found)) => assert_eq!(&found.id, id, "number {i}"),
            (None, found) if i % 4 == 0 => assert!(found.is_none(), "number {i}: {found:?}"),
            // The challenges of its sends are the pending ones of a number without others.
            (None, Some(found)) => {
                assert_eq!(found.tenant_id, t.id, "number {i}");
                assert_eq!(found.destination, number(i), "number {i}");
            }
            (expected, found) => panic!("number {i}: {expected:?} but {found:?}"),
        }
    }
}

pub async fn concurrent_wrong_codes_and_failed_logins_are_each_counted_once(store: Arc<dyn Store>) {
    // As a flood of wrong codes arrives: two wrong codes that saw the same attempt count are
    // one attempt (the other is told it lost), and every failed login of an account counts, so
    // the attempt limit and the lock-out hold however the store groups its writes.
    // Arrange: ten pending challenges and five accounts, with an event per change.
    let t = tenant(&store, "floods").await;
    let mut challenges = Vec::new();
    for n in 0..10 {
        let ch = challenge(&t, &format!("+9891266{n:05}"));
        store.insert_challenge(&ch, None, &[]).await.unwrap();
        challenges.push(ch);
    }
    let mut users = Vec::new();
    for n in 0..5 {
        let u = user(&t, &format!("flood{n}"));
        store.insert_user(&u, &[]).await.unwrap();
        users.push(u);
    }
    // Act: each challenge's wrong code twice at once with the count both saw, and four failed
    // logins of each account at once, all side by side.
    let mut checks = Vec::new();
    for ch in &challenges {
        for _ in 0..2 {
            let (store, id) = (Arc::clone(&store), ch.id.clone());
            let audit = [event(&t, AuditKind::OtpRejected, &format!("wrong {id}"))];
            checks.push(tokio::spawn(async move {
                let counted = store.record_failed_check(&id, 0, t0(), &audit).await;
                (id, counted)
            }));
        }
    }
    let mut failures = Vec::new();
    for u in &users {
        for _ in 0..4 {
            let (store, tenant, id) = (Arc::clone(&store), t.id.clone(), u.id.clone());
            let audit = [event(&t, AuditKind::LoginFailed, &format!("failed {id}"))];
            failures.push(tokio::spawn(async move {
                let count = store.record_login_failure(&tenant, &id, &audit).await;
                (id, count)
            }));
        }
    }
    let mut counted_per_challenge: std::collections::HashMap<ChallengeId, usize> =
        std::collections::HashMap::new();
    for task in checks {
        let (id, counted) = task.await.unwrap();
        *counted_per_challenge.entry(id).or_default() += usize::from(counted.unwrap());
    }
    let mut counts_per_user: std::collections::HashMap<UserId, Vec<u32>> =
        std::collections::HashMap::new();
    for task in failures {
        let (id, count) = task.await.unwrap();
        counts_per_user.entry(id).or_default().push(count.unwrap());
    }
    // Assert: one attempt per challenge, stored; each account's counts 1 to 4, stored; an event
    // for every change and none for the check that lost.
    for ch in &challenges {
        assert_eq!(counted_per_challenge.get(&ch.id), Some(&1), "{}", ch.id);
        assert_eq!(stored(&store, ch).await.attempts, 1);
    }
    for u in &users {
        let mut counts = counts_per_user.remove(&u.id).unwrap();
        counts.sort_unstable();
        assert_eq!(counts, vec![1, 2, 3, 4], "{}", u.id);
        let found = store.get_user(&t.id, &u.id).await.unwrap().unwrap();
        assert_eq!(found.failed_logins, 4);
    }
    let events = store.list_audit(&t.id, None, 100).await.unwrap();
    assert_eq!(events.len(), 10 + 20, "one event per counted change");
}

pub async fn login_failures_count_up_and_locks_never_shorten(store: Arc<dyn Store>) {
    let t = tenant(&store, "lock").await;
    let u = user(&t, "ali");
    store.insert_user(&u, &[]).await.unwrap();
    assert_eq!(
        store.record_login_failure(&t.id, &u.id, &[]).await.unwrap(),
        1
    );
    assert_eq!(
        store.record_login_failure(&t.id, &u.id, &[]).await.unwrap(),
        2
    );
    let long = t0() + Duration::from_secs(600);
    store.lock_user(&t.id, &u.id, long).await.unwrap();
    store
        .lock_user(&t.id, &u.id, t0() + Duration::from_secs(60))
        .await
        .unwrap();
    let found = store.get_user(&t.id, &u.id).await.unwrap().unwrap();
    assert_eq!(found.locked_until, Some(long));
    assert_eq!(found.failed_logins, 2);
    // Another tenant's id for the same user changes nothing, and its audit event is not kept.
    let other = tenant(&store, "lock-other").await;
    let stray = [event(&other, AuditKind::LoginFailed, "stray")];
    assert!(
        store
            .record_login_failure(&other.id, &u.id, &stray)
            .await
            .is_err()
    );
    store
        .lock_user(&other.id, &u.id, long + Duration::from_secs(600))
        .await
        .unwrap();
    assert!(!store.unlock_user(&other.id, &u.id, &stray).await.unwrap());
    let untouched = store.get_user(&t.id, &u.id).await.unwrap().unwrap();
    assert_eq!(
        (untouched.failed_logins, untouched.locked_until),
        (2, Some(long))
    );
    assert!(
        store
            .list_audit(&other.id, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.unlock_user(&t.id, &u.id, &[]).await.unwrap());
    let unlocked = store.get_user(&t.id, &u.id).await.unwrap().unwrap();
    assert_eq!((unlocked.failed_logins, unlocked.locked_until), (0, None));
}

pub async fn audit_events_are_listed_newest_first(store: Arc<dyn Store>) {
    // Arrange: an event, another, then three in one call (a login writes its events so).
    let t = tenant(&store, "audit").await;
    store
        .insert_audit(&[event(&t, AuditKind::LoginFailed, "first")])
        .await
        .unwrap();
    store
        .insert_audit(&[event(&t, AuditKind::OtpSent, "second")])
        .await
        .unwrap();
    store
        .insert_audit(&[
            event(&t, AuditKind::LoginFailed, "third"),
            event(&t, AuditKind::OtpSent, "fourth"),
            event(&t, AuditKind::LoginFailed, "fifth"),
        ])
        .await
        .unwrap();
    // Act
    let events = store.list_audit(&t.id, None, 10).await.unwrap();
    // Assert: every event of the three is kept, after the two before them.
    let details: Vec<&str> = events.iter().map(|e| e.detail.as_str()).collect();
    assert_eq!(details.len(), 5, "{details:?}");
    let mut batch = details[..3].to_vec();
    batch.sort_unstable();
    assert_eq!(batch, ["fifth", "fourth", "third"]);
    assert_eq!(details[3..], ["second", "first"]);
    assert_eq!(events[3].kind, AuditKind::OtpSent);
    assert_eq!(events[4].context.ip.as_deref(), Some("127.0.0.1"));
}

pub async fn the_sweeper_deletes_only_what_can_no_longer_matter(store: Arc<dyn Store>) {
    // Arrange: a live login, a finished one, and an old delivered verification.
    let (t, u, live_ch, _) = login_fixture(&store).await;
    assert!(
        store
            .complete_login(&completion(&u, &live_ch, 0, None))
            .await
            .unwrap()
    );
    let old = challenge(&t, "+989120000000");
    let old_msg = message(&old, t0());
    store
        .insert_challenge(&old, Some(&old_msg), &[])
        .await
        .unwrap();
    store
        .mark_message_sent(&old_msg.id, None, &[])
        .await
        .unwrap();
    let pending = challenge(&t, "+989121111111");
    store
        .insert_challenge(&pending, Some(&message(&pending, t0())), &[])
        .await
        .unwrap();
    store
        .revoke_jti(
            &t.id,
            "old-jti",
            t0() + Duration::from_secs(3600),
            t0(),
            &[],
        )
        .await
        .unwrap();
    let day = Duration::from_secs(86_400);
    // Act: a moment when the session is still active, the spent ticket not yet expired and
    // nothing is a day old.
    let early = store
        .sweep(t0() + Duration::from_secs(60), day, 100)
        .await
        .unwrap();
    // Assert: nothing went (a spent ticket waits for its expiry, minutes away).
    assert_eq!(early, 0);
    assert!(store.get_session(&[6; 32]).await.unwrap().is_some());
    assert!(store.get_challenge(&t.id, &old.id).await.unwrap().is_some());
    // Act: two days later, with a batch of one: rows go at most one per kind per round.
    let later = t0() + 2 * day;
    let first = store.sweep(later, day, 1).await.unwrap();
    let mut total = first;
    while let gone @ 1.. = store.sweep(later, day, 1).await.unwrap() {
        total += gone;
    }
    // Assert: the session, the sent message, the old challenges went; the queued message and
    // its challenge stay (a message not yet delivered is never lost).
    assert!(first <= 5);
    assert!(
        !store.is_jti_revoked("old-jti").await.unwrap(),
        "an expired revocation stayed"
    );
    assert!(store.get_session(&[6; 32]).await.unwrap().is_none());
    assert!(store.get_challenge(&t.id, &old.id).await.unwrap().is_none());
    assert!(
        store
            .get_challenge(&t.id, &live_ch.id)
            .await
            .unwrap()
            .is_some(),
        "its message is still queued"
    );
    assert!(
        store
            .get_challenge(&t.id, &pending.id)
            .await
            .unwrap()
            .is_some()
    );
    assert!(total >= 3, "{total}");
}

pub async fn every_hot_and_sweep_statement_goes_through_an_index(store: Arc<dyn Store>) {
    // Act
    let plans = store.query_plans().await.unwrap();
    // Assert: the hot reads and writes and every sweep statement are there, and none of them
    // reads a whole table (a million dead rows would then slow every check or sweep).
    assert!(plans.len() >= 13, "{plans:?}");
    for purpose in [
        "login ticket by hash",
        "consume a challenge",
        "sweep challenges",
    ] {
        assert!(
            plans.iter().any(|p| p.purpose == purpose),
            "{purpose} missing"
        );
    }
    // The send limits' counts each through their own index: any index led by the tenant alone
    // would serve them too, and walk all of the tenant's recent sends.
    for (purpose, index) in [
        ("sends to a destination", "outbox_by_destination"),
        ("sends to a country", "outbox_by_destination"),
        ("sends from an address", "outbox_by_ip"),
        ("sends of an account", "outbox_by_user"),
    ] {
        let plan = plans.iter().find(|p| p.purpose == purpose);
        assert!(
            plan.is_some_and(|p| p.plan.contains(index)),
            "{purpose} not through {index}: {plan:?}"
        );
    }
    // A store that reads the send path's rows in batches reads each key's through its index.
    for (purpose, index) in [
        ("sends to a batch of destinations", "outbox_by_destination"),
        (
            "pending challenges of a batch of destinations",
            "challenges_by_destination",
        ),
    ] {
        if let Some(plan) = plans.iter().find(|p| p.purpose == purpose) {
            assert!(
                plan.plan.contains(index),
                "{purpose} not through {index}: {plan:?}"
            );
        }
    }
    // The audit listing goes through an index of the tenant's events (whether it walks it in
    // order and stops at its limit is each store's own test: PostgreSQL's generic plan on an
    // empty table sorts).
    let audit = plans
        .iter()
        .find(|p| p.purpose == "a tenant's audit events, newest first");
    assert!(audit.is_some_and(|p| !p.full_scan), "{audit:?}");
    // A user by its key, never by walking the tenant's usernames.
    let user = plans.iter().find(|p| p.purpose == "user by id");
    assert!(
        user.is_some_and(|p| !p.plan.contains("username")),
        "{user:?}"
    );
    // Nor when a login clears the account's failure count, a failure counts, or an account is
    // locked or unlocked.
    for plan in plans
        .iter()
        .filter(|p| p.purpose.contains("login") || p.purpose.contains("account"))
    {
        assert!(!plan.plan.contains("username"), "{plan:?}");
    }
    for plan in &plans {
        assert!(!plan.plan.is_empty(), "{} has no plan", plan.purpose);
        assert!(
            !plan.full_scan,
            "{} scans a table:\n{}",
            plan.purpose, plan.plan
        );
    }
}

pub async fn challenges_are_inserted_in_bulk(store: Arc<dyn Store>) {
    // Arrange
    let t = tenant(&store, "bulk").await;
    let many: Vec<Challenge> = (0..300)
        .map(|i| challenge(&t, &format!("+98912{i:07}")))
        .collect();
    // Act
    store.insert_challenges(&many).await.unwrap();
    // Assert: every one is there as given; one taken id refuses the whole batch.
    for c in [&many[0], &many[299]] {
        let stored = store.get_challenge(&t.id, &c.id).await.unwrap().unwrap();
        assert_eq!(stored.destination, c.destination);
        assert_eq!(stored.code_hash, c.code_hash);
    }
    let again = vec![challenge(&t, "+989130000000"), many[5].clone()];
    assert!(store.insert_challenges(&again).await.is_err());
    assert!(
        store
            .get_challenge(&t.id, &again[0].id)
            .await
            .unwrap()
            .is_none(),
        "a refused batch left a row"
    );
}

pub async fn recovery_codes_are_replaced_counted_and_spent_once(store: Arc<dyn Store>) {
    let (t, u, ch, _) = login_fixture(&store).await;
    store
        .replace_recovery_codes(&t.id, &u.id, &[[1; 32], [2; 32]], t0(), &[])
        .await
        .unwrap();
    store
        .replace_recovery_codes(&t.id, &u.id, &[[3; 32], [4; 32], [5; 32]], t0(), &[])
        .await
        .unwrap();
    assert_eq!(
        store
            .count_unused_recovery_codes(&t.id, &u.id)
            .await
            .unwrap(),
        3
    );
    assert!(
        !store
            .has_unused_recovery_code(&t.id, &u.id, &[1; 32])
            .await
            .unwrap(),
        "old codes survive a replacement"
    );
    assert!(
        store
            .has_unused_recovery_code(&t.id, &u.id, &[3; 32])
            .await
            .unwrap()
    );
    let mut with_code = completion(&u, &ch, 0, None);
    with_code.recovery_code = Some([9; 32]);
    assert!(
        !store.complete_login(&with_code).await.unwrap(),
        "an unknown recovery code logged in"
    );
    with_code.recovery_code = Some([3; 32]);
    assert!(store.complete_login(&with_code).await.unwrap());
    assert!(
        !store
            .has_unused_recovery_code(&t.id, &u.id, &[3; 32])
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .count_unused_recovery_codes(&t.id, &u.id)
            .await
            .unwrap(),
        2
    );
}

pub async fn removing_totp_takes_factors_and_recovery_codes(store: Arc<dyn Store>) {
    let t = tenant(&store, "totp-rm").await;
    let u = user(&t, "ali");
    store.insert_user(&u, &[]).await.unwrap();
    store
        .insert_totp_factor(&factor(&u, true), &[])
        .await
        .unwrap();
    store
        .replace_recovery_codes(&t.id, &u.id, &[[1; 32]], t0(), &[])
        .await
        .unwrap();
    store
        .delete_totp_factors(&t.id, &u.id, &[event(&t, AuditKind::TotpRemoved, "x")])
        .await
        .unwrap();
    assert!(
        store
            .list_totp_factors(&t.id, &u.id)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .count_unused_recovery_codes(&t.id, &u.id)
            .await
            .unwrap(),
        0
    );
    // A panel session can be inserted on its own.
    let session = Session {
        hash: [8; 32],
        tenant_id: t.id.clone(),
        user_id: u.id.clone(),
        created_at: t0(),
        expires_at: t0() + Duration::from_secs(60),
        revoked_at: None,
    };
    store.insert_session(&session, &[]).await.unwrap();
    assert!(
        store
            .get_session(&[8; 32])
            .await
            .unwrap()
            .unwrap()
            .is_active(t0())
    );
}

fn phone_completion(t: &Tenant, ch: &Challenge, user_type: u16, device: &str) -> PhoneCompletion {
    let mut candidate = user(t, &format!("+989121234567#{user_type}"));
    candidate.user_type = Some(user_type);
    candidate.email = None;
    PhoneCompletion {
        challenge_id: ch.id.clone(),
        expected_attempts: 0,
        candidate,
        verified: Contact::Phone,
        device: Device {
            tenant_id: t.id.clone(),
            user_id: UserId::generate().unwrap(),
            device_unique_id: device.into(),
            device_id: "a1b2c3".into(),
            device_type: "android".into(),
            first_seen_at: t0(),
            last_seen_at: t0(),
        },
        now: t0() + Duration::from_secs(5),
        audit: vec![event(t, AuditKind::OtpAccepted, "phone")],
    }
}

pub async fn a_phone_verification_finds_or_creates_one_user_per_phone_and_type(
    store: Arc<dyn Store>,
) {
    let t = tenant(&store, "phones").await;
    let mut first = challenge(&t, "+989121234567");
    first.purpose = Purpose::PhoneLogin;
    store.insert_challenge(&first, None, &[]).await.unwrap();
    let created = store
        .complete_phone_verification(&phone_completion(&t, &first, 2, "dev-1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(created.user_type, Some(2));
    assert!(created.mobile_verified_at.is_some());
    // The same code again: nothing happens.
    assert!(
        store
            .complete_phone_verification(&phone_completion(&t, &first, 2, "dev-1"))
            .await
            .unwrap()
            .is_none()
    );
    let mut second = challenge(&t, "+989121234567");
    second.purpose = Purpose::PhoneLogin;
    store.insert_challenge(&second, None, &[]).await.unwrap();
    let found = store
        .complete_phone_verification(&phone_completion(&t, &second, 2, "dev-2"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        found.id, created.id,
        "a second user was created for the same phone and type"
    );
    let latest = store
        .latest_challenge(&t.id, "phone_login", "+989121234567")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.status, ChallengeStatus::Approved);
    let mut third = challenge(&t, "+989121234567");
    third.purpose = Purpose::PhoneLogin;
    store.insert_challenge(&third, None, &[]).await.unwrap();
    let other_type = store
        .complete_phone_verification(&phone_completion(&t, &third, 1, "dev-1"))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(other_type.id, created.id);
    let by_type = store
        .find_user_by_phone_and_type(&t.id, "+989121234567", 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_type.id, other_type.id);
}

pub async fn concurrent_phone_verifications_of_a_new_number_make_one_user(store: Arc<dyn Store>) {
    // Arrange: ten codes for one number no user has yet.
    let t = tenant(&store, "phones-at-once").await;
    let mut codes = Vec::new();
    for _ in 0..10 {
        let mut ch = challenge(&t, "+989121234567");
        ch.purpose = Purpose::PhoneLogin;
        store.insert_challenge(&ch, None, &[]).await.unwrap();
        codes.push(ch);
    }
    // Act: all ten verified at once, each from a device of its own.
    let tasks: Vec<_> = codes
        .iter()
        .enumerate()
        .map(|(n, ch)| {
            let (store, done) = (
                Arc::clone(&store),
                phone_completion(&t, ch, 3, &format!("dev-{n}")),
            );
            tokio::spawn(async move { store.complete_phone_verification(&done).await })
        })
        .collect();
    let mut users = Vec::new();
    for task in tasks {
        users.push(task.await.unwrap().unwrap().expect("a consumed code"));
    }
    // Assert: one user for all of them, verified, with each event.
    let one = store
        .find_user_by_phone_and_type(&t.id, "+989121234567", 3)
        .await
        .unwrap()
        .unwrap();
    assert!(users.iter().all(|u| u.id == one.id), "{users:?}");
    assert!(one.mobile_verified_at.is_some());
    let events = store.list_audit(&t.id, Some(&one.id), 50).await.unwrap();
    assert_eq!(events.len(), 10);
    // An e-mail verified for the same user fills the address it did not have.
    let mut by_mail = challenge(&t, "ali@example.com");
    by_mail.purpose = Purpose::PhoneLogin;
    store.insert_challenge(&by_mail, None, &[]).await.unwrap();
    let mut done = phone_completion(&t, &by_mail, 3, "dev-0");
    done.verified = Contact::Email;
    done.candidate.email = Some(otpgate_core::identity::Email::parse("ali@example.com").unwrap());
    let mailed = store
        .complete_phone_verification(&done)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(mailed.id, one.id);
    assert!(mailed.email_verified_at.is_some());
    assert_eq!(
        mailed.email.map(|e| e.as_str().to_owned()),
        Some("ali@example.com".to_owned())
    );
}

fn jwt_key(t: &Tenant, at: OffsetDateTime) -> JwtKey {
    JwtKey {
        id: KeyId::generate().unwrap(),
        tenant_id: t.id.clone(),
        secret_sealed: vec![7; 16],
        created_at: at,
        verify_until: None,
    }
}

pub async fn jwt_keys_rotate_and_retiring_keys_verify_until_their_time(store: Arc<dyn Store>) {
    let t = tenant(&store, "keys").await;
    let first = store.ensure_jwt_key(&jwt_key(&t, t0())).await.unwrap();
    let again = store.ensure_jwt_key(&jwt_key(&t, t0())).await.unwrap();
    assert_eq!(first.id, again.id, "a second active key");
    let next = jwt_key(&t, t0());
    let until = t0() + Duration::from_secs(3600);
    store.rotate_jwt_key(&next, until, &[]).await.unwrap();
    let active = store.ensure_jwt_key(&jwt_key(&t, t0())).await.unwrap();
    assert_eq!(active.id, next.id);
    let verifying: Vec<_> = store
        .verifying_jwt_keys(&t.id, t0())
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert!(verifying.contains(&first.id) && verifying.contains(&next.id));
    let later: Vec<_> = store
        .verifying_jwt_keys(&t.id, until)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(later, vec![next.id]);
    let other = tenant(&store, "other").await;
    assert!(
        store
            .verifying_jwt_keys(&other.id, t0())
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn jtis_and_api_keys_are_revoked_once(store: Arc<dyn Store>) {
    let t = tenant(&store, "revoke").await;
    assert!(!store.is_jti_revoked("j1").await.unwrap());
    assert!(
        store
            .revoke_jti(&t.id, "j1", t0(), t0(), &[])
            .await
            .unwrap()
    );
    assert!(
        !store
            .revoke_jti(&t.id, "j1", t0(), t0(), &[])
            .await
            .unwrap()
    );
    assert!(store.is_jti_revoked("j1").await.unwrap());
    let key = ApiKey {
        id: ApiKeyId::generate().unwrap(),
        tenant_id: t.id.clone(),
        name: "k".into(),
        hash: [4; 32],
        created_at: t0(),
        revoked_at: None,
    };
    store.insert_api_key(&key, &[]).await.unwrap();
    let other = tenant(&store, "other").await;
    assert!(
        !store
            .revoke_api_key(&other.id, &key.id, t0(), &[])
            .await
            .unwrap(),
        "another tenant revoked it"
    );
    assert!(
        store
            .revoke_api_key(&t.id, &key.id, t0(), &[])
            .await
            .unwrap()
    );
    assert!(
        !store
            .revoke_api_key(&t.id, &key.id, t0(), &[])
            .await
            .unwrap()
    );
    assert!(
        store
            .find_api_key(&[4; 32])
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_some()
    );
}

// ---------------------------------------------------------------- service over the store

/// The core service over `store`, with a fake clock.
pub async fn service(store: Arc<dyn Store>) -> (Arc<Otpgate>, Arc<FakeClock>) {
    let clock = FakeClock::new();
    let core = Otpgate::open(
        store,
        clock.clone(),
        MasterKey::from_bytes([42; 32]),
        Policy::default(),
        PasswordHasher::owasp().unwrap(),
    )
    .await
    .unwrap();
    (Arc::new(core), clock)
}

/// The code most recently queued for `destination`, read from the outbox by a claim.
async fn queued_code(store: &Arc<dyn Store>, clock: &FakeClock) -> String {
    let now = clock.now();
    let claimed = store
        .claim_outbox(now, now + Duration::from_secs(1), 100)
        .await
        .unwrap();
    claimed
        .last()
        .and_then(|m| m.code.clone())
        .expect("a queued code")
}

/// A user of `tenant` with a password and a phone, no e-mail, made through the service.
async fn phone_user(
    core: &Otpgate,
    tenant: &TenantId,
    username: &str,
    password: &str,
    phone: &str,
) -> User {
    core.create_user(
        tenant,
        NewUser {
            username: username.into(),
            password: SecretString::from(password),
            email: None,
            phone: Some(phone.into()),
            role: Role::User,
        },
        &ctx(),
    )
    .await
    .unwrap()
}

async fn started(core: &Otpgate, tenant: &TenantId) -> Challenge {
    core.start_verification(
        tenant,
        StartVerification {
            to: "+98 912 123 4567".into(),
            channel: Channel::Sms,
            locale: None,
        },
        &ctx(),
    )
    .await
    .unwrap()
    .challenge
}

pub async fn service_fifty_concurrent_right_codes_approve_once(store: Arc<dyn Store>) {
    // Arrange
    let (core, clock) = service(Arc::clone(&store)).await;
    let tenant = core.default_tenant().await.unwrap();
    let ch = started(&core, &tenant.id).await;
    let code = queued_code(&store, &clock).await;
    // Act
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (core, tenant, id, code) = (
                Arc::clone(&core),
                tenant.id.clone(),
                ch.id.to_string(),
                code.clone(),
            );
            tokio::spawn(async move { core.check_verification(&tenant, &id, &code, &ctx()).await })
        })
        .collect();
    let mut approved = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(outcome) => {
                assert_eq!(outcome.status, ChallengeStatus::Approved);
                approved += 1;
            }
            Err(e) => assert_eq!(e.code(), "conflict", "{e}"),
        }
    }
    // Assert
    assert_eq!(approved, 1);
}

pub async fn service_wrong_codes_kill_the_verification_after_five(store: Arc<dyn Store>) {
    let (core, clock) = service(Arc::clone(&store)).await;
    let tenant = core.default_tenant().await.unwrap();
    let ch = started(&core, &tenant.id).await;
    let right = queued_code(&store, &clock).await;
    let wrong = if right == "000000" {
        "111111"
    } else {
        "000000"
    };
    for left in (1..5).rev() {
        let outcome = core
            .check_verification(&tenant.id, ch.id.as_str(), wrong, &ctx())
            .await
            .unwrap();
        assert_eq!(
            (outcome.status, outcome.attempts_left),
            (ChallengeStatus::Pending, left)
        );
    }
    let last = core
        .check_verification(&tenant.id, ch.id.as_str(), wrong, &ctx())
        .await
        .unwrap();
    assert_eq!(last.status, ChallengeStatus::MaxAttemptsReached);
    let after = core
        .check_verification(&tenant.id, ch.id.as_str(), &right, &ctx())
        .await
        .unwrap();
    assert_eq!(
        after.status,
        ChallengeStatus::MaxAttemptsReached,
        "a dead challenge approved"
    );
}

pub async fn service_malformed_codes_touch_no_counter(store: Arc<dyn Store>) {
    let (core, _) = service(Arc::clone(&store)).await;
    let tenant = core.default_tenant().await.unwrap();
    let ch = started(&core, &tenant.id).await;
    for bad in ["12a456", "12345", "1234567", " ", "12 3456"] {
        let err = core
            .check_verification(&tenant.id, ch.id.as_str(), bad, &ctx())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "invalid_input", "{bad:?}");
    }
    assert_eq!(stored(&store, &ch).await.attempts, 0);
    // Persian digits are the same code as ASCII ones: a wrong one counts (a right one approves).
    let outcome = core
        .check_verification(&tenant.id, ch.id.as_str(), "۰۰۰۰۰۰", &ctx())
        .await
        .unwrap();
    if outcome.status != ChallengeStatus::Approved {
        assert_eq!(outcome.attempts_left, 4);
    }
}

pub async fn service_two_step_login_issues_one_session(store: Arc<dyn Store>) {
    let (core, clock) = service(Arc::clone(&store)).await;
    let tenant = core.default_tenant().await.unwrap();
    phone_user(
        &core,
        &tenant.id,
        "ali",
        "correct horse battery",
        "+989121234567",
    )
    .await;
    let wrong = core
        .login(&tenant.id, "ali", SecretString::from("nope"), &ctx())
        .await;
    assert_eq!(wrong.err().map(|e| e.code()), Some("invalid_credentials"));
    let unknown = core
        .login(&tenant.id, "reza", SecretString::from("nope"), &ctx())
        .await;
    assert_eq!(unknown.err().map(|e| e.code()), Some("invalid_credentials"));
    let started = core
        .login(
            &tenant.id,
            "ali",
            SecretString::from("correct horse battery"),
            &ctx(),
        )
        .await
        .unwrap();
    assert_eq!(started.channel, Channel::Sms);
    let code = queued_code(&store, &clock).await;
    let issued = core
        .confirm_login(&started.ticket, &code, &ctx())
        .await
        .unwrap();
    let (session, user) = core.authenticate_session(&issued.token).await.unwrap();
    assert_eq!(user.username.as_str(), "ali");
    // Stored under its ordered key (its time first), not its plain hash.
    let token = secrecy::ExposeSecret::expose_secret(&issued.token);
    assert_eq!(session.hash, otpgate_core::token::session_key(token));
    assert_ne!(session.hash, otpgate_core::token::hash_token(token));
    assert_eq!(
        session.expires_at - session.created_at,
        time::Duration::hours(10)
    );
    // The ticket is spent.
    let again = core.confirm_login(&started.ticket, &code, &ctx()).await;
    assert_eq!(again.err().map(|e| e.code()), Some("unauthorized"));
    core.revoke_session(&issued.token, &ctx()).await.unwrap();
    assert!(core.authenticate_session(&issued.token).await.is_err());
}

pub async fn service_a_session_stored_under_its_plain_hash_still_opens(store: Arc<dyn Store>) {
    // Arrange: a session of a token minted before session keys began with their time (128
    // random bits, stored under its SHA-256), and a token of the same shape never issued.
    let (core, clock) = service(Arc::clone(&store)).await;
    let tenant = core.default_tenant().await.unwrap();
    let user = phone_user(&core, &tenant.id, "leila", "pw-leila-1234", "+989121230001").await;
    let old_token = "5f0e3c9a7b21d4e68c0f1a2b3c4d5e6f";
    let now = clock.now();
    let old = Session {
        hash: otpgate_core::token::hash_token(old_token),
        tenant_id: tenant.id.clone(),
        user_id: user.id.clone(),
        created_at: now,
        expires_at: now + time::Duration::hours(10),
        revoked_at: None,
    };
    store.insert_session(&old, &[]).await.unwrap();
    let old_token = SecretString::from(old_token);
    // Act
    let opened = core.authenticate_session(&old_token).await;
    let stranger = core
        .authenticate_session(&SecretString::from("5f0e3c9a7b21d4e68c0f1a2b3c4d5e60"))
        .await;
    // Assert: it opens its user's session until it is revoked; the other token opens nothing.
    let (session, found) = opened.unwrap();
    assert_eq!((session.hash, found.id), (old.hash, user.id));
    assert_eq!(stranger.err().map(|e| e.code()), Some("unauthorized"));
    core.revoke_session(&old_token, &ctx()).await.unwrap();
    assert!(core.authenticate_session(&old_token).await.is_err());
}

pub async fn service_a_locked_accounts_right_code_is_refused_and_counted(store: Arc<dyn Store>) {
    // Arrange: step 1 done, then the account is locked before step 2.
    let (core, clock) = service(Arc::clone(&store)).await;
    let tenant = core.default_tenant().await.unwrap();
    let user = phone_user(&core, &tenant.id, "nima", "pw-nima-1234", "+989121230000").await;
    let started = core
        .login(
            &tenant.id,
            "nima",
            SecretString::from("pw-nima-1234"),
            &ctx(),
        )
        .await
        .unwrap();
    let code = queued_code(&store, &clock).await;
    store
        .lock_user(&tenant.id, &user.id, clock.now() + Duration::from_secs(900))
        .await
        .unwrap();
    // Act
    let refused = core.confirm_login(&started.ticket, &code, &ctx()).await;
    // Assert: refused like a wrong code, and counted against the challenge and the account.
    assert_eq!(refused.err().map(|e| e.code()), Some("code_rejected"));
    let counted = store.get_user(&tenant.id, &user.id).await.unwrap().unwrap();
    assert_eq!(counted.failed_logins, 1);
    assert!(counted.locked_until.is_some(), "the lock stays");
    // Once unlocked, the same right code on the same ticket completes the login.
    core.unlock_user(&tenant.id, "nima", &ctx()).await.unwrap();
    let issued = core
        .confirm_login(&started.ticket, &code, &ctx())
        .await
        .unwrap();
    assert!(core.authenticate_session(&issued.token).await.is_ok());
}

pub async fn service_totp_codes_work_once(store: Arc<dyn Store>) {
    let (core, clock) = service(Arc::clone(&store)).await;
    let tenant = core.default_tenant().await.unwrap();
    let user = core
        .create_user(
            &tenant.id,
            NewUser {
                username: "sara".into(),
                password: SecretString::from("pw-sara-1234"),
                email: Some("sara@example.com".into()),
                phone: None,
                role: Role::Admin,
            },
            &ctx(),
        )
        .await
        .unwrap();
    let enrolment = core
        .enroll_totp(&tenant.id, &user.id, true, &ctx())
        .await
        .unwrap();
    let secret = data_encoding_decode(&enrolment.secret_base32);
    let code = TotpParams::default()
        .code_at(&secret, clock.now().unix_timestamp())
        .unwrap();
    let first = core
        .login(
            &tenant.id,
            "sara",
            SecretString::from("pw-sara-1234"),
            &ctx(),
        )
        .await
        .unwrap();
    assert_eq!(first.channel, Channel::Totp);
    core.confirm_login(&first.ticket, &code, &ctx())
        .await
        .unwrap();
    // Same code, new ticket, same time step: refused (RFC 6238 §5.2).
    let second = core
        .login(
            &tenant.id,
            "sara",
            SecretString::from("pw-sara-1234"),
            &ctx(),
        )
        .await
        .unwrap();
    let replay = core.confirm_login(&second.ticket, &code, &ctx()).await;
    assert_eq!(replay.err().map(|e| e.code()), Some("code_rejected"));
    clock.advance(Duration::from_secs(30));
    let next = TotpParams::default()
        .code_at(&secret, clock.now().unix_timestamp())
        .unwrap();
    core.confirm_login(&second.ticket, &next, &ctx())
        .await
        .unwrap();
}

pub async fn service_recovery_codes_log_in_once(store: Arc<dyn Store>) {
    let (core, clock) = service(Arc::clone(&store)).await;
    let tenant = core.default_tenant().await.unwrap();
    let user = phone_user(&core, &tenant.id, "reza", "pw-reza-1234", "+989121234000").await;
    let enrolment = core
        .enroll_totp(&tenant.id, &user.id, true, &ctx())
        .await
        .unwrap();
    assert_eq!(enrolment.recovery_codes.len(), 10);
    use secrecy::ExposeSecret;
    let recovery = enrolment.recovery_codes[0].expose_secret().to_uppercase();
    let ticket = core
        .login(
            &tenant.id,
            "reza",
            SecretString::from("pw-reza-1234"),
            &ctx(),
        )
        .await
        .unwrap();
    core.confirm_login(&ticket.ticket, &recovery, &ctx())
        .await
        .unwrap();
    clock.advance(Duration::from_secs(60));
    let again = core
        .login(
            &tenant.id,
            "reza",
            SecretString::from("pw-reza-1234"),
            &ctx(),
        )
        .await
        .unwrap();
    let reused = core.confirm_login(&again.ticket, &recovery, &ctx()).await;
    assert_eq!(reused.err().map(|e| e.code()), Some("code_rejected"));
    assert_eq!(
        core.totp_status(&tenant.id, &user.id).await.unwrap(),
        (true, 9)
    );
}

fn data_encoding_decode(secret: &SecretString) -> Vec<u8> {
    use secrecy::ExposeSecret;
    otpgate_core::otp::secret_from_base32(secret.expose_secret()).unwrap()
}

/// The largest future a right code's check may be. Each is moved several times on its way into
/// the runtime (the handler's box, the layers' futures), so its size is paid on every request:
/// awaiting a rare path in place once made the acl check's future 3,984 bytes (now 232).
const HOT_FUTURE_LIMIT: usize = 1024;

pub async fn service_the_code_checks_futures_stay_small(store: Arc<dyn Store>) {
    let (core, _clock) = service(store).await;
    let tenant = core.default_tenant().await.unwrap();
    let (ticket, request) = (SecretString::from("t".repeat(40)), ctx());
    let login = core.confirm_login(&ticket, "123456", &request);
    let login_size = std::mem::size_of_val(&login);
    drop(login);
    let check = core.check_verification(&tenant.id, "id", "123456", &request);
    let check_size = std::mem::size_of_val(&check);
    drop(check);
    assert!(
        login_size <= HOT_FUTURE_LIMIT,
        "confirm_login's future is {login_size} bytes"
    );
    assert!(
        check_size <= HOT_FUTURE_LIMIT,
        "check_verification's future is {check_size} bytes"
    );
}
