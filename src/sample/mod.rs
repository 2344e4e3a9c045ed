//! Sampling: [`pipeline`] turns prompts into images (text encoder, U-Net denoising loop with
//! classifier-free guidance, VAE decoder); [`schedulers`] are the diffusers noise schedulers it steps.

pub mod edit;
pub mod init_image;
pub mod pipeline;
pub mod schedulers;
mod stages;
