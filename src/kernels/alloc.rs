//! Buffers for the kernels and executors: an opt-in allocator setting for training on the
//! CPU with glibc, and zero-filled buffers filled over the thread pool.
//!
//! Why: glibc serves every allocation above its mmap threshold (at most 32 MiB by default)
//! with a fresh `mmap` and unmaps it on free, and trims the heap top on free, so every large
//! activation or gradient of every step is page-faulted in again, 4 KiB at a time. For a
//! 32 x 144 x 56 x 56 f32 tensor (58 MB) that is about 25 ms per allocation on a 2-core
//! machine, several times the cost of a depthwise convolution over it, and Candle's autograd
//! allocates several such tensors per layer. Keeping freed memory in the heap lets the next
//! step reuse it without faults, at the price of the process holding on to its peak memory.

use std::mem::MaybeUninit;

/// Tells glibc to serve large allocations from the heap and to keep freed memory for reuse
/// (process-wide; call once at start-up of a training process). Returns whether the setting
/// was applied (false on other C libraries and platforms).
pub fn reuse_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; both values are in range.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// From this many values on, [`zeroed`] fills over the rayon pool (1 MB; not tuned: small
/// buffers are not worth a fork-join).
const PARALLEL_FILL_FROM: usize = 1 << 18;

/// A zero-filled buffer of `len` values (`T::default()`, zero for the numbers the kernels
/// use), filled in parallel over the rayon pool when large.
///
/// Why: `vec![0.0; len]` zero-fills on the calling thread (the allocator memsets reused
/// memory), and the train step allocates every activation and gradient from its one
/// orchestrating thread while the pool's other threads wait between kernels: `memset` on
/// that thread was 6-7% of a SqueezeNet 1.1 or ShuffleNet V2 training step.
pub(crate) fn zeroed<T: Copy + Default + Send>(len: usize) -> Vec<T> {
    use rayon::prelude::*;
    if len < PARALLEL_FILL_FROM || rayon::current_num_threads() == 1 {
        return vec![T::default(); len];
    }
    let mut v: Vec<T> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(1 << 16)
        .for_each(|chunk| {
            init_zeros(chunk);
        });
    // SAFETY: the loop above initialised all `len` values, within the capacity.
    unsafe { v.set_len(len) };
    v
}

/// `chunk` zero-filled (`T::default()`), as initialised values. For kernels that build a
/// fresh buffer a chunk at a time over the thread pool: each chunk zeroed right before the
/// kernel writes it, while in cache, instead of a pass over the whole buffer ahead of them
/// ([`zeroed`]), which for a buffer larger than the caches goes out to memory and back.
pub(crate) fn init_zeros<T: Copy + Default>(chunk: &mut [MaybeUninit<T>]) -> &mut [T] {
    chunk.fill(MaybeUninit::new(T::default()));
    // SAFETY: every value was initialised just above, and `MaybeUninit<T>` has `T`'s layout.
    unsafe { &mut *(chunk as *mut [MaybeUninit<T>] as *mut [T]) }
}

#[cfg(test)]
mod tests {
    use super::zeroed;

    #[test]
    fn zeroed_buffers_are_zero_at_every_size() {
        for len in [
            0,
            1,
            1000,
            (1 << 18) - 1,
            1 << 18,
            (1 << 18) + 12_345,
            3 << 20,
        ] {
            let v: Vec<f32> = zeroed(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0), "length {len}");
        }
    }
}
