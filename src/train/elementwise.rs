//! The train-step executor's element-wise loops and copies, spread over the rayon pool.
//!
//! Why: around the kernels, a step copies and combines whole activations (concat, slice and
//! channel shuffle both ways, activation backward, gradient sums). On one thread these are
//! a few percent of the step; with two threads, left serial while the kernels halve, they
//! were 12% of a ShuffleNet V2 step. Below [`PAR_MIN`] values the loops stay on the
//! calling thread, where a rayon hand-off would cost more than it saves.

use rayon::prelude::*;

/// Slices shorter than this run on the calling thread.
pub(super) const PAR_MIN: usize = 1 << 15;
/// Values per parallel task in the flat loops.
const TASK: usize = 1 << 13;

/// `a += b`.
pub(super) fn add_into(a: &mut [f32], b: &[f32]) {
    zip_map(a, b, |a, b| a + b);
}

/// `a[i] = f(a[i], b[i])` for every i.
pub(super) fn zip_map(a: &mut [f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    let serial = |a: &mut [f32], b: &[f32]| {
        for (a, b) in a.iter_mut().zip(b) {
            *a = f(*a, *b);
        }
    };
    if a.len() < PAR_MIN {
        serial(a, b);
    } else {
        a.par_chunks_mut(TASK)
            .zip(b.par_chunks(TASK))
            .for_each(|(a, b)| serial(a, b));
    }
}

/// `f(x[i])` for every i, as a new buffer.
pub(super) fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut y = x.to_vec();
    if y.len() < PAR_MIN {
        y.iter_mut().for_each(|v| *v = f(*v));
    } else {
        y.par_chunks_mut(TASK)
            .for_each(|c| c.iter_mut().for_each(|v| *v = f(*v)));
    }
    y
}

/// Calls `f(sample, part)` on each of the consecutive `sample_len`-value parts of `y` (one
/// per sample of the batch), in parallel when `y` is large.
pub(super) fn per_sample(
    y: &mut [f32],
    sample_len: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    if sample_len == 0 {
        return;
    }
    if y.len() < PAR_MIN {
        y.chunks_mut(sample_len)
            .enumerate()
            .for_each(|(s, p)| f(s, p));
    } else {
        y.par_chunks_mut(sample_len)
            .enumerate()
            .for_each(|(s, p)| f(s, p));
    }
}

/// Per-channel sums of NCHW values (`c` channels of `plane` values per sample): each
/// sample's plane sums in parallel, then added in sample order, which is the serial loop's
/// order and rounding.
pub(super) fn channel_sums(g: &[f32], c: usize, plane: usize) -> Vec<f32> {
    let sample = c * plane;
    let mut sums = vec![0f32; c];
    if sample == 0 {
        return sums;
    }
    let per_sample = |gs: &[f32]| -> Vec<f32> {
        gs.chunks_exact(plane)
            .map(|pl| pl.iter().sum::<f32>())
            .collect()
    };
    let parts: Vec<Vec<f32>> = if g.len() < PAR_MIN {
        g.chunks_exact(sample).map(per_sample).collect()
    } else {
        g.par_chunks_exact(sample).map(per_sample).collect()
    };
    add_in_order(&mut sums, parts);
    sums
}

/// `g[i] = f(g[i], y[i])`, and the per-channel sums of the new `g` as [`channel_sums`]
/// gives them, in one pass (an activation's backward fused with its conv's bias gradient).
pub(super) fn masked_channel_sums(
    g: &mut [f32],
    y: &[f32],
    f: impl Fn(f32, f32) -> f32 + Sync,
    c: usize,
    plane: usize,
) -> Vec<f32> {
    let sample = c * plane;
    let mut sums = vec![0f32; c];
    if sample == 0 {
        return sums;
    }
    let per_sample = |(gs, ys): (&mut [f32], &[f32])| -> Vec<f32> {
        gs.chunks_exact_mut(plane)
            .zip(ys.chunks_exact(plane))
            .map(|(gp, yp)| {
                let mut sum = 0f32;
                for (d, &v) in gp.iter_mut().zip(yp) {
                    *d = f(*d, v);
                    sum += *d;
                }
                sum
            })
            .collect()
    };
    let parts: Vec<Vec<f32>> = if g.len() < PAR_MIN {
        g.chunks_exact_mut(sample)
            .zip(y.chunks_exact(sample))
            .map(per_sample)
            .collect()
    } else {
        g.par_chunks_exact_mut(sample)
            .zip(y.par_chunks_exact(sample))
            .map(per_sample)
            .collect()
    };
    add_in_order(&mut sums, parts);
    sums
}

fn add_in_order(sums: &mut [f32], parts: Vec<Vec<f32>>) {
    for part in parts {
        for (s, v) in sums.iter_mut().zip(part) {
            *s += v;
        }
    }
}
