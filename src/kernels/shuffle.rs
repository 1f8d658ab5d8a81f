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

/// Where output channel `o` of a shuffle of `c` channels in `groups` comes from: input
/// channel `(o % groups) (c / groups) + o / groups` (torchvision's convention, above).
fn sources(c: usize, groups: usize) -> Vec<usize> {
    let per_group = c / groups;
    (0..c)
        .map(|o| (o % groups) * per_group + o / groups)
        .collect()
}

/// The channel shuffle of pixels stored channels last (`c` values each, `x` and `y` whole
/// pixels), for the eval executor's channels-last plans; with `threads` > 1 the pixels are
/// shared out over the spinning team. Why: gathered one value at a time on one thread it
/// cost 0.35-0.42 ms of a 2.6 ms ShuffleNet V1 pass at batch 1 (224x224), more than NCHW's
/// whole-plane copies; with AVX-512 each pixel's 16 outputs at a time are one gather.
pub(crate) fn channels_last(x: &[f32], y: &mut [f32], c: usize, groups: usize, threads: usize) {
    assert!(
        groups > 0
            && c.is_multiple_of(groups)
            && x.len() == y.len()
            && x.len().is_multiple_of(c.max(1)),
        "channel shuffle: sizes"
    );
    if c == 0 {
        return;
    }
    let from = sources(c, groups);
    let index: Vec<i32> = from.iter().map(|&f| f as i32).collect();
    let pixels = x.len() / c;
    let out = super::cpu::SharedMut::new(y);
    let run = |range: std::ops::Range<usize>| {
        // SAFETY: the pixel runs of the tasks are disjoint, within `y` (asserted).
        let dst = unsafe { out.part(range.start * c, range.len() * c) };
        let src = &x[range.start * c..range.end * c];
        #[cfg(target_arch = "x86_64")]
        if super::simd::level() == super::simd::Level::Avx512 {
            // SAFETY: AVX-512F is present; `index` holds c values below c.
            return unsafe { x86::gather_pixels(src, dst, &index) };
        }
        for (d, s) in dst.chunks_exact_mut(c).zip(src.chunks_exact(c)) {
            for (v, &f) in d.iter_mut().zip(&from) {
                *v = s[f];
            }
        }
    };
    if threads > 1 && pixels > 1 {
        super::team::run_parts(pixels, threads, &run);
    } else {
        run(0..pixels);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::kernels::simd::first_lanes;
    use std::arch::x86_64::*;

    /// `dst`'s pixels from `src`'s: output channel `o` of each is input channel `index[o]`,
    /// sixteen channels a gather.
    ///
    /// # Safety
    /// AVX-512F; `src` and `dst` whole pixels of `index.len()` values, every index below it.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gather_pixels(src: &[f32], dst: &mut [f32], index: &[i32]) {
        let c = index.len();
        for (d, s) in dst.chunks_exact_mut(c).zip(src.chunks_exact(c)) {
            for o0 in (0..c).step_by(16) {
                let mask = first_lanes(c - o0);
                // SAFETY: lanes below `c - o0` read index[o0..] and write d[o0..] within
                // the pixel; the gathered indices lie within the pixel `s` (the caller's).
                unsafe {
                    let idx = _mm512_maskz_loadu_epi32(mask, index.as_ptr().add(o0));
                    let v =
                        _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, idx, s.as_ptr());
                    _mm512_mask_storeu_ps(d.as_mut_ptr().add(o0), mask, v);
                }
            }
        }
    }
}

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
        let plane = h * w;
        let from = sources(c, self.groups);
        let mut y = vec![0f32; x.len()];
        if plane > 0 {
            y.par_chunks_mut(plane).enumerate().for_each(|(j, dst)| {
                // Output plane j = (n, o) comes from input plane (n, from[o]).
                let (n, o) = (j / c, j % c);
                let src = n * c + from[o];
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The channels-last shuffle against the scalar permutation, for group counts and
    /// channel counts over and under a vector, on one thread and on the team.
    #[test]
    fn channels_last_matches_the_permutation() {
        for &(c, groups) in &[(60, 3), (240, 3), (12, 4), (8, 2), (6, 3), (48, 8)] {
            let pixels = 37;
            let x: Vec<f32> = (0..pixels * c).map(|i| i as f32 * 0.5 - 3.0).collect();
            let from = sources(c, groups);
            let want: Vec<f32> = x
                .chunks_exact(c)
                .flat_map(|p| from.iter().map(move |&f| p[f]))
                .collect();
            for threads in [1, 2] {
                let mut got = vec![f32::NAN; x.len()];
                channels_last(&x, &mut got, c, groups, threads);
                assert_eq!(got, want, "c {c} groups {groups} threads {threads}");
            }
        }
    }
}
