//! `GpuGpt2Trainer`: GPT-2 trained on one GPU, the whole model resident (ZeRO and offload come
//! later). Same semantics as the CPU `Engine` (engine/mod.rs): mean loss over micro-batches
//! (∂L/∂loss_k = 1/n_micro), global grad norm over every fp32 gradient, `clip_scale`, `lr_at`,
//! torch-style AdamW with decay only on tensors marked `decay`, a non-finite norm or loss is an
//! `EngineError::NonFinite` and leaves the weights unchanged.
//!
//! # Memory
//! One arena sized at construction from the shapes (`gpt2_memory::arena_bytes`): fp32 master
//! params, Adam m and v (UnitSpec layout), fp32 grads and floatX compute weights (device layout,
//! wte padded to Vp = 128·⌈V/128⌉ rows, the padding rows zero), tokens for every micro-batch,
//! activations per llm.c (per layer, or one shared set with `train.activation_checkpointing`,
//! where each layer's input is kept and the layer is recomputed in backward), backward scratch.
//! Nothing is allocated on the device inside a step.
//!
//! # Streams
//! Tokens go host → device on the H2D queue; the compute queue waits on that copy's event. Every
//! kernel and GEMM of the step runs on the compute queue in program order. The host blocks twice
//! per step: once for the squared grad norm and the losses (clip factor and loss are host
//! decisions), once at the end of the step (so `StepStats` times the GPU work).
//! The AdamW kernel writes the updated master weights and their floatX copy in one pass.
//!
//! # Precision
//! bf16 (default, `precision = "auto"`), fp16 with dynamic loss scaling (`LossScaler`: the loss
//! gradient is scaled, AdamW unscales; an overflow skips the update and halves the scale), or
//! fp32 (no TF32, for reference runs).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;

use super::arena::DeviceBuf;
use super::context::{GpuContext, GpuEvent, GpuOptions, Queue};
use super::error::CudaError;
use super::gpt2_memory::{arena_bytes, ArenaAllocator, Buffers, Dims, ParamLayout, VOCAB_PAD};
use super::gpt2_pass::{Gpt2Pass, Gpt2Views, BLOCK_TENSORS};
use super::kernels::AdamWHyper;
use super::loss_scale::{LossScaler, StepDecision};
use super::profile::OpTime;
use super::Precision;
use crate::config::{self, Config};
use crate::engine::{EngineError, StepStats, Trainer};
use crate::model::gpt2::{Gpt2, Gpt2Shape};
use crate::model::{Batch, Model, UnitSpec};
use crate::optim::{clip_scale, lr_at};
use crate::weights;

/// cuBLAS workspace carved from the arena.
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;
/// Slack on top of the planned bytes (alignment of the workspace, rounding).
const ARENA_SLACK_BYTES: usize = 4 << 20;

/// An arena that does not fit becomes an error that says what takes the memory and what to
/// change; other errors pass through.
fn does_not_fit(
    e: CudaError,
    precision: Precision,
    layout: &ParamLayout,
    dims: &Dims,
) -> EngineError {
    let CudaError::DeviceOutOfMemory {
        requested_bytes,
        free_bytes,
        ..
    } = e
    else {
        return e.into();
    };
    const GIB: f64 = (1u64 << 30) as f64;
    // fp32 master, Adam m and v per parameter; fp32 grads and floatX weights per device element.
    let state_bytes =
        12 * layout.master_len + (4 + precision.dtype().size_bytes()) * layout.device_len;
    let rest = requested_bytes.saturating_sub(state_bytes);
    let mut advice = vec![format!(
        "lower data.micro_batch_size (now {}) and raise data.grad_accum_steps",
        dims.b
    )];
    if !dims.checkpointing {
        advice.push("set train.activation_checkpointing = true".into());
    }
    advice.push("or train a smaller model: ZeRO partitioning and offload are not built yet".into());
    EngineError::Batch(format!(
        "the model does not fit on GPU 0: it needs {:.1} GiB ({:.1} GiB of weights, gradients and \
         AdamW state for {} parameters, {:.1} GiB of activations and scratch for {} x {} tokens), \
         {:.1} GiB are free; {}",
        requested_bytes as f64 / GIB,
        state_bytes as f64 / GIB,
        layout.master_len,
        rest as f64 / GIB,
        dims.b,
        dims.t,
        free_bytes as f64 / GIB,
        advice.join(", ")
    ))
}

/// The floatX a config asks for on the GPU: `auto` is bf16.
pub fn gpu_precision(p: config::Precision) -> Precision {
    match p {
        config::Precision::Auto | config::Precision::Bf16 => Precision::Bf16,
        config::Precision::Fp16 => Precision::Fp16,
        config::Precision::Fp32 => Precision::Fp32,
    }
}

pub struct GpuGpt2Trainer {
    config: Config,
    units: Vec<UnitSpec>,
    layout: ParamLayout,
    dims: Dims,
    scaler: LossScaler,
    /// Optimizer steps taken.
    step: usize,
    /// Host staging of the step's tokens, (2, micro_max, B, T) like `Buffers::tokens`.
    tokens_host: Vec<i32>,
    tokens_copied: GpuEvent,
    views: Gpt2Views,
    bufs: Buffers<DeviceBuf>,
    // Dropped last: the buffers above keep its arena alive, the context owns the streams.
    gpu: GpuContext,
}

impl std::fmt::Debug for GpuGpt2Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuGpt2Trainer")
            .field("dims", &self.dims)
            .field("params", &self.layout.master_len)
            .field("gpu", &self.gpu)
            .finish()
    }
}

impl GpuGpt2Trainer {
    /// Opens GPU 0, sizes and allocates the arena, initialises the weights as the CPU engine does
    /// (`UnitSpec::init_params(data.seed, unit)`, or `model.init_from`), uploads them.
    pub fn new(config: &Config) -> Result<Self, EngineError> {
        // One rank only for now: under a launcher with several ranks every rank would train its
        // own replica on GPU 0, which is not data-parallel training. Refuse instead.
        if let Ok(info) = strata_collectives::RankInfo::from_env() {
            if info.world_size > 1 {
                return Err(EngineError::Batch(format!(
                    "the GPU trainer runs on one GPU and one rank; this process is rank {} of {} \
                     (multi-GPU training is not built yet: run one process, or train.device = \"cpu\")",
                    info.rank, info.world_size
                )));
            }
        }
        let shape = Gpt2Shape::from_config(&config.model);
        let units = Gpt2::new(shape).units().to_vec();
        let precision = gpu_precision(config.train.precision);
        let vp = shape.vocab_size.div_ceil(VOCAB_PAD) * VOCAB_PAD;
        let dims = Dims {
            b: config.data.micro_batch_size,
            t: config.model.seq_len,
            c: shape.n_embd,
            nh: shape.n_head,
            l: shape.n_layer,
            v: shape.vocab_size,
            vp,
            micro_max: config.data.grad_accum_steps.max(1),
            checkpointing: config.train.activation_checkpointing,
        };
        let layout = ParamLayout::new(&units, vp);
        let planned = arena_bytes(precision.dtype(), &layout, &dims);
        let arena_bytes = planned
            .checked_add(BLAS_WORKSPACE_BYTES + ARENA_SLACK_BYTES)
            .ok_or_else(|| {
                CudaError::precondition("GpuGpt2Trainer::new", "arena size overflows")
            })?;
        let gpu = GpuContext::new(&GpuOptions {
            ordinal: 0,
            precision,
            arena_bytes,
            blas_workspace_bytes: BLAS_WORKSPACE_BYTES,
            allow_tf32: false,
        })
        .map_err(|e| does_not_fit(e, precision, &layout, &dims))?;
        let bufs = Buffers::build(
            &mut ArenaAllocator(gpu.arena()),
            precision.dtype(),
            &layout,
            &dims,
        )?;
        let views = make_views(&bufs, &layout)?;
        let mut params: Vec<Vec<f32>> = units
            .par_iter()
            .enumerate()
            .map(|(i, u)| u.init_params(config.data.seed, i))
            .collect();
        if let Some(path) = &config.model.init_from {
            weights::load(path, &units, &mut params)?;
        }
        let tokens_copied = gpu.new_event(false)?;
        let trainer = GpuGpt2Trainer {
            config: config.clone(),
            units,
            layout,
            dims,
            scaler: LossScaler::for_precision(precision),
            step: 0,
            tokens_host: vec![0; 2 * dims.micro_max * dims.bt()],
            tokens_copied,
            views,
            bufs,
            gpu,
        };
        trainer.upload_params(&params)?;
        tracing::info!(
            params = trainer.layout.master_len,
            arena_mib = arena_bytes >> 20,
            precision = precision.name(),
            checkpointing = dims.checkpointing,
            "GPU GPT-2 trainer ready on {}",
            trainer.gpu.device_name()
        );
        Ok(trainer)
    }

    /// Uploads fp32 master weights, derives the floatX copy, zeroes m, v, grads and padding.
    fn upload_params(&self, params: &[Vec<f32>]) -> Result<(), EngineError> {
        let g = &self.gpu;
        let b = &self.bufs;
        for (slots, host) in self.layout.slots.iter().zip(params) {
            let (Some(first), Some(last)) = (slots.first(), slots.last()) else {
                continue;
            };
            let len = last.master_offset + last.numel - first.master_offset;
            g.upload(&b.master.slice(first.master_offset, len)?, host)?;
        }
        // The upload ran on the H2D queue and was waited for; the compute queue is idle.
        for buf in [&b.adam_m, &b.adam_v, &b.grads, &b.params_x] {
            g.memset(Queue::Compute, buf, 0)?;
        }
        self.cast_master_to_x()?;
        g.synchronize(Queue::Compute)?;
        Ok(())
    }

    /// params_x = floatX(master) for every tensor (the padding rows of wte stay as they are).
    fn cast_master_to_x(&self) -> Result<(), EngineError> {
        for s in &self.layout.segments {
            let master = self.bufs.master.slice(s.master_offset, s.numel)?;
            let x = self.bufs.params_x.slice(s.device_offset, s.numel)?;
            self.gpu.cast_f32_to_x(&x, &master)?;
        }
        Ok(())
    }

    pub fn num_params(&self) -> usize {
        self.layout.master_len
    }

    /// Optimizer steps taken so far.
    pub fn step(&self) -> usize {
        self.step
    }

    pub fn gpu(&self) -> &GpuContext {
        &self.gpu
    }

    fn pass(&self) -> Gpt2Pass<'_> {
        Gpt2Pass {
            gpu: &self.gpu,
            bufs: &self.bufs,
            views: &self.views,
            dims: self.dims,
        }
    }

    fn check_batches(&self, batches: &[Batch]) -> Result<(), EngineError> {
        if batches.len() > self.dims.micro_max {
            return Err(EngineError::Batch(format!(
                "train_step got {} micro-batches; the GPU trainer was built for 1 to {} (data.grad_accum_steps)",
                batches.len(),
                self.dims.micro_max
            )));
        }
        crate::engine::check_batches(batches, self.dims.b, self.dims.t, self.dims.v)
    }

    /// Copies every micro-batch's tokens to the device (H2D queue) and orders compute after it.
    fn upload_tokens(&mut self, batches: &[Batch]) -> Result<(), EngineError> {
        let (bt, micro_max) = (self.dims.bt(), self.dims.micro_max);
        // The previous step's copy must be done before the staging buffer is rewritten, and the
        // previous step's kernels before the device tokens are (both are no-ops when idle).
        self.tokens_copied.synchronize()?;
        self.gpu.synchronize(Queue::Compute)?;
        for (k, mb) in batches.iter().enumerate() {
            let (inputs, rest) = self.tokens_host.split_at_mut(micro_max * bt);
            for (dst, &src) in inputs[k * bt..(k + 1) * bt].iter_mut().zip(&mb.inputs) {
                *dst = src as i32;
            }
            for (dst, &src) in rest[k * bt..(k + 1) * bt].iter_mut().zip(&mb.targets) {
                *dst = src as i32;
            }
        }
        let bytes: &[u8] = bytemuck::cast_slice(&self.tokens_host);
        // SAFETY: `tokens_host` is owned by self and not written again before `tokens_copied`
        // (recorded right after the copy) is synchronized at the start of the next upload; the
        // device buffer has exactly this many bytes (checked by copy_h2d).
        unsafe { self.gpu.copy_h2d(Queue::H2d, &self.bufs.tokens, bytes)? };
        self.gpu.record_into(Queue::H2d, &mut self.tokens_copied)?;
        self.gpu.wait(Queue::Compute, &self.tokens_copied)?;
        Ok(())
    }

    /// Forward and backward of every micro-batch into the zeroed fp32 gradients; then the squared
    /// global norm. Returns (mean loss, squared norm of the scaled gradients).
    fn forward_backward(
        &mut self,
        batches: &[Batch],
        loss_scale: f32,
    ) -> Result<(f32, f32), EngineError> {
        self.upload_tokens(batches)?;
        let n_micro = batches.len();
        let dloss = loss_scale / (n_micro * self.dims.bt()) as f32;
        let pass = self.pass();
        self.gpu.memset(Queue::Compute, &self.bufs.grads, 0)?;
        self.gpu.profile_mark("memset grads")?;
        for k in 0..n_micro {
            pass.forward(k)?;
            pass.head(k, Some(dloss))?;
            pass.backward(k)?;
        }
        let b = &self.bufs;
        self.gpu
            .grad_norm_squared(&b.norm, &b.norm_partials, &b.grads, false)?;
        self.gpu.synchronize(Queue::Compute)?;
        let norm_sq = self.gpu.download::<f32>(&b.norm)?;
        let losses = self
            .gpu
            .download::<f32>(&b.losses.slice(0, n_micro * self.dims.bt())?)?;
        let loss = (losses.iter().map(|&l| f64::from(l)).sum::<f64>() / losses.len() as f64) as f32;
        Ok((loss, norm_sq.first().copied().unwrap_or(f32::NAN)))
    }

    /// ∂(mean loss)/∂params for `batches` at the current weights, without an optimizer step:
    /// (mean loss, fp32 gradients per unit in the UnitSpec layout, loss scale removed).
    /// For checks against the CPU engine's `forward_backward`.
    pub fn compute_gradients(
        &mut self,
        batches: &[Batch],
    ) -> Result<(f32, Vec<Vec<f32>>), EngineError> {
        self.check_batches(batches)?;
        let scale = self.scaler.scale();
        let (loss, _) = self.forward_backward(batches, scale)?;
        let mut out = Vec::with_capacity(self.layout.slots.len());
        for slots in &self.layout.slots {
            let mut unit = Vec::with_capacity(slots.iter().map(|s| s.numel).sum());
            for s in slots {
                let grads = self.bufs.grads.slice(s.device_offset, s.numel)?;
                unit.extend(self.gpu.download::<f32>(&grads)?.iter().map(|&g| g / scale));
            }
            out.push(unit);
        }
        Ok((loss, out))
    }

    /// Mean loss of one micro-batch without touching gradients or weights.
    pub fn eval_loss(&mut self, batch: &Batch) -> Result<f32, EngineError> {
        self.check_batches(std::slice::from_ref(batch))?;
        self.upload_tokens(std::slice::from_ref(batch))?;
        let pass = self.pass();
        pass.forward(0)?;
        pass.head(0, None)?;
        self.gpu.synchronize(Queue::Compute)?;
        let losses = self
            .gpu
            .download::<f32>(&self.bufs.losses.slice(0, self.dims.bt())?)?;
        Ok((losses.iter().map(|&l| f64::from(l)).sum::<f64>() / losses.len() as f64) as f32)
    }

    /// One AdamW step on every tensor (one launch per `AdamSegment`), writing the floatX copy.
    fn adamw(&self, lr: f32, grad_scale: f32) -> Result<(), EngineError> {
        let o = &self.config.optim;
        let t = u32::try_from(self.step + 1).unwrap_or(u32::MAX);
        let b = &self.bufs;
        for s in &self.layout.segments {
            let hyper = AdamWHyper {
                lr,
                beta1: o.betas[0],
                beta2: o.betas[1],
                eps: o.eps,
                weight_decay: if s.decay { o.weight_decay } else { 0.0 },
            };
            let x = b.params_x.slice(s.device_offset, s.numel)?;
            self.gpu.adamw(
                &b.master.slice(s.master_offset, s.numel)?,
                Some(&x),
                &b.grads.slice(s.device_offset, s.numel)?,
                &b.adam_m.slice(s.master_offset, s.numel)?,
                &b.adam_v.slice(s.master_offset, s.numel)?,
                &hyper,
                t,
                grad_scale,
            )?;
        }
        Ok(())
    }

    /// One optimizer step over `batches` (the micro-batches of gradient accumulation).
    pub fn train_step(&mut self, batches: &[Batch]) -> Result<StepStats, EngineError> {
        let start = Instant::now();
        let step = self.step;
        self.check_batches(batches)?;
        let loss_scale = self.scaler.scale();
        let (loss, norm_sq) = self.forward_backward(batches, loss_scale)?;
        if !loss.is_finite() {
            return Err(EngineError::NonFinite {
                step,
                what: "loss",
                value: loss,
            });
        }
        let o = &self.config.optim;
        let lr = lr_at(o, step, self.config.train.steps);
        // Only fp16 recovers from overflow (skip and rescale); note that f32::max drops a NaN,
        // so the scaler must not see one it cannot handle.
        if !norm_sq.is_finite() && self.gpu.precision() != Precision::Fp16 {
            return Err(EngineError::NonFinite {
                step,
                what: "gradient norm",
                value: norm_sq.sqrt(),
            });
        }
        let grad_norm = match self.scaler.update(norm_sq, o.grad_clip) {
            StepDecision::Skip { new_scale } => {
                tracing::warn!(
                    step,
                    loss_scale,
                    new_scale,
                    "fp16 gradients overflowed: update skipped, loss scale reduced"
                );
                return Ok(self.stats(step, loss, lr, f32::INFINITY, batches, start));
            }
            StepDecision::Apply { grad_norm, .. } => grad_norm,
        };
        if !grad_norm.is_finite() {
            return Err(EngineError::NonFinite {
                step,
                what: "gradient norm",
                value: grad_norm,
            });
        }
        // The CPU engine's clip factor (with its +1e-6), then the loss scale removed.
        let grad_scale = clip_scale(grad_norm, o.grad_clip) / loss_scale;
        // The compute queue sat idle while the host read the loss and the norm.
        self.gpu
            .profile_mark("idle: host reads loss and grad norm")?;
        self.adamw(lr, grad_scale)?;
        self.gpu.synchronize(Queue::Compute)?;
        self.step += 1;
        Ok(self.stats(step, loss, lr, grad_norm, batches, start))
    }

    /// `train_step` with every GPU operation timed: the step's stats and the compute queue's
    /// time per operation, largest first.
    pub fn train_step_profiled(
        &mut self,
        batches: &[Batch],
    ) -> Result<(StepStats, Vec<OpTime>), EngineError> {
        self.gpu.profile_start()?;
        let stats = self.train_step(batches);
        // Closed whatever the step returned, so a failed step leaves no profile open.
        let ops = self.gpu.profile_finish()?;
        Ok((stats?, ops))
    }

    fn stats(
        &self,
        step: usize,
        loss: f32,
        lr: f32,
        grad_norm: f32,
        batches: &[Batch],
        start: Instant,
    ) -> StepStats {
        let tokens = batches.iter().map(Batch::tokens).sum::<usize>();
        let d = &self.dims;
        let per_token = 6.0 * self.layout.master_len as f64 + 12.0 * (d.l * d.c * d.t) as f64;
        StepStats::new(
            step,
            loss,
            lr,
            grad_norm,
            tokens,
            per_token * tokens as f64,
            start.elapsed(),
        )
    }

    /// The fp32 master weights, one flat vector per unit (UnitSpec layout).
    pub fn download_params(&self) -> Result<Vec<Vec<f32>>, EngineError> {
        self.gpu.synchronize(Queue::Compute)?;
        let mut out = Vec::with_capacity(self.layout.slots.len());
        for slots in &self.layout.slots {
            let unit = match (slots.first(), slots.last()) {
                (Some(a), Some(z)) => {
                    let len = z.master_offset + z.numel - a.master_offset;
                    self.gpu
                        .download::<f32>(&self.bufs.master.slice(a.master_offset, len)?)?
                }
                _ => Vec::new(),
            };
            out.push(unit);
        }
        Ok(out)
    }

    /// Writes the fp32 master weights as safetensors with the model's tensor names.
    pub fn save_weights(&self, path: &Path) -> Result<(), EngineError> {
        let params = self.download_params()?;
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert("strata_step".to_string(), self.step.to_string());
        weights::save(
            path,
            self.units.iter().zip(params.iter().map(Vec::as_slice)),
            meta,
        )?;
        Ok(())
    }
}

/// Per-tensor views of the floatX weights and fp32 gradients (device layout).
fn make_views(bufs: &Buffers<DeviceBuf>, layout: &ParamLayout) -> Result<Gpt2Views, CudaError> {
    let mut params = Vec::with_capacity(layout.slots.len());
    let mut grads = Vec::with_capacity(layout.slots.len());
    for (u, slots) in layout.slots.iter().enumerate() {
        let is_block = u > 0 && u + 1 < layout.slots.len();
        if is_block && slots.len() != BLOCK_TENSORS {
            return Err(CudaError::precondition(
                "GpuGpt2Trainer",
                format!(
                    "block unit {u} has {} tensors, expected {BLOCK_TENSORS}",
                    slots.len()
                ),
            ));
        }
        params.push(
            slots
                .iter()
                .map(|s| bufs.params_x.slice(s.device_offset, s.device_numel))
                .collect::<Result<Vec<_>, _>>()?,
        );
        grads.push(
            slots
                .iter()
                .map(|s| bufs.grads.slice(s.device_offset, s.device_numel))
                .collect::<Result<Vec<_>, _>>()?,
        );
    }
    Ok(Gpt2Views { params, grads })
}

impl Drop for GpuGpt2Trainer {
    fn drop(&mut self) {
        // `tokens_host` is freed before the arena (which synchronizes the context): an H2D copy
        // still reading it (after an error mid-step) must finish first. Drop never panics.
        if let Err(e) = self.gpu.synchronize(Queue::H2d) {
            tracing::warn!(error = %e, "GPU trainer: synchronize before drop failed");
        }
    }
}

impl Trainer for GpuGpt2Trainer {
    fn train_step(&mut self, batches: &[Batch]) -> Result<StepStats, EngineError> {
        GpuGpt2Trainer::train_step(self, batches)
    }
    fn new_batch(&self) -> Batch {
        Batch::zeros(self.dims.b, self.dims.t)
    }
    fn num_params(&self) -> usize {
        GpuGpt2Trainer::num_params(self)
    }
    fn save_weights(&self, path: &Path) -> Result<(), EngineError> {
        GpuGpt2Trainer::save_weights(self, path)
    }
    fn eval_loss(&mut self, batch: &Batch) -> Result<f32, EngineError> {
        GpuGpt2Trainer::eval_loss(self, batch)
    }
    fn train_step_profiled(
        &mut self,
        batches: &[Batch],
    ) -> Result<(StepStats, Vec<OpTime>), EngineError> {
        GpuGpt2Trainer::train_step_profiled(self, batches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_new_is_an_error_not_a_panic() {
        if super::super::gpu_available() {
            eprintln!("without_a_gpu_new_is_an_error_not_a_panic: SKIPPED: a GPU is present");
            return;
        }
        let config = Config::default();
        let err = GpuGpt2Trainer::new(&config).expect_err("no GPU here");
        assert!(matches!(err, EngineError::Cuda(_)), "{err}");
    }

    #[test]
    fn auto_precision_is_bf16() {
        assert_eq!(gpu_precision(config::Precision::Auto), Precision::Bf16);
        assert_eq!(gpu_precision(config::Precision::Fp16), Precision::Fp16);
    }
}
