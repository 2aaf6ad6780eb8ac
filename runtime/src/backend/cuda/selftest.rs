//! GPU self-test pieces owned by the backend: every kernel against the CPU backend
//! (`crate::backend::cpu`, the one numerical reference, AdamW and the norm included) on random
//! inputs, and pinned-memory bandwidth.
//! Outputs that a kernel must fully write are poisoned with NaN first, so an element it
//! skipped shows up as a failure. `strata selftest --gpu` adds the 20-step training run
//! (engine) and the one-rank NCCL all_reduce (collectives) around these.

use std::time::Instant;

use super::context::{GpuContext, Stream};
use super::error::Result;
use super::flash::FlashKernels;
use super::pinned::CudaRegistrar;
use super::{DType, Precision};
use crate::backend::cpu;
use crate::backend::cpu::adamw::{adamw_update, sum_of_squares};
use crate::backend::Buf;
use crate::backend::{
    AdamWHyper, AttentionActs, AttentionScratch, AttentionShape, GradMode, NORM_PARTIALS_MAX,
};

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
    let odd_attention = AttentionShape {
        b: 1,
        t: 50,
        c: 72,
        nh: 4,
    };
    // Each group runs even when an earlier one failed, so one run reports every broken
    // kernel; an error (a launch or precondition failure) becomes a failed check.
    // The fused kernels: T = 1, odd T, HS = 32, 64, 96, 128 and 18 (scalar only), and the
    // long sequences they are for (T = 4096, B = 1) at GPT-2's and GPT 1.3B's head sizes.
    let flash_shapes = [
        (b, t, c, nh),
        (1, 1, 64, 1),
        (2, 131, 256, 2),
        (1, 200, 384, 4),
        (1, 4096, 768, 12),
        (1, 4096, 256, 2),
    ];
    let groups: [CheckGroup<'_>; 13] = [
        ("encoder", "", &|h| check_encoder(h, b, t, c, v)),
        ("layernorm", "", &|h| check_layernorm(h, n, c)),
        ("gelu_residual", "", &|h| check_gelu_residual(h, n * 4 * c)),
        ("matmul", "", &|h| check_matmul(h, n, c, 3 * c)),
        ("attention", "", &|h| {
            check_attention(h, AttentionShape { b, t, c, nh })
        }),
        ("crossentropy", "", &|h| check_crossentropy(h, n, v, vp)),
        ("casts_norm_adamw", "", &|h| {
            check_casts_norm_adamw(h, 100_003)
        }),
        ("layernorm", ODD, &|h| check_layernorm(h, 37, 72)),
        ("gelu_residual", ODD, &|h| check_gelu_residual(h, 1001)),
        ("matmul", ODD, &|h| check_matmul(h, 37, 72, 100)),
        ("attention", ODD, &|h| check_attention(h, odd_attention)),
        ("flash_attention", "", &|h| {
            for (b, t, c, nh) in flash_shapes {
                check_flash_attention(h, AttentionShape { b, t, c, nh })?;
            }
            Ok(())
        }),
        ("flash_attention", ODD, &|h| {
            check_flash_attention(h, odd_attention)
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

fn check_encoder(h: &mut Harness<'_>, b: usize, t: usize, c: usize, v: usize) -> Result<()> {
    let (inp, wte, wpe) = (
        h.rand_tokens(b * t, v),
        h.rand_x(v * c, 1.0),
        h.rand_x(t * c, 1.0),
    );
    let (d_inp, d_wte, d_wpe) = (h.put_i32(&inp)?, h.put_x(&wte)?, h.put_x(&wpe)?);
    let d_out = h.poisoned(h.gpu.x(), b * t * c)?;
    h.gpu
        .encoder_forward(&d_out, &d_inp, &d_wte, &d_wpe, b, t, c)?;
    let tokens: Vec<u32> = inp.iter().map(|&x| x as u32).collect();
    let mut out = vec![0.0; b * t * c];
    cpu::encoder_forward(&mut out, &tokens, &wte, &wpe, t, c);
    h.compare("encoder_forward/out", &d_out, &out, 1)?;

    let dout = h.rand_x(b * t * c, 1.0);
    let (mut dwte, mut dwpe) = (h.rand_f32(v * c, 1.0), h.rand_f32(t * c, 1.0));
    let (d_dwte, d_dwpe, d_dout) = (h.put_f32(&dwte)?, h.put_f32(&dwpe)?, h.put_x(&dout)?);
    h.gpu
        .encoder_backward(&d_dwte, &d_dwpe, &d_dout, &d_inp, b, t, c)?;
    cpu::encoder_backward(&mut dwte, &mut dwpe, &dout, &tokens, t, c);
    h.compare("encoder_backward/dwte", &d_dwte, &dwte, 1)?;
    h.compare("encoder_backward/dwpe", &d_dwpe, &dwpe, 1)
}

fn check_layernorm(h: &mut Harness<'_>, n: usize, c: usize) -> Result<()> {
    let (inp, w, bias) = (h.rand_x(n * c, 2.0), h.rand_x(c, 1.0), h.rand_x(c, 1.0));
    let (d_inp, d_w, d_b) = (h.put_x(&inp)?, h.put_x(&w)?, h.put_x(&bias)?);
    let d_out = h.poisoned(h.gpu.x(), n * c)?;
    let (d_mean, d_rstd) = (h.poisoned(DType::F32, n)?, h.poisoned(DType::F32, n)?);
    h.gpu
        .layernorm_forward(&d_out, &d_mean, &d_rstd, &d_inp, &d_w, &d_b, n, c)?;
    let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    cpu::layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &bias, c);
    h.compare("layernorm_forward/out", &d_out, &out, 1)?;
    h.compare("layernorm_forward/mean", &d_mean, &mean, 1)?;
    h.compare("layernorm_forward/rstd", &d_rstd, &rstd, 1)?;

    let dout = h.rand_x(n * c, 1.0);
    let mut dinp = h.rand_x(n * c, 1.0);
    let (mut dw, mut db) = (h.rand_f32(c, 1.0), h.rand_f32(c, 1.0));
    let (d_dinp, d_dw, d_db, d_dout) = (
        h.put_x(&dinp)?,
        h.put_f32(&dw)?,
        h.put_f32(&db)?,
        h.put_x(&dout)?,
    );
    h.gpu.layernorm_backward(
        &d_dinp, &d_dw, &d_db, &d_dout, &d_inp, &d_w, &d_mean, &d_rstd, n, c,
    )?;
    cpu::layernorm_backward(
        &mut dinp, &mut dw, &mut db, &dout, &inp, &w, &mean, &rstd, c,
    );
    h.compare("layernorm_backward/dinp", &d_dinp, &dinp, 2)?;
    h.compare("layernorm_backward/dweight", &d_dw, &dw, 1)?;
    h.compare("layernorm_backward/dbias", &d_db, &db, 1)
}

fn check_gelu_residual(h: &mut Harness<'_>, n: usize) -> Result<()> {
    let (inp, dout) = (h.rand_x(n, 3.0), h.rand_x(n, 1.0));
    let (d_inp, d_dout) = (h.put_x(&inp)?, h.put_x(&dout)?);
    let mut dinp = h.rand_x(n, 1.0);
    let (d_out, d_dinp) = (h.poisoned(h.gpu.x(), n)?, h.put_x(&dinp)?);
    h.gpu.gelu_forward(&d_out, &d_inp)?;
    h.gpu
        .gelu_backward(&d_dinp, GradMode::Accumulate, &d_inp, &d_dout)?;
    let d_dinp_new = h.poisoned(h.gpu.x(), n)?;
    h.gpu
        .gelu_backward(&d_dinp_new, GradMode::Overwrite, &d_inp, &d_dout)?;
    let mut out = vec![0.0; n];
    cpu::gelu_forward(&mut out, &inp);
    cpu::gelu_backward(&mut dinp, &inp, &dout, true);
    let mut dinp_new = vec![f32::NAN; n];
    cpu::gelu_backward(&mut dinp_new, &inp, &dout, false);
    h.compare("gelu_forward/out", &d_out, &out, 1)?;
    h.compare("gelu_backward/dinp", &d_dinp, &dinp, 1)?;
    h.compare("gelu_backward/dinp (overwrite)", &d_dinp_new, &dinp_new, 1)?;

    let d_sum = h.poisoned(h.gpu.x(), n)?;
    h.gpu.residual_forward(&d_sum, &d_inp, &d_dout)?;
    let mut sum = vec![0.0; n];
    cpu::residual_forward(&mut sum, &inp, &dout);
    h.compare("residual_forward/out", &d_sum, &sum, 1)?;
    h.gpu.accumulate(&d_inp, &d_dout)?;
    h.compare("accumulate/dst", &d_inp, &sum, 1)
}

fn check_matmul(h: &mut Harness<'_>, n: usize, c: usize, oc: usize) -> Result<()> {
    let (inp, w, bias) = (
        h.rand_x(n * c, 1.0),
        h.rand_x(oc * c, 0.1),
        h.rand_x(oc, 0.1),
    );
    let (d_inp, d_w, d_bias) = (h.put_x(&inp)?, h.put_x(&w)?, h.put_x(&bias)?);
    let d_out = h.poisoned(h.gpu.x(), n * oc)?;
    h.gpu
        .matmul_forward(&d_out, &d_inp, &d_w, Some(&d_bias), n, c, oc)?;
    let mut out = vec![0.0; n * oc];
    cpu::matmul_forward(&mut out, &inp, &w, Some(&bias), n, c, oc);
    h.compare("matmul_forward/out", &d_out, &out, 1)?;

    let dout = h.rand_x(n * oc, 1.0);
    let (mut dw, mut db) = (h.rand_f32(oc * c, 1.0), h.rand_f32(oc, 1.0));
    let (d_dout, d_dw, d_db) = (h.put_x(&dout)?, h.put_f32(&dw)?, h.put_f32(&db)?);
    let mut dinp = h.rand_x(n * c, 1.0);
    let d_dinp = h.put_x(&dinp)?;
    h.gpu.matmul_backward(
        &d_dinp,
        GradMode::Accumulate,
        &d_dw,
        Some(&d_db),
        &d_dout,
        &d_inp,
        &d_w,
        n,
        c,
        oc,
    )?;
    // Overwrite mode: dinp alone (a fresh dweight/dbias pair takes the other products).
    let d_dinp_new = h.poisoned(h.gpu.x(), n * c)?;
    let (d_dw2, d_db2) = (h.put_f32(&vec![0.0; oc * c])?, h.put_f32(&vec![0.0; oc])?);
    h.gpu.matmul_backward(
        &d_dinp_new,
        GradMode::Overwrite,
        &d_dw2,
        Some(&d_db2),
        &d_dout,
        &d_inp,
        &d_w,
        n,
        c,
        oc,
    )?;
    let mut dinp_new = vec![f32::NAN; n * c];
    let (mut dw2, mut db2) = (vec![0.0; oc * c], vec![0.0; oc]);
    cpu::matmul_backward(
        Some(&mut dinp_new),
        false,
        &mut dw2,
        Some(&mut db2),
        &dout,
        &inp,
        &w,
        n,
        c,
        oc,
    );
    h.compare(
        "matmul_backward/dinp (overwrite)",
        &d_dinp_new,
        &dinp_new,
        1,
    )?;
    cpu::matmul_backward(
        Some(&mut dinp),
        true,
        &mut dw,
        Some(&mut db),
        &dout,
        &inp,
        &w,
        n,
        c,
        oc,
    );
    h.compare("matmul_backward/dinp", &d_dinp, &dinp, 1)?;
    h.compare("matmul_backward/dweight", &d_dw, &dw, 1)?;
    h.compare("matmul_backward/dbias", &d_db, &db, 1)
}

fn check_attention(h: &mut Harness<'_>, s: AttentionShape) -> Result<()> {
    let x = h.gpu.x();
    let (b, t, c) = (s.b, s.t, s.c);
    let qkv = h.rand_x(b * t * 3 * c, 1.0);
    let d_qkv = h.put_x(&qkv)?;
    let d_att = h.poisoned(x, s.scores_len())?;
    let acts = AttentionActs::Materialized {
        qkvr: h.poisoned(x, s.qkvr_len())?,
        att: d_att.clone(),
        vaccum: h.poisoned(x, b * t * c)?,
    };
    let d_out = h.poisoned(x, b * t * c)?;
    h.gpu.attention_forward(&d_out, &acts, &d_qkv, s)?;
    let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; s.scores_len()]);
    let (mut qkvr, mut vaccum) = (vec![0.0; s.qkvr_len()], vec![0.0; b * t * c]);
    cpu::attention_forward(&mut out, &mut qkvr, &mut att, &mut vaccum, &qkv, s);
    h.compare("attention_forward/out", &d_out, &out, 2)?;
    h.compare("attention_forward/att", &d_att, &att, 1)?;

    let dout = h.rand_x(b * t * c, 1.0);
    let d_dout = h.put_x(&dout)?;
    let scratch = AttentionScratch::Materialized {
        dqkvr: h.poisoned(x, s.qkvr_len())?,
        datt: h.poisoned(x, s.scores_len())?,
        dvaccum: h.poisoned(x, b * t * c)?,
    };
    let mut dqkv = h.rand_x(b * t * 3 * c, 1.0);
    let d_dqkv = h.put_x(&dqkv)?;
    h.gpu
        .attention_backward(&d_dqkv, &d_dout, &d_qkv, &d_out, &acts, &scratch, s)?;
    // The reference uses the GPU's (rounded) att so only the backward's own error is measured.
    let att_x = h.get(&d_att)?;

    let (mut datt, mut dqkvr) = (vec![0.0; s.scores_len()], vec![0.0; s.qkvr_len()]);
    let mut dvaccum = vec![0.0; b * t * c];
    cpu::attention_backward(
        &mut dqkv,
        &dout,
        &qkvr,
        &att_x,
        &mut dqkvr,
        &mut datt,
        &mut dvaccum,
        s,
    );
    h.compare("attention_backward/dqkv", &d_dqkv, &dqkv, 3)
}

/// The fused kernels, each set that can run `s` on this device (tensor cores and scalar),
/// against the CPU's materialized attention: out, and dqkv accumulated onto small random values
/// (q, k and v parts each against its own scale); lse against the CPU's fused forward.
fn check_flash_attention(h: &mut Harness<'_>, s: AttentionShape) -> Result<()> {
    let x = h.gpu.x();
    let (btc, rows) = (s.b * s.t * s.c, s.rows_len());
    let qkv = h.rand_x(3 * btc, 1.0);
    let dout = h.rand_x(btc, 1.0);
    let base = h.rand_x(3 * btc, 0.1);
    let (mut out, mut dqkv) = (vec![0.0; btc], base.clone());
    {
        let (mut att, mut datt) = (vec![0.0; s.scores_len()], vec![0.0; s.scores_len()]);
        let (mut qkvr, mut dqkvr) = (vec![0.0; s.qkvr_len()], vec![0.0; s.qkvr_len()]);
        let (mut vaccum, mut dvaccum) = (vec![0.0; btc], vec![0.0; btc]);
        cpu::attention_forward(&mut out, &mut qkvr, &mut att, &mut vaccum, &qkv, s);
        cpu::attention_backward(
            &mut dqkv,
            &dout,
            &qkvr,
            &att,
            &mut dqkvr,
            &mut datt,
            &mut dvaccum,
            s,
        );
    }
    let (mut fused_out, mut lse) = (vec![0.0; btc], vec![0.0; rows]);
    cpu::flash_forward(&mut fused_out, &mut lse, &qkv, s);
    // Released at the end (T = 4096 takes tens of MiB per kernel set).
    let mark = h.gpu.arena().mark();
    let (d_qkv, d_dout) = (h.put_x(&qkv)?, h.put_x(&dout)?);
    for kernels in FlashKernels::candidates(h.precision, s.head_size(), h.gpu.sm()) {
        let name = format!(
            "flash_attention[{}] B={} T={} HS={}",
            kernels.name(),
            s.b,
            s.t,
            s.head_size()
        );
        let d_out = h.poisoned(x, btc)?;
        let d_lse = h.poisoned(DType::F32, rows)?;
        h.gpu
            .flash_forward_with(kernels, &d_out, &d_lse, &d_qkv, s)?;
        h.compare(&format!("{name}/out"), &d_out, &out, 2)?;
        h.compare(&format!("{name}/lse"), &d_lse, &lse, 1)?;
        let d_dqkv = h.put_x(&base)?;
        let d_delta = h.poisoned(DType::F32, rows)?;
        h.gpu.flash_backward_with(
            kernels, &d_dqkv, &d_delta, &d_dout, &d_qkv, &d_out, &d_lse, s,
        )?;
        let got = h.get(&d_dqkv)?;
        for (part, label) in ["dq", "dk", "dv"].into_iter().enumerate() {
            // The gradient alone (what was added to `base`), of one part.
            let pick = |v: &[f32]| -> Vec<f32> {
                v.chunks_exact(s.c)
                    .zip(base.chunks_exact(s.c))
                    .skip(part)
                    .step_by(3)
                    .flat_map(|(v, b)| v.iter().zip(b).map(|(v, b)| v - b))
                    .collect()
            };
            h.compare_host(&format!("{name}/{label}"), &pick(&got), &pick(&dqkv), 3);
        }
    }
    h.gpu.synchronize(Stream::Compute)?;
    h.gpu.arena().reset_to(mark)?;
    Ok(())
}

fn check_crossentropy(h: &mut Harness<'_>, r: usize, v: usize, vp: usize) -> Result<()> {
    let logits = h.rand_x(r * vp, 4.0);
    let targets = h.rand_tokens(r, v);
    let (d_logits, d_targets) = (h.put_x(&logits)?, h.put_i32(&targets)?);
    let d_losses = h.poisoned(DType::F32, r)?;
    let dloss = 1.0 / r as f32;
    h.gpu
        .crossentropy_forward_backward(&d_logits, &d_losses, &d_targets, r, v, vp, Some(dloss))?;
    let tokens: Vec<u32> = targets.iter().map(|&x| x as u32).collect();
    let mut losses = vec![0.0; r];
    let mut dlogits = logits.clone();
    cpu::softmax_crossentropy(&mut dlogits, &tokens, &mut losses, Some(dloss), v, vp);
    h.compare("crossentropy/losses", &d_losses, &losses, 1)?;
    h.compare("crossentropy/dlogits", &d_logits, &dlogits, 1)
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
