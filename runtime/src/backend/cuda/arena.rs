//! Device memory for the arena: one `cuMemAlloc`, freed (after the context drains) when the
//! arena's last view is dropped.

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};

use super::error::{CudaError, Result};
use crate::backend::arena::{Location, Memory};

/// One device allocation; frees itself on drop.
struct DeviceAllocation {
    ctx: Arc<CudaContext>,
    base: sys::CUdeviceptr,
}

impl Drop for DeviceAllocation {
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

/// Allocates `capacity_bytes` of device memory in `ctx` for an arena.
pub fn device_memory(ctx: &Arc<CudaContext>, capacity_bytes: usize) -> Result<Memory> {
    let bytes = capacity_bytes.max(1);
    ctx.bind_to_thread()
        .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))?;
    // SAFETY: the context is current on this thread; the result is checked.
    let base = unsafe { cudarc::driver::result::malloc_sync(bytes) }.map_err(|e| {
        if e.0 != sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            return CudaError::driver("cuMemAlloc (device arena)", e);
        }
        let (free_bytes, total_bytes) = ctx.mem_get_info().unwrap_or((0, 0));
        CudaError::DeviceOutOfMemory {
            requested_bytes: bytes,
            free_bytes,
            total_bytes,
        }
    })?;
    let owner = DeviceAllocation {
        ctx: ctx.clone(),
        base,
    };
    // SAFETY: `bytes` bytes at `base` stay allocated until `owner` drops.
    Ok(unsafe { Memory::new(base, bytes, Location::Cuda, Box::new(owner)) })
}
