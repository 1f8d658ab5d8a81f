//! Batch normalisation: train mode as one op with a closed-form backward, eval mode as one
//! fused multiply-add per value.
//!
//! Why: composed from generic Candle ops, train-mode batch norm is a chain of reductions and
//! broadcasts, each a full pass over the activations, and its backward retraces all of them.
//! Here each block of channels' N x H x W values is handled by one task: the statistics in
//! one pass, then `y` (the block's data is still in cache for the second pass). The backward
//! is
//!
//! ```text
//! dbeta  = sum dy          dgamma = sum dy * xhat          (xhat = (x - mean) * invstd)
//! dx     = gamma * invstd * (dy - dbeta / M - xhat * dgamma / M)      (M = N H W)
//! ```
//!
//! with both sums in one pass and `dx` in a second; the passes are in `channel`, each
//! channel's sums taken in f32 lanes and added into f64 every thousand values or so.

mod channel;

use channel::Planes;
pub(crate) use channel::{ActMask, Source};

use super::{
    activation::Kind,
    cpu::{SharedMut, all_cpu_f32, f32_slice, unpack},
    reference,
};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// Per-channel batch statistics of one forward pass.
#[derive(Debug)]
pub(crate) struct Stats {
    pub mean: Vec<f32>,
    /// Biased (divided by N H W).
    pub var: Vec<f32>,
    pub invstd: Vec<f32>,
    /// The per-channel map `y = x scale + shift` the forward applied (before its clamp): a
    /// following ReLU's mask is recomputed from it in the backward ([`channel::Source`]).
    pub affine: Vec<(f32, f32)>,
}

/// `(n, c, h * w)` of an NCHW tensor.
fn nc_plane(dims: &[usize]) -> Result<(usize, usize, usize)> {
    match dims {
        &[n, c, h, w] => Ok((n, c, h * w)),
        _ => bail!("batch norm: expected an input of shape [N, C, H, W], got {dims:?}"),
    }
}

fn check_channels(what: &str, t: &Tensor, c: usize) -> Result<()> {
    if t.dims() != [c] {
        bail!(
            "batch norm: {what} must have shape [{c}], got {:?}",
            t.dims()
        )
    }
    Ok(())
}

/// Train-mode batch norm over an NCHW tensor with per-channel `gamma` and `beta` (shape
/// [C]). Returns `(y, mean, var)`: `y` with autograd (gradients for `x`, `gamma` and `beta`),
/// and the batch mean and biased variance as detached [C] tensors. The caller updates the
/// running statistics (PyTorch uses the unbiased variance, `var * M / (M - 1)`, there).
///
/// Errors when a channel has fewer than two values (N H W < 2), as PyTorch does. Tensors that
/// are not f32 on the CPU run the stock Candle composition.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, plane) = nc_plane(x.dims())?;
    check_channels("gamma", gamma, c)?;
    check_channels("beta", beta, c)?;
    if n * plane < 2 {
        bail!(
            "batch norm in train mode needs more than one value per channel, got input shape {:?}",
            x.dims()
        )
    }
    if !all_cpu_f32(&[x, gamma, beta]) {
        return reference::batch_norm_train(x, gamma, beta, eps);
    }
    let op = BatchNormTrain {
        eps,
        stats: Arc::new(OnceLock::new()),
    };
    let stats = op.stats.clone();
    let y = x
        .contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let stats = stats.get().expect("the forward pass sets the statistics");
    let mean = Tensor::from_slice(&stats.mean, c, x.device())?;
    let var = Tensor::from_slice(&stats.var, c, x.device())?;
    Ok((y, mean, var))
}

/// Forward op `(x, gamma, beta) -> y`; records the statistics for the caller and backward.
struct BatchNormTrain {
    eps: f64,
    stats: Arc<OnceLock<Stats>>,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "slimcandle-batch-norm-train"
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
        let gamma = f32_slice(s2, l2, self.name())?;
        let beta = f32_slice(s3, l3, self.name())?;
        let (n, c, plane) = nc_plane(l1.dims())?;
        let (y, stats) = train_forward(x, gamma, beta, self.eps, (n, c, plane), None);
        // A second evaluation of the same op (not done by Candle) would keep the first stats.
        let _ = self.stats.set(stats);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need_x = x.track_op();
        let op = BatchNormBackward {
            stats: self.stats.clone(),
            need_x,
        };
        let packed = x.apply_op3_no_bwd(gamma, &dy.contiguous()?, &op)?;
        let c = gamma.dim(0)?;
        let mut parts = unpack(&packed, &[(need_x, x.dims()), (true, &[c]), (true, &[c])])?;
        let dbeta = parts.pop().flatten();
        let dgamma = parts.pop().flatten();
        let dx = parts.pop().flatten();
        let keep = |t: Option<Tensor>, arg: &Tensor| t.filter(|_| arg.track_op());
        Ok((dx, keep(dgamma, gamma), keep(dbeta, beta)))
    }
}

/// Backward op `(x, gamma, dy) -> [dx | dgamma | dbeta]` (dx only when requested).
struct BatchNormBackward {
    /// The statistics of the forward pass.
    stats: Arc<OnceLock<Stats>>,
    need_x: bool,
}

impl CustomOp3 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "slimcandle-batch-norm-train-backward"
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
        let gamma = f32_slice(s2, l2, self.name())?;
        let dy = f32_slice(s3, l3, self.name())?;
        let (n, c, plane) = nc_plane(l1.dims())?;
        if dy.len() != x.len() {
            bail!("{}: gradient and input sizes differ", self.name())
        }
        let Some(stats) = self.stats.get() else {
            bail!("{}: backward before the forward pass", self.name())
        };
        let out = train_backward(x, gamma, dy, stats, (n, c, plane), self.need_x, None);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from_dims(&[len])))
    }
}

/// Values per sample that a task's block of channels should span at least (1 KB): small
/// planes are walked a block of channels at a time, each sample's block one contiguous run.
///
/// Why: a channel's 6x6 planes are 144 bytes, 36 KB apart at 256 channels (a multiple of
/// 4 KB: all on one L1 set), so a task per channel missed L1 on every plane, and its
/// neighbour read the same lines again; those batch norms ran at a third of the large
/// planes' values per second.
const BLOCK_VALUES: usize = 256;

/// The channels per task for `c` channels of `plane` values: enough to span
/// [`BLOCK_VALUES`], but at least eight tasks where there are that many channels.
fn channel_block(c: usize, plane: usize) -> usize {
    BLOCK_VALUES.div_ceil(plane.max(1)).min((c / 8).max(1))
}

/// The blocks of channels, one task each.
fn blocks((_, c, plane): (usize, usize, usize)) -> Vec<std::ops::Range<usize>> {
    let b = channel_block(c, plane);
    (0..c).step_by(b).map(|c0| c0..(c0 + b).min(c)).collect()
}

/// One channel's entries of [`Stats`].
struct ChannelStats {
    mean: f32,
    var: f32,
    invstd: f32,
    affine: (f32, f32),
}

/// Train-mode batch norm on slices: `y` (same layout as `x`, NCHW with `dims` = (N, C,
/// H * W)), followed by the activation `act` if given, and the batch statistics.
///
/// Per block of channels ([`blocks`]): the sums about each channel's first plane's mean (one
/// pass, [`channel::shifted_sums`]), then `y` in a second pass with a ReLU or ReLU6 applied
/// in it. `y` is written once, never zero-filled first (a zero fill was a whole extra pass
/// over the output).
pub(crate) fn train_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    dims @ (n, c, plane): (usize, usize, usize),
    act: Option<Kind>,
) -> (Vec<f32>, Stats) {
    let len = n * c * plane;
    assert!(
        x.len() == len,
        "batch norm: input of {} values for {dims:?}",
        x.len()
    );
    let count = (n * plane) as f64;
    let upper = act.and_then(Kind::clamp_upper);
    let mut y: Vec<f32> = Vec::with_capacity(len);
    let out = SharedMut::uninit(&mut y.spare_capacity_mut()[..len]);
    let per_block: Vec<Vec<ChannelStats>> = blocks(dims)
        .into_par_iter()
        .map(|chans| {
            let planes = Planes::block(chans.clone(), dims);
            // The shifts: each channel's first plane's mean (near the channel's, so the
            // one-pass variance does not cancel when the values sit far from zero).
            let zeros = vec![0f32; chans.len()];
            let shifts: Vec<f32> = channel::shifted_sums(x, planes.first_only(), &zeros)
                .iter()
                .map(|s| (s.0 / plane as f64) as f32)
                .collect();
            let sums = channel::shifted_sums(x, planes, &shifts);
            let mut stats: Vec<ChannelStats> = Vec::with_capacity(chans.len());
            for ((ch, (s1, s2)), shift) in chans.zip(sums).zip(shifts) {
                let d = s1 / count;
                let mean = shift as f64 + d;
                let var = (s2 / count - d * d).max(0.0);
                let invstd = 1.0 / (var + eps).sqrt();
                let g = gamma[ch] as f64;
                stats.push(ChannelStats {
                    mean: mean as f32,
                    var: var as f32,
                    invstd: invstd as f32,
                    affine: (
                        (g * invstd) as f32,
                        (beta[ch] as f64 - mean * g * invstd) as f32,
                    ),
                });
            }
            let affine: Vec<(f32, f32)> = stats.iter().map(|s| s.affine).collect();
            // SAFETY: this block's planes are written by this task only; `y` outlives it.
            unsafe { channel::normalize(x, &out, planes, &affine, upper) };
            if let (Some(k), None) = (act, upper) {
                for (o, _) in planes.offsets() {
                    // SAFETY: as above; the planes were written by `normalize`.
                    let dst = unsafe { out.part(o, plane) };
                    dst.iter_mut().for_each(|v| *v = k.forward(*v));
                }
            }
            stats
        })
        .collect();
    // SAFETY: the blocks' planes cover all `len` values, each written above.
    unsafe { y.set_len(len) };
    let per_channel: Vec<ChannelStats> = per_block.into_iter().flatten().collect();
    let stats = Stats {
        mean: per_channel.iter().map(|s| s.mean).collect(),
        var: per_channel.iter().map(|s| s.var).collect(),
        invstd: per_channel.iter().map(|s| s.invstd).collect(),
        affine: per_channel.iter().map(|s| s.affine).collect(),
    };
    (y, stats)
}

/// The closed-form backward on slices: `[dx | dgamma | dbeta]` (dx only with `need_x`), from
/// the forward's input, `gamma`, the output gradient and the forward's statistics. With
/// `mask`, `dy` is the gradient of the ReLU or ReLU6 that followed the batch norm, masked
/// here inside both passes (a separate pass over `dy` before this one cost as much as one of
/// them).
pub(crate) fn train_backward(
    x: &[f32],
    gamma: &[f32],
    dy: &[f32],
    stats: &Stats,
    dims @ (n, c, plane): (usize, usize, usize),
    need_x: bool,
    mask: Option<ActMask>,
) -> Vec<f32> {
    let Stats { mean, invstd, .. } = stats;
    let count = (n * plane) as f64;
    let dx_len = if need_x { x.len() } else { 0 };
    let len = dx_len + 2 * c;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let shared = SharedMut::uninit(&mut out.spare_capacity_mut()[..len]);
    blocks(dims).into_par_iter().for_each(|chans| {
        let planes = Planes::block(chans.clone(), dims);
        let mask = mask.map(|m| m.for_channels(chans.clone()));
        let sums = channel::grad_sums(dy, x, mask, planes, &mean[chans.clone()]);
        let mut k = Vec::with_capacity(chans.len());
        for (ch, (sum_dy, sum_dy_xc)) in chans.zip(sums) {
            let (is, g) = (invstd[ch] as f64, gamma[ch] as f64);
            // SAFETY: entries ch of dgamma and dbeta are written by this task only.
            unsafe {
                shared
                    .as_ptr()
                    .add(dx_len + ch)
                    .write((sum_dy_xc * is) as f32);
                shared.as_ptr().add(dx_len + c + ch).write(sum_dy as f32);
            }
            // dx = k1 dy + k2 (x - mean) + k3
            let k1 = (g * is) as f32;
            let k2 = (-g * is * is * is * sum_dy_xc / count) as f32;
            let k3 = (-g * is * sum_dy / count) as f32;
            k.push((k1, k2, k3 - k2 * mean[ch]));
        }
        if need_x {
            // SAFETY: this block's planes of dx are written by this task only.
            unsafe { channel::grad_input(dy, x, mask, &shared, planes, &k) };
        }
    });
    // SAFETY: dx (each block's planes) and both parameter gradients were written above.
    unsafe { out.set_len(len) };
    out
}

/// The per-channel affine map of eval-mode batch norm from its parameters and running
/// statistics: `scale = gamma / sqrt(var + eps)`, `shift = beta - mean * scale`, in f32 as
/// the float executor and the frozen batch norm of QAT both need it (one formula, so the two
/// round alike).
pub fn eval_affine(
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f64,
) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = gamma
        .iter()
        .zip(var)
        .map(|(g, v)| g / (v + eps as f32).sqrt())
        .collect();
    let shift = beta
        .iter()
        .zip(mean)
        .zip(&scale)
        .map(|((b, m), s)| b - m * s)
        .collect();
    (scale, shift)
}

/// Eval-mode batch norm folded into `y = x * scale[c] + shift[c]` (`scale = gamma / sqrt(var +
/// eps)`, `shift = beta - mean * scale`), one pass. Differentiable (through a composed
/// backward, not optimised). Tensors that are not f32 on the CPU run the stock composition.
pub fn batch_norm_eval(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let (_, c, _) = nc_plane(x.dims())?;
    check_channels("scale", scale, c)?;
    check_channels("shift", shift, c)?;
    if !all_cpu_f32(&[x, scale, shift]) {
        return reference::batch_norm_eval(x, scale, shift);
    }
    x.contiguous()?
        .apply_op3(&scale.contiguous()?, &shift.contiguous()?, BatchNormEval)
}

struct BatchNormEval;

impl CustomOp3 for BatchNormEval {
    fn name(&self) -> &'static str {
        "slimcandle-batch-norm-eval"
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
        let scale = f32_slice(s2, l2, self.name())?;
        let shift = f32_slice(s3, l3, self.name())?;
        let (_, c, plane) = nc_plane(l1.dims())?;
        let mut y = vec![0f32; x.len()];
        if plane > 0 {
            y.par_chunks_mut(plane)
                .zip(x.par_chunks(plane))
                .enumerate()
                .for_each(|(i, (dst, src))| {
                    let (a, b) = (scale[i % c], shift[i % c]);
                    for (d, v) in dst.iter_mut().zip(src) {
                        *d = v * a + b;
                    }
                });
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _shift: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let per_channel = |t: &Tensor| t.reshape((1, (), 1, 1));
        let sum_nhw = |t: Tensor| {
            t.sum_keepdim(0)?
                .sum_keepdim(2)?
                .sum_keepdim(3)?
                .flatten_all()
        };
        let dx = dy.broadcast_mul(&per_channel(scale)?)?;
        let dscale = sum_nhw(dy.mul(x)?)?;
        let dshift = sum_nhw(dy.clone())?;
        Ok((Some(dx), Some(dscale), Some(dshift)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward (ReLU fused) and backward (its mask read from the output and recomputed)
    /// against an f64 reference, on shapes whose small planes run in blocks of several
    /// channels and whose large ones one channel a task.
    #[test]
    fn train_passes_match_an_f64_reference_in_channel_blocks() {
        for dims @ (n, c, plane) in [(8, 64, 64), (6, 40, 9), (3, 16, 300), (4, 24, 36)] {
            assert!(plane >= BLOCK_VALUES || channel_block(c, plane) > 1 || c < 16);
            let len = n * c * plane;
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1013) as f32 / 200.0 - 2.0)
                .collect();
            let dy: Vec<f32> = (0..len)
                .map(|i| ((i * 104_729) % 997) as f32 / 500.0 - 1.0)
                .collect();
            let gamma: Vec<f32> = (0..c).map(|j| 0.5 + j as f32 / c as f32).collect();
            let beta: Vec<f32> = (0..c).map(|j| 0.3 - j as f32 / (2 * c) as f32).collect();
            let (y, stats) = train_forward(&x, &gamma, &beta, 1e-5, dims, Some(Kind::Relu));
            let at = |s: usize, ch: usize, i: usize| (s * c + ch) * plane + i;
            let m = (n * plane) as f64;
            let mut want_dx = vec![0f64; len];
            let mut want_dg = vec![0f64; c];
            let mut want_db = vec![0f64; c];
            for ch in 0..c {
                let idx: Vec<usize> = (0..n)
                    .flat_map(|s| (0..plane).map(move |i| at(s, ch, i)))
                    .collect();
                let mean = idx.iter().map(|&k| x[k] as f64).sum::<f64>() / m;
                let var = idx
                    .iter()
                    .map(|&k| (x[k] as f64 - mean).powi(2))
                    .sum::<f64>()
                    / m;
                let is = 1.0 / (var + 1e-5).sqrt();
                assert!(
                    (stats.mean[ch] as f64 - mean).abs() < 1e-5,
                    "{dims:?} mean {ch}"
                );
                assert!(
                    (stats.var[ch] as f64 - var).abs() < 1e-4 * (1.0 + var),
                    "{dims:?} var {ch}"
                );
                let xhat = |k: usize| (x[k] as f64 - mean) * is;
                let yv = |k: usize| (gamma[ch] as f64 * xhat(k) + beta[ch] as f64).max(0.0);
                for &k in &idx {
                    assert!((y[k] as f64 - yv(k)).abs() < 1e-4, "{dims:?} y at {k}");
                }
                let g = |k: usize| if yv(k) > 0.0 { dy[k] as f64 } else { 0.0 };
                let db: f64 = idx.iter().map(|&k| g(k)).sum();
                let dg: f64 = idx.iter().map(|&k| g(k) * xhat(k)).sum();
                want_db[ch] = db;
                want_dg[ch] = dg;
                for &k in &idx {
                    want_dx[k] = gamma[ch] as f64 * is * (g(k) - db / m - xhat(k) * dg / m);
                }
            }
            for source in [Source::Output(&y), Source::Affine(&stats.affine)] {
                let mask = Some(ActMask {
                    source,
                    upper: f32::INFINITY,
                });
                let out = train_backward(&x, &gamma, &dy, &stats, dims, true, mask);
                let close = |a: f32, b: f64| (a as f64 - b).abs() <= 2e-3 * (1.0 + b.abs());
                for k in 0..len {
                    assert!(
                        close(out[k], want_dx[k]),
                        "{dims:?} dx at {k}: {} vs {}",
                        out[k],
                        want_dx[k]
                    );
                }
                for ch in 0..c {
                    assert!(close(out[len + ch], want_dg[ch]), "{dims:?} dgamma {ch}");
                    assert!(close(out[len + c + ch], want_db[ch]), "{dims:?} dbeta {ch}");
                }
            }
        }
    }
}
