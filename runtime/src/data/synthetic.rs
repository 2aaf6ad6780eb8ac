//! The built-in synthetic data set: a random sparse Markov chain over the vocabulary. Each token has three
//! successors with probabilities 0.6, 0.3 and 0.1, so the best possible loss is their entropy, 0.90 nats,
//! far below the ln(vocab_size) of an untrained model; a small GPT learns it in a few hundred steps.

use crate::rng::Rng;

pub const SYNTHETIC_TOKENS: usize = 1 << 20;
/// The entropy of the successor distribution: the lowest loss a model can reach on this data.
pub const SYNTHETIC_ENTROPY_NATS: f64 = 0.897_945;

/// The token stream for a vocabulary of `vocab_size`, determined by `seed` (the same ids whatever the
/// width the vocabulary needs).
pub fn synthetic_tokens(vocab_size: usize, seed: u64) -> Vec<u32> {
    let (successors, mut rng) = markov_chain(vocab_size, seed);
    walk(&successors, &mut rng)
}

/// A held-out stream for validation: the same Markov chain as [`synthetic_tokens`] with `seed` (so the same
/// best loss), walked by a generator from another seed, so it is not a copy of the training stream.
pub fn synthetic_val_tokens(vocab_size: usize, seed: u64) -> Vec<u32> {
    let (successors, _) = markov_chain(vocab_size, seed);
    walk(&successors, &mut Rng::derive(seed, 0x76_616c, 0))
}

/// Three successors for every token, drawn from `seed`; returns the generator in the state the training stream
/// continues from.
fn markov_chain(vocab_size: usize, seed: u64) -> (Vec<[u32; 3]>, Rng) {
    assert!((1..=1 << 32).contains(&vocab_size));
    let mut rng = Rng::derive(seed, 0x5157, 0);
    let v = vocab_size as u64;
    let successors: Vec<[u32; 3]> = (0..vocab_size)
        .map(|_| {
            [
                rng.below(v) as u32,
                rng.below(v) as u32,
                rng.below(v) as u32,
            ]
        })
        .collect();
    (successors, rng)
}

/// `SYNTHETIC_TOKENS` tokens from a random start, each followed by one of its successors with probabilities
/// 0.6, 0.3 and 0.1.
fn walk(successors: &[[u32; 3]], rng: &mut Rng) -> Vec<u32> {
    let mut tokens = Vec::with_capacity(SYNTHETIC_TOKENS);
    let mut cur = rng.below(successors.len() as u64) as u32;
    for _ in 0..SYNTHETIC_TOKENS {
        tokens.push(cur);
        let u = rng.uniform();
        let pick = if u < 0.6 {
            0
        } else if u < 0.9 {
            1
        } else {
            2
        };
        cur = successors[cur as usize][pick];
    }
    tokens
}
