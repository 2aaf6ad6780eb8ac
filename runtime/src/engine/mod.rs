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

mod error;
mod memory;
mod stats;
mod step;

pub use error::{BatchError, EngineError};
pub use memory::{human_bytes, UnitState};
pub use stats::StepStats;

use std::sync::Arc;
use std::time::Duration;

use rayon::prelude::*;
use strata_collectives::{CommError, Communicator};

use crate::backend::{self, Arena, Backend, Device, DeviceError, DeviceOptions, Event, Precision};
use crate::config::{self, Config, DeviceKind, DistConfig};
use crate::model::gpt2::{Gpt2, Gpt2Shape};
use crate::model::{Batch, Model, Prepare, UnitSpec};
use crate::optim::LossScaler;
use crate::weights;
use memory::{AdamSegment, Sizes, StepBuffers};

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
    /// GPT-2 as described by `config.model`, initialised from `model.init_from` or from
    /// `data.seed`, on the device `train.device` resolves to.
    pub fn from_config(config: Config) -> Result<Engine, EngineError> {
        let model = Gpt2::new(Gpt2Shape::from_config(&config.model));
        Engine::new(config, Box::new(model))
    }

    /// An engine for any [`Model`]; parameters start from the model's init (seeded by
    /// `data.seed`), or from `model.init_from` when set.
    pub fn new(config: Config, mut model: Box<dyn Model>) -> Result<Engine, EngineError> {
        let backend = resolve_backend(config.train.device);
        let precision = resolve_precision(config.train.precision, backend)?;
        let comm: Arc<dyn Communicator> =
            Arc::from(connect(&config.dist, backend == Backend::Cuda)?);
        let units = model.units().to_vec();
        let (b, t) = (config.data.micro_batch_size, config.model.seq_len);
        let sizes = Sizes {
            b,
            t,
            micro_max: config.data.grad_accum_steps.max(1),
            stages: model.stages().len(),
            act_len: model.activation_len(b, t),
            x: precision.dtype(),
        };
        let prepare = Prepare {
            b,
            t,
            x: sizes.x,
            checkpointing: config.train.activation_checkpointing,
        };
        // The dry run: the same allocations on an arena that only counts.
        let counting = Arena::counting();
        memory::allocate(&counting, &units, &sizes)?;
        model.prepare(&counting, prepare)?;
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
        let (states, bufs) = memory::allocate(dev.arena(), &units, &sizes)?;
        model.prepare(dev.arena(), prepare)?;
        let stage_units = model.stages().iter().map(|s| s.units.clone()).collect();
        let mut engine = Engine {
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

    /// Initial weights (the model's init, or `model.init_from`) into the master weights and
    /// their compute copy; zero gradients and moments.
    fn init_params(&mut self) -> Result<(), EngineError> {
        let seed = self.config.data.seed;
        let mut params: Vec<Vec<f32>> = self
            .units
            .par_iter()
            .enumerate()
            .map(|(i, u)| u.init_params(seed, i))
            .collect();
        if let Some(path) = &self.config.model.init_from {
            weights::load(path, &self.units, &mut params)?;
        }
        let dev = &*self.dev;
        for (state, host) in self.states.iter().zip(&params) {
            dev.upload(&state.master, host)?;
        }
        for state in &self.states {
            if state.has_compute_copy() {
                dev.cast_f32_to_x(&state.params, &state.master)?;
            }
            for buf in [&state.grads, &state.adam_m, &state.adam_v] {
                dev.memset(backend::Queue::Compute, buf, 0)?;
            }
        }
        dev.synchronize(backend::Queue::Compute)?;
        Ok(())
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

    /// Device memory per purpose as the dry run counted it, largest first.
    pub fn memory_ledger(&self) -> &[(&'static str, usize)] {
        &self.ledger
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

    /// The fp32 master weights, one flat vector per unit (the unit's layout, padding included).
    pub fn params(&self) -> Result<Vec<Vec<f32>>, EngineError> {
        self.states
            .iter()
            .map(|s| Ok(self.device().read_f32(&s.master)?))
            .collect()
    }

    /// The gradients of the last `forward_backward`, one flat vector per unit, loss scale
    /// removed.
    pub fn grads(&self) -> Result<Vec<Vec<f32>>, EngineError> {
        let scale = self.scaler.scale();
        self.states
            .iter()
            .map(|s| {
                let mut g = self.device().read_f32(&s.grads)?;
                g.iter_mut().for_each(|v| *v /= scale);
                Ok(g)
            })
            .collect()
    }

    /// Writes the parameters as safetensors with the model's tensor names.
    pub fn save_weights(&self, path: &std::path::Path) -> Result<(), EngineError> {
        let params = self.params()?;
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert("strata_step".to_string(), self.step.to_string());
        let units = self.units.iter().zip(params.iter().map(Vec::as_slice));
        weights::save(path, units, meta)?;
        Ok(())
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
    if limit == "train.device_memory" {
        advice.push("raise train.device_memory".into());
    }
    advice
        .push("or train a smaller model (ZeRO partitioning and offload are not built yet)".into());
    EngineError::DoesNotFit(format!(
        "the model does not fit in {backend} device memory: it needs {} = {requested_bytes} bytes ({}), {} = {available_bytes} bytes are available ({limit}); {}",
        human_bytes(requested_bytes),
        takers.join(", "),
        human_bytes(available_bytes),
        advice.join(", ")
    ))
}
