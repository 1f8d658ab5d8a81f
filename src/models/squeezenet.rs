//! SqueezeNet 1.0 and 1.1 (torchvision layout: Fire modules, ceil-mode max pooling).
//! Small-input stem: the first conv runs at stride 1 (1.1 also gets padding 1) and the first
//! max pool is dropped, so a 32x32 image reaches the classifier at 8x8.

use super::{ArchSpec, Stem};
use crate::graph::{Activation, Graph, GraphBuilder, NodeId};

fn fire(b: &mut GraphBuilder, index: usize, x: NodeId, squeeze: usize, expand: usize) -> NodeId {
    let p = format!("features.{index}");
    let s = b.conv(&format!("{p}.squeeze"), x, squeeze, 1, 1, 0, 1, true);
    let s = b.act(Activation::Relu, s);
    let e1 = b.conv(&format!("{p}.expand1x1"), s, expand, 1, 1, 0, 1, true);
    let e1 = b.act(Activation::Relu, e1);
    let e3 = b.conv(&format!("{p}.expand3x3"), s, expand, 3, 1, 1, 1, true);
    let e3 = b.act(Activation::Relu, e3);
    b.concat(vec![e1, e3])
}

pub fn build(spec: &ArchSpec, version_1_1: bool) -> Graph {
    let cifar = spec.stem == Stem::Cifar;
    let mut b = GraphBuilder::new(3);
    let (stem_out, kernel) = if version_1_1 { (64, 3) } else { (96, 7) };
    let (stride, padding) = if cifar { (1, (kernel - 1) / 2) } else { (2, 0) };
    let mut x = b.conv(
        "features.0",
        GraphBuilder::INPUT,
        stem_out,
        kernel,
        stride,
        padding,
        1,
        true,
    );
    x = b.act(Activation::Relu, x);
    // (index, squeeze, expand) per Fire module; `None` marks a ceil-mode max pool.
    let plan: &[Option<(usize, usize)>] = if version_1_1 {
        &[
            None,
            Some((16, 64)),
            Some((16, 64)),
            None,
            Some((32, 128)),
            Some((32, 128)),
            None,
            Some((48, 192)),
            Some((48, 192)),
            Some((64, 256)),
            Some((64, 256)),
        ]
    } else {
        &[
            None,
            Some((16, 64)),
            Some((16, 64)),
            Some((32, 128)),
            None,
            Some((32, 128)),
            Some((48, 192)),
            Some((48, 192)),
            Some((64, 256)),
            None,
            Some((64, 256)),
        ]
    };
    for (k, step) in plan.iter().enumerate() {
        let index = k + 2;
        match step {
            Some((s, e)) => x = fire(&mut b, index, x, *s, *e),
            None if cifar && k == 0 => {}
            None => x = b.max_pool(x, 3, 2, 0, true),
        }
    }
    x = b.dropout(x, 0.5);
    x = b.conv("classifier.1", x, spec.num_classes, 1, 1, 0, 1, true);
    x = b.act(Activation::Relu, x);
    x = b.global_avg_pool(x);
    x = b.flatten(x);
    b.finish(x)
}
