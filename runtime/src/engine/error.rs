//! `EngineError`: every failure of the engine, by what failed. No backend type appears here:
//! device failures arrive as the seam's `DeviceError`.

use crate::agree::AgreeError;
use crate::backend::DeviceError;
use crate::weights::WeightsError;
use strata_collectives::CommError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The device failed or refused an operation (no GPU, a failed kernel, a stalled queue).
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The plan does not fit in device memory; the message says what takes it and what to change.
    #[error("{0}")]
    DoesNotFit(String),
    /// A micro-batch the engine cannot train on.
    #[error(transparent)]
    Data(#[from] BatchError),
    /// A collective between ranks failed.
    #[error(transparent)]
    Collective(#[from] CommError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// `step`: the steps taken before (the message counts from 1, as the log does).
    #[error("step {}: {what} is not finite ({value}); the update was skipped and the weights are unchanged", .step + 1)]
    NonFinite {
        step: usize,
        what: &'static str,
        value: f32,
    },
    /// The ranks were started with different configs (or code); names the keys and ranks.
    #[error("{0}")]
    RanksDisagree(String),
    /// A checkpoint that cannot be written or read; names the file and what is wrong.
    #[error("checkpoint {0}")]
    Checkpoint(String),
    /// A setting the engine cannot honour; names the key.
    #[error("{key}: {message}")]
    Setting { key: &'static str, message: String },
}

impl From<AgreeError> for EngineError {
    fn from(e: AgreeError) -> Self {
        match e {
            AgreeError::Comm(c) => EngineError::Collective(c),
            other => EngineError::RanksDisagree(other.to_string()),
        }
    }
}

/// What is wrong with the micro-batches handed to a step.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("a step needs at least one micro-batch")]
    Empty,
    #[error("a step got {got} micro-batches; the engine was built for 1 to {max} (data.grad_accum_steps)")]
    TooMany { got: usize, max: usize },
    #[error("micro-batch {index} is {b}x{t} ({inputs} inputs, {targets} targets); the engine was built for {want_b}x{want_t}")]
    Shape {
        index: usize,
        b: usize,
        t: usize,
        inputs: usize,
        targets: usize,
        want_b: usize,
        want_t: usize,
    },
    #[error("micro-batch {index}: token {token} is not below model.vocab_size = {vocab}")]
    Token {
        index: usize,
        token: u32,
        vocab: usize,
    },
}
