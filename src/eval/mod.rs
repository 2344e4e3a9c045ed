//! `roentgen eval`: MS-SSIM diversity and FID with three feature networks (issue 6).

use anyhow::{bail, Result};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// (not built yet)
    MsSsim,
}

pub fn run(_cmd: EvalCommand) -> Result<()> {
    bail!("`roentgen eval` is not built yet (issue 6)")
}
