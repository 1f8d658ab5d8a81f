//! MobileNet V3 small and large (torchvision layout: squeeze-and-excitation with hardsigmoid,
//! hardswish, batch norm eps 0.001, width multiplier rounded to multiples of 8).
//! Small-input stem: the first conv runs at stride 1.

use super::blocks::{Bn, conv_norm_act, make_divisible};
use super::{ArchSpec, Stem};
use crate::graph::{Activation, Graph, GraphBuilder, NodeId};

/// One inverted-residual block: input, kernel, expanded, output channels, SE, hardswish, stride.
struct Bneck(usize, usize, usize, usize, bool, bool, usize);

const LARGE: [Bneck; 15] = [
    Bneck(16, 3, 16, 16, false, false, 1),
    Bneck(16, 3, 64, 24, false, false, 2),
    Bneck(24, 3, 72, 24, false, false, 1),
    Bneck(24, 5, 72, 40, true, false, 2),
    Bneck(40, 5, 120, 40, true, false, 1),
    Bneck(40, 5, 120, 40, true, false, 1),
    Bneck(40, 3, 240, 80, false, true, 2),
    Bneck(80, 3, 200, 80, false, true, 1),
    Bneck(80, 3, 184, 80, false, true, 1),
    Bneck(80, 3, 184, 80, false, true, 1),
    Bneck(80, 3, 480, 112, true, true, 1),
    Bneck(112, 3, 672, 112, true, true, 1),
    Bneck(112, 5, 672, 160, true, true, 2),
    Bneck(160, 5, 960, 160, true, true, 1),
    Bneck(160, 5, 960, 160, true, true, 1),
];

const SMALL: [Bneck; 11] = [
    Bneck(16, 3, 16, 16, true, false, 2),
    Bneck(16, 3, 72, 24, false, false, 2),
    Bneck(24, 3, 88, 24, false, false, 1),
    Bneck(24, 5, 96, 40, true, true, 2),
    Bneck(40, 5, 240, 40, true, true, 1),
    Bneck(40, 5, 240, 40, true, true, 1),
    Bneck(40, 5, 120, 48, true, true, 1),
    Bneck(48, 5, 144, 48, true, true, 1),
    Bneck(48, 5, 288, 96, true, true, 2),
    Bneck(96, 5, 576, 96, true, true, 1),
    Bneck(96, 5, 576, 96, true, true, 1),
];

/// torchvision: `partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)`.
const V3_BN: Bn = Bn {
    eps: 0.001,
    momentum: 0.01,
};

/// torchvision's SqueezeExcitation: pool, fc1 (1x1 conv), relu, fc2, hardsigmoid, scale.
fn squeeze_excite(b: &mut GraphBuilder, prefix: &str, x: NodeId) -> NodeId {
    let channels = b.channels(x);
    let squeeze = make_divisible((channels / 4) as f64, 8);
    let s = b.global_avg_pool(x);
    let s = b.conv(&format!("{prefix}.fc1"), s, squeeze, 1, 1, 0, 1, true);
    let s = b.act(Activation::Relu, s);
    let s = b.conv(&format!("{prefix}.fc2"), s, channels, 1, 1, 0, 1, true);
    let s = b.act(Activation::Hardsigmoid, s);
    b.channel_mul(x, s)
}

pub fn build(spec: &ArchSpec, large: bool) -> Graph {
    let adjust = |c: usize| make_divisible(c as f64 * spec.width, 8);
    let hswish = Some(Activation::Hardswish);
    let setting: &[Bneck] = if large { &LARGE } else { &SMALL };
    let mut b = GraphBuilder::new(3);
    let stem_stride = if spec.stem == Stem::Cifar { 1 } else { 2 };
    let mut x = conv_norm_act(
        &mut b,
        "features.0",
        GraphBuilder::INPUT,
        adjust(setting[0].0),
        3,
        stem_stride,
        1,
        V3_BN,
        hswish,
    );
    for (i, Bneck(inp, kernel, expanded, out, se, hs, stride)) in setting.iter().enumerate() {
        let (inp, expanded, out) = (adjust(*inp), adjust(*expanded), adjust(*out));
        let act = Some(if *hs {
            Activation::Hardswish
        } else {
            Activation::Relu
        });
        let p = format!("features.{}.block", i + 1);
        let mut y = x;
        let mut layer = 0;
        if expanded != inp {
            y = conv_norm_act(&mut b, &format!("{p}.0"), y, expanded, 1, 1, 1, V3_BN, act);
            layer += 1;
        }
        y = conv_norm_act(
            &mut b,
            &format!("{p}.{layer}"),
            y,
            expanded,
            *kernel,
            *stride,
            expanded,
            V3_BN,
            act,
        );
        layer += 1;
        if *se {
            y = squeeze_excite(&mut b, &format!("{p}.{layer}"), y);
            layer += 1;
        }
        y = conv_norm_act(
            &mut b,
            &format!("{p}.{layer}"),
            y,
            out,
            1,
            1,
            1,
            V3_BN,
            None,
        );
        x = if *stride == 1 && inp == out {
            b.add(x, y)
        } else {
            y
        };
    }
    let last_conv = 6 * b.channels(x);
    x = conv_norm_act(
        &mut b,
        &format!("features.{}", setting.len() + 1),
        x,
        last_conv,
        1,
        1,
        1,
        V3_BN,
        hswish,
    );
    x = b.global_avg_pool(x);
    x = b.flatten(x);
    let last_channel = adjust(if large { 1280 } else { 1024 });
    x = b.linear("classifier.0", x, last_channel, true);
    x = b.act(Activation::Hardswish, x);
    x = b.dropout(x, 0.2);
    x = b.linear("classifier.3", x, spec.num_classes, true);
    b.finish(x)
}
