//! Knowledge distillation end to end: the train-step executor's distillation gradient against
//! the Candle autograd path on a whole model; alpha 0 equal to the plain step bit for bit on
//! both paths; feature hints (with and without a learned adapter) against autograd; a short
//! run whose teacher is another architecture (config, metrics, provenance, exact resume, a
//! changed teacher refused); a narrower student than its teacher through an adapter (the hint
//! falls, no adapter in the checkpoints, exact resume); bad teachers and flags refused before
//! any step; `bench --teacher`.

mod common;

use candle_core::{Device, Tensor};
use common::{s, scaled_error, slimcandle, stderr};
use sha2::{Digest, Sha256};
use slimcandle::checkpoint;
use slimcandle::data::{DataSpec, LoadOptions};
use slimcandle::exec::forward_train;
use slimcandle::model::{Model, Preprocessing};
use slimcandle::models::{ArchOptions, ArchSpec, Stem};
use slimcandle::rng::Rng;
use slimcandle::train::KdWeights;
use slimcandle::train::adapter::{Adapter, AdapterSpec};
use slimcandle::train::feature_kd::{HintLoss, hint_loss, truncated};
use slimcandle::train::loss::{cross_entropy, distillation_loss};
use slimcandle::train::step::{HintTarget, Objective, train_step, train_step_with};
use std::path::Path;

fn model(arch: &str, width: f64, classes: usize, seed: u64) -> Model {
    let opts = ArchOptions {
        width: Some(width),
        num_classes: Some(classes),
        stem: Some(Stem::Cifar),
        ..Default::default()
    };
    Model::init(&ArchSpec::parse(arch, &opts).unwrap(), seed).unwrap()
}

fn random(seed: u64, dims: &[usize], scale: f64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.normal() * scale) as f32).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    values(t).iter().map(|v| v.to_bits()).collect()
}

const SEED: u64 = 7;
const SMOOTHING: f64 = 0.1;

/// The Candle autograd path's loss and parameter gradients, by name, sorted.
fn autograd(
    m: &Model,
    x: &Tensor,
    labels: &[u32],
    teacher: Option<(&Tensor, KdWeights)>,
) -> (f32, Vec<(String, Tensor)>) {
    let label_t = Tensor::new(labels, &Device::Cpu).unwrap();
    let logits = forward_train(&m.graph, &m.weights, x, SEED).unwrap();
    let loss = match teacher {
        Some((t, kd)) => {
            distillation_loss(&logits, t, &label_t, SMOOTHING, kd)
                .unwrap()
                .total
        }
        None => cross_entropy(&logits, &label_t, SMOOTHING).unwrap(),
    };
    let store = loss.backward().unwrap();
    let mut grads: Vec<(String, Tensor)> = m
        .weights
        .trainable(&m.graph)
        .into_iter()
        .filter_map(|(name, _, var)| store.get(var.as_tensor()).map(|g| (name, g.clone())))
        .collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    (loss.to_scalar::<f32>().unwrap(), grads)
}

/// The executor's loss and parameter gradients, by name, sorted.
fn executor(
    m: &Model,
    x: &Tensor,
    labels: &[u32],
    teacher: Option<(&[f32], KdWeights)>,
) -> (f32, Vec<(String, Tensor)>) {
    let objective = Objective {
        smoothing: SMOOTHING,
        teacher,
        hints: None,
    };
    let out = train_step_with(&m.graph, &m.weights, x, labels, &objective, SEED)
        .unwrap()
        .expect("f32 CPU tensors run the executor");
    assert_eq!(out.parts.is_some(), teacher.is_some());
    let mut grads: Vec<(String, Tensor)> = out.grads.into_iter().collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    (out.loss, grads)
}

#[test]
fn executor_distillation_gradient_matches_autograd() {
    let (n, size, classes) = (6, 16, 7);
    let x = random(1, &[n, 3, size, size], 1.0);
    let labels: Vec<u32> = (0..n as u32).map(|i| i * 3 % classes as u32).collect();
    let teacher = random(2, &[n, classes], 3.0);
    let t_values = values(&teacher);
    for (alpha, temperature) in [(0.5, 1.0), (0.9, 4.0), (1.0, 4.0)] {
        let kd = KdWeights { alpha, temperature };
        // A fresh model per path: both update the running statistics (dropout active, the
        // same seed on both sides).
        let (loss_a, grads_a) = autograd(
            &model("mobilenet_v2", 0.25, classes, 3),
            &x,
            &labels,
            Some((&teacher, kd)),
        );
        let (loss_e, grads_e) = executor(
            &model("mobilenet_v2", 0.25, classes, 3),
            &x,
            &labels,
            Some((&t_values, kd)),
        );
        assert!(
            (loss_a - loss_e).abs() <= 1e-5 * loss_a.abs().max(1.0),
            "{kd:?}: loss {loss_a} vs {loss_e}"
        );
        assert_eq!(grads_a.len(), grads_e.len());
        let global = grads_a
            .iter()
            .flat_map(|(_, g)| values(g))
            .fold(0f32, |m, v| m.max(v.abs())) as f64;
        for ((name, a), (name_e, e)) in grads_a.iter().zip(&grads_e) {
            assert_eq!(name, name_e);
            let err = scaled_error(e, a, 1e-3 * global);
            assert!(err < 1e-4, "{kd:?} {name}: scaled error {err:.2e}");
        }
    }
}

#[test]
fn alpha_zero_is_the_plain_step_bit_for_bit_on_both_paths() {
    let (n, size, classes) = (4, 16, 5);
    let x = random(3, &[n, 3, size, size], 1.0);
    let labels = [0u32, 4, 2, 1];
    let teacher = random(4, &[n, classes], 2.0);
    let kd = KdWeights {
        alpha: 0.0,
        temperature: 4.0,
    };
    let fresh = || model("shufflenet_v2", 0.5, classes, 9);

    let m = fresh();
    let plain = train_step(&m.graph, &m.weights, &x, &labels, SMOOTHING, SEED)
        .unwrap()
        .unwrap();
    let (loss, grads) = executor(&fresh(), &x, &labels, Some((&values(&teacher), kd)));
    assert_eq!(loss.to_bits(), plain.loss.to_bits());
    for (name, g) in &grads {
        assert_eq!(bits(g), bits(&plain.grads[name]), "executor {name}");
    }

    let (loss_ce, grads_ce) = autograd(&fresh(), &x, &labels, None);
    let (loss_kd, grads_kd) = autograd(&fresh(), &x, &labels, Some((&teacher, kd)));
    assert_eq!(loss_ce.to_bits(), loss_kd.to_bits());
    for ((name, a), (_, b)) in grads_ce.iter().zip(&grads_kd) {
        assert_eq!(bits(a), bits(b), "autograd {name}");
    }
}

/// Feature hints in the executor against Candle autograd: the tap's value comes from the
/// same weights through the truncated graph (same node ids, so the same dropout masks), the
/// hint's gradient flows back from the tap through the rest of the network. The taps are a
/// batch norm whose ReLU the executor would otherwise fuse, and a block output. The third
/// case is an `mse` hint against a teacher map with more channels, through a learned adapter
/// (on the autograd side its graph, run by `forward_train`): the student's gradients and the
/// adapter's own are both checked.
#[test]
fn feature_hint_gradients_match_autograd() {
    let (n, size, classes) = (4, 16, 5);
    let x = random(5, &[n, 3, size, size], 1.0);
    let labels = [0u32, 4, 2, 1];
    let fresh = || model("shufflenet_v2", 0.5, classes, 4);
    let m = fresh();
    let dims = m.graph.infer_shapes(size, size).unwrap();
    let id = |name: &str| m.graph.nodes.iter().position(|nd| nd.name == name).unwrap();
    let bn = id("stage2.0.branch2.1");
    let block = m.graph.nodes[id("stage3.0.branch1.0")].inputs[0];
    for (loss, taps, extra_channels, weight) in [
        (HintLoss::Mse, vec![bn], 0, 3.0),
        (HintLoss::At, vec![bn, block], 3, 500.0),
        (HintLoss::Mse, vec![bn], 5, 3.0),
    ] {
        let adapter = (extra_channels > 0 && loss == HintLoss::Mse).then(|| {
            let spec = AdapterSpec {
                student_channels: dims[bn].c,
                teacher_channels: dims[bn].c + extra_channels,
            };
            Adapter::new(spec, 17).unwrap()
        });
        let maps: Vec<Tensor> = taps
            .iter()
            .enumerate()
            .map(|(k, &t)| {
                let d = dims[t];
                random(10 + k as u64, &[n, d.c + extra_channels, d.h, d.w], 1.0)
            })
            .collect();
        let map_values: Vec<Vec<f32>> = maps.iter().map(values).collect();
        let targets: Vec<HintTarget> = taps
            .iter()
            .zip(&map_values)
            .map(|(&node, map)| HintTarget {
                node,
                teacher: map,
                channels: dims[node].c + extra_channels,
                weight,
                adapter: adapter.as_ref(),
            })
            .collect();
        let objective = Objective {
            smoothing: SMOOTHING,
            teacher: None,
            hints: Some((&targets, loss)),
        };
        let m = fresh();
        let out = train_step_with(&m.graph, &m.weights, &x, &labels, &objective, SEED)
            .unwrap()
            .unwrap();

        let m = fresh();
        let label_t = Tensor::new(&labels, &Device::Cpu).unwrap();
        let logits = forward_train(&m.graph, &m.weights, &x, SEED).unwrap();
        let mut total = cross_entropy(&logits, &label_t, SMOOTHING).unwrap();
        let mut hints = 0f32;
        for (&t, map) in taps.iter().zip(&maps) {
            let mut value = forward_train(&truncated(&m.graph, t), &m.weights, &x, SEED).unwrap();
            if let Some(a) = &adapter {
                value = forward_train(&a.graph, &a.weights, &value, SEED).unwrap();
            }
            let h = hint_loss(loss, &value, map, weight).unwrap();
            hints += h.to_scalar::<f32>().unwrap();
            total = (total + h).unwrap();
        }
        let want = total.to_scalar::<f32>().unwrap();
        assert!(
            (out.loss - want).abs() < 1e-5 * want,
            "{loss:?}: {} vs {want}",
            out.loss
        );
        assert!((out.hint.unwrap() as f32 - hints).abs() < 1e-5 * hints.max(1e-3));
        let store = total.backward().unwrap();
        let reference: Vec<(String, Tensor)> = m
            .weights
            .trainable(&m.graph)
            .into_iter()
            .filter_map(|(name, _, v)| store.get(v.as_tensor()).map(|g| (name, g.clone())))
            .collect();
        assert_eq!(reference.len(), out.grads.len());
        let global = reference
            .iter()
            .flat_map(|(_, g)| values(g))
            .fold(0f32, |a, v| a.max(v.abs())) as f64;
        for (name, want) in &reference {
            let err = scaled_error(&out.grads[name], want, 1e-3 * global);
            assert!(err < 1e-4, "{loss:?} {name}: scaled error {err:.2e}");
        }
        assert_eq!(out.adapter_grads.len(), taps.len());
        match &adapter {
            Some(a) => {
                let got = out.adapter_grads[0]
                    .as_ref()
                    .expect("the adapter's gradients");
                let trainable = a.weights.trainable(&a.graph);
                assert_eq!(got.len(), trainable.len());
                for (name, _, var) in trainable {
                    let want = store.get(var.as_tensor()).unwrap();
                    let top = values(want).iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                    let err = scaled_error(&got[&name], want, 1e-3 * top);
                    assert!(err < 1e-4, "adapter {name}: scaled error {err:.2e}");
                }
            }
            None => assert!(out.adapter_grads.iter().all(Option::is_none)),
        }
    }
}

const SIZE: usize = 32;

/// A teacher checkpoint for the `shapes` data at 32x32 (random weights: the mechanics do not
/// need a good teacher), with ImageNet normalisation, so that the student's batches are
/// renormalised for it.
fn write_teacher(path: &Path, classes: usize, seed: u64, edit: impl FnOnce(&mut Model)) {
    let data = DataSpec::Shapes
        .load(&LoadOptions {
            size: SIZE,
            train_limit: Some(20),
            test_limit: Some(10),
            seed: 0,
            ..Default::default()
        })
        .unwrap();
    let mut m = model("mobilenet_v2", 0.25, classes, seed);
    if classes == data.class_names.len() {
        m.meta.class_names = data.class_names.clone();
    }
    m.meta.preprocessing = Preprocessing::for_stem(Stem::Cifar);
    edit(&mut m);
    checkpoint::save(&m, path).unwrap();
}

fn train_args<'a>(teacher: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--threads",
        "2",
        "train",
        "--arch",
        "shufflenet_v2",
        "--width",
        "0.5",
        "--stem",
        "cifar",
        "--data",
        "shapes",
        "--train-limit",
        "64",
        "--test-limit",
        "20",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "0.05",
        "--label-smoothing",
        "0.1",
        "--teacher",
        teacher,
        "-o",
        out,
    ];
    // The run's own weights and taps unless the caller gives some.
    if !extra.iter().any(|a| a.starts_with("--kd-")) {
        args.extend_from_slice(&["--kd-alpha", "0.7", "--kd-temperature", "3"]);
    }
    if !extra.iter().any(|a| a.starts_with("--feature-kd")) {
        args.extend_from_slice(&[
            "--feature-kd",
            "stage2.0.branch2.6:features.3.conv.1.1",
            "--feature-kd-loss",
            "at",
        ]);
    }
    args.extend_from_slice(extra);
    args
}

fn sha256_hex(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn weights_of(path: &Path) -> Vec<(String, Vec<u32>)> {
    let m = checkpoint::load(path).unwrap();
    let mut out: Vec<(String, Vec<u32>)> = m
        .weights
        .tensors()
        .map(|(n, t)| (n.to_string(), bits(t)))
        .collect();
    out.sort();
    out
}

/// A run folder's `config.json`.
fn run_config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// A run folder's `metrics.jsonl`, one value per epoch.
fn run_metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The run of `train_args(teacher, .., extra)` stopped after 3 steps into `parts` and
/// resumed there ends exactly as the uninterrupted run in `full`: the same weights bit for
/// bit and the same metrics, timings aside.
fn assert_resumes_exactly(teacher: &Path, full: &Path, parts: &Path, extra: &[&str]) {
    let mut stop = extra.to_vec();
    stop.extend_from_slice(&["--stop-after-steps", "3"]);
    let o = slimcandle(&train_args(s(teacher), s(parts), &stop));
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let o = slimcandle(&["--threads", "2", "train", "--resume", s(parts)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        weights_of(&full.join("last.safetensors")),
        weights_of(&parts.join("last.safetensors"))
    );
    let untimed = |dir: &Path| -> Vec<serde_json::Value> {
        let mut metrics = run_metrics(dir);
        for v in &mut metrics {
            for k in ["images_per_s", "seconds"] {
                v.as_object_mut().unwrap().remove(k);
            }
        }
        metrics
    };
    assert_eq!(untimed(full), untimed(parts));
}

#[test]
fn distils_from_another_architecture_records_the_teacher_and_resumes_exactly() {
    let dir = common::temp_dir("distill-run");
    let teacher = dir.join("teacher.safetensors");
    write_teacher(&teacher, 10, 5, |_| {});
    let (full, parts) = (dir.join("full"), dir.join("parts"));

    let o = slimcandle(&train_args(s(&teacher), s(&full), &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("distilling from teacher"),
        "{}",
        stderr(&o)
    );

    // config.json records the teacher: absolute path, hash, architecture, test top-1.
    let config = run_config(&full);
    let d = &config["distill"];
    assert_eq!(d["alpha"], 0.7);
    assert_eq!(d["temperature"], 3.0);
    assert_eq!(d["feature_loss"], "at");
    assert_eq!(d["features"][0]["student"], "stage2.0.branch2.6");
    assert_eq!(d["features"][0]["teacher"], "features.3.conv.1.1");
    assert_eq!(d["features"][0]["weight"], 500.0);
    assert_eq!(d["teacher"]["sha256"], sha256_hex(&teacher));
    assert_eq!(d["teacher"]["arch"], "mobilenet_v2_w0_25");
    assert_eq!(
        Path::new(d["teacher"]["path"].as_str().unwrap()),
        std::fs::canonicalize(&teacher).unwrap()
    );
    let top1 = d["teacher"]["test_top1"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&top1));

    // Each epoch reports the parts; the loss is their weighted sum plus the hints (each
    // step's total is rounded to f32, the parts are not).
    let metrics = run_metrics(&full);
    assert_eq!(metrics.len(), 2);
    for m in &metrics {
        let (ce, kd) = (
            m["train_ce"].as_f64().unwrap(),
            m["train_kd"].as_f64().unwrap(),
        );
        let hint = m["train_hint"].as_f64().unwrap();
        let total = m["train_loss"].as_f64().unwrap();
        assert!(ce > 0.0 && kd >= 0.0 && hint > 0.0);
        assert!(
            (total - (0.3 * ce + 0.7 * kd + hint)).abs() < 1e-5 * total,
            "{m}"
        );
        assert!(m["test_top1"].as_f64().is_some());
    }

    // The saved student says where it was distilled from.
    let best = checkpoint::load(&full.join("best.safetensors")).unwrap();
    let history = best.meta.provenance.history.join("\n");
    assert!(
        history.contains("knowledge distillation from teacher")
            && history.contains(&sha256_hex(&teacher)),
        "{history}"
    );

    // Interrupted and resumed: the same teacher, and exactly the uninterrupted result.
    assert_resumes_exactly(&teacher, &full, &parts, &[]);

    // A teacher that changed since the run started is refused on resume, as is a missing one.
    write_teacher(&teacher, 10, 6, |_| {});
    let o = slimcandle(&["train", "--resume", s(&parts)]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("changed since the run started"), "{err}");
    std::fs::remove_file(&teacher).unwrap();
    let o = slimcandle(&["train", "--resume", s(&parts)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("teacher.safetensors"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A student narrower than its teacher at the tap (24 against 48 channels): the default `mse`
/// hint goes through a learned adapter, which the run reports, records, trains (the hint
/// falls from the first epoch to the second), keeps in the resume state and leaves out of the
/// saved checkpoints; an interrupted and resumed run equals the uninterrupted one bit for bit.
#[test]
fn mse_hint_through_an_adapter_trains_drops_and_resumes_exactly() {
    let dir = common::temp_dir("distill-adapter");
    let teacher = dir.join("teacher.safetensors");
    write_teacher(&teacher, 10, 5, |_| {});
    let (full, parts) = (dir.join("full"), dir.join("parts"));
    let tap = ["--feature-kd", "stage2.0.branch2.6:features.3.conv.1.1"];

    let o = slimcandle(&train_args(s(&teacher), s(&full), &tap));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(
            "feature hint (Mse): student `stage2.0.branch2.6` (24 ch) against teacher `features.3.conv.1.1` (48 ch) through a learned 1x1 conv + batch-norm adapter"
        ),
        "{}",
        stderr(&o)
    );
    let config = run_config(&full);
    let d = &config["distill"];
    assert_eq!(d["feature_loss"], "mse");
    assert_eq!(
        d["features"][0]["adapter"],
        serde_json::json!({"student_channels": 24, "teacher_channels": 48})
    );

    let hints: Vec<f64> = run_metrics(&full)
        .iter()
        .map(|v| v["train_hint"].as_f64().unwrap())
        .collect();
    assert_eq!(hints.len(), 2);
    assert!(hints[1] < hints[0], "the hint did not fall: {hints:?}");

    // The checkpoints hold the student alone; the resume state holds the adapter.
    let student_names: Vec<String> = model("shufflenet_v2", 0.5, 10, 0)
        .weights
        .names()
        .map(String::from)
        .collect();
    for file in ["last.safetensors", "best.safetensors"] {
        let path = full.join(file);
        let (m, extras) = checkpoint::load_with_extra_prefixes(&path, &["adapter"]).unwrap();
        assert!(
            extras.tensors.is_empty(),
            "{file}: {:?}",
            extras.tensors.keys()
        );
        let names: Vec<String> = m.weights.names().map(String::from).collect();
        assert_eq!(names, student_names, "{file}");
        let history = m.meta.provenance.history.join("\n");
        assert!(history.contains("adapter, 24 to 48 channels"), "{history}");
    }
    let (_, extras) = checkpoint::load_with_extra_prefixes(
        &full.join("resume.safetensors"),
        &["adapter.", "optimizer."],
    )
    .unwrap();
    for name in [
        "adapter.0.conv.weight",
        "adapter.0.bn.weight",
        "adapter.0.bn.bias",
        "adapter.0.optimizer.m.conv.weight",
    ] {
        assert!(
            extras.tensors.contains_key(name),
            "{name} not in the resume state"
        );
    }
    assert_eq!(
        extras.tensors["adapter.0.conv.weight"].dims(),
        [48, 24, 1, 1]
    );

    // Interrupted mid-epoch and resumed: exactly the uninterrupted run.
    assert_resumes_exactly(&teacher, &full, &parts, &tap);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_teachers_and_settings_are_refused_before_any_step() {
    let dir = common::temp_dir("distill-bad");
    let good = dir.join("good.safetensors");
    write_teacher(&good, 10, 1, |_| {});
    let out = dir.join("run");
    let refused = |teacher: &Path, extra: &[&str], code: i32, wants: &[&str]| {
        let o = slimcandle(&train_args(s(teacher), s(&out), extra));
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{extra:?}: {err}");
        for w in wants {
            assert!(err.contains(w), "{extra:?}: `{w}` not in: {err}");
        }
        if code == 1 {
            assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        }
        assert!(!out.join("config.json").exists(), "no run folder written");
    };

    refused(
        &dir.join("missing.safetensors"),
        &[],
        1,
        &["--teacher", "missing.safetensors"],
    );
    let corrupt = dir.join("corrupt.safetensors");
    std::fs::write(&corrupt, b"definitely not a checkpoint").unwrap();
    refused(&corrupt, &[], 1, &["--teacher", "corrupt.safetensors"]);

    let seven = dir.join("seven.safetensors");
    write_teacher(&seven, 7, 1, |_| {});
    refused(&seven, &[], 1, &["--teacher", "has 7 classes"]);

    let renamed = dir.join("renamed.safetensors");
    write_teacher(&renamed, 10, 1, |m| {
        m.meta.class_names = (0..10).map(|i| format!("thing{i}")).collect();
    });
    refused(&renamed, &[], 1, &["--teacher", "class 0 is `thing0`"]);

    let large = dir.join("large.safetensors");
    write_teacher(&large, 10, 1, |m| {
        m.meta.preprocessing = Preprocessing::for_stem(Stem::Imagenet);
    });
    refused(&large, &[], 1, &["--teacher", "takes 224x224"]);

    refused(&good, &["--kd-alpha", "1.5"], 2, &["--kd-alpha", "[0, 1]"]);
    refused(
        &good,
        &["--feature-kd", "stage2.0.branch2.7:features.3.conv.1.1"],
        1,
        &[
            "--feature-kd",
            "no node `stage2.0.branch2.7`",
            "`stage2.0.branch2.0`",
        ],
    );
    refused(
        &good,
        &["--feature-kd", "stage2.0.branch2.6:features.3.conv.1.x"],
        1,
        &["the teacher has no node `features.3.conv.1.x`"],
    );
    refused(
        &good,
        &[
            "--feature-kd",
            "stage2.0.branch2.6:features.5.conv.1.1",
            "--feature-kd-loss",
            "at",
        ],
        1,
        &["16x16 but the teacher's is 8x8"],
    );
    // The mse hint's adapter maps channels, not sizes.
    refused(
        &good,
        &["--feature-kd", "stage2.0.branch2.6:features.5.conv.1.1"],
        1,
        &["16x16 but the teacher's is 8x8"],
    );
    refused(
        &good,
        &["--feature-kd", "a:b:-2"],
        2,
        &["--feature-kd `a:b:-2`"],
    );
    refused(&good, &["--kd-temperature", "0"], 2, &["--kd-temperature"]);

    // A resumed run keeps its own teacher: usage error.
    let o = slimcandle(&["train", "--resume", s(&out), "--teacher", s(&good)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--teacher"), "{}", stderr(&o));

    // The distillation flags need a teacher.
    let o = slimcandle(&[
        "train",
        "--arch",
        "shufflenet_v2",
        "--stem",
        "cifar",
        "--kd-alpha",
        "0.5",
        "-o",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--kd-alpha only applies to distillation"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_times_distillation_steps() {
    let dir = common::temp_dir("distill-bench");
    let teacher = dir.join("teacher.safetensors");
    write_teacher(&teacher, 10, 2, |_| {});
    let out = common::ok(&[
        "--threads",
        "2",
        "bench",
        "--arch",
        "shufflenet_v2",
        "--width",
        "0.5",
        "--stem",
        "cifar",
        "--batch",
        "8",
        "--warmup",
        "1",
        "--iterations",
        "1",
        "--teacher",
        s(&teacher),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["images_per_s"].as_f64().unwrap() > 0.0);
    assert!(
        v["teacher"]
            .as_str()
            .unwrap()
            .ends_with("teacher.safetensors")
    );
    let o = slimcandle(&[
        "bench",
        "--arch",
        "shufflenet_v2",
        "--mode",
        "infer",
        "--teacher",
        s(&teacher),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--teacher only applies to --mode train"));
    let _ = std::fs::remove_dir_all(&dir);
}
