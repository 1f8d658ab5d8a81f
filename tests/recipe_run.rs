//! The recipe runner end to end on tiny `shapes` data: stage folders, the final checkpoint and
//! its provenance, the report's JSON and SVG, reruns that skip unchanged stages and rerun
//! changed ones, an interrupted training stage continued with --resume, `compare`, and the
//! CIFAR-10 recipes checked with --dry-run.

mod common;

use common::{s, slimcandle, stderr, stdout, temp_dir};
use std::path::Path;

/// Train MobileNet V2 0.25 for one epoch on 64 images, prune to half the MACs with one epoch
/// of fine-tuning.
const RECIPE: &str = r#"[model]
arch = "mobilenet_v2"
width = 0.25
stem = "cifar"

[data]
data = "shapes"
train_limit = 64
test_limit = 20

[train]
epochs = 1
batch_size = 32
lr = 0.05

[[stage]]
name = "train"
kind = "train"

[[stage]]
name = "prune"
kind = "prune"
target_macs = 0.5
finetune = { epochs = 1, lr = 0.01 }
"#;

fn run(recipe: &Path, dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["--threads", "2", "run", s(recipe), "-o", s(dir)];
    args.extend(extra);
    slimcandle(&args)
}

fn run_ok(recipe: &Path, dir: &Path, extra: &[&str]) -> (String, String) {
    let o = run(recipe, dir, extra);
    assert!(o.status.success(), "run failed:\n{}", stderr(&o));
    (stdout(&o), stderr(&o))
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

/// The value of attribute `name` in an SVG element's text.
fn attr(element: &str, name: &str) -> f64 {
    let start = element.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
    let end = start + element[start..].find('"').unwrap();
    element[start..end].parse().unwrap()
}

/// The elements `<tag .../>` or `<tag ...>` of an SVG document, as text.
fn elements<'a>(svg: &'a str, tag: &str) -> Vec<&'a str> {
    svg.match_indices(&format!("<{tag} "))
        .map(|(i, _)| &svg[i..i + svg[i..].find('>').unwrap()])
        .collect()
}

#[test]
fn a_two_stage_recipe_runs_reports_and_reruns_by_hash() {
    let dir = temp_dir("recipe-run");
    let recipe = dir.join("r.toml");
    std::fs::write(&recipe, RECIPE).unwrap();
    let out = dir.join("run");
    let (table, _) = run_ok(&recipe, &out, &[]);

    // Stage folders, final checkpoint, lock file, report.
    for f in [
        "01-train/model.safetensors",
        "01-train/metrics.json",
        "01-train/log.txt",
        "01-train/run/metrics.jsonl",
        "02-prune/prune.safetensors",
        "02-prune/finetune/best.safetensors",
        "02-prune/model.safetensors",
        "02-prune/metrics.json",
        "final.safetensors",
        "recipe.lock.toml",
        "report.md",
        "report.json",
        "report.svg",
    ] {
        assert!(out.join(f).exists(), "missing {f}");
    }
    assert_eq!(
        std::fs::read(out.join("final.safetensors")).unwrap(),
        std::fs::read(out.join("02-prune/model.safetensors")).unwrap()
    );
    let log = std::fs::read_to_string(out.join("02-prune/log.txt")).unwrap();
    assert!(
        log.contains("$ slimcandle prune ") && log.contains("--target-macs=0.5"),
        "{log}"
    );
    assert!(log.contains("$ slimcandle train --init="), "{log}");

    // The effective recipe is in the checkpoints' provenance.
    let lock = std::fs::read_to_string(out.join("recipe.lock.toml")).unwrap();
    let lock_table: toml::Table = lock.parse().unwrap();
    assert_eq!(lock_table["train"]["lr"].as_float(), Some(0.05));
    let model = slimcandle::checkpoint::load(&out.join("final.safetensors")).unwrap();
    assert_eq!(model.meta.provenance.recipe.as_deref(), Some(lock.as_str()));
    assert!(model.meta.provenance.command.contains("(stage 02-prune)"));

    // The report: one row per stage, the printed table ends with the plot's path.
    let r = report(&out);
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["name"], "train");
    assert_eq!(rows[1]["name"], "prune");
    let macs = |i: usize| rows[i]["macs"].as_u64().unwrap();
    let ratio = macs(1) as f64 / macs(0) as f64;
    assert!((0.35..=0.55).contains(&ratio), "MACs ratio {ratio}");
    assert!((rows[1]["vs_first"]["macs"].as_f64().unwrap() - ratio).abs() < 1e-12);
    let bytes = |i: usize| rows[i]["file_bytes"].as_u64().unwrap();
    assert_eq!(
        bytes(1),
        std::fs::metadata(out.join("02-prune/model.safetensors"))
            .unwrap()
            .len()
    );
    for row in rows {
        let top1 = row["top1"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&top1) && row["top5"].as_f64().unwrap() >= top1);
        assert!(row["latency_ms_batch1"].as_f64().unwrap() > 0.0);
        assert!(row["images_per_s_batch64"].as_f64().unwrap() > 0.0);
    }
    assert!(table.contains("train") && table.contains("prune") && table.contains("top-1"));
    assert!(
        table
            .trim_end()
            .ends_with(&format!("plot {}/report.svg", out.display())),
        "{table}"
    );

    // The plot: one labelled point per stage, placed by file size (log) and accuracy.
    let svg = std::fs::read_to_string(out.join("report.svg")).unwrap();
    let circles = elements(&svg, "circle");
    assert_eq!(circles.len(), 2, "{svg}");
    let (x0, x1) = (attr(circles[0], "cx"), attr(circles[1], "cx"));
    assert!(x1 < x0, "the pruned file is smaller: it sits left");
    let (y0, y1) = (attr(circles[0], "cy"), attr(circles[1], "cy"));
    let (t0, t1) = (
        rows[0]["top1"].as_f64().unwrap(),
        rows[1]["top1"].as_f64().unwrap(),
    );
    assert_eq!(y0 < y1, t0 > t1, "higher accuracy sits higher");
    if t0 == t1 {
        assert_eq!(y0, y1);
    }
    for label in ["train", "prune"] {
        assert!(
            svg.contains(&format!("\n{label}\n</text>")),
            "no label {label}"
        );
    }
    // The Pareto front: the blue polyline through the undominated points, by file size.
    let front = elements(&svg, "polyline")
        .into_iter()
        .find(|p| p.contains("stroke=\"#0000FF\" stroke-width=\"2\""))
        .expect("a Pareto front");
    let start = front.find("points=\"").unwrap() + 8;
    let points: Vec<(f64, f64)> = front[start..start + front[start..].find('"').unwrap()]
        .split_whitespace()
        .map(|p| {
            let (x, y) = p.split_once(',').unwrap();
            (x.parse().unwrap(), y.parse().unwrap())
        })
        .collect();
    // Undominated: the smaller file, and the larger one only if it is more accurate.
    let expected: Vec<(f64, f64)> = if t0 > t1 {
        vec![(x1, y1), (x0, y0)]
    } else {
        vec![(x1, y1)]
    };
    assert_eq!(points, expected, "{front}");

    // Rerun: nothing changed, nothing runs.
    let before = std::fs::metadata(out.join("02-prune/model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let (_, log) = run_ok(&recipe, &out, &[]);
    assert!(log.contains("stage 01-train: unchanged, skipped"), "{log}");
    assert!(log.contains("stage 02-prune: unchanged, skipped"), "{log}");
    assert!(!log.contains("$ slimcandle"), "{log}");
    let after = std::fs::metadata(out.join("02-prune/model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);

    // A changed prune stage reruns; the training before it does not.
    let (_, log) = run_ok(&recipe, &out, &["--set", "stage.prune.target_macs=0.3"]);
    assert!(log.contains("stage 01-train: unchanged, skipped"), "{log}");
    assert!(log.contains("$ slimcandle prune "), "{log}");
    let r = report(&out);
    let smaller = r["rows"][1]["macs"].as_u64().unwrap();
    assert!(smaller < macs(1), "{smaller} vs {}", macs(1));
    let lock = std::fs::read_to_string(out.join("recipe.lock.toml")).unwrap();
    assert!(lock.contains("target_macs = 0.3"), "{lock}");

    // A change upstream reruns everything after it.
    let (_, log) = run_ok(
        &recipe,
        &out,
        &[
            "--set",
            "stage.prune.target_macs=0.3",
            "--set",
            "train.lr=0.04",
        ],
    );
    assert!(log.contains("$ slimcandle train --data=shapes"), "{log}");
    assert!(log.contains("$ slimcandle prune "), "{log}");

    // compare: the same table for any checkpoints, with JSON and a plot.
    let plot = dir.join("cmp.svg");
    let o = slimcandle(&[
        "--threads",
        "2",
        "compare",
        s(&out.join("01-train/model.safetensors")),
        s(&out.join("final.safetensors")),
        "--data",
        "shapes",
        "--test-limit",
        "20",
        "--json",
        "--plot",
        s(&plot),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let cmp = v["rows"].as_array().unwrap();
    assert_eq!(cmp.len(), 2);
    assert_eq!(cmp[1]["name"], "final");
    let r = report(&out);
    for key in [
        "params",
        "nonzero_params",
        "macs",
        "file_bytes",
        "top1",
        "top5",
    ] {
        assert_eq!(cmp[1][key], r["rows"][1][key], "{key}");
    }
    assert_eq!(
        elements(&std::fs::read_to_string(&plot).unwrap(), "circle").len(),
        2
    );
}

#[test]
fn an_interrupted_training_stage_continues_with_resume() {
    let dir = temp_dir("recipe-resume");
    let recipe = dir.join("r.toml");
    // Only the training stage: two epochs of two batches.
    let text = RECIPE
        .split("[[stage]]\nname = \"prune\"")
        .next()
        .unwrap()
        .replace("epochs = 1", "epochs = 2");
    std::fs::write(&recipe, &text).unwrap();
    let out = dir.join("run");
    // `stop_after_steps` (a test hook, not part of the stage's hash) interrupts after 3 steps.
    let o = run(&recipe, &out, &["--set", "stage.train.stop_after_steps=3"]);
    // Exit status 130, as for Ctrl-C.
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("stopped before its last epoch"), "{err}");
    assert!(err.contains("--resume"), "{err}");
    assert!(!out.join("01-train/metrics.json").exists());
    assert!(!out.join("final.safetensors").exists());
    let (_, log) = run_ok(&recipe, &out, &["--resume"]);
    assert!(log.contains("stage 01-train (train): continuing"), "{log}");
    assert!(log.contains("$ slimcandle train --resume="), "{log}");
    assert!(log.contains("continued and finished"), "{log}");
    let metrics = std::fs::read_to_string(out.join("01-train/run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    assert!(out.join("final.safetensors").exists());

    // --resume on a folder without a run is refused.
    let o = run(&recipe, &dir.join("nothing"), &["--resume"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("holds no recipe run to resume"));
}

#[test]
fn the_quickstart_and_cifar10_recipes_are_valid() {
    let o = slimcandle(&["run", "recipes/quickstart.toml", "--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("02-prune"));
    if common::shared_dir("data/cifar10").is_none() {
        return;
    }
    let families = [
        "mobilenet_v1",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "shufflenet_v1",
        "shufflenet_v2",
        "squeezenet1_1",
    ];
    for family in families {
        let recipe = format!("recipes/cifar10/{family}.toml");
        let o = slimcandle(&["run", &recipe, "--dry-run"]);
        assert!(o.status.success(), "{recipe}: {}", stderr(&o));
        let plan = stdout(&o);
        assert!(plan.contains(&format!("--arch={family}")), "{plan}");
        assert!(
            plan.contains("01-train") && plan.contains("02-prune"),
            "{plan}"
        );
    }
    // The flagship starts from the trained MobileNet V2 in runs/ (not in git): validated here
    // with a stand-in checkpoint of the same architecture as its model and teacher.
    let dir = common::temp_dir("flagship-recipe");
    let stand_in = dir.join("mnv2");
    let o = slimcandle(&[
        "--threads",
        "1",
        "train",
        "--arch",
        "mobilenet_v2",
        "--stem",
        "cifar",
        "--data",
        "shapes",
        "--train-limit",
        "16",
        "--test-limit",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "-o",
        stand_in.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ckpt = stand_in.join("best.safetensors").display().to_string();
    let o = slimcandle(&[
        "run",
        "recipes/cifar10/mobilenet_v2_10x.toml",
        "--dry-run",
        "--set",
        &format!("model.init={ckpt}"),
        "--set",
        &format!("stage.sparse-distill.teacher={ckpt}"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let plan = stdout(&o);
    assert!(
        plan.contains("--prune=magnitude --sparsity=0.85") && plan.contains("03-quantize"),
        "{plan}"
    );
    let listed = std::fs::read_dir("recipes/cifar10").unwrap().count();
    assert_eq!(listed, families.len() + 1);
}

/// An `export` stage writes its file (ONNX, or a PyTorch state dict with `format = "torch"`)
/// into its folder and passes its input on: the stage after it reads the trained checkpoint,
/// and the final checkpoint is that one too.
#[test]
fn export_stages_write_their_file_and_pass_the_model_on() {
    let dir = temp_dir("recipe-export");
    let recipe = dir.join("export.toml");
    let text = r#"[model]
arch = "mobilenet_v2"
width = 0.25
stem = "cifar"

[data]
data = "shapes"
train_limit = 64
test_limit = 20

[train]
epochs = 1
batch_size = 32
lr = 0.05

[[stage]]
name = "train"
kind = "train"

[[stage]]
name = "onnx"
kind = "export"

[[stage]]
name = "torch"
kind = "export"
format = "torch"

[[stage]]
name = "eval"
kind = "eval"
"#;
    std::fs::write(&recipe, text).unwrap();
    let o = slimcandle(&["run", s(&recipe), "--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let plan = stdout(&o);
    assert!(plan.contains("4 stages"), "{plan}");
    assert!(plan.contains("export <02-onnx> --format=torch"), "{plan}");

    let out = dir.join("run");
    run_ok(&recipe, &out, &[]);
    let onnx = out.join("02-onnx/model.onnx");
    let bytes = std::fs::read(&onnx).unwrap_or_else(|e| panic!("{}: {e}", onnx.display()));
    let model = slimcandle::export::proto::decode_model(&bytes).unwrap();
    let graph = model.graph.expect("an ONNX graph");
    assert!(!graph.node.is_empty() && !graph.initializer.is_empty());
    let torch = out.join("03-torch/state_dict.safetensors");
    let state = slimcandle::tensor_file::TensorFile::read(&torch).unwrap();
    assert!(!state.names().is_empty(), "{}", torch.display());
    // No checkpoint of their own: the eval stage and the final checkpoint are the trained model.
    assert!(!out.join("02-onnx/model.safetensors").exists());
    let trained = std::fs::read(out.join("01-train/model.safetensors")).unwrap();
    assert_eq!(
        std::fs::read(out.join("final.safetensors")).unwrap(),
        trained
    );
    let rows = report(&out);
    let rows = rows["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    let checkpoint = |i: usize| rows[i]["checkpoint"].as_str().unwrap().to_string();
    assert_eq!(checkpoint(1), checkpoint(0));
    assert_eq!(checkpoint(3), checkpoint(0));
    let log = std::fs::read_to_string(out.join("03-torch/log.txt")).unwrap();
    assert!(log.contains("--format=torch"), "{log}");

    // Unchanged: every stage is skipped on a rerun, the files stay.
    let (_, err) = run_ok(&recipe, &out, &[]);
    assert_eq!(err.matches("unchanged, skipped").count(), 4, "{err}");
    assert!(onnx.exists());
}
