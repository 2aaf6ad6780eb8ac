//! LayerNorm over the last dimension (eps 1e-5, biased variance), as in GPT-2 and llm.c.

use super::fastmath::{self, multiversion};
use rayon::prelude::*;

pub const LN_EPS: f32 = 1e-5;

/// out (N, C) = (inp − mean) · rstd · weight + bias; saves mean (N) and rstd (N) for the backward pass.
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    c: usize,
) {
    let n = inp.len() / c;
    assert!(
        out.len() == n * c
            && mean.len() == n
            && rstd.len() == n
            && weight.len() == c
            && bias.len() == c
    );
    out.par_chunks_mut(c)
        .zip(inp.par_chunks(c))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((o, x), (m, r))| (*m, *r) = row_forward(o, x, weight, bias));
}

multiversion! {
    fn row_forward(out: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32]) -> (f32, f32) {
        let c = x.len() as f32;
        let mu = fastmath::sum(x) / c;
        let mut lanes = [0.0f32; 16];
        let chunks = x.chunks_exact(16);
        let tail: f32 = chunks.remainder().iter().map(|v| (v - mu) * (v - mu)).sum();
        for chunk in chunks {
            for i in 0..16 {
                lanes[i] += (chunk[i] - mu) * (chunk[i] - mu);
            }
        }
        let var = (lanes.iter().sum::<f32>() + tail) / c;
        let s = 1.0 / (var + LN_EPS).sqrt();
        for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
            *o = (v - mu) * s * w + b;
        }
        (mu, s)
    }
}

/// dinp += ∂L/∂inp; dweight += Σ dout·x̂; dbias += Σ dout.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    let n = inp.len() / c;
    assert!(dinp.len() == n * c && dout.len() == n * c && mean.len() == n && rstd.len() == n);
    let rows_per_task = n.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dinp
        .par_chunks_mut(rows_per_task * c)
        .enumerate()
        .map(|(task, dinp_rows)| {
            let mut dw = vec![0.0f32; c];
            let mut db = vec![0.0f32; c];
            for (r, dx) in dinp_rows.chunks_exact_mut(c).enumerate() {
                let row = task * rows_per_task + r;
                let span = row * c..(row + 1) * c;
                row_backward(
                    dx,
                    &mut dw,
                    &mut db,
                    &dout[span.clone()],
                    &inp[span],
                    weight,
                    mean[row],
                    rstd[row],
                );
            }
            (dw, db)
        })
        .collect();
    // Partials are added in task order, so the result does not depend on thread scheduling.
    for (dw, db) in &partials {
        dweight.iter_mut().zip(dw).for_each(|(a, b)| *a += b);
        dbias.iter_mut().zip(db).for_each(|(a, b)| *a += b);
    }
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn row_backward(dx: &mut [f32], dw: &mut [f32], db: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], mu: f32, s: f32) {
        let c = x.len();
        // Σ dnorm and Σ dnorm·norm with dnorm = w·dy, norm = (x − mu)·s, in 16 lanes.
        let (mut sum_a, mut sum_b) = ([0.0f32; 16], [0.0f32; 16]);
        let split = c - c % 16;
        for k in (0..split).step_by(16) {
            for i in 0..16 {
                let dnorm = w[k + i] * dy[k + i];
                sum_a[i] += dnorm;
                sum_b[i] += dnorm * (x[k + i] - mu) * s;
            }
        }
        let (mut tail_a, mut tail_b) = (0.0f32, 0.0f32);
        for k in split..c {
            let dnorm = w[k] * dy[k];
            tail_a += dnorm;
            tail_b += dnorm * (x[k] - mu) * s;
        }
        let dnorm_mean = (sum_a.iter().sum::<f32>() + tail_a) / c as f32;
        let dnorm_norm_mean = (sum_b.iter().sum::<f32>() + tail_b) / c as f32;
        for i in 0..c {
            let norm = (x[i] - mu) * s;
            let dnorm = w[i] * dy[i];
            db[i] += dy[i];
            dw[i] += norm * dy[i];
            dx[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
        }
    }
}
