//! Random numbers, each generator where its users need it to be exact:
//! - [`splitmix`]: SplitMix64, for random weights and test data;
//! - [`philox`]: Philox4x32-10, for training noise on any backend (a GPU thread and the CPU draw
//!   the same values);
//! - [`torch`]: torch's CPU generator (mt19937 and its normal sampling), so `seed` S draws the
//!   initial latents `torch.randn` draws.

pub mod philox;
pub mod splitmix;
pub mod torch;
