//! The CUDA backend's layer operations: each checked descriptor ([`crate::backend::ops`])
//! becomes its NVRTC kernel launch(es) or cuBLAS GEMM on the compute stream. The operands were
//! checked by `Op::check` (types, sizes, live device memory, no aliasing); what is left here is
//! what only this backend needs (launch sizes that fit an int, shared memory bounds).

use cudarc::driver::LaunchConfig;

use super::context::GpuContext;
use super::error::{ensure, CudaError, Result};
use super::gemm::GemmShape;
use super::kernels::{aligned16, elementwise_config, int, rows_config, Arg, ELEMENTWISE_BLOCK};
use crate::backend::arena::Location;
use crate::backend::{
    AttentionActs, AttentionScratch, Checked, CrossEntropy, EncoderBackward, EncoderForward,
    GradMode, LayerNormBackward, LayerNormForward, MatmulBackward, MatmulForward, Op,
    RmsNormBackward, RmsNormForward, Rotary, Rows,
};
use crate::backend::{CachedAttention, KvCacheWrite};

/// Rows per block in bias_backward's row split.
const BIAS_ROWS_PER_CHUNK: usize = 256;
/// Default dynamic shared memory limit per block without opting in (48 KiB).
pub(super) const SHARED_DEFAULT_MAX_BYTES: usize = 48 * 1024;
/// Threads per block of the norm backward kernels (one warp per row).
const NORM_BACKWARD_BLOCK: u32 = 512;
/// Blocks of the norm backward kernels at most (each strides over rows).
const NORM_BACKWARD_BLOCKS_MAX: usize = 264;

/// Must match DECODE_HS_MAX in decode.cu.
const CACHED_ATTENTION_HS_MAX: usize = 256;

/// A null device pointer (an absent optional operand).
const NULL: Arg = Arg::Ptr(0);

impl GpuContext {
    /// Checks a layer operation's operands and enqueues it (the self-test's entry point; the
    /// engine goes through `Device::run`).
    pub fn run<'a>(&self, op: impl Into<Op<'a>>) -> Result<()> {
        self.launch_layer(op.into().check(self.x(), Location::Cuda)?)
    }

    pub(super) fn launch_layer(&self, op: Checked<'_>) -> Result<()> {
        let name = op.op().name();
        match *op.op() {
            Op::EncoderForward(d) => self.encoder_forward(&d),
            Op::EncoderBackward(d) => self.encoder_backward(&d),
            Op::LayerNormForward(d) => self.layernorm_forward(&d),
            Op::LayerNormBackward(d) => self.layernorm_backward(&d),
            Op::RmsNormForward(d) => self.rmsnorm_forward(&d),
            Op::RmsNormBackward(d) => self.rmsnorm_backward(&d),
            Op::MatmulForward(d) => self.matmul_forward(&d),
            Op::MatmulBackward(d) => self.matmul_backward(&d),
            Op::AttentionForward(d) => match d.acts {
                AttentionActs::Materialized { qkvr, att, vaccum } => {
                    self.materialized_forward(d.out, qkvr, att, vaccum, d.qkv, d.shape)
                }
                AttentionActs::Fused { lse } => self.flash_forward(d.out, lse, d.qkv, d.shape),
            },
            Op::AttentionBackward(d) => match (d.acts, d.scratch) {
                (
                    AttentionActs::Materialized { qkvr, att, .. },
                    AttentionScratch::Materialized {
                        dqkvr,
                        datt,
                        dvaccum,
                    },
                ) => self.materialized_backward(
                    d.dqkv, d.dout, qkvr, att, dqkvr, datt, dvaccum, d.shape,
                ),
                (AttentionActs::Fused { lse }, AttentionScratch::Fused { delta }) => {
                    self.flash_backward(d.dqkv, delta, d.dout, d.qkv, d.out, lse, d.shape)
                }
                // Op::check refused acts and scratch of different modes.
                (acts, scratch) => {
                    Err(crate::backend::attention_modes_differ(name, acts, scratch).into())
                }
            },
            Op::Rotary(d) => self.rotary(&d),
            Op::KvCacheWrite(d) => self.kv_cache_write(&d),
            Op::CachedAttention(d) => self.cached_attention(&d),
            Op::GeluForward(d) => self.launch_elementwise(
                "gelu_forward",
                "gelu_forward_vec",
                &[d.out, d.inp],
                &[],
                d.inp.len(),
            ),
            Op::GeluBackward(d) => {
                let accumulate = Arg::Int(i32::from(d.dinp_mode == GradMode::Accumulate));
                self.launch_elementwise(
                    "gelu_backward",
                    "gelu_backward_vec",
                    &[d.dinp, d.inp, d.dout],
                    &[accumulate],
                    d.inp.len(),
                )
            }
            Op::SwigluForward(d) => {
                let args = [
                    Arg::Ptr(d.out.ptr()),
                    Arg::Ptr(d.inp.ptr()),
                    int(d.n, name)?,
                    int(d.i, name)?,
                ];
                self.launch("swiglu_forward", elementwise_config(d.n * d.i), &args)
            }
            Op::SwigluBackward(d) => {
                let args = [
                    Arg::Ptr(d.dinp.ptr()),
                    Arg::Ptr(d.dout.ptr()),
                    Arg::Ptr(d.inp.ptr()),
                    int(d.n, name)?,
                    int(d.i, name)?,
                ];
                self.launch("swiglu_backward", elementwise_config(d.n * d.i), &args)
            }
            Op::ResidualForward(d) => self.launch_elementwise(
                "residual_forward",
                "residual_forward_vec",
                &[d.out, d.a, d.b],
                &[],
                d.out.len(),
            ),
            Op::Accumulate(d) => self.launch_elementwise(
                "accumulate",
                "accumulate_vec",
                &[d.dst, d.src],
                &[],
                d.dst.len(),
            ),
            Op::CrossEntropy(d) => self.crossentropy(&d),
        }
    }

    fn encoder_forward(&self, d: &EncoderForward<'_>) -> Result<()> {
        let op = "encoder_forward";
        let args = [
            Arg::Ptr(d.out.ptr()),
            Arg::Ptr(d.tokens.ptr()),
            Arg::Ptr(d.wte.ptr()),
            d.wpe.map_or(NULL, |w| Arg::Ptr(w.ptr())),
            int(d.b, op)?,
            int(d.t, op)?,
            int(d.c, op)?,
        ];
        self.launch(op, elementwise_config(d.b * d.t * d.c), &args)
    }

    fn encoder_backward(&self, d: &EncoderBackward<'_>) -> Result<()> {
        let op = "encoder_backward";
        let (b, t, c) = (int(d.b, op)?, int(d.t, op)?, int(d.c, op)?);
        if let Some(dwpe) = d.dwpe {
            let args = [Arg::Ptr(dwpe.ptr()), Arg::Ptr(d.dout.ptr()), b, t, c];
            self.launch("encoder_backward_wpe", elementwise_config(d.t * d.c), &args)?;
        }
        let args = [
            Arg::Ptr(d.dwte.ptr()),
            Arg::Ptr(d.dout.ptr()),
            Arg::Ptr(d.tokens.ptr()),
            b,
            t,
            c,
        ];
        let cfg = elementwise_config(d.b * d.t * d.c);
        self.launch("encoder_backward_wte", cfg, &args)
    }

    fn layernorm_forward(&self, d: &LayerNormForward<'_>) -> Result<()> {
        let op = "layernorm_forward";
        let args = [
            Arg::Ptr(d.out.ptr()),
            Arg::Ptr(d.mean.ptr()),
            Arg::Ptr(d.rstd.ptr()),
            Arg::Ptr(d.inp.ptr()),
            Arg::Ptr(d.weight.ptr()),
            Arg::Ptr(d.bias.ptr()),
            int(d.n, op)?,
            int(d.c, op)?,
        ];
        self.launch(op, rows_config(d.n)?, &args)
    }

    /// The launch of a norm backward kernel: one warp per row, `floats_per_channel` floats of
    /// shared memory per channel for the block's partial weight gradients.
    fn norm_backward_config(
        op: &'static str,
        n: usize,
        c: usize,
        floats_per_channel: usize,
    ) -> Result<LaunchConfig> {
        let shared = floats_per_channel * c * 4;
        ensure(shared <= SHARED_DEFAULT_MAX_BYTES, op, || {
            format!("C = {c} needs {shared} bytes of shared memory (at most 48 KiB)")
        })?;
        let rows_per_block = (NORM_BACKWARD_BLOCK / 32) as usize;
        let blocks = n
            .div_ceil(rows_per_block)
            .clamp(1, NORM_BACKWARD_BLOCKS_MAX) as u32;
        Ok(LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (NORM_BACKWARD_BLOCK, 1, 1),
            shared_mem_bytes: shared as u32,
        })
    }

    fn layernorm_backward(&self, d: &LayerNormBackward<'_>) -> Result<()> {
        let op = "layernorm_backward";
        let cfg = Self::norm_backward_config(op, d.n, d.c, 2)?;
        let args = [
            Arg::Ptr(d.dinp.ptr()),
            Arg::Ptr(d.dweight.ptr()),
            Arg::Ptr(d.dbias.ptr()),
            Arg::Ptr(d.dout.ptr()),
            Arg::Ptr(d.inp.ptr()),
            Arg::Ptr(d.weight.ptr()),
            Arg::Ptr(d.mean.ptr()),
            Arg::Ptr(d.rstd.ptr()),
            int(d.n, op)?,
            int(d.c, op)?,
        ];
        self.launch(op, cfg, &args)
    }

    /// The (N, C, group, stride) ints of a row layout.
    fn rows_args(op: &'static str, rows: &Rows) -> Result<[Arg; 4]> {
        Ok([
            int(rows.n, op)?,
            int(rows.c, op)?,
            int(rows.group, op)?,
            int(rows.stride, op)?,
        ])
    }

    fn rmsnorm_forward(&self, d: &RmsNormForward<'_>) -> Result<()> {
        let op = "rmsnorm_forward";
        let ptrs = [
            Arg::Ptr(d.out.ptr()),
            Arg::Ptr(d.rstd.ptr()),
            Arg::Ptr(d.inp.ptr()),
            Arg::Ptr(d.weight.ptr()),
        ];
        let args = [
            &ptrs[..],
            &Self::rows_args(op, &d.rows)?,
            &[Arg::Float(d.eps)],
        ]
        .concat();
        self.launch(op, rows_config(d.rows.n)?, &args)
    }

    fn rmsnorm_backward(&self, d: &RmsNormBackward<'_>) -> Result<()> {
        let op = "rmsnorm_backward";
        let cfg = Self::norm_backward_config(op, d.rows.n, d.rows.c, 1)?;
        let ptrs = [
            Arg::Ptr(d.dinp.ptr()),
            Arg::Ptr(d.dweight.ptr()),
            Arg::Ptr(d.dout.ptr()),
            Arg::Ptr(d.inp.ptr()),
            Arg::Ptr(d.weight.ptr()),
            Arg::Ptr(d.rstd.ptr()),
        ];
        let accumulate = Arg::Int(i32::from(d.dinp_mode == GradMode::Accumulate));
        let args = [&ptrs[..], &Self::rows_args(op, &d.rows)?, &[accumulate]].concat();
        self.launch(op, cfg, &args)
    }

    fn rotary(&self, d: &Rotary<'_>) -> Result<()> {
        let op = "rotary";
        let s = d.shape;
        let args = [
            Arg::Ptr(d.qkv.ptr()),
            Arg::Ptr(d.cos.ptr()),
            Arg::Ptr(d.sin.ptr()),
            int(s.b, op)?,
            int(s.t, op)?,
            int(s.nh, op)?,
            int(s.nkv, op)?,
            int(s.hs, op)?,
            Arg::Int(i32::from(d.inverse)),
        ];
        let pairs = s.b * s.t * (s.nh + s.nkv) * (s.hs / 2);
        self.launch(op, elementwise_config(pairs), &args)
    }

    fn kv_cache_write(&self, d: &KvCacheWrite<'_>) -> Result<()> {
        let op = "kv_cache_write";
        let s = d.shape;
        let args = [
            Arg::Ptr(d.k_cache.ptr()),
            Arg::Ptr(d.v_cache.ptr()),
            Arg::Ptr(d.qkv.ptr()),
            int(s.b, op)?,
            int(s.t, op)?,
            int(s.nh, op)?,
            int(s.nkv, op)?,
            int(s.hs, op)?,
            int(d.pos, op)?,
            int(d.capacity, op)?,
        ];
        self.launch(op, elementwise_config(s.b * s.t * s.nkv * s.hs), &args)
    }

    fn cached_attention(&self, d: &CachedAttention<'_>) -> Result<()> {
        let op = "cached_attention";
        let s = d.shape;
        ensure(s.hs <= CACHED_ATTENTION_HS_MAX, op, || {
            format!(
                "head size {} exceeds the kernel's {CACHED_ATTENTION_HS_MAX}",
                s.hs
            )
        })?;
        let args = [
            Arg::Ptr(d.out.ptr()),
            Arg::Ptr(d.qkv.ptr()),
            Arg::Ptr(d.k_cache.ptr()),
            Arg::Ptr(d.v_cache.ptr()),
            int(s.b, op)?,
            int(s.t, op)?,
            int(s.nh, op)?,
            int(s.nkv, op)?,
            int(s.hs, op)?,
            int(d.pos, op)?,
            int(d.capacity, op)?,
        ];
        self.launch(op, rows_config(s.b * s.t * s.nh)?, &args)
    }

    fn matmul_forward(&self, d: &MatmulForward<'_>) -> Result<()> {
        let op = "matmul_forward";
        let (n, c, oc) = (d.n, d.c, d.oc);
        let shape = GemmShape {
            m: n,
            n: oc,
            k: c,
            trans_a: false,
            trans_b: true,
        };
        self.blas()
            .matmul(d.out, d.inp, d.weight, shape, 1.0, 0.0)?;
        self.profile_mark("gemm: matmul_forward")?;
        let Some(bias) = d.bias else {
            return Ok(());
        };
        let args = [
            Arg::Ptr(d.out.ptr()),
            Arg::Ptr(bias.ptr()),
            int(n, op)?,
            int(oc, op)?,
        ];
        let pack = self.pack();
        if oc % pack == 0 && aligned16([d.out.ptr(), bias.ptr()]) {
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
            self.launch("add_bias_vec", cfg, &args)
        } else {
            self.launch("add_bias", elementwise_config(n * oc), &args)
        }
    }

    fn matmul_backward(&self, d: &MatmulBackward<'_>) -> Result<()> {
        let op = "matmul_backward";
        let (n, c, oc) = (d.n, d.c, d.oc);
        let dinp_shape = GemmShape {
            m: n,
            n: c,
            k: oc,
            trans_a: false,
            trans_b: false,
        };
        let beta = if d.dinp_mode == GradMode::Accumulate {
            1.0
        } else {
            0.0
        };
        self.blas()
            .matmul(d.dinp, d.dout, d.weight, dinp_shape, 1.0, beta)?;
        self.profile_mark("gemm: matmul_backward dinp")?;
        let dweight_shape = GemmShape {
            m: oc,
            n: c,
            k: n,
            trans_a: true,
            trans_b: false,
        };
        self.blas()
            .matmul(d.dweight, d.dout, d.inp, dweight_shape, 1.0, 1.0)?;
        self.profile_mark("gemm: matmul_backward dweight")?;
        let Some(dbias) = d.dbias else {
            return Ok(());
        };
        let chunks = u32::try_from(n.div_ceil(BIAS_ROWS_PER_CHUNK).max(1))
            .map_err(|_| CudaError::precondition(op, format!("{n} rows")))?;
        let cfg = LaunchConfig {
            grid_dim: (oc.div_ceil(ELEMENTWISE_BLOCK as usize) as u32, chunks, 1),
            block_dim: (ELEMENTWISE_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            Arg::Ptr(dbias.ptr()),
            Arg::Ptr(d.dout.ptr()),
            int(n, op)?,
            int(oc, op)?,
            int(BIAS_ROWS_PER_CHUNK, op)?,
        ];
        self.launch("bias_backward", cfg, &args)
    }

    /// One block per row; dloss = grad_scale/(B·T) from the caller.
    fn crossentropy(&self, d: &CrossEntropy<'_>) -> Result<()> {
        let op = "crossentropy_forward_backward";
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(d.r.max(1))
                    .map_err(|_| CudaError::precondition(op, format!("{} rows", d.r)))?,
                1,
                1,
            ),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            Arg::Ptr(d.logits.ptr()),
            Arg::Ptr(d.losses.ptr()),
            Arg::Ptr(d.targets.ptr()),
            int(d.r, op)?,
            int(d.v, op)?,
            int(d.vp, op)?,
            Arg::Float(d.dloss.unwrap_or(0.0)),
            Arg::Int(i32::from(d.dloss.is_some())),
        ];
        self.launch(op, cfg, &args)
    }
}
