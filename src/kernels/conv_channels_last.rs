//! Dense and grouped convolutions with channels last (NHWC), for the eval executor's
//! channels-last plans: the pixels are the rows of the product, `Y[pixels x C_out] =
//! X[pixels x C_in] W^T` for a 1x1 convolution (the input rows read in place), or the rows of
//! a channels-last im2col block for k x k kernels and strides.
//!
//! Why: in NCHW a convolution's product has one column per output pixel of a sample, so the
//! small planes of the last stages (6x6 at 96x96 inputs, 2x2 at 32x32) give products of 36 or
//! 4 columns, which a 16-lane kernel fills poorly. Channels last, the rows are the pixels of
//! all the samples of a chunk and the columns the output channels (16 to 1,280 in these
//! networks): the plane's size no longer matters.
//!
//! The right-hand matrices are the weights rearranged ([`weights`]; per call, or once in an
//! `infer::Engine`): rows in im2col order, packed panel by panel for our GEMM (`sgemm`).

use super::conv::ConvGeom;
use super::cpu::SharedMut;
use super::transpose::transpose;
use super::{sgemm, team, winograd};
use std::ops::Range;

/// Values of the output block (rows x C_out) that a product and its epilogue should keep in
/// cache: rows per block are chosen to fit this, but no fewer than [`MIN_BLOCK_ROWS`].
const BLOCK_VALUES: usize = 1 << 15;

/// The fewest output rows per block. Every block reads all of `B` (the weights): each
/// column panel is reused by the block's row tiles only, so a wide layer's short blocks
/// streamed its weights from L2 or L3 for two tiles at a time (SqueezeNet's 13x13 classifier,
/// 512 -> 1,000: 24 rows a block, 2 MB of weights per 24 rows, half of the kernel's peak).
/// Eight tiles a panel: that layer's laps 135-172 -> 106-122 ms, SqueezeNet 1.1 224x224 b8
/// and 96x96 b32 +10% (alternating builds), the other families level.
const MIN_BLOCK_ROWS: usize = 8 * sgemm::MR;

thread_local! {
    /// The im2col rows of a team thread's blocks at batch 1 ([`forward`]).
    static TEAM_COLS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `w` (PyTorch's C_out x C_in/groups x k x k) as the products' right-hand matrices: per
/// group, `k k C_in/groups` rows of `C_out/groups` values, row `(ky k + kx) C_in/groups + ci`
/// (the order of a channels-last im2col row), packed panel by panel for our GEMM
/// ([`sgemm::pack_panels`]; [`group_len`] values a group).
///
/// Into `wt` (resized; its old contents are overwritten): the executor recycles these
/// buffers between calls.
///
/// The convolutions that run as Winograd products ([`winograd::applies`]) get their
/// transformed filters instead ([`winograd::weights`]).
pub(crate) fn weights(g: &ConvGeom, w: &[f32], wt: &mut Vec<f32>) {
    if winograd::applies(g) {
        winograd::weights(g, w, wt);
    } else {
        tap_weights(g, w, wt);
    }
}

/// [`weights`] for the im2col and implicit products.
fn tap_weights(g: &ConvGeom, w: &[f32], wt: &mut Vec<f32>) {
    let (cg, og, kk) = (g.c_in / g.groups, g.c_out / g.groups, g.k * g.k);
    let (size, packed) = (kk * cg * og, group_len(g));
    wt.resize(g.groups * packed, 0.0);
    // Per group: og x (cg kk) transposed to rows `ci kk + t`, then the rows reordered to
    // `t cg + ci` (a no-op for 1x1 kernels), then packed.
    let mut rows = vec![0f32; size];
    let mut reordered = if kk > 1 { vec![0f32; size] } else { Vec::new() };
    for grp in 0..g.groups {
        let src = &w[grp * size..(grp + 1) * size];
        transpose(src, (og, cg * kk), &mut rows);
        let matrix = if kk == 1 {
            &rows
        } else {
            for ci in 0..cg {
                for t in 0..kk {
                    let from = &rows[(ci * kk + t) * og..][..og];
                    reordered[(t * cg + ci) * og..][..og].copy_from_slice(from);
                }
            }
            &reordered
        };
        let dst = &mut wt[grp * packed..(grp + 1) * packed];
        sgemm::pack_panels(matrix, og, (kk * cg, og), dst);
    }
}

/// Values of one group's right-hand matrix as [`weights`] packs it.
fn group_len(g: &ConvGeom) -> usize {
    sgemm::panels_len(g.k * g.k * g.c_in / g.groups, g.c_out / g.groups)
}

/// What [`forward`] runs on each block of output values it computed: `(first pixel, rows,
/// channels, values)`.
pub(crate) type BlockEpilogue<'a> = dyn Fn(usize, usize, Range<usize>, &mut [f32]) + Sync + 'a;

/// Whether this path runs `g`: our GEMM needs AVX-512 (the executor checks before choosing
/// channels last).
pub(crate) fn available() -> bool {
    sgemm::available()
}

/// The convolution `g` of `g.n` samples stored channels last: `x` holds each pixel's C_in
/// values side by side, `wt` comes from [`weights`]; output pixel `r` (counted over the
/// samples) goes to `y[r * ldc..r * ldc + C_out]` (`ldc` > C_out when the output is part of
/// a concatenation). `post(first, rows, channels, values)` runs on each block of output
/// values right after it is computed: `values` starts at channel `channels.start` of pixel
/// `first` and spans `rows` pixels (`ldc` apart), `channels` of each (all of them, unless
/// a thread computed a share of the columns). `cols` is scratch for the im2col blocks. With
/// `threads` > 1 (a batch smaller than the thread count, on the spinning team) the rows are
/// shared out, or for a dense 1x1 convolution with few rows, the column panels.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    g: &ConvGeom,
    x: &[f32],
    wt: &[f32],
    y: &mut [f32],
    ldc: usize,
    cols: &mut Vec<f32>,
    threads: usize,
    post: &BlockEpilogue<'_>,
) {
    if winograd::applies(g) {
        winograd::forward(g, x, wt, y, ldc, cols, threads, post);
        return;
    }
    let (cg, og, kk) = (g.c_in / g.groups, g.c_out / g.groups, g.k * g.k);
    let kdim = kk * cg;
    let pixels = g.n * g.ho * g.wo;
    assert!(x.len() == g.n * g.h * g.w * g.c_in, "conv: input size");
    assert!(wt.len() == g.groups * group_len(g), "conv: weight size");
    assert!(ldc >= g.c_out && (pixels == 0 || y.len() >= (pixels - 1) * ldc + g.c_out));
    if implicit(g) {
        forward_implicit(g, x, wt, y, ldc, cols, threads, post);
        return;
    }
    let direct = g.k == 1 && g.stride == 1 && g.pad == 0;
    let widest = if direct { ldc } else { ldc.max(kdim) };
    let block = (BLOCK_VALUES / widest.max(1)).clamp(MIN_BLOCK_ROWS, 1024) / sgemm::MR * sgemm::MR;
    let blocks = pixels.div_ceil(block);
    let out = SharedMut::new(y);
    // Rows `r0..r0 + m` of every group's product, then their epilogue.
    let run_block = |r0: usize, m: usize, cols: &mut Vec<f32>| {
        let len = (m - 1) * ldc + g.c_out;
        // SAFETY: blocks are disjoint runs of output rows (each task takes its own).
        let y = unsafe { out.part(r0 * ldc, len) };
        for grp in 0..g.groups {
            let (a, a_rs) = if direct {
                (&x[r0 * g.c_in + grp * cg..], g.c_in)
            } else {
                cols.resize(m * kdim, 0.0);
                im2col_rows(g, x, grp * cg, r0..r0 + m, cols);
                (&cols[..], kdim)
            };
            let b = &wt[grp * group_len(g)..(grp + 1) * group_len(g)];
            let c = &mut y[grp * og..];
            let rows = sgemm::BRows::Panels;
            sgemm::sgemm_rows((m, og, kdim), a, (a_rs, 1), b, rows, c, ldc, false, 1);
        }
        post(r0, m, 0..g.c_out, y);
    };
    let tiles = pixels.div_ceil(sgemm::MR);
    if threads > 1 && direct && g.groups == 1 && tiles < 4 * threads {
        // A dense 1x1 convolution on fewer than four row tiles per thread: each thread its
        // share of the column panels (of the weights), over all the rows, and the epilogue
        // on its columns (run after the product on the caller, it left the other thread
        // waiting: MobileNet V1 0.5's 4x4 and 2x2 layers at batch 1). The rows fit one
        // block (fewer than 4 threads x 12 rows).
        let (panels, kp) = (og.div_ceil(sgemm::NR), kdim * sgemm::NR);
        team::run_parts(panels, threads, &|share| {
            let channels = share.start * sgemm::NR..(share.end * sgemm::NR).min(og);
            let len = (pixels - 1) * ldc + channels.len();
            // SAFETY: the tasks write disjoint column ranges of the output rows.
            let y = unsafe { out.part(channels.start, len) };
            let b = &wt[share.start * kp..share.end * kp];
            let shape = (pixels, channels.len(), kdim);
            let rows = sgemm::BRows::Panels;
            sgemm::sgemm_rows(shape, x, (g.c_in, 1), b, rows, y, ldc, false, 1);
            post(0, pixels, channels, y);
        });
        return;
    }
    // With a team (batch 1): each thread a balanced share of the row tiles, reading all of
    // the weights. Row blocks dealt out whole left one thread 48 of 7x7's 49 rows (MobileNet
    // V2 224x224: its 7x7 and 14x14 products 1.4-1.7x slower than NCHW); balanced rows alone
    // left the 7x7 products 30-40% slower than panels (above), and panels for ShuffleNet V1's
    // grouped products (a job per group) were 40% slower than rows.
    if threads > 1 {
        let parts = threads.min(tiles);
        team::run(parts, &|t| {
            // Each team thread's own im2col buffer, kept between calls (a fresh one per
            // call is allocated and page-faulted in again).
            let mut cols = TEAM_COLS.with(|c| c.take());
            let r0 = (t * tiles / parts * sgemm::MR).min(pixels);
            let r1 = ((t + 1) * tiles / parts * sgemm::MR).min(pixels);
            let mut r = r0;
            while r < r1 {
                let m = block.min(r1 - r);
                run_block(r, m, &mut cols);
                r += m;
            }
            TEAM_COLS.with(|c| c.replace(cols));
        });
        return;
    }
    for i in 0..blocks {
        let r0 = i * block;
        run_block(r0, block.min(pixels - r0), cols);
    }
}

/// The fewest output pixels per row for [`forward_implicit`]: a row is one product, so a
/// row of 13 (one tile and a one-row tile) wastes most of its second tile; SqueezeNet's
/// 13x13 expands were 1-10% slower implicit (alternating runs), its 27x27 and 55x55 ones
/// 2-16% faster.
const IMPLICIT_MIN_WIDTH: usize = 2 * sgemm::MR - 1;

/// Whether `g` runs as an implicit GEMM ([`forward_implicit`]): a dense k x k convolution of
/// stride 1 (SqueezeNet's 3x3 expands) whose output rows fill a row tile or more.
fn implicit(g: &ConvGeom) -> bool {
    g.k > 1 && g.stride == 1 && g.dil == 1 && g.groups == 1 && g.wo >= IMPLICIT_MIN_WIDTH
}

/// [`forward`] for [`implicit`] convolutions: each output row is one product whose
/// left-hand matrix is read in place from a zero-padded copy of the input (in `cols`),
/// tap by tap ([`sgemm::sgemm_taps`]): row `ox` of tap `(ky, kx)` is padded pixel
/// `(oy + ky, ox + kx)`, so the rows of a tap are consecutive pixels, C values apart.
///
/// Why: the im2col rows are k k times the input (nine copies of each pixel for 3x3), written
/// and read back once per layer; the padded copy is one. The sums are in the same order
/// (taps, then channels, as the im2col row), so the output is bit for bit the same.
#[allow(clippy::too_many_arguments)]
fn forward_implicit(
    g: &ConvGeom,
    x: &[f32],
    wt: &[f32],
    y: &mut [f32],
    ldc: usize,
    cols: &mut Vec<f32>,
    threads: usize,
    post: &BlockEpilogue<'_>,
) {
    let c = g.c_in;
    let (hp, wp) = (g.h + 2 * g.pad, g.w + 2 * g.pad);
    // `resize` keeps old values: every padded value is written by `pad_planes`.
    cols.resize(g.n * hp * wp * c, 0.0);
    pad_planes(x, (g.h, g.w * c), (g.pad, g.pad * c), cols, threads);
    let padded = &cols[..];
    let offsets: Vec<usize> = (0..g.k)
        .flat_map(|ky| (0..g.k).map(move |kx| (ky * wp + kx) * c))
        .collect();
    let taps = sgemm::Taps {
        offsets: &offsets,
        rs: c,
        cg: c,
    };
    let row = |s: usize, oy: usize, values: &mut [f32]| {
        let a = &padded[(s * hp + oy) * wp * c..];
        let shape = (g.wo, g.c_out, g.k * g.k * c);
        sgemm::sgemm_taps(shape, a, taps, wt, values, ldc, false, 1);
    };
    let post_row = |first: usize, values: &mut [f32]| post(first, g.wo, 0..g.c_out, values);
    output_rows(g, (y, ldc), threads, &row, &post_row);
}

/// Zero-padded copies of `x`'s planes into `out`: each plane's `h` rows of `w` values get
/// `pad.0` rows of zeros above and below and `pad.1` zeros on each side, row by row over
/// `threads` tasks of the team. A row's values are a plane row of NCHW input (the stem) or
/// the pixels' channels of channels-last input (`w` = W C, `pad.1` = pad C).
pub(crate) fn pad_planes(
    x: &[f32],
    (h, w): (usize, usize),
    pad: (usize, usize),
    out: &mut [f32],
    threads: usize,
) {
    let hp = h + 2 * pad.0;
    team::rows(out, w + 2 * pad.1, threads, &|u, row| {
        let (plane, r) = (u / hp, u % hp);
        if r < pad.0 || r >= pad.0 + h {
            row.fill(0.0);
            return;
        }
        let from = &x[(plane * h + r - pad.0) * w..][..w];
        row[..pad.1].fill(0.0);
        row[pad.1..pad.1 + w].copy_from_slice(from);
        row[pad.1 + w..].fill(0.0);
    });
}

/// Computes every output row of `g` channels last, `row(sample, oy, values)` filling one (the
/// row's `wo` pixels of C_out values, `ldc` apart, in `y`) and `post(first, values)` run on
/// it right after (`first`: its first pixel, counted over the samples); with `threads` > 1
/// the rows are shared out over the team. The driver of the depthwise and stem kernels.
pub(crate) fn output_rows(
    g: &ConvGeom,
    (y, ldc): (&mut [f32], usize),
    threads: usize,
    row: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
    post: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let plane_out = g.ho * g.wo;
    let needed = (g.n * plane_out)
        .checked_sub(1)
        .map(|last| last * ldc + g.c_out);
    assert!(
        ldc >= g.c_out && needed.is_none_or(|len| y.len() >= len),
        "conv: output size"
    );
    let out = SharedMut::new(y);
    let run = |units: std::ops::Range<usize>| {
        for u in units {
            let (s, oy) = (u / g.ho, u % g.ho);
            let first = s * plane_out + oy * g.wo;
            // SAFETY: rows are disjoint runs of the output (each task takes its own), within
            // `y` (checked above).
            let values = unsafe { out.part(first * ldc, (g.wo - 1) * ldc + g.c_out) };
            row(s, oy, values);
            post(first, values);
        }
    };
    let units = g.n * g.ho;
    if threads > 1 && units > 1 {
        team::run_parts(units, threads, &run);
    } else {
        run(0..units);
    }
}

/// The im2col rows of output pixels `pixels` (counted over the samples), channels last: row
/// `r` holds, for each tap `(ky, kx)` in order, the `C_in/groups` input values of channels
/// `c0..` at the pixel that tap reads (zeros where it meets padding).
fn im2col_rows(
    g: &ConvGeom,
    x: &[f32],
    c0: usize,
    pixels: std::ops::Range<usize>,
    cols: &mut [f32],
) {
    let cg = g.c_in / g.groups;
    let kdim = g.k * g.k * cg;
    let plane = g.ho * g.wo;
    for (r, q) in pixels.enumerate() {
        let (s, oy, ox) = (q / plane, q % plane / g.wo, q % g.wo);
        let row = &mut cols[r * kdim..(r + 1) * kdim];
        let ix0 = (ox * g.stride) as isize - g.pad as isize;
        // Without groups or dilation a window row's taps are one run of the input row.
        let runs = g.groups == 1 && g.dil == 1 && ix0 >= 0 && ix0 as usize + g.k <= g.w;
        for ky in 0..g.k {
            let iy = (oy * g.stride + ky * g.dil) as isize - g.pad as isize;
            if runs {
                let dst = &mut row[ky * g.k * cg..(ky + 1) * g.k * cg];
                if (0..g.h as isize).contains(&iy) {
                    let at = ((s * g.h + iy as usize) * g.w + ix0 as usize) * g.c_in;
                    dst.copy_from_slice(&x[at..at + g.k * cg]);
                } else {
                    dst.fill(0.0);
                }
                continue;
            }
            for kx in 0..g.k {
                let ix = (ox * g.stride + kx * g.dil) as isize - g.pad as isize;
                let dst = &mut row[(ky * g.k + kx) * cg..][..cg];
                if (0..g.h as isize).contains(&iy) && (0..g.w as isize).contains(&ix) {
                    let at = ((s * g.h + iy as usize) * g.w + ix as usize) * g.c_in + c0;
                    dst.copy_from_slice(&x[at..at + cg]);
                } else {
                    dst.fill(0.0);
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A scalar reference in f64: NCHW in, NCHW out.
    pub(in crate::kernels) fn reference(g: &ConvGeom, x: &[f32], w: &[f32]) -> Vec<f64> {
        let (cg, og) = (g.c_in / g.groups, g.c_out / g.groups);
        let mut y = vec![0f64; g.n * g.c_out * g.ho * g.wo];
        for s in 0..g.n {
            for co in 0..g.c_out {
                let grp = co / og;
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        let mut acc = 0f64;
                        for ci in 0..cg {
                            for ky in 0..g.k {
                                for kx in 0..g.k {
                                    let iy = (oy * g.stride + ky * g.dil) as isize - g.pad as isize;
                                    let ix = (ox * g.stride + kx * g.dil) as isize - g.pad as isize;
                                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize
                                    {
                                        continue;
                                    }
                                    let c = grp * cg + ci;
                                    let xv = x[((s * g.c_in + c) * g.h + iy as usize) * g.w
                                        + ix as usize];
                                    let wv = w[((co * cg + ci) * g.k + ky) * g.k + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        y[((s * g.c_out + co) * g.ho + oy) * g.wo + ox] = acc;
                    }
                }
            }
        }
        y
    }

    /// NCHW to NHWC (`c` channels of `p` pixels per sample).
    pub(in crate::kernels) fn to_channels_last(
        x: &[f32],
        n: usize,
        c: usize,
        p: usize,
    ) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for s in 0..n {
            for ch in 0..c {
                for q in 0..p {
                    out[(s * p + q) * c + ch] = x[(s * c + ch) * p + q];
                }
            }
        }
        out
    }

    #[test]
    fn matches_a_scalar_reference() {
        if !available() {
            eprintln!("skipped: the channels-last convolution needs AVX-512");
            return;
        }
        // (n, c_in, h, w, c_out, k, stride, pad, dil, groups)
        let cases = [
            (3, 16, 6, 6, 24, 1, 1, 0, 1, 1),
            (2, 3, 11, 9, 32, 3, 2, 1, 1, 1),
            (1, 12, 7, 7, 36, 1, 1, 0, 1, 3),
            (2, 8, 9, 10, 20, 3, 1, 1, 1, 1),
            (2, 6, 8, 8, 9, 3, 1, 2, 2, 3),
            (1, 5, 13, 13, 17, 5, 3, 2, 1, 1),
            (4, 40, 2, 2, 100, 1, 1, 0, 1, 1),
            (2, 4, 9, 9, 8, 1, 2, 0, 1, 1),
            // Implicit (k x k, stride 1, rows of 23+ pixels): padded and not, 5x5.
            (2, 16, 14, 23, 40, 3, 1, 1, 1, 1),
            (1, 20, 12, 25, 70, 3, 1, 1, 1, 1),
            (2, 7, 15, 27, 33, 3, 1, 0, 1, 1),
            (1, 5, 9, 27, 17, 5, 1, 2, 1, 1),
        ];
        for (n, c_in, h, w, c_out, k, stride, pad, dil, groups) in cases {
            let g = ConvGeom::new(
                &[n, c_in, h, w],
                &[c_out, c_in / groups, k, k],
                stride,
                pad,
                dil,
                groups,
            )
            .unwrap();
            let x: Vec<f32> = (0..n * c_in * h * w)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let wv: Vec<f32> = (0..c_out * c_in / groups * k * k)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 40.0)
                .collect();
            let want = reference(&g, &x, &wv);
            let xl = to_channels_last(&x, n, c_in, h * w);
            let mut wt = Vec::new();
            weights(&g, &wv, &mut wt);
            let p = g.ho * g.wo;
            // Into a wider buffer (as into a concatenation), the epilogue counting rows.
            let ldc = c_out + 5;
            let mut y = vec![f32::NAN; n * p * ldc];
            for threads in [1, 2] {
                y.fill(f32::NAN);
                let values_seen = std::sync::atomic::AtomicUsize::new(0);
                let mut scratch = Vec::new();
                let post = |_: usize, rows: usize, channels: Range<usize>, vals: &mut [f32]| {
                    assert_eq!(vals.len(), (rows - 1) * ldc + channels.len());
                    let values = rows * channels.len();
                    values_seen.fetch_add(values, std::sync::atomic::Ordering::Relaxed);
                };
                forward(&g, &xl, &wt, &mut y, ldc, &mut scratch, threads, &post);
                assert_eq!(values_seen.into_inner(), n * p * c_out);
                for s in 0..n {
                    for co in 0..c_out {
                        for q in 0..p {
                            let got = y[(s * p + q) * ldc + co] as f64;
                            let exp = want[(s * c_out + co) * p + q];
                            assert!(
                                (got - exp).abs() <= 1e-4 * (1.0 + exp.abs()),
                                "case {:?} threads {threads}: {got} vs {exp}",
                                (n, c_in, h, w, c_out, k, stride, pad, dil, groups)
                            );
                        }
                    }
                }
            }
        }
    }

    /// The implicit path gives the im2col path's values bit for bit (the same sums in the
    /// same order), on rows with a partial last tile and a partial last column panel.
    #[test]
    fn implicit_matches_im2col_bit_for_bit() {
        if !available() {
            eprintln!("skipped: the channels-last convolution needs AVX-512");
            return;
        }
        for (n, c_in, h, c_out, pad) in [(2, 16, 25, 40, 1), (1, 24, 27, 64, 1), (1, 9, 25, 35, 0)]
        {
            let g = ConvGeom::new(&[n, c_in, h, h], &[c_out, c_in, 3, 3], 1, pad, 1, 1).unwrap();
            assert!(implicit(&g));
            let x: Vec<f32> = (0..n * c_in * h * h)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let wv: Vec<f32> = (0..c_out * c_in * 9)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 40.0)
                .collect();
            let mut wt = Vec::new();
            tap_weights(&g, &wv, &mut wt);
            let pixels = n * g.ho * g.wo;
            let mut got = vec![0f32; pixels * c_out];
            let post = |_: usize, _: usize, _: Range<usize>, _: &mut [f32]| {};
            forward_implicit(&g, &x, &wt, &mut got, c_out, &mut Vec::new(), 1, &post);
            let kdim = 9 * c_in;
            let mut cols = vec![0f32; pixels * kdim];
            im2col_rows(&g, &x, 0, 0..pixels, &mut cols);
            let mut want = vec![0f32; pixels * c_out];
            let rows = sgemm::BRows::Panels;
            sgemm::sgemm_rows(
                (pixels, c_out, kdim),
                &cols,
                (kdim, 1),
                &wt,
                rows,
                &mut want,
                c_out,
                false,
                1,
            );
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{:?}",
                (n, c_in, h, c_out, pad)
            );
        }
    }
}
