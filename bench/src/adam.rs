//! `strata-bench adam`: CPU AdamW throughput (the optimizer ZeRO-Offload runs on the host), in parameters
//! per second, against its memory floor: each parameter reads p, g, m, v and writes p, m, v (28 bytes in fp32).
//! `--cast` also times the update that writes bf16 compute weights (2 more bytes): rounded in the update's
//! pass over each chunk (what the host tier does), and as a second pass after it.

use std::time::Instant;
use strata::backend::cpu::adamw::{adamw_update, adamw_update_any, Cast, Moments};
use strata::backend::AdamWHyper;

#[derive(clap::Args)]
pub struct AdamArgs {
    /// Parameters per step.
    #[arg(long, default_value_t = 64 << 20)]
    params: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Threads (0: every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Also time the update with bf16 compute weights written in the same pass and in a second pass.
    #[arg(long)]
    cast: bool,
}

/// Most threads `--threads` may ask for.
const THREADS_MAX: usize = 1024;

pub fn run(args: AdamArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.params >= 1, "--params must be at least 1");
    anyhow::ensure!(
        args.steps >= 1,
        "--steps must be at least 1 (after one untimed step)"
    );
    anyhow::ensure!(
        args.threads <= THREADS_MAX,
        "--threads {} must lie between 0 (every core) and {THREADS_MAX}",
        args.threads
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()?;
    let n = args.params;
    let mut p: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32 - 500.0) * 1e-3).collect();
    let g: Vec<f32> = (0..n).map(|i| ((i % 777) as f32 - 388.0) * 1e-4).collect();
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut h = AdamWHyper {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
        grad_scale: 1.0,
    };
    pool.install(|| adamw_update(&mut p, &g, &mut m, &mut v, &h));
    let time = |f: &mut dyn FnMut(u32)| -> f64 {
        let start = Instant::now();
        for step in 0..args.steps {
            f(step as u32 + 2);
        }
        start.elapsed().as_secs_f64() / args.steps.max(1) as f64
    };
    let secs = time(&mut |step| {
        h.step = step;
        pool.install(|| adamw_update(&mut p, &g, &mut m, &mut v, &h));
    });
    let params_per_s = n as f64 / secs;
    let gbps = params_per_s * 28.0 / 1e9;
    if !p.iter().all(|x| x.is_finite()) {
        anyhow::bail!("AdamW produced non-finite parameters");
    }
    let threads = pool.current_num_threads();
    // (what, seconds per step, bytes per parameter)
    let mut rows = vec![("adamw", secs, 28.0)];
    if args.cast {
        use half::slice::HalfFloatSliceExt;
        let mut out = vec![half::bf16::ZERO; n];
        let fused = time(&mut |step| {
            h.step = step;
            pool.install(|| {
                adamw_update_any(
                    &mut p,
                    &g,
                    Moments::F32(&mut m),
                    Moments::F32(&mut v),
                    &h,
                    Cast::Bf16(&mut out),
                )
            });
        });
        let fused_sample = out[n / 2];
        let two_pass = time(&mut |step| {
            h.step = step;
            pool.install(|| {
                adamw_update(&mut p, &g, &mut m, &mut v, &h);
                out.convert_from_f32_slice(&p);
            });
        });
        if !fused_sample.to_f32().is_finite() {
            anyhow::bail!("the fused cast wrote non-finite weights");
        }
        rows.push(("adamw + bf16 weights, one pass", fused, 30.0));
        rows.push(("adamw, then a bf16 pass", two_pass, 32.0));
    }
    if args.json {
        let extra: Vec<_> = rows
            .iter()
            .skip(1)
            .map(|(what, s, _)| serde_json::json!({"what": what, "ms_per_step": s * 1e3, "params_per_s": n as f64 / s}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"params": n, "threads": threads, "ms_per_step": secs * 1e3,
                "params_per_s": params_per_s, "memory_gbps": gbps, "cast": extra})
        );
    } else {
        println!(
            "{:<32} {:>12} {:>8} {:>10} {:>12} {:>8}",
            "update", "params", "threads", "ms/step", "G params/s", "GB/s"
        );
        for (what, s, bytes) in rows {
            println!(
                "{what:<32} {n:>12} {threads:>8} {:>10.2} {:>12.3} {:>8.2}",
                s * 1e3,
                n as f64 / s / 1e9,
                n as f64 / s * bytes / 1e9
            );
        }
    }
    Ok(())
}
