//! One error enum for the crate; every variant carries the context needed to act on it.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Which operation an I/O error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
    Fallocate,
    Open,
    Truncate,
    Sync,
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Fallocate => "fallocate",
            IoOp::Open => "open",
            IoOp::Truncate => "truncate",
            IoOp::Sync => "sync",
        };
        f.write_str(name)
    }
}

/// Errors of the offload crate. I/O failures are values with key, path and offset, never panics. An OS error
/// is a variant's `source()`, not repeated in its message: print the chain (`{:#}` with anyhow) to see it once.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    /// An OS error (ENOSPC, EIO, EFBIG, ...) on a swap file; `source.raw_os_error()` gives the errno.
    #[error("{op} failed for key {key:?} on {path} at offset {offset} ({len} bytes)")]
    Io {
        key: String,
        op: IoOp,
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    /// The file ended before the extent did (a truncated swap file).
    #[error("short read for key {key:?} on {path} at offset {offset}: wanted {expected} bytes, got {got}")]
    ShortRead {
        key: String,
        path: PathBuf,
        offset: u64,
        expected: u64,
        got: u64,
    },
    /// A write transferred nothing and reported no error.
    #[error("short write for key {key:?} on {path} at offset {offset}: wanted {expected} bytes, wrote {got}")]
    ShortWrite {
        key: String,
        path: PathBuf,
        offset: u64,
        expected: u64,
        got: u64,
    },
    /// The crc32c of an extent read back differs from the one computed when it was written.
    #[error("checksum mismatch for key {key:?} on {path} at offset {offset} ({len} bytes): stored {expected:#010x}, read {actual:#010x}")]
    Checksum {
        key: String,
        path: PathBuf,
        offset: u64,
        len: u64,
        expected: u32,
        actual: u32,
    },
    #[error("key {key:?} was never written to the swap store (or was removed)")]
    NotFound { key: String },
    #[error("the last write of key {key:?} failed; its data on disk is not valid")]
    LastWriteFailed { key: String },
    #[error("buffer for key {key:?} holds {capacity} bytes but {needed} are needed")]
    BufferTooSmall {
        key: String,
        needed: usize,
        capacity: usize,
    },
    #[error("{what} did not finish within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("host pool exhausted: asked for {requested} bytes, {bytes_free} of {bytes_total} free (largest free run {largest_free} bytes)")]
    PoolExhausted {
        requested: usize,
        bytes_free: usize,
        bytes_total: usize,
        largest_free: usize,
    },
    #[error("host buffer of {requested} bytes exceeds the pool's largest buffer, {buf_bytes_max} bytes (slab_bytes_max)")]
    BufferTooLarge {
        requested: usize,
        buf_bytes_max: usize,
    },
    /// The host budget does not fit a system limit; `fix` says what to change.
    #[error("{what}: need {needed} bytes, {available} available. Fix: {fix}")]
    Budget {
        what: &'static str,
        needed: u64,
        available: u64,
        fix: String,
    },
    #[error("invalid config `{key}`: {message}")]
    Config { key: &'static str, message: String },
    #[error("{what} failed")]
    Os {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("registering host memory failed ({what}): {message}")]
    Register { what: String, message: String },
    #[error("swap file {path} is full: {bytes_max} bytes (file_bytes_max) in use")]
    SwapFull { path: PathBuf, bytes_max: u64 },
    #[error("the I/O engine has stopped; operation for key {key:?} was not run")]
    EngineStopped { key: String },
    #[error("the buffer of this operation was already taken by an earlier wait")]
    AlreadyTaken,
}

impl OffloadError {
    /// The OS errno behind this error, if any (e.g. `libc::ENOSPC`).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            OffloadError::Io { source, .. } | OffloadError::Os { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

pub type Result<T, E = OffloadError> = std::result::Result<T, E>;
