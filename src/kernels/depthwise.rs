//! Depthwise convolution (groups == C_in == C_out, dilation 1) as direct per-plane loops.
//!
//! Why: every channel is an independent H x W plane with its own k x k filter, so there is
//! nothing for a GEMM to share and the work is bound by memory traffic. Stock Candle instead
//! runs one tiny convolution per channel and concatenates, and its backward goes through
//! `conv_transpose2d`.
//!
//! Each input plane is first copied into a zero-padded scratch plane whose rows are split
//! into `stride` phases: padded column j is stored at `(j % s) * wp + j / s`. Output column
//! `ox` then meets tap `kx` at position `ox + kx / s` of phase `kx % s`, which is contiguous in
//! `ox` for every stride, so the loops over 16 (then 8 or 4) output columns vectorise with all
//! k x k taps unrolled (k = 1, 3, 5, 7 and strides 1, 2 are compiled as constants).
//!
//! - forward: `y = corr(pad(x), w)` per (sample, channel), in parallel; output rows shorter
//!   than 7 (the 4x4 and 2x2 planes of small inputs) instead run one sample at a time with
//!   channels last, where each tap is a vector operation across channels and taps that only
//!   meet padding are skipped (`narrow_body`). 3x3 kernels on 7x7 planes (224x224 inputs'
//!   last stage) stay on the planes: two overlapping 4-wide blocks per row cost half of the
//!   channels-last path's time, transposes included (see `narrow_rows`);
//! - input gradient: the same correlation with the flipped filter over the output gradient
//!   spread out by the stride (zeros between) and padded by k - 1 - p;
//! - weight gradient: per tap, the dot product of the output gradient with the shifted padded
//!   input, summed over the batch in 16 lanes and reduced once per channel (at stride 1 one
//!   flat dot product per tap and plane, see `dw_flat_body`).
//!
//! The backward pass runs per channel (in parallel), so that it reads the output gradient once
//! for both gradients and sums the weight gradient without a reduction.

use super::alloc::zeroed;
use super::{
    conv::{ConvGeom, conv_backward},
    cpu::{SharedMut, f32_slice},
    depthwise_small,
    im2col::valid_range,
    simd::{Madd, simd_dispatch},
    team,
};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Whether `g` runs here (other dilations go through the GEMM path).
pub(crate) fn supports(g: &ConvGeom) -> bool {
    g.is_depthwise() && g.dil == 1
}

/// Geometry of a zero-padded, phase-split scratch plane of `rows x cols` (padded) values.
#[derive(Clone, Copy, Debug)]
struct Padded {
    rows: usize,
    cols: usize,
    /// Number of phases (the stride the plane is read with).
    s: usize,
    /// Values per phase.
    wp: usize,
}

impl Padded {
    fn new(rows: usize, cols: usize, s: usize) -> Self {
        Padded {
            rows,
            cols,
            s,
            wp: cols.div_ceil(s),
        }
    }

    /// The padded input of the forward pass (and of the weight gradient): exactly what the
    /// k x k windows of all outputs cover.
    fn input(g: &ConvGeom) -> Self {
        Padded::new(
            (g.ho - 1) * g.stride + g.k,
            (g.wo - 1) * g.stride + g.k,
            g.stride,
        )
    }

    /// The spread-out output gradient of the input-gradient pass (a stride-1 correlation
    /// producing H x W).
    fn grad(g: &ConvGeom) -> Self {
        Padded::new(g.h + g.k - 1, g.w + g.k - 1, 1)
    }

    fn row_len(&self) -> usize {
        self.s * self.wp
    }

    fn len(&self) -> usize {
        self.rows * self.row_len()
    }

    fn view<'a>(&self, data: &'a [f32]) -> PlaneRef<'a> {
        PlaneRef {
            data: &data[..self.len()],
            row: self.row_len(),
            wp: self.wp,
        }
    }
}

/// A filled scratch plane, as the loops read it.
#[derive(Clone, Copy)]
struct PlaneRef<'a> {
    data: &'a [f32],
    row: usize,
    wp: usize,
}

/// Writes plane `src` (`sh x sw`) into scratch `dst` so that `src[r][c]` lands at padded
/// position `(off + r * up, off + c * up)`; positions outside the padded plane are dropped.
/// The positions written depend only on the geometry, so a scratch zeroed once and reused for
/// planes of the same geometry stays zero everywhere else.
#[inline(always)]
fn fill_body<M: Madd>(
    dst: &mut [f32],
    pd: &Padded,
    src: &[f32],
    (sh, sw): (usize, usize),
    off: isize,
    up: usize,
) {
    assert!(
        up == 1 || pd.s == 1,
        "spreading and phase splitting at once"
    );
    let row_len = pd.row_len();
    let cols = valid_range(sw, pd.cols, up, off);
    if cols.is_empty() {
        return;
    }
    let first = (off + (cols.start * up) as isize) as usize;
    // Phase ph holds padded columns j = t * s + ph, i.e. source columns j - off: per phase,
    // the destination range in the row and the first source column.
    let rows = valid_range(sh, pd.rows, up, off);
    let dst_row = |r: usize| (off + (r * up) as isize) as usize * row_len;
    if up > 1 {
        for r in rows {
            let i = dst_row(r);
            spread(
                &mut dst[i + first..i + row_len],
                &src[r * sw..(r + 1) * sw][cols.clone()],
                up,
            );
        }
        return;
    }
    // Phase by phase (no per-call allocation for the phase table).
    for ph in 0..pd.s {
        let ts = valid_range(pd.wp, cols.end, pd.s, ph as isize - off);
        if ts.is_empty() {
            continue;
        }
        let c0 = ((ts.start * pd.s + ph) as isize - off) as usize;
        let range = ph * pd.wp + ts.start..ph * pd.wp + ts.end;
        for r in rows.clone() {
            let i = dst_row(r);
            gather(
                &mut dst[i + range.start..i + range.end],
                &src[r * sw + c0..(r + 1) * sw],
                pd.s,
            );
        }
    }
}

/// `dst[t] = src[t * s]` for every t (stride 2 compiled as a constant).
#[inline(always)]
fn gather(dst: &mut [f32], src: &[f32], s: usize) {
    #[inline(always)]
    fn strided<const S: usize>(dst: &mut [f32], src: &[f32]) {
        let whole = (src.len() / S).min(dst.len());
        for (d, c) in dst[..whole].iter_mut().zip(src.chunks_exact(S)) {
            *d = c[0];
        }
        for t in whole..dst.len() {
            dst[t] = src[t * S];
        }
    }
    match s {
        1 => dst.copy_from_slice(&src[..dst.len()]),
        2 => strided::<2>(dst, src),
        _ => {
            for (t, d) in dst.iter_mut().enumerate() {
                *d = src[t * s];
            }
        }
    }
}

/// `dst[t * up] = src[t]` for every t; the values in between are set to zero (they are
/// padding of the spread-out plane).
#[inline(always)]
fn spread(dst: &mut [f32], src: &[f32], up: usize) {
    let whole = (dst.len() / up).min(src.len());
    for (c, &v) in dst.chunks_exact_mut(up).zip(&src[..whole]) {
        c[0] = v;
        c[1..].fill(0.0);
    }
    for t in whole..src.len() {
        dst[t * up] = src[t];
    }
}

/// `out[oy][ox] = sum_{ky, kx} f[ky k + kx] P[oy s + ky][ox s + kx]` for `ho x wo` outputs.
#[inline(always)]
fn corr_body<M: Madd>(
    k: usize,
    s: usize,
    p: PlaneRef,
    f: &[f32],
    out: &mut [f32],
    ho: usize,
    wo: usize,
) {
    let f = &f[..k * k];
    for oy in 0..ho {
        let win = &p.data[oy * s * p.row..(oy * s + k) * p.row];
        let out_row = &mut out[oy * wo..(oy + 1) * wo];
        let mut ox = 0;
        while ox + 16 <= wo {
            corr_block::<M, 16>(k, s, win, p, f, ox, out_row);
            ox += 16;
        }
        if ox + 8 <= wo {
            corr_block::<M, 8>(k, s, win, p, f, ox, out_row);
            ox += 8;
        }
        // The rest as one more block ending at the row's end, overlapping outputs already
        // written (recomputing the same values), unless the row is too short.
        if ox < wo {
            if wo >= 8 {
                corr_block::<M, 8>(k, s, win, p, f, wo - 8, out_row);
            } else if wo >= 4 {
                corr_block::<M, 4>(k, s, win, p, f, 0, out_row);
                if wo > 4 {
                    corr_block::<M, 4>(k, s, win, p, f, wo - 4, out_row);
                }
            } else {
                for ox in 0..wo {
                    corr_block::<M, 1>(k, s, win, p, f, ox, out_row);
                }
            }
        }
    }
}

/// `L` consecutive outputs of one row, accumulated in registers over all taps.
#[inline(always)]
fn corr_block<M: Madd, const L: usize>(
    k: usize,
    s: usize,
    win: &[f32],
    p: PlaneRef,
    f: &[f32],
    ox: usize,
    out_row: &mut [f32],
) {
    let mut acc = [0f32; L];
    for ky in 0..k {
        let r = &win[ky * p.row..(ky + 1) * p.row];
        for kx in 0..k {
            let wv = f[ky * k + kx];
            let start = (kx % s) * p.wp + kx / s + ox;
            let src: &[f32; L] = r[start..start + L].try_into().unwrap();
            for i in 0..L {
                acc[i] = M::madd(wv, src[i], acc[i]);
            }
        }
    }
    out_row[ox..ox + L].copy_from_slice(&acc);
}

/// Per-tap lane accumulators of the weight gradient, summed once per channel at the end.
type Lanes = [f32; 16];

/// `lanes += a * b` element-wise over the longest common prefix (up to 16 at a time).
#[inline(always)]
fn dot_lanes<M: Madd>(a: &[f32], b: &[f32], acc: &mut Lanes) {
    // A local copy, so that the accumulators stay in registers.
    let mut lanes = *acc;
    let mut ac = a.chunks_exact(16);
    let mut bc = b.chunks_exact(16);
    for (x, y) in (&mut ac).zip(&mut bc) {
        let x: &[f32; 16] = x.try_into().unwrap();
        let y: &[f32; 16] = y.try_into().unwrap();
        for i in 0..16 {
            lanes[i] = M::madd(x[i], y[i], lanes[i]);
        }
    }
    let (mut x, mut y) = (ac.remainder(), bc.remainder());
    if x.len() >= 8 {
        let (x8, y8): (&[f32; 8], &[f32; 8]) =
            (x[..8].try_into().unwrap(), y[..8].try_into().unwrap());
        for i in 0..8 {
            lanes[i] = M::madd(x8[i], y8[i], lanes[i]);
        }
        (x, y) = (&x[8..], &y[8..]);
    }
    if x.len() >= 4 {
        let (x4, y4): (&[f32; 4], &[f32; 4]) =
            (x[..4].try_into().unwrap(), y[..4].try_into().unwrap());
        for i in 0..4 {
            lanes[8 + i] = M::madd(x4[i], y4[i], lanes[8 + i]);
        }
        (x, y) = (&x[4..], &y[4..]);
    }
    for (i, (a, b)) in x.iter().zip(y).enumerate() {
        lanes[12 + i] = M::madd(*a, *b, lanes[12 + i]);
    }
    *acc = lanes;
}

/// `acc[ky k + kx] += sum_{oy, ox} d[oy][ox] P[oy s + ky][ox s + kx]`, row by row.
#[inline(always)]
fn dw_body<M: Madd>(
    k: usize,
    s: usize,
    p: PlaneRef,
    d: &[f32],
    ho: usize,
    wo: usize,
    acc: &mut [Lanes],
) {
    for ky in 0..k {
        for kx in 0..k {
            let off = (kx % s) * p.wp + kx / s;
            let lanes = &mut acc[ky * k + kx];
            for oy in 0..ho {
                let start = (oy * s + ky) * p.row + off;
                dot_lanes::<M>(
                    &p.data[start..start + wo],
                    &d[oy * wo..(oy + 1) * wo],
                    lanes,
                );
            }
        }
    }
}

/// Stride 1: with the output gradient laid out at the padded plane's row length (zeros in
/// the last k - 1 columns of each row), tap (ky, kx) is a single dot product of `d` with the
/// plane shifted by `ky * row + kx`, with no per-row loop.
#[inline(always)]
fn dw_flat_body<M: Madd>(k: usize, p: PlaneRef, d: &[f32], acc: &mut [Lanes]) {
    for ky in 0..k {
        for kx in 0..k {
            let start = ky * p.row + kx;
            dot_lanes::<M>(&p.data[start..start + d.len()], d, &mut acc[ky * k + kx]);
        }
    }
}

#[inline(always)]
fn dw_flat_any<M: Madd>(k: usize, p: PlaneRef, d: &[f32], acc: &mut [Lanes]) {
    match k {
        1 => dw_flat_body::<M>(1, p, d, acc),
        3 => dw_flat_body::<M>(3, p, d, acc),
        5 => dw_flat_body::<M>(5, p, d, acc),
        7 => dw_flat_body::<M>(7, p, d, acc),
        k => dw_flat_body::<M>(k, p, d, acc),
    }
}

/// Calls `$body::<M>` with `k` and `s` as literal constants for the common shapes, so that
/// the tap loops unroll, and with the run-time values otherwise.
macro_rules! specialise {
    ($body:ident::<$m:ident>($k:expr, $s:expr, $($arg:expr),*)) => {
        match ($k, $s) {
            (1, 1) => $body::<$m>(1, 1, $($arg),*),
            (1, 2) => $body::<$m>(1, 2, $($arg),*),
            (3, 1) => $body::<$m>(3, 1, $($arg),*),
            (3, 2) => $body::<$m>(3, 2, $($arg),*),
            (5, 1) => $body::<$m>(5, 1, $($arg),*),
            (5, 2) => $body::<$m>(5, 2, $($arg),*),
            (7, 1) => $body::<$m>(7, 1, $($arg),*),
            (7, 2) => $body::<$m>(7, 2, $($arg),*),
            (k, s) => $body::<$m>(k, s, $($arg),*),
        }
    };
}

#[inline(always)]
fn corr_any<M: Madd>(
    k: usize,
    s: usize,
    p: PlaneRef,
    f: &[f32],
    out: &mut [f32],
    ho: usize,
    wo: usize,
) {
    specialise!(corr_body::<M>(k, s, p, f, out, ho, wo))
}

#[inline(always)]
fn dw_any<M: Madd>(
    k: usize,
    s: usize,
    p: PlaneRef,
    d: &[f32],
    ho: usize,
    wo: usize,
    acc: &mut [Lanes],
) {
    specialise!(dw_body::<M>(k, s, p, d, ho, wo, acc))
}

// `fill_body` does no arithmetic (`M` is unused) but its strided copies vectorise better
// with the wider instruction sets.
simd_dispatch!(fn fill(dst: &mut [f32], pd: &Padded, src: &[f32], size: (usize, usize), off: isize, up: usize) => fill_body);
simd_dispatch!(fn corr(k: usize, s: usize, p: PlaneRef, f: &[f32], out: &mut [f32], ho: usize, wo: usize) => corr_any);
simd_dispatch!(fn dw(k: usize, s: usize, p: PlaneRef, d: &[f32], ho: usize, wo: usize, acc: &mut [Lanes]) => dw_any);
simd_dispatch!(fn dw_flat(k: usize, p: PlaneRef, d: &[f32], acc: &mut [Lanes]) => dw_flat_any);

fn forward(g: &ConvGeom, x: &[f32], w: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; g.y_shape().iter().product()];
    forward_into(g, x, w, &mut y, true, &|_, _| {});
    y
}

/// Writes the convolution into `y` (every value overwritten), calling `post(plane, values)`
/// on each run of whole output planes right after it is computed, while it is in cache (the
/// eval executor's fused epilogue): `values` starts at plane `plane` (= sample * C + channel)
/// and never spans two samples (one plane, or for short rows a whole sample). With
/// `parallel`, planes (or samples) run on the rayon pool, or at batch 1 on the spinning team;
/// without, on the calling thread.
pub(crate) fn forward_into(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    parallel: bool,
    post: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let (kk, plane_in, plane_out) = (g.k * g.k, g.h * g.w, g.ho * g.wo);
    let pd = Padded::input(g);
    assert_eq!(
        y.len(),
        g.n * g.c_out * plane_out,
        "conv2d: output buffer size"
    );
    // Small planes in registers (AVX-512): one sample at a time.
    let batch_one = parallel && g.n < team::size();
    let small = plane_out <= SMALL_PLANE || (plane_out <= SMALL_PLANE_BATCHED && !batch_one);
    if let Some(sp) = small.then(|| depthwise_small::plan(g)).flatten() {
        let (sample_in, sample_out) = (g.c_in * plane_in, g.c_out * plane_out);
        let w = depthwise_small::weights(&sp, g, w);
        let one = |(n, out): (usize, &mut [f32])| {
            let xs = &x[n * sample_in..(n + 1) * sample_in];
            depthwise_small::forward_sample(&sp, g, xs, &w, out);
            post(n * g.c_out, out);
        };
        if parallel {
            y.par_chunks_mut(sample_out).enumerate().for_each(one);
        } else {
            y.chunks_mut(sample_out).enumerate().for_each(one);
        }
        return;
    }
    // Short rows: one sample at a time, channels last.
    if narrow_rows(g) {
        let (rows, cols) = (narrow_taps(g.ho, g.h, g), narrow_taps(g.wo, g.w, g));
        let ft = taps_major(w, g.c_in, kk);
        let sample_in = g.c_in * plane_in;
        let one = |scratch: &mut NarrowScratch, (n, out): (usize, &mut [f32])| {
            let xs = &x[n * sample_in..(n + 1) * sample_in];
            narrow(g, (&rows, &cols), &ft, xs, out, scratch);
            post(n * g.c_out, out);
        };
        let sample_out = g.c_out * plane_out;
        if parallel {
            y.par_chunks_mut(sample_out)
                .enumerate()
                .for_each_init(NarrowScratch::default, one);
        } else {
            let mut scratch = NarrowScratch::default();
            for item in y.chunks_mut(sample_out).enumerate() {
                one(&mut scratch, item);
            }
        }
        return;
    }
    let one = |buf: &mut Vec<f32>, (i, out): (usize, &mut [f32])| {
        let c = i % g.c_in;
        let src = &x[i * plane_in..(i + 1) * plane_in];
        fill(buf, &pd, src, (g.h, g.w), g.pad as isize, 1);
        corr(
            g.k,
            g.stride,
            pd.view(buf),
            &w[c * kk..(c + 1) * kk],
            out,
            g.ho,
            g.wo,
        );
        post(i, out);
    };
    if parallel && g.n < team::size() {
        // Too few samples to split the batch (batch-1 inference): the planes in one run per
        // thread of the spinning team, whose workers are awake between layers.
        let out = SharedMut::new(y);
        team::run_parts(g.n * g.c_out, team::size(), &|planes| {
            let (first, end) = (planes.start, planes.end);
            // SAFETY: tasks take disjoint runs of planes of `y`, which outlives the job.
            let part = unsafe { out.part(first * plane_out, (end - first) * plane_out) };
            let mut buf = vec![0f32; pd.len()];
            for (j, plane) in part.chunks_mut(plane_out).enumerate() {
                one(&mut buf, (first + j, plane));
            }
        });
    } else if parallel {
        y.par_chunks_mut(plane_out)
            .enumerate()
            .for_each_init(|| vec![0f32; pd.len()], one);
    } else {
        let mut buf = vec![0f32; pd.len()];
        for item in y.chunks_mut(plane_out).enumerate() {
            one(&mut buf, item);
        }
    }
}

/// `taps[o]`: the taps of output row (or column) `o` that fall inside the input, and the
/// input position of the first of them.
pub(super) fn narrow_taps(
    out_len: usize,
    in_len: usize,
    g: &ConvGeom,
) -> Vec<(std::ops::Range<usize>, usize)> {
    (0..out_len)
        .map(|o| {
            let start = (o * g.stride) as isize - g.pad as isize;
            let taps = valid_range(g.k, in_len, 1, start);
            let first = (start + taps.start as isize) as usize;
            (taps, first)
        })
        .collect()
}

/// The `c` filters of `kk` taps in `w` (`c x kk`) transposed to `kk x c`: each tap's weights
/// of consecutive channels side by side, for the loops that vectorise across channels.
pub(crate) fn taps_major(w: &[f32], c: usize, kk: usize) -> Vec<f32> {
    let mut ft = vec![0f32; kk * c];
    super::transpose::transpose(&w[..c * kk], (c, kk), &mut ft);
    ft
}

/// Output planes up to this size run in registers where they can (`depthwise_small`), one
/// sample per thread; up to [`SMALL_PLANE_BATCHED`] when there are samples for every thread.
/// Measured (MobileNet V2 at 32x32, alternating builds): 16x16 planes in registers are 2-4%
/// faster at batch 64, but at batch 1 the planes split over the team are faster than one
/// sample in registers on one thread (0.78 against 0.82 ms), and splitting a sample's
/// channels over the team for the small path was slower still (0.86 ms).
const SMALL_PLANE: usize = 64;
const SMALL_PLANE_BATCHED: usize = 256;

/// Whether output rows are short enough to run channels last ([`narrow_body`]): under 7
/// outputs, or under 8 for kernels of 5 and more. Measured on MobileNet V2: its 3x3
/// depthwise convs on 7x7 planes (224x224, batch 8) took 54 ms on the planes' 4-wide row
/// blocks against 27 ms channels last (`SLIMCANDLE_PROFILE=1`); on 4x4 planes (32x32, batch
/// 64) channels last is twice as fast; MobileNet V3 small's 5x5 ones on 7x7 planes were 5%
/// of the whole model faster channels last (25 taps of one vector across channels against
/// two 4-wide blocks per row).
fn narrow_rows(g: &ConvGeom) -> bool {
    g.wo < 7 || (g.wo < 8 && g.k >= 5)
}

/// Scratch of the narrow path: one sample's input, filters and output, channels last.
#[derive(Default)]
struct NarrowScratch {
    xt: Vec<f32>,
    yt: Vec<f32>,
}

pub(super) type Taps = [(std::ops::Range<usize>, usize)];

/// One sample of a depthwise conv whose output rows are too short to vectorise along: with
/// channels last, every tap is a vector operation across channels, and only the taps that
/// meet the input are visited. `ft` holds the filters as (k k) x C.
#[inline(always)]
fn narrow_body<M: Madd>(
    g: &ConvGeom,
    (rows, cols): (&Taps, &Taps),
    ft: &[f32],
    x: &[f32],
    out: &mut [f32],
    scratch: &mut NarrowScratch,
) {
    let (c, hw, p) = (g.c_in, g.h * g.w, g.ho * g.wo);
    let NarrowScratch { xt, yt } = scratch;
    xt.resize(hw * c, 0.0);
    super::transpose::transpose(&x[..c * hw], (c, hw), xt);
    yt.clear();
    yt.resize(p * c, 0.0);
    for (oy, (kys, iy)) in rows.iter().enumerate() {
        for (ox, (kxs, ix)) in cols.iter().enumerate() {
            let acc = &mut yt[(oy * g.wo + ox) * c..][..c];
            for (dy, ky) in kys.clone().enumerate() {
                for (dx, kx) in kxs.clone().enumerate() {
                    let f = &ft[(ky * g.k + kx) * c..][..c];
                    let v = &xt[((iy + dy) * g.w + ix + dx) * c..][..c];
                    for j in 0..c {
                        acc[j] = M::madd(f[j], v[j], acc[j]);
                    }
                }
            }
        }
    }
    super::transpose::transpose(&yt[..p * c], (p, c), out);
}

simd_dispatch!(fn narrow(g: &ConvGeom, taps: (&Taps, &Taps), ft: &[f32], x: &[f32], out: &mut [f32], scratch: &mut NarrowScratch) => narrow_body);

/// Returns `[dX | dW]` (each part only when requested).
pub(crate) fn backward(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    need_x: bool,
    need_w: bool,
) -> Vec<f32> {
    let (kk, plane_in, plane_out) = (g.k * g.k, g.h * g.w, g.ho * g.wo);
    let dx_len = if need_x { g.n * g.c_in * plane_in } else { 0 };
    let mut out = zeroed(dx_len + if need_w { g.c_in * kk } else { 0 });
    // Stride 1 on small planes: the input gradient is the depthwise convolution of the output
    // gradient with the flipped filters (padding k - 1 - p), which the small-plane kernel
    // computes a sample at a time in registers. Why: plane by plane, each 2x2 or 4x4 plane
    // took a padded copy and a 16-lane pass that is mostly padding (MobileNet V3 small's
    // depthwise backward at 2x2 and 4x4 was a third of its training step at 32x32).
    let transposed = ConvGeom {
        h: g.ho,
        w: g.wo,
        ho: g.h,
        wo: g.w,
        pad: (g.k - 1).wrapping_sub(g.pad),
        ..*g
    };
    let small_dx = (need_x && g.stride == 1 && g.pad < g.k && plane_in <= SMALL_PLANE_BATCHED)
        .then(|| depthwise_small::plan_partial(&transposed))
        .flatten();
    if let Some(sp) = &small_dx {
        let flipped: Vec<f32> = w[..g.c_in * kk]
            .chunks_exact(kk)
            .flat_map(|f| f.iter().rev().copied())
            .collect();
        let flipped = depthwise_small::weights(sp, &transposed, &flipped);
        let sample_out = g.c_in * plane_out;
        out[..dx_len]
            .par_chunks_mut(g.c_in * plane_in)
            .enumerate()
            .for_each(|(n, dxn)| {
                let dyn_ = &dy[n * sample_out..(n + 1) * sample_out];
                depthwise_small::forward_sample(sp, &transposed, dyn_, &flipped, dxn);
            });
    }
    let need_x_planes = need_x && small_dx.is_none();
    // The filter gradient on small planes in registers too, a channel group per task.
    let small_dw = (need_w && plane_out <= SMALL_PLANE_BATCHED)
        .then(|| depthwise_small::plan_partial(g))
        .flatten();
    if let Some(sp) = &small_dw {
        let per = depthwise_small::group(sp) * kk;
        out[dx_len..]
            .par_chunks_mut(per)
            .enumerate()
            .for_each(|(grp, dw)| depthwise_small::filter_grad(sp, g, x, dy, grp, dw));
    }
    let need_w_planes = need_w && small_dw.is_none();
    if !need_w_planes && !need_x_planes {
        return out;
    }
    let shared = SharedMut::new(&mut out);
    let (pd_x, pd_dy) = (Padded::input(g), Padded::grad(g));
    // The output gradient's offset in the spread-out plane: k - 1 - p (may be negative).
    let off_dy = g.k as isize - 1 - g.pad as isize;
    // Stride 1: the weight gradient reads the output gradient laid out at the padded input's
    // row length (see `dw_flat_body`).
    let flat = g.stride == 1;
    let flat_len = (g.ho - 1) * pd_x.row_len() + g.wo;
    (0..g.c_in).into_par_iter().for_each_init(
        || {
            let bx = vec![0f32; if need_w_planes { pd_x.len() } else { 0 }];
            let bd = vec![0f32; if need_x_planes { pd_dy.len() } else { 0 }];
            let bf = vec![0f32; if need_w_planes && flat { flat_len } else { 0 }];
            (bx, bd, bf)
        },
        |(bx, bd, bf), c| {
            let flipped: Vec<f32> = w[c * kk..(c + 1) * kk].iter().rev().copied().collect();
            let mut acc = vec![[0f32; 16]; kk];
            for n in 0..g.n {
                let i = n * g.c_in + c;
                let d = &dy[i * plane_out..(i + 1) * plane_out];
                if need_w_planes {
                    let src = &x[i * plane_in..(i + 1) * plane_in];
                    fill(bx, &pd_x, src, (g.h, g.w), g.pad as isize, 1);
                    if flat {
                        let row = pd_x.row_len();
                        for (oy, dr) in d.chunks_exact(g.wo).enumerate() {
                            bf[oy * row..oy * row + g.wo].copy_from_slice(dr);
                        }
                        dw_flat(g.k, pd_x.view(bx), bf, &mut acc);
                    } else {
                        dw(g.k, g.stride, pd_x.view(bx), d, g.ho, g.wo, &mut acc);
                    }
                }
                if need_x_planes {
                    fill(bd, &pd_dy, d, (g.ho, g.wo), off_dy, g.stride);
                    // SAFETY: plane (n, c) is written by this iteration only; `out` outlives
                    // the parallel loop.
                    let dx = unsafe { shared.part(i * plane_in, plane_in) };
                    corr(g.k, 1, pd_dy.view(bd), &flipped, dx, g.h, g.w);
                }
            }
            if need_w_planes {
                // SAFETY: channel c's filter gradient is written by this iteration only.
                let dw = unsafe { shared.part(dx_len + c * kk, kk) };
                for (d, lanes) in dw.iter_mut().zip(&acc) {
                    *d = lanes.iter().sum();
                }
            }
        },
    );
    out
}

/// Forward op: `(x, w) -> y`.
pub(crate) struct DepthwiseConv(pub ConvGeom);

impl CustomOp2 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "slimcandle-depthwise-conv2d"
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
        Ok((
            CpuStorage::F32(forward(g, x, w)),
            Shape::from_dims(&g.y_shape()),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        conv_backward(&self.0, x, w, dy, |need_x, need_w| DepthwiseBackward {
            g: self.0,
            need_x,
            need_w,
        })
    }
}

/// Backward op: `(x, w, dy) -> [dx | dw]`, flattened.
struct DepthwiseBackward {
    g: ConvGeom,
    need_x: bool,
    need_w: bool,
}

impl CustomOp3 for DepthwiseBackward {
    fn name(&self) -> &'static str {
        "slimcandle-depthwise-conv2d-backward"
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
