//! Winograd F(2x2, 3x3) convolutions, channels last: the eval executor's dense 3x3 stride-1
//! layers (SqueezeNet's expands), and through two transposes some of the train step's
//! ([`forward_nchw`]).
//!
//! Why: as products over im2col rows or implicit taps those layers ran at 85-95% of this
//! core's FMA rate and SqueezeNet 1.1 still trailed onnxruntime (0.91x-0.93x at 96x96 and
//! 224x224): the multiplications themselves were the cost. Winograd's minimal filtering
//! (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) computes a
//! 2x2 output tile from a 4x4 input tile with 16 multiplications per pair of input and
//! output channels instead of 36: the input tiles and the filters are transformed
//! (`V = Bt d B`, `U = G g Gt`), multiplied point by point, and the products transformed
//! back (`Y = At M A`). Summed over the input channels, the 16 point-by-point products are
//! 16 matrix products, `M_p[tiles x C_out] = V_p[tiles x C_in] U_p[C_in x C_out]`, which run
//! on our GEMM (`sgemm`), the filters transformed and packed once per engine ([`weights`]).
//!
//! The transforms add and subtract inputs before the products and outputs after, so the
//! results differ from the direct sums by rounding (well within the 1e-4 the fixtures hold
//! us to; the test bounds it against an f64 reference).
//!
//! Layout: a block of tiles is transformed into `V` as tile after tile, each tile's 16
//! points of C_in values (the products read point `p`'s rows 16 C_in apart), and the
//! products write `M` the same way with C_out values, so that each tile's transforms read
//! and write contiguous runs, vectorised across the channels.

use super::conv::ConvGeom;
use super::conv_channels_last::BlockEpilogue;
use super::cpu::SharedMut;
use super::scratch::with_scratch;
use super::transpose::transpose;
use super::{sgemm, team};
use std::ops::Range;

/// Points of a transformed tile (4 x 4).
const POINTS: usize = 16;

/// Values of `V` and `M` that a block of tiles should keep in L2 (1 MB).
const BLOCK_VALUES: usize = 1 << 18;

thread_local! {
    /// A team thread's `V` and `M` blocks at batch 1 ([`forward`]), or a rayon worker's in
    /// the train step ([`forward_nchw`]).
    static BLOCKS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Whether `g` runs here (on a CPU with AVX-512, as our GEMM): a dense 3x3 convolution of
/// stride 1 whose 2x2 tiles cover the output with at most 80% of the direct method's
/// multiplications (a 1x1 output, one tile of 16 for 9, does not), and with enough channels
/// to keep the products' 16-value rows full.
pub(crate) fn applies(g: &ConvGeom) -> bool {
    let tiles = g.ho.div_ceil(2) * g.wo.div_ceil(2);
    sgemm::available()
        && g.k == 3
        && g.stride == 1
        && g.dil == 1
        && g.groups == 1
        && g.c_in >= 8
        && g.c_out >= 16
        && tiles * POINTS * 5 <= g.ho * g.wo * 9 * 4
}

/// Values of the transformed, packed filters ([`weights`]).
pub(crate) fn weights_len(g: &ConvGeom) -> usize {
    POINTS * sgemm::panels_len(g.c_in, g.c_out)
}

/// The filters `w` (PyTorch's C_out x C_in x 3 x 3) transformed, `U = G g Gt` for each pair
/// of channels (computed in f64), as 16 matrices `U_p` of C_in rows and C_out columns, each
/// packed for our GEMM ([`sgemm::pack_panels`]), into `wt` (resized; old contents
/// overwritten).
pub(crate) fn weights(g: &ConvGeom, w: &[f32], wt: &mut Vec<f32>) {
    let (ci_n, co_n) = (g.c_in, g.c_out);
    assert_eq!(w.len(), co_n * ci_n * 9, "winograd: filter size");
    let mut u = vec![0f32; POINTS * ci_n * co_n];
    for co in 0..co_n {
        for ci in 0..ci_n {
            let f = &w[(co * ci_n + ci) * 9..][..9];
            for (p, value) in transform_filter(f).into_iter().enumerate() {
                u[(p * ci_n + ci) * co_n + co] = value as f32;
            }
        }
    }
    let packed = sgemm::panels_len(ci_n, co_n);
    wt.resize(POINTS * packed, 0.0);
    for (p, dst) in wt.chunks_exact_mut(packed).enumerate() {
        sgemm::pack_panels(&u[p * ci_n * co_n..], co_n, (ci_n, co_n), dst);
    }
}

/// `G f Gt` of one 3x3 filter (row-major), as 16 values row by row; `G` is
/// `[[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]`.
fn transform_filter(f: &[f32]) -> [f64; POINTS] {
    let g = |r: [f64; 3]| {
        [
            r[0],
            (r[0] + r[1] + r[2]) / 2.0,
            (r[0] - r[1] + r[2]) / 2.0,
            r[2],
        ]
    };
    // G f: each column of f transformed.
    let mut gf = [[0f64; 3]; 4];
    for c in 0..3 {
        let col = g([f[c] as f64, f[3 + c] as f64, f[6 + c] as f64]);
        for r in 0..4 {
            gf[r][c] = col[r];
        }
    }
    // (G f) Gt: each row transformed.
    let mut out = [0f64; POINTS];
    for r in 0..4 {
        out[r * 4..r * 4 + 4].copy_from_slice(&g(gf[r]));
    }
    out
}

/// The tiling of one convolution: 2x2 output tiles, `tw` across a row, `th` down a plane.
struct Tiling {
    h: usize,
    w: usize,
    pad: usize,
    c_in: usize,
    c_out: usize,
    ho: usize,
    wo: usize,
    th: usize,
    tw: usize,
}

impl Tiling {
    fn of(g: &ConvGeom) -> Self {
        Tiling {
            h: g.h,
            w: g.w,
            pad: g.pad,
            c_in: g.c_in,
            c_out: g.c_out,
            ho: g.ho,
            wo: g.wo,
            th: g.ho.div_ceil(2),
            tw: g.wo.div_ceil(2),
        }
    }

    /// The first output pixel (counted over the samples) of unit `u`: tile row `u % th` of
    /// sample `u / th`, output rows `2 (u % th)` and the one below (if any).
    fn first_pixel(&self, u: usize) -> usize {
        let (s, ty) = (u / self.th, u % self.th);
        (s * self.ho + 2 * ty) * self.wo
    }
}

/// The convolution `g` (see [`applies`]) of `g.n` samples stored channels last, as
/// `conv_channels_last::forward` (whose contract this keeps: output pixel `r` at `y[r *
/// ldc..]`, `post` on each block right after it is computed): `wt` from [`weights`],
/// `scratch` for the transformed blocks. With `threads` > 1 the tile rows are shared out
/// over the team.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    g: &ConvGeom,
    x: &[f32],
    wt: &[f32],
    y: &mut [f32],
    ldc: usize,
    scratch: &mut Vec<f32>,
    threads: usize,
    post: &BlockEpilogue<'_>,
) {
    assert!(applies(g), "winograd: convolution not supported here");
    let t = Tiling::of(g);
    let pixels = g.n * g.ho * g.wo;
    assert!(x.len() == g.n * g.h * g.w * g.c_in, "conv: input size");
    assert!(wt.len() == weights_len(g), "conv: weight size");
    assert!(ldc >= g.c_out && (pixels == 0 || y.len() >= (pixels - 1) * ldc + g.c_out));
    let units = g.n * t.th;
    let per_block = (BLOCK_VALUES / (POINTS * (g.c_in + g.c_out)) / t.tw).max(1);
    let out = SharedMut::new(y);
    let zeros = vec![0f32; g.c_in];
    let run = |units: Range<usize>, scratch: &mut Vec<f32>| {
        let mut u = units.start;
        while u < units.end {
            let block = u..(u + per_block).min(units.end);
            // The block's pixels (the unit past the last is the pixel past the last).
            let (first, end) = (t.first_pixel(block.start), t.first_pixel(block.end));
            // SAFETY: blocks are disjoint runs of output pixels (each task takes its own),
            // within `y` (checked above).
            let values = unsafe { out.part(first * ldc, (end - first - 1) * ldc + g.c_out) };
            run_block(&t, x, wt, block.clone(), &zeros, scratch, (values, ldc));
            post(first, end - first, 0..g.c_out, values);
            u = block.end;
        }
    };
    if threads > 1 && units > 1 {
        team::run_parts(units, threads, &|part| {
            let mut scratch = BLOCKS.with(|c| c.take());
            run(part, &mut scratch);
            BLOCKS.with(|c| c.replace(scratch));
        });
    } else {
        run(0..units, scratch);
    }
}

/// Whether [`forward_nchw`] is worth its two transposes for `g`: [`applies`], with 32 or
/// more input channels and output planes of 8x8 or more. Why: SqueezeNet 1.1's training
/// forward laps, alternating: its 3x3 expands of 32-64 input channels on 8x8 to 16x16
/// planes 40-45% faster, 11x11 planes 33%; but 5x5 planes (a third of the tiles' outputs
/// past the plane, and the NCHW products already batch several samples) 20-40% slower,
/// and 16 input channels (products of K = 16) 6% faster at 32x32, 20% slower at 23x23.
pub(crate) fn pays_in_nchw(g: &ConvGeom) -> bool {
    applies(g) && g.c_in >= 32 && g.ho.min(g.wo) >= 8
}

/// The convolution `g` (see [`applies`]; chosen by [`pays_in_nchw`]) of NCHW `x` into NCHW
/// `y` (every value overwritten), for the train step's forward: runs of samples in parallel
/// over the rayon pool, each transposed to channels last, run as [`forward`] on one thread,
/// and transposed back, then `post(sample, 0, planes)` on each sample's output planes (as
/// `conv_gemm::forward_into`'s epilogue). The filters are transformed once per call.
///
/// Why through channels last: the transforms vectorise across channels, and the two
/// transposes are a small share of the products they shorten (the 3x3 expands of
/// SqueezeNet's training step).
pub(crate) fn forward_nchw(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    post: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
) {
    use rayon::prelude::*;
    assert!(applies(g), "winograd: convolution not supported here");
    let (plane_in, plane_out) = (g.h * g.w, g.ho * g.wo);
    let (x_sample, y_sample) = (g.c_in * plane_in, g.c_out * plane_out);
    assert!(
        x.len() == g.n * x_sample && y.len() == g.n * y_sample,
        "conv: buffer sizes"
    );
    let mut wt = Vec::new();
    weights(g, w, &mut wt);
    // A few runs per thread, for balance.
    let run = g.n.div_ceil(4 * rayon::current_num_threads()).max(1);
    y.par_chunks_mut(run * y_sample)
        .zip(x.par_chunks(run * x_sample))
        .enumerate()
        .for_each(|(r, (ys, xs))| {
            let m = xs.len() / x_sample;
            let part = ConvGeom { n: m, ..*g };
            with_scratch(m * (x_sample + y_sample), |buf| {
                let (x_last, y_last) = buf.split_at_mut(m * x_sample);
                for (from, to) in xs
                    .chunks_exact(x_sample)
                    .zip(x_last.chunks_exact_mut(x_sample))
                {
                    transpose(from, (g.c_in, plane_in), to);
                }
                let mut scratch = BLOCKS.with(|c| c.take());
                let no_epilogue = |_: usize, _: usize, _: Range<usize>, _: &mut [f32]| {};
                forward(
                    &part,
                    x_last,
                    &wt,
                    y_last,
                    g.c_out,
                    &mut scratch,
                    1,
                    &no_epilogue,
                );
                BLOCKS.with(|c| c.replace(scratch));
                for (s, (from, to)) in y_last
                    .chunks_exact(y_sample)
                    .zip(ys.chunks_exact_mut(y_sample))
                    .enumerate()
                {
                    transpose(from, (plane_out, g.c_out), to);
                    post(r * run + s, 0, to);
                }
            });
        });
}

/// One block of tile rows `units`: input transforms into `V`, the 16 products into `M`, the
/// output transforms into `values` (the block's first output pixel at 0, `ldc` apart).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn run_block(
    t: &Tiling,
    x: &[f32],
    wt: &[f32],
    units: Range<usize>,
    zeros: &[f32],
    scratch: &mut Vec<f32>,
    (values, ldc): (&mut [f32], usize),
) {
    let tiles = units.len() * t.tw;
    let (v_len, m_len) = (tiles * POINTS * t.c_in, tiles * POINTS * t.c_out);
    // Grown only (the other convolutions shrink and regrow the same buffer, and each
    // regrowth zero-filled it): every value used is written before it is read.
    if scratch.len() < v_len + m_len {
        scratch.resize(v_len + m_len, 0.0);
    }
    let (v, m) = scratch[..v_len + m_len].split_at_mut(v_len);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `forward` checked that the CPU has AVX-512F (`applies`).
    unsafe {
        x86::transform_inputs(t, x, units.clone(), zeros, v)
    };
    let packed = sgemm::panels_len(t.c_in, t.c_out);
    for p in 0..POINTS {
        sgemm::sgemm_rows(
            (tiles, t.c_out, t.c_in),
            &v[p * t.c_in..],
            (POINTS * t.c_in, 1),
            &wt[p * packed..(p + 1) * packed],
            sgemm::BRows::Panels,
            &mut m[p * t.c_out..],
            POINTS * t.c_out,
            false,
            1,
        );
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as above.
    unsafe {
        x86::transform_outputs(t, m, units, values, ldc)
    };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("winograd::applies is false without AVX-512");
}

/// A tile's four output pixels (top left, top right, bottom left, bottom right) as slices
/// of `c` values: top left is pixel `p` of `values` (`ldc` apart), the row below `wo`
/// pixels further; those past the plane's last column (`!right`) or row (`!below`) are
/// parts of `spare` (3 `c` values) instead.
fn tile_pixels<'a>(
    values: &'a mut [f32],
    p: usize,
    (right, below): (bool, bool),
    (wo, ldc, c): (usize, usize, usize),
    spare: &'a mut [f32],
) -> [&'a mut [f32]; 4] {
    let (s1, rest) = spare.split_at_mut(c);
    let (s2, s3) = rest.split_at_mut(c);
    let from = &mut values[p * ldc..];
    let (top, bottom) = if below {
        let (top, bottom) = from.split_at_mut(wo * ldc);
        (top, Some(bottom))
    } else {
        (from, None)
    };
    let pair = |row: &'a mut [f32], spare: &'a mut [f32]| -> [&'a mut [f32]; 2] {
        if right {
            let (left, right) = row.split_at_mut(ldc);
            [&mut left[..c], &mut right[..c]]
        } else {
            [&mut row[..c], spare]
        }
    };
    let [y00, y01] = pair(top, s1);
    let [y10, y11] = match bottom {
        Some(row) => pair(row, s2),
        None => [s2, s3],
    };
    [y00, y01, y10, y11]
}

/// The transforms in AVX-512 registers: each tile's 16 inputs (or outputs) loaded 16
/// channels at a time, the last vector of a row masked.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{POINTS, Tiling, tile_pixels};
    use crate::kernels::simd::first_lanes;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// `V = Bt d B` of every tile of `units` into `v` (tile after tile, 16 points of C_in
    /// values each), `d` the tile's 4x4 input pixels (`zeros` where they fall in the
    /// padding); `Bt` is `[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_inputs(
        t: &Tiling,
        x: &[f32],
        units: Range<usize>,
        zeros: &[f32],
        v: &mut [f32],
    ) {
        let c = t.c_in;
        assert!(zeros.len() >= c && v.len() >= units.len() * t.tw * POINTS * c);
        let mut out = v.as_mut_ptr();
        for u in units {
            let (s, ty) = (u / t.th, u % t.th);
            for tx in 0..t.tw {
                // The tile's input pixels, row by row (zeros outside the plane): each a run
                // of `c` values within `x` or `zeros`.
                let d: [*const f32; POINTS] = std::array::from_fn(|i| {
                    let iy = (2 * ty + i / 4) as isize - t.pad as isize;
                    let ix = (2 * tx + i % 4) as isize - t.pad as isize;
                    if (0..t.h as isize).contains(&iy) && (0..t.w as isize).contains(&ix) {
                        x[((s * t.h + iy as usize) * t.w + ix as usize) * c..][..c].as_ptr()
                    } else {
                        zeros.as_ptr()
                    }
                });
                for k in (0..c).step_by(16) {
                    let mask = first_lanes((c - k).min(16));
                    // SAFETY: every pointer starts a run of `c` values (checked above), of
                    // which the masked loads read `k..k + 16` within `c`.
                    let e = |i: usize| unsafe { _mm512_maskz_loadu_ps(mask, d[i].add(k)) };
                    // Bt d: rows combined, for each of the 4 columns.
                    let r = |j: usize| {
                        let (d0, d1, d2, d3) = (e(j), e(4 + j), e(8 + j), e(12 + j));
                        [
                            _mm512_sub_ps(d0, d2),
                            _mm512_add_ps(d1, d2),
                            _mm512_sub_ps(d2, d1),
                            _mm512_sub_ps(d1, d3),
                        ]
                    };
                    let cols = [r(0), r(1), r(2), r(3)];
                    // (Bt d) B: the columns combined, for each of the 4 rows.
                    for (row, _) in cols[0].iter().enumerate() {
                        let (c0, c1, c2, c3) =
                            (cols[0][row], cols[1][row], cols[2][row], cols[3][row]);
                        let point = [
                            _mm512_sub_ps(c0, c2),
                            _mm512_add_ps(c1, c2),
                            _mm512_sub_ps(c2, c1),
                            _mm512_sub_ps(c1, c3),
                        ];
                        for (j, value) in point.into_iter().enumerate() {
                            // SAFETY: the tile's 16 points of `c` values lie within `v`
                            // (checked above).
                            unsafe {
                                _mm512_mask_storeu_ps(out.add((row * 4 + j) * c + k), mask, value)
                            };
                        }
                    }
                }
                // SAFETY: within `v` or one past its checked length.
                out = unsafe { out.add(POINTS * c) };
            }
        }
    }

    /// `Y = At M A` of every tile of `units` from `m` into its output pixels of `values`
    /// (the first unit's first pixel at 0, `ldc` apart; the pixels past the plane's last row
    /// or column dropped); `At` is `[[1, 1, 1, 0], [0, 1, -1, -1]]`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_outputs(
        t: &Tiling,
        m: &[f32],
        units: Range<usize>,
        values: &mut [f32],
        ldc: usize,
    ) {
        let c = t.c_out;
        assert!(m.len() >= units.len() * t.tw * POINTS * c);
        let base = t.first_pixel(units.start);
        // A small buffer of its own per block: placed in the blocks' scratch after `M` it made
        // SqueezeNet 1.1 96x96 b32 3-5% slower (5 of 5 alternating pairs).
        let mut spare = vec![0f32; 3 * c];
        let mut tile = m.as_ptr();
        for u in units {
            let first = t.first_pixel(u) - base;
            let below = 2 * (u % t.th) + 1 < t.ho;
            for tx in 0..t.tw {
                let right = 2 * tx + 1 < t.wo;
                let out = tile_pixels(
                    values,
                    first + 2 * tx,
                    (right, below),
                    (t.wo, ldc, c),
                    &mut spare,
                )
                .map(|pixel| pixel.as_mut_ptr());
                for k in (0..c).step_by(16) {
                    let mask = first_lanes((c - k).min(16));
                    // SAFETY: the tile's 16 points of `c` values lie within `m` (checked
                    // above); the masked loads read `k..k + 16` within `c`.
                    let e = |i: usize| unsafe { _mm512_maskz_loadu_ps(mask, tile.add(i * c + k)) };
                    // At M: rows combined, for each of the 4 columns.
                    let r = |j: usize| {
                        let (m0, m1, m2, m3) = (e(j), e(4 + j), e(8 + j), e(12 + j));
                        let m12 = _mm512_add_ps(m1, m2);
                        [
                            _mm512_add_ps(m0, m12),
                            _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3),
                        ]
                    };
                    let (c0, c1, c2, c3) = (r(0), r(1), r(2), r(3));
                    // (At M) A: the columns combined, for each of the 2 rows.
                    for row in 0..2 {
                        let left = _mm512_add_ps(_mm512_add_ps(c0[row], c1[row]), c2[row]);
                        let right = _mm512_sub_ps(_mm512_sub_ps(c1[row], c2[row]), c3[row]);
                        // SAFETY: each of the tile's pixels is a slice of `c` values.
                        unsafe {
                            _mm512_mask_storeu_ps(out[2 * row].add(k), mask, left);
                            _mm512_mask_storeu_ps(out[2 * row + 1].add(k), mask, right);
                        }
                    }
                }
                // SAFETY: within `m` or one past its checked length.
                tile = unsafe { tile.add(POINTS * c) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv_channels_last::tests::{reference, to_channels_last};

    /// The filter transform of a single tap at each of the 9 positions gives the rows of
    /// `G` (times the columns of `Gt`): checked on the centre tap and a corner by hand.
    #[test]
    fn filter_transform_of_single_taps() {
        let mut f = [0f32; 9];
        f[4] = 1.0;
        let u = transform_filter(&f);
        // Centre: (G e1)(G e1)t with G e1 = [0, 1/2, -1/2, 0].
        let col = [0.0, 0.5, -0.5, 0.0];
        for r in 0..4 {
            for c in 0..4 {
                assert_eq!(u[r * 4 + c], col[r] * col[c]);
            }
        }
        f = [0.0; 9];
        f[0] = 2.0;
        let u = transform_filter(&f);
        let col = [1.0, 0.5, 0.5, 0.0];
        for r in 0..4 {
            for c in 0..4 {
                assert_eq!(u[r * 4 + c], 2.0 * col[r] * col[c]);
            }
        }
    }

    /// Against the direct sums in f64, on odd and even planes (partial tiles at the right
    /// and bottom), padded and not, channel counts off the vector and panel widths, blocks
    /// of one and several tile rows, one and two threads, into a wider output (as into a
    /// concatenation) with the epilogue seeing every value once.
    #[test]
    fn matches_the_direct_sums() {
        if !sgemm::available() {
            eprintln!("skipped: the channels-last convolution needs AVX-512");
            return;
        }
        // (n, c_in, h, w, c_out, pad)
        let cases = [
            (2, 16, 5, 5, 64, 1),
            (1, 24, 8, 7, 40, 1),
            (3, 9, 6, 9, 17, 0),
            (1, 64, 13, 13, 256, 1),
            (2, 8, 23, 23, 33, 1),
            (1, 32, 2, 2, 16, 1),
        ];
        for (n, c_in, h, w, c_out, pad) in cases {
            let g = ConvGeom::new(&[n, c_in, h, w], &[c_out, c_in, 3, 3], 1, pad, 1, 1).unwrap();
            assert!(applies(&g), "{:?}", (n, c_in, h, w, c_out, pad));
            let x: Vec<f32> = (0..n * c_in * h * w)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let wv: Vec<f32> = (0..c_out * c_in * 9)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 40.0)
                .collect();
            let xl = to_channels_last(&x, n, c_in, h * w);
            // NCHW, as the input given to it.
            let want = reference(&g, &x, &wv);
            let mut wt = Vec::new();
            weights(&g, &wv, &mut wt);
            let pixels = n * g.ho * g.wo;
            let ldc = c_out + 3;
            for threads in [1, 2] {
                let mut y = vec![f32::NAN; pixels * ldc];
                let seen = std::sync::Mutex::new(vec![0u8; pixels]);
                let post = |first: usize, rows: usize, ch: Range<usize>, vals: &mut [f32]| {
                    assert_eq!((ch, vals.len()), (0..c_out, (rows - 1) * ldc + c_out));
                    seen.lock().unwrap()[first..first + rows]
                        .iter_mut()
                        .for_each(|s| *s += 1);
                };
                forward(&g, &xl, &wt, &mut y, ldc, &mut Vec::new(), threads, &post);
                assert!(seen.into_inner().unwrap().iter().all(|&s| s == 1));
                let scale = c_in as f64 * 9.0;
                let p = g.ho * g.wo;
                for r in 0..pixels {
                    for co in 0..c_out {
                        let exp = want[(r / p * c_out + co) * p + r % p];
                        let got = y[r * ldc + co] as f64;
                        assert!(
                            (got - exp).abs() <= 1e-6 * scale * (1.0 + exp.abs()),
                            "{:?} threads {threads} pixel {r} channel {co}: {got} vs {exp}",
                            (n, c_in, h, w, c_out, pad)
                        );
                    }
                    assert!(y[r * ldc + c_out..(r + 1) * ldc].iter().all(|v| v.is_nan()));
                }
            }
        }
    }

    /// The train step's NCHW driver against the same f64 sums, with a batch that splits
    /// into runs of one and several samples, the epilogue seeing each sample's planes once.
    #[test]
    fn nchw_matches_the_direct_sums() {
        if !sgemm::available() {
            eprintln!("skipped: the channels-last convolution needs AVX-512");
            return;
        }
        for (n, c_in, h, c_out, pad) in [(9, 32, 8, 48, 1), (3, 40, 11, 17, 1), (2, 32, 10, 64, 0)]
        {
            let g = ConvGeom::new(&[n, c_in, h, h], &[c_out, c_in, 3, 3], 1, pad, 1, 1).unwrap();
            assert!(pays_in_nchw(&g), "{:?}", (n, c_in, h, c_out, pad));
            let x: Vec<f32> = (0..n * c_in * h * h)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let wv: Vec<f32> = (0..c_out * c_in * 9)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 40.0)
                .collect();
            let want = reference(&g, &x, &wv);
            let p = g.ho * g.wo;
            let mut y = vec![f32::NAN; n * c_out * p];
            let seen = std::sync::Mutex::new(vec![0u8; n]);
            let post = |s: usize, c0: usize, planes: &mut [f32]| {
                assert_eq!((c0, planes.len()), (0, c_out * p));
                seen.lock().unwrap()[s] += 1;
            };
            forward_nchw(&g, &x, &wv, &mut y, &post);
            assert!(seen.into_inner().unwrap().iter().all(|&s| s == 1));
            for s in 0..n {
                for co in 0..c_out {
                    for q in 0..p {
                        let got = y[(s * c_out + co) * p + q] as f64;
                        let exp = want[(s * c_out + co) * p + q];
                        assert!(
                            (got - exp).abs() <= 1e-6 * (c_in * 9) as f64 * (1.0 + exp.abs()),
                            "{:?} sample {s} channel {co} pixel {q}: {got} vs {exp}",
                            (n, c_in, h, c_out, pad)
                        );
                    }
                }
            }
        }
    }

    /// Small outputs where the tiles would cost more than the direct sums are left to the
    /// other paths, as are strides, groups and other kernel sizes.
    #[test]
    fn applies_only_where_it_saves() {
        if !sgemm::available() {
            eprintln!("skipped: the channels-last convolution needs AVX-512");
            return;
        }
        let geom = |c_in, h, k, stride, groups| {
            ConvGeom::new(
                &[1, c_in, h, h],
                &[64, c_in / groups, k, k],
                stride,
                1,
                1,
                groups,
            )
            .unwrap()
        };
        assert!(applies(&geom(16, 55, 3, 1, 1)));
        assert!(applies(&geom(64, 13, 3, 1, 1)));
        assert!(!applies(&geom(64, 1, 3, 1, 1)));
        assert!(!applies(&geom(64, 13, 3, 2, 1)));
        assert!(!applies(&geom(64, 13, 3, 1, 2)));
        assert!(!applies(&geom(64, 13, 5, 1, 1)));
        assert!(!applies(&geom(4, 13, 3, 1, 1)));
    }
}
