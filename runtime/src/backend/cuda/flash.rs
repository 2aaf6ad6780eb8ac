//! Fused causal attention on the GPU (`train.attention = "fused"`): the launchers of
//! runtime/kernels/flash_attention.cu, FlashAttention-2 with no (T,T) buffer anywhere.
//!
//! Forward: one block per (query tile of 64, batch·head) writes out (B,T,NH·HS) and the
//! logsumexp of each row, lse (B,NH,T) f32; query head h reads key/value head h/(NH/NKV) in
//! place. Backward: `flash_delta` (D = rowsum(dO∘O), f32), then one block per (key tile,
//! batch·key/value head) adds dK and dV into dqkv, summing over its group of query heads, then
//! one block per (query tile, batch·head) adds dQ: dQ gets its own pass, recomputing the probabilities, instead of fp32
//! atomics, so the result is deterministic and needs no scratch beyond D.
//!
//! Two kernel sets ([`FlashKernels`]): tensor cores (mma.sync m16n8k16, 16-bit X, fp32
//! accumulation) for head sizes that divide by 8, padded to 32, 64, 96 or 128 on sm_80 and
//! newer; fp32 CUDA cores for the rest (an fp32 X, other head sizes up to 128). Head sizes past
//! 128 are refused naming HS.

use cudarc::driver::LaunchConfig;

use super::context::GpuContext;
use super::error::{ensure, CudaError, Result};
use super::kernels::{int, Arg};
use super::Precision;
use crate::backend::{AttentionShape, Buf};

/// The largest head size the fused kernels take.
pub const FLASH_HS_MAX: usize = 128;
/// Query rows per block of the forward and dQ kernels, keys per block of the dK/dV kernel.
const TILE: usize = 64;
/// The inner tile of the backward kernels (queries for dK/dV, keys for dQ).
const SUB: usize = 32;
/// Padding of each shared-memory row, in elements.
const PAD: usize = 8;
const MMA_THREADS: u32 = 128;
/// One query row (or key) per warp.
const SCALAR_ROWS: usize = 8;
const SCALAR_THREADS: u32 = 256;
/// Rows per block of `flash_delta` (one warp each).
const DELTA_ROWS: usize = 8;

/// The padded head sizes of the tensor-core kernels.
const MMA_HEAD_SIZES: [usize; 4] = [32, 64, 96, 128];

/// Every entry point of flash_attention.cu.
pub const FLASH_KERNEL_NAMES: &[&str] = &[
    "flash_delta",
    "flash_forward_scalar",
    "flash_backward_dkdv_scalar",
    "flash_backward_dq_scalar",
    "flash_forward_mma_d32",
    "flash_backward_dkdv_mma_d32",
    "flash_backward_dq_mma_d32",
    "flash_forward_mma_d64",
    "flash_backward_dkdv_mma_d64",
    "flash_backward_dq_mma_d64",
    "flash_forward_mma_d96",
    "flash_backward_dkdv_mma_d96",
    "flash_backward_dq_mma_d96",
    "flash_forward_mma_d128",
    "flash_backward_dkdv_mma_d128",
    "flash_backward_dq_mma_d128",
];

/// Which implementation of the fused kernels runs a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashKernels {
    /// Tensor cores, the head padded to `d` (32, 64, 96 or 128) columns.
    Mma { d: usize },
    /// fp32 CUDA cores.
    Scalar,
}

/// The three main kernels of one set: forward, dK/dV, dQ.
struct Names {
    forward: &'static str,
    dkdv: &'static str,
    dq: &'static str,
}

impl FlashKernels {
    /// What runs head size `hs` at `precision` on a device of compute capability `sm` (e.g.
    /// 90): tensor cores for a 16-bit X, `hs % 8 == 0` and sm ≥ 80, else the scalar kernels;
    /// an error naming HS past [`FLASH_HS_MAX`].
    pub fn choose(precision: Precision, hs: usize, sm: u32) -> Result<FlashKernels> {
        ensure(hs > 0 && hs <= FLASH_HS_MAX, "attention", || {
            format!(
                "head size HS = {hs} (n_embd / n_head) is not supported by the fused attention \
                 kernels (at most {FLASH_HS_MAX}); set train.attention = \"materialized\""
            )
        })?;
        let d = MMA_HEAD_SIZES.into_iter().find(|&d| d >= hs);
        Ok(match d {
            Some(d) if precision != Precision::Fp32 && hs % 8 == 0 && sm >= 80 => {
                FlashKernels::Mma { d }
            }
            _ => FlashKernels::Scalar,
        })
    }

    /// Every set that can run head size `hs` at `precision` on compute capability `sm` (the
    /// self-test checks each against the CPU).
    pub fn candidates(precision: Precision, hs: usize, sm: u32) -> Vec<FlashKernels> {
        let mut all = vec![FlashKernels::Scalar];
        if let Ok(k @ FlashKernels::Mma { .. }) = FlashKernels::choose(precision, hs, sm) {
            all.insert(0, k);
        }
        all
    }

    pub fn name(self) -> String {
        match self {
            FlashKernels::Mma { d } => format!("mma d{d}"),
            FlashKernels::Scalar => "scalar".into(),
        }
    }

    fn names(self) -> Names {
        let (forward, dkdv, dq) = match self {
            FlashKernels::Scalar => (
                "flash_forward_scalar",
                "flash_backward_dkdv_scalar",
                "flash_backward_dq_scalar",
            ),
            FlashKernels::Mma { d: 32 } => (
                "flash_forward_mma_d32",
                "flash_backward_dkdv_mma_d32",
                "flash_backward_dq_mma_d32",
            ),
            FlashKernels::Mma { d: 64 } => (
                "flash_forward_mma_d64",
                "flash_backward_dkdv_mma_d64",
                "flash_backward_dq_mma_d64",
            ),
            FlashKernels::Mma { d: 96 } => (
                "flash_forward_mma_d96",
                "flash_backward_dkdv_mma_d96",
                "flash_backward_dq_mma_d96",
            ),
            FlashKernels::Mma { .. } => (
                "flash_forward_mma_d128",
                "flash_backward_dkdv_mma_d128",
                "flash_backward_dq_mma_d128",
            ),
        };
        Names { forward, dkdv, dq }
    }

    /// Launch configurations (forward, dK/dV, dQ) for `s`; the shared memory sizes match the
    /// layouts in flash_attention.cu. The forward and dQ kernels take one (batch, query head)
    /// per grid row, the dK/dV kernels one (batch, key/value head).
    fn configs(self, s: &AttentionShape) -> Result<[LaunchConfig; 3]> {
        let rows = |heads: usize| {
            u32::try_from(s.b * heads)
                .ok()
                .filter(|&n| n <= 65_535)
                .ok_or_else(|| {
                    CudaError::precondition(
                        "attention",
                        format!("B·heads = {} exceeds 65535", s.b * heads),
                    )
                })
        };
        let (bh, bkv) = (rows(s.nh)?, rows(s.nkv)?);
        let blocks = |rows: usize| {
            u32::try_from(s.t.div_ceil(rows)).map_err(|_| {
                CudaError::precondition("attention", format!("T = {} is too long", s.t))
            })
        };
        let cfg = |grid_x: u32, grid_y: u32, threads: u32, shared: usize| LaunchConfig {
            grid_dim: (grid_x, grid_y, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        Ok(match self {
            FlashKernels::Scalar => {
                let x = blocks(SCALAR_ROWS)?;
                [
                    cfg(x, bh, SCALAR_THREADS, 0),
                    cfg(x, bkv, SCALAR_THREADS, 0),
                    cfg(x, bh, SCALAR_THREADS, 0),
                ]
            }
            FlashKernels::Mma { d } => {
                let x = blocks(TILE)?;
                let ld = d + PAD;
                let forward = 2 * (TILE * ld + d * (TILE + PAD));
                let dkdv = 2 * (2 * TILE * ld + 2 * SUB * ld + 2 * d * (SUB + PAD)) + 2 * SUB * 4;
                let dq = 2 * (2 * TILE * ld + 2 * SUB * ld + d * (SUB + PAD));
                [
                    cfg(x, bh, MMA_THREADS, forward),
                    cfg(x, bkv, MMA_THREADS, dkdv),
                    cfg(x, bh, MMA_THREADS, dq),
                ]
            }
        })
    }
}

/// The fused kernels' sizes as ints: B, T, NH, NKV, HS.
fn dims(s: &AttentionShape) -> Result<[Arg; 5]> {
    Ok([
        int(s.b, "attention")?,
        int(s.t, "attention")?,
        int(s.nh, "attention")?,
        int(s.nkv, "attention")?,
        int(s.hs, "attention")?,
    ])
}

impl GpuContext {
    /// The compute capability as a number (sm_90 → 90); 0 when the arch string is not sm_NN.
    pub(super) fn sm(&self) -> u32 {
        self.arch()
            .strip_prefix("sm_")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The kernel set for `s` here: [`FlashKernels::choose`], falling back to the scalar set
    /// when a buffer is not 16-byte aligned (the tensor-core kernels load 16 bytes at a time).
    fn flash_kernels(&self, s: &AttentionShape, bufs: &[&Buf]) -> Result<FlashKernels> {
        let kernels = FlashKernels::choose(self.precision(), s.hs, self.sm())?;
        let aligned = super::kernels::aligned16(bufs.iter().map(|b| b.ptr()));
        Ok(if aligned {
            kernels
        } else {
            FlashKernels::Scalar
        })
    }

    /// out (B,T,NH·HS) X = causal attention of qkv X; lse (B,NH,T) f32.
    pub(super) fn flash_forward(
        &self,
        out: &Buf,
        lse: &Buf,
        qkv: &Buf,
        s: AttentionShape,
    ) -> Result<()> {
        let kernels = self.flash_kernels(&s, &[out, qkv])?;
        self.flash_forward_with(kernels, out, lse, qkv, s)
    }

    /// dqkv X += the attention backward of dout, from the forward's qkv, out and lse;
    /// delta (B,NH,T) f32 is scratch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn flash_backward(
        &self,
        dqkv: &Buf,
        delta: &Buf,
        dout: &Buf,
        qkv: &Buf,
        out: &Buf,
        lse: &Buf,
        s: AttentionShape,
    ) -> Result<()> {
        let kernels = self.flash_kernels(&s, &[dqkv, dout, qkv])?;
        self.flash_backward_with(kernels, dqkv, delta, dout, qkv, out, lse, s)
    }

    /// `GpuContext::flash_forward` with a given kernel set (the self-test runs each).
    pub fn flash_forward_with(
        &self,
        kernels: FlashKernels,
        out: &Buf,
        lse: &Buf,
        qkv: &Buf,
        s: AttentionShape,
    ) -> Result<()> {
        let [cfg, _, _] = kernels.configs(&s)?;
        let ptrs = [
            Arg::Ptr(out.ptr()),
            Arg::Ptr(lse.ptr()),
            Arg::Ptr(qkv.ptr()),
        ];
        let scale = Arg::Float(1.0 / (s.hs as f32).sqrt());
        let args = [&ptrs[..], &dims(&s)?, &[scale]].concat();
        self.launch_shared(kernels.names().forward, cfg, &args)
    }

    /// `GpuContext::flash_backward` with a given kernel set (the self-test runs each).
    #[allow(clippy::too_many_arguments)]
    pub fn flash_backward_with(
        &self,
        kernels: FlashKernels,
        dqkv: &Buf,
        delta: &Buf,
        dout: &Buf,
        qkv: &Buf,
        out: &Buf,
        lse: &Buf,
        s: AttentionShape,
    ) -> Result<()> {
        let dims = dims(&s)?;
        let rows = s.rows_len();
        let delta_cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(rows.div_ceil(DELTA_ROWS))
                    .map_err(|_| CudaError::precondition("attention", format!("{rows} rows")))?,
                1,
                1,
            ),
            block_dim: ((DELTA_ROWS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let delta_args = [
            Arg::Ptr(delta.ptr()),
            Arg::Ptr(dout.ptr()),
            Arg::Ptr(out.ptr()),
        ];
        self.launch(
            "flash_delta",
            delta_cfg,
            &[&delta_args[..], &dims[..]].concat(),
        )?;
        let [_, dkdv_cfg, dq_cfg] = kernels.configs(&s)?;
        let scale = Arg::Float(1.0 / (s.hs as f32).sqrt());
        let ptrs = [
            Arg::Ptr(dqkv.ptr()),
            Arg::Ptr(qkv.ptr()),
            Arg::Ptr(dout.ptr()),
            Arg::Ptr(lse.ptr()),
            Arg::Ptr(delta.ptr()),
        ];
        let args = [&ptrs[..], &dims[..], &[scale][..]].concat();
        let names = kernels.names();
        // dK/dV and dQ write disjoint thirds of dqkv; both read only inputs.
        self.launch_shared(names.dkdv, dkdv_cfg, &args)?;
        self.launch_shared(names.dq, dq_cfg, &args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_choice_and_unsupported_head_sizes() {
        let choose = |p, hs, sm| FlashKernels::choose(p, hs, sm).unwrap();
        assert_eq!(choose(Precision::Bf16, 64, 90), FlashKernels::Mma { d: 64 });
        assert_eq!(
            choose(Precision::Bf16, 128, 90),
            FlashKernels::Mma { d: 128 }
        );
        assert_eq!(choose(Precision::Fp16, 8, 80), FlashKernels::Mma { d: 32 });
        assert_eq!(choose(Precision::Bf16, 72, 90), FlashKernels::Mma { d: 96 });
        assert_eq!(choose(Precision::Bf16, 18, 90), FlashKernels::Scalar);
        assert_eq!(choose(Precision::Fp32, 64, 90), FlashKernels::Scalar);
        assert_eq!(choose(Precision::Bf16, 64, 75), FlashKernels::Scalar);
        let err = FlashKernels::choose(Precision::Bf16, 256, 90)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HS = 256") && err.contains("train.attention"),
            "{err}"
        );
        assert_eq!(
            FlashKernels::candidates(Precision::Bf16, 64, 90),
            [FlashKernels::Mma { d: 64 }, FlashKernels::Scalar]
        );
        assert_eq!(
            FlashKernels::candidates(Precision::Fp32, 64, 90),
            [FlashKernels::Scalar]
        );
    }

    #[test]
    fn every_kernel_set_names_entry_points_and_fits_the_opt_in_shared_memory() {
        let s = AttentionShape {
            b: 2,
            t: 1000,
            nh: 8,
            nkv: 2,
            hs: 128,
        };
        let mut sets = vec![FlashKernels::Scalar];
        sets.extend(MMA_HEAD_SIZES.map(|d| FlashKernels::Mma { d }));
        for k in sets {
            let n = k.names();
            for name in [n.forward, n.dkdv, n.dq] {
                assert!(FLASH_KERNEL_NAMES.contains(&name), "{name}");
            }
            for cfg in k.configs(&s).unwrap() {
                // sm_80's opt-in limit (163 KiB); H100's is 227 KiB.
                assert!(cfg.shared_mem_bytes <= 163 * 1024, "{k:?}: {cfg:?}");
            }
            // B·NH query rows for the forward and dQ, B·NKV key/value heads for dK/dV.
            let [fwd, dkdv, dq] = k.configs(&s).unwrap();
            assert_eq!(
                (fwd.grid_dim.1, dkdv.grid_dim.1, dq.grid_dim.1),
                (16, 4, 16)
            );
        }
        let [fwd, dkdv, dq] = FlashKernels::Mma { d: 128 }.configs(&s).unwrap();
        assert_eq!(fwd.shared_mem_bytes, 35_840);
        assert_eq!(dkdv.shared_mem_bytes, 72_960);
        assert_eq!(dq.shared_mem_bytes, 62_464);
    }
}
