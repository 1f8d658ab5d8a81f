//! Static shape inference for one image (batch size left out).

use super::{Graph, Op};
use anyhow::{Result, bail};
use serde::Serialize;

/// Shape of one image's activation: C x H x W, or a flat vector of `c` features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Dims {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub flat: bool,
}

impl Dims {
    pub fn elements(&self) -> usize {
        self.c * self.h * self.w
    }

    /// The shape with a batch dimension, as PyTorch would print it.
    pub fn with_batch(&self, n: usize) -> Vec<usize> {
        if self.flat {
            vec![n, self.c]
        } else {
            vec![n, self.c, self.h, self.w]
        }
    }
}

/// PyTorch's pooling/conv output size, including its ceil-mode rule that the last window must
/// start inside the input or left padding.
pub fn pooled_len(
    len: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
    ceil: bool,
) -> Option<usize> {
    let span = dilation * (kernel - 1) + 1;
    let padded = len + 2 * padding;
    if padded < span {
        return None;
    }
    let num = padded - span;
    let mut out = if ceil {
        num.div_ceil(stride)
    } else {
        num / stride
    } + 1;
    if ceil && (out - 1) * stride >= len + padding {
        out -= 1;
    }
    Some(out)
}

impl Graph {
    /// Shapes of every node for an input of `h` x `w`; errors name the node that cannot run.
    pub fn infer_shapes(&self, h: usize, w: usize) -> Result<Vec<Dims>> {
        let mut dims: Vec<Dims> = Vec::with_capacity(self.nodes.len());
        let counts = self.channel_counts()?;
        for (id, node) in self.nodes.iter().enumerate() {
            let d = |k: usize| dims[node.inputs[k]];
            let spatial = |x: Dims,
                           kernel,
                           stride,
                           padding,
                           dilation,
                           ceil|
             -> Result<(usize, usize)> {
                if x.flat {
                    bail!(
                        "node `{}` ({}) needs a C x H x W input, gets a flat vector",
                        node.name,
                        node.op.kind()
                    );
                }
                match (
                    pooled_len(x.h, kernel, stride, padding, dilation, ceil),
                    pooled_len(x.w, kernel, stride, padding, dilation, ceil),
                ) {
                    (Some(h), Some(w)) if h > 0 && w > 0 => Ok((h, w)),
                    _ => bail!(
                        "node `{}` ({}): a {}x{} input is too small for a {kernel}x{kernel} window; use a larger input",
                        node.name,
                        node.op.kind(),
                        x.h,
                        x.w
                    ),
                }
            };
            let c = counts[id];
            let out = match &node.op {
                Op::Input { .. } => Dims {
                    c,
                    h,
                    w,
                    flat: false,
                },
                Op::Conv2d {
                    kernel,
                    stride,
                    padding,
                    dilation,
                    ..
                } => {
                    let (h, w) = spatial(d(0), *kernel, *stride, *padding, *dilation, false)?;
                    Dims {
                        c,
                        h,
                        w,
                        flat: false,
                    }
                }
                Op::MaxPool {
                    kernel,
                    stride,
                    padding,
                    ceil_mode,
                } => {
                    let (h, w) = spatial(d(0), *kernel, *stride, *padding, 1, *ceil_mode)?;
                    Dims {
                        c,
                        h,
                        w,
                        flat: false,
                    }
                }
                Op::AvgPool {
                    kernel,
                    stride,
                    padding,
                } => {
                    let (h, w) = spatial(d(0), *kernel, *stride, *padding, 1, false)?;
                    Dims {
                        c,
                        h,
                        w,
                        flat: false,
                    }
                }
                Op::GlobalAvgPool => Dims {
                    c,
                    h: 1,
                    w: 1,
                    flat: false,
                },
                Op::Flatten => Dims {
                    c: d(0).elements(),
                    h: 1,
                    w: 1,
                    flat: true,
                },
                Op::Linear { in_features, .. } => {
                    if d(0).elements() != *in_features {
                        bail!(
                            "linear `{}` expects {in_features} features, gets {}",
                            node.name,
                            d(0).elements()
                        );
                    }
                    Dims {
                        c,
                        h: 1,
                        w: 1,
                        flat: true,
                    }
                }
                Op::Add => {
                    if d(0) != d(1) {
                        bail!(
                            "add `{}` combines shapes {:?} and {:?}",
                            node.name,
                            d(0).with_batch(1),
                            d(1).with_batch(1)
                        );
                    }
                    d(0)
                }
                Op::ChannelMul => {
                    if d(1).h != 1 || d(1).w != 1 {
                        bail!("channel_mul `{}`: the scale must be C x 1 x 1", node.name);
                    }
                    d(0)
                }
                Op::Concat => {
                    let first = d(0);
                    if node.inputs.iter().any(|&i| {
                        (dims[i].h, dims[i].w, dims[i].flat) != (first.h, first.w, first.flat)
                    }) {
                        bail!(
                            "concat `{}` joins inputs of different spatial sizes",
                            node.name
                        );
                    }
                    Dims { c, ..first }
                }
                _ => Dims { c, ..d(0) },
            };
            dims.push(out);
        }
        Ok(dims)
    }
}
