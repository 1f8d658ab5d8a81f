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

/// The tensors (as raw bytes, to edit) and metadata of the safetensors file at `src`.
fn read_parts(src: &Path) -> (HashMap<String, RawTensor>, HashMap<String, String>) {
    let (tensors, metadata) = common::raw_tensors(src);
    (tensors.into_iter().collect(), metadata)
}

/// Rewrites `src` into `dst` after `edit` changes its tensors.
fn rewrite(src: &Path, dst: &Path, edit: &dyn Fn(&mut HashMap<String, RawTensor>)) {
    let (mut tensors, metadata) = read_parts(src);
    edit(&mut tensors);
    write_atomic(dst, tensors.into_iter().collect(), metadata).unwrap();
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

/// `model` with every conv and linear weight (rank >= 2) keeping only the elements whose
/// row-major index is a multiple of `every` (the pattern does not matter to storage).
fn keep_every(model: &Model, every: usize) -> Model {
    let mut pruned = model.deep_copy().unwrap();
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
            .map(|(i, &x)| if i % every == 0 { x } else { 0.0 })
            .collect();
        let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        pruned.weights.insert(&name, &t).unwrap();
    }
    pruned
}

fn load_err(path: &Path) -> String {
    match checkpoint::load_any(path) {
        Ok(_) => panic!("`{}` loaded", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

#[test]
fn pruned_int8_weights_are_stored_as_bitmask_or_gaps() {
    let dir = common::temp_dir("quant-sparse");
    let dense_model = cifar("mobilenet_v2", Some(0.5));
    let dense = dir.join("dense.safetensors");
    store::save(&quantized(&dense_model, &QuantOptions::default()), &dense).unwrap();
    assert_eq!(
        TensorFile::read(&dense).unwrap().metadata["format_version"],
        "3"
    );
    let w = "features.18.0.weight";
    // Half zeros: the bitmask (1/8 byte per code) beats gaps (1/2 byte per stored code), the
    // file stays format 3. 80 % zeros: gaps are smaller, the file is format 4.
    for (every, suffix, version) in [(2, "__sparse_mask", "3"), (5, "__sparse_gaps", "4")] {
        let q = quantized(&keep_every(&dense_model, every), &QuantOptions::default());
        let path = dir.join(format!("keep-every-{every}.safetensors"));
        store::save(&q, &path).unwrap();
        let file = TensorFile::read(&path).unwrap();
        assert_eq!(file.metadata["format_version"], version, "every {every}");
        assert!(
            file.names().contains(&format!("{w}.{suffix}")),
            "every {every}: {:?}",
            file.names()
        );
        let back = load_int8(&path);
        assert_eq!(back.layers, q.layers, "every {every}");
        let x = images(1, 3);
        assert_eq!(logits(&back, &x), logits(&q, &x), "every {every}");
        let (db, sb) = (file_len(&dense), file_len(&path));
        eprintln!("int8 dense {db} bytes, keep 1 in {every}: {sb} bytes");
        assert!((sb as f64) < 0.75 * db as f64, "{sb} vs {db}");
        // A damaged mask or gaps is refused, naming the file and the tensor.
        let bad = dir.join(format!("bad-{every}.safetensors"));
        rewrite(&path, &bad, &|t| {
            let m = t.get_mut(&format!("{w}.{suffix}")).unwrap();
            m.data[0] ^= 0b0000_0010;
        });
        let err = load_err(&bad);
        assert!(
            err.contains(w) && err.contains(bad.to_str().unwrap()) && !err.contains('\n'),
            "{err}"
        );
    }
}

/// The quantization issue's bar: MobileNet V2 (CIFAR stem) with 80 % of its prunable weights
/// zeroed by one-shot global magnitude pruning, in int8, is at most 10 % of the dense fp32
/// file. Untrained: the file's size does not depend on the weights' values beyond their zeros,
/// and magnitude pruning of a fresh model leaves the same per-layer spread of sparsity
/// patterns as a trained one to within the figures docs/benchmarks.md gives.
#[test]
fn sparse_mobilenet_v2_int8_file_is_at_most_10_percent_of_fp32() {
    use slimcandle::prune::magnitude::{MagnitudeConfig, prune_one_shot};
    let dir = common::temp_dir("quant-gaps-size");
    // The CIFAR-10 model of docs/benchmarks.md: 10 classes (the classifier stays dense).
    let spec = ArchSpec::parse(
        "mobilenet_v2",
        &ArchOptions {
            stem: Some(Stem::Cifar),
            num_classes: Some(10),
            ..Default::default()
        },
    )
    .unwrap();
    let dense = Model::init(&spec, 1).unwrap();
    let fp32 = dir.join("fp32.safetensors");
    checkpoint::save(&dense, &fp32).unwrap();
    let pruned = dense.deep_copy().unwrap();
    prune_one_shot(&pruned, &MagnitudeConfig::new(0.8)).unwrap();
    let q = quantized(&pruned, &QuantOptions::default());
    let int8 = dir.join("int8.safetensors");
    store::save(&q, &int8).unwrap();
    let (fb, ib) = (file_len(&fp32), file_len(&int8));
    let file = TensorFile::read(&int8).unwrap();
    let bytes = |suffix: &str| -> usize {
        file.names()
            .iter()
            .filter(|n| n.ends_with(suffix))
            .map(|n| file.raw(n).unwrap().data().len())
            .sum()
    };
    let data: usize = file
        .names()
        .iter()
        .map(|n| file.raw(n).unwrap().data().len())
        .sum();
    eprintln!(
        "mobilenet_v2 80% sparse: fp32 {fb} bytes, int8 {ib} bytes ({:.2} %): values {} (+fillers), gaps {}, mask {}, dense weights {}, scales {}, biases {}, header and rest {}",
        100.0 * ib as f64 / fb as f64,
        bytes(".__sparse_values"),
        bytes(".__sparse_gaps"),
        bytes(".__sparse_mask"),
        bytes(".weight"),
        bytes(".weight_scale"),
        bytes(".bias"),
        ib as usize - data + bytes("activation_scale") + bytes("activation_zero_point"),
    );
    assert_eq!(file.metadata["format_version"], "4");
    assert!(bytes(".__sparse_gaps") > 0);
    assert!(ib * 10 <= fb, "{ib} bytes is over 10 % of {fb}");
    let back = load_int8(&int8);
    assert_eq!(back.layers, q.layers);
    let x = images(2, 5);
    assert_eq!(logits(&back, &x), logits(&q, &x));
}

/// Every inconsistency in a gap-coded weight is one error naming the file and the tensor.
#[test]
fn damaged_gap_coded_weights_give_one_line_errors() {
    let dir = common::temp_dir("quant-gaps-damage");
    let good = dir.join("good.safetensors");
    let q = quantized(
        &keep_every(&cifar("mobilenet_v2", Some(0.5)), 5),
        &QuantOptions::default(),
    );
    store::save(&q, &good).unwrap();
    assert_eq!(
        TensorFile::read(&good).unwrap().metadata["format_version"],
        "4"
    );
    // A 1x1 conv; its entries as written, to pick ones whose edit has a known effect.
    let w = "features.16.conv.2.weight";
    let n = q.layers["features.16.conv.2"].weight.values.len();
    let gaps = format!("{w}.__sparse_gaps");
    let values = format!("{w}.__sparse_values");
    let (gap_bytes, codes) = {
        let file = TensorFile::read(&good).unwrap();
        let g = file.raw(&gaps).unwrap().data().to_vec();
        let v = file.raw(&values).unwrap().data().to_vec();
        (g, v)
    };
    let k = codes.len();
    let gap = |i: usize| (gap_bytes[i / 2] >> (4 * (i % 2))) & 0x0f;
    // A stored non-zero code (not the last entry) after at least one zero.
    let i = (1..k - 1)
        .find(|&i| codes[i] != 0 && (1..15).contains(&gap(i)))
        .expect("a code after a short run of zeros");
    type Edit = Box<dyn Fn(&mut HashMap<String, RawTensor>)>;
    let set_gap = |i: usize, g: u8| -> Edit {
        let gaps = gaps.clone();
        Box::new(move |t| {
            let b = &mut t.get_mut(&gaps).unwrap().data[i / 2];
            let shift = 4 * (i % 2);
            *b = (*b & !(0x0f << shift)) | (g << shift);
        })
    };
    let (g2, v2, v3) = (gaps.clone(), values.clone(), values.clone());
    let (v4, v5, v6, g6) = (values.clone(), values.clone(), values.clone(), gaps.clone());
    let (g7, v7) = (gaps.clone(), values.clone());
    let cases: Vec<(&str, Edit, String)> = vec![
        // A longer gap moves every later entry on: the last one lands past the end.
        (
            "past-the-end",
            set_gap(i, 15),
            format!("past the tensor's {n} elements"),
        ),
        (
            "short",
            set_gap(i, gap(i) - 1),
            format!("cover {} of the tensor's {n} elements", n - 1),
        ),
        // A stored zero code inside the tensor is a filler and must skip 15.
        (
            "filler-gap",
            Box::new(move |t| t.get_mut(&v2).unwrap().data[i] = 0),
            format!("entry {i} is a filler (code 0) with gap {}", gap(i)),
        ),
        (
            "odd-padding",
            Box::new(move |t| {
                // With an even count, drop the last entry: its gap's nibble becomes padding.
                if k % 2 == 0 {
                    let v = t.get_mut(&v3).unwrap();
                    v.data.pop();
                    v.shape[0] -= 1;
                }
                let g = t.get_mut(&g2).unwrap();
                *g.data.last_mut().unwrap() |= 0x40;
            }),
            "padding nibble".into(),
        ),
        (
            "count-mismatch",
            Box::new(move |t| {
                let v = t.get_mut(&v4).unwrap();
                v.data.extend([1, 1, 1]);
                v.shape[0] += 3;
            }),
            format!("expected [{}]", (k + 3).div_ceil(2)),
        ),
        (
            "minus-128",
            Box::new(move |t| t.get_mut(&v5).unwrap().data[0] = 0x80),
            "-128".into(),
        ),
        (
            "no-values",
            Box::new(move |t| {
                t.remove(&v6);
            }),
            format!("has no tensor `{w}.__sparse_values`"),
        ),
        (
            "values-2d",
            Box::new(move |t| {
                let v = t.get_mut(&v7).unwrap();
                v.shape = vec![1, v.shape[0]];
            }),
            "expected one dimension".into(),
        ),
        (
            "gaps-dtype",
            Box::new(move |t| t.get_mut(&g6).unwrap().dtype = safetensors::Dtype::I8),
            "expected U8".into(),
        ),
        (
            "gaps-and-mask",
            Box::new(move |t| {
                let mask = RawTensor {
                    dtype: safetensors::Dtype::U8,
                    shape: vec![n.div_ceil(8)],
                    data: vec![0; n.div_ceil(8)],
                };
                t.insert(format!("{w}.__sparse_mask"), mask);
            }),
            "has both".into(),
        ),
        // Values whose gaps are missing: neither sparse form, and no dense weight.
        (
            "values-without-gaps",
            Box::new(move |t| {
                t.remove(&g7);
            }),
            format!("has no tensor `{w}`"),
        ),
    ];
    for (name, edit, want) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        rewrite(&good, &path, &*edit);
        let err = load_err(&path);
        assert!(err.contains(&want), "{name}: {err}");
        assert!(err.contains(path.to_str().unwrap()), "{name}: {err}");
        assert!(!err.contains('\n'), "{name}: {err}");
    }
    // Gap coding in a file that says format 3 (which has no gaps) is refused as such, and a
    // format newer than this reader's is refused with "upgrade", before its tensors are read
    // (as version 3 readers refuse format 4).
    for (version, want) in [
        (
            "3",
            "is gap-coded, which is format 4, but the file says format 3",
        ),
        (
            "5",
            "uses checkpoint format 5; this slimcandle reads up to 4: upgrade slimcandle",
        ),
    ] {
        let (tensors, mut metadata) = read_parts(&good);
        metadata.insert("format_version".into(), version.into());
        let path = dir.join(format!("version-{version}.safetensors"));
        write_atomic(&path, tensors.into_iter().collect(), metadata).unwrap();
        let err = load_err(&path);
        assert!(
            err.contains(want) && err.contains(path.to_str().unwrap()),
            "{err}"
        );
    }
}
