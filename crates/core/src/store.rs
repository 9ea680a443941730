//! The storage port. Methods are shaped by use case, and each write that guards a security rule
//! is one atomic conditional update or one transaction inside the store ("consume the challenge
//! if its attempts are still N"), never a read-then-write in the core. Audit events passed to a
//! write are committed in the same transaction, so the trail cannot disagree with the state.

use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::error::StoreError;
use crate::model::{
    ApiKey, ApiKeyId, AuditEvent, Challenge, ChallengeId, ChallengeStatus, Device, FactorId,
    JwtKey, LoginTicket, MessageId, OutboxMessage, Session, Tenant, TenantId, TotpFactor, User,
    UserId,
};

/// Result of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// One statement and the plan the database picks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryPlan {
    /// What the statement is for (`"sweep login tickets"`).
    pub purpose: &'static str,
    /// The planner's description, one step per line.
    pub plan: String,
    /// Whether some step reads a whole table instead of going through an index.
    pub full_scan: bool,
}

impl std::fmt::Display for QueryPlan {
    /// `-- purpose (index)` or `-- purpose (FULL SCAN)`, then the plan's lines.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.full_scan { "FULL SCAN" } else { "index" };
        write!(f, "-- {} ({verdict})\n{}", self.purpose, self.plan)
    }
}

/// What a code check decided about the challenge it was shown, for [`Store::settle_challenge`].
#[derive(Debug, Clone)]
pub enum Verdict {
    /// The code matched: consume the challenge (pending, unexpired, attempts unchanged).
    Consume {
        /// The time of the check.
        now: OffsetDateTime,
        /// Written with the change.
        audit: Vec<AuditEvent>,
    },
    /// The code did not match: count one wrong attempt (the last allowed one kills it).
    CountFailure {
        /// The time of the check.
        now: OffsetDateTime,
        /// Written with the change.
        audit: Vec<AuditEvent>,
    },
    /// The challenge is no longer pending (its status then): nothing to change.
    Leave(ChallengeStatus),
}

/// Decides what a code check does to a challenge, given the challenge as read in the same
/// atomic step. It holds the rule (the core's); the store only carries the verdict out. It
/// may be called more than once for one check, each time with a newer read.
pub type ChallengeJudge = Arc<dyn Fn(&Challenge) -> Verdict + Send + Sync>;

/// A challenge as [`Store::settle_challenge`] read it, and the verdict that was carried out.
#[derive(Debug, Clone)]
pub struct Settled {
    /// The challenge before the change.
    pub challenge: Challenge,
    /// What was done.
    pub verdict: Verdict,
}

/// What a login's second step decided about the ticket, user and challenge it was shown, for
/// [`Store::settle_login`].
#[derive(Debug, Clone)]
pub enum LoginVerdict {
    /// A right code: carry out everything in the completion.
    Complete(Box<LoginCompletion>),
    /// Nothing to change here: the caller decides on the rows it was shown (a wrong code, a
    /// dead ticket, an authenticator or recovery code, a lost race).
    Leave,
}

/// Decides what a login's second step does, given its ticket, user and challenge as read in the
/// same atomic step. It holds the rule (the core's); the store only carries the verdict out. It
/// may be called more than once for one step, each time with the same rows.
pub type LoginJudge = Arc<dyn Fn(&LoginContext) -> LoginVerdict + Send + Sync>;

/// The rows [`Store::settle_login`] read, and the verdict that was carried out (`Leave` when a
/// completion lost its race: nothing was changed).
#[derive(Debug, Clone)]
pub struct SettledLogin {
    /// The ticket, user and challenge before any change.
    pub context: LoginContext,
    /// What was done.
    pub verdict: LoginVerdict,
}

/// A new code for a pending challenge (a resend).
#[derive(Debug, Clone)]
pub struct CodeReplacement {
    /// The challenge.
    pub id: ChallengeId,
    /// The send count seen when the resend was decided.
    pub expected_sends: u32,
    /// Keyed hash of the new code.
    pub code_hash: Vec<u8>,
    /// When the new code is queued.
    pub sent_at: OffsetDateTime,
    /// The new code's expiry.
    pub expires_at: OffsetDateTime,
}

/// A contact whose verification a right code completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contact {
    /// The user's phone (`mobile_verified_at`).
    Phone,
    /// The user's e-mail address (`email_verified_at`).
    Email,
}

/// A login ticket with the user and the challenge it names, as one read found them (`None` where
/// the row is gone or belongs to another tenant).
#[derive(Debug, Clone)]
pub struct LoginContext {
    pub ticket: LoginTicket,
    pub user: Option<User>,
    pub challenge: Option<Challenge>,
}

/// Everything a right code changes, in one transaction: the challenge consumed, and as the case
/// may be a login ticket spent, a TOTP step or recovery code used, a contact marked verified,
/// the user's failures reset and a session created.
#[derive(Debug, Clone)]
pub struct LoginCompletion {
    /// The user's tenant.
    pub tenant_id: TenantId,
    /// The user.
    pub user_id: UserId,
    /// A login ticket to spend (must be unused and unexpired at `now`).
    pub ticket_hash: Option<[u8; 32]>,
    /// The challenge, consumed if pending, unexpired and still at `expected_attempts`.
    pub challenge_id: ChallengeId,
    /// Attempts seen when the code was compared.
    pub expected_attempts: u32,
    /// For an authenticator code: the factor whose last step must advance to this step.
    pub totp_step: Option<(FactorId, i64)>,
    /// For a recovery code: its keyed hash, which must be the user's and unused.
    pub recovery_code: Option<[u8; 32]>,
    /// A contact to mark verified.
    pub verified: Option<Contact>,
    /// The session to create, if the login is complete.
    pub session: Option<Session>,
    /// The moment of the check.
    pub now: OffsetDateTime,
    /// Events to record with it.
    pub audit: Vec<AuditEvent>,
}

/// Everything a right phone code changes, in one transaction: the challenge consumed, the
/// user found (by tenant, phone and user type) or created from `candidate`, the contact marked
/// verified (and the e-mail address recorded when the user had none), the device recorded.
#[derive(Debug, Clone)]
pub struct PhoneCompletion {
    /// The challenge.
    pub challenge_id: ChallengeId,
    /// Attempts seen when the code was compared.
    pub expected_attempts: u32,
    /// The user to create when none exists yet.
    pub candidate: User,
    /// What the code verified.
    pub verified: Contact,
    /// The device signing in (its user id is set by the store).
    pub device: Device,
    /// The moment of the check.
    pub now: OffsetDateTime,
    /// Events to record with it.
    pub audit: Vec<AuditEvent>,
}

/// What a send limit counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendScope {
    /// Messages to one number or address.
    Destination(String),
    /// Messages to numbers starting with a country calling code (`+98`).
    CountryPrefix(String),
    /// Messages asked for from one IP address (or IPv6 /64).
    Ip(String),
    /// Messages sent for one account.
    User(UserId),
}

/// Where a value sealed under the master key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedKind {
    /// A TOTP factor's secret.
    TotpFactor,
    /// A tenant's JWT signing key.
    JwtKey,
    /// A server-wide secret (the code-hash key).
    ServerSecret,
}

/// One value sealed under the master key; its seal is bound to `id`.
#[derive(Debug, Clone)]
pub struct SealedSecret {
    /// Its table.
    pub kind: SealedKind,
    /// Its row's id (a factor id, a key id, a server secret's name).
    pub id: String,
    /// Nonce and ciphertext.
    pub sealed: Vec<u8>,
}

/// What became of the SMS codes sent to one number range in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RangeOutcomes {
    /// Codes whose fate is known: verified, or dead unverified (expired, out of attempts).
    /// Pending codes still in their lifetime and canceled ones are not counted.
    pub settled: u32,
    /// Of those, verified.
    pub verified: u32,
}

/// The storage port of the core. Both back-ends pass the same contract suite.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Whether the database answers.
    async fn ping(&self) -> StoreResult<()>;

    // --- tenants ---
    /// Inserts a tenant; `Conflict` when the name is taken.
    async fn insert_tenant(&self, tenant: &Tenant) -> StoreResult<()>;
    /// Inserts `candidate` as the default tenant unless one exists; returns the default tenant.
    async fn ensure_default_tenant(&self, candidate: &Tenant) -> StoreResult<Tenant>;
    /// A tenant by id.
    async fn get_tenant(&self, id: &TenantId) -> StoreResult<Option<Tenant>>;
    /// Replaces a tenant's own settings.
    async fn set_tenant_settings(
        &self,
        id: &TenantId,
        settings: &crate::policy::PolicyOverrides,
    ) -> StoreResult<bool>;

    // --- users ---
    /// Inserts a user; `Conflict` when the username is taken in the tenant.
    async fn insert_user(&self, user: &User, audit: &[AuditEvent]) -> StoreResult<()>;
    /// A user by normalised username.
    async fn find_user_by_username(
        &self,
        tenant: &TenantId,
        username: &str,
    ) -> StoreResult<Option<User>>;
    /// A user by phone number (E.164).
    async fn find_user_by_phone(&self, tenant: &TenantId, phone: &str)
    -> StoreResult<Option<User>>;
    /// A user by id.
    async fn get_user(&self, tenant: &TenantId, id: &UserId) -> StoreResult<Option<User>>;
    /// Adds one to the user's consecutive failures and returns the new count.
    async fn record_login_failure(
        &self,
        tenant: &TenantId,
        user: &UserId,
        audit: &[AuditEvent],
    ) -> StoreResult<u32>;
    /// Clears the user's failures and lock (an operator's unlock).
    async fn unlock_user(
        &self,
        tenant: &TenantId,
        user: &UserId,
        audit: &[AuditEvent],
    ) -> StoreResult<bool>;
    /// Locks the user until `until` (never shortens an existing lock).
    async fn lock_user(
        &self,
        tenant: &TenantId,
        user: &UserId,
        until: OffsetDateTime,
    ) -> StoreResult<()>;

    // --- API keys ---
    /// Inserts an API key.
    async fn insert_api_key(&self, key: &ApiKey, audit: &[AuditEvent]) -> StoreResult<()>;
    /// An API key by the hash of its secret.
    async fn find_api_key(&self, hash: &[u8; 32]) -> StoreResult<Option<ApiKey>>;

    // --- challenges ---
    /// Inserts a challenge and, in the same transaction, its outbox message.
    async fn insert_challenge(
        &self,
        challenge: &Challenge,
        message: Option<&OutboxMessage>,
        audit: &[AuditEvent],
    ) -> StoreResult<()>;
    /// A challenge by id, within its tenant.
    async fn get_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
    ) -> StoreResult<Option<Challenge>>;
    /// The newest pending, unexpired challenge for this purpose, channel and destination.
    async fn find_pending_challenge(
        &self,
        tenant: &TenantId,
        purpose: &str,
        destination: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Option<Challenge>>;
    /// Replaces the code of a pending challenge if its send count is still as expected,
    /// queueing `message` in the same transaction. False when another request won the race.
    async fn resend_challenge(
        &self,
        replacement: &CodeReplacement,
        message: &OutboxMessage,
        audit: &[AuditEvent],
    ) -> StoreResult<bool>;
    /// Counts one wrong check if the challenge is pending, unexpired and still at
    /// `expected_attempts`; the last allowed one moves it to `max_attempts_reached`.
    async fn record_failed_check(
        &self,
        id: &ChallengeId,
        expected_attempts: u32,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool>;
    /// Consumes the challenge (status `approved`) if it is pending, unexpired and still at
    /// `expected_attempts`. At most one caller ever gets `true`.
    async fn consume_challenge(
        &self,
        id: &ChallengeId,
        expected_attempts: u32,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool>;
    /// Reads the tenant's challenge, lets `judge` decide, and carries the verdict out, as one
    /// atomic step: no other check counts between the read and the change. `None` when the
    /// tenant has no such challenge.
    ///
    /// The default is [`settle_by_read_and_write`]. A store that can do better should: SQLite
    /// settles inside its writer, PostgreSQL settles many concurrent checks per statement.
    async fn settle_challenge(
        &self,
        tenant: &TenantId,
        id: &ChallengeId,
        judge: ChallengeJudge,
    ) -> StoreResult<Option<Settled>> {
        settle_by_read_and_write(self, tenant, id, &judge).await
    }
    /// Cancels a pending challenge; false if it was no longer pending.
    async fn cancel_challenge(
        &self,
        id: &ChallengeId,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool>;
    /// Messages queued within `scope` since `since` (for the send limits), counted up to
    /// `at_most`: a limit only asks whether it is reached, and a busy scope (every send from
    /// one backend's IP, a whole country) would otherwise cost a walk over all of its sends.
    async fn count_sends(
        &self,
        tenant: &TenantId,
        scope: &SendScope,
        since: OffsetDateTime,
        at_most: u32,
    ) -> StoreResult<u32>;
    /// [`Store::count_sends`] of one scope for several windows (`(since, at_most)` each), in
    /// their order: a number's own limits ask about the same sends twice (the short window and
    /// the day). A store may count them at once; the default counts one after another.
    async fn count_sends_in_windows(
        &self,
        tenant: &TenantId,
        scope: &SendScope,
        windows: &[(OffsetDateTime, u32)],
    ) -> StoreResult<Vec<u32>> {
        count_sends_one_window_at_a_time(self, tenant, scope, windows).await
    }

    /// Outcomes of SMS challenges to numbers starting with `prefix`, created after `since`,
    /// as of `now` (the SMS pumping circuit breaker's sample).
    async fn sms_range_outcomes(
        &self,
        tenant: &TenantId,
        prefix: &str,
        since: OffsetDateTime,
        now: OffsetDateTime,
    ) -> StoreResult<RangeOutcomes>;

    // --- logins and sessions ---
    /// Inserts a login ticket with its challenge, and the message when a code is sent.
    async fn insert_login_ticket(
        &self,
        ticket: &LoginTicket,
        challenge: &Challenge,
        message: Option<&OutboxMessage>,
        audit: &[AuditEvent],
    ) -> StoreResult<()>;
    /// A login ticket by its stored key ([`LoginTicket::hash`]).
    async fn get_login_ticket(&self, hash: &[u8; 32]) -> StoreResult<Option<LoginTicket>>;
    /// A login ticket by its stored key with its user and its challenge: what a login's second
    /// step reads first. A store may read the three at once (one snapshot, one round trip); the
    /// default reads them one after another.
    async fn get_login_context(&self, hash: &[u8; 32]) -> StoreResult<Option<LoginContext>> {
        let Some(ticket) = self.get_login_ticket(hash).await? else {
            return Ok(None);
        };
        let user = self.get_user(&ticket.tenant_id, &ticket.user_id).await?;
        let challenge = self
            .get_challenge(&ticket.tenant_id, &ticket.challenge_id)
            .await?;
        Ok(Some(LoginContext {
            ticket,
            user,
            challenge,
        }))
    }
    /// Applies a right code: everything in [`LoginCompletion`], all or nothing. False when any
    /// condition no longer held.
    async fn complete_login(&self, completion: &LoginCompletion) -> StoreResult<bool>;
    /// Reads the ticket with its user and challenge, lets `judge` decide, and carries a
    /// completion out, as one atomic step where the store can (`None`: no such ticket).
    ///
    /// The default is [`settle_login_by_read_and_write`]: the two steps one after the other,
    /// the completion's own conditions guarding the gap. SQLite settles inside its writer, whose
    /// page cache survives commits, where a reader's is emptied by each.
    async fn settle_login(
        &self,
        ticket_hash: &[u8; 32],
        judge: LoginJudge,
    ) -> StoreResult<Option<SettledLogin>> {
        settle_login_by_read_and_write(self, ticket_hash, &judge).await
    }
    /// Inserts a session outside a login (a panel session opened from an API token).
    async fn insert_session(&self, session: &Session, audit: &[AuditEvent]) -> StoreResult<()>;
    /// A session by token hash.
    async fn get_session(&self, hash: &[u8; 32]) -> StoreResult<Option<Session>>;
    /// Revokes an active session; false if it was not active.
    async fn revoke_session(
        &self,
        hash: &[u8; 32],
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool>;

    // --- TOTP ---
    /// Inserts a factor.
    async fn insert_totp_factor(
        &self,
        factor: &TotpFactor,
        audit: &[AuditEvent],
    ) -> StoreResult<()>;
    /// The user's factors, newest first.
    async fn list_totp_factors(
        &self,
        tenant: &TenantId,
        user: &UserId,
    ) -> StoreResult<Vec<TotpFactor>>;
    /// Advances the factor's last step to `step` if it is below it, confirming the factor if it
    /// was pending. False when the step was already used.
    async fn accept_totp_step(
        &self,
        factor: &FactorId,
        step: i64,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool>;

    /// Removes every TOTP factor and recovery code of the user.
    async fn delete_totp_factors(
        &self,
        tenant: &TenantId,
        user: &UserId,
        audit: &[AuditEvent],
    ) -> StoreResult<()>;
    /// Replaces the user's recovery codes with `hashes`, all unused.
    async fn replace_recovery_codes(
        &self,
        tenant: &TenantId,
        user: &UserId,
        hashes: &[[u8; 32]],
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<()>;
    /// Whether `hash` is one of the user's unused recovery codes.
    async fn has_unused_recovery_code(
        &self,
        tenant: &TenantId,
        user: &UserId,
        hash: &[u8; 32],
    ) -> StoreResult<bool>;
    /// How many unused recovery codes the user has.
    async fn count_unused_recovery_codes(
        &self,
        tenant: &TenantId,
        user: &UserId,
    ) -> StoreResult<u32>;

    // --- outbox ---
    /// Claims up to `limit` due queued messages: their next try moves to `lease_until`, so no
    /// other worker takes them meanwhile, and their tries count one up.
    async fn claim_outbox(
        &self,
        now: OffsetDateTime,
        lease_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<OutboxMessage>>;
    /// Marks a message sent and erases its body and code.
    async fn mark_message_sent(
        &self,
        id: &MessageId,
        provider_message_id: Option<&str>,
        audit: &[AuditEvent],
    ) -> StoreResult<()>;
    /// Schedules another try.
    async fn mark_message_retry(
        &self,
        id: &MessageId,
        next_attempt_at: OffsetDateTime,
        error: &str,
    ) -> StoreResult<()>;
    /// Marks a message failed and erases its body and code.
    async fn mark_message_failed(
        &self,
        id: &MessageId,
        error: &str,
        audit: &[AuditEvent],
    ) -> StoreResult<()>;
    /// The newest message of a challenge (for its delivery state).
    async fn latest_message_for(
        &self,
        challenge: &ChallengeId,
    ) -> StoreResult<Option<OutboxMessage>>;

    // --- phone-identified users, devices, JWT keys ---
    /// A user by phone and user type.
    async fn find_user_by_phone_and_type(
        &self,
        tenant: &TenantId,
        phone: &str,
        user_type: u16,
    ) -> StoreResult<Option<User>>;
    /// The newest challenge of a purpose to a destination, whatever its status.
    async fn latest_challenge(
        &self,
        tenant: &TenantId,
        purpose: &str,
        destination: &str,
    ) -> StoreResult<Option<Challenge>>;
    /// Applies a right phone code (see [`PhoneCompletion`]); the user, or `None` when a
    /// condition no longer held.
    async fn complete_phone_verification(
        &self,
        completion: &PhoneCompletion,
    ) -> StoreResult<Option<User>>;
    /// Inserts `candidate` as the tenant's active key unless one exists; returns the active key.
    async fn ensure_jwt_key(&self, candidate: &JwtKey) -> StoreResult<JwtKey>;
    /// Retires the active key (still verifying until `retire_until`) and makes `next` active.
    async fn rotate_jwt_key(
        &self,
        next: &JwtKey,
        retire_until: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<()>;
    /// The tenant's keys that verify at `now`: the active one and the retiring ones.
    async fn verifying_jwt_keys(
        &self,
        tenant: &TenantId,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<JwtKey>>;
    /// Records a JWT as revoked; false when it already was.
    async fn revoke_jti(
        &self,
        tenant: &TenantId,
        jti: &str,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool>;
    /// Whether a JWT was revoked.
    async fn is_jti_revoked(&self, jti: &str) -> StoreResult<bool>;
    /// Revokes an API key of the tenant; false when unknown or already revoked.
    async fn revoke_api_key(
        &self,
        tenant: &TenantId,
        id: &ApiKeyId,
        now: OffsetDateTime,
        audit: &[AuditEvent],
    ) -> StoreResult<bool>;

    // --- housekeeping ---
    /// Deletes up to `batch` rows of each kind that can no longer matter at `now`: expired login
    /// tickets, sessions and revocations, delivered or failed outbox rows older than
    /// `retention`, and challenges that expired more than `retention` ago and that nothing
    /// refers to. Returns how many rows went.
    async fn sweep(
        &self,
        now: OffsetDateTime,
        retention: std::time::Duration,
        batch: u32,
    ) -> StoreResult<u64>;

    /// Inserts many challenges at once, with no message and no audit event: bulk fixtures for
    /// benchmarks (a table with a million dead challenges) and imports.
    async fn insert_challenges(&self, challenges: &[Challenge]) -> StoreResult<()>;

    /// How the database runs each statement of the hot paths and of the sweeper, as its planner
    /// describes it: a diagnostic for operators and benchmarks, and a test that every one of
    /// them is served by an index.
    async fn query_plans(&self) -> StoreResult<Vec<QueryPlan>>;

    // --- audit ---
    // --- master key ---
    /// The server-wide secret `name` (sealed), inserting `candidate` when there is none yet.
    async fn ensure_server_secret(&self, name: &str, candidate: &[u8]) -> StoreResult<Vec<u8>>;
    /// Every value sealed under the master key.
    async fn sealed_secrets(&self) -> StoreResult<Vec<SealedSecret>>;
    /// Replaces sealed values, all or nothing: `Conflict` (and no change) when any of them is no
    /// longer what was read.
    async fn reseal_secrets(&self, changes: &[(SealedSecret, Vec<u8>)]) -> StoreResult<()>;

    /// Records events outside any other write.
    async fn insert_audit(&self, events: &[AuditEvent]) -> StoreResult<()>;
    /// The newest events of a tenant (optionally one user's), newest first.
    async fn list_audit(
        &self,
        tenant: &TenantId,
        user: Option<&UserId>,
        limit: u32,
    ) -> StoreResult<Vec<AuditEvent>>;
}

/// [`Store::count_sends_in_windows`] as one [`Store::count_sends`] per window: the trait's
/// default, and a store's way for the shapes it does not count at once.
pub async fn count_sends_one_window_at_a_time<S: Store + ?Sized>(
    store: &S,
    tenant: &TenantId,
    scope: &SendScope,
    windows: &[(OffsetDateTime, u32)],
) -> StoreResult<Vec<u32>> {
    let mut counts = Vec::with_capacity(windows.len());
    for (since, at_most) in windows {
        counts.push(store.count_sends(tenant, scope, *since, *at_most).await?);
    }
    Ok(counts)
}

/// [`Store::settle_login`] from the store's other methods: reads the three rows, then applies a
/// completion under its own conditions; one that no longer held changed nothing and is reported
/// as `Leave`, so the caller decides again on what it reads next.
pub async fn settle_login_by_read_and_write<S: Store + ?Sized>(
    store: &S,
    ticket_hash: &[u8; 32],
    judge: &LoginJudge,
) -> StoreResult<Option<SettledLogin>> {
    let Some(context) = store.get_login_context(ticket_hash).await? else {
        return Ok(None);
    };
    let verdict = match judge(&context) {
        LoginVerdict::Complete(done) if !store.complete_login(&done).await? => LoginVerdict::Leave,
        verdict => verdict,
    };
    Ok(Some(SettledLogin { context, verdict }))
}

/// [`Store::settle_challenge`] from the store's other methods: reads, then changes the challenge
/// only if its attempts are still those it read, and reads again when another check got there
/// first. The trait's default, and a batching store's way for a check that lost its race.
pub async fn settle_by_read_and_write<S: Store + ?Sized>(
    store: &S,
    tenant: &TenantId,
    id: &ChallengeId,
    judge: &ChallengeJudge,
) -> StoreResult<Option<Settled>> {
    for _ in 0..crate::service::MAX_RACE_RETRIES {
        let Some(challenge) = store.get_challenge(tenant, id).await? else {
            return Ok(None);
        };
        let verdict = judge(&challenge);
        let carried_out = match &verdict {
            Verdict::Consume { now, audit } => {
                store
                    .consume_challenge(id, challenge.attempts, *now, audit)
                    .await?
            }
            Verdict::CountFailure { now, audit } => {
                store
                    .record_failed_check(id, challenge.attempts, *now, audit)
                    .await?
            }
            Verdict::Leave(_) => true,
        };
        if carried_out {
            return Ok(Some(Settled { challenge, verdict }));
        }
    }
    Err(StoreError::Other(
        "challenge kept changing under the check".into(),
    ))
}
