//! MobileNet V1 (Howard et al. 2017) with width multiplier, in the layout of the shared
//! fixtures README. Small-input stem: the first conv runs at stride 1.

use super::blocks::{BN, conv_bn_act};
use super::{ArchSpec, Stem};
use crate::graph::{Activation, Graph, GraphBuilder};

const BLOCKS: [(usize, usize); 13] = [
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
];

pub fn build(spec: &ArchSpec) -> Graph {
    let scaled = |c: usize| (c as f64 * spec.width) as usize;
    let relu6 = Some(Activation::Relu6);
    let mut b = GraphBuilder::new(3);
    let stride = if spec.stem == Stem::Cifar { 1 } else { 2 };
    let mut x = conv_bn_act(
        &mut b,
        "features.0.0",
        "features.0.1",
        GraphBuilder::INPUT,
        scaled(32),
        3,
        stride,
        1,
        BN,
        relu6,
    );
    for (i, (out, stride)) in BLOCKS.iter().enumerate() {
        let p = format!("features.{}", i + 1);
        let c = b.channels(x);
        x = conv_bn_act(
            &mut b,
            &format!("{p}.0"),
            &format!("{p}.1"),
            x,
            c,
            3,
            *stride,
            c,
            BN,
            relu6,
        );
        x = conv_bn_act(
            &mut b,
            &format!("{p}.3"),
            &format!("{p}.4"),
            x,
            scaled(*out),
            1,
            1,
            1,
            BN,
            relu6,
        );
    }
    x = b.global_avg_pool(x);
    x = b.flatten(x);
    x = b.linear("fc", x, spec.num_classes, true);
    b.finish(x)
}
