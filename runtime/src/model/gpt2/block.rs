//! One transformer block: x → x + attn(ln_1(x)) → … + mlp(ln_2(…)), forward and backward, as a
//! sequence of device operations on the compute queue (in order, so no event is needed inside).

use super::Gpt2Shape;
use crate::backend::{
    Arena, AttentionActs, AttentionBackward, AttentionScratch, AttentionShape, Buf, DType, Device,
    DeviceError, GeluBackward, GeluForward, GradMode, LayerNormBackward, LayerNormForward,
    MatmulBackward, MatmulForward, Queue, ResidualForward,
};
use crate::model::decode::{attend, LayerCache};
use crate::model::Prepare;

/// Index of each tensor in a block unit (the order of `build_units`).
const LN1_W: usize = 0;
const LN1_B: usize = 1;
const QKV_W: usize = 2;
const QKV_B: usize = 3;
const ATTPROJ_W: usize = 4;
const ATTPROJ_B: usize = 5;
const LN2_W: usize = 6;
const LN2_B: usize = 7;
const FC_W: usize = 8;
const FC_B: usize = 9;
const FCPROJ_W: usize = 10;
const FCPROJ_B: usize = 11;
/// Tensors per block unit.
const BLOCK_TENSORS: usize = 12;

/// Views of a block unit's twelve tensors (weights or their gradients).
pub(super) fn weights(unit: &Buf, s: &Gpt2Shape) -> Result<[Buf; BLOCK_TENSORS], DeviceError> {
    let c = s.n_embd;
    let lens = [
        c,
        c,
        3 * c * c,
        3 * c,
        c * c,
        c,
        c,
        c,
        4 * c * c,
        4 * c,
        4 * c * c,
        c,
    ];
    let mut offset = 0;
    let mut views = Vec::with_capacity(BLOCK_TENSORS);
    for len in lens {
        views.push(unit.slice(offset, len)?);
        offset += len;
    }
    views
        .try_into()
        .map_err(|_| DeviceError::op("gpt2 block", "twelve tensors"))
}

/// What a block's forward keeps for its backward (llm.c's ActivationTensors, one layer).
pub(super) struct Block {
    ln1: Buf,      // (B,T,C) X
    ln1_mean: Buf, // (B,T) f32
    ln1_rstd: Buf, // (B,T) f32
    qkv: Buf,      // (B,T,3C) X
    atty: Buf,     // (B,T,C) X
    attention: AttentionActs,
    residual2: Buf, // (B,T,C) X
    ln2: Buf,       // (B,T,C) X
    ln2_mean: Buf,  // (B,T) f32
    ln2_rstd: Buf,  // (B,T) f32
    fch: Buf,       // (B,T,4C) X
    fch_gelu: Buf,  // (B,T,4C) X
    shape: AttentionShape,
}

/// Buffers used only transiently, shared by all blocks (and the head's dlnf).
pub(super) struct BlockScratch {
    proj_out: Buf, // (B,T,C) X, each projection before its residual add
    /// ∂L/∂(a LayerNorm output) (B,T,C) X; also the head's ∂L/∂lnf.
    pub(super) dln: Buf,
    datty: Buf,     // (B,T,C) X
    dqkv: Buf,      // (B,T,3C) X
    dfch: Buf,      // (B,T,4C) X
    dfch_gelu: Buf, // (B,T,4C) X
    attention: AttentionScratch,
}

const ACTS: &str = "block activations";
const SCRATCH: &str = "block scratch";

impl Block {
    pub(super) fn new(arena: &Arena, s: &Gpt2Shape, p: &Prepare) -> Result<Block, DeviceError> {
        let (bt, c, x) = (p.b * p.t, s.n_embd, p.x);
        let shape = AttentionShape::multi_head(p.b, p.t, c, s.n_head);
        Ok(Block {
            ln1: arena.alloc(ACTS, x, bt * c)?,
            ln1_mean: arena.alloc(ACTS, DType::F32, bt)?,
            ln1_rstd: arena.alloc(ACTS, DType::F32, bt)?,
            qkv: arena.alloc(ACTS, x, bt * 3 * c)?,
            atty: arena.alloc(ACTS, x, bt * c)?,
            attention: AttentionActs::alloc(arena, p.attention, &shape, x)?,
            residual2: arena.alloc(ACTS, x, bt * c)?,
            ln2: arena.alloc(ACTS, x, bt * c)?,
            ln2_mean: arena.alloc(ACTS, DType::F32, bt)?,
            ln2_rstd: arena.alloc(ACTS, DType::F32, bt)?,
            fch: arena.alloc(ACTS, x, bt * 4 * c)?,
            fch_gelu: arena.alloc(ACTS, x, bt * 4 * c)?,
            shape,
        })
    }

    /// output = input + attn(ln_1(input)) + mlp(ln_2(…)); with a cache, the attention of the
    /// new tokens over the cached positions.
    pub(super) fn forward(
        &self,
        dev: &dyn Device,
        sc: &BlockScratch,
        w: &[Buf; BLOCK_TENSORS],
        input: &Buf,
        output: &Buf,
        cache: Option<LayerCache<'_>>,
    ) -> Result<(), DeviceError> {
        let (n, c) = (self.shape.b * self.shape.t, self.shape.q_width());
        dev.run(LayerNormForward {
            out: &self.ln1,
            mean: &self.ln1_mean,
            rstd: &self.ln1_rstd,
            inp: input,
            weight: &w[LN1_W],
            bias: &w[LN1_B],
            n,
            c,
        })?;
        dev.run(MatmulForward {
            out: &self.qkv,
            inp: &self.ln1,
            weight: &w[QKV_W],
            bias: Some(&w[QKV_B]),
            n,
            c,
            oc: 3 * c,
        })?;
        attend(
            dev,
            &self.atty,
            &self.attention,
            &self.qkv,
            self.shape,
            cache,
        )?;
        dev.run(MatmulForward {
            out: &sc.proj_out,
            inp: &self.atty,
            weight: &w[ATTPROJ_W],
            bias: Some(&w[ATTPROJ_B]),
            n,
            c,
            oc: c,
        })?;
        dev.run(ResidualForward {
            out: &self.residual2,
            a: input,
            b: &sc.proj_out,
        })?;
        dev.run(LayerNormForward {
            out: &self.ln2,
            mean: &self.ln2_mean,
            rstd: &self.ln2_rstd,
            inp: &self.residual2,
            weight: &w[LN2_W],
            bias: &w[LN2_B],
            n,
            c,
        })?;
        dev.run(MatmulForward {
            out: &self.fch,
            inp: &self.ln2,
            weight: &w[FC_W],
            bias: Some(&w[FC_B]),
            n,
            c,
            oc: 4 * c,
        })?;
        dev.run(GeluForward {
            out: &self.fch_gelu,
            inp: &self.fch,
        })?;
        dev.run(MatmulForward {
            out: &sc.proj_out,
            inp: &self.fch_gelu,
            weight: &w[FCPROJ_W],
            bias: Some(&w[FCPROJ_B]),
            n,
            c: 4 * c,
            oc: c,
        })?;
        dev.run(ResidualForward {
            out: output,
            a: &self.residual2,
            b: &sc.proj_out,
        })
    }

    /// Accumulates the block's weight gradients into `dw`; `dres` goes from ∂L/∂output to
    /// ∂L/∂input in place (the residual path carries it; each LayerNorm backward adds to it).
    pub(super) fn backward(
        &self,
        dev: &dyn Device,
        sc: &BlockScratch,
        w: &[Buf; BLOCK_TENSORS],
        dw: &[Buf; BLOCK_TENSORS],
        input: &Buf,
        dres: &Buf,
    ) -> Result<(), DeviceError> {
        let (n, c) = (self.shape.b * self.shape.t, self.shape.q_width());
        // MLP: out = residual2 + fc_proj(gelu(fc(ln_2(residual2)))).
        dev.run(MatmulBackward {
            dinp: &sc.dfch_gelu,
            dinp_mode: GradMode::Overwrite,
            dweight: &dw[FCPROJ_W],
            dbias: Some(&dw[FCPROJ_B]),
            dout: dres,
            inp: &self.fch_gelu,
            weight: &w[FCPROJ_W],
            n,
            c: 4 * c,
            oc: c,
        })?;
        dev.run(GeluBackward {
            dinp: &sc.dfch,
            dinp_mode: GradMode::Overwrite,
            inp: &self.fch,
            dout: &sc.dfch_gelu,
        })?;
        dev.run(MatmulBackward {
            dinp: &sc.dln,
            dinp_mode: GradMode::Overwrite,
            dweight: &dw[FC_W],
            dbias: Some(&dw[FC_B]),
            dout: &sc.dfch,
            inp: &self.ln2,
            weight: &w[FC_W],
            n,
            c,
            oc: 4 * c,
        })?;
        // dres += LayerNorm backward: now ∂L/∂residual2.
        dev.run(LayerNormBackward {
            dinp: dres,
            dweight: &dw[LN2_W],
            dbias: &dw[LN2_B],
            dout: &sc.dln,
            inp: &self.residual2,
            weight: &w[LN2_W],
            mean: &self.ln2_mean,
            rstd: &self.ln2_rstd,
            n,
            c,
        })?;
        // Attention: residual2 = input + attn_proj(attention(qkv(ln_1(input)))).
        dev.run(MatmulBackward {
            dinp: &sc.datty,
            dinp_mode: GradMode::Overwrite,
            dweight: &dw[ATTPROJ_W],
            dbias: Some(&dw[ATTPROJ_B]),
            dout: dres,
            inp: &self.atty,
            weight: &w[ATTPROJ_W],
            n,
            c,
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
            shape: self.shape,
        })?;
        dev.run(MatmulBackward {
            dinp: &sc.dln,
            dinp_mode: GradMode::Overwrite,
            dweight: &dw[QKV_W],
            dbias: Some(&dw[QKV_B]),
            dout: &sc.dqkv,
            inp: &self.ln1,
            weight: &w[QKV_W],
            n,
            c,
            oc: 3 * c,
        })?;
        // dres += LayerNorm backward: now ∂L/∂input.
        dev.run(LayerNormBackward {
            dinp: dres,
            dweight: &dw[LN1_W],
            dbias: &dw[LN1_B],
            dout: &sc.dln,
            inp: input,
            weight: &w[LN1_W],
            mean: &self.ln1_mean,
            rstd: &self.ln1_rstd,
            n,
            c,
        })
    }
}

impl BlockScratch {
    pub(super) fn new(
        arena: &Arena,
        s: &Gpt2Shape,
        p: &Prepare,
    ) -> Result<BlockScratch, DeviceError> {
        let (bt, c, x) = (p.b * p.t, s.n_embd, p.x);
        let shape = AttentionShape::multi_head(p.b, p.t, c, s.n_head);
        Ok(BlockScratch {
            proj_out: arena.alloc(SCRATCH, x, bt * c)?,
            dln: arena.alloc(SCRATCH, x, bt * c)?,
            datty: arena.alloc(SCRATCH, x, bt * c)?,
            dqkv: arena.alloc(SCRATCH, x, bt * 3 * c)?,
            dfch: arena.alloc(SCRATCH, x, bt * 4 * c)?,
            dfch_gelu: arena.alloc(SCRATCH, x, bt * 4 * c)?,
            attention: AttentionScratch::alloc(arena, p.attention, &shape, x)?,
        })
    }
}
