//! Every layer operation of the seam on the GPU against the CPU backend's kernel on the same
//! (floatX-rounded) inputs, through the same descriptors the models use (`GpuContext::run`).

use super::{Harness, Result};
use crate::backend::cpu;
use crate::backend::cuda::context::Stream;
use crate::backend::cuda::flash::FlashKernels;
use crate::backend::{
    Accumulate, AttentionActs, AttentionBackward, AttentionForward, AttentionScratch,
    AttentionShape, CrossEntropy, DType, EncoderBackward, EncoderForward, GeluBackward,
    GeluForward, GradMode, LayerNormBackward, LayerNormForward, MatmulBackward, MatmulForward,
    ResidualForward, RmsNormBackward, RmsNormForward, Rotary, Rows, SwigluBackward, SwigluForward,
};

/// Token embedding with (GPT-2) and without (Llama) the position table.
pub(super) fn check_encoder(
    h: &mut Harness<'_>,
    b: usize,
    t: usize,
    c: usize,
    v: usize,
) -> Result<()> {
    let (inp, wte, wpe) = (
        h.rand_tokens(b * t, v),
        h.rand_x(v * c, 1.0),
        h.rand_x(t * c, 1.0),
    );
    let (d_inp, d_wte, d_wpe) = (h.put_i32(&inp)?, h.put_x(&wte)?, h.put_x(&wpe)?);
    let tokens: Vec<u32> = inp.iter().map(|&x| x as u32).collect();
    for with_positions in [true, false] {
        let tag = if with_positions { "" } else { " (no wpe)" };
        let d_out = h.poisoned(h.gpu.x(), b * t * c)?;
        h.gpu.run(EncoderForward {
            out: &d_out,
            tokens: &d_inp,
            wte: &d_wte,
            wpe: with_positions.then_some(&d_wpe),
            b,
            t,
            c,
        })?;
        let mut out = vec![0.0; b * t * c];
        let wpe_ref = with_positions.then_some(&wpe[..]);
        cpu::encoder_forward(&mut out, &tokens, &wte, wpe_ref, t, c);
        h.compare(&format!("encoder_forward/out{tag}"), &d_out, &out, 1)?;

        let dout = h.rand_x(b * t * c, 1.0);
        let (mut dwte, mut dwpe) = (h.rand_f32(v * c, 1.0), h.rand_f32(t * c, 1.0));
        let (d_dwte, d_dwpe, d_dout) = (h.put_f32(&dwte)?, h.put_f32(&dwpe)?, h.put_x(&dout)?);
        h.gpu.run(EncoderBackward {
            dwte: &d_dwte,
            dwpe: with_positions.then_some(&d_dwpe),
            dout: &d_dout,
            tokens: &d_inp,
            b,
            t,
            c,
        })?;
        let dwpe_ref = with_positions.then_some(&mut dwpe[..]);
        cpu::encoder_backward(&mut dwte, dwpe_ref, &dout, &tokens, t, c);
        h.compare(&format!("encoder_backward/dwte{tag}"), &d_dwte, &dwte, 1)?;
        h.compare(&format!("encoder_backward/dwpe{tag}"), &d_dwpe, &dwpe, 1)?;
    }
    Ok(())
}

pub(super) fn check_layernorm(h: &mut Harness<'_>, n: usize, c: usize) -> Result<()> {
    let (inp, w, bias) = (h.rand_x(n * c, 2.0), h.rand_x(c, 1.0), h.rand_x(c, 1.0));
    let (d_inp, d_w, d_b) = (h.put_x(&inp)?, h.put_x(&w)?, h.put_x(&bias)?);
    let d_out = h.poisoned(h.gpu.x(), n * c)?;
    let (d_mean, d_rstd) = (h.poisoned(DType::F32, n)?, h.poisoned(DType::F32, n)?);
    h.gpu.run(LayerNormForward {
        out: &d_out,
        mean: &d_mean,
        rstd: &d_rstd,
        inp: &d_inp,
        weight: &d_w,
        bias: &d_b,
        n,
        c,
    })?;
    let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    cpu::layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &bias, c);
    h.compare("layernorm_forward/out", &d_out, &out, 1)?;
    h.compare("layernorm_forward/mean", &d_mean, &mean, 1)?;
    h.compare("layernorm_forward/rstd", &d_rstd, &rstd, 1)?;

    let dout = h.rand_x(n * c, 1.0);
    let mut dinp = h.rand_x(n * c, 1.0);
    let (mut dw, mut db) = (h.rand_f32(c, 1.0), h.rand_f32(c, 1.0));
    let (d_dinp, d_dw, d_db, d_dout) = (
        h.put_x(&dinp)?,
        h.put_f32(&dw)?,
        h.put_f32(&db)?,
        h.put_x(&dout)?,
    );
    h.gpu.run(LayerNormBackward {
        dinp: &d_dinp,
        dweight: &d_dw,
        dbias: &d_db,
        dout: &d_dout,
        inp: &d_inp,
        weight: &d_w,
        mean: &d_mean,
        rstd: &d_rstd,
        n,
        c,
    })?;
    cpu::layernorm_backward(
        &mut dinp, &mut dw, &mut db, &dout, &inp, &w, &mean, &rstd, c,
    );
    h.compare("layernorm_backward/dinp", &d_dinp, &dinp, 2)?;
    h.compare("layernorm_backward/dweight", &d_dw, &dw, 1)?;
    h.compare("layernorm_backward/dbias", &d_db, &db, 1)
}

/// RMSNorm on dense rows, and on strided rows (Qwen3's per-head norm of a packed qkv's query
/// heads: `group` rows of `c` per token, `stride` apart), forward and both backward modes.
pub(super) fn check_rmsnorm(h: &mut Harness<'_>, rows: Rows) -> Result<()> {
    let (c, extent) = (rows.c, rows.extent());
    let tag = if rows.group > 1 { " (strided)" } else { "" };
    let eps = 1e-5;
    let (inp, w) = (h.rand_x(extent, 2.0), h.rand_x(c, 1.0));
    let (d_inp, d_w) = (h.put_x(&inp)?, h.put_x(&w)?);
    let d_out = h.poisoned(h.gpu.x(), extent)?;
    let d_rstd = h.poisoned(DType::F32, rows.n)?;
    h.gpu.run(RmsNormForward {
        out: &d_out,
        rstd: &d_rstd,
        inp: &d_inp,
        weight: &d_w,
        rows,
        eps,
    })?;
    let (mut out, mut rstd) = (vec![f32::NAN; extent], vec![0.0; rows.n]);
    cpu::rmsnorm_forward(&mut out, &mut rstd, &inp, &w, rows, eps);
    // Only the rows are written: compare them (the gaps stay NaN on both sides).
    let pick = |v: &[f32]| -> Vec<f32> {
        (0..rows.n)
            .flat_map(|r| v[rows.offset(r)..rows.offset(r) + c].to_vec())
            .collect()
    };
    let got = h.get(&d_out)?;
    h.compare_host(
        &format!("rmsnorm_forward/out{tag}"),
        &pick(&got),
        &pick(&out),
        1,
    );
    h.compare(&format!("rmsnorm_forward/rstd{tag}"), &d_rstd, &rstd, 1)?;

    let dout = h.rand_x(extent, 1.0);
    let d_dout = h.put_x(&dout)?;
    for mode in [GradMode::Accumulate, GradMode::Overwrite] {
        let mut dinp = h.rand_x(extent, 1.0);
        let mut dw = h.rand_f32(c, 1.0);
        let (d_dinp, d_dw) = (h.put_x(&dinp)?, h.put_f32(&dw)?);
        h.gpu.run(RmsNormBackward {
            dinp: &d_dinp,
            dinp_mode: mode,
            dweight: &d_dw,
            dout: &d_dout,
            inp: &d_inp,
            weight: &d_w,
            rstd: &d_rstd,
            rows,
        })?;
        let accumulate = mode == GradMode::Accumulate;
        cpu::rmsnorm_backward(&mut dinp, accumulate, &mut dw, &dout, &inp, &w, &rstd, rows);
        let label = if accumulate { "" } else { " (overwrite)" };
        let got = h.get(&d_dinp)?;
        let name = format!("rmsnorm_backward/dinp{label}{tag}");
        h.compare_host(&name, &pick(&got), &pick(&dinp), 2);
        h.compare(
            &format!("rmsnorm_backward/dweight{label}{tag}"),
            &d_dw,
            &dw,
            1,
        )?;
    }
    Ok(())
}

/// The rotation of the query and key heads of a packed qkv, and its inverse.
pub(super) fn check_rotary(h: &mut Harness<'_>, s: AttentionShape) -> Result<()> {
    let half = s.hs / 2;
    let qkv = h.rand_x(s.qkv_len(), 1.0);
    let angles: Vec<f32> = (0..s.t * half)
        .map(|i| (i / half) as f32 * 0.37f32.powi((i % half) as i32))
        .collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    let (d_cos, d_sin) = (h.put_f32(&cos)?, h.put_f32(&sin)?);
    for inverse in [false, true] {
        let d_qkv = h.put_x(&qkv)?;
        h.gpu.run(Rotary {
            qkv: &d_qkv,
            cos: &d_cos,
            sin: &d_sin,
            shape: s,
            inverse,
        })?;
        let mut want = qkv.clone();
        cpu::rotary(&mut want, &cos, &sin, s, inverse);
        let name = if inverse {
            "rotary/inverse"
        } else {
            "rotary/qkv"
        };
        h.compare(name, &d_qkv, &want, 1)?;
    }
    Ok(())
}

pub(super) fn check_gelu_residual(h: &mut Harness<'_>, n: usize) -> Result<()> {
    let (inp, dout) = (h.rand_x(n, 3.0), h.rand_x(n, 1.0));
    let (d_inp, d_dout) = (h.put_x(&inp)?, h.put_x(&dout)?);
    let mut dinp = h.rand_x(n, 1.0);
    let (d_out, d_dinp) = (h.poisoned(h.gpu.x(), n)?, h.put_x(&dinp)?);
    h.gpu.run(GeluForward {
        out: &d_out,
        inp: &d_inp,
    })?;
    h.gpu.run(GeluBackward {
        dinp: &d_dinp,
        dinp_mode: GradMode::Accumulate,
        inp: &d_inp,
        dout: &d_dout,
    })?;
    let d_dinp_new = h.poisoned(h.gpu.x(), n)?;
    h.gpu.run(GeluBackward {
        dinp: &d_dinp_new,
        dinp_mode: GradMode::Overwrite,
        inp: &d_inp,
        dout: &d_dout,
    })?;
    let mut out = vec![0.0; n];
    cpu::gelu_forward(&mut out, &inp);
    cpu::gelu_backward(&mut dinp, &inp, &dout, true);
    let mut dinp_new = vec![f32::NAN; n];
    cpu::gelu_backward(&mut dinp_new, &inp, &dout, false);
    h.compare("gelu_forward/out", &d_out, &out, 1)?;
    h.compare("gelu_backward/dinp", &d_dinp, &dinp, 1)?;
    h.compare("gelu_backward/dinp (overwrite)", &d_dinp_new, &dinp_new, 1)?;

    let d_sum = h.poisoned(h.gpu.x(), n)?;
    h.gpu.run(ResidualForward {
        out: &d_sum,
        a: &d_inp,
        b: &d_dout,
    })?;
    let mut sum = vec![0.0; n];
    cpu::residual_forward(&mut sum, &inp, &dout);
    h.compare("residual_forward/out", &d_sum, &sum, 1)?;
    h.gpu.run(Accumulate {
        dst: &d_inp,
        src: &d_dout,
    })?;
    h.compare("accumulate/dst", &d_inp, &sum, 1)
}

pub(super) fn check_swiglu(h: &mut Harness<'_>, n: usize, i: usize) -> Result<()> {
    let (inp, dout) = (h.rand_x(n * 2 * i, 3.0), h.rand_x(n * i, 1.0));
    let (d_inp, d_dout) = (h.put_x(&inp)?, h.put_x(&dout)?);
    let (d_out, d_dinp) = (
        h.poisoned(h.gpu.x(), n * i)?,
        h.poisoned(h.gpu.x(), 2 * n * i)?,
    );
    h.gpu.run(SwigluForward {
        out: &d_out,
        inp: &d_inp,
        n,
        i,
    })?;
    h.gpu.run(SwigluBackward {
        dinp: &d_dinp,
        dout: &d_dout,
        inp: &d_inp,
        n,
        i,
    })?;
    let (mut out, mut dinp) = (vec![0.0; n * i], vec![0.0; 2 * n * i]);
    cpu::swiglu_forward(&mut out, &inp, i);
    cpu::swiglu_backward(&mut dinp, &dout, &inp, i);
    h.compare("swiglu_forward/out", &d_out, &out, 1)?;
    h.compare("swiglu_backward/dinp", &d_dinp, &dinp, 2)
}

pub(super) fn check_matmul(h: &mut Harness<'_>, n: usize, c: usize, oc: usize) -> Result<()> {
    let (inp, w, bias) = (
        h.rand_x(n * c, 1.0),
        h.rand_x(oc * c, 0.1),
        h.rand_x(oc, 0.1),
    );
    let (d_inp, d_w, d_bias) = (h.put_x(&inp)?, h.put_x(&w)?, h.put_x(&bias)?);
    let d_out = h.poisoned(h.gpu.x(), n * oc)?;
    h.gpu.run(MatmulForward {
        out: &d_out,
        inp: &d_inp,
        weight: &d_w,
        bias: Some(&d_bias),
        n,
        c,
        oc,
    })?;
    let mut out = vec![0.0; n * oc];
    cpu::matmul_forward(&mut out, &inp, &w, Some(&bias), n, c, oc);
    h.compare("matmul_forward/out", &d_out, &out, 1)?;

    let dout = h.rand_x(n * oc, 1.0);
    let (mut dw, mut db) = (h.rand_f32(oc * c, 1.0), h.rand_f32(oc, 1.0));
    let (d_dout, d_dw, d_db) = (h.put_x(&dout)?, h.put_f32(&dw)?, h.put_f32(&db)?);
    let mut dinp = h.rand_x(n * c, 1.0);
    let d_dinp = h.put_x(&dinp)?;
    let backward = |dinp, dinp_mode, dweight, dbias| MatmulBackward {
        dinp,
        dinp_mode,
        dweight,
        dbias: Some(dbias),
        dout: &d_dout,
        inp: &d_inp,
        weight: &d_w,
        n,
        c,
        oc,
    };
    h.gpu
        .run(backward(&d_dinp, GradMode::Accumulate, &d_dw, &d_db))?;
    // Overwrite mode: dinp alone (a fresh dweight/dbias pair takes the other products).
    let d_dinp_new = h.poisoned(h.gpu.x(), n * c)?;
    let (d_dw2, d_db2) = (h.put_f32(&vec![0.0; oc * c])?, h.put_f32(&vec![0.0; oc])?);
    h.gpu
        .run(backward(&d_dinp_new, GradMode::Overwrite, &d_dw2, &d_db2))?;
    let mut dinp_new = vec![f32::NAN; n * c];
    let (mut dw2, mut db2) = (vec![0.0; oc * c], vec![0.0; oc]);
    cpu::matmul_backward(
        Some(&mut dinp_new),
        false,
        &mut dw2,
        Some(&mut db2),
        &dout,
        &inp,
        &w,
        n,
        c,
        oc,
    );
    h.compare(
        "matmul_backward/dinp (overwrite)",
        &d_dinp_new,
        &dinp_new,
        1,
    )?;
    cpu::matmul_backward(
        Some(&mut dinp),
        true,
        &mut dw,
        Some(&mut db),
        &dout,
        &inp,
        &w,
        n,
        c,
        oc,
    );
    h.compare("matmul_backward/dinp", &d_dinp, &dinp, 1)?;
    h.compare("matmul_backward/dweight", &d_dw, &dw, 1)?;
    h.compare("matmul_backward/dbias", &d_db, &db, 1)
}

/// A name suffix for attention shapes with fewer key/value heads than query heads.
fn gqa_tag(s: &AttentionShape) -> String {
    if s.nkv == s.nh {
        String::new()
    } else {
        format!(" NH={} NKV={}", s.nh, s.nkv)
    }
}

pub(super) fn check_attention(h: &mut Harness<'_>, s: AttentionShape) -> Result<()> {
    let x = h.gpu.x();
    let tag = gqa_tag(&s);
    let qkv = h.rand_x(s.qkv_len(), 1.0);
    let d_qkv = h.put_x(&qkv)?;
    let d_att = h.poisoned(x, s.scores_len())?;
    let acts = AttentionActs::Materialized {
        qkvr: h.poisoned(x, s.qkvr_len())?,
        att: d_att.clone(),
        vaccum: h.poisoned(x, s.out_len())?,
    };
    let d_out = h.poisoned(x, s.out_len())?;
    h.gpu.run(AttentionForward {
        out: &d_out,
        acts: &acts,
        qkv: &d_qkv,
        shape: s,
    })?;
    let (mut out, mut att) = (vec![0.0; s.out_len()], vec![0.0; s.scores_len()]);
    let (mut qkvr, mut vaccum) = (vec![0.0; s.qkvr_len()], vec![0.0; s.out_len()]);
    cpu::attention_forward(&mut out, &mut qkvr, &mut att, &mut vaccum, &qkv, s);
    h.compare(&format!("attention_forward/out{tag}"), &d_out, &out, 2)?;
    h.compare(&format!("attention_forward/att{tag}"), &d_att, &att, 1)?;

    let dout = h.rand_x(s.out_len(), 1.0);
    let d_dout = h.put_x(&dout)?;
    let scratch = AttentionScratch::Materialized {
        dqkvr: h.poisoned(x, s.qkvr_len())?,
        datt: h.poisoned(x, s.scores_len())?,
        dvaccum: h.poisoned(x, s.out_len())?,
    };
    let mut dqkv = h.rand_x(s.qkv_len(), 1.0);
    let d_dqkv = h.put_x(&dqkv)?;
    h.gpu.run(AttentionBackward {
        dqkv: &d_dqkv,
        dout: &d_dout,
        qkv: &d_qkv,
        out: &d_out,
        acts: &acts,
        scratch: &scratch,
        shape: s,
    })?;
    // The reference uses the GPU's (rounded) att so only the backward's own error is measured.
    let att_x = h.get(&d_att)?;
    let (mut datt, mut dqkvr) = (vec![0.0; s.scores_len()], vec![0.0; s.qkvr_len()]);
    let mut dvaccum = vec![0.0; s.out_len()];
    cpu::attention_backward(
        &mut dqkv,
        &dout,
        &qkvr,
        &att_x,
        &mut dqkvr,
        &mut datt,
        &mut dvaccum,
        s,
    );
    h.compare(&format!("attention_backward/dqkv{tag}"), &d_dqkv, &dqkv, 3)
}

/// The fused kernels, each set that can run `s` on this device (tensor cores and scalar),
/// against the CPU's materialized attention: out, and dqkv accumulated onto small random values
/// (q, k and v parts each against its own scale); lse against the CPU's fused forward.
pub(super) fn check_flash_attention(h: &mut Harness<'_>, s: AttentionShape) -> Result<()> {
    let x = h.gpu.x();
    let rows = s.rows_len();
    let qkv = h.rand_x(s.qkv_len(), 1.0);
    let dout = h.rand_x(s.out_len(), 1.0);
    let base = h.rand_x(s.qkv_len(), 0.1);
    let (mut out, mut dqkv) = (vec![0.0; s.out_len()], base.clone());
    {
        let (mut att, mut datt) = (vec![0.0; s.scores_len()], vec![0.0; s.scores_len()]);
        let (mut qkvr, mut dqkvr) = (vec![0.0; s.qkvr_len()], vec![0.0; s.qkvr_len()]);
        let (mut vaccum, mut dvaccum) = (vec![0.0; s.out_len()], vec![0.0; s.out_len()]);
        cpu::attention_forward(&mut out, &mut qkvr, &mut att, &mut vaccum, &qkv, s);
        cpu::attention_backward(
            &mut dqkv,
            &dout,
            &qkvr,
            &att,
            &mut dqkvr,
            &mut datt,
            &mut dvaccum,
            s,
        );
    }
    let (mut fused_out, mut lse) = (vec![0.0; s.out_len()], vec![0.0; rows]);
    cpu::flash_forward(&mut fused_out, &mut lse, &qkv, s);
    // Released at the end (T = 4096 takes tens of MiB per kernel set).
    let mark = h.gpu.arena().mark();
    let (d_qkv, d_dout) = (h.put_x(&qkv)?, h.put_x(&dout)?);
    for kernels in FlashKernels::candidates(h.precision, s.hs, h.gpu.sm()) {
        let name = format!(
            "flash_attention[{}] B={} T={} HS={}{}",
            kernels.name(),
            s.b,
            s.t,
            s.hs,
            gqa_tag(&s)
        );
        let d_out = h.poisoned(x, s.out_len())?;
        let d_lse = h.poisoned(DType::F32, rows)?;
        h.gpu
            .flash_forward_with(kernels, &d_out, &d_lse, &d_qkv, s)?;
        h.compare(&format!("{name}/out"), &d_out, &out, 2)?;
        h.compare(&format!("{name}/lse"), &d_lse, &lse, 1)?;
        let d_dqkv = h.put_x(&base)?;
        let d_delta = h.poisoned(DType::F32, rows)?;
        h.gpu.flash_backward_with(
            kernels, &d_dqkv, &d_delta, &d_dout, &d_qkv, &d_out, &d_lse, s,
        )?;
        let got = h.get(&d_dqkv)?;
        let (q, kv) = (s.nh * s.hs, s.nkv * s.hs);
        for (label, start, len) in [("dq", 0, q), ("dk", q, kv), ("dv", q + kv, kv)] {
            // The gradient alone (what was added to `base`), of one part.
            let pick = |v: &[f32]| -> Vec<f32> {
                v.chunks_exact(s.qkv_width())
                    .zip(base.chunks_exact(s.qkv_width()))
                    .flat_map(|(v, b)| {
                        v[start..start + len]
                            .iter()
                            .zip(&b[start..start + len])
                            .map(|(v, b)| v - b)
                            .collect::<Vec<_>>()
                    })
                    .collect()
            };
            h.compare_host(&format!("{name}/{label}"), &pick(&got), &pick(&dqkv), 3);
        }
    }
    h.gpu.synchronize(Stream::Compute)?;
    h.gpu.arena().reset_to(mark)?;
    Ok(())
}

/// Cross-entropy with every fifth target ignored (-100, PyTorch's ignore_index).
pub(super) fn check_crossentropy(h: &mut Harness<'_>, r: usize, v: usize, vp: usize) -> Result<()> {
    let logits = h.rand_x(r * vp, 4.0);
    let mut targets = h.rand_tokens(r, v);
    for t in targets.iter_mut().step_by(5) {
        *t = -100;
    }
    let (d_logits, d_targets) = (h.put_x(&logits)?, h.put_i32(&targets)?);
    let d_losses = h.poisoned(DType::F32, r)?;
    let dloss = 1.0 / r as f32;
    h.gpu.run(CrossEntropy {
        logits: &d_logits,
        losses: &d_losses,
        targets: &d_targets,
        r,
        v,
        vp,
        dloss: Some(dloss),
    })?;
    let mut losses = vec![0.0; r];
    let mut dlogits = logits.clone();
    cpu::softmax_crossentropy(&mut dlogits, &targets, &mut losses, Some(dloss), v, vp);
    h.compare("crossentropy/losses", &d_losses, &losses, 1)?;
    h.compare("crossentropy/dlogits", &d_logits, &dlogits, 1)
}
