//! The SQLite store: the embedded, zero-set-up default.
//!
//! Writes go to one writer thread that owns the only writing connection. It takes every job
//! waiting in its queue, runs them all in one `BEGIN IMMEDIATE` transaction and commits once
//! (group commit), so concurrent requests share a commit instead of paying one each. A job that
//! fails must not take the others down: when one does, the transaction is rolled back and the
//! batch runs again with each job in its own savepoint.
//!
//! A job that changed rows is answered only once its batch is durable, but the writer does not
//! wait for the disk itself: it hands the batch to a sync thread, which `fdatasync`s the WAL
//! (covering every batch committed so far) and then answers each caller, while the writer already
//! runs the next batch. See [`syncer_loop`] for why that is as safe as `synchronous=FULL`. A job
//! that may be answered like a read when it changed nothing ([`SqliteStore::settle`]) is answered
//! at the commit instead.
//! Reads use a small pool of read-only connections; WAL mode lets them run beside the writer.

mod pcache;
mod rows;
mod schema;
mod store;
mod vfs;

use std::cell::RefCell;
use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use otpgate_core::StoreError;
use rusqlite::config::DbConfig;
use rusqlite::wal::CheckpointMode;
use rusqlite::{Connection, OpenFlags, PrepFlags, Statement};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, WeakUnboundedSender};
use tokio::sync::oneshot;

/// The most jobs one transaction takes, so one commit's latency stays bounded.
const MAX_BATCH: usize = 512;

/// Bytes of a page of a new database: SQLite's default. Until 2026-12-04 it was 1 KiB, so that
/// the few pages a login dirties at random keys (the session's above all) cost a quarter of
/// the bytes in the WAL. Since each commit's frames reach the WAL in one write (`vfs`) and the
/// checkpoint has a thread of its own, what a page costs is mostly its system calls and B-tree
/// levels, not its bytes: with 4 KiB pages `acl-confirm` gained 18% with 200,000 pending tickets
/// and 7% with 400,000 (the checkpoint copies 1.4 pages per login instead of 2.9, the writer
/// reads 0.4 pages from the file instead of 1.7), and no other scenario lost more than the
/// noise (BENCHMARKS.md, 2026-12-04, midday).
const PAGE_SIZE: u32 = 4096;

/// A write job of the group commit, as the writer thread sees it.
trait WriteJob: Send {
    /// Runs the job on the writer's connection; returns whether its changes are to be kept.
    /// It may run twice: a second time, in a savepoint, after another job of its batch failed
    /// and the first attempt was rolled back.
    fn run(&mut self, tx: &Tx<'_, '_>) -> bool;
    /// Whether its answer must wait for the sync: it changed a row in its last run, or its caller
    /// may turn even a "nothing changed" into a success (see [`SqliteStore::settle`]).
    fn waits_for_sync(&self) -> bool;
    /// Answers the caller, once the transaction's fate (`commit`) is known.
    fn answer(self: Box<Self>, commit: Result<(), &StoreError>);
}

/// A caller's job, its last outcome, and where the answer goes.
struct PendingWrite<T, F> {
    job: F,
    outcome: Option<Result<T, JobError>>,
    changed: bool,
    unchanged_is_a_read: bool,
    reply: oneshot::Sender<Result<Result<T, ConditionFailed>, StoreError>>,
}

impl<T, F> WriteJob for PendingWrite<T, F>
where
    T: Send,
    F: Fn(&Tx<'_, '_>) -> Result<T, JobError> + Send,
{
    fn run(&mut self, tx: &Tx<'_, '_>) -> bool {
        // One thread writes for the whole process, and jobs carry the core's judges: a job
        // that panics fails alone (its changes rolled back like any failed job's) instead of
        // ending every write of the process.
        let job = &self.job;
        let changes_before = tx.total_changes();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(tx)))
            .unwrap_or_else(|_| {
                tracing::error!("a write job panicked; its changes are rolled back");
                Err(JobError::Store(StoreError::Other(
                    "write job panicked".into(),
                )))
            });
        let keep = outcome.is_ok();
        self.outcome = Some(outcome);
        self.changed = tx.total_changes() != changes_before;
        keep
    }

    fn waits_for_sync(&self) -> bool {
        self.changed || !self.unchanged_is_a_read
    }

    fn answer(self: Box<Self>, commit: Result<(), &StoreError>) {
        let answer = match (commit, self.outcome) {
            // A condition seen inside a transaction that did not commit proves nothing.
            (Err(e), None | Some(Ok(_) | Err(JobError::Condition))) => {
                Err(StoreError::Unavailable(e.to_string()))
            }
            (Ok(()), None) => Err(StoreError::Other("write job did not run".into())),
            (_, Some(Ok(value))) => Ok(Ok(value)),
            (_, Some(Err(JobError::Condition))) => Ok(Err(ConditionFailed)),
            (_, Some(Err(JobError::Store(e)))) => Err(e),
        };
        let _ = self.reply.send(answer);
    }
}

type Job = Box<dyn WriteJob>;

/// The writer's hot statements, each prepared at its first use and kept for the writer's life.
/// Taken from rusqlite's cache instead, a statement is removed from an LRU map and put back on
/// every use, its SQL hashed twice and copied into a new key: about 1,500 instructions each
/// time, five or six times a login (callgrind, BENCHMARKS.md, 2026-12-05 08:24), on the one
/// thread every write waits for. Only the statements a login's writes and read go through
/// ([`Statements::with_statement`] on a [`Tx`]) are held; everything else keeps to the cache.
struct Held<'c> {
    conn: &'c Connection,
    /// Found by the address of their SQL text (one constant, one statement), then by the text.
    statements: RefCell<Vec<(&'static str, HeldStatement<'c>)>>,
}

/// One held statement; a job borrows it for one use.
type HeldStatement<'c> = Rc<RefCell<Statement<'c>>>;

impl<'c> Held<'c> {
    fn new(conn: &'c Connection) -> Self {
        Held {
            conn,
            statements: RefCell::new(Vec::new()),
        }
    }

    fn statement(&self, sql: &'static str) -> rusqlite::Result<HeldStatement<'c>> {
        let mut held = self.statements.borrow_mut();
        let found = held
            .iter()
            .find(|(text, _)| std::ptr::eq(*text, sql))
            .or_else(|| held.iter().find(|(text, _)| *text == sql));
        if let Some((_, statement)) = found {
            return Ok(Rc::clone(statement));
        }
        let statement = Rc::new(RefCell::new(
            self.conn
                .prepare_with_flags(sql, PrepFlags::SQLITE_PREPARE_PERSISTENT)?,
        ));
        held.push((sql, Rc::clone(&statement)));
        Ok(statement)
    }
}

/// What a write job runs on: the writer's connection (a `Tx` derefs to it, so a job uses it as
/// one) and the statements it holds.
pub(crate) struct Tx<'a, 'c> {
    conn: &'c Connection,
    held: &'a Held<'c>,
}

impl std::ops::Deref for Tx<'_, '_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

/// Where a statement comes from: a connection's cache, or the writer's held statements.
pub(crate) trait Statements {
    /// Runs `use_it` on the statement of `sql`. rusqlite resets a statement at the end of each
    /// `execute` and `query_row`, so the next use starts afresh; every use binds all parameters.
    fn with_statement<R>(
        &self,
        sql: &'static str,
        use_it: impl FnOnce(&mut Statement<'_>) -> rusqlite::Result<R>,
    ) -> rusqlite::Result<R>;
}

impl Statements for Connection {
    fn with_statement<R>(
        &self,
        sql: &'static str,
        use_it: impl FnOnce(&mut Statement<'_>) -> rusqlite::Result<R>,
    ) -> rusqlite::Result<R> {
        let mut cached = self.prepare_cached(sql)?;
        use_it(&mut cached)
    }
}

impl Statements for Tx<'_, '_> {
    fn with_statement<R>(
        &self,
        sql: &'static str,
        use_it: impl FnOnce(&mut Statement<'_>) -> rusqlite::Result<R>,
    ) -> rusqlite::Result<R> {
        let statement = self.held.statement(sql)?;
        // A held statement in use is never asked for again before its use ends (no job
        // nests two uses of one statement); if one ever were, it takes the cache's copy.
        let Ok(mut held) = statement.try_borrow_mut() else {
            let mut cached = self.conn.prepare_cached(sql)?;
            return use_it(&mut cached);
        };
        use_it(&mut held)
    }
}

/// What reaches the writer thread.
enum ToWriter {
    /// A caller's write.
    Job(Job),
    /// The sync thread made this many commits durable and is ready for the next.
    Synced(usize),
}

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
    writer: UnboundedSender<ToWriter>,
    readers: Arc<ReaderPool>,
    path: PathBuf,
}

/// Read-only connections, taken by whichever task reads and put back after. A point read (a
/// ticket, a user, a challenge by key) takes microseconds from the page cache: it runs right on
/// the calling task, because handing it to another thread and back (a futex wake each way)
/// would cost more than the read. Scans go to the blocking pool instead ([`SqliteStore::scan`]).
struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

/// Connections kept open when idle; more are opened while more tasks read at once.
const MAX_IDLE_READERS: usize = 16;

impl ReaderPool {
    fn run<T>(
        &self,
        job: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let taken = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match taken {
            Some(conn) => conn,
            None => open_connection(&self.path, true)?,
        };
        let result = job(&conn).map_err(|e| map_error(e, "row"));
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < MAX_IDLE_READERS
        {
            idle.push(conn);
        }
        result
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn open_connection(path: &Path, read_only: bool) -> Result<Connection, StoreError> {
    if !pcache::install() {
        // Then commits may walk the whole page cache again (see `pcache`); nothing else changes.
        tracing::debug!("SQLite was in use before otpgate's page cache wrapper could go in");
    }
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let opened = if read_only {
        Connection::open_with_flags(path, flags)
    } else {
        // The writer gathers each commit's WAL frames into one write (see `vfs`).
        vfs::register().map_err(StoreError::Other)?;
        Connection::open_with_flags_and_vfs(path, flags, vfs::NAME)
    };
    let conn =
        opened.map_err(|e| StoreError::Unavailable(format!("open {}: {e}", path.display())))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| map_error(e, "connection"))?;
    // Plans must not depend on bound values. Without this, SQLite marks a statement for a new
    // parse and plan on every bind of a `LIMIT ?` and of an `x = ?` filter whose last value
    // was 0 or 1 (`attempts = ?` when consuming a fresh code): under load a fifth of all CPU
    // went to re-preparing cached statements.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(|e| map_error(e, "connection"))?;
    if !read_only {
        // Only takes effect on a new database.
        conn.pragma_update(None, "page_size", PAGE_SIZE)
            .map_err(|e| map_error(e, "connection"))?;
    }
    // WAL lets readers run beside the writer; FULL makes every commit durable before we answer.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
    )
    .map_err(|e| map_error(e, "connection"))?;
    // Readers start each read with an empty cache anyway (WAL mode drops a connection's cache
    // whenever another connection committed), so theirs is small. The writer's 4 MiB keeps the
    // hot upper levels of every index; 16 MiB gave no more logins and 32 MiB fewer (measured
    // with `pcache`'s wrapper in place, which keeps each commit from walking the whole cache).
    // A writing connection checkpoints by SQLite's default (at 1,000 WAL frames), until the
    // store's writer hands its checkpoints to a thread of their own (`Writer::start`).
    let tuning = if read_only {
        "PRAGMA cache_size = -1024;"
    } else {
        "PRAGMA cache_size = -4096;"
    };
    conn.execute_batch(tuning)
        .map_err(|e| map_error(e, "connection"))?;
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

/// Runs one statement through the connection's statement cache (rusqlite's `execute` parses and
/// plans the SQL again on every call, which costs more than running it).
pub(crate) fn exec<P: rusqlite::Params>(
    c: &Connection,
    sql: &str,
    params: P,
) -> rusqlite::Result<usize> {
    c.prepare_cached(sql)?.execute(params)
}

/// One row, through the statement cache.
pub(crate) fn query_row_cached<T, P, F>(
    c: &Connection,
    sql: &str,
    params: P,
    f: F,
) -> rusqlite::Result<T>
where
    P: rusqlite::Params,
    F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
{
    c.prepare_cached(sql)?.query_row(params, f)
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
        // From here on a commit does not wait for the disk: the sync thread makes each batch
        // durable before anyone hears of it ([`syncer_loop`]).
        writer_conn
            .execute_batch("PRAGMA synchronous = NORMAL;")
            .map_err(|e| map_error(e, "connection"))?;
        let readers = ReaderPool {
            path: path.clone(),
            idle: Mutex::new(vec![open_connection(&path, true)?]),
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<ToWriter>();
        let (sync, checkpoint, synced) =
            (sync_wal_of(&path), checkpoint_of(&path)?, tx.downgrade());
        // The writer thread owns its connection (the statements it holds borrow it) and says
        // whether its own threads started.
        let (started, has_started) = mpsc::channel::<Result<(), StoreError>>();
        // The three threads' names fit Linux's 15 characters, so that `top -H`, `perf` and the
        // bench's CPU report tell them apart.
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let mut conn = writer_conn;
                match Writer::start(&mut conn, sync, checkpoint, synced) {
                    Ok(writer) => {
                        let _ = started.send(Ok(()));
                        writer_loop(writer, rx);
                    }
                    Err(e) => {
                        let _ = started.send(Err(e));
                    }
                }
            })
            .map_err(|e| StoreError::Other(format!("writer thread: {e}")))?;
        has_started
            .recv()
            .map_err(|_| StoreError::Other("writer thread stopped at its start".into()))??;
        Ok(SqliteStore {
            writer: tx,
            readers: Arc::new(readers),
            path,
        })
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `job` in the next group commit; answers after the commit is durable. A job that
    /// fails (or returns `JobError::Condition`) is rolled back alone, the others still commit.
    /// `job` may run twice (see [`WriteJob::run`]), so it must not change what it captured.
    pub(crate) async fn write<T, F>(&self, job: F) -> Result<Result<T, ConditionFailed>, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Tx<'_, '_>) -> Result<T, JobError> + Send + 'static,
    {
        self.enqueue(job, false).await
    }

    /// [`Self::write`] for a job whose answer, when it changed no row, is no more than a read:
    /// its caller turns it only into a refusal or into a write of its own (which a later batch
    /// makes durable, after this one). Such an answer goes out at the commit instead of after the
    /// sync, as a reader's would. Not for a job whose "nothing to change" its caller reports as
    /// done (a revocation already made, a code already approved): that report must wait until
    /// what it rests on is durable.
    pub(crate) async fn settle<T, F>(
        &self,
        job: F,
    ) -> Result<Result<T, ConditionFailed>, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Tx<'_, '_>) -> Result<T, JobError> + Send + 'static,
    {
        self.enqueue(job, true).await
    }

    async fn enqueue<T, F>(
        &self,
        job: F,
        unchanged_is_a_read: bool,
    ) -> Result<Result<T, ConditionFailed>, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Tx<'_, '_>) -> Result<T, JobError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let pending: Job = Box::new(PendingWrite {
            job,
            outcome: None,
            changed: false,
            unchanged_is_a_read,
            reply,
        });
        self.writer
            .send(ToWriter::Job(pending))
            .map_err(|_| StoreError::Unavailable("writer thread stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("writer thread stopped".into()))?
    }

    /// Runs a read on one of the read-only connections, off the async workers.
    pub(crate) async fn read<T, F>(&self, job: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        self.readers.run(job)
    }

    /// Runs a read that may visit many rows (counts over a window, listings) on the blocking
    /// pool, so it never holds up the async workers.
    pub(crate) async fn scan<T, F>(&self, job: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let readers = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || readers.run(job))
            .await
            .map_err(|e| StoreError::Other(format!("blocking pool: {e}")))?
    }
}

/// Runs the jobs as they come and commits when the sync thread is free. A commit's callers
/// hear nothing before the sync after it, so committing while a sync runs only makes the next
/// sync's commits more and smaller: each commit writes every page it changed, and the pages
/// that most logins share (the ends of the tables and indexes that grow in time order, the
/// B-trees' upper levels) were written once per commit of a few logins instead of once per
/// sync. Jobs that arrive while the sync runs wait in the open transaction, and it commits
/// when the sync thread says it is done (or holds [`MAX_BATCH`] jobs).
///
/// That commit goes first: the jobs that came in the inbox with (or after) the sync's end run
/// after it, in the next transaction. Run before it, they held up the next sync by as long as
/// they took (under `acl-confirm` the sync thread waited about 0.7 ms for each commit, longer
/// than its `fdatasync`), and every login in the open transaction with them.
fn writer_loop(mut writer: Writer<'_>, mut inbox: UnboundedReceiver<ToWriter>) {
    while let Some(first) = inbox.blocking_recv() {
        let mut batch = Vec::new();
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                ToWriter::Job(job) => batch.push(job),
                ToWriter::Synced(commits) => {
                    writer.unsynced = writer.unsynced.saturating_sub(commits);
                    if writer.unsynced == 0 {
                        writer.commit_open();
                    }
                }
            }
            if writer.open.len() + batch.len() >= MAX_BATCH {
                break;
            }
            next = inbox.try_recv().ok();
        }
        writer.run_jobs(batch);
        if writer.unsynced == 0 || writer.open.len() >= MAX_BATCH {
            writer.commit_open();
        }
    }
    writer.commit_open();
    tracing::debug!("sqlite writer stopped");
}

/// Makes everything committed so far durable: `fdatasync` of the WAL file (tests put their own).
type SyncWal = Box<dyn FnMut() -> std::io::Result<()> + Send>;

/// Copies the WAL's frames into the database file: a `PASSIVE` checkpoint on a connection of
/// its own (tests put their own).
type CheckpointWal = Box<dyn FnMut() -> Result<(), StoreError> + Send>;

/// The WAL size, in frames, from which commits ask the checkpoint thread to copy what is new
/// (1,000 frames is SQLite's own default mark; 4 MiB of 4 KiB pages). A quarter of it and of
/// the mark below gave `acl-confirm` the same figures.
const CHECKPOINT_FROM_FRAMES: c_int = 1000;

/// Frames the WAL grows by between two requests to the checkpoint thread. When every commit
/// asked, a request was always waiting, and the thread ran one small checkpoint after another
/// (about 43 a second under `acl-confirm`, each with two fsyncs), copying again the pages
/// that the commits in between share (the ends of the tables and indexes, the B-trees' upper
/// levels). Asked once per 250 frames it ran half as many and copied 13% fewer pages: 1.3 µs
/// of CPU a login instead of 2.0 (1.0 per 500 frames, as many logins a second but a higher
/// p99, 5.7 against 5.3 ms: the writer has more left to copy at its own mark).
const CHECKPOINT_EVERY_FRAMES: c_int = 250;

/// The WAL size, in frames, at which the writer copies what the checkpoint thread has not yet,
/// so that its next transaction starts the WAL again from its beginning (16 MiB at most).
const WRITER_CHECKPOINTS_AT_FRAMES: c_int = 4000;

/// Who copies the WAL into the database after a commit.
#[derive(Debug, PartialEq, Eq)]
enum CheckpointBy {
    Nobody,
    /// The checkpoint thread, asked without waiting.
    Thread,
    /// The writer itself, at [`WRITER_CHECKPOINTS_AT_FRAMES`].
    Writer,
}

/// When the writer's commits ask for a checkpoint (see [`Writer::start`]): the writer's own at
/// its mark after every commit, the thread's from [`CHECKPOINT_FROM_FRAMES`] once per
/// [`CHECKPOINT_EVERY_FRAMES`] of growth.
#[derive(Default)]
struct CheckpointCadence {
    /// The WAL's size, in frames, when the thread was last asked (0: not since it started
    /// again from its beginning, so the first mark asks).
    asked_at: c_int,
}

impl CheckpointCadence {
    /// Who copies after a commit that left `frames` frames in the WAL.
    fn after_commit(&mut self, frames: c_int) -> CheckpointBy {
        if frames < self.asked_at {
            // The WAL started again from its beginning.
            self.asked_at = 0;
        }
        if frames >= WRITER_CHECKPOINTS_AT_FRAMES {
            CheckpointBy::Writer
        } else if frames >= CHECKPOINT_FROM_FRAMES
            && frames - self.asked_at >= CHECKPOINT_EVERY_FRAMES
        {
            self.asked_at = frames;
            CheckpointBy::Thread
        } else {
            CheckpointBy::Nobody
        }
    }
}

/// The writing connection, and the way to the sync thread that answers committed batches.
struct Writer<'c> {
    conn: &'c Connection,
    held: Held<'c>,
    committed: mpsc::Sender<Vec<Job>>,
    /// Set for good once a sync failed: nothing is written after that (see [`syncer_loop`]).
    broken: Arc<AtomicBool>,
    /// Jobs run in the open transaction, waiting for its commit (none: no transaction open).
    open: Vec<Job>,
    /// Commits sent to the sync thread that it has not yet said are durable.
    unsynced: usize,
}

impl<'c> Writer<'c> {
    /// Starts the checkpoint and sync threads of `conn`; the sync thread tells `synced` when
    /// it is done with what was committed (see [`writer_loop`]).
    fn start(
        conn: &'c mut Connection,
        sync: SyncWal,
        checkpoint: CheckpointWal,
        synced: WeakUnboundedSender<ToWriter>,
    ) -> Result<Writer<'c>, StoreError> {
        // The checkpoint leaves the writer's thread: copying a commit's pages into the database
        // file (a read and a write call per page, and two fsyncs) was a fifth of the writer's
        // time, and every request of the next batch waited for it. This hook replaces SQLite's
        // automatic checkpoint: from the first mark, a commit asks the checkpoint thread to
        // copy each time the WAL has grown by [`CHECKPOINT_EVERY_FRAMES`] (never waiting: a
        // request already pending covers this one).
        //
        // But only the writer can start the WAL again from its beginning, and only in a
        // transaction that began when every frame had been copied; under steady load the
        // thread's checkpoint always ends after the writer's next commit. So at the second
        // mark the writer copies the few frames the thread has not (waiting for a checkpoint
        // of the thread's in progress, since two cannot run at once), and its next transaction
        // starts the WAL afresh.
        let one_at_a_time = Arc::new(Mutex::new(()));
        let (ask_for_checkpoint, checkpoint_asked) = mpsc::sync_channel::<()>(1);
        let writers_turn = Arc::clone(&one_at_a_time);
        let mut cadence = CheckpointCadence::default();
        conn.wal_hook(Some(
            move |wal: &mut rusqlite::hooks::Wal, frames: c_int| {
                match cadence.after_commit(frames) {
                    CheckpointBy::Writer => {
                        let _turn = writers_turn.lock();
                        if let Err(e) = wal.checkpoint_v2(CheckpointMode::PASSIVE) {
                            // Nothing is lost: the frames stay in the WAL, the next commit
                            // retries.
                            tracing::warn!(error = %e, "SQLite checkpoint failed");
                        }
                    }
                    CheckpointBy::Thread => {
                        let _ = ask_for_checkpoint.try_send(());
                    }
                    CheckpointBy::Nobody => {}
                }
                Ok(())
            },
        ))
        .map_err(|e| map_error(e, "connection"))?;
        std::thread::Builder::new()
            .name("sqlite-checkpt".into())
            .spawn(move || checkpointer_loop(checkpoint_asked, checkpoint, &one_at_a_time))
            .map_err(|e| StoreError::Other(format!("checkpoint thread: {e}")))?;
        let broken = Arc::new(AtomicBool::new(false));
        let (committed, to_sync) = mpsc::channel::<Vec<Job>>();
        let flag = Arc::clone(&broken);
        std::thread::Builder::new()
            .name("sqlite-sync".into())
            .spawn(move || syncer_loop(to_sync, sync, &flag, &synced))
            .map_err(|e| StoreError::Other(format!("sync thread: {e}")))?;
        let conn: &'c Connection = conn;
        Ok(Writer {
            conn,
            held: Held::new(conn),
            committed,
            broken,
            open: Vec::new(),
            unsynced: 0,
        })
    }

    /// Runs `batch` in the open transaction, beginning one if none is open; its jobs then wait
    /// for [`Self::commit_open`]. Every job first runs bare: a savepoint per job costs two more
    /// statements and a copy of every page the job touches (SQLite's sub-journal), and almost
    /// every job succeeds. If one fails, the open transaction is rolled back and every job in
    /// it runs again, each in its own savepoint, so the failure is undone alone, and that
    /// transaction commits at once. Returns whether that happened and what came of it.
    fn run_jobs(&mut self, mut batch: Vec<Job>) -> Option<bool> {
        if batch.is_empty() {
            return None;
        }
        if self.broken.load(Ordering::Acquire) {
            answer_all(batch, Err(&broken_store()));
            return Some(false);
        }
        if self.open.is_empty()
            && let Err(e) =
                exec(self.conn, "BEGIN IMMEDIATE", []).map_err(|e| map_error(e, "begin"))
        {
            answer_all(batch, Err(&e));
            return Some(false);
        }
        let tx = Tx {
            conn: self.conn,
            held: &self.held,
        };
        if batch.iter_mut().all(|job| job.run(&tx)) {
            self.open.append(&mut batch);
            return None;
        }
        let mut jobs = std::mem::take(&mut self.open);
        jobs.append(&mut batch);
        let outcome = exec(self.conn, "ROLLBACK", [])
            .map_err(|e| map_error(e, "rollback"))
            .and_then(|_| match jobs.as_mut_slice() {
                // Nothing else to keep: its failed outcome is its answer.
                [_only] => Ok(()),
                jobs => run_each_in_savepoint(&tx, jobs),
            });
        Some(self.finish(jobs, outcome))
    }

    /// Commits the open transaction, if there is one; returns whether it committed. After a
    /// failed sync it is rolled back instead: nothing more is written to a file in doubt.
    fn commit_open(&mut self) -> bool {
        if self.open.is_empty() {
            return false;
        }
        let jobs = std::mem::take(&mut self.open);
        let outcome = if self.broken.load(Ordering::Acquire) {
            Err(broken_store())
        } else {
            commit(self.conn)
        };
        self.finish(jobs, outcome)
    }

    /// Answers the jobs of a transaction that ended in `outcome`: a committed one goes to the
    /// sync thread, which answers its callers once it is durable; any other is answered here.
    /// Returns whether it committed.
    fn finish(&mut self, jobs: Vec<Job>, outcome: Result<(), StoreError>) -> bool {
        if let Err(e) = outcome {
            let _ = self.conn.execute_batch("ROLLBACK");
            answer_all(jobs, Err(&e));
            return false;
        }
        // A settle that changed no row has nothing to wait for: its answer rests on committed
        // rows, as a reader's does (see [`syncer_loop`] and [`SqliteStore::settle`]).
        let (to_sync, read_like): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|job| job.waits_for_sync());
        answer_all(read_like, Ok(()));
        if !to_sync.is_empty() {
            self.unsynced += 1;
            if let Err(mpsc::SendError(jobs)) = self.committed.send(to_sync) {
                answer_all(jobs, Err(&broken_store()));
            }
        }
        true
    }

    /// Runs a batch and commits it at once, whatever the sync thread is doing.
    #[cfg(test)]
    fn write_batch(&mut self, batch: Vec<Job>) -> bool {
        match self.run_jobs(batch) {
            Some(committed) => committed,
            None => self.commit_open(),
        }
    }
}

fn answer_all(batch: Vec<Job>, commit: Result<(), &StoreError>) {
    for job in batch {
        job.answer(commit);
    }
}

fn broken_store() -> StoreError {
    StoreError::Unavailable("the database could not be made durable; restart otpgate".into())
}

/// Answers committed batches once they are durable. The writer commits with
/// `synchronous=NORMAL`, which in WAL mode writes a commit's pages to the WAL without an fsync;
/// this thread then runs the one `fdatasync` of the WAL that `synchronous=FULL` would have run
/// inside the commit, and only after it returns answers every caller of every batch committed
/// before it began. Meanwhile the writer runs the next batch, so the disk's time overlaps with
/// the statements' (the writer used to wait for it about a third of its time).
///
/// Why an answered success is as durable as with `FULL`: the WAL is written in order, so a sync
/// covers all earlier frames; SQLite itself syncs the WAL before a checkpoint copies frames into
/// the database, syncs the database after, and syncs the WAL's header before reusing the file,
/// so frames are never overwritten before they are safe elsewhere. Readers may see a batch
/// before its sync; what they answer from it is a refusal (a code already used, a key revoked),
/// and any success is itself a write in a later batch, whose sync covers this one too.
///
/// A failed fsync leaves the kernel's copy of the file in doubt (it may have dropped the pages
/// it could not write), so the store stops writing for good: every caller of the batches it
/// covered, and every later write, gets "unavailable" until otpgate is restarted.
fn syncer_loop(
    committed: mpsc::Receiver<Vec<Job>>,
    mut sync: SyncWal,
    broken: &AtomicBool,
    writer: &WeakUnboundedSender<ToWriter>,
) {
    while let Ok(first) = committed.recv() {
        let mut batches = vec![first];
        batches.extend(committed.try_iter());
        let outcome = if broken.load(Ordering::Acquire) {
            Err(broken_store())
        } else {
            sync().map_err(|e| {
                tracing::error!(error = %e, "fsync of the SQLite WAL failed; no more writes");
                broken.store(true, Ordering::Release);
                broken_store()
            })
        };
        // The writer holds its next commit until now: it goes before the answers wake their
        // tasks, so that the next sync can start while they run.
        if let Some(writer) = writer.upgrade() {
            let _ = writer.send(ToWriter::Synced(batches.len()));
        }
        for batch in batches {
            answer_all(batch, outcome.as_ref().map(|_| ()));
        }
    }
}

/// Runs the checkpoints the writer's commits ask for, beside the writer (WAL mode lets a
/// checkpoint copy committed frames while new ones are appended). Its durability is SQLite's
/// own: the checkpoint syncs the WAL before it copies frames into the database and syncs the
/// database after, and only then may the writer start the WAL again from its beginning.
fn checkpointer_loop(
    asked: mpsc::Receiver<()>,
    mut checkpoint: CheckpointWal,
    one_at_a_time: &Mutex<()>,
) {
    while asked.recv().is_ok() {
        let _turn = one_at_a_time.lock();
        if let Err(e) = checkpoint() {
            // Nothing is lost: the frames stay in the WAL, and the next request retries.
            tracing::warn!(error = %e, "SQLite checkpoint failed");
        }
    }
    tracing::debug!("sqlite checkpoint thread stopped");
}

/// A `PASSIVE` checkpoint of the database at `db`, on a connection of its own. It opens through
/// SQLite's default VFS: a checkpoint reads the WAL and writes the database file, so the
/// writer's WAL-gathering VFS would have nothing to gather.
fn checkpoint_of(db: &Path) -> Result<CheckpointWal, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(db, flags)
        .map_err(|e| StoreError::Unavailable(format!("open {}: {e}", db.display())))?;
    // FULL: the checkpoint syncs the WAL before copying and the database after (NORMAL would
    // too; FULL says so without relying on it). Its page cache is never used by a checkpoint.
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA cache_size = 16;")
        .map_err(|e| map_error(e, "connection"))?;
    Ok(Box::new(move || {
        conn.wal_checkpoint_v2(Some(rusqlite::MAIN_DB), CheckpointMode::PASSIVE)
            .map(|_| ())
            .map_err(|e| map_error(e, "checkpoint"))
    }))
}

/// `fdatasync` of the database's WAL file, opened at the first sync (the writer has written it
/// by then) and kept: it lives as long as the writer's connection. The first sync also syncs
/// the directory, so a WAL file created by this process survives a power loss too.
fn sync_wal_of(db: &Path) -> SyncWal {
    let mut wal_name = db.as_os_str().to_owned();
    wal_name.push("-wal");
    let wal_path = PathBuf::from(wal_name);
    let dir = db
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let mut wal: Option<std::fs::File> = None;
    Box::new(move || {
        let file = match wal.take() {
            Some(file) => file,
            None => {
                let file = std::fs::File::open(&wal_path)?;
                std::fs::File::open(&dir)?.sync_all()?;
                file
            }
        };
        file.sync_data()?;
        wal = Some(file);
        Ok(())
    })
}

/// Runs `batch` in a new transaction, each job in its own savepoint so that a failing job is
/// undone alone, and commits it.
fn run_each_in_savepoint(tx: &Tx<'_, '_>, batch: &mut [Job]) -> Result<(), StoreError> {
    let conn: &Connection = tx;
    exec(conn, "BEGIN IMMEDIATE", []).map_err(|e| map_error(e, "begin"))?;
    for job in batch.iter_mut() {
        exec(conn, "SAVEPOINT job", []).map_err(|e| map_error(e, "savepoint"))?;
        let end = if job.run(tx) {
            exec(conn, "RELEASE job", [])
        } else {
            exec(conn, "ROLLBACK TO job", []).and_then(|_| exec(conn, "RELEASE job", []))
        };
        end.map_err(|e| map_error(e, "savepoint"))?;
    }
    commit(conn)
}

fn commit(conn: &Connection) -> Result<(), StoreError> {
    exec(conn, "COMMIT", [])
        .map(|_| ())
        .map_err(|e| map_error(e, "commit"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::StatementStatus;
    use std::sync::atomic::AtomicUsize;

    type Answer = oneshot::Receiver<Result<Result<i64, ConditionFailed>, StoreError>>;

    /// A job that inserts `value` into `t`, calls `on_run` each time it has, and fails its
    /// condition if asked.
    fn insert_job_calling(
        value: i64,
        fails: bool,
        on_run: impl Fn(i64) + Send + 'static,
    ) -> (Job, Answer) {
        let (reply, answer) = oneshot::channel();
        let job = move |c: &Tx<'_, '_>| {
            exec(c, "INSERT INTO t (x) VALUES (?1)", [value])?;
            on_run(value);
            if fails {
                return Err(JobError::Condition);
            }
            Ok(value)
        };
        let pending: Job = Box::new(PendingWrite {
            job,
            outcome: None,
            changed: false,
            unchanged_is_a_read: false,
            reply,
        });
        (pending, answer)
    }

    /// [`insert_job_calling`] that counts its runs in `runs`.
    fn insert_job(value: i64, fails: bool, runs: &Arc<AtomicUsize>) -> (Job, Answer) {
        let runs = Arc::clone(runs);
        insert_job_calling(value, fails, move |_| {
            runs.fetch_add(1, Ordering::SeqCst);
        })
    }

    /// Where a writer driven by the test itself (no writer thread) hears from its sync thread:
    /// nowhere.
    fn no_writer_thread() -> WeakUnboundedSender<ToWriter> {
        tokio::sync::mpsc::unbounded_channel::<ToWriter>()
            .0
            .downgrade()
    }

    fn scratch_connection(dir: &tempfile::TempDir) -> Connection {
        let conn = open_connection(&dir.path().join("scratch.db"), false).unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER NOT NULL)")
            .unwrap();
        conn
    }

    /// A writer borrows its connection (its held statements do); a test's writer borrows one
    /// that lives as long as the test process, so the writer can go to a thread of its own.
    fn for_the_test(conn: Connection) -> &'static mut Connection {
        Box::leak(Box::new(conn))
    }

    /// The real checkpoint, on the scratch database.
    fn scratch_checkpoint(dir: &tempfile::TempDir) -> CheckpointWal {
        checkpoint_of(&dir.path().join("scratch.db")).unwrap()
    }

    /// A writer on a scratch database whose syncs succeed at once.
    fn scratch_writer(dir: &tempfile::TempDir) -> Writer<'static> {
        Writer::start(
            for_the_test(scratch_connection(dir)),
            Box::new(|| Ok(())),
            scratch_checkpoint(dir),
            no_writer_thread(),
        )
        .unwrap()
    }

    /// A writer on a scratch database whose sync finishes only when the test sends on the
    /// returned channel.
    fn writer_with_held_sync(dir: &tempfile::TempDir) -> (Writer<'static>, mpsc::Sender<()>) {
        let (let_sync_finish, sync_may_finish) = mpsc::channel::<()>();
        let sync: SyncWal = Box::new(move || sync_may_finish.recv().map_err(std::io::Error::other));
        (
            Writer::start(
                for_the_test(scratch_connection(dir)),
                sync,
                scratch_checkpoint(dir),
                no_writer_thread(),
            )
            .unwrap(),
            let_sync_finish,
        )
    }

    fn rows_of_t(conn: &Connection) -> Vec<i64> {
        let mut stmt = conn.prepare("SELECT x FROM t ORDER BY x").unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn a_failing_job_is_undone_alone_and_the_rest_of_its_batch_commits() {
        // Arrange: three jobs in one batch; the middle one writes, then fails its condition.
        let dir = tempfile::tempdir().unwrap();
        let mut writer = scratch_writer(&dir);
        let runs = Arc::new(AtomicUsize::new(0));
        let (first, first_answer) = insert_job(1, false, &runs);
        let (failing, failing_answer) = insert_job(2, true, &runs);
        let (last, last_answer) = insert_job(3, false, &runs);
        // Act
        let committed = writer.write_batch(vec![first, failing, last]);
        // Assert: the failed job's row is gone, the others' rows committed, every caller told.
        assert!(committed);
        assert_eq!(rows_of_t(writer.conn), vec![1, 3]);
        assert!(matches!(first_answer.blocking_recv(), Ok(Ok(Ok(1)))));
        assert!(matches!(
            failing_answer.blocking_recv(),
            Ok(Ok(Err(ConditionFailed)))
        ));
        assert!(matches!(last_answer.blocking_recv(), Ok(Ok(Ok(3)))));
        // The bare attempt stopped at the failure (two runs), then all three ran in savepoints.
        assert_eq!(runs.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn a_panicking_job_fails_alone_and_the_writer_keeps_writing() {
        // Arrange: a job that writes, then panics, between two good ones.
        let dir = tempfile::tempdir().unwrap();
        let mut writer = scratch_writer(&dir);
        let runs = Arc::new(AtomicUsize::new(0));
        let (first, first_answer) = insert_job(1, false, &runs);
        let (last, last_answer) = insert_job(3, false, &runs);
        let (reply, panicking_answer) = oneshot::channel();
        let panicking: Job = Box::new(PendingWrite {
            job: |c: &Tx<'_, '_>| -> Result<i64, JobError> {
                exec(c, "INSERT INTO t (x) VALUES (2)", [])?;
                panic!("a bug in a job");
            },
            outcome: None,
            changed: false,
            unchanged_is_a_read: false,
            reply,
        });
        // Act
        let committed = writer.write_batch(vec![first, panicking, last]);
        // Assert: its row is gone, its caller told, the others committed.
        assert!(committed);
        assert_eq!(rows_of_t(writer.conn), vec![1, 3]);
        assert!(matches!(
            panicking_answer.blocking_recv(),
            Ok(Err(StoreError::Other(_)))
        ));
        assert!(matches!(first_answer.blocking_recv(), Ok(Ok(Ok(1)))));
        assert!(matches!(last_answer.blocking_recv(), Ok(Ok(Ok(3)))));
        // And the next batch is written as usual.
        let (next, next_answer) = insert_job(4, false, &runs);
        assert!(writer.write_batch(vec![next]));
        assert!(matches!(next_answer.blocking_recv(), Ok(Ok(Ok(4)))));
        assert_eq!(rows_of_t(writer.conn), vec![1, 3, 4]);
    }

    #[test]
    fn a_batch_that_succeeds_runs_each_job_once() {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let mut writer = scratch_writer(&dir);
        let runs = Arc::new(AtomicUsize::new(0));
        let (jobs, answers): (Vec<Job>, Vec<Answer>) =
            (1..=4).map(|v| insert_job(v, false, &runs)).unzip();
        // Act
        let committed = writer.write_batch(jobs);
        // Assert
        assert!(committed);
        assert_eq!(rows_of_t(writer.conn), vec![1, 2, 3, 4]);
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        for (expected, answer) in (1..=4).zip(answers) {
            assert!(matches!(answer.blocking_recv(), Ok(Ok(Ok(v))) if v == expected));
        }
    }

    #[test]
    fn a_held_statement_is_prepared_once_and_a_nested_use_takes_the_cache() {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let conn = scratch_connection(&dir);
        let held = Held::new(&conn);
        let tx = Tx {
            conn: &conn,
            held: &held,
        };
        const INSERT: &str = "INSERT INTO t (x) VALUES (?1)";

        // Act: two uses, then a use inside a use of the same statement.
        for x in [1, 2] {
            tx.with_statement(INSERT, |s| s.execute([x])).unwrap();
        }
        let nested = tx
            .with_statement(INSERT, |outer| {
                tx.with_statement(INSERT, |inner| inner.execute([4]))?;
                outer.execute([3])
            })
            .unwrap();

        // Assert
        assert_eq!(nested, 1);
        assert_eq!(rows_of_t(&conn), vec![1, 2, 3, 4]);
        assert_eq!(held.statements.borrow().len(), 1, "prepared once");
    }

    #[test]
    fn a_lone_failing_job_leaves_nothing_behind() {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let mut writer = scratch_writer(&dir);
        let runs = Arc::new(AtomicUsize::new(0));
        let (job, answer) = insert_job(7, true, &runs);
        // Act
        let committed = writer.write_batch(vec![job]);
        // Assert
        assert!(committed);
        assert!(rows_of_t(writer.conn).is_empty());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(matches!(
            answer.blocking_recv(),
            Ok(Ok(Err(ConditionFailed)))
        ));
    }

    #[test]
    fn a_commit_is_answered_only_after_the_wal_is_synced() {
        // Arrange: a writer whose sync waits until the test lets it finish.
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, let_sync_finish) = writer_with_held_sync(&dir);
        let runs = Arc::new(AtomicUsize::new(0));
        let (job, mut answer) = insert_job(5, false, &runs);
        // Act
        assert!(writer.write_batch(vec![job]));
        // Assert: committed (another connection sees it) but not answered while the sync runs.
        let reader = open_connection(&dir.path().join("scratch.db"), true).unwrap();
        assert_eq!(rows_of_t(&reader), vec![5]);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(matches!(
            answer.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        let_sync_finish.send(()).unwrap();
        assert!(matches!(answer.blocking_recv(), Ok(Ok(Ok(5)))));
    }

    /// A job that counts the rows of `t` and changes nothing.
    fn count_job(unchanged_is_a_read: bool) -> (Job, Answer) {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(PendingWrite {
            job: |c: &Tx<'_, '_>| -> Result<i64, JobError> {
                Ok(c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?)
            },
            outcome: None,
            changed: false,
            unchanged_is_a_read,
            reply,
        });
        (job, answer)
    }

    #[test]
    fn only_a_settle_that_changed_nothing_is_answered_before_the_sync() {
        // Arrange: a writer whose sync waits until the test lets it finish; one batch of a job
        // that inserts, a settle that only reads (and finds the row before the commit), and a
        // plain write that only reads.
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, let_sync_finish) = writer_with_held_sync(&dir);
        let runs = Arc::new(AtomicUsize::new(0));
        let (insert, mut insert_answer) = insert_job(5, false, &runs);
        let (settle, mut settle_answer) = count_job(true);
        let (plain, mut plain_answer) = count_job(false);
        // Act
        assert!(writer.write_batch(vec![insert, settle, plain]));
        // Assert: the settle is answered by the time the writer is done with the batch, while
        // the sync runs; the insert and the plain write only after the sync.
        assert!(matches!(settle_answer.try_recv(), Ok(Ok(Ok(1)))));
        for answer in [&mut insert_answer, &mut plain_answer] {
            assert!(matches!(
                answer.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            ));
        }
        let_sync_finish.send(()).unwrap();
        assert!(matches!(insert_answer.blocking_recv(), Ok(Ok(Ok(5)))));
        assert!(matches!(plain_answer.blocking_recv(), Ok(Ok(Ok(1)))));
    }

    /// A job that inserts a 400 KB blob into `big`: about a hundred WAL frames.
    fn blob_job() -> (Job, Answer) {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(PendingWrite {
            job: |c: &Tx<'_, '_>| -> Result<i64, JobError> {
                exec(c, "INSERT INTO big (b) VALUES (zeroblob(400000))", [])?;
                Ok(c.last_insert_rowid())
            },
            outcome: None,
            changed: false,
            unchanged_is_a_read: false,
            reply,
        });
        (job, answer)
    }

    /// A scratch writer with a table `big` for [`blob_job`], and the checkpoint thread that
    /// `checkpoint` makes once the database exists.
    fn blob_writer(
        dir: &tempfile::TempDir,
        checkpoint: impl FnOnce(&Path) -> CheckpointWal,
    ) -> Writer<'static> {
        let conn = scratch_connection(dir);
        conn.execute_batch("CREATE TABLE big (b BLOB NOT NULL)")
            .unwrap();
        let checkpoint = checkpoint(&dir.path().join("scratch.db"));
        Writer::start(
            for_the_test(conn),
            Box::new(|| Ok(())),
            checkpoint,
            no_writer_thread(),
        )
        .unwrap()
    }

    fn write_blobs(writer: &mut Writer<'_>, count: usize) {
        for _ in 0..count {
            let (job, answer) = blob_job();
            assert!(writer.write_batch(vec![job]));
            assert!(matches!(answer.blocking_recv(), Ok(Ok(Ok(_)))));
        }
    }

    /// How many frames the WAL holds now, as another connection's checkpoint reports it.
    fn frames_in_wal(db: &Path) -> i32 {
        let other = open_connection(db, false).unwrap();
        let (frames, _) = other
            .wal_checkpoint_v2(Some(rusqlite::MAIN_DB), CheckpointMode::PASSIVE)
            .unwrap();
        frames
    }

    /// A WAL frame of the scratch database: its header and a page.
    const FRAME_BYTES: u64 = vfs::FRAME_HEADER as u64 + PAGE_SIZE as u64;

    /// The scratch database's file and its WAL file.
    fn scratch_files(dir: &tempfile::TempDir) -> (PathBuf, PathBuf) {
        let db = dir.path().join("scratch.db");
        (db.clone(), dir.path().join("scratch.db-wal"))
    }

    #[test]
    fn commits_never_wait_for_the_checkpoint_thread_and_it_copies_the_wal() {
        // Arrange: a checkpoint thread that, once asked, waits until the test lets it run the
        // real checkpoint.
        let dir = tempfile::tempdir().unwrap();
        let (db, wal) = scratch_files(&dir);
        let (asked_tx, asked) = mpsc::channel::<()>();
        let (let_checkpoint_run, checkpoint_may_run) = mpsc::channel::<()>();
        let (copied_tx, copied) = mpsc::channel::<()>();
        let mut writer = blob_writer(&dir, |db| {
            let mut real = checkpoint_of(db).unwrap();
            Box::new(move || {
                let _ = asked_tx.send(());
                checkpoint_may_run
                    .recv()
                    .map_err(|e| StoreError::Other(e.to_string()))?;
                real()?;
                let _ = copied_tx.send(());
                Ok(())
            })
        });
        // Act: about 3,000 frames, three times the first mark, while the checkpoint is held.
        write_blobs(&mut writer, 30);
        // Assert: the thread was asked, and every commit went on without a checkpoint of the
        // writer's own (one would have started the WAL again from its beginning near 1,000).
        let timeout = std::time::Duration::from_secs(10);
        asked.recv_timeout(timeout).unwrap();
        assert!(std::fs::metadata(&wal).unwrap().len() > 2_500 * FRAME_BYTES);
        assert!(std::fs::metadata(&db).unwrap().len() < 100 * 1024);
        // Once it runs, the thread's checkpoint copies every frame into the database file.
        let_checkpoint_run.send(()).unwrap();
        copied.recv_timeout(timeout).unwrap();
        assert!(std::fs::metadata(&db).unwrap().len() > 3_000_000);
        drop(let_checkpoint_run);
    }

    #[test]
    fn the_checkpoint_thread_is_asked_once_per_step_of_growth_not_after_every_commit() {
        // Arrange
        let mut cadence = CheckpointCadence::default();
        // Act: commits of 30 frames each, from an empty WAL up to the writer's mark.
        let mut asked_at = Vec::new();
        let mut frames = 0;
        while frames + 30 < WRITER_CHECKPOINTS_AT_FRAMES {
            frames += 30;
            if cadence.after_commit(frames) == CheckpointBy::Thread {
                asked_at.push(frames);
            }
        }
        // Assert: first at the first commit past the first mark, then once per step.
        assert_eq!(asked_at.first(), Some(&1020));
        assert!(
            asked_at
                .windows(2)
                .all(|w| w[1] - w[0] >= CHECKPOINT_EVERY_FRAMES && w[1] - w[0] < 280),
            "{asked_at:?}"
        );
        // 12 requests for the 100 commits past the first mark.
        assert_eq!(asked_at.len(), 12, "{asked_at:?}");
        // At the writer's mark, the writer copies after every commit.
        assert_eq!(cadence.after_commit(4000), CheckpointBy::Writer);
        assert_eq!(cadence.after_commit(4030), CheckpointBy::Writer);
        // Once the WAL starts again from its beginning, the first mark asks again.
        assert_eq!(cadence.after_commit(30), CheckpointBy::Nobody);
        assert_eq!(cadence.after_commit(1000), CheckpointBy::Thread);
        assert_eq!(cadence.after_commit(1030), CheckpointBy::Nobody);
    }

    #[test]
    fn the_writer_starts_the_wal_afresh_at_its_mark_when_the_thread_falls_behind() {
        // Arrange: a checkpoint thread that never copies anything.
        let dir = tempfile::tempdir().unwrap();
        let (db, wal) = scratch_files(&dir);
        let mut writer = blob_writer(&dir, |_| Box::new(|| Ok(())));
        // Act: about 9,000 frames, more than twice the writer's mark.
        write_blobs(&mut writer, 90);
        // Assert: the writer copied the WAL into the database at its mark and wrote on from the
        // WAL's beginning, so the file never held much more than the mark.
        let mark = u64::try_from(WRITER_CHECKPOINTS_AT_FRAMES).unwrap();
        assert!(std::fs::metadata(&wal).unwrap().len() < (mark + 300) * FRAME_BYTES);
        assert!(std::fs::metadata(&db).unwrap().len() > 4_000_000);
        assert!(frames_in_wal(&db) < WRITER_CHECKPOINTS_AT_FRAMES);
        assert_eq!(
            writer
                .conn
                .query_row("SELECT count(*) FROM big", [], |r| r.get::<_, i64>(0))
                .unwrap(),
            90
        );
    }

    /// A writer thread (as [`SqliteStore::open`] starts it) on a scratch database with `sync`;
    /// its inbox, and the thread.
    fn writer_thread(
        dir: &tempfile::TempDir,
        sync: SyncWal,
    ) -> (UnboundedSender<ToWriter>, std::thread::JoinHandle<()>) {
        let (inbox, jobs) = tokio::sync::mpsc::unbounded_channel::<ToWriter>();
        let (conn, checkpoint, synced) = (
            scratch_connection(dir),
            scratch_checkpoint(dir),
            inbox.downgrade(),
        );
        // Built on its thread, as `SqliteStore::open` does: a writer's held statements stay there.
        let thread = std::thread::spawn(move || {
            let writer = Writer::start(for_the_test(conn), sync, checkpoint, synced).unwrap();
            writer_loop(writer, jobs);
        });
        (inbox, thread)
    }

    /// [`writer_thread`] whose syncs finish only when the test sends on the returned channel.
    fn writer_thread_with_held_sync(
        dir: &tempfile::TempDir,
    ) -> (
        UnboundedSender<ToWriter>,
        mpsc::Sender<()>,
        std::thread::JoinHandle<()>,
    ) {
        let (let_sync_finish, sync_may_finish) = mpsc::channel::<()>();
        let sync: SyncWal = Box::new(move || sync_may_finish.recv().map_err(std::io::Error::other));
        let (inbox, thread) = writer_thread(dir, sync);
        (inbox, let_sync_finish, thread)
    }

    /// [`insert_job_calling`] that says on `ran` when it has run, for the writer thread.
    fn reported_insert_job(value: i64, fails: bool, ran: &mpsc::Sender<i64>) -> (ToWriter, Answer) {
        let ran = ran.clone();
        let (job, answer) = insert_job_calling(value, fails, move |v| {
            let _ = ran.send(v);
        });
        (ToWriter::Job(job), answer)
    }

    /// How long a test waits for the writer thread before it fails.
    const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

    /// Sends a job for each of `values`, each once the one before has run (so each is a batch
    /// of its own); their answers.
    fn run_one_by_one(
        inbox: &UnboundedSender<ToWriter>,
        values: &[i64],
        ran_tx: &mpsc::Sender<i64>,
        ran: &mpsc::Receiver<i64>,
    ) -> Vec<Answer> {
        let mut answers = Vec::new();
        for &value in values {
            let (job, answer) = reported_insert_job(value, false, ran_tx);
            inbox.send(job).ok().unwrap();
            assert_eq!(ran.recv_timeout(WAIT).unwrap(), value);
            answers.push(answer);
        }
        answers
    }

    /// Waits until `reader` sees exactly `rows` committed in `t`.
    fn wait_for_rows(reader: &Connection, rows: &[i64]) {
        let deadline = std::time::Instant::now() + WAIT;
        while rows_of_t(reader) != rows {
            assert!(std::time::Instant::now() < deadline, "never committed");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Asserts that each answer is a success carrying its value.
    fn assert_answered_with(values: &[i64], answers: Vec<Answer>) {
        for (&value, answer) in values.iter().zip(answers) {
            assert!(matches!(answer.blocking_recv(), Ok(Ok(Ok(v))) if v == value));
        }
    }

    fn unanswered(answer: &mut Answer) -> bool {
        matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Empty))
    }

    #[test]
    fn jobs_that_arrive_during_a_sync_wait_in_one_transaction_that_commits_when_it_ends() {
        // Arrange: a writer thread whose first sync the test holds.
        let dir = tempfile::tempdir().unwrap();
        let (inbox, let_sync_finish, thread) = writer_thread_with_held_sync(&dir);
        let reader = open_connection(&dir.path().join("scratch.db"), true).unwrap();
        let (ran_tx, ran) = mpsc::channel::<i64>();
        let mut first_answer = run_one_by_one(&inbox, &[1], &ran_tx, &ran).remove(0);
        // Act: two more jobs, one at a time, while the first commit's sync runs.
        let mut later = run_one_by_one(&inbox, &[2, 3], &ran_tx, &ran);
        // Assert: both ran, but only the first job is committed (another connection sees
        // only it), and nobody is answered before the sync.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(rows_of_t(&reader), vec![1]);
        assert!(unanswered(&mut first_answer));
        // The sync ends: the first job is answered, the other two commit together.
        let_sync_finish.send(()).unwrap();
        assert!(matches!(first_answer.blocking_recv(), Ok(Ok(Ok(1)))));
        wait_for_rows(&reader, &[1, 2, 3]);
        // One sync more answers both: they were one commit (a second would need a third).
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(later.iter_mut().all(unanswered));
        let_sync_finish.send(()).unwrap();
        assert_answered_with(&[2, 3], later);
        drop(inbox);
        drop(let_sync_finish);
        thread.join().unwrap();
    }

    #[test]
    fn the_open_transaction_commits_when_the_sync_ends_before_the_jobs_that_came_meanwhile_run() {
        // Arrange: a writer thread whose syncs the test holds; job 1 committed and syncing,
        // job 2 waiting in the open transaction, and job 3 holding the writer in its run.
        let dir = tempfile::tempdir().unwrap();
        let (inbox, let_sync_finish, thread) = writer_thread_with_held_sync(&dir);
        let reader = open_connection(&dir.path().join("scratch.db"), true).unwrap();
        let (ran_tx, ran) = mpsc::channel::<i64>();
        let mut answers = run_one_by_one(&inbox, &[1, 2], &ran_tx, &ran);
        let (let_job_3_finish, job_3_may_finish) = mpsc::channel::<()>();
        let ran_3 = ran_tx.clone();
        let (job_3, answer_3) = insert_job_calling(3, false, move |v| {
            let _ = ran_3.send(v);
            let _ = job_3_may_finish.recv_timeout(WAIT);
        });
        inbox.send(ToWriter::Job(job_3)).ok().unwrap();
        assert_eq!(ran.recv_timeout(WAIT).unwrap(), 3);
        // Act: the sync ends (its word waits in the inbox), job 4 arrives behind it, and job 3
        // lets the writer go on.
        let_sync_finish.send(()).unwrap();
        assert!(matches!(answers.remove(0).blocking_recv(), Ok(Ok(Ok(1)))));
        let (job_4, answer_4) = reported_insert_job(4, false, &ran_tx);
        inbox.send(job_4).ok().unwrap();
        let_job_3_finish.send(()).unwrap();
        // Assert: jobs 2 and 3 were committed without waiting for job 4, which runs after
        // their commit and waits, in the next transaction, for their sync to end.
        assert_eq!(ran.recv_timeout(WAIT).unwrap(), 4);
        wait_for_rows(&reader, &[1, 2, 3]);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(rows_of_t(&reader), vec![1, 2, 3]);
        let_sync_finish.send(()).unwrap();
        assert_answered_with(&[2, 3], vec![answers.remove(0), answer_3]);
        wait_for_rows(&reader, &[1, 2, 3, 4]);
        let_sync_finish.send(()).unwrap();
        assert_answered_with(&[4], vec![answer_4]);
        drop(inbox);
        drop(let_sync_finish);
        thread.join().unwrap();
    }

    #[test]
    fn a_job_that_fails_in_the_open_transaction_is_undone_alone() {
        // Arrange: a writer thread whose first sync the test holds, and one job waiting in
        // the open transaction behind it.
        let dir = tempfile::tempdir().unwrap();
        let (inbox, let_sync_finish, thread) = writer_thread_with_held_sync(&dir);
        let reader = open_connection(&dir.path().join("scratch.db"), true).unwrap();
        let (ran_tx, ran) = mpsc::channel::<i64>();
        let answers = run_one_by_one(&inbox, &[1, 2], &ran_tx, &ran);
        // Act: a job that writes, then fails its condition, in the same open transaction.
        let (failing, failing_answer) = reported_insert_job(3, true, &ran_tx);
        inbox.send(failing).ok().unwrap();
        // Assert: the waiting job ran again beside it and was committed with it at once,
        // without the failing job's row; each is answered after its sync.
        assert_eq!(ran.recv_timeout(WAIT).unwrap(), 3);
        wait_for_rows(&reader, &[1, 2]);
        let_sync_finish.send(()).unwrap();
        let_sync_finish.send(()).unwrap();
        assert_answered_with(&[1, 2], answers);
        assert!(matches!(
            failing_answer.blocking_recv(),
            Ok(Ok(Err(ConditionFailed)))
        ));
        assert_eq!(rows_of_t(&reader), vec![1, 2]);
        drop(inbox);
        drop(let_sync_finish);
        thread.join().unwrap();
    }

    #[test]
    fn jobs_waiting_in_the_open_transaction_when_a_sync_fails_are_never_committed() {
        // Arrange: a writer thread whose first sync waits for the test, then fails.
        let dir = tempfile::tempdir().unwrap();
        let (let_sync_fail, sync_may_fail) = mpsc::channel::<()>();
        let sync: SyncWal = Box::new(move || {
            sync_may_fail.recv().map_err(std::io::Error::other)?;
            Err(std::io::Error::other("EIO"))
        });
        let (inbox, thread) = writer_thread(&dir, sync);
        let (ran_tx, ran) = mpsc::channel::<i64>();
        let answers = run_one_by_one(&inbox, &[1, 2], &ran_tx, &ran);
        // Act: the sync of the first commit fails while the second job waits.
        let_sync_fail.send(()).unwrap();
        // Assert: both callers hear "unavailable"; the waiting job's row never reached the
        // database (the first one's did, before its sync).
        for answer in answers {
            assert!(matches!(
                answer.blocking_recv(),
                Ok(Err(StoreError::Unavailable(_)))
            ));
        }
        drop(inbox);
        drop(let_sync_fail);
        thread.join().unwrap();
        let reader = open_connection(&dir.path().join("scratch.db"), true).unwrap();
        assert_eq!(rows_of_t(&reader), vec![1]);
    }

    #[test]
    fn a_writer_that_stops_commits_the_jobs_waiting_in_its_open_transaction() {
        // Arrange: a job waiting in the open transaction behind a held sync.
        let dir = tempfile::tempdir().unwrap();
        let (inbox, let_sync_finish, thread) = writer_thread_with_held_sync(&dir);
        let (ran_tx, ran) = mpsc::channel::<i64>();
        let answers = run_one_by_one(&inbox, &[1, 2], &ran_tx, &ran);
        // Act: the last sender goes (the store is dropped).
        drop(inbox);
        let_sync_finish.send(()).unwrap();
        let_sync_finish.send(()).unwrap();
        thread.join().unwrap();
        // Assert: both committed and answered.
        assert_answered_with(&[1, 2], answers);
        let reader = open_connection(&dir.path().join("scratch.db"), true).unwrap();
        assert_eq!(rows_of_t(&reader), vec![1, 2]);
    }

    #[test]
    fn a_failed_sync_fails_its_batch_and_stops_every_later_write() {
        // Arrange: a writer whose disk refuses to sync.
        let dir = tempfile::tempdir().unwrap();
        let sync: SyncWal = Box::new(|| Err(std::io::Error::other("EIO")));
        let mut writer = Writer::start(
            for_the_test(scratch_connection(&dir)),
            sync,
            scratch_checkpoint(&dir),
            no_writer_thread(),
        )
        .unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let (job, answer) = insert_job(1, false, &runs);
        // Act
        writer.write_batch(vec![job]);
        // Assert: its caller hears "unavailable", not success; a later job does not even run.
        assert!(matches!(
            answer.blocking_recv(),
            Ok(Err(StoreError::Unavailable(_)))
        ));
        let (later, later_answer) = insert_job(2, false, &runs);
        assert!(!writer.write_batch(vec![later]));
        assert!(matches!(
            later_answer.blocking_recv(),
            Ok(Err(StoreError::Unavailable(_)))
        ));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn cached_statements_are_not_planned_again_on_each_bind() {
        // Arrange: a migrated database, and the connection settings every store connection gets.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("otpgate.db");
        drop(SqliteStore::open(&path).unwrap());
        let conn = open_connection(&path, false).unwrap();
        // Act: the consume of a fresh code (`attempts = 0`) and a send count (`LIMIT ?`), each
        // run with new values, as under load; SQLite would otherwise re-prepare both every time.
        for round in 0..3_i64 {
            exec(
                &conn,
                store::CONSUME_CHALLENGE,
                rusqlite::params![format!("ch-{round}"), 0_i64, round],
            )
            .unwrap();
            let _: i64 = query_row_cached(
                &conn,
                store::SENDS_TO_DESTINATION,
                rusqlite::params!["t", "+989121234567", round, 5 + round],
                |r| r.get(0),
            )
            .unwrap();
        }
        // Assert
        for sql in [store::CONSUME_CHALLENGE, store::SENDS_TO_DESTINATION] {
            let stmt = conn.prepare_cached(sql).unwrap();
            assert_eq!(stmt.get_status(StatementStatus::RePrepare), 0, "{sql}");
        }
    }
}
