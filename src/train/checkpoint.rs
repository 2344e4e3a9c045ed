//! Checkpoints in diffusers layout, with optimizer and RNG state for resume.
