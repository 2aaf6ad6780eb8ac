//! `strata launch`: starts local ranks with the rendezvous variables set. Not built yet.

/// Command-line arguments of `strata launch`.
#[derive(clap::Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Ranks to start on this node.
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
    /// The command each rank runs.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Runs the ranks to completion; the exit code is non-zero when any rank failed.
pub fn run(_args: LaunchArgs) -> Result<std::process::ExitCode, String> {
    Err("strata launch is not implemented yet".to_string())
}
