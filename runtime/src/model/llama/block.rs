//! One decoder layer: x → h = x + o_proj(attention(rotary(qkv(rmsnorm(x))))) →
//! h + down_proj(swiglu(gate_up(rmsnorm(h)))), forward and backward, as a sequence of device
//! operations on the compute queue.

use super::{LayerLayout, LlamaShape};
use crate::backend::{
    Arena, AttentionActs, AttentionBackward, AttentionScratch, AttentionShape, Buf, DType, Device,
    DeviceError, GradMode, MatmulBackward, MatmulForward, Queue, ResidualForward, RmsNormBackward,
    RmsNormForward, Rotary, Rows, SwigluBackward, SwigluForward,
};
use crate::model::decode::{attend, LayerCache};
use crate::model::Prepare;
use std::ops::Range;

/// Views of a layer unit's tensors (weights or their gradients), each group of stacked
/// projections as one matrix.
pub(super) struct LayerViews {
    attn_norm: Buf,
    qkv_weight: Buf,
    qkv_bias: Option<Buf>,
    q_norm: Option<Buf>,
    k_norm: Option<Buf>,
    o_weight: Buf,
    o_bias: Option<Buf>,
    mlp_norm: Buf,
    gate_up_weight: Buf,
    gate_up_bias: Option<Buf>,
    down_weight: Buf,
    down_bias: Option<Buf>,
}

impl LayerViews {
    pub(super) fn new(unit: &Buf, l: &LayerLayout) -> Result<LayerViews, DeviceError> {
        let view = |r: &Range<usize>| unit.slice(r.start, r.len());
        let optional = |r: &Option<Range<usize>>| r.as_ref().map(view).transpose();
        Ok(LayerViews {
            attn_norm: view(&l.attn_norm)?,
            qkv_weight: view(&l.qkv_weight)?,
            qkv_bias: optional(&l.qkv_bias)?,
            q_norm: optional(&l.q_norm)?,
            k_norm: optional(&l.k_norm)?,
            o_weight: view(&l.o_weight)?,
            o_bias: optional(&l.o_bias)?,
            mlp_norm: view(&l.mlp_norm)?,
            gate_up_weight: view(&l.gate_up_weight)?,
            gate_up_bias: optional(&l.gate_up_bias)?,
            down_weight: view(&l.down_weight)?,
            down_bias: optional(&l.down_bias)?,
        })
    }
}

/// The per-head q/k norms' activations (Qwen3): the projection's output before the norms and
/// each norm's row statistics.
struct QkNormActs {
    qkv_raw: Buf, // (B,T,QKV) X
    q_rstd: Buf,  // (B·T·NH) f32
    k_rstd: Buf,  // (B·T·NKV) f32
}

/// What a layer's forward keeps for its backward.
pub(super) struct Block {
    attn_norm: Buf,      // (B,T,C) X
    attn_norm_rstd: Buf, // (B,T) f32
    qkv: Buf,            // (B,T,QKV) X: normed (Qwen3) and rotated q, k; v
    qk_norm: Option<QkNormActs>,
    atty: Buf, // (B,T,NH·HD) X
    attention: AttentionActs,
    residual2: Buf,     // (B,T,C) X
    mlp_norm: Buf,      // (B,T,C) X
    mlp_norm_rstd: Buf, // (B,T) f32
    gate_up: Buf,       // (B,T,2I) X
    act: Buf,           // (B,T,I) X
    shape: AttentionShape,
    c: usize,
    i: usize,
    eps: f32,
}

/// Buffers used only transiently, shared by all layers (and the head).
pub(super) struct BlockScratch {
    proj_out: Buf, // (B,T,C) X, each projection before its residual add
    /// ∂L/∂(a norm's output) (B,T,C) X; also the head's ∂L/∂(final norm's output).
    pub(super) dnorm: Buf,
    datty: Buf,            // (B,T,NH·HD) X
    dqkv: Buf,             // (B,T,QKV) X
    dqkv_raw: Option<Buf>, // (B,T,QKV) X, with q/k norms
    dgate_up: Buf,         // (B,T,2I) X
    dact: Buf,             // (B,T,I) X
    attention: AttentionScratch,
}

const ACTS: &str = "block activations";
const SCRATCH: &str = "block scratch";

fn attention_shape(s: &LlamaShape, p: &Prepare) -> AttentionShape {
    AttentionShape {
        b: p.b,
        t: p.t,
        nh: s.n_head,
        nkv: s.n_kv_head,
        hs: s.head_dim,
    }
}

/// The rows of the query heads (`part` 0) or key heads (1) inside a packed qkv of `n` tokens,
/// and the offset of the first.
fn head_rows(s: &AttentionShape, part: usize) -> (usize, Rows) {
    let (offset, heads) = match part {
        0 => (0, s.nh),
        _ => (s.nh * s.hs, s.nkv),
    };
    let rows = Rows {
        n: s.b * s.t * heads,
        c: s.hs,
        group: heads,
        stride: s.qkv_width(),
    };
    (offset, rows)
}

impl Block {
    pub(super) fn new(arena: &Arena, s: &LlamaShape, p: &Prepare) -> Result<Block, DeviceError> {
        let (bt, c, x) = (p.b * p.t, s.n_embd, p.x);
        let shape = attention_shape(s, p);
        let qk_norm = if s.qk_norm {
            Some(QkNormActs {
                qkv_raw: arena.alloc(ACTS, x, shape.qkv_len())?,
                q_rstd: arena.alloc(ACTS, DType::F32, bt * s.n_head)?,
                k_rstd: arena.alloc(ACTS, DType::F32, bt * s.n_kv_head)?,
            })
        } else {
            None
        };
        Ok(Block {
            attn_norm: arena.alloc(ACTS, x, bt * c)?,
            attn_norm_rstd: arena.alloc(ACTS, DType::F32, bt)?,
            qkv: arena.alloc(ACTS, x, shape.qkv_len())?,
            qk_norm,
            atty: arena.alloc(ACTS, x, shape.out_len())?,
            attention: AttentionActs::alloc(arena, p.attention, &shape, x)?,
            residual2: arena.alloc(ACTS, x, bt * c)?,
            mlp_norm: arena.alloc(ACTS, x, bt * c)?,
            mlp_norm_rstd: arena.alloc(ACTS, DType::F32, bt)?,
            gate_up: arena.alloc(ACTS, x, bt * 2 * s.intermediate_size)?,
            act: arena.alloc(ACTS, x, bt * s.intermediate_size)?,
            shape,
            c,
            i: s.intermediate_size,
            eps: s.rms_norm_eps,
        })
    }

    fn n(&self) -> usize {
        self.shape.b * self.shape.t
    }

    /// output = h + mlp(rmsnorm(h)), h = input + attention(rmsnorm(input)); with a cache, the
    /// attention of the new tokens over the cached positions (`cos`, `sin` are the new
    /// tokens' rows).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &self,
        dev: &dyn Device,
        sc: &BlockScratch,
        w: &LayerViews,
        (cos, sin): (&Buf, &Buf),
        input: &Buf,
        output: &Buf,
        cache: Option<LayerCache<'_>>,
    ) -> Result<(), DeviceError> {
        let (n, c, s) = (self.n(), self.c, self.shape);
        dev.run(RmsNormForward {
            out: &self.attn_norm,
            rstd: &self.attn_norm_rstd,
            inp: input,
            weight: &w.attn_norm,
            rows: Rows::dense(n, c),
            eps: self.eps,
        })?;
        let projected = self.qk_norm.as_ref().map_or(&self.qkv, |q| &q.qkv_raw);
        dev.run(MatmulForward {
            out: projected,
            inp: &self.attn_norm,
            weight: &w.qkv_weight,
            bias: w.qkv_bias.as_ref(),
            n,
            c,
            oc: s.qkv_width(),
        })?;
        if let (Some(q), Some(q_norm), Some(k_norm)) = (&self.qk_norm, &w.q_norm, &w.k_norm) {
            // v as projected; q and k normed per head into qkv.
            dev.copy_d2d(Queue::Compute, &self.qkv, &q.qkv_raw)?;
            for (part, weight, rstd) in [(0, q_norm, &q.q_rstd), (1, k_norm, &q.k_rstd)] {
                let (at, rows) = head_rows(&s, part);
                let len = s.qkv_len() - at;
                dev.run(RmsNormForward {
                    out: &self.qkv.slice(at, len)?,
                    rstd,
                    inp: &q.qkv_raw.slice(at, len)?,
                    weight,
                    rows,
                    eps: self.eps,
                })?;
            }
        }
        dev.run(Rotary {
            qkv: &self.qkv,
            cos,
            sin,
            shape: s,
            inverse: false,
        })?;
        attend(dev, &self.atty, &self.attention, &self.qkv, s, cache)?;
        dev.run(MatmulForward {
            out: &sc.proj_out,
            inp: &self.atty,
            weight: &w.o_weight,
            bias: w.o_bias.as_ref(),
            n,
            c: s.q_width(),
            oc: c,
        })?;
        dev.run(ResidualForward {
            out: &self.residual2,
            a: input,
            b: &sc.proj_out,
        })?;
        dev.run(RmsNormForward {
            out: &self.mlp_norm,
            rstd: &self.mlp_norm_rstd,
            inp: &self.residual2,
            weight: &w.mlp_norm,
            rows: Rows::dense(n, c),
            eps: self.eps,
        })?;
        dev.run(MatmulForward {
            out: &self.gate_up,
            inp: &self.mlp_norm,
            weight: &w.gate_up_weight,
            bias: w.gate_up_bias.as_ref(),
            n,
            c,
            oc: 2 * self.i,
        })?;
        dev.run(SwigluForward {
            out: &self.act,
            inp: &self.gate_up,
            n,
            i: self.i,
        })?;
        dev.run(MatmulForward {
            out: &sc.proj_out,
            inp: &self.act,
            weight: &w.down_weight,
            bias: w.down_bias.as_ref(),
            n,
            c: self.i,
            oc: c,
        })?;
        dev.run(ResidualForward {
            out: output,
            a: &self.residual2,
            b: &sc.proj_out,
        })
    }

    /// Accumulates the layer's weight gradients into `dw`; `dres` goes from ∂L/∂output to
    /// ∂L/∂input in place (the residual path carries it; each norm's backward adds to it).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &self,
        dev: &dyn Device,
        sc: &BlockScratch,
        w: &LayerViews,
        dw: &LayerViews,
        (cos, sin): (&Buf, &Buf),
        input: &Buf,
        dres: &Buf,
    ) -> Result<(), DeviceError> {
        let (n, c, s) = (self.n(), self.c, self.shape);
        // MLP: out = residual2 + down(swiglu(gate_up(rmsnorm(residual2)))).
        dev.run(MatmulBackward {
            dinp: &sc.dact,
            dinp_mode: GradMode::Overwrite,
            dweight: &dw.down_weight,
            dbias: dw.down_bias.as_ref(),
            dout: dres,
            inp: &self.act,
            weight: &w.down_weight,
            n,
            c: self.i,
            oc: c,
        })?;
        dev.run(SwigluBackward {
            dinp: &sc.dgate_up,
            dout: &sc.dact,
            inp: &self.gate_up,
            n,
            i: self.i,
        })?;
        dev.run(MatmulBackward {
            dinp: &sc.dnorm,
            dinp_mode: GradMode::Overwrite,
            dweight: &dw.gate_up_weight,
            dbias: dw.gate_up_bias.as_ref(),
            dout: &sc.dgate_up,
            inp: &self.mlp_norm,
            weight: &w.gate_up_weight,
            n,
            c,
            oc: 2 * self.i,
        })?;
        // dres += the norm's backward: now ∂L/∂residual2.
        dev.run(RmsNormBackward {
            dinp: dres,
            dinp_mode: GradMode::Accumulate,
            dweight: &dw.mlp_norm,
            dout: &sc.dnorm,
            inp: &self.residual2,
            weight: &w.mlp_norm,
            rstd: &self.mlp_norm_rstd,
            rows: Rows::dense(n, c),
        })?;
        // Attention: residual2 = input + o_proj(attention(rotary(qkv(rmsnorm(input))))).
        dev.run(MatmulBackward {
            dinp: &sc.datty,
            dinp_mode: GradMode::Overwrite,
            dweight: &dw.o_weight,
            dbias: dw.o_bias.as_ref(),
            dout: dres,
            inp: &self.atty,
            weight: &w.o_weight,
            n,
            c: s.q_width(),
            oc: c,
        })?;
        dev.memset(Queue::Compute, &sc.dqkv, 0)?;
        dev.run(AttentionBackward {
            dqkv: &sc.dqkv,
            dout: &sc.datty,
            qkv: &self.qkv,
            out: &self.atty,
            acts: &self.attention,
            scratch: &sc.attention,
            shape: s,
        })?;
        dev.run(Rotary {
            qkv: &sc.dqkv,
            cos,
            sin,
            shape: s,
            inverse: true,
        })?;
        let dprojected = match (&self.qk_norm, &sc.dqkv_raw) {
            (Some(q), Some(dqkv_raw)) => {
                let (Some(q_norm), Some(k_norm), Some(dq_norm), Some(dk_norm)) =
                    (&w.q_norm, &w.k_norm, &dw.q_norm, &dw.k_norm)
                else {
                    return Err(DeviceError::op("llama", "q/k norm weights missing"));
                };
                // v's gradient as it is; q's and k's through their norms.
                dev.copy_d2d(Queue::Compute, dqkv_raw, &sc.dqkv)?;
                for (part, weight, dweight, rstd) in [
                    (0, q_norm, dq_norm, &q.q_rstd),
                    (1, k_norm, dk_norm, &q.k_rstd),
                ] {
                    let (at, rows) = head_rows(&s, part);
                    let len = s.qkv_len() - at;
                    dev.run(RmsNormBackward {
                        dinp: &dqkv_raw.slice(at, len)?,
                        dinp_mode: GradMode::Overwrite,
                        dweight,
                        dout: &sc.dqkv.slice(at, len)?,
                        inp: &q.qkv_raw.slice(at, len)?,
                        weight,
                        rstd,
                        rows,
                    })?;
                }
                dqkv_raw
            }
            _ => &sc.dqkv,
        };
        dev.run(MatmulBackward {
            dinp: &sc.dnorm,
            dinp_mode: GradMode::Overwrite,
            dweight: &dw.qkv_weight,
            dbias: dw.qkv_bias.as_ref(),
            dout: dprojected,
            inp: &self.attn_norm,
            weight: &w.qkv_weight,
            n,
            c,
            oc: s.qkv_width(),
        })?;
        // dres += the norm's backward: now ∂L/∂input.
        dev.run(RmsNormBackward {
            dinp: dres,
            dinp_mode: GradMode::Accumulate,
            dweight: &dw.attn_norm,
            dout: &sc.dnorm,
            inp: input,
            weight: &w.attn_norm,
            rstd: &self.attn_norm_rstd,
            rows: Rows::dense(n, c),
        })
    }
}

impl BlockScratch {
    pub(super) fn new(
        arena: &Arena,
        s: &LlamaShape,
        p: &Prepare,
    ) -> Result<BlockScratch, DeviceError> {
        let (bt, c, x) = (p.b * p.t, s.n_embd, p.x);
        let shape = attention_shape(s, p);
        Ok(BlockScratch {
            proj_out: arena.alloc(SCRATCH, x, bt * c)?,
            dnorm: arena.alloc(SCRATCH, x, bt * c)?,
            datty: arena.alloc(SCRATCH, x, shape.out_len())?,
            dqkv: arena.alloc(SCRATCH, x, shape.qkv_len())?,
            dqkv_raw: if s.qk_norm {
                Some(arena.alloc(SCRATCH, x, shape.qkv_len())?)
            } else {
                None
            },
            dgate_up: arena.alloc(SCRATCH, x, bt * 2 * s.intermediate_size)?,
            dact: arena.alloc(SCRATCH, x, bt * s.intermediate_size)?,
            attention: AttentionScratch::alloc(arena, p.attention, &shape, x)?,
        })
    }
}
