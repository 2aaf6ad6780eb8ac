//! Device backends behind one seam ([`Device`]): `cpu` is the numerical reference and the
//! backend CI exercises; `cuda` drives NVIDIA GPUs through cudarc, loading the driver and
//! libraries at run time, so one binary builds and runs everywhere. The model and the engine
//! are written once against the seam; [`open`] picks the backend.

pub mod arena;
mod attention;
pub mod cpu;
pub mod cuda;
mod device;
pub mod host_queue;
pub mod ops;

use std::sync::Arc;
use std::time::Duration;

pub use arena::{Arena, Buf};
pub use attention::*;
pub use device::*;
pub use ops::*;

/// What [`open`] needs to start a device.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub backend: Backend,
    /// Compute type; the CPU backend computes in fp32 only.
    pub precision: Precision,
    /// Arena bytes the dry run counted.
    pub arena_bytes: usize,
    /// `train.device_memory` (None: no limit on the CPU, the card's free memory on a GPU).
    pub budget_bytes: Option<usize>,
    /// CPU compute threads (0: every core).
    pub threads: usize,
    /// CUDA device ordinal.
    pub ordinal: usize,
    /// A wait fails when the queue it waits on makes no progress for this long.
    pub stall_timeout: Duration,
}

/// Opens the device `opts` describe, with an arena of `opts.arena_bytes`.
pub fn open(opts: &DeviceOptions) -> Result<Arc<dyn Device>> {
    match opts.backend {
        Backend::Cpu => {
            ensure(opts.precision == Precision::Fp32, "open", || {
                format!(
                    "the CPU backend computes in fp32, not {}",
                    opts.precision.name()
                )
            })?;
            Ok(Arc::new(cpu::CpuDevice::new(&cpu::CpuOptions {
                threads: opts.threads,
                arena_bytes: opts.arena_bytes,
                budget_bytes: opts.budget_bytes,
                stall_timeout: opts.stall_timeout,
            })?))
        }
        Backend::Cuda => Ok(Arc::new(cuda::CudaDevice::new(&cuda::CudaOptions {
            ordinal: opts.ordinal,
            precision: opts.precision,
            arena_bytes: opts.arena_bytes,
            budget_bytes: opts.budget_bytes,
            allow_tf32: false,
            stall_timeout: opts.stall_timeout,
        })?)),
    }
}
