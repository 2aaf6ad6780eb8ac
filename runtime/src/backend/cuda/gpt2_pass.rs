//! GPT-2's forward and backward passes on the GPU: the same sequence of layer functions as the
//! CPU model (model/gpt2/block.rs, head.rs), every launch on the compute queue, in order, so no
//! event is needed inside a pass. Backward launchers accumulate (+=) like the CPU backend, so
//! each scratch gradient is zeroed (memset on the compute queue) right before its first use.

use super::arena::DeviceBuf;
use super::attention::{AttentionActivations, AttentionGradScratch, AttentionShape};
use super::context::{GpuContext, Queue};
use super::error::Result;
use super::gpt2_memory::{Buffers, Dims, LayerActs};
use super::kernels::GradMode;

/// Index of each block tensor in a unit (the order of `build_units` in model/gpt2).
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
pub const BLOCK_TENSORS: usize = 12;

/// Views the passes need: per unit, per tensor, the floatX weights and fp32 gradients.
pub struct Gpt2Views {
    /// params[unit][tensor], floatX, device layout (wte has Vp rows).
    pub params: Vec<Vec<DeviceBuf>>,
    /// grads[unit][tensor], f32, device layout.
    pub grads: Vec<Vec<DeviceBuf>>,
}

/// One pass over the model: the context, the buffers and the views.
pub struct Gpt2Pass<'a> {
    pub gpu: &'a GpuContext,
    pub bufs: &'a Buffers<DeviceBuf>,
    pub views: &'a Gpt2Views,
    pub dims: Dims,
}

impl Gpt2Pass<'_> {
    fn zero(&self, buf: &DeviceBuf) -> Result<()> {
        self.gpu.memset(Queue::Compute, buf, 0)?;
        self.gpu.profile_mark("memset activation grads")
    }

    fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            b: self.dims.b,
            t: self.dims.t,
            c: self.dims.c,
            nh: self.dims.nh,
        }
    }

    fn acts(&self, layer: usize) -> &LayerActs<DeviceBuf> {
        let i = if self.dims.checkpointing { 0 } else { layer };
        &self.bufs.layers[i]
    }

    /// (inputs, targets) of micro-batch `k`, (B,T) i32 each.
    pub fn tokens(&self, k: usize) -> Result<(DeviceBuf, DeviceBuf)> {
        let bt = self.dims.bt();
        let inputs = self.bufs.tokens.slice(k * bt, bt)?;
        let targets = self.bufs.tokens.slice((self.dims.micro_max + k) * bt, bt)?;
        Ok((inputs, targets))
    }

    /// Embedding and every block: fills residuals[0..=L] and the layer activations.
    pub fn forward(&self, k: usize) -> Result<()> {
        let d = &self.dims;
        let (inputs, _) = self.tokens(k)?;
        let embed = &self.views.params[0];
        self.gpu.encoder_forward(
            &self.bufs.residuals[0],
            &inputs,
            &embed[0],
            &embed[1],
            d.b,
            d.t,
            d.c,
        )?;
        for l in 0..d.l {
            self.layer_forward(l)?;
        }
        Ok(())
    }

    /// x → x + attn(ln_1(x)) → … + mlp(ln_2(…)), as model/gpt2/block.rs.
    fn layer_forward(&self, l: usize) -> Result<()> {
        let (g, d, b) = (self.gpu, &self.dims, self.bufs);
        let (n, c) = (d.bt(), d.c);
        let p = &self.views.params[1 + l];
        let a = self.acts(l);
        let (input, output) = (&b.residuals[l], &b.residuals[l + 1]);
        g.layernorm_forward(
            &a.ln1,
            &a.ln1_mean,
            &a.ln1_rstd,
            input,
            &p[LN1_W],
            &p[LN1_B],
            n,
            c,
        )?;
        g.matmul_forward(&a.qkv, &a.ln1, &p[QKV_W], Some(&p[QKV_B]), n, c, 3 * c)?;
        let attention = AttentionActivations {
            qkvr: a.qkvr.clone(),
            att: a.att.clone(),
            vaccum: b.vaccum.clone(),
        };
        g.attention_forward(&a.atty, &attention, &a.qkv, self.attention_shape())?;
        g.matmul_forward(
            &b.proj_out,
            &a.atty,
            &p[ATTPROJ_W],
            Some(&p[ATTPROJ_B]),
            n,
            c,
            c,
        )?;
        g.residual_forward(&a.residual2, input, &b.proj_out)?;
        g.layernorm_forward(
            &a.ln2,
            &a.ln2_mean,
            &a.ln2_rstd,
            &a.residual2,
            &p[LN2_W],
            &p[LN2_B],
            n,
            c,
        )?;
        g.matmul_forward(&a.fch, &a.ln2, &p[FC_W], Some(&p[FC_B]), n, c, 4 * c)?;
        g.gelu_forward(&a.fch_gelu, &a.fch)?;
        g.matmul_forward(
            &b.proj_out,
            &a.fch_gelu,
            &p[FCPROJ_W],
            Some(&p[FCPROJ_B]),
            n,
            4 * c,
            c,
        )?;
        g.residual_forward(output, &a.residual2, &b.proj_out)
    }

    /// ln_f, the tied LM head over Vp columns, fused softmax cross-entropy into losses[k], and
    /// (with `dloss`) the head's backward: dwte, dln_f and dres = ∂L/∂residuals[L].
    /// `dloss` is ∂L/∂(each token's loss) = loss_scale / (micro-batches · B · T).
    pub fn head(&self, k: usize, dloss: Option<f32>) -> Result<()> {
        let (g, d, b) = (self.gpu, &self.dims, self.bufs);
        let (n, c) = (d.bt(), d.c);
        let (_, targets) = self.tokens(k)?;
        let lnf = &self.views.params[d.l + 1];
        let wte = &self.views.params[0][0];
        let input = &b.residuals[d.l];
        g.layernorm_forward(
            &b.lnf,
            &b.lnf_mean,
            &b.lnf_rstd,
            input,
            &lnf[0],
            &lnf[1],
            n,
            c,
        )?;
        g.matmul_forward(&b.logits, &b.lnf, wte, None, n, c, d.vp)?;
        let losses = b.losses.slice(k * n, n)?;
        g.crossentropy_forward_backward(&b.logits, &losses, &targets, n, d.v, d.vp, dloss)?;
        if dloss.is_none() {
            return Ok(());
        }
        let dlnf = &self.views.grads[d.l + 1];
        let dwte = &self.views.grads[0][0];
        g.matmul_backward(
            &b.dln,
            GradMode::Overwrite,
            dwte,
            None,
            &b.logits,
            &b.lnf,
            wte,
            n,
            c,
            d.vp,
        )?;
        self.zero(&b.dres)?;
        g.layernorm_backward(
            &b.dres,
            &dlnf[0],
            &dlnf[1],
            &b.dln,
            input,
            &lnf[0],
            &b.lnf_mean,
            &b.lnf_rstd,
            n,
            c,
        )
    }

    /// Every block in reverse (recomputing each block's forward with checkpointing), then the
    /// embedding. Starts from dres = ∂L/∂residuals[L] as `head` leaves it.
    pub fn backward(&self, k: usize) -> Result<()> {
        let d = &self.dims;
        for l in (0..d.l).rev() {
            if d.checkpointing {
                // Rewrites residuals[l + 1] with the same values; nothing reads it any more.
                self.layer_forward(l)?;
            }
            self.layer_backward(l)?;
        }
        let (inputs, _) = self.tokens(k)?;
        let dembed = &self.views.grads[0];
        self.gpu.encoder_backward(
            &dembed[0],
            &dembed[1],
            &self.bufs.dres,
            &inputs,
            d.b,
            d.t,
            d.c,
        )
    }

    /// As model/gpt2/block.rs `backward`: dres (∂L/∂output) becomes ∂L/∂input in place.
    fn layer_backward(&self, l: usize) -> Result<()> {
        let (g, d, b) = (self.gpu, &self.dims, self.bufs);
        let (n, c) = (d.bt(), d.c);
        let p = &self.views.params[1 + l];
        let dp = &self.views.grads[1 + l];
        let a = self.acts(l);
        let input = &b.residuals[l];
        // MLP: out = residual2 + fc_proj(gelu(fc(ln_2(residual2)))).
        g.matmul_backward(
            &b.dfch_gelu,
            GradMode::Overwrite,
            &dp[FCPROJ_W],
            Some(&dp[FCPROJ_B]),
            &b.dres,
            &a.fch_gelu,
            &p[FCPROJ_W],
            n,
            4 * c,
            c,
        )?;
        g.gelu_backward(&b.dfch, GradMode::Overwrite, &a.fch, &b.dfch_gelu)?;
        g.matmul_backward(
            &b.dln,
            GradMode::Overwrite,
            &dp[FC_W],
            Some(&dp[FC_B]),
            &b.dfch,
            &a.ln2,
            &p[FC_W],
            n,
            c,
            4 * c,
        )?;
        // dres (∂L/∂out, the residual path) += LayerNorm backward: now ∂L/∂residual2.
        g.layernorm_backward(
            &b.dres,
            &dp[LN2_W],
            &dp[LN2_B],
            &b.dln,
            &a.residual2,
            &p[LN2_W],
            &a.ln2_mean,
            &a.ln2_rstd,
            n,
            c,
        )?;
        // Attention: residual2 = input + attn_proj(attention(qkv(ln_1(input)))).
        g.matmul_backward(
            &b.datty,
            GradMode::Overwrite,
            &dp[ATTPROJ_W],
            Some(&dp[ATTPROJ_B]),
            &b.dres,
            &a.atty,
            &p[ATTPROJ_W],
            n,
            c,
            c,
        )?;
        let attention = AttentionActivations {
            qkvr: a.qkvr.clone(),
            att: a.att.clone(),
            vaccum: b.vaccum.clone(),
        };
        let scratch = AttentionGradScratch {
            dqkvr: b.dqkvr.clone(),
            datt: b.datt.clone(),
            dvaccum: b.dvaccum.clone(),
        };
        self.zero(&b.dqkv)?;
        g.attention_backward(
            &b.dqkv,
            &b.datty,
            &attention,
            &scratch,
            self.attention_shape(),
        )?;
        g.matmul_backward(
            &b.dln,
            GradMode::Overwrite,
            &dp[QKV_W],
            Some(&dp[QKV_B]),
            &b.dqkv,
            &a.ln1,
            &p[QKV_W],
            n,
            c,
            3 * c,
        )?;
        // dres += LayerNorm backward: now ∂L/∂input.
        g.layernorm_backward(
            &b.dres,
            &dp[LN1_W],
            &dp[LN1_B],
            &b.dln,
            input,
            &p[LN1_W],
            &a.ln1_mean,
            &a.ln1_rstd,
            n,
            c,
        )
    }
}
