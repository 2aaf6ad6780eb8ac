//! The step: tokens to the device, the stage walk forward and backward over micro-batches,
//! gradients averaged across ranks, the global norm, clipping and AdamW. Every operation is
//! enqueued on the device's queues; the host waits twice per step (for the loss and the norm,
//! which are host decisions, and at the end, so `StepStats` times the device's work).

use std::time::Instant;

use super::memory::{Optimizer, Sizes};
use super::walk::HeadMode;
use super::{BatchError, Engine, EngineError, StepStats};
use crate::backend::{AdamWHyper, Backend, Buf, Event, Precision, Queue, StepProfile};
use crate::model::{Batch, IGNORE_TARGET};
use crate::optim::{clip_scale, lr_at, StepDecision};

/// The host side of the step's tokens: every micro-batch's inputs, then every micro-batch's
/// targets, laid out as the device's token buffer.
pub(super) struct TokenStaging {
    host: Vec<i32>,
    /// The last copy out of `host` (waited for before it is rewritten).
    copied: Option<Event>,
}

impl TokenStaging {
    pub(super) fn new(sizes: &Sizes) -> TokenStaging {
        TokenStaging {
            host: vec![0; 2 * sizes.micro_max * sizes.bt()],
            copied: None,
        }
    }
}

impl Engine {
    /// Checks that there are 1 to `data.grad_accum_steps` micro-batches, each `B × T` with
    /// tokens below the vocabulary (a target may also be [`IGNORE_TARGET`]).
    fn check_batches(&self, batches: &[Batch]) -> Result<(), BatchError> {
        let (b, t) = (self.laid.sizes.b, self.laid.sizes.t);
        let vocab = self.model.vocab_size();
        if batches.is_empty() {
            return Err(BatchError::Empty);
        }
        if batches.len() > self.laid.sizes.micro_max {
            return Err(BatchError::TooMany {
                got: batches.len(),
                max: self.laid.sizes.micro_max,
            });
        }
        for (index, mb) in batches.iter().enumerate() {
            if mb.b != b || mb.t != t || mb.inputs.len() != b * t || mb.targets.len() != b * t {
                return Err(BatchError::Shape {
                    index,
                    b: mb.b,
                    t: mb.t,
                    inputs: mb.inputs.len(),
                    targets: mb.targets.len(),
                    want_b: b,
                    want_t: t,
                });
            }
            // Kernels index embeddings by token: an out-of-range token would read out of bounds.
            let scored = mb.targets.iter().filter(|&&x| x != IGNORE_TARGET);
            if let Some(&token) = mb
                .inputs
                .iter()
                .chain(scored)
                .find(|&&x| x as usize >= vocab)
            {
                return Err(BatchError::Token {
                    index,
                    token,
                    vocab,
                });
            }
        }
        Ok(())
    }

    /// Copies every micro-batch's tokens to the device (H2D queue) and orders compute after it.
    fn upload_tokens(&mut self, batches: &[Batch]) -> Result<(), EngineError> {
        let (bt, micro_max) = (self.laid.sizes.bt(), self.laid.sizes.micro_max);
        let staging = &mut self.tokens;
        // The previous copy must be done before the staging buffer is rewritten.
        if let Some(copied) = staging.copied.take() {
            copied.synchronize()?;
        }
        let (inputs, targets) = staging.host.split_at_mut(micro_max * bt);
        for (k, mb) in batches.iter().enumerate() {
            let range = k * bt..(k + 1) * bt;
            for (dst, &src) in inputs[range.clone()].iter_mut().zip(&mb.inputs) {
                *dst = src as i32;
            }
            for (dst, &src) in targets[range].iter_mut().zip(&mb.targets) {
                *dst = src as i32;
            }
        }
        let dev = &*self.dev;
        // The device tokens are rewritten only after compute has finished reading them.
        dev.wait(Queue::H2d, &dev.record(Queue::Compute)?)?;
        let bytes: &[u8] = bytemuck::cast_slice(&staging.host);
        // SAFETY: the staging buffer is owned by the engine and not written again before
        // `copied` (recorded right after the copy) has completed: the next upload synchronizes
        // it first, and Drop synchronizes every queue.
        unsafe { dev.copy_h2d(Queue::H2d, &self.bufs.tokens, bytes)? };
        let copied = dev.record(Queue::H2d)?;
        dev.wait(Queue::Compute, &copied)?;
        staging.copied = Some(copied);
        Ok(())
    }

    /// Sum of the first `micro` micro-batches' token losses, an ignored target's being 0 (waits
    /// for the compute queue).
    fn loss_sum(&self, micro: usize) -> Result<f64, EngineError> {
        let losses = self.bufs.losses.slice(0, micro * self.laid.sizes.bt())?;
        let values = self.device().read_f32(&losses)?;
        Ok(values.iter().map(|&l| f64::from(l)).sum())
    }

    /// Mean of the first `micro` micro-batches' token losses over all their B·T targets.
    fn mean_loss(&self, micro: usize) -> Result<f32, EngineError> {
        let n = micro * self.laid.sizes.bt();
        Ok((self.loss_sum(micro)? / n.max(1) as f64) as f32)
    }

    /// Targets of `batches` that the loss ignores, summed over the ranks (each passes its own).
    fn ignored_targets(&self, batches: &[Batch]) -> Result<usize, EngineError> {
        let local: usize = batches
            .iter()
            .map(|b| b.targets.iter().filter(|&&x| x == IGNORE_TARGET).count())
            .sum();
        if self.comm.world_size() == 1 {
            return Ok(local);
        }
        // A count in two f32 parts, each summed exactly: the high part below 2^16 per rank
        // (targets of a step fit 32 bits), the low part below 2^16.
        let mut count = [(local >> 16) as f32, (local & 0xffff) as f32];
        // No collective of the comm queue may be in flight during the host's own.
        self.dev.synchronize(Queue::Comm)?;
        self.comm.all_reduce(&mut count)?;
        Ok(((count[0] as usize) << 16) + count[1] as usize)
    }

    /// Zeroes the gradients, then accumulates ∂(mean loss over `batches`)/∂params, averaged over
    /// the data-parallel ranks (each passes its own micro-batches, as many as the others). Returns
    /// the mean loss over all of them. The mean is over the targets the loss counts in the global
    /// batch (every micro-batch of every rank): a target that is [`IGNORE_TARGET`] counts for
    /// nothing, so the loss and gradients are the same at any world size and micro-batch split
    /// (transformers' Trainer with `num_items_in_batch`). The gradients stay on the device
    /// ([`Engine::grads`] reads them).
    pub fn forward_backward(&mut self, batches: &[Batch]) -> Result<f32, EngineError> {
        self.check_batches(batches)?;
        self.upload_tokens(batches)?;
        let world = self.comm.world_size();
        let bt = self.laid.sizes.bt();
        let ignored = self.ignored_targets(batches)?;
        let counted = (batches.len() * bt * world).saturating_sub(ignored);
        let dloss = if ignored == 0 {
            self.scaler.scale() / (batches.len() * world) as f32
        } else if counted == 0 {
            tracing::warn!(
                "step {}: every target of the global batch is masked: no gradient, loss reported as 0",
                self.step
            );
            0.0
        } else {
            (f64::from(self.scaler.scale()) * bt as f64 / counted as f64) as f32
        };
        for grads in self.states.iter().filter_map(|s| s.grads.on_device()) {
            self.dev.memset(Queue::Compute, grads, 0)?;
        }
        let plan = self.plan(batches.len(), true)?;
        self.walk(&plan, HeadMode::Train { dloss })?;
        let local = if ignored == 0 {
            self.mean_loss(batches.len())?
        } else {
            // This rank's share of the mean over the global batch's counted targets.
            (self.loss_sum(batches.len())? / counted.max(1) as f64) as f32
        };
        if world == 1 {
            return Ok(local);
        }
        // No collective of the comm queue may be in flight during the host's own.
        self.dev.synchronize(Queue::Comm)?;
        let share = if ignored == 0 { world as f32 } else { 1.0 };
        let mut loss = [local / share];
        self.comm.all_reduce(&mut loss)?;
        Ok(loss[0])
    }

    /// The squared global gradient norm: over whole gradients (the same on every rank), or the
    /// sum over every rank's gradient shards.
    fn grad_norm_squared(&self) -> Result<f32, EngineError> {
        let dev = &*self.dev;
        if let Some(tier) = &self.host {
            // The host optimizer took every gradient shard; its partial sums are this rank's.
            let mut norm = [tier.grad_norm_squared(dev)?];
            if self.comm.world_size() > 1 {
                dev.synchronize(Queue::Comm)?;
                self.comm.all_reduce(&mut norm)?;
            }
            return Ok(norm[0]);
        }
        let device_grads = self.states.iter().filter_map(|s| s.grads.on_device());
        for (u, grads) in device_grads.enumerate() {
            dev.grad_norm_squared(&self.bufs.norm, &self.bufs.norm_partials, grads, u > 0)?;
        }
        // Stages 0 and 1 keep every unit's gradients whole; stages 2 and 3 shard every unit's.
        if self.placement.stage >= 2 {
            dev.wait(Queue::Comm, &dev.record(Queue::Compute)?)?;
            dev.all_reduce(&self.comm, &self.bufs.norm)?;
            dev.wait(Queue::Compute, &dev.record(Queue::Comm)?)?;
        }
        Ok(dev
            .read_f32(&self.bufs.norm)?
            .first()
            .copied()
            .unwrap_or(f32::NAN))
    }

    /// Global gradient norm, clipping, and one AdamW step with the scheduled learning rate on
    /// this rank's part of every unit, then the compute weights gathered where they are whole.
    /// Returns (grad_norm before clipping, lr). A non-finite norm skips the update (fp16: the
    /// loss scale backs off and the norm is reported as infinite), on every rank alike.
    pub fn optimizer_step(&mut self) -> Result<(f32, f32), EngineError> {
        let norm_sq = self.grad_norm_squared()?;
        let o = &self.config.optim;
        let lr = lr_at(o, self.step, self.config.train.steps);
        let loss_scale = self.scaler.scale();
        // Only fp16 recovers from overflow (skip and rescale).
        if !norm_sq.is_finite() && self.dev.precision() != Precision::Fp16 {
            return Err(EngineError::NonFinite {
                step: self.step,
                what: "gradient norm",
                value: norm_sq.sqrt(),
            });
        }
        let grad_norm = match self.scaler.update(norm_sq, o.grad_clip) {
            StepDecision::Skip { new_scale } => {
                tracing::warn!(
                    step = self.step + 1,
                    loss_scale,
                    new_scale,
                    "fp16 gradients overflowed: update skipped, loss scale reduced"
                );
                return Ok((f32::INFINITY, lr));
            }
            StepDecision::Apply { grad_norm, .. } => grad_norm,
        };
        if !grad_norm.is_finite() {
            return Err(EngineError::NonFinite {
                step: self.step,
                what: "gradient norm",
                value: grad_norm,
            });
        }
        // torch's clip factor (with its +1e-6), then the loss scale removed.
        let grad_scale = clip_scale(grad_norm, o.grad_clip) / loss_scale;
        let hyper = [false, true].map(|decay| self.adam_hyper(lr, grad_scale, decay));
        if let Some(tier) = self.host.as_mut() {
            tier.step(&*self.dev, hyper)?;
        }
        for state in &self.states {
            let Optimizer::Device(optim) = &state.optimizer else {
                continue;
            };
            for seg in &optim.segments {
                let view = |b: &Buf| b.slice(seg.offset, seg.len);
                self.dev.adamw(
                    &view(&optim.master)?,
                    optim.compute.as_ref().map(view).transpose()?.as_ref(),
                    &view(&optim.grads)?,
                    &view(&optim.adam_m)?,
                    &view(&optim.adam_v)?,
                    &hyper[usize::from(seg.decay)],
                )?;
            }
        }
        self.gather_whole_params()?;
        self.step += 1;
        Ok((grad_norm, lr))
    }

    /// AdamW's hyperparameters of the coming step.
    fn adam_hyper(&self, lr: f32, grad_scale: f32, decay: bool) -> AdamWHyper {
        let o = &self.config.optim;
        AdamWHyper {
            lr,
            beta1: o.betas[0],
            beta2: o.betas[1],
            eps: o.eps,
            weight_decay: if decay { o.weight_decay } else { 0.0 },
            step: u32::try_from(self.step + 1).unwrap_or(u32::MAX),
            grad_scale,
        }
    }

    /// With AdamW during backward (`early_adamw`), the step's hyperparameters go to the host
    /// tier before backward starts.
    fn begin_early_step(&mut self) {
        if !self.early_adamw {
            return;
        }
        let o = &self.config.optim;
        let lr = lr_at(o, self.step, self.config.train.steps);
        // As optimizer_step computes it: clip_scale is exactly 1 without clipping.
        let grad_scale = clip_scale(0.0, o.grad_clip) / self.scaler.scale();
        let hyper = [false, true].map(|decay| self.adam_hyper(lr, grad_scale, decay));
        if let Some(tier) = self.host.as_mut() {
            tier.begin_early_step(hyper);
        }
    }

    /// One optimizer step over `batches` (the micro-batches of gradient accumulation).
    pub fn train_step(&mut self, batches: &[Batch]) -> Result<StepStats, EngineError> {
        let start = Instant::now();
        let step = self.step;
        self.begin_early_step();
        let loss = self.forward_backward(batches)?;
        if !loss.is_finite() {
            return Err(EngineError::NonFinite {
                step,
                what: "loss",
                value: loss,
            });
        }
        let (grad_norm, lr) = self.optimizer_step()?;
        // The step ends with its device work: the updated weights, and their gathers on the
        // communication queue (so the host's own collectives never interleave with them).
        self.dev.synchronize(Queue::Compute)?;
        self.dev.synchronize(Queue::Comm)?;
        let tokens = batches.iter().map(Batch::tokens).sum::<usize>() * self.comm.world_size();
        let flops = self.model.flops_per_token(self.laid.sizes.t) * tokens as f64;
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

    /// [`Engine::train_step`] as a training loop runs it: while a `--trace` timeline is recorded
    /// on CUDA, through [`Engine::train_step_profiled`], so that the kernels' GPU times reach its
    /// `gpu compute` track.
    pub fn train_step_traced(&mut self, batches: &[Batch]) -> Result<StepStats, EngineError> {
        if crate::trace::active().is_some() && self.dev.backend() == Backend::Cuda {
            return Ok(self.train_step_profiled(batches)?.0);
        }
        self.train_step(batches)
    }

    /// `train_step` with the device time of every operation (`strata-bench train --profile`):
    /// the compute queue's time per operation, largest first (GPU time on CUDA, wall time per
    /// operation on the CPU).
    pub fn train_step_profiled(
        &mut self,
        batches: &[Batch],
    ) -> Result<(StepStats, StepProfile), EngineError> {
        self.dev.profile_start()?;
        let stats = self.train_step(batches);
        // Closed whatever the step returned, so a failed step leaves no profile open.
        let ops = self.dev.profile_finish()?;
        Ok((stats?, ops))
    }

    /// Mean loss of one micro-batch over the targets the loss counts (NaN when it counts none, as
    /// PyTorch's mean over no targets), without touching gradients or weights.
    pub fn eval_loss(&mut self, batch: &Batch) -> Result<f32, EngineError> {
        let (sum, counted) = self.eval_loss_sum(batch)?;
        Ok((sum / counted as f64) as f32)
    }

    /// The summed loss of one micro-batch's counted targets, and how many the loss counts (those
    /// not [`IGNORE_TARGET`]): what a mean over several micro-batches or ranks adds up.
    pub fn eval_loss_sum(&mut self, batch: &Batch) -> Result<(f64, usize), EngineError> {
        self.check_batches(std::slice::from_ref(batch))?;
        self.upload_tokens(std::slice::from_ref(batch))?;
        let plan = self.plan(1, false)?;
        self.walk(&plan, HeadMode::Eval)?;
        let counted = batch
            .targets
            .iter()
            .filter(|&&x| x != IGNORE_TARGET)
            .count();
        Ok((self.loss_sum(1)?, counted))
    }

    /// The logits (B·T, vocabulary) of one micro-batch, for evaluation and tests.
    pub fn logits(&mut self, batch: &Batch) -> Result<Vec<f32>, EngineError> {
        self.check_batches(std::slice::from_ref(batch))?;
        self.upload_tokens(std::slice::from_ref(batch))?;
        let plan = self.plan(1, false)?;
        let mut out = Vec::with_capacity(self.laid.sizes.bt() * self.model.vocab_size());
        self.walk(&plan, HeadMode::Logits(&mut out))?;
        Ok(out)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The token staging is freed with the engine: a copy still reading it (after an error
        // mid-step) must finish first. Drop never panics: a failure is only logged.
        if let Err(e) = self.dev.synchronize_all() {
            tracing::warn!(error = %e, "engine: synchronize before drop failed");
        }
    }
}
