//! Temporary and lock files removed when a signal (SIGINT, SIGTERM, SIGHUP) ends the process, so that a run
//! stopped with Ctrl-C or by `strata launch` leaves nothing of strata's beside its outputs. (SIGKILL cannot
//! be caught: a lock file left by it is harmless, the next run takes it over.)
//!
//! The handler may only make async-signal-safe calls: it walks a fixed table of C strings and `unlink`s each,
//! then restores the default action and raises the signal again, so the process ends as it would have.
//! A registration's string is never freed (a few dozen bytes per output file written): freeing it could race
//! with a handler reading it on another thread.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, Ordering};
use std::sync::Once;

/// Paths registered at once at most; a path beyond is simply not cleaned up on a signal.
const PATHS_MAX: usize = 64;
const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

static PATHS: [AtomicPtr<libc::c_char>; PATHS_MAX] =
    [const { AtomicPtr::new(null_mut()) }; PATHS_MAX];
static INSTALL: Once = Once::new();

/// A path removed if a signal ends the process, until this is dropped.
#[derive(Debug)]
pub struct Registration(Option<usize>);

impl Registration {
    /// Nothing registered.
    pub fn none() -> Registration {
        Registration(None)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(slot) = self.0 {
            PATHS[slot].store(null_mut(), Ordering::SeqCst);
        }
    }
}

/// Registers `path` (a file, or a directory emptied of registered files) for removal on a
/// signal (no effect unless [`install`] was called).
pub fn register(path: &Path) -> Registration {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return Registration(None);
    };
    let raw = c.into_raw();
    for (slot, entry) in PATHS.iter().enumerate() {
        if entry
            .compare_exchange(null_mut(), raw, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Registration(Some(slot));
        }
    }
    // SAFETY: `raw` came from `into_raw` above and was stored nowhere.
    drop(unsafe { CString::from_raw(raw) });
    Registration(None)
}

/// The signal that asked a run that saves checkpoints to stop (see [`stop_gracefully`]); 0: none.
static STOP: AtomicI32 = AtomicI32::new(0);
/// Whether the first SIGINT/SIGTERM only asks the run to stop.
static GRACEFUL: AtomicBool = AtomicBool::new(false);

/// From now on the first SIGINT or SIGTERM only sets [`stop_signal`] (the run saves a
/// checkpoint and ends); a second one ends the process at once, as before.
pub fn stop_gracefully() {
    install();
    GRACEFUL.store(true, Ordering::SeqCst);
}

/// The signal (SIGINT or SIGTERM) that asked the run to stop, if one did.
pub fn stop_signal() -> Option<i32> {
    Some(STOP.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

extern "C" fn on_signal(signal: libc::c_int) {
    // Atomics are async-signal-safe.
    if signal != libc::SIGHUP
        && GRACEFUL.load(Ordering::SeqCst)
        && STOP
            .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    {
        return;
    }
    // Files first, then directories (emptied by the first pass).
    for remove in [libc::unlink, libc::rmdir] {
        for entry in &PATHS {
            let path = entry.load(Ordering::SeqCst);
            if !path.is_null() {
                // SAFETY: a NUL-terminated string from `register`, never freed; unlink and
                // rmdir are async-signal-safe (each fails harmlessly on the other kind).
                unsafe { remove(path) };
            }
        }
    }
    // SAFETY: signal and raise are async-signal-safe; the default action then ends the process.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP (once; a signal already ignored stays ignored).
pub fn install() {
    INSTALL.call_once(|| {
        for signal in SIGNALS {
            // SAFETY: querying and setting a signal disposition; the handler only makes async-signal-safe calls.
            unsafe {
                let previous = libc::signal(signal, on_signal as *const () as libc::sighandler_t);
                if previous == libc::SIG_IGN {
                    libc::signal(signal, libc::SIG_IGN);
                }
            }
        }
    });
}
