//! GPT-2 (Radford et al. 2019; Hugging Face `GPT2LMHeadModel`): learned position embeddings,
//! pre-LayerNorm blocks, causal multi-head attention, tanh GELU, 4× MLP, final LayerNorm, LM
//! head tied to the token embedding, biases everywhere, no dropout. Written once against the
//! device seam: the same code runs on the CPU and the GPU.
//!
//! Units: `embed` (wte, wpe), `h.{i}` for each block, `ln_f`. Stages: `embed` → `h.0` …
//! `h.{L-1}` → `head` (which uses `ln_f` and, for the tied LM head, `embed`). The token
//! embedding carries zero padding rows up to a multiple of [`VOCAB_PAD`], so the LM head's
//! GEMMs have tensor-core friendly sizes; the padding never leaves the model.

mod block;
mod head;

use super::decode::{CacheHeads, KvCache};
use super::{HeadGrads, Init, Model, Prepare, StageSpec, TensorSpec, Tokens, UnitSpec};
use crate::backend::{Arena, Buf, Device, DeviceError, EncoderBackward, EncoderForward};
use block::{Block, BlockScratch};
use head::{Head, HeadGradViews, HeadParams};

/// The token embedding is padded to a multiple of this many rows.
pub const VOCAB_PAD: usize = 128;

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

    /// Parameters (padding excluded).
    pub fn num_params(&self) -> usize {
        build_units(self).iter().map(UnitSpec::num_params).sum()
    }

    /// The padded vocabulary Vp: rows of the stored token embedding, columns of the logits.
    pub fn padded_vocab(&self) -> usize {
        self.vocab_size.div_ceil(VOCAB_PAD) * VOCAB_PAD
    }
}

fn tensor(name: String, shape: &[usize], decay: bool, init: Init, transposed: bool) -> TensorSpec {
    TensorSpec {
        name,
        shape: shape.to_vec(),
        decay,
        init,
        stored_transposed: transposed,
        pad_rows: 0,
    }
}

/// Units with Hugging Face tensor names; matmul weights in `nn.Linear` layout `(out, in)`,
/// stored transposed on disk as Hugging Face's Conv1D does.
fn build_units(s: &Gpt2Shape) -> Vec<UnitSpec> {
    let (c, v, l) = (s.n_embd, s.vocab_size, s.n_layer);
    let normal = Init::Normal { std: 0.02 };
    let proj = Init::Normal {
        std: 0.02 / (2.0 * l as f32).sqrt(),
    };
    let mut wte = tensor(
        "transformer.wte.weight".into(),
        &[v, c],
        true,
        normal,
        false,
    );
    wte.pad_rows = s.padded_vocab() - v;
    let wpe = tensor(
        "transformer.wpe.weight".into(),
        &[s.max_seq_len, c],
        true,
        normal,
        false,
    );
    let mut units = vec![UnitSpec {
        name: "embed".into(),
        tensors: vec![wte, wpe],
    }];
    for i in 0..l {
        let p = |n: &str| format!("transformer.h.{i}.{n}");
        units.push(UnitSpec {
            name: format!("h.{i}"),
            tensors: vec![
                tensor(p("ln_1.weight"), &[c], false, Init::Ones, false),
                tensor(p("ln_1.bias"), &[c], false, Init::Zeros, false),
                tensor(p("attn.c_attn.weight"), &[3 * c, c], true, normal, true),
                tensor(p("attn.c_attn.bias"), &[3 * c], false, Init::Zeros, false),
                tensor(p("attn.c_proj.weight"), &[c, c], true, proj, true),
                tensor(p("attn.c_proj.bias"), &[c], false, Init::Zeros, false),
                tensor(p("ln_2.weight"), &[c], false, Init::Ones, false),
                tensor(p("ln_2.bias"), &[c], false, Init::Zeros, false),
                tensor(p("mlp.c_fc.weight"), &[4 * c, c], true, normal, true),
                tensor(p("mlp.c_fc.bias"), &[4 * c], false, Init::Zeros, false),
                tensor(p("mlp.c_proj.weight"), &[c, 4 * c], true, proj, true),
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

/// Workspaces allocated by `prepare`.
struct Workspaces {
    shape: Prepare,
    /// One per block, or one shared by all blocks with checkpointing.
    blocks: Vec<Block>,
    scratch: BlockScratch,
    head: Head,
}

pub struct Gpt2 {
    shape: Gpt2Shape,
    units: Vec<UnitSpec>,
    stages: Vec<StageSpec>,
    ws: Option<Workspaces>,
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
            ws: None,
        }
    }

    pub fn shape(&self) -> &Gpt2Shape {
        &self.shape
    }

    fn workspaces(&mut self, tokens: Option<&Tokens>) -> Result<&mut Workspaces, DeviceError> {
        let ws = self
            .ws
            .as_mut()
            .ok_or_else(|| DeviceError::op("gpt2", "prepare() first"))?;
        if let Some(tokens) = tokens {
            let (b, t) = (ws.shape.b, ws.shape.t);
            if (tokens.b, tokens.t) != (b, t) {
                return Err(DeviceError::op(
                    "gpt2",
                    format!(
                        "micro-batch {}x{} differs from the prepared {b}x{t}",
                        tokens.b, tokens.t
                    ),
                ));
            }
        }
        Ok(ws)
    }

    /// Forward of a stage other than the head, over the whole sequence (training) or, with a
    /// cache, over new tokens at positions `cache.len()..` (their rows of the position table).
    #[allow(clippy::too_many_arguments)]
    fn stage_forward(
        &mut self,
        dev: &dyn Device,
        stage: usize,
        params: &[Buf],
        tokens: &Tokens,
        input: &Buf,
        output: &Buf,
        cache: Option<&KvCache>,
    ) -> Result<(), DeviceError> {
        let shape = self.shape;
        let (b, t, c) = (tokens.b, tokens.t, shape.n_embd);
        if stage == 0 {
            let embed = self.units[0].views(&params[0])?;
            self.workspaces(Some(tokens))?;
            let pos = cache.map_or(0, KvCache::len);
            let wpe = embed[1].slice(pos * c, t * c).map_err(|_| {
                DeviceError::op(
                    "gpt2",
                    format!(
                        "{t} positions from {pos} exceed the model's {}",
                        shape.max_seq_len
                    ),
                )
            })?;
            return dev.run(EncoderForward {
                out: output,
                tokens: &tokens.inputs,
                wte: &embed[0],
                wpe: Some(&wpe),
                b,
                t,
                c,
            });
        }
        let layer = cache.map(|c| c.layer(stage - 1)).transpose()?;
        let ws = self.workspaces(Some(tokens))?;
        let i = if ws.shape.checkpointing { 0 } else { stage - 1 };
        let weights = block::weights(&params[0], &shape)?;
        ws.blocks[i].forward(dev, &ws.scratch, &weights, input, output, layer)
    }
}

impl Model for Gpt2 {
    fn units(&self) -> &[UnitSpec] {
        &self.units
    }

    fn stages(&self) -> &[StageSpec] {
        &self.stages
    }

    fn vocab_size(&self) -> usize {
        self.shape.vocab_size
    }

    fn seq_len(&self) -> usize {
        self.shape.max_seq_len
    }

    fn describe(&self) -> String {
        let s = &self.shape;
        format!(
            "GPT-2 {} layers × {} wide ({} heads), vocabulary {}",
            s.n_layer, s.n_embd, s.n_head, s.vocab_size
        )
    }

    fn tied_names(&self) -> Vec<(String, String)> {
        vec![("lm_head.weight".into(), "transformer.wte.weight".into())]
    }

    fn activation_len(&self, b: usize, t: usize) -> usize {
        b * t * self.shape.n_embd
    }

    fn prepare(&mut self, arena: &Arena, p: Prepare) -> Result<(), DeviceError> {
        if p.t > self.shape.max_seq_len {
            return Err(DeviceError::op(
                "gpt2 prepare",
                format!(
                    "sequence length {} exceeds the model's {}",
                    p.t, self.shape.max_seq_len
                ),
            ));
        }
        let count = if p.checkpointing {
            1
        } else {
            self.shape.n_layer
        };
        let blocks = (0..count)
            .map(|_| Block::new(arena, &self.shape, &p))
            .collect::<Result<_, _>>()?;
        self.ws = Some(Workspaces {
            shape: p,
            blocks,
            scratch: BlockScratch::new(arena, &self.shape, &p)?,
            head: Head::new(arena, &self.shape, &p)?,
        });
        Ok(())
    }

    fn forward(
        &mut self,
        dev: &dyn Device,
        stage: usize,
        params: &[Buf],
        tokens: &Tokens,
        input: &Buf,
        output: &Buf,
    ) -> Result<(), DeviceError> {
        self.stage_forward(dev, stage, params, tokens, input, output, None)
    }

    fn head(
        &mut self,
        dev: &dyn Device,
        params: &[Buf],
        tokens: &Tokens,
        input: &Buf,
        losses: &Buf,
        grads: Option<HeadGrads<'_>>,
    ) -> Result<(), DeviceError> {
        let shape = self.shape;
        let lnf = self.units[shape.n_layer + 1].views(&params[0])?;
        let wte = self.units[0].views(&params[1])?.swap_remove(0);
        let grads = match grads {
            Some(g) => Some(HeadGradViews {
                dlnf: self.units[shape.n_layer + 1].views(&g.grads[0])?,
                dwte: self.units[0].views(&g.grads[1])?.swap_remove(0),
                dres: g.dres.clone(),
                dloss: g.dloss,
            }),
            None => None,
        };
        let ws = self.workspaces(Some(tokens))?;
        let p = HeadParams {
            lnf: &lnf,
            wte: &wte,
        };
        ws.head.run(
            dev,
            &shape,
            &p,
            tokens,
            input,
            losses,
            grads.as_ref(),
            &ws.scratch.dln,
        )
    }

    fn backward(
        &mut self,
        dev: &dyn Device,
        stage: usize,
        params: &[Buf],
        grads: &[Buf],
        tokens: &Tokens,
        input: &Buf,
        dres: &Buf,
    ) -> Result<(), DeviceError> {
        let shape = self.shape;
        let c = shape.n_embd;
        if stage == 0 {
            let dembed = self.units[0].views(&grads[0])?;
            self.workspaces(Some(tokens))?;
            return dev.run(EncoderBackward {
                dwte: &dembed[0],
                dwpe: Some(&dembed[1]),
                dout: dres,
                tokens: &tokens.inputs,
                b: tokens.b,
                t: tokens.t,
                c,
            });
        }
        let weights = block::weights(&params[0], &shape)?;
        let dweights = block::weights(&grads[0], &shape)?;
        let ws = self.workspaces(Some(tokens))?;
        let block = &ws.blocks[if ws.shape.checkpointing { 0 } else { stage - 1 }];
        block.backward(dev, &ws.scratch, &weights, &dweights, input, dres)
    }

    fn logits_chunk(
        &mut self,
        dev: &dyn Device,
        params: &[Buf],
        input: &Buf,
        row0: usize,
    ) -> Result<(Buf, usize, usize), DeviceError> {
        let shape = self.shape;
        let lnf = self.units[shape.n_layer + 1].views(&params[0])?;
        let wte = self.units[0].views(&params[1])?.swap_remove(0);
        let ws = self.workspaces(None)?;
        let p = HeadParams {
            lnf: &lnf,
            wte: &wte,
        };
        ws.head.logits(dev, &shape, &p, input, row0)
    }

    fn cache_heads(&self) -> Option<CacheHeads> {
        Some(CacheHeads {
            layers: self.shape.n_layer,
            nkv: self.shape.n_head,
            hs: self.shape.n_embd / self.shape.n_head,
        })
    }

    fn forward_cached(
        &mut self,
        dev: &dyn Device,
        stage: usize,
        params: &[Buf],
        tokens: &Tokens,
        input: &Buf,
        output: &Buf,
        cache: &KvCache,
    ) -> Result<(), DeviceError> {
        self.stage_forward(dev, stage, params, tokens, input, output, Some(cache))
    }

    fn flops_per_token(&self, t: usize) -> f64 {
        let s = &self.shape;
        6.0 * s.num_params() as f64 + 12.0 * (s.n_layer * s.n_embd * t) as f64
    }
}
