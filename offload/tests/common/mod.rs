//! Shared helpers for the offload tests: a seeded PRNG (the independent reference data) and setup.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use strata_offload::{AioConfig, HostPool, OnExhausted, PoolConfig};

pub const WAIT: Duration = Duration::from_secs(30);

/// xorshift64*: deterministic bytes from a seed, independent of the code under test.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn pool(bytes_total: usize) -> HostPool {
    HostPool::new(PoolConfig {
        bytes_total,
        slab_bytes_max: 8 << 20,
        mlock: false,
        on_exhausted: OnExhausted::Wait(WAIT),
        check_budget: true,
    })
    .expect("host pool for tests")
}

/// Small blocks so that tests cross block boundaries with little data.
pub fn small_cfg() -> AioConfig {
    AioConfig {
        block_size: 64 << 10,
        queue_depth: 8,
        grow_bytes: 1 << 20,
        checksums: true,
        ..AioConfig::default()
    }
}

pub fn dirs(root: &tempfile::TempDir, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| root.path().join(format!("nvme{i}")))
        .collect()
}

pub fn tempdir() -> tempfile::TempDir {
    // /tmp on these machines is a real disk (ext4), so O_DIRECT and io_uring run for real.
    tempfile::Builder::new()
        .prefix("strata-offload-test")
        .tempdir()
        .expect("temp dir")
}
