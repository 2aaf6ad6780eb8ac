//! The head: final LayerNorm, LM head tied to the token embedding, softmax cross-entropy.
//!
//! Logits are computed in chunks of rows, and each chunk's backward runs at once, so the (B·T × V) logits
//! never exist in full during training (for GPT-2 124M at B·T = 4096 they would take 823 MB).

use super::{split, split_mut, Gpt2Shape};
use crate::backend::cpu::{self, matmul};
use crate::model::{Batch, HeadGrads};

/// Elements of logits held at once: about 128 MiB of f32.
const LOGITS_CHUNK_ELEMS: usize = 32 << 20;

pub(super) struct HeadWorkspace {
    lnf: Vec<f32>,      // (B, T, C)
    lnf_mean: Vec<f32>, // (B, T)
    lnf_rstd: Vec<f32>, // (B, T)
    dlnf: Vec<f32>,     // (B, T, C)
    logits: Vec<f32>,   // (rows_per_chunk, V)
    losses: Vec<f32>,   // (B, T)
    rows_per_chunk: usize,
}

impl HeadWorkspace {
    pub(super) fn new(s: &Gpt2Shape, b: usize, t: usize) -> HeadWorkspace {
        let (bt, c, v) = (b * t, s.n_embd, s.vocab_size);
        let rows_per_chunk = (LOGITS_CHUNK_ELEMS / v).clamp(1, bt);
        HeadWorkspace {
            lnf: vec![0.0; bt * c],
            lnf_mean: vec![0.0; bt],
            lnf_rstd: vec![0.0; bt],
            dlnf: vec![0.0; bt * c],
            logits: vec![0.0; rows_per_chunk * v],
            losses: vec![0.0; bt],
            rows_per_chunk,
        }
    }

    fn layernorm(&mut self, s: &Gpt2Shape, params: &[&[f32]], input: &[f32]) {
        let c = s.n_embd;
        let lnf = split(params[0], &[c, c]);
        cpu::layernorm_forward(
            &mut self.lnf,
            &mut self.lnf_mean,
            &mut self.lnf_rstd,
            input,
            lnf[0],
            lnf[1],
            c,
        );
    }

    /// Mean loss over the batch; with `grads`, accumulates ∂L/∂(ln_f, wte) and writes ∂L/∂input.
    pub(super) fn run(
        &mut self,
        s: &Gpt2Shape,
        params: &[&[f32]],
        batch: &Batch,
        input: &[f32],
        grads: Option<HeadGrads>,
    ) -> f32 {
        let (c, v) = (s.n_embd, s.vocab_size);
        let bt = batch.tokens();
        self.layernorm(s, params, input);
        let wte = &params[1][..v * c];
        let dloss_token = grads.as_ref().map(|g| g.dloss / bt as f32);
        let mut grads = grads;
        for r0 in (0..bt).step_by(self.rows_per_chunk) {
            let r1 = (r0 + self.rows_per_chunk).min(bt);
            let rows = r1 - r0;
            let logits = &mut self.logits[..rows * v];
            let lnf = &self.lnf[r0 * c..r1 * c];
            cpu::matmul_forward(logits, lnf, wte, None, rows, c, v);
            cpu::softmax_crossentropy(
                logits,
                &batch.targets[r0..r1],
                &mut self.losses[r0..r1],
                dloss_token,
                v,
            );
            if let Some(g) = grads.as_mut() {
                // dlnf = dlogits · wte ; dwte += dlogitsᵀ · lnf
                let dlnf = &mut self.dlnf[r0 * c..r1 * c];
                matmul::gemm(
                    dlnf,
                    matmul::Layout::row_major(rows, c),
                    logits,
                    matmul::Layout::row_major(rows, v),
                    wte,
                    matmul::Layout::row_major(v, c),
                    1.0,
                    false,
                    matmul::Threads::All,
                );
                let dwte = &mut g.grads[1][..v * c];
                matmul::gemm(
                    dwte,
                    matmul::Layout::row_major(v, c),
                    logits,
                    matmul::Layout::row_major(rows, v).t(),
                    lnf,
                    matmul::Layout::row_major(rows, c),
                    1.0,
                    true,
                    matmul::Threads::All,
                );
            }
        }
        if let Some(g) = grads {
            let lnf_params = split(params[0], &[c, c]);
            let dlnf_params = split_mut(g.grads[0], &[c, c]);
            let [dw, db]: [&mut [f32]; 2] = dlnf_params.try_into().expect("two ln_f tensors");
            g.dinput.fill(0.0);
            cpu::layernorm_backward(
                g.dinput,
                dw,
                db,
                &self.dlnf,
                input,
                lnf_params[0],
                &self.lnf_mean,
                &self.lnf_rstd,
                c,
            );
        }
        (self.losses.iter().map(|&x| x as f64).sum::<f64>() / bt as f64) as f32
    }

    /// Full logits (B·T, V), for tests and evaluation.
    pub(super) fn logits(
        &mut self,
        s: &Gpt2Shape,
        params: &[&[f32]],
        input: &[f32],
        b: usize,
        t: usize,
    ) -> Vec<f32> {
        let (c, v) = (s.n_embd, s.vocab_size);
        self.layernorm(s, params, input);
        let mut out = vec![0.0; b * t * v];
        cpu::matmul_forward(&mut out, &self.lnf, &params[1][..v * c], None, b * t, c, v);
        out
    }
}
