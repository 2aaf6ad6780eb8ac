//! System facts checked against the host budget before the first step, and once-only warnings.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::error::{OffloadError, Result};

/// Print `message` as one warning line the first time `reason` is seen in this process.
pub(crate) fn warn_once(reason: &'static str, message: &str) {
    static SEEN: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let first = match SEEN.lock() {
        Ok(mut seen) => seen.get_or_insert_with(HashSet::new).insert(reason),
        Err(_) => true,
    };
    if first {
        // One line: through tracing when the program set up a subscriber, else on stderr.
        if tracing::dispatcher::has_been_set() {
            tracing::warn!("{message}");
        } else {
            eprintln!("strata-offload warning: {message}");
        }
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Soft RLIMIT_MEMLOCK in bytes; `None` means unlimited.
pub fn memlock_limit_bytes() -> Result<Option<u64>> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit struct we own; no other memory is touched.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc != 0 {
        return Err(OffloadError::Os {
            what: "getrlimit(RLIMIT_MEMLOCK)".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(if lim.rlim_cur == libc::RLIM_INFINITY {
        None
    } else {
        Some(lim.rlim_cur)
    })
}

/// Whether this process holds CAP_IPC_LOCK (which lifts RLIMIT_MEMLOCK).
pub fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    let Ok(text) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Pure rule behind [`check_host_budget`]: does `bytes` of locked memory fit `limit` (None = unlimited)?
pub fn check_memlock(bytes: u64, limit: Option<u64>, cap_ipc_lock: bool) -> Result<()> {
    match limit {
        Some(limit) if !cap_ipc_lock && bytes > limit => Err(OffloadError::Budget {
            what: "pinned host pool exceeds RLIMIT_MEMLOCK",
            needed: bytes,
            available: limit,
            fix: "raise the locked-memory limit (`ulimit -l unlimited` in the launching shell, \
                  `LimitMEMLOCK=infinity` in a systemd unit, `--ulimit memlock=-1` for docker, \
                  `* - memlock unlimited` in /etc/security/limits.conf), or lower the pool budget \
                  (pinned_bytes / offload buffer counts)"
                .into(),
        }),
        _ => Ok(()),
    }
}

/// Check that a host pool of `bytes` fits free memory and, when it is to be locked
/// (mlock, io_uring fixed buffers, cuMemHostRegister), RLIMIT_MEMLOCK.
pub fn check_host_budget(bytes: u64, locked: bool) -> Result<()> {
    if let Some(available) = mem_available_bytes() {
        if bytes > available {
            return Err(OffloadError::Budget {
                what: "host pool exceeds MemAvailable",
                needed: bytes,
                available,
                fix: "lower the host pool budget (fewer or smaller offload buffers, a smaller \
                      prefetch budget), move more state to NVMe, or free memory on this host"
                    .into(),
            });
        }
    }
    if locked {
        check_memlock(bytes, memlock_limit_bytes()?, has_cap_ipc_lock())?;
    }
    Ok(())
}
