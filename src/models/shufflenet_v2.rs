//! ShuffleNet V2 (torchvision layout: channel split, two branches, channel shuffle with 2
//! groups). Small-input stem: `conv1` runs at stride 1 and the max pool is dropped.

use super::blocks::{BN, conv_bn_act};
use super::{ArchSpec, Stem};
use crate::graph::{Activation, Graph, GraphBuilder, NodeId};

/// Stage 2, 3, 4 and `conv5` output channels for each scale.
pub fn stage_channels(scale: f64) -> Option<[usize; 4]> {
    match (scale * 10.0).round() as usize {
        5 => Some([48, 96, 192, 1024]),
        10 => Some([116, 232, 464, 1024]),
        15 => Some([176, 352, 704, 1024]),
        20 => Some([244, 488, 976, 2048]),
        _ => None,
    }
}

fn unit(b: &mut GraphBuilder, prefix: &str, x: NodeId, out: usize, stride: usize) -> NodeId {
    let relu = Some(Activation::Relu);
    let half = out / 2;
    let cv = |k: usize| format!("{prefix}.branch2.{k}");
    let (kept, branch2_in) = if stride == 1 {
        let c = b.channels(x);
        (Some(b.slice(x, 0, c / 2)), b.slice(x, c / 2, c))
    } else {
        (None, x)
    };
    let y = conv_bn_act(b, &cv(0), &cv(1), branch2_in, half, 1, 1, 1, BN, relu);
    let y = conv_bn_act(b, &cv(3), &cv(4), y, half, 3, stride, half, BN, None);
    let y = conv_bn_act(b, &cv(5), &cv(6), y, half, 1, 1, 1, BN, relu);
    let left = match kept {
        Some(k) => k,
        None => {
            let c = b.channels(x);
            let cv = |k: usize| format!("{prefix}.branch1.{k}");
            let z = conv_bn_act(b, &cv(0), &cv(1), x, c, 3, stride, c, BN, None);
            conv_bn_act(b, &cv(2), &cv(3), z, half, 1, 1, 1, BN, relu)
        }
    };
    let joined = b.concat(vec![left, y]);
    b.shuffle(joined, 2)
}

pub fn build(spec: &ArchSpec) -> Graph {
    let channels = stage_channels(spec.width).expect("scale validated by ArchSpec");
    let cifar = spec.stem == Stem::Cifar;
    let mut b = GraphBuilder::new(3);
    let relu = Some(Activation::Relu);
    let mut x = conv_bn_act(
        &mut b,
        "conv1.0",
        "conv1.1",
        GraphBuilder::INPUT,
        24,
        3,
        if cifar { 1 } else { 2 },
        1,
        BN,
        relu,
    );
    if !cifar {
        x = b.max_pool(x, 3, 2, 1, false);
    }
    for (stage, repeats) in [4usize, 8, 4].iter().enumerate() {
        for i in 0..*repeats {
            let prefix = format!("stage{}.{i}", stage + 2);
            x = unit(
                &mut b,
                &prefix,
                x,
                channels[stage],
                if i == 0 { 2 } else { 1 },
            );
        }
    }
    x = conv_bn_act(
        &mut b,
        "conv5.0",
        "conv5.1",
        x,
        channels[3],
        1,
        1,
        1,
        BN,
        relu,
    );
    x = b.global_avg_pool(x);
    x = b.flatten(x);
    x = b.linear("fc", x, spec.num_classes, true);
    b.finish(x)
}
