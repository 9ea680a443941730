//! Point reads by key, batched: the lookups of one kind (a ticket by hash, a login step's ticket
//! with its user and challenge, a user or a challenge by id) that arrive together share one
//! `WHERE key = ANY($1)` statement. Alone, each read is a round trip in which PostgreSQL spends
//! far more time on the statement's start, plan and snapshot than on the row.
//!
//! A batch's statement is sent after every request in it was made, so each caller still sees
//! every write that finished before it asked, as with a read of its own.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use otpgate_core::StoreError;
use otpgate_core::store::StoreResult;
use tokio::sync::oneshot;

use crate::PgStore;
use crate::batch::Request as _;

/// Reads the rows of these keys (each key at most once), with their keys.
pub(crate) type Fetch<K, T> =
    fn(PgStore, Vec<K>) -> Pin<Box<dyn Future<Output = StoreResult<Vec<(K, T)>>> + Send>>;

/// One caller's lookup, waiting for its batch.
pub(crate) struct LookupRequest<K, T> {
    /// The store to read from (the batchers hold none of their own, so they end with the last
    /// store).
    store: PgStore,
    key: K,
    reply: oneshot::Sender<StoreResult<Option<T>>>,
}

/// Where one kind of lookup is queued.
pub(crate) type LookupQueue<K, T> = crate::batch::Queue<LookupRequest<K, T>>;

impl<K: Send + 'static, T: Send + 'static> crate::batch::Request for LookupRequest<K, T> {
    fn fail(self, e: &StoreError) {
        let _ = self.reply.send(Err(e.clone()));
    }
}

/// Starts the batchers of one kind of lookup.
pub(crate) fn start<K, T>(fetch: Fetch<K, T>, max_wait: Duration) -> LookupQueue<K, T>
where
    K: Eq + Hash + Clone + Send + 'static,
    T: Clone + Send + 'static,
{
    crate::batch::start(
        Arc::new(move |batch| Box::pin(answer(batch, fetch))),
        None,
        max_wait,
    )
}

/// Looks `key` up in the next batch of its kind.
pub(crate) async fn look_up<K, T>(
    queue: &LookupQueue<K, T>,
    store: &PgStore,
    key: K,
) -> StoreResult<Option<T>>
where
    K: Send + 'static,
    T: Send + 'static,
{
    queue
        .ask(
            |reply| LookupRequest {
                store: store.clone(),
                key,
                reply,
            },
            "lookup",
        )
        .await
}

async fn answer<K, T>(batch: Vec<LookupRequest<K, T>>, fetch: Fetch<K, T>)
where
    K: Eq + Hash + Clone + Send + 'static,
    T: Clone + Send + 'static,
{
    let Some(store) = batch.first().map(|r| r.store.clone()) else {
        return;
    };
    let mut distinct = HashSet::new();
    let keys: Vec<K> = batch
        .iter()
        .filter(|r| distinct.insert(r.key.clone()))
        .map(|r| r.key.clone())
        .collect();
    match fetch(store, keys).await {
        Ok(rows) => {
            let found: HashMap<K, T> = rows.into_iter().collect();
            for request in batch {
                let _ = request.reply.send(Ok(found.get(&request.key).cloned()));
            }
        }
        Err(e) => batch.into_iter().for_each(|r| r.fail(&e)),
    }
}
