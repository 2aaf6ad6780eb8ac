//! The host tier: every state that lives off the device, per sub-group of this rank's shards —
//! parameter shards on the host or NVMe, the host optimizer's fp32 master weights and Adam
//! moments on the host or NVMe (the gradients it takes are always in host memory) — with the
//! engine's one host pool (allocated once, page-locked on request, registered with the device)
//! and its swap stores. It exists exactly when the optimizer is off the device.
//!
//! Each sub-group is one record, [`SubGroupState`], whose homes own their storage. All work is
//! enqueued on the device's queues: NVMe reads and writes on `Queue::Io`, the host optimizer and
//! gradient intake on `Queue::Host`, copies on H2D / D2H. Staging buffers are rings; a slot is
//! reused only after the event that released it (recorded by the queue that consumed it). The
//! host thread never waits, except for the gradient norm (a host decision).
//!
//! By idea: `swap.rs` (swap stores, NVMe transfers and their counters), `fetch.rs` (parameter
//! shards to the device), `intake.rs` (reduced gradients into host memory, the norm's partial
//! sums), `adamw.rs` (the host optimizer, NVMe reads one set ahead), `states.rs` (whole states in
//! and out: initialisation, checkpoints); host memory's typed views are `engine/host_mem.rs`'s.

mod adamw;
mod fetch;
mod intake;
mod states;
mod swap;

pub use states::OptimStates;
pub use swap::OffloadTraffic;

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use strata_offload::{HostPool, OnExhausted, PoolConfig, SwapStore};

use super::host_mem::HostMem;
use super::memory::{AdamSegment, UnitState};
use super::placement::{moment_bytes, PlacementPlan, SubGroup, Tier, HOST_SLAB_BYTES};
use super::ring::Ring;
use super::setup::{Laid, TempSwapDir};
use super::zero::clip_segments;
use super::EngineError;
use crate::backend::{AdamWHyper, Buf, DType, Device, DeviceError, Event};
use crate::config::{Config, MomentsDtype};
use swap::{offload_error, with_causes, Shared};

/// The host optimizer's states of one sub-group in host memory.
struct HostStates {
    master: HostMem,
    m: HostMem,
    v: HostMem,
}

/// Where a sub-group's optimizer states (fp32 master weights, Adam m and v) live.
enum OptimHome {
    /// Host memory, for good.
    Host(HostStates),
    /// NVMe. While it is stepped they are in flight through staging set `nth % sets`, `nth` being
    /// its place among the NVMe sub-groups of the optimizer's order.
    Nvme { nth: usize },
}

/// Where a sub-group's compute weights live between steps.
enum ParamHome {
    /// On the device: this piece of the unit's device shard, written through the `out` ring.
    Device(Buf),
    /// Host memory (fp32 compute weights share the master weights' buffer); fetched from there.
    Host(HostMem),
    /// NVMe: written through the `out` ring, fetched through the `fetch` ring.
    Nvme,
}

/// One sub-group of this rank's shards and everything the host tier keeps for it.
struct SubGroupState {
    group: SubGroup,
    optim: OptimHome,
    /// Its gradient, summed over micro-batches in host memory whatever the tier of its states
    /// (DeepSpeed's layout: NVMe holds master weights and moments, so accumulation never reads
    /// the disk).
    grad: HostMem,
    /// When the optimizer has read `grad` (the next intake overwrites it).
    grad_free: Option<Event>,
    params: ParamHome,
    /// When its updated compute weights are in place (device, host or NVMe).
    param_written: Option<Event>,
    /// AdamW's segments over it, relative to its start (decay per tensor, exact at its edges).
    segments: Arc<[AdamSegment]>,
    /// This step's AdamW already ran (during backward).
    stepped: bool,
}

/// Everything off the device.
pub struct HostTier {
    x: DType,
    moments: MomentsDtype,
    groups: Vec<SubGroupState>,
    /// Per unit: its sub-groups (indices into `groups`).
    unit_groups: Vec<Range<usize>>,
    /// The order the optimizer steps the sub-groups: those of units whose compute weights stay
    /// whole on the device first (the step waits for their gathers), then the others in the
    /// forward's order, which the next step's forward follows as they are written.
    order: Vec<usize>,
    /// The sub-groups on NVMe in that order (a sub-group's `nth` is its place here), and per
    /// each, when the reads of its states into their staging set are done (during a step).
    on_nvme: Vec<usize>,
    reads: Vec<Option<Event>>,
    /// The staging sets NVMe sub-groups pass through (`offload_optimizer.buffer_count`).
    opt_sets: Vec<HostStates>,
    /// This step's hyperparameters (without and with weight decay) when its AdamW starts during
    /// backward: each resident sub-group is stepped as its gradient completes.
    early: Option<[AdamWHyper; 2]>,
    /// Reduced gradients on their way to the optimizer.
    intake: Ring<HostMem>,
    /// Updated compute weights on their way to the device or NVMe.
    out: Option<Ring<HostMem>>,
    /// Parameter shards on their way from NVMe to the device.
    fetch: Option<Ring<HostMem>>,
    shared: Arc<Shared>,
    /// The swap files, removed if a signal ends the process (they are removed on close too).
    _on_signal: Vec<crate::outputs::cleanup::Registration>,
    // Dropped after every buffer above, which returns to it.
    _pool: HostPool,
    // Last: the directory of `nvme_path = "@tmp"`, removed once the swap files are closed.
    _swap_dir: Option<TempSwapDir>,
}

impl HostTier {
    /// The pool, stores and buffers of `plan` (nothing is allocated later) for the units laid
    /// out in `laid`, whose device states are `units`.
    pub fn new(
        config: &Config,
        plan: &PlacementPlan,
        laid: &Laid,
        units: &[UnitState],
        dev: &dyn Device,
        rank: usize,
        swap_dir: Option<TempSwapDir>,
    ) -> Result<HostTier, EngineError> {
        let pool = open_pool(plan, dev)?;
        let timeout = Duration::from_secs(config.dist.timeout_s.saturating_add(60));
        let store = |tier: Tier,
                     paths: &Option<crate::config::NvmePaths>,
                     key: &'static str,
                     name: &str| {
            open_store(
                config,
                &pool,
                tier,
                paths,
                timeout,
                format!("strata-{name}.rank{rank}.swap"),
            )
            .map_err(|message| EngineError::Setting { key, message })
        };
        let shared = Arc::new(Shared::new(
            store(
                plan.tiers.params,
                &config.offload_param.nvme_path,
                "offload_param.nvme_path",
                "params",
            )?,
            store(
                plan.tiers.optimizer,
                &config.offload_optimizer.nvme_path,
                "offload_optimizer.nvme_path",
                "optim",
            )?,
            units.len(),
            timeout,
        ));
        crate::outputs::cleanup::install();
        let on_signal = shared
            .stores()
            .flat_map(SwapStore::file_paths)
            .map(|p| crate::outputs::cleanup::register(&p))
            .collect();
        let x = laid.sizes.x;
        let moments = config.offload_optimizer.moments_dtype;
        let buffers = Buffers::allocate(config, plan, units, x, &pool)?;
        let groups = records(plan, units, &laid.segments, buffers.per_group)?;
        let mut unit_groups = vec![0..0; units.len()];
        for (k, g) in groups.iter().enumerate() {
            let r = &mut unit_groups[g.group.unit];
            *r = if r.start == r.end {
                k..k + 1
            } else {
                r.start..k + 1
            };
        }
        let gathered = |k: usize| units[groups[k].group.unit].weights.is_gathered();
        let mut order: Vec<usize> = (0..groups.len()).collect();
        order.sort_by_key(|&k| gathered(k));
        let on_nvme: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&k| matches!(groups[k].optim, OptimHome::Nvme { .. }))
            .collect();
        let mut groups = groups;
        for (nth, &k) in on_nvme.iter().enumerate() {
            groups[k].optim = OptimHome::Nvme { nth };
        }
        Ok(HostTier {
            x,
            moments,
            unit_groups,
            order,
            reads: (0..on_nvme.len()).map(|_| None).collect(),
            on_nvme,
            groups,
            opt_sets: buffers.opt_sets,
            early: None,
            intake: buffers.intake,
            out: buffers.out,
            fetch: buffers.fetch,
            shared,
            _on_signal: on_signal,
            _pool: pool,
            _swap_dir: swap_dir,
        })
    }

    /// Bytes moved so far (NVMe read/write with their time, host to device, device to host).
    pub fn traffic(&self) -> OffloadTraffic {
        self.shared.traffic()
    }

    /// The events after which `unit`'s updated compute weights are in place.
    pub fn written(&self, unit: usize) -> impl Iterator<Item = &Event> {
        self.groups[self.unit_groups[unit].clone()]
            .iter()
            .filter_map(|g| g.param_written.as_ref())
    }

    /// The optimizer states of sub-group `k` in host memory: its own, or the staging set it
    /// passes through.
    fn states_of(&self, k: usize) -> Result<&HostStates, EngineError> {
        match &self.groups[k].optim {
            OptimHome::Host(s) => Ok(s),
            OptimHome::Nvme { nth } => self
                .opt_sets
                .get(nth % self.opt_sets.len().max(1))
                .ok_or_else(|| missing("optimizer buffers")),
        }
    }

    fn moment_bytes(&self) -> usize {
        moment_bytes(self.moments)
    }
}

/// The engine's host pool, of the plan's size, page-locked and registered with the device on
/// request.
fn open_pool(plan: &PlacementPlan, dev: &dyn Device) -> Result<HostPool, EngineError> {
    let pinned = plan.host_pinned;
    let sg_max = plan.sub_groups.iter().map(|g| g.len).max().unwrap_or(0);
    let slab = (HOST_SLAB_BYTES as usize).max((4 * sg_max).next_multiple_of(4096));
    let pool = HostPool::new(PoolConfig {
        bytes_total: usize::try_from(plan.host_bytes)
            .unwrap_or(usize::MAX)
            .max(4096),
        slab_bytes_max: slab,
        mlock: pinned,
        on_exhausted: OnExhausted::Error,
        check_budget: true,
    })
    .map_err(|e| EngineError::Setting {
        key: if pinned {
            "offload_optimizer.pin_memory"
        } else {
            "offload_optimizer.device"
        },
        message: e.to_string(),
    })?;
    if let (true, Some(registrar)) = (pinned, dev.host_registrar()) {
        pool.add_registrar(registrar).map_err(offload_error)?;
    }
    Ok(pool)
}

/// The swap store of a class on `tier` (None off NVMe), its files named `file_name`; the
/// error's message (the caller names the key).
fn open_store(
    config: &Config,
    pool: &HostPool,
    tier: Tier,
    paths: &Option<crate::config::NvmePaths>,
    timeout: Duration,
    file_name: String,
) -> Result<Option<SwapStore>, String> {
    if tier != Tier::Nvme {
        return Ok(None);
    }
    let paths = paths.as_ref().map(|p| p.paths()).unwrap_or_default();
    let mut aio = config.aio.to_aio(timeout);
    aio.file_name = file_name;
    SwapStore::open_with_pool(&paths, aio, pool)
        .map(Some)
        .map_err(|e| with_causes(&e))
}

/// The host buffers of one sub-group, before its record is made.
struct GroupBuffers {
    /// Its optimizer states when they stay in host memory.
    states: Option<HostStates>,
    /// Its compute weights when they live in host memory.
    params: Option<HostMem>,
    grad: HostMem,
}

/// Every host buffer of the plan, allocated from the pool at start-up.
struct Buffers {
    per_group: Vec<GroupBuffers>,
    opt_sets: Vec<HostStates>,
    intake: Ring<HostMem>,
    out: Option<Ring<HostMem>>,
    fetch: Option<Ring<HostMem>>,
}

impl Buffers {
    /// In the order `placement::plan` counts them; the staging as the plan sized it.
    fn allocate(
        config: &Config,
        plan: &PlacementPlan,
        units: &[UnitState],
        x: DType,
        pool: &HostPool,
    ) -> Result<Buffers, EngineError> {
        let groups = &plan.sub_groups;
        let staging = &plan.staging;
        let mbytes = moment_bytes(config.offload_optimizer.moments_dtype);
        let alloc = |bytes: usize| {
            pool.alloc(bytes.max(1))
                .map(HostMem::new)
                .map_err(offload_error)
        };
        let host_states = |len: usize| -> Result<HostStates, EngineError> {
            Ok(HostStates {
                master: alloc(4 * len)?,
                m: alloc(mbytes * len)?,
                v: alloc(mbytes * len)?,
            })
        };
        let ring = |count: usize, bytes: usize| -> Result<Option<Ring<HostMem>>, EngineError> {
            let slots = (0..count)
                .map(|_| alloc(bytes))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((count > 0).then(|| Ring::new(slots)))
        };
        let states = groups
            .iter()
            .zip(&plan.optimizer_on_host)
            .map(|(g, &on_host)| on_host.then(|| host_states(g.len)).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let params = groups
            .iter()
            .zip(&states)
            .map(|(g, s)| match plan.tiers.params {
                Tier::Host if units[g.unit].weights.is_gathered() => match s {
                    Some(s) if x == DType::F32 => Ok(Some(s.master.clone())),
                    _ => alloc(x.size_bytes() * g.len).map(Some),
                },
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let grads = groups
            .iter()
            .map(|g| alloc(4 * g.len))
            .collect::<Result<Vec<_>, _>>()?;
        let opt_sets = (0..staging.opt_sets)
            .map(|_| host_states(staging.opt_len))
            .collect::<Result<_, _>>()?;
        let xb = x.size_bytes();
        Ok(Buffers {
            per_group: states
                .into_iter()
                .zip(params)
                .zip(grads)
                .map(|((states, params), grad)| GroupBuffers {
                    states,
                    params,
                    grad,
                })
                .collect(),
            opt_sets,
            intake: ring(staging.intake, 4 * staging.intake_len)?
                .ok_or_else(|| missing("gradient intake"))?,
            out: ring(staging.out, xb * staging.out_len)?,
            fetch: ring(staging.fetch, xb * staging.fetch_len)?,
        })
    }
}

/// One record per sub-group of `plan`, with its buffers.
fn records(
    plan: &PlacementPlan,
    units: &[UnitState],
    segments: &[Vec<AdamSegment>],
    buffers: Vec<GroupBuffers>,
) -> Result<Vec<SubGroupState>, EngineError> {
    plan.sub_groups
        .iter()
        .zip(buffers)
        .map(|(&g, b)| {
            let unit = &units[g.unit];
            let params = match (b.params, plan.tiers.params) {
                (Some(mem), _) => ParamHome::Host(mem),
                (None, Tier::Nvme) if unit.weights.is_gathered() => ParamHome::Nvme,
                (None, _) => ParamHome::Device(
                    unit.weights
                        .device_shard()
                        .ok_or_else(|| missing("device parameter shard"))?
                        .slice(g.start, g.len)?,
                ),
            };
            let abs = unit.shard.range().start + g.start;
            Ok(SubGroupState {
                group: g,
                // NVMe sub-groups get their place in the optimizer's order once it is known.
                optim: match b.states {
                    Some(s) => OptimHome::Host(s),
                    None => OptimHome::Nvme { nth: 0 },
                },
                grad: b.grad,
                grad_free: None,
                params,
                param_written: None,
                segments: clip_segments(&segments[g.unit], &(abs..abs + g.len)).into(),
                stepped: false,
            })
        })
        .collect()
}

fn missing(what: &str) -> EngineError {
    EngineError::Device(DeviceError::op(
        "host tier",
        format!("no {what} in this placement"),
    ))
}
