//! `roentgen eval`: MS-SSIM diversity and FID with three feature networks (issue 6); per-class AUROC
//! and the CheXpert → TorchXRayVision label targets for the classifier evaluations (issue 16).

pub mod auroc;
pub mod clip_vision;
pub mod densenet;
pub mod features;
pub mod fid;
pub mod frechet;
pub mod inception;
pub mod labels;
pub mod msssim;
pub mod net;
pub mod resize;
pub mod tensors;
