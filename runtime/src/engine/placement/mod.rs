//! The placement plan: a pure function from the config, the units' sizes, the world size and
//! the machine's capacities to the tier of every state class and the bytes each tier needs per
//! rank. Every tier decision is made here, once, and checked before the first step; the step only
//! carries it out. `strata plan` prints it; `offload_*.device = "auto"` picks the fastest
//! placement that fits.

use std::path::PathBuf;

use super::zero::{Home, Placement, Shard};
use crate::config::{Config, MomentsDtype, OffloadDevice};

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

/// What the machine offers.
#[derive(Clone, Debug, Default)]
pub struct Capacities {
    /// Device memory the arena may take (None: no bound known before the device opens).
    pub device_bytes: Option<u64>,
    /// Host memory available (MemAvailable).
    pub host_bytes: Option<u64>,
    /// RLIMIT_MEMLOCK (None: unlimited, or CAP_IPC_LOCK).
    pub memlock_bytes: Option<u64>,
    /// Free bytes on the file system of each NVMe path (None: cannot be read).
    pub nvme_free: Vec<(PathBuf, Option<u64>)>,
    /// The device arena lives in host memory (the CPU backend): host memory holds both.
    pub device_in_host: bool,
}

impl Capacities {
    /// This machine's for one rank of `config` on `backend` (host memory shared among the
    /// node's ranks), for `config`'s paths.
    pub fn of_this_machine(config: &Config, backend: crate::backend::Backend) -> Capacities {
        let local_ranks = strata_collectives::RankInfo::from_env()
            .ok()
            .and_then(|r| r.local_world_size)
            .unwrap_or(1)
            .max(1) as u64;
        let memlock = if strata_offload::has_cap_ipc_lock() {
            None
        } else {
            strata_offload::memlock_limit_bytes().ok().flatten()
        };
        Capacities {
            device_bytes: config.train.device_memory.bytes(),
            host_bytes: strata_offload::mem_available_bytes().map(|b| b / local_ranks),
            memlock_bytes: memlock,
            nvme_free: nvme_paths(config)
                .into_iter()
                .map(|p| {
                    let free = free_bytes(&p);
                    (p, free)
                })
                .collect(),
            device_in_host: backend == crate::backend::Backend::Cpu,
        }
    }
}

/// Free bytes on the file system of the directory `path`; None when it is not a directory.
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    if !path.is_dir() {
        return None;
    }
    let at = path;
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a valid NUL-terminated path and an out-pointer of the right type.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so it filled the struct.
    let st = unsafe { st.assume_init() };
    // fsblkcnt_t and c_ulong are 32 bits wide on some targets.
    #[allow(clippy::unnecessary_cast)]
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Every NVMe path the config names (parameters first, then the optimizer's), without repeats.
pub fn nvme_paths(config: &Config) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for paths in [
        &config.offload_param.nvme_path,
        &config.offload_optimizer.nvme_path,
    ]
    .into_iter()
    .flatten()
    {
        for p in paths.paths() {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// The config key that names NVMe `path`.
fn path_key(config: &Config, path: &std::path::Path) -> &'static str {
    let names = |paths: &Option<crate::config::NvmePaths>| {
        paths
            .as_ref()
            .is_some_and(|p| p.paths().iter().any(|q| q == path))
    };
    match (
        names(&config.offload_param.nvme_path),
        names(&config.offload_optimizer.nvme_path),
    ) {
        (true, false) => "offload_param.nvme_path",
        (false, true) => "offload_optimizer.nvme_path",
        _ => "offload_param.nvme_path and offload_optimizer.nvme_path",
    }
}

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

/// Slabs of the engine's host pool (the largest buffer, when larger; the whole pool, when
/// smaller). A slab's tail that no buffer fits stays unused, at most the largest buffer per slab:
/// large slabs keep that below 4% for sub-groups of up to 10M elements.
pub const HOST_SLAB_BYTES: u64 = 1 << 30;

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to.max(1)) * to.max(1)
}

/// Bytes of host memory buffers of `bytes` take in the pool (4 KiB pages).
fn pages(bytes: u64) -> u64 {
    round_up(bytes, 4096)
}

/// The plan for `tiers` (no machine check: see [`PlacementPlan::check`]).
pub fn plan(config: &Config, world: usize, tiers: Tiers, sizes: &PlanSizes<'_>) -> PlacementPlan {
    let shards: Vec<Shard> = sizes.layout.iter().map(|(s, _)| *s).collect();
    let groups = sub_groups(&shards, config.offload_optimizer.sub_group_size);
    let sg_max = groups.iter().map(|g| g.len).max().unwrap_or(0) as u64;
    let x = sizes.x_bytes as u64;
    let moment = match config.offload_optimizer.moments_dtype {
        MomentsDtype::Fp32 => 4,
        MomentsDtype::Bf16 => 2,
    };
    let sharded = |f: fn(&Placement) -> Home| -> u64 {
        sizes
            .layout
            .iter()
            .filter(|(_, p)| f(p) == Home::Sharded)
            .map(|(s, _)| s.len as u64)
            .sum()
    };
    let optim_elems = sharded(|p| p.optimizer);
    let param_elems = sharded(|p| p.params);
    let block = config.aio.block_size.bytes();
    let (obuf, pbuf) = (
        config.offload_optimizer.buffer_count,
        config.offload_param.buffer_count,
    );
    // Every state class, per tier: whole units live on the device; shards on their class's tier.
    let whole = |f: fn(&Placement) -> Home| -> u64 {
        sizes
            .layout
            .iter()
            .filter(|(_, p)| f(p) == Home::Whole)
            .map(|(s, _)| s.padded as u64)
            .sum()
    };
    let grad_elems = sharded(|p| p.grads);
    let optim_moment = if tiers.optimizer == Tier::Device {
        4
    } else {
        moment
    };
    let on_host = resident_on_host(config, tiers, &groups);
    let host_elems: u64 = groups
        .iter()
        .zip(&on_host)
        .filter(|(_, &h)| h)
        .map(|(g, _)| g.len as u64)
        .sum();
    // The sharded optimizer states split between their tier and host memory (the NVMe tier's
    // resident sub-groups); an offloaded optimizer takes its gradients in host memory.
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
    add("compute params", Tier::Device, x * whole(|p| p.params));
    add("compute params", tiers.params, x * param_elems);
    add(
        "master params (f32)",
        Tier::Device,
        4 * whole(|p| p.optimizer),
    );
    add("adam m, v", Tier::Device, 8 * whole(|p| p.optimizer));
    add("gradients (f32)", Tier::Device, 4 * whole(|p| p.grads));
    for (tier, elems) in split(optim_elems) {
        add("master params (f32)", tier, 4 * elems);
        add("adam m, v", tier, 2 * optim_moment * elems);
    }
    let grad_tier = match tiers.optimizer {
        Tier::Device => Tier::Device,
        _ => Tier::Host,
    };
    add("gradients (f32)", grad_tier, 4 * grad_elems);
    rows.sort_by_key(|r| {
        let order = [
            "compute params",
            "master params (f32)",
            "adam m, v",
            "gradients (f32)",
        ];
        (order.iter().position(|&c| c == r.class), r.tier)
    });
    let mut buffers: Vec<(&'static str, usize, u64)> = Vec::new();
    let mut nvme = 0u64;
    // Host pool allocations, one entry per buffer size (as HostTier::new makes them).
    let mut host_allocs: Vec<u64> = Vec::new();
    let gathered = |unit: usize| sizes.layout[unit].1.params == Home::Sharded;
    let optimizer_off = tiers.optimizer != Tier::Device;
    if optimizer_off {
        let states = |n: u64| [pages(4 * n), pages(moment * n), pages(moment * n)];
        for (g, _) in groups.iter().zip(&on_host).filter(|(_, &h)| h) {
            host_allocs.extend(states(g.len as u64));
        }
        host_allocs.extend(groups.iter().map(|g| pages(4 * g.len as u64)));
        let on_nvme: Vec<&SubGroup> = groups
            .iter()
            .zip(&on_host)
            .filter(|(_, &h)| !h)
            .map(|(g, _)| g)
            .collect();
        if tiers.optimizer == Tier::Nvme && !on_nvme.is_empty() {
            let nvme_max = on_nvme.iter().map(|g| g.len).max().unwrap_or(0) as u64;
            let key_bytes = |bytes_per_elem: u64| -> u64 {
                on_nvme
                    .iter()
                    .map(|g| round_up(g.len as u64 * bytes_per_elem, block))
                    .sum()
            };
            nvme += key_bytes(4) + key_bytes(moment) * 2;
            buffers.push((
                "optimizer sub-groups",
                obuf,
                pages(nvme_max * (4 + 2 * moment)),
            ));
            for _ in 0..obuf {
                host_allocs.extend(states(nvme_max));
            }
        }
        buffers.push(("gradient intake", obuf, pages(4 * sg_max)));
        host_allocs.extend(std::iter::repeat_n(pages(4 * sg_max), obuf));
        // Updated compute weights go straight into host-resident shards; elsewhere (NVMe, the
        // device, and the persistent units that stay whole on the device) they are staged.
        if tiers.params != Tier::Host || groups.iter().any(|g| !gathered(g.unit)) {
            buffers.push(("updated parameters", obuf, pages(x * sg_max)));
            host_allocs.extend(std::iter::repeat_n(pages(x * sg_max), obuf));
        }
    }
    if tiers.params != Tier::Device {
        match tiers.params {
            Tier::Host => {
                // On the host, fp32 compute weights are the master weights themselves.
                for (g, _) in groups
                    .iter()
                    .zip(&on_host)
                    .filter(|(g, &h)| gathered(g.unit) && !(x == 4 && h))
                {
                    host_allocs.push(pages(x * g.len as u64));
                }
            }
            _ => {
                nvme += groups
                    .iter()
                    .filter(|g| gathered(g.unit))
                    .map(|g| round_up(g.len as u64 * x, block))
                    .sum::<u64>();
                buffers.push(("parameter fetch", pbuf, pages(x * sg_max)));
                host_allocs.extend(std::iter::repeat_n(pages(x * sg_max), pbuf));
            }
        }
    }
    // Buffers do not span the pool's slabs: a slab's tail may stay unused, at most the largest
    // buffer per slab.
    let largest = host_allocs.iter().copied().max().unwrap_or(0);
    let total: u64 = host_allocs.iter().sum();
    let slabs = total.div_ceil(HOST_SLAB_BYTES.max(largest)).max(1);
    let host = if total == 0 {
        0
    } else {
        total + slabs * largest
    };
    PlacementPlan {
        stage: config.zero.stage,
        world,
        tiers,
        rows,
        device_bytes: sizes.device_bytes,
        host_bytes: host,
        host_pinned: config.offload_param.pin_memory || config.offload_optimizer.pin_memory,
        nvme_bytes: nvme,
        optimizer_on_host: on_host,
        sub_groups: groups,
        buffers,
    }
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

    /// Whether the plan fits the machine; otherwise what does not fit and which setting would
    /// make it fit.
    pub fn check(&self, config: &Config, caps: &Capacities) -> Result<(), Misfit> {
        if let Some(device) = caps.device_bytes {
            if self.device_bytes > device {
                return Err(Misfit::Device {
                    needed: self.device_bytes,
                    available: device,
                });
            }
        }
        self.check_host_and_nvme(config, caps)
            .map_err(Misfit::Other)
    }

    fn check_host_and_nvme(&self, config: &Config, caps: &Capacities) -> Result<(), String> {
        let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
        if let Some(host) = caps.host_bytes {
            let arena = if caps.device_in_host {
                self.device_bytes
            } else {
                0
            };
            if self.host_bytes + arena > host {
                let what = if caps.device_in_host {
                    format!(
                        "{} of host buffers and {} of device arena (the CPU backend's device is host memory)",
                        gib(self.host_bytes),
                        gib(arena)
                    )
                } else {
                    format!("{} of host buffers", gib(self.host_bytes))
                };
                let split = if self.tiers.optimizer == Tier::Nvme
                    && self.optimizer_on_host.iter().any(|&h| h)
                {
                    "lower offload_optimizer.host_fraction (now keeping part of the optimizer states in host memory), "
                } else {
                    ""
                };
                return Err(format!(
                    "host memory: the plan needs {what}, {} is available per rank (MemAvailable); {split}move states to NVMe (offload_*.device = \"nvme\"), partition them (zero.stage, more ranks), or lower offload_optimizer.sub_group_size / buffer_count",
                    gib(host)
                ));
            }
        }
        if self.host_pinned && self.host_bytes > 0 {
            if let Some(limit) = caps.memlock_bytes {
                if self.host_bytes > limit {
                    return Err(format!(
                        "locked memory: the plan pins {} of host buffers, RLIMIT_MEMLOCK allows {}; set offload_param.pin_memory and offload_optimizer.pin_memory = false, or raise the limit (ulimit -l)",
                        gib(self.host_bytes),
                        gib(limit)
                    ));
                }
            }
        }
        let largest = self.sub_groups.iter().map(|g| g.len).max().unwrap_or(0) as u64;
        let params_on_nvme = self
            .rows
            .iter()
            .any(|r| r.class == "compute params" && r.tier == Tier::Nvme);
        if params_on_nvme && largest * 4 > config.offload_param.buffer_size.bytes() {
            return Err(format!(
                "offload_param.buffer_size = {} is smaller than the largest parameter sub-group ({} elements); raise it to at least {} bytes or lower offload_optimizer.sub_group_size",
                config.offload_param.buffer_size,
                largest,
                largest * 4
            ));
        }
        if self.nvme_bytes > 0 {
            let paths = nvme_paths(config);
            let share = self.nvme_bytes.div_ceil(paths.len().max(1) as u64);
            for (path, free) in &caps.nvme_free {
                match free {
                    None => {
                        return Err(format!(
                            "{}: {} is not a directory (it must exist on the NVMe drive: strata does not create it, so that a missing mount is not filled instead)",
                            path_key(config, path),
                            path.display()
                        ))
                    }
                    Some(free) if *free < share => {
                        return Err(format!(
                            "NVMe: {} has {} free, the plan writes {} there ({}); free space, add a path, or keep some states in memory (offload_optimizer.host_fraction keeps a share of the optimizer states in host memory)",
                            path.display(),
                            gib(*free),
                            gib(share),
                            path_key(config, path)
                        ))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
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
mod tests {
    use super::*;

    fn layout(lens: &[usize], world: usize, stage: u8) -> Vec<(Shard, Placement)> {
        lens.iter()
            .map(|&n| (Shard::new(n, world, 0), Placement::for_stage(stage, n, 0)))
            .collect()
    }

    #[test]
    fn sub_groups_tile_each_shard_on_the_norm_grid() {
        let shards: Vec<Shard> = [100_000, 70_000, 5]
            .iter()
            .map(|&n| Shard::new(n, 2, 1))
            .collect();
        let groups = sub_groups(&shards, 40_000);
        for (u, s) in shards.iter().enumerate() {
            let mine: Vec<&SubGroup> = groups.iter().filter(|g| g.unit == u).collect();
            assert_eq!(mine.iter().map(|g| g.len).sum::<usize>(), s.len);
            assert!(mine
                .iter()
                .all(|g| g.start % NORM_CHUNK == 0 && g.len <= 32_768));
        }
    }

    #[test]
    fn bytes_per_tier_follow_the_formulas() {
        let mut config = Config::default();
        config.zero.stage = 3;
        config.offload_optimizer.sub_group_size = 1 << 20;
        config.aio.block_size = crate::config::ByteSize::mib(1);
        let lay = layout(&[4 << 20, 4 << 20], 4, 3);
        let sizes = PlanSizes {
            layout: &lay,
            x_bytes: 2,
            device_bytes: 1 << 20,
        };
        let elems = 2 * (1 << 20) as u64; // two shards of 1M elements
        let nvme = plan(
            &config,
            4,
            Tiers {
                params: Tier::Nvme,
                optimizer: Tier::Nvme,
            },
            &sizes,
        );
        // fp32 master weights, fp32 m and v, bf16 compute weights: 14 bytes per element on
        // NVMe; the fp32 gradients in host memory.
        assert_eq!(nvme.nvme_bytes, 14 * elems);
        // Plus the staging buffers: 4 optimizer sets of 12 MiB, 4 gradient intake and 4 updated
        // parameter slots, 5 parameter fetch slots (90 MiB with the gradients: one slab).
        assert!(nvme.host_bytes >= 4 * elems && nvme.host_bytes < 4 * elems + (128 << 20));
        let cpu = plan(
            &config,
            4,
            Tiers {
                params: Tier::Host,
                optimizer: Tier::Host,
            },
            &sizes,
        );
        assert_eq!(cpu.nvme_bytes, 0);
        assert!(cpu.host_bytes >= 18 * elems && cpu.host_bytes < 18 * elems + (64 << 20));
        let rows: u64 = cpu.rows.iter().map(|r| r.bytes).sum();
        assert_eq!(rows, 18 * elems);
    }

    #[test]
    fn host_fraction_keeps_that_share_of_the_optimizer_in_host_memory() {
        let mut config = Config::default();
        config.zero.stage = 3;
        config.offload_optimizer.sub_group_size = 1 << 16;
        config.aio.block_size = crate::config::ByteSize::mib(1);
        let lay = layout(&[3 << 20, 5 << 20, 1 << 20], 1, 3);
        let sizes = PlanSizes {
            layout: &lay,
            x_bytes: 2,
            device_bytes: 1 << 20,
        };
        let tiers = Tiers {
            params: Tier::Device,
            optimizer: Tier::Nvme,
        };
        let elems = (9u64 << 20) as f64;
        let all_nvme = plan(&config, 1, tiers, &sizes);
        for f in [0.0, 0.3, 0.75, 1.0] {
            config.offload_optimizer.host_fraction = f;
            let p = plan(&config, 1, tiers, &sizes);
            let bytes = |class: &str, tier: Tier| -> f64 {
                p.rows
                    .iter()
                    .filter(|r| r.class == class && r.tier == tier)
                    .map(|r| r.bytes as f64)
                    .sum()
            };
            assert_eq!(
                bytes("gradients (f32)", Tier::Host),
                4.0 * elems,
                "gradients stay in host memory"
            );
            for class in ["master params (f32)", "adam m, v"] {
                let (host, nvme) = (bytes(class, Tier::Host), bytes(class, Tier::Nvme));
                let share = host / (host + nvme);
                // Whole sub-groups of 64Ki elements: within one sub-group of the fraction.
                assert!(
                    (share - f).abs() <= 65536.0 / elems,
                    "{class} at {f}: {share}"
                );
            }
            // The swap files shrink with the share on NVMe (whole blocks of 1 MiB).
            let nvme_share = p.nvme_bytes as f64 / all_nvme.nvme_bytes as f64;
            assert!((nvme_share - (1.0 - f)).abs() < 0.01, "{f}: {nvme_share}");
            let resident = p.optimizer_on_host.iter().filter(|&&h| h).count();
            assert_eq!(resident == 0, f == 0.0);
            assert_eq!(resident == p.sub_groups.len(), f == 1.0);
            if f > 0.0 && f < 1.0 {
                assert!(
                    p.optimizer_where().starts_with("nvme ("),
                    "{}",
                    p.optimizer_where()
                );
            }
        }
    }

    #[test]
    fn auto_tries_the_fastest_placement_first() {
        let mut config = Config::default();
        config.zero.stage = 3;
        config.offload_optimizer.device = OffloadDevice::Auto;
        config.offload_param.device = OffloadDevice::Auto;
        let tiers = candidate_tiers(&config);
        assert_eq!(tiers[0].params, Tier::Device);
        assert_eq!(tiers[0].optimizer, Tier::Device);
        assert_eq!(tiers[1].optimizer, Tier::Host);
        assert!(
            tiers.iter().all(|t| t.optimizer != Tier::Nvme),
            "no nvme_path, no NVMe"
        );
    }
}
