//! A per-thread scratch buffer reused from call to call, for kernels whose temporary is
//! overwritten before it is read (im2col's column matrix).
//!
//! Why: a fresh `vec![0.0; len]` per convolution costs a memset and, for the large column
//! matrices of 224x224 stems (1.35 MB for MobileNet V2's), fresh pages from the kernel on
//! every call, which showed as 10% of a batch-1 forward pass.

use std::cell::RefCell;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` values of this thread's scratch buffer, whose contents are arbitrary
/// (left from an earlier call): `f` must write every value it reads. A nested call on the
/// same thread (a rayon worker that steals another kernel's job while it waits) gets a
/// fresh buffer instead.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

#[cfg(test)]
mod tests {
    use super::with_scratch;

    #[test]
    fn nested_calls_get_their_own_buffer() {
        with_scratch(4, |outer| {
            outer.fill(1.0);
            with_scratch(4, |inner| {
                inner.fill(2.0);
            });
            assert_eq!(outer, &[1.0; 4]);
        });
        // The buffer is kept (and may hold old values) but has the length asked for.
        with_scratch(2, |again| assert_eq!(again.len(), 2));
    }
}
