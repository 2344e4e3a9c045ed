//! roentgen: a from-scratch engine for text-to-chest-X-ray latent diffusion (Stable Diffusion v1.x,
//! as fine-tuned by RoentGen). The layout, from the bottom up:
//! - [`tensor`] (shapes and layouts), [`ops`] (each operation once: parameters, checks, FLOP counts,
//!   CPU reference), [`backend`] (the CPU and CUDA devices that run them, and the planning pass);
//! - [`nn`] (layers), [`models`] (U-Net, VAE, CLIP and BERT text encoders);
//! - [`text`] (tokenizers), [`rng`] (generators), [`io`] (files, weights, images);
//! - [`sample`] (pipeline, schedulers), [`train`], [`eval`] (FID, MS-SSIM, classifiers), [`tools`];
//! - [`diag`]: how the library reports progress and warnings (it prints nothing itself).
//!
//! The command line (src/cli) is a thin layer over this library.

#[macro_use]
pub mod choice;

pub mod backend;
pub mod diag;
pub mod dist;
pub mod eval;
pub mod io;
pub mod models;
pub mod nn;
pub mod ops;
pub mod rng;
pub mod sample;
pub mod tensor;
pub mod text;
pub mod tools;
pub mod train;
