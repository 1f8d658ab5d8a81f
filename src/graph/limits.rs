//! Bounds on the fields of a graph read from a file.
//!
//! A graph in a checkpoint is untrusted input: a zero stride would divide by zero in shape
//! inference, a kernel of 2^40 would overflow the window arithmetic, and a channel count of
//! 2^40 would ask the allocator for terabytes. These bounds are far above any network
//! slimcandle builds (the largest torchvision models have 4096 channels and 11 x 11 kernels)
//! and low enough that products of them fit in `usize` arithmetic.

use super::{Node, Op};
use anyhow::{Result, bail};

/// Most nodes a graph may have.
pub const MAX_NODES: usize = 100_000;
/// Most channels (or features) a node may produce or take.
pub const MAX_CHANNELS: usize = 1 << 20;
/// Largest kernel, stride, padding or dilation of a conv or pool.
pub const MAX_WINDOW: usize = 1 << 12;

/// Checks one node's own fields (not its edges): sizes within the bounds above, windows and
/// strides of at least 1, groups that divide, finite hyper-parameters.
pub(super) fn check_fields(node: &Node) -> Result<()> {
    let name = &node.name;
    let kind = node.op.kind();
    let channels = |what: &str, n: usize| -> Result<()> {
        if n == 0 || n > MAX_CHANNELS {
            bail!("graph: {kind} `{name}`: {what} is {n}; it must be 1 to {MAX_CHANNELS}");
        }
        Ok(())
    };
    let window = |what: &str, n: usize, min: usize| -> Result<()> {
        if n < min || n > MAX_WINDOW {
            bail!("graph: {kind} `{name}`: {what} is {n}; it must be {min} to {MAX_WINDOW}");
        }
        Ok(())
    };
    match &node.op {
        Op::Input { channels: c } => channels("channels", *c)?,
        Op::Conv2d {
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            dilation,
            groups,
            ..
        } => {
            channels("in_channels", *in_channels)?;
            channels("out_channels", *out_channels)?;
            window("kernel", *kernel, 1)?;
            window("stride", *stride, 1)?;
            window("padding", *padding, 0)?;
            window("dilation", *dilation, 1)?;
            if *groups == 0 || in_channels % groups != 0 || out_channels % groups != 0 {
                bail!(
                    "graph: conv `{name}`: {in_channels} -> {out_channels} channels do not divide into {groups} groups"
                );
            }
        }
        Op::BatchNorm {
            channels: c,
            eps,
            momentum,
        } => {
            channels("channels", *c)?;
            if !(eps.is_finite() && *eps > 0.0) {
                bail!("graph: batch norm `{name}`: eps is {eps}; it must be positive");
            }
            if !(0.0..=1.0).contains(momentum) {
                bail!("graph: batch norm `{name}`: momentum is {momentum}; it must be 0 to 1");
            }
        }
        Op::Linear {
            in_features,
            out_features,
            ..
        } => {
            channels("in_features", *in_features)?;
            channels("out_features", *out_features)?;
        }
        Op::ChannelShuffle { groups } => channels("groups", *groups)?,
        Op::MaxPool {
            kernel,
            stride,
            padding,
            ..
        }
        | Op::AvgPool {
            kernel,
            stride,
            padding,
        } => {
            window("kernel", *kernel, 1)?;
            window("stride", *stride, 1)?;
            // PyTorch's rule, which also keeps every window partly inside the input.
            if *padding > kernel / 2 {
                bail!(
                    "graph: {kind} `{name}`: padding {padding} is more than half the kernel {kernel}"
                );
            }
        }
        Op::Dropout { p } => {
            if !(0.0..1.0).contains(p) {
                bail!("graph: dropout `{name}`: p is {p}; it must be at least 0 and below 1");
            }
        }
        Op::Slice { .. }
        | Op::Act { .. }
        | Op::Add
        | Op::ChannelMul
        | Op::Concat
        | Op::GlobalAvgPool
        | Op::Flatten => {}
    }
    Ok(())
}

impl Node {
    /// Elements of the node's parameters and buffers, `None` when they overflow `usize` (or
    /// a conv has zero groups).
    pub fn param_elements(&self) -> Option<usize> {
        node_param_elements(self)
    }
}

fn node_param_elements(node: &Node) -> Option<usize> {
    match &node.op {
        Op::Conv2d {
            in_channels,
            out_channels,
            kernel,
            groups,
            bias,
            ..
        } => out_channels
            .checked_mul(in_channels.checked_div(*groups)?)?
            .checked_mul(kernel.checked_mul(*kernel)?)?
            .checked_add(if *bias { *out_channels } else { 0 }),
        Op::BatchNorm { channels, .. } => channels.checked_mul(4),
        Op::Linear {
            in_features,
            out_features,
            bias,
        } => out_features
            .checked_mul(*in_features)?
            .checked_add(if *bias { *out_features } else { 0 }),
        _ => Some(0),
    }
}
