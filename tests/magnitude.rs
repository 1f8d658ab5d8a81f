//! Unstructured magnitude pruning: which layers are selected (derived from the graph), exact
//! sparsity of global and per-layer masks, the cubic schedule, gradual pruning during training
//! (masked weights stay exactly zero through momentum, Adam moments and weight decay; resume is
//! exact; `best` has the final sparsity) and the network-slimming batch-norm penalty.

mod common;

use slimcandle::data::{Augment, DataSpec, Dataset, LoadOptions};
use slimcandle::graph::{Graph, Op};
use slimcandle::model::{Model, Preprocessing};
use slimcandle::models::{ArchOptions, ArchSpec, Stem};
use slimcandle::prune::magnitude::{
    CubicSchedule, Exclusion, GradualPruning, MagnitudeConfig, MaskScope, Masks, SparsityReport,
    layer_choices, magnitude_masks, prunable_layers,
};
use slimcandle::train::optimizer::OptimizerKind;
use slimcandle::train::schedule::Schedule;
use slimcandle::train::{EpochMetrics, NoObserver, Observer, Outcome, Run, TrainConfig};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

const SIZE: usize = 16;

fn data(train: usize, test: usize) -> Dataset {
    let opts = LoadOptions {
        size: SIZE,
        train_limit: Some(train),
        test_limit: Some(test),
        seed: 3,
        ..Default::default()
    };
    DataSpec::Shapes.load(&opts).unwrap()
}

fn arch_model(arch: &str, width: f64, seed: u64) -> Model {
    let opts = ArchOptions {
        width: Some(width),
        num_classes: Some(10),
        stem: Some(Stem::Cifar),
        ..Default::default()
    };
    Model::init(&ArchSpec::parse(arch, &opts).unwrap(), seed).unwrap()
}

fn model(data: &Dataset) -> Model {
    let mut m = arch_model("mobilenet_v2", 0.25, 11);
    m.meta.class_names = data.class_names.clone();
    m.meta.preprocessing = Preprocessing {
        input_size: [SIZE, SIZE],
        mean: data.mean,
        std: data.std,
    };
    m
}

fn values(m: &Model, name: &str) -> Vec<f32> {
    m.weights
        .get(name)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn mask_values(masks: &Masks, name: &str) -> Vec<u8> {
    masks
        .get(name)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Node ids of the layer reading the input and of the last weight layer, found in the test
/// from the graph (the library must find them the same way, without names).
fn first_and_last(graph: &Graph) -> (usize, usize) {
    let first = graph
        .nodes
        .iter()
        .position(|n| n.inputs == [0])
        .expect("a layer reads the input");
    let last = graph
        .nodes
        .iter()
        .rposition(|n| matches!(n.op, Op::Conv2d { .. } | Op::Linear { .. }))
        .unwrap();
    (first, last)
}

fn is_depthwise(op: &Op) -> bool {
    matches!(op, Op::Conv2d { groups, in_channels, out_channels, .. }
        if *groups > 1 && groups == in_channels && groups == out_channels)
}

#[test]
fn default_selection_spares_first_layer_classifier_and_depthwise() {
    for (arch, width) in [
        ("mobilenet_v2", 0.25),
        ("squeezenet1_1", 1.0),
        ("shufflenet_v1_g3", 0.5),
        ("mobilenet_v3_small", 0.5),
    ] {
        let m = arch_model(arch, width, 1);
        let g = &m.graph;
        let (first, last) = first_and_last(g);
        let choices = layer_choices(g, &MagnitudeConfig::new(0.5)).unwrap();
        let reason = |node: usize| {
            choices
                .iter()
                .find(|c| c.node == node)
                .unwrap()
                .excluded
                .clone()
        };
        assert_eq!(reason(first), Some(Exclusion::FirstLayer), "{arch}");
        assert_eq!(reason(last), Some(Exclusion::Classifier), "{arch}");
        for c in &choices {
            let op = &g.nodes[c.node].op;
            if is_depthwise(op) {
                assert_eq!(
                    c.excluded,
                    Some(Exclusion::Depthwise),
                    "{arch} {}",
                    c.weight
                );
            } else if c.node != first && c.node != last {
                assert_eq!(c.excluded, None, "{arch} {}", c.weight);
            }
        }
        let layers = prunable_layers(g, &MagnitudeConfig::new(0.5)).unwrap();
        assert!(layers.iter().all(|l| l.weight.ends_with(".weight")));
        assert!(!layers.is_empty());
        // Grouped (not depthwise) convs are pruned: ShuffleNet V1's 1x1 group convs.
        if arch.starts_with("shufflenet_v1") {
            assert!(
                layers
                    .iter()
                    .any(|l| matches!(g.nodes[l.node].op, Op::Conv2d { groups: 3, .. }))
            );
        }
    }
    // MobileNet V3's classifier is two linear layers: only the one producing the logits is
    // the classifier; the first is pruned.
    let m = arch_model("mobilenet_v3_small", 0.5, 1);
    let linears: Vec<usize> = m
        .graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| matches!(n.op, Op::Linear { .. }))
        .map(|(i, _)| i)
        .collect();
    let layers = prunable_layers(&m.graph, &MagnitudeConfig::new(0.5)).unwrap();
    assert!(layers.iter().any(|l| l.node == linears[0]));
    assert!(!layers.iter().any(|l| l.node == linears[1]));
}

#[test]
fn include_depthwise_and_patterns_change_the_selection() {
    let m = arch_model("mobilenet_v2", 0.25, 1);
    let g = &m.graph;
    let base = prunable_layers(g, &MagnitudeConfig::new(0.5)).unwrap();
    let dw = prunable_layers(
        g,
        &MagnitudeConfig {
            include_depthwise: true,
            ..MagnitudeConfig::new(0.5)
        },
    )
    .unwrap();
    let n_dw = g.nodes.iter().filter(|n| is_depthwise(&n.op)).count();
    assert!(n_dw > 5);
    assert_eq!(dw.len(), base.len() + n_dw);
    // Patterns add to the defaults: the first layer and classifier stay spared.
    let cfg = MagnitudeConfig {
        exclude: vec!["features.1*".into(), "features.2.conv.0.0.weight".into()],
        include_depthwise: true,
        ..MagnitudeConfig::new(0.5)
    };
    let choices = layer_choices(g, &cfg).unwrap();
    let layers = prunable_layers(g, &cfg).unwrap();
    assert!(
        layers.iter().all(
            |l| !l.weight.starts_with("features.1") && l.weight != "features.2.conv.0.0.weight"
        )
    );
    assert!(
        choices
            .iter()
            .any(|c| c.weight == "features.17.conv.2.weight"
                && c.excluded == Some(Exclusion::Pattern("features.1*".into())))
    );
    let (first, last) = first_and_last(g);
    assert!(!layers.iter().any(|l| l.node == first || l.node == last));

    let err = prunable_layers(
        g,
        &MagnitudeConfig {
            exclude: vec!["features.1*".into(), "no_such_layer.*".into()],
            ..MagnitudeConfig::new(0.5)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`no_such_layer.*`") && err.contains("slimcandle inspect"),
        "{err}"
    );
    // Everything excluded: nothing left to prune.
    let err = prunable_layers(
        g,
        &MagnitudeConfig {
            exclude: vec!["*".into()],
            ..MagnitudeConfig::new(0.5)
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("no layer"), "{err}");
}

#[test]
fn masks_reach_exactly_the_requested_sparsity() {
    let m = arch_model("mobilenet_v2", 0.25, 2);
    let before: HashMap<String, Vec<f32>> = m
        .weights
        .names()
        .map(|n| (n.to_string(), values(&m, n)))
        .collect();
    // A few weights already zero: they count as pruned.
    let cfg = MagnitudeConfig::new(0.7);
    let layers = prunable_layers(&m.graph, &cfg).unwrap();
    let total: usize = layers.iter().map(|l| l.numel).sum();

    for sparsity in [0.0, 0.3, 0.7, 0.95] {
        let masks = magnitude_masks(&m, &cfg, sparsity).unwrap();
        let stats = masks.stats().unwrap();
        let zeros: usize = stats.iter().map(|s| s.zeros).sum();
        assert_eq!(zeros, (sparsity * total as f64).round() as usize);
        assert_eq!(masks.names().count(), layers.len());
        // Global ranking: every pruned |w| is at most every kept |w|.
        let (mut max_pruned, mut min_kept) = (0f32, f32::INFINITY);
        for l in &layers {
            let w = &before[&l.weight];
            for (v, k) in w.iter().zip(mask_values(&masks, &l.weight)) {
                if k == 0 {
                    max_pruned = max_pruned.max(v.abs());
                } else {
                    min_kept = min_kept.min(v.abs());
                }
            }
        }
        assert!(
            max_pruned <= min_kept,
            "{sparsity}: {max_pruned} > {min_kept}"
        );
        // Layers differ: global ranking does not give every layer the same share.
        if sparsity == 0.7 {
            let shares: Vec<f64> = stats.iter().map(|s| s.sparsity()).collect();
            let spread = shares.iter().cloned().fold(0.0, f64::max)
                - shares.iter().cloned().fold(1.0, f64::min);
            assert!(spread > 0.05, "{shares:?}");
        }
    }

    let layer_cfg = MagnitudeConfig {
        scope: MaskScope::Layer,
        ..cfg.clone()
    };
    let masks = magnitude_masks(&m, &layer_cfg, 0.6).unwrap();
    for s in masks.stats().unwrap() {
        assert_eq!(
            s.zeros,
            (0.6 * s.numel as f64).round() as usize,
            "{}",
            s.name
        );
    }

    // Applying zeroes exactly the masked weights and touches nothing else.
    let masks = magnitude_masks(&m, &cfg, 0.7).unwrap();
    masks.apply(&m.weights).unwrap();
    let report = SparsityReport::measure(&m, &cfg).unwrap();
    assert_eq!(report.selected, total);
    assert_eq!(report.selected_zeros, (0.7 * total as f64).round() as usize);
    assert_eq!(report.params, m.graph.param_count());
    for name in m.weights.names() {
        let now = values(&m, name);
        match masks.get(name) {
            None => assert_eq!(now, before[name], "{name} must be untouched"),
            Some(_) => {
                for ((a, b), k) in now.iter().zip(&before[name]).zip(mask_values(&masks, name)) {
                    if k == 0 {
                        assert_eq!(a.to_bits(), 0, "{name}: pruned weights are +0.0");
                    } else {
                        assert_eq!(a, b);
                    }
                }
            }
        }
    }
    // Masks rebuilt from the zeros are the same masks; recomputing at the same sparsity from
    // the pruned weights changes nothing (zeros count as pruned).
    let rebuilt = Masks::from_zeros(&m, &cfg).unwrap();
    let again = magnitude_masks(&m, &cfg, 0.7).unwrap();
    for l in &layers {
        assert_eq!(
            mask_values(&rebuilt, &l.weight),
            mask_values(&masks, &l.weight)
        );
        assert_eq!(
            mask_values(&again, &l.weight),
            mask_values(&masks, &l.weight)
        );
    }
    // Sparsity is checked.
    assert!(magnitude_masks(&m, &cfg, 1.0).is_err());
    assert!(magnitude_masks(&m, &cfg, -0.1).is_err());
}

#[test]
fn cubic_schedule_follows_zhu_and_gupta() {
    let s = CubicSchedule {
        initial: 0.0,
        final_sparsity: 0.8,
        start_step: 100,
        end_step: 300,
        frequency: 50,
    };
    assert_eq!(s.sparsity_at(0), 0.0);
    assert_eq!(s.sparsity_at(100), 0.0);
    // Halfway: 0.8 (1 - 0.5^3) = 0.7.
    assert!((s.sparsity_at(200) - 0.7).abs() < 1e-12);
    assert!((s.sparsity_at(150) - 0.8 * (1.0 - 0.75f64.powi(3))).abs() < 1e-12);
    assert_eq!(s.sparsity_at(300), 0.8);
    assert_eq!(s.sparsity_at(1000), 0.8);
    // Non-decreasing.
    assert!((0..400).all(|t| s.sparsity_at(t) <= s.sparsity_at(t + 1)));
    let updates: Vec<usize> = (0..400).filter(|&t| s.is_update(t)).collect();
    assert_eq!(updates, vec![100, 150, 200, 250, 300]);
    // The end step is an update even off the frequency grid; a one-shot schedule updates once.
    let s = CubicSchedule {
        initial: 0.2,
        final_sparsity: 0.5,
        start_step: 10,
        end_step: 25,
        frequency: 10,
    };
    assert_eq!(s.sparsity_at(10), 0.2);
    assert_eq!(s.sparsity_at(9), 0.2);
    let updates: Vec<usize> = (0..40).filter(|&t| s.is_update(t)).collect();
    assert_eq!(updates, vec![10, 20, 25]);
    let once = CubicSchedule {
        start_step: 7,
        end_step: 7,
        ..s
    };
    assert_eq!((once.sparsity_at(6), once.sparsity_at(7)), (0.2, 0.5));
    assert_eq!((0..40).filter(|&t| once.is_update(t)).count(), 1);

    // From epochs to steps; validation.
    let p = GradualPruning {
        magnitude: MagnitudeConfig::new(0.8),
        initial_sparsity: 0.0,
        start_epoch: 0.5,
        end_epoch: 1.5,
        frequency: 2,
    };
    let s = p.schedule(3);
    assert_eq!((s.start_step, s.end_step, s.final_sparsity), (2, 5, 0.8));
    assert!(p.validate(2).is_ok());
    assert!(
        p.validate(1)
            .unwrap_err()
            .to_string()
            .contains("after the last epoch")
    );
    let bad = |f: &dyn Fn(&mut GradualPruning)| {
        let mut q = p.clone();
        f(&mut q);
        q.validate(10).unwrap_err().to_string()
    };
    assert!(bad(&|q| q.end_epoch = 0.2).contains("before its start"));
    assert!(bad(&|q| q.magnitude.sparsity = 1.0).contains("[0, 1)"));
    assert!(bad(&|q| q.initial_sparsity = 0.9).contains("above the final"));
    assert!(bad(&|q| q.frequency = 0).contains("frequency"));
}

fn config(prune: Option<GradualPruning>, optimizer: OptimizerKind, bn_l1: f64) -> TrainConfig {
    TrainConfig {
        data: "shapes".into(),
        train_limit: None,
        test_limit: None,
        epochs: 2,
        batch_size: 32,
        optimizer,
        lr: 0.05,
        weight_decay: 5e-4,
        schedule: Schedule::Cosine,
        warmup_epochs: 0.0,
        label_smoothing: 0.0,
        augment: Some(Augment {
            crop_padding: 2,
            hflip: true,
        }),
        seed: 5,
        prune,
        bn_l1,
        distill: None,
        qat: None,
    }
}

const SGD: OptimizerKind = OptimizerKind::Sgd {
    momentum: 0.9,
    nesterov: true,
};

/// 3 steps an epoch (96 images, batches of 32): pruning from step 0 to step 5 (epoch 1.5),
/// masks updated at steps 0, 2, 4 and 5.
fn gradual(sparsity: f64) -> GradualPruning {
    GradualPruning {
        magnitude: MagnitudeConfig::new(sparsity),
        initial_sparsity: 0.0,
        start_epoch: 0.0,
        end_epoch: 1.5,
        frequency: 2,
    }
}

/// Sets the stop flag after `after` steps, as Ctrl-C would.
struct StopAfter<'a> {
    after: usize,
    steps: usize,
    flag: &'a AtomicBool,
}

impl Observer for StopAfter<'_> {
    fn step(&mut self, _: usize, _: f64, _: f64, _: f64) {
        self.steps += 1;
        if self.steps == self.after {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
}

/// Every masked weight is exactly zero; returns the number of masked entries.
fn check_masked_zero(run: &Run) -> usize {
    let masks = run.masks().expect("pruning has started");
    let mut masked = 0;
    for name in masks.names() {
        let w = values(&run.model, name);
        for (v, k) in w.iter().zip(mask_values(masks, name)) {
            if k == 0 {
                masked += 1;
                assert_eq!(v.to_bits(), 0, "{name} step {}", run.progress.global_step);
            }
        }
    }
    masked
}

fn metrics_of(dir: &Path) -> Vec<EpochMetrics> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn gradual_pruning_keeps_masked_weights_at_zero_and_reaches_the_target() {
    let d = data(96, 40);
    let root = common::temp_dir("magnitude-gradual");
    let adamw = OptimizerKind::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    for (k, optimizer) in [SGD, adamw].into_iter().enumerate() {
        let dir = root.join(format!("run{k}"));
        let p = gradual(0.8);
        let mut run =
            Run::create(&dir, config(Some(p.clone()), optimizer, 0.0), model(&d)).unwrap();
        let schedule = p.schedule(3);
        let total: usize = prunable_layers(&run.model.graph, &p.magnitude)
            .unwrap()
            .iter()
            .map(|l| l.numel)
            .sum();
        // Stop after every step, check, continue in memory.
        let mut last_update = 0;
        loop {
            let flag = AtomicBool::new(false);
            let outcome = run
                .train(
                    &d,
                    &flag,
                    &mut StopAfter {
                        after: 1,
                        steps: 0,
                        flag: &flag,
                    },
                )
                .unwrap();
            let step = run.progress.global_step;
            if schedule.is_update(step) {
                last_update = step;
            }
            let masked = check_masked_zero(&run);
            let expected = (schedule.sparsity_at(last_update) * total as f64).round() as usize;
            assert_eq!(masked, expected, "step {step}");
            if matches!(outcome, Outcome::Finished { .. }) {
                break;
            }
        }
        assert_eq!(run.progress.global_step, 6);
        let report = run.sparsity().unwrap().unwrap();
        assert_eq!(report.selected_zeros, (0.8 * total as f64).round() as usize);
        assert!(report.nonzero_params < report.params - report.selected_zeros + 1);
        // The saved models have the final sparsity, `best` included; metrics record it.
        for file in ["last.safetensors", "best.safetensors"] {
            let m = slimcandle::checkpoint::load(&dir.join(file)).unwrap();
            let r = SparsityReport::measure(&m, &p.magnitude).unwrap();
            assert_eq!(r.selected_zeros, report.selected_zeros, "{file}");
        }
        let metrics = metrics_of(&dir);
        assert_eq!(metrics.len(), 2);
        assert!(metrics[0].sparsity.unwrap() < 0.8);
        assert!((metrics[1].sparsity.unwrap() - report.sparsity()).abs() < 1e-12);
        assert_eq!(metrics[1].nonzero_params, Some(report.nonzero_params));
        // Epoch 1 ended before the final sparsity: it could not be `best`.
        assert_eq!(
            run.progress.best_top1,
            Some(metrics[1].test_top1.unwrap()),
            "{metrics:?}"
        );
    }
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn interrupted_pruning_run_resumes_exactly() {
    let d = data(96, 40);
    let root = common::temp_dir("magnitude-resume");
    let never = AtomicBool::new(false);
    let p = gradual(0.6);
    let full_dir = root.join("full");
    let mut full = Run::create(&full_dir, config(Some(p.clone()), SGD, 1e-3), model(&d)).unwrap();
    full.train(&d, &never, &mut NoObserver).unwrap();

    // Cut after step 2 (an update step: the saved masks are the new ones) and after step 3
    // (between updates: the saved masks must be used, not recomputed), resuming from disk.
    let cut_dir = root.join("cut");
    let mut run = Run::create(&cut_dir, config(Some(p), SGD, 1e-3), model(&d)).unwrap();
    for after in [2, 1] {
        let flag = AtomicBool::new(false);
        let outcome = run
            .train(
                &d,
                &flag,
                &mut StopAfter {
                    after,
                    steps: 0,
                    flag: &flag,
                },
            )
            .unwrap();
        assert!(matches!(outcome, Outcome::Interrupted { .. }));
        drop(run);
        run = Run::open(&cut_dir).unwrap();
        assert!(run.masks().is_some());
    }
    assert_eq!(run.progress.global_step, 3);
    run.train(&d, &never, &mut NoObserver).unwrap();

    for name in full.model.weights.names() {
        assert_eq!(
            values(&full.model, name),
            values(&run.model, name),
            "{name}"
        );
    }
    let (a, b) = (metrics_of(&full_dir), metrics_of(&cut_dir));
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            (x.train_loss, x.test_top1, x.sparsity, x.nonzero_params),
            (y.train_loss, y.test_top1, y.sparsity, y.nonzero_params)
        );
    }
    std::fs::remove_dir_all(&root).ok();
}

fn gamma_l1(m: &Model) -> f64 {
    m.graph
        .param_specs()
        .iter()
        .filter(|s| s.role == slimcandle::graph::ParamRole::BnWeight)
        .map(|s| {
            values(m, &s.name)
                .iter()
                .map(|v| v.abs() as f64)
                .sum::<f64>()
        })
        .sum()
}

#[test]
fn bn_l1_shrinks_batch_norm_scales() {
    let d = data(96, 20);
    let root = common::temp_dir("magnitude-bnl1");
    let never = AtomicBool::new(false);
    let mut sums = Vec::new();
    for (k, lambda) in [0.0, 0.1].into_iter().enumerate() {
        let mut run = Run::create(
            &root.join(format!("run{k}")),
            config(None, SGD, lambda),
            model(&d),
        )
        .unwrap();
        let start = gamma_l1(&run.model);
        run.train(&d, &never, &mut NoObserver).unwrap();
        sums.push((start, gamma_l1(&run.model)));
    }
    let (start, plain) = sums[0];
    let (_, slim) = sums[1];
    assert!(
        slim < plain - 0.02 * start,
        "sum |gamma|: start {start}, without penalty {plain}, with {slim}"
    );
    // Negative penalties are refused.
    let err = Run::create(&root.join("bad"), config(None, SGD, -1.0), model(&d))
        .err()
        .unwrap();
    assert!(err.to_string().contains("--bn-l1"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn cli_prunes_gradually_and_refuses_bad_flags() {
    let root = common::temp_dir("magnitude-cli");
    let dir = root.join("run");
    let base = [
        "train",
        "--arch",
        "mobilenet_v1",
        "--width",
        "0.25",
        "--stem",
        "cifar",
        "--train-limit",
        "48",
        "--test-limit",
        "20",
        "--batch-size",
        "16",
        "--epochs",
        "2",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    let args = with(&[
        "--prune",
        "magnitude",
        "--sparsity",
        "0.75",
        "--prune-frequency",
        "1",
        "--prune-exclude",
        "features.1.*",
        "--json",
        "-o",
        dir.to_str().unwrap(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = common::slimcandle(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pruning") && stderr.contains("spared"),
        "{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &summary["sparsity"];
    let selected = s["prunable_weights"].as_u64().unwrap() as f64;
    assert_eq!(
        s["zeros"].as_u64().unwrap(),
        (0.75 * selected).round() as u64,
        "{summary}"
    );
    assert!(s["nonzero_params"].as_u64().unwrap() < s["params"].as_u64().unwrap());
    let config: TrainConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let p = config.prune.unwrap();
    assert_eq!(
        (p.end_epoch, p.start_epoch, p.frequency, p.magnitude.scope),
        (1.5, 0.0, 1, MaskScope::Global)
    );
    assert_eq!(p.magnitude.exclude, vec!["features.1.*".to_string()]);
    let last = slimcandle::checkpoint::load(&dir.join("last.safetensors")).unwrap();
    let r = SparsityReport::measure(&last, &p.magnitude).unwrap();
    assert_eq!(r.selected_zeros as u64, s["zeros"].as_u64().unwrap());
    assert!(metrics_of(&dir).iter().all(|m| m.sparsity.is_some()));

    // Bad flags, each refused with a clear message (exit status 2 for a usage error, 1 for one the model causes) before any training.
    let bad = root.join("bad");
    let o = bad.to_str().unwrap();
    for (extra, code, message) in [
        (vec!["--sparsity", "0.8"], 2, "add --prune magnitude"),
        (
            vec!["--prune", "magnitude"],
            2,
            "needs the target --sparsity",
        ),
        (vec!["--prune", "magnitude", "--sparsity", "1"], 2, "[0, 1)"),
        (
            vec![
                "--prune",
                "magnitude",
                "--sparsity",
                "0.5",
                "--prune-end-epoch",
                "3",
            ],
            2,
            "after the last epoch",
        ),
        (
            vec![
                "--prune",
                "magnitude",
                "--sparsity",
                "0.5",
                "--prune-start-epoch",
                "1",
                "--prune-end-epoch",
                "0.5",
            ],
            2,
            "before its start",
        ),
        (
            vec![
                "--prune",
                "magnitude",
                "--sparsity",
                "0.5",
                "--prune-exclude",
                "nope.*",
            ],
            1,
            "`nope.*` matches no conv or linear layer",
        ),
        (vec!["--bn-l1=-1"], 2, "--bn-l1"),
    ] {
        let mut extra = extra;
        extra.extend(["-o", o]);
        let args = with(&extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = common::slimcandle(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{extra:?}: {stderr}");
        assert!(stderr.contains(message), "{extra:?}: {stderr}");
        assert!(!bad.join("config.json").exists());
    }
    std::fs::remove_dir_all(&root).ok();
}
