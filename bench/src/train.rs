//! `strata-bench train`: training throughput of a config, measured over steady-state steps.
//!
//! FLOPs are counted as 6·params + 12·n_layer·n_embd·seq_len per token (forward + backward, attention
//! counted in full, activation recompute not counted), the convention of the PaLM paper and nanoGPT.
//!
//! A row gives the step time's median and spread over the timed steps (min, max, and the 10th and 90th
//! percentiles, interpolated linearly between ranks as numpy's default), and MFU: the mean TFLOP/s over the
//! peak given by `--peak-tflops`, or the dense bf16/fp16 tensor peak of a GPU known by its name
//! ([`known_peak`]); none on the CPU.

use anyhow::Context;
use std::path::PathBuf;
use std::time::Instant;
use strata::backend::{Backend, Precision};
use strata::config::Config;
use strata::data::Loader;
use strata::engine::Traffic;
use strata::trace::Trace;
use strata::Engine;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// TOML config (the embedded tiny default when omitted), as `strata train CONFIG`.
    #[arg(value_name = "CONFIG", conflicts_with = "config_flag")]
    config: Option<PathBuf>,
    /// The same as CONFIG.
    #[arg(long = "config", value_name = "CONFIG")]
    config_flag: Option<PathBuf>,
    /// Override config keys, as `strata train --set`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Steps to time (after the warm-up steps).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Peak TFLOP/s of the machine, for MFU (default: detected for known GPUs in bf16/fp16; none on the CPU).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// After the timed steps, one more step with every device operation timed (GPU time per
    /// kernel and GEMM on CUDA, wall time per operation on the CPU): a table, or a "profile"
    /// array in the JSON.
    #[arg(long)]
    profile: bool,
    /// Write a timeline of every step (Chrome trace JSON, for ui.perfetto.dev), as `strata train --trace`.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Stop after the first timed step that ends more than S seconds after the start (set-up included)
    /// and report the steps timed so far ("time_limited": true), for a caller with a deadline.
    #[arg(long, value_name = "S")]
    time_limit: Option<f64>,
}

/// Dense bf16/fp16 tensor-core peak of GPUs known by name (NVIDIA's data sheets), with the name matched.
/// Variants with another peak (H100 PCIe, H100/H200 NVL) are not matched: give `--peak-tflops`.
pub fn known_peak(device_name: &str) -> Option<(f64, &'static str)> {
    let other_variant = ["PCIe", "NVL"].iter().any(|v| device_name.contains(v));
    if device_name.contains("H100") && !other_variant {
        Some((989.0, "H100 SXM"))
    } else if device_name.contains("H200") && !other_variant {
        Some((989.0, "H200"))
    } else if device_name.contains("A100") {
        Some((312.0, "A100"))
    } else {
        None
    }
}

/// The peak TFLOP/s for MFU and where it came from: the command line, or detected on a GPU computing in
/// bf16/fp16 (the tensor-core figure does not apply to fp32).
fn peak_tflops(given: Option<f64>, engine: &Engine) -> Option<(f64, String)> {
    if let Some(p) = given {
        return Some((p, "--peak-tflops".to_string()));
    }
    let dev = engine.device();
    if dev.backend() != Backend::Cuda || dev.precision() == Precision::Fp32 {
        return None;
    }
    let (peak, model) = known_peak(&dev.name())?;
    Some((
        peak,
        format!("detected: {model}, {} dense", dev.precision().name()),
    ))
}

/// Step times (ms) of the timed steps: median and spread.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub p10: f64,
    pub p90: f64,
}

/// The `q`-quantile of sorted values, linear between closest ranks (numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return f64::NAN;
    };
    let pos = q * last as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

pub fn spread(values: &[f64]) -> Spread {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    Spread {
        median: quantile(&sorted, 0.5),
        min: sorted.first().copied().unwrap_or(f64::NAN),
        max: sorted.last().copied().unwrap_or(f64::NAN),
        p10: quantile(&sorted, 0.1),
        p90: quantile(&sorted, 0.9),
    }
}

/// Refuses arguments that cannot give a figure (no timed step, a limit or peak that is not a
/// positive number) before anything is built.
fn check(args: &TrainArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.steps >= 1,
        "--steps {}: time at least one step (--warmup steps are not timed)",
        args.steps
    );
    if let Some(s) = args.time_limit {
        anyhow::ensure!(
            s.is_finite() && s >= 0.0,
            "--time-limit {s} must be a number of seconds, 0 or more"
        );
    }
    if let Some(p) = args.peak_tflops {
        anyhow::ensure!(
            p.is_finite() && p > 0.0,
            "--peak-tflops {p} must be a positive number"
        );
    }
    Ok(())
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    check(&args)?;
    let started = Instant::now();
    // The trace's file is checked against the run's inputs (and locked) once the config is read;
    // nothing is written before.
    let mut trace = args.trace.as_deref().map(Trace::start).transpose()?;
    if let Some(t) = &trace {
        tracing_subscriber::registry()
            .with(t.layer())
            .try_init()
            .context("installing the trace layer")?;
    }
    let steps = args
        .warmup
        .checked_add(args.steps)
        .context("--warmup + --steps overflows")?;
    let mut overrides = args.set.clone();
    let steps_set = format!("train.steps={steps}");
    overrides.push(steps_set.clone());
    let config = Config::load(args.config.or(args.config_flag).as_deref(), &overrides)?;
    for (earlier, later) in &config.replaced_sets {
        if *later == steps_set {
            eprintln!("warning: --set {earlier} is replaced: strata-bench train runs --warmup + --steps = {steps} steps");
        } else {
            eprintln!("warning: --set {earlier} is replaced by the later --set {later}");
        }
    }
    if let Some(t) = trace.as_mut() {
        t.prepare(strata::outputs::input_files(&config))?;
    }
    let (d, m) = (&config.data, &config.model);
    let mut loader = Loader::from_config(&config).context("opening the training data")?;
    let build = Instant::now();
    let mut engine = Engine::from_config(config.clone())?;
    let init_s = build.elapsed().as_secs_f64();
    let mut batches: Vec<_> = (0..d.grad_accum_steps)
        .map(|_| engine.new_batch())
        .collect();
    let mut timed = Vec::new();
    // What moved between the tiers during the timed steps.
    let mut traffic_before = engine.traffic();
    let mut time_limited = false;
    for step in 0..args.warmup + args.steps {
        if step == args.warmup {
            traffic_before = engine.traffic();
        }
        // The step on the host's track of a --trace timeline.
        let _step = tracing::trace_span!("step", step).entered();
        for b in batches.iter_mut() {
            loader.fill(b)?;
        }
        let s = engine.train_step_traced(&batches)?;
        eprintln!(
            "step {step}: loss {:.4} {:.1} ms {:.1} tokens/s",
            s.loss, s.step_ms, s.tokens_per_s
        );
        if step >= args.warmup {
            timed.push(s);
        }
        let over = args
            .time_limit
            .is_some_and(|limit| started.elapsed().as_secs_f64() > limit);
        if over && !timed.is_empty() && step + 1 < args.warmup + args.steps {
            eprintln!(
                "--time-limit {} s reached: stopping after {} timed steps",
                args.time_limit.unwrap_or_default(),
                timed.len()
            );
            time_limited = true;
            break;
        }
    }
    let traffic = engine.traffic().since(&traffic_before);
    let profile = if args.profile {
        for b in batches.iter_mut() {
            loader.fill(b)?;
        }
        Some(engine.train_step_profiled(&batches)?)
    } else {
        None
    };
    let secs: f64 = timed.iter().map(|s| s.step_ms / 1e3).sum();
    let tokens: usize = timed.iter().map(|s| s.tokens).sum();
    let tflops: f64 = timed
        .iter()
        .map(|s| s.tflops * s.step_ms / 1e3)
        .sum::<f64>()
        / secs;
    let tokens_per_s = tokens as f64 / secs;
    let step_ms: Vec<f64> = timed.iter().map(|s| s.step_ms).collect();
    let times = spread(&step_ms);
    let peak = peak_tflops(args.peak_tflops, &engine);
    let mfu = peak.as_ref().map(|(p, _)| tflops / p);
    let mut row = serde_json::json!({
        "n_layer": m.n_layer,
        "n_embd": m.n_embd,
        "seq_len": m.seq_len,
        "params": engine.num_params(),
        "tokens_per_step": tokens / timed.len().max(1),
        "device": engine.device().name(),
        "backend": engine.device().backend().name(),
        "zero_stage": engine.zero_stage(),
        "world_size": engine.world_size(),
        "device_bytes_per_rank": engine.memory_ledger().iter().map(|(_, b)| b).sum::<usize>(),
        "bytes_per_rank": engine
            .memory_ledger()
            .iter()
            .map(|(what, bytes)| ((*what).to_string(), serde_json::json!(bytes)))
            .collect::<serde_json::Map<_, _>>(),
        "peak_rss_bytes": strata::engine::peak_rss_bytes(),
        "precision": format!("{:?}", config.train.precision).to_lowercase(),
        "activation_checkpointing": config.train.activation_checkpointing,
        "attention": config.train.attention.name(),
        "threads": if config.train.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { config.train.threads },
        "init_s": init_s,
        "ms_per_step": secs * 1e3 / timed.len().max(1) as f64,
        "steps_timed": timed.len(),
        "time_limited": time_limited,
        "step_ms_median": times.median,
        "step_ms_min": times.min,
        "step_ms_max": times.max,
        "step_ms_p10": times.p10,
        "step_ms_p90": times.p90,
        "tokens_per_s": tokens_per_s,
        "tflops": tflops,
        "peak_tflops": peak.as_ref().map(|(p, _)| *p),
        "peak_source": peak.as_ref().map(|(_, source)| source.clone()),
        "mfu": mfu,
        "offload_param": engine.placement().tiers.params.name(),
        "offload_optimizer": engine.placement().tiers.optimizer.name(),
        "tier_bytes_per_rank": {
            "device": engine.placement().device_bytes,
            "host": engine.placement().host_bytes,
            "nvme": engine.placement().nvme_bytes,
        },
        "nvme_read_bytes_per_step": traffic.offload.nvme_read_bytes / timed.len().max(1) as u64,
        "nvme_write_bytes_per_step": traffic.offload.nvme_write_bytes / timed.len().max(1) as u64,
        "nvme_read_gbps": Traffic::rate(traffic.offload.nvme_read_bytes, Some(traffic.offload.nvme_read_s)),
        "nvme_write_gbps": Traffic::rate(traffic.offload.nvme_write_bytes, Some(traffic.offload.nvme_write_s)),
        "h2d_gbps": Traffic::rate(traffic.offload.h2d_bytes, traffic.h2d_busy_s),
        "d2h_gbps": Traffic::rate(traffic.offload.d2h_bytes, traffic.d2h_busy_s),
        "compute_wait_fraction": traffic.compute_waited_s.map(|w| w / secs.max(1e-9)),
    });
    if let Some(t) = trace {
        let path = t.finish(engine.communicator())?;
        eprintln!("timeline written to {}", path.display());
    }
    if let Some((stats, p)) = &profile {
        let ops = &p.ops;
        let total: f64 = ops.iter().map(|o| o.ms).sum();
        row["profile"] = ops
            .iter()
            .map(|o| serde_json::json!({"op": o.op, "calls": o.calls, "ms": o.ms}))
            .collect();
        // Copy streams timed on the device (CUDA): their rate while copying, and how much of
        // the profiled step each was busy. They fill the rates the host cannot time there.
        row["profile_copies"] = p
            .copies
            .iter()
            .map(|c| {
                serde_json::json!({"queue": c.queue.name(), "calls": c.calls, "bytes": c.bytes,
                    "busy_ms": c.busy_ms, "gbps": c.gbps(), "busy_fraction": c.busy_ms / stats.step_ms.max(1e-9)})
            })
            .collect();
        for c in &p.copies {
            let key = match c.queue {
                strata::backend::Queue::D2h => "d2h_gbps",
                _ => "h2d_gbps",
            };
            if row[key].is_null() {
                row[key] = serde_json::json!(c.gbps());
            }
        }
        if !args.json {
            println!(
                "profile of one step ({:.1} ms wall, {total:.1} ms on the compute queue):",
                stats.step_ms
            );
            println!("{:>9} {:>6} {:>6}  op", "ms", "%", "calls");
            for o in ops {
                println!(
                    "{:>9.2} {:>5.1}% {:>6}  {}",
                    o.ms,
                    100.0 * o.ms / total.max(1e-9),
                    o.calls,
                    o.op
                );
            }
            for c in &p.copies {
                println!(
                    "{} copies: {} calls, {:.1} MB in {:.2} ms = {:.1} GB/s, busy {:.0}% of the step",
                    c.queue.name(),
                    c.calls,
                    c.bytes as f64 / 1e6,
                    c.busy_ms,
                    c.gbps(),
                    100.0 * c.busy_ms / stats.step_ms.max(1e-9)
                );
            }
        }
    }
    if args.json {
        println!("{row}");
    } else {
        println!(
            "{:>8} {:>6} {:>7} {:>12} {:>10} {:>10} {:>15} {:>12} {:>10} {:>8}",
            "params",
            "layers",
            "seq",
            "tokens/step",
            "ms/step",
            "median",
            "min-max",
            "tokens/s",
            "TFLOP/s",
            "MFU"
        );
        println!(
            "{:>7.1}M {:>6} {:>7} {:>12} {:>10.1} {:>10.1} {:>15} {:>12.1} {:>10.4} {:>8}",
            engine.num_params() as f64 / 1e6,
            m.n_layer,
            m.seq_len,
            // (a serde_json::Value would ignore the width)
            tokens / timed.len().max(1),
            secs * 1e3 / timed.len().max(1) as f64,
            times.median,
            format!("{:.1}-{:.1}", times.min, times.max),
            tokens_per_s,
            tflops,
            mfu.map_or("-".to_string(), |f| format!("{:.1}%", 100.0 * f)),
        );
        if let Some((p, source)) = &peak {
            println!("MFU against a peak of {p} TFLOP/s ({source})");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_matches_numpy_percentiles() {
        // numpy.percentile([12, 10, 30, 11, 13], [10, 50, 90]) = [10.4, 12.0, 23.2]
        let s = spread(&[12.0, 10.0, 30.0, 11.0, 13.0]);
        assert_eq!((s.min, s.median, s.max), (10.0, 12.0, 30.0));
        assert!((s.p10 - 10.4).abs() < 1e-12, "{s:?}");
        assert!((s.p90 - 23.2).abs() < 1e-12, "{s:?}");
        // An even count: the median between the middle two.
        assert_eq!(spread(&[4.0, 1.0, 3.0, 2.0]).median, 2.5);
        assert_eq!(spread(&[7.0]).p90, 7.0);
        assert!(spread(&[]).median.is_nan());
    }

    #[test]
    fn known_gpus_have_their_dense_bf16_peak_and_others_none() {
        // The names CUDA reports (cuDeviceGetName), with strata's " (sm_90)".
        assert_eq!(
            known_peak("NVIDIA H100 80GB HBM3 (sm_90)").map(|p| p.0),
            Some(989.0)
        );
        assert_eq!(known_peak("NVIDIA H200 (sm_90)").map(|p| p.0), Some(989.0));
        assert_eq!(
            known_peak("NVIDIA A100-SXM4-80GB (sm_80)").map(|p| p.0),
            Some(312.0)
        );
        assert_eq!(
            known_peak("NVIDIA A100 80GB PCIe (sm_80)").map(|p| p.0),
            Some(312.0)
        );
        assert_eq!(known_peak("NVIDIA H100 PCIe (sm_90)"), None);
        assert_eq!(known_peak("NVIDIA H100 NVL (sm_90)"), None);
        assert_eq!(known_peak("NVIDIA GeForce RTX 4090 (sm_89)"), None);
        assert_eq!(known_peak("cpu (2 threads)"), None);
    }
}
