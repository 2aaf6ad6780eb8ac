//! RMSNorm over rows (Llama, Mistral, Qwen: transformers' LlamaRMSNorm), rows dense or strided
//! (Qwen3's per-head norm of the query and key heads inside a packed qkv, see [`Rows`]).

use super::disjoint::Disjoint;
use super::fastmath::{self, multiversion};
use crate::backend::Rows;
use rayon::prelude::*;

/// Rows per rayon task: enough tasks to balance, few enough partial dweights to add.
fn rows_per_task(n: usize) -> usize {
    n.div_ceil(rayon::current_num_threads().max(1) * 4).max(1)
}

/// out = weight ⊙ inp · rstd, rstd = 1/√(mean(inp²) + eps), for every row of `rows`; elements
/// of `out` outside the rows are left as they are.
pub fn rmsnorm_forward(
    out: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    rows: Rows,
    eps: f32,
) {
    let c = rows.c;
    assert!(out.len() >= rows.extent() && inp.len() >= rows.extent());
    assert!(rstd.len() == rows.n && weight.len() == c);
    let out = Disjoint::new(out);
    rstd.par_iter_mut().enumerate().for_each(|(r, s)| {
        let at = rows.offset(r);
        // SAFETY: rows do not overlap (Rows keeps a group within its stride), and each row
        // belongs to one task.
        let o = unsafe { out.range(at, c) };
        *s = row_forward(o, &inp[at..at + c], weight, eps);
    });
}

multiversion! {
    fn row_forward(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) -> f32 {
        let mean_square = fastmath::dot(x, x) / x.len() as f32;
        let s = 1.0 / (mean_square + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
            *o = w * (v * s);
        }
        s
    }
}

/// dinp = or += (`accumulate`) ∂L/∂inp; dweight += Σ dout ⊙ inp·rstd over the rows.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dinp: &mut [f32],
    accumulate: bool,
    dweight: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    rstd: &[f32],
    rows: Rows,
) {
    let c = rows.c;
    let extent = rows.extent();
    assert!(dinp.len() >= extent && dout.len() >= extent && inp.len() >= extent);
    assert!(rstd.len() == rows.n && weight.len() == c && dweight.len() == c);
    let per_task = rows_per_task(rows.n);
    let dinp = Disjoint::new(dinp);
    let partials: Vec<Vec<f32>> = (0..rows.n.div_ceil(per_task))
        .into_par_iter()
        .map(|task| {
            let mut dw = vec![0.0f32; c];
            let first = task * per_task;
            let stats = &rstd[first..(first + per_task).min(rows.n)];
            for (r, &s) in (first..).zip(stats) {
                let at = rows.offset(r);
                // SAFETY: as in rmsnorm_forward: each row belongs to one task.
                let dx = unsafe { dinp.range(at, c) };
                if !accumulate {
                    dx.fill(0.0);
                }
                let span = at..at + c;
                row_backward(dx, &mut dw, &dout[span.clone()], &inp[span], weight, s);
            }
            dw
        })
        .collect();
    // Partials are added in task order, so the result does not depend on thread scheduling.
    for dw in &partials {
        dweight.iter_mut().zip(dw).for_each(|(a, b)| *a += b);
    }
}

multiversion! {
    /// y = w ⊙ x̂, x̂ = x·s: dx += s·(w⊙dy − x̂·mean(w⊙dy ⊙ x̂)), dw += dy ⊙ x̂.
    fn row_backward(dx: &mut [f32], dw: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], s: f32) {
        let c = x.len();
        let mut lanes = [0.0f32; 16];
        let split = c - c % 16;
        for k in (0..split).step_by(16) {
            for i in 0..16 {
                lanes[i] += w[k + i] * dy[k + i] * x[k + i];
            }
        }
        let tail: f32 = (split..c).map(|k| w[k] * dy[k] * x[k]).sum();
        // mean(w⊙dy ⊙ x̂) = s · mean(w⊙dy ⊙ x).
        let dot_mean = (lanes.iter().sum::<f32>() + tail) * s / c as f32;
        for i in 0..c {
            let norm = x[i] * s;
            dw[i] += dy[i] * norm;
            dx[i] += s * (w[i] * dy[i] - norm * dot_mean);
        }
    }
}
