//! The fused epilogue: what runs on a block of conv (or linear) output while it is in cache.
//!
//! Why: as separate ops, bias, batch norm, activation and the residual add are each one more
//! allocation and one more pass over memory. Here they are one pass over each block the
//! kernel just wrote, in a fixed order:
//!
//! `v = act_after(act(v * scale[c] + shift[c]) + residual)`
//!
//! where every part is optional. The same epilogue, applied in place, runs the batch norms,
//! activations and adds that do not follow a conv (`Pointwise` steps).

use crate::graph::Activation;
use crate::kernels::activation::Kind;
use crate::kernels::simd::{Madd, simd_dispatch};

/// The per-call values of an epilogue (parameters borrowed for one forward pass).
#[derive(Clone, Copy, Default)]
pub(crate) struct Epilogue<'a> {
    pub scale: Option<&'a [f32]>,
    pub shift: Option<&'a [f32]>,
    pub act: Option<Activation>,
    /// Whether a residual is added (the values come with each block).
    pub residual: bool,
    pub act_after: Option<Activation>,
}

impl Epilogue<'_> {
    /// Nothing to do (a plain conv without bias).
    pub fn is_identity(&self) -> bool {
        self.scale.is_none()
            && self.shift.is_none()
            && self.act.is_none()
            && !self.residual
            && self.act_after.is_none()
    }

    /// Applies the epilogue to `block`: whole planes of `plane` values, the first of channel
    /// `c0`; `res` holds the residual at the same positions (when the epilogue adds one).
    pub fn apply(&self, block: &mut [f32], c0: usize, plane: usize, res: Option<&[f32]>) {
        if self.is_identity() || plane == 0 {
            return;
        }
        debug_assert_eq!(self.residual, res.is_some(), "residual given iff expected");
        if self.scale.is_some() || self.shift.is_some() || self.act.is_some() || res.is_some() {
            pass(block, c0, plane, self.scale, self.shift, self.act, res);
        }
        if self.act_after.is_some() {
            pass(block, c0, plane, None, None, self.act_after, None);
        }
    }

    /// Applies the epilogue to `rows` pixel rows stored channels last: row `r`'s channels
    /// (all of them, from channel 0) are `block[r * ld..r * ld + width]`, its residual
    /// `res.0[r * res.1..r * res.1 + width]`.
    pub fn apply_rows(
        &self,
        block: &mut [f32],
        rows: usize,
        (ld, width): (usize, usize),
        res: Option<(&[f32], usize)>,
    ) {
        self.apply_channels(block, rows, (ld, 0..width), res);
    }

    /// [`apply_rows`](Self::apply_rows) on the channels `channels` of each row only:
    /// `block[r * ld..]` and the residual's `res.0[r * res.1..]` start at channel
    /// `channels.start` (the share of one thread when a product's columns are split).
    pub fn apply_channels(
        &self,
        block: &mut [f32],
        rows: usize,
        (ld, channels): (usize, std::ops::Range<usize>),
        res: Option<(&[f32], usize)>,
    ) {
        if self.is_identity() || rows == 0 || channels.is_empty() {
            return;
        }
        debug_assert_eq!(self.residual, res.is_some(), "residual given iff expected");
        let width = channels.len();
        let (scale, shift) = (
            self.scale.map(|s| &s[channels.clone()]),
            self.shift.map(|b| &b[channels]),
        );
        if scale.is_some() || shift.is_some() || self.act.is_some() || res.is_some() {
            pass_rows(block, (rows, ld, width), scale, shift, self.act, res);
        }
        if self.act_after.is_some() {
            pass_rows(block, (rows, ld, width), None, None, self.act_after, None);
        }
    }
}

/// One pass: `v = act(v * scale[c] + shift[c]) + res`, for the given activation.
#[inline(always)]
fn pass_body<M: Madd>(
    block: &mut [f32],
    c0: usize,
    plane: usize,
    scale: Option<&[f32]>,
    shift: Option<&[f32]>,
    act: Option<Activation>,
    res: Option<&[f32]>,
) {
    let args = (block, c0, plane, scale, shift, res);
    per_activation!(act, channels::<M>, args)
}

/// `$run(args, f)` with `f` the scalar function of activation `$act` (the identity for
/// none): one monomorphic call per activation, so that each loop vectorises.
macro_rules! per_activation {
    ($act:expr, $run:path, $args:expr) => {
        match $act {
            None => $run($args, |v| v),
            Some(Activation::Relu) => $run($args, |v| Kind::Relu.forward(v)),
            Some(Activation::Relu6) => $run($args, |v| Kind::Relu6.forward(v)),
            Some(Activation::Hardsigmoid) => $run($args, |v| Kind::Hardsigmoid.forward(v)),
            Some(Activation::Hardswish) => $run($args, |v| Kind::Hardswish.forward(v)),
            Some(Activation::Sigmoid) => $run($args, |v| 1.0 / (1.0 + (-v).exp())),
        }
    };
}
use per_activation;

/// One pass over `rows` rows of `width` channels, `ld` apart: `v = act(v * scale[c] +
/// shift[c]) + res`. Why its own loop: as [`pass_body`] on each row, the per-row setup
/// (the activation's match, the optional vectors) cost more than the row's one or two
/// vectors of work (the epilogue was 14% of MobileNet V3 small at 96x96 channels last);
/// here the channels' multipliers and offsets are plain slices and each row one loop.
#[inline(always)]
fn pass_rows_body<M: Madd>(
    block: &mut [f32],
    (rows, ld, width): (usize, usize, usize),
    scale: Option<&[f32]>,
    shift: Option<&[f32]>,
    act: Option<Activation>,
    res: Option<(&[f32], usize)>,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::simd::level() == crate::kernels::simd::Level::Avx512
        && !matches!(act, Some(Activation::Sigmoid))
    {
        // SAFETY: AVX-512F is present; `rows` checks the lengths it relies on.
        return unsafe { x86::rows(block, (rows, ld, width), scale, shift, act, res) };
    }
    // A missing multiplier or offset as ones or zeros (as `channels` takes them).
    let (ones, zeros);
    let scale = match scale {
        Some(s) => &s[..width],
        None => {
            ones = vec![1f32; width];
            &ones[..]
        }
    };
    let shift = match shift {
        Some(b) => &b[..width],
        None => {
            zeros = vec![0f32; width];
            &zeros[..]
        }
    };
    let args = (block, (rows, ld, width), scale, shift, res);
    per_activation!(act, rows_loop::<M>, args)
}

type RowArgs<'a, 'b> = (
    &'a mut [f32],
    (usize, usize, usize),
    &'b [f32],
    &'b [f32],
    Option<(&'b [f32], usize)>,
);

/// The rows' loop, monomorphic in the activation (CPUs without AVX-512, and the sigmoid).
#[inline(always)]
fn rows_loop<M: Madd>(
    (block, (rows, ld, width), scale, shift, res): RowArgs,
    f: impl Fn(f32) -> f32,
) {
    for r in 0..rows {
        let row = &mut block[r * ld..r * ld + width];
        match res {
            Some((v, l)) => {
                let res = &v[r * l..r * l + width];
                for c in 0..width {
                    row[c] = f(M::madd(row[c], scale[c], shift[c])) + res[c];
                }
            }
            None => {
                for c in 0..width {
                    row[c] = f(M::madd(row[c], scale[c], shift[c]));
                }
            }
        }
    }
}

/// The rows' loop in AVX-512 registers. Why by hand: the compiler leaves the loop over a
/// row's 16 to 64 channels scalar (unrolled, `vmovss` and `vdivss`), which made the
/// epilogue a third of MobileNet V3 small's time channels last. The same operations in the
/// same order as [`Kind::forward`] after a fused multiply-add, so the values are bit for bit
/// the scalar loop's (the clamps keep NaN: `max(lo, v)` returns `v` when it is NaN).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::graph::Activation;
    use crate::kernels::simd::first_lanes;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F (the lengths are checked here); `act` is not the sigmoid.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows(
        block: &mut [f32],
        (rows, ld, width): (usize, usize, usize),
        scale: Option<&[f32]>,
        shift: Option<&[f32]>,
        act: Option<Activation>,
        res: Option<(&[f32], usize)>,
    ) {
        assert!(rows == 0 || block.len() >= (rows - 1) * ld + width);
        assert!(scale.is_none_or(|s| s.len() >= width) && shift.is_none_or(|b| b.len() >= width));
        if let Some((v, l)) = res {
            assert!(rows == 0 || v.len() >= (rows - 1) * l + width);
        }
        let (three, six, zero) = (
            _mm512_set1_ps(3.0),
            _mm512_set1_ps(6.0),
            _mm512_setzero_ps(),
        );
        let clamp = |v: __m512, hi: __m512| _mm512_min_ps(hi, _mm512_max_ps(zero, v));
        let f = |v: __m512| match act {
            None => v,
            Some(Activation::Relu) => _mm512_max_ps(zero, v),
            Some(Activation::Relu6) => clamp(v, six),
            Some(Activation::Hardsigmoid) => {
                _mm512_div_ps(clamp(_mm512_add_ps(v, three), six), six)
            }
            Some(Activation::Hardswish) => {
                _mm512_div_ps(_mm512_mul_ps(v, clamp(_mm512_add_ps(v, three), six)), six)
            }
            Some(Activation::Sigmoid) => unreachable!("the sigmoid runs the scalar loop"),
        };
        let bp = block.as_mut_ptr();
        for c0 in (0..width).step_by(16) {
            let mask = first_lanes(width - c0);
            // SAFETY (all pointer arithmetic below): within the checked lengths. A missing
            // multiplier or offset is one or zero (as the scalar loops take them).
            let s = scale.map_or(_mm512_set1_ps(1.0), |s| unsafe {
                _mm512_maskz_loadu_ps(mask, s.as_ptr().add(c0))
            });
            let t = shift.map_or(zero, |b| unsafe {
                _mm512_maskz_loadu_ps(mask, b.as_ptr().add(c0))
            });
            for r in 0..rows {
                let at = unsafe { bp.add(r * ld + c0) };
                let v = unsafe { _mm512_maskz_loadu_ps(mask, at) };
                let mut v = f(_mm512_fmadd_ps(v, s, t));
                if let Some((res, l)) = res {
                    let add = unsafe { _mm512_maskz_loadu_ps(mask, res.as_ptr().add(r * l + c0)) };
                    v = _mm512_add_ps(v, add);
                }
                unsafe { _mm512_mask_storeu_ps(at, mask, v) };
            }
        }
    }
}

simd_dispatch!(fn pass_rows(block: &mut [f32], shape: (usize, usize, usize), scale: Option<&[f32]>, shift: Option<&[f32]>, act: Option<Activation>, res: Option<(&[f32], usize)>) => pass_rows_body);

type Args<'a, 'b> = (
    &'a mut [f32],
    usize,
    usize,
    Option<&'b [f32]>,
    Option<&'b [f32]>,
    Option<&'b [f32]>,
);

/// The loop over channels, monomorphic in the activation so that it vectorises.
#[inline(always)]
fn channels<M: Madd>((block, c0, plane, scale, shift, res): Args, f: impl Fn(f32) -> f32) {
    if plane == 1 {
        // One value per channel (flat features, 1x1 planes): vectorise across channels.
        let len = block.len();
        let scale = scale.map(|s| &s[c0..c0 + len]);
        let shift = shift.map(|b| &b[c0..c0 + len]);
        for i in 0..len {
            let s = scale.map_or(1.0, |s| s[i]);
            let b = shift.map_or(0.0, |b| b[i]);
            let r = res.map_or(0.0, |r| r[i]);
            block[i] = f(M::madd(block[i], s, b)) + r;
        }
        return;
    }
    for (i, vals) in block.chunks_exact_mut(plane).enumerate() {
        let c = c0 + i;
        let s = scale.map_or(1.0, |s| s[c]);
        let b = shift.map_or(0.0, |b| b[c]);
        match res {
            Some(r) => {
                for (v, &r) in vals.iter_mut().zip(&r[i * plane..(i + 1) * plane]) {
                    *v = f(M::madd(*v, s, b)) + r;
                }
            }
            None => {
                for v in vals {
                    *v = f(M::madd(*v, s, b));
                }
            }
        }
    }
}

simd_dispatch!(fn pass(block: &mut [f32], c0: usize, plane: usize, scale: Option<&[f32]>, shift: Option<&[f32]>, act: Option<Activation>, res: Option<&[f32]>) => pass_body);
