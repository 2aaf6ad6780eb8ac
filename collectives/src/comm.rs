//! The `Communicator` trait, its typed front end, async handles and the comm queue that orders them.

use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::elem::{DType, Element};
use crate::error::{CommError, Result};
use crate::Backend;

/// A unit of work run on a communicator's comm queue, in submission order.
pub type Job = Box<dyn FnOnce(&dyn Communicator) + Send>;

/// A process group. Object-safe: the byte-level methods are the backend interface; the typed
/// methods (`all_gather::<f32>`, `all_reduce_async`, ...) are on `dyn Communicator` below.
///
/// Every rank must issue the same collectives in the same order. Sums accumulate in f32.
pub trait Communicator: Send + Sync {
    /// This process's rank in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Which backend carries the data.
    fn backend(&self) -> Backend;
    /// The bound on every wait for a peer (`dist.timeout`).
    fn timeout(&self) -> Duration;
    /// `recv = concat over ranks of send`; `recv.len() == world * send.len()`.
    fn all_gather_bytes(&self, dtype: DType, send: &[u8], recv: &mut [u8]) -> Result<()>;
    /// `recv = (sum over ranks of send)[rank * m .. (rank + 1) * m]`, `send.len() == world * m`.
    fn reduce_scatter_bytes(&self, dtype: DType, send: &[u8], recv: &mut [u8]) -> Result<()>;
    /// `buf = sum over ranks of buf`.
    fn all_reduce_bytes(&self, dtype: DType, buf: &mut [u8]) -> Result<()>;
    /// `buf = buf of rank root`.
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<()>;
    /// Runs `job` after every job submitted before it (on a comm thread for host backends).
    fn submit(&self, job: Job) -> Result<()> {
        job(self.as_dyn());
        Ok(())
    }
    /// `self` as a trait object (for `submit`'s default).
    fn as_dyn(&self) -> &dyn Communicator;
    /// The NCCL communicator, for collectives on device buffers.
    fn as_nccl(&self) -> Option<&crate::nccl::NcclCommunicator> {
        None
    }
}

/// Checks buffer lengths for a collective; programming errors of the caller become `InvalidArgument`.
pub(crate) fn check_lengths(
    op: &'static str,
    world: usize,
    dtype: DType,
    send_bytes: usize,
    recv_bytes: usize,
) -> Result<()> {
    let elem = dtype.size_bytes();
    let invalid = |detail: String| Err(CommError::InvalidArgument { op, detail });
    if send_bytes % elem != 0 || recv_bytes % elem != 0 {
        return invalid(format!(
            "byte lengths {send_bytes}/{recv_bytes} are not whole {} elements",
            dtype.name()
        ));
    }
    let (send, recv) = (send_bytes / elem, recv_bytes / elem);
    match op {
        "all_gather" if recv != world * send => invalid(format!(
            "recv.len() = {recv} but world_size * send.len() = {world} * {send}"
        )),
        "reduce_scatter" if send != world * recv => invalid(format!(
            "send.len() = {send} but world_size * recv.len() = {world} * {recv}"
        )),
        _ => Ok(()),
    }
}

/// Checks that a broadcast's `root` is a rank of the world.
fn check_root(root: usize, world: usize) -> Result<()> {
    if root >= world {
        return Err(CommError::InvalidArgument {
            op: "broadcast",
            detail: format!("root {root} is not a rank of a world of {world}"),
        });
    }
    Ok(())
}

impl dyn Communicator + '_ {
    /// `recv = concat over ranks of send`; `recv.len() == world_size * send.len()`.
    pub fn all_gather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.all_gather_bytes(
            T::DTYPE,
            bytemuck::cast_slice(send),
            bytemuck::cast_slice_mut(recv),
        )
    }

    /// Sum over ranks, scattered: rank r gets elements `[r*m, (r+1)*m)`, `send.len() == world_size * m`.
    pub fn reduce_scatter<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.reduce_scatter_bytes(
            T::DTYPE,
            bytemuck::cast_slice(send),
            bytemuck::cast_slice_mut(recv),
        )
    }

    /// In-place sum over ranks.
    pub fn all_reduce<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        self.all_reduce_bytes(T::DTYPE, bytemuck::cast_slice_mut(buf))
    }

    /// Copies rank `root`'s `buf` into every rank's `buf`.
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.broadcast_bytes(bytemuck::cast_slice_mut(buf), root)
    }

    fn submit_work<B: Send + 'static>(
        &self,
        op: &'static str,
        bufs: B,
        run: impl FnOnce(&dyn Communicator, &mut B) -> Result<()> + Send + 'static,
    ) -> Work<B> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |comm| {
            let mut bufs = bufs;
            let result = run(comm, &mut bufs).map(|()| bufs);
            // The receiver may be gone (handle dropped); the buffers are then dropped here.
            let _ = tx.send(result);
        });
        let state = match self.submit(job) {
            Ok(()) => WorkState::Pending(rx),
            Err(err) => WorkState::Failed(err),
        };
        Work {
            state,
            rank: self.rank(),
            op,
            bound: handle_bound(self.timeout()),
        }
    }

    /// Async `all_gather`: the handle owns both buffers until `wait` gives them back.
    pub fn all_gather_async<T, S, R>(&self, send: S, recv: R) -> Work<(S, R)>
    where
        T: Element,
        S: AsRef<[T]> + Send + 'static,
        R: AsMut<[T]> + Send + 'static,
    {
        self.submit_work("all_gather", (send, recv), |comm, (s, r)| {
            comm.all_gather::<T>(s.as_ref(), r.as_mut())
        })
    }

    /// Async `reduce_scatter`: the handle owns both buffers until `wait` gives them back.
    pub fn reduce_scatter_async<T, S, R>(&self, send: S, recv: R) -> Work<(S, R)>
    where
        T: Element,
        S: AsRef<[T]> + Send + 'static,
        R: AsMut<[T]> + Send + 'static,
    {
        self.submit_work("reduce_scatter", (send, recv), |comm, (s, r)| {
            comm.reduce_scatter::<T>(s.as_ref(), r.as_mut())
        })
    }

    /// Async `all_reduce`.
    pub fn all_reduce_async<T, B>(&self, buf: B) -> Work<B>
    where
        T: Element,
        B: AsMut<[T]> + Send + 'static,
    {
        self.submit_work("all_reduce", buf, |comm, b| {
            comm.all_reduce::<T>(b.as_mut())
        })
    }

    /// Async `broadcast`.
    pub fn broadcast_async<T, B>(&self, buf: B, root: usize) -> Work<B>
    where
        T: Element,
        B: AsMut<[T]> + Send + 'static,
    {
        self.submit_work("broadcast", buf, move |comm, b| {
            comm.broadcast::<T>(b.as_mut(), root)
        })
    }

    /// Async `barrier`.
    pub fn barrier_async(&self) -> Work<()> {
        self.submit_work("barrier", (), |comm, ()| comm.barrier())
    }
}

/// How long a handle waits: the operation's own waits are bounded by `timeout`; allow for one
/// operation queued ahead of it plus scheduling slack.
fn handle_bound(timeout: Duration) -> Duration {
    timeout
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(1))
}

enum WorkState<B> {
    Pending(mpsc::Receiver<Result<B>>),
    Done(Result<B>),
    Failed(CommError),
    Taken,
}

/// A collective in flight. It owns its buffers; `wait` returns them. Dropping it without waiting
/// lets the operation finish on the comm thread and drops the buffers there.
#[must_use = "a collective's result is only seen through wait()"]
pub struct Work<B> {
    state: WorkState<B>,
    rank: usize,
    op: &'static str,
    bound: Duration,
}

impl<B> Work<B> {
    /// Whether the operation has finished (successfully or not).
    pub fn is_done(&mut self) -> bool {
        if let WorkState::Pending(rx) = &self.state {
            match rx.try_recv() {
                Ok(result) => self.state = WorkState::Done(result),
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.state = WorkState::Failed(self.lost());
                }
            }
        }
        true
    }

    /// Blocks until the operation finishes (bounded by twice `dist.timeout` plus a second) and
    /// returns the buffers.
    pub fn wait(mut self) -> Result<B> {
        match std::mem::replace(&mut self.state, WorkState::Taken) {
            WorkState::Pending(rx) => match rx.recv_timeout(self.bound) {
                Ok(result) => result,
                Err(mpsc::RecvTimeoutError::Timeout) => Err(CommError::HandleTimeout {
                    rank: self.rank,
                    op: self.op,
                    timeout: self.bound,
                }),
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(self.lost()),
            },
            WorkState::Done(result) => result,
            WorkState::Failed(err) => Err(err),
            WorkState::Taken => Err(self.lost()),
        }
    }

    fn lost(&self) -> CommError {
        CommError::Poisoned {
            rank: self.rank,
            op: self.op,
            cause: "the comm thread dropped the operation (communicator shut down)".into(),
        }
    }
}

/// Wraps a host backend: orders sync calls after queued async ones, runs async ones on a comm
/// thread, validates arguments and poisons the communicator after the first failure.
pub(crate) struct Queued {
    core: Arc<dyn Communicator>,
    shared: Arc<QueueShared>,
    tx: Mutex<Option<mpsc::SyncSender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

/// Most asynchronous collectives waiting on one communicator's comm thread; `submit` waits
/// (bounded by the handle timeout) for room beyond that.
pub const QUEUED_JOBS_MAX: usize = 1024;

struct QueueShared {
    /// Jobs submitted and not yet finished.
    pending: Mutex<usize>,
    idle: Condvar,
    /// First failure, as text; every later call fails with it.
    poisoned: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl QueueShared {
    fn check(&self, rank: usize, op: &'static str) -> Result<()> {
        match lock(&self.poisoned).as_ref() {
            Some(cause) => Err(CommError::Poisoned {
                rank,
                op,
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn record<T>(&self, rank: usize, result: Result<T>) -> Result<T> {
        if let Err(err) = &result {
            if !matches!(
                err,
                CommError::InvalidArgument { .. } | CommError::Poisoned { .. }
            ) {
                let mut poisoned = lock(&self.poisoned);
                if poisoned.is_none() {
                    // The message with its causes: an OS error is the error's source, not in its message.
                    let mut cause = err.to_string();
                    let mut source = std::error::Error::source(err);
                    while let Some(s) = source {
                        cause = format!("{cause}: {s}");
                        source = s.source();
                    }
                    *poisoned = Some(cause);
                    report_blame(rank, err);
                }
            }
        }
        result
    }
}

/// Tells `strata launch` (through the directory in `BLAME_DIR_VAR`) which rank this one's first
/// failure blames, so the launcher names the rank that failed first rather than the first to exit.
fn report_blame(rank: usize, err: &CommError) {
    let (Some(dir), Some(peer)) = (
        std::env::var_os(crate::launch::BLAME_DIR_VAR),
        err.blamed_rank(),
    ) else {
        return;
    };
    // Best effort: the launcher falls back to exit order without it.
    let _ = std::fs::write(
        std::path::Path::new(&dir).join(format!("rank-{rank}")),
        peer.to_string(),
    );
}

impl Queued {
    pub(crate) fn new(core: Arc<dyn Communicator>) -> Result<Self> {
        let shared = Arc::new(QueueShared {
            pending: Mutex::new(0),
            idle: Condvar::new(),
            poisoned: Mutex::new(None),
        });
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUED_JOBS_MAX);
        let worker_core = Arc::clone(&core);
        let worker_shared = Arc::clone(&shared);
        let rank = core.rank();
        let worker = std::thread::Builder::new()
            .name(format!("strata-comm-r{rank}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&*worker_core);
                    let mut pending = lock(&worker_shared.pending);
                    *pending = pending.saturating_sub(1);
                    worker_shared.idle.notify_all();
                }
            })
            .map_err(|e| CommError::Launch(format!("cannot start the comm thread: {e}")))?;
        Ok(Self {
            core,
            shared,
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Runs a sync collective once every queued job has finished; holds the queue lock meanwhile so
    /// that no job starts under it.
    fn run_sync(
        &self,
        op: &'static str,
        f: impl FnOnce(&dyn Communicator) -> Result<()>,
    ) -> Result<()> {
        let rank = self.core.rank();
        let deadline = Instant::now() + handle_bound(self.core.timeout());
        let mut pending = lock(&self.shared.pending);
        while *pending > 0 {
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::HandleTimeout {
                    rank,
                    op,
                    timeout: handle_bound(self.core.timeout()),
                });
            }
            pending = self
                .shared
                .idle
                .wait_timeout(pending, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        self.shared.check(rank, op)?;
        let result = f(&*self.core);
        drop(pending);
        self.shared.record(rank, result)
    }
}

impl Communicator for Queued {
    fn rank(&self) -> usize {
        self.core.rank()
    }
    fn world_size(&self) -> usize {
        self.core.world_size()
    }
    fn backend(&self) -> Backend {
        self.core.backend()
    }
    fn timeout(&self) -> Duration {
        self.core.timeout()
    }
    fn all_gather_bytes(&self, dtype: DType, send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_lengths(
            "all_gather",
            self.world_size(),
            dtype,
            send.len(),
            recv.len(),
        )?;
        self.run_sync("all_gather", |c| c.all_gather_bytes(dtype, send, recv))
    }
    fn reduce_scatter_bytes(&self, dtype: DType, send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_lengths(
            "reduce_scatter",
            self.world_size(),
            dtype,
            send.len(),
            recv.len(),
        )?;
        self.run_sync("reduce_scatter", |c| {
            c.reduce_scatter_bytes(dtype, send, recv)
        })
    }
    fn all_reduce_bytes(&self, dtype: DType, buf: &mut [u8]) -> Result<()> {
        check_lengths("all_reduce", self.world_size(), dtype, buf.len(), buf.len())?;
        self.run_sync("all_reduce", |c| c.all_reduce_bytes(dtype, buf))
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, self.world_size())?;
        self.run_sync("broadcast", |c| c.broadcast_bytes(buf, root))
    }
    fn barrier(&self) -> Result<()> {
        self.run_sync("barrier", |c| c.barrier())
    }
    fn submit(&self, job: Job) -> Result<()> {
        let rank = self.rank();
        self.shared.check(rank, "submit")?;
        let tx = lock(&self.tx);
        let Some(tx) = tx.as_ref() else {
            return Err(CommError::Poisoned {
                rank,
                op: "submit",
                cause: "communicator shut down".into(),
            });
        };
        // Jobs run against the queue-less view that still validates and poisons.
        let shared = Arc::clone(&self.shared);
        let wrapped: Job = Box::new(move |core| {
            let guarded = Guarded {
                core,
                shared: &shared,
            };
            job(&guarded);
        });
        *lock(&self.shared.pending) += 1;
        let unsubmit = |cause: String| {
            let mut pending = lock(&self.shared.pending);
            *pending = pending.saturating_sub(1);
            CommError::Poisoned {
                rank,
                op: "submit",
                cause,
            }
        };
        let bound = handle_bound(self.core.timeout());
        let deadline = Instant::now() + bound;
        let mut job = wrapped;
        loop {
            match tx.try_send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    return Err(unsubmit("the comm thread has stopped".into()))
                }
                Err(mpsc::TrySendError::Full(back)) => {
                    if Instant::now() >= deadline {
                        return Err(unsubmit(format!(
                            "{QUEUED_JOBS_MAX} collectives queued and none finished within {bound:?}"
                        )));
                    }
                    job = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    fn as_dyn(&self) -> &dyn Communicator {
        self
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        // Close the queue, let queued jobs drain (each bounded by the timeout), then join.
        drop(lock(&self.tx).take());
        if let Some(worker) = lock(&self.worker).take() {
            // A panic on the comm thread is not re-raised from Drop.
            let _ = worker.join();
        }
    }
}

/// The view a queued job sees: validates, checks and records poisoning, runs on the core directly.
struct Guarded<'a> {
    core: &'a dyn Communicator,
    shared: &'a QueueShared,
}

impl Guarded<'_> {
    fn run(&self, op: &'static str, f: impl FnOnce(&dyn Communicator) -> Result<()>) -> Result<()> {
        self.shared.check(self.core.rank(), op)?;
        self.shared.record(self.core.rank(), f(self.core))
    }
}

impl Communicator for Guarded<'_> {
    fn rank(&self) -> usize {
        self.core.rank()
    }
    fn world_size(&self) -> usize {
        self.core.world_size()
    }
    fn backend(&self) -> Backend {
        self.core.backend()
    }
    fn timeout(&self) -> Duration {
        self.core.timeout()
    }
    fn all_gather_bytes(&self, dtype: DType, send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_lengths(
            "all_gather",
            self.world_size(),
            dtype,
            send.len(),
            recv.len(),
        )?;
        self.run("all_gather", |c| c.all_gather_bytes(dtype, send, recv))
    }
    fn reduce_scatter_bytes(&self, dtype: DType, send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_lengths(
            "reduce_scatter",
            self.world_size(),
            dtype,
            send.len(),
            recv.len(),
        )?;
        self.run("reduce_scatter", |c| {
            c.reduce_scatter_bytes(dtype, send, recv)
        })
    }
    fn all_reduce_bytes(&self, dtype: DType, buf: &mut [u8]) -> Result<()> {
        check_lengths("all_reduce", self.world_size(), dtype, buf.len(), buf.len())?;
        self.run("all_reduce", |c| c.all_reduce_bytes(dtype, buf))
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, self.world_size())?;
        self.run("broadcast", |c| c.broadcast_bytes(buf, root))
    }
    fn barrier(&self) -> Result<()> {
        self.run("barrier", |c| c.barrier())
    }
    fn as_dyn(&self) -> &dyn Communicator {
        self
    }
}
