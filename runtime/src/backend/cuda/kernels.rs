//! The NVRTC kernels loaded into a context, and their typed launchers (on `GpuContext`,
//! compute queue). Every launcher checks dtypes and sizes and returns `Result`; argument
//! order and semantics follow llm.c's train_gpt2.c functions (see each .cu file).
//! `X` below is the context's floatX (bf16 by default).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig, PushKernelArg};

use super::context::{GpuContext, Stream};
use super::error::{ensure, CudaError, Result};
use super::gemm::GemmShape;
use super::nvrtc;
use super::{DType, Precision};
use crate::backend::arena::Location;
use crate::backend::{AdamWHyper, Buf, GradMode, NORM_PARTIALS_MAX};

/// Threads per block of the element-wise kernels.
const ELEMENTWISE_BLOCK: u32 = 256;
/// Grid cap of grid-stride kernels (each thread loops beyond it).
const GRID_MAX_BLOCKS: usize = 65_536;
/// Threads per block of the warp-per-row kernels (8 rows per block).
const ROW_BLOCK: u32 = 256;
/// Must match NORM_BLOCK_SIZE in norm.cu.
const NORM_BLOCK: u32 = 512;
/// Rows per block in bias_backward's row split.
const BIAS_ROWS_PER_CHUNK: usize = 256;
/// Default dynamic shared memory limit per block without opting in (48 KiB).
const SHARED_DEFAULT_MAX_BYTES: usize = 48 * 1024;

/// Kernel functions of one context, by entry-point name.
pub struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
    precision: Precision,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Kernels({}, {} functions)",
            self.precision.name(),
            self.functions.len()
        )
    }
}

impl Kernels {
    /// Compiles (once per process) and loads every kernel file for `precision` and `arch`.
    pub fn load(ctx: &Arc<CudaContext>, precision: Precision, arch: &str) -> Result<Self> {
        let mut functions = HashMap::new();
        for (file, ptx) in nvrtc::compiled_ptx(precision, arch)? {
            let module = ctx
                .load_module(ptx)
                .map_err(|e| CudaError::driver("cuModuleLoadData", e))?;
            let entries = nvrtc::KERNEL_FILES
                .iter()
                .find(|(name, _, _)| *name == file)
                .map(|(_, _, entries)| *entries)
                .unwrap_or(&[]);
            for &entry in entries {
                let f = module
                    .load_function(entry)
                    .map_err(|_| CudaError::MissingKernel { kernel: entry })?;
                functions.insert(entry, f);
            }
        }
        Ok(Kernels {
            functions,
            precision,
        })
    }

    fn get(&self, name: &'static str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or(CudaError::MissingKernel { kernel: name })
    }
}

/// One kernel argument, in the C type the kernel declares.
#[derive(Clone, Copy)]
pub(super) enum Arg {
    /// A device pointer (T* / const T*), or 0 for nullptr.
    Ptr(u64),
    /// int
    Int(i32),
    /// size_t
    Size(u64),
    /// float
    Float(f32),
}

pub(super) fn int(v: usize, what: &'static str) -> Result<Arg> {
    i32::try_from(v)
        .map(Arg::Int)
        .map_err(|_| CudaError::precondition(what, format!("{v} exceeds i32")))
}

pub(super) fn elementwise_config(n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(ELEMENTWISE_BLOCK as usize)
        .clamp(1, GRID_MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ELEMENTWISE_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn rows_config(num_rows: usize) -> Result<LaunchConfig> {
    let per_block = (ROW_BLOCK / 32) as usize;
    let blocks = u32::try_from(num_rows.div_ceil(per_block).max(1))
        .map_err(|_| CudaError::precondition("launch", format!("{num_rows} rows")))?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (ROW_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// True when every device pointer is on a 16-byte boundary (what the `_vec` kernels' 128-bit
/// loads need; arena allocations are 256-byte aligned, slices may not be).
pub(super) fn aligned16(ptrs: impl IntoIterator<Item = u64>) -> bool {
    ptrs.into_iter().all(|p| p % 16 == 0)
}

/// Checks `buf` has `dtype` and exactly `numel` elements.
fn check(op: &'static str, name: &str, buf: &Buf, dtype: DType, numel: usize) -> Result<()> {
    buf.check_live(op, Location::Cuda)?;
    ensure(buf.dtype() == dtype && buf.len() == numel, op, || {
        format!(
            "{name} must be {numel} x {}, got {} x {}",
            dtype.name(),
            buf.len(),
            buf.dtype().name()
        )
    })
}

/// Checks `buf` has `dtype` and at least `numel` elements (tables sized by maxT, partials).
fn check_min(op: &'static str, name: &str, buf: &Buf, dtype: DType, numel: usize) -> Result<()> {
    buf.check_live(op, Location::Cuda)?;
    ensure(buf.dtype() == dtype && buf.len() >= numel, op, || {
        format!(
            "{name} must be at least {numel} x {}, got {} x {}",
            dtype.name(),
            buf.len(),
            buf.dtype().name()
        )
    })
}

impl GpuContext {
    /// The floatX dtype of this context.
    pub fn x(&self) -> DType {
        self.precision().dtype()
    }

    /// floatX elements in one 16-byte pack of the `_vec` kernels (PACK in common.cuh).
    pub(super) fn pack(&self) -> usize {
        16 / self.x().size_bytes()
    }

    /// Launches `name` over `n` elements, or `name_vec` over n / PACK packs when `n` divides
    /// by PACK and every buffer is 16-byte aligned. `ptrs` come first, then the count (size_t).
    fn launch_elementwise(
        &self,
        name: &'static str,
        name_vec: &'static str,
        bufs: &[&Buf],
        extra: &[Arg],
        n: usize,
    ) -> Result<()> {
        let pack = self.pack();
        let (kernel, count) = if n % pack == 0 && aligned16(bufs.iter().map(|b| b.ptr())) {
            (name_vec, n / pack)
        } else {
            (name, n)
        };
        let args: Vec<Arg> = bufs
            .iter()
            .map(|b| Arg::Ptr(b.ptr()))
            .chain(extra.iter().copied())
            .chain([Arg::Size(count as u64)])
            .collect();
        self.launch(kernel, elementwise_config(count), &args)
    }

    pub(super) fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        self.launch_on(Stream::Compute, name, cfg, args)
    }

    /// Launches `name` with `cfg.shared_mem_bytes` of dynamic shared memory, opting the kernel
    /// in first when that is above the default 48 KiB (the device's own limit still applies:
    /// a launch past it fails naming the kernel).
    pub(super) fn launch_shared(
        &self,
        name: &'static str,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<()> {
        let bytes = cfg.shared_mem_bytes as usize;
        if bytes > SHARED_DEFAULT_MAX_BYTES {
            let attribute = cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            let value = i32::try_from(bytes).map_err(|_| {
                CudaError::precondition(name, format!("{bytes} bytes of shared memory"))
            })?;
            self.kernels()
                .get(name)?
                .set_attribute(attribute, value)
                .map_err(|e| CudaError::driver(name, e))?;
        }
        self.launch(name, cfg, args)
    }

    /// Launches `name` on `stream`; profiles time the compute stream only.
    fn launch_on(
        &self,
        stream: Stream,
        name: &'static str,
        cfg: LaunchConfig,
        args: &[Arg],
    ) -> Result<()> {
        let func = self.kernels().get(name)?;
        let on = self.stream(stream);
        let mut builder = on.launch_builder(func);
        for arg in args {
            match arg {
                Arg::Ptr(v) | Arg::Size(v) => builder.arg(v),
                Arg::Int(v) => builder.arg(v),
                Arg::Float(v) => builder.arg(v),
            };
        }
        // SAFETY: the argument list matches the kernel's C signature (each launcher below is
        // written against its .cu declaration), every pointer is an arena view whose size the
        // launcher checked against the sizes passed, and the arena outlives the launch.
        unsafe { builder.launch(cfg) }.map_err(|e| CudaError::driver(name, e))?;
        if stream == Stream::Compute {
            self.profile_mark(name)?;
        }
        Ok(())
    }

    /// Launches a kernel whose arguments are device pointers followed by ints.
    pub(super) fn launch_ptrs_ints(
        &self,
        name: &'static str,
        cfg: LaunchConfig,
        ptrs: &[u64],
        ints: &[i32],
    ) -> Result<()> {
        let args: Vec<Arg> = ptrs
            .iter()
            .map(|&p| Arg::Ptr(p))
            .chain(ints.iter().map(|&i| Arg::Int(i)))
            .collect();
        self.launch(name, cfg, &args)
    }

    /// out (B,T,C) X = `wte[inp] + wpe[t]`; inp (B,T) i32, wte (V,C) X, wpe (≥T,C) X.
    #[allow(clippy::too_many_arguments)]
    pub fn encoder_forward(
        &self,
        out: &Buf,
        inp: &Buf,
        wte: &Buf,
        wpe: &Buf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let op = "encoder_forward";
        let x = self.x();
        check(op, "out", out, x, b * t * c)?;
        check(op, "inp", inp, DType::I32, b * t)?;
        check_min(op, "wte", wte, x, c)?;
        ensure(wte.len() % c == 0, op, || "wte is not (V,C)".into())?;
        check_min(op, "wpe", wpe, x, t * c)?;
        let args = [
            Arg::Ptr(out.ptr()),
            Arg::Ptr(inp.ptr()),
            Arg::Ptr(wte.ptr()),
            Arg::Ptr(wpe.ptr()),
            int(b, op)?,
            int(t, op)?,
            int(c, op)?,
        ];
        self.launch(op, elementwise_config(b * t * c), &args)
    }

    /// dwte (V,C) f32 += scatter of dout by token, dwpe (≥T,C) f32 += sum over batch;
    /// dout (B,T,C) X, inp (B,T) i32.
    #[allow(clippy::too_many_arguments)]
    pub fn encoder_backward(
        &self,
        dwte: &Buf,
        dwpe: &Buf,
        dout: &Buf,
        inp: &Buf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let op = "encoder_backward";
        check_min(op, "dwte", dwte, DType::F32, c)?;
        check_min(op, "dwpe", dwpe, DType::F32, t * c)?;
        check(op, "dout", dout, self.x(), b * t * c)?;
        check(op, "inp", inp, DType::I32, b * t)?;
        let wpe_args = [
            Arg::Ptr(dwpe.ptr()),
            Arg::Ptr(dout.ptr()),
            int(b, op)?,
            int(t, op)?,
            int(c, op)?,
        ];
        self.launch("encoder_backward_wpe", elementwise_config(t * c), &wpe_args)?;
        let wte_args = [
            Arg::Ptr(dwte.ptr()),
            Arg::Ptr(dout.ptr()),
            Arg::Ptr(inp.ptr()),
            int(b, op)?,
            int(t, op)?,
            int(c, op)?,
        ];
        self.launch(
            "encoder_backward_wte",
            elementwise_config(b * t * c),
            &wte_args,
        )
    }

    /// out (N,C) X, mean (N) f32, rstd (N) f32 = LayerNorm(inp (N,C) X; weight (C) X, bias (C) X).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward(
        &self,
        out: &Buf,
        mean: &Buf,
        rstd: &Buf,
        inp: &Buf,
        weight: &Buf,
        bias: &Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "layernorm_forward";
        let x = self.x();
        check(op, "out", out, x, n * c)?;
        check(op, "mean", mean, DType::F32, n)?;
        check(op, "rstd", rstd, DType::F32, n)?;
        check(op, "inp", inp, x, n * c)?;
        check(op, "weight", weight, x, c)?;
        check(op, "bias", bias, x, c)?;
        let args = [
            Arg::Ptr(out.ptr()),
            Arg::Ptr(mean.ptr()),
            Arg::Ptr(rstd.ptr()),
            Arg::Ptr(inp.ptr()),
            Arg::Ptr(weight.ptr()),
            Arg::Ptr(bias.ptr()),
            int(n, op)?,
            int(c, op)?,
        ];
        self.launch(op, rows_config(n)?, &args)
    }

    /// dinp (N,C) X +=, dweight (C) f32 +=, dbias (C) f32 += LayerNorm backward of
    /// dout (N,C) X given inp (N,C) X, weight (C) X and the saved mean/rstd (N) f32.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward(
        &self,
        dinp: &Buf,
        dweight: &Buf,
        dbias: &Buf,
        dout: &Buf,
        inp: &Buf,
        weight: &Buf,
        mean: &Buf,
        rstd: &Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "layernorm_backward";
        let x = self.x();
        check(op, "dinp", dinp, x, n * c)?;
        check(op, "dweight", dweight, DType::F32, c)?;
        check(op, "dbias", dbias, DType::F32, c)?;
        check(op, "dout", dout, x, n * c)?;
        check(op, "inp", inp, x, n * c)?;
        check(op, "weight", weight, x, c)?;
        check(op, "mean", mean, DType::F32, n)?;
        check(op, "rstd", rstd, DType::F32, n)?;
        let shared = 2 * c * 4;
        ensure(shared <= SHARED_DEFAULT_MAX_BYTES, op, || {
            format!("C = {c} needs {shared} bytes of shared memory (max 48 KiB: C <= 6144)")
        })?;
        let block: u32 = 512;
        let rows_per_block = (block / 32) as usize;
        let blocks = n.div_ceil(rows_per_block).clamp(1, 264) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let args = [
            Arg::Ptr(dinp.ptr()),
            Arg::Ptr(dweight.ptr()),
            Arg::Ptr(dbias.ptr()),
            Arg::Ptr(dout.ptr()),
            Arg::Ptr(inp.ptr()),
            Arg::Ptr(weight.ptr()),
            Arg::Ptr(mean.ptr()),
            Arg::Ptr(rstd.ptr()),
            int(n, op)?,
            int(c, op)?,
        ];
        self.launch(op, cfg, &args)
    }

    /// out (N) X = gelu(inp (N) X); out may be inp.
    pub fn gelu_forward(&self, out: &Buf, inp: &Buf) -> Result<()> {
        let op = "gelu_forward";
        check(op, "out", out, self.x(), inp.len())?;
        check(op, "inp", inp, self.x(), out.len())?;
        self.launch_elementwise(op, "gelu_forward_vec", &[out, inp], &[], inp.len())
    }

    /// dinp (N) X += gelu'(inp) · dout (`GradMode::Accumulate`, like the CPU backend), or =
    /// (`Overwrite`); dinp must not alias inp or dout.
    pub fn gelu_backward(&self, dinp: &Buf, mode: GradMode, inp: &Buf, dout: &Buf) -> Result<()> {
        let op = "gelu_backward";
        let n = inp.len();
        check(op, "dinp", dinp, self.x(), n)?;
        check(op, "inp", inp, self.x(), n)?;
        check(op, "dout", dout, self.x(), n)?;
        ensure(!dinp.overlaps(dout) && !dinp.overlaps(inp), op, || {
            "dinp accumulates and must not alias inp or dout".into()
        })?;
        let accumulate = Arg::Int(i32::from(mode == GradMode::Accumulate));
        self.launch_elementwise(
            op,
            "gelu_backward_vec",
            &[dinp, inp, dout],
            &[accumulate],
            n,
        )
    }

    /// out (N) X = a + b; out may be a or b.
    pub fn residual_forward(&self, out: &Buf, a: &Buf, b: &Buf) -> Result<()> {
        let op = "residual_forward";
        let n = out.len();
        check(op, "out", out, self.x(), n)?;
        check(op, "a", a, self.x(), n)?;
        check(op, "b", b, self.x(), n)?;
        self.launch_elementwise(op, "residual_forward_vec", &[out, a, b], &[], n)
    }

    /// dst (N) X += src (N) X (residual backward).
    pub fn accumulate(&self, dst: &Buf, src: &Buf) -> Result<()> {
        let op = "accumulate";
        check(op, "dst", dst, self.x(), src.len())?;
        check(op, "src", src, self.x(), dst.len())?;
        self.launch_elementwise(op, "accumulate_vec", &[dst, src], &[], dst.len())
    }

    /// out (N,OC) X = inp (N,C) X · weight (OC,C) Xᵀ + bias (OC) X.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_forward(
        &self,
        out: &Buf,
        inp: &Buf,
        weight: &Buf,
        bias: Option<&Buf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_forward";
        let x = self.x();
        check(op, "out", out, x, n * oc)?;
        check(op, "inp", inp, x, n * c)?;
        check(op, "weight", weight, x, oc * c)?;
        let shape = GemmShape {
            m: n,
            n: oc,
            k: c,
            trans_a: false,
            trans_b: true,
        };
        self.blas().matmul(out, inp, weight, shape, 1.0, 0.0)?;
        self.profile_mark("gemm: matmul_forward")?;
        if let Some(bias) = bias {
            check(op, "bias", bias, x, oc)?;
            let args = [
                Arg::Ptr(out.ptr()),
                Arg::Ptr(bias.ptr()),
                int(n, op)?,
                int(oc, op)?,
            ];
            let pack = self.pack();
            if oc % pack == 0 && aligned16([out.ptr(), bias.ptr()]) {
                // x: the packs of one row; y: rows (grid-stride beyond the grid's limit).
                let packs = oc / pack;
                let block = packs
                    .next_multiple_of(32)
                    .clamp(32, ELEMENTWISE_BLOCK as usize);
                let cfg = LaunchConfig {
                    grid_dim: (packs.div_ceil(block) as u32, n.clamp(1, 65_535) as u32, 1),
                    block_dim: (block as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                self.launch("add_bias_vec", cfg, &args)?;
            } else {
                self.launch("add_bias", elementwise_config(n * oc), &args)?;
            }
        }
        Ok(())
    }

    /// dinp (N,C) X += dout · weight (`GradMode::Accumulate`) or = (`Overwrite`);
    /// dweight (OC,C) f32 += doutᵀ · inp; dbias (OC) f32 += column sums of dout (N,OC) X.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_backward(
        &self,
        dinp: &Buf,
        dinp_mode: GradMode,
        dweight: &Buf,
        dbias: Option<&Buf>,
        dout: &Buf,
        inp: &Buf,
        weight: &Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_backward";
        let x = self.x();
        check(op, "dinp", dinp, x, n * c)?;
        check(op, "dweight", dweight, DType::F32, oc * c)?;
        check(op, "dout", dout, x, n * oc)?;
        check(op, "inp", inp, x, n * c)?;
        check(op, "weight", weight, x, oc * c)?;
        let dinp_shape = GemmShape {
            m: n,
            n: c,
            k: oc,
            trans_a: false,
            trans_b: false,
        };
        let beta = if dinp_mode == GradMode::Accumulate {
            1.0
        } else {
            0.0
        };
        self.blas()
            .matmul(dinp, dout, weight, dinp_shape, 1.0, beta)?;
        self.profile_mark("gemm: matmul_backward dinp")?;
        let dweight_shape = GemmShape {
            m: oc,
            n: c,
            k: n,
            trans_a: true,
            trans_b: false,
        };
        self.blas()
            .matmul(dweight, dout, inp, dweight_shape, 1.0, 1.0)?;
        self.profile_mark("gemm: matmul_backward dweight")?;
        if let Some(dbias) = dbias {
            check(op, "dbias", dbias, DType::F32, oc)?;
            let chunks = u32::try_from(n.div_ceil(BIAS_ROWS_PER_CHUNK).max(1)).unwrap_or(u32::MAX);
            let cfg = LaunchConfig {
                grid_dim: (oc.div_ceil(ELEMENTWISE_BLOCK as usize) as u32, chunks, 1),
                block_dim: (ELEMENTWISE_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let args = [
                Arg::Ptr(dbias.ptr()),
                Arg::Ptr(dout.ptr()),
                int(n, op)?,
                int(oc, op)?,
                int(BIAS_ROWS_PER_CHUNK, op)?,
            ];
            self.launch("bias_backward", cfg, &args)?;
        }
        Ok(())
    }

    /// Fused softmax + cross-entropy over logits (R,Vp) X with real vocab V ≤ Vp:
    /// losses (R) f32 = `-log p[target]`, targets (R) i32. With `dloss = Some(d)` the logits
    /// are overwritten with dlogits = (p - onehot)·d (0 in the padding), d = grad_scale/(B·T).
    #[allow(clippy::too_many_arguments)]
    pub fn crossentropy_forward_backward(
        &self,
        logits: &Buf,
        losses: &Buf,
        targets: &Buf,
        r: usize,
        v: usize,
        vp: usize,
        dloss: Option<f32>,
    ) -> Result<()> {
        let op = "crossentropy_forward_backward";
        ensure(v > 0 && v <= vp, op, || {
            format!("need 0 < V <= Vp, got V={v} Vp={vp}")
        })?;
        check(op, "logits", logits, self.x(), r * vp)?;
        check(op, "losses", losses, DType::F32, r)?;
        check(op, "targets", targets, DType::I32, r)?;
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(r.max(1)).unwrap_or(u32::MAX), 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            Arg::Ptr(logits.ptr()),
            Arg::Ptr(losses.ptr()),
            Arg::Ptr(targets.ptr()),
            int(r, op)?,
            int(v, op)?,
            int(vp, op)?,
            Arg::Float(dloss.unwrap_or(0.0)),
            Arg::Int(i32::from(dloss.is_some())),
        ];
        self.launch(op, cfg, &args)
    }

    /// out (N) X = inp (N) f32, round to nearest.
    pub fn cast_f32_to_x(&self, out: &Buf, inp: &Buf) -> Result<()> {
        let op = "cast_f32_to_x";
        check(op, "out", out, self.x(), inp.len())?;
        check(op, "inp", inp, DType::F32, out.len())?;
        let args = [
            Arg::Ptr(out.ptr()),
            Arg::Ptr(inp.ptr()),
            Arg::Size(inp.len() as u64),
        ];
        self.launch(op, elementwise_config(inp.len()), &args)
    }

    /// out (N) f32 = inp (N) X.
    pub fn cast_x_to_f32(&self, out: &Buf, inp: &Buf) -> Result<()> {
        let op = "cast_x_to_f32";
        check(op, "out", out, DType::F32, inp.len())?;
        check(op, "inp", inp, self.x(), out.len())?;
        let args = [
            Arg::Ptr(out.ptr()),
            Arg::Ptr(inp.ptr()),
            Arg::Size(inp.len() as u64),
        ];
        self.launch(op, elementwise_config(inp.len()), &args)
    }

    /// out (N) f32 += scale · inp (N) X.
    pub fn accumulate_x_to_f32(&self, out: &Buf, inp: &Buf, scale: f32) -> Result<()> {
        let op = "accumulate_x_to_f32";
        check(op, "out", out, DType::F32, inp.len())?;
        check(op, "inp", inp, self.x(), out.len())?;
        let args = [
            Arg::Ptr(out.ptr()),
            Arg::Ptr(inp.ptr()),
            Arg::Float(scale),
            Arg::Size(inp.len() as u64),
        ];
        self.launch(op, elementwise_config(inp.len()), &args)
    }

    /// x (N) f32 *= scale.
    pub fn scale_f32(&self, x: &Buf, scale: f32) -> Result<()> {
        let op = "scale_f32";
        check(op, "x", x, DType::F32, x.len())?;
        let args = [
            Arg::Ptr(x.ptr()),
            Arg::Float(scale),
            Arg::Size(x.len() as u64),
        ];
        self.launch(op, elementwise_config(x.len()), &args)
    }

    /// out (N) f32 += inp (N) f32 on `stream` (a reduced gradient shard into its accumulator,
    /// on the communication stream right after the reduction).
    pub fn add_f32(&self, stream: Stream, out: &Buf, inp: &Buf) -> Result<()> {
        let op = "add_f32";
        check(op, "out", out, DType::F32, inp.len())?;
        check(op, "inp", inp, DType::F32, out.len())?;
        ensure(!out.overlaps(inp), op, || "out must not alias inp".into())?;
        let args = [
            Arg::Ptr(out.ptr()),
            Arg::Ptr(inp.ptr()),
            Arg::Size(inp.len() as u64),
        ];
        self.launch_on(stream, op, elementwise_config(inp.len()), &args)
    }

    /// out (1) f32 = (accumulate ? out : 0) + Σ grads², grads f32 or X; `partials` is scratch of
    /// ≥ NORM_PARTIALS_MAX f32. Deterministic for a given length. Inf/NaN means overflow.
    pub fn grad_norm_squared(
        &self,
        out: &Buf,
        partials: &Buf,
        grads: &Buf,
        accumulate: bool,
    ) -> Result<()> {
        let op = "grad_norm_squared";
        check(op, "out", out, DType::F32, 1)?;
        check_min(op, "partials", partials, DType::F32, NORM_PARTIALS_MAX)?;
        let kernel = match grads.dtype() {
            DType::F32 => "norm_squared_partial_f32",
            d if d == self.x() => "norm_squared_partial_x",
            d => {
                return Err(CudaError::precondition(
                    op,
                    format!("grads must be f32 or {}, got {}", self.x().name(), d.name()),
                ))
            }
        };
        let blocks = grads
            .len()
            .div_ceil(NORM_BLOCK as usize)
            .clamp(1, NORM_PARTIALS_MAX);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (NORM_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            kernel,
            cfg,
            &[
                Arg::Ptr(partials.ptr()),
                Arg::Ptr(grads.ptr()),
                Arg::Size(grads.len() as u64),
            ],
        )?;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (NORM_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            Arg::Ptr(out.ptr()),
            Arg::Ptr(partials.ptr()),
            int(blocks, op)?,
            Arg::Int(i32::from(accumulate)),
        ];
        self.launch("norm_squared_finalize", cfg, &args)
    }

    /// One AdamW step (`hyper.step` ≥ 1 is the bias-correction t) on fp32 params/grads/m/v
    /// (N); writes the updated params also to `params_x` (N) X when given. grads are multiplied
    /// by `hyper.grad_scale` first (clip factor / loss scale).
    pub fn adamw(
        &self,
        params: &Buf,
        params_x: Option<&Buf>,
        grads: &Buf,
        m: &Buf,
        v: &Buf,
        hyper: &AdamWHyper,
    ) -> Result<()> {
        let op = "adamw";
        let n = params.len();
        let step = hyper.step;
        ensure(step >= 1, op, || "step counts from 1".into())?;
        for (name, buf) in [("params", params), ("grads", grads), ("m", m), ("v", v)] {
            check(op, name, buf, DType::F32, n)?;
        }
        if let Some(px) = params_x {
            check(op, "params_x", px, self.x(), n)?;
        }
        let beta1_correction =
            (1.0 - f64::from(hyper.beta1).powi(i32::try_from(step).unwrap_or(i32::MAX))) as f32;
        let beta2_correction =
            (1.0 - f64::from(hyper.beta2).powi(i32::try_from(step).unwrap_or(i32::MAX))) as f32;
        let args = [
            Arg::Ptr(params.ptr()),
            Arg::Ptr(params_x.map_or(0, |p| p.ptr())),
            Arg::Ptr(grads.ptr()),
            Arg::Ptr(m.ptr()),
            Arg::Ptr(v.ptr()),
            Arg::Size(n as u64),
            Arg::Float(hyper.lr),
            Arg::Float(hyper.beta1),
            Arg::Float(hyper.beta2),
            Arg::Float(beta1_correction),
            Arg::Float(beta2_correction),
            Arg::Float(hyper.eps),
            Arg::Float(hyper.weight_decay),
            Arg::Float(hyper.grad_scale),
        ];
        self.launch("adamw_update", elementwise_config(n), &args)
    }
}
