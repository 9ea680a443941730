//! Configuration: one typed tree, loaded once. Layers: defaults, then `otpgate.toml` (or the
//! file named by `--config`), then `OTPGATE_*` environment variables (`__` separates levels,
//! e.g. `OTPGATE_POLICY__CODE_LENGTH=8`). Validated into runtime types before start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::delivery::DeliverySettings;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use otpgate_core::policy::Policy;
use otpgate_core::sweeper::SweepPolicy;
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
    /// `postgres://…` for PostgreSQL, `sqlite:PATH` for SQLite elsewhere than `data_dir`.
    #[serde(default)]
    pub database_url: Option<String>,
    /// PostgreSQL connection pool.
    pub postgres: PostgresSettings,
    /// The sweeper of expired rows.
    pub sweeper: SweeperSettings,
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
    /// Message templates by `<purpose>.<locale>` (see the README).
    pub templates: std::collections::BTreeMap<String, String>,
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
    /// Sends per destination per day.
    pub max_sends_per_day: u32,
    /// Sends per client IP address (IPv6: per /64) per hour.
    pub max_sends_per_ip_per_hour: u32,
    /// Sends per account per hour.
    pub max_sends_per_account_per_hour: u32,
    /// Sends per country calling code per hour.
    pub max_sends_per_country_per_hour: u32,
    /// Refuse SMS to landline, toll-free and other numbers that cannot take one.
    pub refuse_non_mobile_numbers: bool,
    /// SMS pumping circuit breaker: least verified share (percent) of a number range's
    /// settled codes; 0 turns it off.
    pub pumping_min_verified_percent: u32,
    /// Settled codes to a range before the breaker judges it.
    pub pumping_min_sample: u32,
    /// The breaker's window, seconds.
    pub pumping_window_secs: u64,
    /// National digits after the country code that make a range.
    pub pumping_prefix_digits: u8,
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
            max_sends_per_day: p.max_sends_per_day,
            max_sends_per_ip_per_hour: p.max_sends_per_ip_per_hour,
            max_sends_per_account_per_hour: p.max_sends_per_account_per_hour,
            max_sends_per_country_per_hour: p.max_sends_per_country_per_hour,
            refuse_non_mobile_numbers: p.refuse_non_mobile_numbers,
            pumping_min_verified_percent: p.pumping_min_verified_percent,
            pumping_min_sample: p.pumping_min_sample,
            pumping_window_secs: p.pumping_window.as_secs(),
            pumping_prefix_digits: p.pumping_prefix_digits,
            login_ticket_ttl_secs: p.login_ticket_ttl.as_secs(),
            session_ttl_secs: p.session_ttl.as_secs(),
            product_name: p.product_name,
        }
    }
}

/// PostgreSQL pool settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresSettings {
    /// Most connections per instance.
    pub max_connections: u32,
    /// How long a request waits for a connection, milliseconds (then 503).
    pub acquire_timeout_ms: u64,
    /// Server-side limit per statement, milliseconds.
    pub statement_timeout_ms: u64,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        let d = otpgate_store_postgres::PgSettings::new("");
        PostgresSettings {
            max_connections: d.max_connections,
            acquire_timeout_ms: d.acquire_timeout.as_millis() as u64,
            statement_timeout_ms: d.statement_timeout.as_millis() as u64,
        }
    }
}

/// Sweeper settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SweeperSettings {
    /// Seconds between rounds.
    pub interval_secs: u64,
    /// Hours resolved rows are kept.
    pub retention_hours: u64,
    /// Rows per delete statement.
    pub batch: u32,
}

impl Default for SweeperSettings {
    fn default() -> Self {
        let d = SweepPolicy::default();
        SweeperSettings {
            interval_secs: d.interval.as_secs(),
            retention_hours: d.retention.as_secs() / 3600,
            batch: d.batch,
        }
    }
}

/// Which database to use.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL server.
    Postgres(otpgate_store_postgres::PgSettings),
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./otpgate-data"),
            database_url: None,
            postgres: PostgresSettings::default(),
            sweeper: SweeperSettings::default(),
            master_key: None,
            log: "info".into(),
            policy: PolicySettings::default(),
            delivery: DeliverySettings::default(),
            templates: Default::default(),
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
            .filter(|key| !key.as_str().to_ascii_lowercase().starts_with("test_"));
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
        // The per-IP, per-account and per-country limits may be 0 (off); a destination's never.
        if [p.max_checks, p.max_sends_per_window, p.max_sends_per_day].contains(&0) {
            return Err(ConfigError(
                "policy.max_checks, policy.max_sends_per_window and policy.max_sends_per_day \
                 must be positive"
                    .into(),
            ));
        }
        if p.pumping_min_verified_percent > 100 || p.pumping_prefix_digits > 6 {
            return Err(ConfigError(
                "policy.pumping_min_verified_percent must be 0 to 100 and \
                 policy.pumping_prefix_digits 0 to 6"
                    .into(),
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
            max_sends_per_day: p.max_sends_per_day,
            max_sends_per_ip_per_hour: p.max_sends_per_ip_per_hour,
            max_sends_per_account_per_hour: p.max_sends_per_account_per_hour,
            max_sends_per_country_per_hour: p.max_sends_per_country_per_hour,
            refuse_non_mobile_numbers: p.refuse_non_mobile_numbers,
            pumping_min_verified_percent: p.pumping_min_verified_percent,
            pumping_min_sample: p.pumping_min_sample,
            pumping_window: positive("pumping_window_secs", p.pumping_window_secs)?,
            pumping_prefix_digits: p.pumping_prefix_digits,
            send_window: positive("send_window_secs", p.send_window_secs)?,
            login_ticket_ttl: positive("login_ticket_ttl_secs", p.login_ticket_ttl_secs)?,
            session_ttl: positive("session_ttl_secs", p.session_ttl_secs)?,
            product_name: p.product_name.trim().to_owned(),
            ..Policy::default()
        })
    }

    /// The sweeper's policy, validated.
    pub fn sweep_policy(&self) -> Result<SweepPolicy, ConfigError> {
        let w = &self.sweeper;
        if w.interval_secs == 0 || w.batch == 0 || w.retention_hours == 0 {
            return Err(ConfigError(
                "sweeper.interval_secs, sweeper.retention_hours and sweeper.batch must be positive"
                    .into(),
            ));
        }
        Ok(SweepPolicy {
            interval: Duration::from_secs(w.interval_secs),
            retention: Duration::from_secs(w.retention_hours.saturating_mul(3600)),
            batch: w.batch,
            ..SweepPolicy::default()
        })
    }

    /// The database: PostgreSQL for a `postgres://` URL, else a SQLite file (from a `sqlite:`
    /// URL, or `data_dir/otpgate.db`).
    pub fn store_choice(&self) -> Result<StoreChoice, ConfigError> {
        match self
            .database_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
        {
            None => Ok(StoreChoice::Sqlite(self.data_dir.join("otpgate.db"))),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                let p = &self.postgres;
                if p.max_connections == 0
                    || p.acquire_timeout_ms == 0
                    || p.statement_timeout_ms == 0
                {
                    return Err(ConfigError("postgres.* settings must be positive".into()));
                }
                Ok(StoreChoice::Postgres(otpgate_store_postgres::PgSettings {
                    url: url.to_owned(),
                    max_connections: p.max_connections,
                    acquire_timeout: Duration::from_millis(p.acquire_timeout_ms),
                    statement_timeout: Duration::from_millis(p.statement_timeout_ms),
                }))
            }
            Some(url) => {
                let path = url
                    .strip_prefix("sqlite://")
                    .or_else(|| url.strip_prefix("sqlite:"))
                    .ok_or_else(|| {
                        ConfigError(
                            "DATABASE_URL must start with postgres://, postgresql:// or sqlite:"
                                .into(),
                        )
                    })?;
                let path = path.split('?').next().unwrap_or(path);
                if path.is_empty() {
                    return Err(ConfigError("DATABASE_URL names no file".into()));
                }
                Ok(StoreChoice::Sqlite(PathBuf::from(path)))
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
        assert!(matches!(
            s.store_choice(),
            Ok(StoreChoice::Sqlite(p)) if p == Path::new("./otpgate-data/otpgate.db")
        ));
    }

    #[test]
    fn database_urls_choose_the_store() {
        let with = |url: &str| Settings {
            database_url: Some(url.into()),
            ..Settings::default()
        };
        let sqlite = |url: &str| match with(url).store_choice() {
            Ok(StoreChoice::Sqlite(p)) => Some(p),
            _ => None,
        };
        assert_eq!(
            sqlite("sqlite:///tmp/x.db"),
            Some(PathBuf::from("/tmp/x.db"))
        );
        assert_eq!(sqlite("sqlite:x.db?mode=rwc"), Some(PathBuf::from("x.db")));
        assert!(matches!(
            with("postgres://u@localhost/test").store_choice(),
            Ok(StoreChoice::Postgres(p)) if p.url == "postgres://u@localhost/test" && p.max_connections == 16
        ));
        assert!(with("mysql://x").store_choice().is_err());
        assert!(with("sqlite:").store_choice().is_err());
    }

    #[test]
    fn invalid_policies_are_refused_before_start() {
        let mut s = Settings::default();
        s.policy.code_length = 3;
        assert!(s.policy().is_err());
        let mut s = Settings::default();
        s.delivery.sms = vec!["carrier-pigeon".into()];
        assert!(s.delivery.policy().is_err());
    }

    #[test]
    fn only_the_address_account_and_country_send_limits_can_be_off() {
        let mut s = Settings::default();
        s.policy.max_sends_per_ip_per_hour = 0;
        s.policy.max_sends_per_account_per_hour = 0;
        s.policy.max_sends_per_country_per_hour = 0;
        let p = s.policy().expect("0 turns these three off");
        assert_eq!(p.max_sends_per_ip_per_hour, 0);
        for off in [
            |s: &mut Settings| s.policy.max_sends_per_window = 0,
            |s: &mut Settings| s.policy.max_sends_per_day = 0,
            |s: &mut Settings| s.policy.max_checks = 0,
        ] {
            let mut s = Settings::default();
            off(&mut s);
            assert!(s.policy().is_err());
        }
    }
}
