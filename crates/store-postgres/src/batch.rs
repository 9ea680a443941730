//! The queue and tasks behind every batched statement of this store (code checks, point reads,
//! login completions): requests that arrive together are handed to one call of a handler, which
//! runs one statement for all of them and answers each.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use otpgate_core::StoreError;
use otpgate_core::store::StoreResult;
use tokio::sync::{Mutex, mpsc, oneshot};

/// The most requests one batch takes, so one statement stays small.
const MAX_BATCH: usize = 256;

/// Times a batcher lets the other ready tasks run before it sends what it gathered.
const GATHER_YIELDS: usize = 2;

/// Batches of one kind in flight at once. With one, each batch's round trips ran one after
/// the other and the database sat idle while the server answered the batch before and gathered
/// the next: in `v1-check` a statement log showed PostgreSQL busy about 2 ms of each 6.5 ms
/// cycle, and a fifth of the two cores idle. With two, one batch's statements run while the
/// server answers the other's requests: on 2026-12-04 `v1-check` rose by about 15% and
/// `acl-confirm` by about 10% (BENCHMARKS.md; on 2026-12-02, on another machine and before
/// `0014`'s HOT updates, two had been slower for `acl-confirm`). Each batch is sorted by the
/// rows it locks (challenge ids, accounts) before its statement, so two in flight that share
/// rows wait for each other instead of deadlocking; a statement that does fail is retried
/// request by request, as before. A statement that waits (a row lock held elsewhere) holds up
/// the requests of its batch, for at most the statement timeout.
const BATCHERS: usize = 2;

/// A request waiting in a batch queue.
pub(crate) trait Request: Send + 'static {
    /// Answers it with `e`, without running it.
    fn fail(self, e: &StoreError);
}

/// Implements [`Request`] for request types whose `reply` field takes a `StoreResult`: a request
/// that cannot run is answered with the error there.
macro_rules! answered_through_reply {
    ($($request:ty),+ $(,)?) => {
        $(
            impl crate::batch::Request for $request {
                fn fail(self, e: &otpgate_core::StoreError) {
                    let _ = self.reply.send(Err(e.clone()));
                }
            }
        )+
    };
}
pub(crate) use answered_through_reply;

/// Runs one batch and answers every request in it.
pub(crate) type Handler<R> =
    Arc<dyn Fn(Vec<R>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Runs a request that came alone, with the statements it would use without batches.
pub(crate) type Single<R> =
    Arc<dyn Fn(R) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Where requests of one kind wait for their batch.
pub(crate) struct Queue<R> {
    sender: mpsc::UnboundedSender<(Instant, R)>,
}

impl<R> Clone for Queue<R> {
    fn clone(&self) -> Self {
        Queue {
            sender: self.sender.clone(),
        }
    }
}

impl<R> std::fmt::Debug for Queue<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

impl<R: Request> Queue<R> {
    /// Queues `request`; answers it with an error at once if the batchers are gone.
    pub(crate) fn submit(&self, request: R) {
        if let Err(mpsc::error::SendError((_, request))) =
            self.sender.send((Instant::now(), request))
        {
            request.fail(&StoreError::Unavailable("the batchers stopped".into()));
        }
    }

    /// Submits the request `make` builds around its reply, and waits for the answer; `what`
    /// names the batcher in the error when its task stopped before answering.
    pub(crate) async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<StoreResult<T>>) -> R,
        what: &'static str,
    ) -> StoreResult<T> {
        let (reply, answer) = oneshot::channel();
        self.submit(make(reply));
        answer
            .await
            .map_err(|_| StoreError::Unavailable(format!("the {what} batcher stopped")))?
    }
}

/// The rows a settling batch judges: the batch split into the first request of each key and
/// the repeats (settled after the batch, as a concurrent request would be), and the rows of
/// those keys as `fetch` read them with one statement. When the read fails every request,
/// repeats too, is answered with its error, and `None` comes back.
pub(crate) async fn read_distinct<R, K, T, F>(
    batch: Vec<R>,
    key: impl Fn(&R) -> K,
    fetch: impl FnOnce(Vec<K>) -> F,
) -> Option<(Vec<R>, Vec<R>, HashMap<K, T>)>
where
    R: Request,
    K: Eq + Hash + Clone,
    F: Future<Output = StoreResult<Vec<(K, T)>>>,
{
    let mut first_of_each = HashSet::new();
    let (firsts, repeats): (Vec<R>, Vec<R>) = batch
        .into_iter()
        .partition(|r| first_of_each.insert(key(r)));
    match fetch(firsts.iter().map(&key).collect()).await {
        Ok(rows) => Some((firsts, repeats, rows.into_iter().collect())),
        Err(e) => {
            firsts.into_iter().chain(repeats).for_each(|r| r.fail(&e));
            None
        }
    }
}

/// Runs one request's judge (the core's code) on a batcher's task, which the batch's other
/// requests share: a judge that panics fails its own request only. `None` after a panic, which
/// is logged; the caller answers that request with [`judge_panicked`].
pub(crate) fn run_judge<V>(judge: impl FnOnce() -> V, what: &'static str) -> Option<V> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(judge)) {
        Ok(verdict) => Some(verdict),
        Err(_) => {
            tracing::error!(judge = what, "a judge panicked");
            None
        }
    }
}

/// The answer of a request whose judge panicked.
pub(crate) fn judge_panicked() -> StoreError {
    StoreError::Other("judge panicked".into())
}

/// Starts the tasks of one kind of batch. The tasks end when every sender is gone (requests
/// should carry what the handler needs, the store included, so that no task keeps the store,
/// and so its queue, alive).
///
/// A request that arrives alone goes to `single` when there is one: PostgreSQL plans a batch
/// statement afresh for each call (custom plans), which costs more than one request's work. It
/// runs on the batcher's task, so what arrives meanwhile forms the next batch (spawning it let
/// every batch stay at one under load).
///
/// A request that waited longer than `max_wait` (the pool's acquire timeout) fails without
/// running: the queue has no bound, and while the database does not answer each batch takes a
/// pool timeout to fail, so without this a request's wait would grow with the queue instead of
/// staying at about one timeout, as it is without batches.
pub(crate) fn start<R: Request>(
    handle: Handler<R>,
    single: Option<Single<R>>,
    max_wait: Duration,
) -> Queue<R> {
    let (sender, requests) = mpsc::unbounded_channel::<(Instant, R)>();
    let requests = Arc::new(Mutex::new(requests));
    for _ in 0..BATCHERS {
        let (requests, handle, single) =
            (Arc::clone(&requests), Arc::clone(&handle), single.clone());
        tokio::spawn(async move {
            loop {
                let mut queued = Vec::new();
                {
                    let mut requests = requests.lock().await;
                    if requests.recv_many(&mut queued, MAX_BATCH).await == 0 {
                        return;
                    }
                    // Let the tasks that are ready run first: requests they are about to queue
                    // join this batch instead of waiting for the next one.
                    for _ in 0..GATHER_YIELDS {
                        if queued.len() >= MAX_BATCH {
                            break;
                        }
                        tokio::task::yield_now().await;
                        while queued.len() < MAX_BATCH {
                            match requests.try_recv() {
                                Ok(request) => queued.push(request),
                                Err(_) => break,
                            }
                        }
                    }
                }
                let mut batch = Vec::with_capacity(queued.len());
                for (since, request) in queued {
                    if since.elapsed() > max_wait {
                        request.fail(&StoreError::Unavailable(
                            "the database did not answer in time".into(),
                        ));
                    } else {
                        batch.push(request);
                    }
                }
                match (batch.len(), &single) {
                    (0, _) => {}
                    (1, Some(single)) => {
                        for request in batch {
                            single(request).await;
                        }
                    }
                    _ => handle(batch).await,
                }
            }
        });
    }
    Queue { sender }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    struct Probe {
        id: u32,
        reply: oneshot::Sender<Result<u32, StoreError>>,
    }

    impl Request for Probe {
        fn fail(self, e: &StoreError) {
            let _ = self.reply.send(Err(e.clone()));
        }
    }

    fn probe(queue: &Queue<Probe>, id: u32) -> oneshot::Receiver<Result<u32, StoreError>> {
        let (reply, answer) = oneshot::channel();
        queue.submit(Probe { id, reply });
        answer
    }

    /// A queue whose batches answer with their size, and whose lone requests with 100 times
    /// their id.
    fn sizing_queue() -> Queue<Probe> {
        let many: Handler<Probe> = Arc::new(|batch: Vec<Probe>| {
            Box::pin(async move {
                let size = u32::try_from(batch.len()).unwrap_or(u32::MAX);
                for p in batch {
                    let _ = p.reply.send(Ok(size));
                }
            })
        });
        let single: Single<Probe> = Arc::new(|p: Probe| {
            Box::pin(async move {
                let _ = p.reply.send(Ok(p.id * 100));
            })
        });
        start(many, Some(single), Duration::from_secs(5))
    }

    #[tokio::test]
    async fn an_asked_request_gets_its_answer_or_the_batchers_name_when_none_comes() {
        // Arrange: a queue that answers, and one whose handler drops every request unanswered.
        let answering = sizing_queue();
        let dropping: Handler<Probe> = Arc::new(|batch: Vec<Probe>| {
            Box::pin(async move {
                drop(batch);
            })
        });
        let silent = start(dropping, None, Duration::from_secs(5));
        // Act
        let answered = answering.ask(|reply| Probe { id: 7, reply }, "probe").await;
        let unanswered = silent.ask(|reply| Probe { id: 7, reply }, "probe").await;
        // Assert
        assert_eq!(answered.ok(), Some(700));
        assert!(
            matches!(&unanswered, Err(StoreError::Unavailable(why)) if why == "the probe batcher stopped"),
            "{unanswered:?}"
        );
    }

    #[tokio::test]
    async fn a_batch_reads_each_key_once_and_a_failed_read_answers_every_request() {
        // Arrange: five requests for three keys (two repeated).
        let batch = |answers: &mut Vec<oneshot::Receiver<Result<u32, StoreError>>>| {
            [1, 2, 1, 3, 2]
                .into_iter()
                .map(|id| {
                    let (reply, answer) = oneshot::channel();
                    answers.push(answer);
                    Probe { id, reply }
                })
                .collect::<Vec<_>>()
        };
        let mut unused = Vec::new();
        // Act: one read that finds keys 1 and 3, one that fails.
        let read = read_distinct(
            batch(&mut unused),
            |p| p.id,
            |keys| async move {
                assert_eq!(keys, vec![1, 2, 3], "each key once, in order");
                Ok(vec![(1, "one"), (3, "three")])
            },
        )
        .await;
        let mut answers = Vec::new();
        let failed = read_distinct(
            batch(&mut answers),
            |p| p.id,
            |_| async { Err::<Vec<(u32, ())>, _>(StoreError::Unavailable("down".into())) },
        )
        .await;
        // Assert
        let (firsts, repeats, rows) = read.unwrap();
        let ids = |ps: &[Probe]| ps.iter().map(|p| p.id).collect::<Vec<_>>();
        assert_eq!((ids(&firsts), ids(&repeats)), (vec![1, 2, 3], vec![1, 2]));
        assert_eq!(rows, HashMap::from([(1, "one"), (3, "three")]));
        assert!(failed.is_none());
        for answer in answers {
            assert!(matches!(
                answer.await.unwrap(),
                Err(StoreError::Unavailable(_))
            ));
        }
    }

    #[tokio::test]
    async fn a_lone_request_runs_alone_and_requests_together_run_as_a_batch() {
        // Arrange: handlers that answer with the size of what they were given.
        let queue = sizing_queue();
        // Act: three queued before the batcher runs (one thread here), then one alone.
        let together: Vec<_> = (1..4).map(|id| probe(&queue, id)).collect();
        let mut sizes = Vec::new();
        for answer in together {
            sizes.push(answer.await.unwrap().unwrap());
        }
        let alone = probe(&queue, 7).await.unwrap().unwrap();
        // Assert
        assert_eq!(sizes, vec![3, 3, 3]);
        assert_eq!(alone, 700);
    }

    #[tokio::test]
    async fn a_request_queued_by_a_task_that_was_ready_joins_the_batch() {
        // Arrange: the same queue, on one thread, so the order tasks run in is fixed.
        let queue = sizing_queue();
        // Act: one request queued, and a task ready to queue another when the batcher wakes.
        let first = probe(&queue, 1);
        let other = queue.clone();
        let second = tokio::spawn(async move { probe(&other, 2).await });
        // Assert: both went as one batch of two, not as two requests alone.
        assert_eq!(first.await.unwrap().unwrap(), 2);
        assert_eq!(second.await.unwrap().unwrap().unwrap(), 2);
    }

    #[tokio::test]
    async fn a_request_that_waited_past_the_pool_timeout_fails_without_running() {
        // Arrange: a database that takes 300 ms per batch, and a 50 ms limit on waiting.
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorded = Arc::clone(&seen);
        let handler: Handler<Probe> = Arc::new(move |batch: Vec<Probe>| {
            let recorded = Arc::clone(&recorded);
            Box::pin(async move {
                recorded.lock().unwrap().extend(batch.iter().map(|p| p.id));
                tokio::time::sleep(Duration::from_millis(300)).await;
                for p in batch {
                    let _ = p.reply.send(Ok(p.id));
                }
            })
        });
        let queue = start(handler, None, Duration::from_millis(50));
        // Act: one request for each batcher, then three that must wait for them.
        let busy = u32::try_from(BATCHERS).unwrap();
        let mut first = Vec::new();
        for id in 1..=busy {
            first.push(probe(&queue, id));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let late: Vec<_> = (busy + 1..busy + 4).map(|id| probe(&queue, id)).collect();
        // Assert: the first ones ran; the late ones were refused, not run, once they were stale.
        for (id, answer) in (1..=busy).zip(first) {
            assert_eq!(answer.await.unwrap().unwrap(), id);
        }
        for answer in late {
            assert!(matches!(
                answer.await.unwrap(),
                Err(StoreError::Unavailable(_))
            ));
        }
        let mut ran = seen.lock().unwrap().clone();
        ran.sort_unstable();
        assert_eq!(ran, (1..=busy).collect::<Vec<_>>());
    }
}
