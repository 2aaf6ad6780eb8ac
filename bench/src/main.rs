//! strata-bench: training throughput and micro-benchmarks of each mechanism.

mod adam;
mod comm;
mod io;
mod train;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "strata-bench", version, about = "strata benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// NVMe read/write sweep through the io_uring engine (block size x queue depth).
    Io(io::IoArgs),
    /// Collective bandwidth sweep (run under `strata launch`).
    Comm(comm::CommArgs),
    /// Training throughput (tokens/s, TFLOP/s) of a model config.
    Train(train::TrainArgs),
    /// CPU AdamW throughput (parameters per second).
    Adam(adam::AdamArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Io(args) => io::run(args),
        Command::Comm(args) => comm::run(args),
        Command::Train(args) => train::run(args),
        Command::Adam(args) => adam::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // As `strata`: the chain once (an OS error last), no backtrace for a user's error.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
