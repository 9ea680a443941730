//! The domain's records, as the core and the store exchange them. Wire (dialect DTO) and row
//! types are separate and convert explicitly at their own boundaries.

use time::OffsetDateTime;

use crate::crypto::random_bytes;
use crate::error::CoreError;
use crate::identity::{E164Phone, Email, Username};
use crate::otp::TotpParams;

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct $name(String);

        impl $name {
            /// A new random id (128 bits as 32 lowercase hex digits).
            pub fn generate() -> Result<Self, CoreError> {
                Ok($name(hex::encode(random_bytes::<16>()?)))
            }

            /// A new id that sorts by its creation time: `now` in milliseconds (12 hex digits),
            /// then 80 random bits (20), as UUIDv7 does. For records that are looked up minutes
            /// after they are made (codes, their messages): the store's index on the id finds
            /// them among its recently used pages and takes new ones at its right edge, where a
            /// random id puts every insert and every lookup on a page of its own.
            pub fn generate_at(now: OffsetDateTime) -> Result<Self, CoreError> {
                Ok($name(format!(
                    "{}{}",
                    hex::encode(crate::token::time_prefix(now)),
                    hex::encode(random_bytes::<10>()?)
                )))
            }

            /// Parses 32 hex digits (lowercased); anything else is not an id of ours.
            pub fn parse(text: &str) -> Result<Self, CoreError> {
                let t = text.trim();
                if t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
                    Ok($name(t.to_ascii_lowercase()))
                } else {
                    Err(CoreError::NotFound)
                }
            }

            /// The id's text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

hex_id!(
    /// A tenant's id, the digipay document's `CompanyID`.
    TenantId
);
hex_id!(
    /// A user's id.
    UserId
);
hex_id!(
    /// A challenge's (verification's) id.
    ChallengeId
);
hex_id!(
    /// A TOTP factor's id.
    FactorId
);
hex_id!(
    /// An API key's public id.
    ApiKeyId
);
hex_id!(
    /// An outbox message's id.
    MessageId
);
hex_id!(
    /// A tenant's JWT signing key's id (the `kid` of its tokens).
    KeyId
);

/// A company using otpgate.
#[derive(Debug, Clone)]
pub struct Tenant {
    /// Its id.
    pub id: TenantId,
    /// Its display name, unique.
    pub name: String,
    /// Whether this is the tenant meant when none is named.
    pub is_default: bool,
    /// Its own OTP rules.
    pub settings: crate::policy::PolicyOverrides,
    /// When it was created.
    pub created_at: OffsetDateTime,
}

/// A user's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Administers the tenant.
    Admin,
    /// An ordinary account.
    User,
}

impl Role {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }

    /// Parses `admin` or `user`.
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        match text {
            "admin" => Ok(Role::Admin),
            "user" => Ok(Role::User),
            _ => Err(CoreError::invalid("role", "must be admin or user")),
        }
    }
}

/// An account inside a tenant.
#[derive(Debug, Clone)]
pub struct User {
    /// Its id.
    pub id: UserId,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// Login name, unique per tenant.
    pub username: Username,
    /// Optional e-mail address.
    pub email: Option<Email>,
    /// Optional phone number.
    pub phone: Option<E164Phone>,
    /// Role.
    pub role: Role,
    /// The user type of a phone-identified user (digipay: 1 employee, 2 customer, ...).
    pub user_type: Option<u16>,
    /// argon2id PHC string.
    pub password_hash: String,
    /// When the phone was verified.
    pub mobile_verified_at: Option<OffsetDateTime>,
    /// When the e-mail was verified.
    pub email_verified_at: Option<OffsetDateTime>,
    /// Consecutive failed logins or code checks since the last success.
    pub failed_logins: u32,
    /// Until when logins are refused.
    pub locked_until: Option<OffsetDateTime>,
    /// When it was created.
    pub created_at: OffsetDateTime,
}

/// Why a code was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A native API verification of a phone or address.
    Verify,
    /// Step 2 of a password login.
    Login,
    /// Verifying a user's phone.
    MobileVerify,
    /// Verifying a user's e-mail.
    EmailVerify,
    /// Logging in by phone alone (digipay).
    PhoneLogin,
}

impl Purpose {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Verify => "verify",
            Purpose::Login => "login",
            Purpose::MobileVerify => "mobile_verify",
            Purpose::EmailVerify => "email_verify",
            Purpose::PhoneLogin => "phone_login",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        Ok(match text {
            "verify" => Purpose::Verify,
            "login" => Purpose::Login,
            "mobile_verify" => Purpose::MobileVerify,
            "email_verify" => Purpose::EmailVerify,
            "phone_login" => Purpose::PhoneLogin,
            _ => return Err(CoreError::invalid("purpose", "unknown")),
        })
    }
}

/// How a code reaches the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// A text message.
    Sms,
    /// An e-mail.
    Email,
    /// The user's authenticator app (nothing is sent).
    Totp,
}

impl Channel {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Sms => "sms",
            Channel::Email => "email",
            Channel::Totp => "totp",
        }
    }

    /// Parses `sms`, `email` or `totp`.
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        match text {
            "sms" => Ok(Channel::Sms),
            "email" => Ok(Channel::Email),
            "totp" => Ok(Channel::Totp),
            _ => Err(CoreError::invalid("channel", "must be sms or email")),
        }
    }
}

/// Where a challenge stands. `Expired` is derived from the clock, never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeStatus {
    /// Waiting for the right code.
    Pending,
    /// The right code was given; consumed.
    Approved,
    /// Canceled by the client.
    Canceled,
    /// Too many wrong codes.
    MaxAttemptsReached,
    /// Its lifetime passed.
    Expired,
}

impl ChallengeStatus {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeStatus::Pending => "pending",
            ChallengeStatus::Approved => "approved",
            ChallengeStatus::Canceled => "canceled",
            ChallengeStatus::MaxAttemptsReached => "max_attempts_reached",
            ChallengeStatus::Expired => "expired",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        Ok(match text {
            "pending" => ChallengeStatus::Pending,
            "approved" => ChallengeStatus::Approved,
            "canceled" => ChallengeStatus::Canceled,
            "max_attempts_reached" => ChallengeStatus::MaxAttemptsReached,
            "expired" => ChallengeStatus::Expired,
            _ => return Err(CoreError::invalid("status", "unknown")),
        })
    }
}

/// A tenant's JWT signing key.
#[derive(Debug, Clone)]
pub struct JwtKey {
    /// Its id.
    pub id: KeyId,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// The HMAC secret, sealed under the master key with the key id as context.
    pub secret_sealed: Vec<u8>,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// `None` for the active key; for a rotated-out key, until when it still verifies.
    pub verify_until: Option<OffsetDateTime>,
}

/// A device a user signed in from.
#[derive(Debug, Clone)]
pub struct Device {
    /// Its tenant.
    pub tenant_id: TenantId,
    /// Its user.
    pub user_id: UserId,
    /// The client's unique id of the device (tokens are bound to it).
    pub device_unique_id: String,
    /// The client's device id.
    pub device_id: String,
    /// `android`, `ios`, `web` or another client-given kind.
    pub device_type: String,
    /// First sign-in from it.
    pub first_seen_at: OffsetDateTime,
    /// Latest sign-in from it.
    pub last_seen_at: OffsetDateTime,
}

/// One code sent or expected.
#[derive(Debug, Clone)]
pub struct Challenge {
    /// Its id.
    pub id: ChallengeId,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// The user it belongs to, if any (native verifications have none).
    pub user_id: Option<UserId>,
    /// Why it exists.
    pub purpose: Purpose,
    /// How the code travels.
    pub channel: Channel,
    /// E.164 number or e-mail address.
    pub destination: String,
    /// Keyed hash of the current code.
    pub code_hash: Vec<u8>,
    /// Locale of the message.
    pub locale: String,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// The current code's expiry.
    pub expires_at: OffsetDateTime,
    /// When the last code was queued.
    pub last_sent_at: OffsetDateTime,
    /// Codes queued so far.
    pub send_count: u32,
    /// Wrong checks so far.
    pub attempts: u32,
    /// Wrong checks allowed.
    pub max_attempts: u32,
    /// Stored status (never `Expired`).
    pub status: ChallengeStatus,
}

impl Challenge {
    /// The status as a client sees it at `now`: a pending challenge past its expiry is expired.
    pub fn status_at(&self, now: OffsetDateTime) -> ChallengeStatus {
        if self.status == ChallengeStatus::Pending && now >= self.expires_at {
            ChallengeStatus::Expired
        } else {
            self.status
        }
    }

    /// Checks left.
    pub fn attempts_left(&self) -> u32 {
        self.max_attempts.saturating_sub(self.attempts)
    }
}

/// The temporary token of step 1 of a login.
#[derive(Debug, Clone)]
pub struct LoginTicket {
    /// The ticket's stored key ([`crate::token::ticket_key`]): its time, then most of its
    /// SHA-256.
    pub hash: [u8; 32],
    /// Its tenant.
    pub tenant_id: TenantId,
    /// Whose login it is.
    pub user_id: UserId,
    /// The challenge that step 2 answers (its attempts count the ticket's wrong codes).
    pub challenge_id: ChallengeId,
    /// How the code comes: `Sms`, `Email`, or `Totp` (the user's app; nothing is sent).
    pub channel: Channel,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Expiry.
    pub expires_at: OffsetDateTime,
    /// When it was spent, if it was.
    pub used_at: Option<OffsetDateTime>,
}

impl LoginTicket {
    /// Whether it can still be answered: not spent, not expired.
    pub fn is_live(&self, now: OffsetDateTime) -> bool {
        self.used_at.is_none() && now < self.expires_at
    }
}

/// A session token's record.
#[derive(Debug, Clone)]
pub struct Session {
    /// SHA-256 of the token.
    pub hash: [u8; 32],
    /// Its tenant.
    pub tenant_id: TenantId,
    /// Whose session it is.
    pub user_id: UserId,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Expiry.
    pub expires_at: OffsetDateTime,
    /// When it was revoked, if it was.
    pub revoked_at: Option<OffsetDateTime>,
}

impl Session {
    /// Whether it opens doors at `now`.
    pub fn is_active(&self, now: OffsetDateTime) -> bool {
        self.revoked_at.is_none() && now < self.expires_at
    }
}

/// An authenticator-app factor.
#[derive(Debug, Clone)]
pub struct TotpFactor {
    /// Its id.
    pub id: FactorId,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// Its user.
    pub user_id: UserId,
    /// The secret, sealed under the master key with the factor id as context.
    pub secret_sealed: Vec<u8>,
    /// Algorithm, digits and period.
    pub params: TotpParams,
    /// When it became active; `None` while waiting for a first code.
    pub confirmed_at: Option<OffsetDateTime>,
    /// The last time step accepted, so no code works twice.
    pub last_step: Option<i64>,
    /// Creation time.
    pub created_at: OffsetDateTime,
}

/// An API client's key record.
#[derive(Debug, Clone)]
pub struct ApiKey {
    /// Public id.
    pub id: ApiKeyId,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// A label.
    pub name: String,
    /// SHA-256 of the key.
    pub hash: [u8; 32],
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// When it was revoked, if it was.
    pub revoked_at: Option<OffsetDateTime>,
}

/// Delivery state of an outbox message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Waiting for (another) try.
    Queued,
    /// The provider accepted it.
    Sent,
    /// Given up.
    Failed,
}

impl DeliveryStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Queued => "queued",
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Failed => "failed",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        Ok(match text {
            "queued" => DeliveryStatus::Queued,
            "sent" => DeliveryStatus::Sent,
            "failed" => DeliveryStatus::Failed,
            _ => return Err(CoreError::invalid("delivery_status", "unknown")),
        })
    }
}

/// A message waiting in (or delivered from) the outbox.
#[derive(Clone)]
pub struct OutboxMessage {
    /// Its id.
    pub id: MessageId,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// The challenge it carries a code for.
    pub challenge_id: Option<ChallengeId>,
    /// SMS or e-mail.
    pub channel: Channel,
    /// Number or address.
    pub destination: String,
    /// Why the code was sent.
    pub purpose: Purpose,
    /// Locale of the text.
    pub locale: String,
    /// The full text; erased once delivered or failed.
    pub body: Option<String>,
    /// The code alone, for providers that template it; erased with the body.
    pub code: Option<String>,
    /// Delivery state.
    pub status: DeliveryStatus,
    /// Tries so far.
    pub attempts: u32,
    /// When the next try is due (or the current claim lapses).
    pub next_attempt_at: OffsetDateTime,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// The provider's message id, once sent.
    pub provider_message_id: Option<String>,
    /// The last error, if a try failed.
    pub last_error: Option<String>,
    /// Who asked for it: the client's IP address, IPv6 cut to its /64 (for send limits).
    pub client_ip: Option<String>,
    /// The account it was sent for, if any (for send limits).
    pub user_id: Option<UserId>,
}

impl std::fmt::Debug for OutboxMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Body and code are secrets: never in Debug output.
        f.debug_struct("OutboxMessage")
            .field("id", &self.id)
            .field("channel", &self.channel)
            .field("status", &self.status)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// Kinds of audit event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditKind {
    /// Password accepted (step 1 passed).
    LoginPasswordOk,
    /// Login refused (unknown user, wrong password, locked).
    LoginFailed,
    /// Account locked after too many failures.
    LockedOut,
    /// A code was queued for sending.
    OtpSent,
    /// A code was accepted.
    OtpAccepted,
    /// A code was refused.
    OtpRejected,
    /// A verification was canceled.
    OtpCanceled,
    /// A session token was issued.
    TokenIssued,
    /// A session token was revoked.
    TokenRevoked,
    /// A TOTP factor was enrolled.
    TotpEnrolled,
    /// A TOTP factor was confirmed by its first code.
    TotpConfirmed,
    /// A TOTP factor was removed.
    TotpRemoved,
    /// Recovery codes were (re)issued.
    RecoveryCodesIssued,
    /// A tenant's JWT signing key was rotated.
    KeyRotated,
    /// An API key was revoked.
    ApiKeyRevoked,
    /// A message was delivered to its provider.
    MessageSent,
    /// A message could not be delivered.
    MessageFailed,
    /// An API key was created.
    ApiKeyCreated,
    /// A user was created.
    UserCreated,
    /// A request was refused before it reached an account (bad input).
    RequestRejected,
    /// An operator unlocked an account.
    Unlocked,
    /// A message was not queued: a send limit, the country allowlist, the number's type or the
    /// SMS pumping circuit breaker refused it.
    SendRefused,
}

impl AuditKind {
    /// Every kind, for parsing stored names.
    pub const ALL: [AuditKind; 22] = [
        AuditKind::LoginPasswordOk,
        AuditKind::LoginFailed,
        AuditKind::LockedOut,
        AuditKind::OtpSent,
        AuditKind::OtpAccepted,
        AuditKind::OtpRejected,
        AuditKind::OtpCanceled,
        AuditKind::TokenIssued,
        AuditKind::TokenRevoked,
        AuditKind::TotpEnrolled,
        AuditKind::TotpConfirmed,
        AuditKind::TotpRemoved,
        AuditKind::RecoveryCodesIssued,
        AuditKind::KeyRotated,
        AuditKind::ApiKeyRevoked,
        AuditKind::MessageSent,
        AuditKind::MessageFailed,
        AuditKind::ApiKeyCreated,
        AuditKind::UserCreated,
        AuditKind::RequestRejected,
        AuditKind::Unlocked,
        AuditKind::SendRefused,
    ];

    /// Parses a stored name.
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == text)
            .ok_or_else(|| CoreError::invalid("kind", "unknown audit kind"))
    }

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::LoginPasswordOk => "login_password_ok",
            AuditKind::LoginFailed => "login_failed",
            AuditKind::LockedOut => "locked_out",
            AuditKind::OtpSent => "otp_sent",
            AuditKind::OtpAccepted => "otp_accepted",
            AuditKind::OtpRejected => "otp_rejected",
            AuditKind::OtpCanceled => "otp_canceled",
            AuditKind::TokenIssued => "token_issued",
            AuditKind::TokenRevoked => "token_revoked",
            AuditKind::TotpEnrolled => "totp_enrolled",
            AuditKind::TotpConfirmed => "totp_confirmed",
            AuditKind::TotpRemoved => "totp_removed",
            AuditKind::RecoveryCodesIssued => "recovery_codes_issued",
            AuditKind::KeyRotated => "key_rotated",
            AuditKind::ApiKeyRevoked => "api_key_revoked",
            AuditKind::MessageSent => "message_sent",
            AuditKind::MessageFailed => "message_failed",
            AuditKind::ApiKeyCreated => "api_key_created",
            AuditKind::UserCreated => "user_created",
            AuditKind::RequestRejected => "request_rejected",
            AuditKind::Unlocked => "unlocked",
            AuditKind::SendRefused => "send_refused",
        }
    }
}

/// Where a request came from, as the dialect learned it.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    /// Client IP address.
    pub ip: Option<String>,
    /// Reported latitude.
    pub latitude: Option<f64>,
    /// Reported longitude.
    pub longitude: Option<f64>,
    /// Reported request mode (web, app, api, cli).
    pub mode: Option<String>,
    /// Preferred locale of messages sent for this request (`fa`, `en`).
    pub locale: Option<String>,
}

impl RequestContext {
    /// The key send limits count by: the IP address, an IPv6 one cut to its /64 (a home or a
    /// host gets a whole /64, so counting single addresses would not limit anything).
    pub fn ip_key(&self) -> Option<String> {
        let ip: std::net::IpAddr = self.ip.as_deref()?.parse().ok()?;
        Some(match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => {
                    let s = v6.segments();
                    format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
                }
            },
        })
    }
}

/// One thing that happened, for the audit trail. Never carries a code, token or secret.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// Its tenant.
    pub tenant_id: TenantId,
    /// The user concerned, if known.
    pub user_id: Option<UserId>,
    /// What happened.
    pub kind: AuditKind,
    /// A short non-secret detail (a challenge id, a reason).
    pub detail: String,
    /// Where the request came from.
    pub context: RequestContext,
    /// When.
    pub at: OffsetDateTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_ids_are_32_hex_digits_that_sort_by_their_time() {
        let start = time::macros::datetime!(2026-12-04 05:00 UTC);
        let ids: Vec<ChallengeId> = (0..200)
            .map(|i| ChallengeId::generate_at(start + time::Duration::milliseconds(i)).unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0].as_str() < w[1].as_str()));
        for id in &ids {
            assert_eq!(ChallengeId::parse(id.as_str()).unwrap(), *id);
        }
        assert_eq!(
            &ids[0].as_str()[..12],
            hex::encode(crate::token::time_prefix(start))
        );
        // Ids of one millisecond differ in their 80 random bits.
        let same: std::collections::HashSet<String> = (0..1000)
            .map(|_| MessageId::generate_at(start).unwrap().as_str()[12..].to_owned())
            .collect();
        assert_eq!(same.len(), 1000);
    }
}
