//! Phone verification for apps (the fintech's "digipay" flow): a code to a phone number (or an
//! e-mail address) identified by dial code, national number and user type, then a right code
//! finds or creates that user, marks the contact verified, records the device, and issues an
//! HS512 JWT signed with the tenant's own key, bound to the device and revocable by `jti`.

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;

use super::{CoreResult, MAX_RACE_RETRIES, Otpgate, SIGNING_KEY_CACHE_TTL, SigningKey};
use crate::code::{OtpCode, normalize_digit};
use crate::crypto::random_bytes;
use crate::error::CoreError;
use crate::identity::{E164Phone, Email, Username};
use crate::jwt::{self, Claims};
use crate::message::normalize_locale;
use crate::model::{
    ApiKeyId, AuditKind, Challenge, ChallengeStatus, Channel, Device, JwtKey, KeyId, Purpose,
    RequestContext, Role, TenantId, User, UserId,
};
use crate::password::NO_PASSWORD;
use crate::store::{Contact, PhoneCompletion};

/// Bytes of a tenant's HS512 key (the hash's block size).
const JWT_KEY_BYTES: usize = 64;

/// Longest `device_id` / `device_unique_id` accepted.
pub const MAX_DEVICE_FIELD: usize = 128;

/// Who is asking for (or proving) a code.
#[derive(Debug, Clone)]
pub struct PhoneIdentity {
    /// Country calling code, with or without `+` (`+91`, `98`).
    pub dial_code: String,
    /// The national number (dashes, spaces and a leading 0 are dropped).
    pub phone_number: String,
    /// The user type (1 employee, 2 customer, ...).
    pub user_type: u16,
    /// `Sms`, or `Email` to send the code to `email`.
    pub channel: Channel,
    /// The address for e-mail codes.
    pub email: Option<String>,
}

/// The device of a verification.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// `android`, `ios`, `web`, or a client's own code.
    pub device_type: String,
    /// The client's device id.
    pub device_id: String,
    /// The client's unique device id (the token is bound to it).
    pub device_unique_id: String,
}

/// A verified phone (or e-mail): the user and its token.
pub struct PhoneVerified {
    /// The user found or created.
    pub user: User,
    /// The signed JWT.
    pub token: SecretString,
    /// Its claims.
    pub claims: Claims,
}

/// `+` and the digits of a dial code and a national number, as E.164.
pub fn normalize_phone(dial_code: &str, national: &str) -> CoreResult<E164Phone> {
    let bad = || CoreError::invalid("phone_number", "is not a valid phone number");
    let digits = |text: &str, allowed: &[char]| -> CoreResult<String> {
        let mut out = String::new();
        for c in text.trim().chars().map(normalize_digit) {
            if c.is_ascii_digit() {
                out.push(c);
            } else if !allowed.contains(&c) {
                return Err(bad());
            }
        }
        Ok(out)
    };
    let country = digits(dial_code.trim().trim_start_matches('+'), &[])?;
    let country = country.strip_prefix("00").unwrap_or(&country).to_owned();
    if country.is_empty() || country.len() > 3 || country.starts_with('0') {
        return Err(CoreError::invalid(
            "dial_code",
            "is not a valid country calling code",
        ));
    }
    let national = digits(national, &[' ', '-', '.', '(', ')', '\u{00A0}'])?;
    let national = national.trim_start_matches('0');
    if national.is_empty() {
        return Err(bad());
    }
    E164Phone::parse(&format!("+{country}{national}")).map_err(|_| bad())
}

impl PhoneIdentity {
    fn phone(&self) -> CoreResult<E164Phone> {
        normalize_phone(&self.dial_code, &self.phone_number)
    }

    /// Where the code goes: the phone, or the e-mail address for e-mail codes.
    pub fn destination(&self) -> CoreResult<String> {
        match self.channel {
            Channel::Sms => Ok(self.phone()?.as_str().to_owned()),
            Channel::Email => {
                let email = self
                    .email
                    .as_deref()
                    .ok_or_else(|| CoreError::invalid("email", "is required"))?;
                Ok(Email::parse(email)?.as_str().to_owned())
            }
            Channel::Totp => Err(CoreError::invalid(
                "otp_type",
                "must be 1 (SMS) or 2 (e-mail)",
            )),
        }
    }
}

impl DeviceInfo {
    fn validate(&self) -> CoreResult<()> {
        for (field, value) in [
            ("device_type", &self.device_type),
            ("device_id", &self.device_id),
            ("device_unique_id", &self.device_unique_id),
        ] {
            if value.trim().is_empty() {
                return Err(CoreError::invalid(field, "is required"));
            }
            if value.chars().count() > MAX_DEVICE_FIELD || value.chars().any(char::is_control) {
                return Err(CoreError::invalid(
                    field,
                    "is too long or has control characters",
                ));
            }
        }
        Ok(())
    }
}

impl Otpgate {
    /// Sends a code for a phone verification (reusing a pending one within the cool-down).
    pub async fn send_phone_code(
        &self,
        tenant: &TenantId,
        who: &PhoneIdentity,
        ctx: &RequestContext,
    ) -> CoreResult<Challenge> {
        let policy = self.policy_for(tenant).await?;
        who.phone()?;
        let destination = who.destination()?;
        let now = self.clock.now();
        if let Some(pending) = self
            .store
            .find_pending_challenge(tenant, Purpose::PhoneLogin.as_str(), &destination, now)
            .await?
        {
            self.resend(&policy, &pending, None, ctx).await?;
            return self
                .store
                .get_challenge(tenant, &pending.id)
                .await?
                .ok_or(CoreError::NotFound);
        }
        self.check_send_budget(&policy, tenant, &destination, ctx, None, now)
            .await?;
        let locale = normalize_locale(ctx.locale.as_deref());
        let (challenge, message) = self.new_challenge(
            &policy,
            tenant,
            None,
            Purpose::PhoneLogin,
            who.channel,
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
                "phone code {} by {}",
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
        Ok(challenge)
    }

    /// Checks a phone (or e-mail) code; a right one finds or creates the user, marks the
    /// contact verified, records the device and issues a JWT. Errors tell a wrong code
    /// (`CodeRejected` with attempts left), a dead challenge (`CodeRejected` with none left)
    /// and no live code (`CodeExpired`) apart.
    pub async fn verify_phone_code(
        &self,
        tenant: &TenantId,
        who: &PhoneIdentity,
        raw_code: &str,
        device: &DeviceInfo,
        ctx: &RequestContext,
    ) -> CoreResult<PhoneVerified> {
        let policy = self.policy_for(tenant).await?;
        let phone = who.phone()?;
        let destination = who.destination()?;
        device.validate()?;
        let code = OtpCode::parse(raw_code, Some(usize::from(policy.code_length)))?;
        for _ in 0..MAX_RACE_RETRIES {
            let now = self.clock.now();
            let Some(challenge) = self
                .store
                .find_pending_challenge(tenant, Purpose::PhoneLogin.as_str(), &destination, now)
                .await?
            else {
                let latest = self
                    .store
                    .latest_challenge(tenant, Purpose::PhoneLogin.as_str(), &destination)
                    .await?;
                return Err(match latest.map(|c| c.status) {
                    Some(ChallengeStatus::MaxAttemptsReached) => CoreError::CodeRejected {
                        attempts_left: Some(0),
                    },
                    _ => CoreError::CodeExpired,
                });
            };
            if !code.matches(&self.code_key, challenge.id.as_str(), &challenge.code_hash) {
                let audit = [self.event(
                    tenant,
                    None,
                    AuditKind::OtpRejected,
                    format!("phone code {}", challenge.id),
                    ctx,
                    now,
                )];
                if self
                    .store
                    .record_failed_check(&challenge.id, challenge.attempts, now, &audit)
                    .await?
                {
                    return Err(CoreError::CodeRejected {
                        attempts_left: Some(challenge.attempts_left().saturating_sub(1)),
                    });
                }
                continue;
            }
            let candidate = User {
                id: UserId::generate()?,
                tenant_id: tenant.clone(),
                username: Username::parse(&format!("{}#{}", phone.as_str(), who.user_type))?,
                email: None,
                phone: Some(phone.clone()),
                role: Role::User,
                user_type: Some(who.user_type),
                password_hash: NO_PASSWORD.to_owned(),
                mobile_verified_at: None,
                email_verified_at: None,
                failed_logins: 0,
                locked_until: None,
                created_at: now,
            };
            // Everything the token needs is at hand before the code is spent: after it, only
            // the signature (no read, nothing that can fail for want of the store) remains.
            let signing_key = self.signing_key(tenant, now).await?;
            let jti = hex::encode(random_bytes::<16>()?);
            let completion = PhoneCompletion {
                challenge_id: challenge.id.clone(),
                expected_attempts: challenge.attempts,
                candidate: User {
                    email: match who.channel {
                        Channel::Email => Some(Email::parse(&destination)?),
                        _ => None,
                    },
                    ..candidate
                },
                verified: match who.channel {
                    Channel::Email => Contact::Email,
                    _ => Contact::Phone,
                },
                device: Device {
                    tenant_id: tenant.clone(),
                    user_id: UserId::generate()?,
                    device_unique_id: device.device_unique_id.trim().to_owned(),
                    device_id: device.device_id.trim().to_owned(),
                    device_type: device.device_type.trim().to_owned(),
                    first_seen_at: now,
                    last_seen_at: now,
                },
                now,
                // The store sets each event's user: the one found or created.
                audit: vec![
                    self.event(
                        tenant,
                        None,
                        AuditKind::OtpAccepted,
                        format!("phone code {}", challenge.id),
                        ctx,
                        now,
                    ),
                    self.event(
                        tenant,
                        None,
                        AuditKind::TokenIssued,
                        format!("jwt {jti}"),
                        ctx,
                        now,
                    ),
                ],
            };
            let Some(user) = self.store.complete_phone_verification(&completion).await? else {
                continue;
            };
            let (token, claims) = sign_jwt(
                &signing_key,
                &user,
                &completion.device.device_unique_id,
                jti,
                policy.session_ttl,
                now,
            )?;
            return Ok(PhoneVerified {
                user,
                token,
                claims,
            });
        }
        Err(CoreError::CodeRejected {
            attempts_left: None,
        })
    }

    fn new_jwt_key(&self, tenant: &TenantId, now: OffsetDateTime) -> CoreResult<JwtKey> {
        let id = KeyId::generate()?;
        let secret: [u8; JWT_KEY_BYTES] = random_bytes()?;
        Ok(JwtKey {
            secret_sealed: self.master.seal(&secret, id.as_str().as_bytes())?,
            id,
            tenant_id: tenant.clone(),
            created_at: now,
            verify_until: None,
        })
    }

    /// The tenant's signing key (created on first use), opened; read from the store at most
    /// once per [`SIGNING_KEY_CACHE_TTL`].
    async fn signing_key(
        &self,
        tenant: &TenantId,
        now: OffsetDateTime,
    ) -> CoreResult<Arc<SigningKey>> {
        if let Ok(cache) = self.signing_keys.lock()
            && let Some((read_at, key)) = cache.get(tenant)
            && read_at.elapsed() < SIGNING_KEY_CACHE_TTL
        {
            return Ok(Arc::clone(key));
        }
        let candidate = self.new_jwt_key(tenant, now)?;
        let key = self.store.ensure_jwt_key(&candidate).await?;
        let secret = self
            .master
            .open(&key.secret_sealed, key.id.as_str().as_bytes())?;
        let opened = Arc::new(SigningKey {
            id: key.id,
            secret: secret.into(),
        });
        if let Ok(mut cache) = self.signing_keys.lock() {
            cache.insert(
                tenant.clone(),
                (std::time::Instant::now(), Arc::clone(&opened)),
            );
        }
        Ok(opened)
    }

    /// The claims and user of a JWT presented with `device_unique_id` under `tenant`:
    /// signature by one of the tenant's verifying keys, not expired, not revoked, bound to this
    /// device. Anything else is `Unauthorized`.
    pub async fn authenticate_jwt(
        &self,
        tenant: &TenantId,
        token: &SecretString,
        device_unique_id: &str,
    ) -> CoreResult<(Claims, User)> {
        let text = token.expose_secret().trim();
        let kid = jwt::key_id(text).ok_or(CoreError::Unauthorized)?;
        let now = self.clock.now();
        let key = self
            .store
            .verifying_jwt_keys(tenant, now)
            .await?
            .into_iter()
            .find(|k| k.id.as_str() == kid)
            .ok_or(CoreError::Unauthorized)?;
        let secret = self
            .master
            .open(&key.secret_sealed, key.id.as_str().as_bytes())?;
        let claims =
            jwt::verify(text, &secret, now.unix_timestamp()).ok_or(CoreError::Unauthorized)?;
        if claims.tid != tenant.as_str() || claims.did != device_unique_id.trim() {
            return Err(CoreError::Unauthorized);
        }
        if self.store.is_jti_revoked(&claims.jti).await? {
            return Err(CoreError::Unauthorized);
        }
        let user = self
            .user(tenant, &claims.sub)
            .await
            .map_err(|_| CoreError::Unauthorized)?;
        Ok((claims, user))
    }

    /// Revokes a JWT of the tenant by its `jti` (until it would have expired).
    pub async fn revoke_jwt(
        &self,
        tenant: &TenantId,
        jti: &str,
        ctx: &RequestContext,
    ) -> CoreResult<()> {
        let policy = self.policy_for(tenant).await?;
        let jti = jti.trim();
        if jti.is_empty() || jti.len() > 64 {
            return Err(CoreError::invalid("jti", "is required"));
        }
        let now = self.clock.now();
        let until = now + policy.session_ttl;
        let audit = [self.event(
            tenant,
            None,
            AuditKind::TokenRevoked,
            format!("jwt {jti}"),
            ctx,
            now,
        )];
        self.store
            .revoke_jti(tenant, jti, until, now, &audit)
            .await?;
        Ok(())
    }

    /// Rotates the tenant's JWT key: new tokens are signed with a new key; the old one still
    /// verifies until its tokens have expired.
    pub async fn rotate_jwt_key(
        &self,
        tenant: &TenantId,
        ctx: &RequestContext,
    ) -> CoreResult<KeyId> {
        self.tenant(tenant).await?;
        let policy = self.policy_for(tenant).await?;
        let now = self.clock.now();
        // Make sure there is an active key to retire (a tenant may rotate before any token).
        self.store
            .ensure_jwt_key(&self.new_jwt_key(tenant, now)?)
            .await?;
        let next = self.new_jwt_key(tenant, now)?;
        let audit = [self.event(
            tenant,
            None,
            AuditKind::KeyRotated,
            format!("key {}", next.id),
            ctx,
            now,
        )];
        self.store
            .rotate_jwt_key(&next, now + policy.session_ttl, &audit)
            .await?;
        if let Ok(mut cache) = self.signing_keys.lock() {
            cache.remove(tenant);
        }
        Ok(next.id)
    }

    /// Revokes an API key of the tenant.
    pub async fn revoke_api_key(
        &self,
        tenant: &TenantId,
        id: &str,
        ctx: &RequestContext,
    ) -> CoreResult<()> {
        let id = ApiKeyId::parse(id)?;
        let now = self.clock.now();
        let audit = [self.event(
            tenant,
            None,
            AuditKind::ApiKeyRevoked,
            format!("api key {id}"),
            ctx,
            now,
        )];
        if self.store.revoke_api_key(tenant, &id, now, &audit).await? {
            self.forget_api_keys();
            Ok(())
        } else {
            Err(CoreError::NotFound)
        }
    }
}

/// A JWT for `user` on this device, signed with `key`: no read, nothing left to fail but the
/// signature.
fn sign_jwt(
    key: &SigningKey,
    user: &User,
    device_unique_id: &str,
    jti: String,
    session_ttl: std::time::Duration,
    now: OffsetDateTime,
) -> CoreResult<(SecretString, Claims)> {
    let iat = now.unix_timestamp();
    let claims = Claims {
        sub: user.id.to_string(),
        tid: user.tenant_id.to_string(),
        did: device_unique_id.to_owned(),
        iat,
        exp: iat + i64::try_from(session_ttl.as_secs()).unwrap_or(36_000),
        jti,
    };
    let token = jwt::sign(key.secret.expose_secret(), key.id.as_str(), &claims)?;
    Ok((SecretString::from(token), claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_codes_and_national_numbers_make_e164() {
        let ok = |d: &str, n: &str| normalize_phone(d, n).map(|p| p.as_str().to_owned()).ok();
        assert_eq!(ok("+91", "98765-43210").as_deref(), Some("+919876543210"));
        assert_eq!(ok("98", "0912 123 4567").as_deref(), Some("+989121234567"));
        assert_eq!(ok("+98", "۰۹۱۲۱۲۳۴۵۶۷").as_deref(), Some("+989121234567"));
        assert_eq!(ok("0098", "9121234567").as_deref(), Some("+989121234567"));
        for (d, n) in [
            ("+91", "555-12ab"),
            ("", "9121234567"),
            ("+9999", "912123"),
            ("+98", "0"),
            ("+98", "12"),
        ] {
            assert!(normalize_phone(d, n).is_err(), "{d} {n}");
        }
    }
}
