//! The training driver behind `strata train`: data, engine, logging, metrics file, export.

use crate::config::{Config, DeviceKind, Precision};
use crate::data::{DataError, Loader};
use crate::engine::{Engine, EngineError, StepStats, Trainer};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Outputs(Box<crate::outputs::OutputError>),
    #[error("{error}; training stopped after step {step}; {export}")]
    MetricsWrite {
        step: usize,
        error: Box<crate::outputs::OutputError>,
        export: String,
    },
}

impl From<crate::outputs::OutputError> for TrainError {
    fn from(e: crate::outputs::OutputError) -> Self {
        TrainError::Outputs(Box::new(e))
    }
}

/// What became of the export after a failed metrics write, for the error message.
fn describe_export(
    step: usize,
    export: &Option<(&std::path::Path, Result<(), EngineError>)>,
) -> String {
    match export {
        None => "train.export_to is not set, so no weights were saved".into(),
        Some((target, Ok(()))) => format!(
            "the weights of step {step} were exported to {}",
            target.display()
        ),
        Some((target, Err(e))) => format!(
            "exporting the weights to {} failed too: {e}",
            target.display()
        ),
    }
}

/// What a run did, printed at its end.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub steps: usize,
    pub params: usize,
    pub first_loss: f32,
    /// Mean loss of the last (up to) 10 steps.
    pub final_loss: f32,
    pub tokens: usize,
    pub seconds: f64,
    /// Mean over steps after the first (which includes warm-up effects).
    pub tokens_per_s: f64,
    pub tflops: f64,
    /// The data-parallel rank that wrote this summary (only rank 0 prints it).
    pub rank: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "done: {} steps, {} params, loss {:.4} -> {:.4} (mean of last 10), {} tokens in {:.1}s, {:.0} tokens/s, {:.3} TFLOP/s",
            self.steps, self.params, self.first_loss, self.final_loss, self.tokens, self.seconds, self.tokens_per_s, self.tflops
        )
    }
}

/// Where log lines go: through the progress bar on a terminal, through `tracing` elsewhere.
struct Reporter {
    bar: Option<ProgressBar>,
    /// Only rank 0 reports.
    enabled: bool,
}

impl Reporter {
    fn new(steps: usize, enabled: bool) -> Reporter {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(steps as u64);
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:40} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta}]",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Reporter { bar, enabled }
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None if self.enabled => tracing::info!("{text}"),
            None => {}
        }
    }

    fn tick(&self, s: &StepStats) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {:.4}  {:.0} tok/s", s.loss, s.tokens_per_s));
            bar.inc(1);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn format_step(s: &StepStats, total: usize) -> String {
    format!(
        "step {:>5}/{total} | loss {:.4} | lr {:.3e} | grad norm {:.4} | {:.0} tokens/s | {:.1} ms/step | {:.3} TFLOP/s",
        s.step + 1,
        s.loss,
        s.lr,
        s.grad_norm,
        s.tokens_per_s,
        s.step_ms,
        s.tflops
    )
}

/// The device `train.device` resolves to: `auto` takes the GPU when a CUDA driver reports one.
pub fn resolve_device(device: DeviceKind) -> DeviceKind {
    match device {
        DeviceKind::Auto if crate::backend::cuda::gpu_available() => DeviceKind::Cuda,
        DeviceKind::Auto => DeviceKind::Cpu,
        other => other,
    }
}

/// The trainer for the configured device: the CPU [`Engine`], or the GPU trainer.
pub fn build_trainer(config: &Config) -> Result<Box<dyn Trainer>, EngineError> {
    match resolve_device(config.train.device) {
        // precision = "auto" is bf16 on the GPU (backend::cuda::trainer::gpu_precision).
        DeviceKind::Cuda => Ok(Box::new(crate::backend::cuda::GpuGpt2Trainer::new(config)?)),
        _ => {
            if !matches!(config.train.precision, Precision::Auto | Precision::Fp32) {
                return Err(EngineError::Batch(format!(
                    "train.precision = {:?} needs a GPU, and train.device resolved to the CPU",
                    config.train.precision
                )));
            }
            Ok(Box::new(Engine::from_config(config.clone())?))
        }
    }
}

/// Trains as `config` says and returns the summary.
pub fn run(config: Config) -> Result<Summary, TrainError> {
    // Before anything heavy: outputs resolved, checked against the inputs and for space, and locked.
    let outputs = crate::outputs::TrainOutputs::prepare(&config)?;
    let mut engine = build_trainer(&config)?;
    // Rank 0 speaks for the group: it logs, writes metrics and exports; every rank trains.
    let (rank, world) = (engine.rank(), engine.world_size());
    let lead = rank == 0;
    let d = &config.data;
    let m = &config.model;
    let mut loader = Loader::from_config(&config)?.shard(rank, world);
    // Rank 0's outputs only (TrainOutputs is empty elsewhere).
    let mut metrics = outputs.metrics_file()?;
    if lead {
        tracing::info!("effective config:\n{}", config.to_toml());
        tracing::info!("data: {} ({} tokens)", loader.origin(), loader.num_tokens());
        tracing::info!(
            "model: GPT-2, {} params on {:?}, {world} rank(s); {} tokens per step",
            engine.num_params(),
            resolve_device(config.train.device),
            d.micro_batch_size * m.seq_len * d.grad_accum_steps * world
        );
    }
    let steps = config.train.steps;
    let log_every = config.train.log_every;
    let mut batches: Vec<_> = (0..d.grad_accum_steps)
        .map(|_| engine.new_batch())
        .collect();
    let reporter = Reporter::new(if lead { steps } else { 0 }, lead);
    let mut history = Vec::with_capacity(steps);
    let mut metrics_failure = None;
    for step in 0..steps {
        for b in batches.iter_mut() {
            loader.try_fill(b)?;
        }
        let stats = engine.train_step(&batches)?;
        if let Some(m) = metrics.as_mut() {
            let line = serde_json::to_string(&stats).unwrap_or_default();
            metrics_failure = m.write_line(&line).err().map(|e| (step + 1, e));
        }
        if (step + 1) % log_every == 0 || step == 0 || step + 1 == steps {
            reporter.line(format_step(&stats, steps));
        }
        reporter.tick(&stats);
        history.push(stats);
        if metrics_failure.is_some() {
            break;
        }
    }
    reporter.finish();
    let export = outputs
        .export_target()
        .map(|target| (target, engine.save_weights(target)));
    if let Some((step, error)) = metrics_failure {
        let export = describe_export(step, &export);
        return Err(TrainError::MetricsWrite {
            step,
            error: Box::new(error),
            export,
        });
    }
    if let Some((target, result)) = export {
        result?;
        tracing::info!("weights written to {}", target.display());
    }
    Ok(summarize(&history, engine.num_params(), rank))
}

fn summarize(history: &[StepStats], params: usize, rank: usize) -> Summary {
    let tail = &history[history.len().saturating_sub(10)..];
    let timed = if history.len() > 1 {
        &history[1..]
    } else {
        history
    };
    let seconds_timed: f64 = timed.iter().map(|s| s.step_ms / 1e3).sum();
    let tokens_timed: usize = timed.iter().map(|s| s.tokens).sum();
    let flops_timed: f64 = timed.iter().map(|s| s.tflops * s.step_ms / 1e3).sum();
    Summary {
        steps: history.len(),
        params,
        first_loss: history.first().map_or(f32::NAN, |s| s.loss),
        final_loss: tail.iter().map(|s| s.loss).sum::<f32>() / tail.len().max(1) as f32,
        tokens: history.iter().map(|s| s.tokens).sum(),
        seconds: history.iter().map(|s| s.step_ms / 1e3).sum(),
        tokens_per_s: tokens_timed as f64 / seconds_timed.max(1e-9),
        tflops: flops_timed / seconds_timed.max(1e-9),
        rank,
    }
}
