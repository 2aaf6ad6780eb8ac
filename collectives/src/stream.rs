//! Streaming (non-temporal) stores: writes that go to memory instead of staying in this core's
//! cache, so a later write does not first have to take the lines back from readers' caches.

/// How a copy or reduction writes its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stores {
    /// Ordinary stores: the lines stay in this core's cache.
    Plain,
    /// Non-temporal stores, fenced at the end of the call.
    Streaming,
}

impl Stores {
    /// Copies `len` bytes the chosen way.
    ///
    /// # Safety
    /// As [`copy_streaming`].
    pub(crate) unsafe fn copy(self, src: *const u8, dst: *mut u8, len: usize) {
        match self {
            // SAFETY: forwarded from the caller.
            Stores::Plain => unsafe { std::ptr::copy_nonoverlapping(src, dst, len) },
            // SAFETY: forwarded from the caller.
            Stores::Streaming => unsafe { copy_streaming(src, dst, len) },
        }
    }
}

/// Copies `len` bytes with non-temporal stores for the 16-byte-aligned middle, then fences so the
/// stores are ordered before whatever the caller does next (a barrier's release).
///
/// # Safety
/// Both pointers valid for `len` bytes, not overlapping, and not written by anyone else meanwhile.
pub(crate) unsafe fn copy_streaming(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: forwarded from the caller.
    unsafe { copy_streaming_unfenced(src, dst, len) };
    fence();
}

/// Orders earlier streaming stores before later stores (x86 `sfence`; a no-op elsewhere, where
/// the copies are plain).
pub(crate) fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is part of x86_64; sfence has no preconditions.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// [`copy_streaming`] without the fence, for callers that copy several pieces and fence once.
///
/// # Safety
/// As [`copy_streaming`].
pub(crate) unsafe fn copy_streaming_unfenced(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let head = dst.align_offset(16).min(len);
        let body_end = head + (len - head) / 64 * 64;
        // SAFETY: forwarded from the caller; head <= len.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, head) };
        let mut i = head;
        while i < body_end {
            // SAFETY: i + 64 <= len; dst + i is 16-byte aligned; SSE2 is part of x86_64.
            unsafe {
                let s = src.add(i).cast::<__m128i>();
                let d = dst.add(i).cast::<__m128i>();
                let (a, b, c, e) = (
                    _mm_loadu_si128(s),
                    _mm_loadu_si128(s.add(1)),
                    _mm_loadu_si128(s.add(2)),
                    _mm_loadu_si128(s.add(3)),
                );
                _mm_stream_si128(d, a);
                _mm_stream_si128(d.add(1), b);
                _mm_stream_si128(d.add(2), c);
                _mm_stream_si128(d.add(3), e);
            }
            i += 64;
        }
        // SAFETY: the tail [i, len) is within both buffers.
        unsafe { std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: forwarded from the caller.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, len)
    }
}

#[cfg(test)]
mod tests {
    use super::copy_streaming;

    #[test]
    fn copies_every_byte_at_any_alignment_and_length() {
        let src: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        for (from, to, len) in [
            (0, 0, 4000),
            (1, 5, 3000),
            (3, 16, 64),
            (0, 7, 15),
            (2, 0, 0),
        ] {
            let mut dst = vec![0u8; 4096];
            // SAFETY: both ranges lie inside their vectors, which do not overlap.
            unsafe { copy_streaming(src[from..].as_ptr(), dst[to..].as_mut_ptr(), len) };
            assert_eq!(&dst[to..to + len], &src[from..from + len]);
            assert!(dst[..to].iter().chain(&dst[to + len..]).all(|&b| b == 0));
        }
    }
}
