//! `strata-bench comm`: nccl-tests-style sweep of the collectives; run it under `strata launch`.
//!
//! Per size and collective: `time_us algbw busbw #wrong` (GB/s). Bus bandwidth as in nccl-tests:
//! all_reduce algbw * 2(n-1)/n; all_gather and reduce_scatter algbw * (n-1)/n; broadcast algbw.

use std::time::Duration;

use strata::config::ByteSize;
use strata_collectives::bench::{sweep, Collective, Row, SweepOptions};
use strata_collectives::{init_from_env, Backend, CommError, DType, DistConfig};

#[derive(clap::Args)]
pub struct CommArgs {
    /// auto, shm, tcp or nccl.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Smallest size (nccl-tests' size: the all_reduce buffer, the gathered buffer, the scattered buffer).
    #[arg(long, default_value = "1K")]
    min_bytes: String,
    /// Largest size.
    #[arg(long, default_value = "64M")]
    max_bytes: String,
    /// Each size is the previous one times this.
    #[arg(long, default_value_t = 4)]
    step_factor: usize,
    /// Timed iterations per size.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed iterations per size.
    #[arg(long, default_value_t = 5)]
    warmup_iters: usize,
    /// Element type: f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Comma-separated: all_reduce,all_gather,reduce_scatter,broadcast.
    #[arg(long, default_value = "all_reduce,all_gather,reduce_scatter,broadcast")]
    collectives: String,
    /// dist.timeout in seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout_s: f64,
    /// dist.shm_slot_bytes.
    #[arg(long, default_value = "4M")]
    shm_slot_bytes: String,
    /// Rank 0 prints one JSON object per row instead of the table.
    #[arg(long)]
    json: bool,
}

/// The largest buffer the sweep allocates (per rank, send and receive).
const BYTES_MAX: usize = 16 << 30;

/// A size argument, by strata's one rule for sizes (`ByteSize`), at most [`BYTES_MAX`].
fn size(flag: &str, text: &str) -> anyhow::Result<usize> {
    let bytes = text
        .parse::<ByteSize>()
        .map_err(|e| anyhow::anyhow!("{flag} {e}"))?
        .bytes();
    usize::try_from(bytes)
        .ok()
        .filter(|b| *b <= BYTES_MAX)
        .ok_or_else(|| anyhow::anyhow!("{flag} {text}: at most {}", ByteSize(BYTES_MAX as u64)))
}

pub fn run(args: CommArgs) -> anyhow::Result<()> {
    let (min_bytes, max_bytes) = (
        size("--min-bytes", &args.min_bytes)?,
        size("--max-bytes", &args.max_bytes)?,
    );
    anyhow::ensure!(
        min_bytes <= max_bytes,
        "--min-bytes {} is above --max-bytes {}",
        args.min_bytes,
        args.max_bytes
    );
    anyhow::ensure!(
        args.step_factor >= 2,
        "--step-factor {} must be at least 2",
        args.step_factor
    );
    anyhow::ensure!(args.iters >= 1, "--iters must be at least 1");
    anyhow::ensure!(
        args.timeout_s.is_finite() && args.timeout_s > 0.0 && args.timeout_s <= 1e6,
        "--timeout-s {} must lie in (0, 1e6] seconds",
        args.timeout_s
    );
    let backend: Backend = args.backend.parse()?;
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::Bf16,
        other => anyhow::bail!("--dtype {other:?}: expected f32 or bf16"),
    };
    let collectives = args
        .collectives
        .split(',')
        .map(|c| c.trim().parse::<Collective>())
        .collect::<Result<Vec<_>, _>>()?;
    let config = DistConfig {
        backend,
        timeout: Duration::from_secs_f64(args.timeout_s),
        gpu: matches!(backend, Backend::Auto | Backend::Nccl),
        shm_slot_bytes: size("--shm-slot-bytes", &args.shm_slot_bytes)?,
    };
    let comm = init_from_env(&config).map_err(|e| match e {
        CommError::Env(_) => anyhow::anyhow!(
            "{e} (run strata-bench comm under `strata launch --nproc-per-node N --`)"
        ),
        other => anyhow::Error::new(other),
    })?;
    let options = SweepOptions {
        collectives,
        dtype,
        min_bytes,
        max_bytes,
        step_factor: args.step_factor,
        warmup_iters: args.warmup_iters,
        iters: args.iters,
    };
    let lead = comm.rank() == 0;
    if lead && !args.json {
        println!(
            "# strata-bench comm: backend {}, world_size {}, dtype {}, iters {} (GB/s; busbw: all_reduce x 2(n-1)/n, all_gather/reduce_scatter x (n-1)/n)",
            comm.backend(),
            comm.world_size(),
            dtype.name(),
            options.iters
        );
        println!("{}", Row::table_header());
    }
    let mut wrong_total = 0;
    sweep(&*comm, &options, |row| {
        wrong_total += row.wrong;
        if lead {
            if args.json {
                println!("{}", row.json());
            } else {
                println!("{}", row.table_line());
            }
        }
    })?;
    anyhow::ensure!(wrong_total == 0, "{wrong_total} wrong elements");
    Ok(())
}
