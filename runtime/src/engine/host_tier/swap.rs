//! The host tier's swap stores and what its queue jobs share: NVMe transfers of whole host
//! buffers (all of a sub-group's submitted at once, then each waited for, bounded by the
//! I/O timeout), the bytes and time they took, and the gradient norm's partial sums.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use strata_offload::SwapStore;

use super::super::host_mem::HostMem;
use super::super::placement::SubGroup;
use super::super::EngineError;
use crate::backend::DeviceError;

/// Bytes moved by the host tier since it opened, and the time its NVMe transfers took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OffloadTraffic {
    pub nvme_read_bytes: u64,
    /// Seconds from submitting a read to its completion, summed over reads.
    pub nvme_read_s: f64,
    pub nvme_write_bytes: u64,
    pub nvme_write_s: f64,
    /// Host to device (parameter shards, updated compute weights).
    pub h2d_bytes: u64,
    /// Device to host (reduced gradient shards).
    pub d2h_bytes: u64,
}

#[derive(Default)]
struct Counters {
    nvme_read_bytes: AtomicU64,
    nvme_read_ns: AtomicU64,
    nvme_write_bytes: AtomicU64,
    nvme_write_ns: AtomicU64,
    h2d_bytes: AtomicU64,
    d2h_bytes: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// The direction of an NVMe transfer.
#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

/// Which swap store: parameter shards or optimizer states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Params,
    Optimizer,
}

/// Host-side data a job needs, shared with the queues' threads.
pub struct Shared {
    param_store: Option<SwapStore>,
    optim_store: Option<SwapStore>,
    /// Per unit: the partial sums of squares of its accumulated gradient shard.
    norm_partials: Mutex<Vec<Vec<f64>>>,
    io_timeout: Duration,
    counters: Counters,
}

/// The swap key of `what` ("master", "m", "v", "param") of sub-group `g`.
pub fn key(g: &SubGroup, what: &str) -> String {
    format!("u{}.{}.{what}", g.unit, g.start)
}

pub fn offload_error(e: strata_offload::OffloadError) -> EngineError {
    EngineError::Device(DeviceError::op("offload", with_causes(&e)))
}

/// An error's message followed by its causes' (the OS error last).
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

impl Shared {
    pub fn new(
        param_store: Option<SwapStore>,
        optim_store: Option<SwapStore>,
        units: usize,
        io_timeout: Duration,
    ) -> Shared {
        Shared {
            param_store,
            optim_store,
            norm_partials: Mutex::new(vec![Vec::new(); units]),
            io_timeout,
            counters: Counters::default(),
        }
    }

    /// The swap stores that are open.
    pub fn stores(&self) -> impl Iterator<Item = &SwapStore> {
        [&self.param_store, &self.optim_store].into_iter().flatten()
    }

    fn store(&self, class: Class) -> Result<&SwapStore, DeviceError> {
        let store = match class {
            Class::Params => &self.param_store,
            Class::Optimizer => &self.optim_store,
        };
        store
            .as_ref()
            .ok_or_else(|| DeviceError::op("offload", "no swap store for this class"))
    }

    /// Writes the first `bytes` of `mem` to `key` and waits for it.
    pub fn write(
        &self,
        class: Class,
        key: &str,
        mem: &HostMem,
        bytes: usize,
    ) -> Result<(), DeviceError> {
        self.transfer(class, Dir::Write, &[(key.to_string(), mem, bytes)])
    }

    /// Reads `key` into `mem` and waits for it.
    pub fn read(&self, class: Class, key: &str, mem: &HostMem) -> Result<(), DeviceError> {
        self.transfer(class, Dir::Read, &[(key.to_string(), mem, 0)])
    }

    /// Writes each `(key, mem, bytes)`: all submitted at once (they run side by side on the
    /// drive), then all waited for.
    pub fn write_all(
        &self,
        class: Class,
        items: &[(String, &HostMem, usize)],
    ) -> Result<(), DeviceError> {
        self.transfer(class, Dir::Write, items)
    }

    /// Reads each `(key, mem, _)`: all submitted at once, then all waited for.
    pub fn read_all(
        &self,
        class: Class,
        items: &[(String, &HostMem, usize)],
    ) -> Result<(), DeviceError> {
        self.transfer(class, Dir::Read, items)
    }

    /// Submits every transfer of `items` (a write sends the first `bytes` of its buffer), then
    /// waits for each: every submitted buffer comes back to its `HostMem`, whatever failed.
    fn transfer(
        &self,
        class: Class,
        dir: Dir,
        items: &[(String, &HostMem, usize)],
    ) -> Result<(), DeviceError> {
        let store = self.store(class)?;
        let what = match dir {
            Dir::Read => "offload read",
            Dir::Write => "offload write",
        };
        let started = Instant::now();
        let mut failed = None;
        let mut pending = Vec::with_capacity(items.len());
        for (key, mem, bytes) in items {
            let mut buf = match mem.take() {
                Ok(buf) => buf,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            let submitted = match dir {
                Dir::Read => store.read(key, buf),
                Dir::Write => match buf.set_len(*bytes) {
                    Ok(()) => store.write(key, buf),
                    Err(e) => {
                        mem.put(buf);
                        failed = Some(DeviceError::op(what, format!("{key}: {e}")));
                        break;
                    }
                },
            };
            match submitted {
                Ok(handle) => pending.push((key, *mem, handle)),
                Err(e) => {
                    failed = Some(DeviceError::op(what, format!("{key}: {}", with_causes(&e))));
                    break;
                }
            }
        }
        let mut bytes = 0u64;
        for (key, mem, mut handle) in pending {
            match handle.wait(self.io_timeout) {
                Ok(buf) => {
                    bytes += buf.len() as u64;
                    mem.put(buf);
                }
                Err(e) => {
                    failed.get_or_insert(DeviceError::op(
                        what,
                        format!("{key}: {}", with_causes(&e)),
                    ));
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let c = &self.counters;
        let (count, ns) = match dir {
            Dir::Read => (&c.nvme_read_bytes, &c.nvme_read_ns),
            Dir::Write => (&c.nvme_write_bytes, &c.nvme_write_ns),
        };
        add(count, bytes);
        add(ns, started.elapsed().as_nanos() as u64);
        Ok(())
    }

    pub fn count_h2d(&self, bytes: usize) {
        add(&self.counters.h2d_bytes, bytes as u64);
    }

    pub fn count_d2h(&self, bytes: usize) {
        add(&self.counters.d2h_bytes, bytes as u64);
    }

    /// Bytes moved so far, and the NVMe transfers' time.
    pub fn traffic(&self) -> OffloadTraffic {
        let c = &self.counters;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        OffloadTraffic {
            nvme_read_bytes: get(&c.nvme_read_bytes),
            nvme_read_s: get(&c.nvme_read_ns) as f64 * 1e-9,
            nvme_write_bytes: get(&c.nvme_write_bytes),
            nvme_write_s: get(&c.nvme_write_ns) as f64 * 1e-9,
            h2d_bytes: get(&c.h2d_bytes),
            d2h_bytes: get(&c.d2h_bytes),
        }
    }

    /// Per unit, the partial sums of squares of its accumulated gradient shard.
    pub fn partials(&self) -> MutexGuard<'_, Vec<Vec<f64>>> {
        self.norm_partials
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
