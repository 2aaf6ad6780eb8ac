//! The `strata` command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use strata::config::Config;
use strata::trace::Trace;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "A ZeRO-Infinity style training runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model described by a TOML config (the embedded tiny default when CONFIG is omitted).
    Train {
        /// TOML config; see configs/ and the README's config reference.
        config: Option<PathBuf>,
        /// Override any key: --set optim.lr=1e-3 --set data.train=/data/train.bin
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Shortcut for --set train.steps=N.
        #[arg(long)]
        steps: Option<usize>,
        /// A DeepSpeed JSON config (zero_optimization, offload, optimizer, scheduler, batch sizes,
        /// bf16/fp16, aio) applied over CONFIG, before --set.
        #[arg(long, value_name = "DS_CONFIG_JSON")]
        deepspeed: Option<PathBuf>,
        /// Continue from a checkpoint: `latest` (the newest in train.checkpoint_dir) or its
        /// directory; a shortcut for --set train.resume=….
        #[arg(long, value_name = "latest|DIR")]
        resume: Option<String>,
        /// Print the effective config and exit.
        #[arg(long)]
        print_config: bool,
        /// Data-parallel ranks on this machine: a shortcut for `strata launch --nproc-per-node N -- strata train …`.
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
        /// Write a timeline of the run (Chrome trace JSON, for ui.perfetto.dev or chrome://tracing): one track
        /// per queue per rank. With several ranks, rank 0 merges them into FILE at the end.
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
    },
    /// Print the placement plan of a config (state class × tier, bytes per rank, buffers) and check
    /// it against this machine or the capacities given; exits 1 when nothing fits.
    Plan(strata::plan::PlanArgs),
    /// Write a checkpoint's weights with Hugging Face names as a model directory transformers loads
    /// (config.json, safetensors shards and their index) or one safetensors file, unit by unit.
    Export(strata::export::ExportArgs),
    /// Continue a prompt with a checkpoint or an exported model, on the CPU or a GPU, with a key/value
    /// cache: greedy at temperature 0, else sampled (top-k / top-p, seeded); tokens printed as they come.
    Generate(strata::generate::GenerateArgs),
    /// Tokenize text, JSON lines or chat JSON lines into a token file (llm.c's format, uint32 tokens and a
    /// loss mask where needed), in parallel over the cores.
    Prepare(strata::data::prepare::PrepareArgs),
    /// Start local ranks with the rendezvous variables set (torchrun-style).
    Launch(strata_collectives::launch::LaunchArgs),
    /// Say what strata finds on this machine (GPUs, CUDA libraries, io_uring, O_DIRECT, memlock) and what to fix.
    Doctor {
        /// Offload/NVMe paths to check for O_DIRECT and free space.
        paths: Vec<PathBuf>,
    },
    /// Check the backends against their references; --gpu runs the GPU checks.
    Selftest(strata::selftest::SelftestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let trace = match start_trace(&cli) {
        Ok(trace) => trace,
        Err(e) => return fail(e.into()),
    };
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(colour_wanted())
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        );
    tracing_subscriber::registry()
        .with(log)
        .with(trace.as_ref().map(|t| t.layer()))
        .init();
    match run(cli, trace) {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

fn fail(e: anyhow::Error) -> ExitCode {
    // `{:#}` prints the chain: each error's message once, then its cause (an OS error last).
    eprintln!("error: {e:#}");
    ExitCode::FAILURE
}

/// `strata train --trace FILE` in a rank (not in the process that starts `--nproc` ranks): no file
/// is touched until the run has checked its outputs.
fn start_trace(cli: &Cli) -> Result<Option<Trace>, strata::trace::TraceError> {
    match &cli.command {
        Command::Train {
            trace: Some(path),
            nproc,
            print_config: false,
            ..
        } if !relaunches(*nproc) => Trace::start(path).map(Some),
        _ => Ok(None),
    }
}

/// Whether `strata train --nproc N` starts N ranks (rather than being one of them).
fn relaunches(nproc: Option<usize>) -> bool {
    nproc.is_some_and(|n| n > 1) && std::env::var_os("WORLD_SIZE").is_none()
}

/// Colour only on a terminal, and not when `NO_COLOR` is set to anything but "" (no-color.org).
fn colour_wanted() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn run(mut cli: Cli, trace: Option<Trace>) -> anyhow::Result<ExitCode> {
    if let Command::Train { nproc: Some(n), .. } = &cli.command {
        strata_collectives::launch::check_nproc("--nproc", *n)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(world) = std::env::var_os("WORLD_SIZE") {
            anyhow::bail!(
                "--nproc {n}: this process is already one of {} ranks started by a launcher (WORLD_SIZE is set), \
                 so it starts none itself: leave out --nproc and give the launcher the number of ranks \
                 (strata launch --nproc-per-node N)",
                world.to_string_lossy()
            );
        }
    }
    // The shortcuts are --set's of their keys, after the others, so they win; what they replace is said
    // (and still checked) with the rest.
    let mut shortcuts = Vec::new();
    if let Command::Train {
        resume, steps, set, ..
    } = &mut cli.command
    {
        if let Some(which) = resume.take() {
            let arg = format!("train.resume={}", toml::Value::String(which.clone()));
            shortcuts.push((arg, format!("--resume {which}")));
        }
        if let Some(n) = steps.take() {
            shortcuts.push((format!("train.steps={n}"), format!("--steps {n}")));
        }
        set.extend(shortcuts.iter().map(|(arg, _)| arg.clone()));
    }
    match cli.command {
        Command::Train {
            config,
            set,
            print_config,
            nproc: Some(n),
            trace: trace_path,
            deepspeed,
            ..
        } if relaunches(Some(n)) => relaunch(
            n,
            Relaunch {
                config,
                set,
                print_config,
                trace: trace_path,
                deepspeed,
            },
            &shortcuts,
        ),
        Command::Train {
            config,
            set,
            print_config,
            deepspeed,
            ..
        } => {
            let rank = strata_collectives::RankInfo::from_env().ok();
            let world = rank.as_ref().map_or(1, |r| r.world_size);
            let config = Config::load_with_deepspeed(
                config.as_deref(),
                deepspeed.as_deref().map(|p| (p, world)),
                &set,
            )?;
            if rank.as_ref().is_none_or(|r| r.rank == 0) {
                say_replaced(&config, &shortcuts);
            }
            if print_config {
                print!("{}", config.to_toml());
                return Ok(ExitCode::SUCCESS);
            }
            // An error the engine finds in a value the DeepSpeed JSON set names the JSON key.
            let named = config.clone();
            let summary = strata::train::run_traced(config, trace).map_err(|e| match &e {
                strata::train::TrainError::Engine(strata::engine::EngineError::Setting {
                    key,
                    message,
                }) => named
                    .blame_deepspeed(key, message)
                    .map_or_else(|| anyhow::Error::new(e), anyhow::Error::new),
                _ => anyhow::Error::new(e),
            })?;
            if summary.rank == 0 {
                println!("{summary}");
            }
            // A run a signal stopped (after saving) is not an error, but it did not finish: the
            // exit status a shell gives a process that the signal ended.
            Ok(match &summary.stopped {
                Some(s) => ExitCode::from(u8::try_from(128 + s.signal).unwrap_or(1)),
                None => ExitCode::SUCCESS,
            })
        }
        Command::Prepare(args) => {
            // The error names the file and line, or what failed (reading, creating the directory, writing).
            let report = strata::data::prepare::run(&args)?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Launch(args) => Ok(strata_collectives::launch::run(args)?),
        Command::Export(args) => {
            let report = strata::export::run(&args)?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate(args) => {
            strata::generate::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan(args) => {
            let report = strata::plan::run(&args)?;
            print!("{}", report.text);
            Ok(if report.fits {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Doctor { paths } => {
            let report = strata::doctor::collect(&paths);
            println!("{report}");
            Ok(if report.needs_fix() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Selftest(args) => strata::selftest::run(args),
    }
}

/// One line per `--set` that a later one replaced, naming a shortcut (`--steps 2`) by what was typed.
fn say_replaced(config: &Config, shortcuts: &[(String, String)]) {
    for (earlier, later) in &config.replaced_sets {
        match shortcuts.iter().find(|(arg, _)| arg == later) {
            Some((_, typed)) => tracing::warn!("--set {earlier} is replaced by {typed}"),
            None => tracing::warn!("--set {earlier} is replaced by the later --set {later}"),
        }
    }
}

/// The `strata train` arguments a relaunch passes on to its ranks.
struct Relaunch {
    config: Option<PathBuf>,
    set: Vec<String>,
    print_config: bool,
    trace: Option<PathBuf>,
    deepspeed: Option<PathBuf>,
}

/// `strata train --nproc N …`: runs `strata launch --nproc-per-node N -- <this binary> train …`.
fn relaunch(nproc: usize, r: Relaunch, shortcuts: &[(String, String)]) -> anyhow::Result<ExitCode> {
    // Check the config once here rather than N times in the ranks, and say here what the command
    // line replaced: the ranks get only the --set's in effect.
    let config = Config::load_with_deepspeed(
        r.config.as_deref(),
        r.deepspeed.as_deref().map(|p| (p, nproc)),
        &r.set,
    )?;
    say_replaced(&config, shortcuts);
    let exe = std::env::current_exe().context("locating the strata binary to relaunch")?;
    let mut command = vec![exe.display().to_string(), "train".to_string()];
    command.extend(r.config.map(|c| c.display().to_string()));
    let keys: Vec<_> = r
        .set
        .iter()
        .map(|s| strata::config::override_key(s))
        .collect();
    for (i, s) in r.set.into_iter().enumerate() {
        if keys[i + 1..].contains(&keys[i]) {
            continue;
        }
        command.push("--set".into());
        command.push(s);
    }
    if r.print_config {
        command.push("--print-config".into());
    }
    if let Some(path) = r.trace {
        command.push("--trace".into());
        command.push(path.display().to_string());
    }
    if let Some(path) = r.deepspeed {
        command.push("--deepspeed".into());
        command.push(path.display().to_string());
    }
    let args = strata_collectives::launch::LaunchArgs {
        nproc_per_node: nproc,
        nnodes: 1,
        node_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: None,
        grace_s: 5.0,
        no_prefix: false,
        command,
    };
    Ok(strata_collectives::launch::run(args)?)
}
