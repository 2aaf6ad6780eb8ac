//! LayerNorm over the last dimension (eps 1e-5, biased variance), as in GPT-2 and llm.c.

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
    assert!(out.len() == n * c && mean.len() == n && rstd.len() == n && weight.len() == c && bias.len() == c);
    out.par_chunks_mut(c)
        .zip(inp.par_chunks(c))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((o, x), (m, r))| {
            let mu = x.iter().sum::<f32>() / c as f32;
            let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / c as f32;
            let s = 1.0 / (var + LN_EPS).sqrt();
            for i in 0..c {
                o[i] = (x[i] - mu) * s * weight[i] + bias[i];
            }
            *m = mu;
            *r = s;
        });
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
    let (dw, db) = dinp
        .par_chunks_mut(rows_per_task * c)
        .enumerate()
        .map(|(task, dinp_rows)| {
            let mut dw = vec![0.0f32; c];
            let mut db = vec![0.0f32; c];
            let mut dnorm = vec![0.0f32; c];
            for (r, dx) in dinp_rows.chunks_exact_mut(c).enumerate() {
                let row = task * rows_per_task + r;
                let x = &inp[row * c..(row + 1) * c];
                let dy = &dout[row * c..(row + 1) * c];
                let (mu, s) = (mean[row], rstd[row]);
                let mut dnorm_mean = 0.0f32;
                let mut dnorm_norm_mean = 0.0f32;
                for i in 0..c {
                    let norm = (x[i] - mu) * s;
                    dnorm[i] = weight[i] * dy[i];
                    dnorm_mean += dnorm[i];
                    dnorm_norm_mean += dnorm[i] * norm;
                    db[i] += dy[i];
                    dw[i] += norm * dy[i];
                }
                dnorm_mean /= c as f32;
                dnorm_norm_mean /= c as f32;
                for i in 0..c {
                    let norm = (x[i] - mu) * s;
                    dx[i] += (dnorm[i] - dnorm_mean - norm * dnorm_norm_mean) * s;
                }
            }
            (dw, db)
        })
        .reduce(
            || (vec![0.0f32; c], vec![0.0f32; c]),
            |(mut aw, mut ab), (bw, bb)| {
                aw.iter_mut().zip(&bw).for_each(|(a, b)| *a += b);
                ab.iter_mut().zip(&bb).for_each(|(a, b)| *a += b);
                (aw, ab)
            },
        );
    dweight.iter_mut().zip(&dw).for_each(|(a, b)| *a += b);
    dbias.iter_mut().zip(&db).for_each(|(a, b)| *a += b);
}
