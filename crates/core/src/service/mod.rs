//! The core's operations. Every dialect (acl, verify_login, digipay, native v1, the panel) and the
//! CLI calls these; none of them holds a rule of its own.
//!
//! A challenge moves `pending → approved | canceled | max_attempts_reached`, and a pending one
//! past its expiry reads as `expired`. Every move is a conditional update in the store keyed on
//! the state this code saw (status and attempts), so concurrent checks cannot both win: the
//! loser re-reads and answers from the new state.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::code::{OtpCode, RecoveryCode};
use crate::crypto::{MasterKey, random_bytes};
use crate::error::CoreError;
use crate::identity::{E164Phone, Email, LineType, Username};
use crate::message::{Templates, normalize_locale};
use crate::model::{
    ApiKey, ApiKeyId, AuditEvent, AuditKind, Challenge, ChallengeId, ChallengeStatus, Channel,
    DeliveryStatus, FactorId, LoginTicket, MessageId, OutboxMessage, Purpose, RequestContext, Role,
    Session, Tenant, TenantId, TotpFactor, User, UserId,
};
use crate::otp::{TotpParams, otpauth_uri, secret_to_base32};
use crate::password::PasswordHasher;
use crate::policy::Policy;
use crate::store::{
    ChallengeJudge, CodeReplacement, LoginCompletion, LoginContext, LoginJudge, LoginVerdict,
    SendScope, Settled, SettledLogin, Store, Verdict,
};
use crate::token::{
    hash_token, mint_api_key, mint_session_token, mint_ticket, session_keys, ticket_key,
};

mod keys;
mod phone;
mod seed;
mod verification;

pub use phone::{DeviceInfo, MAX_DEVICE_FIELD, PhoneIdentity, PhoneVerified, normalize_phone};
pub use verification::{VerifyLogin, VerifyLoginOutcome, VerifyType};

/// Result of core operations.
pub type CoreResult<T> = Result<T, CoreError>;

/// How many times a conditional update is retried after losing a race. Each loss means the
/// challenge moved on (attempts only grow, statuses only leave `pending`), so this bounds work.
pub(crate) const MAX_RACE_RETRIES: usize = 16;

/// TOTP window: one step either side (RFC 6238 §5.2).
const TOTP_WINDOW: i64 = 1;

/// Bytes in a new TOTP secret (160 bits, RFC 4226 §4's recommendation).
const TOTP_SECRET_BYTES: usize = 20;

/// A user to create.
pub struct NewUser {
    /// Login name.
    pub username: String,
    /// Password (hashed with argon2id; never stored or logged as given).
    pub password: SecretString,
    /// E-mail address, if any.
    pub email: Option<String>,
    /// Phone number in international form, if any.
    pub phone: Option<String>,
    /// Role.
    pub role: Role,
}

/// A request to send a verification code.
#[derive(Debug, Clone)]
pub struct StartVerification {
    /// Phone number (sms) or e-mail address (email).
    pub to: String,
    /// `Sms` or `Email`.
    pub channel: Channel,
    /// Locale of the message (`fa`, `en`, ...).
    pub locale: Option<String>,
}

/// The answer to a code check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    /// The challenge's status after the check.
    pub status: ChallengeStatus,
    /// Checks left (0 unless still pending).
    pub attempts_left: u32,
}

/// Step 1 of a login passed.
pub struct LoginStarted {
    /// The temporary ticket for step 2 (shown once).
    pub ticket: SecretString,
    /// How the code comes.
    pub channel: Channel,
    /// When the ticket expires.
    pub expires_at: OffsetDateTime,
    /// When another code may be asked for (SMS and e-mail only).
    pub resend_at: Option<OffsetDateTime>,
}

/// A session token was issued.
pub struct SessionIssued {
    /// The token (32 lowercase hex; shown once).
    pub token: SecretString,
    /// Its expiry.
    pub expires_at: OffsetDateTime,
    /// Whose it is.
    pub user: User,
}

/// A new code was queued.
#[derive(Debug, Clone)]
pub struct Resent {
    /// The challenge's new expiry.
    pub expires_at: OffsetDateTime,
    /// When the next resend is allowed.
    pub next_resend_at: OffsetDateTime,
}

/// A TOTP factor was enrolled.
pub struct TotpEnrolment {
    /// The factor.
    pub factor_id: FactorId,
    /// The secret in base32, for manual entry.
    pub secret_base32: SecretString,
    /// The `otpauth://` URI, for the QR code.
    pub uri: SecretString,
    /// Whether it is active already (operator enrolment) or waits for a first code.
    pub active: bool,
    /// Ten single-use recovery codes (shown once; stored only hashed).
    pub recovery_codes: Vec<SecretString>,
}

/// The destination recorded on authenticator challenges: nothing is sent, but the challenge is
/// the user's own, so its attempts count per user.
pub(crate) fn totp_destination(user: &UserId) -> String {
    format!("totp:{user}")
}

/// The stored key of a presented login ticket ([`ticket_key`]); anything that cannot be one is
/// refused before a read.
fn stored_ticket_key(ticket: &SecretString) -> CoreResult<[u8; 32]> {
    let text = ticket.expose_secret().trim();
    if text.is_empty() || text.len() > 200 {
        return Err(CoreError::Unauthorized);
    }
    Ok(ticket_key(text))
}

/// A new session token for `user` (shown once) and the record the store keeps of it.
pub(crate) fn new_session(
    policy: &Policy,
    user: &User,
    now: OffsetDateTime,
) -> CoreResult<(crate::token::Minted, Session)> {
    let minted = mint_session_token(now)?;
    let session = session_record(policy, user, minted.hash, now);
    Ok((minted, session))
}

/// The stored side of a session for `user` whose token hashes to `hash`.
fn session_record(policy: &Policy, user: &User, hash: [u8; 32], now: OffsetDateTime) -> Session {
    Session {
        hash,
        tenant_id: user.tenant_id.clone(),
        user_id: user.id.clone(),
        created_at: now,
        expires_at: now + policy.session_ttl,
        revoked_at: None,
    }
}

/// What a login's proof uses up besides its challenge: an authenticator's step, or a recovery
/// code (both `None` for an SMS or e-mail code).
struct LoginProof {
    totp_step: Option<(FactorId, i64)>,
    recovery_code: Option<[u8; 32]>,
}

/// What a right code at a login's second step changes: the ticket spent, the challenge consumed
/// (at the attempts it was judged at), the proof used up, the session created, and the two
/// events (counted by the caller once the completion is carried out).
fn login_completion(
    found: (&LoginTicket, &User, &Challenge),
    proof: LoginProof,
    session: Session,
    ctx: &RequestContext,
    now: OffsetDateTime,
) -> LoginCompletion {
    let (ticket, user, challenge) = found;
    let event =
        |kind, detail: String| audit_event(&user.tenant_id, Some(&user.id), kind, detail, ctx, now);
    LoginCompletion {
        tenant_id: user.tenant_id.clone(),
        user_id: user.id.clone(),
        ticket_hash: Some(ticket.hash),
        verified: None,
        challenge_id: challenge.id.clone(),
        expected_attempts: challenge.attempts,
        totp_step: proof.totp_step,
        recovery_code: proof.recovery_code,
        session: Some(session),
        now,
        audit: vec![
            event(
                AuditKind::OtpAccepted,
                format!("challenge {}", challenge.id),
            ),
            event(AuditKind::TokenIssued, "session".to_owned()),
        ],
    }
}

/// A step-1 login ticket for `user` answering `challenge`: the secret for the client, the
/// record for the store.
pub(crate) fn new_ticket(
    policy: &Policy,
    user: &User,
    challenge: &Challenge,
    now: OffsetDateTime,
) -> CoreResult<(crate::token::Minted, LoginTicket)> {
    let minted = mint_ticket(now)?;
    let ticket = LoginTicket {
        hash: minted.hash,
        tenant_id: user.tenant_id.clone(),
        user_id: user.id.clone(),
        challenge_id: challenge.id.clone(),
        channel: challenge.channel,
        created_at: now,
        expires_at: now + policy.login_ticket_ttl,
        used_at: None,
    };
    Ok((minted, ticket))
}

/// What the user offered at step 2 of a login.
enum Proof {
    /// A code from SMS, e-mail or the authenticator app.
    Code(OtpCode),
    /// The keyed hash of a recovery code.
    Recovery([u8; 32]),
}

/// Recovery codes issued per user.
pub const RECOVERY_CODES_PER_USER: usize = 10;

/// A verification as [`Otpgate::start_verification`] left it, with its message's state.
#[derive(Debug, Clone)]
pub struct StartedVerification {
    pub challenge: Challenge,
    /// The state of the message that carries its code (`None` where nothing is sent).
    pub delivery: Option<DeliveryState>,
}

/// A verification's delivery as the native API shows it.
#[derive(Debug, Clone)]
pub struct DeliveryState {
    /// Queued, sent or failed.
    pub status: DeliveryStatus,
    /// The provider's id, once sent.
    pub provider_message_id: Option<String>,
}

/// Which send rule refused a message.
#[derive(Debug, Clone, Copy)]
enum SendRule {
    DestinationWindow,
    DestinationDay,
    Ip,
    Account,
    Country,
    CountryNotAllowed,
    NumberType,
    CircuitOpen,
}

/// A refused send: the rule, a non-secret detail for the audit trail, and when to retry.
#[derive(Debug)]
struct SendRefusal {
    rule: SendRule,
    detail: String,
    retry_after: Duration,
}

impl SendRefusal {
    fn new(rule: SendRule, detail: String) -> Self {
        SendRefusal {
            rule,
            detail,
            retry_after: Duration::ZERO,
        }
    }

    /// Its name in metrics and audit events.
    fn decision(&self) -> &'static str {
        match self.rule {
            SendRule::DestinationWindow => "limit_destination_window",
            SendRule::DestinationDay => "limit_destination_day",
            SendRule::Ip => "limit_ip",
            SendRule::Account => "limit_account",
            SendRule::Country => "limit_country",
            SendRule::CountryNotAllowed => "country_not_allowed",
            SendRule::NumberType => "number_type",
            SendRule::CircuitOpen => "circuit_open",
        }
    }

    fn into_error(self) -> CoreError {
        match self.rule {
            SendRule::CountryNotAllowed => {
                CoreError::invalid("phone", "numbers of this country are not accepted here")
            }
            SendRule::NumberType => CoreError::invalid(
                "phone",
                "is not a mobile number that can receive text messages",
            ),
            _ => CoreError::RateLimited {
                retry_after: self.retry_after,
            },
        }
    }
}

/// An audit event, not yet counted (see [`count_event`]): for decisions that may be taken
/// more than once before one of them is carried out.
fn audit_event(
    tenant: &TenantId,
    user: Option<&UserId>,
    kind: AuditKind,
    detail: impl Into<String>,
    ctx: &RequestContext,
    at: OffsetDateTime,
) -> AuditEvent {
    AuditEvent {
        tenant_id: tenant.clone(),
        user_id: user.cloned(),
        kind,
        detail: detail.into(),
        context: ctx.clone(),
        at,
    }
}

/// Counts an event that was written, by kind, in the metrics.
fn count_event(kind: AuditKind) {
    metrics::counter!("otpgate_events_total", "kind" => kind.as_str()).increment(1);
}

/// Each tenant's rules as last read, and when; shared with the judges that run inside a store's
/// transaction (which cannot wait for a read of their own).
type PolicyCache = Arc<std::sync::Mutex<HashMap<TenantId, (std::time::Instant, Policy)>>>;

/// A tenant's rules from `cache`, if they were read less than [`POLICY_CACHE_TTL`] ago.
fn cached_policy(cache: &PolicyCache, tenant: &TenantId) -> Option<Policy> {
    let cache = cache.lock().ok()?;
    let (read_at, policy) = cache.get(tenant)?;
    (read_at.elapsed() < POLICY_CACHE_TTL).then(|| policy.clone())
}

/// The core service.
pub struct Otpgate {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    policy: Policy,
    hasher: PasswordHasher,
    master: MasterKey,
    code_key: [u8; 32],
    outbox_wake: Arc<Notify>,
    templates: Templates,
    policies: PolicyCache,
    api_keys: std::sync::Mutex<ApiKeyCache>,
    signing_keys: std::sync::Mutex<HashMap<TenantId, (std::time::Instant, Arc<SigningKey>)>>,
}

/// How long a tenant's JWT signing key is used before it is read again. A rotation through
/// this instance applies at once; one through another instance within this time (the retired
/// key verifies for a session's length after it, so what was signed meanwhile stays valid).
pub const SIGNING_KEY_CACHE_TTL: Duration = Duration::from_secs(1);

/// A tenant's JWT signing key, opened.
struct SigningKey {
    id: crate::model::KeyId,
    secret: secrecy::SecretSlice<u8>,
}

/// How long a tenant's rules are used before they are read again.
pub const POLICY_CACHE_TTL: Duration = Duration::from_secs(1);

/// How long a valid API key is trusted before it is read again. A key revoked through this
/// instance is refused at once; one revoked through another instance, within this time.
pub const API_KEY_CACHE_TTL: Duration = Duration::from_secs(1);

/// Valid API keys seen lately, by the hash of the key. Only keys that exist and are not
/// revoked are kept, so unknown keys (guesses) neither fill it nor skip the store.
#[derive(Default)]
struct ApiKeyCache {
    valid: HashMap<[u8; 32], (std::time::Instant, TenantId)>,
    /// Raised by every revocation, so that a read that began before a revocation committed
    /// cannot put the key back after the revocation emptied the cache.
    revocations: u64,
}

/// The most keys the cache holds; past it, it starts over (a deployment has a few keys).
const API_KEY_CACHE_LIMIT: usize = 10_000;

pub use keys::{Resealed, rotate_master_key};

impl Otpgate {
    /// Builds the service over an opened store: loads (or, on first start, creates) the
    /// code-hash key sealed in the database. `WrongMasterKey` when `master` does not open it.
    pub async fn open(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        master: MasterKey,
        policy: Policy,
        hasher: PasswordHasher,
    ) -> CoreResult<Self> {
        let code_key = keys::load_code_key(store.as_ref(), &master).await?;
        Ok(Otpgate {
            store,
            clock,
            policy,
            hasher,
            master,
            code_key,
            outbox_wake: Arc::new(Notify::new()),
            templates: Templates::default(),
            policies: PolicyCache::default(),
            api_keys: std::sync::Mutex::default(),
            signing_keys: std::sync::Mutex::default(),
        })
    }

    /// Uses `templates` for outgoing messages (checked when they were loaded).
    pub fn with_templates(mut self, templates: Templates) -> Self {
        self.templates = templates;
        self
    }

    /// The store (for the delivery worker and health checks).
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    /// The clock.
    pub fn clock(&self) -> Arc<dyn Clock> {
        Arc::clone(&self.clock)
    }

    /// Notified whenever a message is queued, so the worker need not poll.
    pub fn outbox_wake(&self) -> Arc<Notify> {
        Arc::clone(&self.outbox_wake)
    }

    fn event(
        &self,
        tenant: &TenantId,
        user: Option<&UserId>,
        kind: AuditKind,
        detail: impl Into<String>,
        ctx: &RequestContext,
        at: OffsetDateTime,
    ) -> AuditEvent {
        count_event(kind);
        audit_event(tenant, user, kind, detail, ctx, at)
    }

    // ---------------------------------------------------------------- tenants

    /// Creates a tenant.
    pub async fn create_tenant(&self, name: &str) -> CoreResult<Tenant> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(CoreError::invalid("name", "must be 1 to 100 characters"));
        }
        let tenant = Tenant {
            id: TenantId::generate()?,
            name: name.to_owned(),
            is_default: false,
            settings: Default::default(),
            created_at: self.clock.now(),
        };
        self.store.insert_tenant(&tenant).await?;
        Ok(tenant)
    }

    /// The store's plan of each hot and sweep statement (diagnostics; see
    /// [`Store::query_plans`]).
    pub async fn query_plans(&self) -> CoreResult<Vec<crate::store::QueryPlan>> {
        Ok(self.store.query_plans().await?)
    }

    /// The default tenant, created on first use.
    pub async fn default_tenant(&self) -> CoreResult<Tenant> {
        let candidate = Tenant {
            id: TenantId::generate()?,
            name: "default".to_owned(),
            is_default: true,
            settings: Default::default(),
            created_at: self.clock.now(),
        };
        Ok(self.store.ensure_default_tenant(&candidate).await?)
    }

    /// The rules in force for a tenant: the server's defaults with the tenant's own settings.
    ///
    /// Every operation needs them, and they change rarely: each tenant's are read from the
    /// store at most once per [`POLICY_CACHE_TTL`]. This instance's own changes apply at once;
    /// another instance's within that time.
    pub async fn policy_for(&self, tenant: &TenantId) -> CoreResult<Policy> {
        if let Some(policy) = cached_policy(&self.policies, tenant) {
            return Ok(policy);
        }
        let policy = self.tenant(tenant).await?.settings.apply(&self.policy);
        if let Ok(mut cache) = self.policies.lock() {
            cache.insert(tenant.clone(), (std::time::Instant::now(), policy.clone()));
        }
        Ok(policy)
    }

    /// Replaces a tenant's own settings (validated); returns the rules now in force.
    pub async fn set_tenant_settings(
        &self,
        tenant: &TenantId,
        settings: crate::policy::PolicyOverrides,
    ) -> CoreResult<Policy> {
        settings.validate()?;
        if !self.store.set_tenant_settings(tenant, &settings).await? {
            return Err(CoreError::NotFound);
        }
        if let Ok(mut cache) = self.policies.lock() {
            cache.remove(tenant);
        }
        self.policy_for(tenant).await
    }

    /// A tenant by id (`NotFound` when unknown).
    pub async fn tenant(&self, id: &TenantId) -> CoreResult<Tenant> {
        self.store.get_tenant(id).await?.ok_or(CoreError::NotFound)
    }

    // ---------------------------------------------------------------- users and keys

    /// Creates a user.
    pub async fn create_user(
        &self,
        tenant: &TenantId,
        new: NewUser,
        ctx: &RequestContext,
    ) -> CoreResult<User> {
        let username = Username::parse(&new.username)?;
        let email = new.email.as_deref().map(Email::parse).transpose()?;
        let phone = new.phone.as_deref().map(E164Phone::parse).transpose()?;
        crate::password::check_new_password(&new.password)?;
        let password_hash = self.hasher.hash(new.password).await?;
        let now = self.clock.now();
        let user = User {
            id: UserId::generate()?,
            tenant_id: tenant.clone(),
            username,
            email,
            phone,
            role: new.role,
            user_type: None,
            password_hash,
            mobile_verified_at: None,
            email_verified_at: None,
            failed_logins: 0,
            locked_until: None,
            created_at: now,
        };
        let audit = [self.event(tenant, Some(&user.id), AuditKind::UserCreated, "", ctx, now)];
        self.store.insert_user(&user, &audit).await?;
        Ok(user)
    }

    /// Records a request refused for bad input (no account is touched), so every call of a
    /// dialect leaves an audit event with where it came from.
    pub async fn record_rejected_request(
        &self,
        tenant: &TenantId,
        reason: &str,
        ctx: &RequestContext,
    ) -> CoreResult<()> {
        let event = self.event(
            tenant,
            None,
            AuditKind::RequestRejected,
            reason,
            ctx,
            self.clock.now(),
        );
        Ok(self.store.insert_audit(&[event]).await?)
    }

    /// The newest audit events of a user (login history), newest first.
    pub async fn user_events(
        &self,
        tenant: &TenantId,
        user: &UserId,
        limit: u32,
    ) -> CoreResult<Vec<AuditEvent>> {
        Ok(self
            .store
            .list_audit(tenant, Some(user), limit.min(500))
            .await?)
    }

    /// The newest audit events of a whole tenant, newest first, optionally of one kind
    /// (`send_refused` lists every send the limits and the pumping defence turned away).
    pub async fn tenant_events(
        &self,
        tenant: &TenantId,
        kind: Option<&str>,
        limit: u32,
    ) -> CoreResult<Vec<AuditEvent>> {
        let kind = kind.map(AuditKind::parse).transpose()?;
        let events = self.store.list_audit(tenant, None, 500).await?;
        Ok(events
            .into_iter()
            .filter(|e| kind.is_none_or(|k| e.kind == k))
            .take(limit.clamp(1, 500) as usize)
            .collect())
    }

    /// A user by id within a tenant (another tenant's user is `NotFound`).
    pub async fn user(&self, tenant: &TenantId, id: &str) -> CoreResult<User> {
        let id = UserId::parse(id)?;
        self.store
            .get_user(tenant, &id)
            .await?
            .ok_or(CoreError::NotFound)
    }

    /// Unlocks a user locked out by failed logins (an operator's decision).
    pub async fn unlock_user(
        &self,
        tenant: &TenantId,
        username: &str,
        ctx: &RequestContext,
    ) -> CoreResult<User> {
        let user = self.user_by_username(tenant, username).await?;
        let audit = [self.event(
            tenant,
            Some(&user.id),
            AuditKind::Unlocked,
            "",
            ctx,
            self.clock.now(),
        )];
        self.store.unlock_user(tenant, &user.id, &audit).await?;
        self.user_by_username(tenant, username).await
    }

    /// A user by username.
    pub async fn user_by_username(&self, tenant: &TenantId, username: &str) -> CoreResult<User> {
        let username = Username::parse(username)?;
        self.store
            .find_user_by_username(tenant, username.as_str())
            .await?
            .ok_or(CoreError::NotFound)
    }

    /// Creates an API key; the secret is returned once and stored only hashed.
    pub async fn create_api_key(
        &self,
        tenant: &TenantId,
        name: &str,
    ) -> CoreResult<(ApiKey, SecretString)> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(CoreError::invalid("name", "must be 1 to 100 characters"));
        }
        self.tenant(tenant).await?;
        let minted = mint_api_key()?;
        let now = self.clock.now();
        let key = ApiKey {
            id: ApiKeyId::generate()?,
            tenant_id: tenant.clone(),
            name: name.to_owned(),
            hash: minted.hash,
            created_at: now,
            revoked_at: None,
        };
        let audit = [self.event(
            tenant,
            None,
            AuditKind::ApiKeyCreated,
            format!("api key {} ({name})", key.id),
            &RequestContext::default(),
            now,
        )];
        self.store.insert_api_key(&key, &audit).await?;
        Ok((key, minted.secret))
    }

    /// The tenant an API key belongs to; `Unauthorized` for unknown or revoked keys.
    pub async fn authenticate_api_key(&self, presented: &SecretString) -> CoreResult<TenantId> {
        let text = presented.expose_secret().trim();
        if text.is_empty() || text.len() > 200 {
            return Err(CoreError::Unauthorized);
        }
        let hash = hash_token(text);
        let revocations = match self.api_keys.lock() {
            Ok(cache) => {
                if let Some((read_at, tenant)) = cache.valid.get(&hash)
                    && read_at.elapsed() < API_KEY_CACHE_TTL
                {
                    return Ok(tenant.clone());
                }
                Some(cache.revocations)
            }
            Err(_) => None,
        };
        let read_at = std::time::Instant::now();
        match self.store.find_api_key(&hash).await? {
            Some(key) if key.revoked_at.is_none() => {
                if let Ok(mut cache) = self.api_keys.lock()
                    && Some(cache.revocations) == revocations
                {
                    if cache.valid.len() >= API_KEY_CACHE_LIMIT {
                        cache.valid.clear();
                    }
                    cache.valid.insert(hash, (read_at, key.tenant_id.clone()));
                }
                Ok(key.tenant_id)
            }
            _ => Err(CoreError::Unauthorized),
        }
    }

    /// Forgets every cached API key; called once a revocation has committed.
    fn forget_api_keys(&self) {
        if let Ok(mut cache) = self.api_keys.lock() {
            cache.revocations += 1;
            cache.valid.clear();
        }
    }

    // ---------------------------------------------------------------- codes

    fn parse_destination(channel: Channel, to: &str) -> CoreResult<String> {
        match channel {
            Channel::Sms => Ok(E164Phone::parse(to)
                .map_err(|_| CoreError::invalid("to", "is not a valid phone number in E.164 form"))?
                .as_str()
                .to_owned()),
            Channel::Email => Ok(Email::parse(to)
                .map_err(|_| CoreError::invalid("to", "is not a valid e-mail address"))?
                .as_str()
                .to_owned()),
            Channel::Totp => Err(CoreError::invalid("channel", "must be sms or email")),
        }
    }

    /// Refuses a send over any of the tenant's send limits: per destination per window and per
    /// day, per client IP (IPv6 /64) per hour, per account per hour, and per country calling
    /// code per hour; and, for SMS, a country outside the allowlist, a number the plan marks
    /// premium-rate or not mobile, or a number range whose codes are rarely verified (the SMS
    /// pumping circuit breaker). Nothing is queued when one applies; every refusal is an audit
    /// event and a metric, and the answer says when to retry.
    async fn check_send_budget(
        &self,
        policy: &Policy,
        tenant: &TenantId,
        destination: &str,
        ctx: &RequestContext,
        user: Option<&UserId>,
        now: OffsetDateTime,
    ) -> CoreResult<()> {
        let phone = E164Phone::parse(destination).ok();
        let channel = if phone.is_some() { "sms" } else { "email" };
        match self
            .send_refusal(policy, tenant, destination, phone.as_ref(), ctx, user, now)
            .await?
        {
            None => {
                metrics::counter!("otpgate_send_decisions_total", "channel" => channel, "decision" => "allowed")
                    .increment(1);
                Ok(())
            }
            Some(refusal) => {
                metrics::counter!(
                    "otpgate_send_decisions_total",
                    "channel" => channel,
                    "decision" => refusal.decision()
                )
                .increment(1);
                tracing::info!(decision = refusal.decision(), detail = %refusal.detail, "send refused");
                self.store
                    .insert_audit(&[self.event(
                        tenant,
                        user,
                        AuditKind::SendRefused,
                        format!("{}: {}", refusal.decision(), refusal.detail),
                        ctx,
                        now,
                    )])
                    .await?;
                Err(refusal.into_error())
            }
        }
    }

    /// The first rule that refuses this send, if any.
    #[allow(clippy::too_many_arguments)]
    async fn send_refusal(
        &self,
        policy: &Policy,
        tenant: &TenantId,
        destination: &str,
        phone: Option<&E164Phone>,
        ctx: &RequestContext,
        user: Option<&UserId>,
        now: OffsetDateTime,
    ) -> CoreResult<Option<SendRefusal>> {
        if let Some(phone) = phone {
            if let Some(allowed) = &policy.allowed_country_codes
                && !allowed.iter().any(|code| code == phone.country_prefix())
            {
                return Ok(Some(SendRefusal::new(
                    SendRule::CountryNotAllowed,
                    format!("country {} is not on the allowlist", phone.country_prefix()),
                )));
            }
            let line = phone.line_type();
            if line == LineType::PremiumRate
                || (policy.refuse_non_mobile_numbers && !line.takes_sms())
            {
                return Ok(Some(SendRefusal::new(
                    SendRule::NumberType,
                    format!(
                        "{} number in {}",
                        line.as_str(),
                        phone.range_prefix(policy.pumping_prefix_digits)
                    ),
                )));
            }
        }
        let hour = Duration::from_secs(3600);
        let mut limits = vec![
            (
                SendRule::DestinationWindow,
                SendScope::Destination(destination.to_owned()),
                policy.send_window,
                policy.max_sends_per_window,
            ),
            (
                SendRule::DestinationDay,
                SendScope::Destination(destination.to_owned()),
                Duration::from_secs(24 * 3600),
                policy.max_sends_per_day,
            ),
        ];
        if let Some(ip) = ctx.ip_key() {
            limits.push((
                SendRule::Ip,
                SendScope::Ip(ip),
                hour,
                policy.max_sends_per_ip_per_hour,
            ));
        }
        if let Some(user) = user {
            limits.push((
                SendRule::Account,
                SendScope::User(user.clone()),
                hour,
                policy.max_sends_per_account_per_hour,
            ));
        }
        if let Some(phone) = phone {
            limits.push((
                SendRule::Country,
                SendScope::CountryPrefix(phone.country_prefix().to_owned()),
                hour,
                policy.max_sends_per_country_per_hour,
            ));
        }
        // A limit of 0 is off (only the per-destination ones are always on).
        limits.retain(|(_, _, _, max)| *max > 0);
        // The limits of one scope are counted together; the first rule reached refuses.
        for group in limits.chunk_by(|a, b| a.1 == b.1) {
            let Some((_, scope, _, _)) = group.first() else {
                continue;
            };
            let windows: Vec<_> = group
                .iter()
                .map(|(_, _, window, max)| (now - *window, *max))
                .collect();
            let counts = self
                .store
                .count_sends_in_windows(tenant, scope, &windows)
                .await?;
            if counts.len() != windows.len() {
                // A limit without its count must not pass unchecked.
                return Err(crate::StoreError::Other(
                    "send counts do not match their windows".into(),
                )
                .into());
            }
            for ((rule, _, window, max), sent) in group.iter().zip(counts) {
                if sent >= *max {
                    return Ok(Some(SendRefusal {
                        rule: *rule,
                        detail: format!("{sent} of {max} sends in {} s", window.as_secs()),
                        retry_after: *window,
                    }));
                }
            }
        }
        if let Some(phone) = phone
            && policy.pumping_min_verified_percent > 0
        {
            let range = phone.range_prefix(policy.pumping_prefix_digits);
            let outcomes = self
                .store
                .sms_range_outcomes(tenant, range, now - policy.pumping_window, now)
                .await?;
            if outcomes.settled >= policy.pumping_min_sample
                && u64::from(outcomes.verified) * 100
                    < u64::from(outcomes.settled) * u64::from(policy.pumping_min_verified_percent)
            {
                return Ok(Some(SendRefusal {
                    rule: SendRule::CircuitOpen,
                    detail: format!(
                        "{range}: {} of {} codes verified in {} s, below {}%",
                        outcomes.verified,
                        outcomes.settled,
                        policy.pumping_window.as_secs(),
                        policy.pumping_min_verified_percent
                    ),
                    retry_after: policy.pumping_window,
                }));
            }
        }
        Ok(None)
    }

    fn cooldown_left(
        &self,
        policy: &Policy,
        challenge: &Challenge,
        now: OffsetDateTime,
    ) -> Option<Duration> {
        let ready_at = challenge.last_sent_at + policy.resend_cooldown;
        (now < ready_at).then(|| (ready_at - now).unsigned_abs().max(Duration::from_secs(1)))
    }

    fn new_message(
        &self,
        policy: &Policy,
        challenge: &Challenge,
        code: &OtpCode,
        ctx: &RequestContext,
        now: OffsetDateTime,
    ) -> CoreResult<OutboxMessage> {
        let ttl_minutes = policy.code_ttl(challenge.channel).as_secs().div_ceil(60);
        Ok(OutboxMessage {
            id: MessageId::generate_at(now)?,
            tenant_id: challenge.tenant_id.clone(),
            challenge_id: Some(challenge.id.clone()),
            channel: challenge.channel,
            destination: challenge.destination.clone(),
            purpose: challenge.purpose,
            locale: challenge.locale.clone(),
            body: Some(self.templates.render(
                &policy.product_name,
                challenge.purpose,
                &challenge.locale,
                code.expose(),
                ttl_minutes,
            )),
            code: Some(code.expose().to_owned()),
            status: DeliveryStatus::Queued,
            attempts: 0,
            next_attempt_at: now,
            created_at: now,
            provider_message_id: None,
            last_error: None,
            client_ip: ctx.ip_key(),
            user_id: challenge.user_id.clone(),
        })
    }

    /// A new pending challenge with a fresh code, and (for SMS and e-mail) its message.
    #[allow(clippy::too_many_arguments)]
    fn new_challenge(
        &self,
        policy: &Policy,
        tenant: &TenantId,
        user: Option<&UserId>,
        purpose: Purpose,
        channel: Channel,
        destination: String,
        locale: String,
        ctx: &RequestContext,
        now: OffsetDateTime,
    ) -> CoreResult<(Challenge, Option<OutboxMessage>)> {
        let code = OtpCode::generate(policy.code_length)?;
        self.challenge_with_code(
            policy,
            tenant,
            user,
            purpose,
            channel,
            destination,
            locale,
            &code,
            ctx,
            now,
        )
    }

    /// [`Otpgate::new_challenge`] with a given code (the benchmark fixtures choose theirs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn challenge_with_code(
        &self,
        policy: &Policy,
        tenant: &TenantId,
        user: Option<&UserId>,
        purpose: Purpose,
        channel: Channel,
        destination: String,
        locale: String,
        code: &OtpCode,
        ctx: &RequestContext,
        now: OffsetDateTime,
    ) -> CoreResult<(Challenge, Option<OutboxMessage>)> {
        let id = ChallengeId::generate_at(now)?;
        let code_hash = match channel {
            Channel::Totp => Vec::new(),
            Channel::Sms | Channel::Email => code.keyed_hash(&self.code_key, id.as_str()).to_vec(),
        };
        let ttl = match channel {
            Channel::Totp => policy.login_ticket_ttl,
            other => policy.code_ttl(other),
        };
        let challenge = Challenge {
            id,
            tenant_id: tenant.clone(),
            user_id: user.cloned(),
            purpose,
            channel,
            destination,
            code_hash,
            locale,
            created_at: now,
            expires_at: now + ttl,
            last_sent_at: now,
            send_count: u32::from(channel != Channel::Totp),
            attempts: 0,
            max_attempts: policy.max_checks,
            status: ChallengeStatus::Pending,
        };
        let message = match channel {
            Channel::Totp => None,
            _ => Some(self.new_message(policy, &challenge, code, ctx, now)?),
        };
        Ok((challenge, message))
    }

    /// Sends a verification code (native API). A pending verification to the same destination
    /// is reused with a new code, within the resend cool-down and the send budget.
    pub async fn start_verification(
        &self,
        tenant: &TenantId,
        request: StartVerification,
        ctx: &RequestContext,
    ) -> CoreResult<StartedVerification> {
        let policy = self.policy_for(tenant).await?;
        let destination = Self::parse_destination(request.channel, &request.to)?;
        let locale = normalize_locale(request.locale.as_deref());
        let now = self.clock.now();
        if let Some(existing) = self
            .store
            .find_pending_challenge(tenant, Purpose::Verify.as_str(), &destination, now)
            .await?
            && existing.channel == request.channel
        {
            self.resend(&policy, &existing, None, ctx).await?;
            let challenge = self
                .store
                .get_challenge(tenant, &existing.id)
                .await?
                .ok_or(CoreError::NotFound)?;
            let delivery = self.delivery_state(&challenge.id).await?;
            return Ok(StartedVerification {
                challenge,
                delivery,
            });
        }
        self.check_send_budget(&policy, tenant, &destination, ctx, None, now)
            .await?;
        let (challenge, message) = self.new_challenge(
            &policy,
            tenant,
            None,
            Purpose::Verify,
            request.channel,
            destination,
            locale,
            ctx,
            now,
        )?;
        let audit = [self.event(
            tenant,
            None,
            AuditKind::OtpSent,
            format!(
                "verification {} by {}",
                challenge.id,
                challenge.channel.as_str()
            ),
            ctx,
            now,
        )];
        self.store
            .insert_challenge(&challenge, message.as_ref(), &audit)
            .await?;
        self.outbox_wake.notify_one();
        // The message was queued by this very write: its state needs no read back.
        let delivery = message.map(|m| DeliveryState {
            status: m.status,
            provider_message_id: m.provider_message_id,
        });
        Ok(StartedVerification {
            challenge,
            delivery,
        })
    }

    /// Queues a new code for a pending SMS or e-mail challenge.
    async fn resend(
        &self,
        policy: &Policy,
        challenge: &Challenge,
        user: Option<&UserId>,
        ctx: &RequestContext,
    ) -> CoreResult<Resent> {
        let now = self.clock.now();
        if challenge.status_at(now) != ChallengeStatus::Pending
            || challenge.channel == Channel::Totp
        {
            return Err(CoreError::Conflict(
                "there is no pending code to resend".into(),
            ));
        }
        if let Some(retry_after) = self.cooldown_left(policy, challenge, now) {
            return Err(CoreError::RateLimited { retry_after });
        }
        self.check_send_budget(
            policy,
            &challenge.tenant_id,
            &challenge.destination,
            ctx,
            user,
            now,
        )
        .await?;
        let code = OtpCode::generate(policy.code_length)?;
        let hash = code.keyed_hash(&self.code_key, challenge.id.as_str());
        let expires_at = now + policy.code_ttl(challenge.channel);
        let message = self.new_message(policy, challenge, &code, ctx, now)?;
        let audit = [self.event(
            &challenge.tenant_id,
            user,
            AuditKind::OtpSent,
            format!(
                "challenge {} resent by {}",
                challenge.id,
                challenge.channel.as_str()
            ),
            ctx,
            now,
        )];
        let won = self
            .store
            .resend_challenge(
                &CodeReplacement {
                    id: challenge.id.clone(),
                    expected_sends: challenge.send_count,
                    code_hash: hash.to_vec(),
                    sent_at: now,
                    expires_at,
                },
                &message,
                &audit,
            )
            .await?;
        if !won {
            // Another request resent it a moment ago: that one's cool-down applies.
            return Err(CoreError::RateLimited {
                retry_after: policy.resend_cooldown,
            });
        }
        self.outbox_wake.notify_one();
        Ok(Resent {
            expires_at,
            next_resend_at: now + policy.resend_cooldown,
        })
    }

    /// A verification by id (tenant-scoped: another tenant's id is `NotFound`).
    pub async fn get_verification(&self, tenant: &TenantId, id: &str) -> CoreResult<Challenge> {
        let id = ChallengeId::parse(id)?;
        match self.store.get_challenge(tenant, &id).await? {
            Some(c) if c.purpose == Purpose::Verify => Ok(c),
            _ => Err(CoreError::NotFound),
        }
    }

    /// The delivery state of a verification's latest message.
    pub async fn delivery_state(
        &self,
        challenge: &ChallengeId,
    ) -> CoreResult<Option<DeliveryState>> {
        Ok(self
            .store
            .latest_message_for(challenge)
            .await?
            .map(|m| DeliveryState {
                status: m.status,
                provider_message_id: m.provider_message_id,
            }))
    }

    /// Checks a code against a verification.
    pub async fn check_verification(
        &self,
        tenant: &TenantId,
        id: &str,
        raw_code: &str,
        ctx: &RequestContext,
    ) -> CoreResult<CheckOutcome> {
        let policy = self.policy_for(tenant).await?;
        let id = ChallengeId::parse(id)?;
        // Parse before any read: malformed codes never touch a counter.
        let code = OtpCode::parse(raw_code, Some(usize::from(policy.code_length)))?;
        let judge: ChallengeJudge = {
            let (clock, code_key) = (Arc::clone(&self.clock), self.code_key);
            let (tenant, ctx) = (tenant.clone(), ctx.clone());
            Arc::new(move |challenge: &Challenge| {
                let now = clock.now();
                match challenge.status_at(now) {
                    ChallengeStatus::Pending => {}
                    other => return Verdict::Leave(other),
                }
                let matched = code.matches(&code_key, challenge.id.as_str(), &challenge.code_hash);
                let kind = if matched {
                    AuditKind::OtpAccepted
                } else {
                    AuditKind::OtpRejected
                };
                let detail = format!("verification {}", challenge.id);
                let audit = vec![audit_event(&tenant, None, kind, detail, &ctx, now)];
                if matched {
                    Verdict::Consume { now, audit }
                } else {
                    Verdict::CountFailure { now, audit }
                }
            })
        };
        let Settled { challenge, verdict } = self
            .store
            .settle_challenge(tenant, &id, judge)
            .await?
            .ok_or(CoreError::NotFound)?;
        match verdict {
            Verdict::Consume { audit, .. } => {
                audit.iter().for_each(|e| count_event(e.kind));
                Ok(CheckOutcome {
                    status: ChallengeStatus::Approved,
                    attempts_left: 0,
                })
            }
            Verdict::CountFailure { audit, .. } => {
                audit.iter().for_each(|e| count_event(e.kind));
                let left = challenge.attempts_left().saturating_sub(1);
                Ok(CheckOutcome {
                    status: if left == 0 {
                        ChallengeStatus::MaxAttemptsReached
                    } else {
                        ChallengeStatus::Pending
                    },
                    attempts_left: left,
                })
            }
            Verdict::Leave(ChallengeStatus::Approved) => Err(CoreError::Conflict(
                "verification was already approved".into(),
            )),
            Verdict::Leave(status) => Ok(CheckOutcome {
                status,
                attempts_left: 0,
            }),
        }
    }

    /// Cancels a pending verification.
    pub async fn cancel_verification(
        &self,
        tenant: &TenantId,
        id: &str,
        ctx: &RequestContext,
    ) -> CoreResult<Challenge> {
        let challenge = self.get_verification(tenant, id).await?;
        let now = self.clock.now();
        if challenge.status_at(now) != ChallengeStatus::Pending {
            return Err(CoreError::Conflict(format!(
                "verification is {}, not pending",
                challenge.status_at(now).as_str()
            )));
        }
        let audit = [self.event(
            tenant,
            None,
            AuditKind::OtpCanceled,
            format!("verification {}", challenge.id),
            ctx,
            now,
        )];
        if !self
            .store
            .cancel_challenge(&challenge.id, now, &audit)
            .await?
        {
            return Err(CoreError::Conflict(
                "verification is no longer pending".into(),
            ));
        }
        self.get_verification(tenant, challenge.id.as_str()).await
    }

    // ---------------------------------------------------------------- logins

    async fn active_totp_factor(
        &self,
        tenant: &TenantId,
        user: &UserId,
    ) -> CoreResult<Option<TotpFactor>> {
        Ok(self
            .store
            .list_totp_factors(tenant, user)
            .await?
            .into_iter()
            .find(|f| f.confirmed_at.is_some()))
    }

    /// Counts a failure against the account and locks it when the policy says so.
    async fn count_failure(
        &self,
        user: &User,
        detail: &str,
        ctx: &RequestContext,
        now: OffsetDateTime,
    ) -> CoreResult<()> {
        let policy = self.policy_for(&user.tenant_id).await?;
        let audit = [self.event(
            &user.tenant_id,
            Some(&user.id),
            AuditKind::LoginFailed,
            detail,
            ctx,
            now,
        )];
        let failures = self
            .store
            .record_login_failure(&user.tenant_id, &user.id, &audit)
            .await?;
        if let Some(pause) = policy.lockout_for(failures) {
            self.store
                .lock_user(&user.tenant_id, &user.id, now + pause)
                .await?;
            let audit = [self.event(
                &user.tenant_id,
                Some(&user.id),
                AuditKind::LockedOut,
                format!(
                    "{failures} consecutive failures; locked for {} s",
                    pause.as_secs()
                ),
                ctx,
                now,
            )];
            self.store.insert_audit(&audit).await?;
        }
        Ok(())
    }

    fn is_locked(user: &User, now: OffsetDateTime) -> bool {
        user.locked_until.is_some_and(|until| now < until)
    }

    /// Step 1 of a two-step login: checks the password and issues a ticket; sends the code by
    /// SMS (phone), else e-mail, unless the user has an authenticator factor, which wins.
    /// Unknown user, wrong password and locked account all answer `InvalidCredentials`, after
    /// one argon2 verification each.
    pub async fn login(
        &self,
        tenant: &TenantId,
        username: &str,
        password: SecretString,
        ctx: &RequestContext,
    ) -> CoreResult<LoginStarted> {
        let user = self
            .authenticate_password(tenant, username, password, ctx)
            .await?;
        self.issue_ticket(&user, Purpose::Login, None, ctx, self.clock.now())
            .await
    }

    /// Checks a password (the user named by username, or by phone number when no username
    /// matches). Unknown user, wrong password and locked account all answer
    /// `InvalidCredentials`, after one argon2 verification each; a wrong password counts
    /// towards the lock-out.
    pub async fn authenticate_password(
        &self,
        tenant: &TenantId,
        username: &str,
        password: SecretString,
        ctx: &RequestContext,
    ) -> CoreResult<User> {
        let mut user = match Username::parse(username) {
            Ok(name) => {
                self.store
                    .find_user_by_username(tenant, name.as_str())
                    .await?
            }
            Err(_) => None,
        };
        if user.is_none()
            && let Ok(phone) = E164Phone::parse(username)
        {
            user = self
                .store
                .find_user_by_phone(tenant, phone.as_str())
                .await?;
        }
        let stored_hash = user.as_ref().map(|u| u.password_hash.clone());
        let password_ok = self.hasher.verify(password, stored_hash).await?;
        let now = self.clock.now();
        let Some(user) = user else {
            self.store
                .insert_audit(&[self.event(
                    tenant,
                    None,
                    AuditKind::LoginFailed,
                    "unknown user",
                    ctx,
                    now,
                )])
                .await?;
            return Err(CoreError::InvalidCredentials);
        };
        if Self::is_locked(&user, now) {
            self.store
                .insert_audit(&[self.event(
                    tenant,
                    Some(&user.id),
                    AuditKind::LoginFailed,
                    "locked",
                    ctx,
                    now,
                )])
                .await?;
            return Err(CoreError::InvalidCredentials);
        }
        if !password_ok {
            self.count_failure(&user, "wrong password", ctx, now)
                .await?;
            return Err(CoreError::InvalidCredentials);
        }
        Ok(user)
    }

    /// Issues a login ticket for a user whose first factor was proven, with its challenge.
    /// `channel` forces SMS or e-mail; by default TOTP wins, then SMS, then e-mail.
    pub async fn issue_ticket(
        &self,
        user: &User,
        purpose: Purpose,
        channel: Option<Channel>,
        ctx: &RequestContext,
        now: OffsetDateTime,
    ) -> CoreResult<LoginStarted> {
        let policy = self.policy_for(&user.tenant_id).await?;
        let channel = match channel {
            Some(c) => c,
            None if self
                .active_totp_factor(&user.tenant_id, &user.id)
                .await?
                .is_some() =>
            {
                Channel::Totp
            }
            None if user.phone.is_some() => Channel::Sms,
            None if user.email.is_some() => Channel::Email,
            None => {
                return Err(CoreError::Conflict(
                    "the user has no phone, e-mail or authenticator".into(),
                ));
            }
        };
        let destination = match channel {
            Channel::Sms => user.phone.as_ref().map(|p| p.as_str().to_owned()),
            Channel::Email => user.email.as_ref().map(|e| e.as_str().to_owned()),
            Channel::Totp => Some(totp_destination(&user.id)),
        }
        .ok_or_else(|| CoreError::Conflict(format!("the user has no {}", channel.as_str())))?;
        if channel != Channel::Totp {
            self.check_send_budget(
                &policy,
                &user.tenant_id,
                &destination,
                ctx,
                Some(&user.id),
                now,
            )
            .await?;
            if let Some(pending) = self
                .store
                .find_pending_challenge(&user.tenant_id, purpose.as_str(), &destination, now)
                .await?
                && let Some(retry_after) = self.cooldown_left(&policy, &pending, now)
            {
                return Err(CoreError::RateLimited { retry_after });
            }
        }
        let locale = normalize_locale(ctx.locale.as_deref());
        let (challenge, message) = self.new_challenge(
            &policy,
            &user.tenant_id,
            Some(&user.id),
            purpose,
            channel,
            destination,
            locale,
            ctx,
            now,
        )?;
        let (minted, ticket) = new_ticket(&policy, user, &challenge, now)?;
        let mut audit = vec![self.event(
            &user.tenant_id,
            Some(&user.id),
            AuditKind::LoginPasswordOk,
            format!("login by {}", channel.as_str()),
            ctx,
            now,
        )];
        if message.is_some() {
            audit.push(self.event(
                &user.tenant_id,
                Some(&user.id),
                AuditKind::OtpSent,
                format!("challenge {} by {}", challenge.id, channel.as_str()),
                ctx,
                now,
            ));
        }
        self.store
            .insert_login_ticket(&ticket, &challenge, message.as_ref(), &audit)
            .await?;
        if message.is_some() {
            self.outbox_wake.notify_one();
        }
        Ok(LoginStarted {
            ticket: minted.secret,
            channel,
            expires_at: ticket.expires_at,
            resend_at: (channel != Channel::Totp).then(|| now + policy.resend_cooldown),
        })
    }

    async fn live_ticket(
        &self,
        ticket: &SecretString,
        now: OffsetDateTime,
    ) -> CoreResult<LoginTicket> {
        match self
            .store
            .get_login_ticket(&stored_ticket_key(ticket)?)
            .await?
        {
            Some(t) if t.is_live(now) => Ok(t),
            _ => Err(CoreError::Unauthorized),
        }
    }

    /// Step 2 of a login: checks the code (SMS, e-mail or authenticator) against the ticket and
    /// issues a session token. A wrong code counts against the challenge and the account; after
    /// the last attempt the ticket is dead. A locked account's right code is refused like a
    /// wrong one.
    ///
    /// A right SMS or e-mail code is settled in one step of the store ([`Store::settle_login`],
    /// judged by [`Self::code_login_judge`]); everything else (wrong codes, authenticator and
    /// recovery codes, dead tickets) is decided on the rows that step read.
    pub async fn confirm_login(
        &self,
        ticket: &SecretString,
        raw_code: &str,
        ctx: &RequestContext,
    ) -> CoreResult<SessionIssued> {
        let minted = mint_session_token(self.clock.now())?;
        let judge = self.code_login_judge(raw_code, minted.hash, ctx);
        let SettledLogin { context, verdict } = self
            .store
            .settle_login(&stored_ticket_key(ticket)?, judge)
            .await?
            .ok_or(CoreError::Unauthorized)?;
        if let LoginVerdict::Complete(done) = verdict {
            done.audit.iter().for_each(|e| count_event(e.kind));
            let (Some(user), Some(session)) = (context.user, done.session) else {
                return Err(CoreError::Internal(
                    "a completed login without its user or session".into(),
                ));
            };
            return Ok(SessionIssued {
                token: minted.secret,
                expires_at: session.expires_at,
                user,
            });
        }
        // Boxed: awaited in place, the slow path's state (about 3.7 KiB) made this future 16
        // times larger, and every login's future is moved several times on its way into the
        // runtime (the handler's box, the layers' futures); a right code never takes this path.
        Box::pin(self.confirm_login_on(context, raw_code, ctx)).await
    }

    /// The judge of a login's second step inside the store: completes the login when the code
    /// is the right SMS or e-mail code of a live ticket of an unlocked user, whose tenant's
    /// rules are at hand; leaves everything else to [`Self::confirm_login_on`], which decides
    /// the same way with the reads and counts the judge cannot do.
    fn code_login_judge(
        &self,
        raw_code: &str,
        session_hash: [u8; 32],
        ctx: &RequestContext,
    ) -> LoginJudge {
        let (clock, code_key) = (Arc::clone(&self.clock), self.code_key);
        let (policies, ctx) = (Arc::clone(&self.policies), ctx.clone());
        // A recovery code stands in for a code; it is checked against its own table.
        let raw_code = RecoveryCode::parse(raw_code)
            .is_none()
            .then(|| raw_code.to_owned());
        Arc::new(move |found: &LoginContext| {
            let now = clock.now();
            let (Some(raw_code), Some(user), Some(challenge)) =
                (&raw_code, &found.user, &found.challenge)
            else {
                return LoginVerdict::Leave;
            };
            if !found.ticket.is_live(now)
                || found.ticket.channel == Channel::Totp
                || Self::is_locked(user, now)
                || challenge.status_at(now) != ChallengeStatus::Pending
            {
                return LoginVerdict::Leave;
            }
            let Some(policy) = cached_policy(&policies, &found.ticket.tenant_id) else {
                return LoginVerdict::Leave;
            };
            let right =
                OtpCode::parse(raw_code, Some(usize::from(policy.code_length))).is_ok_and(|code| {
                    code.matches(&code_key, challenge.id.as_str(), &challenge.code_hash)
                });
            if !right {
                return LoginVerdict::Leave;
            }
            let session = session_record(&policy, user, session_hash, now);
            let proof = LoginProof {
                totp_step: None,
                recovery_code: None,
            };
            LoginVerdict::Complete(Box::new(login_completion(
                (&found.ticket, user, challenge),
                proof,
                session,
                &ctx,
                now,
            )))
        })
    }

    /// A login's second step decided on `found`, its ticket, user and challenge as read (and
    /// read again after a lost race).
    async fn confirm_login_on(
        &self,
        found: LoginContext,
        raw_code: &str,
        ctx: &RequestContext,
    ) -> CoreResult<SessionIssued> {
        let now = self.clock.now();
        let LoginContext {
            ticket,
            user,
            challenge,
        } = found;
        if !ticket.is_live(now) {
            return Err(CoreError::Unauthorized);
        }
        let policy = self.policy_for(&ticket.tenant_id).await?;
        let user = user.ok_or(CoreError::Unauthorized)?;
        let factor = match ticket.channel {
            Channel::Totp => Some(
                self.active_totp_factor(&user.tenant_id, &user.id)
                    .await?
                    .ok_or(CoreError::Unauthorized)?,
            ),
            _ => None,
        };
        let code_len = factor
            .as_ref()
            .map_or(policy.code_length, |f| f.params.digits);
        // A recovery code stands in for any method's code; anything else must be a code.
        let proof = match RecoveryCode::parse(raw_code) {
            Some(recovery) => {
                Proof::Recovery(recovery.keyed_hash(&self.code_key, user.id.as_str()))
            }
            None => Proof::Code(OtpCode::parse(raw_code, Some(usize::from(code_len)))?),
        };
        // The first pass judges the challenge read with the ticket; a pass after a lost race
        // reads it again.
        let mut first_read = Some(challenge);
        for _ in 0..MAX_RACE_RETRIES {
            let challenge = match first_read.take() {
                Some(read) => read,
                None => {
                    self.store
                        .get_challenge(&ticket.tenant_id, &ticket.challenge_id)
                        .await?
                }
            }
            .ok_or(CoreError::Unauthorized)?;
            let now = self.clock.now();
            if challenge.status_at(now) != ChallengeStatus::Pending {
                return Err(CoreError::CodeRejected {
                    attempts_left: None,
                });
            }
            let (matched, totp_step, recovery_code) = match (&proof, &factor) {
                (Proof::Recovery(hash), _) => {
                    let known = self
                        .store
                        .has_unused_recovery_code(&user.tenant_id, &user.id, hash)
                        .await?;
                    (known, None, Some(*hash))
                }
                (Proof::Code(code), Some(f)) => {
                    let step = self.totp_step_for(f, code, now)?.map(|s| (f.id.clone(), s));
                    (step.is_some(), step, None)
                }
                (Proof::Code(code), None) => {
                    let hit =
                        code.matches(&self.code_key, challenge.id.as_str(), &challenge.code_hash);
                    (hit, None, None)
                }
            };
            if matched && !Self::is_locked(&user, now) {
                let (minted, session) = new_session(&policy, &user, now)?;
                let proof = LoginProof {
                    totp_step,
                    recovery_code,
                };
                let completion = login_completion(
                    (&ticket, &user, &challenge),
                    proof,
                    session.clone(),
                    ctx,
                    now,
                );
                if self.store.complete_login(&completion).await? {
                    completion.audit.iter().for_each(|e| count_event(e.kind));
                    return Ok(SessionIssued {
                        token: minted.secret,
                        expires_at: session.expires_at,
                        user,
                    });
                }
                // Lost a race (or the TOTP step was just used): re-read and decide again.
                continue;
            }
            let audit = [self.event(
                &user.tenant_id,
                Some(&user.id),
                AuditKind::OtpRejected,
                format!("challenge {}", challenge.id),
                ctx,
                now,
            )];
            if self
                .store
                .record_failed_check(&challenge.id, challenge.attempts, now, &audit)
                .await?
            {
                self.count_failure(&user, "wrong code", ctx, now).await?;
                let left = challenge.attempts_left().saturating_sub(1);
                return Err(CoreError::CodeRejected {
                    attempts_left: Some(left),
                });
            }
        }
        Err(CoreError::CodeRejected {
            attempts_left: None,
        })
    }

    /// Queues a new code for a live SMS or e-mail login ticket.
    pub async fn resend_login_code(
        &self,
        ticket: &SecretString,
        ctx: &RequestContext,
    ) -> CoreResult<Resent> {
        let now = self.clock.now();
        let ticket = self.live_ticket(ticket, now).await?;
        let challenge = self
            .store
            .get_challenge(&ticket.tenant_id, &ticket.challenge_id)
            .await?
            .ok_or(CoreError::Unauthorized)?;
        if challenge.status_at(now) == ChallengeStatus::Expired {
            return Err(CoreError::Unauthorized);
        }
        let policy = self.policy_for(&ticket.tenant_id).await?;
        self.resend(&policy, &challenge, Some(&ticket.user_id), ctx)
            .await
    }

    /// The session and user a token opens; `Unauthorized` for missing, expired, revoked tokens.
    pub async fn authenticate_session(&self, token: &SecretString) -> CoreResult<(Session, User)> {
        let text = token.expose_secret().trim();
        if text.is_empty() || text.len() > 200 {
            return Err(CoreError::Unauthorized);
        }
        let now = self.clock.now();
        let (key, legacy_key) = session_keys(text);
        let found = match self.store.get_session(&key).await? {
            None => match legacy_key {
                Some(legacy) => self.store.get_session(&legacy).await?,
                None => None,
            },
            found => found,
        };
        let session = match found {
            Some(s) if s.is_active(now) => s,
            _ => return Err(CoreError::Unauthorized),
        };
        let user = self
            .store
            .get_user(&session.tenant_id, &session.user_id)
            .await?
            .ok_or(CoreError::Unauthorized)?;
        Ok((session, user))
    }

    /// Revokes a session token.
    pub async fn revoke_session(
        &self,
        token: &SecretString,
        ctx: &RequestContext,
    ) -> CoreResult<()> {
        let (session, _) = self.authenticate_session(token).await?;
        let now = self.clock.now();
        let audit = [self.event(
            &session.tenant_id,
            Some(&session.user_id),
            AuditKind::TokenRevoked,
            "session",
            ctx,
            now,
        )];
        if self
            .store
            .revoke_session(&session.hash, now, &audit)
            .await?
        {
            Ok(())
        } else {
            Err(CoreError::Unauthorized)
        }
    }

    // ---------------------------------------------------------------- TOTP

    fn totp_secret(&self, factor: &TotpFactor) -> CoreResult<Vec<u8>> {
        self.master
            .open(&factor.secret_sealed, factor.id.as_str().as_bytes())
    }

    /// The time step `code` proves for `factor` at `now`, if it is new.
    fn totp_step_for(
        &self,
        factor: &TotpFactor,
        code: &OtpCode,
        now: OffsetDateTime,
    ) -> CoreResult<Option<i64>> {
        let secret = self.totp_secret(factor)?;
        factor.params.verify(
            &secret,
            code.expose(),
            now.unix_timestamp(),
            TOTP_WINDOW,
            factor.last_step,
        )
    }

    /// Enrols an authenticator factor. `activate` makes it active at once (operator enrolment);
    /// otherwise it waits for [`Otpgate::confirm_totp`].
    pub async fn enroll_totp(
        &self,
        tenant: &TenantId,
        user_id: &UserId,
        activate: bool,
        ctx: &RequestContext,
    ) -> CoreResult<TotpEnrolment> {
        let policy = self.policy_for(tenant).await?;
        let user = self
            .store
            .get_user(tenant, user_id)
            .await?
            .ok_or(CoreError::NotFound)?;
        let params = TotpParams::default();
        let secret: [u8; TOTP_SECRET_BYTES] = random_bytes()?;
        let id = FactorId::generate()?;
        let now = self.clock.now();
        let factor = TotpFactor {
            secret_sealed: self.master.seal(&secret, id.as_str().as_bytes())?,
            id,
            tenant_id: tenant.clone(),
            user_id: user.id.clone(),
            params,
            confirmed_at: activate.then_some(now),
            last_step: None,
            created_at: now,
        };
        let audit = [self.event(
            tenant,
            Some(&user.id),
            AuditKind::TotpEnrolled,
            format!("factor {}", factor.id),
            ctx,
            now,
        )];
        self.store.insert_totp_factor(&factor, &audit).await?;
        let recovery_codes = self.replace_recovery_codes(&user, ctx, now).await?;
        let uri = otpauth_uri(
            &secret,
            &params,
            &policy.product_name,
            user.username.as_str(),
        );
        Ok(TotpEnrolment {
            factor_id: factor.id,
            secret_base32: SecretString::from(secret_to_base32(&secret)),
            uri: SecretString::from(uri),
            active: activate,
            recovery_codes,
        })
    }

    async fn replace_recovery_codes(
        &self,
        user: &User,
        ctx: &RequestContext,
        now: OffsetDateTime,
    ) -> CoreResult<Vec<SecretString>> {
        let mut shown = Vec::with_capacity(RECOVERY_CODES_PER_USER);
        let mut hashes = Vec::with_capacity(RECOVERY_CODES_PER_USER);
        while hashes.len() < RECOVERY_CODES_PER_USER {
            let code = RecoveryCode::generate()?;
            let hash = code.keyed_hash(&self.code_key, user.id.as_str());
            if !hashes.contains(&hash) {
                hashes.push(hash);
                shown.push(SecretString::from(code.display()));
            }
        }
        let audit = [self.event(
            &user.tenant_id,
            Some(&user.id),
            AuditKind::RecoveryCodesIssued,
            "",
            ctx,
            now,
        )];
        self.store
            .replace_recovery_codes(&user.tenant_id, &user.id, &hashes, now, &audit)
            .await?;
        Ok(shown)
    }

    /// Replaces a user's recovery codes with ten new ones (shown once).
    pub async fn regenerate_recovery_codes(
        &self,
        tenant: &TenantId,
        user_id: &UserId,
        ctx: &RequestContext,
    ) -> CoreResult<Vec<SecretString>> {
        let user = self
            .store
            .get_user(tenant, user_id)
            .await?
            .ok_or(CoreError::NotFound)?;
        self.replace_recovery_codes(&user, ctx, self.clock.now())
            .await
    }

    /// Whether the user has an active authenticator factor, and how many recovery codes are left.
    pub async fn totp_status(
        &self,
        tenant: &TenantId,
        user_id: &UserId,
    ) -> CoreResult<(bool, u32)> {
        let active = self.active_totp_factor(tenant, user_id).await?.is_some();
        let left = self
            .store
            .count_unused_recovery_codes(tenant, user_id)
            .await?;
        Ok((active, left))
    }

    /// Removes the user's authenticator, after a current code from it proves possession (the
    /// code is spent). Recovery codes go with it.
    pub async fn remove_totp(
        &self,
        tenant: &TenantId,
        user_id: &UserId,
        raw_code: &str,
        ctx: &RequestContext,
    ) -> CoreResult<()> {
        let factor = self
            .active_totp_factor(tenant, user_id)
            .await?
            .ok_or(CoreError::NotFound)?;
        let code = OtpCode::parse(raw_code, Some(usize::from(factor.params.digits)))?;
        let now = self.clock.now();
        let Some(step) = self.totp_step_for(&factor, &code, now)? else {
            return Err(CoreError::CodeRejected {
                attempts_left: None,
            });
        };
        if !self
            .store
            .accept_totp_step(&factor.id, step, now, &[])
            .await?
        {
            return Err(CoreError::CodeRejected {
                attempts_left: None,
            });
        }
        let audit = [self.event(
            tenant,
            Some(user_id),
            AuditKind::TotpRemoved,
            format!("factor {}", factor.id),
            ctx,
            now,
        )];
        self.store
            .delete_totp_factors(tenant, user_id, &audit)
            .await?;
        Ok(())
    }

    /// Opens a panel session for the holder of a valid API session token: a new token of its
    /// own, so the one that travelled in a URL never becomes the cookie.
    pub async fn open_panel_session(
        &self,
        api_token: &SecretString,
        ctx: &RequestContext,
    ) -> CoreResult<SessionIssued> {
        let (_, user) = self.authenticate_session(api_token).await?;
        let policy = self.policy_for(&user.tenant_id).await?;
        let now = self.clock.now();
        let (minted, session) = new_session(&policy, &user, now)?;
        let audit = [self.event(
            &user.tenant_id,
            Some(&user.id),
            AuditKind::TokenIssued,
            "panel session from external login",
            ctx,
            now,
        )];
        self.store.insert_session(&session, &audit).await?;
        Ok(SessionIssued {
            token: minted.secret,
            expires_at: session.expires_at,
            user,
        })
    }

    /// Confirms the user's newest pending factor with a first code.
    pub async fn confirm_totp(
        &self,
        tenant: &TenantId,
        user_id: &UserId,
        raw_code: &str,
        ctx: &RequestContext,
    ) -> CoreResult<()> {
        let factor = self
            .store
            .list_totp_factors(tenant, user_id)
            .await?
            .into_iter()
            .find(|f| f.confirmed_at.is_none())
            .ok_or(CoreError::NotFound)?;
        let code = OtpCode::parse(raw_code, Some(usize::from(factor.params.digits)))?;
        let now = self.clock.now();
        let Some(step) = self.totp_step_for(&factor, &code, now)? else {
            return Err(CoreError::CodeRejected {
                attempts_left: None,
            });
        };
        let audit = [self.event(
            tenant,
            Some(user_id),
            AuditKind::TotpConfirmed,
            format!("factor {}", factor.id),
            ctx,
            now,
        )];
        if self
            .store
            .accept_totp_step(&factor.id, step, now, &audit)
            .await?
        {
            Ok(())
        } else {
            Err(CoreError::CodeRejected {
                attempts_left: None,
            })
        }
    }
}
