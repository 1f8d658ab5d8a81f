//! The per-channel passes of train-mode batch norm over a block of channels' `N` planes each
//! in an NCHW buffer, in AVX-512 registers where the CPU has it, portable loops elsewhere.
//!
//! Why AVX-512 by hand: the crate is built for baseline x86-64, and these loops are not
//! dispatched through `simd_dispatch!` (their closures and lane arrays compiled to 4-wide SSE
//! with a scalar tail per plane); in the last stages a plane is 36 or 9 values, so the tail
//! was most of the work. Batch norm was about a third of a MobileNet V1 0.5 or V2 training
//! step at 96x96. Here a plane's last partial vector is a masked load and store, the
//! statistics are one pass (sums about a shift, below) and an activation that follows the
//! batch norm (ReLU, ReLU6) is applied in the same pass forward and masks the gradient in the
//! same passes backward.
//!
//! Sums go into f32 vectors (two of each, to halve the chains of dependent additions) and are
//! added into f64 every [`FLUSH`] values or more, as the portable loops do.

use super::super::{activation::clamp, cpu::SharedMut};

/// Values a channel's sums take in f32 lanes before they are added into the f64 totals: at
/// most about `FLUSH / 16` values per lane (or one plane's share of them, for planes larger
/// than this), while small planes (3 x 3 to 16 x 16 in the last stages) share one reduction
/// between several of them.
const FLUSH: usize = 1 << 10;

/// A block of consecutive channels' planes in an NCHW buffer of `(n, c, plane)`: plane `i`
/// of channel `ch` holds the values `(i c + ch) plane ..` `+ plane`. The passes walk them
/// sample by sample, the block's planes of a sample being one contiguous run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Planes {
    first: usize,
    step: usize,
    count: usize,
    len: usize,
    channels: usize,
}

impl Planes {
    /// Channels `channels` (consecutive) of an NCHW buffer of `dims`.
    pub(crate) fn block(
        channels: std::ops::Range<usize>,
        (n, c, plane): (usize, usize, usize),
    ) -> Self {
        Planes {
            first: channels.start * plane,
            step: c * plane,
            count: n,
            len: plane,
            channels: channels.len(),
        }
    }

    /// The first sample's planes alone.
    pub(crate) fn first_only(self) -> Self {
        Planes {
            count: self.count.min(1),
            ..self
        }
    }

    /// Where sample `s`'s plane of the block's channel `j` starts.
    #[inline(always)]
    fn at(self, s: usize, j: usize) -> usize {
        self.first + s * self.step + j * self.len
    }

    /// `(offset, j)` of every plane, sample by sample.
    pub(crate) fn offsets(self) -> impl Iterator<Item = (usize, usize)> {
        (0..self.count).flat_map(move |s| (0..self.channels).map(move |j| (self.at(s, j), j)))
    }

    /// The buffer length these planes need.
    fn end(self) -> usize {
        match (self.count, self.channels) {
            (0, _) | (_, 0) => 0,
            (n, _) => self.at(n - 1, self.channels - 1) + self.len,
        }
    }
}

/// The ReLU or ReLU6 after a batch norm, as its backward sees it: the gradient passes where
/// the activation's output is in `(0, upper)` (`upper` infinite for ReLU) and is zero
/// elsewhere (a NaN blocks it), as `Kind::backward` does on the output (`upper` from
/// `Kind::clamp_upper`).
#[derive(Clone, Copy)]
pub(crate) struct ActMask<'a> {
    pub source: Source<'a>,
    pub upper: f32,
}

/// Where [`ActMask`] finds the activation's output.
#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    /// As the forward pass stored it (or a fake-quantization mask of 1 and 0 standing for it).
    Output(&'a [f32]),
    /// Recomputed from the batch norm's input with the forward's affine map, `affine[j]` for
    /// channel `j` of the block: the same operations as [`normalize`], so the same values,
    /// and one buffer fewer read in each backward pass (the output is not read at all).
    Affine(&'a [(f32, f32)]),
}

impl<'a> ActMask<'a> {
    /// The mask for the block of channels `channels` (an affine source cut to them).
    pub(crate) fn for_channels(self, channels: std::ops::Range<usize>) -> Self {
        match self.source {
            Source::Output(_) => self,
            Source::Affine(a) => ActMask {
                source: Source::Affine(&a[channels]),
                upper: self.upper,
            },
        }
    }

    /// Whether the source covers these planes.
    fn covers(&self, p: Planes) -> bool {
        match self.source {
            Source::Output(y) => y.len() >= p.end(),
            Source::Affine(a) => a.len() >= p.channels,
        }
    }

    /// The gradient `g` at value `at` (input `x`, block channel `j`) with the mask applied:
    /// the portable loops' form.
    #[inline(always)]
    fn apply(&self, g: f32, at: usize, x: f32, j: usize) -> f32 {
        let y = match self.source {
            Source::Output(y) => y[at],
            // As `normalize` computes it (before the clamp, which keeps (0, upper) as is).
            Source::Affine(a) => x * a[j].0 + a[j].1,
        };
        if y > 0.0 && y < self.upper { g } else { 0.0 }
    }
}

/// Whether the AVX-512 loops run (checked once per call of a public pass).
#[inline]
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::super::simd::level() == super::super::simd::Level::Avx512
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `(sum (x - shift), sum (x - shift)^2)` over each channel's planes of `x`, with the
/// channel's `shifts[j]`.
///
/// Why a shift: the statistics in one pass (`var = E[(x - s)^2] - E[x - s]^2`) lose the
/// variance to cancellation when the mean is far from zero relative to the spread; with `s`
/// near the mean (the caller's: the first plane's mean) the two terms stay of the variance's
/// size.
pub(crate) fn shifted_sums(x: &[f32], p: Planes, shifts: &[f32]) -> Vec<(f64, f64)> {
    assert!(x.len() >= p.end(), "batch norm: planes outside the input");
    assert_eq!(
        shifts.len(),
        p.channels,
        "batch norm: one shift per channel"
    );
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is present; the planes lie within `x` (checked above).
        return unsafe { x86::shifted_sums(x, p, shifts) };
    }
    lane_sums(p, |o, j, lanes| {
        for (l, &v) in lanes.iter_mut().zip(&x[o..]) {
            let d = v - shifts[j];
            l.0 += d;
            l.1 += d * d;
        }
    })
}

/// `y = act(x scale + shift)` over the planes with each channel's `affine[j]`, `act` the
/// clamp to `[0, upper]` when given (ReLU: `upper` infinite; NaN stays NaN, as
/// `Kind::forward`).
///
/// # Safety
/// No other thread reads or writes these planes of `y` during the call (they may be
/// uninitialised before it).
pub(crate) unsafe fn normalize(
    x: &[f32],
    y: &SharedMut,
    p: Planes,
    affine: &[(f32, f32)],
    upper: Option<f32>,
) {
    assert!(
        x.len() >= p.end() && y.len() >= p.end(),
        "batch norm: planes outside the buffers"
    );
    assert_eq!(
        affine.len(),
        p.channels,
        "batch norm: one affine map per channel"
    );
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is present; bounds checked above.
        return unsafe { x86::normalize(x, y.as_ptr(), p, affine, upper) };
    }
    for (o, j) in p.offsets() {
        let (scale, shift) = affine[j];
        for (i, &v) in x[o..o + p.len].iter().enumerate() {
            let t = v * scale + shift;
            let t = match upper {
                Some(u) => clamp(t, 0.0, u),
                None => t,
            };
            // SAFETY: within the planes, which the caller gives this call alone.
            unsafe { y.as_ptr().add(o + i).write(t) };
        }
    }
}

/// `(sum g, sum g (x - mean))` over each channel's planes (`means[j]`), `g` the output
/// gradient `dy` with the mask applied when given.
pub(crate) fn grad_sums(
    dy: &[f32],
    x: &[f32],
    mask: Option<ActMask>,
    p: Planes,
    means: &[f32],
) -> Vec<(f64, f64)> {
    assert!(
        dy.len() >= p.end() && x.len() >= p.end() && mask.is_none_or(|m| m.covers(p)),
        "batch norm: planes outside the gradient"
    );
    assert_eq!(means.len(), p.channels, "batch norm: one mean per channel");
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is present; all planes lie within the buffers (checked above).
        return unsafe { x86::grad_sums(dy, x, mask, p, means) };
    }
    lane_sums(p, |o, j, lanes| {
        for (i, l) in lanes.iter_mut().enumerate() {
            let at = o + i;
            let g = mask.map_or(dy[at], |m| m.apply(dy[at], at, x[at], j));
            l.0 += g;
            l.1 += g * (x[at] - means[j]);
        }
    })
}

/// `dx = k1 g + k2 x + bias` over the planes with each channel's `k[j]` (`g` as in
/// [`grad_sums`]).
///
/// # Safety
/// As [`normalize`], for `dx`.
pub(crate) unsafe fn grad_input(
    dy: &[f32],
    x: &[f32],
    mask: Option<ActMask>,
    dx: &SharedMut,
    p: Planes,
    k: &[(f32, f32, f32)],
) {
    assert!(
        dy.len() >= p.end()
            && x.len() >= p.end()
            && dx.len() >= p.end()
            && mask.is_none_or(|m| m.covers(p)),
        "batch norm: planes outside the gradient"
    );
    assert_eq!(
        k.len(),
        p.channels,
        "batch norm: one set of terms per channel"
    );
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is present; bounds checked above.
        return unsafe { x86::grad_input(dy, x, mask, dx.as_ptr(), p, k) };
    }
    for (o, j) in p.offsets() {
        let (k1, k2, bias) = k[j];
        for i in o..o + p.len {
            let g = mask.map_or(dy[i], |m| m.apply(dy[i], i, x[i], j));
            // SAFETY: within the planes, which the caller gives this call alone.
            unsafe { dx.as_ptr().add(i).write(k1 * g + k2 * x[i] + bias) };
        }
    }
}

/// Two sums per channel over the planes in 16 f32 lanes each: `add(offset, j, lanes)` adds
/// up to 16 consecutive values of channel `j` from `offset` (fewer at a plane's end: `lanes`
/// is cut to the plane), lanes added into f64 every [`FLUSH`] values or more.
fn lane_sums(p: Planes, add: impl Fn(usize, usize, &mut [(f32, f32)])) -> Vec<(f64, f64)> {
    let mut lanes = vec![[(0f32, 0f32); 16]; p.channels];
    let mut total = vec![(0f64, 0f64); p.channels];
    let flush = |lanes: &mut [[(f32, f32); 16]], total: &mut [(f64, f64)]| {
        for (ls, t) in lanes.iter_mut().zip(total.iter_mut()) {
            for l in ls.iter_mut() {
                (t.0, t.1) = (t.0 + l.0 as f64, t.1 + l.1 as f64);
                *l = (0.0, 0.0);
            }
        }
    };
    let mut pending = 0;
    for s in 0..p.count {
        for (j, ls) in lanes.iter_mut().enumerate() {
            let o = p.at(s, j);
            for start in (0..p.len).step_by(16) {
                let width = (p.len - start).min(16);
                add(o + start, j, &mut ls[..width]);
            }
        }
        pending += p.len;
        if pending >= FLUSH {
            flush(&mut lanes, &mut total);
            pending = 0;
        }
    }
    flush(&mut lanes, &mut total);
    total
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ActMask, FLUSH, Planes, Source};
    use crate::kernels::simd::first_lanes;
    use std::arch::x86_64::*;

    /// Two running sums per channel of the block in f32 vectors, added into f64 every
    /// [`FLUSH`] values of each channel.
    struct Sums {
        vectors: Vec<[__m512; 2]>,
        total: Vec<(f64, f64)>,
        pending: usize,
    }

    impl Sums {
        #[target_feature(enable = "avx512f")]
        fn new(channels: usize) -> Self {
            Sums {
                vectors: vec![[_mm512_setzero_ps(); 2]; channels],
                total: vec![(0.0, 0.0); channels],
                pending: 0,
            }
        }

        /// Adds one plane's two sums (each in two vectors) into channel `j`'s.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn add_plane(&mut self, j: usize, [a0, a1, b0, b1]: [__m512; 4]) {
            let v = &mut self.vectors[j];
            v[0] = _mm512_add_ps(v[0], _mm512_add_ps(a0, a1));
            v[1] = _mm512_add_ps(v[1], _mm512_add_ps(b0, b1));
        }

        /// Counts a sample's planes of `len` values; flushes once [`FLUSH`] are pending.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn sample_done(&mut self, len: usize) {
            self.pending += len;
            if self.pending >= FLUSH {
                self.flush();
            }
        }

        #[target_feature(enable = "avx512f")]
        fn flush(&mut self) {
            let wide = |v: __m512| {
                let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
                let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                    _mm512_castps_pd(v),
                )));
                _mm512_reduce_add_pd(_mm512_add_pd(lo, hi))
            };
            for (v, t) in self.vectors.iter_mut().zip(self.total.iter_mut()) {
                (t.0, t.1) = (t.0 + wide(v[0]), t.1 + wide(v[1]));
                *v = [_mm512_setzero_ps(); 2];
            }
            self.pending = 0;
        }

        #[target_feature(enable = "avx512f")]
        fn finish(mut self) -> Vec<(f64, f64)> {
            self.flush();
            self.total
        }
    }

    /// Calls `step(i, mask, k)` for each vector of a plane of `len` values: `i` its first
    /// value, `mask` its lanes (all but in the last, partial one), `k` which of two sums it
    /// goes into (alternating, a constant in each call so that the sums stay in registers).
    #[inline(always)]
    fn vectors(len: usize, mut step: impl FnMut(usize, __mmask16, usize)) {
        let full = len / 16 * 16;
        let mut i = 0;
        while i + 32 <= full {
            step(i, u16::MAX, 0);
            step(i + 16, u16::MAX, 1);
            i += 32;
        }
        if i < full {
            step(i, u16::MAX, 0);
        }
        if full < len {
            step(full, first_lanes(len - full), 1);
        }
    }

    /// Both sums of one plane: `terms(i, mask)` gives the two terms of vector `i` (lanes
    /// outside `mask` zero), each summed in two alternating vectors.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn plane_sums(
        len: usize,
        mut terms: impl FnMut(usize, __mmask16) -> (__m512, __m512),
    ) -> [__m512; 4] {
        let mut s = [_mm512_setzero_ps(); 4];
        vectors(len, |i, m, k| {
            let (a, b) = terms(i, m);
            s[k] = _mm512_add_ps(s[k], a);
            s[2 + k] = _mm512_add_ps(s[2 + k], b);
        });
        s
    }

    /// # Safety
    /// AVX-512F; the planes lie within `x`; one shift per channel.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn shifted_sums(x: &[f32], p: Planes, shifts: &[f32]) -> Vec<(f64, f64)> {
        let mut sums = Sums::new(p.channels);
        for s in 0..p.count {
            for (j, &shift) in shifts.iter().enumerate() {
                let base = x[p.at(s, j)..][..p.len].as_ptr();
                let sh = _mm512_set1_ps(shift);
                let plane = plane_sums(p.len, |i, m| {
                    // SAFETY: value i.. of the plane (masked lanes are not read).
                    let v = unsafe { _mm512_maskz_loadu_ps(m, base.add(i)) };
                    let d = _mm512_maskz_sub_ps(m, v, sh);
                    (d, _mm512_mul_ps(d, d))
                });
                sums.add_plane(j, plane);
            }
            sums.sample_done(p.len);
        }
        sums.finish()
    }

    /// # Safety
    /// AVX-512F; the planes lie within `x` and `y` (whose planes no one else touches).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn normalize(
        x: &[f32],
        y: *mut f32,
        p: Planes,
        affine: &[(f32, f32)],
        upper: Option<f32>,
    ) {
        let zero = _mm512_setzero_ps();
        let top = _mm512_set1_ps(upper.unwrap_or(f32::INFINITY));
        for (o, j) in p.offsets() {
            let (a, b) = (_mm512_set1_ps(affine[j].0), _mm512_set1_ps(affine[j].1));
            let src = x[o..o + p.len].as_ptr();
            vectors(p.len, |i, m, _| {
                // SAFETY: value i.. of the plane in `x` and `y` (masked lanes untouched).
                unsafe {
                    let t = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, src.add(i)), a, b);
                    // `max_ps(0, t)` is t unless 0 > t (a NaN t stays), then `min_ps(top, .)`.
                    let t = match upper {
                        Some(_) => _mm512_min_ps(top, _mm512_max_ps(zero, t)),
                        None => t,
                    };
                    _mm512_mask_storeu_ps(y.add(o + i), m, t);
                }
            });
        }
    }

    /// The mask's recomputing map for block channel `j` as vectors (zeros for no mask or a
    /// stored output).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn affine_of(mask: Option<ActMask>, j: usize) -> (__m512, __m512) {
        match mask.map(|m| m.source) {
            Some(Source::Affine(a)) => (_mm512_set1_ps(a[j].0), _mm512_set1_ps(a[j].1)),
            _ => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        }
    }

    /// The gradient's vector at value `at` with the mask applied (lanes outside `m` zero);
    /// `v` is the input's vector there and `ab` [`affine_of`] its channel.
    ///
    /// # Safety
    /// AVX-512F; the lanes `m` from `at` lie within `dy` and a stored output.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn gradient(
        dy: &[f32],
        mask: Option<ActMask>,
        at: usize,
        m: __mmask16,
        v: __m512,
        (a, b): (__m512, __m512),
    ) -> __m512 {
        // SAFETY: the caller's.
        unsafe {
            let Some(act) = mask else {
                return _mm512_maskz_loadu_ps(m, dy.as_ptr().add(at));
            };
            let y = match act.source {
                Source::Output(y) => _mm512_maskz_loadu_ps(m, y.as_ptr().add(at)),
                // `normalize`'s value before its clamp (the clamp keeps (0, upper) as is).
                Source::Affine(_) => _mm512_fmadd_ps(v, a, b),
            };
            let pass = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(m, y, _mm512_setzero_ps())
                & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(y, _mm512_set1_ps(act.upper));
            _mm512_maskz_loadu_ps(pass, dy.as_ptr().add(at))
        }
    }

    /// # Safety
    /// AVX-512F; the planes lie within `dy`, `x` and the mask's `y`; one mean per channel.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn grad_sums(
        dy: &[f32],
        x: &[f32],
        mask: Option<ActMask>,
        p: Planes,
        means: &[f32],
    ) -> Vec<(f64, f64)> {
        let mut sums = Sums::new(p.channels);
        for s in 0..p.count {
            for (j, &mean) in means.iter().enumerate() {
                let (o, mv, ab) = (p.at(s, j), _mm512_set1_ps(mean), affine_of(mask, j));
                let plane = plane_sums(p.len, |i, m| {
                    // SAFETY: value o + i.. of the plane in each buffer (masked lanes not read).
                    unsafe {
                        let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(o + i));
                        let g = gradient(dy, mask, o + i, m, v, ab);
                        (g, _mm512_mul_ps(g, _mm512_sub_ps(v, mv)))
                    }
                });
                sums.add_plane(j, plane);
            }
            sums.sample_done(p.len);
        }
        sums.finish()
    }

    /// # Safety
    /// AVX-512F; the planes lie within every buffer, and no one else touches them in `dx`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn grad_input(
        dy: &[f32],
        x: &[f32],
        mask: Option<ActMask>,
        dx: *mut f32,
        p: Planes,
        k: &[(f32, f32, f32)],
    ) {
        for (o, j) in p.offsets() {
            let (k1, k2, bias) = k[j];
            let (k1, k2, bias) = (_mm512_set1_ps(k1), _mm512_set1_ps(k2), _mm512_set1_ps(bias));
            let ab = affine_of(mask, j);
            vectors(p.len, |i, m, _| {
                // SAFETY: value o + i.. of the plane in each buffer (masked lanes untouched).
                unsafe {
                    let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(o + i));
                    let g = gradient(dy, mask, o + i, m, v, ab);
                    let d = _mm512_fmadd_ps(k2, v, _mm512_fmadd_ps(k1, g, bias));
                    _mm512_mask_storeu_ps(dx.add(o + i), m, d);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask on one value of a stored output.
    fn masked(g: f32, y: f32, upper: f32) -> f32 {
        if y > 0.0 && y < upper { g } else { 0.0 }
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 20_000) as f32 / 2_000.0 - 3.0
            })
            .collect()
    }

    /// Every pass against f64 sums and f32 element formulas, on plane sizes with and
    /// without a partial vector (1, 9, 36, 40, 144 values), blocks of one and of several
    /// channels, with and without the mask, on whichever loops this CPU runs (the portable
    /// ones with `SLIMCANDLE_SIMD=avx2`).
    #[test]
    fn channel_passes_match_f64_sums_and_element_formulas() {
        for (n, c, plane) in [(5, 3, 1), (4, 5, 9), (3, 4, 36), (2, 3, 40), (33, 2, 144)] {
            let dims = (n, c, plane);
            let x = data(n * c * plane, 1);
            let dy = data(n * c * plane, 2);
            // The activation's outputs include 0, 6, a NaN and values around both ends.
            let mut y = data(n * c * plane, 3);
            y[0] = 0.0;
            let second = 1 % y.len();
            y[second] = f32::NAN;
            if y.len() > 2 {
                y[2] = 6.0;
            }
            for chans in [0..1, 1..c, 0..c] {
                let p = Planes::block(chans.clone(), dims);
                let cb = chans.len();
                let idx = |j: usize| -> Vec<usize> {
                    let ch = chans.start + j;
                    (0..n)
                        .flat_map(|s| (s * c + ch) * plane..(s * c + ch + 1) * plane)
                        .collect()
                };
                let close = |what: &str, got: f64, want: f64| {
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{what} {dims:?} channels {chans:?}: {got} vs {want}"
                    )
                };
                let shifts: Vec<f32> = (0..cb).map(|j| 0.25 * j as f32 - 0.1).collect();
                let sums = shifted_sums(&x, p, &shifts);
                for j in 0..cb {
                    let d = |i: usize| x[i] as f64 - shifts[j] as f64;
                    close("shifted sum", sums[j].0, idx(j).iter().map(|&i| d(i)).sum());
                    close(
                        "shifted squares",
                        sums[j].1,
                        idx(j).iter().map(|&i| d(i) * d(i)).sum(),
                    );
                }

                for upper in [None, Some(f32::INFINITY), Some(6.0)] {
                    let mask = upper.map(|upper| ActMask {
                        source: Source::Output(&y),
                        upper,
                    });
                    let g = |i: usize| mask.map_or(dy[i], |m| masked(dy[i], y[i], m.upper));
                    let means: Vec<f32> = (0..cb).map(|j| 0.5 - 0.2 * j as f32).collect();
                    let sums = grad_sums(&dy, &x, mask, p, &means);
                    let k: Vec<(f32, f32, f32)> =
                        (0..cb).map(|j| (0.7, -0.3 + 0.1 * j as f32, 0.1)).collect();
                    let affine: Vec<(f32, f32)> = (0..cb).map(|j| (1.3, -0.2 * j as f32)).collect();
                    let mut dx = vec![f32::NAN; x.len()];
                    // SAFETY: dx has the input's length; this call alone writes it.
                    unsafe { grad_input(&dy, &x, mask, &SharedMut::new(&mut dx), p, &k) };
                    let mut out = vec![f32::NAN; x.len()];
                    // SAFETY: as above.
                    unsafe { normalize(&x, &SharedMut::new(&mut out), p, &affine, upper) };
                    let mut written = vec![false; x.len()];
                    for j in 0..cb {
                        let ids = idx(j);
                        close(
                            "gradient sum",
                            sums[j].0,
                            ids.iter().map(|&i| g(i) as f64).sum(),
                        );
                        let xc: f64 = ids
                            .iter()
                            .map(|&i| g(i) as f64 * (x[i] as f64 - means[j] as f64))
                            .sum();
                        close("gradient x centred", sums[j].1, xc);
                        let (k1, k2, bias) = k[j];
                        let (scale, sh) = affine[j];
                        for &i in &ids {
                            let want = k1 * g(i) + k2 * x[i] + bias;
                            assert!((dx[i] - want).abs() <= 1e-6, "dx {dims:?} at {i}");
                            let t = x[i] * scale + sh;
                            let want = upper.map_or(t, |u| clamp(t, 0.0, u));
                            assert!((out[i] - want).abs() <= 1e-6, "y {dims:?} at {i}");
                            written[i] = true;
                        }
                    }
                    // Values of other channels are not written.
                    for i in (0..x.len()).filter(|&i| !written[i]) {
                        assert!(dx[i].is_nan() && out[i].is_nan(), "{dims:?}: wrote {i}");
                    }
                    // The mask recomputed from x and the forward's map is the mask of the
                    // forward's output, bit for bit (values at 0 and at the clamp included).
                    if let Some(upper) = upper {
                        let stored = ActMask {
                            source: Source::Output(&out),
                            upper,
                        };
                        let again = ActMask {
                            source: Source::Affine(&affine),
                            upper,
                        };
                        let (a, b) = (Some(stored), Some(again));
                        let bits = |v: &[(f64, f64)]| -> Vec<(u64, u64)> {
                            v.iter().map(|s| (s.0.to_bits(), s.1.to_bits())).collect()
                        };
                        assert_eq!(
                            bits(&grad_sums(&dy, &x, a, p, &means)),
                            bits(&grad_sums(&dy, &x, b, p, &means)),
                            "{dims:?}"
                        );
                        let (mut da, mut db) = (vec![0f32; x.len()], vec![0f32; x.len()]);
                        // SAFETY: as above.
                        unsafe {
                            grad_input(&dy, &x, a, &SharedMut::new(&mut da), p, &k);
                            grad_input(&dy, &x, b, &SharedMut::new(&mut db), p, &k);
                        }
                        let eq = da.iter().zip(&db).all(|(u, v)| u.to_bits() == v.to_bits());
                        assert!(eq, "{dims:?}: dx");
                    }
                }
            }
        }
    }

    /// The forward clamp keeps a NaN and maps the ends as `Kind::forward`; the mask blocks
    /// the gradient at 0, at `upper` and at a NaN output.
    #[test]
    fn clamp_and_mask_edges() {
        let x = [f32::NAN, -1.0, -0.0, 0.5, 6.0, 7.0, f32::INFINITY];
        let mut out = vec![0f32; x.len()];
        let p = Planes::block(0..1, (1, 1, x.len()));
        // SAFETY: out has x's length; this call alone writes it.
        unsafe { normalize(&x, &SharedMut::new(&mut out), p, &[(1.0, 0.0)], Some(6.0)) };
        assert!(out[0].is_nan());
        assert_eq!(&out[1..], &[0.0, -0.0, 0.5, 6.0, 6.0, 6.0]);
        let dy = [1.0f32; 7];
        let mask = ActMask {
            source: Source::Output(&x),
            upper: 6.0,
        };
        let sums = grad_sums(&dy, &[0.0; 7], Some(mask), p, &[0.0]);
        assert_eq!(sums[0].0, 1.0, "only 0.5 is strictly inside (0, 6)");
    }
}
