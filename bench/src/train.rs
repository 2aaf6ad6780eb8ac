//! `strata-bench train`: not built yet.

#[derive(clap::Args)]
pub struct TrainArgs {}

pub fn run(_args: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("strata-bench train is not implemented yet")
}
