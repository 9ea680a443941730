//! The `webhook` SMS provider: POSTs the message as JSON to a URL of the operator's own, signed
//! in the style of the Standard Webhooks specification (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`), so the receiver
//! can check it came from otpgate and was not replayed.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use data_encoding::BASE64;
use hmac::{Hmac, KeyInit, Mac};
use otpgate_core::clock::Clock;
use otpgate_core::model::OutboxMessage;
use otpgate_core::outbox::{MessageSender, SendError};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

/// Settings of the webhook provider.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Where to POST.
    pub url: String,
    /// The signing secret: `whsec_<base64>` as the specification writes it, or any text.
    pub secret: SecretString,
    /// Time-out of one call.
    pub timeout: Duration,
}

/// The webhook provider.
pub struct WebhookSender {
    config: WebhookConfig,
    key: Vec<u8>,
    client: reqwest::Client,
    clock: Arc<dyn Clock>,
}

#[derive(Serialize)]
struct Payload<'a> {
    message_id: &'a str,
    to: &'a str,
    channel: &'a str,
    body: &'a str,
    code: &'a str,
    purpose: &'a str,
    locale: &'a str,
    tenant_id: &'a str,
}

/// The key bytes of a secret: the base64 after `whsec_`, or the text itself.
pub fn secret_bytes(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|b64| BASE64.decode(b64.as_bytes()).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// The `webhook-signature` value of a delivery.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = match <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", BASE64.encode(&mac.finalize().into_bytes()))
}

impl WebhookSender {
    /// A webhook provider.
    pub fn new(config: WebhookConfig, clock: Arc<dyn Clock>) -> Result<Self, String> {
        if !(config.url.starts_with("http://") || config.url.starts_with("https://")) {
            return Err("delivery.webhook.url must be an http:// or https:// URL".into());
        }
        let key = secret_bytes(config.secret.expose_secret());
        Ok(WebhookSender {
            client: crate::http::client(config.timeout)?,
            config,
            key,
            clock,
        })
    }
}

#[async_trait]
impl MessageSender for WebhookSender {
    fn name(&self) -> &str {
        "webhook"
    }

    async fn send(&self, message: &OutboxMessage) -> Result<Option<String>, SendError> {
        let (Some(body), Some(code)) = (message.body.as_deref(), message.code.as_deref()) else {
            return Err(SendError::Permanent("message has no body".into()));
        };
        let payload = serde_json::to_vec(&Payload {
            message_id: message.id.as_str(),
            to: &message.destination,
            channel: message.channel.as_str(),
            body,
            code,
            purpose: message.purpose.as_str(),
            locale: &message.locale,
            tenant_id: message.tenant_id.as_str(),
        })
        .map_err(|e| SendError::Permanent(format!("webhook payload: {e}")))?;
        let id = format!("msg_{}", message.id);
        let timestamp = self.clock.now().unix_timestamp();
        let response = self
            .client
            .post(&self.config.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signature(&self.key, &id, timestamp, &payload),
            )
            .body(payload)
            .send()
            .await
            .map_err(|e| crate::http::transport("webhook", e))?;
        if !response.status().is_success() {
            return Err(crate::http::status("webhook", response.status()));
        }
        Ok(Some(id))
    }
}
