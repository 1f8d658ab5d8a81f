//! Exact parity with PyTorch: every `NAME.io.safetensors` in a fixture folder holds inputs and
//! eval-mode logits of the reference model whose state dict is `NAME.safetensors`.
//! Folders: `../shared/fixtures` (the nine reference models), `tests/fixtures` (small extra
//! widths and groups made by `scripts/make_reference_fixtures.py`), and, when set,
//! `$SLIMCANDLE_EXTRA_FIXTURES` (the script's full output).

mod common;

use candle_core::Tensor;
use slimcandle::exec::Mode;
use slimcandle::import::import_state_dict;
use slimcandle::tensor_file::TensorFile;
use std::path::Path;

fn max_scaled_error(got: &Tensor, want: &Tensor) -> f32 {
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
        .fold(0.0, f32::max)
}

/// Checks every fixture in `dir`; returns the names checked.
fn check_fixture_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .strip_suffix(".io.safetensors")
                .map(String::from)
        })
        .collect();
    names.sort();
    let mut failures = Vec::new();
    for name in &names {
        let (arch, opts) = common::arch_of(name);
        let model = import_state_dict(&dir.join(format!("{name}.safetensors")), &arch, &opts)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let io = TensorFile::read(&dir.join(format!("{name}.io.safetensors"))).unwrap();
        for size in [96, 113] {
            let x = io.tensor_f32(&format!("input_{size}")).unwrap();
            let want = io.tensor_f32(&format!("logits_{size}")).unwrap();
            let got = model.forward(&x, Mode::Eval).unwrap();
            let err = max_scaled_error(&got, &want);
            eprintln!("{name} @{size}: max scaled error {err:.2e}");
            if err > 1e-4 {
                failures.push(format!("{name} @{size}: {err:.2e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "logits differ from PyTorch: {failures:?}"
    );
    names
}

#[test]
fn logits_match_pytorch_for_the_shared_fixtures() {
    let Some(dir) = common::shared_dir("fixtures") else {
        return;
    };
    let checked = check_fixture_dir(&dir);
    for name in common::FIXTURES {
        assert!(
            checked.iter().any(|c| c == name),
            "shared fixture {name} is missing"
        );
    }
}

#[test]
fn logits_match_pytorch_for_other_widths_and_groups() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    assert!(check_fixture_dir(&dir).len() >= 3);
}

#[test]
fn logits_match_pytorch_for_extra_fixtures_when_given() {
    match std::env::var_os("SLIMCANDLE_EXTRA_FIXTURES") {
        Some(dir) => {
            check_fixture_dir(Path::new(&dir));
        }
        None => eprintln!("skipping: SLIMCANDLE_EXTRA_FIXTURES is not set"),
    }
}
