//! `roentgen eval`: MS-SSIM diversity and FID with three feature networks (issue 6); the classifier
//! evaluation of the paper's Table 3 (`classify`: per-class AUROC of TorchXRayVision's DenseNet on
//! labelled images, the CheXpert → TorchXRayVision label targets; issue 16).

pub mod auroc;
pub mod classify;
pub mod clip_text;
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
pub mod retrieval;
pub mod tensors;
pub mod text_knn;
