//! The queue and tasks behind every batched statement of this store (code checks, point reads,
//! login completions): requests that arrive together are handed to one call of a handler, which
//! runs one statement for all of them and answers each.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc};

/// The most requests one batch takes, so one statement stays small.
const MAX_BATCH: usize = 256;

/// Batches of one kind in flight at once: while one waits for PostgreSQL, the next gathers.
const BATCHERS: usize = 2;

/// Runs one batch and answers every request in it.
pub(crate) type Handler<R> =
    Arc<dyn Fn(Vec<R>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Starts the tasks of one kind of batch; requests go into the returned queue. The tasks end
/// when every sender is gone (requests should carry what the handler needs, the store included,
/// so that no task keeps the store, and so its senders, alive).
pub(crate) fn start<R: Send + 'static>(handle: Handler<R>) -> mpsc::UnboundedSender<R> {
    let (queue, requests) = mpsc::unbounded_channel();
    let requests = Arc::new(Mutex::new(requests));
    for _ in 0..BATCHERS {
        let (requests, handle) = (Arc::clone(&requests), Arc::clone(&handle));
        tokio::spawn(async move {
            loop {
                let mut batch = Vec::new();
                {
                    let mut requests = requests.lock().await;
                    if requests.recv_many(&mut batch, MAX_BATCH).await == 0 {
                        return;
                    }
                }
                handle(batch).await;
            }
        });
    }
    queue
}
