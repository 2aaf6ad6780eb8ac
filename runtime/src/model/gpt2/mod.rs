//! GPT-2 (Radford et al. 2019; Hugging Face `GPT2LMHeadModel`): learned position embeddings, pre-LayerNorm
//! blocks, causal multi-head attention, tanh GELU, 4× MLP, final LayerNorm, LM head tied to the token
//! embedding, biases everywhere, no dropout.
//!
//! Units: `embed` (wte, wpe), `h.{i}` for each block, `ln_f`. Stages: `embed` → `h.0` … `h.{L-1}` → `head`
//! (which uses `ln_f` and, for the tied LM head, `embed`).

mod block;
mod head;

use super::{Batch, HeadGrads, Init, Model, StageSpec, TensorSpec, UnitSpec};
use crate::backend::cpu;
use block::{BlockScratch, BlockWorkspace};
use head::HeadWorkspace;

/// The hyper-parameters that fix GPT-2's shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpt2Shape {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub vocab_size: usize,
    /// Maximum sequence length (rows of the position embedding).
    pub max_seq_len: usize,
}

impl Gpt2Shape {
    pub fn from_config(m: &crate::config::ModelConfig) -> Gpt2Shape {
        Gpt2Shape {
            n_layer: m.n_layer,
            n_head: m.n_head,
            n_embd: m.n_embd,
            vocab_size: m.vocab_size,
            max_seq_len: m.seq_len,
        }
    }

    pub fn num_params(&self) -> usize {
        build_units(self).iter().map(UnitSpec::numel).sum()
    }
}

fn tensor(
    name: String,
    shape: &[usize],
    decay: bool,
    init: Init,
    stored_transposed: bool,
) -> TensorSpec {
    TensorSpec {
        name,
        shape: shape.to_vec(),
        decay,
        init,
        stored_transposed,
    }
}

/// Units with Hugging Face tensor names; matmul weights in `nn.Linear` layout `(out, in)`, stored transposed
/// on disk as Hugging Face's Conv1D does.
fn build_units(s: &Gpt2Shape) -> Vec<UnitSpec> {
    let (c, v, l) = (s.n_embd, s.vocab_size, s.n_layer);
    let std = 0.02;
    let proj_std = 0.02 / (2.0 * l as f32).sqrt();
    let mut units = vec![UnitSpec {
        name: "embed".into(),
        tensors: vec![
            tensor(
                "transformer.wte.weight".into(),
                &[v, c],
                true,
                Init::Normal { std },
                false,
            ),
            tensor(
                "transformer.wpe.weight".into(),
                &[s.max_seq_len, c],
                true,
                Init::Normal { std },
                false,
            ),
        ],
    }];
    for i in 0..l {
        let p = |n: &str| format!("transformer.h.{i}.{n}");
        units.push(UnitSpec {
            name: format!("h.{i}"),
            tensors: vec![
                tensor(p("ln_1.weight"), &[c], false, Init::Ones, false),
                tensor(p("ln_1.bias"), &[c], false, Init::Zeros, false),
                tensor(
                    p("attn.c_attn.weight"),
                    &[3 * c, c],
                    true,
                    Init::Normal { std },
                    true,
                ),
                tensor(p("attn.c_attn.bias"), &[3 * c], false, Init::Zeros, false),
                tensor(
                    p("attn.c_proj.weight"),
                    &[c, c],
                    true,
                    Init::Normal { std: proj_std },
                    true,
                ),
                tensor(p("attn.c_proj.bias"), &[c], false, Init::Zeros, false),
                tensor(p("ln_2.weight"), &[c], false, Init::Ones, false),
                tensor(p("ln_2.bias"), &[c], false, Init::Zeros, false),
                tensor(
                    p("mlp.c_fc.weight"),
                    &[4 * c, c],
                    true,
                    Init::Normal { std },
                    true,
                ),
                tensor(p("mlp.c_fc.bias"), &[4 * c], false, Init::Zeros, false),
                tensor(
                    p("mlp.c_proj.weight"),
                    &[c, 4 * c],
                    true,
                    Init::Normal { std: proj_std },
                    true,
                ),
                tensor(p("mlp.c_proj.bias"), &[c], false, Init::Zeros, false),
            ],
        });
    }
    units.push(UnitSpec {
        name: "ln_f".into(),
        tensors: vec![
            tensor(
                "transformer.ln_f.weight".into(),
                &[c],
                false,
                Init::Ones,
                false,
            ),
            tensor(
                "transformer.ln_f.bias".into(),
                &[c],
                false,
                Init::Zeros,
                false,
            ),
        ],
    });
    units
}

/// Splits a flat buffer into consecutive pieces of the given lengths.
pub(crate) fn split<'a>(buf: &'a [f32], lens: &[usize]) -> Vec<&'a [f32]> {
    let mut rest = buf;
    lens.iter()
        .map(|&n| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head
        })
        .collect()
}

/// Mutable version of [`split`].
pub(crate) fn split_mut<'a>(buf: &'a mut [f32], lens: &[usize]) -> Vec<&'a mut [f32]> {
    let mut rest = buf;
    lens.iter()
        .map(|&n| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            head
        })
        .collect()
}

pub struct Gpt2 {
    shape: Gpt2Shape,
    units: Vec<UnitSpec>,
    stages: Vec<StageSpec>,
    /// (B, T) the workspaces were sized for.
    batch_shape: (usize, usize),
    checkpointing: bool,
    /// One workspace per block, or a single shared one with checkpointing.
    blocks: Vec<BlockWorkspace>,
    scratch: Option<BlockScratch>,
    head: Option<HeadWorkspace>,
}

impl Gpt2 {
    pub fn new(shape: Gpt2Shape) -> Gpt2 {
        let units = build_units(&shape);
        let l = shape.n_layer;
        let mut stages = vec![StageSpec {
            name: "embed".into(),
            units: vec![0],
        }];
        stages.extend((0..l).map(|i| StageSpec {
            name: format!("h.{i}"),
            units: vec![1 + i],
        }));
        stages.push(StageSpec {
            name: "head".into(),
            units: vec![l + 1, 0],
        });
        Gpt2 {
            shape,
            units,
            stages,
            batch_shape: (0, 0),
            checkpointing: true,
            blocks: Vec::new(),
            scratch: None,
            head: None,
        }
    }

    pub fn shape(&self) -> &Gpt2Shape {
        &self.shape
    }

    fn block_workspace(&mut self, block: usize) -> &mut BlockWorkspace {
        let i = if self.checkpointing { 0 } else { block };
        &mut self.blocks[i]
    }

    /// Full logits (B, T, V) of the head for `input` (the last block's output); for tests and evaluation.
    pub fn logits(&mut self, params: &[&[f32]], input: &[f32], b: usize, t: usize) -> Vec<f32> {
        let ws = self.head.as_mut().expect("prepare() first");
        ws.logits(&self.shape, params, input, b, t)
    }
}

impl Model for Gpt2 {
    fn units(&self) -> &[UnitSpec] {
        &self.units
    }

    fn stages(&self) -> &[StageSpec] {
        &self.stages
    }

    fn activation_len(&self, b: usize, t: usize) -> usize {
        b * t * self.shape.n_embd
    }

    fn prepare(&mut self, b: usize, t: usize, checkpointing: bool) {
        assert!(
            t <= self.shape.max_seq_len,
            "sequence length {t} exceeds the model's {}",
            self.shape.max_seq_len
        );
        self.batch_shape = (b, t);
        self.checkpointing = checkpointing;
        let count = if checkpointing { 1 } else { self.shape.n_layer };
        self.blocks = (0..count)
            .map(|_| BlockWorkspace::new(&self.shape, b, t))
            .collect();
        self.scratch = Some(BlockScratch::new(&self.shape, b, t));
        self.head = Some(HeadWorkspace::new(&self.shape, b, t));
    }

    fn forward(
        &mut self,
        stage: usize,
        params: &[&[f32]],
        batch: &Batch,
        input: &[f32],
        output: &mut [f32],
    ) {
        assert_eq!(
            (batch.b, batch.t),
            self.batch_shape,
            "micro-batch shape differs from prepare()"
        );
        let c = self.shape.n_embd;
        if stage == 0 {
            let embed = split(
                params[0],
                &[self.shape.vocab_size * c, self.shape.max_seq_len * c],
            );
            cpu::encoder_forward(output, &batch.inputs, embed[0], embed[1], batch.t, c);
            return;
        }
        let shape = self.shape;
        let mut scratch = self.scratch.take().expect("prepare() first");
        self.block_workspace(stage - 1)
            .forward(&shape, &mut scratch, params[0], input, output);
        self.scratch = Some(scratch);
    }

    fn head(
        &mut self,
        params: &[&[f32]],
        batch: &Batch,
        input: &[f32],
        grads: Option<HeadGrads<'_, '_>>,
    ) -> f32 {
        assert_eq!(
            (batch.b, batch.t),
            self.batch_shape,
            "micro-batch shape differs from prepare()"
        );
        let ws = self.head.as_mut().expect("prepare() first");
        ws.run(&self.shape, params, batch, input, grads)
    }

    fn backward(
        &mut self,
        stage: usize,
        params: &[&[f32]],
        grads: &mut [&mut [f32]],
        batch: &Batch,
        input: &[f32],
        dout: &[f32],
        dinput: &mut [f32],
    ) {
        let c = self.shape.n_embd;
        if stage == 0 {
            let g = split_mut(
                grads[0],
                &[self.shape.vocab_size * c, self.shape.max_seq_len * c],
            );
            let [dwte, dwpe]: [&mut [f32]; 2] = g.try_into().expect("two embedding tensors");
            cpu::encoder_backward(dwte, dwpe, dout, &batch.inputs, batch.t, c);
            return;
        }
        let shape = self.shape;
        let checkpointing = self.checkpointing;
        let mut scratch = self.scratch.take().expect("prepare() first");
        let ws = self.block_workspace(stage - 1);
        if checkpointing {
            let mut output = std::mem::take(&mut scratch.recompute_out);
            ws.forward(&shape, &mut scratch, params[0], input, &mut output);
            scratch.recompute_out = output;
        }
        ws.backward(
            &shape,
            &mut scratch,
            params[0],
            grads[0],
            input,
            dout,
            dinput,
        );
        self.scratch = Some(scratch);
    }

    fn flops_per_token(&self, t: usize) -> f64 {
        let s = &self.shape;
        6.0 * s.num_params() as f64 + 12.0 * (s.n_layer * s.n_embd * t) as f64
    }
}
