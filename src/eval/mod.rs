//! `roentgen eval`: MS-SSIM diversity and FID with three feature networks (issue 6); per-class AUROC
//! (issue 16).

pub mod auroc;
pub mod clip_vision;
pub mod densenet;
pub mod features;
pub mod fid;
pub mod frechet;
pub mod inception;
pub mod msssim;
pub mod net;
pub mod resize;
pub mod tensors;
