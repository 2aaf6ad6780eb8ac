//! The sizes of the host tier and the swap files for a placement: the sub-groups the host
//! optimizer steps and offload moves, the staging buffers (each sized to the sub-groups that use
//! it), the host pool that holds them, and the NVMe bytes.

use super::{Tier, Tiers};
use crate::config::{Config, MomentsDtype};
use crate::engine::zero::Shard;

/// One piece of a unit's shard that the host optimizer steps (and offload moves) at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubGroup {
    pub unit: usize,
    /// Elements of the unit's shard: [start, start + len).
    pub start: usize,
    pub len: usize,
}

/// The gradient norm's partial sums cover this many elements each (optim::sum_of_squares).
pub const NORM_CHUNK: usize = 1 << 14;

/// Sub-groups of every unit's shard, in unit order, of at most `size` elements (rounded down to
/// a multiple of the norm's chunk, so a unit's partial sums are the same however it is split).
pub fn sub_groups(shards: &[Shard], size: usize) -> Vec<SubGroup> {
    let size = (size / NORM_CHUNK).max(1) * NORM_CHUNK;
    let mut out = Vec::new();
    for (unit, s) in shards.iter().enumerate() {
        let mut start = 0;
        while start < s.len {
            let len = size.min(s.len - start);
            out.push(SubGroup { unit, start, len });
            start += len;
        }
    }
    out
}

/// The sub-groups' size: `offload_optimizer.sub_group_size`, but no more than a `buffer_count`-th
/// of this rank's elements (on the norm's chunk grid). The staging buffers are sized by the
/// largest sub-group, and `buffer_count` sub-groups in flight cover the whole shard of a model
/// that small already: larger ones only made its host pool several times its states.
pub fn sub_group_len(config: &Config, shards: &[Shard]) -> usize {
    let elems: usize = shards.iter().map(|s| s.len).sum();
    let per_set = elems.div_ceil(config.offload_optimizer.buffer_count.max(1));
    config
        .offload_optimizer
        .sub_group_size
        .min(per_set.next_multiple_of(NORM_CHUNK))
}

/// Bytes per element of Adam's moments stored as `dtype`.
pub fn moment_bytes(dtype: MomentsDtype) -> usize {
    match dtype {
        MomentsDtype::Fp32 => 4,
        MomentsDtype::Bf16 => 2,
    }
}

/// Slabs of the engine's host pool (the largest buffer, when larger; the whole pool, when
/// smaller). A slab's tail that no buffer fits stays unused, at most the largest buffer per slab:
/// large slabs keep that below 4% for sub-groups of up to 10M elements.
pub const HOST_SLAB_BYTES: u64 = 1 << 30;

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to.max(1)) * to.max(1)
}

/// Bytes of host memory a buffer of `bytes` takes in the pool (whole 4 KiB pages, at least one).
pub(super) fn pages(bytes: u64) -> u64 {
    round_up(bytes.max(1), 4096)
}

/// Swap bytes on this rank, all paths together: every key in whole blocks.
pub(super) fn nvme_bytes(
    config: &Config,
    tiers: Tiers,
    x: u64,
    groups: &[SubGroup],
    on_host: &[bool],
    gathered: &[bool],
) -> u64 {
    let block = config.aio.block_size.bytes();
    let moment = moment_bytes(config.offload_optimizer.moments_dtype) as u64;
    let key_bytes = |groups: &mut dyn Iterator<Item = &SubGroup>, bytes_per_elem: u64| -> u64 {
        groups
            .map(|g| round_up(g.len as u64 * bytes_per_elem, block))
            .sum()
    };
    let mut nvme = 0;
    if tiers.optimizer == Tier::Nvme {
        let on_nvme = || {
            groups
                .iter()
                .zip(on_host)
                .filter(|(_, &h)| !h)
                .map(|(g, _)| g)
        };
        nvme += key_bytes(&mut on_nvme(), 4) + 2 * key_bytes(&mut on_nvme(), moment);
    }
    if tiers.params == Tier::Nvme {
        nvme += key_bytes(&mut groups.iter().filter(|g| gathered[g.unit]), x);
    }
    nvme
}

/// The host pool's size for `allocs`: buffers do not span the pool's slabs, so a slab's tail may
/// stay unused, at most the largest buffer per slab.
pub(super) fn pool_bytes(allocs: &[u64]) -> u64 {
    let largest = allocs.iter().copied().max().unwrap_or(0);
    let total: u64 = allocs.iter().sum();
    let slabs = total.div_ceil(HOST_SLAB_BYTES.max(largest)).max(1);
    if total == 0 {
        0
    } else {
        total + slabs * largest
    }
}

/// The host tier's staging buffers, each sized to the sub-groups that use it — no more slots
/// than it has users, each the size of its largest user — so that a small model's are small.
/// `HostTier::new` allocates these; the plan counts them. Counts are slots, lengths elements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Staging {
    /// Sets of NVMe optimizer states in flight (master, m, v; read ahead, stepped, written
    /// behind); none when no sub-group's states are on NVMe.
    pub opt_sets: usize,
    pub opt_len: usize,
    /// Reduced gradients on their way to the optimizer (f32), summed into a sub-group's gradient
    /// from the second micro-batch on: one slot without accumulation (initialisation writes
    /// weights bound for the device through it).
    pub intake: usize,
    pub intake_len: usize,
    /// Updated compute weights on their way to the device or NVMe (X); none when every
    /// sub-group's live in host memory.
    pub out: usize,
    pub out_len: usize,
    /// Parameter shards on their way from NVMe (X).
    pub fetch: usize,
    pub fetch_len: usize,
}

impl Staging {
    /// The staging of the host tier for `tiers` (none with the optimizer on the device);
    /// `gathered[u]`: whether unit u's parameters are sharded.
    pub fn of(
        config: &Config,
        tiers: Tiers,
        groups: &[SubGroup],
        on_host: &[bool],
        gathered: &[bool],
    ) -> Staging {
        if tiers.optimizer == Tier::Device {
            return Staging::default();
        }
        let (obuf, pbuf) = (
            config.offload_optimizer.buffer_count,
            config.offload_param.buffer_count,
        );
        // Slots for the sub-groups `uses` picks: at most `max` of them, each the largest's size.
        let ring = |max: usize, uses: &dyn Fn(usize) -> bool| -> (usize, usize) {
            let lens = groups
                .iter()
                .enumerate()
                .filter(|&(k, _)| uses(k))
                .map(|(_, g)| g.len);
            (max.min(lens.clone().count()), lens.max().unwrap_or(0))
        };
        let nvme_optim = |k: usize| tiers.optimizer == Tier::Nvme && !on_host[k];
        let params_home = |k: usize| tiers.params != Tier::Device && gathered[groups[k].unit];
        let (opt_sets, opt_len) = ring(obuf, &nvme_optim);
        let (intake, intake_len) = if config.data.grad_accum_steps > 1 {
            ring(obuf, &|_| true)
        } else {
            // The scratch of initialisation: the largest sub-group bound for the device.
            (1, ring(1, &|k| !params_home(k)).1)
        };
        let (out, out_len) = ring(obuf, &|k| !(params_home(k) && tiers.params == Tier::Host));
        let (fetch, fetch_len) = ring(pbuf, &|k| params_home(k) && tiers.params == Tier::Nvme);
        Staging {
            opt_sets,
            opt_len,
            intake,
            intake_len,
            out,
            out_len,
            fetch,
            fetch_len,
        }
    }

    /// Its allocations from the host pool (bytes, in whole pages), as `HostTier::new` makes them,
    /// for compute elements of `x` bytes and moments of `moment` bytes.
    pub(super) fn allocs(&self, x: u64, moment: u64) -> impl Iterator<Item = u64> {
        let set = [4, moment, moment].map(|b| pages(b * self.opt_len as u64));
        std::iter::repeat_n(set, self.opt_sets)
            .flatten()
            .chain(std::iter::repeat_n(
                pages(4 * self.intake_len as u64),
                self.intake,
            ))
            .chain(std::iter::repeat_n(
                pages(x * self.out_len as u64),
                self.out,
            ))
            .chain(std::iter::repeat_n(
                pages(x * self.fetch_len as u64),
                self.fetch,
            ))
    }

    /// The buffers as `strata plan` lists them: (what, count, bytes each in the pool), as
    /// [`Staging::allocs`].
    pub(super) fn buffers(&self, x: u64, moment: u64) -> Vec<(&'static str, usize, u64)> {
        let all = [
            (
                "optimizer sub-groups",
                self.opt_sets,
                (4 + 2 * moment) * self.opt_len as u64,
            ),
            ("gradient intake", self.intake, 4 * self.intake_len as u64),
            ("updated parameters", self.out, x * self.out_len as u64),
            ("parameter fetch", self.fetch, x * self.fetch_len as u64),
        ];
        all.into_iter()
            .filter(|&(_, count, _)| count > 0)
            .map(|(what, count, bytes)| (what, count, pages(bytes)))
            .collect()
    }
}
