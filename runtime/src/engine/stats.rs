//! Per-step statistics.

use serde::Serialize;
use std::time::Duration;

/// What one optimizer step did and how fast; one JSON object per step in `train.metrics_file`.
#[derive(Clone, Debug, Serialize)]
pub struct StepStats {
    /// 0-based index of the step.
    pub step: usize,
    /// Mean loss over the step's tokens.
    pub loss: f32,
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub tokens: usize,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs (forward + backward, no recompute) per second, in TFLOP/s.
    pub tflops: f64,
}

impl StepStats {
    pub fn new(
        step: usize,
        loss: f32,
        lr: f32,
        grad_norm: f32,
        tokens: usize,
        flops: f64,
        elapsed: Duration,
    ) -> Self {
        let secs = elapsed.as_secs_f64().max(1e-9);
        StepStats {
            step,
            loss,
            lr,
            grad_norm,
            tokens,
            step_ms: secs * 1e3,
            tokens_per_s: tokens as f64 / secs,
            tflops: flops / secs / 1e12,
        }
    }
}
