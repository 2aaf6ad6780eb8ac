//! ZeRO partitioning: how each unit's flat buffers split across the data-parallel ranks, and
//! which state classes are whole or sharded at each stage (DeepSpeed's definitions).
//!
//! A unit of `numel` elements is padded to a multiple of `world × SHARD_ALIGN`; rank r owns
//! elements `[r·s, (r+1)·s)` with `s = padded / world`, for every state class. The padding is
//! zero, belongs to no tensor and is never updated.

use std::ops::Range;

use super::memory::AdamSegment;

/// Every shard starts on a multiple of this many elements (vector loads, NCCL alignment).
pub const SHARD_ALIGN: usize = 64;

/// This rank's part of one unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// Elements of the unit (its layout, padding rows of tensors included).
    pub numel: usize,
    /// Elements after padding to a multiple of `world × SHARD_ALIGN`.
    pub padded: usize,
    /// Elements per rank.
    pub len: usize,
    pub rank: usize,
}

impl Shard {
    pub fn new(numel: usize, world: usize, rank: usize) -> Shard {
        let quantum = world.max(1) * SHARD_ALIGN;
        let padded = numel.div_ceil(quantum).max(1) * quantum;
        Shard {
            numel,
            padded,
            len: padded / world.max(1),
            rank,
        }
    }

    /// This rank's elements of the padded unit.
    pub fn range(&self) -> Range<usize> {
        self.rank * self.len..(self.rank + 1) * self.len
    }
}

/// Where a state class lives for one unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Home {
    /// The whole unit on every rank.
    Whole,
    /// Only this rank's shard.
    Sharded,
}

/// The homes of one unit's state classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Compute weights (X). Sharded ones are all-gathered before each use.
    pub params: Home,
    /// Gradients (f32). Whole ones are all-reduced; sharded ones are reduce-scattered.
    pub grads: Home,
    /// fp32 master weights, Adam m and v.
    pub optimizer: Home,
}

impl Placement {
    /// The stage's placement for a unit of `numel` elements: at stage 3 units below
    /// `persistence_threshold` keep whole parameters (and stage-2 gradients).
    pub fn for_stage(stage: u8, numel: usize, persistence_threshold: usize) -> Placement {
        let (params, grads, optimizer) = match stage {
            0 => (Home::Whole, Home::Whole, Home::Whole),
            1 => (Home::Whole, Home::Whole, Home::Sharded),
            2 => (Home::Whole, Home::Sharded, Home::Sharded),
            _ if numel < persistence_threshold => (Home::Whole, Home::Sharded, Home::Sharded),
            _ => (Home::Sharded, Home::Sharded, Home::Sharded),
        };
        Placement {
            params,
            grads,
            optimizer,
        }
    }
}

/// The parts of `segments` (unit offsets) inside `range`, relative to `range.start`: AdamW's
/// decay applies per tensor, exactly at shard edges.
pub fn clip_segments(segments: &[AdamSegment], range: &Range<usize>) -> Vec<AdamSegment> {
    segments
        .iter()
        .filter_map(|s| {
            let start = s.offset.max(range.start);
            let end = (s.offset + s.len).min(range.end);
            (start < end).then(|| AdamSegment {
                offset: start - range.start,
                len: end - start,
                decay: s.decay,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_tile_the_padded_unit() {
        for (numel, world) in [(1, 1), (1000, 3), (4096, 4), (12_345, 2), (64, 4)] {
            let shards: Vec<Shard> = (0..world).map(|r| Shard::new(numel, world, r)).collect();
            let s = shards[0];
            assert!(s.padded >= numel && s.padded % (world * SHARD_ALIGN) == 0);
            assert!(s.padded - numel < world * SHARD_ALIGN);
            assert_eq!(s.len * world, s.padded);
            let covered: Vec<usize> = shards.iter().flat_map(|s| s.range()).collect();
            assert_eq!(covered, (0..s.padded).collect::<Vec<_>>());
        }
    }

    #[test]
    fn segments_are_exact_at_shard_edges() {
        let segments = [
            AdamSegment {
                offset: 0,
                len: 10,
                decay: false,
            },
            AdamSegment {
                offset: 10,
                len: 100,
                decay: true,
            },
            AdamSegment {
                offset: 110,
                len: 5,
                decay: false,
            },
        ];
        let clipped = clip_segments(&segments, &(64..128));
        assert_eq!(
            clipped,
            vec![
                AdamSegment {
                    offset: 0,
                    len: 46,
                    decay: true
                },
                AdamSegment {
                    offset: 46,
                    len: 5,
                    decay: false
                },
            ]
        );
        // The padding past the last tensor is in no segment.
        assert!(clip_segments(&segments, &(115..128)).is_empty());
    }

    #[test]
    fn stages_shard_states_as_deepspeed_defines_them() {
        use Home::*;
        let p = |stage, numel| Placement::for_stage(stage, numel, 1000);
        assert_eq!(
            p(0, 5000),
            Placement {
                params: Whole,
                grads: Whole,
                optimizer: Whole
            }
        );
        assert_eq!(
            p(1, 5000),
            Placement {
                params: Whole,
                grads: Whole,
                optimizer: Sharded
            }
        );
        assert_eq!(
            p(2, 5000),
            Placement {
                params: Whole,
                grads: Sharded,
                optimizer: Sharded
            }
        );
        assert_eq!(
            p(3, 5000),
            Placement {
                params: Sharded,
                grads: Sharded,
                optimizer: Sharded
            }
        );
        assert_eq!(p(3, 999).params, Whole);
    }
}
