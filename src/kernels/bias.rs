//! Per-channel bias addition on NCHW tensors.
//!
//! Why: as a broadcast add, Candle's backward sums the gradient over N, H and W with a strided
//! reduction that dominated SqueezeNet's training step (every conv there has a bias). Here the
//! bias gradient is one contiguous pass per plane.

use super::cpu::{all_cpu_f32, f32_slice};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// Forward op `(x, b) -> x + b[c]`.
struct AddBias;

fn nc_plane(x: &Layout) -> Result<(usize, usize, usize)> {
    match x.shape().dims() {
        [n, c, rest @ ..] => Ok((*n, *c, rest.iter().product())),
        d => bail!("add_channel_bias: expected an N x C x ... tensor, got {d:?}"),
    }
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add_channel_bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let b = f32_slice(s2, l2, self.name())?;
        let (_, c, plane) = nc_plane(l1)?;
        if b.len() != c {
            bail!("add_channel_bias: {} bias values for {c} channels", b.len())
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(plane.max(1))
            .zip(x.par_chunks(plane.max(1)))
            .enumerate()
            .for_each(|(i, (d, s))| {
                let bias = b[i % c];
                for (d, &v) in d.iter_mut().zip(s) {
                    *d = v + bias;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = dy.contiguous()?.apply_op1_no_bwd(&ChannelSums(b.dim(0)?))?;
        Ok((Some(dy.clone()), Some(db)))
    }
}

/// `dy -> sum of dy over every dimension but the channels`.
struct ChannelSums(usize);

impl CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        "channel_sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dy = f32_slice(s, l, self.name())?;
        let (n, c, plane) = nc_plane(l)?;
        let sums: Vec<f32> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let mut total = 0f64;
                for i in 0..n {
                    let start = (i * c + ch) * plane;
                    total += dy[start..start + plane]
                        .iter()
                        .map(|&v| v as f64)
                        .sum::<f64>();
                }
                total as f32
            })
            .collect();
        Ok((CpuStorage::F32(sums), Shape::from(self.0)))
    }
}

/// `x + b[c]` for an N x C x ... tensor `x` and a [C] bias, with autograd.
pub fn add_channel_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !all_cpu_f32(&[x, b]) {
        let shape: Vec<usize> = (0..x.rank())
            .map(|d| if d == 1 { b.elem_count() } else { 1 })
            .collect();
        return x.broadcast_add(&b.reshape(shape)?);
    }
    x.contiguous()?.apply_op2(&b.contiguous()?, AddBias)
}
