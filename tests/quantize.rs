//! Post-training int8 quantization on the shared reference fixtures: after calibration on the
//! fixture inputs, the simulated int8 logits stay close to the float logits for every family.
//!
//! The fixtures are untrained networks with randomised batch-norm statistics, whose logits
//! span about 2 units with no class margin to speak of, so per-tensor uint8 activations move
//! them by a visible fraction (measured: at most 0.64 of the logits' largest magnitude, for
//! the deep MobileNets and ShuffleNet V2 x1.0; about 0.01-0.09 for SqueezeNet and ShuffleNet
//! V1; top-1 agrees on 47 of 54 images x calibrators). The bounds below are those figures
//! with a margin; the exactness of the integer arithmetic is tested in `simulate.rs`.

mod common;

use candle_core::Tensor;
use slimcandle::exec::Mode;
use slimcandle::import::import_state_dict;
use slimcandle::passes::quant::{self, Calibrator, Granularity, QuantOptions};
use slimcandle::tensor_file::TensorFile;

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

#[test]
fn simulated_int8_logits_follow_the_float_logits_for_every_family() {
    let Some(dir) = common::shared_dir("fixtures") else {
        return;
    };
    let mut report = Vec::new();
    let (mut agree_all, mut total) = (0, 0);
    for name in common::FIXTURES {
        let (arch, opts) = common::arch_of(name);
        let model =
            import_state_dict(&dir.join(format!("{name}.safetensors")), &arch, &opts).unwrap();
        let io = TensorFile::read(&dir.join(format!("{name}.io.safetensors"))).unwrap();
        let inputs: Vec<Tensor> = [96, 113]
            .iter()
            .map(|s| io.tensor_f32(&format!("input_{s}")).unwrap())
            .collect();
        for calibrator in [
            Calibrator::Minmax,
            Calibrator::Percentile { percentile: 99.99 },
        ] {
            let qopts = QuantOptions {
                granularity: Granularity::PerChannel,
                calibrator,
                keep_float: Vec::new(),
            };
            let q =
                quant::quantize(&model, inputs.iter().cloned().map(Ok), &qopts, |_| {}).unwrap();
            let mut worst = 0f32;
            let mut agree = 0;
            for x in &inputs {
                let want = values(&model.forward(x, Mode::Eval).unwrap());
                let got = values(&quant::forward(&q, x).unwrap());
                let span = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (w, g) in want.chunks(10).zip(got.chunks(10)) {
                    agree += usize::from(argmax(w) == argmax(g));
                }
                let err = want
                    .iter()
                    .zip(&got)
                    .map(|(w, g)| (w - g).abs() / span)
                    .fold(0f32, f32::max);
                worst = worst.max(err);
            }
            agree_all += agree;
            total += 3;
            assert!(
                worst < 0.75,
                "{name} {}: int8 logits differ by {worst} of their range",
                calibrator.name()
            );
            report.push(format!(
                "{name} {}: max error {worst:.4} of the logits' range, top-1 {agree}/3",
                calibrator.name()
            ));
            eprintln!("{}", report.last().unwrap());
        }
    }
    assert!(
        agree_all * 100 >= total * 80,
        "top-1 agrees on only {agree_all} of {total}: {report:#?}"
    );
}
