//! Picks the providers of a message: e-mail goes to the e-mail provider; SMS to the tenant's own
//! list if it has one, else the default list, tried in order, so a second provider takes over
//! when the first fails.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use otpgate_core::model::{Channel, OutboxMessage};
use otpgate_core::outbox::{MessageSender, SendError};

/// The routing sender the outbox worker uses.
pub struct Router {
    sms: Vec<Arc<dyn MessageSender>>,
    email: Arc<dyn MessageSender>,
    tenants: HashMap<String, Vec<Arc<dyn MessageSender>>>,
}

impl Router {
    /// SMS providers in failover order, the e-mail provider, and per-tenant SMS lists.
    pub fn new(
        sms: Vec<Arc<dyn MessageSender>>,
        email: Arc<dyn MessageSender>,
        tenants: HashMap<String, Vec<Arc<dyn MessageSender>>>,
    ) -> Self {
        Router {
            sms,
            email,
            tenants,
        }
    }

    fn providers(&self, message: &OutboxMessage) -> Vec<Arc<dyn MessageSender>> {
        match message.channel {
            Channel::Email => vec![Arc::clone(&self.email)],
            Channel::Sms | Channel::Totp => self
                .tenants
                .get(message.tenant_id.as_str())
                .unwrap_or(&self.sms)
                .clone(),
        }
    }
}

#[async_trait]
impl MessageSender for Router {
    fn name(&self) -> &str {
        "router"
    }

    async fn send(&self, message: &OutboxMessage) -> Result<Option<String>, SendError> {
        let mut failures = Vec::new();
        let mut any_temporary = false;
        for provider in self.providers(message) {
            match provider.send(message).await {
                Ok(id) => {
                    if !failures.is_empty() {
                        tracing::warn!(message_id = %message.id, provider = provider.name(), earlier = %failures.join("; "), "delivered by a failover provider");
                    }
                    return Ok(Some(match id {
                        Some(id) => format!("{}:{id}", provider.name()),
                        None => provider.name().to_owned(),
                    }));
                }
                Err(e) => {
                    any_temporary |= matches!(e, SendError::Temporary(_));
                    failures.push(e.to_string());
                }
            }
        }
        let text = if failures.is_empty() {
            "no provider is configured for this channel".to_owned()
        } else {
            failures.join("; ")
        };
        // Retry while any provider might still take it; give up when all refused for good.
        Err(if any_temporary {
            SendError::Temporary(text)
        } else {
            SendError::Permanent(text)
        })
    }
}
