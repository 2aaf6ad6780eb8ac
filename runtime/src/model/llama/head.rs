//! The head: final RMSNorm, the LM head (its own matrix, or the token embedding when tied),
//! softmax cross-entropy; logits in chunks of rows as GPT-2's head computes them.

use super::block::BlockScratch;
use super::LlamaShape;
use crate::backend::{
    Arena, Buf, CrossEntropy, DType, Device, DeviceError, GradMode, MatmulBackward, MatmulForward,
    RmsNormBackward, RmsNormForward, Rows,
};
use crate::model::logits::rows_per_chunk;
use crate::model::{HeadGrads, Prepare, Tokens};

pub(super) struct Head {
    normed: Buf, // (B,T,C) X
    rstd: Buf,   // (B,T) f32
    logits: Buf, // (rows_per_chunk, Vp) X; dlogits in place
    rows_per_chunk: usize,
    rows: usize,
}

/// The head's parameters (or their gradients): the final norm's weight (C) and the LM head's
/// matrix (Vp, C), from the stage's two units.
fn views(s: &LlamaShape, units: &[Buf]) -> Result<(Buf, Buf), DeviceError> {
    let c = s.n_embd;
    Ok((
        units[0].slice(0, c)?,
        units[1].slice(0, s.padded_vocab() * c)?,
    ))
}

impl Head {
    pub(super) fn new(arena: &Arena, s: &LlamaShape, p: &Prepare) -> Result<Head, DeviceError> {
        let (bt, c, vp) = (p.b * p.t, s.n_embd, s.padded_vocab());
        let rows_per_chunk = rows_per_chunk(bt, vp, p.x.size_bytes());
        Ok(Head {
            normed: arena.alloc("head activations", p.x, bt * c)?,
            rstd: arena.alloc("head activations", DType::F32, bt)?,
            logits: arena.alloc("logits chunk", p.x, rows_per_chunk * vp)?,
            rows_per_chunk,
            rows: bt,
        })
    }

    fn norm(
        &self,
        dev: &dyn Device,
        s: &LlamaShape,
        weight: &Buf,
        input: &Buf,
    ) -> Result<(), DeviceError> {
        dev.run(RmsNormForward {
            out: &self.normed,
            rstd: &self.rstd,
            inp: input,
            weight,
            rows: Rows::dense(self.rows, s.n_embd),
            eps: s.rms_norm_eps,
        })
    }

    /// Logits of rows [r0, r0 + rows) into the logits buffer; returns its view and the normed
    /// rows.
    fn chunk_logits(
        &self,
        dev: &dyn Device,
        s: &LlamaShape,
        matrix: &Buf,
        r0: usize,
        rows: usize,
    ) -> Result<(Buf, Buf), DeviceError> {
        let (c, vp) = (s.n_embd, s.padded_vocab());
        let logits = self.logits.slice(0, rows * vp)?;
        let normed = self.normed.slice(r0 * c, rows * c)?;
        dev.run(MatmulForward {
            out: &logits,
            inp: &normed,
            weight: matrix,
            bias: None,
            n: rows,
            c,
            oc: vp,
        })?;
        Ok((logits, normed))
    }

    /// Each token's loss into `losses`; with `grads`, accumulates ∂L/∂(norm, LM head) and
    /// writes ∂L/∂input to `grads.dres`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        &self,
        dev: &dyn Device,
        s: &LlamaShape,
        params: &[Buf],
        tokens: &Tokens,
        input: &Buf,
        losses: &Buf,
        grads: Option<&HeadGrads<'_>>,
        scratch: &BlockScratch,
    ) -> Result<(), DeviceError> {
        let (c, v, vp, bt) = (s.n_embd, s.vocab_size, s.padded_vocab(), self.rows);
        let (norm_weight, matrix) = views(s, params)?;
        let dviews = grads.map(|g| views(s, g.grads)).transpose()?;
        self.norm(dev, s, &norm_weight, input)?;
        let dloss_token = grads.map(|g| g.dloss / bt as f32);
        let dnormed = &scratch.dnorm;
        for r0 in (0..bt).step_by(self.rows_per_chunk) {
            let rows = self.rows_per_chunk.min(bt - r0);
            let (logits, normed) = self.chunk_logits(dev, s, &matrix, r0, rows)?;
            dev.run(CrossEntropy {
                logits: &logits,
                losses: &losses.slice(r0, rows)?,
                targets: &tokens.targets.slice(r0, rows)?,
                r: rows,
                v,
                vp,
                dloss: dloss_token,
            })?;
            if let Some((_, dmatrix)) = &dviews {
                // dnormed = dlogits · W ; dW += dlogitsᵀ · normed
                dev.run(MatmulBackward {
                    dinp: &dnormed.slice(r0 * c, rows * c)?,
                    dinp_mode: GradMode::Overwrite,
                    dweight: dmatrix,
                    dbias: None,
                    dout: &logits,
                    inp: &normed,
                    weight: &matrix,
                    n: rows,
                    c,
                    oc: vp,
                })?;
            }
        }
        let (Some(g), Some((dnorm_weight, _))) = (grads, dviews) else {
            return Ok(());
        };
        dev.run(RmsNormBackward {
            dinp: g.dres,
            dinp_mode: GradMode::Overwrite,
            dweight: &dnorm_weight,
            dout: dnormed,
            inp: input,
            weight: &norm_weight,
            rstd: &self.rstd,
            rows: Rows::dense(bt, c),
        })
    }

    /// Logits of the chunk starting at `row0`: (view, rows, Vp).
    pub(super) fn logits(
        &self,
        dev: &dyn Device,
        s: &LlamaShape,
        params: &[Buf],
        input: &Buf,
        row0: usize,
    ) -> Result<(Buf, usize, usize), DeviceError> {
        if row0 >= self.rows {
            return Err(DeviceError::op(
                "logits_chunk",
                format!("row {row0} of {}", self.rows),
            ));
        }
        let (norm_weight, matrix) = views(s, params)?;
        self.norm(dev, s, &norm_weight, input)?;
        let rows = self.rows_per_chunk.min(self.rows - row0);
        let (logits, _) = self.chunk_logits(dev, s, &matrix, row0, rows)?;
        Ok((logits, rows, s.padded_vocab()))
    }
}
