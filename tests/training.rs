//! Training end to end on the built-in `shapes` data with tiny models: learning happens,
//! checkpoints and logs are written, an interrupted run resumes to exactly the result of an
//! uninterrupted one, and the trained checkpoint evaluates and predicts from the command line.

mod common;

use slimcandle::checkpoint;
use slimcandle::data::{Augment, DataSpec, Dataset, LoadOptions};
use slimcandle::model::{Model, Preprocessing};
use slimcandle::models::{ArchOptions, ArchSpec, Stem};
use slimcandle::train::optimizer::OptimizerKind;
use slimcandle::train::schedule::Schedule;
use slimcandle::train::{EpochMetrics, Observer, Outcome, Run, TrainConfig};
use std::path::Path;
use std::process::Command;
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

fn model(data: &Dataset, arch: &str, width: f64) -> Model {
    let opts = ArchOptions {
        width: Some(width),
        num_classes: Some(10),
        stem: Some(Stem::Cifar),
        ..Default::default()
    };
    let mut m = Model::init(&ArchSpec::parse(arch, &opts).unwrap(), 11).unwrap();
    m.meta.class_names = data.class_names.clone();
    m.meta.preprocessing = Preprocessing {
        input_size: [SIZE, SIZE],
        mean: data.mean,
        std: data.std,
    };
    m
}

fn config(epochs: usize, schedule: Schedule) -> TrainConfig {
    TrainConfig {
        data: "shapes".into(),
        train_limit: None,
        test_limit: None,
        epochs,
        batch_size: 32,
        optimizer: OptimizerKind::Sgd {
            momentum: 0.9,
            nesterov: true,
        },
        lr: 0.05,
        weight_decay: 5e-4,
        schedule,
        warmup_epochs: 0.0,
        label_smoothing: 0.1,
        augment: Some(Augment {
            crop_padding: 2,
            hflip: true,
        }),
        seed: 5,
        prune: None,
        bn_l1: 0.0,
        distill: None,
        qat: None,
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

fn weights_of(path: &Path) -> Vec<(String, Vec<f32>)> {
    let m = checkpoint::load(path).unwrap();
    m.weights
        .tensors()
        .map(|(n, t)| (n.to_string(), t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

fn metrics_of(dir: &Path) -> Vec<EpochMetrics> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn interrupted_and_resumed_run_equals_uninterrupted_run() {
    let d = data(96, 40);
    let root = common::temp_dir("resume");
    let never = AtomicBool::new(false);

    let full_dir = root.join("full");
    let mut full = Run::create(
        &full_dir,
        config(2, Schedule::one_cycle(0.3)),
        model(&d, "mobilenet_v2", 0.25),
    )
    .unwrap();
    assert!(matches!(
        full.train(&d, &never, &mut slimcandle::train::NoObserver)
            .unwrap(),
        Outcome::Finished { .. }
    ));

    // Interrupt mid-epoch (step 2 of 3), then again at an epoch boundary, resuming each time.
    let cut_dir = root.join("cut");
    let flag = AtomicBool::new(false);
    let mut run = Run::create(
        &cut_dir,
        config(2, Schedule::one_cycle(0.3)),
        model(&d, "mobilenet_v2", 0.25),
    )
    .unwrap();
    let outcome = run
        .train(
            &d,
            &flag,
            &mut StopAfter {
                after: 2,
                steps: 0,
                flag: &flag,
            },
        )
        .unwrap();
    assert!(matches!(
        outcome,
        Outcome::Interrupted {
            epoch: 0,
            next_batch: 2
        }
    ));
    assert!(
        cut_dir.join("last.safetensors").exists() && cut_dir.join("resume.safetensors").exists()
    );
    drop(run);
    let flag = AtomicBool::new(false);
    let mut run = Run::open(&cut_dir).unwrap();
    assert_eq!((run.progress.epoch, run.progress.next_batch), (0, 2));
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
    assert!(matches!(
        outcome,
        Outcome::Interrupted {
            epoch: 1,
            next_batch: 0
        }
    ));
    drop(run);
    let mut run = Run::open(&cut_dir).unwrap();
    assert!(matches!(
        run.train(&d, &never, &mut slimcandle::train::NoObserver)
            .unwrap(),
        Outcome::Finished { .. }
    ));

    assert_eq!(
        weights_of(&full_dir.join("last.safetensors")),
        weights_of(&cut_dir.join("last.safetensors"))
    );
    let (a, b) = (metrics_of(&full_dir), metrics_of(&cut_dir));
    assert_eq!(a.len(), 2);
    assert_eq!(b.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            (x.epoch, x.train_loss, x.train_top1, x.test_top1, x.lr),
            (y.epoch, y.train_loss, y.train_top1, y.test_top1, y.lr)
        );
    }
    // A finished run refuses a fresh start in the same folder.
    let err = Run::create(
        &full_dir,
        config(2, Schedule::Cosine),
        model(&d, "mobilenet_v2", 0.25),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("--resume"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}

/// Writes an image folder of three easily told classes (mostly red, green or blue noisy
/// images) so that a tiny network learns it in a few steps.
fn colour_folder(root: &Path, per_class: [usize; 2]) {
    let mut rng = slimcandle::rng::Rng::new(9);
    for (split, n) in ["train", "test"].iter().zip(per_class) {
        for (c, class) in ["blue", "green", "red"].iter().enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            let channel = 2 - c;
            for i in 0..n {
                let img = image::RgbImage::from_fn(12, 12, |_, _| {
                    let mut px = [0u8; 3];
                    for (k, v) in px.iter_mut().enumerate() {
                        let base = if k == channel { 170.0 } else { 60.0 };
                        *v = (base + 60.0 * (rng.uniform() - 0.5)) as u8;
                    }
                    image::Rgb(px)
                });
                img.save(dir.join(format!("{i}.png"))).unwrap();
            }
        }
    }
}

fn run_cli(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_slimcandle"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "slimcandle {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn cli_training_learns_and_the_checkpoint_evaluates_and_predicts() {
    let root = common::temp_dir("learn");
    let data_dir = root.join("colours");
    colour_folder(&data_dir, [40, 10]);
    let data = format!("folder:{}", data_dir.display());
    let run_dir = root.join("run");
    let out = run_cli(&[
        "train",
        "--arch",
        "mobilenet_v1",
        "--width",
        "0.25",
        "--stem",
        "cifar",
        "--data",
        &data,
        // Ten epochs: at six the best checkpoint was at the edge (one change of the
        // gradients' summation order left it at 93% and the red test image called blue);
        // at ten both orders reach 100% with every prediction above 0.9.
        "--epochs",
        "10",
        // Small batches: enough steps for the batch-norm running statistics to settle.
        "--batch-size",
        "8",
        "--optimizer",
        "adamw",
        "--lr",
        "0.003",
        // Zero-padded crops of these tiny upscaled images shift batch-norm statistics far from
        // the test images'; the task needs no augmentation.
        "--crop-padding",
        "0",
        "--no-flip",
        "--json",
        "-o",
        run_dir.to_str().unwrap(),
    ]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["finished"], true);
    let metrics = metrics_of(&run_dir);
    assert_eq!(metrics.len(), 10);
    assert!(metrics[9].train_loss < metrics[0].train_loss, "{metrics:?}");
    let best = summary["best_top1"].as_f64().unwrap();
    assert!(
        best >= 90.0,
        "three colour classes should be learnt, got {best:.1}% ({metrics:?})"
    );
    for file in [
        "config.json",
        "last.safetensors",
        "best.safetensors",
        "resume.safetensors",
    ] {
        assert!(run_dir.join(file).exists(), "{file}");
    }

    let best_ckpt = run_dir.join("best.safetensors");
    let report: serde_json::Value = serde_json::from_slice(
        &run_cli(&[
            "eval",
            best_ckpt.to_str().unwrap(),
            "--data",
            &data,
            "--json",
        ])
        .stdout,
    )
    .unwrap();
    assert_eq!(
        report["top1"].as_f64().unwrap(),
        best,
        "eval reproduces the best epoch's test top-1"
    );
    assert_eq!(report["top5"].as_f64().unwrap(), 100.0);
    assert_eq!(
        report["class_names"],
        serde_json::json!(["blue", "green", "red"])
    );
    let confusion = report["confusion"].as_array().unwrap();
    assert_eq!(confusion.len(), 3);
    let total: u64 = confusion
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 30);
    let text =
        String::from_utf8(run_cli(&["eval", best_ckpt.to_str().unwrap(), "--data", &data]).stdout)
            .unwrap();
    assert!(
        text.contains("confusion matrix") && text.contains("ms/image"),
        "{text}"
    );

    let red = data_dir.join("test/red/0.png");
    let pred: serde_json::Value = serde_json::from_slice(
        &run_cli(&[
            "predict",
            best_ckpt.to_str().unwrap(),
            red.to_str().unwrap(),
            "--top-k",
            "2",
            "--json",
        ])
        .stdout,
    )
    .unwrap();
    let top = pred["predictions"][0]["top"].as_array().unwrap();
    assert_eq!(top.len(), 2);
    assert_eq!(top[0]["class"], "red");
    assert!(top[0]["probability"].as_f64().unwrap() > top[1]["probability"].as_f64().unwrap());

    // Data whose classes differ from the checkpoint's is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_slimcandle"))
        .args([
            "eval",
            best_ckpt.to_str().unwrap(),
            "--data",
            "shapes",
            "--test-limit",
            "20",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("10 classes but the checkpoint has 3"));

    // Interrupting from the command line leaves a run that --resume finishes.
    let cut = root.join("cut");
    let out = Command::new(env!("CARGO_BIN_EXE_slimcandle"))
        .args([
            "train",
            "--arch",
            "mobilenet_v1",
            "--width",
            "0.25",
            "--stem",
            "cifar",
            "--data",
            &data,
            "--epochs",
            "2",
            "--batch-size",
            "20",
            "--stop-after-steps",
            "2",
            "-o",
            cut.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    // Stopped as by Ctrl-C: exit status 130, and how to continue.
    assert_eq!(out.status.code(), Some(130));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--resume"));
    run_cli(&["train", "--resume", cut.to_str().unwrap()]);
    assert_eq!(metrics_of(&cut).len(), 2);
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn fine_tuning_replaces_the_classifier_for_new_classes() {
    let d = data(40, 20);
    let mut m = model(&d, "shufflenet_v2", 0.5);
    m.replace_classifier(3, 1).unwrap();
    assert_eq!(m.num_classes(), 3);
    assert_eq!(m.weights.get("fc.weight").unwrap().dims(), &[3, 1024]);
    let x = candle_core::Tensor::zeros(
        (2, 3, SIZE, SIZE),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        m.forward(&x, slimcandle::exec::Mode::Eval).unwrap().dims(),
        &[2, 3]
    );
    let mut sq = model(&d, "squeezenet1_1", 1.0);
    sq.replace_classifier(4, 1).unwrap();
    assert_eq!(
        sq.forward(&x, slimcandle::exec::Mode::Eval).unwrap().dims(),
        &[2, 4]
    );
}
