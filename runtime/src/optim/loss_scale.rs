//! Loss scaling for fp16 (dynamic) and the grad-scale factor handed to AdamW.
//!
//! The loss gradient (`dloss` of the cross-entropy kernel) is multiplied by `scale`, so every
//! gradient is `scale` times too large; AdamW multiplies them by `grad_scale` =
//! clip_factor / scale. After backward the global grad norm (computed anyway for clipping)
//! tells whether any gradient overflowed: then the step is skipped and the scale halved.
//! bf16 and fp32 need no scaling: `LossScaler::for_precision` returns a fixed scale of 1.

use crate::backend::Precision;

/// What to do with the step after looking at the gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepDecision {
    /// Apply AdamW with this factor on the raw gradients (unscale × clip).
    Apply { grad_scale: f32, grad_norm: f32 },
    /// Gradients overflowed (Inf/NaN): skip the optimizer step; the scale was reduced.
    Skip { new_scale: f32 },
}

/// Dynamic loss scaler (the torch.cuda.amp.GradScaler policy).
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    scale: f32,
    dynamic: bool,
    growth_factor: f32,
    backoff_factor: f32,
    growth_interval_steps: u32,
    good_steps: u32,
    scale_min: f32,
    scale_max: f32,
}

impl LossScaler {
    /// fp16: dynamic, starting at 2^16; bf16/fp32: fixed scale 1.
    pub fn for_precision(precision: Precision) -> Self {
        match precision {
            Precision::Fp16 => LossScaler::dynamic(65536.0),
            Precision::Bf16 | Precision::Fp32 => LossScaler::fixed(1.0),
        }
    }

    pub fn fixed(scale: f32) -> Self {
        LossScaler {
            scale,
            dynamic: false,
            growth_factor: 1.0,
            backoff_factor: 1.0,
            growth_interval_steps: u32::MAX,
            good_steps: 0,
            scale_min: scale,
            scale_max: scale,
        }
    }

    pub fn dynamic(initial_scale: f32) -> Self {
        LossScaler {
            scale: initial_scale,
            dynamic: true,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval_steps: 2000,
            good_steps: 0,
            scale_min: 1.0,
            scale_max: 16_777_216.0,
        }
    }

    /// The factor to multiply the loss gradient with (dloss = scale / (B·T)).
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// (scale, steps since it last changed): what a checkpoint keeps.
    pub fn state(&self) -> (f32, u32) {
        (self.scale, self.good_steps)
    }

    /// The state of [`LossScaler::state`] (a fixed scale stays as it is).
    pub fn restore(&mut self, scale: f32, good_steps: u32) {
        if self.dynamic {
            self.scale = scale;
            self.good_steps = good_steps;
        }
    }

    /// Decides the step from the squared global norm of the *scaled* gradients, clipping to
    /// `clip_norm` (≤ 0 disables clipping), and updates the scale.
    pub fn update(&mut self, grad_norm_squared_scaled: f32, clip_norm: f32) -> StepDecision {
        let finite = grad_norm_squared_scaled.is_finite();
        if !finite && self.dynamic {
            self.scale = (self.scale * self.backoff_factor).max(self.scale_min);
            self.good_steps = 0;
            return StepDecision::Skip {
                new_scale: self.scale,
            };
        }
        let grad_norm = grad_norm_squared_scaled.max(0.0).sqrt() / self.scale;
        let clip = if clip_norm > 0.0 && grad_norm > clip_norm {
            clip_norm / grad_norm
        } else {
            1.0
        };
        let grad_scale = clip / self.scale;
        if self.dynamic {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval_steps {
                self.scale = (self.scale * self.growth_factor).min(self.scale_max);
                self.good_steps = 0;
            }
        }
        StepDecision::Apply {
            grad_scale,
            grad_norm,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_is_fixed_and_clips() {
        let mut s = LossScaler::for_precision(Precision::Bf16);
        assert_eq!(s.scale(), 1.0);
        match s.update(4.0, 1.0) {
            StepDecision::Apply {
                grad_scale,
                grad_norm,
            } => {
                assert_eq!(grad_norm, 2.0);
                assert_eq!(grad_scale, 0.5);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn fp16_backs_off_on_overflow_and_unscales() {
        let mut s = LossScaler::for_precision(Precision::Fp16);
        assert_eq!(
            s.update(f32::INFINITY, 1.0),
            StepDecision::Skip { new_scale: 32768.0 }
        );
        let norm_sq_scaled = (0.5f32 * 32768.0).powi(2);
        match s.update(norm_sq_scaled, 1.0) {
            StepDecision::Apply {
                grad_scale,
                grad_norm,
            } => {
                assert!((grad_norm - 0.5).abs() < 1e-6);
                assert_eq!(grad_scale, 1.0 / 32768.0);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
