//! Max and average pooling with PyTorch's padding and ceil-mode rules, as Candle custom ops
//! with backward passes. Candle's own pooling has no backward when windows overlap
//! (kernel 3, stride 2), which SqueezeNet and both ShuffleNets use.

use super::alloc::init_zeros;
use super::team;
use crate::graph::shape::pooled_len;
use crate::kernels::simd::{Madd, simd_dispatch};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Padding never wins the max.
    Max,
    /// Zero padding counted in the divisor (PyTorch's `count_include_pad=True`).
    Avg,
}

#[derive(Debug, Clone, Copy)]
struct Pool {
    kind: Kind,
    kernel: usize,
    stride: usize,
    padding: usize,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

/// The float types pooling runs on (f64 serves gradient checks against references).
trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::Div<Output = Self>
{
    const NEG_INFINITY: Self;
    const ZERO: Self;
    fn from_usize(n: usize) -> Self;
    fn is_nan(self) -> bool;
}

macro_rules! float_impl {
    ($t:ty) => {
        impl Float for $t {
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            const ZERO: Self = 0.0;
            fn from_usize(n: usize) -> Self {
                n as $t
            }
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}
float_impl!(f32);
float_impl!(f64);

/// `b` if it is greater than `a`, or a NaN where `a` is not: the earlier value otherwise,
/// as the window search keeps its first maximum and its first NaN.
///
/// Branch-free (`|` and `&`, not `||` and `&&`), so that loops over it vectorise.
#[inline(always)]
fn max_or_nan<T: Float>(a: T, b: T) -> T {
    if (b > a) | (b.is_nan() & !a.is_nan()) {
        b
    } else {
        a
    }
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("pooling expects a contiguous tensor"),
    }
}

type Range = std::ops::Range<usize>;

impl Pool {
    /// The valid input window of output (oy, ox): row and column ranges (PyTorch clips a
    /// window to the input; for average pooling the divisor counts the padded area).
    fn window(&self, oy: usize, ox: usize) -> (Range, Range, usize) {
        let (ys, rows) = self.span(oy, self.h);
        let (xs, cols) = self.span(ox, self.w);
        (ys, xs, rows * cols)
    }

    /// The window of output `o` along one axis of `len` inputs: the input range it covers
    /// and its extent with the padding counted (the window's area is the rows' extent times
    /// the columns').
    fn span(&self, o: usize, len: usize) -> (Range, usize) {
        let lo = (o * self.stride) as isize - self.padding as isize;
        let hi = (lo + self.kernel as isize).min((len + self.padding) as isize);
        let clip = |a: isize| a.clamp(0, len as isize) as usize;
        (clip(lo)..clip(hi), (hi - lo) as usize)
    }

    /// Position (within the plane) of the first maximum of a window, as PyTorch picks it.
    fn argmax<T: Float>(&self, plane: &[T], ys: Range, xs: Range) -> usize {
        let mut best = (T::NEG_INFINITY, ys.start * self.w + xs.start);
        for y in ys {
            for x in xs.clone() {
                let v = plane[y * self.w + x];
                if v.is_nan() {
                    return y * self.w + x;
                }
                if v > best.0 {
                    best = (v, y * self.w + x);
                }
            }
        }
        best.1
    }

    fn forward<T: Float>(&self, x: &[T]) -> Vec<T> {
        let (plane_in, plane_out) = (self.h * self.w, self.oh * self.ow);
        let mut out = vec![T::ZERO; self.n * self.c * plane_out];
        out.par_chunks_mut(plane_out)
            .zip(x.par_chunks(plane_in))
            .for_each(|(o, plane)| self.plane(plane, o));
        out
    }

    /// One output plane `o` from one input plane.
    fn plane<T: Float>(&self, plane: &[T], o: &mut [T]) {
        if self.kind == Kind::Max {
            return self.max_plane(plane, o);
        }
        for oy in 0..self.oh {
            for ox in 0..self.ow {
                let (ys, xs, area) = self.window(oy, ox);
                o[oy * self.ow + ox] = match self.kind {
                    Kind::Max => plane[self.argmax(plane, ys, xs)],
                    Kind::Avg => {
                        let mut sum = T::ZERO;
                        for y in ys {
                            sum += plane[y * self.w + xs.start..y * self.w + xs.end]
                                .iter()
                                .copied()
                                .sum::<T>();
                        }
                        sum / T::from_usize(area)
                    }
                };
            }
        }
    }

    /// Max pooling of one plane, separably: per output row, the maximum down the window's
    /// rows for every column (contiguous, vectorised), then across each window's columns.
    /// Why: searching each k x k window with its argmax, a scalar loop, was 22% of SqueezeNet
    /// 1.1's batch-1 inference at 224x224. The values are the search's: a NaN wins (the
    /// first NaN met wins), otherwise the maximum (of zeros of both signs, the sign may
    /// differ).
    fn max_plane<T: Float>(&self, plane: &[T], o: &mut [T]) {
        let w = self.w;
        let mut col = vec![T::ZERO; w];
        // Every row's windows span the same columns.
        let spans: Vec<Range> = (0..self.ow).map(|ox| self.window(0, ox).1).collect();
        for (oy, out_row) in o.chunks_exact_mut(self.ow).take(self.oh).enumerate() {
            let (ys, _, _) = self.window(oy, 0);
            col.copy_from_slice(&plane[ys.start * w..][..w]);
            for y in ys.start + 1..ys.end {
                for (c, &v) in col.iter_mut().zip(&plane[y * w..][..w]) {
                    *c = max_or_nan(*c, v);
                }
            }
            for (out, xs) in out_row.iter_mut().zip(&spans) {
                *out = col[xs.start + 1..xs.end]
                    .iter()
                    .fold(col[xs.start], |m, &v| max_or_nan(m, v));
            }
        }
    }

    /// Input gradient from the input `x` and the output gradient `g`.
    fn backward<T: Float>(&self, x: &[T], g: &[T]) -> Vec<T> {
        let (plane_in, plane_out) = (self.h * self.w, self.oh * self.ow);
        let mut dx = vec![T::ZERO; x.len()];
        dx.par_chunks_mut(plane_in)
            .zip(x.par_chunks(plane_in))
            .zip(g.par_chunks(plane_out))
            .for_each(|((d, plane), go)| {
                for oy in 0..self.oh {
                    for ox in 0..self.ow {
                        let (ys, xs, area) = self.window(oy, ox);
                        let gv = go[oy * self.ow + ox];
                        match self.kind {
                            Kind::Max => d[self.argmax(plane, ys, xs)] += gv,
                            Kind::Avg => {
                                let share = gv / T::from_usize(area);
                                for y in ys {
                                    for v in &mut d[y * self.w + xs.start..y * self.w + xs.end] {
                                        *v += share;
                                    }
                                }
                            }
                        }
                    }
                }
            });
        dx
    }
}

impl CustomOp1 for Pool {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Max => "max_pool2d",
            Kind::Avg => "avg_pool2d",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from((self.n, self.c, self.oh, self.ow));
        match storage {
            CpuStorage::F32(x) => {
                Ok((CpuStorage::F32(self.forward(contiguous(x, layout)?)), shape))
            }
            CpuStorage::F64(x) => {
                Ok((CpuStorage::F64(self.forward(contiguous(x, layout)?)), shape))
            }
            _ => bail!("pooling expects f32 or f64 tensors"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg.apply_op2_no_bwd(&grad_res.contiguous()?, &PoolBackward(*self))?;
        Ok(Some(grad))
    }
}

/// Gradient of [`Pool`] with respect to its input: takes the input and the output gradient.
struct PoolBackward(Pool);

impl CustomOp2 for PoolBackward {
    fn name(&self) -> &'static str {
        "pool2d_backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = &self.0;
        let shape = Shape::from((p.n, p.c, p.h, p.w));
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => Ok((
                CpuStorage::F32(p.backward(contiguous(x, l1)?, contiguous(g, l2)?)),
                shape,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => Ok((
                CpuStorage::F64(p.backward(contiguous(x, l1)?, contiguous(g, l2)?)),
                shape,
            )),
            _ => bail!("pooling backward expects matching f32 or f64 tensors"),
        }
    }
}

/// The pooling op for an N x C x H x W input, with the output size checked.
fn geometry(
    (n, c, h, w): (usize, usize, usize, usize),
    kind: Kind,
    kernel: usize,
    stride: usize,
    padding: usize,
    ceil: bool,
) -> Result<Pool> {
    if 2 * padding > kernel {
        bail!("pool padding {padding} must be at most half the kernel {kernel}");
    }
    let (Some(oh), Some(ow)) = (
        pooled_len(h, kernel, stride, padding, 1, ceil),
        pooled_len(w, kernel, stride, padding, 1, ceil),
    ) else {
        bail!("a {h}x{w} input is too small for a {kernel}x{kernel} pooling window")
    };
    Ok(Pool {
        kind,
        kernel,
        stride,
        padding,
        n,
        c,
        h,
        w,
        oh,
        ow,
    })
}

fn pool(
    x: &Tensor,
    kind: Kind,
    kernel: usize,
    stride: usize,
    padding: usize,
    ceil: bool,
) -> Result<Tensor> {
    let op = geometry(x.dims4()?, kind, kernel, stride, padding, ceil)?;
    x.contiguous()?.apply_op1(op)
}

/// Max pooling (`max`, ceil mode as given) or average pooling (zero padding counted) of the
/// H x W planes in `x` into `y`; `y` must hold every output plane. With `parallel` the planes
/// are shared out over the rayon pool, otherwise they run on the calling thread (the eval
/// executor, which already runs chunks of the batch in parallel).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pool_into(
    max: bool,
    kernel: usize,
    stride: usize,
    padding: usize,
    ceil: bool,
    (h, w): (usize, usize),
    x: &[f32],
    y: &mut [f32],
    parallel: bool,
) -> Result<()> {
    let kind = if max { Kind::Max } else { Kind::Avg };
    let planes = x.len() / (h * w).max(1);
    let p = geometry((planes, 1, h, w), kind, kernel, stride, padding, ceil)?;
    let plane_out = p.oh * p.ow;
    if y.len() != planes * plane_out {
        bail!("pooling: output buffer size");
    }
    if parallel {
        // Runs of planes, so that each part sets up its row buffer once.
        let run = planes.div_ceil(4 * rayon::current_num_threads()).max(1);
        y.par_chunks_mut(run * plane_out)
            .zip(x.par_chunks(run * h * w))
            .for_each(|(o, xs)| p.planes_f32(xs, o));
    } else {
        p.planes_f32(x, y);
    }
    Ok(())
}

/// Max or average pooling as [`pool_into`] computes it, of `n` samples stored channels last
/// (NHWC, `c` values per pixel), for the eval executor's channels-last plans. Each output
/// pixel's `c` values are one vector operation per window position, across channels. With
/// `threads` > 1 (a batch smaller than the thread count) the output rows are shared out
/// over the spinning team: on one thread, SqueezeNet 1.1's first max pool (111x111 x 64) was
/// 10% of a batch-1 pass at 224x224, three times onnxruntime's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pool_channels_last_into(
    max: bool,
    kernel: usize,
    stride: usize,
    padding: usize,
    ceil: bool,
    (n, h, w, c): (usize, usize, usize, usize),
    x: &[f32],
    y: &mut [f32],
    threads: usize,
) -> Result<()> {
    let kind = if max { Kind::Max } else { Kind::Avg };
    let p = geometry((n, c, h, w), kind, kernel, stride, padding, ceil)?;
    if x.len() != n * h * w * c || y.len() != n * p.oh * p.ow * c {
        bail!("pooling: buffer sizes");
    }
    let sample_in = h * w * c;
    team::rows(y, p.ow * c, threads, &|u, row| {
        let (s, oy) = (u / p.oh, u % p.oh);
        let xs = &x[s * sample_in..][..sample_in];
        #[cfg(target_arch = "x86_64")]
        if super::simd::level() == super::simd::Level::Avx512 {
            // SAFETY: AVX-512F is present; `xs` is one sample and `row` one output row.
            return unsafe { rows_x86::row(&p, xs, oy, row) };
        }
        pool_row_channels_last(&p, xs, oy, row);
    });
    Ok(())
}

/// Global average pooling channels last: `y[s c + ch]` is the mean of channel `ch` over the
/// `pixels` pixels of sample `s` in `x` (each pixel's `c` values side by side). The pixels
/// go into [`SUMS`] interleaved partial sums (pixel `i` into sum `i % SUMS`), added pairwise
/// at the end and scaled by `1 / pixels`. Why: with one running sum, a plane of few channels
/// is one chain of dependent additions (MobileNet V3 small's 56x56 x 16 squeeze-and-excite
/// input: 3,136 in a row), and the compiled loop kept its sums in memory; MobileNet V3
/// small's ten global pools took 7.8 us a call at batch 1 (6% of a 224x224 pass).
pub(crate) fn global_avg_channels_last(
    x: &[f32],
    (n, pixels, c): (usize, usize, usize),
    y: &mut [f32],
) {
    assert!(
        x.len() == n * pixels * c && y.len() == n * c,
        "global pooling: buffer sizes"
    );
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 {
        // SAFETY: AVX-512F is present; the lengths are checked above.
        return unsafe { global_avg_x86::channels_last(x, (n, pixels, c), y) };
    }
    let inv = 1.0 / pixels as f32;
    let mut partial = vec![0f32; SUMS * c];
    for (out, sample) in y.chunks_exact_mut(c).zip(x.chunks_exact(pixels * c)) {
        partial.fill(0.0);
        for (i, pixel) in sample.chunks_exact(c).enumerate() {
            let sum = &mut partial[(i % SUMS) * c..][..c];
            for (o, &v) in sum.iter_mut().zip(pixel) {
                *o += v;
            }
        }
        let (p01, p23) = partial.split_at(2 * c);
        let (p0, p1) = p01.split_at(c);
        let (p2, p3) = p23.split_at(c);
        for (j, o) in out.iter_mut().enumerate() {
            *o = ((p0[j] + p1[j]) + (p2[j] + p3[j])) * inv;
        }
    }
}

/// Partial sums per channel in [`global_avg_channels_last`].
const SUMS: usize = 4;

/// [`global_avg_channels_last`] with its partial sums in AVX-512 registers, sixteen
/// channels a step.
#[cfg(target_arch = "x86_64")]
mod global_avg_x86 {
    use super::SUMS;
    use crate::kernels::simd::first_lanes;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F; `x` holds `n pixels c` values and `y` `n c`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn channels_last(
        x: &[f32],
        (n, pixels, c): (usize, usize, usize),
        y: &mut [f32],
    ) {
        assert!(x.len() >= n * pixels * c && y.len() >= n * c);
        let inv = _mm512_set1_ps(1.0 / pixels as f32);
        for s in 0..n {
            let (xs, ys) = (&x[s * pixels * c..], &mut y[s * c..]);
            for c0 in (0..c).step_by(16) {
                let mask = first_lanes(c - c0);
                let mut sums = [_mm512_setzero_ps(); SUMS];
                let at = |i: usize| {
                    // SAFETY: pixel i's channels c0.. (masked to c) lie within the sample.
                    unsafe { _mm512_maskz_loadu_ps(mask, xs.as_ptr().add(i * c + c0)) }
                };
                // SUMS pixels a step (constant indices: the sums stay in registers), then
                // the last pixels.
                let whole = pixels / SUMS * SUMS;
                for i in (0..whole).step_by(SUMS) {
                    for (j, sum) in sums.iter_mut().enumerate() {
                        *sum = _mm512_add_ps(*sum, at(i + j));
                    }
                }
                for (j, sum) in sums.iter_mut().enumerate().take(pixels - whole) {
                    *sum = _mm512_add_ps(*sum, at(whole + j));
                }
                let total = _mm512_add_ps(
                    _mm512_add_ps(sums[0], sums[1]),
                    _mm512_add_ps(sums[2], sums[3]),
                );
                let mean = _mm512_mul_ps(total, inv);
                // SAFETY: channels c0.. (masked) of the sample's output.
                unsafe { _mm512_mask_storeu_ps(ys.as_mut_ptr().add(c0), mask, mean) };
            }
        }
    }
}

/// [`pool_row_channels_last_body`] with each output pixel's maxima or sums in AVX-512
/// registers, four vectors of channels at a time, over the window in the same order (rows,
/// then columns). Why: the compiled loop kept them in the output row, a load, an operation
/// and a store per window position and vector (SqueezeNet 1.1's three max pools: 8% of a
/// one-thread pass at 96x96). The values are the scalar loop's: sums in the same order,
/// divided by the same area; maxima by `max_or_nan` (the first of equal values, a NaN kept
/// once met).
#[cfg(target_arch = "x86_64")]
mod rows_x86 {
    use super::{Kind, Pool};
    use crate::kernels::simd::first_lanes;
    use std::arch::x86_64::*;

    /// Vectors of channels per step.
    const V: usize = 4;

    /// # Safety
    /// AVX-512F; `xs` holds one sample (`h w c` values) and `out` the row's `ow c`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row(p: &Pool, xs: &[f32], oy: usize, out: &mut [f32]) {
        let c = p.c;
        assert!(xs.len() >= p.h * p.w * c && out.len() >= p.ow * c);
        let (ys, rows) = p.span(oy, p.h);
        let max = p.kind == Kind::Max;
        for ox in 0..p.ow {
            // The divisor is the window's area with the padding counted (`Pool::window`).
            let (cols, extent) = p.span(ox, p.w);
            let area = _mm512_set1_ps((rows * extent) as f32);
            for c0 in (0..c).step_by(16 * V) {
                // Vectors past the last channel have no lanes: nothing is read or written.
                let masks: [__mmask16; V] =
                    std::array::from_fn(|v| first_lanes(c.saturating_sub(c0 + 16 * v)));
                let start = if max { f32::NEG_INFINITY } else { 0.0 };
                let mut acc = [_mm512_set1_ps(start); V];
                for iy in ys.clone() {
                    for ix in cols.clone() {
                        let at = (iy * p.w + ix) * c + c0;
                        for (v, a) in acc.iter_mut().enumerate() {
                            // SAFETY: pixel (iy, ix) lies in the sample; masked lanes are not
                            // read (`wrapping_add`: an empty vector may point past the end).
                            let x = unsafe {
                                _mm512_maskz_loadu_ps(
                                    masks[v],
                                    xs.as_ptr().wrapping_add(at + 16 * v),
                                )
                            };
                            *a = if max {
                                // `max_ps(x, a)`: x if x > a, else a (ties keep the first,
                                // a NaN in `a` stays); a NaN in `x` replaces `a`.
                                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
                                _mm512_mask_mov_ps(_mm512_max_ps(x, *a), nan, x)
                            } else {
                                _mm512_add_ps(*a, x)
                            };
                        }
                    }
                }
                for (v, a) in acc.into_iter().enumerate() {
                    let val = if max { a } else { _mm512_div_ps(a, area) };
                    let at = out.as_mut_ptr().wrapping_add(ox * c + c0 + 16 * v);
                    // SAFETY: output pixel ox's channels (masked), within the row.
                    unsafe { _mm512_mask_storeu_ps(at, masks[v], val) };
                }
            }
        }
    }
}

/// Output row `oy` of one sample `xs` (channels last) into `out` (`ow` pixels of `c`).
#[inline(always)]
fn pool_row_channels_last_body<M: Madd>(p: &Pool, xs: &[f32], oy: usize, out: &mut [f32]) {
    let c = p.c;
    let (ys, rows) = p.span(oy, p.h);
    for (ox, o) in out.chunks_exact_mut(c).enumerate() {
        let (cols, extent) = p.span(ox, p.w);
        let pixel = |iy: usize, ix: usize| &xs[(iy * p.w + ix) * c..][..c];
        if p.kind == Kind::Max {
            o.fill(f32::NEG_INFINITY);
            for iy in ys.clone() {
                for ix in cols.clone() {
                    for (m, &v) in o.iter_mut().zip(pixel(iy, ix)) {
                        *m = max_or_nan(*m, v);
                    }
                }
            }
        } else {
            o.fill(0.0);
            for iy in ys.clone() {
                for ix in cols.clone() {
                    for (m, &v) in o.iter_mut().zip(pixel(iy, ix)) {
                        *m += v;
                    }
                }
            }
            // The window's area with the padding counted (`Pool::window`).
            let area = (rows * extent) as f32;
            for m in o.iter_mut() {
                *m /= area;
            }
        }
    }
}

simd_dispatch!(fn pool_row_channels_last(p: &Pool, xs: &[f32], oy: usize, out: &mut [f32]) => pool_row_channels_last_body);

impl Pool {
    /// Whole f32 planes: max pooling vectorised ([`max_planes`]), average pooling by windows.
    fn planes_f32(&self, x: &[f32], y: &mut [f32]) {
        if self.kind == Kind::Max {
            return max_planes(self, x, y);
        }
        self.avg_planes(x, y);
    }

    /// Average pooling of whole f32 planes, separably: per output row, the sums down the
    /// window's rows for every column (contiguous, vectorised), then across each window's
    /// columns, divided by the window's area (padding counted, as `Pool::plane`: its rows'
    /// extent times its columns', [`Pool::span`]). Why: the search per window was 15% of
    /// ShuffleNet V1's batch-1 inference at 224x224 (its stride-2 units' 3x3 shortcut pools,
    /// 0.30 ms a call to 14x14). The sums are in another order than `Pool::plane`'s (columns
    /// of row sums), so the last bits may differ.
    fn avg_planes(&self, x: &[f32], y: &mut [f32]) {
        let (h, w, oh, ow) = (self.h, self.w, self.oh, self.ow);
        let rows: Vec<(Range, usize)> = (0..oh).map(|oy| self.span(oy, h)).collect();
        let cols: Vec<(Range, usize)> = (0..ow).map(|ox| self.span(ox, w)).collect();
        let mut sums = vec![0f32; w];
        for (plane, out) in x.chunks_exact(h * w).zip(y.chunks_exact_mut(oh * ow)) {
            for ((ys, row_area), out_row) in rows.iter().zip(out.chunks_exact_mut(ow)) {
                sums.fill(0.0);
                for iy in ys.clone() {
                    for (s, &v) in sums.iter_mut().zip(&plane[iy * w..(iy + 1) * w]) {
                        *s += v;
                    }
                }
                for ((xs, col_area), o) in cols.iter().zip(out_row.iter_mut()) {
                    let sum: f32 = sums[xs.clone()].iter().sum();
                    *o = sum / (row_area * col_area) as f32;
                }
            }
        }
    }
}

/// Max pooling of whole f32 planes: the AVX-512 kernel ([`avx512::max_planes`]) for the
/// 3x3 / stride-2, 3x3 / stride-1 and 2x2 / stride-2 windows where the CPU has it,
/// [`max_planes_generic`] for other windows and CPUs. Both give the same bits.
fn max_planes(p: &Pool, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512::handles(p) {
        // SAFETY: `handles` checked that the CPU has AVX-512F.
        return unsafe { avx512::max_planes(p, x, y) };
    }
    max_planes_generic(p, x, y)
}

simd_dispatch!(fn max_planes_generic(p: &Pool, x: &[f32], y: &mut [f32]) => max_planes_body);

impl Pool {
    /// The layout of [`max_planes_body`]'s row buffer: its length `len` (input positions
    /// `-pad .. (ow - 1) s - pad + k`, shifted by `pad`), how many input columns it holds
    /// (`used`, from position `pad`), and each output row's range of input rows.
    fn row_layout(&self) -> (usize, usize, Vec<Range>) {
        let len = (self.ow - 1) * self.stride + self.kernel;
        let used = self.w.min(len - self.padding);
        let rows = (0..self.oh).map(|oy| self.window(oy, 0).0).collect();
        (len, used, rows)
    }

    /// One output row of [`max_planes_body`]: the maxima down the input rows `ys` of `plane`
    /// into `row[pad..pad + used]` (the rest of `row` stays negative infinity), then across
    /// each output column's window of `row`.
    #[inline(always)]
    fn max_row(
        &self,
        plane: &[f32],
        ys: &Range,
        used: usize,
        row: &mut [f32],
        out_row: &mut [f32],
    ) {
        let (w, k, s, pad) = (self.w, self.kernel, self.stride, self.padding);
        let maxima = &mut row[pad..pad + used];
        maxima.copy_from_slice(&plane[ys.start * w..][..used]);
        for iy in ys.start + 1..ys.end {
            for (m, &v) in maxima.iter_mut().zip(&plane[iy * w..][..used]) {
                *m = max_or_nan(*m, v);
            }
        }
        match (k, s) {
            (3, 2) => across::<3, 2>(row, out_row),
            (3, 1) => across::<3, 1>(row, out_row),
            (2, 2) => across::<2, 2>(row, out_row),
            _ => {
                for (ox, o) in out_row.iter_mut().enumerate() {
                    let win = &row[ox * s..ox * s + k];
                    *o = win[1..].iter().fold(win[0], |m, &v| max_or_nan(m, v));
                }
            }
        }
    }
}

/// Max pooling of whole f32 planes, separably as [`Pool::max_plane`], with the same values,
/// but with the row maxima in a buffer padded with negative infinity on both sides (which
/// never wins a window: every window holds at least one input value), so that every
/// output column's window is `k` values at `ox * stride` and the loop across a row has no
/// clipping; the common 3x3 / stride-2 and 2x2 windows get loops of a fixed shape, and the
/// whole body is compiled for AVX2 and AVX-512 (`simd_dispatch`). Why: the generic loop,
/// with a window search per output and two allocations per plane, was 11% of SqueezeNet
/// 1.1's inference at batch 64.
#[inline(always)]
fn max_planes_body<M: Madd>(p: &Pool, x: &[f32], y: &mut [f32]) {
    let (len, used, rows) = p.row_layout();
    let mut row = vec![f32::NEG_INFINITY; len];
    for (plane, out) in x
        .chunks_exact(p.h * p.w)
        .zip(y.chunks_exact_mut(p.oh * p.ow))
    {
        for (out_row, ys) in out.chunks_exact_mut(p.ow).zip(&rows) {
            p.max_row(plane, ys, used, &mut row, out_row);
        }
    }
}

/// `out[ox] = max(row[ox S .. ox S + K])`, first NaN winning, for a fixed window and stride.
#[inline(always)]
fn across<const K: usize, const S: usize>(row: &[f32], out: &mut [f32]) {
    for (ox, o) in out.iter_mut().enumerate() {
        let win = &row[ox * S..ox * S + K];
        let mut m = win[0];
        for &v in &win[1..] {
            m = max_or_nan(m, v);
        }
        *o = m;
    }
}

/// Max pooling with AVX-512 intrinsics, 16 columns at a time, for the 3x3 / stride-2
/// (SqueezeNet 1.1, ShuffleNet), 3x3 / stride-1 and 2x2 / stride-2 windows.
///
/// Why: in [`max_planes_body`] the pass across a row with stride 2 stays scalar (the
/// compiler does not gather even and odd columns), and `max_or_nan`'s three compares and
/// blend per value slow the pass down the rows; SqueezeNet 1.1's 3x3 / stride-2 pool of 64
/// 111x111 planes (batch 1, 224x224, 2 threads) took 0.30 ms a call, about 10 GB/s of
/// input, and its three max pools about 10% of the forward pass. Here the even and odd
/// columns come from two vectors with one `vpermt2ps` each. Measured (old and new builds
/// alternately, 3 rounds): the pool to 55x55 0.30-0.31 -> 0.15 ms a call, to 27x27
/// 0.14-0.17 -> 0.07, to 13x13 0.08-0.10 -> 0.04; the whole inference 192-194 -> 201-205
/// images/s.
///
/// The values are bit for bit those of [`max_planes_body`]: `_mm512_max_ps(v, m)` is "`v`
/// if `v > m`, otherwise `m`", which is `max_or_nan(m, v)` (ties, zeros of either sign
/// included, keep the earlier value) except when `v` is a NaN and `m` is not. So the
/// vectors are maximised in the scalar code's order (down the rows, then across the
/// window from the left), and any NaN among a row's inputs (rare: never in a trained
/// network) sends that output row to [`Pool::max_row`], the scalar code itself.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Pool, Range};
    use crate::kernels::simd::{Level, first_lanes, level};
    use std::arch::x86_64::*;

    /// Negative infinities after the row buffer's `len` values, so that every step of 16
    /// outputs across a row reads whole vectors: 34 values from the first output's window
    /// start, which is at most `len - 2`.
    const SLACK: usize = 32;

    /// Whether [`max_planes`] runs `p` (its window and stride, and AVX-512F on this CPU,
    /// unless `SLIMCANDLE_SIMD` caps the level).
    pub(super) fn handles(p: &Pool) -> bool {
        matches!((p.kernel, p.stride), (3, 2) | (3, 1) | (2, 2)) && level() == Level::Avx512
    }

    /// [`super::max_planes_body`] for the windows [`handles`] accepts.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn max_planes(p: &Pool, x: &[f32], y: &mut [f32]) {
        let (len, used, rows) = p.row_layout();
        let mut row = vec![f32::NEG_INFINITY; len + SLACK];
        for (plane, out) in x
            .chunks_exact(p.h * p.w)
            .zip(y.chunks_exact_mut(p.oh * p.ow))
        {
            for (out_row, ys) in out.chunks_exact_mut(p.ow).zip(&rows) {
                if down(plane, p.w, ys, &mut row[p.padding..p.padding + used]) {
                    p.max_row(plane, ys, used, &mut row, out_row);
                    continue;
                }
                match (p.kernel, p.stride) {
                    (3, 2) => across16::<3, 2>(&row, out_row),
                    (3, 1) => across16::<3, 1>(&row, out_row),
                    _ => across16::<2, 2>(&row, out_row),
                }
            }
        }
    }

    /// `maxima[j]` = the maximum of column `j` over the input rows `ys` of `plane` (rows of
    /// `w` values), as `max_or_nan` gives it down the rows if no input is a NaN. Returns
    /// whether some input is a NaN (then `maxima` is not to be used).
    #[target_feature(enable = "avx512f")]
    fn down(plane: &[f32], w: usize, ys: &Range, maxima: &mut [f32]) -> bool {
        let used = maxima.len();
        let mut nan: __mmask16 = 0;
        for j in (0..used).step_by(16) {
            let mask = first_lanes(used - j);
            let n = (used - j).min(16);
            let first = &plane[ys.start * w + j..][..n];
            // SAFETY: the masked loads and the store touch the first `n` values of slices
            // of `n` values (masked-off lanes are not accessed).
            unsafe {
                let mut prev = _mm512_maskz_loadu_ps(mask, first.as_ptr());
                let mut m = prev;
                for iy in ys.start + 1..ys.end {
                    let v = _mm512_maskz_loadu_ps(mask, plane[iy * w + j..][..n].as_ptr());
                    // A NaN in this row or the one before.
                    nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(prev, v);
                    m = _mm512_max_ps(v, m);
                    prev = v;
                }
                if ys.len() == 1 {
                    nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(m, m);
                }
                _mm512_mask_storeu_ps(maxima[j..j + n].as_mut_ptr(), mask, m);
            }
        }
        nan != 0
    }

    /// Whether [`ArgmaxRows`] runs `p`: stride 1 or 2, and AVX-512F on this CPU.
    pub(super) fn handles_argmax(p: &Pool) -> bool {
        matches!(p.stride, 1 | 2) && p.kernel >= 1 && level() == Level::Avx512
    }

    /// Max pooling with the position of each window's maximum (the training step's
    /// forward), in two passes over a plane, 16 outputs of a row at a time:
    ///
    /// 1. across: for every input row, each window's maximum along that row and its
    ///    position, its taps from the left (a load each, or for stride 2 the even lanes of
    ///    two), replacing the running maximum where greater (or the first NaN);
    /// 2. down: for every output row, its windows' rows' results from the top, by the same
    ///    rule.
    ///
    /// So the winner is the first of the window's maxima row by row (or its first NaN), the
    /// position [`Pool::argmax`] picks, PyTorch's. Why two passes: searching each window's
    /// rows in turn read every input row for each of the (up to `kernel / stride`) output
    /// rows sharing it, and the 3 x 3 / stride-2 pools of SqueezeNet 1.1 were 8% of its
    /// 96x96 training step; the scalar search per window before that, its branch on `v >
    /// best` a coin toss on real activations, was 7%.
    pub(super) struct ArgmaxRows {
        /// One input row with negative infinity on both sides: column `c` at `pad + c`.
        row: Vec<f32>,
        /// Pass 1's maxima and positions: input row `iy`'s at `iy * ow16`, an output row
        /// padded to a multiple of 16 windows.
        across: Vec<f32>,
        at: Vec<u32>,
    }

    impl ArgmaxRows {
        pub(super) fn new(p: &Pool) -> Self {
            let ow16 = p.ow.next_multiple_of(16);
            // The last step reads 32 values from (ow16 - 16) s + k - 1 on (stride 2).
            let len = ow16 * p.stride + p.kernel + 32;
            ArgmaxRows {
                row: vec![f32::NEG_INFINITY; len],
                across: vec![0.0; p.h * ow16],
                at: vec![0; p.h * ow16],
            }
        }

        /// One plane: `o` the window maxima, `idx` their positions within `plane`.
        ///
        /// # Safety
        /// The CPU has AVX-512F; `p` is the geometry `self` was made for, `plane` one input
        /// plane, `o` and `idx` one output plane each.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn plane(
            &mut self,
            p: &Pool,
            plane: &[f32],
            o: &mut [f32],
            idx: &mut [u32],
        ) {
            let (w, s, pad) = (p.w, p.stride, p.padding);
            let ow16 = p.ow.next_multiple_of(16);
            assert!(plane.len() == p.h * w && o.len() == p.oh * p.ow && idx.len() == o.len());
            assert!(self.row.len() >= ow16 * s + p.kernel + 32 && pad + w <= self.row.len());
            assert!(self.across.len() == p.h * ow16 && self.at.len() == self.across.len());
            // SAFETY: loads of 16 values from arrays of 16.
            let (even, lanes) = unsafe {
                (
                    _mm512_loadu_epi32(EVEN.as_ptr()),
                    _mm512_loadu_epi32(LANES.as_ptr()),
                )
            };
            let step = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(s as i32));
            for iy in 0..p.h {
                self.row[pad..pad + w].copy_from_slice(&plane[iy * w..(iy + 1) * w]);
                for ox0 in (0..ow16).step_by(16) {
                    // Column of tap kx = 0 of the 16 windows: ox s - pad (the padding's
                    // negative infinities are never taken).
                    let column =
                        _mm512_add_epi32(_mm512_set1_epi32((ox0 * s) as i32 - pad as i32), step);
                    let row_start = _mm512_set1_epi32((iy * w) as i32);
                    let mut pos = _mm512_add_epi32(row_start, column);
                    // Each window's first input of the row (its position if every value is
                    // -inf).
                    let mut at = _mm512_add_epi32(
                        row_start,
                        _mm512_max_epi32(column, _mm512_setzero_si512()),
                    );
                    let mut best = _mm512_set1_ps(f32::NEG_INFINITY);
                    // SAFETY: the row loads read at most 32 values from ox0 s + kx <= (ow16 -
                    // 16) s + k - 1, within `row` (asserted above).
                    let from = unsafe { self.row.as_ptr().add(ox0 * s) };
                    for kx in 0..p.kernel {
                        // SAFETY: as above.
                        let v = unsafe {
                            if s == 1 {
                                _mm512_loadu_ps(from.add(kx))
                            } else {
                                let (a, b) = (
                                    _mm512_loadu_ps(from.add(kx)),
                                    _mm512_loadu_ps(from.add(kx + 16)),
                                );
                                _mm512_permutex2var_ps(a, even, b)
                            }
                        };
                        let take = takes(v, best);
                        best = _mm512_mask_blend_ps(take, best, v);
                        at = _mm512_mask_blend_epi32(take, at, pos);
                        pos = _mm512_add_epi32(pos, _mm512_set1_epi32(1));
                    }
                    let i = iy * ow16 + ox0;
                    // SAFETY: `across` and `at` hold `h ow16` values (asserted above).
                    unsafe {
                        _mm512_storeu_ps(self.across.as_mut_ptr().add(i), best);
                        _mm512_storeu_epi32(self.at.as_mut_ptr().add(i) as *mut i32, at);
                    }
                }
            }
            for oy in 0..p.oh {
                let (ys, _, _) = p.window(oy, 0);
                // Every window has a row (PyTorch's rule for the last window in ceil mode);
                // the loads below rely on it.
                assert!(ys.start < ys.end && ys.end <= p.h, "pooling: empty window");
                for ox0 in (0..p.ow).step_by(16) {
                    let row = |iy: usize| iy * ow16 + ox0;
                    // SAFETY: `across` and `at` hold `h ow16` values and every row of `ys` is
                    // below `h`.
                    let load = |iy: usize| unsafe {
                        (
                            _mm512_loadu_ps(self.across.as_ptr().add(row(iy))),
                            _mm512_loadu_epi32(self.at.as_ptr().add(row(iy)) as *const i32),
                        )
                    };
                    let (mut best, mut at) = load(ys.start);
                    for iy in ys.start + 1..ys.end {
                        let (v, pos) = load(iy);
                        let take = takes(v, best);
                        best = _mm512_mask_blend_ps(take, best, v);
                        at = _mm512_mask_blend_epi32(take, at, pos);
                    }
                    let n = (p.ow - ox0).min(16);
                    let out = oy * p.ow + ox0;
                    // SAFETY: masked stores of the first `n` values of slices of `n`.
                    unsafe {
                        _mm512_mask_storeu_ps(o[out..out + n].as_mut_ptr(), first_lanes(n), best);
                        _mm512_mask_storeu_epi32(
                            idx[out..out + n].as_mut_ptr() as *mut i32,
                            first_lanes(n),
                            at,
                        );
                    }
                }
            }
        }
    }

    /// The lanes where `v` replaces the running maximum `best`: greater, or the first NaN.
    #[target_feature(enable = "avx512f")]
    fn takes(v: __m512, best: __m512) -> __mmask16 {
        _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, best)
            | (_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v)
                & !_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(best, best))
    }

    /// Lane `i` = `i`.
    const LANES: [i32; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

    /// Lane `i` = lane `2i` of the 32 lanes of two vectors.
    const EVEN: [i32; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
    /// Lane `i` = lane `2i + 1` of the 32 lanes of two vectors.
    const ODD: [i32; 16] = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31];

    /// `out[ox] = max(row[ox S .. ox S + K])`, from the left as [`super::across`] (for the
    /// windows of [`handles`]), 16 outputs at a time; `row` has [`SLACK`] values past the
    /// last window.
    #[target_feature(enable = "avx512f")]
    fn across16<const K: usize, const S: usize>(row: &[f32], out: &mut [f32]) {
        // SAFETY: loads of 16 values from arrays of 16.
        let (even, odd) = unsafe {
            (
                _mm512_loadu_epi32(EVEN.as_ptr()),
                _mm512_loadu_epi32(ODD.as_ptr()),
            )
        };
        for ox in (0..out.len()).step_by(16) {
            // The windows of outputs ox .. ox + 16 start in these 34 values.
            let win = &row[ox * S..][..34];
            // SAFETY: a load of 16 of the 34 values.
            let at = |i: usize| unsafe { _mm512_loadu_ps(win[i..][..16].as_ptr()) };
            let m = match (K, S) {
                (3, 1) => _mm512_max_ps(at(2), _mm512_max_ps(at(1), at(0))),
                (2, 2) => {
                    let (a, b) = (at(0), at(16));
                    let left = _mm512_permutex2var_ps(a, even, b);
                    _mm512_max_ps(_mm512_permutex2var_ps(a, odd, b), left)
                }
                _ => {
                    let (a, b) = (at(0), at(16));
                    let left = _mm512_permutex2var_ps(a, even, b);
                    let m = _mm512_max_ps(_mm512_permutex2var_ps(a, odd, b), left);
                    _mm512_max_ps(_mm512_permutex2var_ps(at(2), even, at(18)), m)
                }
            };
            let n = (out.len() - ox).min(16);
            // SAFETY: the masked store writes the first `n` values of a slice of `n`.
            unsafe { _mm512_mask_storeu_ps(out[ox..ox + n].as_mut_ptr(), first_lanes(n), m) };
        }
    }
}

/// The input gradient of [`pool_into`] from its input `x` and the output gradient `dy`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pool_backward(
    max: bool,
    kernel: usize,
    stride: usize,
    padding: usize,
    ceil: bool,
    (h, w): (usize, usize),
    x: &[f32],
    dy: &[f32],
) -> Result<Vec<f32>> {
    let kind = if max { Kind::Max } else { Kind::Avg };
    let planes = x.len() / (h * w).max(1);
    let p = geometry((planes, 1, h, w), kind, kernel, stride, padding, ceil)?;
    if dy.len() != planes * p.oh * p.ow {
        bail!("pooling backward: gradient buffer size");
    }
    Ok(p.backward(x, dy))
}

/// Train-mode max pooling of the H x W planes in `x` (planes in parallel): the window
/// maxima, and each one's position within its input plane, so that the backward pass is a
/// scatter ([`max_pool_backward_from`]) instead of a second search of every window (PyTorch
/// keeps these indices too).
pub(crate) fn max_pool_with_argmax(
    kernel: usize,
    stride: usize,
    padding: usize,
    ceil: bool,
    (h, w): (usize, usize),
    x: &[f32],
) -> Result<(Vec<f32>, Vec<u32>)> {
    let planes = x.len() / (h * w).max(1);
    let p = geometry((planes, 1, h, w), Kind::Max, kernel, stride, padding, ceil)?;
    let plane_out = p.oh * p.ow;
    let len = planes * plane_out;
    let (mut y, mut argmax) = (Vec::with_capacity(len), Vec::with_capacity(len));
    if plane_out == 0 {
        return Ok((y, argmax));
    }
    // Each output plane zero-filled right before the kernel writes it (while in cache),
    // instead of a pass over both buffers ahead of it.
    let planes_iter = y.spare_capacity_mut()[..len]
        .par_chunks_mut(plane_out)
        .zip(argmax.spare_capacity_mut()[..len].par_chunks_mut(plane_out))
        .zip(x.par_chunks(h * w))
        .map(|((o, idx), plane)| ((init_zeros(o), init_zeros(idx)), plane));
    #[cfg(target_arch = "x86_64")]
    let vectorised = avx512::handles_argmax(&p);
    #[cfg(not(target_arch = "x86_64"))]
    let vectorised = false;
    if vectorised {
        #[cfg(target_arch = "x86_64")]
        planes_iter.for_each_init(
            || avx512::ArgmaxRows::new(&p),
            // SAFETY: `handles_argmax` checked that the CPU has AVX-512F.
            |rows, ((o, idx), plane)| unsafe { rows.plane(&p, plane, o, idx) },
        );
    } else {
        planes_iter.for_each(|((o, idx), plane)| {
            for oy in 0..p.oh {
                for ox in 0..p.ow {
                    let (ys, xs, _) = p.window(oy, ox);
                    let at = p.argmax(plane, ys, xs);
                    o[oy * p.ow + ox] = plane[at];
                    idx[oy * p.ow + ox] = at as u32;
                }
            }
        });
    }
    // SAFETY: the loops above initialised all `len` values of both, within the capacity.
    unsafe {
        y.set_len(len);
        argmax.set_len(len);
    }
    Ok((y, argmax))
}

/// The input gradient (planes of `plane_in` values) of [`max_pool_with_argmax`] from its
/// `argmax` and the output gradient `dy` (planes of `plane_out` values).
pub(crate) fn max_pool_backward_from(
    argmax: &[u32],
    dy: &[f32],
    plane_in: usize,
    plane_out: usize,
) -> Vec<f32> {
    if plane_out == 0 {
        return Vec::new();
    }
    let len = dy.len() / plane_out * plane_in;
    let mut dx = Vec::with_capacity(len);
    // Each plane zero-filled right before its scatter, while in cache, instead of a pass
    // over the whole gradient ahead of them.
    dx.spare_capacity_mut()[..len]
        .par_chunks_mut(plane_in)
        .zip(argmax.par_chunks(plane_out))
        .zip(dy.par_chunks(plane_out))
        .for_each(|((d, idx), g)| {
            let d = init_zeros(d);
            for (&i, &gv) in idx.iter().zip(g) {
                d[i as usize] += gv;
            }
        });
    // SAFETY: the loop above initialised all `len` values, within the capacity.
    unsafe { dx.set_len(len) };
    dx
}

/// PyTorch's `max_pool2d` (padding never selected; ceil mode supported).
pub fn max_pool2d(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
    ceil_mode: bool,
) -> Result<Tensor> {
    pool(x, Kind::Max, kernel, stride, padding, ceil_mode)
}

/// PyTorch's `avg_pool2d` with `count_include_pad=True`.
pub fn avg_pool2d(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
    ceil_mode: bool,
) -> Result<Tensor> {
    pool(x, Kind::Avg, kernel, stride, padding, ceil_mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Global average pooling channels last against the f64 mean, on pixel counts under,
    /// at and over a multiple of the partial sums and channel counts around a vector.
    #[test]
    fn global_average_matches_the_mean() {
        for &(n, pixels, c) in &[
            (1, 1, 1),
            (2, 3, 17),
            (1, 49, 576),
            (2, 3136, 16),
            (3, 6, 100),
        ] {
            let x = crate::rng::Rng::new(5).normals(n * pixels * c);
            let mut y = vec![f32::NAN; n * c];
            global_avg_channels_last(&x, (n, pixels, c), &mut y);
            for s in 0..n {
                for ch in 0..c {
                    let mean = (0..pixels)
                        .map(|i| x[(s * pixels + i) * c + ch] as f64)
                        .sum::<f64>()
                        / pixels as f64;
                    let got = y[s * c + ch] as f64;
                    assert!(
                        (got - mean).abs() <= 1e-5,
                        "{n} x {pixels} x {c}: {got} vs {mean}"
                    );
                }
            }
        }
    }

    fn input(n: usize, c: usize, h: usize, w: usize, seed: u64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let v: Vec<f32> = (0..n * c * h * w).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, (n, c, h, w), &Device::Cpu).unwrap()
    }

    /// Reference: zero/-inf padding then a brute-force window loop in f64.
    fn reference(x: &Tensor, kind: Kind, k: usize, s: usize, p: usize, ceil: bool) -> Vec<f32> {
        let (n, c, h, w) = x.dims4().unwrap();
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let oh = pooled_len(h, k, s, p, 1, ceil).unwrap();
        let ow = pooled_len(w, k, s, p, 1, ceil).unwrap();
        let mut out = Vec::new();
        for plane in v.chunks(h * w).take(n * c) {
            for oy in 0..oh {
                for ox in 0..ow {
                    let (mut best, mut sum, mut area) = (f64::NEG_INFINITY, 0f64, 0usize);
                    for dy in 0..k {
                        for dx in 0..k {
                            let (y, x) = (
                                (oy * s + dy) as isize - p as isize,
                                (ox * s + dx) as isize - p as isize,
                            );
                            if y >= (h + p) as isize || x >= (w + p) as isize {
                                continue;
                            }
                            area += 1;
                            if y >= 0 && x >= 0 && y < h as isize && x < w as isize {
                                let val = plane[y as usize * w + x as usize] as f64;
                                best = best.max(val);
                                sum += val;
                            }
                        }
                    }
                    out.push(if kind == Kind::Max {
                        best as f32
                    } else {
                        (sum / area as f64) as f32
                    });
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_reference_and_backward_matches_finite_differences() {
        for (kind, k, s, p, ceil, h, w) in [
            (Kind::Max, 3, 2, 0, true, 13, 13),
            (Kind::Max, 3, 2, 1, false, 7, 9),
            (Kind::Max, 3, 2, 0, true, 6, 5),
            (Kind::Max, 2, 2, 0, false, 8, 8),
            (Kind::Avg, 3, 2, 1, false, 7, 9),
            (Kind::Avg, 3, 1, 1, false, 5, 4),
            (Kind::Avg, 2, 2, 0, true, 5, 5),
        ] {
            let x = input(2, 3, h, w, (h * 31 + w) as u64);
            let got = pool(&x, kind, k, s, p, ceil).unwrap();
            let want = reference(&x, kind, k, s, p, ceil);
            let got_v: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got_v.len(), want.len());
            for (a, b) in got_v.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{kind:?} k{k} s{s} p{p}: {a} vs {b}");
            }
            // Backward of sum(pool(x) * r) against central differences.
            let r = input(2, 3, got.dim(2).unwrap(), got.dim(3).unwrap(), 99);
            let var = Var::from_tensor(&x).unwrap();
            let loss = (pool(var.as_tensor(), kind, k, s, p, ceil).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap();
            let grad: Vec<f32> = loss
                .backward()
                .unwrap()
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let rv: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
            let f = |v: &[f32]| -> f64 {
                let t = Tensor::from_slice(v, x.dims(), &Device::Cpu).unwrap();
                reference(&t, kind, k, s, p, ceil)
                    .iter()
                    .zip(&rv)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum()
            };
            for i in (0..base.len()).step_by(7) {
                let eps = 1e-3;
                let mut plus = base.clone();
                plus[i] += eps;
                let mut minus = base.clone();
                minus[i] -= eps;
                let numeric = (f(&plus) - f(&minus)) / (2.0 * eps as f64);
                assert!(
                    (numeric - grad[i] as f64).abs() < 1e-2,
                    "{kind:?} grad {i}: {numeric} vs {}",
                    grad[i]
                );
            }
        }
    }

    /// Channels-last pooling (NHWC, rows shared over the team) against the f64 reference.
    #[test]
    fn channels_last_pooling_matches_the_reference_on_one_and_two_threads() {
        for (kind, k, s, p, ceil, h, w) in [
            (Kind::Max, 3, 2, 0, true, 13, 13),
            (Kind::Max, 3, 2, 1, false, 7, 9),
            (Kind::Max, 2, 2, 0, false, 8, 8),
            (Kind::Avg, 3, 2, 1, false, 7, 9),
            (Kind::Avg, 2, 2, 0, true, 5, 5),
        ] {
            for c in [19, 100] {
                let n = 2;
                let x = input(n, c, h, w, (h * 17 + w) as u64);
                let want = reference(&x, kind, k, s, p, ceil);
                let (oh, ow) = (
                    pooled_len(h, k, s, p, 1, ceil).unwrap(),
                    pooled_len(w, k, s, p, 1, ceil).unwrap(),
                );
                let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                // NCHW to NHWC.
                let mut xl = vec![0f32; v.len()];
                for (i, &val) in v.iter().enumerate() {
                    let (sample, ch, pix) = (i / (c * h * w), i / (h * w) % c, i % (h * w));
                    xl[(sample * h * w + pix) * c + ch] = val;
                }
                for threads in [1, 2] {
                    let mut y = vec![f32::NAN; n * oh * ow * c];
                    let max = kind == Kind::Max;
                    pool_channels_last_into(max, k, s, p, ceil, (n, h, w, c), &xl, &mut y, threads)
                        .unwrap();
                    for (i, &want) in want.iter().enumerate() {
                        let (sample, ch, pix) =
                            (i / (c * oh * ow), i / (oh * ow) % c, i % (oh * ow));
                        let got = y[(sample * oh * ow + pix) * c + ch];
                        assert!(
                            (got - want).abs() < 1e-5,
                            "{kind:?} k{k} s{s} p{p} {h}x{w} x {c}, {threads} threads: {got} vs {want}"
                        );
                    }
                    // A NaN in the first window reaches its output, as in PyTorch.
                    let mut with_nan = xl.clone();
                    with_nan[c + 3] = f32::NAN;
                    pool_channels_last_into(
                        max,
                        k,
                        s,
                        p,
                        ceil,
                        (n, h, w, c),
                        &with_nan,
                        &mut y,
                        threads,
                    )
                    .unwrap();
                    assert!(y[3].is_nan(), "{kind:?} k{k} s{s} p{p}: the NaN was lost");
                }
            }
        }
    }

    /// The separable average pooling of `pool_into` against the f64 reference, padding
    /// counted in the divisor, for every window, stride, padding and ceil mode.
    #[test]
    fn separable_average_pooling_matches_the_reference() {
        for (k, s, p, ceil, h, w) in [
            (3, 2, 1, false, 28, 28),
            (3, 2, 1, true, 7, 9),
            (3, 1, 1, false, 5, 4),
            (2, 2, 0, true, 5, 5),
            (3, 3, 0, true, 10, 11),
            (5, 2, 2, true, 12, 9),
        ] {
            let x = input(2, 3, h, w, (h * 7 + w) as u64);
            let want = reference(&x, Kind::Avg, k, s, p, ceil);
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let mut got = vec![f32::NAN; want.len()];
            pool_into(false, k, s, p, ceil, (h, w), &xs, &mut got, true).unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() < 1e-5,
                    "k{k} s{s} p{p} ceil {ceil}: [{i}] {a} vs {b}"
                );
            }
        }
    }

    /// The vectorised max pooling of `pool_into` against the window search of the Candle
    /// op's forward, value for value (NaN for NaN), with NaNs and infinities in the input,
    /// for every window, stride, padding and ceil mode, serial and over the rayon pool.
    #[test]
    fn vectorised_max_pooling_matches_the_window_search() {
        for (k, st, pad) in [
            (3, 2, 0),
            (3, 2, 1),
            (3, 1, 1),
            (2, 2, 0),
            (2, 1, 1),
            (5, 3, 2),
            (4, 2, 2),
        ] {
            for ceil in [false, true] {
                for (h, w) in [(13, 13), (7, 9), (6, 5), (5, 16), (17, 33)] {
                    let Ok(p) = geometry((1, 4, h, w), Kind::Max, k, st, pad, ceil) else {
                        continue;
                    };
                    let mut x: Vec<f32> = (0..4 * h * w)
                        .map(|i| ((i * 7919) % 23) as f32 - 11.0)
                        .collect();
                    x[3] = f32::NAN;
                    x[h * w + 2 * w + 1] = f32::INFINITY;
                    x[2 * h * w + w] = f32::NEG_INFINITY;
                    let plane_out = p.oh * p.ow;
                    let mut want = vec![0f32; 4 * plane_out];
                    for (o, plane) in want.chunks_mut(plane_out).zip(x.chunks(h * w)) {
                        p.plane(plane, o);
                    }
                    for parallel in [false, true] {
                        let mut got = vec![0f32; 4 * plane_out];
                        pool_into(true, k, st, pad, ceil, (h, w), &x, &mut got, parallel).unwrap();
                        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                a == b || (a.is_nan() && b.is_nan()),
                                "k{k} s{st} p{pad} ceil {ceil} {h}x{w} output {i}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The AVX-512 max pooling against the generic code it stands in for, bit for bit (NaN
    /// payloads and the signs of zeros included), and against the window search (NaN for
    /// NaN; zeros of either sign equal), for its three windows, padding 0 and 1, ceil mode on
    /// and off, and every width from 3 to 70 (every tail of a 16-lane vector, in and out).
    /// The inputs are drawn from a few values, so windows tie, with zeros of both signs,
    /// infinities, and NaNs of several payloads (a signalling one too): none in the first
    /// plane (the vector path throughout), rare in the second (some rows take the scalar
    /// path), common in the third.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_max_pooling_matches_the_generic_code_bit_for_bit() {
        use crate::kernels::simd::{Level, Separate, level};
        if level() != Level::Avx512 {
            eprintln!("skipped: this CPU has no AVX-512 (or SLIMCANDLE_SIMD caps it)");
            return;
        }
        let plain = [-1.0, -0.0, 0.0, 1.0, 2.0, f32::INFINITY, f32::NEG_INFINITY];
        let nans = [
            f32::NAN,
            f32::from_bits(0xffc0_0001),
            f32::from_bits(0x7f80_0001),
        ];
        let mut rng = crate::rng::Rng::new(11);
        let mut outputs = [0usize; 2];
        for (k, s) in [(3, 2), (3, 1), (2, 2)] {
            for pad in [0, 1] {
                for ceil in [false, true] {
                    for h in [2, 3, 4, 5, 8, 11] {
                        for w in 3..=70 {
                            let Ok(p) = geometry((1, 3, h, w), Kind::Max, k, s, pad, ceil) else {
                                continue;
                            };
                            assert!(avx512::handles(&p));
                            let x: Vec<f32> = [0, 5, 60]
                                .iter()
                                .flat_map(|&percent| (0..h * w).map(move |_| percent))
                                .map(|percent| {
                                    if rng.below(1000) < percent {
                                        nans[rng.below(nans.len())]
                                    } else {
                                        plain[rng.below(plain.len())]
                                    }
                                })
                                .collect();
                            let plane_out = p.oh * p.ow;
                            let mut want = vec![0f32; 3 * plane_out];
                            max_planes_body::<Separate>(&p, &x, &mut want);
                            let mut got = vec![1f32; 3 * plane_out];
                            // SAFETY: `level()` reported AVX-512F.
                            unsafe { avx512::max_planes(&p, &x, &mut got) };
                            let mut search = vec![0f32; plane_out];
                            for (i, plane) in x.chunks(h * w).enumerate() {
                                p.plane(plane, &mut search);
                                let got = &got[i * plane_out..][..plane_out];
                                let want = &want[i * plane_out..][..plane_out];
                                for (j, ((a, b), c)) in
                                    got.iter().zip(want).zip(&search).enumerate()
                                {
                                    // Formatted only on failure.
                                    let at = || format!("k{k} s{s} p{pad} ceil {ceil} {h}x{w}");
                                    assert_eq!(
                                        a.to_bits(),
                                        b.to_bits(),
                                        "{} plane {i} output {j}: {a} vs {b}",
                                        at()
                                    );
                                    assert!(
                                        a == c || (a.is_nan() && c.is_nan()),
                                        "{} plane {i} output {j}: {a} vs search {c}",
                                        at()
                                    );
                                    outputs[a.is_nan() as usize] += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
        // Both kinds of output were met.
        assert!(outputs[0] > 0 && outputs[1] > 0, "{outputs:?}");
    }

    #[test]
    fn non_contiguous_input_and_too_small_input() {
        let x = input(1, 4, 9, 9, 5).transpose(2, 3).unwrap();
        let a = max_pool2d(&x, 3, 2, 1, false).unwrap();
        let b = max_pool2d(&x.contiguous().unwrap(), 3, 2, 1, false).unwrap();
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(max_pool2d(&input(1, 1, 2, 2, 1), 3, 2, 0, false).is_err());
    }

    /// The argmax-saving max pooling picks the input `Pool::argmax` picks (the first of the
    /// window's maxima, row by row, or its first NaN) and returns its value, with zeros of
    /// both signs, infinities and NaNs among the ties.
    #[test]
    fn argmax_pooling_picks_the_searched_input() {
        let values = [0.0, -0.0, 1.0, -1.0, f32::NEG_INFINITY, f32::INFINITY, 0.5];
        for (k, st, pad, ceil, h, w) in [
            (3, 2, 0, true, 9, 8),
            (3, 2, 1, false, 7, 19),
            (3, 1, 1, false, 5, 6),
            (2, 2, 0, false, 6, 5),
            // Rows of more than 16 outputs (two steps of the vectorised search).
            (3, 2, 1, true, 9, 40),
            (2, 1, 0, false, 4, 21),
            (5, 2, 2, false, 6, 37),
        ] {
            for seed in 0..4usize {
                let mut x: Vec<f32> = (0..2 * h * w)
                    .map(|i| values[(i * 7919 + seed * 31) % (values.len() - seed.min(2))])
                    .collect();
                if seed == 3 {
                    x[7] = f32::NAN;
                    x[h * w + 3] = -f32::NAN;
                }
                let p = geometry((2, 1, h, w), Kind::Max, k, st, pad, ceil).unwrap();
                let n = 2 * p.oh * p.ow;
                let (y, argmax) = max_pool_with_argmax(k, st, pad, ceil, (h, w), &x).unwrap();
                assert_eq!((y.len(), argmax.len()), (n, n));
                for (plane_i, plane) in x.chunks_exact(h * w).enumerate() {
                    for oy in 0..p.oh {
                        for ox in 0..p.ow {
                            let (ys, xs, _) = p.window(oy, ox);
                            let want = p.argmax(plane, ys, xs);
                            let i = plane_i * p.oh * p.ow + oy * p.ow + ox;
                            assert_eq!(argmax[i] as usize, want, "k{k} s{st} ({oy}, {ox})");
                            assert_eq!(y[i].to_bits(), plane[want].to_bits());
                        }
                    }
                }
            }
        }
    }

    /// The train step's argmax-saving max pooling against the searching forward and
    /// backward, with ties (rounded inputs) and a NaN, for overlapping, padded and
    /// ceil-mode windows.
    #[test]
    fn argmax_pooling_matches_search() {
        for (k, st, pad, ceil, h, w) in [
            (3, 2, 0, true, 9, 8),
            (3, 2, 1, false, 7, 7),
            (2, 2, 0, false, 6, 5),
        ] {
            let mut x: Vec<f32> = (0..3 * h * w).map(|i| ((i * 7919) % 13) as f32).collect();
            x[5] = f32::NAN;
            let dy_len = 3
                * pooled_len(h, k, st, pad, 1, ceil).unwrap()
                * pooled_len(w, k, st, pad, 1, ceil).unwrap();
            let dy: Vec<f32> = (0..dy_len).map(|i| i as f32 * 0.5 - 3.0).collect();
            let mut want = vec![0f32; dy_len];
            pool_into(true, k, st, pad, ceil, (h, w), &x, &mut want, false).unwrap();
            let (got, argmax) = max_pool_with_argmax(k, st, pad, ceil, (h, w), &x).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "forward k{k} s{st} p{pad}");
            let want_dx = pool_backward(true, k, st, pad, ceil, (h, w), &x, &dy).unwrap();
            let got_dx = max_pool_backward_from(&argmax, &dy, h * w, dy_len / 3);
            assert_eq!(got_dx, want_dx, "backward k{k} s{st} p{pad}");
        }
    }
}
