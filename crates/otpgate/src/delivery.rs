//! Delivery configuration: which providers carry SMS (in failover order, per tenant if wished)
//! and e-mail, their credentials and base URLs, the retry policy and the message templates. A
//! provider named without its settings is refused at start with the missing key's name.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use otpgate_core::clock::Clock;
use otpgate_core::message::Templates;
use otpgate_core::outbox::{DeliveryPolicy, MessageSender};
use otpgate_delivery::kavenegar::{KavenegarConfig, KavenegarSender};
use otpgate_delivery::smtp::{Security, SmtpConfig, SmtpSender};
use otpgate_delivery::twilio::{TwilioConfig, TwilioSender};
use otpgate_delivery::webhook::{WebhookConfig, WebhookSender};
use otpgate_delivery::{LogSender, Router};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Delivery as configured.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    /// SMS providers in failover order: `log`, `webhook`, `twilio`, `kavenegar`.
    pub sms: Vec<String>,
    /// The e-mail provider: `log` or `smtp`.
    pub email: String,
    /// Tries per message before it is marked failed.
    pub max_tries: u32,
    /// First retry delay, milliseconds; doubles per try, with jitter.
    pub base_backoff_ms: u64,
    /// Longest retry delay, milliseconds.
    pub max_backoff_ms: u64,
    /// Longest sleep between outbox polls, milliseconds.
    pub poll_interval_ms: u64,
    /// How long a worker holds a claimed message, milliseconds.
    pub lease_ms: u64,
    /// Time-out of one provider call, milliseconds.
    pub timeout_ms: u64,
    /// Provider calls in flight at once (per otpgate instance).
    pub max_in_flight: u32,
    /// The webhook provider.
    pub webhook: WebhookSettings,
    /// The Twilio provider.
    pub twilio: TwilioSettings,
    /// The Kavenegar provider.
    pub kavenegar: KavenegarSettings,
    /// The SMTP provider.
    pub smtp: SmtpSettings,
    /// Per-tenant SMS providers, by tenant id.
    pub tenants: BTreeMap<String, TenantDelivery>,
}

/// A tenant's own SMS providers.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantDelivery {
    /// SMS providers in failover order.
    pub sms: Vec<String>,
}

/// `[delivery.webhook]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// Where to POST.
    pub url: Option<String>,
    /// The signing secret (`whsec_<base64>` or any text).
    #[serde(skip_serializing)]
    pub secret: Option<SecretString>,
}

/// `[delivery.twilio]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwilioSettings {
    /// API base URL.
    pub base_url: String,
    /// Account SID.
    pub account_sid: Option<String>,
    /// Auth token.
    #[serde(skip_serializing)]
    pub auth_token: Option<SecretString>,
    /// Sender number.
    pub from: Option<String>,
}

impl Default for TwilioSettings {
    fn default() -> Self {
        TwilioSettings {
            base_url: "https://api.twilio.com".into(),
            account_sid: None,
            auth_token: None,
            from: None,
        }
    }
}

/// `[delivery.kavenegar]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KavenegarSettings {
    /// API base URL.
    pub base_url: String,
    /// API key.
    #[serde(skip_serializing)]
    pub api_key: Option<SecretString>,
    /// The verify template registered at Kavenegar.
    pub template: Option<String>,
}

impl Default for KavenegarSettings {
    fn default() -> Self {
        KavenegarSettings {
            base_url: "https://api.kavenegar.com".into(),
            api_key: None,
            template: None,
        }
    }
}

/// `[delivery.smtp]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpSettings {
    /// Server host.
    pub host: Option<String>,
    /// Server port.
    pub port: u16,
    /// `starttls`, `tls` or `none`.
    pub security: String,
    /// User name.
    pub username: Option<String>,
    /// Password.
    #[serde(skip_serializing)]
    pub password: Option<SecretString>,
    /// Sender address.
    pub from: Option<String>,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        SmtpSettings {
            host: None,
            port: 587,
            security: "starttls".into(),
            username: None,
            password: None,
            from: None,
        }
    }
}

impl Default for DeliverySettings {
    fn default() -> Self {
        let d = DeliveryPolicy::default();
        DeliverySettings {
            sms: vec!["log".into()],
            email: "log".into(),
            max_tries: d.max_tries,
            base_backoff_ms: d.base_backoff.as_millis() as u64,
            max_backoff_ms: d.max_backoff.as_millis() as u64,
            poll_interval_ms: d.poll_interval.as_millis() as u64,
            lease_ms: d.lease.as_millis() as u64,
            timeout_ms: 10_000,
            max_in_flight: d.max_in_flight,
            webhook: WebhookSettings::default(),
            twilio: TwilioSettings::default(),
            kavenegar: KavenegarSettings::default(),
            smtp: SmtpSettings::default(),
            tenants: BTreeMap::new(),
        }
    }
}

fn required<T: Clone>(value: &Option<T>, key: &str) -> Result<T, ConfigError> {
    value
        .clone()
        .ok_or_else(|| ConfigError(format!("{key} is required by the provider that is in use")))
}

impl DeliverySettings {
    /// The retry policy, validated.
    pub fn policy(&self) -> Result<DeliveryPolicy, ConfigError> {
        if self.max_tries == 0
            || self.poll_interval_ms == 0
            || self.lease_ms == 0
            || self.timeout_ms == 0
            || self.max_in_flight == 0
        {
            return Err(ConfigError(
                "delivery.max_tries, poll_interval_ms, lease_ms, timeout_ms and max_in_flight \
                 must be positive"
                    .into(),
            ));
        }
        if self.lease_ms <= self.timeout_ms * 4 {
            return Err(ConfigError(
                "delivery.lease_ms must exceed four provider time-outs (delivery.timeout_ms), \
                 so a claim never lapses while a worker still sends"
                    .into(),
            ));
        }
        for name in self
            .sms
            .iter()
            .chain(self.tenants.values().flat_map(|t| t.sms.iter()))
        {
            if !["log", "webhook", "twilio", "kavenegar"].contains(&name.as_str()) {
                return Err(ConfigError(format!(
                    "delivery.sms: unknown provider {name:?} (log, webhook, twilio, kavenegar)"
                )));
            }
        }
        if !["log", "smtp"].contains(&self.email.as_str()) {
            return Err(ConfigError(format!(
                "delivery.email: unknown provider {:?} (log, smtp)",
                self.email
            )));
        }
        Ok(DeliveryPolicy {
            max_tries: self.max_tries,
            base_backoff: Duration::from_millis(self.base_backoff_ms.max(1)),
            max_backoff: Duration::from_millis(
                self.max_backoff_ms.max(self.base_backoff_ms.max(1)),
            ),
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            lease: Duration::from_millis(self.lease_ms),
            max_in_flight: self.max_in_flight,
            ..DeliveryPolicy::default()
        })
    }

    /// Whether any channel uses the development `log` provider.
    pub fn uses_log(&self) -> bool {
        self.email == "log"
            || self
                .sms
                .iter()
                .chain(self.tenants.values().flat_map(|t| t.sms.iter()))
                .any(|p| p == "log")
    }

    fn sms_provider(
        &self,
        name: &str,
        clock: &Arc<dyn Clock>,
    ) -> Result<Arc<dyn MessageSender>, ConfigError> {
        let timeout = Duration::from_millis(self.timeout_ms);
        Ok(match name {
            "log" => Arc::new(LogSender),
            "webhook" => Arc::new(
                WebhookSender::new(
                    WebhookConfig {
                        url: required(&self.webhook.url, "delivery.webhook.url")?,
                        secret: required(&self.webhook.secret, "delivery.webhook.secret")?,
                        timeout,
                    },
                    Arc::clone(clock),
                )
                .map_err(ConfigError)?,
            ),
            "twilio" => Arc::new(
                TwilioSender::new(TwilioConfig {
                    base_url: self.twilio.base_url.clone(),
                    account_sid: required(&self.twilio.account_sid, "delivery.twilio.account_sid")?,
                    auth_token: required(&self.twilio.auth_token, "delivery.twilio.auth_token")?,
                    from: required(&self.twilio.from, "delivery.twilio.from")?,
                    timeout,
                })
                .map_err(ConfigError)?,
            ),
            "kavenegar" => Arc::new(
                KavenegarSender::new(KavenegarConfig {
                    base_url: self.kavenegar.base_url.clone(),
                    api_key: required(&self.kavenegar.api_key, "delivery.kavenegar.api_key")?,
                    template: required(&self.kavenegar.template, "delivery.kavenegar.template")?,
                    timeout,
                })
                .map_err(ConfigError)?,
            ),
            other => {
                return Err(ConfigError(format!(
                    "delivery.sms: unknown provider {other:?}"
                )));
            }
        })
    }

    /// The routing sender: every named provider built, each incomplete one refused.
    pub fn build_sender(
        &self,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<dyn MessageSender>, ConfigError> {
        self.policy()?;
        let list = |names: &[String]| -> Result<Vec<Arc<dyn MessageSender>>, ConfigError> {
            if names.is_empty() {
                return Err(ConfigError(
                    "delivery.sms must name at least one provider".into(),
                ));
            }
            names.iter().map(|n| self.sms_provider(n, &clock)).collect()
        };
        let sms = list(&self.sms)?;
        let mut tenants = HashMap::new();
        for (tenant, own) in &self.tenants {
            tenants.insert(tenant.to_ascii_lowercase(), list(&own.sms)?);
        }
        let email: Arc<dyn MessageSender> = match self.email.as_str() {
            "smtp" => {
                let s = &self.smtp;
                let security = Security::parse(&s.security).ok_or_else(|| {
                    ConfigError("delivery.smtp.security must be starttls, tls or none".into())
                })?;
                Arc::new(
                    SmtpSender::new(SmtpConfig {
                        host: required(&s.host, "delivery.smtp.host")?,
                        port: s.port,
                        security,
                        username: s.username.clone(),
                        password: s.password.clone(),
                        from: required(&s.from, "delivery.smtp.from")?,
                        timeout: Duration::from_millis(self.timeout_ms),
                    })
                    .map_err(ConfigError)?,
                )
            }
            _ => Arc::new(LogSender),
        };
        Ok(Arc::new(Router::new(sms, email, tenants)))
    }
}

/// The message templates: the defaults with the configured ones, each checked.
pub fn templates(configured: &BTreeMap<String, String>) -> Result<Templates, ConfigError> {
    let mut templates = Templates::default();
    for (key, text) in configured {
        templates
            .set(key, text)
            .map_err(|e| ConfigError(format!("templates.{e}")))?;
    }
    Ok(templates)
}

#[cfg(test)]
mod tests {
    use super::*;
    use otpgate_core::clock::SystemClock;

    #[test]
    fn an_incomplete_provider_is_refused_naming_the_missing_key() {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let mut settings = DeliverySettings {
            sms: vec!["twilio".into()],
            ..DeliverySettings::default()
        };
        settings.twilio.account_sid = Some("AC123".into());
        let err = settings
            .build_sender(Arc::clone(&clock))
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(err.contains("delivery.twilio.auth_token"), "{err}");
        let smtp = DeliverySettings {
            email: "smtp".into(),
            ..DeliverySettings::default()
        };
        let err = smtp
            .build_sender(clock)
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(err.contains("delivery.smtp.host"), "{err}");
    }

    #[test]
    fn the_limit_of_calls_in_flight_reaches_the_worker_and_zero_is_refused() {
        let settings = DeliverySettings {
            max_in_flight: 3,
            ..DeliverySettings::default()
        };
        assert_eq!(settings.policy().map(|p| p.max_in_flight).ok(), Some(3));
        let none = DeliverySettings {
            max_in_flight: 0,
            ..DeliverySettings::default()
        };
        let err = none.policy().err().map(|e| e.0).unwrap_or_default();
        assert!(err.contains("max_in_flight"), "{err}");
    }

    #[test]
    fn a_template_with_a_missing_variable_is_refused_at_start() {
        let mut configured = BTreeMap::new();
        configured.insert("login.fa".to_owned(), "کد ورود {product}".to_owned());
        let err = templates(&configured)
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(err.contains("login.fa") && err.contains("{code}"), "{err}");
    }
}
