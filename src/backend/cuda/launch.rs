//! Typed kernel launches. build.rs (build/kernel_params.rs) reads every `extern "C" __global__`
//! kernel's signature in kernels/*.cu and writes one struct per kernel, its fields the kernel's
//! parameters in order with their names and types; the backend launches those structs
//! ([`CudaBackend::launch`](super::CudaBackend::launch)). A launch whose arguments do not fit the
//! kernel's signature (a missing or extra argument, a pointer for an `int`, a misspelt name) does
//! not compile; there is no untyped launch path left to get wrong at run time on a GPU.

use std::borrow::Cow;

/// A kernel and its arguments.
pub(crate) trait Kernel {
    /// The kernel's name in its module (with the bucket pasted in, for macro-instantiated ones).
    fn name(&self) -> Cow<'static, str>;
    /// The arguments as cuLaunchKernel reads them: one 64-bit slot per parameter (device
    /// addresses as they are, 32-bit scalars in the low word).
    fn params(&self) -> Vec<u64>;
}

/// A bf16 attention kernel instance (`<base>_d<head_bucket>`), launched with the arguments of its
/// f32 twin (build.rs checks that the two signatures are the same).
pub(crate) struct Bf16Bucket<K> {
    base: &'static str,
    head_bucket: usize,
    kernel: K,
}

impl<K: Kernel> Kernel for Bf16Bucket<K> {
    fn name(&self) -> Cow<'static, str> {
        format!("{}_d{}", self.base, self.head_bucket).into()
    }
    fn params(&self) -> Vec<u64> {
        self.kernel.params()
    }
}

include!(concat!(env!("OUT_DIR"), "/kernel_params.rs"));
