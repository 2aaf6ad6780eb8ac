//! Whether a placement plan fits the machine: its capacities (device memory, free host memory
//! per rank, the locked-memory limit, free space on each NVMe path) and the checks that say what
//! does not fit and which setting would make it fit.

use std::path::PathBuf;

use super::{Misfit, PlacementPlan, Tier};
use crate::config::Config;

/// What the machine offers.
#[derive(Clone, Debug, Default)]
pub struct Capacities {
    /// Device memory the arena may take (None: no bound known before the device opens).
    pub device_bytes: Option<u64>,
    /// Host memory available (MemAvailable).
    pub host_bytes: Option<u64>,
    /// RLIMIT_MEMLOCK (None: unlimited, or CAP_IPC_LOCK).
    pub memlock_bytes: Option<u64>,
    /// Free bytes on the file system of each NVMe path (None: cannot be read).
    pub nvme_free: Vec<(PathBuf, Option<u64>)>,
    /// The device arena lives in host memory (the CPU backend): host memory holds both.
    pub device_in_host: bool,
}

impl Capacities {
    /// This machine's for one rank of `config` on `backend` (host memory shared among the
    /// node's ranks), for `config`'s paths.
    pub fn of_this_machine(config: &Config, backend: crate::backend::Backend) -> Capacities {
        let local_ranks = strata_collectives::RankInfo::from_env()
            .ok()
            .and_then(|r| r.local_world_size)
            .unwrap_or(1)
            .max(1) as u64;
        let memlock = if strata_offload::has_cap_ipc_lock() {
            None
        } else {
            strata_offload::memlock_limit_bytes().ok().flatten()
        };
        Capacities {
            device_bytes: config.train.device_memory.bytes(),
            host_bytes: strata_offload::mem_available_bytes().map(|b| b / local_ranks),
            memlock_bytes: memlock,
            nvme_free: nvme_paths(config)
                .into_iter()
                .map(|p| {
                    let free = free_bytes(&p);
                    (p, free)
                })
                .collect(),
            device_in_host: backend == crate::backend::Backend::Cpu,
        }
    }
}

/// Free bytes on the file system of the directory `path`; None when it is not a directory.
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    if !path.is_dir() {
        return None;
    }
    let at = path;
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a valid NUL-terminated path and an out-pointer of the right type.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so it filled the struct.
    let st = unsafe { st.assume_init() };
    // fsblkcnt_t and c_ulong are 32 bits wide on some targets.
    #[allow(clippy::unnecessary_cast)]
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Every NVMe path the config names (parameters first, then the optimizer's), without repeats.
pub fn nvme_paths(config: &Config) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for paths in [
        &config.offload_param.nvme_path,
        &config.offload_optimizer.nvme_path,
    ]
    .into_iter()
    .flatten()
    {
        for p in paths.paths() {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// The config key that names NVMe `path`.
fn path_key(config: &Config, path: &std::path::Path) -> &'static str {
    let names = |paths: &Option<crate::config::NvmePaths>| {
        paths
            .as_ref()
            .is_some_and(|p| p.paths().iter().any(|q| q == path))
    };
    match (
        names(&config.offload_param.nvme_path),
        names(&config.offload_optimizer.nvme_path),
    ) {
        (true, false) => "offload_param.nvme_path",
        (false, true) => "offload_optimizer.nvme_path",
        _ => "offload_param.nvme_path and offload_optimizer.nvme_path",
    }
}

impl PlacementPlan {
    /// Whether the plan fits the machine; otherwise what does not fit and which setting would
    /// make it fit.
    pub fn check(&self, config: &Config, caps: &Capacities) -> Result<(), Misfit> {
        if let Some(device) = caps.device_bytes {
            if self.device_bytes > device {
                return Err(Misfit::Device {
                    needed: self.device_bytes,
                    available: device,
                });
            }
        }
        self.check_host_and_nvme(config, caps)
            .map_err(Misfit::Other)
    }

    fn check_host_and_nvme(&self, config: &Config, caps: &Capacities) -> Result<(), String> {
        let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
        if let Some(host) = caps.host_bytes {
            let arena = if caps.device_in_host {
                self.device_bytes
            } else {
                0
            };
            if self.host_bytes + arena > host {
                let what = if caps.device_in_host {
                    format!(
                        "{} of host buffers and {} of device arena (the CPU backend's device is host memory)",
                        gib(self.host_bytes),
                        gib(arena)
                    )
                } else {
                    format!("{} of host buffers", gib(self.host_bytes))
                };
                let split = if self.tiers.optimizer == Tier::Nvme
                    && self.optimizer_on_host.iter().any(|&h| h)
                {
                    "lower offload_optimizer.host_fraction (now keeping part of the optimizer states in host memory), "
                } else {
                    ""
                };
                return Err(format!(
                    "host memory: the plan needs {what}, {} is available per rank (MemAvailable); {split}move states to NVMe (offload_*.device = \"nvme\"), partition them (zero.stage, more ranks), or lower offload_optimizer.sub_group_size / buffer_count",
                    gib(host)
                ));
            }
        }
        if self.host_pinned && self.host_bytes > 0 {
            if let Some(limit) = caps.memlock_bytes {
                if self.host_bytes > limit {
                    return Err(format!(
                        "locked memory: the plan pins {} of host buffers, RLIMIT_MEMLOCK allows {}; set offload_param.pin_memory and offload_optimizer.pin_memory = false, or raise the limit (ulimit -l)",
                        gib(self.host_bytes),
                        gib(limit)
                    ));
                }
            }
        }
        let largest = self.sub_groups.iter().map(|g| g.len).max().unwrap_or(0) as u64;
        let params_on_nvme = self
            .rows
            .iter()
            .any(|r| r.class == "compute params" && r.tier == Tier::Nvme);
        if params_on_nvme && largest * 4 > config.offload_param.buffer_size.bytes() {
            return Err(format!(
                "offload_param.buffer_size = {} is smaller than the largest parameter sub-group ({} elements); raise it to at least {} bytes or lower offload_optimizer.sub_group_size",
                config.offload_param.buffer_size,
                largest,
                largest * 4
            ));
        }
        if self.nvme_bytes > 0 {
            let paths = nvme_paths(config);
            let share = self.nvme_bytes.div_ceil(paths.len().max(1) as u64);
            for (path, free) in &caps.nvme_free {
                match free {
                    None => {
                        return Err(format!(
                            "{}: {} is not a directory (it must exist on the NVMe drive: strata does not create it, so that a missing mount is not filled instead)",
                            path_key(config, path),
                            path.display()
                        ))
                    }
                    Some(free) if *free < share => {
                        return Err(format!(
                            "NVMe: {} has {} free, the plan writes {} there ({}); free space, add a path, or keep some states in memory (offload_optimizer.host_fraction keeps a share of the optimizer states in host memory)",
                            path.display(),
                            gib(*free),
                            gib(share),
                            path_key(config, path)
                        ))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}
