//! Helpers shared by the integration tests.
#![allow(dead_code)]

use slimcandle::models::ArchOptions;
use std::path::PathBuf;

/// `../shared` next to the crate, or `None` (with a printed reason) when it is absent.
/// With `SLIMCANDLE_REQUIRE_SHARED=1` (set by CI) a missing folder fails the test instead.
pub fn shared_dir(sub: &str) -> Option<PathBuf> {
    let root = std::env::var_os("SLIMCANDLE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let dir = root.join(sub);
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("SLIMCANDLE_REQUIRE_SHARED").is_ok_and(|v| v == "1") {
        panic!(
            "SLIMCANDLE_REQUIRE_SHARED=1 but `{}` is missing",
            dir.display()
        );
    }
    eprintln!(
        "skipping: `{}` is not present (shared fixtures are only on development machines and CI)",
        dir.display()
    );
    None
}

/// A fresh temporary folder for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("slimcandle-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub const FIXTURES: [&str; 9] = [
    "squeezenet1_0",
    "squeezenet1_1",
    "mobilenet_v1",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "shufflenet_v1_g3",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
];

/// Fixture name to architecture: `mobilenet_v2_w0_5` -> (`mobilenet_v2`, width 0.5),
/// `shufflenet_v1_g8_w0_5` -> (`shufflenet_v1_g8`, width 0.5); other names parse as they are.
pub fn arch_of(name: &str) -> (String, ArchOptions) {
    match name.rsplit_once("_w") {
        Some((arch, w)) if w.contains('_') => {
            let width = w.replace('_', ".").parse().unwrap();
            (
                arch.to_string(),
                ArchOptions {
                    width: Some(width),
                    ..Default::default()
                },
            )
        }
        _ => (name.to_string(), ArchOptions::default()),
    }
}

/// Runs the `slimcandle` binary built for these tests.
pub fn slimcandle(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_slimcandle"))
        .args(args)
        .output()
        .expect("binary runs")
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let o = slimcandle(args);
    assert!(
        o.status.success(),
        "slimcandle {args:?} failed:\n{}",
        stderr(&o)
    );
    stdout(&o)
}

/// A path as a command-line argument.
pub fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// A tensor's values in f64, flattened.
pub fn values_f64(t: &candle_core::Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |got - want| / max(max |want|, floor), in f64; infinite if any difference is NaN.
pub fn scaled_error(got: &candle_core::Tensor, want: &candle_core::Tensor, floor: f64) -> f64 {
    assert_eq!(got.dims(), want.dims());
    let (g, w) = (values_f64(got), values_f64(want));
    let scale = w.iter().fold(floor.max(1e-12), |m, v| m.max(v.abs()));
    let err = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0.0,
            |m: f64, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
        );
    err / scale
}

/// The tensors of the safetensors file at `path` as raw bytes (to edit and write back with
/// `tensor_file::write_atomic`), and its metadata.
pub fn raw_tensors(
    path: &std::path::Path,
) -> (
    std::collections::BTreeMap<String, slimcandle::tensor_file::RawTensor>,
    std::collections::HashMap<String, String>,
) {
    let file = slimcandle::tensor_file::TensorFile::read(path).unwrap();
    let tensors = file
        .names()
        .into_iter()
        .map(|n| {
            let v = file.raw(&n).unwrap();
            let t = slimcandle::tensor_file::RawTensor {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            };
            (n, t)
        })
        .collect();
    (tensors, file.metadata.clone())
}
