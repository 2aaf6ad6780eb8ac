//! `CudaDevice`: the CUDA backend behind the device seam. The compute, host→device,
//! device→host and communication queues are the `GpuContext`'s four streams; the NVMe I/O queue
//! is a host thread (io_uring is driven by the host). Layer operations are the context's NVRTC
//! kernels and cuBLAS GEMMs on the compute stream.
//!
//! Ordering between the host I/O queue and a stream: a stream that must wait for host work
//! waits on the host (the calling thread blocks until the host ticket completes, then enqueues
//! what follows); the I/O queue waits for a CUDA event by synchronizing it. Both are correct;
//! neither blocks the GPU.

use std::sync::Arc;
use std::time::Duration;

use strata_collectives::Communicator;

use super::context::{GpuContext, GpuOptions, Stream};
use crate::backend::host_queue::HostQueue;
use crate::backend::{
    ensure, AdamWHyper, Arena, Backend, Buf, Checked, DType, Device, DeviceError, Event, EventKind,
    HostJob, Precision, Queue, Result, StepProfile,
};

/// cuBLAS workspace carved from the arena.
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;
/// Slack on top of the planned bytes (alignment of the workspace, rounding).
const ARENA_SLACK_BYTES: usize = 4 << 20;

/// Start-up options of a [`CudaDevice`].
#[derive(Debug, Clone)]
pub struct CudaOptions {
    /// CUDA device ordinal (the local rank on a multi-GPU node).
    pub ordinal: usize,
    pub precision: Precision,
    /// Bytes the engine's dry run counted (the cuBLAS workspace is added here).
    pub arena_bytes: usize,
    /// `train.device_memory`: the most the arena may take (None: the card's free memory).
    pub budget_bytes: Option<usize>,
    /// Let fp32 GEMMs use TF32 tensor cores (off for reference runs).
    pub allow_tf32: bool,
    /// Bound on waits for the host I/O queue.
    pub stall_timeout: Duration,
}

/// The CUDA backend.
pub struct CudaDevice {
    io: HostQueue,
    host: HostQueue,
    fetch: HostQueue,
    registrar: Arc<super::CudaRegistrar>,
    gpu: GpuContext,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("gpu", &self.gpu)
            .finish()
    }
}

/// The stream of a queue; None for the host queues (I/O, host work).
fn stream(queue: Queue) -> Option<Stream> {
    match queue {
        Queue::Compute => Some(Stream::Compute),
        Queue::H2d => Some(Stream::H2d),
        Queue::D2h => Some(Stream::D2h),
        Queue::Comm => Some(Stream::Comm),
        Queue::Io | Queue::Host | Queue::Fetch => None,
    }
}

fn device_stream(queue: Queue, op: &'static str) -> Result<Stream> {
    stream(queue).ok_or_else(|| {
        DeviceError::op(
            op,
            "the io queue is a host thread; it does not touch device memory",
        )
    })
}

/// The NCCL communicator behind `comm`: GPU buffers are reduced with NCCL.
fn nccl_of(comm: &Arc<dyn Communicator>) -> Result<&strata_collectives::NcclCommunicator> {
    comm.as_nccl().ok_or_else(|| {
        DeviceError::op(
            "collective",
            format!(
                "GPU buffers are exchanged with NCCL; this rank's communicator is {} (set dist.backend = \"nccl\" or \"auto\")",
                comm.backend()
            ),
        )
    })
}

/// NCCL's element type for a live device buffer.
fn nccl_dtype(op: &'static str, buf: &Buf) -> Result<strata_collectives::DType> {
    buf.check_live(op, crate::backend::arena::Location::Cuda)?;
    match buf.dtype() {
        DType::F32 => Ok(strata_collectives::DType::F32),
        DType::Bf16 => Ok(strata_collectives::DType::Bf16),
        other => Err(DeviceError::op(
            op,
            format!("{} buffers are not exchanged over NCCL here", other.name()),
        )),
    }
}

fn comm_error(source: strata_collectives::CommError) -> DeviceError {
    DeviceError::Comm {
        queue: "comm",
        source,
    }
}

impl CudaDevice {
    /// Opens GPU `opts.ordinal` with an arena of `opts.arena_bytes` (plus the cuBLAS workspace).
    pub fn new(opts: &CudaOptions) -> Result<CudaDevice> {
        let arena_bytes = opts
            .arena_bytes
            .checked_add(BLAS_WORKSPACE_BYTES + ARENA_SLACK_BYTES)
            .ok_or_else(|| DeviceError::op("CudaDevice::new", "arena size overflows"))?;
        if let Some(budget) = opts.budget_bytes.filter(|&b| arena_bytes > b) {
            return Err(DeviceError::OutOfMemory {
                backend: "cuda",
                requested_bytes: arena_bytes,
                available_bytes: budget,
                limit: "train.device_memory".into(),
            });
        }
        let gpu = GpuContext::new(&GpuOptions {
            ordinal: opts.ordinal,
            precision: opts.precision,
            arena_bytes,
            blas_workspace_bytes: BLAS_WORKSPACE_BYTES,
            allow_tf32: opts.allow_tf32,
        })?;
        Ok(CudaDevice {
            io: HostQueue::new(Queue::Io.name(), opts.stall_timeout)?,
            host: HostQueue::new(Queue::Host.name(), opts.stall_timeout)?,
            fetch: HostQueue::new(Queue::Fetch.name(), opts.stall_timeout)?,
            registrar: Arc::new(super::CudaRegistrar::new(gpu.cuda().clone())),
            gpu,
        })
    }

    /// The context (streams, kernels, cuBLAS), for the backend's own checks.
    pub fn gpu(&self) -> &GpuContext {
        &self.gpu
    }

    fn host_queue(&self, queue: Queue) -> &HostQueue {
        match queue {
            Queue::Host => &self.host,
            Queue::Fetch => &self.fetch,
            _ => &self.io,
        }
    }
}

impl Device for CudaDevice {
    fn backend(&self) -> Backend {
        Backend::Cuda
    }

    fn name(&self) -> String {
        format!("{} ({})", self.gpu.device_name(), self.gpu.arch())
    }

    fn precision(&self) -> Precision {
        self.gpu.precision()
    }

    fn arena(&self) -> &Arena {
        self.gpu.arena()
    }

    fn record(&self, queue: Queue) -> Result<Event> {
        Ok(Event(match stream(queue) {
            Some(s) => EventKind::Cuda(self.gpu.record(s)?),
            None => EventKind::Host(self.host_queue(queue).record()),
        }))
    }

    fn wait(&self, queue: Queue, event: &Event) -> Result<()> {
        match (stream(queue), &event.0) {
            (Some(s), EventKind::Cuda(e)) => Ok(self.gpu.wait(s, e)?),
            // A stream cannot wait for host work: the host waits, then enqueues what follows.
            (Some(_), EventKind::Host(ticket)) => ticket.wait(),
            (None, EventKind::Host(ticket)) => self.host_queue(queue).wait_for(ticket.clone()),
            (None, EventKind::Cuda(e)) => {
                let e = e.clone();
                self.host_queue(queue).submit(
                    crate::backend::host_queue::WAIT_OP,
                    Box::new(move || Ok(e.synchronize()?)),
                )
            }
        }
    }

    fn synchronize(&self, queue: Queue) -> Result<()> {
        match stream(queue) {
            Some(s) => Ok(self.gpu.synchronize(s)?),
            None => self.host_queue(queue).synchronize(),
        }
    }

    fn submit_host(&self, queue: Queue, op: &'static str, job: HostJob) -> Result<()> {
        ensure(stream(queue).is_none(), op, || {
            format!(
                "host jobs run on the io or host queue, not {}",
                queue.name()
            )
        })?;
        self.host_queue(queue).submit(op, job)
    }

    fn queue_time(&self, queue: Queue) -> Option<crate::backend::host_queue::QueueTime> {
        stream(queue)
            .is_none()
            .then(|| self.host_queue(queue).times())
    }

    fn host_registrar(&self) -> Option<Arc<dyn strata_offload::Registrar>> {
        Some(self.registrar.clone())
    }

    fn memset(&self, queue: Queue, buf: &Buf, byte: u8) -> Result<()> {
        Ok(self
            .gpu
            .memset(device_stream(queue, "memset")?, buf, byte)?)
    }

    fn poison_nan(&self, queue: Queue, buf: &Buf) -> Result<()> {
        Ok(self
            .gpu
            .poison_nan(device_stream(queue, "poison_nan")?, buf)?)
    }

    unsafe fn copy_h2d(&self, queue: Queue, dst: &Buf, src: &[u8]) -> Result<()> {
        let s = device_stream(queue, "copy_h2d")?;
        self.gpu.timed_copy(queue, s, src.len(), || {
            // SAFETY: the caller upholds copy_h2d's contract (src lives until the copy
            // completes).
            unsafe { self.gpu.copy_h2d(s, dst, src) }
        })?;
        Ok(())
    }

    unsafe fn copy_d2h(&self, queue: Queue, dst: &mut [u8], src: &Buf) -> Result<()> {
        let s = device_stream(queue, "copy_d2h")?;
        let bytes = dst.len();
        self.gpu.timed_copy(queue, s, bytes, || {
            // SAFETY: the caller upholds copy_d2h's contract (dst untouched until completion).
            unsafe { self.gpu.copy_d2h(s, dst, src) }
        })?;
        Ok(())
    }

    fn copy_d2d(&self, queue: Queue, dst: &Buf, src: &Buf) -> Result<()> {
        Ok(self
            .gpu
            .copy_d2d(device_stream(queue, "copy_d2d")?, dst, src)?)
    }

    fn all_reduce(&self, comm: &Arc<dyn Communicator>, buf: &Buf) -> Result<()> {
        if comm.world_size() == 1 {
            return Ok(());
        }
        let nccl = nccl_of(comm)?;
        let dtype = nccl_dtype("all_reduce", buf)?;
        let stream = self.gpu.stream(Stream::Comm).cu_stream();
        // SAFETY: buf is a live view of this device's arena (checked by nccl_dtype), which
        // outlives the enqueued work (the arena synchronizes the context before it frees); the
        // stream is this context's communication stream, and NCCL binds the same device.
        unsafe { nccl.all_reduce_on_stream(buf.ptr(), buf.len(), dtype, stream) }
            .map_err(comm_error)
    }

    fn all_gather(&self, comm: &Arc<dyn Communicator>, send: &Buf, recv: &Buf) -> Result<()> {
        let world = comm.world_size();
        ensure(
            recv.len() == world * send.len()
                && recv.dtype() == send.dtype()
                && !recv.overlaps(send),
            "all_gather",
            || format!("recv {recv:?} must be {world} x send {send:?}, disjoint"),
        )?;
        if world == 1 {
            return self.copy_d2d(Queue::Comm, recv, send);
        }
        let nccl = nccl_of(comm)?;
        let dtype = nccl_dtype("all_gather", send)?;
        nccl_dtype("all_gather", recv)?;
        let stream = self.gpu.stream(Stream::Comm).cu_stream();
        // SAFETY: as in all_reduce, for two disjoint live views of the checked sizes.
        unsafe { nccl.all_gather_on_stream(send.ptr(), recv.ptr(), send.len(), dtype, stream) }
            .map_err(comm_error)
    }

    fn all_gather_in_place(
        &self,
        comm: &Arc<dyn Communicator>,
        buf: &Buf,
        _scratch: &Buf,
    ) -> Result<()> {
        let world = comm.world_size();
        ensure(buf.len() % world == 0, "all_gather_in_place", || {
            format!("{buf:?} does not split into {world} parts")
        })?;
        if world == 1 {
            return Ok(());
        }
        let nccl = nccl_of(comm)?;
        let dtype = nccl_dtype("all_gather_in_place", buf)?;
        let n = buf.len() / world;
        let send = buf.slice(comm.rank() * n, n)?;
        let stream = self.gpu.stream(Stream::Comm).cu_stream();
        // SAFETY: as in all_reduce; NCCL's in-place layout: the send buffer is the rank's slot of
        // the receive buffer.
        unsafe { nccl.all_gather_on_stream(send.ptr(), buf.ptr(), n, dtype, stream) }
            .map_err(comm_error)
    }

    fn reduce_scatter_add(
        &self,
        comm: &Arc<dyn Communicator>,
        send: &Buf,
        recv: &Buf,
        scratch: &Buf,
    ) -> Result<()> {
        let world = comm.world_size();
        ensure(
            send.len() == world * recv.len() && scratch.len() == recv.len(),
            "reduce_scatter_add",
            || format!("send {send:?} must be {world} x recv {recv:?}; scratch {scratch:?}"),
        )?;
        if world == 1 {
            return Ok(self.gpu.add_f32(Stream::Comm, recv, send)?);
        }
        let nccl = nccl_of(comm)?;
        let dtype = nccl_dtype("reduce_scatter_add", send)?;
        nccl_dtype("reduce_scatter_add", scratch)?;
        let stream = self.gpu.stream(Stream::Comm).cu_stream();
        // SAFETY: as in all_reduce, for two disjoint live views of the checked sizes.
        unsafe {
            nccl.reduce_scatter_on_stream(send.ptr(), scratch.ptr(), recv.len(), dtype, stream)
        }
        .map_err(comm_error)?;
        Ok(self.gpu.add_f32(Stream::Comm, recv, scratch)?)
    }

    fn profile_start(&self) -> Result<()> {
        Ok(self.gpu.profile_start()?)
    }

    fn profile_finish(&self) -> Result<StepProfile> {
        Ok(self.gpu.profile_finish()?)
    }

    fn launch(&self, op: Checked<'_>) -> Result<()> {
        Ok(self.gpu.launch_layer(op)?)
    }

    fn cast_f32_to_x(&self, out: &Buf, inp: &Buf) -> Result<()> {
        Ok(self.gpu.cast_f32_to_x(out, inp)?)
    }

    fn cast_x_to_f32(&self, out: &Buf, inp: &Buf) -> Result<()> {
        Ok(self.gpu.cast_x_to_f32(out, inp)?)
    }

    fn grad_norm_squared(
        &self,
        out: &Buf,
        partials: &Buf,
        grads: &Buf,
        accumulate: bool,
    ) -> Result<()> {
        Ok(self
            .gpu
            .grad_norm_squared(out, partials, grads, accumulate)?)
    }

    fn adamw(
        &self,
        params: &Buf,
        params_x: Option<&Buf>,
        grads: &Buf,
        m: &Buf,
        v: &Buf,
        hyper: &AdamWHyper,
    ) -> Result<()> {
        Ok(self.gpu.adamw(params, params_x, grads, m, v, hyper)?)
    }
}
