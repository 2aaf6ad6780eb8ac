//! `strata-bench io`: not built yet.

#[derive(clap::Args)]
pub struct IoArgs {}

pub fn run(_args: IoArgs) -> anyhow::Result<()> {
    anyhow::bail!("strata-bench io is not implemented yet")
}
