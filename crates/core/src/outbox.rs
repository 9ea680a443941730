//! Delivery through the outbox: a request only writes the message beside its challenge; this
//! worker claims due messages, hands them to a [`MessageSender`], and records the outcome with
//! exponential back-off. Claims are leases in the store, so a crash loses no message and two
//! workers never hold the same one.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, watch};

use crate::clock::Clock;
use crate::model::{AuditEvent, AuditKind, OutboxMessage, RequestContext};
use crate::store::Store;

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Worth another try later (time-out, 5xx, connection refused).
    #[error("temporary: {0}")]
    Temporary(String),
    /// Will never succeed (bad number, 4xx): fail at once.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// A provider that takes messages (SMS gateway, SMTP, the `log` provider).
#[async_trait]
pub trait MessageSender: Send + Sync + 'static {
    /// A short name for logs and audit events.
    fn name(&self) -> &str;
    /// Hands one message to the provider; the provider's message id on success.
    async fn send(&self, message: &OutboxMessage) -> Result<Option<String>, SendError>;
}

/// How the worker retries.
#[derive(Debug, Clone)]
pub struct DeliveryPolicy {
    /// Tries before a message is marked failed.
    pub max_tries: u32,
    /// Delay after the first failure; doubles per try.
    pub base_backoff: Duration,
    /// Longest delay between tries.
    pub max_backoff: Duration,
    /// How long a claim holds before another worker may take the message.
    pub lease: Duration,
    /// Longest sleep between polls when nothing wakes the worker.
    pub poll_interval: Duration,
    /// Messages claimed per round.
    pub batch: u32,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        DeliveryPolicy {
            max_tries: 5,
            base_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(300),
            lease: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            batch: 32,
        }
    }
}

impl DeliveryPolicy {
    /// Delay before try `tries + 1`, with up to 25% random jitter so retries do not align.
    pub fn backoff_after(&self, tries: u32) -> Duration {
        let exp = self
            .base_backoff
            .saturating_mul(1u32 << tries.saturating_sub(1).min(16));
        let capped = exp.min(self.max_backoff);
        let jitter_permille = crate::crypto::random_bytes::<2>()
            .map(|b| u32::from(u16::from_le_bytes(b)) % 250)
            .unwrap_or(0);
        capped + capped.saturating_mul(jitter_permille) / 1000
    }
}

/// The outbox worker.
pub struct DeliveryWorker {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    sender: Arc<dyn MessageSender>,
    policy: DeliveryPolicy,
    wake: Arc<Notify>,
}

/// Provider calls one worker makes at once.
const CONCURRENT_DELIVERIES: usize = 16;

type Delivery<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), crate::StoreError>> + Send + 'a>>;

impl DeliveryWorker {
    /// A worker; `wake` is notified by the core whenever it queues a message.
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        sender: Arc<dyn MessageSender>,
        policy: DeliveryPolicy,
        wake: Arc<Notify>,
    ) -> Self {
        DeliveryWorker {
            store,
            clock,
            sender,
            policy,
            wake,
        }
    }

    /// Runs until `shutdown` turns true; the round in progress finishes first.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                break;
            }
            let handled = match self.deliver_due().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox round failed");
                    0
                }
            };
            if handled > 0 {
                continue;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.policy.poll_interval) => {}
                _ = shutdown.changed() => {}
            }
        }
        tracing::info!("outbox worker stopped");
    }

    /// One round: claims due messages and tries each once. Returns how many it handled.
    pub async fn deliver_due(&self) -> Result<usize, crate::StoreError> {
        let now = self.clock.now();
        let claimed = self
            .store
            .claim_outbox(now, now + self.policy.lease, self.policy.batch)
            .await?;
        // A provider call takes milliseconds to seconds: the batch goes out side by side, or one
        // slow gateway would hold every message behind it.
        for chunk in claimed.chunks(CONCURRENT_DELIVERIES) {
            let mut deliveries: Vec<Delivery<'_>> = Vec::with_capacity(chunk.len());
            for message in chunk {
                deliveries.push(Box::pin(self.deliver_one(message)));
            }
            for outcome in futures_util::future::join_all(deliveries).await {
                outcome?;
            }
        }
        Ok(claimed.len())
    }

    async fn deliver_one(&self, message: &OutboxMessage) -> Result<(), crate::StoreError> {
        let outcome = self.sender.send(message).await;
        let now = self.clock.now();
        let event = |kind, detail: String| AuditEvent {
            tenant_id: message.tenant_id.clone(),
            user_id: None,
            kind,
            detail,
            context: RequestContext::default(),
            at: now,
        };
        let outcome_name = match &outcome {
            Ok(_) => "sent",
            Err(SendError::Temporary(_)) if message.attempts < self.policy.max_tries => "retry",
            Err(_) => "failed",
        };
        metrics::counter!(
            "otpgate_deliveries_total",
            "channel" => message.channel.as_str(),
            "outcome" => outcome_name
        )
        .increment(1);
        match outcome {
            Ok(provider_id) => {
                let detail = format!("message {} via {}", message.id, self.sender.name());
                self.store
                    .mark_message_sent(
                        &message.id,
                        provider_id.as_deref(),
                        &[event(AuditKind::MessageSent, detail)],
                    )
                    .await
            }
            Err(SendError::Temporary(reason)) if message.attempts < self.policy.max_tries => {
                tracing::warn!(message_id = %message.id, tries = message.attempts, %reason, "delivery failed; will retry");
                let next = now + self.policy.backoff_after(message.attempts);
                self.store
                    .mark_message_retry(&message.id, next, &reason)
                    .await
            }
            Err(error) => {
                tracing::error!(message_id = %message.id, tries = message.attempts, %error, "delivery failed for good");
                let reason = error.to_string();
                let detail = format!("message {}: {reason}", message.id);
                self.store
                    .mark_message_failed(
                        &message.id,
                        &reason,
                        &[event(AuditKind::MessageFailed, detail)],
                    )
                    .await
            }
        }
    }
}
