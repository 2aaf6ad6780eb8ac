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

    /// Whether `bytes` lies entirely inside this region (so a copy of it runs as pinned DMA).
    pub fn contains(&self, bytes: &[u8]) -> bool {
        let start = bytes.as_ptr() as usize;
        let base = self.ptr as usize;
        start >= base && start + bytes.len() <= base + self.len_bytes
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

/// A 4 KiB-aligned host buffer owned here (for the bandwidth self-test and tools; the engine
/// uses the offload crate's pool). Zero-initialized.
pub struct AlignedHostBuffer {
    ptr: *mut u8,
    len_bytes: usize,
}

// SAFETY: a uniquely owned heap allocation, like Vec<u8>.
unsafe impl Send for AlignedHostBuffer {}
// SAFETY: shared access only yields &[u8].
unsafe impl Sync for AlignedHostBuffer {}

impl AlignedHostBuffer {
    pub fn new(len_bytes: usize) -> Result<Self> {
        let len_bytes = len_bytes.div_ceil(PINNED_ALIGN_BYTES).max(1) * PINNED_ALIGN_BYTES;
        let layout = std::alloc::Layout::from_size_align(len_bytes, PINNED_ALIGN_BYTES)
            .map_err(|e| CudaError::precondition("AlignedHostBuffer::new", e.to_string()))?;
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(CudaError::precondition(
                "AlignedHostBuffer::new",
                format!("host allocation of {len_bytes} bytes failed"),
            ));
        }
        Ok(AlignedHostBuffer { ptr, len_bytes })
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live, initialized allocation of len_bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len_bytes) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len_bytes) }
    }

    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }
}

impl Drop for AlignedHostBuffer {
    fn drop(&mut self) {
        // SAFETY: same layout as in `new`, which succeeded; freed exactly once.
        unsafe {
            let layout =
                std::alloc::Layout::from_size_align_unchecked(self.len_bytes, PINNED_ALIGN_BYTES);
            std::alloc::dealloc(self.ptr, layout);
        }
    }
}
