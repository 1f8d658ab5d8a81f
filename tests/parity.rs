//! Exact parity with the PyTorch references in `../shared/fixtures`.

mod common;

use candle_core::Tensor;
use slimcandle::exec::Mode;
use slimcandle::import::import_state_dict;
use slimcandle::models::ArchOptions;
use slimcandle::tensor_file::TensorFile;

fn max_scaled_error(got: &Tensor, want: &Tensor) -> f32 {
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got.len(), want.len());
    got.iter().zip(&want).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).fold(0.0, f32::max)
}

#[test]
fn logits_match_pytorch_for_every_fixture() {
    let Some(dir) = common::shared_dir("fixtures") else { return };
    let mut failures = Vec::new();
    for name in common::FIXTURES {
        let model = import_state_dict(&dir.join(format!("{name}.safetensors")), name, &ArchOptions::default())
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
    assert!(failures.is_empty(), "logits differ: {failures:?}");
}
