//! The demo control plane (filled in by the demo work).
use clap::Args;

#[derive(Debug, Args)]
pub struct DemoArgs {}

pub async fn run(_: DemoArgs) -> anyhow::Result<()> {
    Ok(())
}
