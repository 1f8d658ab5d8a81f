//! The fused eval executor (`slimcandle::infer`) against the Candle eval path, for every
//! family, with random weights and batch norm statistics, odd input sizes, batch 1 (one
//! chunk, multi-threaded kernels), batch 3 (chunks across threads, and the small planes
//! at the end on the whole batch) and batch 4 (channels last with up to 4 threads,
//! `infer::Layout`), each also in both layouts forced and from an `infer::Engine` kept
//! across sizes and batches; and batch-norm folding, which keeps the logits of every family.

mod common;

use candle_core::{Device, Tensor};
use common::scaled_error;
use slimcandle::exec::{self, Mode};
use slimcandle::graph::Op;
use slimcandle::infer::{Engine, Layout};
use slimcandle::model::Model;
use slimcandle::models::{ArchOptions, ArchSpec, Stem, catalog};
use slimcandle::passes::fold_batch_norm;
use slimcandle::rng::Rng;

/// Random affine parameters and running statistics, so that batch norm has work to do.
fn randomise_bn(model: &mut Model, seed: u64) {
    let mut rng = Rng::new(seed);
    let names: Vec<String> = model
        .weights
        .names()
        .filter(|n| n.contains("running") || n.ends_with(".bias") || n.ends_with(".weight"))
        .map(String::from)
        .collect();
    for name in names {
        let t = model.weights.get(&name).unwrap();
        if t.rank() != 1 {
            continue;
        }
        let v: Vec<f32> = (0..t.elem_count())
            .map(|_| {
                if name.ends_with("running_var") {
                    0.5 + rng.uniform() as f32
                } else {
                    (rng.normal() * 0.3) as f32 + if name.ends_with(".weight") { 1.0 } else { 0.0 }
                }
            })
            .collect();
        let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        model.weights.insert(&name, &t).unwrap();
    }
}

fn input(n: usize, h: usize, w: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<f32> = (0..n * 3 * h * w).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, (n, 3, h, w), &Device::Cpu).unwrap()
}

/// `model`'s logits on `x` from the fused executor against Candle's: per call, in both
/// layouts, and from `engine` (an [`Engine`] of `model` kept across the caller's sizes and
/// batches, so that its plans and rearranged weights are reused).
fn check(model: &Model, engine: &Engine, x: &Tensor, what: &str) {
    let want = exec::forward_candle(&model.graph, &model.weights, x, Mode::Eval).unwrap();
    let got = slimcandle::infer::forward(&model.graph, &model.weights, x)
        .unwrap()
        .expect("f32 CPU tensors run the fused executor");
    let err = scaled_error(&got, &want, 1e-6);
    assert!(err < 1e-4, "{what}: fused eval differs by {err} (relative)");
    // Both layouts of the executor, whichever one the call above chose.
    for layout in [Layout::Planes, Layout::ChannelsLast] {
        let got = slimcandle::infer::forward_with(&model.graph, &model.weights, x, layout)
            .unwrap()
            .unwrap();
        let err = scaled_error(&got, &want, 1e-6);
        assert!(err < 1e-4, "{what}: {layout:?} differs by {err} (relative)");
    }
    // The public entry point takes the same route.
    let routed = model.forward(x, Mode::Eval).unwrap();
    assert_eq!(scaled_error(&routed, &got, 1e-6), 0.0, "{what}: routing");
    for layout in [Layout::Auto, Layout::Planes, Layout::ChannelsLast] {
        let got = engine.forward_with(x, layout).unwrap().unwrap();
        let err = scaled_error(&got, &want, 1e-6);
        assert!(
            err < 1e-4,
            "{what}: engine, {layout:?}, differs by {err} (relative)"
        );
    }
    let kept = engine.forward(x).unwrap();
    assert!(scaled_error(&kept, &want, 1e-6) < 1e-4, "{what}: engine");
}

/// Architectures and widths (narrow, to keep the test quick).
const FAMILIES: [(&str, Option<f64>); 8] = [
    ("squeezenet1_0", None),
    ("squeezenet1_1", None),
    ("mobilenet_v1", Some(0.5)),
    ("mobilenet_v2", Some(0.5)),
    ("mobilenet_v3_small", Some(0.5)),
    ("mobilenet_v3_large", Some(0.5)),
    ("shufflenet_v1_g3", Some(0.5)),
    ("shufflenet_v2_x0_5", None),
];

fn run_family(arch: &str, width: Option<f64>) {
    // 16x17 with the CIFAR stem ends in planes under 16 values, which a batch of 3 (chunks
    // of 2 samples) runs in the tail, on the whole batch.
    for (stem, sizes) in [
        (Stem::Cifar, &[(33, 35), (16, 17)][..]),
        (Stem::Imagenet, &[(71, 65)]),
    ] {
        let spec = ArchSpec::parse(
            arch,
            &ArchOptions {
                width,
                num_classes: Some(7),
                stem: Some(stem),
                ..Default::default()
            },
        )
        .unwrap();
        let mut model = Model::init(&spec, 11).unwrap();
        randomise_bn(&mut model, 12);
        let folded = fold_batch_norm(&model).unwrap();
        let engines = (model.engine(), folded.engine());
        // Batch 4 runs channels last in `Layout::Auto` with up to 4 threads (but ShuffleNet
        // V2); the forced layouts below cover both either way.
        for &(h, w) in sizes {
            for n in [1, 3, 4] {
                let x = input(n, h, w, 13 + n as u64);
                let what = format!("{} {stem:?} batch {n} {h}x{w}", spec.variant_name());
                check(&model, &engines.0, &x, &what);
                check(
                    &folded,
                    &engines.1,
                    &x,
                    &format!("{what} (batch norm folded)"),
                );
            }
        }
    }
}

#[test]
fn fused_eval_matches_candle_for_every_family() {
    for (arch, width) in FAMILIES {
        run_family(arch, width);
    }
}

/// Batch norms and activations that follow no conv, an add whose operands both come before,
/// a conv read twice (no fusion) and a graph whose output is an activation.
#[test]
fn standalone_nodes_run_in_place_or_copied() {
    use slimcandle::graph::{Activation, Graph, Node};
    let node = |name: &str, op: Op, inputs: Vec<usize>| Node {
        name: name.into(),
        op,
        inputs,
    };
    let conv = |i, o, k, p, groups| Op::Conv2d {
        in_channels: i,
        out_channels: o,
        kernel: k,
        stride: 1,
        padding: p,
        dilation: 1,
        groups,
        bias: true,
    };
    let bn = Op::BatchNorm {
        channels: 4,
        eps: 1e-5,
        momentum: 0.1,
    };
    let graph = Graph {
        nodes: vec![
            node("input", Op::Input { channels: 3 }, vec![]),
            node(
                "bn0",
                Op::BatchNorm {
                    channels: 3,
                    eps: 1e-3,
                    momentum: 0.1,
                },
                vec![0],
            ),
            node("c1", conv(3, 4, 3, 1, 1), vec![1]),
            node(
                "a1",
                Op::Act {
                    act: Activation::Hardswish,
                },
                vec![2],
            ),
            node("c2", conv(4, 4, 3, 1, 4), vec![3]),
            node("bn2", bn.clone(), vec![4]),
            node(
                "a2",
                Op::Act {
                    act: Activation::Relu6,
                },
                vec![4],
            ),
            node("add", Op::Add, vec![5, 6]),
            node(
                "a3",
                Op::Act {
                    act: Activation::Sigmoid,
                },
                vec![7],
            ),
            node("add2", Op::Add, vec![8, 3]),
            node(
                "a4",
                Op::Act {
                    act: Activation::Relu,
                },
                vec![9],
            ),
        ],
        output: 10,
    };
    graph.validate().unwrap();
    let weights = slimcandle::weights::Weights::init(&graph, 3).unwrap();
    let mut model = Model {
        graph,
        weights,
        meta: Model::init(
            &ArchSpec::parse("mobilenet_v2", &Default::default()).unwrap(),
            1,
        )
        .unwrap()
        .meta,
    };
    randomise_bn(&mut model, 4);
    let engine = model.engine();
    for n in [1, 2, 5] {
        check(
            &model,
            &engine,
            &input(n, 9, 7, n as u64),
            &format!("batch {n}"),
        );
    }
}

/// The network input read by a stem convolution and also as that convolution's residual
/// (channels last keeps the input NCHW for the stem, and must transpose it for the add), and
/// by a linear layer straight after a flatten (no chunked steps at all; the graph takes a
/// flatten of one-pixel planes only).
#[test]
fn the_network_input_read_by_a_stem_and_a_residual_or_a_linear_layer() {
    use slimcandle::graph::{Graph, Node};
    let node = |name: &str, op: Op, inputs: Vec<usize>| Node {
        name: name.into(),
        op,
        inputs,
    };
    let meta = Model::init(
        &ArchSpec::parse("mobilenet_v2", &Default::default()).unwrap(),
        1,
    )
    .unwrap()
    .meta;
    let residual = Graph {
        nodes: vec![
            node("input", Op::Input { channels: 3 }, vec![]),
            node(
                "stem",
                Op::Conv2d {
                    in_channels: 3,
                    out_channels: 3,
                    kernel: 3,
                    stride: 1,
                    padding: 1,
                    dilation: 1,
                    groups: 1,
                    bias: true,
                },
                vec![0],
            ),
            node("add", Op::Add, vec![1, 0]),
        ],
        output: 2,
    };
    let linear = Graph {
        nodes: vec![
            node("input", Op::Input { channels: 3 }, vec![]),
            node("flatten", Op::Flatten, vec![0]),
            node(
                "fc",
                Op::Linear {
                    in_features: 3,
                    out_features: 6,
                    bias: true,
                },
                vec![1],
            ),
        ],
        output: 2,
    };
    for (graph, (h, w)) in [(residual, (9, 7)), (linear, (1, 1))] {
        graph.validate().unwrap();
        let weights = slimcandle::weights::Weights::init(&graph, 3).unwrap();
        let meta = meta.clone();
        let model = Model {
            graph,
            weights,
            meta,
        };
        let engine = model.engine();
        for n in [1, 4, 5] {
            check(
                &model,
                &engine,
                &input(n, h, w, n as u64),
                &format!("batch {n}"),
            );
        }
    }
}

/// Train mode still runs on Candle (with autograd).
#[test]
fn train_mode_keeps_the_candle_path() {
    let spec = ArchSpec::parse(
        "mobilenet_v3_small",
        &ArchOptions {
            width: Some(0.5),
            num_classes: Some(5),
            stem: Some(Stem::Cifar),
            ..Default::default()
        },
    )
    .unwrap();
    let model = Model::init(&spec, 1).unwrap();
    let x = input(2, 16, 16, 1);
    let y = model.forward(&x, Mode::Train).unwrap();
    assert!(y.backward().is_ok());
}

/// Batch-norm folding (`passes::fold_batch_norm`) leaves no batch norm behind a conv and
/// keeps the logits, for every family.
#[test]
fn folded_models_compute_the_same_logits_for_every_family() {
    let families: Vec<ArchSpec> = catalog()
        .into_iter()
        .map(|e| e.spec)
        .filter(|s| s.width <= 1.0)
        .collect();
    let mut seen = std::collections::HashSet::new();
    for spec in families {
        if !seen.insert(spec.family) {
            continue;
        }
        let spec = ArchSpec::parse(
            spec.family.name(),
            &ArchOptions {
                width: Some(spec.width),
                groups: Some(spec.groups).filter(|_| spec.groups > 1),
                num_classes: Some(10),
                ..Default::default()
            },
        )
        .unwrap();
        let mut model = Model::init(&spec, 1).unwrap();
        randomise_bn(&mut model, 2);
        let folded = fold_batch_norm(&model).unwrap();
        let bn_left = folded
            .graph
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::BatchNorm { .. }))
            .count();
        assert_eq!(
            bn_left,
            0,
            "{}: every batch norm follows a conv",
            spec.variant_name()
        );
        let mut rng = Rng::new(3);
        let x: Vec<f32> = (0..2 * 3 * 64 * 64).map(|_| rng.normal() as f32).collect();
        let x = Tensor::from_vec(x, (2, 3, 64, 64), &Device::Cpu).unwrap();
        let a = model.forward(&x, Mode::Eval).unwrap();
        let b = folded.forward(&x, Mode::Eval).unwrap();
        let err = scaled_error(&b, &a, 1.0);
        assert!(
            err < 1e-4,
            "{}: folded logits differ by {err}",
            spec.variant_name()
        );
    }
}

/// An empty batch gives an empty batch of logits, per call and from an engine, in both
/// layouts (no chunk runs at all).
#[test]
fn an_empty_batch_gives_no_logits() {
    let spec = ArchSpec::parse(
        "mobilenet_v2",
        &ArchOptions {
            width: Some(0.5),
            num_classes: Some(7),
            stem: Some(Stem::Cifar),
            ..Default::default()
        },
    )
    .unwrap();
    let model = Model::init(&spec, 3).unwrap();
    let x = input(0, 16, 16, 1);
    let engine = model.engine();
    for layout in [Layout::Auto, Layout::Planes, Layout::ChannelsLast] {
        let per_call = slimcandle::infer::forward_with(&model.graph, &model.weights, &x, layout)
            .unwrap()
            .unwrap();
        let kept = engine.forward_with(&x, layout).unwrap().unwrap();
        assert_eq!(per_call.dims(), &[0, 7], "{layout:?}");
        assert_eq!(kept.dims(), &[0, 7], "{layout:?}");
    }
}
