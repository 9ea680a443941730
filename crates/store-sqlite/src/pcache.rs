//! SQLite's own page cache, with one page number kept out of it: the lock page's, which a B-tree
//! split borrows for a moment to swap two pages.
//!
//! The default page cache (pcache1) remembers the largest page number it ever held, and at every
//! commit drops the pages past the end of the database. When that largest number is the lock
//! page's (1 GiB / page size, far past the end of our databases), the drop walks every slot of
//! the cache's hash table instead of a few. A login's random keys split pages often, so that walk
//! came after most of the writer's commits: 4% of its time with its 4 MiB cache, a quarter with
//! 32 MiB, and taking it away gave `acl-confirm` 15% more logins. This wrapper hands pcache1 key
//! 0 (never a page: pages count from 1) whenever SQLite uses the lock page's number, so the
//! largest key stays a real page's. Every other call is pcache1's, unchanged.
//!
//! A page cache can only be chosen before SQLite's first use in the process (`sqlite3_config`),
//! so every connection of this crate is opened after [`install`].

use std::ffi::{c_int, c_uint};
use std::sync::OnceLock;

use rusqlite::ffi;

/// Where SQLite's lock page starts (`PENDING_BYTE`, not changed by SQLite outside its tests).
const PENDING_BYTE: u32 = 0x4000_0000;

/// pcache1's methods, as SQLite reported them before ours went in.
struct Pcache1(ffi::sqlite3_pcache_methods2);

// SAFETY: the methods are plain C functions and a pointer SQLite passes back to them unchanged;
// pcache1 does its own locking.
unsafe impl Send for Pcache1 {}
// SAFETY: as above.
unsafe impl Sync for Pcache1 {}

static DEFAULT: OnceLock<Pcache1> = OnceLock::new();

/// Installs the wrapper, which works only before SQLite's first use in the process. Answers
/// whether it is in place (now or from an earlier call). `sqlite3_config` must not run beside
/// any other SQLite call: callers of this crate wait on the `OnceLock`, and otpgate uses SQLite
/// through this crate only.
pub(crate) fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let mut default = std::mem::MaybeUninit::<ffi::sqlite3_pcache_methods2>::zeroed();
        // SAFETY: SQLITE_CONFIG_GETPCACHE2 writes the current methods to the struct it is given;
        // both calls fail harmlessly (SQLITE_MISUSE) once SQLite is initialised.
        unsafe {
            if ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETPCACHE2, default.as_mut_ptr())
                != ffi::SQLITE_OK
            {
                return false;
            }
            let default = default.assume_init();
            if default.xFetch.is_none() || DEFAULT.set(Pcache1(default)).is_err() {
                return false;
            }
            let ours = ffi::sqlite3_pcache_methods2 {
                iVersion: 1,
                pArg: default.pArg,
                xInit: default.xInit,
                xShutdown: default.xShutdown,
                xCreate: Some(create),
                xCachesize: Some(cachesize),
                xPagecount: Some(pagecount),
                xFetch: Some(fetch),
                xUnpin: Some(unpin),
                xRekey: Some(rekey),
                xTruncate: Some(truncate),
                xDestroy: Some(destroy),
                xShrink: Some(shrink),
            };
            // SQLite copies the struct.
            ffi::sqlite3_config(ffi::SQLITE_CONFIG_PCACHE2, &ours) == ffi::SQLITE_OK
        }
    })
}

/// One cache: pcache1's, and the lock page's number at its page size.
struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    lock_page: c_uint,
}

impl Cache {
    fn key(&self, page: c_uint) -> c_uint {
        let key = if page == self.lock_page { 0 } else { page };
        #[cfg(test)]
        tests::LARGEST_KEY.fetch_max(key, std::sync::atomic::Ordering::Relaxed);
        key
    }
}

/// pcache1's methods; always there once ours are called (`install` sets them first), and
/// an `Option` only so that no path of these C callbacks can panic.
fn default() -> Option<&'static ffi::sqlite3_pcache_methods2> {
    DEFAULT.get().map(|Pcache1(methods)| methods)
}

/// # Safety
/// `cache` must come from [`create`] and not be destroyed.
unsafe fn cache<'a>(cache: *mut ffi::sqlite3_pcache) -> &'a Cache {
    // SAFETY: the caller's contract.
    unsafe { &*cache.cast::<Cache>() }
}

unsafe extern "C" fn create(
    page_size: c_int,
    extra: c_int,
    purgeable: c_int,
) -> *mut ffi::sqlite3_pcache {
    let Some(create) = default().and_then(|d| d.xCreate) else {
        return std::ptr::null_mut();
    };
    // SAFETY: pcache1's own method with SQLite's arguments.
    let inner = unsafe { create(page_size, extra, purgeable) };
    if inner.is_null() {
        return inner;
    }
    let lock_page = u32::try_from(page_size)
        .ok()
        .filter(|&size| size > 0)
        .map_or(0, |size| PENDING_BYTE / size + 1);
    Box::into_raw(Box::new(Cache { inner, lock_page })).cast()
}

unsafe extern "C" fn cachesize(c: *mut ffi::sqlite3_pcache, pages: c_int) {
    // SAFETY: `c` is one of ours (SQLite's contract); pcache1's method on its own cache.
    if let Some(m) = default().and_then(|d| d.xCachesize) {
        unsafe { m(cache(c).inner, pages) }
    }
}

unsafe extern "C" fn pagecount(c: *mut ffi::sqlite3_pcache) -> c_int {
    // SAFETY: as in `cachesize`.
    match default().and_then(|d| d.xPagecount) {
        Some(m) => unsafe { m(cache(c).inner) },
        None => 0,
    }
}

unsafe extern "C" fn fetch(
    c: *mut ffi::sqlite3_pcache,
    key: c_uint,
    create: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    // SAFETY: as in `cachesize`.
    let c = unsafe { cache(c) };
    match default().and_then(|d| d.xFetch) {
        Some(m) => unsafe { m(c.inner, c.key(key), create) },
        None => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn unpin(
    c: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    discard: c_int,
) {
    // SAFETY: as in `cachesize`.
    if let Some(m) = default().and_then(|d| d.xUnpin) {
        unsafe { m(cache(c).inner, page, discard) }
    }
}

unsafe extern "C" fn rekey(
    c: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    // SAFETY: as in `cachesize`.
    let c = unsafe { cache(c) };
    if let Some(m) = default().and_then(|d| d.xRekey) {
        unsafe { m(c.inner, page, c.key(old), c.key(new)) }
    }
}

unsafe extern "C" fn truncate(c: *mut ffi::sqlite3_pcache, limit: c_uint) {
    // SAFETY: as in `cachesize`.
    if let Some(m) = default().and_then(|d| d.xTruncate) {
        unsafe { m(cache(c).inner, limit) }
    }
}

unsafe extern "C" fn destroy(c: *mut ffi::sqlite3_pcache) {
    // SAFETY: `c` came from `create` (Box::into_raw) and SQLite destroys it once.
    let c = unsafe { Box::from_raw(c.cast::<Cache>()) };
    if let Some(m) = default().and_then(|d| d.xDestroy) {
        unsafe { m(c.inner) }
    }
}

unsafe extern "C" fn shrink(c: *mut ffi::sqlite3_pcache) {
    // SAFETY: as in `cachesize`.
    if let Some(m) = default().and_then(|d| d.xShrink) {
        unsafe { m(cache(c).inner) }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use crate::open_connection;

    /// The largest page number any cache of this process handed to pcache1.
    pub(super) static LARGEST_KEY: AtomicU32 = AtomicU32::new(0);

    #[test]
    fn splits_that_swap_pages_never_hand_the_lock_page_to_pcache1() {
        // Arrange: keys at random places of an index, so its pages split and get reordered.
        assert!(
            super::install(),
            "the wrapper must be in before SQLite's first use"
        );
        let dir = tempfile::tempdir().unwrap();
        let conn = open_connection(&dir.path().join("split.db"), false).unwrap();
        conn.execute_batch("CREATE TABLE k (h BLOB PRIMARY KEY, n INTEGER NOT NULL)")
            .unwrap();
        // Act
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        conn.execute_batch("BEGIN").unwrap();
        for n in 0..20_000_i64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            conn.execute(
                "INSERT INTO k (h, n) VALUES (?1, ?2)",
                rusqlite::params![x.to_be_bytes().repeat(4), n],
            )
            .unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
        // Assert: every row is there in a sound file, and no cache ever held a page past the
        // database's end (the lock page's number is far past it: 262,145 at 4 KiB pages).
        let (rows, pages, page_size): (i64, i64, i64) = conn
            .query_row(
                "SELECT (SELECT count(*) FROM k), (SELECT page_count FROM pragma_page_count), \
                 (SELECT page_size FROM pragma_page_size)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(rows, 20_000);
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let largest = i64::from(LARGEST_KEY.load(Ordering::Relaxed));
        let lock_page = i64::from(super::PENDING_BYTE) / page_size + 1;
        assert!(pages < lock_page / 2);
        assert!(
            largest < lock_page,
            "pcache1 was handed page {largest} ({pages} pages in the file)"
        );
    }
}
