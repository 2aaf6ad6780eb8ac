//! The head: final LayerNorm, LM head tied to the token embedding, softmax cross-entropy.
//!
//! Logits are computed in chunks of rows and each chunk's backward runs at once, so the
//! (B·T × Vp) logits never exist in full, on either backend (for GPT-2 124M at B·T = 4096 they
//! would take 823 MB in f32, for GPT 1.3B at B·T = 8192 824 MB in bf16).

use super::Gpt2Shape;
use crate::backend::{
    Arena, Buf, CrossEntropy, DType, Device, DeviceError, GradMode, LayerNormBackward,
    LayerNormForward, MatmulBackward, MatmulForward, Queue,
};
use crate::model::logits::rows_per_chunk;
use crate::model::{Prepare, Tokens};

/// Parameters the head reads: ln_f's weight and bias, the (padded) token embedding.
pub(super) struct HeadParams<'a> {
    pub lnf: &'a [Buf],
    pub wte: &'a Buf,
}

/// Gradient views of the head's backward.
pub(super) struct HeadGradViews {
    /// ln_f's weight and bias gradients (f32).
    pub dlnf: Vec<Buf>,
    /// The padded token embedding's gradient (Vp, C) f32.
    pub dwte: Buf,
    /// ∂L/∂input (X), overwritten.
    pub dres: Buf,
    /// ∂L/∂(mean token loss of the micro-batch).
    pub dloss: f32,
}

pub(super) struct Head {
    lnf: Buf,      // (B,T,C) X
    lnf_mean: Buf, // (B,T) f32
    lnf_rstd: Buf, // (B,T) f32
    logits: Buf,   // (rows_per_chunk, Vp) X; dlogits in place
    rows_per_chunk: usize,
    rows: usize,
}

impl Head {
    pub(super) fn new(arena: &Arena, s: &Gpt2Shape, p: &Prepare) -> Result<Head, DeviceError> {
        let (bt, c, vp) = (p.b * p.t, s.n_embd, s.padded_vocab());
        let rows_per_chunk = rows_per_chunk(bt, vp, p.x.size_bytes());
        Ok(Head {
            lnf: arena.alloc("head activations", p.x, bt * c)?,
            lnf_mean: arena.alloc("head activations", DType::F32, bt)?,
            lnf_rstd: arena.alloc("head activations", DType::F32, bt)?,
            logits: arena.alloc("logits chunk", p.x, rows_per_chunk * vp)?,
            rows_per_chunk,
            rows: bt,
        })
    }

    fn layernorm(
        &self,
        dev: &dyn Device,
        s: &Gpt2Shape,
        p: &HeadParams<'_>,
        input: &Buf,
    ) -> Result<(), DeviceError> {
        dev.run(LayerNormForward {
            out: &self.lnf,
            mean: &self.lnf_mean,
            rstd: &self.lnf_rstd,
            inp: input,
            weight: &p.lnf[0],
            bias: &p.lnf[1],
            n: self.rows,
            c: s.n_embd,
        })
    }

    /// Logits of rows [r0, r0 + rows) into the logits buffer; returns its view.
    fn chunk_logits(
        &self,
        dev: &dyn Device,
        s: &Gpt2Shape,
        wte: &Buf,
        r0: usize,
        rows: usize,
    ) -> Result<(Buf, Buf), DeviceError> {
        let (c, vp) = (s.n_embd, s.padded_vocab());
        let logits = self.logits.slice(0, rows * vp)?;
        let lnf = self.lnf.slice(r0 * c, rows * c)?;
        dev.run(MatmulForward {
            out: &logits,
            inp: &lnf,
            weight: wte,
            bias: None,
            n: rows,
            c,
            oc: vp,
        })?;
        Ok((logits, lnf))
    }

    /// Each token's loss into `losses`; with `grads`, accumulates ∂L/∂(ln_f, wte) and writes
    /// ∂L/∂input to `grads.dres`. `dlnf` is (B,T,C) X scratch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        &self,
        dev: &dyn Device,
        s: &Gpt2Shape,
        p: &HeadParams<'_>,
        tokens: &Tokens,
        input: &Buf,
        losses: &Buf,
        grads: Option<&HeadGradViews>,
        dlnf: &Buf,
    ) -> Result<(), DeviceError> {
        let (c, v, vp, bt) = (s.n_embd, s.vocab_size, s.padded_vocab(), self.rows);
        self.layernorm(dev, s, p, input)?;
        let dloss_token = grads.map(|g| g.dloss / bt as f32);
        for r0 in (0..bt).step_by(self.rows_per_chunk) {
            let rows = self.rows_per_chunk.min(bt - r0);
            let (logits, lnf) = self.chunk_logits(dev, s, p.wte, r0, rows)?;
            dev.run(CrossEntropy {
                logits: &logits,
                losses: &losses.slice(r0, rows)?,
                targets: &tokens.targets.slice(r0, rows)?,
                r: rows,
                v,
                vp,
                dloss: dloss_token,
            })?;
            if let Some(g) = grads {
                // dlnf = dlogits · wte ; dwte += dlogitsᵀ · lnf
                dev.run(MatmulBackward {
                    dinp: &dlnf.slice(r0 * c, rows * c)?,
                    dinp_mode: GradMode::Overwrite,
                    dweight: &g.dwte,
                    dbias: None,
                    dout: &logits,
                    inp: &lnf,
                    weight: p.wte,
                    n: rows,
                    c,
                    oc: vp,
                })?;
            }
        }
        let Some(g) = grads else {
            return Ok(());
        };
        dev.memset(Queue::Compute, &g.dres, 0)?;
        dev.run(LayerNormBackward {
            dinp: &g.dres,
            dweight: &g.dlnf[0],
            dbias: &g.dlnf[1],
            dout: dlnf,
            inp: input,
            weight: &p.lnf[0],
            mean: &self.lnf_mean,
            rstd: &self.lnf_rstd,
            n: bt,
            c,
        })
    }

    /// Logits of the chunk starting at `row0`: (view, rows, Vp).
    pub(super) fn logits(
        &self,
        dev: &dyn Device,
        s: &Gpt2Shape,
        p: &HeadParams<'_>,
        input: &Buf,
        row0: usize,
    ) -> Result<(Buf, usize, usize), DeviceError> {
        if row0 >= self.rows {
            return Err(DeviceError::op(
                "logits_chunk",
                format!("row {row0} of {}", self.rows),
            ));
        }
        self.layernorm(dev, s, p, input)?;
        let rows = self.rows_per_chunk.min(self.rows - row0);
        let (logits, _) = self.chunk_logits(dev, s, p.wte, row0, rows)?;
        Ok((logits, rows, s.padded_vocab()))
    }
}
