//! The `kavenegar` SMS provider: Kavenegar's verify lookup API, the usual Iranian gateway for
//! one-time codes. It sends a template registered at Kavenegar with the code as its `token`:
//! `POST {base}/v1/{api-key}/verify/lookup.json` with `receptor`, `token` and `template`. The
//! API key travels in the path, so it is kept out of every error text.

use std::time::Duration;

use async_trait::async_trait;
use otpgate_core::model::OutboxMessage;
use otpgate_core::outbox::{MessageSender, SendError};
use secrecy::{ExposeSecret, SecretString};

/// Settings of the Kavenegar provider.
#[derive(Debug, Clone)]
pub struct KavenegarConfig {
    /// `https://api.kavenegar.com` unless a test points it elsewhere.
    pub base_url: String,
    /// The API key.
    pub api_key: SecretString,
    /// The verify template's name at Kavenegar.
    pub template: String,
    /// Time-out of one call.
    pub timeout: Duration,
}

/// The Kavenegar provider.
pub struct KavenegarSender {
    config: KavenegarConfig,
    client: reqwest::Client,
}

impl KavenegarSender {
    /// A Kavenegar provider.
    pub fn new(config: KavenegarConfig) -> Result<Self, String> {
        Ok(KavenegarSender {
            client: crate::http::client(config.timeout)?,
            config,
        })
    }
}

#[async_trait]
impl MessageSender for KavenegarSender {
    fn name(&self) -> &str {
        "kavenegar"
    }

    async fn send(&self, message: &OutboxMessage) -> Result<Option<String>, SendError> {
        let Some(code) = message.code.as_deref() else {
            return Err(SendError::Permanent("message has no code".into()));
        };
        // Kavenegar takes Iranian numbers in national form, others with their country code.
        let receptor = match message.destination.strip_prefix("+98") {
            Some(national) => format!("0{national}"),
            None => message.destination.trim_start_matches('+').to_owned(),
        };
        let url = format!(
            "{}/v1/{}/verify/lookup.json",
            self.config.base_url.trim_end_matches('/'),
            self.config.api_key.expose_secret()
        );
        let response = self
            .client
            .post(url)
            .form(&[
                ("receptor", receptor.as_str()),
                ("token", code),
                ("template", self.config.template.as_str()),
            ])
            .send()
            .await
            .map_err(|e| crate::http::transport("kavenegar", e))?;
        if !response.status().is_success() {
            return Err(crate::http::status("kavenegar", response.status()));
        }
        let answer = response.json::<serde_json::Value>().await.ok();
        let id = answer
            .as_ref()
            .and_then(|v| v.pointer("/entries/0/messageid"))
            .map(|id| id.to_string());
        Ok(id)
    }
}
