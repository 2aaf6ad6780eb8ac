//! The head: final LayerNorm, LM head tied to the token embedding, softmax cross-entropy.
//!
//! Logits are computed in chunks of rows and each chunk's backward runs at once, so the
//! (B·T × Vp) logits never exist in full, on either backend (for GPT-2 124M at B·T = 4096 they
//! would take 823 MB in f32, for GPT 1.3B at B·T = 8192 824 MB in bf16).

use super::Gpt2Shape;
use crate::backend::{Arena, Buf, DType, Device, DeviceError, GradMode, Queue};
use crate::model::{Prepare, Tokens};

/// Bytes of logits held at once.
const LOGITS_CHUNK_BYTES: usize = 256 << 20;
/// Chunks of more rows than this are rounded up to a multiple of it (GEMM-friendly sizes).
const ROW_ALIGN: usize = 64;

/// Rows per chunk for `rows` rows of `vp` logits of `elem_bytes` each: the chunks are of equal
/// size, at most about `LOGITS_CHUNK_BYTES`.
fn rows_per_chunk(rows: usize, vp: usize, elem_bytes: usize) -> usize {
    let max_rows = (LOGITS_CHUNK_BYTES / (vp * elem_bytes).max(1)).max(1);
    let chunks = rows.div_ceil(max_rows).max(1);
    let even = rows.div_ceil(chunks);
    if even > ROW_ALIGN {
        even.next_multiple_of(ROW_ALIGN).min(rows)
    } else {
        even
    }
}

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
        dev.layernorm_forward(
            &self.lnf,
            &self.lnf_mean,
            &self.lnf_rstd,
            input,
            &p.lnf[0],
            &p.lnf[1],
            self.rows,
            s.n_embd,
        )
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
        dev.matmul_forward(&logits, &lnf, wte, None, rows, c, vp)?;
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
            dev.crossentropy_forward_backward(
                &logits,
                &losses.slice(r0, rows)?,
                &tokens.targets.slice(r0, rows)?,
                rows,
                v,
                vp,
                dloss_token,
            )?;
            if let Some(g) = grads {
                // dlnf = dlogits · wte ; dwte += dlogitsᵀ · lnf
                dev.matmul_backward(
                    &dlnf.slice(r0 * c, rows * c)?,
                    GradMode::Overwrite,
                    &g.dwte,
                    None,
                    &logits,
                    &lnf,
                    p.wte,
                    rows,
                    c,
                    vp,
                )?;
            }
        }
        let Some(g) = grads else {
            return Ok(());
        };
        dev.memset(Queue::Compute, &g.dres, 0)?;
        dev.layernorm_backward(
            &g.dres,
            &g.dlnf[0],
            &g.dlnf[1],
            dlnf,
            input,
            &p.lnf[0],
            &self.lnf_mean,
            &self.lnf_rstd,
            bt,
            c,
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_even_bounded_and_cover_every_row() {
        // GPT 1.3B on a GPU: 8192 rows of 50304 bf16 logits → four chunks of 2048 rows.
        assert_eq!(rows_per_chunk(8192, 50304, 2), 2048);
        // GPT-2 124M on the CPU: 4096 rows of 50304 f32 → four chunks of 1024.
        assert_eq!(rows_per_chunk(4096, 50304, 4), 1024);
        // Small vocabularies fit in one chunk.
        assert_eq!(rows_per_chunk(1024, 256, 4), 1024);
        for (rows, vp) in [(1000, 50304), (7, 1 << 30), (4097, 50304)] {
            let r = rows_per_chunk(rows, vp, 4);
            assert!(r >= 1 && r <= rows);
            assert!(r * vp * 4 <= LOGITS_CHUNK_BYTES + ROW_ALIGN * vp * 4 || r == 1);
        }
    }
}
