//! The engine's device memory: every unit's states and the step's buffers, allocated by one
//! function that runs twice — on a counting arena (the dry run that sizes the device), then on
//! the device's arena. Each unit's states sit in one record, [`UnitState`], whose parts say where
//! each state class lives and own its device storage; the walk and the step read from them what
//! to do, decided here once from the placement.

use std::ops::Range;

use super::placement::{Tier, Tiers};
use super::ring::Ring;
use super::zero::{clip_segments, Home, Placement, Shard};
use crate::backend::{Arena, Buf, DType, DeviceError, NORM_PARTIALS_MAX};
use crate::model::{Tokens, UnitSpec};

/// All states of one unit on this rank. Whole buffers hold the unit's padded layout
/// (`shard.padded` elements); sharded ones hold this rank's `shard.len` elements. States on the
/// host or NVMe are the host tier's (`engine/host_tier/`).
pub struct UnitState {
    pub shard: Shard,
    pub placement: Placement,
    pub weights: Weights,
    pub grads: Grads,
    pub optimizer: Optimizer,
}

/// Where a unit's compute weights (X) live, and how a use gets them.
pub enum Weights {
    /// Whole on the device (stage 0), updated there by the optimizer (the master weights
    /// themselves when X is f32).
    Whole(Buf),
    /// Whole on the device, all-gathered from this rank's device shard after each optimizer step
    /// (stages 1–2, units under the persistence threshold at stage 3). The shard is the master
    /// shard itself when X is f32 and the optimizer is on the device.
    Replicated { whole: Buf, shard: Buf },
    /// This rank's shard on the device, all-gathered into the parameter pool before each use
    /// (stage 3).
    Sharded(Buf),
    /// This rank's shard off the device (the host tier's: host memory or NVMe), copied into its
    /// slot of the parameter pool before each use, then all-gathered there in place when
    /// `all_gather` (with one rank the shard is the whole unit).
    Offloaded { all_gather: bool },
}

impl Weights {
    /// The whole weights a use reads when the unit is not gathered.
    pub fn whole(&self) -> Option<&Buf> {
        match self {
            Weights::Whole(whole) | Weights::Replicated { whole, .. } => Some(whole),
            _ => None,
        }
    }

    /// This rank's shard on the device: what the optimizer updates and all-gathers send.
    pub fn device_shard(&self) -> Option<&Buf> {
        match self {
            Weights::Replicated { shard, .. } | Weights::Sharded(shard) => Some(shard),
            _ => None,
        }
    }

    /// Whether each use reads a gathered copy from the parameter pool.
    pub fn is_gathered(&self) -> bool {
        matches!(self, Weights::Sharded(_) | Weights::Offloaded { .. })
    }
}

/// Where a unit's gradients (f32) accumulate over a step's micro-batches, and where they go.
pub enum Grads {
    /// Whole on the device (stages 0–1), all-reduced after the step's last backward use of the
    /// unit when `all_reduce` (several ranks); with the optimizer off the device (`to_host`),
    /// this rank's part then goes to the host tier.
    Whole {
        buf: Buf,
        all_reduce: bool,
        to_host: bool,
    },
    /// This rank's shard on the device (stages 2–3, optimizer on the device): each micro-batch's
    /// full gradient (a pool buffer) is reduce-scattered and added into it.
    Shard(Buf),
    /// The host tier's (stages 2–3, optimizer off the device): each micro-batch's full gradient
    /// is reduce-scattered into a reduce target and copied to the host from there when
    /// `via_target`; with one rank the full gradient is the shard and is copied from its pool
    /// buffer.
    ToHost { via_target: bool },
}

impl Grads {
    /// The gradients on the device, whole or this rank's shard.
    pub fn on_device(&self) -> Option<&Buf> {
        match self {
            Grads::Whole { buf, .. } | Grads::Shard(buf) => Some(buf),
            Grads::ToHost { .. } => None,
        }
    }
}

/// Where a unit's optimizer states (fp32 master weights, Adam m and v) live.
pub enum Optimizer {
    Device(DeviceOptim),
    /// Off the device: the host tier's sub-groups of the unit (host memory or NVMe).
    Host,
}

/// The optimizer's states of one unit on the device, with everything its update reads.
pub struct DeviceOptim {
    pub master: Buf,
    pub adam_m: Buf,
    pub adam_v: Buf,
    /// The gradients of the elements they hold ([`UnitState::optimizer_range`]): a view of
    /// whole gradients, or the gradient shard.
    pub grads: Buf,
    /// The compute weights the update also writes, rounded to X (None: they are `master`).
    pub compute: Option<Buf>,
    /// AdamW's segments over the elements they hold, relative to their start.
    pub segments: Vec<AdamSegment>,
}

impl UnitState {
    /// This rank's part of the optimizer's states: the whole unit, or its shard.
    pub fn optimizer_range(&self) -> Range<usize> {
        match self.placement.optimizer {
            Home::Whole => 0..self.shard.padded,
            Home::Sharded => self.shard.range(),
        }
    }
}

/// Buffers of a step besides the units' states.
pub struct StepBuffers {
    /// acts[s] is the input of stage s ≥ 1 (X); acts[0] is the token buffer (stage 0 reads
    /// tokens).
    pub acts: Vec<Buf>,
    /// ∂L/∂(activation) flowing backward through the stages (X), updated in place.
    pub dres: Buf,
    /// With activation checkpointing: where a stage's forward, run again right before its
    /// backward, writes its output (X; nothing reads it).
    pub recompute_out: Option<Buf>,
    /// (2, micro_max, B, T) i32: every micro-batch's inputs, then every micro-batch's targets.
    pub tokens: Buf,
    /// (micro_max, B, T) f32: each token's loss.
    pub losses: Buf,
    /// (1) f32: the squared global gradient norm; and its first stage's partial sums.
    pub norm: Buf,
    pub norm_partials: Buf,
    /// Gathered parameters of sharded units (X), laid out by the plan.
    pub param_pool: Option<Buf>,
    /// Whole gradients of units with sharded gradients (f32), laid out by the plan.
    pub grad_pool: Option<Buf>,
    /// Where a reduce-scatter lands before it is added to its gradient shard (f32); also the
    /// scratch of in-place all-gathers.
    pub reduce_scratch: Option<Buf>,
    /// With the optimizer off the device and several ranks: reduced gradient shards on their
    /// way to the host (f32).
    pub reduce_targets: Option<Ring<Buf>>,
}

/// The sizes the engine's memory is planned for.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Micro-batch size B and sequence length T.
    pub b: usize,
    pub t: usize,
    /// Most micro-batches one step may take (`data.grad_accum_steps`).
    pub micro_max: usize,
    /// Stages of the model and elements of the activation between two of them.
    pub stages: usize,
    pub act_len: usize,
    /// Activation checkpointing: each stage's forward runs again before its backward.
    pub checkpointing: bool,
    /// Compute type X.
    pub x: DType,
    /// Elements of the two transient pools (the plan's).
    pub param_pool_len: usize,
    pub grad_pool_len: usize,
}

impl Sizes {
    pub fn bt(&self) -> usize {
        self.b * self.t
    }
}

fn alloc_home(
    arena: &Arena,
    what: &'static str,
    dtype: DType,
    home: Home,
    shard: &Shard,
) -> Result<Buf, DeviceError> {
    let len = match home {
        Home::Whole => shard.padded,
        Home::Sharded => shard.len,
    };
    arena.alloc(what, dtype, len)
}

/// Reduced gradient shards in flight to the host at once (with the optimizer off the device).
pub const REDUCE_TARGETS: usize = 2;

/// Allocates (or, on a counting arena, counts) the device states of one unit, whose AdamW
/// segments are `segments`, at `world` ranks.
fn unit_state(
    arena: &Arena,
    x: DType,
    (shard, placement): (Shard, Placement),
    segments: &[AdamSegment],
    tiers: Tiers,
    one_rank: bool,
) -> Result<UnitState, DeviceError> {
    let optim = match tiers.optimizer {
        Tier::Device => {
            let alloc = |what| alloc_home(arena, what, DType::F32, placement.optimizer, &shard);
            Some([
                alloc("master params (f32)")?,
                alloc("adam m")?,
                alloc("adam v")?,
            ])
        }
        _ => None,
    };
    let master = optim.as_ref().map(|[master, ..]| master);
    let whole = match (placement.params, master) {
        (Home::Whole, Some(m)) if placement.optimizer == Home::Whole && x == DType::F32 => {
            Some(m.clone())
        }
        (Home::Whole, _) => Some(arena.alloc("compute params", x, shard.padded)?),
        (Home::Sharded, _) => None,
    };
    let params_on_device = placement.params == Home::Whole || tiers.params == Tier::Device;
    let device_shard = match (placement.optimizer, master) {
        (Home::Whole, _) => None,
        _ if !params_on_device => None,
        (Home::Sharded, Some(m)) if x == DType::F32 => Some(m.clone()),
        (Home::Sharded, _) => Some(arena.alloc("compute params", x, shard.len)?),
    };
    let weights = match (whole, device_shard) {
        (Some(whole), None) => Weights::Whole(whole),
        (Some(whole), Some(shard)) => Weights::Replicated { whole, shard },
        (None, Some(shard)) => Weights::Sharded(shard),
        (None, None) => Weights::Offloaded {
            all_gather: !one_rank,
        },
    };
    // Whole gradients stay on the device (all-reduced there); a sharded gradient lives with the
    // optimizer.
    let grads = match (placement.grads, tiers.optimizer) {
        (Home::Whole, optimizer) => Grads::Whole {
            buf: alloc_home(arena, "gradients (f32)", DType::F32, Home::Whole, &shard)?,
            all_reduce: !one_rank,
            to_host: optimizer != Tier::Device,
        },
        (Home::Sharded, Tier::Device) => Grads::Shard(alloc_home(
            arena,
            "gradients (f32)",
            DType::F32,
            Home::Sharded,
            &shard,
        )?),
        (Home::Sharded, _) => Grads::ToHost {
            via_target: !one_rank,
        },
    };
    let mut state = UnitState {
        shard,
        placement,
        weights,
        grads,
        optimizer: Optimizer::Host,
    };
    if let Some([master, adam_m, adam_v]) = optim {
        let range = state.optimizer_range();
        let compute = match placement.optimizer {
            Home::Whole => state.weights.whole(),
            Home::Sharded => state.weights.device_shard(),
        };
        let compute = compute.filter(|c| !c.same_range(&master)).cloned();
        let on_device = state.grads.on_device().ok_or_else(|| {
            DeviceError::op(
                "allocate",
                "the device optimizer's gradients are not on the device",
            )
        })?;
        // Whole gradients are read at this rank's part; sharded ones are that part.
        let grads = match (placement.grads, placement.optimizer) {
            (Home::Whole, Home::Sharded) => on_device.slice(range.start, range.len())?,
            _ => on_device.clone(),
        };
        state.optimizer = Optimizer::Device(DeviceOptim {
            master,
            adam_m,
            adam_v,
            grads,
            compute,
            segments: clip_segments(segments, &range),
        });
    }
    Ok(state)
}

/// Allocates (or counts) every unit's device states and every step buffer; `segments[u]` are
/// unit u's AdamW segments.
pub fn allocate(
    arena: &Arena,
    units: &[(Shard, Placement)],
    segments: &[Vec<AdamSegment>],
    tiers: Tiers,
    sizes: &Sizes,
) -> Result<(Vec<UnitState>, StepBuffers), DeviceError> {
    // One rank: a unit's gradient buffer is its own shard (the host takes it from there), and a
    // fetched shard is its own gather.
    let one_rank = units.iter().all(|(s, _)| s.len == s.padded);
    let states = units
        .iter()
        .zip(segments)
        .map(|(&unit, segments)| unit_state(arena, sizes.x, unit, segments, tiers, one_rank))
        .collect::<Result<Vec<_>, DeviceError>>()?;
    let (bt, x) = (sizes.bt(), sizes.x);
    let tokens = arena.alloc("tokens", DType::I32, 2 * sizes.micro_max * bt)?;
    let mut acts = vec![tokens.clone()];
    for _ in 1..sizes.stages {
        acts.push(arena.alloc("stage inputs", x, sizes.act_len)?);
    }
    let pool =
        |what, dtype, len: usize| (len > 0).then(|| arena.alloc(what, dtype, len)).transpose();
    let shard_max = |f: fn(&Placement) -> Home| {
        units
            .iter()
            .filter(|(_, p)| f(p) == Home::Sharded)
            .map(|(s, _)| s.len)
            .max()
            .unwrap_or(0)
    };
    let grad_shard_max = shard_max(|p| p.grads);
    let param_shard_max = if tiers.params == Tier::Device {
        0
    } else {
        shard_max(|p| p.params)
    };
    let offloaded_grads = tiers.optimizer != Tier::Device && grad_shard_max > 0;
    let scratch_len = match (one_rank, offloaded_grads) {
        (true, true) => 0,
        (true, false) => grad_shard_max,
        (false, _) => grad_shard_max.max(param_shard_max),
    };
    let buffers = StepBuffers {
        acts,
        dres: arena.alloc("activation gradient", x, sizes.act_len)?,
        recompute_out: sizes
            .checkpointing
            .then(|| arena.alloc("recomputed stage output", x, sizes.act_len))
            .transpose()?,
        tokens,
        losses: arena.alloc("losses", DType::F32, sizes.micro_max * bt)?,
        norm: arena.alloc("gradient norm", DType::F32, 1)?,
        norm_partials: arena.alloc("gradient norm", DType::F32, NORM_PARTIALS_MAX)?,
        param_pool: pool("gathered params (pool)", x, sizes.param_pool_len)?,
        grad_pool: pool("gradient buffers (pool)", DType::F32, sizes.grad_pool_len)?,
        reduce_scratch: pool("reduce-scatter scratch", DType::F32, scratch_len)?,
        reduce_targets: (offloaded_grads && !one_rank)
            .then(|| {
                (0..REDUCE_TARGETS)
                    .map(|_| {
                        arena.alloc("reduced gradients to the host", DType::F32, grad_shard_max)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Ring::new)
            })
            .transpose()?,
    };
    Ok((states, buffers))
}

impl StepBuffers {
    /// The device tokens of micro-batch `k`.
    pub fn tokens_of(&self, k: usize, sizes: &Sizes) -> Result<Tokens, DeviceError> {
        let bt = sizes.bt();
        Ok(Tokens {
            inputs: self.tokens.slice(k * bt, bt)?,
            targets: self.tokens.slice((sizes.micro_max + k) * bt, bt)?,
            b: sizes.b,
            t: sizes.t,
        })
    }
}

/// A run of tensors in one unit that AdamW updates with one call: contiguous, same decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdamSegment {
    pub offset: usize,
    pub len: usize,
    pub decay: bool,
}

/// The AdamW segments of a unit (padding rows ride with their tensor: they stay zero).
pub fn adam_segments(unit: &UnitSpec) -> Vec<AdamSegment> {
    let mut segments: Vec<AdamSegment> = Vec::new();
    for (t, r) in unit.tensors.iter().zip(unit.ranges()) {
        match segments.last_mut() {
            Some(last) if last.decay == t.decay => last.len += r.len(),
            _ => segments.push(AdamSegment {
                offset: r.start,
                len: r.len(),
                decay: t.decay,
            }),
        }
    }
    segments
}

/// This process's peak resident memory (VmHWM), when /proc tells it.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// This process's resident memory now (VmRSS), when /proc tells it.
pub fn rss_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS:")
}

/// A field of /proc/self/status given in kB.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// "1.2 GiB" style.
pub fn human_bytes(bytes: usize) -> String {
    const UNITS: [(&str, f64); 4] = [
        ("GiB", (1u64 << 30) as f64),
        ("MiB", (1u64 << 20) as f64),
        ("KiB", 1024.0),
        ("B", 1.0),
    ];
    let b = bytes as f64;
    let (name, size) = UNITS
        .iter()
        .find(|(_, s)| b >= *s)
        .copied()
        .unwrap_or(("B", 1.0));
    if size == 1.0 {
        format!("{bytes} B")
    } else {
        format!("{:.1} {name}", b / size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::zero::{Placement, Shard};
    use crate::model::gpt2::{Gpt2, Gpt2Shape};
    use crate::model::Model;

    #[test]
    fn segments_cover_each_unit_and_split_on_decay() {
        let model = Gpt2::new(Gpt2Shape {
            n_layer: 1,
            n_head: 2,
            n_embd: 8,
            vocab_size: 100,
            max_seq_len: 4,
        });
        for unit in model.units() {
            let segments = adam_segments(unit);
            assert_eq!(segments.iter().map(|s| s.len).sum::<usize>(), unit.numel());
            assert!(segments.windows(2).all(|w| w[0].decay != w[1].decay));
        }
        // The block: ln_1 (no decay), c_attn.weight (decay), c_attn.bias (no), ...
        let block = adam_segments(&model.units()[1]);
        assert_eq!(
            block[0],
            AdamSegment {
                offset: 0,
                len: 16,
                decay: false
            }
        );
        // The embedding's padding rows (100 → 128) are part of its one decay segment.
        assert_eq!(adam_segments(&model.units()[0])[0].len, 128 * 8 + 4 * 8);
    }

    #[test]
    fn fp32_compute_weights_are_the_master_weights() {
        let model = Gpt2::new(Gpt2Shape {
            n_layer: 1,
            n_head: 2,
            n_embd: 8,
            vocab_size: 100,
            max_seq_len: 4,
        });
        let units: Vec<(Shard, Placement)> = model
            .units()
            .iter()
            .map(|u| {
                (
                    Shard::new(u.numel(), 1, 0),
                    Placement::for_stage(0, u.numel(), 0),
                )
            })
            .collect();
        let sizes = Sizes {
            b: 2,
            t: 4,
            micro_max: 1,
            stages: 3,
            act_len: 64,
            checkpointing: false,
            x: DType::F32,
            param_pool_len: 0,
            grad_pool_len: 0,
        };
        let arena = Arena::counting();
        let on_device = Tiers {
            params: Tier::Device,
            optimizer: Tier::Device,
        };
        let segments: Vec<Vec<AdamSegment>> = model.units().iter().map(adam_segments).collect();
        // Whether whole compute weights exist apart from the master weights (the update writes
        // them too).
        let has_compute_copy = |s: &UnitState| match &s.optimizer {
            Optimizer::Device(o) => o.compute.is_some(),
            Optimizer::Host => true,
        };
        let (states, _) = allocate(&arena, &units, &segments, on_device, &sizes).unwrap();
        assert!(!has_compute_copy(&states[0]));
        let bf16 = Arena::counting();
        let (states, _) = allocate(
            &bf16,
            &units,
            &segments,
            on_device,
            &Sizes {
                x: DType::Bf16,
                ..sizes
            },
        )
        .unwrap();
        assert!(has_compute_copy(&states[0]));
        assert!(bf16.peak_bytes() > arena.peak_bytes());
    }
}
