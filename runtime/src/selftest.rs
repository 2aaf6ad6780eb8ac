//! `strata selftest [--gpu]`: the backends checked against their references, one line per check
//! (name, measured value, bound, PASS/FAIL), a summary, and a non-zero exit on any failure.
//!
//! Without `--gpu` (seconds, on the CPU): a tiny GPT-2's and a tiny Llama's initial loss is ln(V)
//! and they learn the synthetic data set. With `--gpu`:
//! 1. every GPU kernel against the CPU backend on random inputs, outputs NaN-poisoned first, for
//!    bf16, fp16 and fp32, each with its relative-error bound (backend/cuda/selftest);
//! 2. every parameter gradient of a small GPT-2 and a small Llama-family decoder (GQA, q/k norms,
//!    llama3 rope scaling) at init against the CPU `Engine` (fp32, bf16); then 20 training steps
//!    on the GPU against the CPU `Engine` on the same data and init: fp32 (no TF32) within
//!    `FP32_LOSS_TOL`, bf16 within `BF16_LOSS_TOL_FIRST` (step 1) and `BF16_LOSS_TOL` (later
//!    steps), see below;
//! 3. pinned host↔device bandwidth;
//! 4. a one-rank NCCL all_reduce through strata-collectives with a closed-form check.

use crate::backend::cuda;
use crate::backend::{AttentionMode, Precision};
use crate::config::{Arch, Config, DeviceKind, RopeScaling};
use crate::data::Loader;
use crate::engine::Engine;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// fp32 GPU vs fp32 CPU: both round every operation to 2^-24; they differ only in summation
/// order (~1e-6 relative on a loss of ~5), and Adam's normalised update keeps tiny gradient
/// differences tiny. 2e-3 is far above that and far below what any wrong kernel produces.
const FP32_LOSS_TOL: f32 = 2e-3;
/// bf16 step 1 (same weights, forward only differs): bf16 keeps 8 significant bits (unit
/// roundoff 2^-9 ≈ 2e-3); about 10 roundings between embedding and logits give ≲ 2% relative
/// error on logits of magnitude ≲ 0.5 at init, and cross-entropy moves by at most twice the
/// largest logit error: ≤ 0.02.
const BF16_LOSS_TOL_FIRST: f32 = 0.02;
/// bf16 later steps: Adam's update is lr·m̂/√v̂, so a ~1% relative gradient error changes each
/// step by ~1% of lr; over 20 steps the trajectory's loss moves by ~1% of the ~2.5 nats it
/// drops (0.025), on top of the forward error (0.02): 0.05.
const BF16_LOSS_TOL: f32 = 0.05;
/// Gradients at init, fp32 GPU vs CPU, relative to each tensor's largest gradient: summation
/// order over B·T = 256 rows and K ≤ 512 products (~1e-6) with headroom for cancellation.
const GRAD_TOL_FP32: f32 = 1e-4;
/// Same in bf16: activations and dlogits are rounded to 8 bits (2^-9 ≈ 2e-3) at ~15 points
/// along the backward path, and the residual-stream gradient accumulates in bf16 across layers;
/// a few percent of the largest gradient is expected, 10% still catches any indexing or
/// transposition error (those are O(1)).
const GRAD_TOL_BF16: f32 = 0.1;
/// Training steps of the GPU-vs-CPU comparison.
const PARITY_STEPS: usize = 20;
/// Pinned copies below this are broken (pageable copies reach ~8 GB/s; H100 pinned ~55 GB/s).
const PINNED_GBPS_MIN: f64 = 10.0;

#[derive(clap::Args, Debug, Clone)]
pub struct SelftestArgs {
    /// Run the GPU checks (kernels against the CPU backend, a short training run, bandwidth, NCCL).
    #[arg(long)]
    pub gpu: bool,
}

/// The lines printed so far and how many failed.
#[derive(Default)]
struct Report {
    passed: usize,
    failed: Vec<String>,
}

impl Report {
    fn check(&mut self, name: &str, value: String, bound: String, ok: bool) {
        let verdict = if ok { "PASS" } else { "FAIL" };
        println!("{name:<48} {value:>14}  {bound:>16}  {verdict}");
        if ok {
            self.passed += 1;
        } else {
            self.failed.push(name.to_string());
        }
    }

    /// A check that could not run at all counts as failed.
    fn error(&mut self, name: &str, error: impl std::fmt::Display) {
        println!("{name:<48} {:>14}  {:>16}  FAIL ({error})", "-", "-");
        self.failed.push(name.to_string());
    }

    fn finish(&self, started: Instant) -> ExitCode {
        println!(
            "selftest: {} passed, {} failed in {:.1}s",
            self.passed,
            self.failed.len(),
            started.elapsed().as_secs_f64()
        );
        if self.failed.is_empty() {
            ExitCode::SUCCESS
        } else {
            println!("failed: {}", self.failed.join(", "));
            ExitCode::FAILURE
        }
    }
}

pub fn run(args: SelftestArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut report = Report::default();
    if args.gpu {
        if let Err(why) = cuda::context::device_count().and_then(|n| {
            if n == 0 {
                Err(cuda::CudaError::NoDevice {
                    message: "the CUDA driver reports no device".into(),
                })
            } else {
                Ok(n)
            }
        }) {
            eprintln!("selftest --gpu: no GPU: {why}");
            return Ok(ExitCode::from(2));
        }
        gpu_checks(&mut report);
    } else {
        cpu_checks(&mut report);
    }
    Ok(report.finish(started))
}

/// A small GPT-2, or a small Llama-family decoder with what only it has (grouped-query
/// attention, per-head q/k norms, q/k/v biases, llama3 rope scaling), on the synthetic data set.
fn small_config(
    arch: Arch,
    n_layer: usize,
    n_embd: usize,
    seq_len: usize,
    batch: usize,
    steps: usize,
) -> Config {
    let mut c = Config::default();
    if arch == Arch::Llama {
        let m = &mut c.model;
        m.arch = Arch::Llama;
        m.n_kv_head = Some(2);
        m.intermediate_size = Some(3 * n_embd);
        m.qk_norm = Some(true);
        m.qkv_bias = Some(true);
        m.rope_theta = Some(500_000.0);
        m.rope_scaling = Some(RopeScaling {
            rope_type: "llama3".into(),
            factor: Some(8.0),
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(32),
            other: Default::default(),
        });
    }
    c.model.n_layer = n_layer;
    c.model.n_head = 4;
    c.model.n_embd = n_embd;
    c.model.vocab_size = 256;
    c.model.seq_len = seq_len;
    c.data.micro_batch_size = batch;
    c.data.grad_accum_steps = 1;
    c.train.steps = steps;
    c.train.device = DeviceKind::Cpu;
    c.train.precision = crate::config::Precision::Fp32;
    c.optim.warmup_steps = 5;
    c
}

/// Per-step losses of `steps` steps of `engine` on the synthetic data of `config`.
fn losses(
    engine: &mut Engine,
    config: &Config,
    steps: usize,
) -> Result<Vec<f32>, Box<dyn std::error::Error>> {
    let d = &config.data;
    let mut loader = Loader::from_config(config)?;
    let mut batches: Vec<_> = (0..d.grad_accum_steps)
        .map(|_| engine.new_batch())
        .collect();
    let mut out = Vec::with_capacity(steps);
    for _ in 0..steps {
        for b in batches.iter_mut() {
            loader.fill(b)?;
        }
        out.push(engine.train_step(&batches)?.loss);
    }
    Ok(out)
}

fn cpu_checks(report: &mut Report) {
    for arch in [Arch::Gpt2, Arch::Llama] {
        cpu_arch_checks(report, arch);
    }
}

fn cpu_arch_checks(report: &mut Report, arch: Arch) {
    let steps = 40;
    let config = small_config(arch, 2, 64, 64, 4, steps);
    let result = Engine::from_config(config.clone())
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)
        .and_then(|mut engine| losses(&mut engine, &config, steps));
    let a = arch.name();
    let losses = match result {
        Ok(l) => l,
        Err(e) => return report.error(&format!("cpu/{a}/train"), e),
    };
    // Activation checkpointing recomputes each block's forward in backward: same losses.
    let mut plain = config.clone();
    plain.train.activation_checkpointing = !config.train.activation_checkpointing;
    let short = 5;
    match Engine::from_config(plain.clone())
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)
        .and_then(|mut engine| self::losses(&mut engine, &plain, short))
    {
        Ok(other) => {
            let diff = other
                .iter()
                .zip(&losses)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            report.check(
                &format!("cpu/{a}/checkpointing on vs off, 5 steps |dloss|"),
                format!("{diff:.2e}"),
                "<= 1e-5".into(),
                diff <= 1e-5 && other.len() == short,
            );
        }
        Err(e) => report.error(&format!("cpu/{a}/checkpointing on vs off"), e),
    }
    // The fused attention against the materialized one: the same math in another order.
    let mut materialized = config.clone();
    materialized.train.attention = AttentionMode::Materialized;
    match Engine::from_config(materialized.clone())
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)
        .and_then(|mut engine| self::losses(&mut engine, &materialized, short))
    {
        Ok(other) => {
            let diff = other
                .iter()
                .zip(&losses)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            report.check(
                &format!("cpu/{a}/attention fused vs materialized, 5 steps |dloss|"),
                format!("{diff:.2e}"),
                "<= 1e-5".into(),
                diff <= 1e-5 && other.len() == short,
            );
        }
        Err(e) => report.error(&format!("cpu/{a}/attention fused vs materialized"), e),
    }
    let expected = (config.model.vocab_size as f32).ln();
    let first = losses.first().copied().unwrap_or(f32::NAN);
    report.check(
        &format!("cpu/{a}/initial loss vs ln(vocab)"),
        format!("{first:.4}"),
        format!("{expected:.4} ± 0.1"),
        (first - expected).abs() <= 0.1,
    );
    let tail = &losses[losses.len().saturating_sub(5)..];
    let last = tail.iter().sum::<f32>() / tail.len().max(1) as f32;
    report.check(
        &format!("cpu/{a}/loss after {steps} steps (mean of last 5)"),
        format!("{last:.4}"),
        format!("< {:.4}", first - 1.0),
        last < first - 1.0,
    );
    zero_parity(report, &config, 5, 0.0);
}

fn gpu_checks(report: &mut Report) {
    kernel_checks(report);
    for arch in [Arch::Gpt2, Arch::Llama] {
        for precision in [Precision::Fp32, Precision::Bf16] {
            gradient_parity(report, arch, precision);
        }
    }
    let gpt2 = Arch::Gpt2;
    training_parity(report, gpt2, Precision::Fp32, false, AttentionMode::Fused);
    training_parity(report, gpt2, Precision::Bf16, true, AttentionMode::Fused);
    training_parity(
        report,
        gpt2,
        Precision::Bf16,
        false,
        AttentionMode::Materialized,
    );
    let llama = Arch::Llama;
    training_parity(report, llama, Precision::Fp32, false, AttentionMode::Fused);
    training_parity(report, llama, Precision::Bf16, true, AttentionMode::Fused);
    training_parity(
        report,
        llama,
        Precision::Bf16,
        false,
        AttentionMode::Materialized,
    );
    let (_, bf16) = parity_configs(gpt2, Precision::Bf16, true, AttentionMode::Fused);
    zero_parity(report, &bf16, PARITY_STEPS, BF16_LOSS_TOL_FIRST);
    bandwidth_check(report);
    nccl_check(report);
}

/// ZeRO stage 3 at world 1 (every unit gathered before each use, gradients reduce-scattered,
/// the optimizer on shards) against stage 0 on the same device, with every state on the device,
/// then with parameters and optimizer states on (pinned, on a GPU) host memory and on NVMe (a
/// temporary directory): `steps` losses within `tol` (0: bitwise).
fn zero_parity(report: &mut Report, config: &Config, steps: usize, tol: f32) {
    use crate::config::{NvmePaths, OffloadDevice, TEMP_NVME_PATH};
    let gpu = config.train.device == DeviceKind::Cuda;
    let device = if gpu { "gpu" } else { "cpu" };
    let run = |stage: u8, tier: OffloadDevice| -> Result<Vec<f32>, Box<dyn std::error::Error>> {
        let mut c = config.clone();
        c.zero.stage = stage;
        c.zero.param_persistence_threshold = 0;
        c.offload_param.device = tier;
        c.offload_optimizer.device = tier;
        let tmp = Some(NvmePaths::One(TEMP_NVME_PATH.into()));
        c.offload_param.nvme_path = tmp.clone();
        c.offload_optimizer.nvme_path = tmp;
        // On a GPU the host tier is page-locked (cuMemHostRegister), as offload runs there.
        c.offload_param.pin_memory = gpu;
        let mut engine = Engine::from_config(c.clone())?;
        losses(&mut engine, &c, steps)
    };
    let whole = match run(0, OffloadDevice::None) {
        Ok(w) => w,
        Err(e) => return report.error(&format!("{device}/zero stage 0 reference"), e),
    };
    for (tier, what) in [
        (OffloadDevice::None, "stage 3"),
        (OffloadDevice::Cpu, "stage 3 + host offload"),
        (OffloadDevice::Nvme, "stage 3 + NVMe offload"),
    ] {
        let name = format!("{device}/zero {what} vs stage 0, {steps} steps max |dloss|");
        match run(3, tier) {
            Ok(sharded) => {
                let worst = whole
                    .iter()
                    .zip(&sharded)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                report.check(
                    &name,
                    format!("{worst:.2e}"),
                    format!("<= {tol:.1e}"),
                    worst <= tol && sharded.len() == steps,
                );
            }
            Err(e) => report.error(&name, e),
        }
    }
}

fn kernel_checks(report: &mut Report) {
    match cuda::kernel_selftest(0, &Precision::ALL, 42) {
        Ok(all) => {
            for (precision, checks) in all {
                for c in checks {
                    report.check(
                        &format!("kernel/{}/{}", precision.name(), c.name),
                        format!("{:.3e}", c.max_rel_err),
                        format!("<= {:.1e}", c.tolerance),
                        c.passed,
                    );
                }
            }
        }
        Err(e) => report.error("kernel checks", e),
    }
}

/// The config of the GPU-vs-CPU comparisons: the CPU one, and the GPU one in `precision`.
/// The GPU runs attention in `attention` mode; the CPU reference in the default mode.
fn parity_configs(
    arch: Arch,
    precision: Precision,
    checkpointing: bool,
    attention: AttentionMode,
) -> (Config, Config) {
    let cpu_config = small_config(arch, 2, 128, 64, 4, PARITY_STEPS);
    let mut gpu_config = cpu_config.clone();
    gpu_config.train.device = DeviceKind::Cuda;
    gpu_config.train.activation_checkpointing = checkpointing;
    gpu_config.train.attention = attention;
    gpu_config.train.precision = match precision {
        Precision::Bf16 => crate::config::Precision::Bf16,
        Precision::Fp16 => crate::config::Precision::Fp16,
        Precision::Fp32 => crate::config::Precision::Fp32,
    };
    (cpu_config, gpu_config)
}

/// Every parameter gradient of one forward/backward at init on the GPU against the CPU engine:
/// max |gpu − cpu| / max |cpu| per tensor within `GRAD_TOL_FP32` / `GRAD_TOL_BF16`.
fn gradient_parity(report: &mut Report, arch: Arch, precision: Precision) {
    let prefix = format!("grad/{}/{}", arch.name(), precision.name());
    let (cpu_config, gpu_config) = parity_configs(arch, precision, false, AttentionMode::Fused);
    let run = || -> Result<_, Box<dyn std::error::Error>> {
        let mut loader = Loader::from_config(&cpu_config)?;
        let mut engine = Engine::from_config(cpu_config.clone())?;
        let mut batch = engine.new_batch();
        loader.fill(&mut batch)?;
        let batches = [batch];
        let cpu_loss = engine.forward_backward(&batches)?;
        let cpu_grads = engine.grads()?;
        let mut gpu = Engine::from_config(gpu_config.clone())?;
        let gpu_loss = gpu.forward_backward(&batches)?;
        let gpu_grads = gpu.grads()?;
        let mut per_tensor = Vec::new();
        for ((unit, want), got) in engine.units().iter().zip(&cpu_grads).zip(&gpu_grads) {
            for (t, r) in unit.tensors.iter().zip(unit.ranges()) {
                let (want, got) = (&want[r.clone()], got.get(r).unwrap_or(&[]));
                per_tensor.push((t.name.clone(), rel_err(got, want)));
            }
        }
        Ok((cpu_loss, gpu_loss, per_tensor))
    };
    let (cpu_loss, gpu_loss, per_tensor) = match run() {
        Ok(v) => v,
        Err(e) => return report.error(&prefix, e),
    };
    let loss_tol = match precision {
        Precision::Fp32 => FP32_LOSS_TOL,
        _ => BF16_LOSS_TOL_FIRST,
    };
    let diff = (gpu_loss - cpu_loss).abs();
    report.check(
        &format!("{prefix}/loss at init |dloss|"),
        format!("{diff:.3e}"),
        format!("<= {loss_tol:.1e}"),
        diff <= loss_tol,
    );
    let tol = match precision {
        Precision::Fp32 => GRAD_TOL_FP32,
        _ => GRAD_TOL_BF16,
    };
    for (name, err) in per_tensor {
        let short = name
            .trim_start_matches("transformer.")
            .trim_start_matches("model.");
        report.check(
            &format!("{prefix}/{short}"),
            format!("{err:.3e}"),
            format!("<= {tol:.1e}"),
            err <= tol,
        );
    }
}

/// max |got − want| / max |want|; NaN when the lengths differ or `got` has a non-finite value.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    if got.len() != want.len() {
        return f32::NAN;
    }
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    got.iter().zip(want).fold(0.0f32, |m, (g, w)| {
        if g.is_finite() {
            m.max((g - w).abs() / scale)
        } else {
            f32::NAN
        }
    })
}

/// 20 steps on the GPU in `precision` against the CPU engine on the same data and init.
fn training_parity(
    report: &mut Report,
    arch: Arch,
    precision: Precision,
    checkpointing: bool,
    attention: AttentionMode,
) {
    let name = format!(
        "train/{}/{}{}{} vs cpu fp32",
        arch.name(),
        precision.name(),
        if checkpointing { "+ckpt" } else { "" },
        if attention == AttentionMode::Fused {
            ""
        } else {
            "+materialized"
        }
    );
    let (cpu_config, gpu_config) = parity_configs(arch, precision, checkpointing, attention);
    let run = || -> Result<(Vec<f32>, Vec<f32>), Box<dyn std::error::Error>> {
        let mut engine = Engine::from_config(cpu_config.clone())?;
        let cpu = losses(&mut engine, &cpu_config, PARITY_STEPS)?;
        let mut gpu_engine = Engine::from_config(gpu_config.clone())?;
        let gpu = losses(&mut gpu_engine, &gpu_config, PARITY_STEPS)?;
        Ok((cpu, gpu))
    };
    let (cpu, gpu) = match run() {
        Ok(v) => v,
        Err(e) => return report.error(&name, e),
    };
    for (step, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        tracing::info!(
            "{name} step {step:>2}: cpu {c:.5} gpu {g:.5} diff {:+.2e}",
            g - c
        );
    }
    let tolerance = |step: usize| match precision {
        Precision::Fp32 => FP32_LOSS_TOL,
        _ if step == 0 => BF16_LOSS_TOL_FIRST,
        _ => BF16_LOSS_TOL,
    };
    let first = (cpu[0] - gpu[0]).abs();
    report.check(
        &format!("{name}: step 1 |dloss|"),
        format!("{first:.3e}"),
        format!("<= {:.1e}", tolerance(0)),
        first <= tolerance(0),
    );
    let (worst_step, worst) = cpu
        .iter()
        .zip(&gpu)
        .map(|(c, g)| (g - c).abs())
        .enumerate()
        .skip(1)
        .fold((0, 0.0f32), |(ws, w), (s, d)| {
            if d > w || d.is_nan() {
                (s, d)
            } else {
                (ws, w)
            }
        });
    report.check(
        &format!(
            "{name}: steps 2-{PARITY_STEPS} max |dloss| (step {})",
            worst_step + 1
        ),
        format!("{worst:.3e}"),
        format!("<= {:.1e}", tolerance(1)),
        worst <= tolerance(1) && gpu.len() == PARITY_STEPS,
    );
    let (g0, gl) = (gpu[0], gpu[gpu.len() - 1]);
    report.check(
        &format!("{name}: gpu loss falls"),
        format!("{g0:.3} -> {gl:.3}"),
        "drop >= 0.5".into(),
        g0 - gl >= 0.5,
    );
}

fn bandwidth_check(report: &mut Report) {
    match cuda::bandwidth_selftest(0, 256 << 20) {
        Ok((h2d, d2h)) => {
            for (dir, gbps) in [("h2d", h2d), ("d2h", d2h)] {
                report.check(
                    &format!("pinned/{dir} 256 MiB"),
                    format!("{gbps:.1} GB/s"),
                    format!(">= {PINNED_GBPS_MIN:.0} GB/s"),
                    gbps >= PINNED_GBPS_MIN,
                );
            }
        }
        Err(e) => report.error("pinned bandwidth", e),
    }
}

/// all_reduce(sum) over one rank of x[i] = (rank + 1)·i is Σ_r (r + 1)·i = i.
fn nccl_check(report: &mut Report) {
    use strata_collectives::{Backend, DistConfig, EnvSource, RankInfo};
    let name = "nccl/all_reduce 1 rank, 1M f32";
    let config = DistConfig {
        backend: Backend::Nccl,
        timeout: Duration::from_secs(60),
        gpu: true,
        ..DistConfig::default()
    };
    let info = RankInfo {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        local_world_size: Some(1),
        master_addr: "127.0.0.1".into(),
        master_port: 0,
        source: EnvSource::Torchrun,
    };
    let comm = match strata_collectives::init(&config, &info) {
        Ok(c) => c,
        Err(e) => return report.error(name, e),
    };
    if comm.backend() != Backend::Nccl {
        return report.error(name, format!("got the {} backend", comm.backend()));
    }
    let (n, rank, world) = (1usize << 20, comm.rank(), comm.world_size());
    let mut buf: Vec<f32> = (0..n).map(|i| ((rank + 1) * i) as f32).collect();
    if let Err(e) = comm.all_reduce(&mut buf) {
        return report.error(name, e);
    }
    let ranks_sum = (world * (world + 1) / 2) as f32;
    let wrong = buf
        .iter()
        .enumerate()
        .filter(|&(i, &v)| v != i as f32 * ranks_sum)
        .count();
    report.check(name, format!("{wrong} wrong"), "0 wrong".into(), wrong == 0);
}
