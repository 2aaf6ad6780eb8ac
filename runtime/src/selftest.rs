//! `strata selftest`: the backends checked against their references. Not built yet: the GPU checks are being
//! written (see the README's status table).

#[derive(clap::Args, Debug, Clone)]
pub struct SelftestArgs {
    /// Run the GPU checks (kernels against the CPU backend, a short training run, bandwidth, NCCL).
    #[arg(long)]
    pub gpu: bool,
}

pub fn run(_args: SelftestArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("strata selftest is not implemented yet")
}
