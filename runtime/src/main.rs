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
    match cli.command {
        Command::Train {
            config,
            set,
            steps,
            print_config,
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
            println!("{summary}");
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
