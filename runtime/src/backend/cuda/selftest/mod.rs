//! GPU self-test pieces owned by the backend: every kernel against the CPU backend
//! (`crate::backend::cpu`, the one numerical reference, AdamW and the norm included) on random
//! inputs, and pinned-memory bandwidth.
//! Outputs that a kernel must fully write are poisoned with NaN first, so an element it
//! skipped shows up as a failure. `strata selftest --gpu` adds the 20-step training run
//! (engine) and the one-rank NCCL all_reduce (collectives) around these.

mod decode;
mod layers;

use std::time::Instant;

use super::context::{GpuContext, Stream};
use super::error::Result;
use super::pinned::CudaRegistrar;
use super::{DType, Precision};
use crate::backend::cpu::adamw::{adamw_update, sum_of_squares};
use crate::backend::{AdamWHyper, AttentionShape, Buf, Rows, NORM_PARTIALS_MAX};
use decode::check_decode;
use layers::*;

/// One compared tensor.
#[derive(Debug, Clone)]
pub struct CheckResult {
    /// "kernel/tensor", e.g. "layernorm_backward/dweight".
    pub name: String,
    /// max |gpu - cpu| / max(|cpu|) (NaN when the GPU output has a non-finite element).
    pub max_rel_err: f32,
    pub tolerance: f32,
    pub passed: bool,
}

impl std::fmt::Display for CheckResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.passed { "ok" } else { "FAIL" };
        write!(
            f,
            "{:<40} maxdiff {:>10.3e}  tol {:>8.1e}  {verdict}",
            self.name, self.max_rel_err, self.tolerance
        )
    }
}

/// Relative error bound for one output of `precision`; `stages` > 1 for outputs that pass
/// through several rounded intermediates (attention, chained backward).
pub fn tolerance(precision: Precision, stages: u32) -> f32 {
    let base = match precision {
        Precision::Bf16 => 1.6e-2,
        Precision::Fp16 => 4e-3,
        Precision::Fp32 => 2e-5,
    };
    base * stages as f32
}

struct Harness<'a> {
    gpu: &'a GpuContext,
    precision: Precision,
    /// Appended to every check's name (marks the odd-size pass).
    tag: &'static str,
    rng_state: u64,
    results: Vec<CheckResult>,
}

impl<'a> Harness<'a> {
    fn uniform(&mut self) -> f32 {
        // xorshift64*: deterministic and dependency-free.
        self.rng_state ^= self.rng_state >> 12;
        self.rng_state ^= self.rng_state << 25;
        self.rng_state ^= self.rng_state >> 27;
        let bits = self.rng_state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        bits as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    /// Random values in [-scale, scale], already rounded to floatX so both sides see the same.
    fn rand_x(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| round_x(self.uniform() * scale, self.precision))
            .collect()
    }

    fn rand_f32(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    fn rand_tokens(&mut self, n: usize, v: usize) -> Vec<i32> {
        (0..n)
            .map(|_| (((self.uniform() + 1.0) * 0.5 * v as f32) as usize).min(v - 1) as i32)
            .collect()
    }

    fn alloc(&self, dtype: DType, n: usize) -> Result<Buf> {
        Ok(self.gpu.arena().alloc("selftest", dtype, n)?)
    }

    /// A new buffer of `dtype` holding `bytes` (the copy is waited for).
    fn put(&self, dtype: DType, bytes: &[u8]) -> Result<Buf> {
        let buf = self.alloc(dtype, bytes.len() / dtype.size_bytes())?;
        // SAFETY: the copy is waited for below, before `bytes` can go.
        unsafe { self.gpu.copy_h2d(Stream::H2d, &buf, bytes)? };
        self.gpu.synchronize(Stream::H2d)?;
        Ok(buf)
    }

    fn put_x(&self, v: &[f32]) -> Result<Buf> {
        self.put(self.gpu.x(), &encode_x(v, self.precision))
    }

    fn put_f32(&self, v: &[f32]) -> Result<Buf> {
        self.put(DType::F32, bytemuck::cast_slice(v))
    }

    fn put_i32(&self, v: &[i32]) -> Result<Buf> {
        self.put(DType::I32, bytemuck::cast_slice(v))
    }

    /// A buffer filled with NaN on the compute queue (ordered before the kernel under test).
    fn poisoned(&self, dtype: DType, n: usize) -> Result<Buf> {
        let buf = self.alloc(dtype, n)?;
        self.gpu.poison_nan(Stream::Compute, &buf)?;
        Ok(buf)
    }

    /// Reads a buffer after the compute queue has finished.
    fn get(&self, buf: &Buf) -> Result<Vec<f32>> {
        self.gpu.synchronize(Stream::Compute)?;
        let mut bytes = vec![0u8; buf.size_bytes()];
        // SAFETY: the copy is waited for below, before `bytes` is read or dropped.
        unsafe { self.gpu.copy_d2h(Stream::D2h, &mut bytes, buf)? };
        self.gpu.synchronize(Stream::D2h)?;
        Ok(match buf.dtype() {
            DType::F32 => decode_x(&bytes, Precision::Fp32),
            DType::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
            _ => decode_x(&bytes, self.precision),
        })
    }

    fn compare(&mut self, name: &str, buf: &Buf, want: &[f32], stages: u32) -> Result<()> {
        let got = self.get(buf)?;
        self.compare_host(name, &got, want, stages);
        Ok(())
    }

    /// As `compare`, with the device's values already on the host.
    fn compare_host(&mut self, name: &str, got: &[f32], want: &[f32], stages: u32) {
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        let mut max_err = 0.0f32;
        for (g, w) in got.iter().zip(want) {
            if !g.is_finite() {
                max_err = f32::NAN;
                break;
            }
            max_err = max_err.max((g - w).abs() / scale);
        }
        let tolerance = tolerance(self.precision, stages);
        let passed = got.len() == want.len() && max_err <= tolerance;
        self.results.push(CheckResult {
            name: format!("{name}{}", self.tag),
            max_rel_err: max_err,
            tolerance,
            passed,
        });
    }
}

fn round_x(v: f32, p: Precision) -> f32 {
    match p {
        Precision::Bf16 => half::bf16::from_f32(v).to_f32(),
        Precision::Fp16 => half::f16::from_f32(v).to_f32(),
        Precision::Fp32 => v,
    }
}

fn encode_x(v: &[f32], p: Precision) -> Vec<u8> {
    match p {
        Precision::Bf16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        Precision::Fp16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        Precision::Fp32 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

fn decode_x(bytes: &[u8], p: Precision) -> Vec<f32> {
    match p {
        Precision::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Precision::Fp16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Precision::Fp32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

/// Runs every kernel on small random inputs and compares with the CPU reference.
/// Needs ~64 MiB of free arena; everything it allocates is released afterwards.
pub fn run_kernel_checks(gpu: &GpuContext, seed: u64) -> Result<Vec<CheckResult>> {
    let mark = gpu.arena().mark();
    let mut h = Harness {
        gpu,
        precision: gpu.precision(),
        tag: "",
        rng_state: seed | 1,
        results: Vec::new(),
    };
    let outcome = run_all(&mut h);
    gpu.synchronize_all()?;
    gpu.arena().reset_to(mark)?;
    outcome.map(|()| h.results)
}

/// A group of kernel checks: its name, the tag appended to its checks' names, and the checks.
type CheckGroup<'f> = (
    &'static str,
    &'static str,
    &'f dyn Fn(&mut Harness<'_>) -> Result<()>,
);

/// Sizes that do not divide by the 16-byte pack (and a head size of 18): the element-wise
/// fallbacks of the vectorized kernels, and row counts that leave partial blocks.
const ODD: &str = " (odd)";

fn run_all(h: &mut Harness<'_>) -> Result<()> {
    let (b, t, c, nh, v, vp) = (2usize, 64usize, 128usize, 4usize, 1000usize, 1024usize);
    let n = b * t;
    let mha = |b, t, c, nh| AttentionShape::multi_head(b, t, c, nh);
    let odd_attention = mha(1, 50, 72, 4);
    // Grouped-query shapes (Llama 3's 4 query heads per key/value head, Qwen3's head of 128,
    // and one key/value head for all) and an odd one.
    let gqa = |b, t, nh, nkv, hs| AttentionShape { b, t, nh, nkv, hs };
    let gqa_shapes = [
        gqa(b, t, 8, 2, 64),
        gqa(1, 131, 16, 8, 128),
        gqa(2, 77, 4, 1, 32),
        gqa(1, 4096, 32, 8, 64),
    ];
    let odd_gqa = gqa(1, 50, 6, 2, 18);
    // Qwen3's q norm: per-head rows of a packed qkv (8 query heads of 64, 2 kv heads).
    let strided = Rows {
        n: n * 8,
        c: 64,
        group: 8,
        stride: (8 + 2 * 2) * 64,
    };
    // Each group runs even when an earlier one failed, so one run reports every broken
    // kernel; an error (a launch or precondition failure) becomes a failed check.
    // The fused kernels: T = 1, odd T, HS = 32, 64, 96, 128 and 18 (scalar only), and the
    // long sequences they are for (T = 4096, B = 1) at GPT-2's and GPT 1.3B's head sizes.
    let flash_shapes = [
        mha(b, t, c, nh),
        mha(1, 1, 64, 1),
        mha(2, 131, 256, 2),
        mha(1, 200, 384, 4),
        mha(1, 4096, 768, 12),
        mha(1, 4096, 256, 2),
    ];
    let groups: [CheckGroup<'_>; 23] = [
        ("encoder", "", &|h| check_encoder(h, b, t, c, v)),
        ("layernorm", "", &|h| check_layernorm(h, n, c)),
        ("rmsnorm", "", &|h| check_rmsnorm(h, Rows::dense(n, c))),
        ("rmsnorm", "", &|h| check_rmsnorm(h, strided)),
        ("rotary", "", &|h| check_rotary(h, gqa_shapes[0])),
        ("gelu_residual", "", &|h| check_gelu_residual(h, n * 4 * c)),
        ("swiglu", "", &|h| check_swiglu(h, n, 3 * c)),
        ("matmul", "", &|h| check_matmul(h, n, c, 3 * c)),
        ("attention", "", &|h| check_attention(h, mha(b, t, c, nh))),
        ("attention", "", &|h| check_attention(h, gqa_shapes[0])),
        ("crossentropy", "", &|h| check_crossentropy(h, n, v, vp)),
        // Decoding: one token after 37 cached, a prompt into an empty cache, HS = 256 (the
        // kernel's largest head).
        ("decode", "", &|h| {
            check_decode(h, gqa(2, 1, 8, 2, 64), 37, 64)?;
            check_decode(h, gqa(1, 13, 16, 8, 128), 0, 20)?;
            check_decode(h, gqa(1, 1, 4, 1, 256), 100, 128)
        }),
        ("casts_norm_adamw", "", &|h| {
            check_casts_norm_adamw(h, 100_003)
        }),
        ("layernorm", ODD, &|h| check_layernorm(h, 37, 72)),
        ("rmsnorm", ODD, &|h| check_rmsnorm(h, Rows::dense(37, 72))),
        ("rotary", ODD, &|h| check_rotary(h, odd_gqa)),
        ("gelu_residual", ODD, &|h| check_gelu_residual(h, 1001)),
        ("swiglu", ODD, &|h| check_swiglu(h, 37, 100)),
        ("matmul", ODD, &|h| check_matmul(h, 37, 72, 100)),
        ("attention", ODD, &|h| check_attention(h, odd_attention)),
        ("decode", ODD, &|h| {
            check_decode(h, gqa(1, 5, 6, 2, 18), 9, 15)
        }),
        ("flash_attention", "", &|h| {
            for s in flash_shapes.iter().chain(&gqa_shapes) {
                check_flash_attention(h, *s)?;
            }
            Ok(())
        }),
        ("flash_attention", ODD, &|h| {
            check_flash_attention(h, odd_attention)?;
            check_flash_attention(h, odd_gqa)
        }),
    ];
    for (group, tag, run) in groups {
        h.tag = tag;
        if let Err(e) = run(h) {
            let tolerance = tolerance(h.precision, 1);
            h.results.push(CheckResult {
                name: format!("{group}{tag}: error: {e}"),
                max_rel_err: f32::NAN,
                tolerance,
                passed: false,
            });
        }
    }
    Ok(())
}

fn check_casts_norm_adamw(h: &mut Harness<'_>, n: usize) -> Result<()> {
    let x = h.gpu.x();
    let master = h.rand_f32(n, 1.0);
    let d_master = h.put_f32(&master)?;
    let d_cast = h.poisoned(x, n)?;
    h.gpu.cast_f32_to_x(&d_cast, &d_master)?;
    let rounded: Vec<f32> = master.iter().map(|&v| round_x(v, h.precision)).collect();
    h.compare("cast_f32_to_x/out", &d_cast, &rounded, 1)?;
    let d_back = h.poisoned(DType::F32, n)?;
    h.gpu.cast_x_to_f32(&d_back, &d_cast)?;
    h.compare("cast_x_to_f32/out", &d_back, &rounded, 1)?;

    let grads = h.rand_f32(n, 0.01);
    let d_grads = h.put_f32(&grads)?;
    let (d_norm, d_partials) = (
        h.poisoned(DType::F32, 1)?,
        h.poisoned(DType::F32, NORM_PARTIALS_MAX)?,
    );
    h.gpu
        .grad_norm_squared(&d_norm, &d_partials, &d_grads, false)?;
    let norm_sq = sum_of_squares(&grads) as f32;
    h.compare("grad_norm_squared/out", &d_norm, &[norm_sq], 1)?;

    let (mut m, mut v) = (
        h.rand_f32(n, 0.01),
        h.rand_f32(n, 0.0001)
            .iter()
            .map(|x| x.abs())
            .collect::<Vec<_>>(),
    );
    let (d_m, d_v) = (h.put_f32(&m)?, h.put_f32(&v)?);
    let d_px = h.poisoned(x, n)?;
    let hyper = AdamWHyper {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
        grad_scale: 0.5,
    };
    h.gpu
        .adamw(&d_master, Some(&d_px), &d_grads, &d_m, &d_v, &hyper)?;
    let mut params = master.clone();
    adamw_update(&mut params, &grads, &mut m, &mut v, &hyper);
    // The update is ~1e-3 of the parameter: compare the update itself, not the parameter.
    let got = h.get(&d_master)?;
    let got_delta: Vec<f32> = got.iter().zip(&master).map(|(p, m0)| p - m0).collect();
    let want_delta: Vec<f32> = params.iter().zip(&master).map(|(p, m0)| p - m0).collect();
    h.results.push(fp32_check(
        "adamw/param_update",
        &got_delta,
        &want_delta,
        5e-4,
    ));
    h.results
        .push(fp32_check("adamw/m", &h.get(&d_m)?, &m, 1e-4));
    h.results
        .push(fp32_check("adamw/v", &h.get(&d_v)?, &v, 1e-4));
    let rounded: Vec<f32> = params.iter().map(|&p| round_x(p, h.precision)).collect();
    h.compare("adamw/params_x", &d_px, &rounded, 1)
}

/// fp32-in, fp32-out kernels are checked at fp32 tolerance whatever floatX is.
fn fp32_check(name: &str, got: &[f32], want: &[f32], tolerance: f32) -> CheckResult {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    let max_err = got.iter().zip(want).fold(0.0f32, |m, (g, w)| {
        if g.is_finite() {
            m.max((g - w).abs() / scale)
        } else {
            f32::NAN
        }
    });
    CheckResult {
        name: name.to_string(),
        max_rel_err: max_err,
        tolerance,
        passed: got.len() == want.len() && max_err <= tolerance,
    }
}

/// Pinned host↔device bandwidth in GB/s (h2d, d2h), each the best of `reps` copies of
/// `bytes` between a buffer of the offload crate's host pool (registered with
/// `cuMemHostRegister`, as the engine's host tier is) and the arena.
pub fn pinned_bandwidth(gpu: &GpuContext, bytes: usize, reps: usize) -> Result<(f64, f64)> {
    let fail = |e: strata_offload::OffloadError| {
        super::CudaError::precondition("pinned_bandwidth", e.to_string())
    };
    let len = bytes.div_ceil(4096).max(1) * 4096;
    let pool = strata_offload::HostPool::new(strata_offload::PoolConfig {
        bytes_total: len,
        slab_bytes_max: len,
        ..strata_offload::PoolConfig::default()
    })
    .map_err(fail)?;
    pool.add_registrar(std::sync::Arc::new(CudaRegistrar::new(gpu.cuda().clone())))
        .map_err(fail)?;
    let mut host = pool.alloc(len).map_err(fail)?;
    let mark = gpu.arena().mark();
    let dev = gpu.arena().alloc("bandwidth test", DType::I32, len / 4)?;
    let time = |f: &dyn Fn() -> Result<()>, queue: Stream| -> Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..reps.max(1) {
            let start = Instant::now();
            f()?;
            gpu.synchronize(queue)?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok(len as f64 / best / 1e9)
    };
    let src = host.as_slice();
    // SAFETY: `src` stays alive and unmodified until the H2D queue is synchronized in `time`.
    let h2d = time(
        &|| unsafe { gpu.copy_h2d(Stream::H2d, &dev, src) },
        Stream::H2d,
    )?;
    let dst_ptr = host.as_mut_ptr();
    // SAFETY: the host buffer is not otherwise accessed while the D2H copies run; each copy is
    // synchronized in `time` before the next starts or the buffer is dropped.
    let d2h = time(
        &|| unsafe {
            gpu.copy_d2h(
                Stream::D2h,
                std::slice::from_raw_parts_mut(dst_ptr, len),
                &dev,
            )
        },
        Stream::D2h,
    )?;
    drop(host);
    gpu.arena().reset_to(mark)?;
    Ok((h2d, d2h))
}

/// Kernel checks for each precision, each on a fresh context with a 256 MiB arena on device
/// `ordinal`. Err only when the GPU cannot be used at all; failed checks are in the results.
pub fn kernel_selftest(
    ordinal: usize,
    precisions: &[Precision],
    seed: u64,
) -> Result<Vec<(Precision, Vec<CheckResult>)>> {
    let mut out = Vec::new();
    for &precision in precisions {
        let opts = super::context::GpuOptions {
            ordinal,
            precision,
            arena_bytes: 256 << 20,
            ..Default::default()
        };
        let gpu = GpuContext::new(&opts)?;
        let checks = run_kernel_checks(&gpu, seed).unwrap_or_else(|e| {
            vec![CheckResult {
                name: format!("kernel checks: error: {e}"),
                max_rel_err: f32::NAN,
                tolerance: tolerance(precision, 1),
                passed: false,
            }]
        });
        out.push((precision, checks));
    }
    Ok(out)
}

/// Pinned H2D/D2H bandwidth (GB/s) on device `ordinal` with `bytes`-sized copies (256 MiB
/// is a good size), on a context of its own.
pub fn bandwidth_selftest(ordinal: usize, bytes: usize) -> Result<(f64, f64)> {
    let opts = super::context::GpuOptions {
        ordinal,
        arena_bytes: bytes + (64 << 20),
        ..Default::default()
    };
    let gpu = GpuContext::new(&opts)?;
    pinned_bandwidth(&gpu, bytes, 5)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs a GPU: `cargo test -- --ignored` on a GPU machine (`strata selftest --gpu` runs
    /// the same checks from the release binary).
    #[test]
    #[ignore = "needs a CUDA GPU; run with --ignored on a GPU machine"]
    fn kernels_match_cpu_reference_on_gpu() {
        let results = kernel_selftest(0, &Precision::ALL, 42).expect("GPU usable");
        let mut failed = Vec::new();
        for (precision, checks) in &results {
            for check in checks {
                eprintln!("{:<5} {check}", precision.name());
                if !check.passed {
                    failed.push(format!("{} {}", precision.name(), check.name));
                }
            }
        }
        assert!(failed.is_empty(), "failed: {failed:?}");
    }
}
