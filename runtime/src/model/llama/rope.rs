//! Rotary frequencies and their cos/sin tables, as transformers computes them: the default
//! inverse frequencies theta^(-2i/d), divided by `factor` for "linear" scaling, or rescaled by
//! wavelength for "llama3" (`_compute_llama3_parameters` in modeling_rope_utils.py).

use crate::config::RopeKind;

/// The HS/2 inverse frequencies of head size `hs`.
pub fn inv_freq(hs: usize, theta: f64, kind: RopeKind) -> Vec<f32> {
    let base: Vec<f32> = (0..hs / 2)
        .map(|i| {
            // torch: base ** (arange(0, dim, 2).float() / dim) in f32, then 1 / that.
            let exponent = (2 * i) as f32 / hs as f32;
            1.0 / theta.powf(f64::from(exponent)) as f32
        })
        .collect();
    match kind {
        RopeKind::Default => base,
        RopeKind::Linear { factor } => base.iter().map(|&f| f / factor as f32).collect(),
        RopeKind::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let f = f64::from(f);
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    // transformers' `~(wavelen < high) * ~(wavelen > low)`; wavelengths are finite.
                    let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
                    if medium {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                    } else {
                        scaled as f32
                    }
                })
                .collect()
        }
    }
}

/// The cos and sin tables (T, HS/2) of positions 0..T: angle = `t·inv_freq[i]` rounded to f32 as
/// transformers' f32 product rounds it, its cosine and sine rounded from f64.
pub fn tables(inv_freq: &[f32], t: usize) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = vec![0.0f32; t * half];
    let mut sin = vec![0.0f32; t * half];
    for pos in 0..t {
        for (i, &f) in inv_freq.iter().enumerate() {
            let angle = f64::from(pos as f32 * f);
            cos[pos * half + i] = angle.cos() as f32;
            sin[pos * half + i] = angle.sin() as f32;
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_divides_low_ones_and_blends_between() {
        let kind = RopeKind::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let base = inv_freq(128, 500_000.0, RopeKind::Default);
        let scaled = inv_freq(128, 500_000.0, kind);
        // The first frequency (wavelength 2π) is kept, the last (wavelength ~ 3e6) divided by 8.
        assert_eq!(scaled[0], base[0]);
        assert!((scaled[63] / base[63] - 0.125).abs() < 1e-6);
        // Between: a blend, monotone in the wavelength.
        let blended: Vec<usize> = (0..64)
            .filter(|&i| scaled[i] != base[i] && (scaled[i] / base[i] - 0.125).abs() > 1e-6)
            .collect();
        assert!(!blended.is_empty());
        for &i in &blended {
            let r = scaled[i] / base[i];
            assert!(r > 0.125 && r < 1.0, "{i}: {r}");
        }
        let linear = inv_freq(8, 10_000.0, RopeKind::Linear { factor: 2.0 });
        let plain = inv_freq(8, 10_000.0, RopeKind::Default);
        assert_eq!(plain[0], 1.0);
        assert!(linear.iter().zip(&plain).all(|(l, p)| *l == p / 2.0));
    }
}
