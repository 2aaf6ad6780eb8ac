//! The `shm` backend: ranks on one host share one memory segment in /dev/shm.
//!
//! Layout: a header page (per-rank arrival counters and pids, a futex word, the culprit word),
//! then `SETS` sets of `world` slots of `slot_bytes`. Successive chunks of the collectives rotate
//! through the sets, and every chunk's reads of a set end before the reader arrives at the second
//! barrier after the one that published it; so a set is rewritten only once every rank has passed
//! a barrier that follows its last read of that set, and one barrier per chunk suffices.
//!
//! Reductions step through at most `REDUCE_STEP_BYTES_MAX` (reduce_scatter:
//! `SCATTER_STEP_BYTES_MAX`) of each slot: small steps keep a step's slots in cache between the
//! copy in, the reduction and the copy out, so memory traffic is close to one read and one write
//! of the caller's buffer. Copies (all_gather, broadcast) use whole slots: fewer barriers, and a
//! copy reads its source only once anyway.
//!
//! What a rank writes into its slots for the reductions goes in with plain or streaming stores,
//! whichever rank 0's timing of recent calls found faster (see `publish`: which one wins depends
//! on whether the ranks' cores share a cache).
//!
//! Waiters spin briefly when every rank can have a core of its own; otherwise they yield a few
//! times (handing the core to a rank that still works) and then sleep on a futex (spinning on an
//! oversubscribed host starves the rank being waited for).

mod publish;
mod segment;

use std::ffi::CString;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::comm::Communicator;
use crate::elem::{sum_into_raw, DType};
use crate::error::{CommError, Result};
use crate::store::StoreClient;
use crate::stream::Stores;
use crate::Backend;

use crate::choose::{Chooser, Reduction, CHOSEN_MIN_BYTES};
use segment::{futex_wait, futex_wake_all, header_bytes, pid_alive, Segment, MAGIC, PAGE};
/// Spins before sleeping on the futex, when every rank can have a core.
const SPINS_MAX: u32 = 2000;
/// Yields before sleeping on the futex, when ranks outnumber cores.
const YIELDS_MAX: u32 = 8;
/// Slot sets the chunks rotate through (three let all_reduce overlap one chunk's gather with the
/// next chunk's reduction under a single barrier).
const SETS: usize = 3;
/// Largest step of all_reduce, in bytes of one slot (a step's `world` slots stay in cache).
const REDUCE_STEP_BYTES_MAX: usize = 256 << 10;
/// Largest step of reduce_scatter, in bytes of one slot. A step moves less per barrier than an
/// all_reduce step (each rank sums `1/world` of it and copies nothing out), so it takes a larger
/// one. Against 256 KiB, 64 MiB at 4 ranks, alternating call by call in one job: +10% (2.50 -> 2.75
/// GB/s busbw, cores sharing a cache) and +15% (2.32 -> 2.68, not), at 2 ranks +2-4%; 1 MiB was no
/// better. In separate `strata-bench` runs, alternating with the old binary (medians of 10 pairs):
/// +5% (2.81 vs 2.68) sharing a cache, +4-9% not. all_reduce was no different.
const SCATTER_STEP_BYTES_MAX: usize = 512 << 10;
/// Longest futex sleep between checks of the deadline and of peer liveness.
const SLEEP_SLICE: Duration = Duration::from_millis(5);
/// How often a waiter checks whether the ranks it waits for are still alive.
const LIVENESS_EVERY: Duration = Duration::from_millis(50);
/// Granule of the per-rank portions of an all_reduce chunk, in bytes.
const PORTION_GRANULE: usize = 64;

struct OpState {
    epoch: u64,
    set: usize,
    /// Rank 0 only: its timings of the reductions, which choose their stores.
    choosers: [Chooser<Stores>; 2],
}

/// One rank's view of the shared segment.
pub(crate) struct ShmComm {
    rank: usize,
    world: usize,
    timeout: Duration,
    slot_bytes: usize,
    /// Bytes of each slot one all_reduce step uses: min(slot_bytes, REDUCE_STEP_BYTES_MAX).
    reduce_step_bytes: usize,
    /// Bytes of each slot one reduce_scatter step uses: min(slot_bytes, SCATTER_STEP_BYTES_MAX).
    scatter_step_bytes: usize,
    /// Spins before sleeping at a barrier: SPINS_MAX, or 0 when ranks outnumber cores.
    spins_max: u32,
    /// Yields before sleeping at a barrier: 0, or YIELDS_MAX when ranks outnumber cores.
    yields_max: u32,
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
        let len = header_bytes(world) + SETS * world * slot_bytes;
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
        let (spins_max, yields_max) = if world <= cores {
            (SPINS_MAX, 0)
        } else {
            (0, YIELDS_MAX)
        };
        Ok(Self {
            rank,
            world,
            timeout,
            slot_bytes,
            reduce_step_bytes: REDUCE_STEP_BYTES_MAX.min(slot_bytes),
            scatter_step_bytes: SCATTER_STEP_BYTES_MAX.min(slot_bytes),
            spins_max,
            yields_max,
            segment,
            state: Mutex::new(OpState {
                epoch: 0,
                set: 0,
                choosers: [publish::chooser(), publish::chooser()],
            }),
            pids,
            _store: store,
        })
    }

    fn slot(&self, set: usize, rank: usize) -> *mut u8 {
        debug_assert!(set < SETS && rank < self.world);
        // SAFETY: header_bytes + (set * world + rank + 1) * slot_bytes <= len by construction.
        unsafe {
            self.segment
                .base
                .add(header_bytes(self.world) + (set * self.world + rank) * self.slot_bytes)
        }
    }

    /// Whether some rank has not yet arrived at barrier `epoch`; the lowest such rank.
    fn missing_at(&self, epoch: u64) -> Option<usize> {
        (0..self.world).find(|&r| {
            self.segment
                .rank_line(r)
                .arrived_epoch
                .load(Ordering::SeqCst)
                < epoch
        })
    }

    /// Arrives at barrier `epoch` and waits until every rank has; names the missing or dead rank.
    ///
    /// Only the arrival that completes the barrier wakes sleepers (one wake per barrier instead of
    /// one per arrival). Every arrival stores its epoch before checking the others' (SeqCst), so
    /// at least one of any simultaneous last arrivals sees the barrier complete.
    fn barrier_at(&self, epoch: u64, op: &'static str) -> Result<()> {
        let h = self.segment.header();
        self.segment
            .rank_line(self.rank)
            .arrived_epoch
            .store(epoch, Ordering::SeqCst);
        if self.missing_at(epoch).is_none() {
            h.futex.fetch_add(1, Ordering::SeqCst);
            if h.sleepers.load(Ordering::SeqCst) > 0 {
                futex_wake_all(&h.futex);
            }
            return Ok(());
        }
        let start = Instant::now();
        let mut last_liveness = start;
        let mut spins = 0u32;
        let mut yields = 0u32;
        loop {
            let seen = h.futex.load(Ordering::SeqCst);
            let Some(missing) = self.missing_at(epoch) else {
                return Ok(());
            };
            if spins < self.spins_max {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            if yields < self.yields_max {
                yields += 1;
                std::thread::yield_now();
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

    /// The stores this rank publishes with in a call of `op`: rank 0's latest choice.
    fn stores_for(&self, op: Reduction) -> Stores {
        publish::decode(self.segment.header().stores[op as usize].load(Ordering::Relaxed))
    }

    /// On rank 0, for calls long enough to time: records the time from the call's first barrier
    /// to its end and publishes the stores for the next call of `op`.
    fn record_call(
        &self,
        st: &mut OpState,
        op: Reduction,
        used: Stores,
        bytes: usize,
        since: Option<Instant>,
    ) {
        let Some(since) = since else { return };
        if self.rank != 0 || bytes < CHOSEN_MIN_BYTES {
            return;
        }
        let next = st.choosers[op as usize].record(used, bytes, since.elapsed());
        self.segment.header().stores[op as usize].store(publish::encode(next), Ordering::Relaxed);
    }
}

impl OpState {
    /// The slot set for the next chunk.
    fn next_set(&mut self) -> usize {
        self.set = (self.set + 1) % SETS;
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
        let chunk_max = (self.scatter_step_bytes / self.world / elem).max(1) * elem;
        let mut srcs = vec![std::ptr::null::<u8>(); self.world];
        let stores = self.stores_for(Reduction::ReduceScatter);
        let mut timed_since = None;
        let mut off = 0;
        while off < m {
            let len = chunk_max.min(m - off);
            let set = st.next_set();
            // Our own portion is read from `send` below, not staged.
            for j in (0..self.world).filter(|&j| j != self.rank) {
                // SAFETY: see all_gather; j * len + len <= world * chunk_max <= slot_bytes.
                unsafe {
                    stores.copy(
                        send[j * m + off..].as_ptr(),
                        self.slot(set, self.rank).add(j * len),
                        len,
                    )
                };
            }
            self.barrier_at(st.next_epoch(), "reduce_scatter")?;
            timed_since.get_or_insert_with(Instant::now);
            for (j, src) in srcs.iter_mut().enumerate() {
                *src = if j == self.rank {
                    send[self.rank * m + off..].as_ptr()
                } else {
                    // SAFETY: rank * len + len <= slot_bytes.
                    unsafe { self.slot(set, j).add(self.rank * len) }
                };
            }
            // SAFETY: slots of `set` are read-only until the next barrier; `send` is the caller's
            // and `recv` our own buffer, which overlap neither each other nor the segment.
            unsafe {
                sum_into_raw(
                    dtype,
                    &srcs,
                    recv[off..off + len].as_mut_ptr(),
                    len,
                    Stores::Plain,
                )
            };
            off += len;
        }
        let bytes = send.len();
        self.record_call(
            &mut st,
            Reduction::ReduceScatter,
            stores,
            bytes,
            timed_since,
        );
        Ok(())
    }

    /// Pipelined over chunks of one slot: step k copies chunk k's portions that others reduce
    /// into this rank's slot, passes one barrier, copies the reduced chunk k - 1 out of every
    /// rank's slot, and reduces this rank's portion of chunk k into its slot (its own input
    /// portion is read from `buf`, not staged).
    fn all_reduce_bytes(&self, dtype: DType, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut st = self.lock_state();
        let elem = dtype.size_bytes();
        let granule = PORTION_GRANULE.max(elem);
        let chunk_max = self.reduce_step_bytes / granule * granule;
        let chunks = buf.len().div_ceil(chunk_max);
        let mut srcs = vec![std::ptr::null::<u8>(); self.world];
        let stores = self.stores_for(Reduction::AllReduce);
        let mut timed_since = None;
        // (set, offset in buf, length) of the chunk reduced in the previous step.
        let mut reduced: Option<(usize, usize, usize)> = None;
        for k in 0..=chunks {
            let current = (k < chunks).then(|| {
                let off = k * chunk_max;
                (st.next_set(), off, chunk_max.min(buf.len() - off))
            });
            if let Some((set, off, len)) = current {
                for j in (0..self.world).filter(|&j| j != self.rank) {
                    let part = portion(len, self.world, j, granule);
                    // SAFETY: our own slot of `set` is only read by others after the barrier
                    // below, and no rank still reads it (see the module comment); part.end <= len
                    // <= slot_bytes.
                    unsafe {
                        stores.copy(
                            buf[off + part.start..].as_ptr(),
                            self.slot(set, self.rank).add(part.start),
                            part.len(),
                        )
                    };
                }
            }
            self.barrier_at(st.next_epoch(), "all_reduce")?;
            timed_since.get_or_insert_with(Instant::now);
            if let Some((set, off, len)) = reduced {
                for j in 0..self.world {
                    let part = portion(len, self.world, j, granule);
                    // SAFETY: rank j wrote its reduced portion before arriving at the barrier
                    // above, and nobody writes slots of `set` again before everyone has passed
                    // the next barrier.
                    unsafe {
                        copy(
                            self.slot(set, j).add(part.start),
                            buf[off + part.start..].as_mut_ptr(),
                            part.len(),
                        )
                    };
                }
            }
            if let Some((set, off, len)) = current {
                let mine = portion(len, self.world, self.rank, granule);
                for (j, src) in srcs.iter_mut().enumerate() {
                    *src = if j == self.rank {
                        buf[off + mine.start..].as_ptr()
                    } else {
                        // SAFETY: mine.end <= len <= slot_bytes.
                        unsafe { self.slot(set, j).add(mine.start) }
                    };
                }
                // SAFETY: until the next barrier only this rank touches portion `mine` of any
                // slot of `set` (others read it only after that barrier); the sources are
                // published slots and our own buffer, none of which overlaps the destination.
                unsafe {
                    sum_into_raw(
                        dtype,
                        &srcs,
                        self.slot(set, self.rank).add(mine.start),
                        mine.len(),
                        stores,
                    )
                };
            }
            reduced = current;
        }
        let bytes = buf.len();
        self.record_call(&mut st, Reduction::AllReduce, stores, bytes, timed_since);
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
