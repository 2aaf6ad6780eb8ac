//! The layer operations of the device seam: one descriptor per operation, its operands by name.
//!
//! A model builds a descriptor and hands it to [`Device::run`](super::Device): the operands are
//! checked here, once for every backend (element type, size, live memory of this device, no
//! output overlapping another operand unless the operation allows it), and only a checked
//! operation ([`Checked`]) reaches a backend's [`Device::launch`](super::Device::launch), which
//! matches on it and enqueues its kernel on the compute queue. A new operation is a descriptor
//! here, a CPU kernel and a CUDA kernel, and one match arm in each backend.
//!
//! Conventions (llm.c's): `X` is the device's compute type; parameter gradients are f32 and
//! accumulate (`+=`); activation gradients follow [`GradMode`] where an operation has one, and
//! accumulate where it says so; sizes are explicit and shapes are row-major.

use super::arena::{Buf, Location};
use super::attention::{attention_modes_differ, AttentionActs, AttentionScratch, AttentionShape};
use super::device::{ensure, DType, DeviceError, GradMode, Result};

/// out (B,T,C) X = `wte[tokens]` (+ `wpe[t]` when given); tokens (B,T) i32, wte (V,C) X, wpe (≥T,C) X.
#[derive(Clone, Copy, Debug)]
pub struct EncoderForward<'a> {
    pub out: &'a Buf,
    pub tokens: &'a Buf,
    pub wte: &'a Buf,
    pub wpe: Option<&'a Buf>,
    pub b: usize,
    pub t: usize,
    pub c: usize,
}

/// dwte (V,C) f32 += dout scattered by token; dwpe (≥T,C) f32 += dout summed over the batch.
#[derive(Clone, Copy, Debug)]
pub struct EncoderBackward<'a> {
    pub dwte: &'a Buf,
    pub dwpe: Option<&'a Buf>,
    pub dout: &'a Buf,
    pub tokens: &'a Buf,
    pub b: usize,
    pub t: usize,
    pub c: usize,
}

/// out (N,C) X, mean (N) f32, rstd (N) f32 = LayerNorm(inp (N,C) X; weight, bias (C) X), eps 1e-5.
#[derive(Clone, Copy, Debug)]
pub struct LayerNormForward<'a> {
    pub out: &'a Buf,
    pub mean: &'a Buf,
    pub rstd: &'a Buf,
    pub inp: &'a Buf,
    pub weight: &'a Buf,
    pub bias: &'a Buf,
    pub n: usize,
    pub c: usize,
}

/// dinp (N,C) X +=, dweight (C) f32 +=, dbias (C) f32 += the LayerNorm backward of dout (N,C) X.
#[derive(Clone, Copy, Debug)]
pub struct LayerNormBackward<'a> {
    pub dinp: &'a Buf,
    pub dweight: &'a Buf,
    pub dbias: &'a Buf,
    pub dout: &'a Buf,
    pub inp: &'a Buf,
    pub weight: &'a Buf,
    pub mean: &'a Buf,
    pub rstd: &'a Buf,
    pub n: usize,
    pub c: usize,
}

/// Where the rows of a row-wise operation lie in its buffers: `n` rows of `c` elements, in groups
/// of `group` consecutive rows whose starts are `stride` elements apart. Dense rows are one row
/// per group, `stride = c`; Qwen3's per-head norm of the query heads of a packed qkv is NH rows
/// per token, a token's qkv width apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    pub n: usize,
    pub c: usize,
    pub group: usize,
    pub stride: usize,
}

impl Rows {
    pub fn dense(n: usize, c: usize) -> Rows {
        Rows {
            n,
            c,
            group: 1,
            stride: c,
        }
    }

    /// Offset of the first element of row `r`.
    pub fn offset(&self, r: usize) -> usize {
        (r / self.group) * self.stride + (r % self.group) * self.c
    }

    /// One past the last element of the last row: the least length of the buffers.
    pub fn extent(&self) -> usize {
        match self.n {
            0 => 0,
            n => self.offset(n - 1) + self.c,
        }
    }

    fn check(&self, op: &'static str) -> Result<()> {
        ensure(
            self.c > 0 && self.group > 0 && self.stride >= self.group * self.c,
            op,
            || format!("rows {self:?}: a group of rows must fit in its stride"),
        )
    }
}

/// out = weight ⊙ inp · rstd with rstd (N) f32 = 1/√(mean(inp²) + eps) per row (RMSNorm, as
/// transformers' LlamaRMSNorm computes it); inp, out X and weight (C) X laid out as `rows`.
/// Elements of `out` outside the rows are left as they are.
#[derive(Clone, Copy, Debug)]
pub struct RmsNormForward<'a> {
    pub out: &'a Buf,
    pub rstd: &'a Buf,
    pub inp: &'a Buf,
    pub weight: &'a Buf,
    pub rows: Rows,
    pub eps: f32,
}

/// dinp X = or += (per `dinp_mode`) and dweight (C) f32 += the RMSNorm backward of dout, from the
/// forward's inp and rstd; dinp, dout, inp laid out as `rows`.
#[derive(Clone, Copy, Debug)]
pub struct RmsNormBackward<'a> {
    pub dinp: &'a Buf,
    pub dinp_mode: GradMode,
    pub dweight: &'a Buf,
    pub dout: &'a Buf,
    pub inp: &'a Buf,
    pub weight: &'a Buf,
    pub rstd: &'a Buf,
    pub rows: Rows,
}

/// out (N,OC) X = inp (N,C) X · weight (OC,C) Xᵀ + bias (OC) X.
#[derive(Clone, Copy, Debug)]
pub struct MatmulForward<'a> {
    pub out: &'a Buf,
    pub inp: &'a Buf,
    pub weight: &'a Buf,
    pub bias: Option<&'a Buf>,
    pub n: usize,
    pub c: usize,
    pub oc: usize,
}

/// dinp (N,C) X = or += dout · weight (per `dinp_mode`); dweight (OC,C) f32 += doutᵀ · inp;
/// dbias (OC) f32 += the column sums of dout (N,OC) X.
#[derive(Clone, Copy, Debug)]
pub struct MatmulBackward<'a> {
    pub dinp: &'a Buf,
    pub dinp_mode: GradMode,
    pub dweight: &'a Buf,
    pub dbias: Option<&'a Buf>,
    pub dout: &'a Buf,
    pub inp: &'a Buf,
    pub weight: &'a Buf,
    pub n: usize,
    pub c: usize,
    pub oc: usize,
}

/// out (B,T,NH·HS) X = causal self-attention of qkv (B,T,(NH+2·NKV)·HS) X (layout in
/// `backend::attention`), scores scaled by 1/√HS; fills `acts`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionForward<'a> {
    pub out: &'a Buf,
    pub acts: &'a AttentionActs,
    pub qkv: &'a Buf,
    pub shape: AttentionShape,
}

/// dqkv X += the attention backward of dout (B,T,NH·HS) X; `scratch` is overwritten. `qkv` and
/// `out` are the forward's input and output, unchanged since (the fused mode recomputes the
/// scores from them; the materialized mode reads only `acts`).
#[derive(Clone, Copy, Debug)]
pub struct AttentionBackward<'a> {
    pub dqkv: &'a Buf,
    pub dout: &'a Buf,
    pub qkv: &'a Buf,
    pub out: &'a Buf,
    pub acts: &'a AttentionActs,
    pub scratch: &'a AttentionScratch,
    pub shape: AttentionShape,
}

/// Rotary position embedding in place on the query and key heads of qkv (B,T,(NH+2·NKV)·HS) X,
/// in transformers' "rotate half" convention: for position t and i < HS/2,
/// `x[i] ← x[i]·cos[t,i] − x[i+HS/2]·sin[t,i]` and `x[i+HS/2] ← x[i+HS/2]·cos[t,i] + x[i]·sin[t,i]`;
/// value heads are left alone. `inverse` rotates by −angle (the backward: the rotation is
/// orthogonal, so its gradient is the inverse rotation of the gradient). cos, sin (≥T, HS/2) f32.
#[derive(Clone, Copy, Debug)]
pub struct Rotary<'a> {
    pub qkv: &'a Buf,
    pub cos: &'a Buf,
    pub sin: &'a Buf,
    pub shape: AttentionShape,
    pub inverse: bool,
}

/// Decoding's key/value cache write: rows `pos..pos+T` of each (sequence, key/value head) of
/// k_cache and v_cache (B,NKV,CAP,HS) X become the key and value heads of the T new tokens of
/// qkv (B,T,(NH+2·NKV)·HS) X (`shape.t` = T); the other rows are left as they are.
#[derive(Clone, Copy, Debug)]
pub struct KvCacheWrite<'a> {
    pub k_cache: &'a Buf,
    pub v_cache: &'a Buf,
    pub qkv: &'a Buf,
    pub shape: AttentionShape,
    pub pos: usize,
    pub capacity: usize,
}

/// Decoding's attention: out (B,T,NH·HS) X = for the query heads of the T new tokens of qkv
/// (positions `pos..pos+T`), softmax(q·kᵀ/√HS)·v over the cache rows `0..=pos+i` of k_cache and
/// v_cache (B,NKV,CAP,HS) X (causal within the new tokens; query head h reads key/value head
/// h / (NH/NKV)). The cache holds the new tokens' keys and values already ([`KvCacheWrite`]).
#[derive(Clone, Copy, Debug)]
pub struct CachedAttention<'a> {
    pub out: &'a Buf,
    pub qkv: &'a Buf,
    pub k_cache: &'a Buf,
    pub v_cache: &'a Buf,
    pub shape: AttentionShape,
    pub pos: usize,
    pub capacity: usize,
}

/// out (N) X = gelu(inp (N) X), tanh form; out may be inp.
#[derive(Clone, Copy, Debug)]
pub struct GeluForward<'a> {
    pub out: &'a Buf,
    pub inp: &'a Buf,
}

/// dinp (N) X = or += gelu'(inp) · dout.
#[derive(Clone, Copy, Debug)]
pub struct GeluBackward<'a> {
    pub dinp: &'a Buf,
    pub dinp_mode: GradMode,
    pub inp: &'a Buf,
    pub dout: &'a Buf,
}

/// out (N,I) X = silu(gate) ⊙ up, where each row of inp (N,2I) X is [gate (I) | up (I)]
/// (SwiGLU: the rows of `gate_proj` and `up_proj` stacked make one GEMM).
#[derive(Clone, Copy, Debug)]
pub struct SwigluForward<'a> {
    pub out: &'a Buf,
    pub inp: &'a Buf,
    pub n: usize,
    pub i: usize,
}

/// dinp (N,2I) X = the SwiGLU backward of dout (N,I) X at inp (N,2I) X (overwritten).
#[derive(Clone, Copy, Debug)]
pub struct SwigluBackward<'a> {
    pub dinp: &'a Buf,
    pub dout: &'a Buf,
    pub inp: &'a Buf,
    pub n: usize,
    pub i: usize,
}

/// out (N) X = a + b; out may be a or b.
#[derive(Clone, Copy, Debug)]
pub struct ResidualForward<'a> {
    pub out: &'a Buf,
    pub a: &'a Buf,
    pub b: &'a Buf,
}

/// dst (N) X += src (N) X.
#[derive(Clone, Copy, Debug)]
pub struct Accumulate<'a> {
    pub dst: &'a Buf,
    pub src: &'a Buf,
}

/// Fused softmax + cross-entropy over logits (R,Vp) X with the real vocabulary V ≤ Vp:
/// losses (R) f32 = `−log p[target]`; targets (R) i32. A negative target is ignored (PyTorch's
/// `ignore_index`): its loss is 0 and, with `dloss`, its row of the gradient is 0. With
/// `dloss = Some(d)` the logits are overwritten with dlogits = (p − onehot)·d (0 in the padding).
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropy<'a> {
    pub logits: &'a Buf,
    pub losses: &'a Buf,
    pub targets: &'a Buf,
    pub r: usize,
    pub v: usize,
    pub vp: usize,
    pub dloss: Option<f32>,
}

/// The element type an operand must have.
#[derive(Clone, Copy, Debug)]
enum Ty {
    /// The device's compute type.
    X,
    F32,
    I32,
}

/// The declared operands of one operation, checked as they are declared; `finish` checks that
/// they are live memory of the device and that no output overlaps another operand.
struct Operands<'o> {
    op: &'static str,
    x: DType,
    outputs: Vec<&'o Buf>,
    inputs: Vec<&'o Buf>,
}

impl<'o> Operands<'o> {
    fn declare(
        &mut self,
        output: bool,
        name: &str,
        buf: &'o Buf,
        ty: Ty,
        numel: usize,
        at_least: bool,
    ) -> Result<()> {
        let dtype = match ty {
            Ty::X => self.x,
            Ty::F32 => DType::F32,
            Ty::I32 => DType::I32,
        };
        let size_ok = if at_least {
            buf.len() >= numel
        } else {
            buf.len() == numel
        };
        ensure(buf.dtype() == dtype && size_ok, self.op, || {
            format!(
                "{name} must be {}{numel} x {}, got {} x {}",
                if at_least { "at least " } else { "" },
                dtype.name(),
                buf.len(),
                buf.dtype().name()
            )
        })?;
        if output {
            self.outputs.push(buf);
        } else {
            self.inputs.push(buf);
        }
        Ok(())
    }

    fn output(&mut self, name: &str, buf: &'o Buf, ty: Ty, numel: usize) -> Result<()> {
        self.declare(true, name, buf, ty, numel, false)
    }

    fn input(&mut self, name: &str, buf: &'o Buf, ty: Ty, numel: usize) -> Result<()> {
        self.declare(false, name, buf, ty, numel, false)
    }

    fn output_min(&mut self, name: &str, buf: &'o Buf, ty: Ty, numel: usize) -> Result<()> {
        self.declare(true, name, buf, ty, numel, true)
    }

    fn input_min(&mut self, name: &str, buf: &'o Buf, ty: Ty, numel: usize) -> Result<()> {
        self.declare(false, name, buf, ty, numel, true)
    }

    fn finish(self, location: Location) -> Result<()> {
        for buf in self.outputs.iter().chain(&self.inputs) {
            buf.check_live(self.op, location)?;
        }
        for (i, out) in self.outputs.iter().enumerate() {
            let clash = self
                .inputs
                .iter()
                .chain(&self.outputs[i + 1..])
                .find(|b| out.overlaps(b));
            if let Some(other) = clash {
                return Err(DeviceError::op(
                    self.op,
                    format!("{out:?} overlaps {other:?}; outputs must not alias other operands"),
                ));
            }
        }
        Ok(())
    }
}

impl EncoderForward<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let (b, t, c) = (self.b, self.t, self.c);
        o.output("out", self.out, Ty::X, b * t * c)?;
        o.input("tokens", self.tokens, Ty::I32, b * t)?;
        o.input_min("wte", self.wte, Ty::X, c)?;
        ensure(c > 0 && self.wte.len() % c == 0, o.op, || {
            "wte is not (V,C)".into()
        })?;
        if let Some(wpe) = self.wpe {
            o.input_min("wpe", wpe, Ty::X, t * c)?;
        }
        Ok(())
    }
}

impl EncoderBackward<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let (b, t, c) = (self.b, self.t, self.c);
        o.output_min("dwte", self.dwte, Ty::F32, c)?;
        ensure(c > 0 && self.dwte.len() % c == 0, o.op, || {
            "dwte is not (V,C)".into()
        })?;
        if let Some(dwpe) = self.dwpe {
            o.output_min("dwpe", dwpe, Ty::F32, t * c)?;
        }
        o.input("dout", self.dout, Ty::X, b * t * c)?;
        o.input("tokens", self.tokens, Ty::I32, b * t)
    }
}

impl LayerNormForward<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let (n, c) = (self.n, self.c);
        o.output("out", self.out, Ty::X, n * c)?;
        o.output("mean", self.mean, Ty::F32, n)?;
        o.output("rstd", self.rstd, Ty::F32, n)?;
        o.input("inp", self.inp, Ty::X, n * c)?;
        o.input("weight", self.weight, Ty::X, c)?;
        o.input("bias", self.bias, Ty::X, c)
    }
}

impl LayerNormBackward<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let (n, c) = (self.n, self.c);
        o.output("dinp", self.dinp, Ty::X, n * c)?;
        o.output("dweight", self.dweight, Ty::F32, c)?;
        o.output("dbias", self.dbias, Ty::F32, c)?;
        o.input("dout", self.dout, Ty::X, n * c)?;
        o.input("inp", self.inp, Ty::X, n * c)?;
        o.input("weight", self.weight, Ty::X, c)?;
        o.input("mean", self.mean, Ty::F32, n)?;
        o.input("rstd", self.rstd, Ty::F32, n)
    }
}

impl RmsNormForward<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let r = self.rows;
        r.check(o.op)?;
        ensure(self.eps.is_finite() && self.eps >= 0.0, o.op, || {
            format!("eps {} must be a finite number >= 0", self.eps)
        })?;
        o.output_min("out", self.out, Ty::X, r.extent())?;
        o.output("rstd", self.rstd, Ty::F32, r.n)?;
        o.input_min("inp", self.inp, Ty::X, r.extent())?;
        o.input("weight", self.weight, Ty::X, r.c)
    }
}

impl RmsNormBackward<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let r = self.rows;
        r.check(o.op)?;
        o.output_min("dinp", self.dinp, Ty::X, r.extent())?;
        o.output("dweight", self.dweight, Ty::F32, r.c)?;
        o.input_min("dout", self.dout, Ty::X, r.extent())?;
        o.input_min("inp", self.inp, Ty::X, r.extent())?;
        o.input("weight", self.weight, Ty::X, r.c)?;
        o.input("rstd", self.rstd, Ty::F32, r.n)
    }
}

impl MatmulForward<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let (n, c, oc) = (self.n, self.c, self.oc);
        o.output("out", self.out, Ty::X, n * oc)?;
        o.input("inp", self.inp, Ty::X, n * c)?;
        o.input("weight", self.weight, Ty::X, oc * c)?;
        if let Some(bias) = self.bias {
            o.input("bias", bias, Ty::X, oc)?;
        }
        Ok(())
    }
}

impl MatmulBackward<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let (n, c, oc) = (self.n, self.c, self.oc);
        o.output("dinp", self.dinp, Ty::X, n * c)?;
        o.output("dweight", self.dweight, Ty::F32, oc * c)?;
        if let Some(dbias) = self.dbias {
            o.output("dbias", dbias, Ty::F32, oc)?;
        }
        o.input("dout", self.dout, Ty::X, n * oc)?;
        o.input("inp", self.inp, Ty::X, n * c)?;
        o.input("weight", self.weight, Ty::X, oc * c)
    }
}

impl AttentionForward<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let s = &self.shape;
        s.check(o.op)?;
        o.output("out", self.out, Ty::X, s.out_len())?;
        match self.acts {
            AttentionActs::Materialized { qkvr, att, vaccum } => {
                o.output("acts.qkvr", qkvr, Ty::X, s.qkvr_len())?;
                o.output("acts.att", att, Ty::X, s.scores_len())?;
                o.output("acts.vaccum", vaccum, Ty::X, s.out_len())?;
            }
            AttentionActs::Fused { lse } => o.output("acts.lse", lse, Ty::F32, s.rows_len())?,
        }
        o.input("qkv", self.qkv, Ty::X, s.qkv_len())
    }
}

impl AttentionBackward<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let s = &self.shape;
        s.check(o.op)?;
        o.output("dqkv", self.dqkv, Ty::X, s.qkv_len())?;
        o.input("dout", self.dout, Ty::X, s.out_len())?;
        match (self.acts, self.scratch) {
            (
                AttentionActs::Materialized { qkvr, att, .. },
                AttentionScratch::Materialized {
                    dqkvr,
                    datt,
                    dvaccum,
                },
            ) => {
                o.output("scratch.dqkvr", dqkvr, Ty::X, s.qkvr_len())?;
                o.output("scratch.datt", datt, Ty::X, s.scores_len())?;
                o.output("scratch.dvaccum", dvaccum, Ty::X, s.out_len())?;
                o.input("acts.qkvr", qkvr, Ty::X, s.qkvr_len())?;
                o.input("acts.att", att, Ty::X, s.scores_len())
            }
            (AttentionActs::Fused { lse }, AttentionScratch::Fused { delta }) => {
                o.output("scratch.delta", delta, Ty::F32, s.rows_len())?;
                o.input("qkv", self.qkv, Ty::X, s.qkv_len())?;
                o.input("out", self.out, Ty::X, s.out_len())?;
                o.input("acts.lse", lse, Ty::F32, s.rows_len())
            }
            (acts, scratch) => Err(attention_modes_differ(o.op, acts, scratch)),
        }
    }
}

impl Rotary<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let s = &self.shape;
        s.check(o.op)?;
        ensure(s.hs % 2 == 0, o.op, || {
            format!("head size {} must be even", s.hs)
        })?;
        o.output("qkv", self.qkv, Ty::X, s.qkv_len())?;
        o.input_min("cos", self.cos, Ty::F32, s.t * s.hs / 2)?;
        o.input_min("sin", self.sin, Ty::F32, s.t * s.hs / 2)
    }
}

/// Checks a cache's span: T new tokens at `pos` fit in `capacity` rows; the cache's length.
fn cache_len(op: &'static str, s: &AttentionShape, pos: usize, capacity: usize) -> Result<usize> {
    s.check(op)?;
    ensure(
        pos.checked_add(s.t).is_some_and(|end| end <= capacity),
        op,
        || {
            format!(
                "{} new tokens at position {pos} exceed the cache's {capacity} rows",
                s.t
            )
        },
    )?;
    Ok(s.b * s.nkv * capacity * s.hs)
}

impl KvCacheWrite<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let s = &self.shape;
        let len = cache_len(o.op, s, self.pos, self.capacity)?;
        o.output("k_cache", self.k_cache, Ty::X, len)?;
        o.output("v_cache", self.v_cache, Ty::X, len)?;
        o.input("qkv", self.qkv, Ty::X, s.qkv_len())
    }
}

impl CachedAttention<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let s = &self.shape;
        let len = cache_len(o.op, s, self.pos, self.capacity)?;
        o.output("out", self.out, Ty::X, s.out_len())?;
        o.input("qkv", self.qkv, Ty::X, s.qkv_len())?;
        o.input("k_cache", self.k_cache, Ty::X, len)?;
        o.input("v_cache", self.v_cache, Ty::X, len)
    }
}

impl GeluForward<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let n = self.inp.len();
        o.output("out", self.out, Ty::X, n)?;
        if self.out.same_range(self.inp) {
            // In place: the one buffer is the output.
            return Ok(());
        }
        o.input("inp", self.inp, Ty::X, n)
    }
}

impl GeluBackward<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let n = self.inp.len();
        o.output("dinp", self.dinp, Ty::X, n)?;
        o.input("inp", self.inp, Ty::X, n)?;
        o.input("dout", self.dout, Ty::X, n)
    }
}

impl SwigluForward<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        o.output("out", self.out, Ty::X, self.n * self.i)?;
        o.input("inp", self.inp, Ty::X, 2 * self.n * self.i)
    }
}

impl SwigluBackward<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        o.output("dinp", self.dinp, Ty::X, 2 * self.n * self.i)?;
        o.input("dout", self.dout, Ty::X, self.n * self.i)?;
        o.input("inp", self.inp, Ty::X, 2 * self.n * self.i)
    }
}

impl ResidualForward<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let n = self.out.len();
        o.output("out", self.out, Ty::X, n)?;
        // out may be a or b: then it is also that input.
        for (name, input) in [("a", self.a), ("b", self.b)] {
            if self.out.same_range(input) {
                ensure(input.dtype() == self.out.dtype(), o.op, || {
                    format!("{name} must have out's type")
                })?;
            } else {
                o.input(name, input, Ty::X, n)?;
            }
        }
        Ok(())
    }
}

impl Accumulate<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        o.output("dst", self.dst, Ty::X, self.src.len())?;
        o.input("src", self.src, Ty::X, self.dst.len())
    }
}

impl CrossEntropy<'_> {
    fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
        let (r, v, vp) = (self.r, self.v, self.vp);
        ensure(v > 0 && v <= vp, o.op, || {
            format!("need 0 < V <= Vp, got V={v} Vp={vp}")
        })?;
        o.output("logits", self.logits, Ty::X, r * vp)?;
        o.output("losses", self.losses, Ty::F32, r)?;
        o.input("targets", self.targets, Ty::I32, r)
    }
}

/// Declares every operation: the [`Op`] variant of each descriptor, its name (the profile's and
/// the errors'), its conversion into [`Op`] and its operand check.
macro_rules! operations {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// One layer operation, as handed to [`Device::run`](super::Device).
        #[derive(Clone, Copy, Debug)]
        pub enum Op<'a> {
            $($variant($variant<'a>),)*
        }

        impl Op<'_> {
            /// The operation's name, as profiles and errors give it.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Op::$variant(_) => $name,)*
                }
            }

            fn operands<'o>(&'o self, o: &mut Operands<'o>) -> Result<()> {
                match self {
                    $(Op::$variant(d) => d.operands(o),)*
                }
            }
        }

        $(impl<'a> From<$variant<'a>> for Op<'a> {
            fn from(d: $variant<'a>) -> Op<'a> {
                Op::$variant(d)
            }
        })*
    };
}

operations! {
    EncoderForward => "encoder_forward",
    EncoderBackward => "encoder_backward",
    LayerNormForward => "layernorm_forward",
    LayerNormBackward => "layernorm_backward",
    RmsNormForward => "rmsnorm_forward",
    RmsNormBackward => "rmsnorm_backward",
    MatmulForward => "matmul_forward",
    MatmulBackward => "matmul_backward",
    AttentionForward => "attention_forward",
    AttentionBackward => "attention_backward",
    Rotary => "rotary",
    KvCacheWrite => "kv_cache_write",
    CachedAttention => "cached_attention",
    GeluForward => "gelu_forward",
    GeluBackward => "gelu_backward",
    SwigluForward => "swiglu_forward",
    SwigluBackward => "swiglu_backward",
    ResidualForward => "residual_forward",
    Accumulate => "accumulate",
    CrossEntropy => "crossentropy_forward_backward",
}

/// An operation whose operands passed [`Op::check`]: of the right types and sizes, live memory
/// of the device, outputs disjoint from every other operand (where the operation does not allow
/// otherwise). Only `check` makes one, so a backend's `launch` may rely on it.
#[derive(Clone, Copy, Debug)]
pub struct Checked<'a>(Op<'a>);

impl<'a> Checked<'a> {
    pub fn op(&self) -> &Op<'a> {
        &self.0
    }
}

impl<'a> Op<'a> {
    /// Checks the operands for a device computing in `x` whose memory is at `location`.
    pub fn check(self, x: DType, location: Location) -> Result<Checked<'a>> {
        let mut o = Operands {
            op: self.name(),
            x,
            outputs: Vec::new(),
            inputs: Vec::new(),
        };
        self.operands(&mut o)?;
        o.finish(location)?;
        Ok(Checked(self))
    }
}
