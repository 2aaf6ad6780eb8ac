//! The I/O engine: io_uring rings, or a pread/pwrite thread pool where io_uring cannot be set up.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{AioConfig, BackendKind};
use crate::error::{OffloadError, Result};
use crate::files::SwapFiles;
use crate::op::{Block, BlockCheck, Dir, IoHandle, OpState};
use crate::pool::{HostBuf, HostPool};
use crate::sys::warn_once;
use crate::uring;

/// Threads in the fallback pool, at most.
pub const FALLBACK_THREADS_MAX: usize = 64;

const RING_SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// One contiguous piece of an operation: `len` bytes at `buf_offset` in the buffer and `file_offset` in `file`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment {
    pub file: usize,
    pub file_offset: u64,
    pub buf_offset: usize,
    pub len: usize,
}

struct Worker {
    thread: Option<JoinHandle<()>>,
    /// Disconnects when the thread exits (in a Mutex only so that the engine is Sync).
    exited: Mutex<Receiver<()>>,
}

struct FallbackQueue {
    blocks: Mutex<(VecDeque<Block>, bool)>,
    ready: Condvar,
}

enum Backend {
    Uring { senders: Vec<Sender<Vec<Block>>> },
    Threads { queue: Arc<FallbackQueue> },
}

/// Which mechanism runs the I/O, for logs and benchmark headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Uring,
    Threads,
}

/// Runs block I/O for a set of swap files. Thread-safe; dropping it drains all in-flight I/O.
pub struct IoEngine {
    backend: Backend,
    workers: Vec<Worker>,
    files: Arc<SwapFiles>,
    fixed_pool: Option<u64>,
    next_ring: AtomicUsize,
    drain_timeout: Duration,
}

impl IoEngine {
    pub(crate) fn new(
        files: Arc<SwapFiles>,
        pool: Option<&HostPool>,
        cfg: &AioConfig,
    ) -> Result<IoEngine> {
        match cfg.backend {
            BackendKind::Threads => Ok(Self::threads(files, cfg)),
            BackendKind::Uring => {
                Self::uring(files, pool, cfg).map_err(|source| OffloadError::Os {
                    what: "io_uring setup".into(),
                    source,
                })
            }
            BackendKind::Auto => match Self::uring(files.clone(), pool, cfg) {
                Ok(engine) => Ok(engine),
                Err(e) => {
                    warn_once(
                        "io_uring",
                        &format!(
                            "io_uring unavailable (io_uring_setup: {e}; seccomp/container policy, kernel.io_uring_disabled or an old kernel?); using a pread/pwrite thread pool"
                        ),
                    );
                    Ok(Self::threads(files, cfg))
                }
            },
        }
    }

    fn uring(
        files: Arc<SwapFiles>,
        pool: Option<&HostPool>,
        cfg: &AioConfig,
    ) -> io::Result<IoEngine> {
        let entries = cfg.queue_depth.next_power_of_two() as u32;
        let pool_inner = pool.map(HostPool::inner);
        let mut senders = Vec::with_capacity(cfg.rings);
        let mut workers = Vec::with_capacity(cfg.rings);
        let mut fixed_buffers = true;
        for i in 0..cfg.rings {
            // Each ring is created on its own thread: with SINGLE_ISSUER only the creator may submit.
            let (tx, rx) = mpsc::channel();
            let (exit_tx, exited) = mpsc::channel::<()>();
            let (setup_tx, setup_rx) = mpsc::channel::<io::Result<bool>>();
            let (files, pool, qd, register) = (
                files.clone(),
                pool_inner.clone(),
                cfg.queue_depth,
                cfg.register,
            );
            let thread = std::thread::Builder::new()
                .name(format!("strata-uring-{i}"))
                .spawn(move || {
                    let _exit = exit_tx;
                    match uring::setup(entries, &files, pool.as_deref(), register) {
                        Ok(setup) => {
                            // The engine may have given up waiting; the ring then just drains.
                            let _ = setup_tx.send(Ok(setup.fixed_buffers));
                            uring::ring_loop(setup, rx, files, pool, qd);
                        }
                        Err(e) => {
                            let _ = setup_tx.send(Err(e));
                        }
                    }
                })?;
            let worker = Worker {
                thread: Some(thread),
                exited: Mutex::new(exited),
            };
            let setup = setup_rx
                .recv_timeout(RING_SETUP_TIMEOUT)
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "io_uring setup timed out",
                    ))
                });
            match setup {
                Ok(fixed) => fixed_buffers &= fixed,
                Err(e) => {
                    // Rings already started see their channels close and exit.
                    drop(senders);
                    drop(tx);
                    return Err(e);
                }
            }
            senders.push(tx);
            workers.push(worker);
        }
        if pool.is_some() && cfg.register && !fixed_buffers {
            warn_once(
                "fixed_buffers",
                "io_uring could not register the host pool as fixed buffers (RLIMIT_MEMLOCK?); using unregistered buffers",
            );
        }
        Ok(IoEngine {
            backend: Backend::Uring { senders },
            workers,
            files,
            fixed_pool: pool.filter(|_| fixed_buffers).map(HostPool::id),
            next_ring: AtomicUsize::new(0),
            drain_timeout: cfg.drain_timeout,
        })
    }

    fn threads(files: Arc<SwapFiles>, cfg: &AioConfig) -> IoEngine {
        let queue = Arc::new(FallbackQueue {
            blocks: Mutex::new((VecDeque::new(), false)),
            ready: Condvar::new(),
        });
        let mut workers = Vec::new();
        for i in 0..cfg.queue_depth.clamp(1, FALLBACK_THREADS_MAX) {
            let (exit_tx, exited) = mpsc::channel::<()>();
            let (queue, files) = (queue.clone(), files.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("strata-pio-{i}"))
                .spawn(move || {
                    let _exit = exit_tx;
                    fallback_worker(&queue, &files);
                });
            match spawned {
                Ok(thread) => workers.push(Worker {
                    thread: Some(thread),
                    exited: Mutex::new(exited),
                }),
                // Fewer threads still work; at least one was needed and is checked at submit.
                Err(e) => tracing::warn!("could not start an I/O thread: {e}"),
            }
        }
        IoEngine {
            backend: Backend::Threads { queue },
            workers,
            files,
            fixed_pool: None,
            next_ring: AtomicUsize::new(0),
            drain_timeout: cfg.drain_timeout,
        }
    }

    pub fn kind(&self) -> EngineKind {
        match self.backend {
            Backend::Uring { .. } => EngineKind::Uring,
            Backend::Threads { .. } => EngineKind::Threads,
        }
    }

    /// Whether every swap file is open with O_DIRECT.
    pub fn direct(&self) -> bool {
        self.files.all_direct()
    }

    /// Whether host pool buffers go to the kernel as registered (fixed) buffers.
    pub fn fixed_buffers(&self) -> bool {
        self.fixed_pool.is_some()
    }

    /// Start an operation over `segments` of `buf`. Segments must lie inside `buf`'s capacity and be
    /// 4 KiB-aligned in length and offsets (the store guarantees it).
    pub(crate) fn submit(
        &self,
        key: &str,
        dir: Dir,
        mut buf: HostBuf,
        segments: &[Segment],
        checks: Vec<BlockCheck>,
        payload_len: usize,
    ) -> Result<IoHandle> {
        if self.workers.is_empty() {
            return Err(OffloadError::EngineStopped {
                key: key.to_string(),
            });
        }
        let fixed = (self.fixed_pool == Some(buf.pool_id()))
            .then(|| u16::try_from(buf.slab_index()).ok())
            .flatten();
        let base = buf.as_mut_ptr();
        let op = OpState::new(key.to_string(), dir, buf, segments.len());
        let blocks = segments.iter().map(|s| Block {
            op: op.clone(),
            file: s.file,
            file_offset: s.file_offset,
            // SAFETY: the segment lies inside the buffer's capacity (checked by the store).
            ptr: unsafe { base.add(s.buf_offset) },
            len: s.len,
            done: 0,
            fixed,
        });
        match &self.backend {
            Backend::Uring { senders } => {
                let rings = senders.len();
                let first = self.next_ring.fetch_add(1, Ordering::Relaxed);
                let mut per_ring: Vec<Vec<Block>> = (0..rings).map(|_| Vec::new()).collect();
                for (i, block) in blocks.enumerate() {
                    per_ring[(first + i) % rings].push(block);
                }
                for (tx, batch) in senders.iter().zip(per_ring) {
                    if batch.is_empty() {
                        continue;
                    }
                    if let Err(mpsc::SendError(batch)) = tx.send(batch) {
                        for block in batch {
                            block.op.block_done(Err(OffloadError::EngineStopped {
                                key: key.to_string(),
                            }));
                        }
                    }
                }
            }
            Backend::Threads { queue } => {
                let mut guard = queue.blocks.lock().unwrap_or_else(|p| p.into_inner());
                guard.0.extend(blocks);
                drop(guard);
                queue.ready.notify_all();
            }
        }
        Ok(IoHandle::new(op, self.files.clone(), checks, payload_len))
    }
}

fn fallback_worker(queue: &FallbackQueue, files: &SwapFiles) {
    loop {
        let block = {
            let mut guard = queue.blocks.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(block) = guard.0.pop_front() {
                    break Some(block);
                }
                if guard.1 {
                    break None;
                }
                guard = match queue.ready.wait_timeout(guard, Duration::from_millis(200)) {
                    Ok((g, _)) => g,
                    Err(p) => p.into_inner().0,
                };
            }
        };
        let Some(mut block) = block else {
            return;
        };
        let result = positional_io(&mut block, files);
        block.op.block_done(result);
    }
}

/// pread/pwrite until the block is complete, retrying EINTR/EAGAIN and partial transfers.
fn positional_io(block: &mut Block, files: &SwapFiles) -> Result<()> {
    let fd = files.fd(block.file);
    loop {
        let (ptr, offset, len) = block.rest();
        let Ok(off) = i64::try_from(offset) else {
            return Err(block.io_error(files, io::Error::from_raw_os_error(libc::EFBIG)));
        };
        let n = match block.op.dir {
            // SAFETY: ptr..ptr+len is the untransferred part of this block's buffer range, owned by
            // block.op and touched by no one else until the block completes.
            Dir::Read => unsafe { libc::pread(fd, ptr.cast(), len, off) },
            // SAFETY: as above; the kernel only reads the range.
            Dir::Write => unsafe { libc::pwrite(fd, ptr.cast(), len, off) },
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                _ => return Err(block.io_error(files, e)),
            }
        }
        if n == 0 {
            return Err(block.short_error(files));
        }
        if block.advance(n as usize) {
            return Ok(());
        }
    }
}

impl Drop for IoEngine {
    /// Close the queues, let the threads finish every queued and in-flight block, then join them.
    /// A thread that does not finish within `drain_timeout` is detached with its blocks (and so
    /// their buffers) alive: memory the kernel may still write is never freed.
    fn drop(&mut self) {
        match &mut self.backend {
            Backend::Uring { senders } => senders.clear(),
            Backend::Threads { queue } => {
                queue.blocks.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
                queue.ready.notify_all();
            }
        }
        let deadline = Instant::now() + self.drain_timeout;
        for worker in &mut self.workers {
            let left = deadline.saturating_duration_since(Instant::now());
            let exited = worker.exited.get_mut().unwrap_or_else(|p| p.into_inner());
            match exited.recv_timeout(left) {
                Err(RecvTimeoutError::Disconnected) | Ok(()) => {
                    if let Some(thread) = worker.thread.take() {
                        if thread.join().is_err() {
                            tracing::error!("an I/O thread panicked");
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    tracing::error!(
                        "I/O thread did not drain within {:?}; detaching it (its buffers stay allocated)",
                        self.drain_timeout
                    );
                    worker.thread.take();
                }
            }
        }
    }
}
