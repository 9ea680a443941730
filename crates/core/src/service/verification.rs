//! Contact verification and login in one call (the "Verify Login OTP" flow): a user proves the
//! password, then verifies the phone, the e-mail address and finally the login itself, each with
//! its own purpose's code. A code sent for one purpose is never accepted for another.
//!
//! The state machine, per call:
//! - no code: send the code the verify type asks for (login: only once phone and e-mail are
//!   verified; until then the next verification is named and its code sent);
//! - a right code: consume it (marking the contact verified), then name the next verification,
//!   or log in when none is left;
//! - a wrong code: count it against the challenge and the account.

use secrecy::SecretString;
use time::OffsetDateTime;

use super::{CoreResult, MAX_RACE_RETRIES, Otpgate, SessionIssued, new_session, totp_destination};
use crate::code::OtpCode;
use crate::error::CoreError;
use crate::message::normalize_locale;
use crate::model::{
    AuditKind, Challenge, ChallengeStatus, Channel, Purpose, RequestContext, TenantId, User,
};
use crate::store::{Contact, LoginCompletion};

/// What the caller wants verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyType {
    /// The user's phone.
    Mobile,
    /// The user's e-mail address.
    Email,
    /// The login itself.
    Login,
}

impl VerifyType {
    /// Parses `mobile_verify`, `email_verify` or `login_verify`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "mobile_verify" => Some(VerifyType::Mobile),
            "email_verify" => Some(VerifyType::Email),
            "login_verify" => Some(VerifyType::Login),
            _ => None,
        }
    }

    fn purpose(self) -> Purpose {
        match self {
            VerifyType::Mobile => Purpose::MobileVerify,
            VerifyType::Email => Purpose::EmailVerify,
            VerifyType::Login => Purpose::Login,
        }
    }
}

/// One call of the flow.
pub struct VerifyLogin {
    /// Username or phone number.
    pub username: String,
    /// Password.
    pub password: SecretString,
    /// What to verify.
    pub verify_type: VerifyType,
    /// The code, when the user typed one.
    pub code: Option<String>,
}

/// Where the flow stands after a call.
pub enum VerifyLoginOutcome {
    /// A code for the asked verification was sent (or the authenticator app makes it).
    CodeRequired,
    /// The phone is verified (or needs none); the e-mail address is next, its code sent.
    EmailNext {
        /// The address the code went to.
        email: String,
    },
    /// The e-mail address is verified (or needs none); the phone is next, its code sent.
    MobileNext,
    /// Logged in.
    LoggedIn(Box<SessionIssued>),
}

fn phone_pending(user: &User) -> bool {
    user.phone.is_some() && user.mobile_verified_at.is_none()
}

fn email_pending(user: &User) -> bool {
    user.email.is_some() && user.email_verified_at.is_none()
}

impl Otpgate {
    /// Runs one call of the flow.
    pub async fn verify_login(
        &self,
        tenant: &TenantId,
        request: VerifyLogin,
        ctx: &RequestContext,
    ) -> CoreResult<VerifyLoginOutcome> {
        let policy = self.policy_for(tenant).await?;
        // A malformed code is refused before the password is even checked: no counter moves.
        let code = match request.code.as_deref() {
            Some(raw) => Some(OtpCode::parse(raw, Some(usize::from(policy.code_length)))?),
            None => None,
        };
        let user = self
            .authenticate_password(tenant, &request.username, request.password, ctx)
            .await?;
        match (request.verify_type, code) {
            (VerifyType::Mobile, None) => {
                let phone = user.phone.as_ref().ok_or_else(|| {
                    CoreError::Conflict("the account has no mobile number".into())
                })?;
                self.send_purpose_code(
                    &user,
                    Purpose::MobileVerify,
                    Channel::Sms,
                    phone.as_str(),
                    true,
                    ctx,
                )
                .await?;
                Ok(VerifyLoginOutcome::CodeRequired)
            }
            (VerifyType::Email, None) => {
                let email = user.email.as_ref().ok_or_else(|| {
                    CoreError::Conflict("the account has no e-mail address".into())
                })?;
                self.send_purpose_code(
                    &user,
                    Purpose::EmailVerify,
                    Channel::Email,
                    email.as_str(),
                    true,
                    ctx,
                )
                .await?;
                Ok(VerifyLoginOutcome::CodeRequired)
            }
            (VerifyType::Login, None) => {
                if let Some(next) = self.next_verification(&user, ctx).await? {
                    return Ok(next);
                }
                self.send_login_code(&user, ctx).await?;
                Ok(VerifyLoginOutcome::CodeRequired)
            }
            (VerifyType::Login, Some(_)) if phone_pending(&user) || email_pending(&user) => {
                match self.next_verification(&user, ctx).await? {
                    Some(next) => Ok(next),
                    None => Err(CoreError::Internal("verification state changed".into())),
                }
            }
            (verify_type, Some(code)) => {
                let (contact, completes_login) = match verify_type {
                    VerifyType::Mobile => (Some(Contact::Phone), !email_pending(&user)),
                    VerifyType::Email => (Some(Contact::Email), !phone_pending(&user)),
                    VerifyType::Login => (None, true),
                };
                let issued = self
                    .check_purpose_code(&user, verify_type, &code, contact, completes_login, ctx)
                    .await?;
                if let Some(issued) = issued {
                    return Ok(VerifyLoginOutcome::LoggedIn(Box::new(issued)));
                }
                // The contact is verified now; re-read the user and name what comes next.
                let user = self
                    .store
                    .get_user(&user.tenant_id, &user.id)
                    .await?
                    .ok_or(CoreError::InvalidCredentials)?;
                match self.next_verification(&user, ctx).await? {
                    Some(next) => Ok(next),
                    None => Err(CoreError::Internal(
                        "no verification left but no login".into(),
                    )),
                }
            }
        }
    }

    /// When a contact still needs verifying: which, with its code sent (phone first).
    async fn next_verification(
        &self,
        user: &User,
        ctx: &RequestContext,
    ) -> CoreResult<Option<VerifyLoginOutcome>> {
        if let (true, Some(phone)) = (phone_pending(user), &user.phone) {
            self.send_purpose_code(
                user,
                Purpose::MobileVerify,
                Channel::Sms,
                phone.as_str(),
                false,
                ctx,
            )
            .await?;
            return Ok(Some(VerifyLoginOutcome::MobileNext));
        }
        if let (true, Some(email)) = (email_pending(user), &user.email) {
            self.send_purpose_code(
                user,
                Purpose::EmailVerify,
                Channel::Email,
                email.as_str(),
                false,
                ctx,
            )
            .await?;
            return Ok(Some(VerifyLoginOutcome::EmailNext {
                email: email.as_str().to_owned(),
            }));
        }
        Ok(None)
    }

    /// The login code: none for an authenticator user (a challenge still counts the attempts),
    /// else by SMS, else by e-mail.
    async fn send_login_code(&self, user: &User, ctx: &RequestContext) -> CoreResult<()> {
        let (channel, destination) = if self
            .active_totp_factor(&user.tenant_id, &user.id)
            .await?
            .is_some()
        {
            (Channel::Totp, totp_destination(&user.id))
        } else if let Some(phone) = &user.phone {
            (Channel::Sms, phone.as_str().to_owned())
        } else if let Some(email) = &user.email {
            (Channel::Email, email.as_str().to_owned())
        } else {
            return Err(CoreError::Conflict(
                "the account has no phone, e-mail or authenticator".into(),
            ));
        };
        self.send_purpose_code(user, Purpose::Login, channel, &destination, true, ctx)
            .await
    }

    /// Sends a code for `purpose`. A pending one is resent when `resend` (within the
    /// cool-down) and otherwise left as it is, so an automatic "next step" never spams.
    async fn send_purpose_code(
        &self,
        user: &User,
        purpose: Purpose,
        channel: Channel,
        destination: &str,
        resend: bool,
        ctx: &RequestContext,
    ) -> CoreResult<()> {
        let policy = self.policy_for(&user.tenant_id).await?;
        let now = self.clock.now();
        if let Some(pending) = self.pending_for(user, purpose, destination, now).await? {
            if resend && pending.channel != Channel::Totp {
                self.resend(&policy, &pending, Some(&user.id), ctx).await?;
            }
            return Ok(());
        }
        if channel != Channel::Totp {
            self.check_send_budget(
                &policy,
                &user.tenant_id,
                destination,
                ctx,
                Some(&user.id),
                now,
            )
            .await?;
        }
        let locale = normalize_locale(ctx.locale.as_deref());
        let (challenge, message) = self.new_challenge(
            &policy,
            &user.tenant_id,
            Some(&user.id),
            purpose,
            channel,
            destination.to_owned(),
            locale,
            ctx,
            now,
        )?;
        let audit = [self.event(
            &user.tenant_id,
            Some(&user.id),
            AuditKind::OtpSent,
            format!(
                "{} code {} by {}",
                purpose.as_str(),
                challenge.id,
                channel.as_str()
            ),
            ctx,
            now,
        )];
        self.store
            .insert_challenge(&challenge, message.as_ref(), &audit)
            .await?;
        if message.is_some() {
            self.outbox_wake.notify_one();
        }
        Ok(())
    }

    async fn pending_for(
        &self,
        user: &User,
        purpose: Purpose,
        destination: &str,
        now: OffsetDateTime,
    ) -> CoreResult<Option<Challenge>> {
        Ok(self
            .store
            .find_pending_challenge(&user.tenant_id, purpose.as_str(), destination, now)
            .await?
            .filter(|c| c.user_id.as_ref() == Some(&user.id)))
    }

    /// Checks `code` against the user's pending challenge of the verify type's purpose. A right
    /// code consumes it, marks `contact` verified and, when `completes_login`, opens a session
    /// (returned). A wrong one counts against the challenge and the account.
    async fn check_purpose_code(
        &self,
        user: &User,
        verify_type: VerifyType,
        code: &OtpCode,
        contact: Option<Contact>,
        completes_login: bool,
        ctx: &RequestContext,
    ) -> CoreResult<Option<SessionIssued>> {
        let policy = self.policy_for(&user.tenant_id).await?;
        let purpose = verify_type.purpose();
        let factor = match verify_type {
            VerifyType::Login => self.active_totp_factor(&user.tenant_id, &user.id).await?,
            _ => None,
        };
        let destination = match (verify_type, &factor) {
            (VerifyType::Mobile, _) => user.phone.as_ref().map(|p| p.as_str().to_owned()),
            (VerifyType::Email, _) => user.email.as_ref().map(|e| e.as_str().to_owned()),
            (VerifyType::Login, Some(_)) => Some(totp_destination(&user.id)),
            (VerifyType::Login, None) => user
                .phone
                .as_ref()
                .map(|p| p.as_str().to_owned())
                .or_else(|| user.email.as_ref().map(|e| e.as_str().to_owned())),
        }
        .ok_or(CoreError::CodeRejected {
            attempts_left: None,
        })?;
        for _ in 0..MAX_RACE_RETRIES {
            let now = self.clock.now();
            let challenge = match self.pending_for(user, purpose, &destination, now).await? {
                Some(c) => c,
                // An authenticator needs no prior call: open the challenge that counts attempts.
                None if factor.is_some() => {
                    self.send_purpose_code(user, purpose, Channel::Totp, &destination, false, ctx)
                        .await?;
                    continue;
                }
                None => {
                    return Err(CoreError::CodeRejected {
                        attempts_left: None,
                    });
                }
            };
            if challenge.status_at(now) != ChallengeStatus::Pending {
                return Err(CoreError::CodeRejected {
                    attempts_left: None,
                });
            }
            let totp_step = match &factor {
                Some(f) => self.totp_step_for(f, code, now)?.map(|s| (f.id.clone(), s)),
                None => None,
            };
            let matched = match &factor {
                Some(_) => totp_step.is_some(),
                None => code.matches(&self.code_key, challenge.id.as_str(), &challenge.code_hash),
            };
            if matched && !Self::is_locked(user, now) {
                let (minted, session) = new_session(&policy, user, now)?;
                let session = completes_login.then_some(session);
                let mut audit = vec![self.event(
                    &user.tenant_id,
                    Some(&user.id),
                    AuditKind::OtpAccepted,
                    format!("{} code {}", purpose.as_str(), challenge.id),
                    ctx,
                    now,
                )];
                if session.is_some() {
                    audit.push(self.event(
                        &user.tenant_id,
                        Some(&user.id),
                        AuditKind::TokenIssued,
                        "session",
                        ctx,
                        now,
                    ));
                }
                let completion = LoginCompletion {
                    tenant_id: user.tenant_id.clone(),
                    user_id: user.id.clone(),
                    ticket_hash: None,
                    challenge_id: challenge.id.clone(),
                    expected_attempts: challenge.attempts,
                    totp_step,
                    recovery_code: None,
                    verified: contact,
                    session: session.clone(),
                    now,
                    audit,
                };
                if self.store.complete_login(&completion).await? {
                    return Ok(session.map(|s| SessionIssued {
                        token: minted.secret,
                        expires_at: s.expires_at,
                        user: user.clone(),
                    }));
                }
                continue;
            }
            let audit = [self.event(
                &user.tenant_id,
                Some(&user.id),
                AuditKind::OtpRejected,
                format!("{} code {}", purpose.as_str(), challenge.id),
                ctx,
                now,
            )];
            if self
                .store
                .record_failed_check(&challenge.id, challenge.attempts, now, &audit)
                .await?
            {
                self.count_failure(user, "wrong code", ctx, now).await?;
                return Err(CoreError::CodeRejected {
                    attempts_left: Some(challenge.attempts_left().saturating_sub(1)),
                });
            }
        }
        Err(CoreError::CodeRejected {
            attempts_left: None,
        })
    }
}
