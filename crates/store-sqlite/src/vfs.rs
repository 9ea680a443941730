//! The writer's VFS: SQLite's default VFS, except that a WAL file gathers the frames of a
//! commit in memory and writes them with one `pwrite`.
//!
//! SQLite writes each WAL frame as two `pwrite`s (its 24-byte header, then the page), and a
//! group commit of a hundred logins is several hundred frames. On the machine we measure on, a
//! `pwrite` to a file costs about 6 µs whether it carries 24 bytes or 4 KiB, and those calls were
//! a third of the writer thread's time under `acl-confirm`. One write per commit (or one per
//! 124 KiB) carries the same bytes to the same offsets in the same order.
//!
//! Why it is safe: SQLite publishes a commit to other connections only after it has written all
//! of its frames (it then updates the WAL index in shared memory), and the last frame of a
//! commit carries the database size in its header (the WAL file format: bytes 4-7 of a frame
//! header are non-zero only in a commit frame). The buffer is written out as soon as that frame's
//! page is in it, or at once when a commit frame's header is rewritten in place (SQLite does that,
//! last, for a transaction that spilled pages before its commit and then changed one of them
//! again), so by the time any reader can see the commit, and before the sync thread syncs it, its
//! frames are in the file. Every
//! other call that reads or changes the file (read, sync, size, truncate, file control, close)
//! writes the buffer out first, so SQLite itself never sees the file without its own writes
//! either. Durability is unchanged: the sync thread still `fdatasync`s the WAL before any answer
//! goes out, and a crash can only lose frames of a commit that was never published.
//!
//! Only the writer connection opens through this VFS; readers never write to the WAL. The main
//! database file and every other file are the default VFS's own, untouched.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

use rusqlite::ffi;

/// The name connections pass to open through this VFS.
pub(crate) const NAME: &CStr = c"otpgate-wal-batch";

/// A buffer this large is written out even before its commit ends (a big transaction, e.g. the
/// sweeper's), so memory stays bounded.
const MAX_PENDING: usize = 4 << 20;

/// The most one write passes to the default VFS: its `pwrite` takes lengths below 128 KiB only
/// (`seekAndWriteFd` masks the length with `0x1ffff`).
const MAX_WRITE: usize = 124 << 10;

/// Bytes of a WAL frame header; bytes 4-7 are the commit's database size, zero otherwise.
pub(crate) const FRAME_HEADER: usize = 24;
/// Bytes of the WAL file header, before the first frame.
const WAL_HEADER: i64 = 32;

/// Registers the VFS once per process; later calls answer the first call's outcome.
pub(crate) fn register() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            // SAFETY: `sqlite3_vfs_find(NULL)` initialises SQLite if needed and returns the
            // default VFS, which lives as long as the process.
            let default = unsafe { ffi::sqlite3_vfs_find(std::ptr::null()) };
            if default.is_null() {
                return Err("SQLite has no default VFS".into());
            }
            // SAFETY: `default` is a valid, registered VFS (above).
            let default_size = unsafe { (*default).szOsFile };
            let vfs = Box::new(ffi::sqlite3_vfs {
                iVersion: 2,
                szOsFile: (REAL_FILE_OFFSET as c_int).saturating_add(default_size),
                // SAFETY: as above.
                mxPathname: unsafe { (*default).mxPathname },
                pNext: std::ptr::null_mut(),
                zName: NAME.as_ptr(),
                pAppData: default.cast(),
                xOpen: Some(open),
                xDelete: Some(delete),
                xAccess: Some(access),
                xFullPathname: Some(full_pathname),
                xDlOpen: Some(dl_open),
                xDlError: Some(dl_error),
                xDlSym: Some(dl_sym),
                xDlClose: Some(dl_close),
                xRandomness: Some(randomness),
                xSleep: Some(sleep),
                xCurrentTime: Some(current_time),
                xGetLastError: Some(get_last_error),
                xCurrentTimeInt64: Some(current_time_int64),
                xSetSystemCall: None,
                xGetSystemCall: None,
                xNextSystemCall: None,
            });
            // SQLite keeps the pointer for the life of the process: the VFS is never freed.
            let vfs = Box::leak(vfs);
            // SAFETY: `vfs` is fully initialised and outlives every connection.
            let rc = unsafe { ffi::sqlite3_vfs_register(vfs, 0) };
            if rc == ffi::SQLITE_OK {
                Ok(())
            } else {
                Err(format!("registering the WAL-batching VFS failed ({rc})"))
            }
        })
        .clone()
}

/// A WAL file opened through this VFS: the default VFS's file, and the bytes not yet written.
#[repr(C)]
struct WalFile {
    /// SQLite's view of the file; first, so a `*mut sqlite3_file` is a `*mut WalFile`.
    base: ffi::sqlite3_file,
    /// The default VFS's file, in the same allocation, at [`REAL_FILE_OFFSET`].
    real: *mut ffi::sqlite3_file,
    /// Writes not yet passed on, contiguous from `pending_at`.
    pending: Vec<u8>,
    pending_at: i64,
    /// The last write was the header of a commit frame: its page ends the commit.
    commit_page_next: bool,
    /// Where the last write (buffered or not) ended.
    last_write_end: i64,
}

/// Where the default VFS's file starts within a file of ours (8-byte aligned, as SQLite's
/// allocations are).
const REAL_FILE_OFFSET: usize = std::mem::size_of::<WalFile>().next_multiple_of(8);

/// The default VFS, which ours passes every call on to.
///
/// # Safety
/// `vfs` must be ours (SQLite passes each VFS method its own VFS): its `pAppData` is the
/// default VFS (set in `register`).
unsafe fn default_vfs(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    // SAFETY: the caller's contract.
    unsafe { (*vfs).pAppData.cast() }
}

static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(wal_close),
    xRead: Some(wal_read),
    xWrite: Some(wal_write),
    xTruncate: Some(wal_truncate),
    xSync: Some(wal_sync),
    xFileSize: Some(wal_file_size),
    xLock: Some(wal_lock),
    xUnlock: Some(wal_unlock),
    xCheckReservedLock: Some(wal_check_reserved_lock),
    xFileControl: Some(wal_file_control),
    xSectorSize: Some(wal_sector_size),
    xDeviceCharacteristics: Some(wal_device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite calls this with our VFS.
    let default = unsafe { default_vfs(vfs) };
    // SAFETY: `default` is the default VFS; SQLite hands us `szOsFile` bytes at `file`.
    let Some(default_open) = (unsafe { (*default).xOpen }) else {
        return ffi::SQLITE_CANTOPEN;
    };
    if flags & ffi::SQLITE_OPEN_WAL == 0 {
        // Every other file is the default VFS's own, at the start of the allocation (ours is
        // larger than it needs).
        // SAFETY: as above.
        return unsafe { default_open(default, name, file, flags, out_flags) };
    }
    // SAFETY: the allocation is `REAL_FILE_OFFSET` plus the default VFS's size.
    let real = unsafe { file.cast::<u8>().add(REAL_FILE_OFFSET) }.cast::<ffi::sqlite3_file>();
    // SAFETY: `real` has the default VFS's size.
    let rc = unsafe { default_open(default, name, real, flags, out_flags) };
    if rc != ffi::SQLITE_OK {
        // A file whose methods are NULL is not closed by SQLite.
        // SAFETY: `file` is writable, at least `sqlite3_file`'s size.
        unsafe { (*file).pMethods = std::ptr::null() };
        return rc;
    }
    // SAFETY: `file` is ours to initialise, 8-byte aligned and large enough for a `WalFile`.
    unsafe {
        file.cast::<WalFile>().write(WalFile {
            base: ffi::sqlite3_file {
                pMethods: &WAL_METHODS,
            },
            real,
            pending: Vec::new(),
            pending_at: 0,
            commit_page_next: false,
            last_write_end: 0,
        });
    }
    ffi::SQLITE_OK
}

/// The `WalFile` behind a file SQLite opened through `open` with `SQLITE_OPEN_WAL`.
///
/// # Safety
/// `file` must be such a file, not yet closed, used by one thread at a time (SQLite's contract).
unsafe fn wal_file<'a>(file: *mut ffi::sqlite3_file) -> &'a mut WalFile {
    // SAFETY: the caller's contract.
    unsafe { &mut *file.cast::<WalFile>() }
}

/// The default VFS's methods of `f`'s real file.
fn real_methods(f: &WalFile) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: the real file was opened successfully (`open`), so its methods are set and are
    // the default VFS's static table.
    unsafe { &*(*f.real).pMethods }
}

/// Passes the gathered bytes on to the real file, in one write per [`MAX_WRITE`] bytes.
fn flush(f: &mut WalFile) -> c_int {
    if f.pending.is_empty() {
        return ffi::SQLITE_OK;
    }
    let Some(write) = real_methods(f).xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let mut rc = ffi::SQLITE_OK;
    let mut at = f.pending_at;
    for chunk in f.pending.chunks(MAX_WRITE) {
        // SAFETY: `chunk` is readable and shorter than `MAX_WRITE`; the real file is open.
        rc = unsafe { write(f.real, chunk.as_ptr().cast(), chunk.len() as c_int, at) };
        if rc != ffi::SQLITE_OK {
            break;
        }
        at = at.saturating_add(chunk.len() as i64);
    }
    // On failure the bytes are dropped too: SQLite rolls the transaction back, and frames past
    // the WAL index's last commit are never read.
    f.pending.clear();
    if f.pending.capacity() > MAX_PENDING {
        f.pending.shrink_to(MAX_PENDING);
    }
    rc
}

unsafe extern "C" fn wal_write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite calls this only on a file `open` made, from one thread at a time.
    let f = unsafe { wal_file(file) };
    let Ok(len) = usize::try_from(amount) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    // SAFETY: SQLite passes `amount` readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
    let end = f
        .pending_at
        .saturating_add(i64::try_from(f.pending.len()).unwrap_or(i64::MAX));
    if !f.pending.is_empty() && offset != end {
        let rc = flush(f);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    if f.pending.is_empty() {
        f.pending_at = offset;
    }
    f.pending.extend_from_slice(bytes);
    let follows_last_write = offset == f.last_write_end;
    f.last_write_end = offset.saturating_add(i64::from(amount));
    let ends_commit = f.commit_page_next;
    let commit_header = len == FRAME_HEADER
        && offset >= WAL_HEADER
        && bytes.get(4..8).is_some_and(|size| size != [0; 4]);
    f.commit_page_next = commit_header;
    // A commit frame appended after the frames before it ends with its page, the next write.
    // A commit header written anywhere else is passed on at once: SQLite rewrites the headers of
    // a transaction that spilled pages early and then wrote one of them again (new checksums),
    // and that rewrite, with no page after it, is the last thing it writes before the commit
    // is published.
    if ends_commit || (commit_header && !follows_last_write) || f.pending.len() >= MAX_PENDING {
        return flush(f);
    }
    ffi::SQLITE_OK
}

/// Writes the buffer out, then passes the call on to the real file (`missing` if the default
/// VFS lacks the method).
///
/// # Safety
/// As [`wal_file`]; `call` gets the real file and must pass SQLite's own arguments.
unsafe fn flushed_then<M>(
    file: *mut ffi::sqlite3_file,
    method: impl FnOnce(&ffi::sqlite3_io_methods) -> Option<M>,
    missing: c_int,
    call: impl FnOnce(M, *mut ffi::sqlite3_file) -> c_int,
) -> c_int {
    // SAFETY: the caller's contract.
    let f = unsafe { wal_file(file) };
    let rc = flush(f);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    match method(real_methods(f)) {
        Some(m) => call(m, f.real),
        None => missing,
    }
}

unsafe extern "C" fn wal_read(
    file: *mut ffi::sqlite3_file,
    data: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite calls this only on a file `open` made, and its arguments go on unchanged.
    unsafe {
        flushed_then(
            file,
            |m| m.xRead,
            ffi::SQLITE_IOERR_READ,
            |read, real| read(real, data, amount, offset),
        )
    }
}

unsafe extern "C" fn wal_truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: as in `wal_read`.
    unsafe {
        flushed_then(
            file,
            |m| m.xTruncate,
            ffi::SQLITE_IOERR_TRUNCATE,
            |truncate, real| truncate(real, size),
        )
    }
}

unsafe extern "C" fn wal_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: as in `wal_read`.
    unsafe {
        flushed_then(
            file,
            |m| m.xSync,
            ffi::SQLITE_IOERR_FSYNC,
            |sync, real| sync(real, flags),
        )
    }
}

unsafe extern "C" fn wal_file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    // SAFETY: as in `wal_read`.
    unsafe {
        flushed_then(
            file,
            |m| m.xFileSize,
            ffi::SQLITE_IOERR_FSTAT,
            |file_size, real| file_size(real, size),
        )
    }
}

unsafe extern "C" fn wal_file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: as in `wal_read`.
    unsafe {
        flushed_then(
            file,
            |m| m.xFileControl,
            ffi::SQLITE_NOTFOUND,
            |control, real| control(real, op, arg),
        )
    }
}

unsafe extern "C" fn wal_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: as in `wal_write`; SQLite calls nothing on the file after this.
    let f = unsafe { wal_file(file) };
    let flushed = flush(f);
    let closed = match real_methods(f).xClose {
        // SAFETY: as in `wal_read`.
        Some(close) => unsafe { close(f.real) },
        None => ffi::SQLITE_OK,
    };
    // SAFETY: the `WalFile` was written by `open` and is dropped once, here.
    unsafe { std::ptr::drop_in_place(file.cast::<WalFile>()) };
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        closed
    }
}

unsafe extern "C" fn wal_lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: as in `wal_write`.
    let f = unsafe { wal_file(file) };
    match real_methods(f).xLock {
        // SAFETY: as in `wal_read`.
        Some(lock) => unsafe { lock(f.real, level) },
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn wal_unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: as in `wal_write`.
    let f = unsafe { wal_file(file) };
    match real_methods(f).xUnlock {
        // SAFETY: as in `wal_read`.
        Some(unlock) => unsafe { unlock(f.real, level) },
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn wal_check_reserved_lock(
    file: *mut ffi::sqlite3_file,
    out: *mut c_int,
) -> c_int {
    // SAFETY: as in `wal_write`.
    let f = unsafe { wal_file(file) };
    match real_methods(f).xCheckReservedLock {
        // SAFETY: as in `wal_read`.
        Some(check) => unsafe { check(f.real, out) },
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn wal_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: as in `wal_write`.
    let f = unsafe { wal_file(file) };
    match real_methods(f).xSectorSize {
        // SAFETY: as in `wal_read`.
        Some(sector_size) => unsafe { sector_size(f.real) },
        None => 4096,
    }
}

unsafe extern "C" fn wal_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: as in `wal_write`.
    let f = unsafe { wal_file(file) };
    match real_methods(f).xDeviceCharacteristics {
        // SAFETY: as in `wal_read`.
        Some(characteristics) => unsafe { characteristics(f.real) },
        None => 0,
    }
}

// The rest of the VFS is the default VFS's, called with the default VFS.

unsafe extern "C" fn delete(vfs: *mut ffi::sqlite3_vfs, name: *const c_char, sync: c_int) -> c_int {
    // SAFETY: SQLite calls this with our VFS.
    let d = unsafe { default_vfs(vfs) };
    // SAFETY: the default VFS's own method, with SQLite's arguments.
    match unsafe { (*d).xDelete } {
        Some(m) => unsafe { m(d, name, sync) },
        None => ffi::SQLITE_IOERR_DELETE,
    }
}

unsafe extern "C" fn access(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    // SAFETY: SQLite calls this with our VFS.
    let d = unsafe { default_vfs(vfs) };
    // SAFETY: as in `delete`.
    match unsafe { (*d).xAccess } {
        Some(m) => unsafe { m(d, name, flags, out) },
        None => ffi::SQLITE_IOERR_ACCESS,
    }
}

unsafe extern "C" fn full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n_out: c_int,
    out: *mut c_char,
) -> c_int {
    // SAFETY: SQLite calls this with our VFS.
    let d = unsafe { default_vfs(vfs) };
    // SAFETY: as in `delete`.
    match unsafe { (*d).xFullPathname } {
        Some(m) => unsafe { m(d, name, n_out, out) },
        None => ffi::SQLITE_CANTOPEN,
    }
}

unsafe extern "C" fn dl_open(vfs: *mut ffi::sqlite3_vfs, name: *const c_char) -> *mut c_void {
    // SAFETY: SQLite calls this with our VFS.
    let d = unsafe { default_vfs(vfs) };
    // SAFETY: as in `delete`.
    match unsafe { (*d).xDlOpen } {
        Some(m) => unsafe { m(d, name) },
        None => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn dl_error(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) {
    // SAFETY: SQLite calls this with our VFS.
    let d = unsafe { default_vfs(vfs) };
    // SAFETY: as in `delete`.
    if let Some(m) = unsafe { (*d).xDlError } {
        unsafe { m(d, n, out) }
    }
}

type DlSymbol = unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *mut c_void, *const c_char);

unsafe extern "C" fn dl_sym(
    vfs: *mut ffi::sqlite3_vfs,
    handle: *mut c_void,
    symbol: *const c_char,
) -> Option<DlSymbol> {
    // SAFETY: SQLite calls this with our VFS.
    let d = unsafe { default_vfs(vfs) };
    // SAFETY: as in `delete`.
    match unsafe { (*d).xDlSym } {
        Some(m) => unsafe { m(d, handle, symbol) },
        None => None,
    }
}

unsafe extern "C" fn dl_close(vfs: *mut ffi::sqlite3_vfs, handle: *mut c_void) {
    // SAFETY: SQLite calls this with our VFS.
    let d = unsafe { default_vfs(vfs) };
    // SAFETY: as in `delete`.
    if let Some(m) = unsafe { (*d).xDlClose } {
        unsafe { m(d, handle) }
    }
}

unsafe extern "C" fn randomness(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    // SAFETY: SQLite calls this with our VFS.
    let d = unsafe { default_vfs(vfs) };
    // SAFETY: as in `delete`.
    match unsafe { (*d).xRandomness } {
        Some(m) => unsafe { m(d, n, out) },
        None => 0,
    }
}

unsafe extern "C" fn sleep(vfs: *mut ffi::sqlite3_vfs, microseconds: c_int) -> c_int {
    // SAFETY: SQLite calls this with our VFS.
    let d = unsafe { default_vfs(vfs) };
    // SAFETY: as in `delete`.
    match unsafe { (*d).xSleep } {
        Some(m) => unsafe { m(d, microseconds) },
        None => 0,
    }
}

unsafe extern "C" fn current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    // SAFETY: SQLite calls this with our VFS.
    let d = unsafe { default_vfs(vfs) };
    // SAFETY: as in `delete`.
    match unsafe { (*d).xCurrentTime } {
        Some(m) => unsafe { m(d, out) },
        None => ffi::SQLITE_ERROR,
    }
}

unsafe extern "C" fn get_last_error(
    vfs: *mut ffi::sqlite3_vfs,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    // SAFETY: SQLite calls this with our VFS.
    let d = unsafe { default_vfs(vfs) };
    // SAFETY: as in `delete`.
    match unsafe { (*d).xGetLastError } {
        Some(m) => unsafe { m(d, n, out) },
        None => 0,
    }
}

unsafe extern "C" fn current_time_int64(vfs: *mut ffi::sqlite3_vfs, out: *mut i64) -> c_int {
    // SAFETY: SQLite calls this with our VFS.
    let d = unsafe { default_vfs(vfs) };
    // SAFETY: as in `delete`.
    match unsafe { (*d).xCurrentTimeInt64 } {
        Some(m) => unsafe { m(d, out) },
        None => ffi::SQLITE_ERROR,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use rusqlite::Connection;

    use crate::open_connection;

    /// The writer's connection (through this VFS) on a new database with a table of blobs.
    fn writer_with_table(dir: &tempfile::TempDir) -> Connection {
        let conn = open_connection(&dir.path().join("wal.db"), false).unwrap();
        // As the store's writer runs: no sync inside a commit, which would write the buffer
        // out on its own.
        conn.execute_batch(
            "PRAGMA synchronous = NORMAL; \
             CREATE TABLE b (id INTEGER PRIMARY KEY, v BLOB NOT NULL)",
        )
        .unwrap();
        conn
    }

    /// Inserts `rows` blobs of `size` bytes in one transaction.
    fn insert_blobs(conn: &Connection, first_id: i64, rows: i64, size: usize) {
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        for id in first_id..first_id + rows {
            conn.execute(
                "INSERT INTO b (id, v) VALUES (?1, ?2)",
                rusqlite::params![id, vec![(id % 251) as u8; size]],
            )
            .unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
    }

    fn count_and_sum(conn: &Connection) -> (i64, i64) {
        conn.query_row(
            "SELECT count(*), coalesce(sum(length(v)), 0) FROM b",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    #[test]
    fn a_commits_frames_are_in_the_wal_file_when_the_commit_returns() {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let writer = writer_with_table(&dir);
        // Act: a commit of about a hundred and twenty pages, and nothing else on the writer
        // after it.
        insert_blobs(&writer, 1, 1000, 500);
        // Assert: the file ends with a whole commit frame (its header's database size is
        // non-zero), so nothing of the commit is still held in memory...
        let wal = std::fs::read(dir.path().join("wal.db-wal")).unwrap();
        let page: i64 = writer
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        let frame = super::FRAME_HEADER + usize::try_from(page).unwrap();
        assert!(wal.len() > 32 + 100 * frame, "WAL of {} bytes", wal.len());
        assert_eq!((wal.len() - 32) % frame, 0, "a frame is cut short");
        let last = wal.len() - frame;
        assert_ne!(
            wal[last + 4..last + 8],
            [0; 4],
            "the last frame is no commit"
        );
        // ...and a connection on SQLite's own VFS reads every row of it.
        let reader = open_connection(&dir.path().join("wal.db"), true).unwrap();
        assert_eq!(count_and_sum(&reader), (1000, 1000 * 500));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_commit_reaches_the_kernel_in_a_few_writes() {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let writer = writer_with_table(&dir);
        let writes_so_far = || {
            let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
            io.lines()
                .find_map(|l| l.strip_prefix("syscw: "))
                .unwrap()
                .trim()
                .parse::<u64>()
                .unwrap()
        };
        let before = writes_so_far();
        // Act: about fifty pages, each a frame: SQLite alone writes each frame as two calls.
        insert_blobs(&writer, 1, 400, 500);
        // Assert
        let writes = writes_so_far() - before;
        assert!(writes <= 4, "{writes} write calls for one commit");
    }

    #[test]
    fn a_copy_of_the_files_taken_after_a_commit_recovers_it_even_when_pages_were_rewritten() {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let writer = writer_with_table(&dir);
        // No checkpoint after the commit: its reads of the WAL would write out whatever the
        // commit left in the buffer.
        writer
            .execute_batch("PRAGMA wal_autocheckpoint = 0")
            .unwrap();
        insert_blobs(&writer, 1, 10, 100);
        // Act: a transaction beyond the writer's 4 MiB cache, so SQLite spills pages into the
        // WAL before the commit, then writes some of them again: at the commit it rewrites
        // the frame headers from the first page written again on (new checksums), the commit
        // frame's last.
        writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        for id in 11..1511_i64 {
            writer
                .execute(
                    "INSERT INTO b (id, v) VALUES (?1, ?2)",
                    rusqlite::params![id, vec![7_u8; 4000]],
                )
                .unwrap();
        }
        writer
            .execute(
                "UPDATE b SET v = zeroblob(100) WHERE id <= 10 OR id % 100 = 0",
                [],
            )
            .unwrap();
        writer.execute_batch("COMMIT").unwrap();
        // What a crash right now would leave on disk: the files as the kernel has them.
        let copy = tempfile::tempdir().unwrap();
        for name in ["wal.db", "wal.db-wal"] {
            std::fs::copy(dir.path().join(name), copy.path().join(name)).unwrap();
        }
        // Assert: recovery (which checks every frame's checksum) keeps the whole commit.
        let recovered = Connection::open(copy.path().join("wal.db")).unwrap();
        assert_eq!(count_and_sum(&recovered), (1510, 25 * 100 + 1485 * 4000));
        let zeroed: i64 = recovered
            .query_row("SELECT count(*) FROM b WHERE v = zeroblob(100)", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(zeroed, 25);
    }

    #[test]
    fn a_transaction_larger_than_the_buffer_commits_whole_and_intact() {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let writer = writer_with_table(&dir);
        // Act: 12 MiB in one transaction (three times the buffer; SQLite also spills pages of
        // its 4 MiB cache into the WAL before the commit, and reads them back), then one more.
        insert_blobs(&writer, 1, 3000, 4000);
        insert_blobs(&writer, 3001, 10, 100);
        // Assert: every row, on the writer and on a reader, and a sound database.
        assert_eq!(count_and_sum(&writer), (3010, 3000 * 4000 + 10 * 100));
        let reader = open_connection(&dir.path().join("wal.db"), true).unwrap();
        assert_eq!(count_and_sum(&reader), (3010, 3000 * 4000 + 10 * 100));
        let check: String = reader
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }
}
