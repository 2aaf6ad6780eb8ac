//! The `Model` trait: how a model describes its parameters (in units) and computes, stage by
//! stage, against the device seam — so one model runs on the CPU and the GPU alike.
//!
//! A **unit** is the granularity of fetch and release: its parameters are one flat buffer, the
//! tensors laid out one after another in the order of [`UnitSpec::tensors`] (a tensor may carry
//! zero padding rows at its end, see [`TensorSpec::pad_rows`]). A **stage** is one step of the
//! forward pass; it uses one or more units (GPT-2's head uses the final LayerNorm and, tied, the
//! token embedding). The engine owns all parameter, gradient and optimizer memory and hands each
//! stage views of the units it uses, so it can gather, offload and release units without the
//! model knowing. Activations and workspaces come from the engine's arena ([`Model::prepare`]),
//! so the engine's dry run counts them.

pub mod decode;
pub mod gpt2;
mod hf;
pub mod llama;
pub(crate) mod logits;

use std::ops::Range;

pub use hf::hf_config;
use rayon::prelude::*;

use crate::backend::{Arena, AttentionMode, Buf, DType, Device, DeviceError};
use decode::{CacheHeads, KvCache};

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
    /// Shape as the model computes with it (row-major), without padding.
    pub shape: Vec<usize>,
    /// Whether AdamW's decoupled weight decay applies (matmul weights and embeddings).
    pub decay: bool,
    pub init: Init,
    /// Weight files store this 2-D tensor transposed (Hugging Face's Conv1D layout `[in, out]`).
    pub stored_transposed: bool,
    /// Zero rows stored after the tensor's rows (GPT-2 pads the token embedding to a multiple of
    /// 128 rows, so the LM head's GEMMs have tensor-core friendly sizes). They stay zero in
    /// training and are not part of weight files or parameter counts.
    pub pad_rows: usize,
}

impl TensorSpec {
    /// Elements of the tensor itself (what weight files hold).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Elements the tensor takes in its unit's buffer, padding rows included.
    pub fn stored_numel(&self) -> usize {
        match self.shape.split_first() {
            Some((rows, rest)) => (rows + self.pad_rows) * rest.iter().product::<usize>(),
            None => 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct UnitSpec {
    pub name: String,
    pub tensors: Vec<TensorSpec>,
}

impl UnitSpec {
    /// Elements of the unit's flat buffer (padding included).
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(TensorSpec::stored_numel).sum()
    }

    /// Parameters of the unit (padding excluded).
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }

    /// Initial parameters of the unit at `index` in its flat layout: one random stream per
    /// tensor drawn from `seed`, so the values do not depend on how units are partitioned or on
    /// which device they live; padding rows are zero.
    pub fn init_params(&self, seed: u64, index: usize) -> Vec<f32> {
        let mut params = vec![0.0; self.numel()];
        // One slice per tensor, filled in parallel: each tensor has its own stream, so the
        // values do not depend on the thread count.
        let mut slices = Vec::with_capacity(self.tensors.len());
        let mut rest = params.as_mut_slice();
        for t in &self.tensors {
            let (dst, tail) = rest.split_at_mut(t.stored_numel());
            slices.push(&mut dst[..t.numel()]);
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

    /// The range of each tensor (padding included) inside the unit's flat buffer.
    pub fn ranges(&self) -> Vec<Range<usize>> {
        let mut offset = 0;
        self.tensors
            .iter()
            .map(|t| {
                let r = offset..offset + t.stored_numel();
                offset = r.end;
                r
            })
            .collect()
    }

    /// Views of each tensor (padding included) of a buffer laid out as this unit.
    pub fn views(&self, unit: &Buf) -> Result<Vec<Buf>, DeviceError> {
        self.ranges()
            .into_iter()
            .map(|r| unit.slice(r.start, r.len()))
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct StageSpec {
    pub name: String,
    /// Indices of the units this stage reads (and, in backward, writes gradients for), in
    /// argument order.
    pub units: Vec<usize>,
}

/// A target the loss ignores (PyTorch's `-100` label): the loader writes it where the token file's loss mask
/// is 0 (a prompt, a separator). The loss of a step is the mean over the other targets of the global batch
/// (every micro-batch of every rank). On the device the target is -1 (the targets are i32): the seam's
/// cross-entropy gives it loss 0 and gradient 0, and a model with a head of its own must do the same.
pub const IGNORE_TARGET: u32 = u32::MAX;

/// One micro-batch on the host: `inputs` and `targets` are (B, T) token ids; a target may be
/// [`IGNORE_TARGET`].
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

/// One micro-batch on the device: `inputs` and `targets` are (B, T) i32 buffers.
#[derive(Clone, Debug)]
pub struct Tokens {
    pub inputs: Buf,
    pub targets: Buf,
    pub b: usize,
    pub t: usize,
}

impl Tokens {
    pub fn count(&self) -> usize {
        self.b * self.t
    }
}

/// Gradient outputs of the last stage's backward pass.
pub struct HeadGrads<'a> {
    /// f32 gradient buffers of the stage's units, in `StageSpec::units` order (accumulated into).
    pub grads: &'a [Buf],
    /// ∂L/∂input of the stage (X), overwritten.
    pub dres: &'a Buf,
    /// ∂L/∂(mean token loss of this micro-batch over its B·T targets, an ignored target counting 0),
    /// times any loss scale: 1/(micro-batches · ranks) when every target of the step counts, else
    /// B·T/(targets counted in the step's global batch), so that L is the mean over those.
    pub dloss: f32,
}

/// The sizes a model is prepared for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prepare {
    /// Micro-batch size B and sequence length T.
    pub b: usize,
    pub t: usize,
    /// Compute type X of activations and compute weights.
    pub x: DType,
    /// Activation checkpointing (`train.activation_checkpointing`): the engine keeps only each
    /// stage's input and, right before [`Model::backward`] of a stage, calls [`Model::forward`]
    /// of that stage again on the same input and parameters. The model may then share one set
    /// of activations among all its stages; without checkpointing every stage's activations must
    /// survive until its backward (the engine runs the whole forward pass first).
    pub checkpointing: bool,
    /// How attention keeps what its backward needs (`train.attention`).
    pub attention: AttentionMode,
}

/// A model strata can train. The last stage computes the loss; the others map activations to
/// activations. Every method enqueues work on the device's compute queue and returns; buffers
/// are X (activations, compute weights) or f32 (gradients, losses).
///
/// Backward: parameter gradients accumulate (`+=`, the engine zeroes them once per step), and
/// the gradient flowing between stages is one buffer `dres`, updated in place: on entry
/// ∂L/∂(stage output), on exit ∂L/∂(stage input).
///
/// The order of calls for one micro-batch: `forward` of every stage but the last, in order;
/// `head`; then for each stage in reverse, with activation checkpointing ([`Prepare::checkpointing`])
/// `forward` of that stage again (the engine recomputes it) immediately followed by its
/// `backward`, and without checkpointing `backward` alone. So `backward` always reads the
/// activations of the stage's most recent `forward`: a model never recomputes anything itself.
/// [`crate::testing::check_model_gradients`] checks a model against this contract (gradients
/// with and without checkpointing, and against finite differences).
pub trait Model: Send {
    fn units(&self) -> &[UnitSpec];
    /// Forward order; the backward pass walks them in reverse.
    fn stages(&self) -> &[StageSpec];
    /// The vocabulary: token ids (inputs and targets) must be below it.
    fn vocab_size(&self) -> usize;
    /// The longest sequence the model takes (`prepare` refuses a longer one).
    fn seq_len(&self) -> usize;
    /// Parameters of the model (padding excluded).
    fn num_params(&self) -> usize {
        self.units().iter().map(UnitSpec::num_params).sum()
    }
    /// What the model is, in a few words (the run's first line, `strata plan`).
    fn describe(&self) -> String {
        format!(
            "a model of {} parameters in {} units",
            self.num_params(),
            self.units().len()
        )
    }
    /// Names a weight file may give a second copy of one of the model's tensors under (a tied
    /// LM head): (the name in the file, the model's tensor). Loading accepts the copy only when
    /// it equals the tensor.
    fn tied_names(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Elements of the activation flowing between stages for a micro-batch of `b × t` tokens.
    fn activation_len(&self, b: usize, t: usize) -> usize;
    /// Allocates the model's activations and workspaces from `arena`, once before training.
    /// The engine calls it twice: on a counting arena (the dry run that sizes the device
    /// memory), then on the device's arena; the second call replaces the first's views.
    fn prepare(&mut self, arena: &Arena, shape: Prepare) -> Result<(), DeviceError>;
    /// Forward of a stage other than the last. Stage 0 reads `tokens.inputs`; its `input` is
    /// not used.
    fn forward(
        &mut self,
        dev: &dyn Device,
        stage: usize,
        params: &[Buf],
        tokens: &Tokens,
        input: &Buf,
        output: &Buf,
    ) -> Result<(), DeviceError>;
    /// Forward of the last stage: writes each token's loss to `losses` (B·T f32) and, with
    /// `grads`, runs its backward pass at once (the loss is the end of the graph).
    fn head(
        &mut self,
        dev: &dyn Device,
        params: &[Buf],
        tokens: &Tokens,
        input: &Buf,
        losses: &Buf,
        grads: Option<HeadGrads<'_>>,
    ) -> Result<(), DeviceError>;
    /// Backward of a stage other than the last: accumulates into `grads` and turns `dres` from
    /// ∂L/∂output into ∂L/∂input (stage 0 leaves it as it is). It reads the activations of the
    /// stage's latest `forward` (with checkpointing, the one the engine ran just before).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &mut self,
        dev: &dyn Device,
        stage: usize,
        params: &[Buf],
        grads: &[Buf],
        tokens: &Tokens,
        input: &Buf,
        dres: &Buf,
    ) -> Result<(), DeviceError>;
    /// Logits of rows `[row0, row0 + n)` of the head for `input`, in a view the model owns:
    /// returns (view of n × Vp, n, Vp) with n ≥ 1 as large as the model's logits buffer allows.
    /// For evaluation and tests; models without logits say so.
    fn logits_chunk(
        &mut self,
        _dev: &dyn Device,
        _params: &[Buf],
        _input: &Buf,
        _row0: usize,
    ) -> Result<(Buf, usize, usize), DeviceError> {
        Err(DeviceError::op(
            "logits_chunk",
            "this model does not expose its logits",
        ))
    }
    /// Training FLOPs per token (forward + backward, without recompute), for TFLOP/s and MFU.
    fn flops_per_token(&self, t: usize) -> f64;
    /// The attention layers a decoding cache holds ([`decode`]); None: the model does not decode.
    fn cache_heads(&self) -> Option<CacheHeads> {
        None
    }
    /// Forward of a stage other than the last for decoding: as [`Model::forward`], for the
    /// `tokens.t` new tokens of positions `cache.len()..`, each attention layer appending their
    /// keys and values to its cache and attending over every cached position. The caller
    /// advances the cache once every stage has run.
    #[allow(clippy::too_many_arguments)]
    fn forward_cached(
        &mut self,
        _dev: &dyn Device,
        _stage: usize,
        _params: &[Buf],
        _tokens: &Tokens,
        _input: &Buf,
        _output: &Buf,
        _cache: &KvCache,
    ) -> Result<(), DeviceError> {
        Err(DeviceError::op(
            "forward_cached",
            "this model does not decode with a cache",
        ))
    }
}

/// The model `[model]` describes (`model.arch`), before `prepare`. The section must have passed
/// `Config::validate`.
pub fn build(m: &crate::config::ModelConfig) -> Box<dyn Model> {
    match m.arch {
        crate::config::Arch::Gpt2 => Box::new(gpt2::Gpt2::new(gpt2::Gpt2Shape::from_config(m))),
        crate::config::Arch::Llama => {
            Box::new(llama::Llama::new(llama::LlamaShape::from_config(m)))
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn config(sets: &[&str]) -> Config {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::load(None, &sets).expect("config")
    }

    /// The config's closed forms (the host-memory bound, the export's size) agree with the
    /// models' own units.
    #[test]
    fn parameter_and_tensor_counts_of_the_config_match_the_models() {
        let llama = ["model.arch=\"llama\"", "model.intermediate_size=200"];
        let variants: Vec<Vec<&str>> = vec![
            vec![],
            vec![
                "model.n_layer=12",
                "model.n_embd=768",
                "model.n_head=12",
                "model.vocab_size=50257",
                "model.seq_len=1024",
            ],
            vec![
                "model.n_layer=1",
                "model.n_embd=8",
                "model.n_head=2",
                "model.vocab_size=3",
                "model.seq_len=5",
            ],
            llama.to_vec(),
            [
                &llama[..],
                &[
                    "model.n_kv_head=2",
                    "model.tie_word_embeddings=true",
                    "model.qkv_bias=true",
                ],
            ]
            .concat(),
            [
                &llama[..],
                &[
                    "model.head_dim=64",
                    "model.qk_norm=true",
                    "model.attention_bias=true",
                    "model.mlp_bias=true",
                ],
            ]
            .concat(),
        ];
        for sets in variants {
            let c = config(&sets);
            let model = super::build(&c.model);
            assert_eq!(c.model.num_params(), model.num_params() as u128, "{sets:?}");
            let tensors: usize = model.units().iter().map(|u| u.tensors.len()).sum();
            assert_eq!(c.model.num_tensors(), tensors, "{sets:?}");
        }
    }
}
