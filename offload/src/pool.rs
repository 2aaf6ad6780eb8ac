//! Host buffer pool: 4 KiB-aligned buffers carved from a few large mappings made at start-up.
//!
//! The pool never allocates after `HostPool::new`: exhausting it waits (with a timeout) or errors.
//! Its slabs can be page-locked (`mlock`), registered as io_uring fixed buffers, and handed to a
//! [`Registrar`] (the CUDA backend's `cuMemHostRegister`).

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::{align_up, ALIGN};
use crate::error::{OffloadError, Result};
use crate::sys;

/// A hook that page-locks or registers host memory with another subsystem (e.g. `cuMemHostRegister`).
/// `register` is called once per slab; `unregister` before the slab is unmapped.
pub trait Registrar: Send + Sync {
    fn name(&self) -> &str;
    fn register(&self, ptr: *mut u8, len: usize) -> std::result::Result<(), String>;
    fn unregister(&self, ptr: *mut u8, len: usize);
}

/// What `HostPool::alloc` does when no free run is large enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExhausted {
    /// Wait for buffers to come back, up to this long, then fail with `PoolExhausted`.
    Wait(Duration),
    /// Fail at once with `PoolExhausted`.
    Error,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The whole pool, in bytes (rounded up to 4 KiB per slab).
    pub bytes_total: usize,
    /// Largest slab (and so largest buffer). At most 1 GiB, io_uring's limit for one fixed buffer.
    pub slab_bytes_max: usize,
    /// `mlock` the slabs at start-up.
    pub mlock: bool,
    pub on_exhausted: OnExhausted,
    /// Check free memory (and RLIMIT_MEMLOCK when locking) against `bytes_total` before mapping.
    pub check_budget: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            bytes_total: 256 << 20,
            slab_bytes_max: 256 << 20,
            mlock: false,
            on_exhausted: OnExhausted::Wait(Duration::from_secs(30)),
            check_budget: true,
        }
    }
}

pub const SLAB_BYTES_MAX: usize = 1 << 30;
pub const SLABS_MAX: usize = 4096;

struct Slab {
    ptr: NonNull<u8>,
    len: usize,
}

struct PoolState {
    /// Free runs per slab: offset -> length, coalesced.
    free: Vec<BTreeMap<usize, usize>>,
    bytes_free: usize,
    registrars: Vec<Arc<dyn Registrar>>,
}

pub(crate) struct PoolInner {
    id: u64,
    slabs: Vec<Slab>,
    state: Mutex<PoolState>,
    returned: Condvar,
    cfg: PoolConfig,
    bytes_total: usize,
}

// SAFETY: the slab pointers are owned mappings; all mutable bookkeeping sits behind `state`'s mutex,
// and the bytes themselves are only reached through `HostBuf`s, which never overlap.
unsafe impl Send for PoolInner {}
// SAFETY: see above; shared access only reads immutable fields or locks `state`.
unsafe impl Sync for PoolInner {}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn give_back(&self, slab: usize, offset: usize, len: usize) {
        let mut st = self.lock();
        let runs = &mut st.free[slab];
        let mut start = offset;
        let mut run_len = len;
        if let Some((&prev_off, &prev_len)) = runs.range(..offset).next_back() {
            if prev_off + prev_len == offset {
                runs.remove(&prev_off);
                start = prev_off;
                run_len += prev_len;
            }
        }
        if let Some(&next_len) = runs.get(&(offset + len)) {
            runs.remove(&(offset + len));
            run_len += next_len;
        }
        runs.insert(start, run_len);
        st.bytes_free += len;
        drop(st);
        self.returned.notify_all();
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        let registrars = std::mem::take(&mut self.lock().registrars);
        for slab in &self.slabs {
            for r in &registrars {
                r.unregister(slab.ptr.as_ptr(), slab.len);
            }
            // SAFETY: the slab was mapped by `map_slab` with this length; no HostBuf outlives the
            // pool (each holds an Arc to it) and registrars were told to let go above.
            let rc = unsafe { libc::munmap(slab.ptr.as_ptr().cast(), slab.len) };
            if rc != 0 {
                tracing::warn!(
                    "munmap of a host pool slab failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// A pool of 4 KiB-aligned host buffers. Cheap to clone (shared).
#[derive(Clone)]
pub struct HostPool {
    inner: Arc<PoolInner>,
}

fn map_slab(len: usize, mlock: bool) -> Result<NonNull<u8>> {
    // SAFETY: an anonymous private mapping with no address hint; the result is checked below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(OffloadError::Os {
            what: format!("mmap of a {len}-byte host pool slab"),
            source: std::io::Error::last_os_error(),
        });
    }
    let Some(nn) = NonNull::new(ptr.cast::<u8>()) else {
        return Err(OffloadError::Os {
            what: "mmap returned null".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        });
    };
    if mlock {
        // SAFETY: the range is the mapping made just above.
        if unsafe { libc::mlock(ptr, len) } != 0 {
            let source = std::io::Error::last_os_error();
            // SAFETY: unmapping the mapping made above, which nothing else refers to yet.
            unsafe { libc::munmap(ptr, len) };
            return Err(OffloadError::Budget {
                what: "mlock of the host pool failed",
                needed: len as u64,
                available: sys::memlock_limit_bytes().ok().flatten().unwrap_or(0),
                fix: format!(
                    "{source}; raise the locked-memory limit (`ulimit -l unlimited`, docker \
                     `--ulimit memlock=-1`) or set mlock = false"
                ),
            });
        }
    }
    Ok(nn)
}

impl HostPool {
    /// Map the whole pool now. Fails with an explanation when the budget does not fit free memory
    /// or, with `mlock`, RLIMIT_MEMLOCK.
    pub fn new(cfg: PoolConfig) -> Result<HostPool> {
        if cfg.slab_bytes_max < ALIGN || cfg.slab_bytes_max > SLAB_BYTES_MAX {
            return Err(OffloadError::Config {
                key: "pool.slab_bytes_max",
                message: format!(
                    "{} must be in {ALIGN}..={SLAB_BYTES_MAX}",
                    cfg.slab_bytes_max
                ),
            });
        }
        if cfg.bytes_total == 0 {
            return Err(OffloadError::Config {
                key: "pool.bytes_total",
                message: "must be > 0".into(),
            });
        }
        let slab_max = cfg.slab_bytes_max / ALIGN * ALIGN;
        let slabs_n = cfg.bytes_total.div_ceil(slab_max);
        if slabs_n > SLABS_MAX {
            return Err(OffloadError::Config {
                key: "pool.slab_bytes_max",
                message: format!("{slabs_n} slabs exceed {SLABS_MAX}; use larger slabs"),
            });
        }
        if cfg.check_budget {
            sys::check_host_budget(align_up(cfg.bytes_total) as u64, cfg.mlock)?;
        }
        let mut slabs: Vec<Slab> = Vec::with_capacity(slabs_n);
        let mut free = Vec::with_capacity(slabs_n);
        let mut left = align_up(cfg.bytes_total);
        while left > 0 {
            let len = left.min(slab_max);
            // On failure, the slabs mapped so far are unmapped here (no PoolInner owns them yet).
            let ptr = match map_slab(len, cfg.mlock) {
                Ok(p) => p,
                Err(e) => {
                    for s in &slabs {
                        // SAFETY: unmapping slabs mapped above that no buffer refers to yet.
                        unsafe { libc::munmap(s.ptr.as_ptr().cast(), s.len) };
                    }
                    return Err(e);
                }
            };
            slabs.push(Slab { ptr, len });
            free.push(BTreeMap::from([(0usize, len)]));
            left -= len;
        }
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let bytes_total = align_up(cfg.bytes_total);
        Ok(HostPool {
            inner: Arc::new(PoolInner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                slabs,
                state: Mutex::new(PoolState {
                    free,
                    bytes_free: bytes_total,
                    registrars: Vec::new(),
                }),
                returned: Condvar::new(),
                cfg,
                bytes_total,
            }),
        })
    }

    pub fn bytes_total(&self) -> usize {
        self.inner.bytes_total
    }

    pub fn bytes_free(&self) -> usize {
        self.inner.lock().bytes_free
    }

    /// The largest buffer this pool can hand out (its slab size).
    pub fn buf_bytes_max(&self) -> usize {
        self.inner.slabs.iter().map(|s| s.len).max().unwrap_or(0)
    }

    /// The slabs as (address, length); for registration with other subsystems.
    pub fn slabs(&self) -> Vec<(*mut u8, usize)> {
        self.inner
            .slabs
            .iter()
            .map(|s| (s.ptr.as_ptr(), s.len))
            .collect()
    }

    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }

    pub(crate) fn inner(&self) -> Arc<PoolInner> {
        Arc::clone(&self.inner)
    }

    /// Register every slab with `registrar` now; it is unregistered when the pool goes away.
    /// On failure, slabs already registered are unregistered again.
    pub fn add_registrar(&self, registrar: Arc<dyn Registrar>) -> Result<()> {
        for (i, slab) in self.inner.slabs.iter().enumerate() {
            if let Err(message) = registrar.register(slab.ptr.as_ptr(), slab.len) {
                for done in &self.inner.slabs[..i] {
                    registrar.unregister(done.ptr.as_ptr(), done.len);
                }
                return Err(OffloadError::Register {
                    what: format!("{} of slab {i} ({} bytes)", registrar.name(), slab.len),
                    message,
                });
            }
        }
        self.inner.lock().registrars.push(registrar);
        Ok(())
    }

    /// A buffer of `len` bytes (capacity rounded up to 4 KiB), by the pool's `on_exhausted` policy.
    pub fn alloc(&self, len: usize) -> Result<HostBuf> {
        match self.inner.cfg.on_exhausted {
            OnExhausted::Wait(timeout) => self.alloc_timeout(len, timeout),
            OnExhausted::Error => self.alloc_timeout(len, Duration::ZERO),
        }
    }

    /// A buffer of `len` bytes, waiting up to `timeout` for one to be returned.
    pub fn alloc_timeout(&self, len: usize, timeout: Duration) -> Result<HostBuf> {
        let cap = align_up(len.max(1));
        let max = self.buf_bytes_max();
        if cap > max {
            return Err(OffloadError::BufferTooLarge {
                requested: len,
                buf_bytes_max: max,
            });
        }
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.lock();
        loop {
            if let Some((slab, offset)) = first_fit(&mut st, cap) {
                st.bytes_free -= cap;
                // SAFETY: offset + cap <= slab length (first_fit only returns runs inside the slab).
                let ptr = unsafe { self.inner.slabs[slab].ptr.add(offset) };
                return Ok(HostBuf {
                    ptr,
                    len,
                    cap,
                    slab,
                    offset,
                    pool: Arc::clone(&self.inner),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                let largest_free = st
                    .free
                    .iter()
                    .flat_map(|runs| runs.values().copied())
                    .max()
                    .unwrap_or(0);
                return Err(OffloadError::PoolExhausted {
                    requested: cap,
                    bytes_free: st.bytes_free,
                    bytes_total: self.inner.bytes_total,
                    largest_free,
                });
            }
            st = match self.inner.returned.wait_timeout(st, deadline - now) {
                Ok((guard, _)) => guard,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

fn first_fit(st: &mut PoolState, cap: usize) -> Option<(usize, usize)> {
    for (slab, runs) in st.free.iter_mut().enumerate() {
        let found = runs
            .iter()
            .find(|(_, &len)| len >= cap)
            .map(|(&o, &l)| (o, l));
        if let Some((offset, run_len)) = found {
            runs.remove(&offset);
            if run_len > cap {
                runs.insert(offset + cap, run_len - cap);
            }
            return Some((slab, offset));
        }
    }
    None
}

/// A 4 KiB-aligned host buffer from a [`HostPool`]; returns itself to the pool when dropped.
/// `len` is the payload; `capacity` (a multiple of 4 KiB) is what I/O may touch.
pub struct HostBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    slab: usize,
    offset: usize,
    pool: Arc<PoolInner>,
}

// SAFETY: a HostBuf exclusively owns its byte range (runs handed out never overlap), like Vec<u8>.
unsafe impl Send for HostBuf {}
// SAFETY: &HostBuf only gives shared reads of the bytes.
unsafe impl Sync for HostBuf {}

impl HostBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Set the payload length (bytes beyond the old length keep whatever they held).
    pub fn set_len(&mut self, len: usize) -> Result<()> {
        if len > self.cap {
            return Err(OffloadError::BufferTooSmall {
                key: String::new(),
                needed: len,
                capacity: self.cap,
            });
        }
        self.len = len;
        Ok(())
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len lies inside this buffer's exclusive run (len <= cap), mapped for the
        // pool's lifetime, which the Arc in `pool` extends past ours.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The whole capacity, payload and padding.
    pub(crate) fn capacity_slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+cap is exactly this buffer's run.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }

    /// The payload as `&[T]`; `None` when `len` is not a multiple of `size_of::<T>()`.
    pub fn try_cast<T: bytemuck::Pod>(&self) -> Option<&[T]> {
        bytemuck::try_cast_slice(self.as_slice()).ok()
    }

    pub(crate) fn pool_id(&self) -> u64 {
        self.pool.id
    }

    pub(crate) fn slab_index(&self) -> usize {
        self.slab
    }
}

impl std::ops::Deref for HostBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for HostBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for HostBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuf")
            .field("len", &self.len)
            .field("capacity", &self.cap)
            .field("slab", &self.slab)
            .field("offset", &self.offset)
            .finish()
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        self.pool.give_back(self.slab, self.offset, self.cap);
    }
}

impl PoolInner {
    /// Slabs as iovecs, for io_uring buffer registration.
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        self.slabs
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.ptr.as_ptr().cast(),
                iov_len: s.len,
            })
            .collect()
    }
}
