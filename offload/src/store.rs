//! Swap store: tensor key -> blocks striped over one file per path; space reused across steps.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::{align_up, AioConfig, PATHS_MAX};
use crate::engine::{EngineKind, IoEngine, Segment};
use crate::error::{OffloadError, Result};
use crate::files::{SwapFile, SwapFiles};
use crate::op::{BlockCheck, Dir, IoHandle, OpState};
use crate::pool::{HostBuf, HostPool};

/// Where one block of a key lives: slot `slot` (of `block_size` bytes) of file `file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlockLoc {
    file: usize,
    slot: u64,
}

/// One block of a key on disk, for diagnostics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
}

struct Record {
    len: usize,
    blocks: Vec<BlockLoc>,
    crcs: Option<Vec<u32>>,
    last_write: Option<Arc<OpState>>,
    /// Operations (reads and the last write) that may still touch `blocks`.
    pending: Vec<Arc<OpState>>,
}

struct FileSpace {
    free: BTreeSet<u64>,
    slots_total: u64,
}

struct StoreState {
    records: HashMap<String, Record>,
    space: Vec<FileSpace>,
    /// Blocks of removed or rewritten keys, freed once the operations on them have completed.
    deferred: Vec<(Vec<BlockLoc>, Vec<Arc<OpState>>)>,
    next_stripe: usize,
}

/// Tensor swap space on one or more paths (one per drive), with per-operation handles.
pub struct SwapStore {
    engine: IoEngine,
    files: Arc<SwapFiles>,
    state: Mutex<StoreState>,
    cfg: AioConfig,
}

impl SwapStore {
    /// Open (creating or reusing) one swap file per path. Buffers come from any pool, unregistered.
    pub fn open(paths: &[PathBuf], cfg: AioConfig) -> Result<SwapStore> {
        Self::open_inner(paths, cfg, None)
    }

    /// As `open`, registering `pool`'s slabs with io_uring as fixed buffers.
    pub fn open_with_pool(paths: &[PathBuf], cfg: AioConfig, pool: &HostPool) -> Result<SwapStore> {
        Self::open_inner(paths, cfg, Some(pool))
    }

    fn open_inner(paths: &[PathBuf], cfg: AioConfig, pool: Option<&HostPool>) -> Result<SwapStore> {
        cfg.validate()?;
        if paths.is_empty() || paths.len() > PATHS_MAX {
            return Err(OffloadError::Config {
                key: "aio.nvme_path",
                message: format!("{} paths given; need 1..={PATHS_MAX}", paths.len()),
            });
        }
        let bs = cfg.block_size as u64;
        let mut files = Vec::with_capacity(paths.len());
        let mut space = Vec::with_capacity(paths.len());
        for dir in paths {
            let file = SwapFile::open(dir, &cfg)?;
            let mut len = file.len()?;
            if len % bs != 0 {
                len = len / bs * bs;
                file.set_len(len)?;
            }
            let prealloc = cfg.prealloc_bytes.div_ceil(bs) * bs;
            if cfg.file_bytes_max != 0 && prealloc > cfg.file_bytes_max {
                return Err(OffloadError::Config {
                    key: "aio.prealloc_bytes",
                    message: format!(
                        "{prealloc} exceeds aio.file_bytes_max {}",
                        cfg.file_bytes_max
                    ),
                });
            }
            if prealloc > len {
                file.fallocate("", len, prealloc - len)?;
                len = prealloc;
            }
            let slots_total = len / bs;
            space.push(FileSpace {
                free: (0..slots_total).collect(),
                slots_total,
            });
            files.push(file);
        }
        let files = Arc::new(SwapFiles::new(files));
        let engine = IoEngine::new(files.clone(), pool, &cfg)?;
        Ok(SwapStore {
            engine,
            files,
            state: Mutex::new(StoreState {
                records: HashMap::new(),
                space,
                deferred: Vec::new(),
                next_stripe: 0,
            }),
            cfg,
        })
    }

    fn lock(&self) -> MutexGuard<'_, StoreState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn engine_kind(&self) -> EngineKind {
        self.engine.kind()
    }

    /// Whether all swap files use O_DIRECT (false after the buffered fallback).
    pub fn direct(&self) -> bool {
        self.engine.direct()
    }

    pub fn fixed_buffers(&self) -> bool {
        self.engine.fixed_buffers()
    }

    pub fn file_paths(&self) -> Vec<PathBuf> {
        self.files.paths()
    }

    /// Write `buf.len()` bytes under `key` (replacing any earlier value). The buffer travels with
    /// the operation and comes back from `IoHandle::wait`.
    pub fn write(&self, key: &str, mut buf: HostBuf) -> Result<IoHandle> {
        let len = buf.len();
        let padded = align_up(len);
        // Zero the tail up to the 4 KiB boundary: the padding reaches disk, so make it deterministic.
        buf.capacity_slice_mut()[len..padded].fill(0);
        let bs = self.cfg.block_size;
        let nblocks = padded.div_ceil(bs);
        let crcs = self.cfg.checksums.then(|| {
            let bytes = buf.capacity_slice_mut();
            (0..nblocks)
                .map(|i| crc32c::crc32c(&bytes[i * bs..((i + 1) * bs).min(padded)]))
                .collect::<Vec<u32>>()
        });
        let mut st = self.lock();
        reclaim_deferred(&mut st);
        let reuse = st.records.get_mut(key).and_then(|rec| {
            rec.pending.retain(|op| !op.is_done());
            (rec.blocks.len() == nblocks && rec.pending.is_empty()).then(|| rec.blocks.clone())
        });
        let blocks = match reuse {
            Some(blocks) => blocks,
            None => {
                let blocks = self.allocate(&mut st, key, nblocks)?;
                if let Some(old) = st.records.remove(key) {
                    st.deferred.push((old.blocks, old.pending));
                }
                blocks
            }
        };
        let segments = self.segments(&blocks, padded);
        let handle = self
            .engine
            .submit(key, Dir::Write, buf, &segments, Vec::new(), len);
        let handle = match handle {
            Ok(h) => h,
            Err(e) => {
                free_blocks(&mut st, &blocks);
                return Err(e);
            }
        };
        let op = handle_op(&handle);
        st.records.insert(
            key.to_string(),
            Record {
                len,
                blocks,
                crcs,
                last_write: Some(op.clone()),
                pending: vec![op],
            },
        );
        Ok(handle)
    }

    /// Read `key` into `buf` (capacity at least the key's length rounded up to 4 KiB). Waits for
    /// an earlier write of the same key to complete first (up to `key_wait_timeout`).
    pub fn read(&self, key: &str, buf: HostBuf) -> Result<IoHandle> {
        let last_write = {
            let st = self.lock();
            let rec = st
                .records
                .get(key)
                .ok_or_else(|| OffloadError::NotFound { key: key.into() })?;
            rec.last_write.clone()
        };
        if let Some(op) = &last_write {
            if !op.wait_done(self.cfg.key_wait_timeout) {
                return Err(OffloadError::Timeout {
                    what: format!("earlier write of key {key:?}"),
                    timeout: self.cfg.key_wait_timeout,
                });
            }
            if op.failed() {
                return Err(OffloadError::LastWriteFailed { key: key.into() });
            }
        }
        let mut st = self.lock();
        let rec = st
            .records
            .get_mut(key)
            .ok_or_else(|| OffloadError::NotFound { key: key.into() })?;
        let padded = align_up(rec.len);
        if buf.capacity() < padded {
            return Err(OffloadError::BufferTooSmall {
                key: key.into(),
                needed: padded,
                capacity: buf.capacity(),
            });
        }
        let segments = self.segments(&rec.blocks, padded);
        let checks = match &rec.crcs {
            Some(crcs) => segments
                .iter()
                .zip(crcs)
                .map(|(s, &crc)| BlockCheck {
                    buf_offset: s.buf_offset,
                    len: s.len,
                    crc,
                    file: s.file,
                    file_offset: s.file_offset,
                })
                .collect(),
            None => Vec::new(),
        };
        let handle = self
            .engine
            .submit(key, Dir::Read, buf, &segments, checks, rec.len)?;
        rec.pending.retain(|op| !op.is_done());
        rec.pending.push(handle_op(&handle));
        Ok(handle)
    }

    /// Forget `key`; its space is reused once operations still touching it have completed.
    pub fn remove(&self, key: &str) -> Result<()> {
        let mut st = self.lock();
        let rec = st
            .records
            .remove(key)
            .ok_or_else(|| OffloadError::NotFound { key: key.into() })?;
        st.deferred.push((rec.blocks, rec.pending));
        reclaim_deferred(&mut st);
        Ok(())
    }

    /// The blocks of `key` on disk, in order.
    pub fn extents(&self, key: &str) -> Result<Vec<Extent>> {
        let st = self.lock();
        let rec = st
            .records
            .get(key)
            .ok_or_else(|| OffloadError::NotFound { key: key.into() })?;
        Ok(self
            .segments(&rec.blocks, align_up(rec.len))
            .iter()
            .map(|s| Extent {
                path: self.files.path(s.file).to_path_buf(),
                offset: s.file_offset,
                len: s.len as u64,
            })
            .collect())
    }

    /// fdatasync every swap file.
    pub fn sync(&self) -> Result<()> {
        self.files.sync()
    }

    /// For buffered (non-O_DIRECT) files: write back and drop their page cache so reads hit the disk.
    pub fn drop_cache(&self) -> Result<()> {
        self.files.drop_cache()
    }

    fn segments(&self, blocks: &[BlockLoc], padded: usize) -> Vec<Segment> {
        let bs = self.cfg.block_size;
        blocks
            .iter()
            .enumerate()
            .map(|(i, b)| Segment {
                file: b.file,
                file_offset: b.slot * bs as u64,
                buf_offset: i * bs,
                len: bs.min(padded - i * bs),
            })
            .collect()
    }

    /// Take `n` free blocks, striped round-robin over the files from a rotating start, growing a
    /// file (fallocate) when it has none free. On failure nothing stays allocated.
    fn allocate(&self, st: &mut StoreState, key: &str, n: usize) -> Result<Vec<BlockLoc>> {
        let files_n = self.files.len();
        let first = st.next_stripe;
        st.next_stripe = (st.next_stripe + 1) % files_n;
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let file = (first + i) % files_n;
            match self.take_slot(st, key, file) {
                Ok(slot) => blocks.push(BlockLoc { file, slot }),
                Err(e) => {
                    free_blocks(st, &blocks);
                    return Err(e);
                }
            }
        }
        Ok(blocks)
    }

    fn take_slot(&self, st: &mut StoreState, key: &str, file: usize) -> Result<u64> {
        if let Some(slot) = st.space[file].free.pop_first() {
            return Ok(slot);
        }
        let bs = self.cfg.block_size as u64;
        let space = &mut st.space[file];
        let mut grow = self.cfg.grow_blocks();
        if self.cfg.file_bytes_max != 0 {
            let slots_max = self.cfg.file_bytes_max / bs;
            grow = grow.min(slots_max.saturating_sub(space.slots_total));
            if grow == 0 {
                return Err(OffloadError::SwapFull {
                    path: self.files.path(file).to_path_buf(),
                    bytes_max: self.cfg.file_bytes_max,
                });
            }
        }
        let swap = self.files.get(file);
        let offset = space.slots_total * bs;
        if let Err(e) = swap.fallocate(key, offset, grow * bs) {
            // Try a single block before giving up: a nearly full disk may still hold it.
            if grow == 1 {
                return Err(e);
            }
            swap.fallocate(key, offset, bs)?;
            grow = 1;
        }
        space
            .free
            .extend(space.slots_total + 1..space.slots_total + grow);
        let slot = space.slots_total;
        space.slots_total += grow;
        Ok(slot)
    }
}

fn handle_op(handle: &IoHandle) -> Arc<OpState> {
    handle.op_state()
}

fn free_blocks(st: &mut StoreState, blocks: &[BlockLoc]) {
    for b in blocks {
        st.space[b.file].free.insert(b.slot);
    }
}

fn reclaim_deferred(st: &mut StoreState) {
    let mut i = 0;
    while i < st.deferred.len() {
        if st.deferred[i].1.iter().all(|op| op.is_done()) {
            let (blocks, _) = st.deferred.swap_remove(i);
            free_blocks(st, &blocks);
        } else {
            i += 1;
        }
    }
}

impl Drop for SwapStore {
    fn drop(&mut self) {
        // The engine's Drop (run after this body) drains in-flight I/O before the files close.
        if self.cfg.remove_on_close {
            for path in self.files.paths() {
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!("could not remove swap file {}: {e}", path.display());
                }
            }
        }
    }
}

impl std::fmt::Debug for SwapStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwapStore")
            .field("paths", &self.files.paths())
            .field("engine", &self.engine.kind())
            .field("direct", &self.engine.direct())
            .finish()
    }
}
