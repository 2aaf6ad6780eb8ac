//! Fused causal attention on the CPU (FlashAttention-2, Dao 2023): the scores of a (batch,
//! head) are computed one `TILE × TILE` block at a time and never stored. The forward keeps
//! the output and each query row's logsumexp; the backward recomputes each block's
//! probabilities from them. It is the reference of the CUDA backend's flash kernels, and is
//! checked against the materialized implementation (`attention.rs`).
//!
//! q, k and v are read where the qkv projection left them, (B,T,(NH+2·NKV)·HS), and the results
//! go to out (B,T,NH·HS) and dqkv directly: no per-head copies, and query head h reads key/value
//! head h / (NH/NKV) where it is (grouped-query attention without repeating K and V).
//!
//! Forward, rayon over (batch·head, query tile): for each key tile up to the diagonal,
//! S = scale·Q·Kᵀ; the online softmax updates the row max m and row sum l and rescales the
//! output accumulator; O += P·V. Then O /= l and lse = m + ln l. Tiles above the diagonal
//! are skipped; the diagonal tile is masked.
//!
//! Backward, rayon over (batch, key/value head): D = rowsum(dO∘O) first; then for each key tile
//! j, each query head of the group and each query tile i ≥ j: P = exp(scale·Q_i·K_jᵀ − lse),
//! dV_j += Pᵀ·dO_i, dP = dO_i·V_jᵀ, dS = P∘(dP − D)·scale, dQ_i += dS·K_j, dK_j += dSᵀ·Q_i. A
//! task owns every row of its key/value head and of its group's query heads in dqkv, so no two
//! tasks touch one element.

use super::disjoint::Disjoint;
use super::fastmath::{self, multiversion};
use super::matmul::{gemm, Layout, Threads};
use crate::backend::AttentionShape;
use rayon::prelude::*;

/// Query rows and keys per tile (query and key tiles are aligned, so only the diagonal tile
/// of a query tile is masked). On 2 cores at GPT-2 124M's shapes (B=4, T=1024, NH=12, HS=64)
/// 128 is the fastest: forward level with the materialized attention, backward 1.24× (it
/// recomputes Q·Kᵀ); 64 is 1.3× slower overall, 32 1.8×.
pub const TILE: usize = 128;

/// The offset of head `h` of part `part` (0 q, 1 k, 2 v: key/value heads are numbered from 0)
/// within one token of qkv.
fn packed_offset(s: &AttentionShape, part: usize, h: usize) -> usize {
    match part {
        0 => h * s.hs,
        1 => (s.nh + h) * s.hs,
        _ => (s.nh + s.nkv + h) * s.hs,
    }
}

/// Rows `t0..t0 + rows` of head `h` of part `part` of sequence `b` in qkv
/// (B,T,(NH+2·NKV)·HS): the offset of the first element and the (rows, HS) layout from there.
fn qkv_rows(
    s: &AttentionShape,
    b: usize,
    h: usize,
    part: usize,
    t0: usize,
    rows: usize,
) -> (usize, Layout) {
    let width = s.qkv_width();
    let offset = (b * s.t + t0) * width + packed_offset(s, part, h);
    let layout = Layout {
        rows,
        cols: s.hs,
        row_stride: width,
        col_stride: 1,
    };
    (offset, layout)
}

/// Rows `t0..t0 + rows` of query head `h` of sequence `b` in a (B,T,NH·HS) tensor.
fn head_rows(s: &AttentionShape, b: usize, h: usize, t0: usize, rows: usize) -> (usize, Layout) {
    let width = s.q_width();
    let layout = Layout {
        rows,
        cols: s.hs,
        row_stride: width,
        col_stride: 1,
    };
    ((b * s.t + t0) * width + h * s.hs, layout)
}

/// A (rows × cols) block of a TILE × TILE score buffer.
fn block(rows: usize, cols: usize) -> Layout {
    Layout {
        rows,
        cols,
        row_stride: TILE,
        col_stride: 1,
    }
}

/// Keys of key tile `k0..k0 + cols` that query `i` may see (causal): at least 1 when k0 ≤ i.
fn visible(i: usize, k0: usize, cols: usize) -> usize {
    (i + 1).min(k0 + cols).saturating_sub(k0)
}

fn check_shape(s: &AttentionShape) {
    assert!(s.nkv > 0 && s.nh % s.nkv == 0, "NKV must divide NH");
}

/// out (B,T,NH·HS) = softmax(mask(Q·Kᵀ/√HS))·V of qkv (B,T,(NH+2·NKV)·HS); lse (B,NH,T) = the
/// logsumexp of each query row's visible scaled scores.
pub fn flash_forward(out: &mut [f32], lse: &mut [f32], qkv: &[f32], s: AttentionShape) {
    check_shape(&s);
    assert!(out.len() == s.out_len() && qkv.len() == s.qkv_len() && lse.len() == s.rows_len());
    let scale = 1.0 / (s.head_size() as f32).sqrt();
    let out = Disjoint::new(out);
    lse.par_chunks_mut(s.t).enumerate().for_each(|(bh, lse)| {
        lse.par_chunks_mut(TILE)
            .enumerate()
            .for_each(|(tile, lse)| forward_tile(out, lse, qkv, &s, bh, tile * TILE, scale));
    });
}

/// One query tile (rows i0..i0 + lse.len()) of one (batch, head).
fn forward_tile(
    out: Disjoint<'_>,
    lse: &mut [f32],
    qkv: &[f32],
    s: &AttentionShape,
    bh: usize,
    i0: usize,
    scale: f32,
) {
    let (b, h, hs) = (bh / s.nh, bh % s.nh, s.hs);
    let kvh = h / s.group();
    let rows = lse.len();
    let i1 = i0 + rows;
    let mut scores = vec![0.0f32; TILE * TILE];
    let mut acc = vec![0.0f32; rows * hs];
    let mut max = [f32::NEG_INFINITY; TILE];
    let mut sum = [0.0f32; TILE];
    let (q_at, q) = qkv_rows(s, b, h, 0, i0, rows);
    for k0 in (0..i1).step_by(TILE) {
        let cols = TILE.min(i1 - k0);
        let (k_at, k) = qkv_rows(s, b, kvh, 1, k0, cols);
        let (v_at, v) = qkv_rows(s, b, kvh, 2, k0, cols);
        let sb = block(rows, cols);
        gemm(
            &mut scores,
            sb,
            &qkv[q_at..],
            q,
            &qkv[k_at..],
            k.t(),
            scale,
            false,
            Threads::One,
        );
        for r in 0..rows {
            let row = &mut scores[r * TILE..r * TILE + cols];
            let acc_row = &mut acc[r * hs..(r + 1) * hs];
            online_softmax_row(
                row,
                visible(i0 + r, k0, cols),
                &mut max[r],
                &mut sum[r],
                acc_row,
            );
        }
        let ab = Layout::row_major(rows, hs);
        gemm(
            &mut acc,
            ab,
            &scores,
            sb,
            &qkv[v_at..],
            v,
            1.0,
            true,
            Threads::One,
        );
    }
    for (r, lse) in lse.iter_mut().enumerate() {
        let inv = 1.0 / sum[r];
        *lse = max[r] + sum[r].ln();
        // SAFETY: row i0 + r of head h of sequence b belongs to this task alone (tasks are
        // distinct (bh, query tile) pairs) and no other slice of `out` lives here.
        let dst = unsafe { out.range((b * s.t + i0 + r) * s.q_width() + h * hs, hs) };
        for (d, a) in dst.iter_mut().zip(&acc[r * hs..(r + 1) * hs]) {
            *d = a * inv;
        }
    }
}

multiversion! {
    /// One query row of one key tile: the online softmax. `row` holds the scaled scores (the
    /// first `visible` are unmasked) and becomes exp(score − new max), 0 where masked; the
    /// row's running max and sum are updated and its output accumulator rescaled.
    fn online_softmax_row(row: &mut [f32], visible: usize, max: &mut f32, sum: &mut f32, acc: &mut [f32]) {
        let (seen, masked) = row.split_at_mut(visible);
        let new_max = max.max(fastmath::max(seen));
        // The first tile: nothing to rescale (exp(−inf) is not 0 in fastmath).
        let alpha = if *max == f32::NEG_INFINITY { 0.0 } else { fastmath::exp(*max - new_max) };
        for v in seen.iter_mut() {
            *v = fastmath::exp(*v - new_max);
        }
        masked.fill(0.0);
        *sum = *sum * alpha + fastmath::sum(seen);
        if alpha != 1.0 {
            for a in acc.iter_mut() {
                *a *= alpha;
            }
        }
        *max = new_max;
    }
}

/// dqkv += ∂L/∂qkv given dout (B,T,NH·HS), the forward's qkv, out and lse.
/// Scratch (overwritten): delta (B,NH,T) = rowsum(dout ∘ out) per head.
#[allow(clippy::too_many_arguments)]
pub fn flash_backward(
    dqkv: &mut [f32],
    delta: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    s: AttentionShape,
) {
    check_shape(&s);
    let (t, hs, width) = (s.t, s.hs, s.q_width());
    assert!(dqkv.len() == s.qkv_len() && qkv.len() == s.qkv_len());
    assert!(dout.len() == s.out_len() && out.len() == s.out_len());
    assert!(lse.len() == s.rows_len() && delta.len() == s.rows_len());
    delta.par_chunks_mut(t).enumerate().for_each(|(bh, delta)| {
        let (b, h) = (bh / s.nh, bh % s.nh);
        for (ti, d) in delta.iter_mut().enumerate() {
            let at = (b * t + ti) * width + h * hs;
            *d = fastmath::dot(&dout[at..at + hs], &out[at..at + hs]);
        }
    });
    let scale = 1.0 / (hs as f32).sqrt();
    let delta: &[f32] = delta;
    let dqkv = Disjoint::new(dqkv);
    (0..s.b * s.nkv).into_par_iter().for_each(|bkv| {
        let stats = RowStats { lse, delta };
        backward_group(dqkv, dout, qkv, stats, &s, bkv, scale);
    });
}

/// Every query row's logsumexp and D, (B,NH,T).
#[derive(Clone, Copy)]
struct RowStats<'a> {
    lse: &'a [f32],
    delta: &'a [f32],
}

/// dqkv += the gradient of one (batch, key/value head) and its group of query heads: key tiles
/// outer, then the group's query heads, then query tiles.
fn backward_group(
    dqkv: Disjoint<'_>,
    dout: &[f32],
    qkv: &[f32],
    stats: RowStats<'_>,
    s: &AttentionShape,
    bkv: usize,
    scale: f32,
) {
    let (b, kvh, t, hs) = (bkv / s.nkv, bkv % s.nkv, s.t, s.hs);
    let width = s.qkv_width();
    let mut p = vec![0.0f32; TILE * TILE];
    let mut dp = vec![0.0f32; TILE * TILE];
    let mut dq = vec![0.0f32; TILE * hs];
    let mut dk = vec![0.0f32; TILE * hs];
    let mut dv = vec![0.0f32; TILE * hs];
    for k0 in (0..t).step_by(TILE) {
        let cols = TILE.min(t - k0);
        let (k_at, k) = qkv_rows(s, b, kvh, 1, k0, cols);
        let (v_at, v) = qkv_rows(s, b, kvh, 2, k0, cols);
        let kvb = Layout::row_major(cols, hs);
        dk.fill(0.0);
        dv.fill(0.0);
        for h in kvh * s.group()..(kvh + 1) * s.group() {
            let row0 = (b * s.nh + h) * t;
            for i0 in (k0..t).step_by(TILE) {
                let rows = TILE.min(t - i0);
                let (q_at, q) = qkv_rows(s, b, h, 0, i0, rows);
                let (do_at, dy) = head_rows(s, b, h, i0, rows);
                let sb = block(rows, cols);
                // P = exp(scale·Q·Kᵀ − lse), 0 above the diagonal.
                gemm(
                    &mut p,
                    sb,
                    &qkv[q_at..],
                    q,
                    &qkv[k_at..],
                    k.t(),
                    scale,
                    false,
                    Threads::One,
                );
                for r in 0..rows {
                    let row = &mut p[r * TILE..r * TILE + cols];
                    probabilities_row(row, visible(i0 + r, k0, cols), stats.lse[row0 + i0 + r]);
                }
                // dV += Pᵀ·dO ; dP = dO·Vᵀ
                gemm(
                    &mut dv,
                    kvb,
                    &p,
                    sb.t(),
                    &dout[do_at..],
                    dy,
                    1.0,
                    true,
                    Threads::One,
                );
                gemm(
                    &mut dp,
                    sb,
                    &dout[do_at..],
                    dy,
                    &qkv[v_at..],
                    v.t(),
                    1.0,
                    false,
                    Threads::One,
                );
                // dS = P ∘ (dP − D) · scale, in place over dP.
                for r in 0..rows {
                    let range = r * TILE..r * TILE + cols;
                    scores_gradient_row(
                        &mut dp[range.clone()],
                        &p[range],
                        stats.delta[row0 + i0 + r],
                        scale,
                    );
                }
                // dQ_i += dS·K_j (through a tile: dqkv's rows are strided) ; dK_j += dSᵀ·Q_i
                let qb = Layout::row_major(rows, hs);
                gemm(
                    &mut dq,
                    qb,
                    &dp,
                    sb,
                    &qkv[k_at..],
                    k,
                    1.0,
                    false,
                    Threads::One,
                );
                for r in 0..rows {
                    // SAFETY: q rows of head h of sequence b belong to this task alone (tasks are
                    // distinct (b, kv head), and h is in this kv head's group); the slice dies at
                    // the end of this iteration.
                    let dst = unsafe { dqkv.range((b * t + i0 + r) * width + h * hs, hs) };
                    add(dst, &dq[r * hs..(r + 1) * hs]);
                }
                gemm(
                    &mut dk,
                    kvb,
                    &dp,
                    sb.t(),
                    &qkv[q_at..],
                    q,
                    1.0,
                    true,
                    Threads::One,
                );
            }
        }
        for r in 0..cols {
            for (part, grad) in [(1, &dk), (2, &dv)] {
                let at = (b * t + k0 + r) * width + packed_offset(s, part, kvh);
                // SAFETY: k and v rows of kv head kvh of sequence b belong to this task alone.
                let dst = unsafe { dqkv.range(at, hs) };
                add(dst, &grad[r * hs..(r + 1) * hs]);
            }
        }
    }
}

fn add(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
}

multiversion! {
    /// Scaled scores → probabilities exp(score − lse); 0 past the first `visible` keys.
    fn probabilities_row(row: &mut [f32], visible: usize, lse: f32) {
        let (seen, masked) = row.split_at_mut(visible);
        for v in seen.iter_mut() {
            *v = fastmath::exp(*v - lse);
        }
        masked.fill(0.0);
    }
}

multiversion! {
    /// dP → dS = P ∘ (dP − D) · scale (0 where P is masked to 0).
    fn scores_gradient_row(dp: &mut [f32], p: &[f32], delta: f32, scale: f32) {
        for (g, &p) in dp.iter_mut().zip(p) {
            *g = p * (*g - delta) * scale;
        }
    }
}

#[cfg(test)]
mod tests;
