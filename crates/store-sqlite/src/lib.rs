//! The SQLite store: the embedded, zero-set-up default.
//!
//! Writes go to one writer thread that owns the only writing connection. It takes every job
//! waiting in its queue, runs each inside its own savepoint of one `BEGIN IMMEDIATE`
//! transaction, commits once (one fsync with `synchronous=FULL`), and only then answers each
//! caller. So a success is never answered before it is durable, and concurrent requests share a
//! commit (group commit) instead of paying one fsync each. Reads use a small pool of read-only
//! connections on the blocking pool; WAL mode lets them run beside the writer.

mod rows;
mod schema;
mod store;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use otpgate_core::StoreError;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

/// The most jobs one transaction takes, so one commit's latency stays bounded.
const MAX_BATCH: usize = 512;

type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// A write job: runs on the writer's connection (or learns why it cannot) and returns whether
/// its savepoint is kept, plus its reply, called once the commit's fate is known.
type Job = Box<dyn FnOnce(Result<&Connection, StoreError>) -> (bool, Reply) + Send>;

/// Raised inside a write job when a condition no longer holds: the job's savepoint is rolled
/// back and the caller gets `Ok(false)`.
#[derive(Debug)]
pub(crate) struct ConditionFailed;

pub(crate) enum JobError {
    Condition,
    Store(StoreError),
}

impl From<rusqlite::Error> for JobError {
    fn from(e: rusqlite::Error) -> Self {
        JobError::Store(map_error(e, "row"))
    }
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        JobError::Store(e)
    }
}

/// Maps a driver error; unique violations become `Conflict(what)`.
pub(crate) fn map_error(e: rusqlite::Error, what: &'static str) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(err, _)
            if err.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || err.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            StoreError::Conflict(what)
        }
        rusqlite::Error::SqliteFailure(err, _)
            if matches!(
                err.code,
                rusqlite::ErrorCode::DatabaseBusy
                    | rusqlite::ErrorCode::DatabaseLocked
                    | rusqlite::ErrorCode::CannotOpen
                    | rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::SystemIoFailure
            ) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Other(e.to_string()),
    }
}

/// The SQLite implementation of [`otpgate_core::store::Store`].
#[derive(Clone)]
pub struct SqliteStore {
    writer: mpsc::Sender<Job>,
    readers: Arc<Vec<Mutex<Connection>>>,
    next_reader: Arc<AtomicUsize>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn open_connection(path: &Path, read_only: bool) -> Result<Connection, StoreError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::Unavailable(format!("open {}: {e}", path.display())))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| map_error(e, "connection"))?;
    // WAL lets readers run beside the writer; FULL makes every commit durable before we answer.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
    )
    .map_err(|e| map_error(e, "connection"))?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, runs the embedded migrations, and
    /// starts the writer thread.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Unavailable(format!("create {}: {e}", parent.display()))
            })?;
        }
        let mut writer_conn = open_connection(&path, false)?;
        schema::migrate(&mut writer_conn)?;
        let reader_count = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, 8);
        let readers = (0..reader_count)
            .map(|_| open_connection(&path, true).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("otpgate-sqlite-writer".into())
            .spawn(move || writer_loop(writer_conn, rx))
            .map_err(|e| StoreError::Other(format!("writer thread: {e}")))?;
        Ok(SqliteStore {
            writer: tx,
            readers: Arc::new(readers),
            next_reader: Arc::new(AtomicUsize::new(0)),
            path,
        })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `job` in the next group commit; answers after the commit is durable. A job that
    /// fails (or returns `JobError::Condition`) is rolled back alone, the others still commit.
    pub(crate) async fn write<T, F>(&self, job: F) -> Result<Result<T, ConditionFailed>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, JobError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<Result<T, ConditionFailed>, StoreError>>();
        let boxed: Job = Box::new(move |conn: Result<&Connection, StoreError>| {
            let outcome = match conn {
                Ok(conn) => job(conn),
                Err(e) => Err(JobError::Store(e)),
            };
            let keep = outcome.is_ok();
            let reply: Reply = Box::new(move |commit: Result<(), StoreError>| {
                let answer = match (commit, outcome) {
                    (Err(e), Ok(_)) => Err(e),
                    (_, Ok(value)) => Ok(Ok(value)),
                    (_, Err(JobError::Condition)) => Ok(Err(ConditionFailed)),
                    (_, Err(JobError::Store(e))) => Err(e),
                };
                let _ = tx.send(answer);
            });
            (keep, reply)
        });
        self.writer
            .send(boxed)
            .map_err(|_| StoreError::Unavailable("writer thread stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("writer thread stopped".into()))?
    }

    /// Runs a read on one of the read-only connections, off the async workers.
    pub(crate) async fn read<T, F>(&self, job: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let readers = Arc::clone(&self.readers);
        let index = self.next_reader.fetch_add(1, Ordering::Relaxed) % readers.len().max(1);
        tokio::task::spawn_blocking(move || {
            let slot = readers
                .get(index)
                .ok_or_else(|| StoreError::Other("no reader connection".into()))?;
            let conn = slot
                .lock()
                .map_err(|_| StoreError::Other("reader connection poisoned".into()))?;
            job(&conn).map_err(|e| map_error(e, "row"))
        })
        .await
        .map_err(|e| StoreError::Other(format!("blocking pool: {e}")))?
    }
}

fn writer_loop(conn: Connection, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let replies = run_batch(&conn, batch);
        let commit = conn
            .execute_batch("COMMIT")
            .map_err(|e| map_error(e, "commit"));
        if commit.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for reply in replies {
            reply(match &commit {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError::Unavailable(e.to_string())),
            });
        }
    }
    tracing::debug!("sqlite writer stopped");
}

/// Runs each job in its own savepoint of one transaction; returns their replies, to be called
/// once the transaction's fate is known.
fn run_batch(conn: &Connection, batch: Vec<Job>) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(batch.len());
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let error = map_error(e, "begin");
        for job in batch {
            let (_, reply) = job(Err(StoreError::Unavailable(error.to_string())));
            replies.push(reply);
        }
        return replies;
    }
    for job in batch {
        if let Err(e) = conn.execute_batch("SAVEPOINT job") {
            let (_, reply) = job(Err(map_error(e, "savepoint")));
            replies.push(reply);
            continue;
        }
        let (keep, reply) = job(Ok(conn));
        let end = if keep {
            "RELEASE job"
        } else {
            "ROLLBACK TO job; RELEASE job"
        };
        if let Err(e) = conn.execute_batch(end) {
            tracing::error!(error = %e, "savepoint end failed");
        }
        replies.push(reply);
    }
    replies
}
