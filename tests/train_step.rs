//! The train-step executor (`train::step`) against the Candle autograd path
//! (`exec::forward_train`, `loss::cross_entropy`, `backward`): loss, logits, every parameter
//! gradient and the batch norm running statistics, for every model family with both stems,
//! random weights, small batches and odd input sizes. Both f32 paths are measured against the
//! Candle path in f64 (without dropout, whose f32 mask Candle cannot multiply into f64), then
//! the executor against the f32 autograd path with dropout active (the same seed on both
//! sides). Also: the executor is deterministic, and its loss gradient matches finite
//! differences.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{scaled_error, values_f64 as values};
use slimcandle::exec::forward_train;
use slimcandle::graph::Op;
use slimcandle::model::Model;
use slimcandle::models::{ArchOptions, ArchSpec, Stem};
use slimcandle::rng::Rng;
use slimcandle::train::loss::cross_entropy;
use slimcandle::train::step::{cross_entropy_grad, train_step};

/// max |got - want| / max(max |want|, floor) per tensor.
const TOL: f64 = 1e-4;

/// `e <= tol`, false for NaN.
fn within(e: f64, tol: f64) -> bool {
    e <= tol
}

/// The scaled error of each quantity (loss, logits, every parameter gradient, every running
/// statistic) of `got` against `want`. Gradients are scaled by the largest of the tensor's own
/// largest value and 1e-3 of the model's largest gradient: a batch-norm shift followed by a
/// convolution and another batch norm has a true gradient of 0, of which each f32 path only
/// computes rounding noise. Running statistics likewise.
fn errors(got: &Step, want: &Step) -> Vec<(String, f64)> {
    let mut out = vec![
        (
            "loss".to_string(),
            (got.loss - want.loss).abs() / want.loss.abs().max(1e-6),
        ),
        (
            "logits".to_string(),
            scaled_error(&got.logits, &want.logits, 0.0),
        ),
    ];
    let global = want
        .grads
        .iter()
        .flat_map(|(_, g)| values(g))
        .fold(0f64, |m, v| m.max(v.abs()));
    for (name, w) in &want.grads {
        let e = match got.grads.iter().find(|(n, _)| n == name) {
            Some((_, g)) => scaled_error(g, w, 1e-3 * global),
            None => f64::INFINITY,
        };
        out.push((format!("grad {name}"), e));
    }
    if got.grads.len() != want.grads.len() {
        out.push(("number of gradients".to_string(), f64::INFINITY));
    }
    // Running statistics likewise, against the model's largest one (a channel whose true
    // batch mean is 0 has a running mean of rounding noise).
    let global = want
        .stats
        .iter()
        .flat_map(|(_, s)| values(s))
        .fold(0f64, |m, v| m.max(v.abs()));
    for ((name, g), (_, w)) in got.stats.iter().zip(&want.stats) {
        out.push((name.clone(), scaled_error(g, w, 1e-3 * global)));
    }
    out
}

/// One step's results, by name, in f32 or f64.
struct Step {
    loss: f64,
    logits: Tensor,
    grads: Vec<(String, Tensor)>,
    stats: Vec<(String, Tensor)>,
}

fn model_of(arch: &str, width: Option<f64>, stem: Stem, dropout: bool, dtype: DType) -> Model {
    let opts = ArchOptions {
        width,
        num_classes: Some(7),
        stem: Some(stem),
        ..Default::default()
    };
    let spec = ArchSpec::parse(arch, &opts).unwrap();
    let mut model = Model::init(&spec, 3).unwrap();
    if !dropout {
        for node in &mut model.graph.nodes {
            if let Op::Dropout { p } = &mut node.op {
                *p = 0.0;
            }
        }
    }
    let names: Vec<String> = model.weights.names().map(String::from).collect();
    for name in names {
        let t = model.weights.get(&name).unwrap().to_dtype(dtype).unwrap();
        model.weights.insert(&name, &t).unwrap();
    }
    model
}

fn stats_of(model: &Model) -> Vec<(String, Tensor)> {
    let mut names: Vec<String> = model
        .weights
        .names()
        .filter(|n| n.ends_with("running_mean") || n.ends_with("running_var"))
        .map(String::from)
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let t = model.weights.get(&n).unwrap();
            (n, t)
        })
        .collect()
}

const SEED: u64 = 99;
const SMOOTHING: f64 = 0.1;

/// The Candle autograd path (in the model's dtype).
fn autograd(model: &Model, x: &Tensor, labels: &[u32]) -> Step {
    let dtype = model.weights.tensors().next().unwrap().1.dtype();
    let x = x.to_dtype(dtype).unwrap();
    let label_t = Tensor::new(labels, &Device::Cpu).unwrap();
    let logits = forward_train(&model.graph, &model.weights, &x, SEED).unwrap();
    let loss = cross_entropy(&logits, &label_t, SMOOTHING).unwrap();
    let store = loss.backward().unwrap();
    let mut grads: Vec<(String, Tensor)> = model
        .weights
        .trainable(&model.graph)
        .into_iter()
        .filter_map(|(name, _, var)| store.get(var.as_tensor()).map(|g| (name, g.clone())))
        .collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    Step {
        loss: loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        logits,
        grads,
        stats: stats_of(model),
    }
}

/// The train-step executor.
fn executor(model: &Model, x: &Tensor, labels: &[u32]) -> Step {
    let out = train_step(&model.graph, &model.weights, x, labels, SMOOTHING, SEED)
        .unwrap()
        .expect("f32 CPU tensors run the executor");
    let mut grads: Vec<(String, Tensor)> = out.grads.into_iter().collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    Step {
        loss: out.loss as f64,
        logits: out.logits,
        grads,
        stats: stats_of(model),
    }
}

fn check(arch: &str, width: Option<f64>, stem: Stem, batch: usize, size: usize) {
    let what = format!("{arch} {stem:?} batch {batch} {size}x{size}");
    let mut rng = Rng::new(17);
    let x: Vec<f32> = (0..batch * 3 * size * size)
        .map(|_| rng.normal() as f32)
        .collect();
    let x = Tensor::from_vec(x, (batch, 3, size, size), &Device::Cpu).unwrap();
    let labels: Vec<u32> = (0..batch).map(|i| (i * 3 % 7) as u32).collect();

    // Without dropout: both f32 paths against the Candle path in f64. The executor must be
    // within TOL of it, or no further than the f32 autograd path is (within a factor 4).
    let reference = autograd(&model_of(arch, width, stem, false, DType::F64), &x, &labels);
    let old = autograd(&model_of(arch, width, stem, false, DType::F32), &x, &labels);
    let model = model_of(arch, width, stem, false, DType::F32);
    let new = executor(&model, &x, &labels);
    let (e_new, e_old) = (errors(&new, &reference), errors(&old, &reference));
    let mut bad = Vec::new();
    let (mut worst_new, mut worst_old) = (0f64, 0f64);
    for ((name, en), (_, eo)) in e_new.iter().zip(&e_old) {
        worst_new = worst_new.max(*en);
        worst_old = worst_old.max(*eo);
        if !within(*en, TOL.max(4.0 * eo)) {
            bad.push(format!("{name}: executor {en:.2e}, autograd f32 {eo:.2e}"));
        }
    }
    eprintln!(
        "{what}: {} gradients; worst error against f64: executor {worst_new:.2e}, autograd f32 {worst_old:.2e}",
        new.grads.len()
    );
    assert!(bad.is_empty(), "{what}:\n  {}", bad.join("\n  "));

    // Deterministic: the same step again (from the updated running statistics, which the
    // gradients do not depend on) gives bit-identical results.
    let again = executor(&model, &x, &labels);
    assert_eq!(again.loss.to_bits(), new.loss.to_bits(), "{what}: loss");
    for ((name, a), (_, b)) in again.grads.iter().zip(&new.grads) {
        assert_eq!(values(a), values(b), "{what}: {name}");
    }

    // With the models' dropout (masks from the same seed): loss, logits and the classifier's
    // gradients against the f32 autograd path.
    let old = autograd(&model_of(arch, width, stem, true, DType::F32), &x, &labels);
    let new = executor(&model_of(arch, width, stem, true, DType::F32), &x, &labels);
    for (name, e) in errors(&new, &old) {
        let classifier = name.starts_with("grad classifier") || name.starts_with("grad fc");
        if (name == "loss" || name == "logits" || classifier) && !within(e, TOL) {
            panic!("{what} with dropout: {name}: {e:.2e}");
        }
    }
}

#[test]
fn mobilenet_v1_matches_autograd() {
    check("mobilenet_v1", Some(0.25), Stem::Cifar, 3, 19);
    // 16x16 and 8x8 planes: the batched 1x1 convolutions' backward per sample on the NCHW
    // planes (conv_gemm::planes_in_place).
    check("mobilenet_v1", Some(0.25), Stem::Cifar, 8, 32);
    check("mobilenet_v1", Some(0.25), Stem::Imagenet, 2, 45);
}

#[test]
fn mobilenet_v2_matches_autograd() {
    check("mobilenet_v2", Some(0.35), Stem::Cifar, 3, 21);
    check("mobilenet_v2", Some(0.35), Stem::Imagenet, 2, 47);
}

#[test]
fn mobilenet_v3_small_matches_autograd() {
    check("mobilenet_v3_small", Some(0.5), Stem::Cifar, 3, 23);
    check("mobilenet_v3_small", Some(0.5), Stem::Imagenet, 2, 49);
}

#[test]
fn shufflenet_v1_matches_autograd() {
    check("shufflenet_v1_g3", Some(0.5), Stem::Cifar, 3, 17);
    check("shufflenet_v1_g3", Some(0.5), Stem::Imagenet, 2, 51);
}

#[test]
fn shufflenet_v2_matches_autograd() {
    check("shufflenet_v2_x0_5", None, Stem::Cifar, 3, 19);
    check("shufflenet_v2_x0_5", None, Stem::Imagenet, 2, 45);
    // Large enough that split, concat and shuffle copy in parallel (train::elementwise).
    check("shufflenet_v2_x0_5", None, Stem::Cifar, 8, 24);
}

#[test]
fn squeezenet1_1_matches_autograd() {
    check("squeezenet1_1", None, Stem::Cifar, 3, 21);
    // The fire modules' 3x3 expands on 16x16 and 8x8 planes, forward and backward per sample.
    check("squeezenet1_1", None, Stem::Cifar, 4, 32);
    check("squeezenet1_1", None, Stem::Imagenet, 2, 47);
}

#[test]
fn squeezenet1_0_matches_autograd() {
    check("squeezenet1_0", None, Stem::Cifar, 2, 19);
}

/// The loss gradient against central finite differences (in f64 around f32 logits).
#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    let mut rng = Rng::new(5);
    let (n, k) = (3, 5);
    let logits: Vec<f32> = (0..n * k).map(|_| 2.0 * rng.normal() as f32).collect();
    let labels = [4u32, 0, 2];
    for eps in [0.0, 0.1] {
        let (loss, grad) = cross_entropy_grad(&logits, &labels, k, eps).unwrap();
        let t = Tensor::from_slice(&logits, (n, k), &Device::Cpu).unwrap();
        let lt = Tensor::new(&labels, &Device::Cpu).unwrap();
        let want = cross_entropy(&t, &lt, eps)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((loss - want).abs() < 1e-5, "loss {loss} vs {want}");
        for i in 0..n * k {
            let h = 1e-2f32;
            let mut plus = logits.clone();
            plus[i] += h;
            let mut minus = logits.clone();
            minus[i] -= h;
            let lp = cross_entropy_grad(&plus, &labels, k, eps).unwrap().0 as f64;
            let lm = cross_entropy_grad(&minus, &labels, k, eps).unwrap().0 as f64;
            let fd = (lp - lm) / (2.0 * h as f64);
            assert!(
                (fd - grad[i] as f64).abs() < 2e-3,
                "eps {eps} logit {i}: {} vs {fd}",
                grad[i]
            );
        }
    }
}
