//! `roentgen eval`: MS-SSIM diversity and FID with three feature networks (issue 6).

pub mod clip_vision;
pub mod densenet;
pub mod features;
pub mod fid;
pub mod frechet;
pub mod inception;
pub mod msssim;
pub mod ops;
pub mod resize;
pub mod tensors;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Intra-prompt diversity: mean MS-SSIM over all image pairs sharing a prompt (paper, Figure 3).
    MsSsim(msssim::MsSsimArgs),
    /// Fréchet distance between the feature distributions of two image folders (InceptionV3,
    /// TorchXRayVision DenseNet-121 or CLIP features; paper, Table 1).
    #[command(after_long_help = fid::CONVERT_HELP)]
    Fid(fid::FidArgs),
    /// How often generated phantoms show the finding (and side) their prompt asked for, measured
    /// with the phantom's own geometry, next to the same measure on real phantoms (issue 7).
    Phantom(crate::phantom::EvalPhantomArgs),
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::MsSsim(a) => msssim::run(a),
        EvalCommand::Fid(a) => fid::run(a),
        EvalCommand::Phantom(a) => crate::phantom::run_eval_phantom(a),
    }
}
