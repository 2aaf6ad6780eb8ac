//! The `shm` backend: ranks on one host share one memory segment in /dev/shm.
//!
//! Layout: a header page (per-rank arrival counters and pids, a futex word, the culprit word),
//! then two sets of `world` slots of `slot_bytes`. Each chunk of a collective alternates sets, so
//! one barrier per phase suffices: a slot set is rewritten only after every rank has passed a
//! barrier that follows its last read of that set.
//!
//! Waiters spin briefly when every rank can have a core of its own, and otherwise sleep on a futex
//! at once (spinning on an oversubscribed host starves the rank being waited for).

mod segment;

use std::ffi::CString;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::comm::Communicator;
use crate::elem::{sum_into_raw, DType};
use crate::error::{CommError, Result};
use crate::store::StoreClient;
use crate::Backend;

use segment::{futex_wait, futex_wake_all, header_bytes, pid_alive, Segment, MAGIC, PAGE};
/// Spins before sleeping on the futex.
const SPINS_MAX: u32 = 2000;
/// Longest futex sleep between checks of the deadline and of peer liveness.
const SLEEP_SLICE: Duration = Duration::from_millis(5);
/// How often a waiter checks whether the ranks it waits for are still alive.
const LIVENESS_EVERY: Duration = Duration::from_millis(50);
/// Granule of the per-rank portions of an all_reduce chunk, in bytes.
const PORTION_GRANULE: usize = 64;

struct OpState {
    epoch: u64,
    set: usize,
}

/// One rank's view of the shared segment.
pub(crate) struct ShmComm {
    rank: usize,
    world: usize,
    timeout: Duration,
    slot_bytes: usize,
    /// Spins before sleeping at a barrier: SPINS_MAX, or 0 when ranks outnumber cores.
    spins_max: u32,
    segment: Segment,
    state: Mutex<OpState>,
    pids: Vec<i32>,
    /// Kept open: its closing tells rank 0's store this rank is gone.
    _store: Arc<StoreClient>,
}

impl ShmComm {
    /// Rank 0 creates the segment and publishes its name; everyone maps it, records its pid, and
    /// rank 0 unlinks the name once all have mapped it.
    pub(crate) fn new(
        store: Arc<StoreClient>,
        rank: usize,
        world: usize,
        timeout: Duration,
        slot_bytes: usize,
    ) -> Result<Self> {
        let slot_bytes = slot_bytes.max(PAGE).div_ceil(PAGE) * PAGE;
        let len = header_bytes(world) + 2 * world * slot_bytes;
        let mut segment = if rank == 0 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let name = format!("/dev/shm/strata-{}-{nanos}", std::process::id());
            let path = CString::new(name).map_err(|e| CommError::InvalidArgument {
                op: "shm",
                detail: e.to_string(),
            })?;
            let segment = Segment::open(&path, len, true, rank)?;
            let h = segment.header();
            h.world.store(world as u64, Ordering::Relaxed);
            h.slot_bytes.store(slot_bytes as u64, Ordering::Relaxed);
            h.magic.store(MAGIC, Ordering::Release);
            store.set("shm/path", path.as_bytes())?;
            segment
        } else {
            let path = store.wait_get("shm/path", 0)?;
            let path = CString::new(path).map_err(|e| CommError::InvalidArgument {
                op: "shm",
                detail: e.to_string(),
            })?;
            Segment::open(&path, len, false, rank)?
        };
        let h = segment.header();
        if h.magic.load(Ordering::Acquire) != MAGIC
            || h.world.load(Ordering::Relaxed) != world as u64
            || h.slot_bytes.load(Ordering::Relaxed) != slot_bytes as u64
        {
            return Err(CommError::Shm {
                rank,
                what: "segment header does not match this job (world size or dist.shm_slot_bytes differ between ranks?)".into(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidData),
            });
        }
        let pid = std::process::id() as i32;
        segment.rank_line(rank).pid.store(pid, Ordering::Release);
        let pids = store.all_gather("shm/mapped", world, &pid.to_le_bytes())?;
        let pids = pids
            .iter()
            .map(|p| {
                <[u8; 4]>::try_from(p.as_slice())
                    .map(i32::from_le_bytes)
                    .unwrap_or(0)
            })
            .collect();
        segment.unlink();
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let spins_max = if world <= cores { SPINS_MAX } else { 0 };
        Ok(Self {
            rank,
            world,
            timeout,
            slot_bytes,
            spins_max,
            segment,
            state: Mutex::new(OpState { epoch: 0, set: 0 }),
            pids,
            _store: store,
        })
    }

    fn slot(&self, set: usize, rank: usize) -> *mut u8 {
        debug_assert!(set < 2 && rank < self.world);
        // SAFETY: header_bytes + (set * world + rank + 1) * slot_bytes <= len by construction.
        unsafe {
            self.segment
                .base
                .add(header_bytes(self.world) + (set * self.world + rank) * self.slot_bytes)
        }
    }

    /// Arrives at barrier `epoch` and waits until every rank has; names the missing or dead rank.
    fn barrier_at(&self, epoch: u64, op: &'static str) -> Result<()> {
        let h = self.segment.header();
        self.segment
            .rank_line(self.rank)
            .arrived_epoch
            .store(epoch, Ordering::SeqCst);
        h.futex.fetch_add(1, Ordering::SeqCst);
        if h.sleepers.load(Ordering::SeqCst) > 0 {
            futex_wake_all(&h.futex);
        }
        let start = Instant::now();
        let mut last_liveness = start;
        let mut spins = 0u32;
        loop {
            let seen = h.futex.load(Ordering::SeqCst);
            let missing = (0..self.world).find(|&r| {
                self.segment
                    .rank_line(r)
                    .arrived_epoch
                    .load(Ordering::Acquire)
                    < epoch
            });
            let Some(missing) = missing else {
                return Ok(());
            };
            if spins < self.spins_max {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            if let Some(err) = self.culprit_error(op) {
                return Err(err);
            }
            let now = Instant::now();
            if now.duration_since(last_liveness) >= LIVENESS_EVERY {
                last_liveness = now;
                for r in (0..self.world).filter(|&r| {
                    self.segment
                        .rank_line(r)
                        .arrived_epoch
                        .load(Ordering::Acquire)
                        < epoch
                }) {
                    if !pid_alive(self.pids[r]) {
                        self.blame(r, 1);
                        return Err(self
                            .culprit_error(op)
                            .unwrap_or_else(|| self.gone(r, op, "process exited".into())));
                    }
                }
            }
            if now.duration_since(start) >= self.timeout {
                self.blame(missing, 2);
                return Err(CommError::Timeout {
                    rank: self.rank,
                    peer: missing,
                    op,
                    timeout: self.timeout,
                });
            }
            h.sleepers.fetch_add(1, Ordering::SeqCst);
            futex_wait(&h.futex, seen, SLEEP_SLICE);
            h.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn gone(&self, peer: usize, op: &'static str, detail: String) -> CommError {
        CommError::PeerGone {
            rank: self.rank,
            peer,
            op,
            detail,
        }
    }

    /// Records the first rank found dead (kind 1) or timed out on (kind 2), for the others to name.
    fn blame(&self, peer: usize, kind: u64) {
        let h = self.segment.header();
        if h.culprit
            .compare_exchange(0, peer as u64 + 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            h.culprit_kind.store(kind, Ordering::SeqCst);
            h.futex.fetch_add(1, Ordering::SeqCst);
            futex_wake_all(&h.futex);
        }
    }

    fn culprit_error(&self, op: &'static str) -> Option<CommError> {
        let h = self.segment.header();
        let culprit = h.culprit.load(Ordering::SeqCst);
        let peer = usize::try_from(culprit.checked_sub(1)?).ok()?;
        Some(match h.culprit_kind.load(Ordering::SeqCst) {
            2 => CommError::Timeout {
                rank: self.rank,
                peer,
                op,
                timeout: self.timeout,
            },
            _ => self.gone(
                peer,
                op,
                format!(
                    "process {} exited",
                    self.pids.get(peer).copied().unwrap_or(0)
                ),
            ),
        })
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, OpState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl OpState {
    /// The slot set for the next chunk.
    fn next_set(&mut self) -> usize {
        self.set ^= 1;
        self.set
    }
    fn next_epoch(&mut self) -> u64 {
        self.epoch += 1;
        self.epoch
    }
}

/// Bytes of portion `j` of `n` of a `len`-byte chunk, split in `granule`-byte units.
fn portion(len: usize, n: usize, j: usize, granule: usize) -> std::ops::Range<usize> {
    let units = len.div_ceil(granule);
    let (per, rem) = (units / n, units % n);
    let at = |k: usize| ((k * per + k.min(rem)) * granule).min(len);
    at(j)..at(j + 1)
}

/// Copies `len` bytes between non-overlapping regions.
///
/// # Safety
/// Both pointers valid for `len` bytes, not overlapping, and not written by anyone else meanwhile.
unsafe fn copy(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: forwarded from the caller.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) }
}

impl Communicator for ShmComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn backend(&self) -> Backend {
        Backend::Shm
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_gather_bytes(&self, _dtype: DType, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let mut st = self.lock_state();
        let per_rank = send.len();
        let mut off = 0;
        while off < per_rank {
            let len = self.slot_bytes.min(per_rank - off);
            let set = st.next_set();
            // SAFETY: our own slot of `set` is only read by others after the barrier below, and no
            // rank still reads it (it passed a barrier after its last read of this set).
            unsafe { copy(send[off..].as_ptr(), self.slot(set, self.rank), len) };
            self.barrier_at(st.next_epoch(), "all_gather")?;
            for j in 0..self.world {
                let dst = &mut recv[j * per_rank + off..j * per_rank + off + len];
                // SAFETY: after the barrier no rank writes slots of `set` until everyone passed the next one.
                unsafe { copy(self.slot(set, j), dst.as_mut_ptr(), len) };
            }
            off += len;
        }
        Ok(())
    }

    fn reduce_scatter_bytes(&self, dtype: DType, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let mut st = self.lock_state();
        let m = recv.len();
        let elem = dtype.size_bytes();
        let chunk_max = (self.slot_bytes / self.world / elem).max(1) * elem;
        let mut srcs = vec![std::ptr::null::<u8>(); self.world];
        let mut off = 0;
        while off < m {
            let len = chunk_max.min(m - off);
            let set = st.next_set();
            for j in 0..self.world {
                // SAFETY: see all_gather; j * len + len <= world * chunk_max <= slot_bytes.
                unsafe {
                    copy(
                        send[j * m + off..].as_ptr(),
                        self.slot(set, self.rank).add(j * len),
                        len,
                    )
                };
            }
            self.barrier_at(st.next_epoch(), "reduce_scatter")?;
            for (j, src) in srcs.iter_mut().enumerate() {
                // SAFETY: rank * len + len <= slot_bytes.
                *src = unsafe { self.slot(set, j).add(self.rank * len) };
            }
            // SAFETY: slots of `set` are read-only until the next barrier; `recv` is our own buffer.
            unsafe { sum_into_raw(dtype, &srcs, recv[off..off + len].as_mut_ptr(), len) };
            off += len;
        }
        Ok(())
    }

    fn all_reduce_bytes(&self, dtype: DType, buf: &mut [u8]) -> Result<()> {
        let mut st = self.lock_state();
        let elem = dtype.size_bytes();
        let granule = PORTION_GRANULE.max(elem);
        let chunk_max = self.slot_bytes / granule * granule;
        let mut srcs = vec![std::ptr::null::<u8>(); self.world];
        let mut off = 0;
        while off < buf.len() {
            let len = chunk_max.min(buf.len() - off);
            let set = st.next_set();
            // SAFETY: as in all_gather.
            unsafe { copy(buf[off..].as_ptr(), self.slot(set, self.rank), len) };
            self.barrier_at(st.next_epoch(), "all_reduce")?;
            let mine = portion(len, self.world, self.rank, granule);
            for (j, src) in srcs.iter_mut().enumerate() {
                // SAFETY: mine.end <= len <= slot_bytes.
                *src = unsafe { self.slot(set, j).add(mine.start) };
            }
            // SAFETY: between the two barriers only this rank touches portion `mine` of any slot
            // of `set`; the destination (our slot's portion) is one of the sources, which
            // sum_into_raw allows.
            unsafe {
                sum_into_raw(
                    dtype,
                    &srcs,
                    self.slot(set, self.rank).add(mine.start),
                    mine.len(),
                )
            };
            self.barrier_at(st.next_epoch(), "all_reduce")?;
            for j in 0..self.world {
                let part = portion(len, self.world, j, granule);
                // SAFETY: after the second barrier the reduced portions are read-only until
                // everyone passes a later barrier.
                unsafe {
                    copy(
                        self.slot(set, j).add(part.start),
                        buf[off + part.start..].as_mut_ptr(),
                        part.len(),
                    )
                };
            }
            off += len;
        }
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        let mut st = self.lock_state();
        let mut off = 0;
        while off < buf.len() {
            let len = self.slot_bytes.min(buf.len() - off);
            let set = st.next_set();
            if self.rank == root {
                // SAFETY: as in all_gather.
                unsafe { copy(buf[off..].as_ptr(), self.slot(set, root), len) };
            }
            self.barrier_at(st.next_epoch(), "broadcast")?;
            if self.rank != root {
                // SAFETY: as in all_gather.
                unsafe { copy(self.slot(set, root), buf[off..].as_mut_ptr(), len) };
            }
            off += len;
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let mut st = self.lock_state();
        self.barrier_at(st.next_epoch(), "barrier")
    }

    fn as_dyn(&self) -> &dyn Communicator {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::portion;

    #[test]
    fn portions_tile_the_chunk() {
        for (len, n) in [(0, 3), (64, 4), (1000, 3), (4096, 4), (100, 1)] {
            let parts: Vec<_> = (0..n).map(|j| portion(len, n, j, 64)).collect();
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts[n - 1].end, len);
            assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
        }
    }
}
