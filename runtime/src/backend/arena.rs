//! One allocation of device memory sized at start-up, and typed views into it.
//!
//! The engine sizes the arena with a dry run: the same allocation code runs first against
//! [`Arena::counting`], which hands out views with no memory behind them and records what each
//! allocation is for; the device then allocates exactly that many bytes and the code runs again
//! against the real arena. `alloc` bumps an offset (256-byte aligned); `mark`/`reset_to`
//! release everything allocated after a mark. Views are plain handles, like llm.c's pointers:
//! which queue may read or write them when is the engine's schedule, enforced with events;
//! the arena only guarantees bounds and that the memory outlives every view.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::device::{ensure, DType, DeviceError, Result};

/// Alignment of every allocation: enough for 128-bit vector loads and cuBLAS.
pub const ARENA_ALIGN_BYTES: usize = 256;

/// Where an arena's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// Host memory (the CPU backend's device memory).
    Host,
    /// CUDA device memory.
    Cuda,
}

/// The memory behind an arena: a base address and an owner that frees it when dropped.
pub struct Memory {
    base: u64,
    len_bytes: usize,
    location: Location,
    _owner: Box<dyn Any + Send + Sync>,
}

impl Memory {
    /// # Safety
    /// `base..base + len_bytes` must be memory of `location` that stays valid for as long as
    /// `owner` lives, and nothing else may free it.
    pub unsafe fn new(
        base: u64,
        len_bytes: usize,
        location: Location,
        owner: Box<dyn Any + Send + Sync>,
    ) -> Memory {
        Memory {
            base,
            len_bytes,
            location,
            _owner: owner,
        }
    }
}

#[derive(Debug, Default)]
struct Fill {
    used_bytes: usize,
    peak_bytes: usize,
    /// Bytes handed out per purpose since the arena was made (for "what takes the memory").
    ledger: BTreeMap<&'static str, usize>,
}

/// A bump allocator over one `Memory`, or a counter of what a real one would need.
pub struct Arena {
    memory: Option<Arc<Memory>>,
    capacity_bytes: usize,
    fill: Mutex<Fill>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("counting", &self.memory.is_none())
            .field("capacity_bytes", &self.capacity_bytes)
            .field("used_bytes", &self.used_bytes())
            .finish()
    }
}

fn padded(bytes: usize) -> usize {
    bytes.div_ceil(ARENA_ALIGN_BYTES).max(1) * ARENA_ALIGN_BYTES
}

impl Arena {
    /// An arena without memory that only counts: the dry run. Its views must never reach an
    /// operation (they have no memory; devices refuse them).
    pub fn counting() -> Arena {
        Arena {
            memory: None,
            capacity_bytes: usize::MAX,
            fill: Mutex::new(Fill::default()),
        }
    }

    /// An arena over `memory`.
    pub fn new(memory: Memory) -> Arena {
        Arena {
            capacity_bytes: memory.len_bytes,
            memory: Some(Arc::new(memory)),
            fill: Mutex::new(Fill::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Fill> {
        self.fill.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_counting(&self) -> bool {
        self.memory.is_none()
    }

    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }

    pub fn used_bytes(&self) -> usize {
        self.lock().used_bytes
    }

    /// The most bytes in use at once: what a real arena for this plan needs.
    pub fn peak_bytes(&self) -> usize {
        self.lock().peak_bytes
    }

    /// Bytes allocated per purpose, largest first.
    pub fn ledger(&self) -> Vec<(&'static str, usize)> {
        let mut rows: Vec<_> = self.lock().ledger.iter().map(|(k, v)| (*k, *v)).collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        rows
    }

    /// A view of `numel` elements of `dtype`; `what` names it in errors and in the ledger.
    pub fn alloc(&self, what: &'static str, dtype: DType, numel: usize) -> Result<Buf> {
        let size = numel
            .checked_mul(dtype.size_bytes())
            .ok_or_else(|| DeviceError::op("Arena::alloc", format!("{what}: size overflows")))?;
        let mut fill = self.lock();
        let offset = fill.used_bytes;
        let end = offset
            .checked_add(padded(size))
            .filter(|&e| e <= self.capacity_bytes)
            .ok_or(DeviceError::ArenaExhausted {
                what,
                requested_bytes: size,
                used_bytes: offset,
                capacity_bytes: self.capacity_bytes,
            })?;
        fill.used_bytes = end;
        fill.peak_bytes = fill.peak_bytes.max(end);
        *fill.ledger.entry(what).or_default() += padded(size);
        Ok(Buf {
            memory: self.memory.clone(),
            offset_bytes: offset,
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
        let mut fill = self.lock();
        let used = fill.used_bytes;
        ensure(mark <= used, "Arena::reset_to", || {
            format!("mark {mark} is beyond the fill level {used}")
        })?;
        fill.used_bytes = mark;
        Ok(())
    }
}

/// A typed range of an arena: (offset, element count, dtype). Cheap to clone; keeps the arena's
/// memory alive.
#[derive(Clone)]
pub struct Buf {
    memory: Option<Arc<Memory>>,
    offset_bytes: usize,
    numel: usize,
    dtype: DType,
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Buf({} x {} @ +{}{})",
            self.numel,
            self.dtype.name(),
            self.offset_bytes,
            if self.memory.is_none() {
                ", dry run"
            } else {
                ""
            }
        )
    }
}

impl Buf {
    /// Address of the first element (a host pointer on the CPU backend, a CUdeviceptr on CUDA).
    /// 0 for a view of a counting arena, which devices refuse (see `check_live`).
    pub fn ptr(&self) -> u64 {
        self.memory
            .as_ref()
            .map_or(0, |m| m.base + self.offset_bytes as u64)
    }

    pub fn location(&self) -> Option<Location> {
        self.memory.as_ref().map(|m| m.location)
    }

    /// Fails for a view of a counting arena (the dry run) or of another kind of memory.
    pub fn check_live(&self, op: &'static str, location: Location) -> Result<()> {
        ensure(self.location() == Some(location), op, || {
            format!(
                "{self:?} is not {location:?} memory of a live arena (a dry-run view, or another device's)"
            )
        })
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
    pub fn slice(&self, start: usize, len: usize) -> Result<Buf> {
        let end = start.checked_add(len);
        ensure(end.is_some_and(|e| e <= self.numel), "Buf::slice", || {
            format!(
                "[{start}, {start}+{len}) outside a buffer of {} elements",
                self.numel
            )
        })?;
        Ok(Buf {
            memory: self.memory.clone(),
            offset_bytes: self.offset_bytes + start * self.dtype.size_bytes(),
            numel: len,
            dtype: self.dtype,
        })
    }

    /// The same bytes seen as another element type.
    pub fn reinterpret(&self, dtype: DType) -> Result<Buf> {
        let bytes = self.size_bytes();
        ensure(
            bytes % dtype.size_bytes() == 0 && self.offset_bytes % dtype.size_bytes() == 0,
            "Buf::reinterpret",
            || {
                format!(
                    "{bytes} bytes at +{} cannot be viewed as {}",
                    self.offset_bytes,
                    dtype.name()
                )
            },
        )?;
        Ok(Buf {
            memory: self.memory.clone(),
            offset_bytes: self.offset_bytes,
            numel: bytes / dtype.size_bytes(),
            dtype,
        })
    }

    /// Whether both views are of the same arena memory (views of counting arenas count as one
    /// memory: they are only ever compared, never used).
    fn same_memory(&self, other: &Buf) -> bool {
        match (&self.memory, &other.memory) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }

    /// Whether two views overlap in memory.
    pub fn overlaps(&self, other: &Buf) -> bool {
        if !self.same_memory(other) || self.is_empty() || other.is_empty() {
            return false;
        }
        let (a0, a1) = (self.offset_bytes, self.offset_bytes + self.size_bytes());
        let (b0, b1) = (other.offset_bytes, other.offset_bytes + other.size_bytes());
        a0 < b1 && b0 < a1
    }

    /// Whether two views are the very same range.
    pub fn same_range(&self, other: &Buf) -> bool {
        self.same_memory(other)
            && self.offset_bytes == other.offset_bytes
            && self.size_bytes() == other.size_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counting_arena_measures_what_a_real_one_needs() {
        let counting = Arena::counting();
        let a = counting.alloc("a", DType::F32, 10).unwrap();
        let mark = counting.mark();
        counting.alloc("b", DType::Bf16, 1000).unwrap();
        counting.reset_to(mark).unwrap();
        counting.alloc("c", DType::F32, 3).unwrap();
        assert_eq!(counting.used_bytes(), 2 * ARENA_ALIGN_BYTES);
        assert_eq!(counting.peak_bytes(), ARENA_ALIGN_BYTES + 2048);
        assert_eq!(counting.ledger()[0], ("b", 2048));
        assert_eq!(a.ptr(), 0);
        assert!(a.check_live("test", Location::Host).is_err());
    }

    #[test]
    fn views_slice_and_detect_overlap() {
        let storage = vec![0u64; 1024];
        let base = storage.as_ptr() as u64;
        // SAFETY: the vector lives in the owner box for as long as the memory.
        let memory = unsafe { Memory::new(base, 8192, Location::Host, Box::new(storage)) };
        let arena = Arena::new(memory);
        let a = arena.alloc("a", DType::F32, 100).unwrap();
        let b = arena.alloc("b", DType::F32, 100).unwrap();
        assert_eq!(b.ptr() - a.ptr(), ARENA_ALIGN_BYTES as u64 * 2);
        assert!(!a.overlaps(&b));
        assert!(a.slice(10, 20).unwrap().overlaps(&a));
        assert!(a.slice(90, 20).is_err());
        assert!(a.same_range(&a.slice(0, 100).unwrap()));
        let err = arena
            .alloc("big", DType::F32, 4096)
            .unwrap_err()
            .to_string();
        assert!(err.contains("big") && err.contains("8192"), "{err}");
    }
}
