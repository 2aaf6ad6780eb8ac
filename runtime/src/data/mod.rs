//! Training data: llm.c token files (memory-mapped) or the built-in synthetic set, cut into micro-batches.
//!
//! Batch rule with `shuffle = false` (as llm.c's loader): micro-batch j — counted across steps and gradient
//! accumulation — starts at token `p_j = (j mod E)·B·T` where `E = ⌊(N − 1)/(B·T)⌋` micro-batches fit in the
//! N tokens; row b holds tokens `[p_j + b·T, p_j + b·T + T + 1)`: inputs are the first T, targets the last T.
//! With `shuffle = true`, row b of micro-batch j starts at an offset drawn uniformly from `[0, N − T − 1]` by
//! a generator seeded with (seed, j, b).
//!
//! A token file with a loss mask (see [`tokens`]) gives [`IGNORE_TARGET`] for every target whose mask byte
//! is 0: the data says what to train on, whatever the config.

pub mod prepare;
pub mod synthetic;
pub mod tokens;

use crate::model::{Batch, IGNORE_TARGET};
use crate::rng::Rng;
use std::path::{Path, PathBuf};
use tokens::TokenFile;

/// A data error; it names the file (and byte offset) it is about. An OS error is the variant's `source()`, not
/// repeated in its message.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The OS error is in the message, not a `source`, so a chain printed with `{:#}` says it once.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create directory {path}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A token file that is not there; `key` is the config key that names it, when known.
    #[error(
        "{}token file {path} does not exist; make it from a text file with `strata prepare TEXT_FILE -o FILE` \
         (or use {}\"synthetic\")",
        key_prefix(*.key),
        key_equals(*.key)
    )]
    NotFound {
        key: Option<&'static str>,
        path: PathBuf,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A call the loader cannot serve (a batch of another shape, a rank outside the world).
    #[error("{0}")]
    Argument(String),
    /// An argument or input that cannot be used (`strata prepare`'s patterns, fractions, a chat template that
    /// does not compile), in a message that names it.
    #[error("{0}")]
    Usage(String),
    /// The launcher's variables (RANK, WORLD_SIZE, …) are set but do not say a rank.
    #[error("data-parallel rank: {0}")]
    Rank(String),
    /// A record of an input (a line of a text or JSONL file) that cannot be made into tokens.
    #[error("{}:{line}: {message}", path.display())]
    Record {
        path: PathBuf,
        line: u64,
        message: String,
    },
    /// A row of a parquet input that cannot be read or made into tokens.
    #[error("{}: row {row}: {message}", path.display())]
    Row {
        path: PathBuf,
        row: u64,
        message: String,
    },
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

fn key_prefix(key: Option<&'static str>) -> String {
    key.map(|k| format!("{k}: ")).unwrap_or_default()
}

fn key_equals(key: Option<&'static str>) -> String {
    key.map(|k| format!("{k} = ")).unwrap_or_default()
}

impl DataError {
    /// Names the config key (`data.train`, `data.val`) in a missing-file error.
    fn for_key(self, key: &'static str) -> DataError {
        match self {
            DataError::NotFound { path, .. } => DataError::NotFound {
                key: Some(key),
                path,
            },
            other => other,
        }
    }
}

/// Tokens in memory or in a file, with their loss mask (1: a target the loss counts, 0: ignored).
enum Tokens {
    File(TokenFile),
    Memory {
        ids: Vec<u32>,
        mask: Option<Vec<u8>>,
    },
}

impl Tokens {
    fn len(&self) -> usize {
        match self {
            Tokens::File(f) => f.len(),
            Tokens::Memory { ids, .. } => ids.len(),
        }
    }

    fn masked(&self) -> bool {
        match self {
            Tokens::File(f) => f.layout().masked,
            Tokens::Memory { mask, .. } => mask.is_some(),
        }
    }

    /// Copies tokens `[start, start + out.len())` into `out`.
    fn read(&self, start: usize, out: &mut [u32]) -> Result<(), DataError> {
        match self {
            Tokens::File(f) => f.read(start, out),
            Tokens::Memory { ids, .. } => {
                out.copy_from_slice(&ids[start..start + out.len()]);
                Ok(())
            }
        }
    }

    /// Copies mask bytes `[start, start + out.len())` into `out` (all ones without a mask).
    fn read_mask(&self, start: usize, out: &mut [u8]) -> Result<(), DataError> {
        match self {
            Tokens::File(f) => f.read_mask(start, out),
            Tokens::Memory { mask: None, .. } => {
                out.fill(1);
                Ok(())
            }
            Tokens::Memory { mask: Some(m), .. } => {
                out.copy_from_slice(&m[start..start + out.len()]);
                Ok(())
            }
        }
    }
}

fn memory(ids: Vec<u32>) -> Tokens {
    Tokens::Memory { ids, mask: None }
}

/// Opens a token file; a file that is not there is [`DataError::NotFound`], which says how to make one.
fn open_token_file(source: &str, vocab_size: usize) -> Result<Tokens, DataError> {
    let path = Path::new(source);
    match TokenFile::open(path, vocab_size) {
        Ok(file) => Ok(Tokens::File(file)),
        Err(DataError::Input(crate::inputs::InputError::Missing { .. })) => {
            Err(DataError::NotFound {
                key: None,
                path: path.to_path_buf(),
            })
        }
        Err(e) => Err(e),
    }
}

/// This process's data-parallel rank and the world size, from the launcher's variables as the engine's
/// communicator reads them (`strata launch`, torchrun, srun, mpirun); `(0, 1)` when none are set.
pub fn rank_from_env() -> Result<(usize, usize), DataError> {
    match strata_collectives::RankInfo::from_env_if_launched() {
        Ok(Some(info)) => Ok((info.rank, info.world_size)),
        Ok(None) => Ok((0, 1)),
        Err(e) => Err(DataError::Rank(e.to_string())),
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
    /// This loader's rank among `stride` ranks.
    rank: u64,
    /// One row's tokens (T + 1), read at once.
    window: Vec<u32>,
    /// One row's mask bytes (T + 1); empty when the data has no mask.
    window_mask: Vec<u8>,
}

impl Loader {
    /// `source` is `"synthetic"` or the path of a token file. The loader reads every micro-batch (a world of
    /// one); [`Loader::shard`] makes it a rank's.
    pub fn new(
        source: &str,
        vocab_size: usize,
        b: usize,
        t: usize,
        seed: u64,
        shuffle: bool,
    ) -> Result<Loader, DataError> {
        let (tokens, origin) = if source == "synthetic" {
            (
                memory(synthetic::synthetic_tokens(vocab_size, seed)),
                "synthetic".to_string(),
            )
        } else {
            (open_token_file(source, vocab_size)?, source.to_string())
        };
        Loader::from_tokens(tokens, origin, b, t, seed, shuffle)
    }

    /// This rank's loader of the training data `config` describes (`data.train`, `data.micro_batch_size`,
    /// `model.seq_len`, …): the rank and world size are the launcher's ([`rank_from_env`]), as the engine's
    /// communicator reads them, so under `strata launch` each rank reads its own micro-batches.
    pub fn from_config(config: &crate::config::Config) -> Result<Loader, DataError> {
        let (rank, world) = rank_from_env()?;
        Loader::for_rank(config, rank, world)
    }

    /// The training loader `config` describes, for `rank` of `world` data-parallel ranks: micro-batches
    /// j ≡ rank (mod world).
    pub fn for_rank(
        config: &crate::config::Config,
        rank: usize,
        world: usize,
    ) -> Result<Loader, DataError> {
        let (d, m) = (&config.data, &config.model);
        Loader::new(
            &d.train,
            m.vocab_size,
            d.micro_batch_size,
            m.seq_len,
            d.seed,
            d.shuffle,
        )
        .map_err(|e| e.for_key("data.train"))?
        .shard(rank, world)
    }

    /// The validation loader `config` describes, if `data.val` is set: the token file read in order from its
    /// start, or for `"synthetic"` a stream of the training set's Markov chain from another seed
    /// ([`synthetic::synthetic_val_tokens`]), so that it is held out but has the same best loss. It reads
    /// every micro-batch whatever the rank; [`Loader::shard`] shares them out.
    pub fn val_from_config(config: &crate::config::Config) -> Result<Option<Loader>, DataError> {
        let (d, m) = (&config.data, &config.model);
        let Some(source) = d.val.as_deref() else {
            return Ok(None);
        };
        let (b, t) = (d.micro_batch_size, m.seq_len);
        let (tokens, origin) = if source == "synthetic" {
            (
                memory(synthetic::synthetic_val_tokens(m.vocab_size, d.seed)),
                "synthetic, held-out stream".to_string(),
            )
        } else {
            let tokens =
                open_token_file(source, m.vocab_size).map_err(|e| e.for_key("data.val"))?;
            (tokens, source.to_string())
        };
        Loader::from_tokens(tokens, origin, b, t, d.seed, false).map(Some)
    }

    /// A loader over tokens in memory (tests, the library API).
    pub fn from_vec(
        tokens: Vec<u16>,
        b: usize,
        t: usize,
        seed: u64,
        shuffle: bool,
    ) -> Result<Loader, DataError> {
        let ids = tokens.into_iter().map(u32::from).collect();
        Loader::from_tokens(memory(ids), "memory".into(), b, t, seed, shuffle)
    }

    /// A loader over tokens in memory with a loss mask (`mask[i]` = 0: token i is never a target).
    pub fn from_masked(
        tokens: Vec<u32>,
        mask: Vec<u8>,
        b: usize,
        t: usize,
        seed: u64,
        shuffle: bool,
    ) -> Result<Loader, DataError> {
        if tokens.len() != mask.len() {
            return Err(DataError::Argument(format!(
                "{} tokens but {} mask bytes: one mask byte per token",
                tokens.len(),
                mask.len()
            )));
        }
        let tokens = Tokens::Memory {
            ids: tokens,
            mask: Some(mask),
        };
        Loader::from_tokens(tokens, "memory".into(), b, t, seed, shuffle)
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
        let window_mask = if tokens.masked() {
            vec![0; t + 1]
        } else {
            Vec::new()
        };
        Ok(Loader {
            tokens,
            origin,
            b,
            t,
            seed,
            shuffle,
            next: 0,
            stride: 1,
            rank: 0,
            window: vec![0; t + 1],
            window_mask,
        })
    }

    /// Data parallelism: this rank reads micro-batches j ≡ rank (mod world), so the ranks together read the
    /// sequence a single rank would, and each step's micro-batches are those of one rank with
    /// `world` times the gradient accumulation.
    pub fn shard(mut self, rank: usize, world: usize) -> Result<Loader, DataError> {
        if rank >= world {
            return Err(DataError::Argument(format!(
                "rank {rank} is not below the world size {world}"
            )));
        }
        self.next = rank as u64;
        self.rank = rank as u64;
        self.stride = world as u64;
        Ok(self)
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the data carries a loss mask: then masked targets are [`IGNORE_TARGET`].
    pub fn masked(&self) -> bool {
        self.tokens.masked()
    }

    /// This loader's rank and the number of ranks it shares the data with.
    pub fn rank_and_world(&self) -> (usize, usize) {
        (self.rank as usize, self.stride as usize)
    }

    /// Index of the next micro-batch (for resuming: `seek`).
    pub fn position(&self) -> u64 {
        self.next
    }

    pub fn seek(&mut self, micro_batch: u64) {
        self.next = micro_batch;
    }

    /// Fills `batch` (shaped B × T) with the next micro-batch, or says why the data cannot be read
    /// (a token file that shrank or changed under the running job: the file and offset). A target whose
    /// mask byte is 0 is [`IGNORE_TARGET`].
    pub fn fill(&mut self, batch: &mut Batch) -> Result<(), DataError> {
        let (b, t) = (self.b, self.t);
        if (batch.b, batch.t, batch.inputs.len(), batch.targets.len()) != (b, t, b * t, b * t) {
            return Err(DataError::Argument(format!(
                "a batch of {}x{} with {} inputs and {} targets; this loader fills {b}x{t} \
                 (data.micro_batch_size x model.seq_len): make it with Batch::zeros({b}, {t}) or \
                 Engine::new_batch",
                batch.b,
                batch.t,
                batch.inputs.len(),
                batch.targets.len()
            )));
        }
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
            inputs.copy_from_slice(&self.window[..t]);
            targets.copy_from_slice(&self.window[1..]);
            if !self.window_mask.is_empty() {
                self.tokens.read_mask(start, &mut self.window_mask)?;
                for (y, &m) in targets.iter_mut().zip(&self.window_mask[1..]) {
                    if m == 0 {
                        *y = IGNORE_TARGET;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
