//! Causal multi-head self-attention on the CPU, the same algorithm as the CUDA backend's (and
//! its reference): q, k, v are permuted into per-head layout (q (B, NH, T, HS), then k and v
//! (B, NKV, T, HS)), the scores and probabilities of each (batch, query head) are materialized
//! in `att (B, NH, T, T)`, att·V goes to per-head scratch and is permuted back. Query head h
//! reads key/value head h / (NH/NKV) in place: K and V are never repeated.
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

/// Where each head's rows live in the per-head layout: the start of head `h` of part `part`
/// (0 q, 1 k, 2 v) of sequence `b`, (T, HS) each.
fn per_head_offset(s: &AttentionShape, part: usize, b: usize, h: usize) -> usize {
    let head = s.t * s.hs;
    let q = s.b * s.nh * head;
    let kv = s.b * s.nkv * head;
    match part {
        0 => (b * s.nh + h) * head,
        1 => q + (b * s.nkv + h) * head,
        _ => q + kv + (b * s.nkv + h) * head,
    }
}

/// The offset of head `h` of part `part` within a token of qkv.
fn packed_offset(s: &AttentionShape, part: usize, h: usize) -> usize {
    match part {
        0 => h * s.hs,
        1 => (s.nh + h) * s.hs,
        _ => (s.nh + s.nkv + h) * s.hs,
    }
}

/// The (part, b, h) of the `i`-th (T, HS) matrix of the per-head layout.
fn per_head_index(s: &AttentionShape, i: usize) -> (usize, usize, usize) {
    let (q, kv) = (s.b * s.nh, s.b * s.nkv);
    match i {
        i if i < q => (0, i / s.nh, i % s.nh),
        i if i < q + kv => (1, (i - q) / s.nkv, (i - q) % s.nkv),
        i => (2, (i - q - kv) / s.nkv, (i - q - kv) % s.nkv),
    }
}

/// qkvr[part][b][h][t][d] = qkv[b][t][packed_offset(part, h) + d].
fn permute_qkv(qkvr: &mut [f32], qkv: &[f32], s: &AttentionShape) {
    let (t, hs, width) = (s.t, s.hs, s.qkv_width());
    qkvr.par_chunks_mut(t * hs)
        .enumerate()
        .for_each(|(i, dst)| {
            let (part, b, h) = per_head_index(s, i);
            for (ti, row) in dst.chunks_exact_mut(hs).enumerate() {
                let src = (b * t + ti) * width + packed_offset(s, part, h);
                row.copy_from_slice(&qkv[src..src + hs]);
            }
        });
}

/// out[b][t][h·HS + d] = heads[b][h][t][d].
fn unpermute(out: &mut [f32], heads: &[f32], s: &AttentionShape) {
    let (t, hs) = (s.t, s.hs);
    out.par_chunks_mut(s.q_width())
        .enumerate()
        .for_each(|(bt, row)| {
            let (b, ti) = (bt / t, bt % t);
            for h in 0..s.nh {
                let src = &heads[((b * s.nh + h) * t + ti) * hs..][..hs];
                row[h * hs..(h + 1) * hs].copy_from_slice(src);
            }
        });
}

/// out (B, T, NH·HS) = softmax(mask(Q·Kᵀ/√hs))·V; fills qkvr, att (probabilities) and vaccum.
pub fn attention_forward(
    out: &mut [f32],
    qkvr: &mut [f32],
    att: &mut [f32],
    vaccum: &mut [f32],
    qkv: &[f32],
    s: AttentionShape,
) {
    let (t, hs) = (s.t, s.hs);
    assert!(s.nh % s.nkv == 0 && qkv.len() == s.qkv_len() && out.len() == s.out_len());
    assert!(qkvr.len() == s.qkvr_len() && att.len() == s.scores_len() && vaccum.len() == out.len());
    permute_qkv(qkvr, qkv, &s);
    let head_len = t * hs;
    let scale = 1.0 / (hs as f32).sqrt();
    let qkvr: &[f32] = qkvr;
    att.par_chunks_mut(t * t)
        .zip(vaccum.par_chunks_mut(t * hs))
        .enumerate()
        .for_each(|(bh, (att, y))| {
            let (b, h) = (bh / s.nh, bh % s.nh);
            let kvh = h / s.group();
            let head_of = |part, h| &qkvr[per_head_offset(&s, part, b, h)..][..head_len];
            let (q, k, v) = (head_of(0, h), head_of(1, kvh), head_of(2, kvh));
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

/// dqkv (B, T, (NH+2·NKV)·HS) += ∂L/∂qkv given dout (B, T, NH·HS) and the forward's qkvr and
/// att. Scratch (overwritten): dqkvr (per-head layout), datt (B, NH, T, T), dvaccum (B, NH, T, HS).
/// One task per (batch, key/value head) walks the query heads of its group in order, so dK and
/// dV sum over the group without two tasks touching one element.
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
    let (t, hs, g) = (s.t, s.hs, s.group());
    assert!(dqkv.len() == s.qkv_len() && dout.len() == s.out_len());
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
                let src = (b * t + ti) * s.q_width() + h * hs;
                row.copy_from_slice(&dout[src..src + hs]);
            }
        });
    let head_len = t * hs;
    let q_len = s.b * s.nh * head_len;
    let kv_len = s.b * s.nkv * head_len;
    let (dq_all, dkv) = dqkvr.split_at_mut(q_len);
    let (dk_all, dv_all) = dkv.split_at_mut(kv_len);
    let scale = 1.0 / (hs as f32).sqrt();
    let dvaccum: &[f32] = dvaccum;
    // Task (b, kv head) owns the datt and dq of its group's query heads, which are consecutive.
    datt.par_chunks_mut(g * t * t)
        .zip(dq_all.par_chunks_mut(g * head_len))
        .zip(
            dk_all
                .par_chunks_mut(head_len)
                .zip(dv_all.par_chunks_mut(head_len)),
        )
        .enumerate()
        .for_each(|(bkv, ((datt_group, dq_group), (dk, dv)))| {
            let (b, kvh) = (bkv / s.nkv, bkv % s.nkv);
            let head_of = |part, h| &qkvr[per_head_offset(&s, part, b, h)..][..head_len];
            let (k, v) = (head_of(1, kvh), head_of(2, kvh));
            dk.fill(0.0);
            dv.fill(0.0);
            for j in 0..g {
                let h = kvh * g + j;
                let bh = b * s.nh + h;
                let q = head_of(0, h);
                let dy = &dvaccum[bh * head_len..(bh + 1) * head_len];
                let att = &att[bh * t * t..(bh + 1) * t * t];
                let datt = &mut datt_group[j * t * t..(j + 1) * t * t];
                let dq = &mut dq_group[j * head_len..(j + 1) * head_len];
                head_backward(
                    HeadGrads { datt, dq, dk, dv },
                    q,
                    k,
                    v,
                    dy,
                    att,
                    t,
                    hs,
                    scale,
                );
            }
        });
    // dqkv[b][t][packed_offset(part, h) + d] += dqkvr[part][b][h][t][d]
    let dqkvr: &[f32] = dqkvr;
    dqkv.par_chunks_mut(s.qkv_width())
        .enumerate()
        .for_each(|(bt, row)| {
            let (b, ti) = (bt / t, bt % t);
            for (part, heads) in [(0, s.nh), (1, s.nkv), (2, s.nkv)] {
                for h in 0..heads {
                    let src = &dqkvr[per_head_offset(&s, part, b, h) + ti * hs..][..hs];
                    let at = packed_offset(&s, part, h);
                    let dst = &mut row[at..at + hs];
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                }
            }
        });
}

/// The gradients one query head's backward writes: its datt (T, T) and dq (T, HS), and the
/// dk, dv (T, HS) of its key/value head, which it adds to.
struct HeadGrads<'a> {
    datt: &'a mut [f32],
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

/// The backward of one (batch, query head) in blocks of query rows.
#[allow(clippy::too_many_arguments)]
fn head_backward(
    grads: HeadGrads<'_>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dy: &[f32],
    att: &[f32],
    t: usize,
    hs: usize,
    scale: f32,
) {
    let HeadGrads { datt, dq, dk, dv } = grads;
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
}

multiversion! {
    /// x ← softmax(x).
    pub(super) fn softmax_in_place(x: &mut [f32]) {
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
