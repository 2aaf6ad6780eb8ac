//! Causal multi-head self-attention on the CPU.
//!
//! The two products of each (batch, head) run as GEMMs over blocks of `BLOCK` query rows, each block touching
//! only the keys it may see, so the causal mask saves about half of the FLOPs. Heads are read in place from
//! `qkv (B, T, 3C)`; results go to head-major scratch and are scattered back in one parallel pass.

use super::fastmath::{self, multiversion};
use super::matmul::{gemm, Layout, Threads};
use rayon::prelude::*;

const BLOCK: usize = 128;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub n_head: usize,
}

impl AttnShape {
    fn hs(&self) -> usize {
        self.c / self.n_head
    }
    /// Elements of the probabilities buffer `att (B, NH, T, T)` (and of the backward's `datt`).
    pub fn att_len(&self) -> usize {
        self.b * self.n_head * self.t * self.t
    }
    fn view(&self, b: usize, h: usize, part: usize, rows: usize) -> (usize, Layout) {
        let offset = b * self.t * 3 * self.c + part * self.c + h * self.hs();
        (
            offset,
            Layout {
                rows,
                cols: self.hs(),
                row_stride: 3 * self.c,
                col_stride: 1,
            },
        )
    }
}

/// out (B, T, C) = softmax(mask(Q·Kᵀ/√hs))·V; saves att (B, NH, T, T); `y_hm` is (B, NH, T, hs) scratch.
pub fn attention_forward(
    out: &mut [f32],
    att: &mut [f32],
    y_hm: &mut [f32],
    qkv: &[f32],
    s: AttnShape,
) {
    let (t, hs, c) = (s.t, s.hs(), s.c);
    assert!(c % s.n_head == 0 && qkv.len() == s.b * t * 3 * c && out.len() == s.b * t * c);
    assert!(att.len() == s.att_len() && y_hm.len() == s.b * t * c);
    let scale = 1.0 / (hs as f32).sqrt();
    att.par_chunks_mut(t * t)
        .zip(y_hm.par_chunks_mut(t * hs))
        .enumerate()
        .for_each(|(bh, (att, y))| {
            let (b, h) = (bh / s.n_head, bh % s.n_head);
            for i0 in (0..t).step_by(BLOCK) {
                let i1 = (i0 + BLOCK).min(t);
                let rows = i1 - i0;
                let (q_off, q) = s.view(b, h, 0, rows);
                let (k_off, k) = s.view(b, h, 1, i1);
                let (v_off, v) = s.view(b, h, 2, i1);
                let block = Layout {
                    rows,
                    cols: i1,
                    row_stride: t,
                    col_stride: 1,
                };
                let q_off = q_off + i0 * 3 * c;
                let att_block = &mut att[i0 * t..];
                gemm(
                    att_block,
                    block,
                    &qkv[q_off..],
                    q,
                    &qkv[k_off..],
                    k.t(),
                    scale,
                    false,
                    Threads::One,
                );
                for r in 0..rows {
                    let i = i0 + r;
                    let row = &mut att_block[r * t..r * t + i1];
                    let (visible, masked) = row.split_at_mut(i + 1);
                    softmax_in_place(visible);
                    masked.fill(0.0);
                }
                let y_block = &mut y[i0 * hs..i1 * hs];
                gemm(
                    y_block,
                    Layout::row_major(rows, hs),
                    att_block,
                    block,
                    &qkv[v_off..],
                    v,
                    1.0,
                    false,
                    Threads::One,
                );
            }
        });
    // Scatter head-major rows back to (B, T, C).
    out.par_chunks_mut(c).enumerate().for_each(|(bt, row)| {
        let (b, ti) = (bt / t, bt % t);
        for h in 0..s.n_head {
            let src = &y_hm[((b * s.n_head + h) * t + ti) * hs..][..hs];
            row[h * hs..(h + 1) * hs].copy_from_slice(src);
        }
    });
}

/// dqkv (B, T, 3C) += ∂L/∂qkv given dout (B, T, C) and the forward's att.
/// Scratch: `datt` (B, NH, T, T) and `dhm` (B, NH, 3, T, hs).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    datt: &mut [f32],
    dhm: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    s: AttnShape,
) {
    let (t, hs, c) = (s.t, s.hs(), s.c);
    assert!(dqkv.len() == qkv.len() && dout.len() == s.b * t * c && att.len() == s.att_len());
    assert!(datt.len() == s.att_len() && dhm.len() == 3 * s.b * t * c);
    let scale = 1.0 / (hs as f32).sqrt();
    datt.par_chunks_mut(t * t)
        .zip(dhm.par_chunks_mut(3 * t * hs))
        .enumerate()
        .for_each(|(bh, (datt, d))| {
            let (b, h) = (bh / s.n_head, bh % s.n_head);
            let att = &att[bh * t * t..(bh + 1) * t * t];
            d.iter_mut().for_each(|x| *x = 0.0);
            let (dq, dkv) = d.split_at_mut(t * hs);
            let (dk, dv) = dkv.split_at_mut(t * hs);
            for i0 in (0..t).step_by(BLOCK) {
                let i1 = (i0 + BLOCK).min(t);
                let rows = i1 - i0;
                let (q_off, q) = s.view(b, h, 0, rows);
                let q_off = q_off + i0 * 3 * c;
                let (k_off, k) = s.view(b, h, 1, i1);
                let (v_off, v) = s.view(b, h, 2, i1);
                let dout_off = (b * t + i0) * c + h * hs;
                let dout_view = Layout {
                    rows,
                    cols: hs,
                    row_stride: c,
                    col_stride: 1,
                };
                let block = Layout {
                    rows,
                    cols: i1,
                    row_stride: t,
                    col_stride: 1,
                };
                let att_block = &att[i0 * t..];
                let datt_block = &mut datt[i0 * t..];
                // datt = dout · Vᵀ ; dV += attᵀ · dout
                gemm(
                    datt_block,
                    block,
                    &dout[dout_off..],
                    dout_view,
                    &qkv[v_off..],
                    v.t(),
                    1.0,
                    false,
                    Threads::One,
                );
                gemm(
                    &mut dv[..i1 * hs],
                    Layout::row_major(i1, hs),
                    att_block,
                    block.t(),
                    &dout[dout_off..],
                    dout_view,
                    1.0,
                    true,
                    Threads::One,
                );
                // Softmax backward in place: dpre = att ⊙ (datt − Σ att·datt) · scale.
                for r in 0..rows {
                    let i = i0 + r;
                    let a = &att_block[r * t..r * t + i + 1];
                    let (visible, masked) = datt_block[r * t..r * t + i1].split_at_mut(i + 1);
                    softmax_backward_in_place(visible, a, scale);
                    masked.fill(0.0);
                }
                // dQ = dpre · K ; dK += dpreᵀ · Q
                let dpre = &datt[i0 * t..];
                gemm(
                    &mut dq[i0 * hs..i1 * hs],
                    Layout::row_major(rows, hs),
                    dpre,
                    block,
                    &qkv[k_off..],
                    k,
                    1.0,
                    false,
                    Threads::One,
                );
                gemm(
                    &mut dk[..i1 * hs],
                    Layout::row_major(i1, hs),
                    dpre,
                    block.t(),
                    &qkv[q_off..],
                    q,
                    1.0,
                    true,
                    Threads::One,
                );
            }
        });
    dqkv.par_chunks_mut(3 * c)
        .enumerate()
        .for_each(|(bt, row)| {
            let (b, ti) = (bt / t, bt % t);
            for h in 0..s.n_head {
                let base = (b * s.n_head + h) * 3 * t * hs;
                for part in 0..3 {
                    let src = &dhm[base + part * t * hs + ti * hs..][..hs];
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
