//! Fused softmax + cross-entropy over rows of logits.

use rayon::prelude::*;

/// For each row of `logits (N, V)`: `losses[n] = −log softmax(logits[n])[target[n]]`. With `dloss = Some(d)`,
/// the row is overwritten in place by its gradient `(softmax − onehot(target))·d`.
pub fn softmax_crossentropy(logits: &mut [f32], targets: &[u32], losses: &mut [f32], dloss: Option<f32>, v: usize) {
    assert!(logits.len() == targets.len() * v && losses.len() == targets.len());
    logits.par_chunks_mut(v).zip(targets.par_iter().zip(losses.par_iter_mut())).for_each(|(row, (&tgt, loss))| {
        let tgt = tgt as usize;
        assert!(tgt < v, "target {tgt} outside the vocabulary of {v}");
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
        let log_sum = sum.ln() as f32;
        *loss = log_sum - (row[tgt] - max);
        if let Some(d) = dloss {
            let inv = (1.0 / sum) as f32;
            for x in row.iter_mut() {
                *x = (*x - max).exp() * inv * d;
            }
            row[tgt] -= d;
        }
    });
}
