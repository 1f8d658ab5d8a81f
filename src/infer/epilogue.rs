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
        if self.is_identity() || rows == 0 {
            return;
        }
        debug_assert_eq!(self.residual, res.is_some(), "residual given iff expected");
        let (scale, shift) = (self.scale, self.shift);
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
    match act {
        None => channels::<M>(args, |v| v),
        Some(Activation::Relu) => channels::<M>(args, |v| Kind::Relu.forward(v)),
        Some(Activation::Relu6) => channels::<M>(args, |v| Kind::Relu6.forward(v)),
        Some(Activation::Hardsigmoid) => channels::<M>(args, |v| Kind::Hardsigmoid.forward(v)),
        Some(Activation::Hardswish) => channels::<M>(args, |v| Kind::Hardswish.forward(v)),
        Some(Activation::Sigmoid) => channels::<M>(args, |v| 1.0 / (1.0 + (-v).exp())),
    }
}

/// [`pass_body`] on each of `rows` rows of `width` channels, `ld` apart (one dispatch for
/// all of them: the rows of a channels-last block are short).
#[inline(always)]
fn pass_rows_body<M: Madd>(
    block: &mut [f32],
    (rows, ld, width): (usize, usize, usize),
    scale: Option<&[f32]>,
    shift: Option<&[f32]>,
    act: Option<Activation>,
    res: Option<(&[f32], usize)>,
) {
    for r in 0..rows {
        let row = &mut block[r * ld..r * ld + width];
        let res = res.map(|(v, l)| &v[r * l..r * l + width]);
        pass_body::<M>(row, 0, 1, scale, shift, act, res);
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
