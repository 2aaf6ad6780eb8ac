//! `GpuContext`: one device, its four queues (streams), events, cuBLAS and the kernels.

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use super::arena::device_memory;
use super::error::{ensure, CudaError, Result};
use super::gemm::Blas;
use super::kernels::Kernels;
use super::loader::{self, CudaLibrary};
use super::profile::Profile;
use super::{DType, Precision};
use crate::backend::arena::Location;
use crate::backend::{Arena, Buf};

/// The engine's queues. Each is one non-blocking CUDA stream; work on different queues runs
/// concurrently unless ordered with events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Kernels and cuBLAS.
    Compute,
    /// Host → device copies (prefetch of parameter shards).
    H2d,
    /// Device → host copies (gradient shards to the CPU optimizer).
    D2h,
    /// Collectives (NCCL all_gather / reduce_scatter / all_reduce).
    Comm,
}

impl Stream {
    pub const ALL: [Stream; 4] = [Stream::Compute, Stream::H2d, Stream::D2h, Stream::Comm];

    pub fn name(self) -> &'static str {
        match self {
            Stream::Compute => "compute",
            Stream::H2d => "h2d",
            Stream::D2h => "d2h",
            Stream::Comm => "comm",
        }
    }
}

/// Start-up options of a `GpuContext`.
#[derive(Debug, Clone)]
pub struct GpuOptions {
    /// CUDA device ordinal (the local rank on a multi-GPU node).
    pub ordinal: usize,
    /// Compute type `floatX` of activations and compute weights.
    pub precision: Precision,
    /// Size of the one device arena, including `blas_workspace_bytes`.
    pub arena_bytes: usize,
    /// cuBLAS workspace carved from the arena (32 MiB is plenty for Hopper).
    pub blas_workspace_bytes: usize,
    /// Let fp32 GEMMs use TF32 tensor cores (Precision::Fp32 only; off for reference runs).
    pub allow_tf32: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            ordinal: 0,
            precision: Precision::Bf16,
            arena_bytes: 1 << 30,
            blas_workspace_bytes: 32 << 20,
            allow_tf32: false,
        }
    }
}

/// Device, streams, arena, cuBLAS handle and compiled kernels. Created once at start-up.
pub struct GpuContext {
    ctx: Arc<CudaContext>,
    streams: [Arc<CudaStream>; 4],
    precision: Precision,
    arch: String,
    name: String,
    arena: Arena,
    blas: Blas,
    kernels: Kernels,
    /// Open per-operation profile (`profile_start`), if any.
    profile: Mutex<Option<Profile>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("arch", &self.arch)
            .field("precision", &self.precision)
            .field("arena", &self.arena)
            .finish()
    }
}

/// Number of CUDA devices, or an error that says why there are none (no driver, no device).
pub fn device_count() -> Result<usize> {
    if !loader::driver_present() {
        return Err(CudaError::NoDriver {
            hint: "libcuda.so.1 is not loadable by name: install the NVIDIA driver, add its directory to LD_LIBRARY_PATH, or run with device = \"cpu\"".into(),
        });
    }
    cudarc::driver::result::init().map_err(|e| CudaError::driver("cuInit", e))?;
    let n = cudarc::driver::result::device::get_count()
        .map_err(|e| CudaError::driver("cuDeviceGetCount", e))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

impl GpuContext {
    /// Opens device `opts.ordinal`: checks driver and libraries, creates the four streams,
    /// allocates the arena, sets up cuBLAS on the compute stream and loads the kernels
    /// (NVRTC-compiled once per process for the device's architecture and `opts.precision`).
    pub fn new(opts: &GpuOptions) -> Result<Self> {
        let count = device_count()?;
        ensure(opts.ordinal < count, "GpuContext::new", || {
            format!(
                "device {} requested, {count} CUDA device(s) present",
                opts.ordinal
            )
        })
        .map_err(|e| CudaError::NoDevice {
            message: e.to_string(),
        })?;
        for library in [
            CudaLibrary::Nvrtc,
            CudaLibrary::CublasLt,
            CudaLibrary::Cublas,
        ] {
            loader::require(library)?;
            if !loader::cudarc_can_load(library) {
                return Err(CudaError::LibraryNotFound {
                    library: library.name(),
                    searched: "cudarc's names (libX.so, libX.so.13)".into(),
                    hint: "add the library's directory to LD_LIBRARY_PATH".into(),
                });
            }
        }
        let ctx =
            CudaContext::new(opts.ordinal).map_err(|e| CudaError::driver("cuCtxCreate", e))?;
        // SAFETY: no CudaSlice/CudaView exists yet; all device memory of this backend lives in
        // the arena and is ordered by the engine's own events, never by cudarc's tracking.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| CudaError::driver("cuDeviceGetAttribute(compute capability)", e))?;
        let arch = format!("sm_{major}{minor}");
        let name = ctx
            .name()
            .map_err(|e| CudaError::driver("cuDeviceGetName", e))?;
        let new_stream = || {
            ctx.new_stream()
                .map_err(|e| CudaError::driver("cuStreamCreate", e))
        };
        let streams = [new_stream()?, new_stream()?, new_stream()?, new_stream()?];

        let arena = Arena::new(device_memory(&ctx, opts.arena_bytes)?);
        let workspace = arena.alloc(
            "cublas workspace",
            DType::I32,
            opts.blas_workspace_bytes / 4,
        )?;
        let blas = Blas::new(&streams[0], workspace, opts.precision, opts.allow_tf32)?;
        let kernels = Kernels::load(&ctx, opts.precision, &arch)?;
        tracing::info!(ordinal = opts.ordinal, %name, %arch, precision = opts.precision.name(),
            arena_bytes = opts.arena_bytes, "CUDA context ready");
        Ok(GpuContext {
            ctx,
            streams,
            precision: opts.precision,
            arch,
            name,
            arena,
            blas,
            kernels,
            profile: Mutex::new(None),
        })
    }

    pub(super) fn profile_slot(&self) -> MutexGuard<'_, Option<Profile>> {
        // A panic while holding the lock leaves a profile that is still well-formed.
        self.profile.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cuda(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self, queue: Stream) -> &Arc<CudaStream> {
        &self.streams[queue as usize]
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// e.g. "sm_90".
    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn device_name(&self) -> &str {
        &self.name
    }

    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    pub fn blas(&self) -> &Blas {
        &self.blas
    }

    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| CudaError::driver("cuMemGetInfo", e))
    }

    /// Creates an event (no timing) for `record_into`; create the step's events at start-up.
    pub fn new_event(&self, timing: bool) -> Result<GpuEvent> {
        let flags = timing.then_some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let event = self
            .ctx
            .new_event(flags)
            .map_err(|e| CudaError::driver("cuEventCreate", e))?;
        Ok(GpuEvent {
            event: Arc::new(event),
            queue: Stream::Compute,
        })
    }

    /// Records an existing event on `queue` (re-recording moves it to the new point).
    pub fn record_into(&self, queue: Stream, event: &mut GpuEvent) -> Result<()> {
        event
            .event
            .record(self.stream(queue))
            .map_err(|e| CudaError::driver("cuEventRecord", e))?;
        event.queue = queue;
        Ok(())
    }

    /// Records a new event on `queue` marking all work submitted to it so far.
    pub fn record(&self, queue: Stream) -> Result<GpuEvent> {
        let mut event = self.new_event(false)?;
        self.record_into(queue, &mut event)?;
        Ok(event)
    }

    /// Makes later work on `queue` wait for `event` (no host blocking).
    pub fn wait(&self, queue: Stream, event: &GpuEvent) -> Result<()> {
        self.stream(queue)
            .wait(&event.event)
            .map_err(|e| CudaError::driver("cuStreamWaitEvent", e))
    }

    /// Blocks the host until everything submitted to `queue` has finished.
    pub fn synchronize(&self, queue: Stream) -> Result<()> {
        self.stream(queue)
            .synchronize()
            .map_err(|e| CudaError::driver("cuStreamSynchronize", e))
    }

    /// Blocks the host until all four queues are idle.
    pub fn synchronize_all(&self) -> Result<()> {
        Stream::ALL.iter().try_for_each(|&q| self.synchronize(q))
    }

    /// Binds the context to this thread and runs one asynchronous driver call `op` on `queue`'s
    /// stream (copies, memsets), mapping its status.
    ///
    /// # Safety
    /// `call` must be a driver call whose pointers are valid for the sizes it passes, for as long
    /// as the work it enqueues runs (the caller's contract).
    unsafe fn enqueue(
        &self,
        op: &'static str,
        queue: Stream,
        call: impl FnOnce(cudarc::driver::sys::CUstream) -> cudarc::driver::sys::CUresult,
    ) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))?;
        call(self.stream(queue).cu_stream())
            .result()
            .map_err(|e| CudaError::driver(op, e))
    }

    /// Fills `buf` with the byte pattern `byte` on `queue` (zeroing, poisoning for tests).
    pub fn memset(&self, queue: Stream, buf: &Buf, byte: u8) -> Result<()> {
        buf.check_live("memset", Location::Cuda)?;
        // SAFETY: buf's range lies inside the live arena allocation (checked when the view
        // was made; the view holds the arena alive); the stream belongs to this context.
        unsafe {
            self.enqueue("cuMemsetD8Async", queue, |stream| {
                cudarc::driver::sys::cuMemsetD8Async(buf.ptr(), byte, buf.size_bytes(), stream)
            })
        }
    }

    /// Fills a 2-byte or 4-byte-element buffer with NaN (for poisoning outputs in tests).
    pub fn poison_nan(&self, queue: Stream, buf: &Buf) -> Result<()> {
        buf.check_live("poison_nan", Location::Cuda)?;
        // SAFETY: as in `memset`; element counts match the buffer's element size.
        unsafe {
            self.enqueue("cuMemsetAsync (poison)", queue, |stream| {
                match buf.dtype() {
                    DType::F32 | DType::I32 => cudarc::driver::sys::cuMemsetD32Async(
                        buf.ptr(),
                        0x7fc0_0000,
                        buf.len(),
                        stream,
                    ),
                    DType::Bf16 => {
                        cudarc::driver::sys::cuMemsetD16Async(buf.ptr(), 0x7fc0, buf.len(), stream)
                    }
                    DType::F16 => {
                        cudarc::driver::sys::cuMemsetD16Async(buf.ptr(), 0x7e00, buf.len(), stream)
                    }
                }
            })
        }
    }

    /// Starts an asynchronous host→device copy of `src` into `dst` on `queue`.
    ///
    /// # Safety
    /// `src` must stay allocated and unmodified until the copy completes (observe it with an
    /// event recorded on `queue` after this call, or a synchronize). For DMA speed and true
    /// asynchrony `src` should lie in a `PinnedRegion`; pageable memory is staged by the driver.
    pub unsafe fn copy_h2d(&self, queue: Stream, dst: &Buf, src: &[u8]) -> Result<()> {
        dst.check_live("copy_h2d", Location::Cuda)?;
        ensure(src.len() == dst.size_bytes(), "copy_h2d", || {
            format!(
                "host {} bytes, device buffer {} bytes",
                src.len(),
                dst.size_bytes()
            )
        })?;
        // SAFETY: dst lies inside the live arena; src is valid for src.len() bytes and the
        // caller keeps it alive until completion (this function's contract).
        unsafe {
            self.enqueue("cuMemcpyHtoDAsync", queue, |stream| {
                cudarc::driver::sys::cuMemcpyHtoDAsync_v2(
                    dst.ptr(),
                    src.as_ptr().cast(),
                    src.len(),
                    stream,
                )
            })
        }
    }

    /// Starts an asynchronous device→host copy of `src` into `dst` on `queue`.
    ///
    /// # Safety
    /// `dst` must stay allocated and must not be read or written by the host until the copy
    /// completes (observe it with an event recorded on `queue` after this call).
    pub unsafe fn copy_d2h(&self, queue: Stream, dst: &mut [u8], src: &Buf) -> Result<()> {
        src.check_live("copy_d2h", Location::Cuda)?;
        ensure(dst.len() == src.size_bytes(), "copy_d2h", || {
            format!(
                "host {} bytes, device buffer {} bytes",
                dst.len(),
                src.size_bytes()
            )
        })?;
        // SAFETY: src lies inside the live arena; dst is valid for dst.len() bytes and the
        // caller does not touch it until completion (this function's contract).
        unsafe {
            self.enqueue("cuMemcpyDtoHAsync", queue, |stream| {
                cudarc::driver::sys::cuMemcpyDtoHAsync_v2(
                    dst.as_mut_ptr().cast(),
                    src.ptr(),
                    dst.len(),
                    stream,
                )
            })
        }
    }

    /// Device→device copy of equal-sized buffers on `queue`.
    pub fn copy_d2d(&self, queue: Stream, dst: &Buf, src: &Buf) -> Result<()> {
        dst.check_live("copy_d2d", Location::Cuda)?;
        src.check_live("copy_d2d", Location::Cuda)?;
        ensure(dst.size_bytes() == src.size_bytes(), "copy_d2d", || {
            format!(
                "dst {} bytes, src {} bytes",
                dst.size_bytes(),
                src.size_bytes()
            )
        })?;
        // SAFETY: both ranges lie inside live arena allocations of this context.
        unsafe {
            self.enqueue("cuMemcpyDtoDAsync", queue, |stream| {
                cudarc::driver::sys::cuMemcpyDtoDAsync_v2(
                    dst.ptr(),
                    src.ptr(),
                    src.size_bytes(),
                    stream,
                )
            })
        }
    }
}

/// A point in one queue's work; other queues can wait on it, the host can block on it.
#[derive(Debug, Clone)]
pub struct GpuEvent {
    /// Shared, so a host queue can wait on a copy (re-recording an event that has copies moves
    /// them all: only `record` events, which are never re-recorded, are handed out).
    event: Arc<CudaEvent>,
    queue: Stream,
}

impl GpuEvent {
    pub fn queue(&self) -> Stream {
        self.queue
    }

    /// Blocks the host until the work before this event has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.event
            .synchronize()
            .map_err(|e| CudaError::driver("cuEventSynchronize", e))
    }

    /// Milliseconds between `self` and a later `end`; both need `new_event(true)`.
    pub fn elapsed_ms(&self, end: &GpuEvent) -> Result<f32> {
        self.event
            .elapsed_ms(&end.event)
            .map_err(|e| CudaError::driver("cuEventElapsedTime", e))
    }

    /// Whether the work before this event has finished (non-blocking).
    pub fn is_complete(&self) -> Result<bool> {
        self.event
            .try_is_complete()
            .map_err(|e| CudaError::driver("cuEventQuery", e))
    }
}
