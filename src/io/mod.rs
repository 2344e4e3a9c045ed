//! What goes in and out of files: [`files`] writes atomically and never replaces what a user wrote;
//! [`safetensors`] reads tensors; [`weights`] reads diffusers/transformers pipeline and component
//! folders into parameter pools; [`images`] writes PNGs; [`manifest`] reads (image, text) manifests; [`export`] writes a clean pipeline folder.

pub mod export;
pub mod files;
pub mod images;
pub mod manifest;
pub mod published;
pub mod safetensors;
pub mod torch;
pub mod weights;
