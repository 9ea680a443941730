//! Delivery adapters for the core's [`MessageSender`] port. For now the `log` provider, which
//! exists for development: it writes each message, code included, to the server log. It is the
//! only place in otpgate where a code may appear in a log line.

use async_trait::async_trait;
use otpgate_core::model::OutboxMessage;
use otpgate_core::outbox::{MessageSender, SendError};

/// The development provider: one log line per message with its destination and full text.
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
        Ok(Some(format!("log-{}", message.id)))
    }
}
