//! `[aio]` settings in plain byte/count fields; the runtime's TOML layer parses "1MiB" into them.

use std::time::Duration;

use crate::error::{OffloadError, Result};

/// Alignment of every host buffer and of every transfer (O_DIRECT needs the logical block size; 4 KiB covers it).
pub const ALIGN: usize = 4096;

/// Which engine runs the I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// io_uring where it can be set up, else the thread pool (with one warning).
    #[default]
    Auto,
    /// io_uring or an error.
    Uring,
    /// pread/pwrite thread pool.
    Threads,
}

/// NVMe engine and swap store settings (DeepSpeed's `aio` section, plus strata's own).
#[derive(Debug, Clone)]
pub struct AioConfig {
    /// Bytes per I/O request; tensors are split into blocks of this size and blocks are striped across paths.
    pub block_size: usize,
    /// In-flight requests per ring (io_uring) or threads in the fallback pool.
    pub queue_depth: usize,
    /// io_uring instances, each driven by its own thread.
    pub rings: usize,
    /// Open swap files with O_DIRECT (falls back to buffered I/O, with a warning, where refused).
    pub use_direct: bool,
    /// crc32c per block, checked on read.
    pub checksums: bool,
    /// Register swap files and host pool slabs with io_uring (fixed files/buffers).
    pub register: bool,
    pub backend: BackendKind,
    /// Name of the swap file created in each path (use a per-rank name when ranks share a directory).
    pub file_name: String,
    /// Bytes preallocated per file at open.
    pub prealloc_bytes: u64,
    /// Bytes a file grows by when it runs out of free blocks (rounded up to `block_size`).
    pub grow_bytes: u64,
    /// Largest size of one swap file; 0 means no limit beyond the file system.
    pub file_bytes_max: u64,
    /// Unlink the swap files when the store is dropped.
    pub remove_on_close: bool,
    /// Longest time `Drop` waits for in-flight I/O before giving up (buffers are then leaked, never freed early).
    pub drain_timeout: Duration,
    /// Longest time a store call waits for an earlier operation on the same key.
    pub key_wait_timeout: Duration,
}

impl Default for AioConfig {
    fn default() -> Self {
        AioConfig {
            block_size: 1 << 20,
            queue_depth: 32,
            rings: 1,
            use_direct: true,
            checksums: false,
            register: true,
            backend: BackendKind::Auto,
            file_name: "strata.swap".to_string(),
            prealloc_bytes: 0,
            grow_bytes: 256 << 20,
            file_bytes_max: 0,
            remove_on_close: false,
            drain_timeout: Duration::from_secs(60),
            key_wait_timeout: Duration::from_secs(60),
        }
    }
}

/// Largest accepted values: limits on everything.
pub const BLOCK_SIZE_MAX: usize = 64 << 20;
pub const QUEUE_DEPTH_MAX: usize = 4096;
pub const RINGS_MAX: usize = 64;
pub const PATHS_MAX: usize = 64;

impl AioConfig {
    pub fn validate(&self) -> Result<()> {
        if self.block_size < ALIGN
            || self.block_size % ALIGN != 0
            || self.block_size > BLOCK_SIZE_MAX
        {
            return Err(OffloadError::Config {
                key: "aio.block_size",
                message: format!(
                    "{} must be a multiple of {ALIGN} between {ALIGN} and {BLOCK_SIZE_MAX}",
                    self.block_size
                ),
            });
        }
        if self.queue_depth == 0 || self.queue_depth > QUEUE_DEPTH_MAX {
            return Err(OffloadError::Config {
                key: "aio.queue_depth",
                message: format!("{} must be in 1..={QUEUE_DEPTH_MAX}", self.queue_depth),
            });
        }
        if self.rings == 0 || self.rings > RINGS_MAX {
            return Err(OffloadError::Config {
                key: "aio.rings",
                message: format!("{} must be in 1..={RINGS_MAX}", self.rings),
            });
        }
        if self.file_name.is_empty() || self.file_name.contains('/') {
            return Err(OffloadError::Config {
                key: "aio.file_name",
                message: format!("{:?} must be a plain, non-empty file name", self.file_name),
            });
        }
        if self.file_bytes_max != 0 && self.file_bytes_max < self.block_size as u64 {
            return Err(OffloadError::Config {
                key: "aio.file_bytes_max",
                message: format!(
                    "{} is smaller than one block ({})",
                    self.file_bytes_max, self.block_size
                ),
            });
        }
        Ok(())
    }

    /// `grow_bytes` rounded up to whole blocks, at least one block.
    pub(crate) fn grow_blocks(&self) -> u64 {
        let bs = self.block_size as u64;
        self.grow_bytes.div_ceil(bs).max(1)
    }
}

/// Round `n` up to a multiple of `ALIGN`.
pub(crate) fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_key() {
        let d = AioConfig::default();
        assert!(d.validate().is_ok());
        assert_eq!((d.block_size, d.queue_depth, d.rings), (1 << 20, 32, 1));
        let bad = [
            (
                AioConfig {
                    block_size: 1000,
                    ..AioConfig::default()
                },
                "aio.block_size",
            ),
            (
                AioConfig {
                    queue_depth: 0,
                    ..AioConfig::default()
                },
                "aio.queue_depth",
            ),
            (
                AioConfig {
                    rings: 0,
                    ..AioConfig::default()
                },
                "aio.rings",
            ),
            (
                AioConfig {
                    file_name: "a/b".into(),
                    ..AioConfig::default()
                },
                "aio.file_name",
            ),
            (
                AioConfig {
                    file_bytes_max: 4096,
                    ..AioConfig::default()
                },
                "aio.file_bytes_max",
            ),
        ];
        for (cfg, key) in bad {
            let msg = cfg.validate().unwrap_err().to_string();
            assert!(msg.contains(key), "{msg}");
        }
    }
}
