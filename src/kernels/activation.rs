//! ReLU, ReLU6, hard sigmoid and hard swish as single-pass element-wise ops with backward.
//!
//! Why: composed from `affine`, `clamp` (itself `maximum` then `minimum`) and `mul`, each is
//! three to four passes forward and more backward, and Candle's gradients of `maximum` /
//! `minimum` at ties differ from PyTorch's. Here forward and backward are one pass each, with
//! PyTorch's formulas and its gradients at the kinks:
//!
//! | op          | forward                   | gradient                                      |
//! |-------------|---------------------------|-----------------------------------------------|
//! | relu        | max(x, 0)                 | 1 for x > 0, else 0                           |
//! | relu6       | min(max(x, 0), 6)         | 1 for 0 < x < 6, else 0                       |
//! | hardsigmoid | min(max(x + 3, 0), 6) / 6 | 1/6 for -3 < x < 3, else 0                    |
//! | hardswish   | x min(max(x + 3, 0), 6) / 6 | 0 for x <= -3, x / 3 + 1/2 for -3 < x < 3, 1 for x >= 3 |
//!
//! NaN propagates, as in PyTorch.

use super::{
    cpu::{all_cpu_f32, f32_slice},
    reference,
};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// Values per parallel task.
const CHUNK: usize = 1 << 14;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Relu,
    Relu6,
    Hardsigmoid,
    Hardswish,
}

/// `min(max(v, lo), hi)`, keeping NaN (two selects, which vectorise).
#[inline(always)]
pub(crate) fn clamp(v: f32, lo: f32, hi: f32) -> f32 {
    let v = if v < lo { lo } else { v };
    if v > hi { hi } else { v }
}

/// `f` over every value, in parallel chunks.
fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(d, s)| {
            for (d, &v) in d.iter_mut().zip(s) {
                *d = f(v);
            }
        });
    y
}

/// `f` over every pair of values, in parallel chunks.
fn map2(x: &[f32], dy: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(d, (xs, gs))| {
            for ((d, &v), &g) in d.iter_mut().zip(xs).zip(gs) {
                *d = f(v, g);
            }
        });
    dx
}

impl Kind {
    /// The upper end of the clamp a ReLU (infinite) or ReLU6 (6) is, whose backward passes
    /// the gradient where the output lies strictly inside `(0, upper)`; `None` for the
    /// activations that are not a clamp.
    pub(crate) fn clamp_upper(self) -> Option<f32> {
        match self {
            Kind::Relu => Some(f32::INFINITY),
            Kind::Relu6 => Some(6.0),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Relu => "relu",
            Kind::Relu6 => "relu6",
            Kind::Hardsigmoid => "hardsigmoid",
            Kind::Hardswish => "hardswish",
        }
    }

    #[inline(always)]
    pub(crate) fn forward(self, x: f32) -> f32 {
        match self {
            Kind::Relu => clamp(x, 0.0, f32::INFINITY),
            Kind::Relu6 => clamp(x, 0.0, 6.0),
            Kind::Hardsigmoid => clamp(x + 3.0, 0.0, 6.0) / 6.0,
            Kind::Hardswish => x * clamp(x + 3.0, 0.0, 6.0) / 6.0,
        }
    }

    /// `dy * f'(x)`.
    #[inline(always)]
    pub(crate) fn backward(self, x: f32, dy: f32) -> f32 {
        match self {
            Kind::Relu => {
                if x > 0.0 {
                    dy
                } else {
                    0.0
                }
            }
            Kind::Relu6 => {
                if x > 0.0 && x < 6.0 {
                    dy
                } else {
                    0.0
                }
            }
            Kind::Hardsigmoid => {
                if x > -3.0 && x < 3.0 {
                    dy / 6.0
                } else {
                    0.0
                }
            }
            Kind::Hardswish => {
                if x <= -3.0 {
                    0.0
                } else if x < 3.0 {
                    dy * (x / 3.0 + 0.5)
                } else {
                    dy
                }
            }
        }
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        if !all_cpu_f32(&[x]) {
            return match self {
                Kind::Relu => x.relu(),
                Kind::Relu6 => reference::relu6(x),
                Kind::Hardsigmoid => reference::hardsigmoid(x),
                Kind::Hardswish => reference::hardswish(x),
            };
        }
        x.contiguous()?.apply_op1(Activation(self))
    }
}

/// Forward op `x -> f(x)`.
struct Activation(Kind);

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        // One monomorphic loop per kind, so that it vectorises.
        let y = match self.0 {
            Kind::Relu => map(x, |v| Kind::Relu.forward(v)),
            Kind::Relu6 => map(x, |v| Kind::Relu6.forward(v)),
            Kind::Hardsigmoid => map(x, |v| Kind::Hardsigmoid.forward(v)),
            Kind::Hardswish => map(x, |v| Kind::Hardswish.forward(v)),
        };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dx = x.apply_op2_no_bwd(&dy.contiguous()?, &ActivationGrad(self.0))?;
        Ok(Some(dx))
    }
}

/// Backward op `(x, dy) -> dx`.
struct ActivationGrad(Kind);

impl CustomOp2 for ActivationGrad {
    fn name(&self) -> &'static str {
        "slimcandle-activation-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let dy = f32_slice(s2, l2, self.name())?;
        if x.len() != dy.len() {
            bail!("{}: gradient and input sizes differ", self.0.name())
        }
        let dx = match self.0 {
            Kind::Relu => map2(x, dy, |v, g| Kind::Relu.backward(v, g)),
            Kind::Relu6 => map2(x, dy, |v, g| Kind::Relu6.backward(v, g)),
            Kind::Hardsigmoid => map2(x, dy, |v, g| Kind::Hardsigmoid.backward(v, g)),
            Kind::Hardswish => map2(x, dy, |v, g| Kind::Hardswish.backward(v, g)),
        };
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `max(x, 0)`, one pass each way (Candle's own relu backward is a compare, a cast and a
/// multiply), with PyTorch's gradient (1 for x > 0).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    Kind::Relu.apply(x)
}

/// `min(max(x, 0), 6)`, one pass, with PyTorch's gradient (1 strictly inside (0, 6)).
pub fn relu6(x: &Tensor) -> Result<Tensor> {
    Kind::Relu6.apply(x)
}

/// `min(max(x + 3, 0), 6) / 6`, one pass, with PyTorch's gradient (1/6 strictly inside
/// (-3, 3)).
pub fn hardsigmoid(x: &Tensor) -> Result<Tensor> {
    Kind::Hardsigmoid.apply(x)
}

/// `x min(max(x + 3, 0), 6) / 6`, one pass, with PyTorch's gradient (0 up to and including
/// -3, `x / 3 + 1/2` strictly inside (-3, 3), 1 from 3 on).
pub fn hardswish(x: &Tensor) -> Result<Tensor> {
    Kind::Hardswish.apply(x)
}
