//! The tunable rules: code length, lifetimes, attempt limits, cool-downs. Defaults follow
//! DESIGN.md (NIST SP 800-63B, Twilio Verify, the ACL document).

use std::time::Duration;

use crate::model::Channel;

/// Rules of one tenant (one set for now; per-tenant overrides come with tenant settings).
#[derive(Debug, Clone)]
pub struct Policy {
    /// Digits in an SMS or e-mail code (6 to 10).
    pub code_length: u8,
    /// Lifetime of an SMS code.
    pub sms_code_ttl: Duration,
    /// Lifetime of an e-mail code.
    pub email_code_ttl: Duration,
    /// Checks allowed per challenge before it is dead.
    pub max_checks: u32,
    /// Minimum time between two sends to one destination.
    pub resend_cooldown: Duration,
    /// Sends allowed to one destination per [`Policy::send_window`].
    pub max_sends_per_window: u32,
    /// The window of [`Policy::max_sends_per_window`].
    pub send_window: Duration,
    /// Lifetime of a login ticket (step 1 of a two-step login).
    pub login_ticket_ttl: Duration,
    /// Lifetime of a session token.
    pub session_ttl: Duration,
    /// Consecutive failed logins before the account locks for a while.
    pub lockout_threshold: u32,
    /// First lock-out period; each further failure doubles it up to [`Policy::lockout_max`].
    pub lockout_base: Duration,
    /// The longest lock-out.
    pub lockout_max: Duration,
    /// Name shown in messages and authenticator apps.
    pub product_name: String,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            code_length: 6,
            sms_code_ttl: Duration::from_secs(5 * 60),
            email_code_ttl: Duration::from_secs(10 * 60),
            max_checks: 5,
            resend_cooldown: Duration::from_secs(30),
            max_sends_per_window: 5,
            send_window: Duration::from_secs(10 * 60),
            login_ticket_ttl: Duration::from_secs(5 * 60),
            session_ttl: Duration::from_secs(10 * 60 * 60),
            lockout_threshold: 10,
            lockout_base: Duration::from_secs(30),
            lockout_max: Duration::from_secs(15 * 60),
            product_name: "otpgate".to_owned(),
        }
    }
}

impl Policy {
    /// Lifetime of a code sent over `channel`.
    pub fn code_ttl(&self, channel: Channel) -> Duration {
        match channel {
            Channel::Email => self.email_code_ttl,
            Channel::Sms | Channel::Totp => self.sms_code_ttl,
        }
    }

    /// How long an account stays locked after `consecutive_failures` failures, if at all.
    ///
    /// Below the threshold nothing locks; from it on the pause doubles per failure up to the cap,
    /// so 100 consecutive failures take hours, never seconds (NIST SP 800-63B §5.2.2).
    pub fn lockout_for(&self, consecutive_failures: u32) -> Option<Duration> {
        if consecutive_failures < self.lockout_threshold {
            return None;
        }
        let doublings = (consecutive_failures - self.lockout_threshold).min(20);
        let pause = self.lockout_base.saturating_mul(1u32 << doublings);
        Some(pause.min(self.lockout_max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockout_starts_at_the_threshold_and_doubles_up_to_the_cap() {
        let policy = Policy::default();
        assert_eq!(policy.lockout_for(9), None);
        assert_eq!(policy.lockout_for(10), Some(Duration::from_secs(30)));
        assert_eq!(policy.lockout_for(11), Some(Duration::from_secs(60)));
        assert_eq!(policy.lockout_for(99), Some(Duration::from_secs(15 * 60)));
    }
}
