//! Page-locking existing host memory with `cuMemHostRegister`.
//!
//! The offload crate allocates 4 KiB-aligned host buffers once at start-up; registering them
//! in place (instead of cudarc's `alloc_pinned`, which is write-combined and slow for the CPU
//! to read) makes H2D/D2H copies run at DMA speed while io_uring uses the very same buffers
//! for O_DIRECT.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};

use super::error::{ensure, CudaError, Result};

/// Alignment and size granularity required of registered regions.
pub const PINNED_ALIGN_BYTES: usize = 4096;

/// A host address range page-locked for DMA; unregistered on drop.
pub struct PinnedRegion {
    ctx: Arc<CudaContext>,
    ptr: *mut u8,
    len_bytes: usize,
}

// SAFETY: the region is an address range plus a context handle; registration state is
// process-wide in the driver and may be released from any thread.
unsafe impl Send for PinnedRegion {}
// SAFETY: &PinnedRegion only exposes the address range, never the memory itself.
unsafe impl Sync for PinnedRegion {}

impl std::fmt::Debug for PinnedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinnedRegion({:p}, {} bytes)", self.ptr, self.len_bytes)
    }
}

impl PinnedRegion {
    /// Page-locks `len_bytes` at `ptr` (both multiples of 4 KiB) for all contexts
    /// (CU_MEMHOSTREGISTER_PORTABLE). Fails with the driver's reason, e.g. when RLIMIT_MEMLOCK
    /// or the memory itself does not allow it.
    ///
    /// # Safety
    /// `ptr..ptr+len_bytes` must be a live allocation that outlives the returned region and is
    /// not registered already; the memory is not freed before the region is dropped.
    pub unsafe fn register(ctx: &Arc<CudaContext>, ptr: *mut u8, len_bytes: usize) -> Result<Self> {
        ensure(
            !ptr.is_null() && len_bytes > 0,
            "PinnedRegion::register",
            || "null pointer or empty range".into(),
        )?;
        ensure(
            (ptr as usize) % PINNED_ALIGN_BYTES == 0 && len_bytes % PINNED_ALIGN_BYTES == 0,
            "PinnedRegion::register",
            || format!("{ptr:p} + {len_bytes} bytes is not 4 KiB aligned"),
        )?;
        ctx.bind_to_thread()
            .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))?;
        // SAFETY: the caller guarantees the range is a live, unregistered allocation that
        // outlives this region; the flags request plain (not write-combined) portable pinning.
        unsafe {
            sys::cuMemHostRegister_v2(
                ptr.cast::<c_void>(),
                len_bytes,
                sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        }
        .result()
        .map_err(|e| CudaError::driver("cuMemHostRegister", e))?;
        Ok(PinnedRegion {
            ctx: ctx.clone(),
            ptr,
            len_bytes,
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }
}

impl Drop for PinnedRegion {
    fn drop(&mut self) {
        if let Err(e) = self.ctx.bind_to_thread() {
            tracing::warn!(error = ?e, "pinned region: cannot bind context to unregister");
            return;
        }
        // In-flight copies from this range must finish before it is unpinned.
        if let Err(e) = self.ctx.synchronize() {
            tracing::warn!(error = ?e, "pinned region: synchronize before unregister failed");
        }
        // SAFETY: ptr was registered by `register` and is unregistered exactly once.
        let status = unsafe { sys::cuMemHostUnregister(self.ptr.cast::<c_void>()) };
        if let Err(e) = status.result() {
            tracing::warn!(error = ?e, "pinned region: cuMemHostUnregister failed");
        }
    }
}

/// Page-locks host buffers with `cuMemHostRegister`: the offload pool's registrar hook, for
/// the engine's host tier and the bandwidth self-test.
pub struct CudaRegistrar {
    ctx: std::sync::Arc<cudarc::driver::CudaContext>,
    regions: std::sync::Mutex<Vec<PinnedRegion>>,
}

impl CudaRegistrar {
    pub fn new(ctx: std::sync::Arc<cudarc::driver::CudaContext>) -> CudaRegistrar {
        CudaRegistrar {
            ctx,
            regions: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl strata_offload::Registrar for CudaRegistrar {
    fn name(&self) -> &str {
        "cuMemHostRegister"
    }

    // The Registrar contract: the pool passes only slabs it owns and keeps mapped until
    // `unregister`; this is not a general-purpose entry point.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    fn register(&self, ptr: *mut u8, len: usize) -> std::result::Result<(), String> {
        // SAFETY: the pool calls this once per slab it owns, and `unregister` before it unmaps
        // the slab; the region is dropped (unregistered) there.
        let region =
            unsafe { PinnedRegion::register(&self.ctx, ptr, len) }.map_err(|e| e.to_string())?;
        self.regions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(region);
        Ok(())
    }

    fn unregister(&self, ptr: *mut u8, _len: usize) {
        self.regions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|r| r.as_ptr() != ptr);
    }
}
