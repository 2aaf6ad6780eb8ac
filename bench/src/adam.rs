//! `strata-bench adam`: CPU AdamW throughput (the optimizer ZeRO-Offload runs on the host), in parameters
//! per second, against its memory floor: each parameter reads p, g, m, v and writes p, m, v (28 bytes in fp32).

use std::time::Instant;
use strata::backend::AdamWHyper;
use strata::optim::adamw_update;

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
}

pub fn run(args: AdamArgs) -> anyhow::Result<()> {
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
    let start = Instant::now();
    for step in 0..args.steps {
        h.step = step as u32 + 2;
        pool.install(|| adamw_update(&mut p, &g, &mut m, &mut v, &h));
    }
    let secs = start.elapsed().as_secs_f64() / args.steps.max(1) as f64;
    let params_per_s = n as f64 / secs;
    let gbps = params_per_s * 28.0 / 1e9;
    if !p.iter().all(|x| x.is_finite()) {
        anyhow::bail!("AdamW produced non-finite parameters");
    }
    let threads = pool.current_num_threads();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"params": n, "threads": threads, "ms_per_step": secs * 1e3,
                "params_per_s": params_per_s, "memory_gbps": gbps})
        );
    } else {
        println!(
            "{:>12} {:>8} {:>10} {:>16} {:>12}",
            "params", "threads", "ms/step", "G params/s", "GB/s (28 B/p)"
        );
        println!(
            "{n:>12} {threads:>8} {:>10.2} {:>16.3} {:>12.2}",
            secs * 1e3,
            params_per_s / 1e9,
            gbps
        );
    }
    Ok(())
}
