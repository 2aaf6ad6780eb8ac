//! `strata-bench train`: training throughput of a config, measured over steady-state steps.
//!
//! FLOPs are counted as 6·params + 12·n_layer·n_embd·seq_len per token (forward + backward, attention
//! counted in full, activation recompute not counted), the convention of the PaLM paper and nanoGPT.

use anyhow::Context;
use std::path::PathBuf;
use std::time::Instant;
use strata::config::Config;
use strata::data::Loader;
use strata::Engine;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// TOML config (the embedded tiny default when omitted).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override config keys, as `strata train --set`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Steps to time (after the warm-up steps).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Peak TFLOP/s of the machine, to print MFU.
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
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let mut overrides = args.set.clone();
    overrides.push(format!("train.steps={}", args.warmup + args.steps));
    let config = Config::load(args.config.as_deref(), &overrides)?;
    let (d, m) = (&config.data, &config.model);
    let mut loader = Loader::from_config(&config).context("opening the training data")?;
    let build = Instant::now();
    let mut engine = Engine::from_config(config.clone())?;
    let init_s = build.elapsed().as_secs_f64();
    let mut batches: Vec<_> = (0..d.grad_accum_steps)
        .map(|_| engine.new_batch())
        .collect();
    let mut timed = Vec::new();
    for step in 0..args.warmup + args.steps {
        batches.iter_mut().for_each(|b| loader.fill(b));
        let s = engine.train_step(&batches)?;
        eprintln!(
            "step {step}: loss {:.4} {:.1} ms {:.1} tokens/s",
            s.loss, s.step_ms, s.tokens_per_s
        );
        if step >= args.warmup {
            timed.push(s);
        }
    }
    let profile = if args.profile {
        batches.iter_mut().for_each(|b| loader.fill(b));
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
        "peak_rss_bytes": strata::train::peak_rss_bytes(),
        "precision": format!("{:?}", config.train.precision).to_lowercase(),
        "activation_checkpointing": config.train.activation_checkpointing,
        "threads": if config.train.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { config.train.threads },
        "init_s": init_s,
        "ms_per_step": secs * 1e3 / timed.len().max(1) as f64,
        "tokens_per_s": tokens_per_s,
        "tflops": tflops,
        "mfu": args.peak_tflops.map(|p| tflops / p),
    });
    if let Some((stats, ops)) = &profile {
        let total: f64 = ops.iter().map(|o| o.ms).sum();
        row["profile"] = ops
            .iter()
            .map(|o| serde_json::json!({"op": o.op, "calls": o.calls, "ms": o.ms}))
            .collect();
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
        }
    }
    if args.json {
        println!("{row}");
    } else {
        println!(
            "{:>8} {:>6} {:>7} {:>12} {:>10} {:>12} {:>10} {:>8}",
            "params", "layers", "seq", "tokens/step", "ms/step", "tokens/s", "TFLOP/s", "MFU"
        );
        println!(
            "{:>7.1}M {:>6} {:>7} {:>12} {:>10.1} {:>12.1} {:>10.4} {:>8}",
            engine.num_params() as f64 / 1e6,
            m.n_layer,
            m.seq_len,
            row["tokens_per_step"],
            secs * 1e3 / timed.len().max(1) as f64,
            tokens_per_s,
            tflops,
            args.peak_tflops
                .map_or("-".to_string(), |p| format!("{:.1}%", 100.0 * tflops / p)),
        );
    }
    Ok(())
}
