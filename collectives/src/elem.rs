//! Element types the collectives move: f32 and bf16 (bf16 sums accumulate in f32).

use half::bf16;

use crate::stream::{copy_streaming_unfenced, fence, Stores};

/// The element type of a buffer, for the object-safe byte-level entry points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }

    /// The short name used in logs and benchmark output.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// An element type a collective can carry. Sealed: f32 and bf16.
pub trait Element: sealed::Sealed + bytemuck::Pod + Send + Sync + 'static {
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}

impl Element for bf16 {
    const DTYPE: DType = DType::Bf16;
}

/// Elements per block of the blocked reductions (fits in L1 as f32).
const BLOCK_ELEMS: usize = 2048;

/// Widens bf16 to f32 (exact).
#[inline]
pub(crate) fn bf16_to_f32(x: u16) -> f32 {
    f32::from_bits(u32::from(x) << 16)
}

/// Rounds f32 to bf16, nearest-even; NaN stays NaN (same as `half::bf16::from_f32`).
#[inline]
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

/// Widens a bf16 byte slice into f32s. `dst.len() * 2 == src.len()`.
pub(crate) fn widen_bf16(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len() * 2, "widen_bf16: length mismatch");
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = bf16_to_f32(u16::from_ne_bytes([s[0], s[1]]));
    }
}

/// Rounds f32s into a bf16 byte slice. `dst.len() == src.len() * 2`.
pub(crate) fn narrow_to_bf16(src: &[f32], dst: &mut [u8]) {
    assert_eq!(dst.len(), src.len() * 2, "narrow_to_bf16: length mismatch");
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
        d.copy_from_slice(&f32_to_bf16(*s).to_ne_bytes());
    }
}

/// `dst[i] = sum_j srcs[j][i]`, accumulated in f32 in the order of `srcs`, then stored as `dtype`.
/// All slices are byte views of `dtype` elements with the same length as `dst`.
#[cfg(test)]
pub(crate) fn sum_into(dtype: DType, srcs: &[&[u8]], dst: &mut [u8]) {
    assert!(
        srcs.iter().all(|s| s.len() == dst.len()),
        "sum_into: length mismatch"
    );
    let ptrs: Vec<*const u8> = srcs.iter().map(|s| s.as_ptr()).collect();
    // SAFETY: every source is a live slice of dst.len() bytes and `dst` is a unique borrow, so no
    // source overlaps it; the pointers are only read for that length.
    unsafe { sum_into_raw(dtype, &ptrs, dst.as_mut_ptr(), dst.len(), Stores::Plain) }
}

/// Like `sum_into` on raw pointers, writing `dst` with `stores`; `dst` may be one of the sources
/// (each block is read in full before it is written).
///
/// # Safety
/// Every source and `dst` must be valid for `len` bytes, and no other thread or process may write
/// them (or read `dst`) during the call.
pub(crate) unsafe fn sum_into_raw(
    dtype: DType,
    srcs: &[*const u8],
    dst: *mut u8,
    len: usize,
    stores: Stores,
) {
    let elem = dtype.size_bytes();
    assert!(!srcs.is_empty(), "sum_into: no sources");
    assert_eq!(len % elem, 0, "sum_into: partial element");
    let n_elems = len / elem;
    let mut acc = [0f32; BLOCK_ELEMS];
    let mut start = 0;
    while start < n_elems {
        let count = BLOCK_ELEMS.min(n_elems - start);
        let acc = &mut acc[..count];
        let (offset, bytes) = (start * elem, count * elem);
        // SAFETY: the caller guarantees every pointer is valid for `len` bytes and unaliased by
        // writers; offset + bytes <= len. The shared slices end before the mutable one is made.
        unsafe {
            load_f32(
                dtype,
                std::slice::from_raw_parts(srcs[0].add(offset), bytes),
                acc,
            );
            for src in &srcs[1..] {
                add_f32(
                    dtype,
                    std::slice::from_raw_parts(src.add(offset), bytes),
                    acc,
                );
            }
            match stores {
                Stores::Plain => store_f32(
                    dtype,
                    acc,
                    std::slice::from_raw_parts_mut(dst.add(offset), bytes),
                ),
                Stores::Streaming => {
                    let mut out = [0u8; BLOCK_ELEMS * 4];
                    store_f32(dtype, acc, &mut out[..bytes]);
                    copy_streaming_unfenced(out.as_ptr(), dst.add(offset), bytes);
                }
            }
        }
        start += count;
    }
    if stores == Stores::Streaming {
        fence();
    }
}

fn load_f32(dtype: DType, src: &[u8], acc: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (a, s) in acc.iter_mut().zip(src.chunks_exact(4)) {
                *a = f32::from_ne_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        DType::Bf16 => widen_bf16(src, acc),
    }
}

fn add_f32(dtype: DType, src: &[u8], acc: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (a, s) in acc.iter_mut().zip(src.chunks_exact(4)) {
                *a += f32::from_ne_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        DType::Bf16 => {
            for (a, s) in acc.iter_mut().zip(src.chunks_exact(2)) {
                *a += bf16_to_f32(u16::from_ne_bytes([s[0], s[1]]));
            }
        }
    }
}

fn store_f32(dtype: DType, acc: &[f32], dst: &mut [u8]) {
    match dtype {
        DType::F32 => {
            for (a, d) in acc.iter().zip(dst.chunks_exact_mut(4)) {
                d.copy_from_slice(&a.to_ne_bytes());
            }
        }
        DType::Bf16 => narrow_to_bf16(acc, dst),
    }
}

/// `acc[i] += src[i]` for f32 accumulators (the tcp ring's partial sums).
pub(crate) fn add_assign_f32(acc: &mut [f32], src: &[f32]) {
    assert_eq!(acc.len(), src.len(), "add_assign_f32: length mismatch");
    for (a, s) in acc.iter_mut().zip(src) {
        *a += *s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_sum_accumulates_in_f32() {
        // 256 + 1 + 1 + 1: bf16 accumulation would stay at 256; f32 gives 259 -> bf16 260.
        let vals = [256.0f32, 1.0, 1.0, 1.0].map(|v| bf16::from_f32(v).to_bits().to_ne_bytes());
        let srcs: Vec<&[u8]> = vals.iter().map(|v| &v[..]).collect();
        let mut out = [0u8; 2];
        sum_into(DType::Bf16, &srcs, &mut out);
        assert_eq!(bf16::from_bits(u16::from_ne_bytes(out)).to_f32(), 260.0);
    }

    #[test]
    fn streaming_stores_write_the_same_sums() {
        let n = BLOCK_ELEMS * 3 + 5;
        for dtype in [DType::F32, DType::Bf16] {
            let bytes = n * dtype.size_bytes();
            let a: Vec<u8> = (0..bytes).map(|i| (i % 61) as u8).collect();
            let b: Vec<u8> = (0..bytes).map(|i| (i % 37) as u8).collect();
            let mut plain = vec![0u8; bytes];
            sum_into(dtype, &[&a, &b], &mut plain);
            // One byte in, so the streaming copy has an unaligned head and a tail.
            let mut streamed = vec![0u8; bytes + 1];
            // SAFETY: sources and destination are live, distinct vectors of at least `bytes`.
            unsafe {
                sum_into_raw(
                    dtype,
                    &[a.as_ptr(), b.as_ptr()],
                    streamed[1..].as_mut_ptr(),
                    bytes,
                    Stores::Streaming,
                )
            };
            assert_eq!(plain, streamed[1..], "{dtype:?}");
        }
    }

    #[test]
    fn f32_sum_over_blocks() {
        let n = BLOCK_ELEMS * 2 + 7;
        let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..n).map(|i| 2.0 * i as f32).collect();
        let mut out = vec![0f32; n];
        sum_into(
            DType::F32,
            &[bytemuck::cast_slice(&a), bytemuck::cast_slice(&b)],
            bytemuck::cast_slice_mut(&mut out),
        );
        assert!(out.iter().enumerate().all(|(i, v)| *v == 3.0 * i as f32));
    }
}
