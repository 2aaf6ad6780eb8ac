//! The placement plan: a pure function from the config, the units' sizes, the world size and
//! the machine's capacities to the tier of every state class and the bytes each tier needs per
//! rank. Every tier decision is made here, once, and checked before the first step; the step only
//! carries it out. `strata plan` prints it; `offload_*.device = "auto"` picks the fastest
//! placement that fits.
//!
//! `host.rs` sizes the host tier and the swap files (sub-groups, staging buffers, host pool,
//! NVMe bytes); `fit.rs` checks a plan against the machine's capacities.

mod fit;
mod host;

pub use fit::{free_bytes, nvme_paths, Capacities};
pub use host::{
    moment_bytes, sub_group_len, sub_groups, Staging, SubGroup, HOST_SLAB_BYTES, NORM_CHUNK,
};

use super::zero::{Home, Placement, Shard};
use crate::config::{Config, OffloadDevice};
use host::{nvme_bytes, pages, pool_bytes};

/// Where a class of states lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Device memory (GPU memory, or the CPU backend's budgeted device memory).
    Device,
    /// Host memory (page-locked when `pin_memory`).
    Host,
    /// NVMe, through io_uring.
    Nvme,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Device => "device",
            Tier::Host => "cpu",
            Tier::Nvme => "nvme",
        }
    }
}

/// The tiers of the two offloadable classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiers {
    /// This rank's parameter shards (stage 3).
    pub params: Tier,
    /// This rank's fp32 master weights, Adam moments and gradients.
    pub optimizer: Tier,
}

/// A plan per placement the config allows, each with whether it fits.
pub type Candidates = Vec<(PlacementPlan, Result<(), Misfit>)>;

/// Why a plan does not fit.
#[derive(Clone, Debug, PartialEq)]
pub enum Misfit {
    /// The device arena exceeds `train.device_memory`.
    Device { needed: u64, available: u64 },
    /// Host memory, locked memory, NVMe space or a buffer size: the message names the setting.
    Other(String),
}

/// One state class on one tier, per rank.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub class: &'static str,
    pub tier: Tier,
    pub bytes: u64,
}

/// The placement of one rank's states.
#[derive(Clone, Debug)]
pub struct PlacementPlan {
    pub stage: u8,
    pub world: usize,
    pub tiers: Tiers,
    /// Bytes per state class and tier on this rank.
    pub rows: Vec<Row>,
    /// The device arena (the dry run's count).
    pub device_bytes: u64,
    /// The host pool: persistent states and staging buffers.
    pub host_bytes: u64,
    pub host_pinned: bool,
    /// NVMe bytes on this rank, all paths together (whole blocks).
    pub nvme_bytes: u64,
    /// Sub-groups of this rank's shards (the host optimizer's and offload's granularity).
    pub sub_groups: Vec<SubGroup>,
    /// Per sub-group: whether its optimizer states (master, m, v, gradient) live in host
    /// memory: all with the optimizer on the host, `offload_optimizer.host_fraction` of them
    /// (by elements) with the optimizer on NVMe, none on the device.
    pub optimizer_on_host: Vec<bool>,
    /// The host tier's staging buffers.
    pub staging: Staging,
    /// Staging buffers: (what, count, bytes each).
    pub buffers: Vec<(&'static str, usize, u64)>,
}

/// What the plan needs besides the config.
pub struct PlanSizes<'a> {
    pub layout: &'a [(Shard, Placement)],
    /// Bytes per compute element (X).
    pub x_bytes: usize,
    /// The device arena for these tiers (the dry run).
    pub device_bytes: u64,
}

/// The plan for `tiers` (no machine check: see [`PlacementPlan::check`]).
pub fn plan(config: &Config, world: usize, tiers: Tiers, sizes: &PlanSizes<'_>) -> PlacementPlan {
    let shards: Vec<Shard> = sizes.layout.iter().map(|(s, _)| *s).collect();
    let groups = sub_groups(&shards, sub_group_len(config, &shards));
    let on_host = resident_on_host(config, tiers, &groups);
    let gathered: Vec<bool> = sizes
        .layout
        .iter()
        .map(|(_, p)| p.params == Home::Sharded)
        .collect();
    let staging = Staging::of(config, tiers, &groups, &on_host, &gathered);
    let rows = rows(
        config,
        tiers,
        sizes.layout,
        sizes.x_bytes as u64,
        &groups,
        &on_host,
    );
    let x = sizes.x_bytes as u64;
    let moment = moment_bytes(config.offload_optimizer.moments_dtype) as u64;
    // Host pool allocations, one entry per buffer (as HostTier::new makes them).
    let mut host_allocs: Vec<u64> = Vec::new();
    if tiers.optimizer != Tier::Device {
        for (g, _) in groups.iter().zip(&on_host).filter(|(_, &h)| h) {
            let n = g.len as u64;
            host_allocs.extend([pages(4 * n), pages(moment * n), pages(moment * n)]);
        }
        // On the host, fp32 compute weights are the master weights themselves.
        if tiers.params == Tier::Host {
            for (g, _) in groups
                .iter()
                .zip(&on_host)
                .filter(|(g, &h)| gathered[g.unit] && !(x == 4 && h))
            {
                host_allocs.push(pages(x * g.len as u64));
            }
        }
        host_allocs.extend(groups.iter().map(|g| pages(4 * g.len as u64)));
    }
    host_allocs.extend(staging.allocs(x, moment));
    PlacementPlan {
        stage: config.zero.stage,
        world,
        tiers,
        rows,
        device_bytes: sizes.device_bytes,
        host_bytes: pool_bytes(&host_allocs),
        host_pinned: config.offload_param.pin_memory || config.offload_optimizer.pin_memory,
        nvme_bytes: nvme_bytes(config, tiers, x, &groups, &on_host, &gathered),
        optimizer_on_host: on_host,
        sub_groups: groups,
        buffers: staging.buffers(x, moment),
        staging,
    }
}

/// Bytes per state class and tier: whole units live on the device; shards on their class's tier,
/// the optimizer's split between its tier and host memory (NVMe's resident sub-groups); an
/// offloaded optimizer takes its gradients in host memory.
fn rows(
    config: &Config,
    tiers: Tiers,
    layout: &[(Shard, Placement)],
    x: u64,
    groups: &[SubGroup],
    on_host: &[bool],
) -> Vec<Row> {
    let elems = |home: Home, f: fn(&Placement) -> Home| -> u64 {
        layout
            .iter()
            .filter(|(_, p)| f(p) == home)
            .map(|(s, _)| match home {
                Home::Whole => s.padded as u64,
                Home::Sharded => s.len as u64,
            })
            .sum()
    };
    let optim_moment = match tiers.optimizer {
        Tier::Device => 4,
        _ => moment_bytes(config.offload_optimizer.moments_dtype) as u64,
    };
    let host_elems: u64 = groups
        .iter()
        .zip(on_host)
        .filter(|(_, &h)| h)
        .map(|(g, _)| g.len as u64)
        .sum();
    let split = |elems: u64| -> [(Tier, u64); 2] {
        let home = elems.saturating_sub(host_elems.min(elems));
        [(tiers.optimizer, home), (Tier::Host, elems - home)]
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut add = |class: &'static str, tier: Tier, bytes: u64| match rows
        .iter_mut()
        .find(|r| r.class == class && r.tier == tier)
    {
        Some(r) => r.bytes += bytes,
        None if bytes > 0 => rows.push(Row { class, tier, bytes }),
        None => {}
    };
    add(
        "compute params",
        Tier::Device,
        x * elems(Home::Whole, |p| p.params),
    );
    add(
        "compute params",
        tiers.params,
        x * elems(Home::Sharded, |p| p.params),
    );
    let whole_optim = elems(Home::Whole, |p| p.optimizer);
    add("master params (f32)", Tier::Device, 4 * whole_optim);
    add("adam m, v", Tier::Device, 8 * whole_optim);
    add(
        "gradients (f32)",
        Tier::Device,
        4 * elems(Home::Whole, |p| p.grads),
    );
    for (tier, elems) in split(elems(Home::Sharded, |p| p.optimizer)) {
        add("master params (f32)", tier, 4 * elems);
        add("adam m, v", tier, 2 * optim_moment * elems);
    }
    let grad_tier = match tiers.optimizer {
        Tier::Device => Tier::Device,
        _ => Tier::Host,
    };
    add(
        "gradients (f32)",
        grad_tier,
        4 * elems(Home::Sharded, |p| p.grads),
    );
    rows.sort_by_key(|r| {
        let order = [
            "compute params",
            "master params (f32)",
            "adam m, v",
            "gradients (f32)",
        ];
        (order.iter().position(|&c| c == r.class), r.tier)
    });
    rows
}

/// Per sub-group: whether its optimizer states live in host memory for `tiers`. On NVMe, the
/// resident sub-groups are spread evenly over the sub-groups' order (each takes the host while
/// the resident elements so far are below `host_fraction` of all so far), so that host AdamW and
/// NVMe transfers alternate through the step.
fn resident_on_host(config: &Config, tiers: Tiers, groups: &[SubGroup]) -> Vec<bool> {
    match tiers.optimizer {
        Tier::Device => vec![false; groups.len()],
        Tier::Host => vec![true; groups.len()],
        Tier::Nvme => {
            let f = config.offload_optimizer.host_fraction;
            let (mut seen, mut resident) = (0f64, 0f64);
            groups
                .iter()
                .map(|g| {
                    let n = g.len as f64;
                    seen += n;
                    // Resident when that brings the share closer to f than leaving it out.
                    let take =
                        f > 0.0 && (resident + n - f * seen).abs() <= (resident - f * seen).abs();
                    if take {
                        resident += n;
                    }
                    take
                })
                .collect()
        }
    }
}

/// The tiers a config asks for, in the order `auto` tries them (fastest first).
pub fn candidate_tiers(config: &Config) -> Vec<Tiers> {
    let has_nvme = |paths: &Option<crate::config::NvmePaths>| paths.is_some();
    let choices = |device: OffloadDevice, nvme_ok: bool, allowed: bool| -> Vec<Tier> {
        match device {
            OffloadDevice::None => vec![Tier::Device],
            OffloadDevice::Cpu => vec![Tier::Host],
            OffloadDevice::Nvme => vec![Tier::Nvme],
            OffloadDevice::Auto if !allowed => vec![Tier::Device],
            OffloadDevice::Auto if nvme_ok => vec![Tier::Device, Tier::Host, Tier::Nvme],
            OffloadDevice::Auto => vec![Tier::Device, Tier::Host],
        }
    };
    let stage = config.zero.stage;
    let optimizer = choices(
        config.offload_optimizer.device,
        has_nvme(&config.offload_optimizer.nvme_path),
        stage >= 1,
    );
    let params = choices(
        config.offload_param.device,
        has_nvme(&config.offload_param.nvme_path),
        stage >= 3,
    );
    // Offload the optimizer before the parameters: it is the larger class and leaves the
    // compute weights where compute reads them.
    let mut out = Vec::new();
    for &p in &params {
        // Parameters off the device are updated by an optimizer off the device.
        for &o in optimizer
            .iter()
            .filter(|&&o| p == Tier::Device || o != Tier::Device)
        {
            out.push(Tiers {
                params: p,
                optimizer: o,
            });
        }
    }
    out.sort_by_key(|t| (t.params, t.optimizer));
    out
}

impl PlacementPlan {
    /// Where the optimizer states live, in words: a tier, or NVMe with the share of the
    /// sub-groups (by elements) kept in host memory.
    pub fn optimizer_where(&self) -> String {
        let (mut host, mut all) = (0usize, 0usize);
        for (g, &h) in self.sub_groups.iter().zip(&self.optimizer_on_host) {
            all += g.len;
            host += if h { g.len } else { 0 };
        }
        match self.tiers.optimizer {
            Tier::Nvme if host > 0 => format!(
                "nvme ({:.0}% in host memory)",
                100.0 * host as f64 / all.max(1) as f64
            ),
            t => t.name().to_string(),
        }
    }

    /// The plan as a table: state class × tier, bytes per rank, and the buffers.
    pub fn table(&self) -> String {
        let h = |b: u64| super::human_bytes(usize::try_from(b).unwrap_or(usize::MAX));
        let line = |class: &str, tier: &str, b: u64, note: &str| {
            format!("{class:<28} {tier:<7} {b:>16} {:>12}{note}\n", h(b))
        };
        let mut out = format!(
            "placement for ZeRO stage {} at world size {}: parameters on {}, optimizer states on {}\n",
            self.stage,
            self.world,
            self.tiers.params.name(),
            self.optimizer_where()
        );
        out += &format!(
            "{:<28} {:<7} {:>16} {:>12}\n",
            "state (per rank)", "tier", "bytes", ""
        );
        for r in &self.rows {
            out += &line(r.class, r.tier.name(), r.bytes, "");
        }
        out += &line("device arena (dry run)", "device", self.device_bytes, "");
        out += &line(
            "host pool",
            "cpu",
            self.host_bytes,
            if self.host_pinned { " (pinned)" } else { "" },
        );
        out += &line("swap files", "nvme", self.nvme_bytes, "");
        for (what, n, b) in &self.buffers {
            out += &format!("  buffers: {n} x {} for {what}\n", h(*b));
        }
        out
    }
}

#[cfg(test)]
mod tests;
