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

#[cfg(test)]
mod tests {
    use super::*;
    use otpgate_core::model::{DeliveryStatus, MessageId, Purpose, TenantId};

    struct Fixed(&'static str, Result<(), bool>);

    #[async_trait]
    impl MessageSender for Fixed {
        fn name(&self) -> &str {
            self.0
        }

        async fn send(&self, _: &OutboxMessage) -> Result<Option<String>, SendError> {
            match self.1 {
                Ok(()) => Ok(Some("1".into())),
                Err(true) => Err(SendError::Temporary("down".into())),
                Err(false) => Err(SendError::Permanent("refused".into())),
            }
        }
    }

    fn message(tenant: &str, channel: Channel) -> OutboxMessage {
        OutboxMessage {
            id: MessageId::generate().unwrap_or_else(|_| unreachable!()),
            tenant_id: TenantId::parse(tenant).unwrap_or_else(|_| unreachable!()),
            challenge_id: None,
            channel,
            destination: "+989121234567".into(),
            purpose: Purpose::Verify,
            locale: "en".into(),
            body: Some("b".into()),
            code: Some("123456".into()),
            status: DeliveryStatus::Queued,
            attempts: 1,
            next_attempt_at: time::OffsetDateTime::UNIX_EPOCH,
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            provider_message_id: None,
            last_error: None,
            client_ip: None,
            user_id: None,
        }
    }

    const OWN: &str = "00000000000000000000000000000001";
    const OTHER: &str = "00000000000000000000000000000002";

    fn router(default: Vec<Arc<dyn MessageSender>>) -> Router {
        let mut tenants: HashMap<String, Vec<Arc<dyn MessageSender>>> = HashMap::new();
        tenants.insert(OWN.into(), vec![Arc::new(Fixed("own", Ok(())))]);
        Router::new(default, Arc::new(Fixed("mail", Ok(()))), tenants)
    }

    #[tokio::test]
    async fn a_tenant_with_its_own_providers_uses_them() {
        let r = router(vec![Arc::new(Fixed("shared", Ok(())))]);
        let own = r.send(&message(OWN, Channel::Sms)).await.ok().flatten();
        let other = r.send(&message(OTHER, Channel::Sms)).await.ok().flatten();
        let mail = r.send(&message(OWN, Channel::Email)).await.ok().flatten();
        assert_eq!(own.as_deref(), Some("own:1"));
        assert_eq!(other.as_deref(), Some("shared:1"));
        assert_eq!(mail.as_deref(), Some("mail:1"));
    }

    #[tokio::test]
    async fn failures_are_temporary_while_any_provider_may_still_take_it() {
        let temporary = router(vec![
            Arc::new(Fixed("a", Err(false))),
            Arc::new(Fixed("b", Err(true))),
        ]);
        assert!(matches!(
            temporary.send(&message(OTHER, Channel::Sms)).await,
            Err(SendError::Temporary(_))
        ));
        let permanent = router(vec![
            Arc::new(Fixed("a", Err(false))),
            Arc::new(Fixed("b", Err(false))),
        ]);
        assert!(matches!(
            permanent.send(&message(OTHER, Channel::Sms)).await,
            Err(SendError::Permanent(_))
        ));
        let failover = router(vec![
            Arc::new(Fixed("a", Err(true))),
            Arc::new(Fixed("b", Ok(()))),
        ]);
        assert_eq!(
            failover
                .send(&message(OTHER, Channel::Sms))
                .await
                .ok()
                .flatten()
                .as_deref(),
            Some("b:1")
        );
    }
}
