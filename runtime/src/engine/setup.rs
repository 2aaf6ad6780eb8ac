//! What the engine decides before it opens a device: the layout of units, shards and stages
//! ([`Laid`]), the walks' pools and how far they gather ahead, the placement (a dry run per
//! candidate on a counting arena, the first that fits), and the errors that say what does not fit
//! and what to change. Also the temporary swap directory of `nvme_path = "@tmp"`.

use super::memory::{self, adam_segments, human_bytes, AdamSegment, Sizes};
use super::placement::{self, PlacementPlan};
use super::schedule::{Lookahead, Plan, PlanInput};
use super::zero::{Home, Placement, Shard};
use super::{resolve_backend, EngineError};
use crate::backend::{Arena, AttentionMode, Backend, DeviceError, Precision};
use crate::config::{self, Config};
use crate::model::{Model, Prepare, UnitSpec};

/// What the engine decides from the config and the model before it opens a device.
pub(super) struct Laid {
    pub units: Vec<UnitSpec>,
    /// The units each stage uses.
    pub stage_units: Vec<Vec<usize>>,
    /// Per unit: this rank's shard and where each state class lives.
    pub layout: Vec<(Shard, Placement)>,
    /// Per unit: its AdamW segments.
    pub segments: Vec<Vec<AdamSegment>>,
    /// Per unit, what the walks' plans need.
    pub walk: WalkUnits,
    /// How far ahead the walks gather, as the budget allowed.
    pub lookahead: Lookahead,
    pub sizes: Sizes,
    pub prepare: Prepare,
}

impl Laid {
    /// The input of the plan of a walk over `micro` micro-batches.
    pub fn plan_input(&self, micro: usize, train: bool) -> PlanInput<'_> {
        self.walk
            .input(&self.stage_units, micro, train, self.sizes.x.size_bytes())
    }
}

/// Per unit, what the walks' plans need to know of the layout.
pub(super) struct WalkUnits {
    /// Padded elements.
    unit_len: Vec<usize>,
    /// Parameters gathered before each use.
    gathered: Vec<bool>,
    /// Gradients reduce-scattered (through a transient full buffer).
    grad_sharded: Vec<bool>,
    world: usize,
}

impl WalkUnits {
    fn of(layout: &[(Shard, Placement)], world: usize) -> WalkUnits {
        WalkUnits {
            unit_len: layout.iter().map(|(s, _)| s.padded).collect(),
            gathered: layout
                .iter()
                .map(|(_, p)| p.params == Home::Sharded)
                .collect(),
            grad_sharded: layout
                .iter()
                .map(|(_, p)| p.grads == Home::Sharded)
                .collect(),
            world,
        }
    }

    fn input<'a>(
        &'a self,
        stage_units: &'a [Vec<usize>],
        micro: usize,
        train: bool,
        param_bytes: usize,
    ) -> PlanInput<'a> {
        PlanInput {
            stage_units,
            unit_len: &self.unit_len,
            gathered: &self.gathered,
            grad_sharded: &self.grad_sharded,
            micro,
            train,
            param_bytes,
            world: self.world,
        }
    }
}

pub(super) fn lay_out(
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
    let walk = WalkUnits::of(&layout, world);
    let (lookahead, pools) = plan_pools(config, &stage_units, &walk, micro_max, precision)?;
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
        segments: units.iter().map(adam_segments).collect(),
        units,
        stage_units,
        layout,
        walk,
        lookahead,
        sizes,
        prepare,
    })
}

/// With `offload_optimizer.device = "auto"` and the optimizer on NVMe: the largest
/// `host_fraction` (at least the configured one) whose host pool fits the host memory `caps`
/// give — and the locked-memory limit when pinning — less a tenth for everything else. NVMe is
/// the slowest tier, so auto keeps as much as fits in host memory.
pub(super) fn fill_host_memory(
    config: &Config,
    laid: &Laid,
    world: usize,
    plan: PlacementPlan,
    caps: &placement::Capacities,
) -> PlacementPlan {
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
pub(super) fn dry_run(
    config: &Config,
    laid: &Laid,
    model: &mut dyn Model,
    world: usize,
    tiers: placement::Tiers,
) -> Result<(PlacementPlan, Arena), EngineError> {
    let counting = Arena::counting();
    memory::allocate(&counting, &laid.layout, &laid.segments, tiers, &laid.sizes)?;
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
pub(super) fn choose_placement(
    config: &Config,
    laid: &Laid,
    model: &mut dyn Model,
    world: usize,
    caps: &placement::Capacities,
) -> Result<(PlacementPlan, Arena), EngineError> {
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
    walk: &WalkUnits,
    micro_max: usize,
    precision: Precision,
) -> Result<(Lookahead, (usize, usize)), EngineError> {
    let x_bytes = precision.dtype().size_bytes();
    let live_max = usize::try_from(config.zero.live_params_bytes_max.bytes()).unwrap_or(usize::MAX);
    let input = |micro, train| walk.input(stage_units, micro, train, x_bytes);
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

/// An arena that does not fit becomes an error that says what takes the memory and what to
/// change; other errors pass through.
pub(super) fn does_not_fit(
    e: DeviceError,
    ledger: &[(&'static str, usize)],
    config: &Config,
) -> EngineError {
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

/// A fresh directory under `$TMPDIR` for swap files, removed (with anything left in it) on drop;
/// if the process is killed, a later run's sweep removes it (`strata_collectives::scratch`).
pub(super) struct TempSwapDir {
    pub(super) dir: strata_collectives::scratch::ScratchDir,
    /// Its owner file and itself (emptied of the registered swap files), removed on a signal.
    _on_signal: [crate::outputs::cleanup::Registration; 2],
}

impl TempSwapDir {
    pub(super) fn create() -> Result<TempSwapDir, EngineError> {
        let prefix = strata_collectives::scratch::SWAP_PREFIX;
        let dir = strata_collectives::scratch::ScratchDir::create(prefix).map_err(|e| {
            EngineError::Setting {
                key: "offload_param.nvme_path",
                message: format!(
                    "\"{}\": cannot create a directory under {}: {e}",
                    config::TEMP_NVME_PATH,
                    std::env::temp_dir().display()
                ),
            }
        })?;
        crate::outputs::cleanup::install();
        let owner = dir.path().join(strata_collectives::scratch::OWNER_FILE);
        Ok(TempSwapDir {
            _on_signal: [
                crate::outputs::cleanup::register(&owner),
                crate::outputs::cleanup::register(dir.path()),
            ],
            dir,
        })
    }
}
