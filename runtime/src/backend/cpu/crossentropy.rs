//! Fused softmax + cross-entropy over rows of logits.

use super::fastmath::{self, multiversion};
use rayon::prelude::*;

/// For each row of `logits (N, V)`: `losses[n] = −log softmax(logits[n])[target[n]]`. The rows are consumed:
/// with `dloss = Some(d)` each is overwritten by its gradient `(softmax − onehot(target))·d`, with `None`
/// by zeros.
pub fn softmax_crossentropy(
    logits: &mut [f32],
    targets: &[u32],
    losses: &mut [f32],
    dloss: Option<f32>,
    v: usize,
) {
    assert!(logits.len() == targets.len() * v && losses.len() == targets.len());
    logits
        .par_chunks_mut(v)
        .zip(targets.par_iter().zip(losses.par_iter_mut()))
        .for_each(|(row, (&tgt, loss))| {
            let tgt = tgt as usize;
            assert!(tgt < v, "target {tgt} outside the vocabulary of {v}");
            let scale = dloss.unwrap_or(0.0);
            *loss = softmax_row(row, tgt, scale);
            row[tgt] -= scale;
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
