//! The NVRTC kernels loaded into a context, how they are launched, and the launchers of the
//! optimizer's kernels (casts, norms, AdamW) on `GpuContext`, which check dtypes and sizes and
//! return `Result`. The layer operations' launchers are in `layers.rs`. `X` below is the
//! context's floatX (bf16 by default).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig, PushKernelArg};

use super::context::{GpuContext, Stream};
use super::error::{ensure, CudaError, Result};
use super::nvrtc;
use super::{DType, Precision};
use crate::backend::arena::Location;
use crate::backend::{AdamWHyper, Buf, NORM_PARTIALS_MAX};

/// Threads per block of the element-wise kernels.
pub(super) const ELEMENTWISE_BLOCK: u32 = 256;
/// Grid cap of grid-stride kernels (each thread loops beyond it).
const GRID_MAX_BLOCKS: usize = 65_536;
/// Threads per block of the warp-per-row kernels (8 rows per block).
const ROW_BLOCK: u32 = 256;
/// Must match NORM_BLOCK_SIZE in norm.cu.
const NORM_BLOCK: u32 = 512;

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
    pub(super) fn launch_elementwise(
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
        if bytes > super::layers::SHARED_DEFAULT_MAX_BYTES {
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
