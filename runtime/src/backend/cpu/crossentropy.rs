//! Fused softmax + cross-entropy over rows of logits.

use super::fastmath::{self, multiversion};
use rayon::prelude::*;

/// For each row of `logits (N, Vp)`, over its first `v` columns (the rest is vocabulary padding):
/// `losses[n] = −log softmax(logits[n])[target[n]]`. With `dloss = Some(d)` each row is
/// overwritten by its gradient `(softmax − onehot(target))·d`, 0 in the padding; with `None`
/// the logits are left as they are. A negative target is ignored (PyTorch's `ignore_index`):
/// its loss is 0 and its gradient row 0.
pub fn softmax_crossentropy(
    logits: &mut [f32],
    targets: &[i32],
    losses: &mut [f32],
    dloss: Option<f32>,
    v: usize,
    vp: usize,
) {
    assert!(v <= vp && logits.len() == targets.len() * vp && losses.len() == targets.len());
    logits
        .par_chunks_mut(vp)
        .zip(targets.par_iter().zip(losses.par_iter_mut()))
        .for_each(|(row, (&tgt, loss))| {
            let Ok(tgt) = usize::try_from(tgt) else {
                *loss = 0.0;
                if dloss.is_some() {
                    row.fill(0.0);
                }
                return;
            };
            assert!(tgt < v, "target {tgt} outside the vocabulary of {v}");
            let (real, padding) = row.split_at_mut(v);
            match dloss {
                Some(scale) => {
                    *loss = softmax_row(real, tgt, scale);
                    real[tgt] -= scale;
                    padding.fill(0.0);
                }
                None => *loss = log_sum_exp(real) - real[tgt],
            }
        });
}

multiversion! {
    /// Overwrites `row` with softmax(row)·scale and returns −log softmax(row)[target].
    fn softmax_row(row: &mut [f32], target: usize, scale: f32) -> f32 {
        let max = fastmath::max(row);
        let shifted_target = row[target] - max;
        for x in row.iter_mut() {
            *x = fastmath::exp(*x - max);
        }
        let sum = fastmath::sum(row);
        let k = scale / sum;
        for x in row.iter_mut() {
            *x *= k;
        }
        sum.ln() - shifted_target
    }
}

multiversion! {
    /// log Σ exp(row), leaving `row` as it is.
    fn log_sum_exp(row: &[f32]) -> f32 {
        let max = fastmath::max(row);
        let mut lanes = [0.0f32; 16];
        let chunks = row.chunks_exact(16);
        let tail: f32 = chunks.remainder().iter().map(|&x| fastmath::exp(x - max)).sum();
        for chunk in chunks {
            for i in 0..16 {
                lanes[i] += fastmath::exp(chunk[i] - max);
            }
        }
        (lanes.iter().sum::<f32>() + tail).ln() + max
    }
}
