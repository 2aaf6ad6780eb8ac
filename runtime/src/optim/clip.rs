//! Global-norm gradient clipping, as `torch.nn.utils.clip_grad_norm_`.

/// The factor `torch.nn.utils.clip_grad_norm_` applies: min(1, max_norm / (norm + 1e-6)); 1 when off.
pub fn clip_scale(grad_norm: f32, max_norm: f32) -> f32 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (grad_norm + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_matches_torch_rule() {
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert!((clip_scale(4.0, 1.0) - 0.25).abs() < 1e-6);
        assert_eq!(clip_scale(100.0, 0.0), 1.0);
    }
}
