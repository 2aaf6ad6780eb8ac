//! `strata generate MODEL --prompt TEXT`: a continuation of the prompt by a model strata trains,
//! on the CPU or a GPU, with a key/value cache; greedy at temperature 0, else sampled with
//! top-k / top-p from a seeded generator; each token printed (and flushed) as it comes.
//!
//! MODEL is read by [`source`]; the model is built by `model::build` and walked by
//! [`decoder::Decoder`] with the models' own blocks ([`crate::model::decode`]). With a tokenizer
//! (`--tokenizer`, or a `tokenizer.json` beside MODEL) the prompt is text and so is the output;
//! without one the prompt is token ids ("1 2 3") and ids are printed.

pub mod decoder;
pub mod sample;
pub mod source;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{DeviceError, DeviceOptions, Precision};
use crate::config::DeviceKind;
use crate::data::prepare::Tokenizer;
use crate::data::DataError;
use crate::engine::EngineError;
use crate::weights::WeightsError;
use decoder::Decoder;
use sample::{Sampler, Sampling};

/// `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GenerateDevice {
    /// The GPU when a CUDA driver reports one, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// The arguments of `strata generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// A strata checkpoint (or a directory of checkpoints: its newest), or a .safetensors file
    /// with the config.json `strata export` writes beside it.
    pub model: PathBuf,
    /// The text to continue; token ids ("1 2 3") when the model has no tokenizer.
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0: greedy (the most likely token each time).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample among the K most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample among the most likely tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// gpt2, bytes, a directory with a tokenizer.json, or a tokenizer.json (default: the
    /// tokenizer.json beside MODEL, if any).
    #[arg(long)]
    pub tokenizer: Option<String>,
    #[arg(long, value_enum, default_value_t = GenerateDevice::Auto)]
    pub device: GenerateDevice,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

/// A wait on the device fails after this long without progress.
const STALL_TIMEOUT: Duration = Duration::from_secs(600);

/// The tokenizer `--tokenizer` names, or the first `tokenizer.json` of `dirs`.
fn tokenizer(flag: Option<&str>, dirs: &[PathBuf]) -> Result<Option<Tokenizer>, GenerateError> {
    if let Some(spec) = flag {
        return Ok(Some(Tokenizer::load(spec)?));
    }
    match dirs.iter().find(|d| d.join("tokenizer.json").is_file()) {
        Some(dir) => Ok(Some(Tokenizer::load(&dir.to_string_lossy())?)),
        None => Ok(None),
    }
}

/// The prompt's token ids: the tokenizer's (with what it adds before a text, BOS for Llama), or
/// the ids written out.
fn prompt_ids(prompt: &str, tokenizer: Option<&Tokenizer>) -> Result<Vec<u32>, GenerateError> {
    let ids = match tokenizer {
        Some(t) => {
            let mut ids = t.prefix().to_vec();
            t.encode(prompt, &mut ids, None).map_err(|e| {
                GenerateError::Input(format!("--prompt: the tokenizer failed: {e}"))
            })?;
            ids
        }
        None => prompt
            .split_whitespace()
            .map(|w| w.parse::<u32>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                GenerateError::Input(
                    "--prompt is text, but MODEL has no tokenizer.json beside it: give --tokenizer \
                     DIR|tokenizer.json, or the prompt as token ids (\"1 2 3\")"
                        .into(),
                )
            })?,
    };
    if ids.is_empty() {
        return Err(GenerateError::Input("--prompt has no tokens".into()));
    }
    Ok(ids)
}

/// Prints tokens as they come: ids, or the text they add to what was printed.
struct Printer<'a> {
    tokenizer: Option<&'a Tokenizer>,
    ids: Vec<u32>,
    printed: usize,
}

impl Printer<'_> {
    fn push(&mut self, id: u32, out: &mut impl Write) -> Result<(), GenerateError> {
        self.ids.push(id);
        match self.tokenizer {
            None => write!(out, "{}{id}", if self.ids.len() > 1 { " " } else { "" })?,
            Some(t) => {
                let text = t
                    .decode(&self.ids)
                    .map_err(|e| GenerateError::Input(format!("decoding token {id}: {e}")))?;
                // A character split over tokens waits for its last byte.
                if !text.ends_with('\u{FFFD}') && text.len() >= self.printed {
                    if let Some(new) = text.get(self.printed..) {
                        write!(out, "{new}")?;
                        self.printed = text.len();
                    }
                }
            }
        }
        out.flush()?;
        Ok(())
    }

    /// Prints what a character split over tokens held back at the end (as U+FFFD).
    fn finish(&mut self, out: &mut impl Write) -> Result<(), GenerateError> {
        if let Some(t) = self.tokenizer {
            let text = t
                .decode(&self.ids)
                .map_err(|e| GenerateError::Input(format!("decoding the continuation: {e}")))?;
            write!(out, "{}", text.get(self.printed..).unwrap_or(""))?;
        }
        writeln!(out)?;
        out.flush()?;
        Ok(())
    }
}

/// Runs `strata generate`; the continuation goes to stdout, a summary line to stderr.
pub fn run(args: &GenerateArgs) -> Result<(), GenerateError> {
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
    };
    sampling.check().map_err(GenerateError::Input)?;
    let source::Source {
        config,
        params,
        eos,
        tokenizer_dirs,
    } = source::load(&args.model)?;
    let tokenizer = tokenizer(args.tokenizer.as_deref(), &tokenizer_dirs)?;
    let ids = prompt_ids(&args.prompt, tokenizer.as_ref())?;
    let mut model = crate::model::build(&config);
    let (vocab, seq_len) = (model.vocab_size(), model.seq_len());
    if ids.len() > seq_len {
        return Err(GenerateError::Input(format!(
            "--prompt has {} tokens; the model takes at most {seq_len} (its seq_len)",
            ids.len()
        )));
    }
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(GenerateError::Input(format!(
            "--prompt: token id {id} is outside the model's vocabulary of {vocab}"
        )));
    }
    let capacity = seq_len.min(ids.len() + args.max_new_tokens);
    if capacity < ids.len() + args.max_new_tokens {
        eprintln!(
            "note: the model takes {seq_len} positions: at most {} new tokens",
            capacity - ids.len()
        );
    }
    let backend = crate::engine::resolve_backend(match args.device {
        GenerateDevice::Auto => DeviceKind::Auto,
        GenerateDevice::Cpu => DeviceKind::Cpu,
        GenerateDevice::Cuda => DeviceKind::Cuda,
    });
    let x = Precision::Fp32.dtype();
    let arena_bytes = Decoder::arena_bytes(model.as_mut(), capacity, ids.len(), x)?;
    let dev = crate::backend::open(&DeviceOptions {
        backend,
        precision: Precision::Fp32,
        arena_bytes,
        budget_bytes: None,
        threads: 0,
        ordinal: 0,
        stall_timeout: STALL_TIMEOUT,
    })?;
    let device_name = dev.name();
    let mut decoder = Decoder::new(Arc::clone(&dev), model, &params, capacity)?;
    // The device holds the weights now.
    drop(params);
    let mut sampler = Sampler::new(sampling, args.seed);
    let mut printer = Printer {
        tokenizer: tokenizer.as_ref(),
        ids: Vec::new(),
        printed: 0,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let start = Instant::now();
    let mut logits = decoder.step(&ids)?;
    let prefill = start.elapsed();
    let mut generated = 0;
    while generated < capacity - ids.len() {
        let id = sampler.next(&logits);
        generated += 1;
        let eos = eos.contains(&id);
        if !(eos && tokenizer.is_some()) {
            printer.push(id, &mut out)?;
        }
        if eos || generated == capacity - ids.len() {
            break;
        }
        logits = decoder.step(&[id])?;
    }
    printer.finish(&mut out)?;
    let total = start.elapsed();
    let decode = total.saturating_sub(prefill).as_secs_f64();
    eprintln!(
        "{generated} tokens after a prompt of {} on {device_name}: prompt {:.1} ms, {:.1} tokens/s after it",
        ids.len(),
        prefill.as_secs_f64() * 1e3,
        if decode > 0.0 { (generated.saturating_sub(1)) as f64 / decode } else { 0.0 },
    );
    Ok(())
}
