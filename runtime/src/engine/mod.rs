//! `Engine`: one engine for every backend. It owns parameter, gradient and optimizer memory per
//! unit on the device, walks the model's stages forward and backward over micro-batches, averages
//! gradients across data-parallel ranks, and applies clipped AdamW — all through the device
//! seam, so the same code trains on the CPU and on a GPU.
//!
//! Memory is planned before the first step: the allocation code (the engine's states and step
//! buffers, the model's activations and workspaces) runs once on a counting arena, the device is
//! opened with exactly that many bytes — or the engine says what does not fit and what to
//! change — and the same code runs again on the device's arena. Nothing is allocated inside a
//! step. Each unit's states sit in one record, [`UnitState`], so partitioning and offload can
//! replace its buffers by shards with a residency without the stage walk changing.

pub mod checkpoint;
mod error;
mod host;
mod host_mem;
pub mod host_tier;
mod memory;
pub mod placement;
pub mod schedule;
mod stats;
mod step;
mod walk;
pub mod zero;

pub use error::{BatchError, EngineError};
pub use host_tier::OffloadTraffic;
pub use memory::{human_bytes, UnitState};
pub use stats::{StepStats, Traffic};

use std::sync::Arc;
use std::time::Duration;

use strata_collectives::{CommError, Communicator};

use crate::backend::{
    self, Arena, AttentionMode, Backend, Device, DeviceError, DeviceOptions, Event, Precision,
    Queue,
};
use crate::config::{self, Config, DeviceKind, DistConfig};
use crate::model::{Batch, Model, Prepare, UnitSpec};
use crate::optim::LossScaler;
use memory::{AdamSegment, Sizes, StepBuffers};
use placement::Tier;
use schedule::{Lookahead, Plan, PlanInput};
use zero::{Home, Placement, Shard};

/// The communicator for this process: from the launcher's variables when it was started by
/// `strata launch`, torchrun, srun or mpirun; a world of one otherwise.
pub fn connect(dist: &DistConfig, gpu: bool) -> Result<Box<dyn Communicator>, CommError> {
    const LAUNCHER_VARS: [&str; 4] = ["WORLD_SIZE", "RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"];
    if !LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some()) {
        return strata_collectives::single();
    }
    strata_collectives::init_from_env(&strata_collectives::DistConfig {
        backend: dist.backend,
        timeout: Duration::from_secs(dist.timeout_s),
        gpu,
        shm_slot_bytes: dist.shm_slot_bytes.bytes() as usize,
    })
}

/// The backend `train.device` resolves to: `auto` takes the GPU when a CUDA driver reports one.
pub fn resolve_backend(device: DeviceKind) -> Backend {
    match device {
        DeviceKind::Cuda => Backend::Cuda,
        DeviceKind::Cpu => Backend::Cpu,
        DeviceKind::Auto if backend::cuda::gpu_available() => Backend::Cuda,
        DeviceKind::Auto => Backend::Cpu,
    }
}

/// The compute type for `train.precision` on `backend`: `auto` is bf16 on a GPU, fp32 on the CPU.
pub fn resolve_precision(
    precision: config::Precision,
    backend: Backend,
) -> Result<Precision, EngineError> {
    Ok(match (backend, precision) {
        (Backend::Cpu, config::Precision::Auto | config::Precision::Fp32) => Precision::Fp32,
        (Backend::Cpu, other) => {
            return Err(EngineError::Setting {
                key: "train.precision",
                message: format!(
                    "{other:?} needs a GPU, and train.device resolved to the CPU (which computes in fp32)"
                ),
            })
        }
        (Backend::Cuda, config::Precision::Auto | config::Precision::Bf16) => Precision::Bf16,
        (Backend::Cuda, config::Precision::Fp16) => Precision::Fp16,
        (Backend::Cuda, config::Precision::Fp32) => Precision::Fp32,
    })
}

/// Refuses, before anything is allocated, a model whose fused attention the backend cannot run:
/// the CUDA kernels take head sizes up to [`FLASH_HS_MAX`](backend::cuda::flash::FLASH_HS_MAX).
fn check_attention(config: &Config, backend: Backend) -> Result<(), EngineError> {
    let hs = config.model.head_size();
    let max = backend::cuda::flash::FLASH_HS_MAX;
    if backend == Backend::Cuda && config.train.attention == AttentionMode::Fused && hs > max {
        return Err(EngineError::Setting {
            key: "train.attention",
            message: format!(
                "\"fused\" on a GPU takes head sizes up to {max}, and the model's (model.head_dim, or model.n_embd / model.n_head) is {hs}; set train.attention = \"materialized\""
            ),
        });
    }
    Ok(())
}

pub struct Engine {
    config: Config,
    model: Box<dyn Model>,
    units: Vec<UnitSpec>,
    /// The units each stage uses (the model's `stages()`, read once).
    stage_units: Vec<Vec<usize>>,
    /// AdamW segments of each unit.
    segments: Vec<Vec<AdamSegment>>,
    sizes: Sizes,
    states: Vec<UnitState>,
    bufs: StepBuffers,
    /// How far ahead the walks gather, as the budget allowed.
    lookahead: Lookahead,
    /// Where every state class lives (tiers, bytes per tier).
    placement: placement::PlacementPlan,
    /// States off the device, with their pool and swap stores (None: everything on the device).
    host: Option<host_tier::HostTier>,
    /// The temporary directory of `nvme_path = "@tmp"` (after `host`: removed once the swap
    /// files are closed).
    _swap_dir: Option<TempSwapDir>,
    /// When each reduced-gradient target may be reused (its copies to the host are done), and
    /// the next one to use.
    reduce_released: Vec<Option<Event>>,
    reduce_next: usize,
    /// Plans of the walks run so far, by (micro-batches, training).
    plans: Vec<((usize, bool), Arc<Plan>)>,
    scaler: LossScaler,
    /// Optimizer steps taken.
    step: usize,
    /// Host staging of the step's tokens, laid out as `bufs.tokens`.
    tokens_host: Vec<i32>,
    /// The last copy out of `tokens_host` (waited for before it is rewritten).
    tokens_copied: Option<Event>,
    /// Bytes of device memory per purpose, from the dry run.
    ledger: Vec<(&'static str, usize)>,
    /// Data-parallel group: gradients are averaged over it before the optimizer step.
    comm: Arc<dyn Communicator>,
    // Last: its queues drain (and its memory is freed) after every buffer above is dropped.
    dev: Arc<dyn Device>,
}

impl Engine {
    /// The model `config.model` describes (`model.arch`), initialised from `model.init_from`
    /// or from `data.seed`, on the device `train.device` resolves to.
    pub fn from_config(config: Config) -> Result<Engine, EngineError> {
        check_attention(&config, resolve_backend(config.train.device))?;
        let model = crate::model::build(&config.model);
        Engine::new(config, model)
    }

    /// An engine for any [`Model`]; parameters start from the model's init (seeded by
    /// `data.seed`), or from `model.init_from` when set.
    pub fn new(config: Config, mut model: Box<dyn Model>) -> Result<Engine, EngineError> {
        let backend = resolve_backend(config.train.device);
        let precision = resolve_precision(config.train.precision, backend)?;
        let comm: Arc<dyn Communicator> =
            Arc::from(connect(&config.dist, backend == Backend::Cuda)?);
        crate::agree::check_ranks_agree(comm.as_ref(), &config)?;
        let (world, rank) = (comm.world_size(), comm.rank());
        // nvme_path = "@tmp": this rank's own fresh directory, removed when the engine drops.
        let swap_dir = config
            .wants_temp_nvme_path()
            .then(TempSwapDir::create)
            .transpose()?;
        let config = match &swap_dir {
            Some(dir) => config.with_temp_nvme_path(&dir.path),
            None => config,
        };
        let laid = lay_out(&config, model.as_ref(), world, rank, precision)?;
        // The dry run (the same allocations on an arena that only counts) for each placement the
        // config allows, fastest first: the first that fits this machine is the plan.
        let caps = placement::Capacities::of_this_machine(&config, backend);
        let (placement, counting) = choose_placement(&config, &laid, model.as_mut(), world, &caps)?;
        let Laid {
            units,
            stage_units,
            layout,
            lookahead,
            sizes,
            prepare,
        } = laid;
        let ledger = counting.ledger();
        let dev = backend::open(&DeviceOptions {
            backend,
            precision,
            arena_bytes: counting.peak_bytes(),
            budget_bytes: config
                .train
                .device_memory
                .bytes()
                .map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
            threads: crate::threads::compute_threads(config.train.threads),
            ordinal: strata_collectives::RankInfo::from_env().map_or(0, |info| info.local_rank),
            stall_timeout: Duration::from_secs(config.dist.timeout_s.saturating_add(60)),
        })
        .map_err(|e| does_not_fit(e, &ledger, &config))?;
        let (states, bufs) = memory::allocate(dev.arena(), &layout, placement.tiers, &sizes)?;
        model.prepare(dev.arena(), prepare)?;
        let host = if placement.tiers.params == Tier::Device
            && placement.tiers.optimizer == Tier::Device
        {
            None
        } else {
            let shards: Vec<Shard> = layout.iter().map(|(s, _)| *s).collect();
            let gathered: Vec<bool> = layout
                .iter()
                .map(|(_, p)| p.params == Home::Sharded)
                .collect();
            Some(host_tier::HostTier::new(
                &config,
                &placement,
                &shards,
                &gathered,
                sizes.x,
                dev.as_ref(),
                rank,
            )?)
        };
        if rank == 0 {
            // The summary line says where states live; the table is `strata plan`'s.
            tracing::debug!("{}", placement.table());
        }
        let mut engine = Engine {
            reduce_released: (0..bufs.reduce_targets.len()).map(|_| None).collect(),
            reduce_next: 0,
            placement,
            host,
            _swap_dir: swap_dir,
            lookahead,
            plans: Vec::new(),
            segments: units.iter().map(memory::adam_segments).collect(),
            scaler: LossScaler::for_precision(precision),
            tokens_host: vec![0; 2 * sizes.micro_max * sizes.bt()],
            tokens_copied: None,
            step: 0,
            config,
            model,
            units,
            stage_units,
            sizes,
            states,
            bufs,
            ledger,
            comm,
            dev,
        };
        engine.init_params()?;
        tracing::debug!(
            device = %engine.dev.name(),
            precision = precision.name(),
            params = engine.num_params(),
            device_bytes = engine.dev.arena().used_bytes(),
            "engine ready"
        );
        Ok(engine)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// The device the engine runs on.
    pub fn device(&self) -> &dyn Device {
        self.dev.as_ref()
    }

    /// The model's units (flat parameter layouts).
    pub fn units(&self) -> &[UnitSpec] {
        &self.units
    }

    /// Parameters of the model (padding excluded).
    pub fn num_params(&self) -> usize {
        self.units.iter().map(UnitSpec::num_params).sum()
    }

    /// Where every state class lives: tiers and bytes per tier on this rank.
    pub fn placement(&self) -> &placement::PlacementPlan {
        &self.placement
    }

    /// What moved between the tiers and how long compute waited, since the engine opened.
    pub fn traffic(&self) -> Traffic {
        let secs = |q: Queue, waited: bool| {
            self.dev.queue_time(q).map(|t| {
                if waited {
                    t.waited.as_secs_f64()
                } else {
                    t.busy.as_secs_f64()
                }
            })
        };
        Traffic {
            offload: self.host.as_ref().map(|h| h.traffic()).unwrap_or_default(),
            h2d_busy_s: secs(Queue::H2d, false),
            d2h_busy_s: secs(Queue::D2h, false),
            compute_waited_s: secs(Queue::Compute, true),
        }
    }

    /// Device memory per purpose as the dry run counted it, largest first.
    pub fn memory_ledger(&self) -> &[(&'static str, usize)] {
        &self.ledger
    }

    /// The ZeRO stage the engine runs.
    pub fn zero_stage(&self) -> u8 {
        self.config.zero.stage
    }

    /// Optimizer steps taken so far.
    pub fn step(&self) -> usize {
        self.step
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The data-parallel group (for sums over ranks outside the step, and its backend).
    pub fn communicator(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    /// An empty micro-batch of the configured shape, to fill and pass to [`Engine::train_step`].
    pub fn new_batch(&self) -> Batch {
        Batch::zeros(self.sizes.b, self.sizes.t)
    }
}

/// An arena that does not fit becomes an error that says what takes the memory and what to
/// change; other errors pass through.
fn does_not_fit(e: DeviceError, ledger: &[(&'static str, usize)], config: &Config) -> EngineError {
    let DeviceError::OutOfMemory {
        backend,
        requested_bytes,
        available_bytes,
        limit,
    } = e
    else {
        return e.into();
    };
    let takers: Vec<String> = ledger
        .iter()
        .take(6)
        .map(|(what, bytes)| format!("{what} {}", human_bytes(*bytes)))
        .collect();
    let mut advice = vec![format!(
        "lower data.micro_batch_size (now {}) and raise data.grad_accum_steps",
        config.data.micro_batch_size
    )];
    if !config.train.activation_checkpointing {
        advice.push("set train.activation_checkpointing = true".into());
    }
    if config.train.attention == AttentionMode::Materialized {
        advice.push("set train.attention = \"fused\" (no attention scores in memory)".into());
    }
    if limit == "train.device_memory" {
        advice.push("raise train.device_memory".into());
    }
    let z = &config.zero;
    if z.stage < 3 {
        advice.push(format!(
            "partition more states (zero.stage = 3, now {}; more ranks hold less each)",
            z.stage
        ));
    }
    if config.offload_optimizer.device == crate::config::OffloadDevice::None && z.stage >= 1 {
        advice.push(
            "move optimizer states off the device (offload_optimizer.device = \"cpu\" or \"nvme\")"
                .into(),
        );
    }
    if config.offload_param.device == crate::config::OffloadDevice::None && z.stage == 3 {
        advice.push("move parameters off the device (offload_param.device = \"cpu\" or \"nvme\", with the optimizer's)".into());
    }
    if z.stage == 3 {
        advice.push(format!(
            "lower zero.prefetch_bytes_max (now {})",
            z.prefetch_bytes_max
        ));
    }
    advice.push("or train a smaller model".into());
    EngineError::DoesNotFit(format!(
        "the model does not fit in {backend} device memory: it needs {} = {requested_bytes} bytes ({}), {} = {available_bytes} bytes are available ({limit}); {}",
        human_bytes(requested_bytes),
        takers.join(", "),
        human_bytes(available_bytes),
        advice.join(", ")
    ))
}

/// A fresh directory under `$TMPDIR` for swap files, removed (with anything left in it) on drop.
struct TempSwapDir {
    path: std::path::PathBuf,
    _on_signal: crate::outputs::cleanup::Registration,
}

impl TempSwapDir {
    fn create() -> Result<TempSwapDir, EngineError> {
        let base = std::env::temp_dir();
        let path = base.join(format!(
            "strata-swap-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ));
        std::fs::create_dir(&path).map_err(|e| EngineError::Setting {
            key: "offload_param.nvme_path",
            message: format!(
                "\"{}\": cannot create {}: {e}",
                config::TEMP_NVME_PATH,
                path.display()
            ),
        })?;
        crate::outputs::cleanup::install();
        Ok(TempSwapDir {
            _on_signal: crate::outputs::cleanup::register(&path),
            path,
        })
    }
}

impl Drop for TempSwapDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// What the engine decides from the config and the model before it opens a device.
struct Laid {
    units: Vec<UnitSpec>,
    /// The units each stage uses.
    stage_units: Vec<Vec<usize>>,
    /// Per unit: this rank's shard and where each state class lives.
    layout: Vec<(Shard, Placement)>,
    lookahead: Lookahead,
    sizes: Sizes,
    prepare: Prepare,
}

fn lay_out(
    config: &Config,
    model: &dyn Model,
    world: usize,
    rank: usize,
    precision: Precision,
) -> Result<Laid, EngineError> {
    let units = model.units().to_vec();
    let stage_units: Vec<Vec<usize>> = model.stages().iter().map(|s| s.units.clone()).collect();
    let z = &config.zero;
    let layout: Vec<(Shard, Placement)> = units
        .iter()
        .map(|u| {
            let n = u.numel();
            let placement = Placement::for_stage(z.stage, n, z.param_persistence_threshold);
            (Shard::new(n, world, rank), placement)
        })
        .collect();
    let (b, t) = (config.data.micro_batch_size, config.model.seq_len);
    if t > model.seq_len() {
        return Err(EngineError::Setting {
            key: "model.seq_len",
            message: format!(
                "{t} exceeds the longest sequence the model takes ({})",
                model.seq_len()
            ),
        });
    }
    let micro_max = config.data.grad_accum_steps.max(1);
    let (lookahead, pools) = plan_pools(config, &stage_units, &layout, micro_max, precision)?;
    let sizes = Sizes {
        b,
        t,
        micro_max,
        stages: stage_units.len(),
        act_len: model.activation_len(b, t),
        checkpointing: config.train.activation_checkpointing,
        x: precision.dtype(),
        param_pool_len: pools.0,
        grad_pool_len: pools.1,
    };
    let prepare = Prepare {
        b,
        t,
        x: sizes.x,
        checkpointing: sizes.checkpointing,
        attention: config.train.attention,
    };
    Ok(Laid {
        units,
        stage_units,
        layout,
        lookahead,
        sizes,
        prepare,
    })
}

/// The placement plans of the model `config` describes at `world` ranks on `backend`, one per
/// placement the config allows (fastest first), each with whether it fits `caps`: what
/// `strata plan` prints. Nothing is allocated (the device arena is a dry run).
pub fn plan_placements(
    config: &Config,
    world: usize,
    backend: Backend,
    caps: &placement::Capacities,
) -> Result<placement::Candidates, EngineError> {
    let precision = resolve_precision(config.train.precision, backend)?;
    check_attention(config, backend)?;
    let mut model = crate::model::build(&config.model);
    let laid = lay_out(config, model.as_ref(), world, 0, precision)?;
    placement::candidate_tiers(config)
        .into_iter()
        .map(|tiers| {
            let (plan, _) = dry_run(config, &laid, model.as_mut(), world, tiers)?;
            let plan = fill_host_memory(config, &laid, world, plan, caps);
            let fits = plan.check(config, caps);
            Ok((plan, fits))
        })
        .collect()
}

/// With `offload_optimizer.device = "auto"` and the optimizer on NVMe: the largest
/// `host_fraction` (at least the configured one) whose host pool fits the host memory `caps`
/// give — and the locked-memory limit when pinning — less a tenth for everything else. NVMe is
/// the slowest tier, so auto keeps as much as fits in host memory.
fn fill_host_memory(
    config: &Config,
    laid: &Laid,
    world: usize,
    plan: placement::PlacementPlan,
    caps: &placement::Capacities,
) -> placement::PlacementPlan {
    use crate::config::OffloadDevice;
    let (Some(host), placement::Tier::Nvme, OffloadDevice::Auto) = (
        caps.host_bytes,
        plan.tiers.optimizer,
        config.offload_optimizer.device,
    ) else {
        return plan;
    };
    let arena = if caps.device_in_host {
        plan.device_bytes
    } else {
        0
    };
    let mut budget = host.saturating_sub(arena) / 10 * 9;
    if let (true, Some(limit)) = (plan.host_pinned, caps.memlock_bytes) {
        budget = budget.min(limit);
    }
    let sizes = placement::PlanSizes {
        layout: &laid.layout,
        x_bytes: laid.sizes.x.size_bytes(),
        device_bytes: plan.device_bytes,
    };
    let at = |f: f64| {
        let mut c = config.clone();
        c.offload_optimizer.host_fraction = f;
        placement::plan(&c, world, plan.tiers, &sizes)
    };
    let (mut lo, mut hi) = (config.offload_optimizer.host_fraction, 1.0f64);
    if at(lo).host_bytes > budget {
        return plan;
    }
    // Whole percents are enough: the split is by sub-groups anyway.
    while hi - lo > 0.01 {
        let mid = (lo + hi) / 2.0;
        if at(mid).host_bytes <= budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    if at(hi).host_bytes <= budget {
        lo = hi;
    }
    at(lo)
}

/// The device allocations for `tiers` on an arena that only counts, and the plan they make.
fn dry_run(
    config: &Config,
    laid: &Laid,
    model: &mut dyn Model,
    world: usize,
    tiers: placement::Tiers,
) -> Result<(placement::PlacementPlan, Arena), EngineError> {
    let counting = Arena::counting();
    memory::allocate(&counting, &laid.layout, tiers, &laid.sizes)?;
    model.prepare(&counting, laid.prepare)?;
    let plan = placement::plan(
        config,
        world,
        tiers,
        &placement::PlanSizes {
            layout: &laid.layout,
            x_bytes: laid.sizes.x.size_bytes(),
            device_bytes: counting.peak_bytes() as u64,
        },
    );
    Ok((plan, counting))
}

/// The first placement (fastest first) whose plan fits `caps`, with its dry run; or the reason
/// the last one tried does not fit.
fn choose_placement(
    config: &Config,
    laid: &Laid,
    model: &mut dyn Model,
    world: usize,
    caps: &placement::Capacities,
) -> Result<(placement::PlacementPlan, Arena), EngineError> {
    let candidates = placement::candidate_tiers(config);
    let mut why = String::new();
    for (i, tiers) in candidates.iter().copied().enumerate() {
        let (plan, counting) = dry_run(config, laid, model, world, tiers)?;
        let plan = fill_host_memory(config, laid, world, plan, caps);
        match plan.check(config, caps) {
            Ok(()) => return Ok((plan, counting)),
            // The last candidate short of device memory: say what takes it, as the device would.
            Err(placement::Misfit::Device { needed, available }) if i + 1 == candidates.len() => {
                let e = DeviceError::OutOfMemory {
                    backend: if resolve_backend(config.train.device) == Backend::Cuda {
                        "cuda"
                    } else {
                        "cpu"
                    },
                    requested_bytes: usize::try_from(needed).unwrap_or(usize::MAX),
                    available_bytes: usize::try_from(available).unwrap_or(usize::MAX),
                    limit: "train.device_memory".into(),
                };
                return Err(does_not_fit(e, &counting.ledger(), config));
            }
            Err(placement::Misfit::Device { needed, available }) => {
                why = format!("device memory: {needed} bytes needed, {available} available");
            }
            Err(placement::Misfit::Other(e)) => why = e,
        }
    }
    Err(EngineError::DoesNotFit(format!(
        "the placement does not fit this machine: {why}"
    )))
}

/// The walk plans' lookahead and the pools' sizes (elements of X, of f32): the configured
/// prefetch if the gathered parameters then fit in `zero.live_params_bytes_max`, else no
/// prefetch; an error naming the key when even the largest stage alone does not fit.
fn plan_pools(
    config: &Config,
    stage_units: &[Vec<usize>],
    layout: &[(Shard, Placement)],
    micro_max: usize,
    precision: Precision,
) -> Result<(Lookahead, (usize, usize)), EngineError> {
    let unit_len: Vec<usize> = layout.iter().map(|(s, _)| s.padded).collect();
    let gathered: Vec<bool> = layout
        .iter()
        .map(|(_, p)| p.params == Home::Sharded)
        .collect();
    let grad_sharded: Vec<bool> = layout
        .iter()
        .map(|(_, p)| p.grads == Home::Sharded)
        .collect();
    let x_bytes = precision.dtype().size_bytes();
    let live_max = usize::try_from(config.zero.live_params_bytes_max.bytes()).unwrap_or(usize::MAX);
    let input = |micro, train| PlanInput {
        stage_units,
        unit_len: &unit_len,
        gathered: &gathered,
        grad_sharded: &grad_sharded,
        micro,
        train,
        param_bytes: x_bytes,
    };
    let wanted = Lookahead {
        prefetch_bytes: usize::try_from(config.zero.prefetch_bytes_max.bytes())
            .unwrap_or(usize::MAX),
        reuse_gap: 2,
    };
    let pools = |look| {
        let (train, eval) = (
            Plan::new(&input(micro_max, true), look),
            Plan::new(&input(1, false), look),
        );
        (
            train.param_pool_len.max(eval.param_pool_len),
            train.grad_pool_len.max(eval.grad_pool_len),
        )
    };
    for look in [
        wanted,
        Lookahead {
            prefetch_bytes: 0,
            reuse_gap: 0,
        },
    ] {
        let lens = pools(look);
        if lens.0 * x_bytes <= live_max {
            return Ok((look, lens));
        }
    }
    let needed = pools(Lookahead {
        prefetch_bytes: 0,
        reuse_gap: 0,
    })
    .0 * x_bytes;
    Err(EngineError::Setting {
        key: "zero.live_params_bytes_max",
        message: format!(
            "{} is less than the {} of gathered parameters the largest stage needs at once; raise it to at least {needed} bytes",
            human_bytes(live_max),
            human_bytes(needed)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Loader;

    /// An embedding larger than a block (as in every real GPT-2: 38.6M vs 7.1M elements in the
    /// 124M model): each stage must see only its own units.
    #[test]
    fn an_embedding_larger_than_a_block_trains_from_ln_vocab() {
        let mut config = Config::default();
        config.model.n_layer = 1;
        config.model.n_embd = 32;
        config.model.vocab_size = 4000;
        config.model.seq_len = 16;
        config.data.micro_batch_size = 2;
        config.train.device = DeviceKind::Cpu;
        let mut loader = Loader::from_config(&config).unwrap();
        let mut engine = Engine::from_config(config.clone()).unwrap();
        assert!(engine.units()[0].numel() > 4 * engine.units()[1].numel());
        let mut batch = vec![engine.new_batch()];
        loader.fill(&mut batch[0]).unwrap();
        let first = engine.train_step(&batch).unwrap().loss;
        assert!((first - 4000f32.ln()).abs() < 0.1, "{first}");
        loader.fill(&mut batch[0]).unwrap();
        assert!(engine.train_step(&batch).unwrap().loss.is_finite());
    }

    /// Without clipping the host optimizer steps sub-groups during backward, before the step's
    /// norm is known; a unit whose gradients are not finite is left as it was, so the step that
    /// stops the run (its loss is not finite) updated nothing.
    #[test]
    fn adamw_during_backward_leaves_weights_alone_when_gradients_are_not_finite() {
        let mut config = Config::default();
        config.model.n_layer = 2;
        config.model.n_embd = 32;
        config.model.n_head = 2;
        config.model.vocab_size = 64;
        config.model.seq_len = 16;
        config.data.micro_batch_size = 2;
        config.train.device = DeviceKind::Cpu;
        config.zero.stage = 1;
        config.offload_optimizer.device = crate::config::OffloadDevice::Cpu;
        config.optim.grad_clip = 0.0;
        config.optim.warmup_steps = 0;
        // Weights of ~1e30 after the first step: the second step's activations overflow.
        config.optim.lr = 1e30;
        config.optim.min_lr = 0.0;
        let mut loader = Loader::from_config(&config).unwrap();
        let mut engine = Engine::from_config(config).unwrap();
        let mut batch = vec![engine.new_batch()];
        loader.fill(&mut batch[0]).unwrap();
        assert!(engine.train_step(&batch).unwrap().loss.is_finite());
        let after_first = engine.params().unwrap();
        assert!(after_first.iter().flatten().any(|w| w.abs() > 1e20));
        loader.fill(&mut batch[0]).unwrap();
        let err = engine.train_step(&batch).unwrap_err().to_string();
        assert!(
            err.contains("not finite") || err.contains("non-finite"),
            "{err}"
        );
        let after_second = engine.params().unwrap();
        let changed = after_first
            .iter()
            .flatten()
            .zip(after_second.iter().flatten())
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            changed, 0,
            "weights changed by a step with non-finite gradients"
        );
    }

    #[test]
    fn fused_attention_on_a_gpu_refuses_head_sizes_past_128_naming_the_key() {
        let mut config = Config::default();
        config.model.n_embd = 512;
        config.model.n_head = 2;
        let err = check_attention(&config, Backend::Cuda)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.attention") && err.contains("256"),
            "{err}"
        );
        assert!(check_attention(&config, Backend::Cpu).is_ok());
        config.train.attention = AttentionMode::Materialized;
        assert!(check_attention(&config, Backend::Cuda).is_ok());
        config.train.attention = AttentionMode::Fused;
        config.model.n_head = 4;
        assert!(check_attention(&config, Backend::Cuda).is_ok());
    }

    /// The dry run of GPT-2 124M's shapes at T = 1024: the fused mode's arena is smaller by the
    /// (B,NH,T,T) scores of the forward's activations and of the backward's scratch (one set of
    /// each per workspace), plus the per-head copies of q, k, v and of the output and its
    /// gradient that the materialized mode keeps, less the fused mode's row statistics.
    #[test]
    fn fused_attention_plans_less_device_memory_by_the_scores() {
        let mut config = Config::default();
        config.model.n_layer = 2;
        config.model.n_head = 12;
        config.model.n_embd = 768;
        config.model.vocab_size = 512;
        config.model.seq_len = 1024;
        config.data.micro_batch_size = 2;
        for (backend, checkpointing) in [
            (Backend::Cpu, true),
            (Backend::Cpu, false),
            (Backend::Cuda, true),
        ] {
            config.train.activation_checkpointing = checkpointing;
            let caps = placement::Capacities::of_this_machine(&config, backend);
            let device_bytes = |mode: AttentionMode| {
                let mut config = config.clone();
                config.train.attention = mode;
                plan_placements(&config, 1, backend, &caps).unwrap()[0]
                    .0
                    .device_bytes
            };
            let fused = device_bytes(AttentionMode::Fused);
            let materialized = device_bytes(AttentionMode::Materialized);
            let m = &config.model;
            let (b, t, c, nh) = (2u64, m.seq_len as u64, m.n_embd as u64, m.n_head as u64);
            let x = resolve_precision(config.train.precision, backend)
                .unwrap()
                .dtype()
                .size_bytes() as u64;
            // Sets of block activations: one with checkpointing, one per block without; and
            // one block scratch.
            let sets = if checkpointing { 1 } else { m.n_layer as u64 } + 1;
            let scores = b * nh * t * t * x;
            let expected = sets * (scores + 4 * b * t * c * x - b * nh * t * 4);
            let saved = materialized - fused;
            println!(
                "{} checkpointing={checkpointing}: materialized {materialized} B, fused {fused} B, saved {saved} B, scores {scores} B x {sets}",
                backend.name()
            );
            assert!(saved >= sets * scores, "saved {saved} < {sets} x {scores}");
            // Within the arena's 256-byte alignment of each of the (up to 3) buffers per set.
            assert!(
                saved.abs_diff(expected) <= sets * 3 * 256,
                "saved {saved}, expected {expected}"
            );
        }
    }
}
