//! One transformer block: x → x + attn(ln_1(x)) → … + mlp(ln_2(…)).

use super::{split, split_mut, Gpt2Shape};
use crate::backend::cpu::{self, AttnShape};

/// The lengths of the block's tensors in unit order (see `build_units`).
fn tensor_lens(c: usize) -> [usize; 12] {
    [
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
    ]
}

/// Activations a block's backward pass needs (llm.c's `ActivationTensors` for one layer).
pub(super) struct BlockWorkspace {
    ln1: Vec<f32>,       // (B, T, C)
    ln1_mean: Vec<f32>,  // (B, T)
    ln1_rstd: Vec<f32>,  // (B, T)
    qkv: Vec<f32>,       // (B, T, 3C)
    atty: Vec<f32>,      // (B, T, C)
    att: Vec<f32>,       // (B, NH, T, T)
    residual2: Vec<f32>, // (B, T, C)
    ln2: Vec<f32>,       // (B, T, C)
    ln2_mean: Vec<f32>,  // (B, T)
    ln2_rstd: Vec<f32>,  // (B, T)
    fch: Vec<f32>,       // (B, T, 4C)
    fch_gelu: Vec<f32>,  // (B, T, 4C)
    attn: AttnShape,
}

/// Buffers used only transiently, shared by all blocks.
pub(super) struct BlockScratch {
    y_hm: Vec<f32>,       // (B, NH, T, hs) attention output, head-major
    dresidual2: Vec<f32>, // (B, T, C)
    dln: Vec<f32>,        // (B, T, C)
    datty: Vec<f32>,      // (B, T, C)
    dfch: Vec<f32>,       // (B, T, 4C)
    dfch_gelu: Vec<f32>,  // (B, T, 4C)
    dqkv: Vec<f32>,       // (B, T, 3C)
    datt: Vec<f32>,       // (B, NH, T, T)
    dhm: Vec<f32>,        // (B, NH, 3, T, hs)
    /// Where a recomputed forward writes its (unused) output.
    pub(super) recompute_out: Vec<f32>, // (B, T, C)
}

impl BlockWorkspace {
    pub(super) fn new(s: &Gpt2Shape, b: usize, t: usize) -> BlockWorkspace {
        let (bt, c) = (b * t, s.n_embd);
        let attn = AttnShape {
            b,
            t,
            c,
            n_head: s.n_head,
        };
        BlockWorkspace {
            ln1: vec![0.0; bt * c],
            ln1_mean: vec![0.0; bt],
            ln1_rstd: vec![0.0; bt],
            qkv: vec![0.0; bt * 3 * c],
            atty: vec![0.0; bt * c],
            att: vec![0.0; attn.att_len()],
            residual2: vec![0.0; bt * c],
            ln2: vec![0.0; bt * c],
            ln2_mean: vec![0.0; bt],
            ln2_rstd: vec![0.0; bt],
            fch: vec![0.0; bt * 4 * c],
            fch_gelu: vec![0.0; bt * 4 * c],
            attn,
        }
    }

    pub(super) fn forward(
        &mut self,
        s: &Gpt2Shape,
        sc: &mut BlockScratch,
        params: &[f32],
        input: &[f32],
        output: &mut [f32],
    ) {
        let c = s.n_embd;
        let bt = input.len() / c;
        let p = split(params, &tensor_lens(c));
        cpu::layernorm_forward(
            &mut self.ln1,
            &mut self.ln1_mean,
            &mut self.ln1_rstd,
            input,
            p[0],
            p[1],
            c,
        );
        cpu::matmul_forward(&mut self.qkv, &self.ln1, p[2], Some(p[3]), bt, c, 3 * c);
        cpu::attention_forward(
            &mut self.atty,
            &mut self.att,
            &mut sc.y_hm,
            &self.qkv,
            self.attn,
        );
        // `output` holds each projection before its residual add.
        cpu::matmul_forward(output, &self.atty, p[4], Some(p[5]), bt, c, c);
        cpu::residual_forward(&mut self.residual2, input, output);
        cpu::layernorm_forward(
            &mut self.ln2,
            &mut self.ln2_mean,
            &mut self.ln2_rstd,
            &self.residual2,
            p[6],
            p[7],
            c,
        );
        cpu::matmul_forward(&mut self.fch, &self.ln2, p[8], Some(p[9]), bt, c, 4 * c);
        cpu::gelu_forward(&mut self.fch_gelu, &self.fch);
        cpu::matmul_forward(output, &self.fch_gelu, p[10], Some(p[11]), bt, 4 * c, c);
        cpu::add_into(output, &self.residual2);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &mut self,
        s: &Gpt2Shape,
        sc: &mut BlockScratch,
        params: &[f32],
        grads: &mut [f32],
        input: &[f32],
        dout: &[f32],
        dinput: &mut [f32],
    ) {
        let c = s.n_embd;
        let bt = input.len() / c;
        let p = split(params, &tensor_lens(c));
        let mut g = split_mut(grads, &tensor_lens(c)).into_iter();
        let mut next = || g.next().expect("twelve block tensors");
        let (dln1w, dln1b, dqkvw, dqkvb, dattw, dattb) =
            (next(), next(), next(), next(), next(), next());
        let (dln2w, dln2b, dfcw, dfcb, dprojw, dprojb) =
            (next(), next(), next(), next(), next(), next());

        // MLP: out = residual2 + fc_proj(gelu(fc(ln_2(residual2)))).
        sc.dresidual2.copy_from_slice(dout);
        sc.dfch_gelu.fill(0.0);
        cpu::matmul_backward(
            Some(&mut sc.dfch_gelu),
            dprojw,
            Some(dprojb),
            dout,
            &self.fch_gelu,
            p[10],
            bt,
            4 * c,
            c,
        );
        sc.dfch.fill(0.0);
        cpu::gelu_backward(&mut sc.dfch, &self.fch, &sc.dfch_gelu);
        sc.dln.fill(0.0);
        cpu::matmul_backward(
            Some(&mut sc.dln),
            dfcw,
            Some(dfcb),
            &sc.dfch,
            &self.ln2,
            p[8],
            bt,
            c,
            4 * c,
        );
        cpu::layernorm_backward(
            &mut sc.dresidual2,
            dln2w,
            dln2b,
            &sc.dln,
            &self.residual2,
            p[6],
            &self.ln2_mean,
            &self.ln2_rstd,
            c,
        );
        // Attention: residual2 = input + attn_proj(attention(qkv(ln_1(input)))).
        dinput.copy_from_slice(&sc.dresidual2);
        sc.datty.fill(0.0);
        cpu::matmul_backward(
            Some(&mut sc.datty),
            dattw,
            Some(dattb),
            &sc.dresidual2,
            &self.atty,
            p[4],
            bt,
            c,
            c,
        );
        sc.dqkv.fill(0.0);
        cpu::attention_backward(
            &mut sc.dqkv,
            &mut sc.datt,
            &mut sc.dhm,
            &sc.datty,
            &self.qkv,
            &self.att,
            self.attn,
        );
        sc.dln.fill(0.0);
        cpu::matmul_backward(
            Some(&mut sc.dln),
            dqkvw,
            Some(dqkvb),
            &sc.dqkv,
            &self.ln1,
            p[2],
            bt,
            c,
            3 * c,
        );
        cpu::layernorm_backward(
            dinput,
            dln1w,
            dln1b,
            &sc.dln,
            input,
            p[0],
            &self.ln1_mean,
            &self.ln1_rstd,
            c,
        );
    }
}

impl BlockScratch {
    pub(super) fn new(s: &Gpt2Shape, b: usize, t: usize) -> BlockScratch {
        let (bt, c) = (b * t, s.n_embd);
        let att = AttnShape {
            b,
            t,
            c,
            n_head: s.n_head,
        }
        .att_len();
        BlockScratch {
            y_hm: vec![0.0; bt * c],
            dresidual2: vec![0.0; bt * c],
            dln: vec![0.0; bt * c],
            datty: vec![0.0; bt * c],
            dfch: vec![0.0; bt * 4 * c],
            dfch_gelu: vec![0.0; bt * 4 * c],
            dqkv: vec![0.0; bt * 3 * c],
            datt: vec![0.0; att],
            dhm: vec![0.0; 3 * bt * c],
            recompute_out: vec![0.0; bt * c],
        }
    }
}
