//! Bulk fixtures for load tests and benchmarks (`otpgate-bench`): users, pending login tickets,
//! verifications and authenticator factors written through the store exactly as the real
//! operations write them, except that the caller picks each code, all users share one password
//! hash and no message is queued. So 100,000 pending logins take seconds instead of an hour of
//! argon2. Nothing here is reachable over HTTP.

use secrecy::SecretString;

use crate::code::OtpCode;
use crate::identity::{E164Phone, Username};
use crate::message::normalize_locale;
use crate::model::{
    Challenge, ChallengeStatus, Channel, FactorId, Purpose, RequestContext, Role, TenantId,
    TotpFactor, User, UserId,
};
use crate::otp::TotpParams;
use crate::service::{CoreResult, Otpgate, new_ticket, totp_destination};

impl Otpgate {
    /// A user with `password_hash` (a PHC string from [`crate::password::PasswordHasher::hash`],
    /// computed once and shared) and an optional phone.
    pub async fn seed_user(
        &self,
        tenant: &TenantId,
        username: &str,
        phone: Option<&str>,
        password_hash: &str,
    ) -> CoreResult<User> {
        let user = User {
            id: UserId::generate()?,
            tenant_id: tenant.clone(),
            username: Username::parse(username)?,
            email: None,
            phone: phone.map(E164Phone::parse).transpose()?,
            role: Role::User,
            user_type: None,
            password_hash: password_hash.to_owned(),
            mobile_verified_at: None,
            email_verified_at: None,
            failed_logins: 0,
            locked_until: None,
            created_at: self.clock.now(),
        };
        self.store.insert_user(&user, &[]).await?;
        Ok(user)
    }

    /// A confirmed authenticator factor with `secret` for `user`.
    pub async fn seed_totp_factor(&self, user: &User, secret: &[u8]) -> CoreResult<()> {
        let id = FactorId::generate()?;
        let factor = TotpFactor {
            secret_sealed: self.master.seal(secret, id.as_str().as_bytes())?,
            id,
            tenant_id: user.tenant_id.clone(),
            user_id: user.id.clone(),
            params: TotpParams::default(),
            confirmed_at: Some(self.clock.now()),
            last_step: None,
            created_at: self.clock.now(),
        };
        Ok(self.store.insert_totp_factor(&factor, &[]).await?)
    }

    /// A pending challenge whose code is `code` (digits of the tenant's code length); no message.
    pub async fn seed_challenge(
        &self,
        tenant: &TenantId,
        user: Option<&User>,
        purpose: Purpose,
        destination: &str,
        code: &str,
    ) -> CoreResult<Challenge> {
        let challenge = self
            .seed_challenge_record(tenant, user, purpose, Channel::Sms, destination, code)
            .await?;
        self.store.insert_challenge(&challenge, None, &[]).await?;
        Ok(challenge)
    }

    /// A pending step-1 login ticket for `user`: by SMS with `code`, or by the user's
    /// authenticator when `code` is `None`. Returns the ticket as the client would get it.
    pub async fn seed_login_ticket(
        &self,
        user: &User,
        code: Option<&str>,
    ) -> CoreResult<SecretString> {
        let (channel, destination, code) = match code {
            Some(code) => (
                Channel::Sms,
                user.phone
                    .as_ref()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default(),
                code,
            ),
            None => (Channel::Totp, totp_destination(&user.id), ""),
        };
        let challenge = self
            .seed_challenge_record(
                &user.tenant_id,
                Some(user),
                Purpose::Login,
                channel,
                &destination,
                code,
            )
            .await?;
        let policy = self.policy_for(&user.tenant_id).await?;
        let (minted, ticket) = new_ticket(&policy, user, &challenge, self.clock.now())?;
        self.store
            .insert_login_ticket(&ticket, &challenge, None, &[])
            .await?;
        Ok(minted.secret)
    }

    /// `count` challenges that can no longer be used, written in bulk: half expired two days
    /// ago (past the sweeper's retention, so it deletes them), half approved within the last
    /// hour (kept for the retention). What a busy database holds besides its live codes: the
    /// benchmark checks that codes are checked as fast with them as without.
    pub async fn seed_dead_challenges(&self, tenant: &TenantId, count: usize) -> CoreResult<()> {
        const CHUNK: usize = 2_000;
        let policy = self.policy_for(tenant).await?;
        let now = self.clock.now();
        let mut written = 0;
        while written < count {
            let chunk = CHUNK.min(count - written);
            let mut challenges = Vec::with_capacity(chunk);
            for i in written..written + chunk {
                let expired = i % 2 == 0;
                let created = if expired {
                    now - time::Duration::days(2)
                } else {
                    now - time::Duration::minutes(30)
                };
                let (mut challenge, _message) = self.challenge_with_code(
                    &policy,
                    tenant,
                    None,
                    Purpose::Verify,
                    Channel::Sms,
                    format!("+98913{:07}", i % 10_000_000),
                    normalize_locale(None),
                    &OtpCode::generate(policy.code_length)?,
                    &RequestContext::default(),
                    created,
                )?;
                if !expired {
                    challenge.status = ChallengeStatus::Approved;
                }
                challenges.push(challenge);
            }
            self.store.insert_challenges(&challenges).await?;
            written += chunk;
        }
        Ok(())
    }

    /// The challenge the real operations would build, with `code`; its message is dropped.
    async fn seed_challenge_record(
        &self,
        tenant: &TenantId,
        user: Option<&User>,
        purpose: Purpose,
        channel: Channel,
        destination: &str,
        code: &str,
    ) -> CoreResult<Challenge> {
        let policy = self.policy_for(tenant).await?;
        // An authenticator challenge has no code of its own (the app makes them).
        let code = match channel {
            Channel::Totp => OtpCode::generate(policy.code_length)?,
            _ => OtpCode::parse(code, Some(usize::from(policy.code_length)))?,
        };
        let (challenge, _message) = self.challenge_with_code(
            &policy,
            tenant,
            user.map(|u| &u.id),
            purpose,
            channel,
            destination.to_owned(),
            normalize_locale(None),
            &code,
            &RequestContext::default(),
            self.clock.now(),
        )?;
        Ok(challenge)
    }
}
