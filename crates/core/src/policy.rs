//! The tunable rules: code length, lifetimes, attempt limits, cool-downs. Defaults follow
//! DESIGN.md (NIST SP 800-63B, Twilio Verify, the ACL document).

use std::time::Duration;

use crate::error::CoreError;
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
    /// Sends allowed to one destination per day.
    pub max_sends_per_day: u32,
    /// Sends allowed per client IP address (IPv6: per /64) per hour; 0 turns the limit off
    /// (a deployment whose sends all come from its own backends' few addresses).
    pub max_sends_per_ip_per_hour: u32,
    /// Sends allowed per account per hour; 0 turns the limit off.
    pub max_sends_per_account_per_hour: u32,
    /// Sends allowed to one country calling code per hour (an SMS pumping budget); 0 turns the
    /// limit off.
    pub max_sends_per_country_per_hour: u32,
    /// Country calling codes SMS may go to (`+98`, `+1`); `None` allows all.
    pub allowed_country_codes: Option<Vec<String>>,
    /// Refuse SMS to numbers the number plan says cannot take one (landline, toll-free, shared
    /// cost, UAN, voicemail, pager). Premium-rate numbers are refused whatever this says.
    pub refuse_non_mobile_numbers: bool,
    /// SMS pumping circuit breaker: the least share (percent) of settled SMS codes to one number
    /// range that must have been verified within [`Policy::pumping_window`]; below it, SMS to the
    /// range pause until enough of the window's sends age out. 0 turns the breaker off.
    pub pumping_min_verified_percent: u32,
    /// Settled codes to a range before the breaker judges it (few sends say nothing).
    pub pumping_min_sample: u32,
    /// How far back the breaker looks.
    pub pumping_window: Duration,
    /// National digits after the country code that make a range (`+98` and `912`).
    pub pumping_prefix_digits: u8,
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
    /// Consecutive failures after which the account stays locked until an operator unlocks it
    /// (NIST SP 800-63B §5.2.2: no more than 100 without a success).
    pub max_consecutive_failures: u32,
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
            max_sends_per_day: 10,
            max_sends_per_ip_per_hour: 30,
            max_sends_per_account_per_hour: 10,
            max_sends_per_country_per_hour: 1_000,
            allowed_country_codes: None,
            refuse_non_mobile_numbers: true,
            pumping_min_verified_percent: 20,
            pumping_min_sample: 30,
            pumping_window: Duration::from_secs(3600),
            pumping_prefix_digits: 3,
            login_ticket_ttl: Duration::from_secs(5 * 60),
            session_ttl: Duration::from_secs(10 * 60 * 60),
            lockout_threshold: 10,
            lockout_base: Duration::from_secs(30),
            lockout_max: Duration::from_secs(15 * 60),
            max_consecutive_failures: 100,
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
        if consecutive_failures >= self.max_consecutive_failures {
            // Locked until an operator unlocks it: in effect, for good.
            return Some(Duration::from_secs(100 * 365 * 24 * 3600));
        }
        let doublings = (consecutive_failures - self.lockout_threshold).min(20);
        let pause = self.lockout_base.saturating_mul(1u32 << doublings);
        Some(pause.min(self.lockout_max))
    }
}

/// A tenant's own rules: each set field overrides the server's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyOverrides {
    /// Digits per code (4 to 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_length: Option<u8>,
    /// SMS code lifetime, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sms_code_ttl_secs: Option<u64>,
    /// E-mail code lifetime, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_code_ttl_secs: Option<u64>,
    /// Checks per challenge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_checks: Option<u32>,
    /// Seconds between two sends to one destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resend_cooldown_secs: Option<u64>,
    /// Sends per destination per window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sends_per_window: Option<u32>,
    /// The send window, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_window_secs: Option<u64>,
    /// Login ticket lifetime, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_ticket_ttl_secs: Option<u64>,
    /// Sends per destination per day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sends_per_day: Option<u32>,
    /// Sends per client IP (IPv6 /64) per hour; 0 is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sends_per_ip_per_hour: Option<u32>,
    /// Sends per account per hour; 0 is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sends_per_account_per_hour: Option<u32>,
    /// Sends per country calling code per hour; 0 is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sends_per_country_per_hour: Option<u32>,
    /// Country calling codes SMS may go to (`["+98", "+1"]`); unset allows all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_country_codes: Option<Vec<String>>,
    /// Refuse SMS to landline, toll-free and other non-mobile numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refuse_non_mobile_numbers: Option<bool>,
    /// Circuit breaker: least verified share (percent) of a range's settled codes; 0 is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pumping_min_verified_percent: Option<u32>,
    /// Circuit breaker: settled codes before a range is judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pumping_min_sample: Option<u32>,
    /// Circuit breaker: the window, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pumping_window_secs: Option<u64>,
    /// Circuit breaker: national digits after the country code that make a range (0 to 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pumping_prefix_digits: Option<u8>,
    /// Session and JWT lifetime, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_ttl_secs: Option<u64>,
    /// Product name in messages and authenticator apps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_name: Option<String>,
}

impl PolicyOverrides {
    /// Refuses values no tenant may set.
    pub fn validate(&self) -> Result<(), CoreError> {
        if let Some(n) = self.code_length
            && !(4..=10).contains(&n)
        {
            return Err(CoreError::invalid("code_length", "must be 4 to 10"));
        }
        let positive = [
            ("sms_code_ttl_secs", self.sms_code_ttl_secs),
            ("email_code_ttl_secs", self.email_code_ttl_secs),
            ("send_window_secs", self.send_window_secs),
            ("login_ticket_ttl_secs", self.login_ticket_ttl_secs),
            ("session_ttl_secs", self.session_ttl_secs),
            ("pumping_window_secs", self.pumping_window_secs),
            ("pumping_min_sample", self.pumping_min_sample.map(u64::from)),
            ("max_checks", self.max_checks.map(u64::from)),
            (
                "max_sends_per_window",
                self.max_sends_per_window.map(u64::from),
            ),
            ("max_sends_per_day", self.max_sends_per_day.map(u64::from)),
        ];
        for (field, value) in positive {
            if value == Some(0) || value.is_some_and(|v| v > 366 * 24 * 3600) {
                return Err(CoreError::invalid(
                    field,
                    "must be positive and at most a year",
                ));
            }
        }
        if let Some(codes) = &self.allowed_country_codes
            && codes.iter().any(|c| {
                let digits = c.strip_prefix('+').unwrap_or("");
                digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit())
            })
        {
            return Err(CoreError::invalid(
                "allowed_country_codes",
                "must be calling codes like \"+98\"",
            ));
        }
        if self.pumping_min_verified_percent.is_some_and(|p| p > 100) {
            return Err(CoreError::invalid(
                "pumping_min_verified_percent",
                "must be 0 (off) to 100",
            ));
        }
        if self.pumping_prefix_digits.is_some_and(|d| d > 6) {
            return Err(CoreError::invalid(
                "pumping_prefix_digits",
                "must be 0 to 6",
            ));
        }
        if let Some(name) = &self.product_name
            && (name.trim().is_empty() || name.chars().count() > 40)
        {
            return Err(CoreError::invalid(
                "product_name",
                "must be 1 to 40 characters",
            ));
        }
        Ok(())
    }

    /// The server's defaults with these overrides applied.
    pub fn apply(&self, base: &Policy) -> Policy {
        let secs = Duration::from_secs;
        Policy {
            code_length: self.code_length.unwrap_or(base.code_length),
            sms_code_ttl: self.sms_code_ttl_secs.map_or(base.sms_code_ttl, secs),
            email_code_ttl: self.email_code_ttl_secs.map_or(base.email_code_ttl, secs),
            max_checks: self.max_checks.unwrap_or(base.max_checks),
            resend_cooldown: self.resend_cooldown_secs.map_or(base.resend_cooldown, secs),
            max_sends_per_window: self
                .max_sends_per_window
                .unwrap_or(base.max_sends_per_window),
            send_window: self.send_window_secs.map_or(base.send_window, secs),
            max_sends_per_day: self.max_sends_per_day.unwrap_or(base.max_sends_per_day),
            max_sends_per_ip_per_hour: self
                .max_sends_per_ip_per_hour
                .unwrap_or(base.max_sends_per_ip_per_hour),
            max_sends_per_account_per_hour: self
                .max_sends_per_account_per_hour
                .unwrap_or(base.max_sends_per_account_per_hour),
            max_sends_per_country_per_hour: self
                .max_sends_per_country_per_hour
                .unwrap_or(base.max_sends_per_country_per_hour),
            login_ticket_ttl: self
                .login_ticket_ttl_secs
                .map_or(base.login_ticket_ttl, secs),
            session_ttl: self.session_ttl_secs.map_or(base.session_ttl, secs),
            allowed_country_codes: self
                .allowed_country_codes
                .clone()
                .or_else(|| base.allowed_country_codes.clone()),
            refuse_non_mobile_numbers: self
                .refuse_non_mobile_numbers
                .unwrap_or(base.refuse_non_mobile_numbers),
            pumping_min_verified_percent: self
                .pumping_min_verified_percent
                .unwrap_or(base.pumping_min_verified_percent),
            pumping_min_sample: self.pumping_min_sample.unwrap_or(base.pumping_min_sample),
            pumping_window: self.pumping_window_secs.map_or(base.pumping_window, secs),
            pumping_prefix_digits: self
                .pumping_prefix_digits
                .unwrap_or(base.pumping_prefix_digits),
            product_name: self
                .product_name
                .clone()
                .unwrap_or_else(|| base.product_name.clone()),
            ..base.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_only_what_they_set() {
        let base = Policy::default();
        let overrides: PolicyOverrides =
            serde_json::from_str(r#"{"code_length": 8, "product_name": "Acme"}"#)
                .unwrap_or_default();
        let policy = overrides.apply(&base);
        assert_eq!(
            (policy.code_length, policy.product_name.as_str()),
            (8, "Acme")
        );
        assert_eq!(policy.session_ttl, base.session_ttl);
        assert!(
            PolicyOverrides {
                code_length: Some(3),
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            PolicyOverrides {
                max_checks: Some(0),
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(serde_json::from_str::<PolicyOverrides>(r#"{"colour": 1}"#).is_err());
    }

    #[test]
    fn lockout_starts_at_the_threshold_and_doubles_up_to_the_cap() {
        let policy = Policy::default();
        assert_eq!(policy.lockout_for(9), None);
        assert_eq!(policy.lockout_for(10), Some(Duration::from_secs(30)));
        assert_eq!(policy.lockout_for(11), Some(Duration::from_secs(60)));
        assert_eq!(policy.lockout_for(99), Some(Duration::from_secs(15 * 60)));
        assert!(
            policy
                .lockout_for(100)
                .is_some_and(|d| d > Duration::from_secs(50 * 365 * 24 * 3600))
        );
    }
}
