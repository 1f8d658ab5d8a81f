//! Quantization-aware training: the train-step executor's fake-quantized forward pass equals
//! the int8 simulation of the exported model (MobileNet V2, ShuffleNet V2's concat, slice
//! and shuffle, MobileNet V3's hardswish and squeeze-and-excitation); a QAT step's gradients
//! equal Candle autograd's on a small graph written out with straight-through fake
//! quantization; a short `train --qat` run (also with a teacher) saves an int8 checkpoint
//! that loads and runs on the integer engine as the simulation does; bad input is refused in
//! one line.

mod common;

use candle_core::{Device, Tensor, Var};
use common::{s, slimcandle, stderr};
use slimcandle::checkpoint::{self, AnyModel};
use slimcandle::graph::{Activation, GraphBuilder, Op};
use slimcandle::model::{Model, ModelMeta, Preprocessing, Provenance, default_class_names};
use slimcandle::models::{ArchOptions, ArchSpec, Stem};
use slimcandle::passes::quant::simulate::simulate;
use slimcandle::passes::quant::{Calibrator, Granularity, QParams};
use slimcandle::rng::Rng;
use slimcandle::train::qat::{Qat, QatConfig};
use slimcandle::train::step::{Objective, train_step_quantized};
use slimcandle::weights::Weights;

fn random(seed: u64, dims: &[usize], scale: f64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.normal() * scale) as f32).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// A fresh small-input model without dropout, its batch-norm statistics and affine
/// parameters randomised (as a trained model's are: not 0 / 1).
fn model(arch: &str, width: f64, seed: u64) -> Model {
    let opts = ArchOptions {
        width: Some(width),
        num_classes: Some(5),
        stem: Some(Stem::Cifar),
        ..Default::default()
    };
    let mut m = Model::init(&ArchSpec::parse(arch, &opts).unwrap(), seed).unwrap();
    for node in &mut m.graph.nodes {
        if let Op::Dropout { p } = &mut node.op {
            *p = 0.0;
        }
    }
    randomised(m, seed)
}

/// `m` with its batch-norm statistics and biases randomised.
fn randomised(mut m: Model, seed: u64) -> Model {
    let mut rng = Rng::new(seed ^ 0xb7);
    let names: Vec<String> = m.weights.names().map(String::from).collect();
    for name in names {
        let t = m.weights.get(&name).unwrap();
        let n = t.elem_count();
        let v: Option<Vec<f32>> = if name.ends_with("running_var") {
            Some((0..n).map(|_| 0.5 + rng.uniform() as f32).collect())
        } else if name.ends_with("running_mean") {
            Some((0..n).map(|_| 0.2 * rng.normal() as f32).collect())
        } else if name.ends_with(".bias") && t.rank() == 1 {
            Some((0..n).map(|_| 0.1 * rng.normal() as f32).collect())
        } else {
            None
        };
        if let Some(v) = v {
            let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
            m.weights.insert(&name, &t).unwrap();
        }
    }
    m
}

/// A freshly initialised model of a hand-built graph.
fn graph_model(graph: slimcandle::graph::Graph, classes: usize) -> Model {
    let weights = Weights::init(&graph, 5).unwrap();
    Model {
        graph,
        weights,
        meta: ModelMeta {
            arch: None,
            class_names: default_class_names(classes),
            preprocessing: Preprocessing::for_stem(Stem::Cifar),
            provenance: Provenance::now("test"),
        },
    }
}

fn frozen_config() -> QatConfig {
    QatConfig {
        granularity: Granularity::PerChannel,
        calibrator: Calibrator::Minmax,
        calibration_images: 1,
        freeze_bn_epoch: Some(0),
        freeze_observers_epoch: None,
        keep_float: Vec::new(),
    }
}

/// Output codes of logits at `q` (the logits are dequantized codes).
fn codes(v: &[f32], q: QParams) -> Vec<i32> {
    v.iter()
        .map(|x| (x / q.scale).round() as i32 + q.zero_point as i32)
        .collect()
}

/// The executor's fake-quantized logits of `m` on `x` and the simulation's of the exported
/// model, as output codes: (equal, total, worst difference in steps).
fn executor_against_simulation(m: &Model, x: &Tensor, calib: Tensor) -> (usize, usize, i32) {
    let qat = Qat::calibrate(m, [Ok(calib)], frozen_config(), |_| {}).unwrap();
    let fq = qat.fake_quant(m, 0).unwrap();
    assert!(fq.frozen_bn);
    let before = running_stats(m);
    let labels = vec![0u32; x.dim(0).unwrap()];
    let out = train_step_quantized(
        &m.graph,
        &m.weights,
        x,
        &labels,
        &Objective::labels(0.0),
        1,
        &fq,
    )
    .unwrap()
    .expect("f32 CPU model");
    // A frozen-batch-norm step leaves the running statistics alone.
    assert_eq!(before, running_stats(m));
    let q = qat.export(m, 0).unwrap();
    let sim = simulate(&q, x).unwrap();
    let out_q = q.activations[q.graph.output].unwrap();
    let (a, b) = (
        codes(&values(&out.logits), out_q),
        codes(&values(&sim), out_q),
    );
    let equal = a.iter().zip(&b).filter(|(u, v)| u == v).count();
    let worst = a.iter().zip(&b).map(|(u, v)| (u - v).abs()).max().unwrap();
    (equal, a.len(), worst)
}

/// Every batch norm's running statistics, by name.
fn running_stats(m: &Model) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<(String, Vec<f32>)> = m
        .weights
        .tensors()
        .filter(|(n, _)| n.contains(".running_"))
        .map(|(n, t)| (n.to_string(), values(t)))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!v.is_empty());
    v
}

#[test]
fn fake_quantized_forward_equals_the_simulation_of_the_exported_model() {
    // One layer of each kind: conv + batch norm + ReLU6, depthwise conv + batch norm + ReLU,
    // 1x1 conv + batch norm, residual add, max pool, slice / concat / shuffle, hardswish,
    // global pool, linear: the arithmetic of each agrees up to float rounding.
    let mut b = GraphBuilder::new(3);
    let c1 = b.conv("c1", GraphBuilder::INPUT, 8, 3, 1, 1, 1, false);
    let c1 = b.batch_norm("bn1", c1, 1e-5, 0.1);
    let r1 = b.act(Activation::Relu6, c1);
    let dw = b.conv("dw", r1, 8, 3, 1, 1, 8, false);
    let dw = b.batch_norm("bn2", dw, 1e-5, 0.1);
    let dw = b.act(Activation::Relu, dw);
    let pw = b.conv("pw", dw, 8, 1, 1, 0, 1, false);
    let pw = b.batch_norm("bn3", pw, 1e-5, 0.1);
    let add = b.add(pw, r1);
    let mp = b.max_pool(add, 2, 2, 0, false);
    let left = b.slice(mp, 0, 4);
    let right = b.slice(mp, 4, 8);
    let right = b.conv("br", right, 4, 1, 1, 0, 1, true);
    let cat = b.concat(vec![left, right]);
    let sh = b.shuffle(cat, 2);
    let hs = b.act(Activation::Hardswish, sh);
    let gp = b.global_avg_pool(hs);
    let fl = b.flatten(gp);
    let fc = b.linear("fc", fl, 64, true);
    let m = randomised(graph_model(b.finish(fc), 64), 2);
    let x = random(3, &[8, 3, 8, 8], 1.0);
    let (equal, total, worst) = executor_against_simulation(&m, &x, random(4, &[8, 3, 8, 8], 1.0));
    eprintln!("small graph: {equal}/{total} logit codes equal, worst {worst} step(s)");
    // Measured: 507/512 equal (the others on a rounding boundary, one step apart).
    assert!(equal * 100 >= total * 98, "small graph: {equal}/{total}");
    assert!(worst <= 1);
    // Whole networks: a value on a rounding boundary may land one code apart (float sums
    // against integer sums, the float bias against the i32 one) and the difference carries
    // through the later layers; measured on 16 images: 55/80, 58/80 and 73/80 logit codes
    // equal, never more than one step apart.
    for (arch, width) in [
        ("mobilenet_v2", 0.25),
        ("shufflenet_v2", 0.5),
        ("mobilenet_v3_small", 0.5),
    ] {
        let m = model(arch, width, 11);
        let x = random(3, &[16, 3, 32, 32], 1.0);
        let (equal, total, worst) =
            executor_against_simulation(&m, &x, random(4, &[8, 3, 32, 32], 1.0));
        eprintln!("{arch}: {equal}/{total} logit codes equal, worst {worst} step(s)");
        assert!(equal * 2 >= total, "{arch}: {equal}/{total}");
        assert!(worst <= 1, "{arch}: worst {worst}");
    }
}

/// The QAT step of a small graph (conv, frozen batch norm, ReLU, conv, add, global pool,
/// linear) against Candle autograd on the same computation written out with straight-through
/// fake quantization: `clamp(x) + (fq(x) - clamp(x)).detach()`, weights fake-quantized as
/// the step does.
#[test]
fn qat_step_gradients_equal_candle_autograd_with_straight_through_fake_quantization() {
    let mut b = GraphBuilder::new(3);
    let c1 = b.conv("c1", GraphBuilder::INPUT, 4, 3, 1, 1, 1, false);
    let bn = b.batch_norm("bn1", c1, 1e-5, 0.1);
    let r = b.act(Activation::Relu, bn);
    let c2 = b.conv("c2", r, 4, 3, 1, 1, 1, true);
    let add = b.add(c2, r);
    let gp = b.global_avg_pool(add);
    let fl = b.flatten(gp);
    let fc = b.linear("fc", fl, 3, true);
    let graph = b.finish(fc);
    let mut m = graph_model(graph, 3);
    m.weights
        .insert(
            "bn1.running_var",
            &Tensor::new(&[0.5f32, 1.5, 0.8, 2.0], &Device::Cpu).unwrap(),
        )
        .unwrap();
    m.weights
        .insert(
            "bn1.running_mean",
            &Tensor::new(&[0.1f32, -0.2, 0.0, 0.3], &Device::Cpu).unwrap(),
        )
        .unwrap();
    let xb = random(9, &[2, 3, 6, 6], 1.0);
    // Calibrate on a narrower batch so that the step's batch is clipped in places.
    let calib = random(10, &[2, 3, 6, 6], 0.6);
    let qat = Qat::calibrate(&m, [Ok(calib)], frozen_config(), |_| {}).unwrap();
    let fq = qat.fake_quant(&m, 0).unwrap();
    let labels = [0u32, 2];
    let out = train_step_quantized(
        &m.graph,
        &m.weights,
        &xb,
        &labels,
        &Objective::labels(0.0),
        1,
        &fq,
    )
    .unwrap()
    .unwrap();

    // The same computation in Candle ops with autograd.
    let fq_of = |id: usize| fq.outputs[id].expect("fake-quantized");
    let ste = |t: &Tensor, q: QParams| -> Tensor {
        let (lo, hi) = (
            q.scale * (-(q.zero_point as f32) - 0.5),
            q.scale * (255.0 - q.zero_point as f32 + 0.5),
        );
        let clipped = t.clamp(lo, hi).unwrap();
        let quant: Vec<f32> = values(t)
            .iter()
            .map(|&v| q.dequantize(q.quantize(v)))
            .collect();
        let quant = Tensor::from_vec(quant, t.dims(), &Device::Cpu).unwrap();
        (&clipped + (quant - &clipped).unwrap().detach()).unwrap()
    };
    let var = |name: &str| Var::from_tensor(&m.weights.get(name).unwrap()).unwrap();
    let w_fq = |name: &str| {
        let w = m.weights.get(name).unwrap();
        let qv = Tensor::from_vec(fq.weights[name].clone(), w.dims(), &Device::Cpu).unwrap();
        let v = Var::from_tensor(&w).unwrap();
        // Straight through: the value of the fake-quantized weight, the float weight's gradient.
        let t = (v.as_tensor() + (qv - v.as_tensor()).unwrap().detach()).unwrap();
        (v, t)
    };
    let (w1, w1q) = w_fq("c1.weight");
    let (w2, w2q) = w_fq("c2.weight");
    let (wf, wfq) = w_fq("fc.weight");
    let (gamma, beta, b2, bf) = (
        var("bn1.weight"),
        var("bn1.bias"),
        var("c2.bias"),
        var("fc.bias"),
    );
    let xin = ste(&xb, fq_of(0));
    let y1 = xin.conv2d(&w1q, 1, 1, 1, 1).unwrap();
    let mean = m
        .weights
        .get("bn1.running_mean")
        .unwrap()
        .reshape((1, 4, 1, 1))
        .unwrap();
    let inv = (m.weights.get("bn1.running_var").unwrap() + 1e-5)
        .unwrap()
        .sqrt()
        .unwrap()
        .recip()
        .unwrap()
        .reshape((1, 4, 1, 1))
        .unwrap();
    let y1 = y1
        .broadcast_sub(&mean)
        .unwrap()
        .broadcast_mul(&inv)
        .unwrap()
        .broadcast_mul(&gamma.as_tensor().reshape((1, 4, 1, 1)).unwrap())
        .unwrap()
        .broadcast_add(&beta.as_tensor().reshape((1, 4, 1, 1)).unwrap())
        .unwrap();
    let r1 = ste(&y1.relu().unwrap(), fq_of(r));
    let y2 = r1
        .conv2d(&w2q, 1, 1, 1, 1)
        .unwrap()
        .broadcast_add(&b2.as_tensor().reshape((1, 4, 1, 1)).unwrap())
        .unwrap();
    let y2 = ste(&y2, fq_of(c2));
    let s = ste(&(y2 + &r1).unwrap(), fq_of(add));
    let g = ste(
        &s.mean_keepdim(3).unwrap().mean_keepdim(2).unwrap(),
        fq_of(gp),
    );
    let logits = g
        .flatten_from(1)
        .unwrap()
        .matmul(&wfq.t().unwrap())
        .unwrap()
        .broadcast_add(bf.as_tensor())
        .unwrap();
    let logits = ste(&logits, fq_of(fc));
    let label_t = Tensor::new(&labels, &Device::Cpu).unwrap();
    let loss = slimcandle::train::loss::cross_entropy(&logits, &label_t, 0.0).unwrap();
    assert!((loss.to_scalar::<f32>().unwrap() - out.loss).abs() < 1e-5);
    let grads = loss.backward().unwrap();
    for (name, v) in [
        ("c1.weight", &w1),
        ("c2.weight", &w2),
        ("fc.weight", &wf),
        ("bn1.weight", &gamma),
        ("bn1.bias", &beta),
        ("c2.bias", &b2),
        ("fc.bias", &bf),
    ] {
        let want = values(grads.get(v.as_tensor()).unwrap());
        let got = values(&out.grads[name]);
        let scale = want.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        assert!(err <= 1e-4 * scale, "{name}: error {err} of {scale}");
    }
}

/// A float checkpoint to fine-tune: one quick epoch on the generated shapes.
fn float_checkpoint(dir: &std::path::Path) -> std::path::PathBuf {
    let run = dir.join("float");
    let o = slimcandle(&[
        "train",
        "--arch",
        "mobilenet_v2",
        "--width",
        "0.25",
        "--stem",
        "cifar",
        "--data",
        "shapes",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--train-limit",
        "96",
        "--test-limit",
        "32",
        "-o",
        s(&run),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    run.join("best.safetensors")
}

#[test]
fn a_short_qat_run_saves_an_int8_checkpoint_the_engine_runs_as_the_simulation() {
    let dir = common::temp_dir("qat-run");
    let init = float_checkpoint(&dir);
    for (name, extra) in [
        ("qat", vec![]),
        ("qat-kd", vec!["--teacher", s(&init), "--kd-alpha", "0.5"]),
        // Mixed precision: the first conv and the classifier stay float.
        (
            "qat-mixed",
            vec!["--keep-float", "features.0.*,classifier.*"],
        ),
    ] {
        let run = dir.join(name);
        let mut args = vec![
            "train",
            "--init",
            s(&init),
            "--qat",
            "--calibration",
            "32",
            "--calibrator",
            "minmax",
            "--freeze-bn-epoch",
            "1",
            "--freeze-observers-epoch",
            "1",
            "--data",
            "shapes",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--train-limit",
            "48",
            "--test-limit",
            "32",
            "--json",
            "-o",
            s(&run),
        ];
        args.extend(extra);
        let o = slimcandle(&args);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let config = std::fs::read_to_string(run.join("config.json")).unwrap();
        assert!(config.contains("\"freeze_bn_epoch\": 1"), "{config}");
        let AnyModel::Int8(q) = checkpoint::load_any(&run.join("best.safetensors")).unwrap() else {
            panic!("{name}: the QAT checkpoint is not int8");
        };
        assert!(
            q.meta
                .provenance
                .history
                .iter()
                .any(|h| h.contains("quantization-aware"))
        );
        // The scheme entry says the weights come from QAT, not from its calibrator alone.
        // (`best` is the better of the two epochs; `last` has both behind it.)
        let info = q.scheme.qat.as_ref().expect("QAT recorded in the scheme");
        assert!((1..=2).contains(&info.epochs), "{name}: {info:?}");
        assert_eq!(info.freeze_bn_epoch, Some(1));
        let AnyModel::Int8(last) = checkpoint::load_any(&run.join("last.safetensors")).unwrap()
        else {
            panic!("{name}: the last QAT checkpoint is not int8");
        };
        assert_eq!(
            last.scheme.qat.as_ref().map(|i| i.epochs),
            Some(2),
            "{name}"
        );
        if name == "qat-mixed" {
            let float: Vec<&String> = q.float_layers.keys().collect();
            assert_eq!(float, ["classifier.1", "features.0.0"], "{name}");
            assert!(!q.layers.contains_key("features.0.0"));
        } else {
            assert!(q.float_layers.is_empty(), "{name}");
        }
        let x = random(5, &[3, 3, 32, 32], 1.0);
        let sim = values(&simulate(&q, &x).unwrap());
        let engine = values(&slimcandle::passes::quant::forward(&q, &x).unwrap());
        match q.activations[q.graph.output] {
            Some(output) => {
                let exact = sim.iter().zip(&engine).filter(|(a, b)| a == b).count();
                assert!(
                    exact * 1000 >= sim.len() * 999,
                    "{name}: {exact}/{}",
                    sim.len()
                );
                for (a, b) in sim.iter().zip(&engine) {
                    assert!((a - b).abs() <= output.scale * 1.001, "{name}: {a} vs {b}");
                }
            }
            // Float logits (the classifier kept in float): the same float layer on the same
            // input codes, summed in another order.
            None => {
                for (a, b) in sim.iter().zip(&engine) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                        "{name}: {a} vs {b}"
                    );
                }
            }
        }
        // The int8 file evaluates through `eval` like a PTQ one.
        let o = slimcandle(&[
            "eval",
            s(&run.join("last.safetensors")),
            "--data",
            "shapes",
            "--test-limit",
            "16",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
}

#[test]
fn bad_qat_input_is_one_line_and_leaves_no_run() {
    let dir = common::temp_dir("qat-bad");
    let init = float_checkpoint(&dir);
    // An int8 checkpoint to refuse as --init.
    let int8 = dir.join("int8.safetensors");
    let o = slimcandle(&[
        "quantize",
        s(&init),
        "--data",
        "shapes",
        "--calibration",
        "16",
        "--test-limit",
        "8",
        "-o",
        s(&int8),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.join("run");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--arch", "mobilenet_v2", "--qat"],
            "--qat fine-tunes a trained float model",
        ),
        (vec!["--init", s(&int8), "--qat"], "is an int8 checkpoint"),
        (
            vec!["--init", s(&init), "--qat", "--freeze-bn-epoch", "3"],
            "--freeze-bn-epoch 3: out of range",
        ),
        (
            vec!["--init", s(&init), "--qat", "--freeze-observers-epoch", "2"],
            "--freeze-observers-epoch 2: out of range",
        ),
        (
            vec!["--init", s(&init), "--freeze-bn-epoch", "0"],
            "--freeze-bn-epoch only applies to quantization-aware training",
        ),
        (
            vec!["--init", s(&init), "--keep-float", "classifier.*"],
            "--keep-float only applies to quantization-aware training",
        ),
        (
            vec!["--init", s(&init), "--qat", "--keep-float", "no.such.layer"],
            "--keep-float: pattern `no.such.layer` matches no conv or linear layer",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["train", "--data", "shapes", "--epochs", "2", "-o", s(&out)];
        args.extend(extra.iter().copied());
        let o = slimcandle(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} left a run folder");
    }
    // A count out of its range is a usage error (clap's, exit 2), also before any work.
    let init_arg = s(&init);
    let o = slimcandle(&[
        "train",
        "--data",
        "shapes",
        "--epochs",
        "2",
        "-o",
        s(&out),
        "--init",
        init_arg,
        "--qat",
        "--calibration",
        "0",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("'--calibration <N>': must be at least 1"),
        "{err}"
    );
    assert!(!out.exists(), "--calibration 0 left a run folder");
}
