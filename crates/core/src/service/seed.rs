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
    Challenge, ChallengeId, ChallengeStatus, Channel, FactorId, LoginTicket, Purpose, Role,
    TenantId, TotpFactor, User, UserId,
};
use crate::otp::TotpParams;
use crate::service::{CoreResult, Otpgate, totp_destination};
use crate::token::mint_hex_token;

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
        let policy = self.policy_for(&user.tenant_id).await?;
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
        let now = self.clock.now();
        let minted = mint_hex_token()?;
        let ticket = LoginTicket {
            hash: minted.hash,
            tenant_id: user.tenant_id.clone(),
            user_id: user.id.clone(),
            challenge_id: challenge.id.clone(),
            channel,
            created_at: now,
            expires_at: now + policy.login_ticket_ttl,
            used_at: None,
        };
        self.store
            .insert_login_ticket(&ticket, &challenge, None, &[])
            .await?;
        Ok(minted.secret)
    }

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
        let id = ChallengeId::generate()?;
        let code_hash = match channel {
            Channel::Totp => Vec::new(),
            _ => OtpCode::parse(code, Some(usize::from(policy.code_length)))?
                .keyed_hash(&self.code_key, id.as_str())
                .to_vec(),
        };
        let now = self.clock.now();
        let ttl = match channel {
            Channel::Totp => policy.login_ticket_ttl,
            other => policy.code_ttl(other),
        };
        Ok(Challenge {
            id,
            tenant_id: tenant.clone(),
            user_id: user.map(|u| u.id.clone()),
            purpose,
            channel,
            destination: destination.to_owned(),
            code_hash,
            locale: normalize_locale(None),
            created_at: now,
            expires_at: now + ttl,
            last_sent_at: now,
            send_count: u32::from(channel != Channel::Totp),
            attempts: 0,
            max_attempts: policy.max_checks,
            status: ChallengeStatus::Pending,
        })
    }
}
