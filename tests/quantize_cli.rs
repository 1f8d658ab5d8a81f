//! `slimcandle quantize` end to end on the built-in `shapes` data, and its errors (one line,
//! exit 1, or 2 for what the argument parser refuses, and no output file).

mod common;

use candle_core::{Device, Tensor};
use common::{ok, s, slimcandle, stderr};
use serde_json::Value;
use slimcandle::checkpoint::{self, AnyModel};
use slimcandle::model::Model;
use slimcandle::models::{ArchOptions, ArchSpec, Stem};
use slimcandle::passes::quant;
use slimcandle::tensor_file::{RawTensor, TensorFile, write_atomic};
use std::path::{Path, PathBuf};

fn small_checkpoint(dir: &Path) -> PathBuf {
    let spec = ArchSpec::parse(
        "shufflenet_v2",
        &ArchOptions {
            width: Some(0.5),
            num_classes: Some(10),
            stem: Some(Stem::Cifar),
            ..Default::default()
        },
    )
    .unwrap();
    let path = dir.join("small.safetensors");
    checkpoint::save(&Model::init(&spec, 5).unwrap(), &path).unwrap();
    path
}

fn fails(args: &[&str], mentions: &[&str], output: &Path) {
    let o = slimcandle(args);
    let err = stderr(&o);
    let usage = err.contains("For more information, try '--help'");
    assert_eq!(
        o.status.code(),
        Some(if usage { 2 } else { 1 }),
        "{args:?}:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    if !usage {
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    for m in mentions {
        assert!(err.contains(m), "expected `{m}` in:\n{err}");
    }
    assert!(!output.exists(), "{args:?} left {}", output.display());
}

#[test]
fn quantize_writes_an_int8_checkpoint_and_reports_both_models() {
    let dir = common::temp_dir("quantize-cli");
    let ckpt = small_checkpoint(&dir);
    let out = dir.join("int8.safetensors");
    let text = ok(&[
        "quantize",
        s(&ckpt),
        "--data",
        "shapes",
        "--calibration",
        "32",
        "--calibrator",
        "minmax",
        "--test-limit",
        "20",
        "--json",
        "-o",
        s(&out),
    ]);
    let json: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["calibration_images"], 32);
    assert_eq!(json["test_images"], 20);
    assert_eq!(json["calibrator"]["method"], "minmax");
    for k in ["top1_before", "top1_after", "images_per_second_after"] {
        assert!(json[k].as_f64().is_some(), "{k}: {json}");
    }
    let ratio =
        json["file_size_after"].as_f64().unwrap() / json["file_size_before"].as_f64().unwrap();
    assert!(ratio < 0.4, "{ratio}");
    let AnyModel::Int8(q) = checkpoint::load_any(&out).unwrap() else {
        panic!("int8 output");
    };
    assert_eq!(q.scheme.calibration_images, 32);
    assert!(q.meta.provenance.source.contains("int8"));
    // Per tensor, a classifier kept in float, the text report.
    let out2 = dir.join("int8-fc.safetensors");
    let text = ok(&[
        "quantize",
        s(&ckpt),
        "--data",
        "shapes",
        "--calibration",
        "16",
        "--calibrator",
        "entropy",
        "--per-tensor",
        "--keep-float",
        "fc",
        "--test-limit",
        "10",
        "-o",
        s(&out2),
    ]);
    assert!(
        text.contains("top-1") && text.contains("file size"),
        "{text}"
    );
    let AnyModel::Int8(q) = checkpoint::load_any(&out2).unwrap() else {
        panic!("int8 output");
    };
    assert!(q.float_layers.contains_key("fc"));
    // An int8 checkpoint is inspected with dtypes and scales.
    let inspect = ok(&["inspect", s(&out2)]);
    assert!(
        inspect.contains("int8") && inspect.contains("per tensor"),
        "{inspect}"
    );
    // And evaluated through the int8 forward pass.
    let eval = ok(&["eval", s(&out), "--data", "shapes", "--test-limit", "10"]);
    assert!(eval.contains("top-1"), "{eval}");
    // `forward` runs the int8 model as passes::quant::forward does.
    let x = Tensor::from_vec(
        (0..2 * 3 * 32 * 32)
            .map(|i| ((i % 97) as f32 / 48.0) - 1.0)
            .collect::<Vec<f32>>(),
        (2, 3, 32, 32),
        &Device::Cpu,
    )
    .unwrap();
    let inputs = dir.join("inputs.safetensors");
    write_atomic(
        &inputs,
        vec![("x".to_string(), RawTensor::from_f32(&x).unwrap())],
        Default::default(),
    )
    .unwrap();
    let logits = dir.join("logits.safetensors");
    ok(&["forward", s(&out), s(&inputs), "-o", s(&logits)]);
    let got: Vec<f32> = TensorFile::read(&logits)
        .unwrap()
        .tensor_f32("x")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let AnyModel::Int8(q) = checkpoint::load_any(&out).unwrap() else {
        panic!("int8 output");
    };
    let want: Vec<f32> = quant::forward(&q, &x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got, want);

    let bad = dir.join("bad.safetensors");
    let base = ["quantize", s(&ckpt), "--data", "shapes", "-o", s(&bad)];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter()
            .map(|a| a.to_string())
            .chain(extra.iter().map(|a| a.to_string()))
            .collect()
    };
    let run = |extra: &[&'static str], mentions: &[&str]| {
        let args = with(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(&refs, mentions, &bad);
    };
    run(&["--calibration", "0"], &["--calibration", "at least 1"]);
    run(&["--keep-float", "nope.*"], &["--keep-float", "nope.*"]);
    run(&["--calibrator", "median"], &["median"]);
    run(&["--percentile", "101"], &["--percentile"]);
    fails(
        &["quantize", s(&out), "--data", "shapes", "-o", s(&bad)],
        &["int8", s(&out)],
        &bad,
    );
}

/// `sensitivity --method quantize`: one trial per conv or linear layer, ordered by the top-1
/// its float copy buys back, each trial the same model `quantize --keep-float LAYER` writes.
#[test]
fn quantization_sensitivity_keeps_one_layer_at_a_time_in_float() {
    let dir = common::temp_dir("quant-sensitivity");
    let ckpt = small_checkpoint(&dir);
    let csv = dir.join("sens.csv");
    let common_args = [
        "--data",
        "shapes",
        "--calibration",
        "64",
        "--test-limit",
        "200",
    ];
    let mut args = vec!["sensitivity", s(&ckpt), "--method", "quantize", "--json"];
    args.extend(common_args);
    args.extend(["--csv", s(&csv)]);
    let v: Value = serde_json::from_str(&ok(&args)).unwrap();
    let trials = v["trials"].as_array().unwrap();
    let model = checkpoint::load(&ckpt).unwrap();
    let layers = model
        .graph
        .nodes
        .iter()
        .filter(|n| n.op.has_weight_matrix())
        .count();
    assert_eq!(trials.len(), layers);
    let int8 = v["int8_top1"].as_f64().unwrap();
    let gains: Vec<f64> = trials.iter().map(|t| t["gain"].as_f64().unwrap()).collect();
    for (t, g) in trials.iter().zip(&gains) {
        assert!((t["top1"].as_f64().unwrap() - int8 - g).abs() < 1e-9);
    }
    assert!(gains.windows(2).all(|w| w[0] >= w[1]), "{gains:?}");
    let rows = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(rows.lines().count(), layers + 1);

    // The first trial is what `quantize --keep-float` gives for that layer.
    let layer = trials[0]["layer"].as_str().unwrap();
    let out = dir.join("keep.safetensors");
    let mut args = vec![
        "quantize",
        s(&ckpt),
        "--keep-float",
        layer,
        "--json",
        "-o",
        s(&out),
    ];
    args.extend(common_args);
    let q: Value = serde_json::from_str(&ok(&args)).unwrap();
    assert_eq!(q["top1_after"].as_f64(), trials[0]["top1"].as_f64());
}
