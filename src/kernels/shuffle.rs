//! Channel shuffle (ShuffleNet) as one permutation copy of whole planes.
//!
//! Why: the composition (reshape, transpose, contiguous copy, reshape) is a strided copy plus
//! bookkeeping in both directions. Torchvision's convention views the channels as
//! (groups, C / groups), transposes and flattens: output channel `i * groups + gi` is input
//! channel `gi * (C / groups) + i`. The inverse permutation, which is the backward, is the
//! same shuffle with `C / groups` groups.

use super::{
    cpu::{all_cpu_f32, f32_slice},
    reference,
};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// Torchvision's channel shuffle of an NCHW tensor, with backward (the inverse shuffle).
/// Tensors that are not f32 on the CPU run the reshape / transpose composition.
pub fn channel_shuffle(x: &Tensor, groups: usize) -> Result<Tensor> {
    let &[_, c, _, _] = x.dims() else {
        bail!(
            "channel shuffle: expected an input of shape [N, C, H, W], got {:?}",
            x.dims()
        )
    };
    if groups == 0 || c % groups != 0 {
        bail!("channel shuffle: {c} channels cannot be split into {groups} groups")
    }
    if !all_cpu_f32(&[x]) {
        return reference::channel_shuffle(x, groups);
    }
    x.contiguous()?.apply_op1(ChannelShuffle { groups })
}

struct ChannelShuffle {
    groups: usize,
}

impl CustomOp1 for ChannelShuffle {
    fn name(&self) -> &'static str {
        "slimcandle-channel-shuffle"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let &[_, c, h, w] = l.dims() else {
            bail!("{}: expected a 4-D input", self.name())
        };
        let (g, plane) = (self.groups, h * w);
        let per_group = c / g;
        let mut y = vec![0f32; x.len()];
        if plane > 0 {
            y.par_chunks_mut(plane).enumerate().for_each(|(j, dst)| {
                // Output plane j = (n, o) with o = i * g + gi comes from input (n, gi * C/g + i).
                let (n, o) = (j / c, j % c);
                let src = n * c + (o % g) * per_group + o / g;
                dst.copy_from_slice(&x[src * plane..(src + 1) * plane]);
            });
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let c = x.dim(1)?;
        Ok(Some(channel_shuffle(dy, c / self.groups)?))
    }
}
