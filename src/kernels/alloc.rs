//! An opt-in allocator setting for training on the CPU with glibc.
//!
//! Why: glibc serves every allocation above its mmap threshold (at most 32 MiB by default)
//! with a fresh `mmap` and unmaps it on free, and trims the heap top on free, so every large
//! activation or gradient of every step is page-faulted in again, 4 KiB at a time. For a
//! 32 x 144 x 56 x 56 f32 tensor (58 MB) that is about 25 ms per allocation on a 2-core
//! machine, several times the cost of a depthwise convolution over it, and Candle's autograd
//! allocates several such tensors per layer. Keeping freed memory in the heap lets the next
//! step reuse it without faults, at the price of the process holding on to its peak memory.

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
