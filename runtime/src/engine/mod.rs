//! `Engine`: one engine for every backend. It owns parameter, gradient and optimizer memory per
//! unit on the device, walks the model's stages forward and backward over micro-batches, averages
//! gradients across data-parallel ranks, and applies clipped AdamW — all through the device
//! seam, so the same code trains on the CPU and on a GPU.
//!
//! Memory is planned before the first step: the allocation code (the engine's states and step
//! buffers, the model's activations and workspaces) runs once on a counting arena, the device is
//! opened with exactly that many bytes — or the engine says what does not fit and what to
//! change — and the same code runs again on the device's arena. Nothing is allocated inside a
//! step. Each unit's states sit in one record, `UnitState`, and each sub-group of the host
//! tier's in another: where a state lives is an enum that owns its storage, decided once from
//! the placement, which the walk and the step read instead of deciding again.
//!
//! Files: `setup.rs` (what is decided before the device opens: layout, pools, placement),
//! `placement.rs` (the placement plan), `zero.rs` (shards), `memory.rs` (the unit records and
//! step buffers), `schedule.rs` (a walk's plan), `walk.rs` (the walk), `step.rs` (the step:
//! tokens, norm, AdamW), `host.rs` (states in and out), `host_tier/` (states off the device),
//! `host_mem.rs` (host buffers), `ring.rs` (staging rings), `checkpoint.rs`, `stats.rs`.

pub mod checkpoint;
mod error;
mod host;
mod host_mem;
mod host_tier;
mod memory;
pub mod placement;
mod ring;
pub mod schedule;
mod setup;
mod stats;
mod step;
mod walk;
pub mod zero;

pub use error::{BatchError, EngineError};
pub use host_tier::OffloadTraffic;
use memory::UnitState;
pub use memory::{human_bytes, peak_rss_bytes, rss_bytes};
pub use stats::{StepStats, Traffic};

use std::sync::Arc;
use std::time::Duration;

use strata_collectives::{CommError, Communicator};

use crate::backend::{self, AttentionMode, Backend, Device, DeviceOptions, Precision, Queue};
use crate::config::{self, Config, DeviceKind, DistConfig};
use crate::model::{Batch, Model, UnitSpec};
use crate::optim::LossScaler;
use host_tier::HostTier;
use memory::StepBuffers;
use placement::{PlacementPlan, Tier};
use schedule::Plan;
use setup::{Laid, TempSwapDir};
use step::TokenStaging;

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
    /// The units, stages, shards and sizes the engine was laid out for.
    laid: Laid,
    /// Where every state class lives (tiers, bytes per tier).
    placement: PlacementPlan,
    /// Bytes of device memory per purpose, from the dry run.
    ledger: Vec<(&'static str, usize)>,
    /// Every unit's states on this rank, one record each.
    states: Vec<UnitState>,
    bufs: StepBuffers,
    /// The host tier: states off the device with their pool and swap stores. Some exactly when
    /// the optimizer is off the device.
    host: Option<HostTier>,
    /// The host optimizer steps each resident sub-group as its gradient completes, during
    /// backward (no clipping and no fp16 loss scale: its update needs only its own gradient).
    early_adamw: bool,
    /// Plans of the walks run so far, by (micro-batches, training).
    plans: Vec<((usize, bool), Arc<Plan>)>,
    /// Host staging of the step's tokens.
    tokens: TokenStaging,
    scaler: LossScaler,
    /// Optimizer steps taken.
    step: usize,
    /// Data-parallel group: gradients are averaged over it before the optimizer step.
    comm: Arc<dyn Communicator>,
    // Last: its queues drain (and its memory is freed) after every buffer above is dropped.
    dev: Arc<dyn Device>,
}

impl Engine {
    /// The model `config.model` describes (`model.arch`), initialised from `model.init_from`
    /// or from `data.seed`, on the device `train.device` resolves to.
    pub fn from_config(mut config: Config) -> Result<Engine, EngineError> {
        config
            .resolve_model_dir()
            .map_err(|e| EngineError::Setting {
                key: "model.init_from",
                message: e.to_string(),
            })?;
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
            Some(dir) => config.with_temp_nvme_path(dir.dir.path()),
            None => config,
        };
        let laid = setup::lay_out(&config, model.as_ref(), world, rank, precision)?;
        // The dry run (the same allocations on an arena that only counts) for each placement the
        // config allows, fastest first: the first that fits this machine is the plan.
        let caps = placement::Capacities::of_this_machine(&config, backend);
        let (placement, counting) =
            setup::choose_placement(&config, &laid, model.as_mut(), world, &caps)?;
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
        .map_err(|e| setup::does_not_fit(e, &ledger, &config))?;
        let (states, bufs) = memory::allocate(
            dev.arena(),
            &laid.layout,
            &laid.segments,
            placement.tiers,
            &laid.sizes,
        )?;
        model.prepare(dev.arena(), laid.prepare)?;
        // Parameters off the device are updated by an optimizer off the device: the host tier
        // exists exactly when the optimizer is off the device.
        let host = match placement.tiers.optimizer {
            Tier::Device => None,
            _ => Some(HostTier::new(
                &config,
                &placement,
                &laid,
                &states,
                dev.as_ref(),
                rank,
                swap_dir,
            )?),
        };
        let early_adamw =
            host.is_some() && config.optim.grad_clip <= 0.0 && precision != Precision::Fp16;
        if rank == 0 {
            // The summary line says where states live; the table is `strata plan`'s.
            tracing::debug!("{}", placement.table());
        }
        let mut engine = Engine {
            tokens: TokenStaging::new(&laid.sizes),
            placement,
            host,
            early_adamw,
            plans: Vec::new(),
            scaler: LossScaler::for_precision(precision),
            step: 0,
            config,
            model,
            laid,
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
        &self.laid.units
    }

    /// Parameters of the model (padding excluded).
    pub fn num_params(&self) -> usize {
        self.laid.units.iter().map(UnitSpec::num_params).sum()
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
        Batch::zeros(self.laid.sizes.b, self.laid.sizes.t)
    }
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
    let laid = setup::lay_out(config, model.as_ref(), world, 0, precision)?;
    placement::candidate_tiers(config)
        .into_iter()
        .map(|tiers| {
            let (plan, _) = setup::dry_run(config, &laid, model.as_mut(), world, tiers)?;
            let plan = setup::fill_host_memory(config, &laid, world, plan, caps);
            let fits = plan.check(config, caps);
            Ok((plan, fits))
        })
        .collect()
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
