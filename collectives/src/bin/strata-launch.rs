//! `strata-launch`: the launcher on its own (same as `strata launch`), for tests and scripts.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "strata-launch",
    about = "Start local ranks with the rendezvous variables set"
)]
struct Cli {
    #[command(flatten)]
    launch: strata_collectives::launch::LaunchArgs,
}

fn main() -> std::process::ExitCode {
    match strata_collectives::launch::run(Cli::parse().launch) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("strata launch: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
