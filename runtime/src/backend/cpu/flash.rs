//! Fused causal attention on the CPU (FlashAttention-2, Dao 2023): the scores of a (batch,
//! head) are computed one `TILE × TILE` block at a time and never stored. The forward keeps
//! the output and each query row's logsumexp; the backward recomputes each block's
//! probabilities from them. It is the reference of the CUDA backend's flash kernels, and is
//! checked against the materialized implementation (`attention.rs`).
//!
//! q, k and v are read where the qkv projection left them, (B,T,3C), and the results go to
//! out (B,T,C) and dqkv (B,T,3C) directly: no per-head copies.
//!
//! Forward, rayon over (batch·head, query tile): for each key tile up to the diagonal,
//! S = scale·Q·Kᵀ; the online softmax updates the row max m and row sum l and rescales the
//! output accumulator; O += P·V. Then O /= l and lse = m + ln l. Tiles above the diagonal
//! are skipped; the diagonal tile is masked.
//!
//! Backward, rayon over batch·head: D = rowsum(dO∘O) first; then for each key tile j and
//! each query tile i ≥ j: P = exp(scale·Q_i·K_jᵀ − lse), dV_j += Pᵀ·dO_i, dP = dO_i·V_jᵀ,
//! dS = P∘(dP − D)·scale, dQ_i += dS·K_j, dK_j += dSᵀ·Q_i. A task owns every row of its
//! (batch, head) in dqkv, so no two tasks touch one element.

use std::marker::PhantomData;

use super::fastmath::{self, multiversion};
use super::matmul::{gemm, Layout, Threads};
use crate::backend::AttentionShape;
use rayon::prelude::*;

/// Query rows and keys per tile (query and key tiles are aligned, so only the diagonal tile
/// of a query tile is masked). On 2 cores at GPT-2 124M's shapes (B=4, T=1024, NH=12, HS=64)
/// 128 is the fastest: forward level with the materialized attention, backward 1.24× (it
/// recomputes Q·Kᵀ); 64 is 1.3× slower overall, 32 1.8×.
pub const TILE: usize = 128;

/// A slice that several tasks write at once, each only at elements no other task touches.
#[derive(Clone, Copy)]
struct Disjoint<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: elements are reached only through `range`, whose callers guarantee that no two
// tasks (and no two live slices) cover one element; the pointer stays valid for 'a.
unsafe impl Send for Disjoint<'_> {}
// SAFETY: as above.
unsafe impl Sync for Disjoint<'_> {}

impl<'a> Disjoint<'a> {
    fn new(s: &'a mut [f32]) -> Disjoint<'a> {
        Disjoint {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _borrow: PhantomData,
        }
    }

    /// Elements `start..start + n`.
    ///
    /// # Safety
    /// No other live slice, in this task or another, covers any of these elements.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range(&self, start: usize, n: usize) -> &mut [f32] {
        assert!(start + n <= self.len, "range {start}+{n} past {}", self.len);
        // SAFETY: in bounds (asserted), valid for 'a, unaliased per this function's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), n) }
    }
}

/// Rows `t0..t0 + rows` of part `part` (0 q, 1 k, 2 v) of head `h` of sequence `b` in qkv
/// (B,T,3C): the offset of the first element and the (rows, HS) layout from there.
fn qkv_rows(
    s: &AttentionShape,
    b: usize,
    h: usize,
    part: usize,
    t0: usize,
    rows: usize,
) -> (usize, Layout) {
    let hs = s.head_size();
    let offset = (b * s.t + t0) * 3 * s.c + part * s.c + h * hs;
    let layout = Layout {
        rows,
        cols: hs,
        row_stride: 3 * s.c,
        col_stride: 1,
    };
    (offset, layout)
}

/// Rows `t0..t0 + rows` of head `h` of sequence `b` in a (B,T,C) tensor.
fn head_rows(s: &AttentionShape, b: usize, h: usize, t0: usize, rows: usize) -> (usize, Layout) {
    let hs = s.head_size();
    let layout = Layout {
        rows,
        cols: hs,
        row_stride: s.c,
        col_stride: 1,
    };
    ((b * s.t + t0) * s.c + h * hs, layout)
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
    assert!(s.nh > 0 && s.c % s.nh == 0, "C must be a multiple of NH");
}

/// out (B,T,C) = softmax(mask(Q·Kᵀ/√HS))·V of qkv (B,T,3C); lse (B,NH,T) = the logsumexp of
/// each query row's visible scaled scores.
pub fn flash_forward(out: &mut [f32], lse: &mut [f32], qkv: &[f32], s: AttentionShape) {
    check_shape(&s);
    let btc = s.b * s.t * s.c;
    assert!(out.len() == btc && qkv.len() == 3 * btc && lse.len() == s.rows_len());
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
    let (b, h, hs) = (bh / s.nh, bh % s.nh, s.head_size());
    let rows = lse.len();
    let i1 = i0 + rows;
    let mut scores = vec![0.0f32; TILE * TILE];
    let mut acc = vec![0.0f32; rows * hs];
    let mut max = [f32::NEG_INFINITY; TILE];
    let mut sum = [0.0f32; TILE];
    let (q_at, q) = qkv_rows(s, b, h, 0, i0, rows);
    for k0 in (0..i1).step_by(TILE) {
        let cols = TILE.min(i1 - k0);
        let (k_at, k) = qkv_rows(s, b, h, 1, k0, cols);
        let (v_at, v) = qkv_rows(s, b, h, 2, k0, cols);
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
        let dst = unsafe { out.range((b * s.t + i0 + r) * s.c + h * hs, hs) };
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

/// dqkv (B,T,3C) += ∂L/∂qkv given dout (B,T,C), the forward's qkv, out and lse.
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
    let (t, c, hs) = (s.t, s.c, s.head_size());
    let btc = s.b * t * c;
    assert!(dqkv.len() == 3 * btc && qkv.len() == 3 * btc);
    assert!(dout.len() == btc && out.len() == btc);
    assert!(lse.len() == s.rows_len() && delta.len() == s.rows_len());
    delta.par_chunks_mut(t).enumerate().for_each(|(bh, delta)| {
        let (b, h) = (bh / s.nh, bh % s.nh);
        for (ti, d) in delta.iter_mut().enumerate() {
            let at = (b * t + ti) * c + h * hs;
            *d = fastmath::dot(&dout[at..at + hs], &out[at..at + hs]);
        }
    });
    let scale = 1.0 / (hs as f32).sqrt();
    let delta: &[f32] = delta;
    let dqkv = Disjoint::new(dqkv);
    (0..s.b * s.nh).into_par_iter().for_each(|bh| {
        let rows = bh * t..(bh + 1) * t;
        let stats = RowStats {
            lse: &lse[rows.clone()],
            delta: &delta[rows],
        };
        backward_head(dqkv, dout, qkv, stats, &s, bh, scale);
    });
}

/// One (batch, head)'s logsumexp and D, indexed by query position.
struct RowStats<'a> {
    lse: &'a [f32],
    delta: &'a [f32],
}

/// dqkv += the gradient of one (batch, head): key tiles outer, query tiles inner.
fn backward_head(
    dqkv: Disjoint<'_>,
    dout: &[f32],
    qkv: &[f32],
    stats: RowStats<'_>,
    s: &AttentionShape,
    bh: usize,
    scale: f32,
) {
    let (b, h, t, hs) = (bh / s.nh, bh % s.nh, s.t, s.head_size());
    let mut p = vec![0.0f32; TILE * TILE];
    let mut dp = vec![0.0f32; TILE * TILE];
    let mut dq = vec![0.0f32; TILE * hs];
    let mut dk = vec![0.0f32; TILE * hs];
    let mut dv = vec![0.0f32; TILE * hs];
    for k0 in (0..t).step_by(TILE) {
        let cols = TILE.min(t - k0);
        let (k_at, k) = qkv_rows(s, b, h, 1, k0, cols);
        let (v_at, v) = qkv_rows(s, b, h, 2, k0, cols);
        let kvb = Layout::row_major(cols, hs);
        dk.fill(0.0);
        dv.fill(0.0);
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
                probabilities_row(row, visible(i0 + r, k0, cols), stats.lse[i0 + r]);
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
                    stats.delta[i0 + r],
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
                // distinct (b, h)); the slice dies at the end of this iteration.
                let dst = unsafe { dqkv.range((b * t + i0 + r) * 3 * s.c + h * hs, hs) };
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
        for r in 0..cols {
            for (part, grad) in [(1, &dk), (2, &dv)] {
                let at = (b * t + k0 + r) * 3 * s.c + part * s.c + h * hs;
                // SAFETY: k and v rows of head h of sequence b belong to this task alone.
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
