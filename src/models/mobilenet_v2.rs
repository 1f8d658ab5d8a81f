//! MobileNet V2 (torchvision layout, width multiplier with rounding to multiples of 8).
//! Small-input stem: the first conv runs at stride 1.

use super::blocks::{BN, conv_norm_act, make_divisible};
use super::{ArchSpec, Stem};
use crate::graph::{Activation, Graph, GraphBuilder};

/// Expansion t, output channels c, repeats n, first stride s.
const SETTING: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

pub fn build(spec: &ArchSpec) -> Graph {
    let w = spec.width;
    let relu6 = Some(Activation::Relu6);
    let mut b = GraphBuilder::new(3);
    let stem_stride = if spec.stem == Stem::Cifar { 1 } else { 2 };
    let mut x = conv_norm_act(
        &mut b,
        "features.0",
        GraphBuilder::INPUT,
        make_divisible(32.0 * w, 8),
        3,
        stem_stride,
        1,
        BN,
        relu6,
    );
    let mut index = 1;
    for (t, c, n, s) in SETTING {
        let out = make_divisible(c as f64 * w, 8);
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            let inp = b.channels(x);
            let hidden = inp * t;
            let p = format!("features.{index}.conv");
            let mut y = x;
            let mut layer = 0;
            if t != 1 {
                y = conv_norm_act(&mut b, &format!("{p}.0"), y, hidden, 1, 1, 1, BN, relu6);
                layer += 1;
            }
            y = conv_norm_act(
                &mut b,
                &format!("{p}.{layer}"),
                y,
                hidden,
                3,
                stride,
                hidden,
                BN,
                relu6,
            );
            y = b.conv(&format!("{p}.{}", layer + 1), y, out, 1, 1, 0, 1, false);
            y = b.batch_norm(&format!("{p}.{}", layer + 2), y, BN.eps, BN.momentum);
            x = if stride == 1 && inp == out {
                b.add(x, y)
            } else {
                y
            };
            index += 1;
        }
    }
    let last = make_divisible(1280.0 * w.max(1.0), 8);
    x = conv_norm_act(
        &mut b,
        &format!("features.{index}"),
        x,
        last,
        1,
        1,
        1,
        BN,
        relu6,
    );
    x = b.global_avg_pool(x);
    x = b.flatten(x);
    x = b.dropout(x, 0.2);
    x = b.linear("classifier.1", x, spec.num_classes, true);
    b.finish(x)
}
