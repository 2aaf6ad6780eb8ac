//! One device allocation sized at start-up; typed views into it.
//!
//! `DeviceArena::alloc` bumps an offset (256-byte aligned); `mark`/`reset_to` release
//! everything allocated after a mark (per-step scratch). Views made before a reset stay
//! valid memory but alias what is allocated next, exactly like llm.c's single buffer: the
//! engine's plan decides lifetimes, the arena only guarantees bounds and that the memory
//! outlives every view (`DeviceBuf` holds an `Arc` of the allocation).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};

use super::error::{ensure, CudaError, Result};
use super::DType;

/// Alignment of every allocation: enough for vectorized 128-bit loads and cuBLAS.
pub const ARENA_ALIGN_BYTES: usize = 256;

struct ArenaMemory {
    ctx: Arc<CudaContext>,
    base: sys::CUdeviceptr,
    capacity_bytes: usize,
}

impl Drop for ArenaMemory {
    fn drop(&mut self) {
        // Drop never panics: errors are logged. The last view may have been dropped while a
        // launch using it is still queued; synchronizing the context first rules that out.
        if let Err(e) = self.ctx.synchronize() {
            tracing::warn!(error = ?e, "device arena: synchronize before free failed");
        }
        // SAFETY: base came from cuMemAlloc in this context and is freed exactly once.
        if let Err(e) = unsafe { cudarc::driver::result::free_sync(self.base) } {
            tracing::warn!(error = ?e, "device arena: cuMemFree failed");
        }
    }
}

/// The device memory of one `GpuContext`.
pub struct DeviceArena {
    memory: Arc<ArenaMemory>,
    used_bytes: AtomicUsize,
}

impl std::fmt::Debug for DeviceArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceArena")
            .field("capacity_bytes", &self.memory.capacity_bytes)
            .field("used_bytes", &self.used_bytes())
            .finish()
    }
}

impl DeviceArena {
    /// Allocates `capacity_bytes` of device memory in `ctx` (one cuMemAlloc).
    pub fn new(ctx: &Arc<CudaContext>, capacity_bytes: usize) -> Result<Self> {
        ensure(capacity_bytes > 0, "DeviceArena::new", || {
            "capacity must be > 0".into()
        })?;
        ctx.bind_to_thread()
            .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))?;
        // SAFETY: the context is current on this thread; the result is checked.
        let base = unsafe { cudarc::driver::result::malloc_sync(capacity_bytes) }.map_err(|e| {
            if e.0 != sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                return CudaError::driver("cuMemAlloc (device arena)", e);
            }
            let (free_bytes, total_bytes) = ctx.mem_get_info().unwrap_or((0, 0));
            CudaError::DeviceOutOfMemory {
                requested_bytes: capacity_bytes,
                free_bytes,
                total_bytes,
            }
        })?;
        Ok(DeviceArena {
            memory: Arc::new(ArenaMemory {
                ctx: ctx.clone(),
                base,
                capacity_bytes,
            }),
            used_bytes: AtomicUsize::new(0),
        })
    }

    pub fn capacity_bytes(&self) -> usize {
        self.memory.capacity_bytes
    }

    pub fn used_bytes(&self) -> usize {
        self.used_bytes.load(Ordering::Acquire)
    }

    /// A view of `numel` elements of `dtype`; `what` names it in the out-of-memory error.
    pub fn alloc(&self, what: &'static str, dtype: DType, numel: usize) -> Result<DeviceBuf> {
        let size = numel
            .checked_mul(dtype.size_bytes())
            .ok_or_else(|| CudaError::precondition("DeviceArena::alloc", "size overflows"))?;
        let padded = size.div_ceil(ARENA_ALIGN_BYTES).max(1) * ARENA_ALIGN_BYTES;
        let mut used = self.used_bytes.load(Ordering::Acquire);
        loop {
            let end = used
                .checked_add(padded)
                .filter(|&e| e <= self.capacity_bytes());
            let Some(end) = end else {
                return Err(CudaError::ArenaExhausted {
                    what,
                    requested_bytes: size,
                    used_bytes: used,
                    capacity_bytes: self.capacity_bytes(),
                });
            };
            match self
                .used_bytes
                .compare_exchange(used, end, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(actual) => used = actual,
            }
        }
        Ok(DeviceBuf {
            memory: self.memory.clone(),
            offset_bytes: used,
            numel,
            dtype,
        })
    }

    /// The current fill level, to return to with `reset_to`.
    pub fn mark(&self) -> usize {
        self.used_bytes()
    }

    /// Releases everything allocated after `mark` (views into it then alias new allocations).
    pub fn reset_to(&self, mark: usize) -> Result<()> {
        ensure(mark <= self.used_bytes(), "DeviceArena::reset_to", || {
            format!("mark {mark} is beyond the fill level {}", self.used_bytes())
        })?;
        self.used_bytes.store(mark, Ordering::Release);
        Ok(())
    }
}

/// A typed range of the arena: (offset, element count, dtype). Cheap to clone; keeps the
/// arena's memory alive. Views are plain handles, like llm.c's pointers: which queue may read
/// or write them when is the engine's schedule, enforced with events.
#[derive(Clone)]
pub struct DeviceBuf {
    memory: Arc<ArenaMemory>,
    offset_bytes: usize,
    numel: usize,
    dtype: DType,
}

impl std::fmt::Debug for DeviceBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuf({} x {} @ +{})",
            self.numel,
            self.dtype.name(),
            self.offset_bytes
        )
    }
}

impl DeviceBuf {
    /// Device address of the first element.
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.memory.base + self.offset_bytes as u64
    }

    pub fn len(&self) -> usize {
        self.numel
    }

    pub fn is_empty(&self) -> bool {
        self.numel == 0
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn size_bytes(&self) -> usize {
        self.numel * self.dtype.size_bytes()
    }

    /// Elements [start, start + len) as their own view.
    pub fn slice(&self, start: usize, len: usize) -> Result<DeviceBuf> {
        let end = start.checked_add(len);
        ensure(
            end.is_some_and(|e| e <= self.numel),
            "DeviceBuf::slice",
            || {
                format!(
                    "[{start}, {start}+{len}) outside a buffer of {} elements",
                    self.numel
                )
            },
        )?;
        Ok(DeviceBuf {
            memory: self.memory.clone(),
            offset_bytes: self.offset_bytes + start * self.dtype.size_bytes(),
            numel: len,
            dtype: self.dtype,
        })
    }

    /// The same bytes seen as another element type (e.g. a flat byte pool as bf16 params).
    pub fn reinterpret(&self, dtype: DType) -> Result<DeviceBuf> {
        let bytes = self.size_bytes();
        ensure(
            bytes % dtype.size_bytes() == 0 && self.ptr() % dtype.size_bytes() as u64 == 0,
            "DeviceBuf::reinterpret",
            || {
                format!(
                    "{bytes} bytes at +{} cannot be viewed as {}",
                    self.offset_bytes,
                    dtype.name()
                )
            },
        )?;
        Ok(DeviceBuf {
            memory: self.memory.clone(),
            offset_bytes: self.offset_bytes,
            numel: bytes / dtype.size_bytes(),
            dtype,
        })
    }

    /// Whether two views overlap in memory.
    pub fn overlaps(&self, other: &DeviceBuf) -> bool {
        let (a0, a1) = (self.ptr(), self.ptr() + self.size_bytes() as u64);
        let (b0, b1) = (other.ptr(), other.ptr() + other.size_bytes() as u64);
        a0 < b1 && b0 < a1
    }
}
