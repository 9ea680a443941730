//! Configuration: one typed tree, loaded once. Layers: defaults, then `otpgate.toml` (or the
//! file named by `--config`), then `OTPGATE_*` environment variables (`__` separates levels,
//! e.g. `OTPGATE_POLICY__CODE_LENGTH=8`). Validated into runtime types before start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use otpgate_core::outbox::DeliveryPolicy;
use otpgate_core::policy::Policy;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address `serve` listens on.
    pub listen: SocketAddr,
    /// Where the SQLite database and the master key live.
    pub data_dir: PathBuf,
    /// A `sqlite:` URL (PostgreSQL arrives with its own store). Empty means `data_dir`.
    #[serde(default)]
    pub database_url: Option<String>,
    /// The master key as 64 hex digits; by default read from (or generated into)
    /// `data_dir/master.key`.
    #[serde(default, skip_serializing)]
    pub master_key: Option<SecretString>,
    /// Log filter (`info`, `otpgate=debug,tower_http=info`, ...).
    pub log: String,
    /// OTP rules.
    pub policy: PolicySettings,
    /// Message delivery.
    pub delivery: DeliverySettings,
}

/// OTP rules as configured.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySettings {
    /// Digits per code (4 to 10).
    pub code_length: u8,
    /// SMS code lifetime, seconds.
    pub sms_code_ttl_secs: u64,
    /// E-mail code lifetime, seconds.
    pub email_code_ttl_secs: u64,
    /// Checks per challenge.
    pub max_checks: u32,
    /// Seconds between two sends to one destination.
    pub resend_cooldown_secs: u64,
    /// Sends per destination per window.
    pub max_sends_per_window: u32,
    /// The send window, seconds.
    pub send_window_secs: u64,
    /// Login ticket lifetime, seconds.
    pub login_ticket_ttl_secs: u64,
    /// Session token lifetime, seconds.
    pub session_ttl_secs: u64,
    /// Product name in messages and authenticator apps.
    pub product_name: String,
}

impl Default for PolicySettings {
    fn default() -> Self {
        let p = Policy::default();
        PolicySettings {
            code_length: p.code_length,
            sms_code_ttl_secs: p.sms_code_ttl.as_secs(),
            email_code_ttl_secs: p.email_code_ttl.as_secs(),
            max_checks: p.max_checks,
            resend_cooldown_secs: p.resend_cooldown.as_secs(),
            max_sends_per_window: p.max_sends_per_window,
            send_window_secs: p.send_window.as_secs(),
            login_ticket_ttl_secs: p.login_ticket_ttl.as_secs(),
            session_ttl_secs: p.session_ttl.as_secs(),
            product_name: p.product_name,
        }
    }
}

/// Delivery as configured.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    /// The provider: `log` (development) for now.
    pub provider: String,
    /// Tries per message.
    pub max_tries: u32,
    /// First retry delay, milliseconds.
    pub base_backoff_ms: u64,
    /// Longest sleep between outbox polls, milliseconds.
    pub poll_interval_ms: u64,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        let d = DeliveryPolicy::default();
        DeliverySettings {
            provider: "log".into(),
            max_tries: d.max_tries,
            base_backoff_ms: d.base_backoff.as_millis() as u64,
            poll_interval_ms: d.poll_interval.as_millis() as u64,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./otpgate-data"),
            database_url: None,
            master_key: None,
            log: "info".into(),
            policy: PolicySettings::default(),
            delivery: DeliverySettings::default(),
        }
    }
}

/// A configuration problem, reported before start-up.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl Settings {
    /// Loads defaults, the TOML file (`path`, or `./otpgate.toml` when it exists), and the
    /// `OTPGATE_*` environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        match path {
            Some(p) if !p.exists() => {
                return Err(ConfigError(format!("{} does not exist", p.display())));
            }
            Some(p) => figment = figment.merge(Toml::file(p)),
            None if Path::new("otpgate.toml").exists() => {
                figment = figment.merge(Toml::file("otpgate.toml"));
            }
            None => {}
        }
        // OTPGATE_TEST_* variables belong to the test suite, not to the server.
        let env = Env::prefixed("OTPGATE_")
            .split("__")
            .filter(|key| !key.as_str().starts_with("test_"));
        figment
            .merge(env)
            .extract()
            .map_err(|e| ConfigError(e.to_string()))
    }

    /// The OTP rules, validated.
    pub fn policy(&self) -> Result<Policy, ConfigError> {
        let p = &self.policy;
        let secs = Duration::from_secs;
        let positive = |name: &str, v: u64| {
            if v == 0 {
                Err(ConfigError(format!("policy.{name} must be positive")))
            } else {
                Ok(secs(v))
            }
        };
        if !(4..=10).contains(&p.code_length) {
            return Err(ConfigError("policy.code_length must be 4 to 10".into()));
        }
        if p.max_checks == 0 || p.max_sends_per_window == 0 {
            return Err(ConfigError(
                "policy.max_checks and policy.max_sends_per_window must be positive".into(),
            ));
        }
        if p.product_name.trim().is_empty() {
            return Err(ConfigError("policy.product_name must not be empty".into()));
        }
        Ok(Policy {
            code_length: p.code_length,
            sms_code_ttl: positive("sms_code_ttl_secs", p.sms_code_ttl_secs)?,
            email_code_ttl: positive("email_code_ttl_secs", p.email_code_ttl_secs)?,
            max_checks: p.max_checks,
            resend_cooldown: secs(p.resend_cooldown_secs),
            max_sends_per_window: p.max_sends_per_window,
            send_window: positive("send_window_secs", p.send_window_secs)?,
            login_ticket_ttl: positive("login_ticket_ttl_secs", p.login_ticket_ttl_secs)?,
            session_ttl: positive("session_ttl_secs", p.session_ttl_secs)?,
            product_name: p.product_name.trim().to_owned(),
            ..Policy::default()
        })
    }

    /// The delivery policy, validated.
    pub fn delivery_policy(&self) -> Result<DeliveryPolicy, ConfigError> {
        let d = &self.delivery;
        if d.provider != "log" {
            return Err(ConfigError(format!(
                "delivery.provider {:?} is unknown (available: log)",
                d.provider
            )));
        }
        if d.max_tries == 0 || d.poll_interval_ms == 0 {
            return Err(ConfigError(
                "delivery.max_tries and delivery.poll_interval_ms must be positive".into(),
            ));
        }
        Ok(DeliveryPolicy {
            max_tries: d.max_tries,
            base_backoff: Duration::from_millis(d.base_backoff_ms.max(1)),
            poll_interval: Duration::from_millis(d.poll_interval_ms),
            ..DeliveryPolicy::default()
        })
    }

    /// The SQLite file to open: from a `sqlite:` URL, or `data_dir/otpgate.db`.
    pub fn sqlite_path(&self) -> Result<PathBuf, ConfigError> {
        match self
            .database_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
        {
            None => Ok(self.data_dir.join("otpgate.db")),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Err(ConfigError(
                    "PostgreSQL is not supported by this build yet; use a sqlite: URL or none"
                        .into(),
                ))
            }
            Some(url) => {
                let path = url
                    .strip_prefix("sqlite://")
                    .or_else(|| url.strip_prefix("sqlite:"))
                    .ok_or_else(|| {
                        ConfigError(format!(
                            "DATABASE_URL must start with sqlite: (got {url:?})"
                        ))
                    })?;
                let path = path.split('?').next().unwrap_or(path);
                if path.is_empty() {
                    return Err(ConfigError("DATABASE_URL names no file".into()));
                }
                Ok(PathBuf::from(path))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_design() {
        let s = Settings::default();
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        let p = s.policy().unwrap_or_default();
        assert_eq!(p.code_length, 6);
        assert_eq!(p.session_ttl, Duration::from_secs(36_000));
        assert_eq!(
            s.sqlite_path().ok(),
            Some(PathBuf::from("./otpgate-data/otpgate.db"))
        );
    }

    #[test]
    fn database_urls_are_parsed_or_refused() {
        let with = |url: &str| Settings {
            database_url: Some(url.into()),
            ..Settings::default()
        };
        assert_eq!(
            with("sqlite:///tmp/x.db").sqlite_path().ok(),
            Some(PathBuf::from("/tmp/x.db"))
        );
        assert_eq!(
            with("sqlite:x.db?mode=rwc").sqlite_path().ok(),
            Some(PathBuf::from("x.db"))
        );
        assert!(with("postgres://localhost/test").sqlite_path().is_err());
        assert!(with("mysql://x").sqlite_path().is_err());
    }

    #[test]
    fn invalid_policies_are_refused_before_start() {
        let mut s = Settings::default();
        s.policy.code_length = 3;
        assert!(s.policy().is_err());
        let mut s = Settings::default();
        s.delivery.provider = "carrier-pigeon".into();
        assert!(s.delivery_policy().is_err());
    }
}
