//! ONNX export: tract loads and runs the float export of every shared fixture (and of a
//! channel-pruned model) with logits within 1e-4 of ours; the int8 QDQ export carries the
//! checkpoint's exact codes and qparams; bad options fail with one line and leave no file.
//! onnxruntime checks (QDQ numerics, the ONNX checker) are in `bench/verify_onnx.py`.

mod common;

use candle_core::Tensor;
use slimcandle::checkpoint::AnyModel;
use slimcandle::exec::Mode;
use slimcandle::export::{Batch, OnnxOptions, onnx_bytes, proto::decode_model};
use slimcandle::import::import_state_dict;
use slimcandle::model::Model;
use slimcandle::tensor_file::TensorFile;
use tract_onnx::prelude::*;

/// Runs `bytes` in tract on `x` (N x C x H x W) and returns the flat output.
fn run_in_tract(bytes: &[u8], x: &Tensor) -> Vec<f32> {
    let dims = x.dims().to_vec();
    let values: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .unwrap()
        .with_input_fact(0, f32::fact(&dims).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let input = tract_ndarray::ArrayD::from_shape_vec(dims, values).unwrap();
    let input = tract_onnx::prelude::Tensor::from(input).into_tvalue();
    let out = plan.run(tvec!(input)).unwrap();
    out[0]
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

fn options(batch: Batch, size: usize) -> OnnxOptions {
    OnnxOptions {
        opset: 17,
        batch,
        input_size: [size, size],
    }
}

/// Largest |got - want| / max(1, |want|).
fn max_scaled_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
        .fold(0.0, f32::max)
}

fn ours(model: &Model, x: &Tensor) -> Vec<f32> {
    let y = model.forward(x, Mode::Eval).unwrap();
    y.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn tract_runs_the_float_export_of_every_fixture() {
    let Some(dir) = common::shared_dir("fixtures") else {
        return;
    };
    let mut failures = Vec::new();
    for name in common::FIXTURES {
        let (arch, opts) = common::arch_of(name);
        let any = AnyModel::Float(
            import_state_dict(&dir.join(format!("{name}.safetensors")), &arch, &opts).unwrap(),
        );
        let AnyModel::Float(model) = &any else {
            unreachable!()
        };
        let io = TensorFile::read(&dir.join(format!("{name}.io.safetensors"))).unwrap();
        // 96 with a dynamic batch (2 images), 113 (odd sizes exercise ceil-mode pooling) fixed.
        for (size, batch) in [(96, Batch::Dynamic), (113, Batch::Fixed(1))] {
            let x = io.tensor_f32(&format!("input_{size}")).unwrap();
            let bytes = onnx_bytes(&any, &options(batch, size)).unwrap();
            let got = run_in_tract(&bytes, &x);
            let err = max_scaled_error(&got, &ours(model, &x));
            let torch: Vec<f32> = io
                .tensor_f32(&format!("logits_{size}"))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let err_torch = max_scaled_error(&got, &torch);
            eprintln!("{name} @{size}: tract vs ours {err:.2e}, vs PyTorch {err_torch:.2e}");
            if err > 1e-4 || err_torch > 1e-4 {
                failures.push(format!("{name} @{size}: {err:.2e} / {err_torch:.2e}"));
            }
        }
    }
    assert!(failures.is_empty(), "tract disagrees: {failures:?}");
}

/// A fixture model and its two inputs.
fn fixture(name: &str) -> Option<(Model, TensorFile)> {
    let dir = common::shared_dir("fixtures")?;
    let (arch, opts) = common::arch_of(name);
    let model = import_state_dict(&dir.join(format!("{name}.safetensors")), &arch, &opts).unwrap();
    let io = TensorFile::read(&dir.join(format!("{name}.io.safetensors"))).unwrap();
    Some((model, io))
}

/// A channel-pruned model (smaller shapes) exports with its own shapes and runs in tract.
#[test]
fn tract_runs_the_export_of_a_pruned_model() {
    use slimcandle::prune::plan::{PlanConfig, Target};
    use slimcandle::prune::{ChannelPruneConfig, prune_channels};
    let Some((model, io)) = fixture("mobilenet_v2") else {
        return;
    };
    let cfg = ChannelPruneConfig {
        criterion: slimcandle::prune::importance::Criterion::L1,
        plan: PlanConfig {
            target: Target::Macs(0.5),
            ..Default::default()
        },
        seed: 0,
    };
    let (pruned, _) = prune_channels(&model, &cfg, None).unwrap();
    let x = io.tensor_f32("input_96").unwrap();
    let any = AnyModel::Float(pruned);
    let AnyModel::Float(pruned) = &any else {
        unreachable!()
    };
    let bytes = onnx_bytes(&any, &options(Batch::Dynamic, 96)).unwrap();
    // The initializers have the pruned shapes, under the state-dict names.
    let proto = decode_model(&bytes).unwrap();
    let graph = proto.graph.unwrap();
    for spec in pruned.graph.param_specs() {
        let init = graph
            .initializer
            .iter()
            .find(|t| t.name == spec.name)
            .unwrap_or_else(|| panic!("no initializer {}", spec.name));
        let dims: Vec<usize> = init.dims.iter().map(|&d| d as usize).collect();
        assert_eq!(dims, spec.shape, "{}", spec.name);
    }
    assert!(pruned.graph.param_specs().len() < graph.initializer.len() + 1);
    let err = max_scaled_error(&run_in_tract(&bytes, &x), &ours(pruned, &x));
    eprintln!("pruned mobilenet_v2 @96: tract vs ours {err:.2e}");
    assert!(err <= 1e-4, "pruned export disagrees: {err:.2e}");
}

/// The QDQ export holds exactly the checkpoint's int8 codes, int32 biases and activation
/// qparams, and (per tensor, the only form tract reads correctly) computes what our integer
/// engine does within one output quantization step.
#[test]
fn int8_export_carries_the_checkpoint_integers() {
    use slimcandle::passes::quant::{self, Granularity, QuantOptions};
    let Some((model, io)) = fixture("mobilenet_v3_small") else {
        return;
    };
    let x = io.tensor_f32("input_96").unwrap();
    let calib = [x.clone(), io.tensor_f32("input_113").unwrap()];
    for granularity in [Granularity::PerChannel, Granularity::PerTensor] {
        let qopts = QuantOptions {
            granularity,
            ..Default::default()
        };
        let q = quant::quantize(&model, calib.iter().cloned().map(Ok), &qopts, |_| {}).unwrap();
        let any = AnyModel::Int8(q);
        let AnyModel::Int8(q) = &any else {
            unreachable!()
        };
        let bytes = onnx_bytes(&any, &options(Batch::Dynamic, 96)).unwrap();
        let graph = decode_model(&bytes).unwrap().graph.unwrap();
        let init = |name: &str| {
            graph
                .initializer
                .iter()
                .find(|t| t.name == name)
                .unwrap_or_else(|| panic!("no initializer {name}"))
        };
        for (name, layer) in &q.layers {
            let w = init(&format!("{name}.weight"));
            let codes: Vec<i8> = w.raw_data.iter().map(|&b| b as i8).collect();
            assert_eq!(codes, layer.weight.values, "{name}.weight");
            let scales: Vec<f32> = init(&format!("{name}.weight_scale"))
                .raw_data
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(scales, layer.weight.scales, "{name}.weight_scale");
            let bias: Vec<i32> = init(&format!("{name}.bias"))
                .raw_data
                .chunks(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(bias, layer.bias, "{name}.bias");
        }
        for (id, node) in q.graph.nodes.iter().enumerate() {
            let Some(qp) = q.activations[id] else {
                continue;
            };
            if q.is_fused_away(id) {
                continue;
            }
            let scale = init(&format!("{}.scale", node.name));
            assert_eq!(scale.raw_data, qp.scale.to_le_bytes(), "{}", node.name);
            let zp = init(&format!("{}.zero_point", node.name));
            assert_eq!(zp.raw_data, vec![qp.zero_point], "{}", node.name);
        }
        let quantize_nodes = graph
            .node
            .iter()
            .filter(|n| n.op_type == "QuantizeLinear")
            .count();
        assert!(quantize_nodes > 30, "{quantize_nodes} QuantizeLinear nodes");
        if granularity == Granularity::PerTensor {
            let got = run_in_tract(&bytes, &x);
            let want: Vec<f32> = quant::forward(q, &x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let step = q.activations[q.graph.output].unwrap().scale;
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs() / step)
                .fold(0.0, f32::max);
            eprintln!("per-tensor int8 in tract: worst difference {worst:.2} steps");
            assert!(worst <= 1.01, "{worst} quantization steps apart");
        }
    }
}

/// The torch state dict has exactly the keys and values of the PyTorch state dict it came
/// from (num_batches_tracked included), and no slimcandle metadata.
#[test]
fn torch_state_dict_matches_the_original() {
    let Some(dir) = common::shared_dir("fixtures") else {
        return;
    };
    let name = "shufflenet_v2_x0_5";
    let (model, _) = fixture(name).unwrap();
    let out = common::temp_dir("torch-export").join("sd.safetensors");
    slimcandle::export::torch::write_state_dict(&model, &out).unwrap();
    let got = TensorFile::read(&out).unwrap();
    let want = TensorFile::read(&dir.join(format!("{name}.safetensors"))).unwrap();
    let mut got_names = got.names();
    let mut want_names = want.names();
    got_names.sort();
    want_names.sort();
    assert_eq!(got_names, want_names);
    for n in &want_names {
        let (g, w) = (got.raw(n).unwrap(), want.raw(n).unwrap());
        assert_eq!(g.shape(), w.shape(), "{n}");
        if n.ends_with("num_batches_tracked") {
            assert_eq!(g.dtype(), safetensors::Dtype::I64);
            continue;
        }
        assert_eq!(g.data(), w.data(), "{n}");
    }
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let keys: Vec<String> = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_keys()
        .collect();
    assert_eq!(keys, vec!["format".to_string()]);
}

/// Bad options: one line, exit 1 or 2, and no file written.
#[test]
fn export_errors_are_one_line_and_leave_no_file() {
    let Some((model, _)) = fixture("mobilenet_v3_small") else {
        return;
    };
    let dir = common::temp_dir("export-errors");
    let ckpt = dir.join("m.safetensors");
    slimcandle::checkpoint::save(&model, &ckpt).unwrap();
    let ckpt = ckpt.to_str().unwrap();
    let out = dir.join("m.onnx");
    let out_s = out.to_str().unwrap();
    let cases: [(&[&str], i32, &str); 4] = [
        (&["--opset", "13"], 1, "needs opset 14"),
        (&["--format", "tflite"], 2, "tflite"),
        (&["--batch", "zero"], 2, "dynamic"),
        (&["--opset", "12"], 1, "opsets 13 to 21"),
    ];
    for (extra, code, text) in cases {
        let mut args = vec!["export", ckpt, "-o", out_s];
        args.extend_from_slice(extra);
        let o = common::slimcandle(&args);
        let err = common::stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{extra:?}: {err}");
        assert!(err.contains(text), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} left a file");
    }
    let o = common::slimcandle(&["export", ckpt, "-o", "/nonexistent-dir/m.onnx"]);
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // And the happy path writes a model tract reads.
    let o = common::slimcandle(&["export", ckpt, "-o", out_s, "--batch", "1"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let proto = decode_model(&std::fs::read(&out).unwrap()).unwrap();
    let classes = proto
        .metadata_props
        .iter()
        .find(|p| p.key == "class_names")
        .unwrap();
    assert!(classes.value.starts_with('['));
    assert_eq!(proto.opset_import[0].version, 17);
}
