//! roentgen: a from-scratch engine for text-to-chest-X-ray latent diffusion (Stable Diffusion v1.x,
//! as fine-tuned by RoentGen). See ARCHITECTURE.md in the project's shared folder for the layout.

pub mod backend;
pub mod bench;
pub mod diag;
pub mod eval;
pub mod export;
pub mod files;
pub mod images;
pub mod inspect;
pub mod models;
pub mod nn;
pub mod ops;
pub mod phantom;
pub mod pipeline;
pub mod prepare;
pub mod rng;
pub mod schedulers;
pub mod tensor;
pub mod tokenizer;
pub mod torch_rng;
pub mod train;
pub mod weights;
pub mod wordpiece;
