//! Depthwise convolution of small planes in AVX-512 registers: every tap is a permute of the
//! input already in registers, masked where it meets padding, and one fused multiply-add.
//!
//! Why: at 32x32 inputs the depthwise convs of the last stages have 4x4, 2x2 and 1x1 output
//! planes. Plane by plane, rows of 4 or 2 values fill a fraction of a vector; channels last,
//! each sample is transposed in and out, and those scalar transposes cost more than the taps
//! (the channels-last path was 10-13% of MobileNet V3 small at batch 64). Here a vector holds
//! 16 output values in NCHW order as they are stored: one 4x4 plane, four 2x2 planes of
//! consecutive channels, or sixteen 1x1 ones (or a quarter of an 8x8 plane, a row of a
//! 16x16 one). The input values those 16 outputs read span at most 128 consecutive values of
//! the input (the same channels' planes, stored consecutively), which two, four or eight
//! registers hold; for each tap, a precomputed index vector picks every lane's input value out
//! of them (`vpermt2ps` on each pair of registers, blends on the index's sixth and seventh
//! bits) and a mask leaves out the lanes whose tap meets padding. Stride-2 convs reading 5
//! rows of 16 (8x8 outputs) or 3 rows of 32 (16x16 outputs) take the eight-register windows.
//! Each output sums its valid taps in the same order as the other depthwise paths (ky, then
//! kx), so the values are the channels-last path's, bit for bit.

use super::conv::ConvGeom;
use super::depthwise::taps_major;
use super::simd::first_lanes;
use std::borrow::Cow;

/// Output values per vector.
const LANES: usize = 16;
/// Input values the registers of one vector's window hold (at most eight registers).
const WINDOW: usize = 128;

/// The precomputed selection of one geometry.
pub(crate) struct SmallPlan {
    /// Channels per vector (`16 / plane` for planes of 16 or fewer outputs, else 1).
    group: usize,
    /// Per vector (`plane / 16` of them for planes of 16 or more outputs, rounded up in a
    /// [`plan_partial`], else 1): where its window starts in the group's input, how many
    /// registers it fills, its taps, and the lanes it stores (all but in a plane's last,
    /// partial vector).
    windows: Vec<(usize, usize, Vec<Tap>, u16)>,
}

/// One tap of one output vector: for every lane, the window position it reads (0..128) and
/// whether it reads anything (padding otherwise).
struct Tap {
    /// Tap index `ky k + kx`.
    t: usize,
    index: [u32; LANES],
    valid: u16,
}

/// The selection for `g`, or `None` where this path does not apply: no AVX-512, output
/// planes whose size neither divides nor is a multiple of 16, channels not a whole number of
/// vectors, or a vector reading more than 128 consecutive input values.
pub(crate) fn plan(g: &ConvGeom) -> Option<SmallPlan> {
    plan_with(g, false)
}

/// [`plan`], and for planes of other sizes one channel per vector with the plane's last
/// vector partial (6x6, 3x3, 7x7 ...): for the training backward passes, whose planes at
/// 96x96 inputs end in 6x6 and 3x3.
pub(crate) fn plan_partial(g: &ConvGeom) -> Option<SmallPlan> {
    plan_with(g, true)
}

fn plan_with(g: &ConvGeom, partial: bool) -> Option<SmallPlan> {
    if !super::sgemm::available() || !g.is_depthwise() || g.dil != 1 || g.groups != g.c_in {
        return None;
    }
    let p = g.ho * g.wo;
    let (group, vectors) = if p <= LANES && LANES.is_multiple_of(p) {
        (LANES / p, 1)
    } else if p.is_multiple_of(LANES) || partial {
        (1, p.div_ceil(LANES))
    } else {
        return None;
    };
    if !g.c_in.is_multiple_of(group) {
        return None;
    }
    let hw = g.h * g.w;
    let mut windows = Vec::with_capacity(vectors);
    for v in 0..vectors {
        let stored = if group > 1 {
            u16::MAX
        } else {
            first_lanes(p - v * LANES)
        };
        // Lane l: channel l / p of the group (with several planes per vector), output
        // position v * 16 + l % p; the input positions each tap reads, or none.
        let reads = |l: usize, ky: usize, kx: usize| -> Option<usize> {
            let (ch, pos) = if group > 1 {
                (l / p, l % p)
            } else {
                (0, v * LANES + l)
            };
            if pos >= p {
                // Past the plane's end in its last, partial vector.
                return None;
            }
            let (oy, ox) = (pos / g.wo, pos % g.wo);
            let iy = (oy * g.stride + ky).checked_sub(g.pad)?;
            let ix = (ox * g.stride + kx).checked_sub(g.pad)?;
            (iy < g.h && ix < g.w).then_some(ch * hw + iy * g.w + ix)
        };
        let all = (0..LANES).flat_map(|l| {
            (0..g.k).flat_map(move |ky| (0..g.k).filter_map(move |kx| reads(l, ky, kx)))
        });
        let (lo, hi) = all.fold((usize::MAX, 0), |(lo, hi), at| (lo.min(at), hi.max(at)));
        if lo > hi {
            // Every tap of every lane meets padding: the outputs are zero.
            windows.push((0, 0, Vec::new(), stored));
            continue;
        }
        if hi - lo >= WINDOW {
            return None;
        }
        let mut taps = Vec::new();
        for ky in 0..g.k {
            for kx in 0..g.k {
                let mut index = [0u32; LANES];
                let mut valid = 0u16;
                for (l, slot) in index.iter_mut().enumerate() {
                    if let Some(at) = reads(l, ky, kx) {
                        *slot = (at - lo) as u32;
                        valid |= 1 << l;
                    }
                }
                if valid != 0 {
                    taps.push(Tap {
                        t: ky * g.k + kx,
                        index,
                        valid,
                    });
                }
            }
        }
        // The window's registers: its span, from the first value a tap reads to the last.
        windows.push((lo, (hi - lo + 1).div_ceil(LANES), taps, stored));
    }
    Some(SmallPlan { group, windows })
}

/// The filters as [`forward_sample`] reads them: `w` (`C x k k`) as is for one channel per
/// vector, else taps-major (each tap's weights of consecutive channels side by side, one load
/// per vector).
pub(crate) fn weights<'a>(sp: &SmallPlan, g: &ConvGeom, w: &'a [f32]) -> Cow<'a, [f32]> {
    let kk = g.k * g.k;
    if sp.group == 1 {
        Cow::Borrowed(&w[..g.c_in * kk])
    } else {
        Cow::Owned(taps_major(w, g.c_in, kk))
    }
}

/// One sample: `x` its `C` input planes, `w` the filters from [`weights`], `y` its `C`
/// output planes (every value written).
pub(crate) fn forward_sample(sp: &SmallPlan, g: &ConvGeom, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (hw, p, kk) = (g.h * g.w, g.ho * g.wo, g.k * g.k);
    assert!(
        x.len() >= g.c_in * hw && y.len() >= g.c_in * p && w.len() >= g.c_in * kk,
        "depthwise_small: buffers too short"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `plan` returned a plan only where AVX-512 is present; every window lies
    // within the group's input (its positions come from valid input coordinates) and the
    // loads are masked to the buffer; the stores stay within `y` (checked above).
    unsafe {
        x86::sample(sp, g.c_in, (x, hw), w, kk, (y, p))
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("plan() returns None off x86-64")
}

/// Channels per vector of a plan: the channel groups [`filter_grad`] takes are this many
/// consecutive channels.
pub(crate) fn group(sp: &SmallPlan) -> usize {
    sp.group
}

/// The filter gradient of the channels of group `grp` (channels `grp * group(sp)` on) of
/// the depthwise convolution `g` over all `g.n` samples: `x` the input, `dy` the output
/// gradient, into `dw` (those channels' `k k` values each, overwritten).
///
/// Why: on planes of 16x16 outputs or fewer, a padded copy of each plane and a 16-lane pass
/// per tap that is mostly padding cost more than the products; here each tap's input values
/// come out of the window's registers as in the forward pass.
pub(crate) fn filter_grad(
    sp: &SmallPlan,
    g: &ConvGeom,
    x: &[f32],
    dy: &[f32],
    grp: usize,
    dw: &mut [f32],
) {
    let (hw, p, kk) = (g.h * g.w, g.ho * g.wo, g.k * g.k);
    assert!(
        x.len() >= g.n * g.c_in * hw
            && dy.len() >= g.n * g.c_in * p
            && (grp + 1) * sp.group <= g.c_in
            && dw.len() == sp.group * kk,
        "depthwise_small: filter gradient buffers"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `plan` returned a plan only where AVX-512 is present; the reads stay within
    // the group's planes of each sample (checked above, windows masked to them).
    unsafe {
        x86::filter_grad(sp, (g.n, g.c_in, hw, p, kk), x, dy, grp, dw)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("plan() returns None off x86-64")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{LANES, SmallPlan, Tap};
    use crate::kernels::simd::first_lanes;
    use std::arch::x86_64::*;

    /// Channel groups computed side by side: each tap's index vector is loaded once for
    /// all of them, and their sums are independent chains of multiply-adds (one chain of
    /// 9 to 25 dependent FMAs per vector alone waited on the FMA latency).
    const UNROLL: usize = 4;

    /// # Safety
    /// AVX-512F; `x` holds `c` planes of `hw`, `y` `c` planes of `p`, `w` `c` filters of `kk`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sample(
        sp: &SmallPlan,
        c: usize,
        (x, hw): (&[f32], usize),
        w: &[f32],
        kk: usize,
        (y, p): (&mut [f32], usize),
    ) {
        // Lane l's channel within the group, to spread the group's weights over the lanes.
        let lane_channel: [u32; LANES] = std::array::from_fn(|l| (l / p.min(LANES)) as u32);
        let spread = unsafe { _mm512_loadu_si512(lane_channel.as_ptr() as *const _) };
        let ctx = Ctx {
            sp,
            c,
            x,
            hw,
            w,
            kk,
            p,
            spread,
        };
        let groups = c / sp.group;
        let out = y.as_mut_ptr();
        for (v, (start, regs, taps, stored)) in sp.windows.iter().enumerate() {
            let at = (*start, v * LANES, taps.as_slice(), *stored);
            let mut first = 0;
            while first < groups {
                let c0 = first * sp.group;
                // SAFETY: as for `sample`; each call writes the planes of its groups only.
                unsafe {
                    if first + UNROLL <= groups {
                        vector_in::<UNROLL>(&ctx, *regs, c0, at, out);
                        first += UNROLL;
                    } else {
                        vector_in::<1>(&ctx, *regs, c0, at, out);
                        first += 1;
                    }
                }
            }
        }
    }

    /// [`vector`] with the window in as many registers as its span needs (2, 4 or 8).
    ///
    /// # Safety
    /// As for [`vector`].
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn vector_in<const U: usize>(
        ctx: &Ctx,
        regs: usize,
        c0: usize,
        at: (usize, usize, &[Tap], u16),
        y: *mut f32,
    ) {
        unsafe {
            match regs {
                0..=2 => vector::<U, 2>(ctx, c0, at, y),
                3..=4 => vector::<U, 4>(ctx, c0, at, y),
                _ => vector::<U, 8>(ctx, c0, at, y),
            }
        }
    }

    /// What every vector of one call reads.
    struct Ctx<'a> {
        sp: &'a SmallPlan,
        c: usize,
        x: &'a [f32],
        hw: usize,
        w: &'a [f32],
        kk: usize,
        p: usize,
        spread: __m512i,
    }

    /// Output vector `(start, offset, taps, stored)` (its window's start in a group's input,
    /// its place in a group's output planes, its taps, the lanes it stores) for `U`
    /// consecutive groups of channels from channel `c0`, the window of `16 R` input values
    /// held in `R` registers per group; stored into `y`.
    ///
    /// # Safety
    /// AVX-512F; `y` holds the output planes of the groups.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn vector<const U: usize, const R: usize>(
        ctx: &Ctx,
        c0: usize,
        (start, offset, taps, stored): (usize, usize, &[Tap], u16),
        y: *mut f32,
    ) {
        let sp = ctx.sp;
        let group_in = sp.group * ctx.hw;
        let mut acc = [_mm512_setzero_ps(); U];
        // Each group's window, zero past the group's planes.
        let mut regs = [[_mm512_setzero_ps(); R]; U];
        for (u, win) in regs.iter_mut().enumerate() {
            let input = &ctx.x[(c0 + u * sp.group) * ctx.hw..][..group_in];
            // SAFETY: AVX-512F (this function's feature).
            *win = unsafe { window::<R>(input, start) };
        }
        for tap in taps {
            let selection = Selection::of(tap);
            for u in 0..U {
                let vals = selection.pick(&regs[u]);
                let cu = c0 + u * sp.group;
                let weights = if sp.group == 1 {
                    _mm512_set1_ps(ctx.w[cu * ctx.kk + tap.t])
                } else {
                    // The group's weights of this tap (taps-major: consecutive), spread over
                    // each channel's lanes.
                    let at = &ctx.w[tap.t * ctx.c + cu..][..sp.group];
                    // SAFETY: `group` values at `at`.
                    let packed =
                        unsafe { _mm512_maskz_loadu_ps(first_lanes(sp.group), at.as_ptr()) };
                    _mm512_permutexvar_ps(ctx.spread, packed)
                };
                acc[u] = _mm512_mask3_fmadd_ps(weights, vals, acc[u], tap.valid);
            }
        }
        for (u, a) in acc.iter().enumerate() {
            let at = (c0 + u * sp.group) * ctx.p + offset;
            unsafe { _mm512_mask_storeu_ps(y.add(at), stored, *a) };
        }
    }

    /// The `16 R` input values from `start` of `input` in `R` registers, zero past its end.
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn window<const R: usize>(input: &[f32], start: usize) -> [__m512; R] {
        let mut regs = [_mm512_setzero_ps(); R];
        for (r, reg) in regs.iter_mut().enumerate() {
            let at = start + 16 * r;
            let left = input.len().saturating_sub(at).min(16);
            if left > 0 {
                // SAFETY: the mask keeps the load within `input`.
                *reg = unsafe { _mm512_maskz_loadu_ps(first_lanes(left), input.as_ptr().add(at)) };
            }
        }
        regs
    }

    /// A tap's index vector and the bits that choose between register pairs.
    struct Selection {
        index: __m512i,
        bit5: __mmask16,
        bit6: __mmask16,
    }

    impl Selection {
        #[target_feature(enable = "avx512f")]
        #[inline]
        fn of(tap: &Tap) -> Selection {
            // SAFETY: `tap.index` holds 16 u32.
            let index = unsafe { _mm512_loadu_si512(tap.index.as_ptr() as *const _) };
            Selection {
                index,
                bit5: _mm512_test_epi32_mask(index, _mm512_set1_epi32(32)),
                bit6: _mm512_test_epi32_mask(index, _mm512_set1_epi32(64)),
            }
        }

        /// Every lane's input value of the tap out of the window's registers.
        #[target_feature(enable = "avx512f")]
        #[inline]
        fn pick<const R: usize>(&self, r: &[__m512; R]) -> __m512 {
            let (index, bit5, bit6) = (self.index, self.bit5, self.bit6);
            match R {
                2 => _mm512_permutex2var_ps(r[0], index, r[1]),
                4 => {
                    let lo = _mm512_permutex2var_ps(r[0], index, r[1]);
                    let hi = _mm512_permutex2var_ps(r[2], index, r[3]);
                    _mm512_mask_blend_ps(bit5, lo, hi)
                }
                _ => {
                    let a = _mm512_permutex2var_ps(r[0], index, r[1]);
                    let b = _mm512_permutex2var_ps(r[2], index, r[3]);
                    let c = _mm512_permutex2var_ps(r[4], index, r[5]);
                    let d = _mm512_permutex2var_ps(r[6], index, r[7]);
                    let lo = _mm512_mask_blend_ps(bit5, a, b);
                    let hi = _mm512_mask_blend_ps(bit5, c, d);
                    _mm512_mask_blend_ps(bit6, lo, hi)
                }
            }
        }
    }

    /// The filter gradient of channel group `grp`: for every tap, the input values it reads
    /// (as the forward picks them) times the output gradient, summed over the samples and
    /// then over each channel's lanes, into `dw` (the group's `group x kk` values).
    ///
    /// # Safety
    /// AVX-512F; `x` holds `n` samples of `c` planes of `hw`, `dy` of `c` planes of `p`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn filter_grad(
        sp: &SmallPlan,
        (n, c, hw, p, kk): (usize, usize, usize, usize, usize),
        x: &[f32],
        dy: &[f32],
        grp: usize,
        dw: &mut [f32],
    ) {
        let c0 = grp * sp.group;
        let (group_in, group_out) = (sp.group * hw, sp.group * p);
        let mut acc = vec![_mm512_setzero_ps(); kk];
        for s in 0..n {
            let input = &x[(s * c + c0) * hw..][..group_in];
            let grad = &dy[(s * c + c0) * p..][..group_out];
            for (v, (start, regs, taps, stored)) in sp.windows.iter().enumerate() {
                // SAFETY: the stored lanes at `16 v` of the group's output planes are within
                // them (a plan's vectors cover them, the last one maybe in part).
                let d = unsafe { _mm512_maskz_loadu_ps(*stored, grad.as_ptr().add(v * LANES)) };
                // SAFETY: AVX-512F (this function's feature).
                unsafe {
                    match regs {
                        0..=2 => tap_products::<2>(input, *start, taps, d, &mut acc),
                        3..=4 => tap_products::<4>(input, *start, taps, d, &mut acc),
                        _ => tap_products::<8>(input, *start, taps, d, &mut acc),
                    }
                }
            }
        }
        // Each channel of the group owns `16 / group` lanes (lanes past a plane's end in a
        // partial vector stayed zero).
        let per = LANES / sp.group;
        for (t, a) in acc.iter().enumerate() {
            let mut lanes = [0f32; LANES];
            // SAFETY: 16 values.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *a) };
            for (j, channel) in lanes.chunks_exact(per).enumerate() {
                dw[j * kk + t] = channel.iter().sum();
            }
        }
    }

    /// `acc[t] += (tap t's input values) * d` for each tap of one vector's window.
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tap_products<const R: usize>(
        input: &[f32],
        start: usize,
        taps: &[Tap],
        d: __m512,
        acc: &mut [__m512],
    ) {
        // SAFETY: AVX-512F (this function's feature).
        let regs = unsafe { window::<R>(input, start) };
        for tap in taps {
            let vals = Selection::of(tap).pick(&regs);
            acc[tap.t] = _mm512_mask3_fmadd_ps(vals, d, acc[tap.t], tap.valid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Direct loops in f64 over every tap.
    fn reference(g: &ConvGeom, x: &[f32], w: &[f32]) -> Vec<f32> {
        let (k, s, pad) = (g.k as isize, g.stride as isize, g.pad as isize);
        let mut y = Vec::new();
        for c in 0..g.c_in {
            for oy in 0..g.ho as isize {
                for ox in 0..g.wo as isize {
                    let mut sum = 0f64;
                    for ky in 0..k {
                        for kx in 0..k {
                            let (iy, ix) = (oy * s + ky - pad, ox * s + kx - pad);
                            if iy >= 0 && ix >= 0 && iy < g.h as isize && ix < g.w as isize {
                                let xv = x[c * g.h * g.w + (iy * g.w as isize + ix) as usize];
                                sum += xv as f64 * w[c * g.k * g.k + (ky * k + kx) as usize] as f64;
                            }
                        }
                    }
                    y.push(sum as f32);
                }
            }
        }
        y
    }

    #[test]
    fn small_planes_match_direct_loops() {
        if !crate::kernels::sgemm::available() {
            eprintln!("skipped: needs AVX-512");
            return;
        }
        let mut rng = Rng::new(7);
        let mut ran = 0;
        for (h, k, s, pad) in [
            (4, 3, 1, 1),
            (4, 5, 1, 2),
            (2, 3, 1, 1),
            (2, 5, 1, 2),
            (8, 3, 2, 1),
            (8, 5, 2, 2),
            (7, 3, 2, 1),
            (4, 3, 2, 1),
            (4, 5, 2, 2),
            (2, 3, 2, 1),
            (1, 3, 1, 1),
            (8, 3, 1, 1),
            (3, 3, 2, 1),
            (16, 3, 2, 1),
            (32, 3, 2, 1),
            (16, 3, 1, 1),
            (16, 5, 2, 2),
        ] {
            for c in [16, 48] {
                let g = ConvGeom::new(&[1, c, h, h], &[c, 1, k, k], s, pad, 1, c).unwrap();
                let Some(sp) = plan(&g) else {
                    continue;
                };
                ran += 1;
                let (x, w) = (rng.normals(c * h * h), rng.normals(c * k * k));
                let mut y = vec![f32::NAN; c * g.ho * g.wo];
                forward_sample(&sp, &g, &x, &weights(&sp, &g, &w), &mut y);
                for (i, (a, b)) in y.iter().zip(reference(&g, &x, &w)).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{h}x{h} k{k} s{s} p{pad} c{c} output {i}: {a} vs {b}"
                    );
                }
            }
        }
        assert!(ran >= 30, "only {ran} geometries ran here");
    }

    /// Planes that need a partial last vector (6x6, 3x3, 7x7 ...; [`plan_partial`]): the
    /// forward against direct loops, with the values past each plane left as they were.
    #[test]
    fn partial_vectors_match_direct_loops() {
        if !crate::kernels::sgemm::available() {
            eprintln!("skipped: needs AVX-512");
            return;
        }
        let mut rng = Rng::new(5);
        let mut ran = 0;
        for (h, k, s, pad) in [
            (6, 3, 1, 1),
            (3, 3, 1, 1),
            (6, 5, 1, 2),
            (3, 5, 1, 2),
            (7, 3, 1, 1),
            (5, 3, 2, 1),
            (12, 3, 2, 1),
            (6, 3, 2, 1),
        ] {
            for c in [16, 17] {
                let g = ConvGeom::new(&[1, c, h, h], &[c, 1, k, k], s, pad, 1, c).unwrap();
                // The forward's own plan keeps leaving these planes to the other paths.
                assert!(
                    plan(&g).is_none(),
                    "{h}x{h} k{k} s{s}: plan() took a partial plane"
                );
                let Some(sp) = plan_partial(&g) else {
                    continue;
                };
                ran += 1;
                let (x, w) = (rng.normals(c * h * h), rng.normals(c * k * k));
                let len = c * g.ho * g.wo;
                let mut y = vec![f32::NAN; len + 16];
                forward_sample(&sp, &g, &x, &weights(&sp, &g, &w), &mut y);
                for (i, (a, b)) in y.iter().zip(reference(&g, &x, &w)).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{h}x{h} k{k} s{s} p{pad} c{c} output {i}: {a} vs {b}"
                    );
                }
                assert!(y[len..].iter().all(|v| v.is_nan()), "wrote past the planes");
            }
        }
        assert!(ran >= 12, "only {ran} geometries ran here");
    }

    /// The filter gradient, group by group, against direct loops in f64 over the samples.
    #[test]
    fn filter_gradients_match_direct_loops() {
        if !crate::kernels::sgemm::available() {
            eprintln!("skipped: needs AVX-512");
            return;
        }
        let mut rng = Rng::new(11);
        let mut ran = 0;
        for (h, k, s, pad) in [
            (4, 3, 1, 1),
            (2, 5, 1, 2),
            (1, 3, 1, 1),
            (8, 3, 2, 1),
            (4, 5, 2, 2),
            (8, 3, 1, 1),
            (16, 3, 1, 1),
            (16, 5, 2, 2),
            (4, 3, 1, 0),
            (6, 3, 1, 1),
            (3, 3, 1, 1),
            (3, 5, 1, 2),
            (7, 3, 1, 1),
            (12, 3, 2, 1),
        ] {
            let (n, c) = (3, 32);
            let g = ConvGeom::new(&[n, c, h, h], &[c, 1, k, k], s, pad, 1, c).unwrap();
            let Some(sp) = plan_partial(&g) else {
                continue;
            };
            ran += 1;
            let (hw, p, kk) = (h * h, g.ho * g.wo, k * k);
            let (x, dy) = (rng.normals(n * c * hw), rng.normals(n * c * p));
            let mut dw = vec![f32::NAN; c * kk];
            for (grp, part) in dw.chunks_mut(group(&sp) * kk).enumerate() {
                filter_grad(&sp, &g, &x, &dy, grp, part);
            }
            let (k, s, pad) = (k as isize, s as isize, pad as isize);
            for ch in 0..c {
                for t in 0..kk as isize {
                    let (ky, kx) = (t / k, t % k);
                    let mut sum = 0f64;
                    for smp in 0..n {
                        for oy in 0..g.ho as isize {
                            for ox in 0..g.wo as isize {
                                let (iy, ix) = (oy * s + ky - pad, ox * s + kx - pad);
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= h as isize {
                                    continue;
                                }
                                let xi = (smp * c + ch) * hw + (iy * h as isize + ix) as usize;
                                let di = (smp * c + ch) * p + (oy * g.wo as isize + ox) as usize;
                                sum += x[xi] as f64 * dy[di] as f64;
                            }
                        }
                    }
                    let got = dw[ch * kk + t as usize];
                    assert!(
                        (got as f64 - sum).abs() <= 1e-5 * (1.0 + sum.abs()),
                        "{h}x{h} k{k} s{s} p{pad} channel {ch} tap {t}: {got} vs {sum}"
                    );
                }
            }
        }
        assert!(ran >= 13, "only {ran} geometries ran here");
    }
}
