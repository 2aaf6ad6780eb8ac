//! `strata plan CONFIG`: the placement plan of a config at a world size, as a table (state class ×
//! tier, bytes per rank, staging buffers), checked against this machine or the capacities given
//! on the command line — without opening a device or allocating anything.

use std::path::PathBuf;

use crate::backend::Backend;
use crate::config::{ByteSize, Config};
use crate::engine::placement::{Capacities, Misfit};
use crate::engine::EngineError;

/// The arguments of `strata plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// TOML config (the embedded default when omitted).
    pub config: Option<PathBuf>,
    /// Override any key, as `strata train --set`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// A DeepSpeed JSON config applied over CONFIG, as `strata train --deepspeed`.
    #[arg(long, value_name = "DS_CONFIG_JSON")]
    pub deepspeed: Option<PathBuf>,
    /// Data-parallel ranks to plan for.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub world_size: usize,
    /// Device memory per rank (default: train.device_memory; unchecked on a GPU without it).
    #[arg(long, value_name = "SIZE")]
    pub device_memory: Option<ByteSize>,
    /// Host memory for the host tier per rank (default: this machine's MemAvailable).
    #[arg(long, value_name = "SIZE")]
    pub host_memory: Option<ByteSize>,
    /// Free bytes on each NVMe path (default: what the file system reports).
    #[arg(long, value_name = "SIZE")]
    pub nvme_bytes: Option<ByteSize>,
}

/// The plan's report, and whether a placement fits.
pub struct PlanReport {
    pub text: String,
    pub fits: bool,
}

/// Most ranks a plan is made for.
const WORLD_SIZE_MAX: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("--world-size {0} must lie between 1 and {WORLD_SIZE_MAX}")]
    WorldSize(usize),
}

/// The report for `args`.
pub fn run(args: &PlanArgs) -> Result<PlanReport, PlanError> {
    if !(1..=WORLD_SIZE_MAX).contains(&args.world_size) {
        return Err(PlanError::WorldSize(args.world_size));
    }
    let config = Config::load_with_deepspeed(
        args.config.as_deref(),
        args.deepspeed.as_deref().map(|p| (p, args.world_size)),
        &args.set,
    )?;
    // "@tmp" is a directory made under $TMPDIR when the run starts: plan for $TMPDIR.
    let config = config.with_temp_nvme_path(&std::env::temp_dir());
    let backend = crate::engine::resolve_backend(config.train.device);
    let mut caps = Capacities::of_this_machine(&config, backend);
    if let Some(d) = args.device_memory {
        caps.device_bytes = Some(d.bytes());
    }
    if let Some(h) = args.host_memory {
        caps.host_bytes = Some(h.bytes());
    }
    if let Some(n) = args.nvme_bytes {
        for (_, free) in caps.nvme_free.iter_mut() {
            *free = Some(n.bytes());
        }
    }
    // A setting the engine refuses that the DeepSpeed JSON set names the JSON key.
    let plans =
        crate::engine::plan_placements(&config, args.world_size, backend, &caps).map_err(|e| {
            match &e {
                EngineError::Setting { key, message } => config
                    .blame_deepspeed(key, message)
                    .map_or(PlanError::Engine(e), PlanError::Config),
                _ => PlanError::Engine(e),
            }
        })?;
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    let model = crate::model::build(&config.model);
    let mut text = format!(
        "{}, sequence {}: {} parameters; {} backend, {} rank{}\n",
        model.describe(),
        config.model.seq_len,
        model.num_params(),
        match backend {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        },
        args.world_size,
        if args.world_size == 1 { "" } else { "s" }
    );
    text += &format!(
        "machine (per rank): device {}, host {}, locked memory {}{}\n",
        caps.device_bytes.map_or(
            "not checked (give --device-memory or train.device_memory)".into(),
            gib
        ),
        caps.host_bytes.map_or("unknown".into(), gib),
        caps.memlock_bytes.map_or("unlimited".into(), gib),
        caps.nvme_free
            .iter()
            .map(|(p, free)| format!(
                ", {} free on {}",
                free.map_or("unknown".into(), gib),
                p.display()
            ))
            .collect::<String>()
    );
    let chosen = plans.iter().position(|(_, fits)| fits.is_ok());
    for (i, (plan, fits)) in plans.iter().enumerate() {
        let tiers = format!(
            "parameters on {}, optimizer states on {}",
            plan.tiers.params.name(),
            plan.optimizer_where()
        );
        match fits {
            Err(why) if Some(i) != chosen && i + 1 < plans.len() => {
                text += &format!("does not fit: {tiers}: {}\n", describe(why, &config));
            }
            _ if chosen.is_some() && Some(i) != chosen => {}
            _ => {
                text += "\n";
                text += &plan.table();
                text += &match fits {
                    Ok(()) => "fits this machine\n".to_string(),
                    Err(why) => format!("does not fit: {}\n", describe(why, &config)),
                };
            }
        }
    }
    Ok(PlanReport {
        text,
        fits: chosen.is_some(),
    })
}

fn describe(why: &Misfit, config: &Config) -> String {
    match why {
        Misfit::Device { needed, available } => {
            let mut advice = vec![format!(
                "lower data.micro_batch_size (now {})",
                config.data.micro_batch_size
            )];
            if !config.train.activation_checkpointing {
                advice.push("set train.activation_checkpointing = true".into());
            }
            if config.train.attention == crate::backend::AttentionMode::Materialized {
                advice.push("set train.attention = \"fused\"".into());
            }
            if config.zero.stage < 3 {
                advice.push("set zero.stage = 3".into());
            }
            advice
                .push("move states off the device (offload_*.device = \"cpu\" or \"nvme\")".into());
            advice.push("or use more ranks".into());
            format!(
                "device memory: the arena needs {needed} bytes, {available} are available (train.device_memory or --device-memory); {}",
                advice.join(", ")
            )
        }
        Misfit::Other(message) => message.clone(),
    }
}
