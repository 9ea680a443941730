//! Delivery adapters for the core's [`MessageSender`] port: the `log` provider (development),
//! SMS gateways over HTTP (`webhook`, `twilio`, `kavenegar`), e-mail over SMTP, and the router
//! that picks a tenant's SMS providers in failover order. The outbox worker in the core owns
//! retries and back-off; an adapter only says whether a failure is worth retrying.

mod http;
pub mod kavenegar;
pub mod router;
pub mod smtp;
pub mod twilio;
pub mod webhook;

use async_trait::async_trait;
use otpgate_core::model::OutboxMessage;
use otpgate_core::outbox::{MessageSender, SendError};

pub use router::Router;

/// The development provider: one log line per message with its destination and full text. It
/// is the only place in otpgate where a code may appear in a log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogSender;

#[async_trait]
impl MessageSender for LogSender {
    fn name(&self) -> &str {
        "log"
    }

    async fn send(&self, message: &OutboxMessage) -> Result<Option<String>, SendError> {
        let Some(body) = message.body.as_deref() else {
            return Err(SendError::Permanent("message has no body".into()));
        };
        tracing::info!(
            target: "otpgate::delivery::log",
            message_id = %message.id,
            channel = message.channel.as_str(),
            to = %message.destination,
            text = %body,
            "log provider: message delivered to the log (development only)"
        );
        Ok(Some(message.id.to_string()))
    }
}

/// Installs the process's TLS crypto provider (ring) once; HTTP and SMTP clients need it.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
