//! `HostMem`: a buffer of the engine's host pool shared by queue jobs, as device buffers are:
//! which queue reads or writes it when is the engine's schedule, enforced with events. An I/O
//! takes the buffer itself while in flight (the swap store owns what the kernel writes into) and
//! puts it back when it is complete. Its typed views (f32, Adam's moments in their storage type,
//! 16-bit compute weights) are the only unsafe reads and writes of host states.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use half::slice::HalfFloatSliceExt;
use strata_offload::HostBuf;

use crate::backend::cpu::adamw::{Cast, Moments};
use crate::backend::{DType, DeviceError};
use crate::config::MomentsDtype;

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

    /// Elements `r` of Adam's moments stored as `dtype`.
    ///
    /// # Safety
    /// As [`HostMem::bytes_mut`].
    pub unsafe fn moments(&self, dtype: MomentsDtype, r: Range<usize>) -> Moments<'_> {
        // SAFETY: per this function's contract.
        let bytes = unsafe { self.bytes_mut() };
        match dtype {
            MomentsDtype::Fp32 => {
                let all: &mut [f32] = bytemuck::cast_slice_mut(&mut bytes[..4 * r.end]);
                Moments::F32(&mut all[r])
            }
            MomentsDtype::Bf16 => {
                let all: &mut [half::bf16] = bytemuck::cast_slice_mut(&mut bytes[..2 * r.end]);
                Moments::Bf16(&mut all[r])
            }
        }
    }

    /// The first `out.len()` moments stored as `dtype`, as f32.
    ///
    /// # Safety
    /// As [`HostMem::bytes`].
    pub unsafe fn read_moments(&self, dtype: MomentsDtype, out: &mut [f32]) {
        // SAFETY: per this function's contract.
        let bytes = unsafe { self.bytes() };
        match dtype {
            MomentsDtype::Fp32 => {
                out.copy_from_slice(bytemuck::cast_slice(&bytes[..4 * out.len()]));
            }
            MomentsDtype::Bf16 => {
                let all: &[half::bf16] = bytemuck::cast_slice(&bytes[..2 * out.len()]);
                all.convert_to_f32_slice(out);
            }
        }
    }

    /// f32 `values` into the first moments stored as `dtype` (bf16: rounded to nearest; exact
    /// for values that came from bf16).
    ///
    /// # Safety
    /// As [`HostMem::bytes_mut`].
    pub unsafe fn write_moments(&self, dtype: MomentsDtype, values: &[f32]) {
        // SAFETY: per this function's contract.
        let bytes = unsafe { self.bytes_mut() };
        match dtype {
            MomentsDtype::Fp32 => {
                bytemuck::cast_slice_mut(&mut bytes[..4 * values.len()]).copy_from_slice(values)
            }
            MomentsDtype::Bf16 => {
                let dst: &mut [half::bf16] =
                    bytemuck::cast_slice_mut(&mut bytes[..2 * values.len()]);
                dst.convert_from_f32_slice(values);
            }
        }
    }

    /// Elements `r` of 16-bit compute weights (X), for AdamW to round its update into (none for
    /// f32, whose compute weights the update writes itself).
    ///
    /// # Safety
    /// As [`HostMem::bytes_mut`].
    pub unsafe fn compute_cast(&self, x: DType, r: Range<usize>) -> Cast<'_> {
        // SAFETY: per this function's contract.
        let bytes = unsafe { self.bytes_mut() };
        match x {
            DType::Bf16 => {
                let all: &mut [half::bf16] = bytemuck::cast_slice_mut(&mut bytes[..2 * r.end]);
                Cast::Bf16(&mut all[r])
            }
            DType::F16 => {
                let all: &mut [half::f16] = bytemuck::cast_slice_mut(&mut bytes[..2 * r.end]);
                Cast::F16(&mut all[r])
            }
            _ => Cast::None,
        }
    }

    /// `values[r]` rounded to the compute type `x` into elements `r` (nothing to do when this is
    /// `values`' own memory: fp32 compute weights that are the master weights).
    ///
    /// # Safety
    /// As [`HostMem::bytes_mut`].
    pub unsafe fn write_compute(&self, x: DType, values: &[f32], r: Range<usize>) {
        if self.ptr == values.as_ptr() as usize {
            // fp32 compute weights that are the master weights themselves: already written.
            debug_assert_eq!(x, DType::F32);
            return;
        }
        // SAFETY: per this function's contract; `values` is other memory (checked above).
        let bytes = unsafe { self.bytes_mut() };
        let src = &values[r.clone()];
        match x {
            DType::Bf16 => {
                let dst: &mut [half::bf16] = bytemuck::cast_slice_mut(&mut bytes[..2 * r.end]);
                dst[r].convert_from_f32_slice(src);
            }
            DType::F16 => {
                let dst: &mut [half::f16] = bytemuck::cast_slice_mut(&mut bytes[..2 * r.end]);
                dst[r].convert_from_f32_slice(src);
            }
            _ => {
                let dst: &mut [f32] = bytemuck::cast_slice_mut(&mut bytes[..4 * r.end]);
                dst[r].copy_from_slice(src);
            }
        }
    }
}
