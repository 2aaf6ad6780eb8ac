//! Upper bounds on every size and count in the config, and the model's memory against the machine's.
//!
//! Each bound is a `_MAX` constant named after its key; the memory estimate is that of the unpartitioned
//! engine (every state of every parameter on every rank), to be replaced by the placement plan's bytes
//! once the ZeRO engine lands.

use super::{invalid, Config, ConfigError, DeviceKind};
use std::path::Path;

pub const MODEL_N_LAYER_MAX: usize = 1024;
pub const MODEL_N_HEAD_MAX: usize = 1024;
pub const MODEL_N_EMBD_MAX: usize = 1 << 16;
/// Token files hold uint16 tokens; the library API takes u32 tokens, hence the larger bound.
pub const MODEL_VOCAB_SIZE_MAX: usize = 1 << 18;
pub const MODEL_SEQ_LEN_MAX: usize = 1 << 17;
pub const DATA_MICRO_BATCH_SIZE_MAX: usize = 1 << 16;
pub const DATA_GRAD_ACCUM_STEPS_MAX: usize = 1 << 16;
pub const TRAIN_STEPS_MAX: usize = 1 << 40;
pub const OPTIM_WARMUP_STEPS_MAX: usize = TRAIN_STEPS_MAX;
/// `train.threads` may be at most this many times the cores this process may run on.
pub const TRAIN_THREADS_PER_CORE_MAX: usize = 4;
/// One week: longer waits are a mistake, and `Instant + Duration` must not overflow.
pub const DIST_TIMEOUT_S_MAX: u64 = 7 * 24 * 3600;
/// The shm backend's own bounds (`strata_collectives::DistConfig::validate`).
pub const DIST_SHM_SLOT_BYTES_MIN: u64 = 4 << 10;
pub const DIST_SHM_SLOT_BYTES_MAX: u64 = 1 << 30;
/// Bytes of host memory per parameter on the CPU engine: fp32 weights, gradients, Adam m and v.
pub const HOST_BYTES_PER_PARAM_CPU: u128 = 16;
/// On the GPU trainer the host holds the fp32 weights while they are initialised or loaded.
pub const HOST_BYTES_PER_PARAM_GPU: u128 = 4;
/// Bytes read from /proc/meminfo.
const MEMINFO_BYTES_MAX: u64 = 64 << 10;

/// The cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Checks every count against its `_MAX`.
pub(super) fn check_counts(config: &Config) -> Result<(), ConfigError> {
    let (m, d, t) = (&config.model, &config.data, &config.train);
    for (key, value, max) in [
        ("model.n_layer", m.n_layer, MODEL_N_LAYER_MAX),
        ("model.n_head", m.n_head, MODEL_N_HEAD_MAX),
        ("model.n_embd", m.n_embd, MODEL_N_EMBD_MAX),
        ("model.vocab_size", m.vocab_size, MODEL_VOCAB_SIZE_MAX),
        ("model.seq_len", m.seq_len, MODEL_SEQ_LEN_MAX),
        (
            "data.micro_batch_size",
            d.micro_batch_size,
            DATA_MICRO_BATCH_SIZE_MAX,
        ),
        (
            "data.grad_accum_steps",
            d.grad_accum_steps,
            DATA_GRAD_ACCUM_STEPS_MAX,
        ),
        ("train.steps", t.steps, TRAIN_STEPS_MAX),
        ("train.log_every", t.log_every, TRAIN_STEPS_MAX),
        (
            "optim.warmup_steps",
            config.optim.warmup_steps,
            OPTIM_WARMUP_STEPS_MAX,
        ),
    ] {
        if value > max {
            return Err(invalid(key, format!("{value} exceeds the maximum {max}")));
        }
    }
    let threads_max = cores() * TRAIN_THREADS_PER_CORE_MAX;
    if t.threads > threads_max {
        return Err(invalid(
            "train.threads",
            format!(
                "{} exceeds the maximum {threads_max} ({TRAIN_THREADS_PER_CORE_MAX} per core, {} cores here); 0 uses every core",
                t.threads,
                cores()
            ),
        ));
    }
    let dist = &config.dist;
    if dist.timeout_s > DIST_TIMEOUT_S_MAX {
        return Err(invalid(
            "dist.timeout_s",
            format!(
                "{} exceeds the maximum {DIST_TIMEOUT_S_MAX} (one week)",
                dist.timeout_s
            ),
        ));
    }
    let slot = dist.shm_slot_bytes.bytes();
    if !(DIST_SHM_SLOT_BYTES_MIN..=DIST_SHM_SLOT_BYTES_MAX).contains(&slot) {
        return Err(invalid(
            "dist.shm_slot_bytes",
            format!("{slot} bytes must lie in {DIST_SHM_SLOT_BYTES_MIN}..={DIST_SHM_SLOT_BYTES_MAX} (4KiB..=1GiB)"),
        ));
    }
    for (key, path) in [
        ("train.metrics_file", &t.metrics_file),
        ("train.export_to", &t.export_to),
        ("model.init_from", &m.init_from),
    ] {
        if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(invalid(key, "is empty: give a path, or leave the key out"));
        }
    }
    Ok(())
}

/// Host bytes the configured run needs, split into parameter states and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostBytes {
    pub params: u128,
    pub states: u128,
    pub activations: u128,
}

impl HostBytes {
    pub fn total(&self) -> u128 {
        self.states + self.activations
    }
}

/// The estimate for the CPU engine (fp32; per block the workspaces of the forward and backward passes,
/// one set with activation checkpointing, one per block without; attention scores B·heads·T·T when
/// materialized), or, on
/// the GPU trainer, the host copy of the weights only (the trainer checks the GPU's memory itself).
pub fn host_bytes(config: &Config) -> HostBytes {
    let (m, d) = (&config.model, &config.data);
    let params = m.num_params();
    if config.train.device == DeviceKind::Cuda {
        return HostBytes {
            params,
            states: HOST_BYTES_PER_PARAM_GPU * params,
            activations: 0,
        };
    }
    let floats = m.activation_floats(
        d.micro_batch_size,
        config.train.activation_checkpointing,
        config.train.attention,
    );
    HostBytes {
        params,
        states: HOST_BYTES_PER_PARAM_CPU * params,
        activations: 4 * floats,
    }
}

/// MemTotal from /proc/meminfo, in bytes; None where it cannot be read.
pub fn memory_total_bytes() -> Option<u64> {
    let text = crate::inputs::read_bounded(
        Path::new("/proc/meminfo"),
        MEMINFO_BYTES_MAX,
        "/proc/meminfo",
    )
    .ok()?;
    let text = String::from_utf8_lossy(&text);
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn gib(bytes: u128) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Refuses a model whose estimated host memory exceeds the machine's (or the address space).
pub(super) fn check_memory(config: &Config, memory_total: Option<u64>) -> Result<(), ConfigError> {
    // Partitioned or offloaded states: the placement plan checks every tier against the machine
    // (strata plan, and strata train before step 1). This bound keeps the address-space check.
    let memory_total = if config.zero.stage > 0
        || config.offload_param.device != super::OffloadDevice::None
        || config.offload_optimizer.device != super::OffloadDevice::None
    {
        None
    } else {
        memory_total
    };
    let need = host_bytes(config);
    let limit = memory_total.map_or(isize::MAX as u128, u128::from);
    if need.total() <= limit.min(isize::MAX as u128) {
        return Ok(());
    }
    let (m, d) = (&config.model, &config.data);
    // Name the key that contributes most.
    let embed = (m.vocab_size as u128) * (m.n_embd as u128);
    let blocks = need.params.saturating_sub(embed);
    let key = if need.activations > need.states {
        if m.seq_len >= d.micro_batch_size {
            "model.seq_len"
        } else {
            "data.micro_batch_size"
        }
    } else if embed > blocks {
        "model.vocab_size"
    } else if m.n_layer > m.n_embd / 16 {
        "model.n_layer"
    } else {
        "model.n_embd"
    };
    let per_param = if config.train.device == DeviceKind::Cuda {
        "4 B/param: the host copy of the weights"
    } else {
        "16 B/param: weights, gradients, Adam m and v in fp32"
    };
    let machine = match memory_total {
        Some(total) => format!(
            "this machine has {:.1} GiB (MemTotal)",
            gib(u128::from(total))
        ),
        None => "that exceeds the address space".into(),
    };
    Err(invalid(
        key,
        format!(
            "the model (n_layer {}, n_embd {}, n_head {}, vocab_size {}, seq_len {}; {} parameters) needs about \
             {:.1} GiB of host memory ({:.1} GiB at {per_param}, {:.1} GiB of activations for micro_batch_size {}), \
             but {machine}",
            m.n_layer,
            m.n_embd,
            m.n_head,
            m.vocab_size,
            m.seq_len,
            need.params,
            gib(need.total()),
            gib(need.states),
            gib(need.activations),
            d.micro_batch_size
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_checked_against_the_machine_naming_the_key() {
        let mut config = Config::default();
        config.model.n_layer = 1000;
        config.model.n_embd = 4096;
        config.model.n_head = 32;
        let total = 24u64 << 30;
        let e = check_memory(&config, Some(total))
            .err()
            .map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(e.contains("config key `model.n_layer`"), "{e}");
        assert!(e.contains("201381421056 parameters"), "{e}");
        assert!(e.contains("this machine has 24.0 GiB (MemTotal)"), "{e}");
        // The default fits in 1 GiB; 16 B/param of it alone do not fit in 1 MiB.
        assert!(check_memory(&Config::default(), Some(1 << 30)).is_ok());
        assert!(check_memory(&Config::default(), Some(1 << 20)).is_err());
        config.train.device = DeviceKind::Cuda;
        let e = check_memory(&config, Some(total))
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("4 B/param")));
    }

    #[test]
    fn counts_beyond_their_max_name_the_key() {
        let load = |set: &str| {
            Config::load(None, &[set.to_string()])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let e = load("model.n_embd=1000000000");
        assert!(
            e.contains("model.n_embd") && e.contains("maximum 65536"),
            "{e}"
        );
        let e = load("model.n_layer=100000");
        assert!(
            e.contains("model.n_layer") && e.contains("maximum 1024"),
            "{e}"
        );
        let e = load("train.threads=100000");
        assert!(e.contains("train.threads") && e.contains("per core"), "{e}");
        let e = load("dist.timeout_s=9223372036854775807");
        assert!(
            e.contains("dist.timeout_s") && e.contains("one week"),
            "{e}"
        );
        let e = load("dist.shm_slot_bytes=1");
        assert!(e.contains("dist.shm_slot_bytes"), "{e}");
        let e = load("train.export_to=\"\"");
        assert!(e.contains("train.export_to") && e.contains("empty"), "{e}");
    }
}
