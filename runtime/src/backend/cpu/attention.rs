//! Causal multi-head self-attention on the CPU, the same algorithm as the CUDA backend's (and
//! its reference): q, k, v are permuted into per-head layout `qkvr (3, B, NH, T, HS)`, the
//! scores and probabilities of each (batch, head) are materialized in `att (B, NH, T, T)`,
//! att·V goes to per-head scratch and is permuted back.
//!
//! The two products of each (batch, head) run as GEMMs over blocks of `BLOCK` query rows, each
//! block touching only the keys it may see, so the causal mask saves about half of the FLOPs.

use super::fastmath::{self, multiversion};
use super::matmul::{gemm, Layout, Threads};
use crate::backend::AttentionShape;
use rayon::prelude::*;

const BLOCK: usize = 128;

/// The per-head (T, HS) matrix of `rows` rows, contiguous.
fn head(rows: usize, hs: usize) -> Layout {
    Layout::row_major(rows, hs)
}

/// The (rows × cols) block of a (T, T) score matrix starting at its row 0.
fn scores(rows: usize, cols: usize, t: usize) -> Layout {
    Layout {
        rows,
        cols,
        row_stride: t,
        col_stride: 1,
    }
}

/// qkvr[part][b][h][t][d] = qkv[b][t][part·C + h·HS + d].
fn permute_qkv(qkvr: &mut [f32], qkv: &[f32], s: &AttentionShape) {
    let (t, c, hs) = (s.t, s.c, s.head_size());
    qkvr.par_chunks_mut(t * hs)
        .enumerate()
        .for_each(|(i, dst)| {
            let (part, bh) = (i / (s.b * s.nh), i % (s.b * s.nh));
            let (b, h) = (bh / s.nh, bh % s.nh);
            for (ti, row) in dst.chunks_exact_mut(hs).enumerate() {
                let src = (b * t + ti) * 3 * c + part * c + h * hs;
                row.copy_from_slice(&qkv[src..src + hs]);
            }
        });
}

/// out[b][t][h·HS + d] = heads[b][h][t][d].
fn unpermute(out: &mut [f32], heads: &[f32], s: &AttentionShape) {
    let (t, hs) = (s.t, s.head_size());
    out.par_chunks_mut(s.c).enumerate().for_each(|(bt, row)| {
        let (b, ti) = (bt / t, bt % t);
        for h in 0..s.nh {
            let src = &heads[((b * s.nh + h) * t + ti) * hs..][..hs];
            row[h * hs..(h + 1) * hs].copy_from_slice(src);
        }
    });
}

/// out (B, T, C) = softmax(mask(Q·Kᵀ/√hs))·V; fills qkvr, att (probabilities) and vaccum.
pub fn attention_forward(
    out: &mut [f32],
    qkvr: &mut [f32],
    att: &mut [f32],
    vaccum: &mut [f32],
    qkv: &[f32],
    s: AttentionShape,
) {
    let (t, hs, c) = (s.t, s.head_size(), s.c);
    assert!(c % s.nh == 0 && qkv.len() == s.b * t * 3 * c && out.len() == s.b * t * c);
    assert!(qkvr.len() == s.qkvr_len() && att.len() == s.scores_len() && vaccum.len() == out.len());
    permute_qkv(qkvr, qkv, &s);
    let per_head = s.b * s.nh * t * hs;
    let (q_all, kv) = qkvr.split_at(per_head);
    let (k_all, v_all) = kv.split_at(per_head);
    let scale = 1.0 / (hs as f32).sqrt();
    att.par_chunks_mut(t * t)
        .zip(vaccum.par_chunks_mut(t * hs))
        .enumerate()
        .for_each(|(bh, (att, y))| {
            let range = bh * t * hs..(bh + 1) * t * hs;
            let (q, k, v) = (&q_all[range.clone()], &k_all[range.clone()], &v_all[range]);
            for i0 in (0..t).step_by(BLOCK) {
                let i1 = (i0 + BLOCK).min(t);
                let rows = i1 - i0;
                let att_block = &mut att[i0 * t..];
                gemm(
                    att_block,
                    scores(rows, i1, t),
                    &q[i0 * hs..],
                    head(rows, hs),
                    k,
                    head(i1, hs).t(),
                    scale,
                    false,
                    Threads::One,
                );
                for r in 0..rows {
                    let i = i0 + r;
                    let (visible, masked) = att_block[r * t..(r + 1) * t].split_at_mut(i + 1);
                    softmax_in_place(visible);
                    masked.fill(0.0);
                }
                gemm(
                    &mut y[i0 * hs..i1 * hs],
                    head(rows, hs),
                    att_block,
                    scores(rows, i1, t),
                    v,
                    head(i1, hs),
                    1.0,
                    false,
                    Threads::One,
                );
            }
        });
    unpermute(out, vaccum, &s);
}

/// dqkv (B, T, 3C) += ∂L/∂qkv given dout (B, T, C) and the forward's qkvr and att.
/// Scratch (overwritten): dqkvr (3, B, NH, T, HS), datt (B, NH, T, T), dvaccum (B, NH, T, HS).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkvr: &[f32],
    att: &[f32],
    dqkvr: &mut [f32],
    datt: &mut [f32],
    dvaccum: &mut [f32],
    s: AttentionShape,
) {
    let (t, hs, c) = (s.t, s.head_size(), s.c);
    assert!(dqkv.len() == 3 * s.b * t * c && dout.len() == s.b * t * c);
    assert!(qkvr.len() == s.qkvr_len() && att.len() == s.scores_len());
    assert!(dqkvr.len() == s.qkvr_len() && datt.len() == s.scores_len());
    assert!(dvaccum.len() == dout.len());
    // dvaccum[b][h][t][d] = dout[b][t][h·HS + d]
    dvaccum
        .par_chunks_mut(t * hs)
        .enumerate()
        .for_each(|(bh, dst)| {
            let (b, h) = (bh / s.nh, bh % s.nh);
            for (ti, row) in dst.chunks_exact_mut(hs).enumerate() {
                let src = (b * t + ti) * c + h * hs;
                row.copy_from_slice(&dout[src..src + hs]);
            }
        });
    let per_head = s.b * s.nh * t * hs;
    let (q_all, kv) = qkvr.split_at(per_head);
    let (k_all, v_all) = kv.split_at(per_head);
    let (dq_all, dkv) = dqkvr.split_at_mut(per_head);
    let (dk_all, dv_all) = dkv.split_at_mut(per_head);
    let scale = 1.0 / (hs as f32).sqrt();
    let dvaccum: &[f32] = dvaccum;
    datt.par_chunks_mut(t * t)
        .zip(dq_all.par_chunks_mut(t * hs))
        .zip(
            dk_all
                .par_chunks_mut(t * hs)
                .zip(dv_all.par_chunks_mut(t * hs)),
        )
        .enumerate()
        .for_each(|(bh, ((datt, dq), (dk, dv)))| {
            let range = bh * t * hs..(bh + 1) * t * hs;
            let (q, k, v) = (
                &q_all[range.clone()],
                &k_all[range.clone()],
                &v_all[range.clone()],
            );
            let dy = &dvaccum[range];
            let att = &att[bh * t * t..(bh + 1) * t * t];
            dk.fill(0.0);
            dv.fill(0.0);
            for i0 in (0..t).step_by(BLOCK) {
                let i1 = (i0 + BLOCK).min(t);
                let rows = i1 - i0;
                let block = scores(rows, i1, t);
                let att_block = &att[i0 * t..];
                let datt_block = &mut datt[i0 * t..];
                // datt = dy · Vᵀ ; dV += attᵀ · dy
                gemm(
                    datt_block,
                    block,
                    &dy[i0 * hs..],
                    head(rows, hs),
                    v,
                    head(i1, hs).t(),
                    1.0,
                    false,
                    Threads::One,
                );
                gemm(
                    &mut dv[..i1 * hs],
                    head(i1, hs),
                    att_block,
                    block.t(),
                    &dy[i0 * hs..],
                    head(rows, hs),
                    1.0,
                    true,
                    Threads::One,
                );
                // Softmax backward in place: dscores = att ⊙ (datt − Σ att·datt) · scale.
                for r in 0..rows {
                    let i = i0 + r;
                    let a = &att_block[r * t..r * t + i + 1];
                    let (visible, masked) = datt_block[r * t..r * t + i1].split_at_mut(i + 1);
                    softmax_backward_in_place(visible, a, scale);
                    masked.fill(0.0);
                }
                // dQ = dscores · K ; dK += dscoresᵀ · Q
                let dscores = &datt[i0 * t..];
                gemm(
                    &mut dq[i0 * hs..i1 * hs],
                    head(rows, hs),
                    dscores,
                    block,
                    k,
                    head(i1, hs),
                    1.0,
                    false,
                    Threads::One,
                );
                gemm(
                    &mut dk[..i1 * hs],
                    head(i1, hs),
                    dscores,
                    block.t(),
                    &q[i0 * hs..],
                    head(rows, hs),
                    1.0,
                    true,
                    Threads::One,
                );
            }
        });
    // dqkv[b][t][part·C + h·HS + d] += dqkvr[part][b][h][t][d]
    let dqkvr: &[f32] = dqkvr;
    dqkv.par_chunks_mut(3 * c)
        .enumerate()
        .for_each(|(bt, row)| {
            let (b, ti) = (bt / t, bt % t);
            for part in 0..3 {
                for h in 0..s.nh {
                    let src = &dqkvr[part * per_head + ((b * s.nh + h) * t + ti) * hs..][..hs];
                    let dst = &mut row[part * c + h * hs..part * c + (h + 1) * hs];
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                }
            }
        });
}

multiversion! {
    /// x ← softmax(x).
    fn softmax_in_place(x: &mut [f32]) {
        let max = fastmath::max(x);
        for v in x.iter_mut() {
            *v = fastmath::exp(*v - max);
        }
        let inv = 1.0 / fastmath::sum(x);
        for v in x.iter_mut() {
            *v *= inv;
        }
    }
}

multiversion! {
    /// g ← p ⊙ (g − Σ p·g) · scale: the gradient through softmax p, times the score scale.
    fn softmax_backward_in_place(g: &mut [f32], p: &[f32], scale: f32) {
        let dot = fastmath::dot(p, g);
        for (g, &p) in g.iter_mut().zip(p) {
            *g = p * (*g - dot) * scale;
        }
    }
}
