//! Test kit shared by every store and by the API tests: a fake clock, a recording message
//! sender, fixtures, and the store contract suite that each back-end runs with
//! [`store_contract_tests!`], so a behaviour that differs between back-ends fails in one of them.

pub mod contract;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use otpgate_core::clock::Clock;
use otpgate_core::model::OutboxMessage;
use otpgate_core::outbox::{MessageSender, SendError};
use time::OffsetDateTime;

/// A clock that stands still until a test moves it.
#[derive(Debug)]
pub struct FakeClock {
    now: Mutex<OffsetDateTime>,
}

impl FakeClock {
    /// A clock at a fixed, realistic moment (2026-01-01T00:00:00Z).
    pub fn new() -> Arc<Self> {
        Self::at(
            OffsetDateTime::from_unix_timestamp(1_767_225_600)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
        )
    }

    /// A clock at `moment`.
    pub fn at(moment: OffsetDateTime) -> Arc<Self> {
        Arc::new(FakeClock {
            now: Mutex::new(moment),
        })
    }

    /// Moves time forward.
    pub fn advance(&self, by: Duration) {
        if let Ok(mut now) = self.now.lock() {
            *now += by;
        }
    }
}

impl Clock for FakeClock {
    fn now(&self) -> OffsetDateTime {
        self.now
            .lock()
            .map(|n| *n)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

/// A sender that keeps every message it is given, standing in for the outside world in flow
/// tests (the real provider adapters are tested against real servers).
#[derive(Debug, Default)]
pub struct RecordingSender {
    sent: Mutex<Vec<OutboxMessage>>,
}

impl RecordingSender {
    /// A new, empty recorder.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Every message so far.
    pub fn messages(&self) -> Vec<OutboxMessage> {
        self.sent.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits (up to 10 s) until at least `count` messages reached `destination`, and returns
    /// the code of the `count`-th (1-based, in delivery order).
    pub async fn wait_for_code(&self, destination: &str, count: usize) -> Option<String> {
        for _ in 0..1000 {
            let to_dest: Vec<OutboxMessage> = self
                .messages()
                .into_iter()
                .filter(|m| m.destination == destination)
                .collect();
            if to_dest.len() >= count {
                return to_dest
                    .get(count.saturating_sub(1))
                    .and_then(|m| m.code.clone());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }
}

#[async_trait]
impl MessageSender for RecordingSender {
    fn name(&self) -> &str {
        "recording"
    }

    async fn send(&self, message: &OutboxMessage) -> Result<Option<String>, SendError> {
        let mut sent = self
            .sent
            .lock()
            .map_err(|_| SendError::Temporary("recorder poisoned".into()))?;
        sent.push(message.clone());
        Ok(Some(format!("rec-{}", sent.len())))
    }
}
