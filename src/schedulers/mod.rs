//! Noise schedulers (diffusers semantics): PNDM, DDIM, Euler, Euler ancestral, DPM-Solver++ 2M.
