//! The training driver behind `strata train`: data, engine, validation, logging, metrics file, TensorBoard
//! scalars, timeline (`--trace`), export.
//!
//! Steps are numbered from 1 in the log, the metrics file, TensorBoard and the summary (as llm.c): step 1 is
//! the first optimizer step. The loop's phases are spans (`step` holding `data`, `train_step`, `eval` and
//! `report`), the host's track of a `--trace` timeline.

use crate::config::Config;
use crate::data::{DataError, Loader};
use crate::engine::{checkpoint, Engine, EngineError, StepStats};
use crate::model::Batch;
use crate::tensorboard::{EventWriter, TensorBoardError};
use crate::trace::{Trace, TraceError};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

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
    #[error("train.tensorboard_dir")]
    TensorBoard(#[from] TensorBoardError),
    #[error(transparent)]
    Trace(#[from] TraceError),
}

mod summary;

use summary::summarize;
pub use summary::{Stopped, Summary};

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

/// One line of `train.metrics_file`: the step's statistics, numbered from 1, and the validation loss on the
/// steps where it was computed.
#[derive(serde::Serialize)]
struct MetricsLine {
    step: usize,
    loss: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_loss: Option<f32>,
    lr: f32,
    grad_norm: f32,
    tokens: usize,
    step_ms: f64,
    tokens_per_s: f64,
    tflops: f64,
}

/// The TensorBoard scalars of a step: a new scalar is one line here.
fn scalars(s: &StepStats, val_loss: Option<f32>, io: &IoScalars) -> Vec<(&'static str, f32)> {
    let mut out = vec![
        ("train/loss", s.loss),
        ("train/lr", s.lr),
        ("train/grad_norm", s.grad_norm),
        ("perf/tokens_per_s", s.tokens_per_s as f32),
        ("perf/tflops", s.tflops as f32),
        ("perf/step_ms", s.step_ms as f32),
    ];
    out.extend(val_loss.map(|v| ("val/loss", v)));
    out.extend(io.values());
    out
}

/// Rank 0's bytes per tier and what moved in one step, as TensorBoard scalars.
struct IoScalars {
    tiers: [f32; 3],
    step: crate::engine::Traffic,
    step_s: f64,
}

impl IoScalars {
    fn values(&self) -> Vec<(&'static str, f32)> {
        let t = &self.step;
        let o = &t.offload;
        let rate =
            |b: u64, s: Option<f64>| crate::engine::Traffic::rate(b, s).unwrap_or(0.0) as f32;
        let mut out = vec![
            ("tiers/device_bytes", self.tiers[0]),
            ("tiers/host_bytes", self.tiers[1]),
            ("tiers/nvme_bytes", self.tiers[2]),
            (
                "io/nvme_read_gbps",
                rate(o.nvme_read_bytes, Some(o.nvme_read_s)),
            ),
            (
                "io/nvme_write_gbps",
                rate(o.nvme_write_bytes, Some(o.nvme_write_s)),
            ),
            ("io/h2d_gbps", rate(o.h2d_bytes, t.h2d_busy_s)),
            ("io/d2h_gbps", rate(o.d2h_bytes, t.d2h_busy_s)),
        ];
        if let Some(w) = t.compute_waited_s {
            out.push((
                "perf/compute_wait_fraction",
                (w / self.step_s.max(1e-9)) as f32,
            ));
        }
        out
    }
}

impl MetricsLine {
    fn new(s: &StepStats, val_loss: Option<f32>) -> MetricsLine {
        MetricsLine {
            step: s.step + 1,
            loss: s.loss,
            val_loss,
            lr: s.lr,
            grad_norm: s.grad_norm,
            tokens: s.tokens,
            step_ms: s.step_ms,
            tokens_per_s: s.tokens_per_s,
            tflops: s.tflops,
        }
    }
}

/// Where log lines go: through the progress bar on a terminal, through `tracing` elsewhere.
struct Reporter {
    bar: Option<ProgressBar>,
    /// Only rank 0 reports.
    enabled: bool,
    steps: usize,
    started: Instant,
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
        Reporter {
            bar,
            enabled,
            steps,
            started: Instant::now(),
        }
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None if self.enabled => tracing::info!("{text}"),
            None => {}
        }
    }

    /// `"12.3s elapsed, ETA 45.6s"` after `done` of the run's steps.
    fn progress(&self, done: usize) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let left = self.steps.saturating_sub(done);
        let eta = elapsed / done.max(1) as f64 * left as f64;
        format!(
            "{} elapsed, ETA {}",
            format_seconds(elapsed),
            format_seconds(eta)
        )
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

/// `9.8s`, `4m05s`, `2h03m`.
fn format_seconds(s: f64) -> String {
    let whole = s.max(0.0).round() as u64;
    if s < 60.0 {
        format!("{:.1}s", s.max(0.0))
    } else if whole < 3600 {
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else {
        format!("{}h{:02}m", whole / 3600, whole % 3600 / 60)
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

/// The run in one line: model size, device, precision, ranks and their backend, ZeRO stage and placement.
fn describe_run(config: &Config, engine: &Engine) -> String {
    let dev = engine.device();
    let device = match dev.backend() {
        crate::backend::Backend::Cpu => {
            let n = crate::threads::compute_threads(config.train.threads);
            format!("cpu, fp32, {n} thread{}", if n == 1 { "" } else { "s" })
        }
        crate::backend::Backend::Cuda => format!("{}, {}", dev.name(), dev.precision().name()),
    };
    let world = engine.world_size();
    let ranks = match world {
        1 => "1 rank".to_string(),
        _ => format!(
            "{world} ranks over {}",
            engine.communicator().backend().name()
        ),
    };
    let tokens_per_step =
        config.data.micro_batch_size * config.model.seq_len * config.data.grad_accum_steps * world;
    let placement = engine.placement();
    format!(
        "{}, {} params | {device} | {ranks} | {}: parameters on {}, optimizer states on {}, gradients on {} | {tokens_per_step} tokens per step",
        config.model.arch.title(),
        format_count(engine.num_params()),
        describe_stage(engine.zero_stage()),
        placement.tiers.params.name(),
        placement.optimizer_where(),
        // An offloaded optimizer sums its gradients in host memory.
        match placement.tiers.optimizer {
            crate::engine::placement::Tier::Device => "device",
            _ => "cpu",
        }
    )
}

/// The ZeRO stage and what it partitions.
fn describe_stage(stage: u8) -> &'static str {
    match stage {
        0 => "stage 0 (data parallel)",
        1 => "stage 1 (optimizer states sharded)",
        2 => "stage 2 (gradients and optimizer states sharded)",
        _ => "stage 3 (parameters, gradients and optimizer states sharded)",
    }
}

/// One line per rank: bytes per tier, and what moved between them over the timed steps.
fn tiers_line(engine: &Engine, timed: &crate::engine::Traffic, wall_s: f64) -> String {
    let p = engine.placement();
    let h = |b: u64| crate::engine::human_bytes(b as usize);
    format!(
        "rank {}: tiers: device {}, host {}{}, nvme {} | after step 1: {}",
        engine.rank(),
        h(p.device_bytes),
        h(p.host_bytes),
        if p.host_pinned { " (pinned)" } else { "" },
        h(p.nvme_bytes),
        timed.describe(wall_s)
    )
}

/// One line per rank: its peak resident memory and its device memory by purpose.
fn memory_line(engine: &Engine) -> String {
    let device: usize = engine.memory_ledger().iter().map(|(_, b)| b).sum();
    let parts: Vec<String> = engine
        .memory_ledger()
        .iter()
        .map(|(what, bytes)| format!("{what} {}", crate::engine::human_bytes(*bytes)))
        .collect();
    let rss = crate::engine::peak_rss_bytes().map_or("unknown".into(), |b| {
        format!("{} ({b} bytes)", crate::engine::human_bytes(b as usize))
    });
    format!(
        "rank {}: peak resident memory {rss}; device memory {} ({device} bytes): {}",
        engine.rank(),
        crate::engine::human_bytes(device),
        parts.join(", ")
    )
}

/// `838,272` as `0.84M`, `124,439,808` as `124.4M`, `1.3B`.
fn format_count(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e8 {
        format!("{:.1}M", n / 1e6)
    } else {
        format!("{:.2}M", n / 1e6)
    }
}

/// The held-out set and this rank's share of each evaluation: micro-batches `j < eval_batches` with
/// `j ≡ rank (mod world)`, read from the start of `data.val` every time, so evaluations are comparable.
struct Validation {
    loader: Loader,
    batch: Batch,
    /// Micro-batches this rank evaluates.
    local_batches: usize,
    rank: u64,
}

impl Validation {
    fn new(config: &Config, engine: &Engine) -> Result<Option<Validation>, TrainError> {
        let Some(loader) = Loader::val_from_config(config)? else {
            return Ok(None);
        };
        let (rank, world) = (engine.rank(), engine.world_size());
        let total = config.train.eval_batches;
        let local_batches = total / world + usize::from(rank < total % world);
        Ok(Some(Validation {
            loader: loader.shard(rank, world)?,
            batch: engine.new_batch(),
            local_batches,
            rank: rank as u64,
        }))
    }

    /// The mean loss over the counted targets of the `eval_batches` micro-batches of every rank
    /// together (with a loss mask, the targets it keeps; NaN when it keeps none).
    fn loss(&mut self, engine: &mut Engine) -> Result<f32, TrainError> {
        self.loader.seek(self.rank);
        let (mut sum, mut counted) = (0.0f64, 0usize);
        for _ in 0..self.local_batches {
            self.loader.fill(&mut self.batch)?;
            let (s, n) = engine.eval_loss_sum(&self.batch)?;
            sum += s;
            counted += n;
        }
        // [sum of losses, counted targets in two parts summed exactly], summed over ranks: ranks
        // may hold one micro-batch more than others.
        let mut totals = [
            sum as f32,
            (counted >> 16) as f32,
            (counted & 0xffff) as f32,
        ];
        if engine.world_size() > 1 {
            engine
                .communicator()
                .all_reduce(&mut totals)
                .map_err(|e| TrainError::Engine(e.into()))?;
        }
        let counted = ((totals[1] as usize) << 16) + totals[2] as usize;
        Ok((f64::from(totals[0]) / counted as f64) as f32)
    }
}

/// Warnings about a config that runs but probably not as meant.
fn warn_about(config: &Config) {
    let (warmup, steps) = (config.optim.warmup_steps, config.train.steps);
    if warmup > steps {
        tracing::warn!(
            "optim.warmup_steps = {warmup} is longer than the run (train.steps = {steps}): the learning rate \
             rises to only {:.0}% of optim.lr = {} and never decays",
            100.0 * steps as f64 / warmup as f64,
            config.optim.lr
        );
    }
}

/// Trains as `config` says and returns the summary.
pub fn run(config: Config) -> Result<Summary, TrainError> {
    run_traced(config, None)
}

/// [`run`], recording a timeline into `trace` (`strata train --trace FILE`), which it finishes at
/// the end (with several ranks, rank 0 merges their files).
pub fn run_traced(config: Config, mut trace: Option<Trace>) -> Result<Summary, TrainError> {
    // What killed strata processes left in $TMPDIR (swap files, launcher files) goes first.
    for swept in strata_collectives::scratch::sweep_all() {
        tracing::info!(
            "removed {} ({}): its strata process is gone",
            swept.path.display(),
            crate::engine::human_bytes(swept.bytes as usize)
        );
    }
    // Before anything heavy: the checkpoint to resume found; outputs (the trace's too) resolved,
    // checked against the inputs and for space, and locked; the data opened and checked.
    let resume = config
        .train
        .resume
        .as_ref()
        .map(|which| checkpoint::resolve(which, config.train.checkpoint_dir.as_deref()))
        .transpose()?;
    let params = u64::try_from(config.model.num_params()).unwrap_or(u64::MAX);
    // The export's files, every size known from the model's shapes.
    let planned = crate::export::train_export(
        &config,
        crate::model::build(&config.model).units(),
        &Default::default(),
    )
    .map_err(EngineError::from)?;
    let export_files = planned
        .as_ref()
        .map(|e| e.outputs(crate::outputs::EXPORT_KEY))
        .unwrap_or_default();
    let mut outputs = crate::outputs::TrainOutputs::prepare(
        &config,
        params,
        resume.as_deref(),
        trace.as_ref(),
        &export_files,
    )?;
    if let Some(trace) = trace.as_mut() {
        trace.open(outputs.take_trace())?;
    }
    let mut engine =
        tracing::trace_span!("engine init").in_scope(|| Engine::from_config(config.clone()))?;
    // Rank 0 speaks for the group: it logs, writes metrics and exports; every rank trains.
    let (rank, world) = (engine.rank(), engine.world_size());
    let lead = rank == 0;
    let d = &config.data;
    // This rank's micro-batches, by the engine's communicator's rank and world.
    let mut loader = Loader::for_rank(&config, rank, world)?;
    let mut validation = Validation::new(&config, &engine)?;
    let mut tensorboard = match (&config.train.tensorboard_dir, lead) {
        (Some(dir), true) => Some(EventWriter::create(dir)?),
        _ => None,
    };
    if lead {
        tracing::debug!("effective config:\n{}", config.to_toml());
        tracing::info!("{}", describe_run(&config, &engine));
        if let Some((path, notes)) = &config.deepspeed {
            for note in notes {
                tracing::info!("{}: {note}", path.display());
            }
        }
        tracing::info!("data: {} ({} tokens)", loader.origin(), loader.num_tokens());
        if let Some(v) = &validation {
            let fit = (v.loader.num_tokens() - 1) / (d.micro_batch_size * config.model.seq_len);
            tracing::info!(
                "validation: {} ({} tokens), {} micro-batches every {} steps",
                v.loader.origin(),
                v.loader.num_tokens(),
                config.train.eval_batches,
                config.train.eval_every
            );
            if config.train.eval_batches > fit {
                tracing::warn!(
                    "train.eval_batches = {} but data.val holds only {fit} micro-batches: some are counted twice",
                    config.train.eval_batches
                );
            }
        }
        warn_about(&config);
    }
    let steps = config.train.steps;
    let (log_every, eval_every) = (config.train.log_every, config.train.eval_every);
    // Micro-batches all ranks have read; a resumed run continues at the checkpoint's row, which
    // is a whole micro-batch of this run's (its global batch is the checkpoint's).
    let per_step = (d.grad_accum_steps * world) as u64;
    let rows_per_micro_batch = d.micro_batch_size as u64;
    let mut consumed = 0u64;
    let mut first_step = 1;
    if let Some(dir) = &resume {
        let manifest = engine.load_checkpoint(dir)?;
        // strata train saves after whole steps: the position is a whole number of them.
        if Some(manifest.rows) != (manifest.step as u64).checked_mul(manifest.global_batch_rows) {
            return Err(EngineError::Checkpoint(format!(
                "{}: its data position, {} rows, is not {} steps of {} rows (edited or damaged)",
                dir.join("manifest.json").display(),
                manifest.rows,
                manifest.step,
                manifest.global_batch_rows
            ))
            .into());
        }
        consumed = manifest.rows / rows_per_micro_batch;
        loader.seek(consumed + rank as u64);
        first_step = manifest.step + 1;
        if lead {
            tracing::info!(
                "resumed from {} (step {}, saved by {} rank{} at stage {})",
                dir.display(),
                manifest.step,
                manifest.world_size,
                if manifest.world_size == 1 { "" } else { "s" },
                manifest.zero_stage
            );
        }
    }
    // Rank 0's metrics only (TrainOutputs has none elsewhere); a resumed run continues the file.
    let mut metrics = outputs.metrics_file(resume.is_some().then(|| first_step - 1))?;
    let checkpoints = config.train.checkpoint_dir.clone();
    if checkpoints.is_some() {
        // A signal now saves a checkpoint and ends the run (a second one ends it at once).
        crate::outputs::cleanup::stop_gracefully();
    }
    let save = |engine: &Engine, consumed: u64| -> Result<Option<std::path::PathBuf>, TrainError> {
        let Some(root) = &checkpoints else {
            return Ok(None);
        };
        let dir = tracing::trace_span!("checkpoint")
            .in_scope(|| engine.save_checkpoint(root, consumed * rows_per_micro_batch))?;
        if lead {
            tracing::info!("checkpoint written to {}", dir.display());
            checkpoint::prune(root, config.train.keep_last);
        }
        Ok(Some(dir))
    };
    let mut saved_at = None;
    let mut stopped = None;
    let mut batches: Vec<_> = (0..d.grad_accum_steps)
        .map(|_| engine.new_batch())
        .collect();
    let reporter = Reporter::new(if lead { steps } else { 0 }, lead);
    let mut history = Vec::with_capacity(steps);
    let mut last_val = None;
    let mut metrics_failure = None;
    // What moved between the tiers from the end of step 1 (its first reads are cold).
    let mut traffic_after_1 = engine.traffic();
    let mut traffic_last = traffic_after_1;
    for step in first_step..=steps {
        let _step = tracing::trace_span!("step", step).entered();
        tracing::trace_span!("data")
            .in_scope(|| batches.iter_mut().try_for_each(|b| loader.fill(b)))?;
        let stats =
            tracing::trace_span!("train_step").in_scope(|| engine.train_step_traced(&batches))?;
        let val_loss = match validation.as_mut() {
            Some(v) if step == steps || (eval_every > 0 && step % eval_every == 0) => {
                Some(tracing::trace_span!("eval").in_scope(|| v.loss(&mut engine))?)
            }
            _ => None,
        };
        let _report = tracing::trace_span!("report").entered();
        if let Some(w) = tensorboard.as_mut() {
            let now = engine.traffic();
            let p = engine.placement();
            let io = IoScalars {
                tiers: [
                    p.device_bytes as f32,
                    p.host_bytes as f32,
                    p.nvme_bytes as f32,
                ],
                step: now.since(&traffic_last),
                step_s: stats.step_ms / 1e3,
            };
            traffic_last = now;
            w.add(step as u64, &scalars(&stats, val_loss, &io))?;
        }
        if let Some(m) = metrics.as_mut() {
            let line =
                serde_json::to_string(&MetricsLine::new(&stats, val_loss)).unwrap_or_default();
            metrics_failure = m.write_line(&line).err().map(|e| (step, e));
        }
        if step % log_every == 0 || step == 1 || step == steps {
            reporter.line(format!(
                "{} | {}",
                format_step(&stats, steps),
                reporter.progress(step)
            ));
        }
        if let Some(v) = val_loss {
            reporter.line(format!("step {step:>5}/{steps} | val loss {v:.4}"));
            last_val = Some(v);
        }
        reporter.tick(&stats);
        history.push(stats);
        consumed += per_step;
        if step == 1 {
            traffic_after_1 = engine.traffic();
        }
        let every = config.train.checkpoint_every;
        if every > 0 && step % every == 0 && step < steps {
            save(&engine, consumed)?;
            saved_at = Some(step);
        }
        // Rank 0 alone writes metrics, and each rank sees its own signals: every rank learns
        // whether any must stop (a failed metrics write, SIGINT, SIGTERM), and all stop together.
        let signal = crate::outputs::cleanup::stop_signal();
        let mut stop = [
            metrics_failure.is_some(),
            signal == Some(libc::SIGINT),
            signal == Some(libc::SIGTERM),
        ]
        .map(|b| f32::from(u8::from(b)));
        if world > 1 {
            engine
                .communicator()
                .all_reduce(&mut stop)
                .map_err(EngineError::from)?;
        }
        if stop[0] > 0.0 {
            break;
        }
        if stop[1] > 0.0 || stop[2] > 0.0 {
            if let Some(checkpoint) = save(&engine, consumed)? {
                let signal = if stop[1] > 0.0 {
                    libc::SIGINT
                } else {
                    libc::SIGTERM
                };
                stopped = Some(Stopped {
                    signal,
                    step,
                    checkpoint,
                });
            }
            break;
        }
    }
    // The final checkpoint (unless the last step was just saved, or a signal's save was).
    if stopped.is_none() && history.last().is_some_and(|s| saved_at != Some(s.step + 1)) {
        save(&engine, consumed)?;
    }
    reporter.finish();
    // Every rank takes part in the export (shards are gathered); rank 0 checked its path and writes.
    let export_path = config
        .train
        .export_to
        .as_deref()
        .filter(|_| stopped.is_none());
    let export = export_path.map(|target| {
        let result = tracing::trace_span!("export").in_scope(|| {
            let export =
                crate::export::train_export(&config, engine.units(), &engine.export_metadata())?;
            match export {
                Some(export) => engine.save_export(&export, &outputs.export_targets()),
                None => Ok(()),
            }
        });
        (target, result)
    });
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
        if lead {
            tracing::info!("weights written to {}", target.display());
        }
    }
    tracing::info!("{}", memory_line(&engine));
    let timed_s: f64 = history.iter().skip(1).map(|s| s.step_ms / 1e3).sum();
    tracing::info!(
        "{}",
        tiers_line(&engine, &engine.traffic().since(&traffic_after_1), timed_s)
    );
    if let Some(trace) = trace {
        let path = trace.finish(engine.communicator())?;
        if lead {
            tracing::info!("timeline written to {}", path.display());
        }
    }
    let mut summary = summarize(&history, engine.num_params(), rank);
    summary.val_loss = last_val;
    summary.stopped = stopped;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_counts_read_naturally() {
        assert_eq!(format_seconds(9.84), "9.8s");
        assert_eq!(format_seconds(245.0), "4m05s");
        assert_eq!(format_seconds(7380.0), "2h03m");
        assert_eq!(format_count(838_272), "0.84M");
        assert_eq!(format_count(124_439_808), "124.4M");
        assert_eq!(format_count(1_313_000_000), "1.31B");
    }

    #[test]
    fn metrics_lines_count_steps_from_one_and_carry_val_loss_only_when_computed() {
        let s = StepStats::new(
            0,
            5.5,
            1e-3,
            2.0,
            1024,
            1e9,
            std::time::Duration::from_millis(10),
        );
        let plain = serde_json::to_value(MetricsLine::new(&s, None)).unwrap();
        assert_eq!(plain["step"], 1);
        assert!(plain.get("val_loss").is_none(), "{plain}");
        let with_val = serde_json::to_value(MetricsLine::new(&s, Some(4.25))).unwrap();
        assert_eq!(with_val["val_loss"], 4.25);
        assert_eq!(
            format_step(&s, 300).split('|').next(),
            Some("step     1/300 ")
        );
    }
}
