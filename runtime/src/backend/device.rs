//! The device seam: the one interface the model and the engine are written against.
//!
//! A [`Device`] owns one [`Arena`] of device memory (sized before the first step by a dry run
//! of the same allocation code, see `Arena::counting`), five [`Queue`]s ordered by [`Event`]s,
//! and the per-layer operations with ONE signature for both backends. On CUDA the queues are
//! streams (and a host thread for NVMe I/O); on the CPU they are worker threads with the same
//! ordering rules: work on one queue runs in submission order, work on different queues runs
//! concurrently unless one queue waits on an event of another. Every operation is asynchronous:
//! it is enqueued and returns; its buffers must not be touched by other queues (or the host)
//! until an event recorded after it has completed.
//!
//! The layer operations are descriptors ([`super::ops`]): a model hands one to
//! `dev.run(…)`, which checks its operands once for every backend and passes it to the
//! backend's `launch`. `X` is the device's compute type (f32 on the CPU; bf16, fp16 or f32 on a
//! GPU).

use std::sync::Arc;

use strata_collectives::Communicator;

pub use super::arena::{Arena, Buf};
pub use super::host_queue::Job as HostJob;
use super::host_queue::Ticket;
use super::ops::{Checked, Op};

/// Element type of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    Bf16,
    F16,
    I32,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::Bf16 | DType::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
        }
    }
}

/// The compute type `X` of activations and compute weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    #[default]
    Bf16,
    Fp16,
    Fp32,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::Bf16, Precision::Fp16, Precision::Fp32];

    pub fn dtype(self) -> DType {
        match self {
            Precision::Bf16 => DType::Bf16,
            Precision::Fp16 => DType::F16,
            Precision::Fp32 => DType::F32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
            Precision::Fp32 => "fp32",
        }
    }
}

/// Which backend a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    Cpu,
    Cuda,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        }
    }
}

/// The device's queues. Work on one queue runs in order; queues run concurrently unless ordered
/// with events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Queue {
    /// Layer operations.
    Compute,
    /// Host → device copies (prefetch of parameter shards, tokens).
    H2d,
    /// Device → host copies (gradient shards to the host optimizer, losses).
    D2h,
    /// Collectives.
    Comm,
    /// NVMe reads and writes of the optimizer's states (a host thread on both backends).
    Io,
    /// Host work ordered with the device's: the host optimizer (a host thread on both backends).
    Host,
    /// NVMe reads of parameter shards ahead of their use (a host thread on both backends), apart
    /// from `Io` so that a prefetch does not queue behind the optimizer's transfers.
    Fetch,
}

impl Queue {
    pub const ALL: [Queue; 7] = [
        Queue::Compute,
        Queue::H2d,
        Queue::D2h,
        Queue::Comm,
        Queue::Io,
        Queue::Host,
        Queue::Fetch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Queue::Compute => "compute",
            Queue::H2d => "h2d",
            Queue::D2h => "d2h",
            Queue::Comm => "comm",
            Queue::Io => "io",
            // Not "host": the timeline's track of the main thread has that name.
            Queue::Host => "optimizer",
            Queue::Fetch => "fetch",
        }
    }
}

/// Whether a backward operation adds the input gradient it computes to its buffer or
/// overwrites it (which saves zeroing the buffer first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradMode {
    Accumulate,
    Overwrite,
}

/// AdamW hyperparameters of one update (torch.optim.AdamW semantics, decoupled weight decay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Applied to this call's parameters (0 for biases and norms).
    pub weight_decay: f32,
    /// 1-based step count for bias correction.
    pub step: u32,
    /// Multiplies every gradient first (clip factor / loss scale).
    pub grad_scale: f32,
}

/// Time spent in one kind of operation during a profile.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    /// Operation (kernel) name.
    pub op: &'static str,
    pub calls: usize,
    /// Milliseconds of compute-queue time charged to the operation.
    pub ms: f64,
}

/// Copies of one queue during a profiled step (CUDA: timed with events on their stream; the CPU
/// backend's copies are timed by the engine's traffic counters instead).
#[derive(Clone, Debug, PartialEq)]
pub struct CopyTime {
    pub queue: Queue,
    pub calls: usize,
    pub bytes: u64,
    /// Milliseconds the queue spent copying (sum of the copies' own times).
    pub busy_ms: f64,
}

impl CopyTime {
    /// GB/s while copying.
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / (self.busy_ms.max(1e-9) * 1e6)
    }
}

/// A profiled step: the compute queue's time per operation, largest first, and the copies.
#[derive(Clone, Debug, Default)]
pub struct StepProfile {
    pub ops: Vec<OpTime>,
    pub copies: Vec<CopyTime>,
}

/// Adds one timed call of `op` to a profile table.
pub fn charge(table: &mut Vec<OpTime>, op: &'static str, ms: f64) {
    match table.iter_mut().find(|t| t.op == op) {
        Some(t) => {
            t.calls += 1;
            t.ms += ms;
        }
        None => table.push(OpTime { op, calls: 1, ms }),
    }
}

/// A point in one queue's work: other queues can wait on it, the host can block on it.
#[derive(Debug)]
pub struct Event(pub(crate) EventKind);

/// What an event is on its backend.
#[derive(Debug)]
pub(crate) enum EventKind {
    /// A host queue's ticket (every queue of the CPU backend, the I/O queue of the GPU backend).
    Host(Ticket),
    /// A CUDA event recorded on a stream.
    Cuda(super::cuda::GpuEvent),
}

impl Event {
    /// Blocks the host until the work before this event has finished (bounded by the device's
    /// stall timeout on host queues).
    pub fn synchronize(&self) -> Result<(), DeviceError> {
        match &self.0 {
            EventKind::Host(ticket) => ticket.wait(),
            EventKind::Cuda(event) => Ok(event.synchronize()?),
        }
    }
}

/// Failures of a device: operating errors (no device, out of memory, a failed or stalled queue)
/// and violated preconditions of an operation, as values with the operation and sizes.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{backend} device unavailable: {message}")]
    Unavailable {
        backend: &'static str,
        message: String,
    },
    #[error(
        "out of {backend} device memory: the arena needs {requested_bytes} bytes, {available_bytes} are available ({limit})"
    )]
    OutOfMemory {
        backend: &'static str,
        requested_bytes: usize,
        available_bytes: usize,
        /// What bounds the memory: `train.device_memory`, or the card's free memory.
        limit: String,
    },
    #[error(
        "device arena exhausted allocating {requested_bytes} bytes for {what}: {used_bytes} of {capacity_bytes} bytes in use"
    )]
    ArenaExhausted {
        what: &'static str,
        requested_bytes: usize,
        used_bytes: usize,
        capacity_bytes: usize,
    },
    #[error("{op}: {message}")]
    Op { op: &'static str, message: String },
    #[error("{queue} queue: {message}")]
    Queue {
        queue: &'static str,
        message: String,
    },
    /// A job failed on a queue (`message` names the queue and the job); every later wait on
    /// that queue, or on one that waited for it, returns it.
    #[error("{message}")]
    Failed {
        queue: &'static str,
        message: String,
    },
    #[error("collective on the {queue} queue: {source}")]
    Comm {
        queue: &'static str,
        #[source]
        source: strata_collectives::CommError,
    },
}

impl DeviceError {
    pub fn op(op: &'static str, message: impl Into<String>) -> DeviceError {
        DeviceError::Op {
            op,
            message: message.into(),
        }
    }
}

pub type Result<T, E = DeviceError> = std::result::Result<T, E>;

/// Checks a condition of an operation; the message is built only on failure.
pub fn ensure(ok: bool, op: &'static str, message: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(DeviceError::op(op, message()))
    }
}

/// Checks that `buf` holds exactly `numel` elements of `dtype`.
pub fn check(op: &'static str, name: &str, buf: &Buf, dtype: DType, numel: usize) -> Result<()> {
    ensure(buf.dtype() == dtype && buf.len() == numel, op, || {
        format!(
            "{name} must be {numel} x {}, got {} x {}",
            dtype.name(),
            buf.len(),
            buf.dtype().name()
        )
    })
}

/// Checks that `buf` holds at least `numel` elements of `dtype` (tables sized by the maximum).
pub fn check_min(
    op: &'static str,
    name: &str,
    buf: &Buf,
    dtype: DType,
    numel: usize,
) -> Result<()> {
    ensure(buf.dtype() == dtype && buf.len() >= numel, op, || {
        format!(
            "{name} must be at least {numel} x {}, got {} x {}",
            dtype.name(),
            buf.len(),
            buf.dtype().name()
        )
    })
}

/// Partial sums of the gradient norm's first stage (the `partials` buffer's minimum size).
pub const NORM_PARTIALS_MAX: usize = 1024;

/// A device: its arena, queues and operations. Object safe: the model and the engine hold a
/// `&dyn Device` and never name a backend.
///
/// Every operation below runs on [`Queue::Compute`] unless it takes a queue. Buffers must lie
/// in this device's arena; an operation checks dtypes and sizes before it is enqueued and
/// returns [`DeviceError::Op`] when they are wrong. Failures while the work runs surface at the
/// next `synchronize` of that queue.
pub trait Device: Send + Sync {
    fn backend(&self) -> Backend;
    /// e.g. "cpu (2 threads)" or "NVIDIA H100 80GB HBM3 (sm_90)".
    fn name(&self) -> String;
    fn precision(&self) -> Precision;
    /// The compute type `X`.
    fn x(&self) -> DType {
        self.precision().dtype()
    }
    fn arena(&self) -> &Arena;

    // --- queues and events -------------------------------------------------------------------
    /// An event marking all work submitted to `queue` so far.
    fn record(&self, queue: Queue) -> Result<Event>;
    /// Makes later work on `queue` wait for `event`.
    fn wait(&self, queue: Queue, event: &Event) -> Result<()>;
    /// Blocks the host until everything submitted to `queue` has finished.
    fn synchronize(&self, queue: Queue) -> Result<()>;
    /// Runs `job` on a host queue (`Queue::Io` or `Queue::Host`) after the work submitted to it
    /// before, like any other work of that queue (events order it against the others).
    fn submit_host(&self, queue: Queue, op: &'static str, job: HostJob) -> Result<()>;
    /// Where `queue`'s worker spent its time since the device opened, when the backend knows
    /// (host queues; not a GPU stream).
    fn queue_time(&self, queue: Queue) -> Option<crate::backend::host_queue::QueueTime> {
        let _ = queue;
        None
    }
    /// The hook that page-locks the engine's host buffers for this device's copies
    /// (`cuMemHostRegister` on CUDA; none on the CPU backend, where `mlock` does it).
    fn host_registrar(&self) -> Option<Arc<dyn strata_offload::Registrar>> {
        None
    }
    fn synchronize_all(&self) -> Result<()> {
        Queue::ALL.iter().try_for_each(|&q| self.synchronize(q))
    }

    // --- memory ------------------------------------------------------------------------------
    /// Fills `buf` with `byte` on `queue`.
    fn memset(&self, queue: Queue, buf: &Buf, byte: u8) -> Result<()>;
    /// Fills a 2- or 4-byte-element buffer with NaN on `queue` (poisoning outputs in tests).
    fn poison_nan(&self, queue: Queue, buf: &Buf) -> Result<()>;
    /// Starts a copy of host bytes `src` into `dst` on `queue`.
    ///
    /// # Safety
    /// `src` must stay allocated and unmodified until the copy completes (observe it with an
    /// event recorded on `queue` after this call).
    unsafe fn copy_h2d(&self, queue: Queue, dst: &Buf, src: &[u8]) -> Result<()>;
    /// Starts a copy of `src` into host bytes `dst` on `queue`.
    ///
    /// # Safety
    /// `dst` must stay allocated and must not be read or written by the host until the copy
    /// completes (observe it with an event recorded on `queue` after this call).
    unsafe fn copy_d2h(&self, queue: Queue, dst: &mut [u8], src: &Buf) -> Result<()>;
    /// Device → device copy of equal-sized buffers on `queue`.
    fn copy_d2d(&self, queue: Queue, dst: &Buf, src: &Buf) -> Result<()>;

    // --- collectives (Queue::Comm) -------------------------------------------------------------
    /// In-place sum over the ranks of `comm` (f32 or X).
    fn all_reduce(&self, comm: &Arc<dyn Communicator>, buf: &Buf) -> Result<()>;
    /// recv (world·n) = concat over the ranks of send (n), f32 or X; send and recv disjoint.
    fn all_gather(&self, comm: &Arc<dyn Communicator>, send: &Buf, recv: &Buf) -> Result<()>;
    /// The same in place: `buf` (world·n) holds this rank's part at its slot; `scratch` (at least n
    /// elements of the same type) may be used on the way.
    fn all_gather_in_place(
        &self,
        comm: &Arc<dyn Communicator>,
        buf: &Buf,
        scratch: &Buf,
    ) -> Result<()>;
    /// recv (n) += (Σ over the ranks of send (world·n))[rank·n..(rank+1)·n], f32: a gradient
    /// shard accumulates across micro-batches. `scratch` (n f32) receives the reduction first.
    fn reduce_scatter_add(
        &self,
        comm: &Arc<dyn Communicator>,
        send: &Buf,
        recv: &Buf,
        scratch: &Buf,
    ) -> Result<()>;

    // --- profiling ---------------------------------------------------------------------------
    /// Starts timing every operation on the compute queue.
    fn profile_start(&self) -> Result<()>;
    /// Closes the profile (after the compute queue drains): time per operation, largest first,
    /// and the copies' time where the backend times them.
    fn profile_finish(&self) -> Result<StepProfile>;

    // --- layer operations (Queue::Compute) ---------------------------------------------------
    /// Enqueues a layer operation whose operands were checked (see [`super::ops`]); models call
    /// `run`, which checks them first.
    fn launch(&self, op: Checked<'_>) -> Result<()>;

    // --- optimizer operations (Queue::Compute) -----------------------------------------------
    /// out (N) X = inp (N) f32, rounded to nearest.
    fn cast_f32_to_x(&self, out: &Buf, inp: &Buf) -> Result<()>;
    /// out (N) f32 = inp (N) X.
    fn cast_x_to_f32(&self, out: &Buf, inp: &Buf) -> Result<()>;
    /// out (1) f32 = (accumulate ? out : 0) + Σ grads² (grads f32); `partials` is scratch of at
    /// least NORM_PARTIALS_MAX f32. Deterministic for a given length.
    fn grad_norm_squared(
        &self,
        out: &Buf,
        partials: &Buf,
        grads: &Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// One AdamW step on fp32 params/grads/m/v (N), writing the updated params also to
    /// `params_x` (N) X when given.
    fn adamw(
        &self,
        params: &Buf,
        params_x: Option<&Buf>,
        grads: &Buf,
        m: &Buf,
        v: &Buf,
        hyper: &AdamWHyper,
    ) -> Result<()>;
}

impl dyn Device + '_ {
    /// Checks a layer operation's operands and enqueues it on the compute queue.
    pub fn run<'a>(&self, op: impl Into<Op<'a>>) -> Result<()> {
        let location = match self.backend() {
            Backend::Cpu => super::arena::Location::Host,
            Backend::Cuda => super::arena::Location::Cuda,
        };
        self.launch(op.into().check(self.x(), location)?)
    }

    /// Copies `src` into `dst` and waits for the copy (any host memory). For set-up, tests and
    /// checkpoints; the step uses `copy_h2d` with events.
    pub fn upload<T: bytemuck::Pod>(&self, dst: &Buf, src: &[T]) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(src);
        ensure(bytes.len() == dst.size_bytes(), "upload", || {
            format!(
                "host {} bytes, device buffer {} bytes",
                bytes.len(),
                dst.size_bytes()
            )
        })?;
        // SAFETY: the queue is synchronized below, before `src` can be dropped or mutated.
        unsafe { self.copy_h2d(Queue::H2d, dst, bytes)? };
        self.synchronize(Queue::H2d)
    }

    /// Copies `src` into a new host vector and waits for the copy.
    pub fn download<T: bytemuck::Pod + Default>(&self, src: &Buf) -> Result<Vec<T>> {
        let elem = std::mem::size_of::<T>();
        ensure(elem > 0 && src.size_bytes() % elem == 0, "download", || {
            format!(
                "{} bytes is not a whole number of {elem}-byte elements",
                src.size_bytes()
            )
        })?;
        let mut out = vec![T::default(); src.size_bytes() / elem];
        // SAFETY: the queue is synchronized below, before `out` is returned or dropped.
        unsafe { self.copy_d2h(Queue::D2h, bytemuck::cast_slice_mut(&mut out), src)? };
        self.synchronize(Queue::D2h)?;
        Ok(out)
    }

    /// An f32 or X buffer as f32 values on the host (waits for the compute queue first).
    pub fn read_f32(&self, src: &Buf) -> Result<Vec<f32>> {
        let done = self.record(Queue::Compute)?;
        self.wait(Queue::D2h, &done)?;
        match src.dtype() {
            DType::F32 => self.download::<f32>(src),
            DType::Bf16 => Ok(self
                .download::<half::bf16>(src)?
                .into_iter()
                .map(half::bf16::to_f32)
                .collect()),
            DType::F16 => Ok(self
                .download::<half::f16>(src)?
                .into_iter()
                .map(half::f16::to_f32)
                .collect()),
            DType::I32 => Ok(self
                .download::<i32>(src)?
                .into_iter()
                .map(|v| v as f32)
                .collect()),
        }
    }
}
