//! Structured pruning's coupled channel groups, tested generically: for every family, make a
//! group's contribution exactly zero, remove the group, and check that the smaller network
//! computes the same logits (and saves, reloads and still does).

mod common;

use candle_core::{Device, Tensor};
use slimcandle::checkpoint;
use slimcandle::exec::Mode;
use slimcandle::graph::{Activation, Graph, GraphBuilder, NodeId, Op};
use slimcandle::model::{Model, ModelMeta, Preprocessing, Provenance, default_class_names};
use slimcandle::models::{ArchOptions, ArchSpec, Stem};
use slimcandle::prune::{PruneUnit, Role, analyze, channel_groups, remove_channels};
use slimcandle::rng::Rng;
use slimcandle::weights::Weights;
use std::collections::{BTreeMap, BTreeSet};

fn copy(model: &Model) -> Model {
    Model {
        graph: model.graph.clone(),
        weights: model.weights.clone(),
        meta: model.meta.clone(),
    }
}

fn replace(model: &mut Model, name: &str, f: impl FnOnce(&mut Vec<f32>, &[usize])) {
    let t = model.weights.get(name).unwrap();
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    f(&mut v, t.dims());
    let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
    model.weights.insert(name, &t).unwrap();
}

/// Random batch-norm affine parameters and biases, with running statistics calibrated on
/// random images (as in a trained network, so every layer's signal reaches the logits), so
/// that every parameter a removal touches matters.
fn randomise(model: &mut Model, seed: u64, size: usize) {
    let mut rng = Rng::new(seed);
    let nodes = model.graph.nodes.clone();
    for node in &nodes {
        let name = &node.name;
        match node.op {
            Op::BatchNorm { .. } => {
                for (suffix, centre, spread) in [("weight", 1.0, 0.3), ("bias", 0.0, 0.3)] {
                    replace(model, &format!("{name}.{suffix}"), |v, _| {
                        v.iter_mut()
                            .for_each(|x| *x = (centre + spread * rng.normal()) as f32)
                    });
                }
            }
            Op::Linear { in_features, .. } => {
                // Logits that depend on the features (torchvision's N(0, 0.01) classifier
                // would leave them dominated by the bias), so a zeroed unit shows.
                let std = 1.0 / (in_features as f64).sqrt();
                replace(model, &format!("{name}.weight"), |v, _| {
                    v.iter_mut().for_each(|x| *x = (std * rng.normal()) as f32)
                });
            }
            _ => {}
        }
        match node.op {
            Op::Conv2d { bias: true, .. } | Op::Linear { bias: true, .. } => {
                replace(model, &format!("{name}.bias"), |v, _| {
                    v.iter_mut().for_each(|x| *x = (0.1 * rng.normal()) as f32)
                });
            }
            _ => {}
        }
    }
    // One train-mode pass with momentum 1 sets every running statistic to the batch's.
    let mut graph = model.graph.clone();
    for node in &mut graph.nodes {
        if let Op::BatchNorm { momentum, .. } = &mut node.op {
            *momentum = 1.0;
        }
    }
    if graph
        .nodes
        .iter()
        .any(|n| matches!(n.op, Op::BatchNorm { .. }))
    {
        let c = model.graph.input_channels();
        let batches: Vec<Tensor> = (0..4).map(|k| random_input(c, size, seed + k)).collect();
        let x = Tensor::cat(&batches, 0).unwrap();
        slimcandle::exec::forward_train(&graph, &model.weights, &x, seed).unwrap();
    }
}

/// Makes the unit's contribution exactly zero: its filters (and biases) are zero, and every
/// batch norm it crosses has zero shift and zero mean, so each of its channels is 0 after the
/// norm; relu, relu6 and hardswish keep 0, and a squeeze-and-excitation scale (hardsigmoid of
/// a zeroed filter: 0.5) multiplies a channel of the same unit, which is 0.
fn zero_contribution(model: &mut Model, units: &[PruneUnit]) {
    let mut rows: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    for unit in units {
        for m in &unit.members {
            let name = &model.graph.nodes[m.node].name;
            match m.role {
                Role::Filter | Role::Depthwise => {
                    rows.entry(format!("{name}.weight"))
                        .or_default()
                        .insert(m.channel);
                    if model.weights.get(&format!("{name}.bias")).is_ok() {
                        rows.entry(format!("{name}.bias"))
                            .or_default()
                            .insert(m.channel);
                    }
                }
                Role::Norm => {
                    for suffix in ["bias", "running_mean"] {
                        rows.entry(format!("{name}.{suffix}"))
                            .or_default()
                            .insert(m.channel);
                    }
                }
                Role::Column => {}
            }
        }
    }
    for (name, channels) in rows {
        replace(model, &name, |v, dims| {
            let row = v.len() / dims[0];
            for c in channels {
                v[c * row..(c + 1) * row].iter_mut().for_each(|x| *x = 0.0);
            }
        });
    }
}

fn logits(model: &Model, x: &Tensor) -> Vec<f32> {
    model
        .forward(x, Mode::Eval)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest difference relative to the largest magnitude of `a`.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max)
        / scale
}

fn random_input(channels: usize, size: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n = 2 * channels * size * size;
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, (2, channels, size, size), &Device::Cpu).unwrap()
}

/// Removes `units` from `model` and checks that the result computes what `model` computes
/// with their contribution zeroed, and that it is smaller. Returns the pruned model and
/// whether zeroing changed the logits (so the check is not vacuous).
fn check_removal(model: &Model, units: &[PruneUnit], x: &Tensor, what: &str) -> (Model, bool) {
    let mut zeroed = copy(model);
    zero_contribution(&mut zeroed, units);
    let expected = logits(&zeroed, x);
    let pruned =
        remove_channels(model, units).unwrap_or_else(|e| panic!("{what}: removal failed: {e:#}"));
    pruned.graph.validate().unwrap();
    let got = logits(&pruned, x);
    let err = rel_diff(&expected, &got);
    if std::env::var("PRUNE_SHOW").is_ok() {
        eprintln!("{what}: pruned logits differ by {err:e}");
    }
    assert!(err < 1e-4, "{what}: pruned logits differ by {err}");
    let (h, w) = (x.dims()[2], x.dims()[3]);
    let before = model.graph.summary(h, w).unwrap();
    let after = pruned.graph.summary(h, w).unwrap();
    assert!(
        after.params < before.params,
        "{what}: params {} -> {}",
        before.params,
        after.params
    );
    assert!(
        after.macs < before.macs,
        "{what}: MACs {} -> {}",
        before.macs,
        after.macs
    );
    let change = rel_diff(&logits(model, x), &expected);
    if std::env::var("PRUNE_SHOW").is_ok() {
        eprintln!("{what}: zeroing changes the logits by {change:e}");
    }
    let changed = change > 1e-3;
    (pruned, changed)
}

/// `k` distinct random indices below `n` (all of them when `n <= k`).
fn pick(rng: &mut Rng, n: usize, k: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut all);
    all.truncate(k);
    all.sort_unstable();
    all
}

/// The units among `picks` that can go together, taken in order: any unit that would leave
/// some node without channels is skipped (groups are independent otherwise).
fn together(graph: &Graph, units: &[PruneUnit], picks: &[usize]) -> Vec<PruneUnit> {
    let counts = graph.channel_counts().unwrap();
    let mut removed = vec![0usize; counts.len()];
    let mut out = Vec::new();
    for &i in picks {
        let mut per_node = BTreeMap::new();
        for &(node, _) in &units[i].slots {
            *per_node.entry(node).or_insert(0usize) += 1;
        }
        if per_node.iter().all(|(&n, &r)| removed[n] + r < counts[n]) {
            per_node.iter().for_each(|(&n, &r)| removed[n] += r);
            out.push(units[i].clone());
        }
    }
    out
}

/// Spatial size of each conv's output at a 64x64 input: the network's stages.
fn conv_stages(graph: &Graph) -> BTreeMap<NodeId, usize> {
    let dims = graph.infer_shapes(64, 64).unwrap();
    graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(id, n)| matches!(n.op, Op::Conv2d { .. }) && dims[*id].h > 1)
        .map(|(id, _)| (id, dims[id].h))
        .collect()
}

/// Checks one family; `blocked` lists conv output resolutions (at 64x64) known to have no
/// removable channels, which the test then asserts instead.
fn check_family(arch: &str, width: Option<f64>, groups: Option<usize>, blocked: &[usize]) {
    let spec = ArchSpec::parse(
        arch,
        &ArchOptions {
            width,
            groups,
            num_classes: Some(10),
            ..Default::default()
        },
    )
    .unwrap();
    let name = spec.variant_name();
    let mut model = Model::init(&spec, 11).unwrap();
    randomise(&mut model, 12, 64);
    let analysis = analyze(&model.graph).unwrap();
    let units = &analysis.units;
    let filters: Vec<usize> = units.iter().map(|u| u.filters().count()).collect();
    let conv_filters = model
        .graph
        .nodes
        .iter()
        .map(|n| match n.op {
            Op::Conv2d {
                out_channels,
                groups,
                in_channels,
                ..
            } if !(groups > 1 && groups == in_channels && groups == out_channels) => out_channels,
            Op::Linear { out_features, .. } => out_features,
            _ => 0,
        })
        .sum::<usize>();
    let covered: usize = filters.iter().sum();
    eprintln!(
        "{name}: {} units over {} channel classes; filters per unit {}..{}; {covered} of {conv_filters} \
         filters removable; classes in no unit {:?}",
        units.len(),
        analysis.classes,
        filters.iter().min().unwrap_or(&0),
        filters.iter().max().unwrap_or(&0),
        analysis.blocked
    );
    assert!(!units.is_empty(), "{name}: no prunable unit");

    // Units are disjoint, and none touches the input or the logits.
    let mut seen = BTreeSet::new();
    for u in units {
        for s in &u.slots {
            assert!(seen.insert(*s), "{name}: channel {s:?} is in two units");
            assert!(s.0 != 0 && s.0 != model.graph.output, "{name}: {s:?}");
        }
    }

    // Every stage (spatial resolution) has a unit that removes one of its conv filters.
    let stages = conv_stages(&model.graph);
    let resolutions: BTreeSet<usize> = stages.values().copied().collect();
    for &h in &resolutions {
        let hit = units.iter().any(|u| {
            u.members.iter().any(|m| {
                matches!(m.role, Role::Filter | Role::Depthwise) && stages.get(&m.node) == Some(&h)
            })
        });
        if blocked.contains(&h) {
            assert!(!hit, "{name}: the {h}x{h} stage was expected to be blocked");
        } else {
            assert!(hit, "{name}: no prunable unit in the {h}x{h} stage");
        }
    }

    let x = random_input(3, 64, 13);
    let mut rng = Rng::new(14);
    let chosen = pick(&mut rng, units.len(), 16);
    let mut changed = 0;
    for &i in &chosen {
        let what = format!("{name} unit {i} ({})", units[i].describe(&model.graph));
        let (_, c) = check_removal(&model, std::slice::from_ref(&units[i]), &x, &what);
        changed += usize::from(c);
    }
    assert!(
        changed * 2 >= chosen.len(),
        "{name}: only {changed} of {} units changed the logits when zeroed",
        chosen.len()
    );

    // Several together: five of them, then all sixteen, then a quarter of all units.
    let five = together(&model.graph, units, &chosen[..chosen.len().min(5)]);
    check_removal(&model, &five, &x, &format!("{name} five units"));
    let all = together(&model.graph, units, &chosen);
    let (pruned, _) = check_removal(&model, &all, &x, &format!("{name} sixteen units"));
    let quarter = together(
        &model.graph,
        units,
        &pick(&mut rng, units.len(), units.len() / 4),
    );
    if !quarter.is_empty() {
        let what = format!("{name} {} units at once", quarter.len());
        check_removal(&model, &quarter, &x, &what);
    }

    // The pruned model is self-describing: it reloads with no knowledge of the original.
    let dir = common::temp_dir(&format!("prune-{name}"));
    let path = dir.join("pruned.safetensors");
    checkpoint::save(&pruned, &path).unwrap();
    let reloaded = checkpoint::load(&path).unwrap();
    assert_eq!(reloaded.graph, pruned.graph);
    let a = logits(&pruned, &x);
    let b = logits(&reloaded, &x);
    assert!(rel_diff(&a, &b) < 1e-6, "{name}: reloaded logits differ");
    // And it can be pruned again.
    let again = channel_groups(&reloaded.graph).unwrap();
    assert!(
        !again.is_empty(),
        "{name}: the pruned model has no units left"
    );
    check_removal(
        &reloaded,
        std::slice::from_ref(&again[again.len() / 2]),
        &x,
        &format!("{name} pruned twice"),
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn squeezenet1_0() {
    check_family("squeezenet1_0", None, None, &[]);
}

#[test]
fn squeezenet1_1() {
    check_family("squeezenet1_1", None, None, &[]);
}

#[test]
fn mobilenet_v1() {
    check_family("mobilenet_v1", Some(0.25), None, &[]);
}

#[test]
fn mobilenet_v2() {
    check_family("mobilenet_v2", Some(0.35), None, &[]);
}

#[test]
fn mobilenet_v3_small() {
    check_family("mobilenet_v3_small", Some(0.5), None, &[]);
}

#[test]
fn mobilenet_v3_large() {
    check_family("mobilenet_v3_large", Some(0.5), None, &[]);
}

#[test]
fn shufflenet_v1_g3() {
    check_family("shufflenet_v1", Some(0.5), Some(3), &[]);
}

#[test]
fn shufflenet_v1_g8() {
    check_family("shufflenet_v1", Some(1.0), Some(8), &[]);
}

/// At scale 0.5 with 8 groups the first unit's bottleneck has 48 channels: the shuffle's 8
/// rows of 6 positions feed 8 groups of 6, and no set of whole positions meets every group
/// equally short of all of them. That 16x16 conv stays whole; everything else is removable.
#[test]
fn shufflenet_v1_g8_x0_5() {
    check_family("shufflenet_v1", Some(0.5), Some(8), &[16]);
}

#[test]
fn shufflenet_v2() {
    check_family("shufflenet_v2", Some(0.5), None, &[]);
}

// ---- tiny hand-built graphs -------------------------------------------------------------

fn tiny_model(graph: Graph, seed: u64) -> Model {
    graph.validate().unwrap();
    let classes = graph.channel_counts().unwrap()[graph.output];
    let weights = Weights::init(&graph, seed).unwrap();
    let mut model = Model {
        graph,
        weights,
        meta: ModelMeta {
            arch: None,
            class_names: default_class_names(classes),
            preprocessing: Preprocessing::for_stem(Stem::Cifar),
            provenance: Provenance::now("tiny test graph"),
        },
    };
    randomise(&mut model, seed + 1, 8);
    model
}

fn head(b: &mut GraphBuilder, x: NodeId) -> NodeId {
    let x = b.global_avg_pool(x);
    let x = b.flatten(x);
    b.linear("fc", x, 3, true)
}

fn conv_bn(b: &mut GraphBuilder, name: &str, x: NodeId, out: usize, groups: usize) -> NodeId {
    let y = b.conv(name, x, out, 3, 1, 1, groups, false);
    b.batch_norm(&format!("{name}_bn"), y, 1e-5, 0.1)
}

/// Every unit alone, every other unit together, and all units but one per node's last.
fn check_tiny(graph: Graph, what: &str) -> Vec<PruneUnit> {
    let model = tiny_model(graph, 5);
    let units = channel_groups(&model.graph).unwrap();
    assert!(!units.is_empty(), "{what}: no units");
    let channels = model.graph.input_channels();
    let x = random_input(channels, 8, 6);
    for (i, u) in units.iter().enumerate() {
        check_removal(
            &model,
            std::slice::from_ref(u),
            &x,
            &format!("{what} unit {i}"),
        );
    }
    let even: Vec<usize> = (0..units.len()).step_by(2).collect();
    let every_other = together(&model.graph, &units, &even);
    check_removal(
        &model,
        &every_other,
        &x,
        &format!("{what} every other unit"),
    );
    units
}

fn filters_of(unit: &PruneUnit, node: NodeId) -> Vec<usize> {
    unit.members
        .iter()
        .filter(|m| m.node == node && m.role == Role::Filter)
        .map(|m| m.channel)
        .collect()
}

#[test]
fn tiny_concat() {
    // SqueezeNet's fire module: squeeze, two expands, concat.
    let mut b = GraphBuilder::new(3);
    let s = b.conv("squeeze", GraphBuilder::INPUT, 4, 1, 1, 0, 1, true);
    let s = b.act(Activation::Relu, s);
    let e1 = b.conv("e1", s, 3, 1, 1, 0, 1, true);
    let e1 = b.act(Activation::Relu, e1);
    let e3 = b.conv("e3", s, 5, 3, 1, 1, 1, true);
    let e3 = b.act(Activation::Relu, e3);
    let cat = b.concat(vec![e1, e3]);
    let y = b.conv("next", cat, 6, 1, 1, 0, 1, true);
    let out = head(&mut b, y);
    let units = check_tiny(b.finish(out), "concat");
    assert_eq!(units.len(), 4 + 3 + 5 + 6);
}

#[test]
fn tiny_split_shuffle() {
    // ShuffleNet V2: a first unit (both branches), then a unit with a pass-through half.
    let mut b = GraphBuilder::new(3);
    let x = conv_bn(&mut b, "stem", GraphBuilder::INPUT, 8, 1);
    let x = b.act(Activation::Relu, x);
    let l = conv_bn(&mut b, "b1_dw", x, 8, 8);
    let l = conv_bn(&mut b, "b1_pw", l, 6, 1);
    let r = conv_bn(&mut b, "b2_pw", x, 6, 1);
    let r = conv_bn(&mut b, "b2_dw", r, 6, 6);
    let cat = b.concat(vec![l, r]);
    let x = b.shuffle(cat, 2);
    let kept = b.slice(x, 0, 6);
    let r = b.slice(x, 6, 12);
    let r = conv_bn(&mut b, "u2_pw", r, 6, 1);
    let r = b.act(Activation::Relu, r);
    let cat = b.concat(vec![kept, r]);
    let x = b.shuffle(cat, 2);
    let y = conv_bn(&mut b, "last", x, 5, 1);
    let out = head(&mut b, y);
    let graph = b.finish(out);
    let b1 = graph.node_by_name("b1_pw").unwrap();
    let b2 = graph.node_by_name("b2_dw").unwrap();
    let units = check_tiny(graph, "split+shuffle");
    // Both halves of the first unit go in pairs.
    for u in &units {
        assert_eq!(
            filters_of(u, b1).len(),
            u.members.iter().filter(|m| m.node == b2).count()
        );
    }
}

#[test]
fn tiny_grouped_shuffle() {
    // ShuffleNet V1: grouped 1x1, depthwise, shuffle, grouped 1x1, residual add.
    let mut b = GraphBuilder::new(3);
    let x = conv_bn(&mut b, "stem", GraphBuilder::INPUT, 12, 1);
    let x = b.act(Activation::Relu, x);
    let y = conv_bn(&mut b, "m1", x, 6, 3);
    let y = b.act(Activation::Relu, y);
    let y = conv_bn(&mut b, "dw", y, 6, 6);
    let y = b.shuffle(y, 3);
    let y = conv_bn(&mut b, "m2", y, 12, 3);
    let s = b.add(y, x);
    let s = b.act(Activation::Relu, s);
    let z = conv_bn(&mut b, "last", s, 4, 2);
    let out = head(&mut b, z);
    let graph = b.finish(out);
    let m1 = graph.node_by_name("m1").unwrap();
    let m2 = graph.node_by_name("m2").unwrap();
    let units = check_tiny(graph, "grouped+shuffle");
    for u in &units {
        for (node, total, groups) in [(m1, 6, 3), (m2, 12, 3)] {
            let f = filters_of(u, node);
            let mut per = vec![0; groups];
            f.iter().for_each(|&c| per[c / (total / groups)] += 1);
            assert!(per.iter().all(|&n| n == per[0]), "{f:?}");
        }
    }
}

#[test]
fn tiny_residual_and_se() {
    // MobileNet V3: expand, depthwise, squeeze-and-excitation, project, residual add.
    let mut b = GraphBuilder::new(3);
    let x = conv_bn(&mut b, "stem", GraphBuilder::INPUT, 4, 1);
    let x = b.act(Activation::Hardswish, x);
    let y = conv_bn(&mut b, "expand", x, 8, 1);
    let y = b.act(Activation::Relu6, y);
    let y = conv_bn(&mut b, "dw", y, 8, 8);
    let y = b.act(Activation::Hardswish, y);
    let s = b.global_avg_pool(y);
    let s = b.conv("fc1", s, 4, 1, 1, 0, 1, true);
    let s = b.act(Activation::Relu, s);
    let s = b.conv("fc2", s, 8, 1, 1, 0, 1, true);
    let s = b.act(Activation::Hardsigmoid, s);
    let y = b.channel_mul(y, s);
    let y = conv_bn(&mut b, "project", y, 4, 1);
    let x = b.add(x, y);
    let out = head(&mut b, x);
    let graph = b.finish(out);
    let fc2 = graph.node_by_name("fc2").unwrap();
    let expand = graph.node_by_name("expand").unwrap();
    let units = check_tiny(graph, "residual+se");
    // The excitation scale goes with the expanded channel it multiplies.
    for u in &units {
        assert_eq!(filters_of(u, fc2), filters_of(u, expand));
    }
    assert_eq!(units.len(), 4 + 8 + 4);
}

#[test]
fn removal_refuses_what_would_change_the_network() {
    let mut b = GraphBuilder::new(3);
    let x = conv_bn(&mut b, "a", GraphBuilder::INPUT, 6, 1);
    let y = conv_bn(&mut b, "g", x, 6, 3);
    let out = head(&mut b, y);
    let model = tiny_model(b.finish(out), 1);
    let counts = model.graph.channel_counts().unwrap();
    let fake = |slots: Vec<(NodeId, usize)>| PruneUnit {
        slots,
        members: Vec::new(),
    };
    // One input channel of a grouped conv unbalances its groups.
    let err = remove_channels(&model, &[fake(vec![(1, 0), (2, 0)])])
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("unequal"), "{err:#}");
    // A batch norm that keeps channels its conv drops.
    let err = remove_channels(&model, &[fake(vec![(1, 0)])])
        .err()
        .expect("refused");
    assert!(
        format!("{err:#}").contains("passes channels through"),
        "{err:#}"
    );
    // The logits.
    let fc = model.graph.output;
    let err = remove_channels(&model, &[fake(vec![(fc, 0)])])
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("network output"), "{err:#}");
    // Everything: no node may be left empty.
    let all: Vec<(NodeId, usize)> = (1..=2)
        .flat_map(|n| (0..counts[n]).map(move |c| (n, c)))
        .collect();
    let err = remove_channels(&model, &[fake(all)])
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("no channels"), "{err:#}");
}
