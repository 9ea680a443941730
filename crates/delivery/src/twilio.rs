//! The `twilio` SMS provider: Twilio's Messages API, a form-encoded POST to
//! `/2010-04-01/Accounts/{AccountSid}/Messages.json` with HTTP basic auth (account SID and auth
//! token). The answer's `sid` is the provider's message id.

use std::time::Duration;

use async_trait::async_trait;
use otpgate_core::model::OutboxMessage;
use otpgate_core::outbox::{MessageSender, SendError};
use secrecy::{ExposeSecret, SecretString};

/// Settings of the Twilio provider.
#[derive(Debug, Clone)]
pub struct TwilioConfig {
    /// `https://api.twilio.com` unless a test points it elsewhere.
    pub base_url: String,
    /// The account SID (`AC…`).
    pub account_sid: String,
    /// The auth token.
    pub auth_token: SecretString,
    /// The sender number or messaging service.
    pub from: String,
    /// Time-out of one call.
    pub timeout: Duration,
}

/// The Twilio provider.
pub struct TwilioSender {
    config: TwilioConfig,
    client: reqwest::Client,
}

impl TwilioSender {
    /// A Twilio provider.
    pub fn new(config: TwilioConfig) -> Result<Self, String> {
        Ok(TwilioSender {
            client: crate::http::client(config.timeout)?,
            config,
        })
    }
}

#[async_trait]
impl MessageSender for TwilioSender {
    fn name(&self) -> &str {
        "twilio"
    }

    async fn send(&self, message: &OutboxMessage) -> Result<Option<String>, SendError> {
        let Some(body) = message.body.as_deref() else {
            return Err(SendError::Permanent("message has no body".into()));
        };
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            self.config.base_url.trim_end_matches('/'),
            self.config.account_sid
        );
        let response = self
            .client
            .post(url)
            .basic_auth(
                &self.config.account_sid,
                Some(self.config.auth_token.expose_secret()),
            )
            .form(&[
                ("To", message.destination.as_str()),
                ("From", self.config.from.as_str()),
                ("Body", body),
            ])
            .send()
            .await
            .map_err(|e| crate::http::transport("twilio", e))?;
        if !response.status().is_success() {
            return Err(crate::http::status("twilio", response.status()));
        }
        // Accepted; an answer without a readable sid still means the message was taken.
        let sid = response
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v.get("sid").and_then(|s| s.as_str()).map(str::to_owned));
        Ok(sid)
    }
}
