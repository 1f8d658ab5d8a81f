//! The bar of issue #14, as one table over every command: each invalid value, inapplicable
//! flag and unwritable output is refused with exit status 2 (usage) or 1 (runtime), an
//! `error:` first line naming the flag or the file, nothing on stdout, no output left behind,
//! and no work done first (every case fails in well under the time of the work it stops).

mod common;

use common::{s, slimcandle, stderr, stdout};
use slimcandle::checkpoint;
use slimcandle::model::Model;
use slimcandle::models::{ArchOptions, ArchSpec, Stem};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One refused command line.
struct Case {
    args: Vec<String>,
    /// 2: a usage error; 1: a runtime error (a file, the file system).
    code: i32,
    /// What the first line of stderr must name (the flag, or the file).
    names: &'static str,
}

/// A small MobileNet V2 for 32x32 inputs with the 10 classes of `shapes`.
fn small_checkpoint(dir: &Path) -> PathBuf {
    let spec = ArchSpec::parse(
        "mobilenet_v2",
        &ArchOptions {
            width: Some(0.25),
            num_classes: Some(10),
            stem: Some(Stem::Cifar),
            ..Default::default()
        },
    )
    .unwrap();
    let path = dir.join("small.safetensors");
    checkpoint::save(&Model::init(&spec, 1).unwrap(), &path).unwrap();
    path
}

/// Everything under `dir`, relative, sorted.
fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    out.sort();
    out
}

#[test]
fn every_command_refuses_bad_values_inapplicable_flags_and_unwritable_outputs() {
    let dir = common::temp_dir("cli-usage");
    let ckpt = small_checkpoint(&dir);
    let c = s(&ckpt).to_string();
    // A file where a folder is expected: no output can go under it.
    let blocker = dir.join("blocker");
    std::fs::write(&blocker, "a file").unwrap();
    let under_file = s(&blocker.join("out.safetensors")).to_string();
    let out = s(&dir.join("new/out.safetensors")).to_string();
    let run = s(&dir.join("runs/r")).to_string();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mobilenet_v1_w0_25.safetensors");
    let sd = s(&fixture).to_string();
    let finished = dir.join("finished");
    let train = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "train",
            "--arch",
            "mobilenet_v2",
            "--width",
            "0.25",
            "--stem",
            "cifar",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        if !extra.contains(&"-o") {
            a.extend(["-o".to_string(), run.clone()]);
        }
        a
    };
    let args = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let case = |args: Vec<String>, code, names| Case { args, code, names };
    let cases = vec![
        // train: hyperparameter ranges (issue's list), usage errors that used to exit 1.
        case(train(&["--lr=-1"]), 2, "--lr"),
        case(train(&["--lr", "0"]), 2, "--lr"),
        case(train(&["--momentum", "2"]), 2, "--momentum"),
        case(train(&["--weight-decay=-1"]), 2, "--weight-decay"),
        case(train(&["--label-smoothing", "1.5"]), 2, "--label-smoothing"),
        case(train(&["--step-epochs", "0"]), 2, "--step-epochs"),
        case(train(&["--pct-start", "0"]), 2, "--pct-start"),
        case(train(&["--epochs", "0"]), 2, "--epochs"),
        case(train(&["--batch-size", "0"]), 2, "--batch-size"),
        case(train(&["--train-limit", "0"]), 2, "--train-limit"),
        // Upper bounds (src/cli/ranges.rs): typos refused before any work.
        case(train(&["--epochs", "1000000000"]), 2, "--epochs"),
        case(train(&["--batch-size", "10000000"]), 2, "--batch-size"),
        case(train(&["--train-limit", "1000000000"]), 2, "--train-limit"),
        case(train(&["--warmup-epochs", "1e9"]), 2, "--warmup-epochs"),
        case(
            args(&[
                "quantize",
                &c,
                "--data",
                "shapes",
                "--calibration",
                "100000000",
                "-o",
                &out,
            ]),
            2,
            "--calibration",
        ),
        case(
            args(&["export", &c, "--input-size", "100000,32", "-o", &out]),
            2,
            "--input-size",
        ),
        case(
            args(&["bench", "--arch", "mobilenet_v2", "--input-size", "100000"]),
            2,
            "--input-size",
        ),
        case(train(&["--width=0"]), 2, "--width"),
        case(train(&["--sparsity", "0.5"]), 2, "--sparsity"),
        case(
            train(&["--prune", "magnitude", "--sparsity", "1"]),
            2,
            "--sparsity",
        ),
        case(train(&["--kd-alpha", "0.5"]), 2, "--kd-alpha"),
        case(
            args(&["train", "--arch", "mobilenet_v22", "-o", &run]),
            2,
            "mobilenet_v22",
        ),
        case(args(&["train", "-o", &run]), 2, "--arch"),
        case(
            args(&[
                "train",
                "--new-classifier",
                "--arch",
                "mobilenet_v2",
                "-o",
                &run,
            ]),
            2,
            "--new-classifier",
        ),
        case(
            args(&["train", "--init", &c, "--stem", "cifar", "-o", &run]),
            2,
            "--stem",
        ),
        case(
            args(&["train", "--init", &c, "--width", "0.5", "-o", &run]),
            2,
            "--width",
        ),
        case(
            args(&["train", "--resume", &run, "--epochs", "2"]),
            2,
            "--epochs",
        ),
        case(args(&["train", "--resume", &run, "--lr", "5"]), 2, "--lr"),
        case(args(&["train", "--resume", s(&finished)]), 1, "finished"),
        case(train(&["-o", &under_file]), 1, "blocker"),
        // prune
        case(
            args(&["prune", &c, "--ratio", "1", "-o", &out]),
            2,
            "--ratio",
        ),
        case(
            args(&["prune", &c, "--target-macs", "0", "-o", &out]),
            2,
            "--target-macs",
        ),
        case(
            args(&["prune", &c, "--ratio", "0.5", "--round-to", "0", "-o", &out]),
            2,
            "--round-to",
        ),
        case(
            args(&[
                "prune",
                &c,
                "--ratio",
                "0.5",
                "--batch-size",
                "0",
                "-o",
                &out,
            ]),
            2,
            "--batch-size",
        ),
        case(args(&["prune", &c, "-o", &out]), 2, "--ratio"),
        case(
            args(&[
                "prune",
                &c,
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                "--criterion",
                "taylor",
                "-o",
                &out,
            ]),
            2,
            "--criterion",
        ),
        case(
            args(&[
                "prune",
                &c,
                "--method",
                "magnitude",
                "--sparsity",
                "0.5",
                "--round-to",
                "4",
                "-o",
                &out,
            ]),
            2,
            "--round-to",
        ),
        case(
            args(&[
                "prune",
                &c,
                "--ratio",
                "0.5",
                "--criterion",
                "taylor",
                "-o",
                &out,
            ]),
            2,
            "--data",
        ),
        case(
            args(&["prune", &c, "--ratio", "0.5", "-o", &c]),
            2,
            "small.safetensors",
        ),
        case(
            args(&[
                "prune",
                &c,
                "--ratio",
                "0.5",
                "--data",
                "shapes",
                "-o",
                &under_file,
            ]),
            1,
            "blocker",
        ),
        case(
            args(&["prune", &c, "--ratio", "0.5", "-o", s(&dir)]),
            1,
            "is a folder",
        ),
        // sensitivity: the CSV's folder is checked before the scan.
        case(
            args(&["sensitivity", &c, "--data", "shapes", "--ratios", "0.5,1.5"]),
            2,
            "--ratios",
        ),
        case(
            args(&["sensitivity", &c, "--data", "shapes", "--min-channels", "0"]),
            2,
            "--min-channels",
        ),
        case(
            args(&["sensitivity", &c, "--data", "shapes", "--csv", &under_file]),
            1,
            "blocker",
        ),
        // quantize
        case(
            args(&[
                "quantize",
                &c,
                "--data",
                "shapes",
                "--calibration",
                "0",
                "-o",
                &out,
            ]),
            2,
            "--calibration",
        ),
        case(
            args(&[
                "quantize",
                &c,
                "--data",
                "shapes",
                "--percentile",
                "40",
                "-o",
                &out,
            ]),
            2,
            "--percentile",
        ),
        case(
            args(&["quantize", &c, "--data", "shapes", "-o", &under_file]),
            1,
            "blocker",
        ),
        // eval, predict, bench, inspect, compare, import, forward, the global --threads
        case(args(&["eval", &c, "--batch-size", "0"]), 2, "--batch-size"),
        case(args(&["eval", &c, "--test-limit", "0"]), 2, "--test-limit"),
        case(
            args(&["predict", &c, "x.png", "--top-k", "0"]),
            2,
            "--top-k",
        ),
        case(
            args(&["bench", "--arch", "mobilenet_v2", "--iterations", "0"]),
            2,
            "--iterations",
        ),
        case(
            args(&["bench", "--arch", "mobilenet_v2", "--batch-size", "0"]),
            2,
            "--batch-size",
        ),
        case(
            args(&["bench", "--arch", "mobilenet_v2", "--input-size", "0"]),
            2,
            "--input-size",
        ),
        // A batch no machine holds (10^9 images at 224x224) is refused before allocating.
        case(
            args(&[
                "bench",
                "--arch",
                "mobilenet_v2",
                "--input-size",
                "224",
                "--batch-size",
                "1000000000",
            ]),
            2,
            "--batch-size",
        ),
        case(
            args(&[
                "bench",
                "--arch",
                "mobilenet_v2",
                "--mode",
                "infer",
                "--teacher",
                &c,
            ]),
            2,
            "--teacher",
        ),
        case(args(&["bench", "--arch", "mobilenett"]), 2, "mobilenett"),
        case(args(&["bench"]), 2, "--arch"),
        case(
            args(&["inspect", &c, "--input-size", "0"]),
            2,
            "--input-size",
        ),
        case(
            args(&["compare", &c, "--test-limit", "0"]),
            2,
            "--test-limit",
        ),
        case(args(&["compare", &c, "--plot", "p.png"]), 2, "--plot"),
        case(
            args(&["compare", &c, "--plot", &format!("{under_file}.svg")]),
            1,
            "blocker",
        ),
        case(
            args(&[
                "import",
                "--arch",
                "mobilenet_v1",
                "--width",
                "0.25",
                &sd,
                "-o",
                &under_file,
            ]),
            1,
            "blocker",
        ),
        case(args(&["import", &sd, "-o", &out]), 2, "--arch"),
        case(
            args(&[
                "import",
                "--arch",
                "mobilenet_v1",
                "--num-classes",
                "0",
                &sd,
                "-o",
                &out,
            ]),
            2,
            "--num-classes",
        ),
        case(args(&["forward", &c, &sd, "-o", &under_file]), 1, "blocker"),
        case(args(&["--threads", "0", "models"]), 2, "--threads"),
    ];

    // A finished run, for `--resume` on it (which succeeds and says so) and for the case
    // above that resumes a folder holding no run.
    let o = slimcandle(
        &args(&[
            "train",
            "--arch",
            "mobilenet_v2",
            "--width",
            "0.25",
            "--stem",
            "cifar",
            "--train-limit",
            "20",
            "--test-limit",
            "20",
            "--epochs",
            "1",
            "--batch-size",
            "20",
            "-o",
            s(&dir.join("done")),
        ])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = slimcandle(&["train", "--resume", s(&dir.join("done"))]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("is complete (1 epochs"),
        "{}",
        stdout(&o)
    );
    std::fs::create_dir_all(&finished).unwrap();

    let before = listing(&dir);
    let mut failures = Vec::new();
    for case in &cases {
        let argv: Vec<&str> = case.args.iter().map(String::as_str).collect();
        let start = Instant::now();
        let o = slimcandle(&argv);
        let took = start.elapsed();
        let err = stderr(&o);
        let first = err.lines().next().unwrap_or_default();
        // clap's own errors end with a usage footer; every other error is one line.
        let one_line = err.trim_end().lines().count() == 1 || err.contains("For more information");
        let problems = [
            (
                o.status.code() != Some(case.code),
                format!("exit {:?}, not {}", o.status.code(), case.code),
            ),
            (
                !first.starts_with("error: "),
                "no `error:` first line".to_string(),
            ),
            (
                !first.contains(case.names),
                format!("first line does not name `{}`", case.names),
            ),
            (!one_line, "more than one line".to_string()),
            (!o.stdout.is_empty(), format!("stdout: {}", stdout(&o))),
            (
                err.contains("panicked") || err.contains("backtrace"),
                "a panic".to_string(),
            ),
            (listing(&dir) != before, "left files behind".to_string()),
            (
                took > Duration::from_secs(10),
                format!("took {took:?}: work was done first"),
            ),
        ];
        for (bad, what) in problems {
            if bad {
                failures.push(format!("{argv:?}: {what}\n  {err}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    std::fs::remove_dir_all(&dir).ok();
}

/// A recipe value gets the range of its flag, at its file position (the same definition).
#[test]
fn recipe_values_are_held_to_the_flags_ranges() {
    let dir = common::temp_dir("cli-usage-recipe");
    let recipe = dir.join("r.toml");
    std::fs::write(
        &recipe,
        "[model]\narch = \"mobilenet_v2\"\n\n[train]\nepochs = 1\nlr = -1\n\n[[stage]]\nname = \"train\"\nkind = \"train\"\nmomentum = 2\n",
    )
    .unwrap();
    let o = slimcandle(&["run", s(&recipe), "--dry-run"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "r.toml:6:6: `lr`: invalid value '-1' for '--lr <LR>': must be greater than 0"
        ),
        "{err}"
    );
    assert!(err.contains("r.toml:11:12: `momentum`: invalid value '2' for '--momentum <MOMENTUM>': must be in [0, 1)"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
