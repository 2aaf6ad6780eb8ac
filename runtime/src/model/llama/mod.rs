//! The Llama family's decoder, one model for transformers' `LlamaForCausalLM` (Llama 2, 3, 3.1,
//! 3.2), `MistralForCausalLM`, `Qwen2ForCausalLM` and `Qwen3ForCausalLM`: token embedding (no
//! position table), pre-RMSNorm blocks of grouped-query attention with rotary position
//! embeddings (optional q/k/v/o biases, optional per-head q/k RMSNorm) and a SwiGLU MLP, a final
//! RMSNorm and an LM head, tied to the embedding or its own. Written once against the device
//! seam, like GPT-2.
//!
//! Units: `embed` (model.embed_tokens), `layers.{i}` for each block, `norm` (model.norm) and,
//! untied, `lm_head`. Stages: `embed` → `layers.0` … `layers.{L-1}` → `head` (the final norm
//! and the LM head's matrix). In a layer unit the rows of q_proj, k_proj and v_proj follow one
//! another, and so do those of gate_proj and up_proj (and their biases): each group is one
//! matrix, so one GEMM computes q, k and v, and one the gate and up projections. The matrix of
//! the LM head carries zero rows up to a multiple of [`VOCAB_PAD`], as GPT-2's.

mod block;
mod head;
pub mod rope;
#[cfg(test)]
mod tests;

use std::ops::Range;

use super::decode::{CacheHeads, KvCache};
use super::{HeadGrads, Init, Model, Prepare, StageSpec, TensorSpec, Tokens, UnitSpec};
use crate::backend::{
    Arena, Buf, DType, Device, DeviceError, EncoderBackward, EncoderForward, Queue,
};
use crate::config::{ModelConfig, RopeKind};
use block::{Block, BlockScratch, LayerViews};
use head::Head;

pub use super::gpt2::VOCAB_PAD;

/// The hyper-parameters that fix the decoder's shapes (transformers' config.json fields).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LlamaShape {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_embd: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    /// The longest sequence the model is prepared for (the rotary tables' rows).
    pub max_seq_len: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope: RopeKind,
    pub tied: bool,
    /// Biases on q, k and v; on o; on the MLP's three projections.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm of q and k before the rotation (Qwen3).
    pub qk_norm: bool,
}

impl LlamaShape {
    /// The shape `[model]` describes (arch = "llama", validated).
    pub fn from_config(m: &ModelConfig) -> LlamaShape {
        LlamaShape {
            n_layer: m.n_layer,
            n_head: m.n_head,
            n_kv_head: m.kv_heads(),
            head_dim: m.head_size(),
            n_embd: m.n_embd,
            intermediate_size: m.intermediate(),
            vocab_size: m.vocab_size,
            max_seq_len: m.seq_len,
            rms_norm_eps: m.rms_eps() as f32,
            rope_theta: m.theta(),
            rope: m.rope_kind(),
            tied: m.tied(),
            qkv_bias: m.has_qkv_bias(),
            o_bias: m.has_o_bias(),
            mlp_bias: m.has_mlp_bias(),
            qk_norm: m.has_qk_norm(),
        }
    }

    /// Width of a token's q, k and v together: (NH + 2·NKV)·HD.
    pub fn qkv_width(&self) -> usize {
        (self.n_head + 2 * self.n_kv_head) * self.head_dim
    }

    /// Width of the attention's output: NH·HD.
    pub fn q_width(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// The padded vocabulary Vp: rows of the LM head's matrix, columns of the logits.
    pub fn padded_vocab(&self) -> usize {
        self.vocab_size.div_ceil(VOCAB_PAD) * VOCAB_PAD
    }
}

/// Where each tensor of a layer unit lies in its flat buffer (the same for every layer).
#[derive(Clone, Debug, Default)]
struct LayerLayout {
    attn_norm: Range<usize>,
    qkv_weight: Range<usize>,
    qkv_bias: Option<Range<usize>>,
    q_norm: Option<Range<usize>>,
    k_norm: Option<Range<usize>>,
    o_weight: Range<usize>,
    o_bias: Option<Range<usize>>,
    mlp_norm: Range<usize>,
    gate_up_weight: Range<usize>,
    gate_up_bias: Option<Range<usize>>,
    down_weight: Range<usize>,
    down_bias: Option<Range<usize>>,
}

/// Tensors of one unit, laid out one after another as they are added.
struct UnitBuilder {
    tensors: Vec<TensorSpec>,
    end: usize,
}

impl UnitBuilder {
    fn new() -> UnitBuilder {
        UnitBuilder {
            tensors: Vec::new(),
            end: 0,
        }
    }

    /// Adds a tensor; returns its range (padding rows included).
    fn add(&mut self, name: String, shape: &[usize], init: Init, pad_rows: usize) -> Range<usize> {
        let spec = TensorSpec {
            name,
            shape: shape.to_vec(),
            // AdamW's weight decay applies to matrices and embeddings, not to norms and biases.
            decay: shape.len() >= 2,
            init,
            stored_transposed: false,
            pad_rows,
        };
        let range = self.end..self.end + spec.stored_numel();
        self.end = range.end;
        self.tensors.push(spec);
        range
    }

    /// Adds the tensors `parts` (name, rows) of one (Σ rows, cols) matrix; returns its range.
    fn add_stacked(
        &mut self,
        parts: &[(String, usize)],
        cols: Option<usize>,
        init: Init,
    ) -> Range<usize> {
        let start = self.end;
        for (name, rows) in parts {
            match cols {
                Some(cols) => self.add(name.clone(), &[*rows, cols], init, 0),
                None => self.add(name.clone(), &[*rows], init, 0),
            };
        }
        start..self.end
    }

    fn build(self, name: String) -> UnitSpec {
        UnitSpec {
            name,
            tensors: self.tensors,
        }
    }
}

/// transformers' `initializer_range` for Llama: every matrix N(0, 0.02), norms 1, biases 0.
const INIT_STD: f32 = 0.02;

/// Units with Hugging Face tensor names, matrices in `nn.Linear` layout `(out, in)`; and the
/// layout of a layer unit.
fn build_units(s: &LlamaShape) -> (Vec<UnitSpec>, LayerLayout) {
    let (c, hd, i) = (s.n_embd, s.head_dim, s.intermediate_size);
    let normal = Init::Normal { std: INIT_STD };
    let mut units = Vec::with_capacity(s.n_layer + 3);
    let mut embed = UnitBuilder::new();
    let pad = if s.tied {
        s.padded_vocab() - s.vocab_size
    } else {
        0
    };
    embed.add(
        "model.embed_tokens.weight".into(),
        &[s.vocab_size, c],
        normal,
        pad,
    );
    units.push(embed.build("embed".into()));
    let mut layout = LayerLayout::default();
    for l in 0..s.n_layer {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let mut u = UnitBuilder::new();
        let mut lay = LayerLayout {
            attn_norm: u.add(p("input_layernorm.weight"), &[c], Init::Ones, 0),
            ..LayerLayout::default()
        };
        let qkv = [
            ("q_proj", s.n_head * hd),
            ("k_proj", s.n_kv_head * hd),
            ("v_proj", s.n_kv_head * hd),
        ];
        let named = |suffix: &str| -> Vec<(String, usize)> {
            qkv.iter()
                .map(|(n, rows)| (p(&format!("self_attn.{n}.{suffix}")), *rows))
                .collect()
        };
        lay.qkv_weight = u.add_stacked(&named("weight"), Some(c), normal);
        if s.qkv_bias {
            lay.qkv_bias = Some(u.add_stacked(&named("bias"), None, Init::Zeros));
        }
        if s.qk_norm {
            lay.q_norm = Some(u.add(p("self_attn.q_norm.weight"), &[hd], Init::Ones, 0));
            lay.k_norm = Some(u.add(p("self_attn.k_norm.weight"), &[hd], Init::Ones, 0));
        }
        lay.o_weight = u.add(p("self_attn.o_proj.weight"), &[c, s.n_head * hd], normal, 0);
        if s.o_bias {
            lay.o_bias = Some(u.add(p("self_attn.o_proj.bias"), &[c], Init::Zeros, 0));
        }
        lay.mlp_norm = u.add(p("post_attention_layernorm.weight"), &[c], Init::Ones, 0);
        let gate_up = |suffix: &str| -> Vec<(String, usize)> {
            ["gate_proj", "up_proj"]
                .iter()
                .map(|n| (p(&format!("mlp.{n}.{suffix}")), i))
                .collect()
        };
        lay.gate_up_weight = u.add_stacked(&gate_up("weight"), Some(c), normal);
        if s.mlp_bias {
            lay.gate_up_bias = Some(u.add_stacked(&gate_up("bias"), None, Init::Zeros));
        }
        lay.down_weight = u.add(p("mlp.down_proj.weight"), &[c, i], normal, 0);
        if s.mlp_bias {
            lay.down_bias = Some(u.add(p("mlp.down_proj.bias"), &[c], Init::Zeros, 0));
        }
        units.push(u.build(format!("layers.{l}")));
        layout = lay;
    }
    let mut norm = UnitBuilder::new();
    norm.add("model.norm.weight".into(), &[c], Init::Ones, 0);
    units.push(norm.build("norm".into()));
    if !s.tied {
        let mut head = UnitBuilder::new();
        let pad = s.padded_vocab() - s.vocab_size;
        head.add("lm_head.weight".into(), &[s.vocab_size, c], normal, pad);
        units.push(head.build("lm_head".into()));
    }
    (units, layout)
}

/// Workspaces allocated by `prepare`.
struct Workspaces {
    shape: Prepare,
    /// One per block, or one shared by all blocks with checkpointing.
    blocks: Vec<Block>,
    scratch: BlockScratch,
    head: Head,
    /// The rotary tables (T, HD/2) f32 of positions `tables_at..`, once copied to the device.
    cos: Buf,
    sin: Buf,
    tables_at: Option<usize>,
}

pub struct Llama {
    shape: LlamaShape,
    units: Vec<UnitSpec>,
    stages: Vec<StageSpec>,
    layout: LayerLayout,
    /// The rotary tables for `max_seq_len` positions on the host (the source of the device's).
    cos: Vec<f32>,
    sin: Vec<f32>,
    ws: Option<Workspaces>,
}

impl Llama {
    pub fn new(shape: LlamaShape) -> Llama {
        let (units, layout) = build_units(&shape);
        let l = shape.n_layer;
        let mut stages = vec![StageSpec {
            name: "embed".into(),
            units: vec![0],
        }];
        stages.extend((0..l).map(|i| StageSpec {
            name: format!("layers.{i}"),
            units: vec![1 + i],
        }));
        let head_matrix = if shape.tied { 0 } else { l + 2 };
        stages.push(StageSpec {
            name: "head".into(),
            units: vec![l + 1, head_matrix],
        });
        let freq = rope::inv_freq(shape.head_dim, shape.rope_theta, shape.rope);
        let (cos, sin) = rope::tables(&freq, shape.max_seq_len);
        Llama {
            shape,
            units,
            stages,
            layout,
            cos,
            sin,
            ws: None,
        }
    }

    pub fn shape(&self) -> &LlamaShape {
        &self.shape
    }

    /// The workspaces, checked against the micro-batch; with `dev`, the rotary tables of the
    /// positions `pos..pos + T` on the device (copied on the compute queue when they hold other
    /// positions, from this model's host tables, which live as long as it does).
    fn workspaces(
        &mut self,
        dev: Option<&dyn Device>,
        tokens: Option<&Tokens>,
        pos: usize,
    ) -> Result<&mut Workspaces, DeviceError> {
        let ws = self
            .ws
            .as_mut()
            .ok_or_else(|| DeviceError::op("llama", "prepare() first"))?;
        let (b, t) = (ws.shape.b, ws.shape.t);
        if let Some(tokens) = tokens.filter(|tk| (tk.b, tk.t) != (b, t)) {
            return Err(DeviceError::op(
                "llama",
                format!(
                    "micro-batch {}x{} differs from the prepared {b}x{t}",
                    tokens.b, tokens.t
                ),
            ));
        }
        if let Some(dev) = dev.filter(|_| ws.tables_at != Some(pos)) {
            let n = ws.cos.len();
            let rows = pos * self.shape.head_dim / 2..pos * self.shape.head_dim / 2 + n;
            for (dst, src) in [(&ws.cos, &self.cos), (&ws.sin, &self.sin)] {
                let src = src.get(rows.clone()).ok_or_else(|| {
                    DeviceError::op(
                        "llama",
                        format!(
                            "{t} positions from {pos} exceed the model's {}",
                            self.shape.max_seq_len
                        ),
                    )
                })?;
                // SAFETY: the source is this model's host table, never written after `new` and
                // dropped only with the model, after the engine has drained the device's queues.
                unsafe { dev.copy_h2d(Queue::Compute, dst, bytemuck::cast_slice(src))? };
            }
            ws.tables_at = Some(pos);
        }
        Ok(ws)
    }

    fn layer_views(&self, unit: &Buf) -> Result<LayerViews, DeviceError> {
        LayerViews::new(unit, &self.layout)
    }

    /// Forward of a stage other than the head, over the whole sequence (training) or, with a
    /// cache, over new tokens at positions `cache.len()..`.
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
        let pos = cache.map_or(0, KvCache::len);
        if stage == 0 {
            let wte = params[0].slice(0, self.units[0].numel())?;
            self.workspaces(None, Some(tokens), pos)?;
            return dev.run(EncoderForward {
                out: output,
                tokens: &tokens.inputs,
                wte: &wte,
                wpe: None,
                b: tokens.b,
                t: tokens.t,
                c: self.shape.n_embd,
            });
        }
        let layer = cache.map(|c| c.layer(stage - 1)).transpose()?;
        let weights = self.layer_views(&params[0])?;
        let ws = self.workspaces(Some(dev), Some(tokens), pos)?;
        let i = if ws.shape.checkpointing { 0 } else { stage - 1 };
        let rope = (&ws.cos, &ws.sin);
        ws.blocks[i].forward(dev, &ws.scratch, &weights, rope, input, output, layer)
    }
}

impl Model for Llama {
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
            "Llama-family decoder {} layers × {} wide ({} heads, {} key/value heads of {}, MLP {}{}), vocabulary {}",
            s.n_layer,
            s.n_embd,
            s.n_head,
            s.n_kv_head,
            s.head_dim,
            s.intermediate_size,
            if s.tied { ", tied head" } else { "" },
            s.vocab_size
        )
    }

    fn tied_names(&self) -> Vec<(String, String)> {
        if self.shape.tied {
            vec![("lm_head.weight".into(), "model.embed_tokens.weight".into())]
        } else {
            Vec::new()
        }
    }

    fn activation_len(&self, b: usize, t: usize) -> usize {
        b * t * self.shape.n_embd
    }

    fn prepare(&mut self, arena: &Arena, p: Prepare) -> Result<(), DeviceError> {
        let s = self.shape;
        if p.t > s.max_seq_len {
            return Err(DeviceError::op(
                "llama prepare",
                format!(
                    "sequence length {} exceeds the model's {}",
                    p.t, s.max_seq_len
                ),
            ));
        }
        let count = if p.checkpointing { 1 } else { s.n_layer };
        let blocks = (0..count)
            .map(|_| Block::new(arena, &s, &p))
            .collect::<Result<_, _>>()?;
        let half = p.t * s.head_dim / 2;
        self.ws = Some(Workspaces {
            shape: p,
            blocks,
            scratch: BlockScratch::new(arena, &s, &p)?,
            head: Head::new(arena, &s, &p)?,
            cos: arena.alloc("rotary tables", DType::F32, half)?,
            sin: arena.alloc("rotary tables", DType::F32, half)?,
            tables_at: None,
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
        let ws = self.workspaces(None, Some(tokens), 0)?;
        ws.head.run(
            dev,
            &shape,
            params,
            tokens,
            input,
            losses,
            grads.as_ref(),
            &ws.scratch,
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
        if stage == 0 {
            let dwte = grads[0].slice(0, self.units[0].numel())?;
            self.workspaces(None, Some(tokens), 0)?;
            return dev.run(EncoderBackward {
                dwte: &dwte,
                dwpe: None,
                dout: dres,
                tokens: &tokens.inputs,
                b: tokens.b,
                t: tokens.t,
                c: self.shape.n_embd,
            });
        }
        let weights = self.layer_views(&params[0])?;
        let dweights = self.layer_views(&grads[0])?;
        let ws = self.workspaces(Some(dev), Some(tokens), 0)?;
        let block = &ws.blocks[if ws.shape.checkpointing { 0 } else { stage - 1 }];
        let rope = (&ws.cos, &ws.sin);
        block.backward(dev, &ws.scratch, &weights, &dweights, rope, input, dres)
    }

    fn logits_chunk(
        &mut self,
        dev: &dyn Device,
        params: &[Buf],
        input: &Buf,
        row0: usize,
    ) -> Result<(Buf, usize, usize), DeviceError> {
        let shape = self.shape;
        let ws = self.workspaces(None, None, 0)?;
        ws.head.logits(dev, &shape, params, input, row0)
    }

    fn cache_heads(&self) -> Option<CacheHeads> {
        Some(CacheHeads {
            layers: self.shape.n_layer,
            nkv: self.shape.n_kv_head,
            hs: self.shape.head_dim,
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
        // 6 per parameter in a GEMM (an untied embedding is only looked up), and the two
        // attention products: 12·L·(NH·HD)·T.
        let embed_lookup = if s.tied { 0 } else { s.vocab_size * s.n_embd };
        let matmul_params = self.num_params() - embed_lookup;
        6.0 * matmul_params as f64 + 12.0 * (s.n_layer * s.q_width() * t) as f64
    }
}
