//! Depthwise convolution with channels last (NHWC), for the eval executor's channels-last
//! plans: every tap is a vector operation across 16 channels, whatever the plane's size.
//!
//! Why: the NCHW paths (`depthwise.rs`) vectorise along a plane's rows, and the small planes
//! of the last stages fill few lanes (a 6x6 plane's rows fill 6 of 16; MobileNet V2's 6x6
//! depthwise convs ran at 4-17 GMAC/s at 96x96 inputs). Here, per output row and block of
//! 16 channels, four output pixels at a time sum their taps in four registers, each tap's
//! weights loaded once for the four; pixels whose window meets the padding (the row's
//! edges, the first and last rows) sum only their valid taps. Each output sums its taps in
//! the order ky, then kx, from zero, as the NCHW narrow path does.

use super::conv::ConvGeom;
use super::conv_channels_last::output_rows;
use super::depthwise::{Taps, narrow_taps, supports};
use super::simd::{Madd, simd_dispatch};

/// Depthwise convolution of `g.n` samples stored channels last: `x` holds each pixel's
/// `g.c_in` values side by side, `ft` the filters as (k k) x C (`depthwise::taps_major`);
/// output pixel `r` (counted over the samples) goes to `y[r * ldc..r * ldc + C]` (`ldc` > C
/// when the output is part of a concatenation). `post(first, values)` runs on each output
/// row right after it is computed: `values` starts at pixel `first` and spans the row's
/// `wo` pixels (`ldc` apart). With `threads` > 1 (batch 1) the output rows are shared out
/// over the spinning team.
pub(crate) fn forward(
    g: &ConvGeom,
    x: &[f32],
    ft: &[f32],
    y: &mut [f32],
    ldc: usize,
    threads: usize,
    post: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    assert!(supports(g), "depthwise: unsupported geometry");
    let (c, plane_in) = (g.c_in, g.h * g.w);
    assert!(
        ldc >= c && ft.len() == g.k * g.k * c,
        "depthwise: weight size"
    );
    assert!(x.len() == g.n * plane_in * c, "depthwise: input size");
    let (rows, cols) = (narrow_taps(g.ho, g.h, g), narrow_taps(g.wo, g.w, g));
    let row_of = |s: usize, oy: usize, out: &mut [f32]| {
        let xs = &x[s * plane_in * c..(s + 1) * plane_in * c];
        row(g, &rows[oy], &cols, ft, xs, out, ldc);
    };
    output_rows(g, (y, ldc), threads, &row_of, post);
}

/// One output row: the AVX-512 kernel where the CPU has it, else the generic loop.
fn row(
    g: &ConvGeom,
    row_taps: &(std::ops::Range<usize>, usize),
    cols: &Taps,
    ft: &[f32],
    x: &[f32],
    out: &mut [f32],
    ldc: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 {
        // SAFETY: AVX-512F is present; the bounds are those `forward` checked (the taps
        // come from `narrow_taps`, within the input; outputs within the row).
        return unsafe { x86::row(g, row_taps, cols, ft, x, out, ldc) };
    }
    generic_row(g, row_taps, cols, ft, x, out, ldc);
}

/// The loop for CPUs without AVX-512 (the executor only runs channels last with our
/// AVX-512 GEMM, so only the tests reach it there). One output row of one sample, channels last: `x` holds the sample's H x W pixels of C
/// values, `ft` the filters as (k k) x C, `(kys, iy)` the row's taps ([`narrow_taps`]); output
/// pixel `ox` goes to `out[ox * ldc..ox * ldc + C]`. Each output sums its valid taps in the
/// order ky, then kx, from zero, 16 channels at a time in registers.
#[inline(always)]
fn row_channels_last<M: Madd>(
    g: &ConvGeom,
    (kys, iy): &(std::ops::Range<usize>, usize),
    cols: &Taps,
    ft: &[f32],
    x: &[f32],
    out: &mut [f32],
    ldc: usize,
) {
    const V: usize = 16;
    let c = g.c_in;
    for (ox, (kxs, ix)) in cols.iter().enumerate() {
        let acc_row = &mut out[ox * ldc..ox * ldc + c];
        let mut c0 = 0;
        while c0 < c {
            let width = V.min(c - c0);
            let mut acc = [0f32; V];
            for (dy, ky) in kys.clone().enumerate() {
                let line = &x[(iy + dy) * g.w * c..];
                for (dx, kx) in kxs.clone().enumerate() {
                    let f = &ft[(ky * g.k + kx) * c + c0..][..width];
                    let v = &line[(ix + dx) * c + c0..][..width];
                    if width == V {
                        for j in 0..V {
                            acc[j] = M::madd(f[j], v[j], acc[j]);
                        }
                    } else {
                        for j in 0..width {
                            acc[j] = M::madd(f[j], v[j], acc[j]);
                        }
                    }
                }
            }
            acc_row[c0..c0 + width].copy_from_slice(&acc[..width]);
            c0 += width;
        }
    }
}

#[inline(always)]
fn generic_row_body<M: Madd>(
    g: &ConvGeom,
    row_taps: &(std::ops::Range<usize>, usize),
    cols: &Taps,
    ft: &[f32],
    x: &[f32],
    out: &mut [f32],
    ldc: usize,
) {
    row_channels_last::<M>(g, row_taps, cols, ft, x, out, ldc);
}

simd_dispatch!(fn generic_row(g: &ConvGeom, row_taps: &(std::ops::Range<usize>, usize), cols: &Taps, ft: &[f32], x: &[f32], out: &mut [f32], ldc: usize) => generic_row_body);

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ConvGeom, Taps};
    use crate::kernels::simd::first_lanes;
    use std::arch::x86_64::*;

    /// Pixels per step of the interior loop (one accumulator each).
    const PIXELS: usize = 4;

    /// Pixels per step of the interior loop for the common kernels ([`interior`]).
    const WIDE: usize = 8;

    /// [`WIDE`] output pixels from input column `ix` (their windows inside the row) of one
    /// block of 16 channels (`mask`), for a `K` x `K` kernel at stride `S`: constants, so that
    /// the loops unroll, the sums stay in eight registers, and each input vector that
    /// neighbouring pixels share is loaded once per window row ((WIDE - 1) S + K loads for
    /// WIDE K multiply-adds, against one load per multiply-add with four pixels and the
    /// kernel's size at run time). Returns the sums.
    ///
    /// # Safety
    /// AVX-512F; the window rows `kys` from input row `iy` and the columns lie within `x`,
    /// the taps within `fp`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn interior<const K: usize, const S: usize>(
        (xp, fp): (*const f32, *const f32),
        (kys, iy): (&std::ops::Range<usize>, usize),
        (ix, w, c, c0): (usize, usize, usize, usize),
        mask: __mmask16,
    ) -> [__m512; WIDE] {
        let mut acc = [_mm512_setzero_ps(); WIDE];
        // The widest window row: (WIDE - 1) S + K values (19 at K = 5, S = 2).
        let mut xin = [_mm512_setzero_ps(); 3 * WIDE];
        for (dy, ky) in kys.clone().enumerate() {
            let base = ((iy + dy) * w + ix) * c + c0;
            for (q, v) in xin.iter_mut().enumerate().take((WIDE - 1) * S + K) {
                // SAFETY: within the row, as the caller guarantees.
                *v = unsafe { _mm512_maskz_loadu_ps(mask, xp.add(base + q * c)) };
            }
            for kx in 0..K {
                let f = unsafe { _mm512_maskz_loadu_ps(mask, fp.add((ky * K + kx) * c + c0)) };
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(f, xin[j * S + kx], *a);
                }
            }
        }
        acc
    }

    /// Channel blocks of one pixel summed side by side in [`pixel`].
    const BLOCKS: usize = 4;

    /// One output pixel `ox` (a window that meets the padding, or a row too short for the
    /// multi-pixel steps), all its channels: [`BLOCKS`] blocks of 16 channels at a time in
    /// as many registers, each summing its valid taps in the order ky, then kx. Why: one
    /// block at a time chained each tap's multiply-add on the one before (four cycles
    /// each), and the small planes of the last stages are all edges (MobileNet V1 0.5's
    /// 4x4 x 256 depthwise layers at 32x32 inputs: 6.8 us a call at batch 1).
    ///
    /// # Safety
    /// AVX-512F; the taps lie within the sample `xp`, the filters `fp` hold (k k) x C values,
    /// and `op` the row's outputs (`ldc` apart).
    #[target_feature(enable = "avx512f")]
    unsafe fn pixel(
        (xp, fp, op): (*const f32, *const f32, *mut f32),
        (kys, iy): (&std::ops::Range<usize>, usize),
        (kxs, ix): (&std::ops::Range<usize>, usize),
        (g, ox, ldc): (&ConvGeom, usize, usize),
    ) {
        let (c, k) = (g.c_in, g.k);
        for c0 in (0..c).step_by(16 * BLOCKS) {
            // Blocks past the last channel have no lanes: their loads read nothing.
            let masks: [__mmask16; BLOCKS] =
                std::array::from_fn(|b| first_lanes(c.saturating_sub(c0 + 16 * b)));
            let mut acc = [_mm512_setzero_ps(); BLOCKS];
            for (dy, ky) in kys.clone().enumerate() {
                let line = (iy + dy) * g.w * c;
                for (dx, kx) in kxs.clone().enumerate() {
                    let (at, tap) = (line + (ix + dx) * c + c0, (ky * k + kx) * c + c0);
                    for (b, a) in acc.iter_mut().enumerate() {
                        // SAFETY: the caller's bounds; masked lanes are not read.
                        unsafe {
                            // (`wrapping_add`: a block without lanes may point past the end.)
                            let f = _mm512_maskz_loadu_ps(masks[b], fp.wrapping_add(tap + 16 * b));
                            let v = _mm512_maskz_loadu_ps(masks[b], xp.wrapping_add(at + 16 * b));
                            *a = _mm512_fmadd_ps(f, v, *a);
                        }
                    }
                }
            }
            for (b, a) in acc.into_iter().enumerate() {
                let at = op.wrapping_add(ox * ldc + c0 + 16 * b);
                unsafe { _mm512_mask_storeu_ps(at, masks[b], a) };
            }
        }
    }

    /// See [`super::row`].
    ///
    /// # Safety
    /// AVX-512F; `x` holds the sample, `ft` the (k k) x C filters, `out` the row's pixels
    /// (`ldc` apart), and the taps lie within the input.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row(
        g: &ConvGeom,
        (kys, iy): &(std::ops::Range<usize>, usize),
        cols: &Taps,
        ft: &[f32],
        x: &[f32],
        out: &mut [f32],
        ldc: usize,
    ) {
        let (c, k, wo) = (g.c_in, g.k, g.wo);
        let (xp, fp, op) = (x.as_ptr(), ft.as_ptr(), out.as_mut_ptr());
        let line = |dy: usize| (iy + dy) * g.w * c;
        let constant = matches!((k, g.stride), (3, 1) | (3, 2) | (5, 1) | (5, 2));
        // Blocks of pixels along the row, each for all its channels before the next: a pass
        // along the row per block of 16 channels read the input a cache line per pixel, far
        // apart (MobileNet V2's 56x56 x 144 ran at half onnxruntime's speed).
        let mut ox = 0;
        while ox < wo {
            let (kxs, ix) = &cols[ox];
            let inside = |pixels: usize| {
                ox + pixels <= wo && cols[ox..ox + pixels].iter().all(|(t, _)| *t == (0..k))
            };
            let step = if constant && inside(WIDE) {
                WIDE
            } else if inside(PIXELS) {
                PIXELS
            } else {
                1
            };
            if step == 1 {
                // SAFETY: as below (one pixel, its valid taps).
                unsafe { pixel((xp, fp, op), (kys, *iy), (kxs, *ix), (g, ox, ldc)) };
                ox += 1;
                continue;
            }
            for c0 in (0..c).step_by(16) {
                let mask = first_lanes(c - c0);
                // SAFETY (all pointer arithmetic here): within the checked buffers, as the
                // caller guarantees; the windows of `step` > 1 pixels lie inside the row.
                unsafe {
                    if step == WIDE {
                        let at = (*ix, g.w, c, c0);
                        let rows = (kys, *iy);
                        let acc = match (k, g.stride) {
                            (3, 1) => interior::<3, 1>((xp, fp), rows, at, mask),
                            (3, 2) => interior::<3, 2>((xp, fp), rows, at, mask),
                            (5, 1) => interior::<5, 1>((xp, fp), rows, at, mask),
                            (5, 2) => interior::<5, 2>((xp, fp), rows, at, mask),
                            _ => unreachable!("`constant` picks these kernels only"),
                        };
                        for (j, a) in acc.into_iter().enumerate() {
                            _mm512_mask_storeu_ps(op.add((ox + j) * ldc + c0), mask, a);
                        }
                    } else if step == PIXELS {
                        // Four pixels whose windows lie inside the row (stride apart).
                        let mut acc = [_mm512_setzero_ps(); PIXELS];
                        for (dy, ky) in kys.clone().enumerate() {
                            let base = line(dy) + ix * c + c0;
                            for kx in 0..k {
                                let f = _mm512_maskz_loadu_ps(mask, fp.add((ky * k + kx) * c + c0));
                                for (j, a) in acc.iter_mut().enumerate() {
                                    let at = base + (j * g.stride + kx) * c;
                                    let v = _mm512_maskz_loadu_ps(mask, xp.add(at));
                                    *a = _mm512_fmadd_ps(f, v, *a);
                                }
                            }
                        }
                        for (j, a) in acc.into_iter().enumerate() {
                            _mm512_mask_storeu_ps(op.add((ox + j) * ldc + c0), mask, a);
                        }
                    }
                }
            }
            ox += step;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the NCHW depthwise path (itself tested against a reference), on widths that
    /// exercise the four-pixel steps, their edges, channel tails and strides.
    #[test]
    fn matches_the_planes_path() {
        let cases = [
            // (n, c, h, w, k, stride, pad)
            (2, 16, 6, 6, 3, 1, 1),
            (1, 40, 13, 11, 3, 2, 1),
            (3, 7, 9, 9, 5, 1, 2),
            (1, 72, 4, 4, 3, 1, 1),
            (2, 33, 17, 19, 3, 2, 1),
            (1, 24, 1, 1, 3, 1, 1),
            (1, 20, 8, 8, 1, 1, 0),
            (1, 18, 12, 10, 5, 2, 2),
            // Rows wide enough for the eight-pixel steps of each constant kernel.
            (1, 24, 5, 21, 3, 1, 1),
            (2, 20, 6, 23, 5, 1, 2),
            (1, 17, 7, 40, 5, 2, 2),
            (1, 35, 4, 37, 3, 2, 1),
        ];
        for (n, c, h, w, k, stride, pad) in cases {
            let g = ConvGeom::new(&[n, c, h, w], &[c, 1, k, k], stride, pad, 1, c).unwrap();
            let x: Vec<f32> = (0..n * c * h * w)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let wv: Vec<f32> = (0..c * k * k)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 40.0)
                .collect();
            let p = g.ho * g.wo;
            let mut want = vec![0f32; n * c * p];
            super::super::depthwise::forward_into(&g, &x, &wv, &mut want, false, &|_, _| {});
            let mut xl = vec![0f32; x.len()];
            for s in 0..n {
                for ch in 0..c {
                    for q in 0..h * w {
                        xl[(s * h * w + q) * c + ch] = x[(s * c + ch) * h * w + q];
                    }
                }
            }
            let ft = super::super::depthwise::taps_major(&wv, c, k * k);
            let ldc = c + 3;
            let mut y = vec![f32::NAN; n * p * ldc];
            for threads in [1, 2] {
                let rows = std::sync::atomic::AtomicUsize::new(0);
                forward(&g, &xl, &ft, &mut y, ldc, threads, &|first, vals| {
                    assert_eq!(first % g.wo, 0);
                    assert_eq!(vals.len(), (g.wo - 1) * ldc + c);
                    rows.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                });
                assert_eq!(rows.into_inner(), n * g.ho);
                for s in 0..n {
                    for ch in 0..c {
                        for q in 0..p {
                            let got = y[(s * p + q) * ldc + ch];
                            let exp = want[(s * c + ch) * p + q];
                            assert!(
                                (got - exp).abs() <= 1e-5 * (1.0 + exp.abs()),
                                "case {:?}: {got} vs {exp}",
                                (n, c, h, w, k, stride, pad)
                            );
                        }
                    }
                }
            }
        }
    }
}
