//! torch-compatible CPU random numbers (mt19937 + torch's normal sampling), so `--seed S` draws
//! the same initial latents as `torch.randn(shape, generator=torch.Generator().manual_seed(S))`.
