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

/// What moved between the tiers and where the queues spent their time, since the engine opened.
/// Differences of two snapshots ([`Traffic::since`]) describe the steps between them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traffic {
    pub offload: super::host_tier::OffloadTraffic,
    /// Seconds the host-to-device and device-to-host queues spent copying (host queues; None
    /// on a GPU, whose copy engines the host does not time).
    pub h2d_busy_s: Option<f64>,
    pub d2h_busy_s: Option<f64>,
    /// Seconds the compute queue spent waiting for another queue's event (data not there yet).
    pub compute_waited_s: Option<f64>,
}

impl Traffic {
    /// What happened after `earlier`.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        let (a, b) = (&self.offload, &earlier.offload);
        let sub = |x: Option<f64>, y: Option<f64>| Some(x? - y.unwrap_or(0.0));
        Traffic {
            offload: super::host_tier::OffloadTraffic {
                nvme_read_bytes: a.nvme_read_bytes - b.nvme_read_bytes,
                nvme_read_s: a.nvme_read_s - b.nvme_read_s,
                nvme_write_bytes: a.nvme_write_bytes - b.nvme_write_bytes,
                nvme_write_s: a.nvme_write_s - b.nvme_write_s,
                h2d_bytes: a.h2d_bytes - b.h2d_bytes,
                d2h_bytes: a.d2h_bytes - b.d2h_bytes,
            },
            h2d_busy_s: sub(self.h2d_busy_s, earlier.h2d_busy_s),
            d2h_busy_s: sub(self.d2h_busy_s, earlier.d2h_busy_s),
            compute_waited_s: sub(self.compute_waited_s, earlier.compute_waited_s),
        }
    }

    /// GB/s of `bytes` over `seconds` (None when nothing moved or the time is unknown).
    pub fn rate(bytes: u64, seconds: Option<f64>) -> Option<f64> {
        let s = seconds?;
        (bytes > 0 && s > 0.0).then(|| bytes as f64 / s / 1e9)
    }

    /// `nvme read 1.2 GiB at 2.10 GB/s, write …; host→device …; device→host …; compute waited
    /// 3.1% of 12.0 s` for `wall_s` seconds of steps.
    pub fn describe(&self, wall_s: f64) -> String {
        let o = &self.offload;
        let link = |name: &str, bytes: u64, s: Option<f64>| match Traffic::rate(bytes, s) {
            Some(r) => format!(
                "{name} {} at {r:.2} GB/s",
                super::human_bytes(bytes as usize)
            ),
            None => format!("{name} {}", super::human_bytes(bytes as usize)),
        };
        let waited = match self.compute_waited_s {
            Some(w) if wall_s > 0.0 => format!(
                "compute waited for data {:.1}% of {wall_s:.2} s",
                100.0 * w / wall_s
            ),
            _ => "compute wait not measured on this device".into(),
        };
        format!(
            "{}, {}; {}; {}; {waited}",
            link("nvme read", o.nvme_read_bytes, Some(o.nvme_read_s)),
            link("write", o.nvme_write_bytes, Some(o.nvme_write_s)),
            link("host→device", o.h2d_bytes, self.h2d_busy_s),
            link("device→host", o.d2h_bytes, self.d2h_busy_s),
        )
    }
}
