//! Checkpoint format 3 (int8): a quantized model reloads with no recipe and runs the same;
//! damaged files give one-line errors naming the file; the file is about a quarter of the
//! float one.

mod common;

use candle_core::{Device, Tensor};
use slimcandle::checkpoint::{self, AnyModel};
use slimcandle::model::Model;
use slimcandle::models::{ArchOptions, ArchSpec, Stem};
use slimcandle::passes::quant::{self, Granularity, QuantOptions, QuantizedModel, store};
use slimcandle::prune::pattern::parse_list;
use slimcandle::rng::Rng;
use slimcandle::tensor_file::{RawTensor, TensorFile, write_atomic};
use std::collections::HashMap;
use std::path::Path;

fn cifar(arch: &str, width: Option<f64>) -> Model {
    let spec = ArchSpec::parse(
        arch,
        &ArchOptions {
            width,
            stem: Some(Stem::Cifar),
            ..Default::default()
        },
    )
    .unwrap();
    Model::init(&spec, 1).unwrap()
}

fn images(n: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<f32> = (0..n * 3 * 32 * 32).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, (n, 3, 32, 32), &Device::Cpu).unwrap()
}

fn quantized(model: &Model, opts: &QuantOptions) -> QuantizedModel {
    quant::quantize(model, [Ok(images(4, 1))], opts, |_| {}).unwrap()
}

fn logits(q: &QuantizedModel, x: &Tensor) -> Vec<f32> {
    quant::forward(q, x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn load_int8(path: &Path) -> QuantizedModel {
    match checkpoint::load_any(path).unwrap() {
        AnyModel::Int8(q) => q,
        AnyModel::Float(_) => panic!("an int8 file loads as int8"),
    }
}

#[test]
fn int8_checkpoints_reload_and_run_the_same() {
    let dir = common::temp_dir("quant-roundtrip");
    let x = images(2, 9);
    for (arch, width, granularity, keep) in [
        ("mobilenet_v2", Some(0.25), Granularity::PerChannel, ""),
        ("shufflenet_v2_x0_5", None, Granularity::PerTensor, "fc"),
        (
            "mobilenet_v3_small",
            Some(0.25),
            Granularity::PerChannel,
            "features.0.*",
        ),
    ] {
        let model = cifar(arch, width);
        let opts = QuantOptions {
            granularity,
            keep_float: parse_list(keep).unwrap(),
            ..QuantOptions::default()
        };
        let q = quantized(&model, &opts);
        assert_eq!(q.float_layers.is_empty(), keep.is_empty(), "{arch}");
        let path = dir.join(format!("{arch}.safetensors"));
        store::save(&q, &path).unwrap();
        let back = load_int8(&path);
        assert_eq!(back.graph, q.graph, "{arch}");
        assert_eq!(back.activations, q.activations, "{arch}");
        assert_eq!(back.fused, q.fused, "{arch}");
        assert_eq!(back.layers, q.layers, "{arch}");
        assert_eq!(back.float_layers, q.float_layers, "{arch}");
        assert_eq!(back.scheme, q.scheme, "{arch}");
        assert_eq!(back.meta, q.meta, "{arch}");
        assert_eq!(logits(&back, &x), logits(&q, &x), "{arch}");
        // A classifier kept in float leaves the logits float.
        if keep == "fc" {
            assert_eq!(back.activations[back.graph.output], None);
        }
        let file = TensorFile::read(&path).unwrap();
        assert_eq!(file.metadata["format_version"], "3");
        // The float loader refuses it in one line.
        let err = format!("{:#}", checkpoint::load(&path).err().unwrap());
        assert!(
            err.contains("int8") && err.contains(path.to_str().unwrap()),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }
    // A float file still loads as float.
    let path = dir.join("float.safetensors");
    checkpoint::save(&cifar("mobilenet_v2", Some(0.25)), &path).unwrap();
    assert!(matches!(
        checkpoint::load_any(&path).unwrap(),
        AnyModel::Float(_)
    ));
}

#[test]
fn mobilenet_v2_int8_file_is_at_most_27_percent_of_fp32() {
    let dir = common::temp_dir("quant-size");
    let model = cifar("mobilenet_v2", None);
    let (f, i) = (dir.join("f.safetensors"), dir.join("i.safetensors"));
    checkpoint::save(&model, &f).unwrap();
    store::save(&quantized(&model, &QuantOptions::default()), &i).unwrap();
    let (fb, ib) = (
        std::fs::metadata(&f).unwrap().len(),
        std::fs::metadata(&i).unwrap().len(),
    );
    let ratio = ib as f64 / fb as f64;
    eprintln!(
        "mobilenet_v2: fp32 {fb} bytes, int8 {ib} bytes ({:.1} %)",
        ratio * 100.0
    );
    assert!(ratio <= 0.27, "{ratio}");
}

/// Rewrites `src` into `dst` after `edit` changes its tensors.
fn rewrite(src: &Path, dst: &Path, edit: &dyn Fn(&mut HashMap<String, RawTensor>)) {
    let file = TensorFile::read(src).unwrap();
    let mut tensors: HashMap<String, RawTensor> = file
        .names()
        .into_iter()
        .map(|n| {
            let v = file.raw(&n).unwrap();
            (
                n.clone(),
                RawTensor {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            )
        })
        .collect();
    edit(&mut tensors);
    write_atomic(dst, tensors.into_iter().collect(), file.metadata.clone()).unwrap();
}

#[test]
fn damaged_int8_checkpoints_give_one_line_errors() {
    let dir = common::temp_dir("quant-damage");
    let good = dir.join("good.safetensors");
    store::save(
        &quantized(&cifar("mobilenet_v2", Some(0.25)), &QuantOptions::default()),
        &good,
    )
    .unwrap();
    let layer = "features.1.conv.0.0";
    type Edit = Box<dyn Fn(&mut HashMap<String, RawTensor>)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "short-scales",
            Box::new(move |t| {
                let s = t.get_mut(&format!("{layer}.weight_scale")).unwrap();
                s.data.truncate(8);
                s.shape = vec![2];
            }),
            "has 2 scales",
        ),
        (
            "zero-scale",
            Box::new(move |t| {
                let s = t.get_mut(&format!("{layer}.weight_scale")).unwrap();
                s.data[..4].copy_from_slice(&0f32.to_le_bytes());
            }),
            "scales must be positive",
        ),
        (
            "negative-activation-scale",
            Box::new(|t| {
                let s = t.get_mut(store::ACTIVATION_SCALE).unwrap();
                s.data[4..8].copy_from_slice(&(-1f32).to_le_bytes());
            }),
            "scales must be positive",
        ),
        (
            "missing-bias",
            Box::new(move |t| {
                t.remove(&format!("{layer}.bias"));
            }),
            "has no tensor `features.1.conv.0.0.bias`",
        ),
        (
            "float-bias",
            Box::new(move |t| {
                let b = t.get_mut(&format!("{layer}.bias")).unwrap();
                b.dtype = safetensors::Dtype::F32;
            }),
            "expected I32",
        ),
        (
            "minus-128",
            Box::new(move |t| {
                t.get_mut(&format!("{layer}.weight")).unwrap().data[0] = 0x80;
            }),
            "-128",
        ),
    ];
    for (name, edit, want) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        rewrite(&good, &path, &*edit);
        let err = match checkpoint::load_any(&path) {
            Ok(_) => panic!("{name}: loaded"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(want), "{name}: {err}");
        assert!(err.contains(path.to_str().unwrap()), "{name}: {err}");
        assert!(!err.contains('\n'), "{name}: {err}");
    }
}

#[test]
fn pruned_int8_weights_are_stored_as_bitmask_and_values() {
    let dir = common::temp_dir("quant-sparse");
    let dense_model = cifar("mobilenet_v2", Some(0.5));
    let mut pruned = dense_model.deep_copy().unwrap();
    // Zero 80 % of every conv and linear weight (by position: the pattern does not matter).
    let names: Vec<String> = pruned
        .weights
        .names()
        .filter(|n| n.ends_with(".weight"))
        .map(String::from)
        .collect();
    for name in names {
        let t = pruned.weights.get(&name).unwrap();
        if t.rank() < 2 {
            continue;
        }
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f32> = v
            .iter()
            .enumerate()
            .map(|(i, &x)| if i % 5 == 0 { x } else { 0.0 })
            .collect();
        let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        pruned.weights.insert(&name, &t).unwrap();
    }
    let (dense, sparse) = (
        dir.join("dense.safetensors"),
        dir.join("sparse.safetensors"),
    );
    store::save(&quantized(&dense_model, &QuantOptions::default()), &dense).unwrap();
    let q = quantized(&pruned, &QuantOptions::default());
    store::save(&q, &sparse).unwrap();
    let file = TensorFile::read(&sparse).unwrap();
    assert!(
        file.names()
            .iter()
            .any(|n| n == "features.18.0.weight.__sparse_mask")
    );
    let back = load_int8(&sparse);
    assert_eq!(back.layers, q.layers);
    let x = images(1, 3);
    assert_eq!(logits(&back, &x), logits(&q, &x));
    let (db, sb) = (
        std::fs::metadata(&dense).unwrap().len(),
        std::fs::metadata(&sparse).unwrap().len(),
    );
    eprintln!("int8 dense {db} bytes, 80 % zeros sparse {sb} bytes");
    assert!((sb as f64) < 0.5 * db as f64, "{sb} vs {db}");
    // A damaged mask is refused, naming the file and the tensor.
    let bad = dir.join("bad-mask.safetensors");
    rewrite(&sparse, &bad, &|t| {
        let m = t.get_mut("features.18.0.weight.__sparse_mask").unwrap();
        m.data[0] ^= 0b0000_0010;
    });
    let err = match checkpoint::load_any(&bad) {
        Ok(_) => panic!("loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("features.18.0.weight") && err.contains(bad.to_str().unwrap()),
        "{err}"
    );
}
