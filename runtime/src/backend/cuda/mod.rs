//! CUDA backend: cudarc (dynamic loading, so it builds and runs without CUDA), cuBLAS GEMMs,
//! NVRTC-compiled kernels from runtime/kernels, page-locked host memory, four streams.
//!
//! # How this maps to the ZeRO engine's queues
//!
//! The engine drives four queues; on CUDA each is one non-blocking stream of a `GpuContext`
//! (`Queue::{Compute, H2d, D2h, Comm}`), and on the CPU backend each is a worker thread with
//! the same ordering rules:
//!
//! ```text
//!   NVMe/io_uring ─▶ pinned host ─[H2d stream]─▶ device shard ─[Comm stream: all_gather]─▶ unit params
//!   unit params ─[Compute stream: kernels + cuBLAS]─▶ grads ─[Comm: reduce_scatter]─▶ grad shard
//!   grad shard ─[D2h stream]─▶ pinned host ─▶ CPU AdamW (or GPU AdamW on Compute)
//! ```
//!
//! - Ordering between queues is explicit: the producer records a `GpuEvent` on its stream,
//!   the consumer's stream waits on it (`GpuContext::record` / `GpuContext::wait`); nothing
//!   blocks the host except `GpuEvent::synchronize` where the engine must observe completion
//!   (e.g. before reusing a pinned buffer or handing it to io_uring). cudarc's automatic event
//!   tracking is disabled: the engine, not cudarc, owns the ordering.
//! - Device memory comes from one `Arena` (backend/arena.rs) sized at start-up by the engine's
//!   dry run (params, grads, optimizer states, activations, scratch) plus the cuBLAS
//!   workspace. Allocation is a bump pointer with marks; nothing is allocated inside a step.
//!   `Buf` is a typed view (offset, element count, dtype) that keeps the arena alive.
//! - Host memory for transfers is the offload crate's 4 KiB-aligned pool, page-locked in place
//!   with `cuMemHostRegister` (`PinnedRegion`, not write-combined), so DMA runs at full speed
//!   and the very same buffers are registered with io_uring for O_DIRECT.
//! - A DMA owns its host buffer until its event completes: `copy_h2d`/`copy_d2h` are `unsafe`
//!   with that contract and return the event that marks completion.
//! - NCCL lives in strata-collectives (`Communicator`); it is handed `GpuContext::stream(Comm)`.
//!
//! # Precision
//! `floatX` (activations, compute weights) is bf16 by default, fp16 or fp32 by choice; it is
//! fixed per `GpuContext` because the kernels are compiled for it. Master weights, AdamW
//! m/v, parameter gradients, LayerNorm statistics and losses are fp32. GEMMs take floatX
//! inputs and accumulate in fp32; they write floatX, or fp32 where gradients accumulate.
//!
//! # Without a GPU
//! Every entry point checks for the driver first (`loader::driver_present`) and returns
//! `CudaError::NoDriver`; nothing here panics when CUDA is absent.

pub mod arena;
pub mod attention;
pub mod context;
mod device;
pub mod error;
pub mod flash;
pub mod gemm;
pub mod kernels;
mod layers;
pub mod loader;
pub mod nvrtc;
pub mod pinned;
pub mod profile;
pub mod selftest;

pub use context::{GpuContext, GpuEvent, GpuOptions, Stream};
pub use device::{CudaDevice, CudaOptions};
pub use error::{CudaError, Result};
pub use gemm::{BatchStrides, Blas, GemmShape};
pub use kernels::Kernels;
pub use pinned::{CudaRegistrar, PinnedRegion};
pub use selftest::{
    bandwidth_selftest, kernel_selftest, pinned_bandwidth, run_kernel_checks, CheckResult,
};

pub use crate::backend::{DType, Precision};

/// True when a CUDA driver is loadable and reports at least one device (`device = "auto"`).
/// Never panics; says nothing about NVRTC/cuBLAS (GpuContext::new checks those).
pub fn gpu_available() -> bool {
    context::device_count().is_ok_and(|n| n > 0)
}

/// The macro that selects `floatX` in common.cuh.
pub fn nvrtc_define(precision: Precision) -> &'static str {
    match precision {
        Precision::Bf16 => "STRATA_FLOATX_BF16",
        Precision::Fp16 => "STRATA_FLOATX_FP16",
        Precision::Fp32 => "STRATA_FLOATX_FP32",
    }
}
