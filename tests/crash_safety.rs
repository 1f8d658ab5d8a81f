//! Crash safety of training runs (issue #16): `kill -9` at random moments never leaves a
//! corrupt or partial checkpoint, `--resume` continues from the last completed epoch, and a
//! single-threaded run that was killed several times ends with exactly the weights of one
//! that was not; a write error (a file-size limit standing in for a full disk) gives one
//! clear error and leaves the previous checkpoint and run state as they were.

mod common;

use slimcandle::checkpoint;
use slimcandle::tensor_file::TensorFile;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A tiny run: 64 generated images, 4 steps an epoch, 3 epochs, one thread.
fn train_args(dir: &Path) -> Vec<String> {
    [
        "--threads",
        "1",
        "train",
        "--arch",
        "mobilenet_v1",
        "--width",
        "0.25",
        "--stem",
        "cifar",
        "--data",
        "shapes",
        "--train-limit",
        "64",
        "--test-limit",
        "16",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "-o",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([dir.display().to_string()])
    .collect()
}

fn resume_args(dir: &Path) -> Vec<String> {
    vec![
        "--threads".into(),
        "1".into(),
        "train".into(),
        "--resume".into(),
        dir.display().to_string(),
    ]
}

fn slimcandle(args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_slimcandle"));
    c.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn finish(args: &[String]) {
    let out = slimcandle(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a training that stops itself as Ctrl-C would: saved, resumable, exit status 130.
fn interrupt(args: &[String]) {
    let out = slimcandle(args).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every parameter's bits, by name.
fn weight_bits(path: &Path) -> Vec<(String, Vec<u32>)> {
    let model = checkpoint::load(path).unwrap();
    let mut out: Vec<(String, Vec<u32>)> = model
        .weights
        .tensors()
        .map(|(n, t)| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (n.to_string(), v.iter().map(|x| x.to_bits()).collect())
        })
        .collect();
    out.sort();
    out
}

fn safetensors_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    files
}

/// What a killed run may leave: whole checkpoints only (temporary files aside, which are
/// never read), a resume state that reopens, and metric lines that parse (a line cut by the
/// kill is dropped on resume).
fn assert_consistent(dir: &Path) {
    for file in safetensors_in(dir) {
        TensorFile::read(&file).unwrap_or_else(|e| panic!("after a kill: {e}"));
        if file.file_name().unwrap() != "resume.safetensors" {
            checkpoint::load(&file).unwrap_or_else(|e| panic!("after a kill: {e}"));
        }
    }
}

#[test]
fn killed_runs_resume_to_the_uninterrupted_result_bit_for_bit() {
    let root = common::temp_dir("crash-kill9");
    let reference = root.join("reference");
    let started = std::time::Instant::now();
    finish(&train_args(&reference));
    let full = started.elapsed();

    let run = root.join("killed");
    let mut rng = slimcandle::rng::Rng::new(16);
    let mut kills = 0;
    let mut resumable = false;
    for attempt in 0..6 {
        let args = if resumable {
            resume_args(&run)
        } else {
            train_args(&run)
        };
        let mut child = slimcandle(&args).spawn().unwrap();
        // A random moment within 10-40 % of a whole run's time (each restart loses the
        // unfinished epoch, so kills keep landing): loading, training, evaluating or saving.
        let wait = full.mul_f64(0.1 + 0.3 * rng.uniform());
        std::thread::sleep(wait);
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        assert_consistent(&run);
        resumable = run.join("resume.safetensors").exists();
        eprintln!("kill {kills} (attempt {attempt}) after {wait:?}: resumable {resumable}");
    }
    assert!(
        kills >= 2,
        "the run finished before it could be killed twice"
    );
    if resumable {
        finish(&resume_args(&run));
    } else {
        finish(&train_args(&run));
    }
    assert_eq!(
        weight_bits(&run.join("last.safetensors")),
        weight_bits(&reference.join("last.safetensors")),
        "a killed and resumed run must end with the uninterrupted run's weights"
    );
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn a_write_error_leaves_the_previous_checkpoint_and_state_intact() {
    let root = common::temp_dir("crash-write-error");
    let run = root.join("run");
    // One epoch and two steps of the next, then an interruption with a resume state.
    let mut first = train_args(&run);
    first.extend(["--stop-after-steps".to_string(), "6".to_string()]);
    interrupt(&first);
    let before: Vec<(PathBuf, Vec<u8>)> = safetensors_in(&run)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    assert!(before.len() >= 2, "{before:?}");

    // Files over 200 KiB cannot be written (EFBIG, the signal ignored): as a full disk does,
    // the first checkpoint save fails.
    let script = format!(
        "trap '' XFSZ; ulimit -f 400; exec \"$0\" {}",
        resume_args(&run).join(" ")
    );
    let out = Command::new("sh")
        .args(["-c", &script, env!("CARGO_BIN_EXE_slimcandle")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains(".safetensors") && errors[0].contains("cannot write"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    for (path, bytes) in &before {
        assert!(
            std::fs::read(path).unwrap() == *bytes,
            "`{}` changed after a failed write",
            path.display()
        );
    }
    // No temporary file is left behind, and the run still finishes.
    let leftovers: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    finish(&resume_args(&run));
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    std::fs::remove_dir_all(&root).ok();
}

/// A recipe of a training stage (3 epochs of 4 steps) and an int8 quantization stage.
const RECIPE: &str = r#"[model]
arch = "mobilenet_v1"
width = 0.25
stem = "cifar"

[data]
data = "shapes"
train_limit = 64
test_limit = 16

[train]
epochs = 3
batch_size = 16

[[stage]]
name = "train"
kind = "train"

[[stage]]
name = "quantize"
kind = "quantize"
calibration = 16
"#;

/// Every tensor's name, dtype, shape and bytes (metadata, which records times and paths,
/// left out).
fn tensor_contents(path: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let file = TensorFile::read(path).unwrap();
    file.names()
        .into_iter()
        .map(|n| {
            let v = file.raw(&n).unwrap();
            (
                n.clone(),
                format!("{:?}", v.dtype()),
                v.shape().to_vec(),
                v.data().to_vec(),
            )
        })
        .collect()
}

fn all_safetensors(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            all_safetensors(&p, out);
        } else if p.extension().is_some_and(|x| x == "safetensors") {
            out.push(p);
        }
    }
}

#[test]
fn a_killed_recipe_run_resumes_to_the_uninterrupted_result() {
    let root = common::temp_dir("crash-kill9-run");
    let recipe = root.join("r.toml");
    std::fs::write(&recipe, RECIPE).unwrap();
    let args = |out: &Path, resume: bool| -> Vec<String> {
        let mut a: Vec<String> = ["--threads", "1", "run"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend([
            recipe.display().to_string(),
            "-o".into(),
            out.display().to_string(),
        ]);
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let reference = root.join("reference");
    let started = std::time::Instant::now();
    finish(&args(&reference, false));
    let full = started.elapsed();

    let out = root.join("killed");
    let mut rng = slimcandle::rng::Rng::new(61);
    let mut kills = 0;
    for _ in 0..6 {
        let mut child = slimcandle(&args(&out, out.exists())).spawn().unwrap();
        let wait = full.mul_f64(0.1 + 0.3 * rng.uniform());
        std::thread::sleep(wait);
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        let mut files = Vec::new();
        all_safetensors(&out, &mut files);
        for f in files {
            TensorFile::read(&f).unwrap_or_else(|e| panic!("after kill {kills}: {e}"));
        }
    }
    assert!(
        kills >= 2,
        "the recipe finished before it could be killed twice"
    );
    finish(&args(&out, true));
    assert!(
        tensor_contents(&out.join("final.safetensors"))
            == tensor_contents(&reference.join("final.safetensors")),
        "the resumed recipe's int8 model differs from the uninterrupted one's"
    );
    std::fs::remove_dir_all(&root).ok();
}

/// Ctrl-C (a real SIGINT) during training: the current step finishes, the run is saved, the
/// message says how to resume, the exit status is 130, and `--resume` then finishes the run.
#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_resumable_run_and_exits_130() {
    use std::io::{BufRead, BufReader, Read};
    let root = common::temp_dir("crash-sigint");
    let run = root.join("run");
    let mut args = train_args(&run);
    // 2,048 images in steps of 16: long enough (seconds) that the signal lands mid-training.
    let limit = args.iter().position(|a| a == "--train-limit").unwrap() + 1;
    args[limit] = "2048".into();
    let epochs = args.iter().position(|a| a == "--epochs").unwrap() + 1;
    args[epochs] = "2".into();
    let mut child = Command::new(env!("CARGO_BIN_EXE_slimcandle"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Training has started once the "training ... ->" line is on stderr.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 && !line.starts_with("training ") {
        line.clear();
    }
    assert!(line.starts_with("training "), "training never started");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "stdout: {stdout}\nstderr: {rest}");
    assert!(
        stdout.contains(&format!("slimcandle train --resume {}", run.display())),
        "no resume hint in: {stdout}"
    );
    assert!(run.join("resume.safetensors").exists());
    assert!(TensorFile::read(&run.join("last.safetensors")).is_ok());
    finish(&resume_args(&run));
    // Resuming the finished run changes nothing and says so.
    let done = Command::new(env!("CARGO_BIN_EXE_slimcandle"))
        .args(resume_args(&run))
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&done.stdout).to_string() + &String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success() && said.contains("complete"), "{said}");
}
