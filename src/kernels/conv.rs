//! `conv2d`: the entry point that validates a convolution and picks its kernel.
//!
//! Why: stock Candle splits a grouped convolution into one convolution per group and
//! concatenates, and differentiates through `conv_transpose2d`, a naive loop. Here a
//! depthwise convolution runs direct per-plane loops (`depthwise.rs`) and every other one runs
//! per-group GEMMs in both directions (`conv_gemm.rs`).

use super::{conv_gemm::GemmConv, cpu::all_cpu_f32, cpu::unpack, depthwise, reference};
use candle_core::{CustomOp3, Result, Tensor, bail};

/// Everything a kernel needs to know about one convolution (NCHW input, OIHW square weight,
/// symmetric padding, no bias).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvGeom {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub dil: usize,
    pub groups: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvGeom {
    pub(crate) fn new(
        x: &[usize],
        w: &[usize],
        stride: usize,
        pad: usize,
        dil: usize,
        groups: usize,
    ) -> Result<Self> {
        let &[n, c_in, h, wd] = x else {
            bail!("conv2d: expected an input of shape [N, C, H, W], got {x:?}")
        };
        let &[c_out, c_in_g, kh, kw] = w else {
            bail!("conv2d: expected a weight of shape [C_out, C_in / groups, K, K], got {w:?}")
        };
        if stride == 0 || dil == 0 || groups == 0 {
            bail!("conv2d: stride ({stride}), dilation ({dil}) and groups ({groups}) must be >= 1")
        }
        if kh != kw {
            bail!("conv2d: only square kernels are supported, got {kh}x{kw}")
        }
        if kh == 0 || c_in == 0 || c_out == 0 {
            bail!("conv2d: empty kernel or no channels (input {x:?}, weight {w:?})")
        }
        if c_in % groups != 0 || c_out % groups != 0 {
            bail!(
                "conv2d: input channels ({c_in}) and output channels ({c_out}) must be divisible by groups ({groups})"
            )
        }
        if c_in_g * groups != c_in {
            bail!(
                "conv2d: the weight expects {} input channels ({c_in_g} per group x {groups} groups), the input has {c_in}",
                c_in_g * groups
            )
        }
        let span = dil * (kh - 1) + 1;
        let out_len = |len: usize| (len + 2 * pad).checked_sub(span).map(|d| d / stride + 1);
        let (Some(ho), Some(wo)) = (out_len(h), out_len(wd)) else {
            bail!(
                "conv2d: the {kh}x{kw} kernel (dilation {dil}) does not fit the {h}x{wd} input with padding {pad}"
            )
        };
        Ok(ConvGeom {
            n,
            c_in,
            h,
            w: wd,
            c_out,
            k: kh,
            stride,
            pad,
            dil,
            groups,
            ho,
            wo,
        })
    }

    /// One filter per channel: groups == C_in == C_out (more than one channel).
    pub(crate) fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.c_in && self.groups == self.c_out
    }

    pub(crate) fn x_shape(&self) -> [usize; 4] {
        [self.n, self.c_in, self.h, self.w]
    }

    pub(crate) fn w_shape(&self) -> [usize; 4] {
        [self.c_out, self.c_in / self.groups, self.k, self.k]
    }

    pub(crate) fn y_shape(&self) -> [usize; 4] {
        [self.n, self.c_out, self.ho, self.wo]
    }

    /// Checks that an op's buffers match the geometry it was built for.
    pub(crate) fn check_lens(&self, x: &[f32], w: &[f32], dy: Option<&[f32]>) -> Result<()> {
        let len = |s: [usize; 4]| s.iter().product::<usize>();
        if x.len() != len(self.x_shape())
            || w.len() != len(self.w_shape())
            || dy.is_some_and(|dy| dy.len() != len(self.y_shape()))
        {
            bail!("conv2d: buffer sizes do not match {self:?}")
        }
        Ok(())
    }
}

/// 2-D convolution of an NCHW input with an OIHW weight: square kernel, symmetric padding, no
/// bias, with autograd. Note the argument order (stride before padding), unlike
/// `Tensor::conv2d`.
///
/// f32 CPU tensors run our kernels: depthwise (groups == C_in == C_out, dilation 1) as direct
/// loops, everything else as per-group GEMMs (1x1 stride-1 convolutions without copies, others
/// through im2col / col2im). Any other dtype or device runs Candle's own `conv2d`.
/// Non-contiguous inputs are made contiguous first.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    if !all_cpu_f32(&[x, w]) {
        return reference::conv2d(x, w, stride, padding, dilation, groups);
    }
    let g = ConvGeom::new(x.dims(), w.dims(), stride, padding, dilation, groups)?;
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    if depthwise::supports(&g) {
        x.apply_op2(&w, depthwise::DepthwiseConv(g))
    } else {
        x.apply_op2(&w, GemmConv(g))
    }
}

/// The backward of a convolution op: runs `backward(need_x, need_w)`, an op
/// `(x, w, dy) -> [dx | dw]` (flattened), for just the inputs that need a gradient.
pub(crate) fn conv_backward<B: CustomOp3>(
    g: &ConvGeom,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    backward: impl FnOnce(bool, bool) -> B,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (need_x, need_w) = (x.track_op(), w.track_op());
    if !need_x && !need_w {
        return Ok((None, None));
    }
    let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &backward(need_x, need_w))?;
    let mut parts = unpack(&packed, &[(need_x, &g.x_shape()), (need_w, &g.w_shape())])?;
    let dw = parts.pop().flatten();
    Ok((parts.pop().flatten(), dw))
}
