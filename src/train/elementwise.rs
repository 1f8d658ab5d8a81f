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

/// `f(x[i])` for every i, as a new buffer (written once, as [`zip_new`]).
pub(super) fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    zip_new(x, x, |v, _| f(v))
}

/// `f(a[i], b[i])` for every i, as a new buffer written once, in parallel when large.
///
/// Why: a copy of `a` updated in place (as `map` and the residual add did) is two passes over
/// the output; written straight into the new buffer's spare capacity it is one.
pub(super) fn zip_new(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    use std::mem::MaybeUninit;
    let len = a.len();
    assert_eq!(b.len(), len, "zip_new: operand lengths");
    let mut y: Vec<f32> = Vec::with_capacity(len);
    let write = |dst: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32]| {
        for ((d, &u), &v) in dst.iter_mut().zip(a).zip(b) {
            d.write(f(u, v));
        }
    };
    let spare = &mut y.spare_capacity_mut()[..len];
    if len < PAR_MIN {
        write(spare, a, b);
    } else {
        spare
            .par_chunks_mut(TASK)
            .zip(a.par_chunks(TASK))
            .zip(b.par_chunks(TASK))
            .for_each(|((d, a), b)| write(d, a, b));
    }
    // SAFETY: `spare`, `a` and `b` have `len` values each and are cut into chunks of the
    // same lengths, so every value of the first `len` was written above.
    unsafe { y.set_len(len) };
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

/// A new buffer of `n` samples of `sample_len` values, each sample's part the
/// concatenation of the slices `pieces(sample)` yields, in order, in parallel when large.
///
/// Why: the step's copies (concat, slice and channel shuffle, both ways) overwrite every
/// value of their output, so filling it with zeros first (as [`crate::kernels::alloc::zeroed`]
/// does) is a whole extra write of each activation or gradient they make. The pieces are
/// written in sequence straight into the new buffer's spare capacity; a sample whose pieces
/// do not add up to exactly `sample_len` values panics before the buffer is exposed.
pub(super) fn gather<'a, I>(
    n: usize,
    sample_len: usize,
    pieces: impl Fn(usize) -> I + Sync,
) -> Vec<f32>
where
    I: Iterator<Item = &'a [f32]>,
{
    use std::mem::MaybeUninit;
    let len = n * sample_len;
    let mut y: Vec<f32> = Vec::with_capacity(len);
    if sample_len == 0 {
        return y;
    }
    let fill = |s: usize, part: &mut [MaybeUninit<f32>]| {
        let mut at = 0;
        for piece in pieces(s) {
            assert!(
                at + piece.len() <= part.len(),
                "gather: sample {s}'s pieces exceed its {} values",
                part.len()
            );
            part[at..at + piece.len()].write_copy_of_slice(piece);
            at += piece.len();
        }
        assert_eq!(
            at,
            part.len(),
            "gather: sample {s}'s pieces fill {at} values"
        );
    };
    let spare = &mut y.spare_capacity_mut()[..len];
    if len < PAR_MIN {
        spare
            .chunks_mut(sample_len)
            .enumerate()
            .for_each(|(s, p)| fill(s, p));
    } else {
        spare
            .par_chunks_mut(sample_len)
            .enumerate()
            .for_each(|(s, p)| fill(s, p));
    }
    // SAFETY: every sample's part (the `n` parts cover the first `len` values of the
    // capacity) was written in full, or `fill` panicked before this line.
    unsafe { y.set_len(len) };
    y
}

/// Per-channel sums of NCHW values (`c` channels of `plane` values per sample): each
/// sample's plane sums (in lanes, [`lane_sum`]) in parallel, then added in sample order.
pub(super) fn channel_sums(g: &[f32], c: usize, plane: usize) -> Vec<f32> {
    let sample = c * plane;
    let mut sums = vec![0f32; c];
    if sample == 0 {
        return sums;
    }
    let per_sample = |gs: &[f32]| -> Vec<f32> { gs.chunks_exact(plane).map(lane_sum).collect() };
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
    plane_sums_in_place(g, y, c, plane, |gp, yp| map_and_sum(gp, yp, &f))
}

/// [`masked_channel_sums`] for a ReLU (`upper` infinite) or ReLU6 (`upper` 6): the
/// gradient kept where `0 < y < upper`, zero elsewhere (and where `y` is NaN), in AVX-512
/// registers where the CPU has them, with the same sums bit for bit.
///
/// Why: compiled for baseline x86-64, the generic loop ran 4 lanes wide, 5% of a SqueezeNet
/// 1.1 training step (every convolution there has a bias and a ReLU).
pub(super) fn window_channel_sums(
    g: &mut [f32],
    y: &[f32],
    upper: f32,
    c: usize,
    plane: usize,
) -> Vec<f32> {
    let window = move |d: f32, v: f32| if v > 0.0 && v < upper { d } else { 0.0 };
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::simd::level() == crate::kernels::simd::Level::Avx512 {
        return plane_sums_in_place(g, y, c, plane, |gp, yp| {
            // SAFETY: AVX-512F is present.
            unsafe { x86::window_and_sum(gp, yp, upper) }
        });
    }
    plane_sums_in_place(g, y, c, plane, |gp, yp| map_and_sum(gp, yp, &window))
}

/// `plane_sum(g_plane, y_plane)` (which may rewrite its gradient plane) over every plane,
/// each sample in parallel when large, the channels' sums added in sample order.
fn plane_sums_in_place(
    g: &mut [f32],
    y: &[f32],
    c: usize,
    plane: usize,
    plane_sum: impl Fn(&mut [f32], &[f32]) -> f32 + Sync,
) -> Vec<f32> {
    let sample = c * plane;
    let mut sums = vec![0f32; c];
    if sample == 0 {
        return sums;
    }
    let per_sample = |(gs, ys): (&mut [f32], &[f32])| -> Vec<f32> {
        gs.chunks_exact_mut(plane)
            .zip(ys.chunks_exact(plane))
            .map(|(gp, yp)| plane_sum(gp, yp))
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`map_and_sum`](super::map_and_sum) with the window mask `0 < y < upper`: the same
    /// 16 lanes (one vector), summed in the same order, then the tail one value at a time.
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn window_and_sum(g: &mut [f32], y: &[f32], upper: f32) -> f32 {
        let len = g.len().min(y.len());
        let full = len / 16 * 16;
        let (zero, top) = (_mm512_setzero_ps(), _mm512_set1_ps(upper));
        let mut acc = _mm512_setzero_ps();
        for i in (0..full).step_by(16) {
            // SAFETY: values i..i + 16 lie within both planes (i + 16 <= full <= len).
            unsafe {
                let yv = _mm512_loadu_ps(y.as_ptr().add(i));
                let pass = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(yv, zero)
                    & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(yv, top);
                let d = _mm512_maskz_loadu_ps(pass, g.as_ptr().add(i));
                _mm512_storeu_ps(g.as_mut_ptr().add(i), d);
                acc = _mm512_add_ps(acc, d);
            }
        }
        let mut lanes = [0f32; 16];
        // SAFETY: `lanes` holds 16 values.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc) };
        let mut rest = 0f32;
        for (d, &v) in g[full..len].iter_mut().zip(&y[full..len]) {
            *d = if v > 0.0 && v < upper { *d } else { 0.0 };
            rest += *d;
        }
        lanes.iter().sum::<f32>() + rest
    }
}

/// The sum of `v` in 16 f32 lanes.
///
/// Why lanes: a running sum is a chain of dependent additions, one value per addition's
/// latency, which the compiler may not reorder into vectors; the bias gradients' channel sums
/// written that way were 8% of a SqueezeNet 1.1 training step (all its convolutions have a
/// bias).
#[inline]
fn lane_sum(v: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            lanes[i] += c[i];
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `g[i] = f(g[i], y[i])` over a plane, and the sum of the new values in 16 f32 lanes (as
/// [`lane_sum`]).
#[inline]
fn map_and_sum(g: &mut [f32], y: &[f32], f: &impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut gc = g.chunks_exact_mut(16);
    let mut yc = y.chunks_exact(16);
    for (gs, ys) in (&mut gc).zip(&mut yc) {
        for i in 0..16 {
            gs[i] = f(gs[i], ys[i]);
            lanes[i] += gs[i];
        }
    }
    let mut rest = 0f32;
    for (d, &v) in gc.into_remainder().iter_mut().zip(yc.remainder()) {
        *d = f(*d, v);
        rest += *d;
    }
    lanes.iter().sum::<f32>() + rest
}

fn add_in_order(sums: &mut [f32], parts: Vec<Vec<f32>>) {
    for part in parts {
        for (s, v) in sums.iter_mut().zip(part) {
            *s += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        PAR_MIN, channel_sums, gather, map, masked_channel_sums, window_channel_sums, zip_new,
    };

    /// Written once, on the serial path and the parallel one.
    #[test]
    fn zip_new_and_map_write_every_value() {
        for len in [0, 5, PAR_MIN - 1, 3 * PAR_MIN + 7] {
            let a: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let b: Vec<f32> = (0..len).map(|i| (i % 7) as f32).collect();
            let sum = zip_new(&a, &b, |u, v| u + v);
            assert_eq!(sum.len(), len);
            assert!(
                sum.iter().enumerate().all(|(i, &s)| s == a[i] + b[i]),
                "{len}"
            );
            let halves = map(&a, |u| u * 0.5);
            assert!(halves.iter().zip(&a).all(|(h, u)| *h == u * 0.5), "{len}");
        }
    }

    /// The lane sums against f64 sums, on planes with and without a partial vector, on the
    /// serial path and the parallel one; the masked version also rewrites the gradient.
    #[test]
    fn channel_sums_match_f64_sums() {
        for (n, c, plane) in [(2, 3, 49), (3, 5, 16), (4, 2, 7), (64, 8, 81)] {
            let g: Vec<f32> = (0..n * c * plane)
                .map(|i| ((i * 7919 % 1013) as f32 - 500.0) / 97.0)
                .collect();
            let y: Vec<f32> = (0..g.len()).map(|i| (i % 5) as f32 - 2.0).collect();
            let mask = |d: f32, v: f32| if v > 0.0 { d } else { 0.0 };
            let expected = |g: &[f32], masked: bool| -> Vec<f64> {
                (0..c)
                    .map(|ch| {
                        (0..n)
                            .flat_map(|s| (0..plane).map(move |i| (s * c + ch) * plane + i))
                            .map(|i| if masked { mask(g[i], y[i]) } else { g[i] } as f64)
                            .sum()
                    })
                    .collect()
            };
            let close = |got: &[f32], want: &[f64]| {
                for (a, b) in got.iter().zip(want) {
                    assert!(
                        (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{a} vs {b}"
                    );
                }
            };
            close(&channel_sums(&g, c, plane), &expected(&g, false));
            let mut masked = g.clone();
            let sums = masked_channel_sums(&mut masked, &y, mask, c, plane);
            close(&sums, &expected(&g, true));
            let rewritten: Vec<f32> = g.iter().zip(&y).map(|(&d, &v)| mask(d, v)).collect();
            assert_eq!(masked, rewritten, "{n}x{c}x{plane}");
        }
    }

    /// The ReLU and ReLU6 window masks give the generic loop's sums and gradient bit for
    /// bit (NaN, 0 and 6 outputs included), on plane sizes with and without a tail.
    #[test]
    fn window_sums_match_the_generic_loop() {
        for (n, c, plane) in [(2, 3, 1), (3, 2, 16), (2, 5, 37), (4, 3, 121)] {
            let len = n * c * plane;
            let g: Vec<f32> = (0..len)
                .map(|i| ((i * 37) % 101) as f32 / 7.0 - 5.0)
                .collect();
            let mut y: Vec<f32> = (0..len)
                .map(|i| ((i * 53) % 89) as f32 / 6.0 - 2.0)
                .collect();
            y[0] = f32::NAN;
            y[len / 2] = 6.0;
            y[len - 1] = 0.0;
            for upper in [f32::INFINITY, 6.0] {
                let f = |d: f32, v: f32| if v > 0.0 && v < upper { d } else { 0.0 };
                let (mut a, mut b) = (g.clone(), g.clone());
                let want = masked_channel_sums(&mut a, &y, f, c, plane);
                let got = window_channel_sums(&mut b, &y, upper, c, plane);
                assert_eq!(got, want, "{n}x{c}x{plane} upper {upper}");
                assert_eq!(a, b, "{n}x{c}x{plane} upper {upper}");
            }
        }
    }

    /// Each sample's part is its pieces in order, on the serial path and the parallel one.
    #[test]
    fn gather_concatenates_each_samples_pieces() {
        for n in [1, 3, 2 * PAR_MIN / 7 + 1] {
            let (a_len, b_len) = (3, 4);
            let a: Vec<f32> = (0..n * a_len).map(|i| i as f32).collect();
            let b: Vec<f32> = (0..n * b_len).map(|i| -(i as f32)).collect();
            let y = gather(n, a_len + b_len, |s| {
                [
                    &b[s * b_len..(s + 1) * b_len],
                    &a[s * a_len..(s + 1) * a_len],
                ]
                .into_iter()
            });
            let expected: Vec<f32> = (0..n)
                .flat_map(|s| {
                    b[s * b_len..(s + 1) * b_len]
                        .iter()
                        .chain(&a[s * a_len..(s + 1) * a_len])
                        .copied()
                })
                .collect();
            assert_eq!(y, expected, "batch {n}");
        }
        assert!(gather(4, 0, |_| std::iter::empty()).is_empty());
    }

    /// Pieces that leave part of a sample unwritten never hand out the buffer.
    #[test]
    #[should_panic(expected = "pieces fill 2 values")]
    fn gather_refuses_pieces_short_of_a_sample() {
        let x = [1.0f32, 2.0];
        gather(1, 3, |_| std::iter::once(&x[..]));
    }

    #[test]
    #[should_panic(expected = "exceed")]
    fn gather_refuses_pieces_beyond_a_sample() {
        let x = [1.0f32, 2.0, 3.0];
        gather(1, 2, |_| std::iter::once(&x[..]));
    }
}
