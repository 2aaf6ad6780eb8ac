//! `Engine`: owns parameter, gradient and optimizer memory per unit, walks the model's stages forward and
//! backward over micro-batches, and applies clipped AdamW.
//!
//! This is the unpartitioned engine (one rank, every state in host memory). Each unit's states sit in one
//! record, [`UnitState`], so the ZeRO engine can replace the record's buffers by shards with a residency
//! (GPU, pinned host, NVMe) without the model or the stage walk changing.

mod stats;

pub use stats::StepStats;

use crate::config::{Config, DistConfig};
use crate::model::gpt2::{Gpt2, Gpt2Shape};
use crate::model::{Batch, HeadGrads, Model, UnitSpec};
use crate::optim::{adamw_update, clip_scale, lr_at, sum_of_squares, AdamWParams};
use crate::weights::{self, WeightsError};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;
use strata_collectives::{CommError, Communicator};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("step {step}: {what} is not finite ({value}); the update was skipped and the weights are unchanged")]
    NonFinite {
        step: usize,
        what: &'static str,
        value: f32,
    },
    #[error("cannot build the compute thread pool: {0}")]
    Threads(String),
    #[error("{0}")]
    Batch(String),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error(transparent)]
    Cuda(#[from] crate::backend::cuda::CudaError),
    #[error(transparent)]
    Comm(#[from] CommError),
}

/// What `strata train` drives: the CPU [`Engine`], or the GPU trainer of the CUDA backend.
pub trait Trainer {
    /// One optimizer step over the micro-batches of gradient accumulation.
    fn train_step(&mut self, batches: &[Batch]) -> Result<StepStats, EngineError>;
    /// An empty micro-batch of the configured shape.
    fn new_batch(&self) -> Batch;
    fn num_params(&self) -> usize;
    /// Writes the parameters as safetensors (Hugging Face names for GPT-2).
    fn save_weights(&self, path: &Path) -> Result<(), EngineError>;
    /// `train_step` with the time of every device operation (`strata-bench train --profile`).
    fn train_step_profiled(
        &mut self,
        _batches: &[Batch],
    ) -> Result<(StepStats, Vec<crate::backend::cuda::OpTime>), EngineError> {
        Err(EngineError::Unsupported(
            "per-operation profiles are taken on the GPU trainer only (train.device = \"cuda\")",
        ))
    }
    /// This process's data-parallel rank and the number of ranks.
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
}

impl Trainer for Engine {
    fn train_step(&mut self, batches: &[Batch]) -> Result<StepStats, EngineError> {
        Engine::train_step(self, batches)
    }
    fn new_batch(&self) -> Batch {
        Engine::new_batch(self)
    }
    fn num_params(&self) -> usize {
        Engine::num_params(self)
    }
    fn save_weights(&self, path: &Path) -> Result<(), EngineError> {
        Engine::save_weights(self, path)
    }
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
}

/// The communicator for this process: from the launcher's variables when it was started by `strata launch`,
/// torchrun, srun or mpirun; a world of one otherwise.
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

/// All states of one unit: flat buffers laid out as its [`UnitSpec`].
pub struct UnitState {
    pub spec: UnitSpec,
    /// fp32 parameters (here also the optimizer's master copy).
    pub params: Vec<f32>,
    pub grads: Vec<f32>,
    adam_m: Vec<f32>,
    adam_v: Vec<f32>,
}

impl UnitState {
    fn new(spec: UnitSpec, seed: u64, unit_index: usize) -> UnitState {
        let params = spec.init_params(seed, unit_index);
        let n = params.len();
        UnitState {
            spec,
            params,
            grads: vec![0.0; n],
            adam_m: vec![0.0; n],
            adam_v: vec![0.0; n],
        }
    }
}

pub struct Engine {
    config: Config,
    model: Box<dyn Model>,
    units: Vec<UnitState>,
    /// Input activation of each stage (index 0, the embedding, reads tokens and stays empty).
    acts: Vec<Vec<f32>>,
    /// Gradients flowing between stages: ∂L/∂output of the current stage and ∂L/∂input.
    dacts: [Vec<f32>; 2],
    /// Optimizer steps taken.
    step: usize,
    /// Compute threads (`train.threads`); every kernel runs inside it.
    pool: Arc<rayon::ThreadPool>,
    /// The units each stage uses (the model's `stages()`, read once: the stage walk is on the hot path).
    stage_units: Vec<Vec<usize>>,
    /// Data-parallel group: gradients are averaged over it before the optimizer step.
    comm: Box<dyn Communicator>,
}

impl Engine {
    /// GPT-2 as described by `config.model`, initialised from `model.init_from` or from `data.seed`.
    pub fn from_config(config: Config) -> Result<Engine, EngineError> {
        let model = Gpt2::new(Gpt2Shape::from_config(&config.model));
        Engine::new(config, Box::new(model))
    }

    /// An engine for any [`Model`]; parameters start from the model's init (seeded by `data.seed`), or from
    /// `model.init_from` when set.
    pub fn new(config: Config, mut model: Box<dyn Model>) -> Result<Engine, EngineError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.train.threads)
            .thread_name(|i| format!("strata-compute-{i}"))
            .build()
            .map(Arc::new)
            .map_err(|e| EngineError::Threads(e.to_string()))?;
        let mut units: Vec<UnitState> = model
            .units()
            .iter()
            .enumerate()
            .map(|(i, spec)| UnitState::new(spec.clone(), config.data.seed, i))
            .collect();
        if let Some(path) = &config.model.init_from {
            let specs: Vec<UnitSpec> = units.iter().map(|u| u.spec.clone()).collect();
            let mut params: Vec<Vec<f32>> = units
                .iter_mut()
                .map(|u| std::mem::take(&mut u.params))
                .collect();
            let loaded = weights::load(path, &specs, &mut params);
            units.iter_mut().zip(params).for_each(|(u, p)| u.params = p);
            loaded?;
        }
        let (b, t) = (config.data.micro_batch_size, config.model.seq_len);
        model.prepare(b, t, config.train.activation_checkpointing);
        let act_len = model.activation_len(b, t);
        let stages = model.stages().len();
        let acts = (0..stages)
            .map(|s| {
                if s == 0 {
                    Vec::new()
                } else {
                    vec![0.0; act_len]
                }
            })
            .collect();
        let dacts = [vec![0.0; act_len], vec![0.0; act_len]];
        let comm = connect(&config.dist, false)?;
        crate::agree::check_ranks_agree(comm.as_ref(), &config)?;
        let stage_units = model.stages().iter().map(|s| s.units.clone()).collect();
        Ok(Engine {
            config,
            model,
            units,
            acts,
            dacts,
            step: 0,
            pool,
            stage_units,
            comm,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn units(&self) -> &[UnitState] {
        &self.units
    }

    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    pub fn num_params(&self) -> usize {
        self.units.iter().map(|u| u.params.len()).sum()
    }

    /// Optimizer steps taken so far.
    pub fn step(&self) -> usize {
        self.step
    }

    /// An empty micro-batch of the configured shape, to fill and pass to [`Engine::train_step`].
    pub fn new_batch(&self) -> Batch {
        Batch::zeros(self.config.data.micro_batch_size, self.config.model.seq_len)
    }

    fn check_batches(&self, batches: &[Batch]) -> Result<(), EngineError> {
        let (b, t) = (self.config.data.micro_batch_size, self.config.model.seq_len);
        check_batches(batches, b, t, self.config.model.vocab_size)
    }

    /// Runs every stage forward up to the head and returns the head's input activation.
    fn forward_stages(&mut self, mb: &Batch) {
        let last = self.stage_units.len() - 1;
        for (s, ids) in self.stage_units.iter().enumerate().take(last) {
            let params: Vec<&[f32]> = ids
                .iter()
                .map(|&u| self.units[u].params.as_slice())
                .collect();
            let (before, after) = self.acts.split_at_mut(s + 1);
            self.model
                .forward(s, &params, mb, &before[s], &mut after[0]);
        }
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// Zeroes the gradients, then accumulates ∂(mean loss over `batches`)/∂params, averaged over the
    /// data-parallel ranks (each passes its own micro-batches). Returns the mean loss over all of them.
    pub fn forward_backward(&mut self, batches: &[Batch]) -> Result<f32, EngineError> {
        self.check_batches(batches)?;
        let pool = Arc::clone(&self.pool);
        let local = pool.install(|| self.forward_backward_local(batches));
        let world = self.comm.world_size();
        if world == 1 {
            return Ok(local);
        }
        // Each rank's gradients already carry 1/world (see dloss), so the sum is the mean.
        for u in &mut self.units {
            self.comm.all_reduce(&mut u.grads)?;
        }
        let mut loss = [local / world as f32];
        self.comm.all_reduce(&mut loss)?;
        Ok(loss[0])
    }

    fn forward_backward_local(&mut self, batches: &[Batch]) -> f32 {
        self.units.iter_mut().for_each(|u| u.grads.fill(0.0));
        let last = self.stage_units.len() - 1;
        let dloss = 1.0 / (batches.len() * self.comm.world_size()) as f32;
        let mut loss_sum = 0.0f64;
        for mb in batches {
            self.forward_stages(mb);
            let [dout, dinput] = &mut self.dacts;
            {
                let (params, mut grads) = stage_views(&mut self.units, &self.stage_units[last]);
                let head = HeadGrads {
                    grads: &mut grads,
                    dinput: dout,
                    dloss,
                };
                loss_sum += self.model.head(&params, mb, &self.acts[last], Some(head)) as f64;
            }
            for s in (0..last).rev() {
                let (params, mut grads) = stage_views(&mut self.units, &self.stage_units[s]);
                self.model
                    .backward(s, &params, &mut grads, mb, &self.acts[s], dout, dinput);
                std::mem::swap(dout, dinput);
            }
        }
        (loss_sum / batches.len() as f64) as f32
    }

    /// Mean loss of one micro-batch without touching gradients or weights.
    pub fn eval_loss(&mut self, batch: &Batch) -> Result<f32, EngineError> {
        self.check_batches(std::slice::from_ref(batch))?;
        let pool = Arc::clone(&self.pool);
        let loss = pool.install(|| {
            self.forward_stages(batch);
            let last = self.stage_units.len() - 1;
            let params: Vec<&[f32]> = self.stage_units[last]
                .iter()
                .map(|&u| self.units[u].params.as_slice())
                .collect();
            self.model.head(&params, batch, &self.acts[last], None)
        });
        Ok(loss)
    }

    /// The head's input activation for `batch` after a forward pass (for evaluation and tests).
    pub fn head_input(&mut self, batch: &Batch) -> Result<Vec<f32>, EngineError> {
        self.check_batches(std::slice::from_ref(batch))?;
        let pool = Arc::clone(&self.pool);
        pool.install(|| self.forward_stages(batch));
        Ok(self.acts[self.acts.len() - 1].clone())
    }

    /// Global gradient norm, clipping, and one AdamW step with the scheduled learning rate.
    /// Returns (grad_norm before clipping, lr). A non-finite norm skips the update.
    pub fn optimizer_step(&mut self) -> Result<(f32, f32), EngineError> {
        let o = self.config.optim.clone();
        let pool = Arc::clone(&self.pool);
        let units = &mut self.units;
        let norm = pool.install(|| {
            units
                .iter()
                .map(|u| sum_of_squares(&u.grads))
                .sum::<f64>()
                .sqrt() as f32
        });
        if !norm.is_finite() {
            return Err(EngineError::NonFinite {
                step: self.step,
                what: "gradient norm",
                value: norm,
            });
        }
        let lr = lr_at(&o, self.step, self.config.train.steps);
        let h = AdamWParams {
            lr,
            beta1: o.betas[0],
            beta2: o.betas[1],
            eps: o.eps,
            weight_decay: o.weight_decay,
            t: (self.step + 1) as u32,
            grad_scale: clip_scale(norm, o.grad_clip),
        };
        pool.install(|| {
            for u in units.iter_mut() {
                for (t, r) in u.spec.tensors.iter().zip(u.spec.ranges()) {
                    let (p, g) = (&mut u.params[r.clone()], &u.grads[r.clone()]);
                    adamw_update(
                        p,
                        g,
                        &mut u.adam_m[r.clone()],
                        &mut u.adam_v[r],
                        &h,
                        t.decay,
                    );
                }
            }
        });
        self.step += 1;
        Ok((norm, lr))
    }

    /// One optimizer step over `batches` (the micro-batches of gradient accumulation).
    pub fn train_step(&mut self, batches: &[Batch]) -> Result<StepStats, EngineError> {
        let start = Instant::now();
        let step = self.step;
        let loss = self.forward_backward(batches)?;
        if !loss.is_finite() {
            return Err(EngineError::NonFinite {
                step,
                what: "loss",
                value: loss,
            });
        }
        let (grad_norm, lr) = self.optimizer_step()?;
        let tokens = batches.iter().map(Batch::tokens).sum::<usize>() * self.comm.world_size();
        let flops = self.model.flops_per_token(self.config.model.seq_len) * tokens as f64;
        Ok(StepStats::new(
            step,
            loss,
            lr,
            grad_norm,
            tokens,
            flops,
            start.elapsed(),
        ))
    }

    /// Writes the parameters as safetensors with the model's tensor names.
    pub fn save_weights(&self, path: &Path) -> Result<(), EngineError> {
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert("strata_step".to_string(), self.step.to_string());
        let units = self.units.iter().map(|u| (&u.spec, u.params.as_slice()));
        weights::save(path, units, meta)?;
        Ok(())
    }
}

/// Checks that every micro-batch is `b × t` with tokens below `vocab` (at least one micro-batch).
pub(crate) fn check_batches(
    batches: &[Batch],
    b: usize,
    t: usize,
    vocab: usize,
) -> Result<(), EngineError> {
    if batches.is_empty() {
        return Err(EngineError::Batch(
            "train_step needs at least one micro-batch".into(),
        ));
    }
    for (i, mb) in batches.iter().enumerate() {
        if mb.b != b || mb.t != t || mb.inputs.len() != b * t || mb.targets.len() != b * t {
            return Err(EngineError::Batch(format!(
                "micro-batch {i} is {}×{} ({} inputs, {} targets); the trainer was built for {b}×{t}",
                mb.b,
                mb.t,
                mb.inputs.len(),
                mb.targets.len()
            )));
        }
        // Kernels index embeddings by token: an out-of-range token would read out of bounds.
        if let Some(tok) = mb
            .inputs
            .iter()
            .chain(&mb.targets)
            .find(|&&x| x as usize >= vocab)
        {
            return Err(EngineError::Batch(format!(
                "micro-batch {i}: token {tok} is not below vocab_size {vocab}"
            )));
        }
    }
    Ok(())
}

/// Parameter views and gradient views of the units a stage uses, in the stage's order.
fn stage_views<'a>(
    units: &'a mut [UnitState],
    ids: &[usize],
) -> (Vec<&'a [f32]>, Vec<&'a mut [f32]>) {
    let mut slots: Vec<Option<(&'a [f32], &'a mut [f32])>> = units
        .iter_mut()
        .map(|u| Some((u.params.as_slice(), u.grads.as_mut_slice())))
        .collect();
    ids.iter()
        .map(|&u| slots[u].take().expect("a stage lists each unit once"))
        .unzip()
}
