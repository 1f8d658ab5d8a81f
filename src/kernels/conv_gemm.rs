//! Dense (groups == 1) and grouped convolution as per-group GEMMs, forward and backward.
//!
//! Why: per sample and group, with `cols` the im2col matrix ((C_in/g) k k) x (H_out W_out)
//! and `W_g` the group's filters as a (C_out/g) x ((C_in/g) k k) matrix,
//!
//! - forward:         `Y_g = W_g cols`
//! - input gradient:  `dcols = W_g^T dY_g`, then col2im into dX
//! - weight gradient: `dW_g += dY_g cols^T`, summed over the batch
//!
//! A 1x1 stride-1 unpadded convolution needs no im2col at all: `cols` is the input itself, and
//! `dcols` is the input gradient. Forward, such a convolution of small planes (up to 64
//! values) runs as one GEMM over the whole batch (`pointwise_batched`). Everything is one op per convolution (no
//! chunk-and-concatenate). Samples run in parallel with single-threaded GEMMs when the batch
//! has at least one sample per thread; otherwise each GEMM uses all threads.

use super::{
    conv::{ConvGeom, conv_backward},
    cpu::{SharedMut, f32_slice},
    gemm::{MatMut, MatRef, Parallelism, matmul, parallelism},
    im2col::{col2im, im2col},
};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Per-group matrix sizes.
#[derive(Clone, Copy)]
struct Dims {
    /// Input and output channels per group.
    cig: usize,
    cog: usize,
    /// Columns of `W_g`: (C_in/g) k k.
    kdim: usize,
    /// Input and output plane sizes.
    hw: usize,
    p: usize,
    /// 1x1, stride 1, no padding: the input is its own column matrix.
    direct: bool,
}

impl Dims {
    fn of(g: &ConvGeom) -> Self {
        let cig = g.c_in / g.groups;
        Dims {
            cig,
            cog: g.c_out / g.groups,
            kdim: cig * g.k * g.k,
            hw: g.h * g.w,
            p: g.ho * g.wo,
            direct: g.k == 1 && g.stride == 1 && g.pad == 0,
        }
    }

    fn cols_len(&self) -> usize {
        if self.direct { 0 } else { self.kdim * self.p }
    }
}

/// Whether to run samples in parallel (single-threaded GEMMs) rather than one after the other
/// (multi-threaded GEMMs).
fn batch_parallel(n: usize) -> bool {
    let threads = rayon::current_num_threads();
    threads > 1 && n >= threads
}

fn forward(g: &ConvGeom, x: &[f32], w: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; g.y_shape().iter().product()];
    forward_into(g, x, w, &mut y, true, &|_, _, _| {});
    y
}

/// Writes the convolution of `x` with `w` into `y` (N x C_out x H_out x W_out, every value
/// overwritten), calling `post(sample, first_channel, block)` on each block of whole output
/// planes right after its GEMM, while it is in cache (the eval executor's fused epilogue).
/// With `parallel`, samples (or else the GEMMs) use the rayon pool; without, one thread.
///
/// A 1x1 convolution of 1x1 planes (squeeze-and-excitation, classifier heads) runs as one
/// GEMM over the batch instead of one matrix-vector product per sample.
pub(crate) fn forward_into(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    parallel: bool,
    post: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
) {
    let d = Dims::of(g);
    let x_sample = g.c_in * d.hw;
    let y_sample = g.c_out * d.p;
    assert_eq!(y.len(), g.n * y_sample, "conv2d: output buffer size");
    if d.direct && d.hw == 1 && g.groups == 1 {
        let par = if parallel {
            parallelism(false)
        } else {
            Parallelism::None
        };
        let dst = MatMut::rows(y, g.n, g.c_out);
        let a = MatRef::rows(x, g.n, g.c_in);
        let b = MatRef::rows(w, g.c_out, g.c_in).t();
        matmul(dst, false, a, b, par);
        for (n, row) in y.chunks_mut(g.c_out).enumerate() {
            post(n, 0, row);
        }
        return;
    }
    if d.direct && g.groups == 1 && g.n > 1 && d.p <= SMALL_PLANE {
        let par = if parallel {
            parallelism(false)
        } else {
            Parallelism::None
        };
        pointwise_batched(g, x, w, y, par, post);
        return;
    }
    let sample = |n: usize, yn: &mut [f32], cols: &mut [f32], par: Parallelism| {
        let xn = &x[n * x_sample..(n + 1) * x_sample];
        for gi in 0..g.groups {
            let xg = &xn[gi * d.cig * d.hw..(gi + 1) * d.cig * d.hw];
            let b = if d.direct {
                MatRef::rows(xg, d.kdim, d.p)
            } else {
                im2col(g, d.cig, xg, cols);
                MatRef::rows(cols, d.kdim, d.p)
            };
            let a = MatRef::rows(&w[gi * d.cog * d.kdim..], d.cog, d.kdim);
            let block = &mut yn[gi * d.cog * d.p..(gi + 1) * d.cog * d.p];
            matmul(MatMut::rows(block, d.cog, d.p), false, a, b, par);
            post(n, gi * d.cog, block);
        }
    };
    if parallel && batch_parallel(g.n) {
        y.par_chunks_mut(y_sample).enumerate().for_each_init(
            || vec![0f32; d.cols_len()],
            |cols, (n, yn)| sample(n, yn, cols, Parallelism::None),
        );
    } else {
        let par = if parallel {
            parallelism(false)
        } else {
            Parallelism::None
        };
        let mut cols = vec![0f32; d.cols_len()];
        for (n, yn) in y.chunks_mut(y_sample).enumerate() {
            sample(n, yn, &mut cols, par);
        }
    }
}

/// Output planes up to this size make a 1x1 convolution one GEMM over the batch.
const SMALL_PLANE: usize = 64;

/// A 1x1 stride-1 convolution of small planes as one GEMM over the batch: per sample the
/// GEMM would be C_out x P with a P of a few columns (poor use of the micro-kernel, and the
/// weights packed again for every sample). The input is gathered into C_in x (N P), the
/// product written to a C_out x (N P) scratch, and scattered back into NCHW per sample.
fn pointwise_batched(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    par: Parallelism,
    post: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
) {
    let (n, ci, co, p) = (g.n, g.c_in, g.c_out, g.ho * g.wo);
    let cols = n * p;
    let mut xb = vec![0f32; ci * cols];
    for (s, xs) in x.chunks_exact(ci * p).enumerate() {
        for (c, plane) in xs.chunks_exact(p).enumerate() {
            xb[c * cols + s * p..c * cols + (s + 1) * p].copy_from_slice(plane);
        }
    }
    let mut yb = vec![0f32; co * cols];
    matmul(
        MatMut::rows(&mut yb, co, cols),
        false,
        MatRef::rows(w, co, ci),
        MatRef::rows(&xb, ci, cols),
        par,
    );
    for (s, ys) in y.chunks_exact_mut(co * p).enumerate() {
        for (c, plane) in ys.chunks_exact_mut(p).enumerate() {
            plane.copy_from_slice(&yb[c * cols + s * p..c * cols + (s + 1) * p]);
        }
        post(s, 0, ys);
    }
}

/// Returns `[dX | dW]` (each part only when requested).
pub(crate) fn backward(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    need_x: bool,
    need_w: bool,
) -> Vec<f32> {
    let d = Dims::of(g);
    let x_sample = g.c_in * d.hw;
    let y_sample = g.c_out * d.p;
    let dx_len = if need_x { g.n * x_sample } else { 0 };
    let dw_len = if need_w { g.c_out * d.kdim } else { 0 };
    let mut out = vec![0f32; dx_len + dw_len];
    let (dx, dw) = out.split_at_mut(dx_len);
    let dx = SharedMut::new(dx);

    // Samples `range`, accumulating their weight gradient into a fresh buffer.
    let run = |range: std::ops::Range<usize>, par: Parallelism| -> Vec<f32> {
        let mut dw_part = vec![0f32; dw_len];
        let mut cols = vec![0f32; if need_w { d.cols_len() } else { 0 }];
        let mut dcols = vec![0f32; if need_x { d.cols_len() } else { 0 }];
        for n in range {
            let xn = &x[n * x_sample..(n + 1) * x_sample];
            let dyn_ = &dy[n * y_sample..(n + 1) * y_sample];
            // SAFETY: each sample's input gradient is written by exactly one `run` call, and
            // `out` outlives the parallel loop below.
            let dxn = if need_x {
                unsafe { dx.part(n * x_sample, x_sample) }
            } else {
                &mut [][..]
            };
            for gi in 0..g.groups {
                let xg = &xn[gi * d.cig * d.hw..(gi + 1) * d.cig * d.hw];
                let dyg = MatRef::rows(&dyn_[gi * d.cog * d.p..], d.cog, d.p);
                let wg = MatRef::rows(&w[gi * d.cog * d.kdim..], d.cog, d.kdim);
                if need_w {
                    let b = if d.direct {
                        MatRef::rows(xg, d.kdim, d.p)
                    } else {
                        im2col(g, d.cig, xg, &mut cols);
                        MatRef::rows(&cols, d.kdim, d.p)
                    };
                    let dst = MatMut::rows(&mut dw_part[gi * d.cog * d.kdim..], d.cog, d.kdim);
                    matmul(dst, true, dyg, b.t(), par);
                }
                if need_x {
                    let dxg = &mut dxn[gi * d.cig * d.hw..(gi + 1) * d.cig * d.hw];
                    if d.direct {
                        matmul(MatMut::rows(dxg, d.kdim, d.p), false, wg.t(), dyg, par);
                    } else {
                        matmul(
                            MatMut::rows(&mut dcols, d.kdim, d.p),
                            false,
                            wg.t(),
                            dyg,
                            par,
                        );
                        col2im(g, d.cig, &dcols, dxg);
                    }
                }
            }
        }
        dw_part
    };

    let partials: Vec<Vec<f32>> = if batch_parallel(g.n) {
        // A few chunks per thread for balance, unless the per-chunk weight gradients are big.
        let threads = rayon::current_num_threads();
        let per_thread = if dw_len <= 1 << 20 { 2 } else { 1 };
        let chunk = g.n.div_ceil(threads * per_thread);
        (0..g.n.div_ceil(chunk))
            .into_par_iter()
            .map(|i| run(i * chunk..((i + 1) * chunk).min(g.n), Parallelism::None))
            .collect()
    } else {
        vec![run(0..g.n, parallelism(false))]
    };
    for part in partials {
        for (a, b) in dw.iter_mut().zip(part) {
            *a += b;
        }
    }
    out
}

/// Forward op: `(x, w) -> y`.
pub(crate) struct GemmConv(pub ConvGeom);

impl CustomOp2 for GemmConv {
    fn name(&self) -> &'static str {
        "slimcandle-gemm-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        g.check_lens(x, w, None)?;
        let y = forward(g, x, w);
        Ok((CpuStorage::F32(y), Shape::from_dims(&g.y_shape())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        conv_backward(&self.0, x, w, dy, |need_x, need_w| GemmConvBackward {
            g: self.0,
            need_x,
            need_w,
        })
    }
}

/// Backward op: `(x, w, dy) -> [dx | dw]`, flattened.
struct GemmConvBackward {
    g: ConvGeom,
    need_x: bool,
    need_w: bool,
}

impl CustomOp3 for GemmConvBackward {
    fn name(&self) -> &'static str {
        "slimcandle-gemm-conv2d-backward"
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
        let w = f32_slice(s2, l2, self.name())?;
        let dy = f32_slice(s3, l3, self.name())?;
        self.g.check_lens(x, w, Some(dy))?;
        let out = backward(&self.g, x, w, dy, self.need_x, self.need_w);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from_dims(&[len])))
    }
}
