//! The `strata` command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use strata::config::Config;
use strata::data::prepare::{prepare, Tokenizer};

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
        /// Print the effective config and exit.
        #[arg(long)]
        print_config: bool,
        /// Data-parallel ranks on this machine: a shortcut for `strata launch --nproc-per-node N -- strata train …`.
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
    },
    /// Tokenize a text file into the llm.c token format.
    Prepare {
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value_t = Tokenizer::Gpt2)]
        tokenizer: Tokenizer,
    },
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
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Train { nproc: Some(n), .. } = &cli.command {
        strata_collectives::launch::check_nproc("--nproc", *n)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    match cli.command {
        Command::Train {
            config,
            set,
            steps,
            print_config,
            nproc: Some(n),
        } if n > 1 && std::env::var_os("WORLD_SIZE").is_none() => {
            relaunch(n, config, set, steps, print_config)
        }
        Command::Train {
            config,
            set,
            steps,
            print_config,
            nproc: _,
        } => {
            let mut overrides = set;
            if let Some(n) = steps {
                overrides.push(format!("train.steps={n}"));
            }
            let config = Config::load(config.as_deref(), &overrides)?;
            if print_config {
                print!("{}", config.to_toml());
                return Ok(ExitCode::SUCCESS);
            }
            let summary = strata::train::run(config)?;
            if summary.rank == 0 {
                println!("{summary}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Prepare {
            input,
            output,
            tokenizer,
        } => {
            let n = prepare(&input, &output, tokenizer).with_context(|| {
                format!("preparing {} -> {}", input.display(), output.display())
            })?;
            println!(
                "wrote {n} tokens to {} ({tokenizer:?}, vocab {})",
                output.display(),
                tokenizer.vocab_size()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Launch(args) => {
            strata_collectives::launch::run(args).map_err(|e| anyhow::anyhow!("{e}"))
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

/// `strata train --nproc N …`: runs `strata launch --nproc-per-node N -- <this binary> train …`.
fn relaunch(
    nproc: usize,
    config: Option<PathBuf>,
    set: Vec<String>,
    steps: Option<usize>,
    print_config: bool,
) -> anyhow::Result<ExitCode> {
    // Check the config once here rather than N times in the ranks.
    Config::load(config.as_deref(), &set)?;
    let exe = std::env::current_exe().context("locating the strata binary to relaunch")?;
    let mut command = vec![exe.display().to_string(), "train".to_string()];
    command.extend(config.map(|c| c.display().to_string()));
    for s in set {
        command.push("--set".into());
        command.push(s);
    }
    if let Some(n) = steps {
        command.push(format!("--steps={n}"));
    }
    if print_config {
        command.push("--print-config".into());
    }
    let args = strata_collectives::launch::LaunchArgs {
        nproc_per_node: nproc,
        nnodes: 1,
        node_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: None,
        grace_s: 5.0,
        command,
    };
    strata_collectives::launch::run(args).map_err(|e| anyhow::anyhow!("{e}"))
}
