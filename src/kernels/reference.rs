//! The stock Candle compositions the kernels replace.
//!
//! Why public: they are the fallback for tensors that are not f32 on the CPU, the reference
//! the tests compare against, and the baseline of `examples/kernel_bench.rs`.

use candle_core::{Result, Tensor};

/// Candle's own `conv2d` (one convolution per group, concatenated; backward through
/// `conv_transpose2d`). Same argument order as [`super::conv2d`].
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    x.conv2d(w, padding, stride, dilation, groups)
}

fn per_channel(t: &Tensor) -> Result<Tensor> {
    t.reshape((1, (), 1, 1))
}

fn mean_nhw(t: &Tensor) -> Result<Tensor> {
    t.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)
}

/// Train-mode batch norm from generic ops: `(y, mean, biased var)`, the statistics detached.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let mean = mean_nhw(x)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = mean_nhw(&centered.sqr()?)?;
    let y = centered
        .broadcast_div(&(&var + eps)?.sqrt()?)?
        .broadcast_mul(&per_channel(gamma)?)?
        .broadcast_add(&per_channel(beta)?)?;
    Ok((y, mean.detach().flatten_all()?, var.detach().flatten_all()?))
}

/// `x * scale[c] + shift[c]` from broadcasts.
pub fn batch_norm_eval(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&per_channel(scale)?)?
        .broadcast_add(&per_channel(shift)?)
}

pub fn relu6(x: &Tensor) -> Result<Tensor> {
    x.clamp(0f32, 6f32)
}

pub fn hardsigmoid(x: &Tensor) -> Result<Tensor> {
    x.affine(1.0 / 6.0, 0.5)?.clamp(0f32, 1f32)
}

pub fn hardswish(x: &Tensor) -> Result<Tensor> {
    x * hardsigmoid(x)?
}

/// Reshape to (N, g, C/g, H, W), swap the group axes, copy, flatten back.
pub fn channel_shuffle(x: &Tensor, groups: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, groups, c / groups, h, w))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, c, h, w))
}
