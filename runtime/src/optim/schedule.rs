//! Linear warmup, then cosine or linear decay to `min_lr` (or constant).

use crate::config::{OptimConfig, Schedule};

/// Learning rate of 0-based `step` out of `total_steps`:
/// `lr·(step+1)/warmup` during warmup; then `min_lr + ½(1 + cos(π·p))(lr − min_lr)` with
/// `p = (step − warmup)/(total − warmup)` for the cosine schedule, `lr` for the constant one.
pub fn lr_at(o: &OptimConfig, step: usize, total_steps: usize) -> f32 {
    if step < o.warmup_steps {
        return o.lr * (step + 1) as f32 / o.warmup_steps as f32;
    }
    match o.schedule {
        Schedule::Constant => o.lr,
        Schedule::Linear => {
            let span = total_steps.saturating_sub(o.warmup_steps).max(1);
            let progress = ((step - o.warmup_steps) as f64 / span as f64).min(1.0);
            (o.lr as f64 - progress * (o.lr - o.min_lr) as f64) as f32
        }
        Schedule::Cosine => {
            let span = total_steps.saturating_sub(o.warmup_steps).max(1);
            let progress = ((step - o.warmup_steps) as f64 / span as f64).min(1.0);
            let coeff = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
            (o.min_lr as f64 + coeff * (o.lr - o.min_lr) as f64) as f32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_min_lr() {
        let o = OptimConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 4,
            ..OptimConfig::default()
        };
        assert_eq!(lr_at(&o, 0, 14), 0.25);
        assert_eq!(lr_at(&o, 3, 14), 1.0);
        assert!((lr_at(&o, 4, 14) - 1.0).abs() < 1e-7);
        assert!((lr_at(&o, 9, 14) - 0.55).abs() < 1e-6);
        assert!((lr_at(&o, 14, 14) - 0.1).abs() < 1e-7);
        let c = OptimConfig {
            schedule: Schedule::Constant,
            ..o
        };
        assert_eq!(lr_at(&c, 9, 14), 1.0);
    }
}
