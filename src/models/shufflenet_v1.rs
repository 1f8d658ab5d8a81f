//! ShuffleNet V1 (Zhang et al. 2017) in the layout of the shared fixtures README: grouped 1x1
//! convs, channel shuffle, avg-pool shortcut with concat in the first unit of each stage.
//! Small-input stem: `first_conv` runs at stride 1 and the max pool is dropped.

use super::blocks::{BN, conv_bn_act};
use super::{ArchSpec, Stem};
use crate::graph::{Activation, Graph, GraphBuilder, NodeId};
use anyhow::{Result, bail};

/// Stem and stage 2/3/4 output channels for `groups` and `scale`, checked so that every
/// grouped conv divides evenly.
pub fn channels(groups: usize, scale: f64) -> Result<(usize, [usize; 3])> {
    let base = match groups {
        1 => 144,
        2 => 200,
        3 => 240,
        4 => 272,
        8 => 384,
        _ => bail!("shufflenet_v1 supports groups 1, 2, 3, 4 and 8, not {groups}"),
    };
    let tenths = (scale * 10.0).round() as usize;
    let stem = match tenths {
        5 if groups == 8 => 16,
        5 => 12,
        10 | 15 => 24,
        20 => 48,
        _ => bail!("shufflenet_v1 supports scales 0.5, 1.0, 1.5 and 2.0, not {scale}"),
    };
    let stage2 = base * tenths / 10;
    let stages = [stage2, stage2 * 2, stage2 * 4];
    let mut inp = stem;
    for (s, &out) in stages.iter().enumerate() {
        let mid = out / 4;
        let first_out = out - inp;
        let first_groups_in = if s == 0 { 1 } else { groups };
        if out % 4 != 0
            || mid % groups != 0
            || first_out % groups != 0
            || out % groups != 0
            || inp % first_groups_in != 0
        {
            bail!(
                "shufflenet_v1 with groups {groups} and scale {scale}: stage {} has {out} channels \
                 (bottleneck {mid}, first-unit branch {first_out}), which do not divide into {groups} groups",
                s + 2
            );
        }
        inp = out;
    }
    Ok((stem, stages))
}

#[allow(clippy::too_many_arguments)]
fn unit(
    b: &mut GraphBuilder,
    index: usize,
    x: NodeId,
    out: usize,
    stride: usize,
    groups: usize,
    first_of_net: bool,
) -> NodeId {
    let inp = b.channels(x);
    let mid = out / 4;
    let m1 = |k: usize| format!("features.{index}.branch_main_1.{k}");
    let m2 = |k: usize| format!("features.{index}.branch_main_2.{k}");
    let g1 = if first_of_net { 1 } else { groups };
    let y = conv_bn_act(
        b,
        &m1(0),
        &m1(1),
        x,
        mid,
        1,
        1,
        g1,
        BN,
        Some(Activation::Relu),
    );
    let mut y = conv_bn_act(b, &m1(3), &m1(4), y, mid, 3, stride, mid, BN, None);
    if groups > 1 {
        y = b.shuffle(y, groups);
    }
    let branch_out = if stride == 2 { out - inp } else { out };
    let y = conv_bn_act(b, &m2(0), &m2(1), y, branch_out, 1, 1, groups, BN, None);
    if stride == 1 {
        let sum = b.add(y, x);
        b.act(Activation::Relu, sum)
    } else {
        let shortcut = b.avg_pool(x, 3, 2, 1);
        let y = b.act(Activation::Relu, y);
        b.concat(vec![shortcut, y])
    }
}

pub fn build(spec: &ArchSpec) -> Result<Graph> {
    let (stem, stages) = channels(spec.groups, spec.width)?;
    let cifar = spec.stem == Stem::Cifar;
    let mut b = GraphBuilder::new(3);
    let relu = Some(Activation::Relu);
    let mut x = conv_bn_act(
        &mut b,
        "first_conv.0",
        "first_conv.1",
        GraphBuilder::INPUT,
        stem,
        3,
        if cifar { 1 } else { 2 },
        1,
        BN,
        relu,
    );
    if !cifar {
        x = b.max_pool(x, 3, 2, 1, false);
    }
    let mut index = 0;
    for (s, repeats) in [4usize, 8, 4].iter().enumerate() {
        for i in 0..*repeats {
            x = unit(
                &mut b,
                index,
                x,
                stages[s],
                if i == 0 { 2 } else { 1 },
                spec.groups,
                index == 0,
            );
            index += 1;
        }
    }
    x = b.global_avg_pool(x);
    x = b.flatten(x);
    x = b.linear("classifier.0", x, spec.num_classes, false);
    Ok(b.finish(x))
}
