//! `[offload_param]`, `[offload_optimizer]` and `[aio]`: where partitions live (DeepSpeed's names),
//! and the NVMe engine's settings.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

use super::{invalid, ByteSize, ConfigError};

/// Where a class of states lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OffloadDevice {
    /// On the device (GPU memory, or the CPU backend's device memory).
    #[default]
    None,
    /// Pinned host memory.
    Cpu,
    /// Files on NVMe through io_uring.
    Nvme,
    /// The fastest placement that fits this machine (decided by the placement plan).
    Auto,
}

impl OffloadDevice {
    pub fn name(self) -> &'static str {
        match self {
            OffloadDevice::None => "none",
            OffloadDevice::Cpu => "cpu",
            OffloadDevice::Nvme => "nvme",
            OffloadDevice::Auto => "auto",
        }
    }
}

/// One path, or several (shards are striped over them: one file per drive).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NvmePaths {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

/// The `nvme_path` that asks for a fresh directory under `$TMPDIR` (or /tmp), removed when the
/// run ends (the embedded default's).
pub const TEMP_NVME_PATH: &str = "@tmp";

impl NvmePaths {
    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            NvmePaths::One(p) => vec![p.clone()],
            NvmePaths::Many(v) => v.clone(),
        }
    }

    /// Whether a path is [`TEMP_NVME_PATH`].
    pub fn wants_temp(&self) -> bool {
        self.paths().iter().any(|p| p.as_os_str() == TEMP_NVME_PATH)
    }

    /// The paths with [`TEMP_NVME_PATH`] replaced by `dir`.
    pub fn with_temp(&self, dir: &std::path::Path) -> NvmePaths {
        let swap = |p: &PathBuf| {
            if p.as_os_str() == TEMP_NVME_PATH {
                dir.to_path_buf()
            } else {
                p.clone()
            }
        };
        match self {
            NvmePaths::One(p) => NvmePaths::One(swap(p)),
            NvmePaths::Many(v) => NvmePaths::Many(v.iter().map(swap).collect()),
        }
    }
}

impl super::Config {
    /// The config with every [`TEMP_NVME_PATH`] replaced by `dir`.
    pub fn with_temp_nvme_path(mut self, dir: &std::path::Path) -> super::Config {
        for paths in [
            &mut self.offload_param.nvme_path,
            &mut self.offload_optimizer.nvme_path,
        ] {
            if let Some(p) = paths.as_mut() {
                *p = p.with_temp(dir);
            }
        }
        self
    }

    /// Whether an nvme_path asks for a temporary directory.
    pub fn wants_temp_nvme_path(&self) -> bool {
        [
            &self.offload_param.nvme_path,
            &self.offload_optimizer.nvme_path,
        ]
        .into_iter()
        .flatten()
        .any(NvmePaths::wants_temp)
    }
}

/// `[offload_param]`: where this rank's parameter shards live (ZeRO stage 3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffloadParamConfig {
    pub device: OffloadDevice,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvme_path: Option<NvmePaths>,
    /// Host staging buffers for shards on their way to the device.
    pub buffer_count: usize,
    /// Largest shard a staging buffer holds (a larger one is an error before step 1).
    pub buffer_size: ByteSize,
    /// Page-lock host buffers (`mlock`; `cuMemHostRegister` on a GPU).
    pub pin_memory: bool,
}

impl Default for OffloadParamConfig {
    fn default() -> Self {
        OffloadParamConfig {
            device: OffloadDevice::None,
            nvme_path: None,
            buffer_count: 5,
            buffer_size: ByteSize::mib(256),
            pin_memory: false,
        }
    }
}

/// Adam moments' storage type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MomentsDtype {
    #[default]
    Fp32,
    Bf16,
}

/// `[offload_optimizer]`: where this rank's fp32 master weights, Adam moments and gradients live.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffloadOptimizerConfig {
    pub device: OffloadDevice,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvme_path: Option<NvmePaths>,
    /// Sub-groups of optimizer state in host memory at once (NVMe: read k+1, step k, write k−1).
    pub buffer_count: usize,
    /// Elements per optimizer sub-group (a unit's shard is stepped in pieces of at most this).
    pub sub_group_size: usize,
    pub pin_memory: bool,
    /// `bf16` keeps Adam's moments in bf16 (12 instead of 16 bytes per parameter).
    pub moments_dtype: MomentsDtype,
    /// With `device = "nvme"`: the fraction of the optimizer's sub-groups (by elements) whose
    /// states stay in host memory; the rest go to NVMe. Spread evenly over the step's order, so
    /// that the host AdamW of resident sub-groups overlaps the NVMe traffic of the others.
    pub host_fraction: f64,
}

impl Default for OffloadOptimizerConfig {
    fn default() -> Self {
        OffloadOptimizerConfig {
            device: OffloadDevice::None,
            nvme_path: None,
            buffer_count: 4,
            sub_group_size: 10_000_000,
            pin_memory: false,
            moments_dtype: MomentsDtype::Fp32,
            host_fraction: 0.0,
        }
    }
}

/// `[aio]`: the NVMe engine (the offload crate's `AioConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AioSection {
    /// Size of one I/O request.
    pub block_size: ByteSize,
    /// Requests in flight per ring.
    pub queue_depth: usize,
    /// io_uring rings (one thread each).
    pub rings: usize,
    /// O_DIRECT (buffered I/O, with one warning, where a file system refuses it).
    pub use_direct: bool,
    /// crc32c per block: a corrupted or truncated swap file stops the run naming file and offset.
    pub checksums: bool,
    /// io_uring fixed files and buffers.
    pub register: bool,
    /// `auto` (io_uring, else a pread/pwrite thread pool), `uring`, `threads`.
    pub backend: AioBackend,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AioBackend {
    #[default]
    Auto,
    Uring,
    Threads,
}

impl Default for AioSection {
    fn default() -> Self {
        AioSection {
            block_size: ByteSize::mib(4),
            queue_depth: 32,
            rings: 1,
            use_direct: true,
            checksums: true,
            register: true,
            backend: AioBackend::Auto,
        }
    }
}

impl AioSection {
    /// The offload crate's settings for a swap store (files removed when the run ends).
    pub fn to_aio(&self, timeout: Duration) -> strata_offload::AioConfig {
        strata_offload::AioConfig {
            block_size: usize::try_from(self.block_size.bytes()).unwrap_or(usize::MAX),
            queue_depth: self.queue_depth,
            rings: self.rings,
            use_direct: self.use_direct,
            checksums: self.checksums,
            register: self.register,
            backend: match self.backend {
                AioBackend::Auto => strata_offload::BackendKind::Auto,
                AioBackend::Uring => strata_offload::BackendKind::Uring,
                AioBackend::Threads => strata_offload::BackendKind::Threads,
            },
            remove_on_close: true,
            drain_timeout: timeout,
            key_wait_timeout: timeout,
            ..strata_offload::AioConfig::default()
        }
    }
}

/// The smallest and largest `offload_optimizer.sub_group_size` (a 64 KiB to 1 GiB fp32 buffer).
pub const SUB_GROUP_SIZE_MIN: usize = 1 << 14;
pub const SUB_GROUP_SIZE_MAX: usize = 1 << 28;

/// Cross-key rules of the offload sections; messages name the keys.
pub fn validate(
    stage: u8,
    param: &OffloadParamConfig,
    optim: &OffloadOptimizerConfig,
    aio: &AioSection,
) -> Result<(), ConfigError> {
    if param.device != OffloadDevice::None && stage < 3 {
        return Err(invalid(
            "offload_param.device",
            format!(
                "\"{}\" needs zero.stage = 3 (parameters are partitioned only at stage 3; now {stage}): set offload_param.device = \"none\" with a lower stage",
                param.device.name()
            ),
        ));
    }
    if optim.device != OffloadDevice::None && stage < 1 {
        return Err(invalid(
            "offload_optimizer.device",
            format!(
                "\"{}\" needs zero.stage >= 1 (optimizer states are partitioned from stage 1; now 0): set offload_optimizer.device = \"none\" at stage 0",
                optim.device.name()
            ),
        ));
    }
    if matches!(param.device, OffloadDevice::Cpu | OffloadDevice::Nvme)
        && optim.device == OffloadDevice::None
    {
        return Err(invalid(
            "offload_param.device",
            format!(
                "\"{}\" needs the optimizer off the device too (offload_optimizer.device = \"cpu\", \"nvme\" or \"auto\"): the optimizer writes the updated parameter shard where it lives",
                param.device.name()
            ),
        ));
    }
    for (key, device, paths) in [
        ("offload_param.nvme_path", param.device, &param.nvme_path),
        (
            "offload_optimizer.nvme_path",
            optim.device,
            &optim.nvme_path,
        ),
    ] {
        if device == OffloadDevice::Nvme && paths.as_ref().is_none_or(|p| p.paths().is_empty()) {
            return Err(invalid(
                key,
                "is required with device = \"nvme\": a directory on the drive (or a list, one per drive)",
            ));
        }
    }
    for (key, count) in [
        ("offload_param.buffer_count", param.buffer_count),
        ("offload_optimizer.buffer_count", optim.buffer_count),
    ] {
        if !(2..=64).contains(&count) {
            return Err(invalid(key, format!("{count} must lie in 2..=64")));
        }
    }
    if !(SUB_GROUP_SIZE_MIN..=SUB_GROUP_SIZE_MAX).contains(&optim.sub_group_size) {
        return Err(invalid(
            "offload_optimizer.sub_group_size",
            format!(
                "{} must lie between 16384 and 268435456 elements (a sub-group's fp32 buffer is at most 1 GiB)",
                optim.sub_group_size
            ),
        ));
    }
    if optim.moments_dtype == MomentsDtype::Bf16 && optim.device == OffloadDevice::None {
        return Err(invalid(
            "offload_optimizer.moments_dtype",
            "\"bf16\" moments are kept by the host optimizer: set offload_optimizer.device to \"cpu\" or \"nvme\"",
        ));
    }
    if !(0.0..=1.0).contains(&optim.host_fraction) {
        return Err(invalid(
            "offload_optimizer.host_fraction",
            format!("{} must lie in [0, 1]", optim.host_fraction),
        ));
    }
    if optim.host_fraction > 0.0 && matches!(optim.device, OffloadDevice::None | OffloadDevice::Cpu)
    {
        return Err(invalid(
            "offload_optimizer.host_fraction",
            format!(
                "splits the optimizer states between host memory and NVMe: it needs offload_optimizer.device = \"nvme\" or \"auto\" (now \"{}\")",
                optim.device.name()
            ),
        ));
    }
    aio.to_aio(Duration::from_secs(60))
        .validate()
        .map_err(|e| invalid("aio", e.to_string()))
}
