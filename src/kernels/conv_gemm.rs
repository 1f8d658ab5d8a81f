//! Dense (groups == 1) and grouped convolution as per-group GEMMs, forward and backward.
//!
//! Why: per sample and group, with `cols` the im2col matrix ((C_in/g) k k) x (H_out W_out)
//! and `W_g` the group's filters as a (C_out/g) x ((C_in/g) k k) matrix,
//!
//! - forward:         `Y_g = W_g cols`
//! - input gradient:  `dcols = W_g^T dY_g`, then col2im into dX
//! - weight gradient: `dW_g += dY_g cols^T`, summed over the batch
//!
//! A 1x1 stride-1 unpadded convolution needs no im2col at all: `cols` is the input itself, and
//! `dcols` is the input gradient. On the per-sample path, a k x k forward whose output rows
//! are wide enough reads its taps in place as an implicit GEMM
//! ([`conv_implicit`](super::conv_implicit)), with no column matrix either. A dense convolution of small output planes (up to 256
//! values) puts several samples side by side in one GEMM, forward and backward
//! (`forward_batched`). Everything is one op per convolution (no chunk-and-concatenate). Samples run in parallel with single-threaded GEMMs when the batch
//! has at least one sample per thread; otherwise each GEMM uses all threads.

use super::alloc::zeroed;
use super::{
    conv::{ConvGeom, conv_backward},
    conv_implicit::{self, Taps},
    cpu::{SharedMut, f32_slice},
    gemm::{MatMut, MatRef, Parallelism, matmul, matmul_bt, parallelism},
    im2col::{col2im, col2im_strided, im2col, im2col_strided},
    scratch::with_scratch,
    sgemm, team, winograd,
};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Per-group matrix sizes.
#[derive(Clone, Copy)]
struct Dims {
    /// Input and output channels per group.
    cig: usize,
    cog: usize,
    /// Columns of `W_g`: (C_in/g) k k.
    kdim: usize,
    /// Input and output plane sizes.
    hw: usize,
    p: usize,
    /// 1x1, stride 1, no padding: the input is its own column matrix.
    direct: bool,
}

impl Dims {
    fn of(g: &ConvGeom) -> Self {
        let cig = g.c_in / g.groups;
        Dims {
            cig,
            cog: g.c_out / g.groups,
            kdim: cig * g.k * g.k,
            hw: g.h * g.w,
            p: g.ho * g.wo,
            direct: g.k == 1 && g.stride == 1 && g.pad == 0,
        }
    }

    fn cols_len(&self) -> usize {
        if self.direct { 0 } else { self.kdim * self.p }
    }
}

/// Whether to run samples in parallel (single-threaded GEMMs) rather than one after the other
/// (multi-threaded GEMMs).
fn batch_parallel(n: usize) -> bool {
    let threads = rayon::current_num_threads();
    threads > 1 && n >= threads
}

fn forward(g: &ConvGeom, x: &[f32], w: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; g.y_shape().iter().product()];
    forward_into(g, x, w, &mut y, true, &|_, _, _| {});
    y
}

/// Writes the convolution of `x` with `w` into `y` (N x C_out x H_out x W_out, every value
/// overwritten), calling `post(sample, first_channel, block)` on each block of whole output
/// planes right after its GEMM, while it is in cache (the eval executor's fused epilogue).
/// With `parallel`, samples (or else the GEMMs) use the rayon pool; without, one thread.
///
/// A 1x1 convolution of 1x1 planes (squeeze-and-excitation, classifier heads) runs as one
/// GEMM over the batch instead of one matrix-vector product per sample.
pub(crate) fn forward_into(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    parallel: bool,
    post: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
) {
    let d = Dims::of(g);
    let x_sample = g.c_in * d.hw;
    let y_sample = g.c_out * d.p;
    assert_eq!(y.len(), g.n * y_sample, "conv2d: output buffer size");
    if d.direct && d.hw == 1 && g.groups == 1 {
        let par = if parallel {
            parallelism(false)
        } else {
            Parallelism::None
        };
        let dst = MatMut::rows(y, g.n, g.c_out);
        let a = MatRef::rows(x, g.n, g.c_in);
        let b = MatRef::rows(w, g.c_out, g.c_in).t();
        matmul(dst, false, a, b, par);
        for (n, row) in y.chunks_mut(g.c_out).enumerate() {
            post(n, 0, row);
        }
        return;
    }
    if parallel && g.n > 1 && winograd::pays_in_nchw(g) {
        winograd::forward_nchw(g, x, w, y, post);
        return;
    }
    if batched(g, &d) && !direct_per_sample(&d) {
        forward_batched(g, &d, x, w, y, parallel, post);
        return;
    }
    // A k x k convolution whose output rows are wide enough reads its taps in place.
    let implicit = if d.direct { None } else { Taps::of(g) };
    let scratch_len = implicit.as_ref().map_or(d.cols_len(), Taps::scratch_len);
    let sample = |n: usize, yn: &mut [f32], cols: &mut [f32], par: Parallelism| {
        let xn = &x[n * x_sample..(n + 1) * x_sample];
        if d.direct && matches!(par, Parallelism::Rayon(_)) {
            // The input planes are the column matrices: one team job over every group's
            // output channels (for ShuffleNet V1's grouped 1x1 convolutions, instead of a
            // job and a wait per group).
            let b = |gi: usize| MatRef::rows(&xn[gi * d.cig * d.hw..][..d.cig * d.hw], d.kdim, d.p);
            rows_on_team(w, d.cog, &b, yn, &|r0, part| post(n, r0, part));
            return;
        }
        for gi in 0..g.groups {
            let xg = &xn[gi * d.cig * d.hw..(gi + 1) * d.cig * d.hw];
            let wg = &w[gi * d.cog * d.kdim..(gi + 1) * d.cog * d.kdim];
            let block = &mut yn[gi * d.cog * d.p..(gi + 1) * d.cog * d.p];
            if let Some(layout) = &implicit {
                let on_team = matches!(par, Parallelism::Rayon(_));
                conv_implicit::forward_group(layout, xg, wg, block, cols, on_team, &|r0, part| {
                    post(n, gi * d.cog + r0, part)
                });
                continue;
            }
            let b = if d.direct {
                MatRef::rows(xg, d.kdim, d.p)
            } else {
                if let Parallelism::Rayon(_) = par {
                    im2col_on_team(g, &d, xg, cols);
                } else {
                    im2col(g, d.cig, xg, cols);
                }
                MatRef::rows(cols, d.kdim, d.p)
            };
            if let Parallelism::Rayon(_) = par {
                let post = |r0: usize, part: &mut [f32]| post(n, gi * d.cog + r0, part);
                rows_on_team(wg, d.cog, &|_| b, block, &post);
            } else {
                let a = MatRef::rows(wg, d.cog, d.kdim);
                matmul(MatMut::rows(block, d.cog, d.p), false, a, b, par);
                post(n, gi * d.cog, block);
            }
        }
    };
    if parallel && batch_parallel(g.n) {
        y.par_chunks_mut(y_sample).enumerate().for_each(|(n, yn)| {
            with_scratch(scratch_len, |cols| sample(n, yn, cols, Parallelism::None))
        });
    } else {
        let par = if parallel {
            parallelism(false)
        } else {
            Parallelism::None
        };
        with_scratch(scratch_len, |cols| {
            for (n, yn) in y.chunks_mut(y_sample).enumerate() {
                sample(n, yn, cols, par);
            }
        });
    }
}

/// [`im2col`] of one sample and group split by input channel over the spinning team (each
/// channel fills its own `k k` rows of `cols`): at batch 1 a serial im2col of a 224x224
/// stem or of SqueezeNet's 3x3 expands left the other cores waiting.
fn im2col_on_team(g: &ConvGeom, d: &Dims, xg: &[f32], cols: &mut [f32]) {
    let rows_per_channel = g.k * g.k * d.p;
    let out = SharedMut::new(cols);
    team::run_parts(d.cig, team::size(), &|channels| {
        let (c0, c1) = (channels.start, channels.end);
        // SAFETY: tasks take disjoint channel ranges, hence disjoint rows of `cols`.
        let part = unsafe { out.part(c0 * rows_per_channel, (c1 - c0) * rows_per_channel) };
        im2col(g, c1 - c0, &xg[c0 * d.hw..c1 * d.hw], part);
    });
}

/// `block = w b` for one sample (`w`: filters of consecutive groups of `rows_per_group`
/// output channels, rows of `kdim` values; `b(g)`: group `g`'s right-hand matrix, `kdim` x
/// `p`; `block`: the output planes), split by output channel over the spinning team, each
/// part followed by `post(first_row, part)` on its own thread. A part whose rows span
/// groups runs one product per group, so all groups are one job.
///
/// Why by channel: each part is then whole output planes, so the fused epilogue (batch
/// norm, activation, residual add) runs on the part's thread right after its product, while
/// it is in that core's cache; the parts share `b`, which every core reads. This is the
/// batch-1 path: with fewer samples than threads there is no batch to split. Why one job
/// for all groups: a job and a wait per group made ShuffleNet V1's grouped 1x1
/// convolutions at batch 1 15-25% slower.
fn rows_on_team<'a>(
    w: &[f32],
    rows_per_group: usize,
    b: &(dyn Fn(usize) -> MatRef<'a> + Sync),
    block: &mut [f32],
    post: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let (kdim, p) = (b(0).n_rows(), b(0).n_cols());
    let m = w.len() / kdim.max(1);
    let out = SharedMut::new(block);
    team::run_parts(m, team::size(), &|rows| {
        let mut r0 = rows.start;
        while r0 < rows.end {
            let group = r0 / rows_per_group;
            let r1 = rows.end.min((group + 1) * rows_per_group);
            // SAFETY: tasks take disjoint row ranges of `block`, which outlives the job.
            let part = unsafe { out.part(r0 * p, (r1 - r0) * p) };
            let a = MatRef::rows(&w[r0 * kdim..r1 * kdim], r1 - r0, kdim);
            matmul(
                MatMut::rows(part, r1 - r0, p),
                false,
                a,
                b(group),
                Parallelism::None,
            );
            post(r0, part);
            r0 = r1;
        }
    });
}

/// Output planes up to this size run several samples per GEMM ([`forward_batched`]).
const SMALL_PLANE: usize = 256;

/// Whether a 1x1 stride-1 convolution's forward runs one GEMM per sample straight on its
/// input planes, even where [`batched`] would join samples: planes of at least two 16-lane
/// vectors that fill their vectors to 90% or more. [`sgemm`](super::sgemm) does not pack,
/// so such products are as fast per sample as joined, and the joined path's two copies (the
/// planes into the column matrix, the result back to NCHW) go. Inference, alternating
/// builds: b64 32x32 MobileNet V2 2,685 -> 2,763 images/s, ShuffleNet V2 1,854 -> 1,966. Planes
/// that leave a vector mostly empty stay joined: 16 values (4x4) lost 7-12% per sample, and
/// 36 (6x6, three vectors for 2.25 of work) slowed MobileNet V2 at 96x96.
fn direct_per_sample(d: &Dims) -> bool {
    d.direct && d.p >= 32 && d.p * 10 >= d.p.next_multiple_of(16) * 9
}

/// Whether a convolution runs several samples per GEMM: a dense one whose output planes are
/// small, so that one sample's GEMM would have only a few columns.
fn batched(g: &ConvGeom, d: &Dims) -> bool {
    g.groups == 1 && g.n > 1 && d.p <= SMALL_PLANE
}

/// The batch split into runs of samples: one run per thread with `parallel` (each GEMM then
/// single-threaded), else one run of the whole batch.
fn sample_runs(n: usize, parallel: bool) -> usize {
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    n.div_ceil(threads.clamp(1, n.max(1)))
}

/// The column matrix of `m` consecutive samples of `x`: (C_in k k) x (m P), each sample's
/// P columns side by side (for a 1x1 stride-1 convolution, just its planes), into `cols`
/// (at least `kdim m P` values; every one of them written).
fn fill_batch_cols(g: &ConvGeom, d: &Dims, x: &[f32], m: usize, cols: &mut [f32]) {
    let width = m * d.p;
    for (s, xs) in x.chunks_exact(g.c_in * d.hw).take(m).enumerate() {
        if d.direct {
            for (c, plane) in xs.chunks_exact(d.p).enumerate() {
                cols[c * width + s * d.p..c * width + (s + 1) * d.p].copy_from_slice(plane);
            }
        } else {
            im2col_strided(g, g.c_in, xs, &mut cols[s * d.p..], width);
        }
    }
}

/// `m` samples of an NCHW tensor with `c` channels of `p` values, as C x (m P), into `out`
/// (at least `c m P` values; every one of them written).
fn fill_channel_major(t: &[f32], c: usize, p: usize, m: usize, out: &mut [f32]) {
    let width = m * p;
    for (s, ts) in t.chunks_exact(c * p).take(m).enumerate() {
        for (ch, plane) in ts.chunks_exact(p).enumerate() {
            out[ch * width + s * p..ch * width + (s + 1) * p].copy_from_slice(plane);
        }
    }
}

/// A dense convolution of small output planes with several samples per GEMM: per run of
/// samples (one run per thread), `Y = W cols` with the run's column matrices side by side,
/// then scattered back to NCHW. One sample's GEMM would be C_out x P with a P of 16 to 256
/// columns, which wastes most of the micro-kernel and packs the weights again per sample.
fn forward_batched(
    g: &ConvGeom,
    d: &Dims,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    parallel: bool,
    post: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
) {
    let (x_sample, y_sample) = (g.c_in * d.hw, g.c_out * d.p);
    let run = sample_runs(g.n, parallel);
    let one = |r: usize, yr: &mut [f32]| {
        let m = yr.len() / y_sample;
        let width = m * d.p;
        let in_place = planes_in_place(d);
        let joined_len = if in_place { 0 } else { g.c_out * width };
        // Both temporaries in this thread's scratch: overwritten before they are read.
        with_scratch(d.kdim * width + joined_len, |buf| {
            let (cols, yb) = buf.split_at_mut(d.kdim * width);
            fill_batch_cols(g, d, &x[r * run * x_sample..], m, cols);
            if in_place {
                for (s, ys) in yr.chunks_exact_mut(y_sample).enumerate() {
                    let b = &cols[s * d.p..];
                    let shape = (g.c_out, d.p, d.kdim);
                    sgemm::sgemm(shape, w, (d.kdim, 1), b, width, ys, d.p, false, 1);
                    post(r * run + s, 0, ys);
                }
                return;
            }
            matmul(
                MatMut::rows(yb, g.c_out, width),
                false,
                MatRef::rows(w, g.c_out, d.kdim),
                MatRef::rows(cols, d.kdim, width),
                Parallelism::None,
            );
            for (s, ys) in yr.chunks_exact_mut(y_sample).enumerate() {
                for (c, plane) in ys.chunks_exact_mut(d.p).enumerate() {
                    plane.copy_from_slice(&yb[c * width + s * d.p..c * width + (s + 1) * d.p]);
                }
                post(r * run + s, 0, ys);
            }
        });
    };
    if run < g.n {
        y.par_chunks_mut(run * y_sample)
            .enumerate()
            .for_each(|(r, yr)| one(r, yr));
    } else {
        one(0, y);
    }
}

/// Whether the batched products read and write each sample's NCHW planes in place, one
/// product per sample over its columns of the joined column matrix: when our GEMM runs and
/// a plane is whole 32-column panels (8x8 and 16x16 planes), so that the per-sample products
/// do the joined product's panels and nothing more. Then the forward's joined output is not
/// copied back to NCHW, nor the output gradient into a joined matrix for the backward
/// (about 3% of a SqueezeNet 1.1 training step).
fn planes_in_place(d: &Dims) -> bool {
    sgemm::available() && d.p.is_multiple_of(sgemm::NR)
}

/// The backward of [`forward_batched`], per run of samples (one run per thread), each run's
/// weight gradient in a buffer of its own, summed at the end: [`backward_run_in_place`] where
/// [`planes_in_place`], else [`backward_run_joined`].
fn backward_batched(
    g: &ConvGeom,
    d: &Dims,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    need_x: bool,
    need_w: bool,
) -> Vec<f32> {
    let (x_sample, y_sample) = (g.c_in * d.hw, g.c_out * d.p);
    let dx_len = if need_x { g.n * x_sample } else { 0 };
    let dw_len = if need_w { g.c_out * d.kdim } else { 0 };
    let mut out = zeroed(dx_len + dw_len);
    let (dx, dw) = out.split_at_mut(dx_len);
    let dx = SharedMut::new(dx);
    let run = sample_runs(g.n, true);
    let one = |r: usize| -> Vec<f32> {
        let first = r * run;
        let m = run.min(g.n - first);
        let mut dw_part = vec![0f32; dw_len];
        let x_run = &x[first * x_sample..(first + m) * x_sample];
        let dy_run = &dy[first * y_sample..(first + m) * y_sample];
        // SAFETY: each sample's input gradient is written by exactly one run, and `out`
        // outlives the parallel loop below.
        let dx_of = |s: usize| unsafe { dx.part((first + s) * x_sample, x_sample) };
        let dx_of: Option<&DxOf> = if need_x { Some(&dx_of) } else { None };
        let dw_part_ref = if need_w { Some(&mut dw_part[..]) } else { None };
        if planes_in_place(d) {
            backward_run_in_place(g, d, (x_run, w, dy_run), dx_of, dw_part_ref);
        } else {
            backward_run_joined(g, d, (x_run, w, dy_run), dx_of, dw_part_ref);
        }
        dw_part
    };
    let runs = g.n.div_ceil(run);
    let partials: Vec<Vec<f32>> = (0..runs).into_par_iter().map(one).collect();
    for part in partials {
        for (a, b) in dw.iter_mut().zip(part) {
            *a += b;
        }
    }
    out
}

/// Sample `s` of a run's input gradient (zero-filled; written by this run alone).
type DxOf<'a> = dyn Fn(usize) -> &'a mut [f32] + Sync + 'a;

/// One run of [`backward_batched`] from the samples' NCHW planes: per sample, `dW += dY_s
/// cols_s^T` (the sample's columns of the run's column matrix read transposed, or for a 1x1
/// convolution its input planes) and `dX_s = W^T dY_s` (straight into the sample's input
/// gradient for a 1x1 convolution, else into a column gradient of one sample, then col2im).
fn backward_run_in_place(
    g: &ConvGeom,
    d: &Dims,
    (x, w, dy): (&[f32], &[f32], &[f32]),
    dx_of: Option<&DxOf>,
    mut dw: Option<&mut [f32]>,
) {
    let (x_sample, y_sample) = (g.c_in * d.hw, g.c_out * d.p);
    let m = dy.len() / y_sample;
    let width = m * d.p;
    let cols_len = if dw.is_some() && !d.direct {
        d.kdim * width
    } else {
        0
    };
    let dcols_len = if dx_of.is_some() && !d.direct {
        d.kdim * d.p
    } else {
        0
    };
    // Both overwritten before they are read.
    with_scratch(cols_len + dcols_len, |buf| {
        let (cols, dcols) = buf.split_at_mut(cols_len);
        if cols_len > 0 {
            fill_batch_cols(g, d, x, m, cols);
        }
        for (s, dys) in dy.chunks_exact(y_sample).enumerate() {
            if let Some(dw) = dw.as_deref_mut() {
                let (b, ldb) = if d.direct {
                    (&x[s * x_sample..], d.p)
                } else {
                    (&cols[s * d.p..], width)
                };
                let (shape, rows) = ((g.c_out, d.kdim, d.p), sgemm::BRows::Transposed(ldb));
                sgemm::sgemm_rows(shape, dys, (d.p, 1), b, rows, dw, d.kdim, s > 0, 1);
            }
            if let Some(dx_of) = dx_of {
                let (dxs, shape, wt) = (dx_of(s), (d.kdim, d.p, g.c_out), (1, d.kdim));
                if d.direct {
                    sgemm::sgemm(shape, w, wt, dys, d.p, dxs, d.p, false, 1);
                } else {
                    sgemm::sgemm(shape, w, wt, dys, d.p, dcols, d.p, false, 1);
                    col2im_strided(g, g.c_in, dcols, dxs, d.p);
                }
            }
        }
    });
}

/// One run of [`backward_batched`] on joined matrices: the run's output gradient copied to
/// C_out x (m P), `dW = dY cols^T` with the run's columns as the inner dimension, `dcols = W^T
/// dY`, then col2im per sample (or, for a 1x1 convolution, the planes copied out).
fn backward_run_joined(
    g: &ConvGeom,
    d: &Dims,
    (x, w, dy): (&[f32], &[f32], &[f32]),
    dx_of: Option<&DxOf>,
    dw: Option<&mut [f32]>,
) {
    let y_sample = g.c_out * d.p;
    let m = dy.len() / y_sample;
    let width = m * d.p;
    let cols_len = if dw.is_some() { d.kdim * width } else { 0 };
    let dcols_len = if dx_of.is_some() { d.kdim * width } else { 0 };
    // The run's temporaries in this thread's scratch, each overwritten before it is read:
    // fresh zero-filled buffers were ~5% of a SqueezeNet training step in memset.
    with_scratch(g.c_out * width + cols_len + dcols_len, |buf| {
        let (dyb, rest) = buf.split_at_mut(g.c_out * width);
        let (cols, dcols) = rest.split_at_mut(cols_len);
        fill_channel_major(dy, g.c_out, d.p, m, dyb);
        if let Some(dw) = dw {
            fill_batch_cols(g, d, x, m, cols);
            matmul_bt(
                MatMut::rows(dw, g.c_out, d.kdim),
                false,
                MatRef::rows(dyb, g.c_out, width),
                MatRef::rows(cols, d.kdim, width),
                Parallelism::None,
            );
        }
        if let Some(dx_of) = dx_of {
            matmul(
                MatMut::rows(dcols, d.kdim, width),
                false,
                MatRef::rows(w, g.c_out, d.kdim).t(),
                MatRef::rows(dyb, g.c_out, width),
                Parallelism::None,
            );
            for s in 0..m {
                let dxs = dx_of(s);
                if d.direct {
                    for (c, plane) in dxs.chunks_exact_mut(d.p).enumerate() {
                        plane.copy_from_slice(
                            &dcols[c * width + s * d.p..c * width + (s + 1) * d.p],
                        );
                    }
                } else {
                    col2im_strided(g, g.c_in, &dcols[s * d.p..], dxs, width);
                }
            }
        }
    });
}

/// Returns `[dX | dW]` (each part only when requested).
pub(crate) fn backward(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    need_x: bool,
    need_w: bool,
) -> Vec<f32> {
    let d = Dims::of(g);
    if batched(g, &d) {
        return backward_batched(g, &d, x, w, dy, need_x, need_w);
    }
    let x_sample = g.c_in * d.hw;
    let y_sample = g.c_out * d.p;
    let dx_len = if need_x { g.n * x_sample } else { 0 };
    let dw_len = if need_w { g.c_out * d.kdim } else { 0 };
    let mut out = zeroed(dx_len + dw_len);
    let (dx, dw) = out.split_at_mut(dx_len);
    let dx = SharedMut::new(dx);

    // Samples `range`, accumulating their weight gradient into a fresh buffer.
    let run = |range: std::ops::Range<usize>, par: Parallelism| -> Vec<f32> {
        let mut dw_part = vec![0f32; dw_len];
        let mut cols = vec![0f32; if need_w { d.cols_len() } else { 0 }];
        let mut dcols = vec![0f32; if need_x { d.cols_len() } else { 0 }];
        for n in range {
            let xn = &x[n * x_sample..(n + 1) * x_sample];
            let dyn_ = &dy[n * y_sample..(n + 1) * y_sample];
            // SAFETY: each sample's input gradient is written by exactly one `run` call, and
            // `out` outlives the parallel loop below.
            let dxn = if need_x {
                unsafe { dx.part(n * x_sample, x_sample) }
            } else {
                &mut [][..]
            };
            for gi in 0..g.groups {
                let xg = &xn[gi * d.cig * d.hw..(gi + 1) * d.cig * d.hw];
                let dyg = MatRef::rows(&dyn_[gi * d.cog * d.p..], d.cog, d.p);
                let wg = MatRef::rows(&w[gi * d.cog * d.kdim..], d.cog, d.kdim);
                if need_w {
                    let b = if d.direct {
                        MatRef::rows(xg, d.kdim, d.p)
                    } else {
                        im2col(g, d.cig, xg, &mut cols);
                        MatRef::rows(&cols, d.kdim, d.p)
                    };
                    let dst = MatMut::rows(&mut dw_part[gi * d.cog * d.kdim..], d.cog, d.kdim);
                    matmul_bt(dst, true, dyg, b, par);
                }
                if need_x {
                    let dxg = &mut dxn[gi * d.cig * d.hw..(gi + 1) * d.cig * d.hw];
                    if d.direct {
                        matmul(MatMut::rows(dxg, d.kdim, d.p), false, wg.t(), dyg, par);
                    } else {
                        matmul(
                            MatMut::rows(&mut dcols, d.kdim, d.p),
                            false,
                            wg.t(),
                            dyg,
                            par,
                        );
                        col2im(g, d.cig, &dcols, dxg);
                    }
                }
            }
        }
        dw_part
    };

    let partials: Vec<Vec<f32>> = if batch_parallel(g.n) {
        // A few chunks per thread for balance, unless the per-chunk weight gradients are big.
        let threads = rayon::current_num_threads();
        let per_thread = if dw_len <= 1 << 20 { 2 } else { 1 };
        let chunk = g.n.div_ceil(threads * per_thread);
        (0..g.n.div_ceil(chunk))
            .into_par_iter()
            .map(|i| run(i * chunk..((i + 1) * chunk).min(g.n), Parallelism::None))
            .collect()
    } else {
        vec![run(0..g.n, parallelism(false))]
    };
    for part in partials {
        for (a, b) in dw.iter_mut().zip(part) {
            *a += b;
        }
    }
    out
}

/// Forward op: `(x, w) -> y`.
pub(crate) struct GemmConv(pub ConvGeom);

impl CustomOp2 for GemmConv {
    fn name(&self) -> &'static str {
        "slimcandle-gemm-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        g.check_lens(x, w, None)?;
        let y = forward(g, x, w);
        Ok((CpuStorage::F32(y), Shape::from_dims(&g.y_shape())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        conv_backward(&self.0, x, w, dy, |need_x, need_w| GemmConvBackward {
            g: self.0,
            need_x,
            need_w,
        })
    }
}

/// Backward op: `(x, w, dy) -> [dx | dw]`, flattened.
struct GemmConvBackward {
    g: ConvGeom,
    need_x: bool,
    need_w: bool,
}

impl CustomOp3 for GemmConvBackward {
    fn name(&self) -> &'static str {
        "slimcandle-gemm-conv2d-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let dy = f32_slice(s3, l3, self.name())?;
        self.g.check_lens(x, w, Some(dy))?;
        let out = backward(&self.g, x, w, dy, self.need_x, self.need_w);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from_dims(&[len])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The per-sample products on NCHW planes give the joined matrices' results, for each
    /// combination of the gradients asked for.
    #[test]
    fn backward_in_place_matches_the_joined_products() {
        if !planes_in_place(&Dims::of(&geom(2, 3, 8, 4, 3, 1))) {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for (n, c_in, hw, c_out, k, stride) in [
            (3, 5, 8, 30, 3, 1),
            (4, 20, 8, 26, 1, 1),
            (2, 7, 16, 13, 3, 1),
            (3, 6, 16, 27, 3, 2),
            (4, 16, 16, 32, 1, 1),
            (4, 64, 8, 64, 1, 1),
        ] {
            let g = geom(n, c_in, hw, c_out, k, stride);
            let d = Dims::of(&g);
            let x = Rng::new(1).normals(n * c_in * hw * hw);
            let w = Rng::new(2).normals(c_out * d.kdim);
            let dy = Rng::new(3).normals(n * c_out * d.p);
            assert!(batched(&g, &d), "a batched geometry");
            for (need_x, need_w) in [(true, true), (true, false), (false, true)] {
                let mut got = (vec![0f32; n * c_in * d.hw], vec![0f32; c_out * d.kdim]);
                let mut want = got.clone();
                for (out, in_place) in [(&mut got, true), (&mut want, false)] {
                    let dx = SharedMut::new(&mut out.0);
                    let x_sample = c_in * d.hw;
                    // SAFETY: one sample at a time, within `out.0`.
                    let dx_of = |s: usize| unsafe { dx.part(s * x_sample, x_sample) };
                    let dx_of: Option<&DxOf> = if need_x { Some(&dx_of) } else { None };
                    let dw = if need_w { Some(&mut out.1[..]) } else { None };
                    let run = if in_place {
                        backward_run_in_place
                    } else {
                        backward_run_joined
                    };
                    run(&g, &d, (&x, &w, &dy), dx_of, dw);
                }
                for (a, b) in got.0.iter().chain(&got.1).zip(want.0.iter().chain(&want.1)) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{a} vs {b} ({n}, {c_in}, {hw}, {c_out}, {k})"
                    );
                }
            }
        }
    }

    fn geom(n: usize, c_in: usize, hw: usize, c_out: usize, k: usize, stride: usize) -> ConvGeom {
        ConvGeom::new(
            &[n, c_in, hw, hw],
            &[c_out, c_in, k, k],
            stride,
            k / 2,
            1,
            1,
        )
        .unwrap()
    }
}
