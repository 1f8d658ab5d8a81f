//! Building blocks shared by the model families.

use crate::graph::{Activation, GraphBuilder, NodeId};

/// torchvision's `_make_divisible`: round to the nearest multiple of `divisor`, never going
/// below `divisor` or more than 10% below `v`.
pub fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut rounded = (((v + d / 2.0) as usize) / divisor * divisor).max(divisor);
    if (rounded as f64) < 0.9 * v {
        rounded += divisor;
    }
    rounded
}

/// Batch-norm settings of a family: PyTorch's defaults, or MobileNet V3's.
#[derive(Debug, Clone, Copy)]
pub struct Bn {
    pub eps: f64,
    pub momentum: f64,
}

/// `nn.BatchNorm2d` defaults.
pub const BN: Bn = Bn {
    eps: 1e-5,
    momentum: 0.1,
};

/// Conv (no bias) + batch norm + optional activation, named `{conv}` and `{bn}` so callers can
/// follow torchvision's numbering (`features.0.0`/`features.0.1`, or `.3`/`.4` in a block).
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_act(
    b: &mut GraphBuilder,
    conv: &str,
    bn: &str,
    x: NodeId,
    out: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
    norm: Bn,
    act: Option<Activation>,
) -> NodeId {
    let y = b.conv(
        conv,
        x,
        out,
        kernel,
        stride,
        (kernel - 1) / 2,
        groups,
        false,
    );
    let y = b.batch_norm(bn, y, norm.eps, norm.momentum);
    match act {
        Some(a) => b.act(a, y),
        None => y,
    }
}

/// torchvision's `Conv2dNormActivation` under `prefix` (`prefix.0` conv, `prefix.1` norm).
#[allow(clippy::too_many_arguments)]
pub fn conv_norm_act(
    b: &mut GraphBuilder,
    prefix: &str,
    x: NodeId,
    out: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
    norm: Bn,
    act: Option<Activation>,
) -> NodeId {
    conv_bn_act(
        b,
        &format!("{prefix}.0"),
        &format!("{prefix}.1"),
        x,
        out,
        kernel,
        stride,
        groups,
        norm,
        act,
    )
}

#[cfg(test)]
mod tests {
    use super::make_divisible;

    #[test]
    fn make_divisible_matches_torchvision() {
        assert_eq!(make_divisible(32.0 * 0.35, 8), 16);
        assert_eq!(make_divisible(16.0 * 0.5, 8), 8);
        assert_eq!(make_divisible(24.0 * 1.4, 8), 32);
        assert_eq!(make_divisible(1280.0, 8), 1280);
        assert_eq!(make_divisible(72.0 * 0.75, 8), 56);
    }
}
