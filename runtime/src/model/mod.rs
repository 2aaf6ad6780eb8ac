//! The `Model` trait: how a model describes its parameters (in units) and computes, stage by stage.
//!
//! A **unit** is the granularity of fetch and release: its parameters are one flat buffer, the tensors laid out
//! one after another in the order of [`UnitSpec::tensors`]. A **stage** is one step of the forward pass; it
//! uses one or more units (GPT-2's head uses the final LayerNorm and, tied, the token embedding). The engine
//! owns all parameter, gradient and optimizer memory and hands each stage views of the units it uses, so the
//! ZeRO engine can gather, offload and release units without the model knowing.

pub mod gpt2;

use std::ops::Range;

use rayon::prelude::*;

/// How a tensor is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal { std: f32 },
    Zeros,
    Ones,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    /// The name used in weight files (Hugging Face names for GPT-2).
    pub name: String,
    /// Shape as the model computes with it (row-major).
    pub shape: Vec<usize>,
    /// Whether AdamW's decoupled weight decay applies (matmul weights and embeddings).
    pub decay: bool,
    pub init: Init,
    /// Weight files store this 2-D tensor transposed (Hugging Face's Conv1D layout `[in, out]`).
    pub stored_transposed: bool,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct UnitSpec {
    pub name: String,
    pub tensors: Vec<TensorSpec>,
}

impl UnitSpec {
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }
    /// Initial parameters of the unit at `index`: one random stream per tensor drawn from `seed`, so the values
    /// do not depend on how units are partitioned or on which device they live.
    pub fn init_params(&self, seed: u64, index: usize) -> Vec<f32> {
        let mut params = vec![0.0; self.numel()];
        // One slice per tensor, filled in parallel: each tensor has its own stream, so the values
        // do not depend on the thread count (a 1.3B model initialises in seconds, not a minute).
        let mut slices = Vec::with_capacity(self.tensors.len());
        let mut rest = params.as_mut_slice();
        for t in &self.tensors {
            let (dst, tail) = rest.split_at_mut(t.numel());
            slices.push(dst);
            rest = tail;
        }
        slices
            .into_par_iter()
            .zip(self.tensors.par_iter())
            .enumerate()
            .for_each(|(i, (dst, t))| match t.init {
                Init::Zeros => dst.fill(0.0),
                Init::Ones => dst.fill(1.0),
                Init::Normal { std } => {
                    crate::rng::Rng::derive(seed, index as u64, i as u64).fill_normal(dst, std)
                }
            });
        params
    }

    /// The range of each tensor inside the unit's flat buffer.
    pub fn ranges(&self) -> Vec<Range<usize>> {
        let mut offset = 0;
        self.tensors
            .iter()
            .map(|t| {
                let r = offset..offset + t.numel();
                offset = r.end;
                r
            })
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct StageSpec {
    pub name: String,
    /// Indices of the units this stage reads (and, in backward, writes gradients for), in argument order.
    pub units: Vec<usize>,
}

/// One micro-batch: `inputs` and `targets` are (B, T) token ids.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub b: usize,
    pub t: usize,
}

impl Batch {
    pub fn zeros(b: usize, t: usize) -> Batch {
        Batch {
            inputs: vec![0; b * t],
            targets: vec![0; b * t],
            b,
            t,
        }
    }
    pub fn tokens(&self) -> usize {
        self.b * self.t
    }
}

/// Gradient outputs of the last stage's backward pass.
pub struct HeadGrads<'a, 'g> {
    /// Gradient buffers of the stage's units, in `StageSpec::units` order (accumulated into).
    pub grads: &'a mut [&'g mut [f32]],
    /// ∂L/∂input of the stage (overwritten).
    pub dinput: &'a mut [f32],
    /// ∂L/∂(mean token loss of this micro-batch): 1/grad_accum_steps, times any loss scale.
    pub dloss: f32,
}

/// A model strata can train. The last stage computes the loss; the others map activations to activations.
/// Backward functions accumulate (`+=`) into parameter gradients and overwrite `dinput`.
pub trait Model: Send {
    fn units(&self) -> &[UnitSpec];
    /// Forward order; the backward pass walks them in reverse.
    fn stages(&self) -> &[StageSpec];
    /// Elements of the activation flowing between stages for a micro-batch of `b × t` tokens.
    fn activation_len(&self, b: usize, t: usize) -> usize;
    /// Allocates working memory for micro-batches of `b × t` tokens, once, before training.
    /// With `checkpointing`, stages keep no intermediate activations and `backward` recomputes them.
    fn prepare(&mut self, b: usize, t: usize, checkpointing: bool);
    /// Forward of a stage other than the last. Stage 0 reads `batch.inputs`; its `input` is empty.
    fn forward(
        &mut self,
        stage: usize,
        params: &[&[f32]],
        batch: &Batch,
        input: &[f32],
        output: &mut [f32],
    );
    /// Forward of the last stage: returns the mean loss over the micro-batch's tokens, and with `grads`
    /// runs its backward pass at once (the loss is the end of the graph).
    fn head(
        &mut self,
        params: &[&[f32]],
        batch: &Batch,
        input: &[f32],
        grads: Option<HeadGrads<'_, '_>>,
    ) -> f32;
    /// Backward of a stage other than the last.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &mut self,
        stage: usize,
        params: &[&[f32]],
        grads: &mut [&mut [f32]],
        batch: &Batch,
        input: &[f32],
        dout: &[f32],
        dinput: &mut [f32],
    );
    /// Training FLOPs per token (forward + backward, without recompute), for TFLOP/s and MFU figures.
    fn flops_per_token(&self, t: usize) -> f64;
}
