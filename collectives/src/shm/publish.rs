//! How ranks write what other ranks read in the reductions: plain or streaming stores.
//!
//! With plain stores a slot's lines stay in the writer's cache; a reader on a core that shares
//! that cache gets them from there, but the next write to the slot must first take the lines
//! back from every reader's cache, and where the cores share no cache each of those is a
//! cross-chip round trip. Streaming stores send the lines to memory instead and readers read
//! memory: the same speed in both placements. Measured on the 2-vCPU dev VM (64 MiB all_reduce
//! busbw): with a shared cache plain 4.4 GB/s and streaming 2.8 (4 ranks), 6.7 and 3.5 (2 ranks);
//! without one plain 1.5 and streaming 2.8 (4 ranks), 1.5 and 3.5 (2 ranks). The hypervisor moves
//! vCPUs between those placements within seconds, and real hosts put ranks on different chiplets,
//! so neither can be fixed. Timing a rank's own copies does not tell them apart (the cost lands
//! on the readers), so rank 0 times whole calls (`crate::choose`) and publishes its choice for
//! the next call in the segment header. The choice changes only speed (the bytes in the slots
//! are the same either way), so a rank that reads it a call late is harmless.

use crate::choose::Chooser;
use crate::stream::Stores;

/// Rank 0's chooser for one reduction: plain stores first.
pub(super) fn chooser() -> Chooser<Stores> {
    Chooser::new(Stores::Plain, Stores::Streaming)
}

/// The header word for a choice.
pub(super) fn encode(stores: Stores) -> u32 {
    match stores {
        Stores::Plain => 0,
        Stores::Streaming => 1,
    }
}

/// The choice a header word holds (zero, the segment's initial value, is plain).
pub(super) fn decode(word: u32) -> Stores {
    if word == 1 {
        Stores::Streaming
    } else {
        Stores::Plain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_words_round_trip() {
        for s in [Stores::Plain, Stores::Streaming] {
            assert_eq!(decode(encode(s)), s);
        }
        assert_eq!(decode(0), Stores::Plain);
    }
}
