//! `roentgen prepare`: training/test manifests from MIMIC-CXR-JPG and the IU X-ray reports (issue 6).

use anyhow::{bail, Result};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum PrepareCommand {
    /// (not built yet)
    Mimic,
}

pub fn run(_cmd: PrepareCommand) -> Result<()> {
    bail!("`roentgen prepare` is not built yet (issue 6)")
}
