//! The stem convolution of a channels-last plan: a dense k x k convolution of the network's
//! input (a few channels, NCHW as the caller gives it) with the output written channels last.
//!
//! Why: with 3 input channels a convolution's product is 27 deep; as a channels-last im2col
//! product (pixels x 27, times 27 x C_out) the copies cost as much as the products, and as
//! an NCHW implicit GEMM the 16 output channels of MobileNet V3's or V1's stem fill one 12-row
//! register tile and a third of another. Here each step computes 8 output pixels of up to
//! 32 channels in 16 registers: per input value, one broadcast per pixel and one fused
//! multiply-add per pixel and vector, the two weight vectors loaded once for the 8 pixels.
//! The input is read as NCHW (through a zero-padded copy of each sample's few planes, so
//! that no tap needs a bounds check): it needs no transposition to channels last.

use super::conv::ConvGeom;
use super::conv_channels_last::{output_rows, pad_planes};
use super::scratch::with_scratch;

/// Whether `g` runs here: a dense convolution of at most [`MAX_CHANNELS`] input channels,
/// dilation 1, on a CPU with AVX-512.
pub(crate) fn supports(g: &ConvGeom) -> bool {
    g.groups == 1 && g.dil == 1 && g.c_in <= MAX_CHANNELS && super::sgemm::available()
}

/// Input channels up to which a convolution counts as a stem (an image's 1, 3 or 4).
const MAX_CHANNELS: usize = 4;

/// The weights (C_out x C_in x k x k) as rows of C_out values, row `(ci k + ky) k + kx`.
pub(crate) fn weights(g: &ConvGeom, w: &[f32], wt: &mut Vec<f32>) {
    wt.resize(w.len(), 0.0);
    super::transpose::transpose(w, (g.c_out, g.c_in * g.k * g.k), wt);
}

/// The convolution `g` of `x` (NCHW) with `wt` from [`weights`]; output pixel `r` (counted
/// over the samples) goes to `y[r * ldc..r * ldc + C_out]`. `post(first, values)` runs on
/// each output row right after it is computed (`values` from pixel `first`, the row's `wo`
/// pixels `ldc` apart). With `threads` > 1 the rows are shared out over the team.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    g: &ConvGeom,
    x: &[f32],
    wt: &[f32],
    y: &mut [f32],
    ldc: usize,
    threads: usize,
    post: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    assert!(supports(g), "stem: unsupported geometry");
    let (hp, wp) = (g.h + 2 * g.pad, g.w + 2 * g.pad);
    assert!(x.len() == g.n * g.c_in * g.h * g.w, "stem: input size");
    assert!(
        wt.len() == g.c_in * g.k * g.k * g.c_out,
        "stem: weight size"
    );
    // Zero-padded copies of the samples (in this thread's scratch buffer: a fresh one would
    // be page-faulted in on every call): the kernel reads every tap without a bounds check.
    with_scratch(g.n * g.c_in * hp * wp, |padded| {
        // The padded rows shared out over the team, as the output rows are (the copy on one
        // thread was a quarter of MobileNet V3 small's stem at batch 1).
        pad_planes(x, (g.h, g.w), (g.pad, g.pad), padded, threads);
        let padded = &*padded;
        let row = |s: usize, oy: usize, row: &mut [f32]| {
            let xs = &padded[s * g.c_in * hp * wp..(s + 1) * g.c_in * hp * wp];
            // SAFETY: AVX-512F is present (`supports`); `xs` is the padded sample, `wt` the
            // checked weights, `row` the output row (`output_rows`).
            unsafe { x86::row(g, (hp, wp), xs, oy, wt, row, ldc) };
        };
        output_rows(g, (y, ldc), threads, &row, post);
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::ConvGeom;
    use crate::kernels::simd::first_lanes;
    use std::arch::x86_64::*;

    /// Output pixels per step.
    const P: usize = 8;

    /// Output row `oy` of one sample: `xs` its zero-padded planes (`hp x wp` each).
    ///
    /// # Safety
    /// AVX-512F; `xs` holds C_in padded planes, `wt` the (C_in k k) x C_out weights, `out`
    /// the row's `wo` pixels `ldc` apart.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row(
        g: &ConvGeom,
        (hp, wp): (usize, usize),
        xs: &[f32],
        oy: usize,
        wt: &[f32],
        out: &mut [f32],
        ldc: usize,
    ) {
        let (xp, wtp, op) = (xs.as_ptr(), wt.as_ptr(), out.as_mut_ptr());
        let mut c0 = 0;
        while c0 < g.c_out {
            let left = g.c_out - c0;
            let masks = (first_lanes(left), first_lanes(left.saturating_sub(16)));
            let mut ox = 0;
            while ox < g.wo {
                // A row's last pixels, fewer than P, as the last P pixels of the row: those
                // computed twice get the same values (the epilogue runs after the row). One
                // pixel at a time, their sums were chains of dependent multiply-adds
                // (SqueezeNet's 47-wide stem rows: 7 of 47 pixels, 40% of the time).
                let (from, pixels) = match g.wo - ox {
                    left if left >= P => (ox, P),
                    _ if g.wo >= P => (g.wo - P, P),
                    _ => (ox, 1),
                };
                let at = Block {
                    oy,
                    ox: from,
                    c0,
                    masks,
                };
                // SAFETY: as for this function; `from + pixels <= wo`.
                unsafe {
                    match (pixels == P, left > 16) {
                        (true, true) => strided::<P, 2>(g, (hp, wp), xp, wtp, op, ldc, at),
                        (true, false) => strided::<P, 1>(g, (hp, wp), xp, wtp, op, ldc, at),
                        (false, true) => strided::<1, 2>(g, (hp, wp), xp, wtp, op, ldc, at),
                        (false, false) => strided::<1, 1>(g, (hp, wp), xp, wtp, op, ldc, at),
                    }
                }
                ox = from + pixels;
            }
            c0 += 32;
        }
    }

    /// Where a block of output starts, and its channels' masks (first and second vector).
    #[derive(Clone, Copy)]
    struct Block {
        oy: usize,
        ox: usize,
        c0: usize,
        masks: (__mmask16, __mmask16),
    }

    /// [`block`] with the stride a constant where it is 1 or 2: each pixel's input value is
    /// then at a constant offset from the window row's pointer, where a stride known only at
    /// run time made the compiler step from pixel to pixel, a chain of dependent address
    /// additions per tap as long as the tap's multiply-adds (MobileNet V2's stem, 224x224 at
    /// stride 2: 30-33 GMAC/s on one core; with the stride a constant, 4-15% faster in
    /// alternating probes).
    ///
    /// # Safety
    /// As [`block`].
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn strided<const PX: usize, const V: usize>(
        g: &ConvGeom,
        planes: (usize, usize),
        xp: *const f32,
        wtp: *const f32,
        op: *mut f32,
        ldc: usize,
        at: Block,
    ) {
        // SAFETY: the caller's.
        unsafe {
            match g.stride {
                1 => block::<PX, V, 1>(g, planes, xp, wtp, op, ldc, at),
                2 => block::<PX, V, 2>(g, planes, xp, wtp, op, ldc, at),
                _ => block::<PX, V, 0>(g, planes, xp, wtp, op, ldc, at),
            }
        }
    }

    /// `PX` output pixels from `(oy, ox)` by `V` vectors of channels from `c0`, in
    /// `PX x V` registers (constant sizes, so the loops unroll and the sums stay there), at
    /// stride `S` (0: `g.stride`, known at run time).
    ///
    /// # Safety
    /// As [`row`], and `ox + PX <= wo`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block<const PX: usize, const V: usize, const S: usize>(
        g: &ConvGeom,
        (hp, wp): (usize, usize),
        xp: *const f32,
        wtp: *const f32,
        op: *mut f32,
        ldc: usize,
        Block { oy, ox, c0, masks }: Block,
    ) {
        let (k, s, c_out) = (g.k, if S > 0 { S } else { g.stride }, g.c_out);
        let mut acc = [[_mm512_setzero_ps(); V]; PX];
        for ci in 0..g.c_in {
            for ky in 0..k {
                // SAFETY (pointer arithmetic): within the padded planes and the weights, as
                // the caller guarantees.
                let line = unsafe { xp.add((ci * hp + oy * s + ky) * wp + ox * s) };
                for kx in 0..k {
                    let w = unsafe { wtp.add(((ci * k + ky) * k + kx) * c_out + c0) };
                    let mut wv = [_mm512_setzero_ps(); V];
                    for (v, vec) in wv.iter_mut().enumerate() {
                        let mask = if v == 0 { masks.0 } else { masks.1 };
                        *vec = unsafe { _mm512_maskz_loadu_ps(mask, w.add(16 * v)) };
                    }
                    for (j, a) in acc.iter_mut().enumerate() {
                        let x = _mm512_set1_ps(unsafe { *line.add(j * s + kx) });
                        for v in 0..V {
                            a[v] = _mm512_fmadd_ps(x, wv[v], a[v]);
                        }
                    }
                }
            }
        }
        for (j, a) in acc.iter().enumerate() {
            let at = unsafe { op.add((ox + j) * ldc + c0) };
            for (v, &val) in a.iter().enumerate() {
                let mask = if v == 0 { masks.0 } else { masks.1 };
                unsafe { _mm512_mask_storeu_ps(at.add(16 * v), mask, val) };
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::ConvGeom;

    pub(super) unsafe fn row(
        _: &ConvGeom,
        _: (usize, usize),
        _: &[f32],
        _: usize,
        _: &[f32],
        _: &mut [f32],
        _: usize,
    ) {
        unreachable!("supports() is false off x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_nchw_convolution() {
        if !super::super::sgemm::available() {
            eprintln!("skipped: the stem kernel needs AVX-512");
            return;
        }
        // (n, c_in, h, w, c_out, k, stride, pad)
        let cases = [
            (2, 3, 17, 19, 16, 3, 2, 1),
            (1, 3, 12, 12, 32, 3, 1, 1),
            (3, 1, 9, 11, 24, 3, 2, 0),
            (1, 4, 10, 10, 64, 5, 2, 2),
            (1, 3, 8, 8, 40, 3, 1, 0),
            (2, 3, 7, 5, 9, 1, 1, 0),
            // A stride other than 1 and 2 (known only at run time), rows with a tail.
            (1, 3, 31, 29, 20, 3, 3, 1),
        ];
        for (n, c_in, h, w, c_out, k, stride, pad) in cases {
            let g =
                ConvGeom::new(&[n, c_in, h, w], &[c_out, c_in, k, k], stride, pad, 1, 1).unwrap();
            let x: Vec<f32> = (0..n * c_in * h * w)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let wv: Vec<f32> = (0..c_out * c_in * k * k)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 40.0)
                .collect();
            let p = g.ho * g.wo;
            let mut want = vec![0f32; n * c_out * p];
            super::super::conv_gemm::forward_into(&g, &x, &wv, &mut want, false, &|_, _, _| {});
            let mut wt = Vec::new();
            weights(&g, &wv, &mut wt);
            let ldc = c_out + 3;
            for threads in [1, 2] {
                let mut y = vec![f32::NAN; n * p * ldc];
                let rows = std::sync::atomic::AtomicUsize::new(0);
                forward(&g, &x, &wt, &mut y, ldc, threads, &|first, vals| {
                    assert_eq!(first % g.wo, 0);
                    assert_eq!(vals.len(), (g.wo - 1) * ldc + c_out);
                    rows.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                });
                assert_eq!(rows.into_inner(), n * g.ho);
                for s in 0..n {
                    for co in 0..c_out {
                        for q in 0..p {
                            let got = y[(s * p + q) * ldc + co];
                            let exp = want[(s * c_out + co) * p + q];
                            assert!(
                                (got - exp).abs() <= 1e-5 * (1.0 + exp.abs()),
                                "case {:?}: {got} vs {exp}",
                                (n, c_in, h, w, c_out, k, stride, pad)
                            );
                        }
                    }
                }
            }
        }
    }
}
