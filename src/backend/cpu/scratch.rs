//! Per-thread scratch buffers for the CPU kernels (packed GEMM panels, convolution patches,
//! attention scores), kept between calls. A fresh multi-megabyte `Vec` per call is a fresh
//! anonymous mapping: every 4 KiB page of it faults and is zeroed by the kernel on first touch,
//! which on the U-Net and the VAE cost more system time than the copies themselves.

use std::cell::RefCell;

thread_local! {
    /// Buffers not in use on this thread. A stack, so nested uses (a product inside a task that
    /// holds a patch buffer) each get their own.
    static FREE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer from the calling thread's free list (empty if there is none): for a caller that
/// needs to own it for a while (a packed matrix); `give_back` returns it.
pub fn take() -> Vec<f32> {
    FREE.with_borrow_mut(|free| free.pop()).unwrap_or_default()
}

/// Returns a buffer to the calling thread's free list. A buffer taken on one thread and given
/// back on another moves between lists; the cap keeps a list that only receives from growing
/// without bound (the excess is freed).
pub fn give_back(buf: Vec<f32>) {
    FREE.with_borrow_mut(|free| {
        if free.len() < MAX_FREE {
            free.push(buf);
        }
    });
}

/// Buffers kept per thread: more than the deepest nesting of uses (three: a convolution's
/// patches, its packed weight, a product's A panels).
const MAX_FREE: usize = 8;

/// Runs `f` with a buffer of `len` values from the calling thread's free list (grown if short).
/// Its contents are unspecified — whatever an earlier use left — so `f` must write before it
/// reads (or fill it).
pub fn with_buffer<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = take();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    give_back(buf);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_uses_get_distinct_buffers_and_buffers_are_reused() {
        let outer = with_buffer(1000, |a| {
            a.fill(1.0);
            let inner = with_buffer(500, |b| {
                b.fill(2.0);
                b.as_ptr()
            });
            assert!(a.iter().all(|&x| x == 1.0), "the inner use wrote into the outer buffer");
            assert_ne!(inner, a.as_ptr());
            a.as_ptr()
        });
        // The last buffer given back is the first handed out again: no new allocation.
        assert_eq!(with_buffer(1000, |a| a.as_ptr()), outer);
    }
}
