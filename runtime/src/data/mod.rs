//! Training data: llm.c token files (memory-mapped) or the built-in synthetic set, cut into micro-batches.
//!
//! Batch rule with `shuffle = false` (as llm.c's loader): micro-batch j — counted across steps and gradient
//! accumulation — starts at token `p_j = (j mod E)·B·T` where `E = ⌊(N − 1)/(B·T)⌋` micro-batches fit in the
//! N tokens; row b holds tokens `[p_j + b·T, p_j + b·T + T + 1)`: inputs are the first T, targets the last T.
//! With `shuffle = true`, row b of micro-batch j starts at an offset drawn uniformly from `[0, N − T − 1]` by
//! a generator seeded with (seed, j, b).

pub mod prepare;
pub mod synthetic;
pub mod tokens;

use crate::model::Batch;
use crate::rng::Rng;
use std::path::{Path, PathBuf};
use tokens::TokenFile;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The OS error is in the message, not a `source`, so a chain printed with `{:#}` says it once.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Input(#[from] crate::inputs::InputError),
    #[error(transparent)]
    Output(Box<crate::outputs::OutputError>),
}

impl From<crate::outputs::OutputError> for DataError {
    fn from(e: crate::outputs::OutputError) -> Self {
        DataError::Output(Box::new(e))
    }
}

enum Tokens {
    File(TokenFile),
    Memory(Vec<u16>),
}

impl Tokens {
    fn len(&self) -> usize {
        match self {
            Tokens::File(f) => f.len(),
            Tokens::Memory(v) => v.len(),
        }
    }
    /// Copies tokens `[start, start + out.len())` into `out`.
    fn read(&self, start: usize, out: &mut [u16]) -> Result<(), DataError> {
        match self {
            Tokens::File(f) => f.read(start, out),
            Tokens::Memory(v) => {
                out.copy_from_slice(&v[start..start + out.len()]);
                Ok(())
            }
        }
    }
}

/// Produces micro-batches in the documented order.
pub struct Loader {
    tokens: Tokens,
    origin: String,
    b: usize,
    t: usize,
    seed: u64,
    shuffle: bool,
    /// Index j of the next micro-batch.
    next: u64,
    /// How far j advances per micro-batch: the number of data-parallel ranks.
    stride: u64,
    /// One row's tokens (T + 1), read at once.
    window: Vec<u16>,
}

impl Loader {
    /// `source` is `"synthetic"` or the path of a token file.
    pub fn new(
        source: &str,
        vocab_size: usize,
        b: usize,
        t: usize,
        seed: u64,
        shuffle: bool,
    ) -> Result<Loader, DataError> {
        let (tokens, origin) = if source == "synthetic" {
            if vocab_size > 1 << 16 {
                return Err(DataError::Format {
                    path: PathBuf::from("synthetic"),
                    message: format!(
                        "model.vocab_size = {vocab_size} exceeds the uint16 token range"
                    ),
                });
            }
            (
                Tokens::Memory(synthetic::synthetic_tokens(vocab_size, seed)),
                "synthetic".to_string(),
            )
        } else {
            let path = Path::new(source);
            (
                Tokens::File(TokenFile::open(path, vocab_size)?),
                path.display().to_string(),
            )
        };
        Loader::from_tokens(tokens, origin, b, t, seed, shuffle)
    }

    /// The loader `config` describes (`data.train`, `data.micro_batch_size`, `model.seq_len`, …).
    pub fn from_config(config: &crate::config::Config) -> Result<Loader, DataError> {
        let (d, m) = (&config.data, &config.model);
        Loader::new(
            &d.train,
            m.vocab_size,
            d.micro_batch_size,
            m.seq_len,
            d.seed,
            d.shuffle,
        )
    }

    /// A loader over tokens in memory (tests, the library API).
    pub fn from_vec(
        tokens: Vec<u16>,
        b: usize,
        t: usize,
        seed: u64,
        shuffle: bool,
    ) -> Result<Loader, DataError> {
        Loader::from_tokens(Tokens::Memory(tokens), "memory".into(), b, t, seed, shuffle)
    }

    fn from_tokens(
        tokens: Tokens,
        origin: String,
        b: usize,
        t: usize,
        seed: u64,
        shuffle: bool,
    ) -> Result<Loader, DataError> {
        let need = if shuffle { t + 1 } else { b * t + 1 };
        if tokens.len() < need {
            return Err(DataError::Format {
                path: PathBuf::from(&origin),
                message: format!(
                    "{} tokens are fewer than one micro-batch needs ({need} = data.micro_batch_size {b} × model.seq_len {t} + 1)",
                    tokens.len()
                ),
            });
        }
        Ok(Loader {
            tokens,
            origin,
            b,
            t,
            seed,
            shuffle,
            next: 0,
            stride: 1,
            window: vec![0; t + 1],
        })
    }

    /// Data parallelism: this rank reads micro-batches j ≡ rank (mod world), so the ranks together read the
    /// sequence a single rank would, and each step's micro-batches are those of one rank with
    /// `world` times the gradient accumulation.
    pub fn shard(mut self, rank: usize, world: usize) -> Loader {
        assert!(rank < world);
        self.next = rank as u64;
        self.stride = world as u64;
        self
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Index of the next micro-batch (for resuming: `seek`).
    pub fn position(&self) -> u64 {
        self.next
    }

    pub fn seek(&mut self, micro_batch: u64) {
        self.next = micro_batch;
    }

    /// Fills `batch` (shaped B × T) with the next micro-batch.
    ///
    /// # Panics
    /// If the token file cannot be read any more (it shrank or was changed under the running job);
    /// [`Loader::try_fill`] returns that as an error naming the file and offset.
    pub fn fill(&mut self, batch: &mut Batch) {
        if let Err(e) = self.try_fill(batch) {
            panic!("{e}");
        }
    }

    /// Fills `batch` (shaped B × T) with the next micro-batch, or says why the data cannot be read.
    pub fn try_fill(&mut self, batch: &mut Batch) -> Result<(), DataError> {
        let (b, t) = (self.b, self.t);
        assert!(
            batch.b == b
                && batch.t == t
                && batch.inputs.len() == b * t
                && batch.targets.len() == b * t
        );
        let j = self.next;
        self.next += self.stride;
        let n = self.tokens.len();
        let epoch_batches = ((n - 1) / (b * t)) as u64;
        for row in 0..b {
            let start = if self.shuffle {
                Rng::derive(self.seed, j, row as u64).below((n - t) as u64) as usize
            } else {
                (j % epoch_batches) as usize * b * t + row * t
            };
            self.tokens.read(start, &mut self.window)?;
            let (inputs, targets) = (
                &mut batch.inputs[row * t..(row + 1) * t],
                &mut batch.targets[row * t..(row + 1) * t],
            );
            for (i, (x, y)) in inputs.iter_mut().zip(targets).enumerate() {
                *x = u32::from(self.window[i]);
                *y = u32::from(self.window[i + 1]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
