//! `HostMem`: a buffer of the engine's host pool shared by queue jobs, as device buffers are:
//! which queue reads or writes it when is the engine's schedule, enforced with events. An I/O
//! takes the buffer itself while in flight (the swap store owns what the kernel writes into) and
//! puts it back when it is complete.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use strata_offload::HostBuf;

use crate::backend::DeviceError;

/// A host buffer of `len` bytes (4 KiB-aligned, from the engine's pool).
#[derive(Clone)]
pub struct HostMem {
    slot: Arc<Mutex<Option<HostBuf>>>,
    ptr: usize,
    len: usize,
}

impl std::fmt::Debug for HostMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostMem({} bytes @ {:#x})", self.len, self.ptr)
    }
}

impl HostMem {
    pub fn new(mut buf: HostBuf) -> HostMem {
        let (ptr, len) = (buf.as_mut_ptr() as usize, buf.len());
        HostMem {
            slot: Arc::new(Mutex::new(Some(buf))),
            ptr,
            len,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<HostBuf>> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether both are the same buffer.
    pub fn same(&self, other: &HostMem) -> bool {
        self.ptr == other.ptr
    }

    /// The buffer itself, for an I/O that owns it while in flight.
    pub fn take(&self) -> Result<HostBuf, DeviceError> {
        self.lock().take().ok_or_else(|| {
            DeviceError::op(
                "host buffer",
                format!("{self:?} is held by an I/O that has not completed"),
            )
        })
    }

    /// Returns the buffer after its I/O completed.
    pub fn put(&self, buf: HostBuf) {
        *self.lock() = Some(buf);
    }

    /// The bytes.
    ///
    /// # Safety
    /// No I/O holds the buffer and no queue job writes it while the slice lives: the queues order
    /// every use of a host buffer with events, as for device buffers.
    pub unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: per this function's contract; the pool memory outlives `self` (the HostBuf is
        // owned by the slot this value keeps alive).
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }

    /// The bytes, mutably.
    ///
    /// # Safety
    /// As [`HostMem::bytes`], and no other slice of these bytes exists while this one lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: per this function's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.len) }
    }

    /// The first `n` f32 values.
    ///
    /// # Safety
    /// As [`HostMem::bytes`]; `4·n` ≤ the buffer's length.
    pub unsafe fn f32s(&self, n: usize) -> &[f32] {
        assert!(4 * n <= self.len, "{self:?} holds fewer than {n} f32");
        // SAFETY: the pool's buffers are 4 KiB-aligned; per this function's contract.
        unsafe { std::slice::from_raw_parts(self.ptr as *const f32, n) }
    }

    /// The first `n` f32 values, mutably.
    ///
    /// # Safety
    /// As [`HostMem::bytes_mut`]; `4·n` ≤ the buffer's length.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn f32s_mut(&self, n: usize) -> &mut [f32] {
        assert!(4 * n <= self.len, "{self:?} holds fewer than {n} f32");
        // SAFETY: as in f32s.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut f32, n) }
    }
}
