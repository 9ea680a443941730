//! Delivery through the outbox: a request only writes the message beside its challenge; this
//! worker claims due messages, hands them to a [`MessageSender`], and records the outcome with
//! exponential back-off. Claims are leases in the store, so a crash loses no message and two
//! workers never hold the same one.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
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
    /// Messages one claim takes at most (the worker claims again as deliveries end).
    pub batch: u32,
    /// Provider calls one worker has in flight at most (a provider's concurrency limit, say).
    pub max_in_flight: u32,
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
            max_in_flight: 64,
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

    /// Runs until `shutdown` turns true; the deliveries in flight finish first.
    ///
    /// A provider call takes milliseconds to seconds (up to the provider time-out when a
    /// gateway hangs), so the worker keeps up to [`DeliveryPolicy::max_in_flight`] of them going
    /// and claims more as they end: when it waited for a whole claimed batch instead, one hung
    /// call held up every message claimed with it, and every message queued after them, until
    /// its time-out. It claims whenever a claim's worth of room is free (or nothing is in
    /// flight), so with less room it waits for deliveries to end; a claim that finds fewer
    /// messages than it asked for means the queue is empty, and the next one waits for the
    /// core's wake-up (a new message) or the poll interval (a retry that fell due).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let max_in_flight = usize::try_from(self.policy.max_in_flight)
            .unwrap_or(usize::MAX)
            .max(1);
        let claim_size = usize::try_from(self.policy.batch)
            .unwrap_or(max_in_flight)
            .clamp(1, max_in_flight);
        let mut in_flight = FuturesUnordered::new();
        let mut queue_empty = false;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let room = max_in_flight.saturating_sub(in_flight.len());
            if !queue_empty && (room >= claim_size || in_flight.is_empty()) {
                let wanted = claim_size.min(room);
                match self.claim(wanted).await {
                    Ok(claimed) => {
                        queue_empty = claimed.len() < wanted;
                        for message in claimed {
                            in_flight.push(self.deliver_owned(message));
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming due messages failed");
                        queue_empty = true;
                    }
                }
            }
            tokio::select! {
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                _ = self.wake.notified() => queue_empty = false,
                _ = tokio::time::sleep(self.policy.poll_interval) => queue_empty = false,
                _ = shutdown.changed() => {}
            }
        }
        while in_flight.next().await.is_some() {}
        tracing::info!("outbox worker stopped");
    }

    /// Claims up to `limit` due messages for the lease.
    async fn claim(&self, limit: usize) -> Result<Vec<OutboxMessage>, crate::StoreError> {
        let now = self.clock.now();
        let limit = u32::try_from(limit).unwrap_or(u32::MAX);
        self.store
            .claim_outbox(now, now + self.policy.lease, limit)
            .await
    }

    /// Delivers one claimed message. A failure to record the outcome is logged: the message
    /// stays claimed until its lease lapses, and is then tried again.
    async fn deliver_owned(&self, message: OutboxMessage) {
        if let Err(e) = self.deliver_one(&message).await {
            tracing::warn!(message_id = %message.id, error = %e, "recording a delivery's outcome failed");
        }
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
