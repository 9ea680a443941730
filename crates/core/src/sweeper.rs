//! The sweeper: deletes expired challenges, tickets, tokens and delivered outbox rows in bounded
//! batches, so the tables stay small under load. Every instance may run one; the deletes are
//! idempotent, so several sweepers only share the work.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::Clock;
use crate::store::Store;

/// How the sweeper works.
#[derive(Debug, Clone)]
pub struct SweepPolicy {
    /// Pause between rounds.
    pub interval: Duration,
    /// How long resolved rows are kept (for delivery status and send budgets).
    pub retention: Duration,
    /// Rows of each kind deleted per statement.
    pub batch: u32,
    /// Statements per round at most, so one round never holds the database long.
    pub max_batches_per_round: u32,
    /// Pause between two batches of a round. A backlog (a million dead challenges) is then
    /// deleted in small steps between the requests' own writes, instead of holding the
    /// database's writer for seconds: on SQLite a batch is one job of the group commit, and
    /// every request that shares its commit waits for it.
    pub pause: Duration,
}

impl Default for SweepPolicy {
    fn default() -> Self {
        SweepPolicy {
            interval: Duration::from_secs(60),
            retention: Duration::from_secs(24 * 60 * 60),
            batch: 100,
            max_batches_per_round: 100,
            pause: Duration::from_millis(20),
        }
    }
}

/// The sweeper task.
pub struct Sweeper {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    policy: SweepPolicy,
}

impl Sweeper {
    /// A sweeper over `store`.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, policy: SweepPolicy) -> Self {
        Sweeper {
            store,
            clock,
            policy,
        }
    }

    /// One round: batches until one comes back short, or the round's limit. Returns rows gone.
    pub async fn sweep_once(&self) -> Result<u64, crate::StoreError> {
        let mut total = 0;
        for _ in 0..self.policy.max_batches_per_round {
            let gone = self
                .store
                .sweep(self.clock.now(), self.policy.retention, self.policy.batch)
                .await?;
            total += gone;
            if gone < u64::from(self.policy.batch) {
                break;
            }
            tokio::time::sleep(self.policy.pause).await;
        }
        Ok(total)
    }

    /// Runs rounds until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            match self.sweep_once().await {
                Ok(0) => {}
                Ok(gone) => tracing::debug!(rows = gone, "sweeper deleted expired rows"),
                Err(e) => tracing::warn!(error = %e, "sweep failed; will retry"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.policy.interval) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                break;
            }
        }
    }
}
