//! `slimcandle prune` and `slimcandle sensitivity` end to end on the built-in `shapes` data,
//! and their errors.

mod common;

use common::{ok, s, slimcandle, stderr};

use serde_json::Value;
use slimcandle::checkpoint;
use slimcandle::model::Model;
use slimcandle::models::{ArchOptions, ArchSpec, Stem};
use std::path::{Path, PathBuf};

/// A command that must fail cleanly with exit status `code`: 1 runtime, 2 usage.
fn fails(code: i32, args: &[&str], mentions: &[&str]) {
    let o = slimcandle(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "{args:?} should fail:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    for m in mentions {
        assert!(err.contains(m), "expected `{m}` in:\n{err}");
    }
}

/// A small MobileNet V2 for 32x32 inputs with 10 classes, saved as a checkpoint.
fn small_checkpoint(dir: &Path) -> PathBuf {
    let spec = ArchSpec::parse(
        "mobilenet_v2",
        &ArchOptions {
            width: Some(0.35),
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

#[test]
fn prune_then_fine_tune_then_inspect() {
    let dir = common::temp_dir("prune-cli");
    let ckpt = small_checkpoint(&dir);
    let out = dir.join("pruned.safetensors");
    let report: Value = serde_json::from_str(&ok(&[
        "prune",
        s(&ckpt),
        "--criterion",
        "taylor",
        "--taylor-batches",
        "2",
        "--batch-size",
        "16",
        "--target-macs",
        "0.6",
        "--data",
        "shapes",
        "--test-limit",
        "40",
        "-o",
        s(&out),
        "--json",
    ]))
    .unwrap();
    let (before, after) = (&report["before"], &report["after"]);
    let macs = after["macs"].as_f64().unwrap() / before["macs"].as_f64().unwrap();
    assert!(macs <= 0.6 && macs > 0.5, "MACs kept {macs}");
    assert!(after["params"].as_u64() < before["params"].as_u64());
    assert!(after["file_size"].as_u64() < before["file_size"].as_u64());
    assert!(report["top1_after"].is_number());
    let inspect: Value = serde_json::from_str(&ok(&["inspect", s(&out), "--json"])).unwrap();
    assert_eq!(inspect["params"], after["params"]);
    assert_eq!(inspect["macs"], after["macs"]);
    assert_eq!(
        inspect["reshaped"], true,
        "a pruned model says it differs from its arch"
    );
    let original: Value = serde_json::from_str(&ok(&["inspect", s(&ckpt), "--json"])).unwrap();
    assert_eq!(original["reshaped"], false);
    // The text report names what was kept and prints the before/after table.
    let text = ok(&[
        "prune",
        s(&ckpt),
        "--ratio",
        "0.3",
        "--scope",
        "global",
        "-o",
        s(&out),
    ]);
    assert!(
        text.contains("non-zero params") && text.contains("MACs"),
        "{text}"
    );
    // The smaller model fine-tunes like any checkpoint.
    let run = dir.join("finetune");
    ok(&[
        "train",
        "--init",
        s(&out),
        "--data",
        "shapes",
        "--train-limit",
        "64",
        "--test-limit",
        "20",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--lr",
        "0.01",
        "-o",
        s(&run),
    ]);
    let tuned = checkpoint::load(&run.join("last.safetensors")).unwrap();
    assert_eq!(tuned.graph, checkpoint::load(&out).unwrap().graph);
}

/// One-shot magnitude pruning: the requested share of the prunable weights is zero, the
/// first layer, classifier and depthwise filters are spared, and the file shrinks.
#[test]
fn magnitude_prune_zeroes_weights_and_shrinks_the_file() {
    let dir = common::temp_dir("prune-magnitude-cli");
    let ckpt = small_checkpoint(&dir);
    let out = dir.join("sparse.safetensors");
    let report: Value = serde_json::from_str(&ok(&[
        "prune",
        s(&ckpt),
        "--method",
        "magnitude",
        "--sparsity",
        "0.8",
        "-o",
        s(&out),
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["method"], "magnitude");
    let (before, after) = (&report["before"], &report["after"]);
    assert_eq!(before["params"], after["params"]);
    assert_eq!(before["macs"], after["macs"]);
    let (zeros, total) =
        report["details"]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .fold((0, 0), |(z, n), l| {
                (
                    z + l["zeros"].as_u64().unwrap(),
                    n + l["numel"].as_u64().unwrap(),
                )
            });
    assert_eq!(zeros, (0.8 * total as f64).round() as u64);
    let removed =
        before["nonzero_params"].as_u64().unwrap() - after["nonzero_params"].as_u64().unwrap();
    assert!(removed >= zeros * 99 / 100, "{removed} vs {zeros}");
    let size = after["file_size"].as_f64().unwrap() / before["file_size"].as_f64().unwrap();
    assert!(size < 0.45, "file size ratio {size}");
    let pruned = checkpoint::load(&out).unwrap();
    let names: Vec<String> = report["details"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!names.contains(&"features.0.0.weight".to_string()));
    assert!(!names.contains(&"classifier.1.weight".to_string()));
    assert!(
        !names.contains(&"features.1.conv.0.0.weight".to_string()),
        "depthwise spared"
    );
    let stem = pruned.weights.get("features.0.0.weight").unwrap();
    assert_eq!(
        slimcandle::sparse::count_nonzero(&stem).unwrap(),
        stem.elem_count()
    );
    fails(
        2,
        &["prune", s(&ckpt), "--method", "magnitude", "-o", s(&out)],
        &["--sparsity"],
    );
    fails(
        2,
        &[
            "prune",
            s(&ckpt),
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--ratio",
            "0.5",
            "-o",
            s(&out),
        ],
        &["not --ratio"],
    );
}

#[test]
fn magnitude_sensitivity_scans_each_layer() {
    let dir = common::temp_dir("sensitivity-magnitude-cli");
    let ckpt = small_checkpoint(&dir);
    let csv = dir.join("sens.csv");
    let result: Value = serde_json::from_str(&ok(&[
        "sensitivity",
        s(&ckpt),
        "--method",
        "magnitude",
        "--data",
        "shapes",
        "--test-limit",
        "20",
        "--ratios",
        "0.5,0.9",
        "--csv",
        s(&csv),
        "--json",
    ]))
    .unwrap();
    let rows = result["rows"].as_array().unwrap();
    assert!(rows.len() >= 2 * 10);
    for pair in rows.chunks(2) {
        assert_eq!(pair[0]["layers"], pair[1]["layers"]);
        let size = pair[0]["size"].as_f64().unwrap();
        let kept = pair[1]["kept"].as_f64().unwrap();
        assert!((kept - 0.1 * size).abs() <= 1.0, "{kept} of {size}");
        assert!(pair[1]["params"].as_u64() < pair[0]["params"].as_u64());
    }
}

#[test]
fn sensitivity_writes_a_row_per_layer_group_and_ratio() {
    let dir = common::temp_dir("sensitivity-cli");
    let ckpt = small_checkpoint(&dir);
    let csv = dir.join("sens.csv");
    let result: Value = serde_json::from_str(&ok(&[
        "sensitivity",
        s(&ckpt),
        "--data",
        "shapes",
        "--test-limit",
        "20",
        "--ratios",
        "0.25,0.5",
        "--csv",
        s(&csv),
        "--json",
    ]))
    .unwrap();
    let rows = result["rows"].as_array().unwrap();
    assert!(rows.len() >= 2 * 10, "{} rows", rows.len());
    assert_eq!(rows.len() % 2, 0);
    for pair in rows.chunks(2) {
        assert_eq!(pair[0]["layers"], pair[1]["layers"]);
        assert_eq!(pair[0]["ratio"], 0.25);
        assert_eq!(pair[1]["ratio"], 0.5);
        assert!(pair[1]["macs"].as_u64() <= pair[0]["macs"].as_u64());
        assert!(pair[0]["macs"].as_u64() < result["macs"].as_u64());
    }
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count(), rows.len() + 1);
    assert!(text.starts_with("layers,size,ratio,kept,params,macs,top1,top1_change"));
}

#[test]
fn bad_prune_requests_get_clear_errors() {
    let dir = common::temp_dir("prune-cli-errors");
    let ckpt = small_checkpoint(&dir);
    let out = dir.join("out.safetensors");
    let (c, o) = (s(&ckpt), s(&out));
    fails(
        2,
        &["prune", c, "-o", o],
        &["--ratio R, --target-macs F or --target-params F"],
    );
    fails(
        2,
        &["prune", c, "--ratio", "0.5", "--criterion", "l3", "-o", o],
        &["unknown criterion `l3`", "l1, l2, bn-scale, taylor, random"],
    );
    fails(
        2,
        &[
            "prune",
            c,
            "--ratio",
            "0.5",
            "--criterion",
            "taylor",
            "-o",
            o,
        ],
        &["taylor", "--data"],
    );
    fails(
        2,
        &["prune", c, "--ratio", "1.5", "-o", o],
        &["'--ratio <RATIO>': must be in [0, 1)"],
    );
    fails(
        1,
        &[
            "prune",
            c,
            "--ratio",
            "0.5",
            "--exclude",
            "nothing.*",
            "-o",
            o,
        ],
        &["`nothing.*` matches no conv or linear layer"],
    );
    fails(
        2,
        &[
            "prune",
            c,
            "--ratio",
            "0.5",
            "--layer-ratio",
            "features.1",
            "-o",
            o,
        ],
        &["expected PATTERN=RATIO"],
    );
    fails(
        1,
        &["prune", c, "--target-macs", "0.001", "-o", o],
        &["cannot reach 0.1% of the MACs"],
    );
    fails(
        2,
        &["prune", c, "--ratio", "0.5", "-o", c],
        &["also an input"],
    );
    fails(
        1,
        &[
            "prune",
            s(&dir.join("missing.safetensors")),
            "--ratio",
            "0.5",
            "-o",
            o,
        ],
        &["missing.safetensors"],
    );
    fails(
        2,
        &["sensitivity", c, "--data", "shapes", "--ratios", "0.5,1.2"],
        &["'--ratios <RATIOS>': must be in (0, 1)"],
    );
    fails(
        1,
        &[
            "sensitivity",
            c,
            "--data",
            "shapes",
            "--test-limit",
            "10",
            "--exclude",
            "featurse.1.*",
        ],
        &["`featurse.1.*` matches no conv or linear layer"],
    );
}
