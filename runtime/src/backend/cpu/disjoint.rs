//! A slice that several rayon tasks write at once, each only at elements no other task touches
//! (rows of one head, strided rows of a packed tensor): the tasks' ranges are disjoint by the
//! caller's construction, which the borrow checker cannot see.

use std::marker::PhantomData;

#[derive(Clone, Copy)]
pub struct Disjoint<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: elements are reached only through `range`, whose callers guarantee that no two
// tasks (and no two live slices) cover one element; the pointer stays valid for 'a.
unsafe impl Send for Disjoint<'_> {}
// SAFETY: as above.
unsafe impl Sync for Disjoint<'_> {}

impl<'a> Disjoint<'a> {
    pub fn new(s: &'a mut [f32]) -> Disjoint<'a> {
        Disjoint {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _borrow: PhantomData,
        }
    }

    /// Elements `start..start + n`.
    ///
    /// # Safety
    /// No other live slice, in this task or another, covers any of these elements.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, start: usize, n: usize) -> &mut [f32] {
        assert!(start + n <= self.len, "range {start}+{n} past {}", self.len);
        // SAFETY: in bounds (asserted), valid for 'a, unaliased per this function's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), n) }
    }
}
