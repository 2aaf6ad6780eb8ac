//! `strata-bench comm`: not built yet.

#[derive(clap::Args)]
pub struct CommArgs {}

pub fn run(_args: CommArgs) -> anyhow::Result<()> {
    anyhow::bail!("strata-bench comm is not implemented yet")
}
