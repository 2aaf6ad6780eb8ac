//! The shared segment: its header (per-rank lines, futex word, culprit), mapping and unlinking.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64};
use std::time::Duration;

use crate::error::{CommError, Result};

pub(super) const MAGIC: u64 = 0x5354_5241_5441_5348; // "STRATASH"
pub(super) const PAGE: usize = 4096;
/// Header line per rank (two cache lines, against adjacent-line prefetch).
const RANK_LINE: usize = 128;

#[repr(C)]
pub(super) struct Header {
    pub(super) magic: AtomicU64,
    pub(super) world: AtomicU64,
    pub(super) slot_bytes: AtomicU64,
    /// Bumped by every arrival; waiters sleep on it.
    pub(super) futex: AtomicU32,
    /// Waiters currently asleep (arrivals only wake when > 0).
    pub(super) sleepers: AtomicU32,
    /// 0, or 1 + the rank that a rank found dead or timed out on; lets every rank name the culprit.
    pub(super) culprit: AtomicU64,
    /// 1 = gone, 2 = timed out.
    pub(super) culprit_kind: AtomicU64,
    /// Rank 0's choice of stores for the next all_reduce and reduce_scatter (see `publish`).
    pub(super) stores: [AtomicU32; 2],
}

// The rank lines start at byte 256.
const _: () = assert!(std::mem::size_of::<Header>() <= 256);

#[repr(C)]
pub(super) struct RankLine {
    pub(super) arrived_epoch: AtomicU64,
    pub(super) pid: AtomicI32,
}

/// A mapped segment. Unmaps on drop; the creator unlinks the name if nobody did yet.
pub(super) struct Segment {
    pub(super) base: *mut u8,
    pub(super) len: usize,
    pub(super) path: Option<CString>,
}

// SAFETY: the mapping is plain shared memory; all cross-process coordination goes through the
// atomics in the header and the barrier protocol documented above.
unsafe impl Send for Segment {}
// SAFETY: as above; `&Segment` only hands out atomics and raw pointers.
unsafe impl Sync for Segment {}

impl Segment {
    pub(super) fn open(path: &CString, len: usize, create: bool, rank: usize) -> Result<Self> {
        let shm_err = |what: &str| CommError::Shm {
            rank,
            what: format!("{what} {path:?}"),
            source: std::io::Error::last_os_error(),
        };
        let flags = libc::O_RDWR
            | libc::O_CLOEXEC
            | if create {
                libc::O_CREAT | libc::O_EXCL
            } else {
                0
            };
        // SAFETY: `path` is a valid NUL-terminated string; open has no other preconditions.
        let fd = unsafe { libc::open(path.as_ptr(), flags, 0o600 as libc::c_uint) };
        if fd < 0 {
            return Err(shm_err("open"));
        }
        // SAFETY: `fd` was just returned by open and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path_owned = create.then(|| path.clone());
        let unlink_on_error = |err: CommError| {
            if let Some(p) = &path_owned {
                // SAFETY: `p` is a valid NUL-terminated path.
                unsafe { libc::unlink(p.as_ptr()) };
            }
            err
        };
        let size = libc::off_t::try_from(len).map_err(|_| {
            unlink_on_error(CommError::InvalidArgument {
                op: "shm",
                detail: format!("segment of {len} bytes"),
            })
        })?;
        if create {
            // SAFETY: `fd` is an open, writable file descriptor.
            if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
                return Err(unlink_on_error(shm_err("ftruncate")));
            }
        } else {
            // SAFETY: `stat` is plain old data, fully written by fstat on success.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: `fd` is open and `st` is a valid out-pointer.
            if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
                return Err(shm_err("fstat"));
            }
            if st.st_size != size {
                return Err(CommError::Shm {
                    rank,
                    what: format!("segment {path:?} has {} bytes, expected {len}", st.st_size),
                    source: std::io::Error::from(std::io::ErrorKind::InvalidData),
                });
            }
        }
        // SAFETY: mapping a file we opened read-write; the kernel picks the address. Populated
        // up front, so the first collectives do not pay the page faults (and rank 0's timing of
        // them, see `publish`, is not skewed by them).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(unlink_on_error(shm_err("mmap")));
        }
        Ok(Self {
            base: base.cast(),
            len,
            path: path_owned,
        })
    }

    pub(super) fn unlink(&mut self) {
        if let Some(p) = self.path.take() {
            // SAFETY: `p` is a valid NUL-terminated path.
            unsafe { libc::unlink(p.as_ptr()) };
        }
    }

    pub(super) fn header(&self) -> &Header {
        // SAFETY: the mapping is page-aligned, at least one page long, zero-filled at creation
        // (a valid bit pattern for atomics), and lives as long as `self`.
        unsafe { &*self.base.cast::<Header>() }
    }

    pub(super) fn rank_line(&self, rank: usize) -> &RankLine {
        // SAFETY: `header_bytes(world)` reserves a RANK_LINE per rank after the first 256 bytes;
        // callers pass rank < world; alignment is 128; zero is a valid bit pattern.
        unsafe { &*self.base.add(256 + rank * RANK_LINE).cast::<RankLine>() }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.unlink();
        // SAFETY: `base`/`len` are exactly the mapping made in `open`; nothing borrows it past
        // the communicator's lifetime.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

pub(super) fn header_bytes(world: usize) -> usize {
    (256 + world * RANK_LINE).div_ceil(PAGE) * PAGE
}

/// Whether process `pid` is alive (not gone and not a zombie).
pub(super) fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.trim_start().chars().next());
            !matches!(state, Some('Z' | 'X') | None)
        }
        Err(_) => false,
    }
}

pub(super) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` points into a live MAP_SHARED mapping (hence no FUTEX_PRIVATE_FLAG); the
    // kernel only reads it; `ts` is a valid relative timeout. Spurious returns are handled by callers.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

pub(super) fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: as in `futex_wait`; waking has no memory effects.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}
