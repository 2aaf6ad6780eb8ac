//! Choosing the next token from the logits: greedy at temperature 0 (the first of equal maxima,
//! as `torch.argmax`), otherwise a draw from softmax(logits / T) kept to the `top_k` most likely
//! tokens and then to the smallest set whose probability reaches `top_p` (transformers' order of
//! the two filters), from a seeded generator.

use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    /// 0: no top-k filter.
    pub top_k: usize,
    /// 1: no top-p filter.
    pub top_p: f32,
}

impl Sampling {
    /// Checks the settings; the error names the flag.
    pub fn check(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "--temperature {} must be a finite number >= 0",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("--top-p {} must be in (0, 1]", self.top_p));
        }
        Ok(())
    }
}

pub struct Sampler {
    sampling: Sampling,
    rng: Rng,
}

impl Sampler {
    pub fn new(sampling: Sampling, seed: u64) -> Sampler {
        Sampler {
            sampling,
            rng: Rng::new(seed),
        }
    }

    /// The next token of `logits` (one per id of the vocabulary).
    pub fn next(&mut self, logits: &[f32]) -> u32 {
        if self.sampling.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.sampling.temperature as f64;
        // Most likely first; ties by id, so the order is the same on every machine.
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if self.sampling.top_k > 0 {
            order.truncate(self.sampling.top_k);
        }
        let max = logits[order[0] as usize] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i as usize] as f64 - max) * inv_t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        // The smallest prefix whose probability reaches top_p (at least one token).
        let mut kept = 0.0;
        let mut n = 0;
        while n < probs.len() && (n == 0 || kept < self.sampling.top_p as f64) {
            kept += probs[n];
            n += 1;
        }
        let mut u = self.rng.uniform() * kept;
        for (&id, &p) in order[..n].iter().zip(&probs[..n]) {
            if u < p {
                return id;
            }
            u -= p;
        }
        order[n - 1]
    }
}

/// The index of the largest logit, the first of equals.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: usize, top_p: f32) -> Sampler {
        Sampler::new(
            Sampling {
                temperature,
                top_k,
                top_p,
            },
            5,
        )
    }

    #[test]
    fn temperature_zero_is_the_first_largest() {
        assert_eq!(sampler(0.0, 0, 1.0).next(&[1.0, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_and_a_tiny_top_p_are_greedy() {
        let logits = [0.5, 2.0, 1.9, -3.0];
        for _ in 0..50 {
            assert_eq!(sampler(1.0, 1, 1.0).next(&logits), 1);
            assert_eq!(sampler(1.0, 0, 1e-6).next(&logits), 1);
        }
    }

    /// Frequencies of 20 000 draws match softmax(logits / T) within 1.5 %, and top-k / top-p keep
    /// the draws to their tokens.
    #[test]
    fn draws_follow_the_tempered_softmax_and_the_filters() {
        let logits = [1.0f32, 0.0, 2.0, -1.0];
        let t = 0.7f64;
        let z: f64 = logits.iter().map(|&l| (l as f64 / t).exp()).sum();
        let want: Vec<f64> = logits.iter().map(|&l| (l as f64 / t).exp() / z).collect();
        let mut s = sampler(t as f32, 0, 1.0);
        let mut counts = [0usize; 4];
        let n = 20_000;
        for _ in 0..n {
            counts[s.next(&logits) as usize] += 1;
        }
        for (c, w) in counts.iter().zip(&want) {
            assert!(
                (*c as f64 / n as f64 - w).abs() < 0.015,
                "{counts:?} vs {want:?}"
            );
        }
        // p = (0.79, 0.19, ...) for ids (2, 0, ...) at T = 0.7: top-p 0.9 keeps ids 2 and 0.
        let mut s = sampler(t as f32, 0, 0.9);
        let mut k = sampler(t as f32, 2, 1.0);
        for _ in 0..2000 {
            assert!(matches!(s.next(&logits), 0 | 2));
            assert!(matches!(k.next(&logits), 0 | 2));
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(
                Sampling {
                    temperature: 1.0,
                    top_k: 0,
                    top_p: 1.0,
                },
                seed,
            );
            (0..20).map(|_| s.next(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }
}
