//! strata: a ZeRO-Infinity style training runtime.
//!
//! Library use: build a [`Config`] (from TOML or in code), an [`Engine`] for GPT-2, the Llama family or any [`model::Model`]
//! (on the CPU or a GPU: `train.device`), feed it micro-batches from a [`data::Loader`] (or your own), and
//! read [`StepStats`].
//! See `examples/` for a training loop and a custom model.

pub mod agree;
pub mod backend;
pub mod config;
pub mod data;
pub mod doctor;
pub mod engine;
pub mod export;
pub mod generate;
pub mod inputs;
pub mod model;
pub mod optim;
pub mod outputs;
pub mod plan;
pub mod rng;
pub mod selftest;
pub mod tensorboard;
pub mod testing;
pub mod threads;
pub mod trace;
pub mod train;
pub mod weights;

pub use config::Config;
pub use engine::{Engine, EngineError, StepStats};
pub use model::{Batch, Model};
