//! The crate's one error type. Every variant that involves a peer names it.

use std::time::Duration;

/// Everything that can go wrong in a collective, the rendezvous or the launcher. An OS error is a variant's
/// `source()`, not repeated in its message: print the chain (`{:#}` with anyhow) to see it once.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A wait for a peer ran past `dist.timeout`.
    #[error("rank {rank}: {op} timed out after {timeout:?} waiting for rank {peer}: it did not answer within dist.timeout_s, so it is slow, stuck or stopped (a rank that exits or is killed is reported as gone)")]
    Timeout {
        rank: usize,
        peer: usize,
        op: &'static str,
        timeout: Duration,
    },
    /// A peer exited, was killed, or its connection dropped.
    #[error("rank {rank}: {op}: rank {peer} is gone ({detail})")]
    PeerGone {
        rank: usize,
        peer: usize,
        op: &'static str,
        detail: String,
    },
    /// An I/O error on the link to a peer that is not (yet) known to be gone.
    #[error("rank {rank}: {op}: I/O error on the link to rank {peer}")]
    PeerIo {
        rank: usize,
        peer: usize,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// An async handle was not completed in time (the operation itself was stuck behind others).
    #[error("rank {rank}: {op}: handle not completed within {timeout:?}")]
    HandleTimeout {
        rank: usize,
        op: &'static str,
        timeout: Duration,
    },
    /// An earlier collective failed; the communicator cannot be used any more.
    #[error("rank {rank}: {op}: communicator unusable after an earlier failure: {cause}")]
    Poisoned {
        rank: usize,
        op: &'static str,
        cause: String,
    },
    /// A buffer length or root that does not fit the collective: a programming error of the caller.
    #[error("{op}: invalid arguments: {detail}")]
    InvalidArgument { op: &'static str, detail: String },
    /// A rendezvous variable is missing, malformed or contradicts another.
    #[error("rendezvous environment: {0}")]
    Env(String),
    /// The rank-0 key-value store could not be reached or answered wrongly.
    #[error("rank {rank}: rendezvous store at {addr}: {detail}")]
    Store {
        rank: usize,
        addr: String,
        detail: String,
    },
    /// Waiting in the store for keys that other ranks should have set.
    #[error("rank {rank}: rendezvous timed out after {timeout:?} waiting for rank(s) {missing:?} (key {key})")]
    StoreTimeout {
        rank: usize,
        key: String,
        missing: Vec<usize>,
        timeout: Duration,
    },
    /// Shared-memory segment setup (create, map, size).
    #[error("rank {rank}: shared memory {what}")]
    Shm {
        rank: usize,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The NCCL backend was asked for but CUDA or libnccl is not usable here.
    #[error("nccl backend unavailable: {0}")]
    NcclUnavailable(String),
    /// An NCCL or CUDA call failed.
    #[error("rank {rank}: nccl {op}: {detail}")]
    Nccl {
        rank: usize,
        op: &'static str,
        detail: String,
    },
    /// `strata launch` could not start or supervise its ranks.
    #[error("launch: {0}")]
    Launch(String),
}

impl CommError {
    /// The rank this error holds responsible, if any (the peer waited for or found gone).
    pub fn blamed_rank(&self) -> Option<usize> {
        match self {
            CommError::Timeout { peer, .. }
            | CommError::PeerGone { peer, .. }
            | CommError::PeerIo { peer, .. } => Some(*peer),
            CommError::StoreTimeout { missing, .. } => missing.first().copied(),
            _ => None,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = CommError> = std::result::Result<T, E>;
