//! `botflow bench`.
use clap::Args;
#[derive(Args, Debug)]
pub struct BenchArgs {}
pub fn run(_c: crate::config::Config, _a: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench: not written yet")
}
