//! strata-offload: 4 KiB-aligned host buffers, an io_uring NVMe engine and a swap store.
//!
//! - [`HostPool`] / [`HostBuf`]: aligned buffers from a few slabs mapped at start-up, with a byte
//!   budget checked against free memory and RLIMIT_MEMLOCK, and a [`Registrar`] hook
//!   (`cuMemHostRegister`); io_uring registers the same slabs as fixed buffers.
//! - [`IoEngine`]: io_uring rings (one thread each), O_DIRECT, registered files and buffers, requests
//!   split into `block_size` blocks with `queue_depth` in flight; a pread/pwrite thread pool and
//!   buffered I/O as fallbacks that say so once.
//! - [`SwapStore`]: key → blocks striped over one file per path; `write`/`read` return an
//!   [`IoHandle`] that owns the buffer until the I/O is complete; space is reused; optional crc32c.
//!
//! ```no_run
//! use std::time::Duration;
//! use strata_offload::{AioConfig, HostPool, PoolConfig, SwapStore};
//! # fn main() -> Result<(), strata_offload::OffloadError> {
//! let pool = HostPool::new(PoolConfig { bytes_total: 64 << 20, ..Default::default() })?;
//! let store = SwapStore::open_with_pool(&["/nvme0/swap".into()], AioConfig::default(), &pool)?;
//! let mut buf = pool.alloc(10 << 20)?;
//! buf.as_mut_slice().fill(7);
//! let buf = store.write("unit3.master.rank0", buf)?.wait(Duration::from_secs(30))?;
//! let back = store.read("unit3.master.rank0", buf)?.wait(Duration::from_secs(30))?;
//! assert!(back.iter().all(|&b| b == 7));
//! # Ok(()) }
//! ```

mod config;
mod engine;
mod error;
mod files;
mod op;
mod pool;
mod store;
mod sys;
mod uring;

pub use config::{
    AioConfig, BackendKind, ALIGN, BLOCK_SIZE_MAX, PATHS_MAX, QUEUE_DEPTH_MAX, RINGS_MAX,
};
pub use engine::{EngineKind, IoEngine, FALLBACK_THREADS_MAX};
pub use error::{IoOp, OffloadError, Result};
pub use op::IoHandle;
pub use pool::{HostBuf, HostPool, OnExhausted, PoolConfig, Registrar, SLABS_MAX, SLAB_BYTES_MAX};
pub use store::{Extent, SwapStore};
pub use sys::{
    check_host_budget, check_memlock, has_cap_ipc_lock, mem_available_bytes, memlock_limit_bytes,
};

/// Compile-time check: the types other threads use are Send + Sync.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<HostPool>();
    send_sync::<HostBuf>();
    send_sync::<SwapStore>();
    send_sync::<IoHandle>();
    send_sync::<IoEngine>();
    send_sync::<OffloadError>();
};
