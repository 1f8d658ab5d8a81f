//! Sparse tensor storage in checkpoints: a pruned model saves small and reloads bit-exactly,
//! a dense one is written as before (format 1), and every kind of corrupt sparse data gives one
//! error naming the file and the tensor.

mod common;

use candle_core::{Device, Tensor};
use safetensors::Dtype;
use slimcandle::checkpoint;
use slimcandle::exec::Mode;
use slimcandle::graph::ParamRole;
use slimcandle::model::Model;
use slimcandle::models::{ArchOptions, ArchSpec, Stem};
use slimcandle::sparse;
use slimcandle::tensor_file::{RawTensor, TensorFile, write_atomic};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// MobileNet V1 x0.25 for 10 classes at 32x32 (215k parameters), with every tensor made free
/// of exact zeros, as in a trained model (a fresh init has zero biases and running means).
fn dense_model() -> Model {
    let spec = ArchSpec::parse(
        "mobilenet_v1",
        &ArchOptions {
            width: Some(0.25),
            num_classes: Some(10),
            stem: Some(Stem::Cifar),
            ..Default::default()
        },
    )
    .unwrap();
    let mut model = Model::init(&spec, 7).unwrap();
    let names: Vec<String> = model.weights.names().map(String::from).collect();
    for name in names {
        let t = model.weights.get(&name).unwrap();
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f32> = v
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                if x == 0.0 {
                    0.01 * ((i % 7) as f32 - 3.5)
                } else {
                    x
                }
            })
            .collect();
        let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        model.weights.insert(&name, &t).unwrap();
    }
    model
}

/// Zeroes the `fraction` of smallest-magnitude elements of every conv and linear weight.
fn prune(model: &mut Model, fraction: f64) {
    for spec in model.graph.param_specs() {
        if !matches!(spec.role, ParamRole::ConvWeight | ParamRole::LinearWeight) {
            continue;
        }
        let t = model.weights.get(&spec.name).unwrap();
        let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&a, &b| v[a].abs().total_cmp(&v[b].abs()));
        let k = (v.len() as f64 * fraction).round() as usize;
        for &i in &order[..k] {
            v[i] = 0.0;
        }
        let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        model.weights.insert(&spec.name, &t).unwrap();
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn assert_same_weights(a: &Model, b: &Model) {
    let names_a: Vec<&str> = a.weights.names().collect();
    let names_b: Vec<&str> = b.weights.names().collect();
    assert_eq!(names_a, names_b);
    for name in names_a {
        let (x, y) = (a.weights.get(name).unwrap(), b.weights.get(name).unwrap());
        assert_eq!(x.dims(), y.dims(), "{name}");
        assert!(bits(&x) == bits(&y), "{name} differs after the round trip");
    }
}

fn input() -> Tensor {
    let v: Vec<f32> = (0..2 * 3 * 32 * 32)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    Tensor::from_vec(v, (2, 3, 32, 32), &Device::Cpu).unwrap()
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn version_of(p: &Path) -> String {
    TensorFile::read(p).unwrap().metadata["format_version"].clone()
}

#[test]
fn pruned_model_round_trips_bit_exactly_and_shrinks() {
    let dir = common::temp_dir("sparse-roundtrip");
    let mut model = dense_model();
    let dense_path = dir.join("dense.safetensors");
    checkpoint::save(&model, &dense_path).unwrap();
    assert_eq!(version_of(&dense_path), "1");

    prune(&mut model, 0.8);
    let sparse_path = dir.join("pruned.safetensors");
    checkpoint::save(&model, &sparse_path).unwrap();
    assert_eq!(version_of(&sparse_path), "2");

    // Every conv and linear weight is stored sparse, nothing else is.
    let file = TensorFile::read(&sparse_path).unwrap();
    let shapes = sparse::sparse_shapes(&file).unwrap();
    let pruned: BTreeMap<String, Vec<usize>> = model
        .graph
        .param_specs()
        .into_iter()
        .filter(|s| matches!(s.role, ParamRole::ConvWeight | ParamRole::LinearWeight))
        .filter(|s| {
            let n = s.shape.iter().product();
            let nonzero = sparse::count_nonzero(&model.weights.get(&s.name).unwrap()).unwrap();
            sparse::worth_it(n, nonzero)
        })
        .map(|s| (s.name, s.shape))
        .collect();
    assert_eq!(shapes, pruned);
    assert!(shapes.len() >= 20, "{} sparse tensors", shapes.len());
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        let mask = file.raw(&format!("{name}.__sparse_mask")).unwrap();
        assert_eq!(
            (mask.dtype(), mask.shape()),
            (Dtype::U8, &[n.div_ceil(8)][..])
        );
        let values = file.raw(&format!("{name}.__sparse_values")).unwrap();
        let nonzero = sparse::count_nonzero(&model.weights.get(name).unwrap()).unwrap();
        assert_eq!(
            (values.dtype(), values.shape()),
            (Dtype::F32, &[nonzero][..])
        );
        assert!(file.raw(name).is_err(), "{name} is not also stored dense");
    }

    // Every reading path gives back the same bits and the same logits.
    let loaded = checkpoint::load(&sparse_path).unwrap();
    assert_same_weights(&model, &loaded);
    assert_same_weights(&model, &checkpoint::from_file(&file).unwrap());
    let (with_extras, extras) = checkpoint::load_with_extras(&sparse_path, "optimizer.").unwrap();
    assert_same_weights(&model, &with_extras);
    assert!(extras.tensors.is_empty());
    let want = model.forward(&input(), Mode::Eval).unwrap();
    let got = loaded.forward(&input(), Mode::Eval).unwrap();
    assert_eq!(
        bits(&want),
        bits(&got),
        "logits differ after the round trip"
    );

    let ratio = file_size(&sparse_path) as f64 / file_size(&dense_path) as f64;
    println!(
        "80% pruned: {} bytes vs {} dense: ratio {ratio:.4}",
        file_size(&sparse_path),
        file_size(&dense_path)
    );
    assert!(ratio <= 0.35, "sparse file is {ratio:.4} of the dense one");
    // 80 % zeros cost 1/8 byte + 0.2 * 4 bytes per element: 23 % of dense for those tensors;
    // batch-norm tensors and the header stay dense.
    assert!(ratio > 0.2, "ratio {ratio:.4} is implausibly small");
}

#[test]
fn extras_keep_signed_zero_nan_infinity_and_subnormals() {
    let dir = common::temp_dir("sparse-extras");
    let model = dense_model();
    let nan = f32::from_bits(0x7fc1_2345);
    // 9009 elements: large enough that sparse storage pays for the whole file (the writer's
    // file-level rule), with 7 padding bits in the mask's last byte.
    let mut v = vec![0f32; 9009];
    v[0] = -0.0;
    v[9] = nan;
    v[500] = f32::NEG_INFINITY;
    v[999] = f32::from_bits(1);
    v[9008] = 1.5;
    let odd = Tensor::from_vec(v, (7, 11, 13, 9), &Device::Cpu).unwrap();
    let path = dir.join("resume.safetensors");
    checkpoint::save_with_extras(
        &model,
        &path,
        vec![("optimizer.odd".into(), odd.clone())],
        vec![("progress".into(), "{}".into())],
    )
    .unwrap();
    assert_eq!(version_of(&path), "2");
    assert_eq!(
        TensorFile::read(&path).unwrap().metadata["sparse"],
        r#"{"optimizer.odd":[7,11,13,9]}"#
    );
    let (loaded, extras) = checkpoint::load_with_extras(&path, "optimizer.").unwrap();
    assert_same_weights(&model, &loaded);
    let got = &extras.tensors["odd"];
    assert_eq!(got.dims(), &[7, 11, 13, 9]);
    assert_eq!(bits(got), bits(&odd));
    assert_eq!(sparse::count_nonzero(got).unwrap(), 5);
    assert_eq!(extras.metadata["progress"], "{}");
}

#[test]
fn dense_model_file_is_unchanged() {
    let dir = common::temp_dir("sparse-dense");
    let model = dense_model();
    let path = dir.join("dense.safetensors");
    checkpoint::save(&model, &path).unwrap();
    let file = TensorFile::read(&path).unwrap();
    assert_eq!(file.metadata["format_version"], "1");
    assert!(!file.metadata.contains_key("sparse"));
    assert_eq!(file.dtype_counts().get("F32"), Some(&file.names().len()));

    // What the writer produced before sparse storage existed.
    let meta = &model.meta;
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "slimcandle".to_string());
    metadata.insert("format_version".to_string(), "1".to_string());
    metadata.insert("graph".to_string(), model.graph.to_json());
    metadata.insert("class_names".to_string(), json(&meta.class_names));
    metadata.insert("preprocessing".to_string(), json(&meta.preprocessing));
    metadata.insert("provenance".to_string(), json(&meta.provenance));
    metadata.insert("arch".to_string(), json(meta.arch.as_ref().unwrap()));
    let tensors = model
        .weights
        .tensors()
        .map(|(n, t)| (n.to_string(), RawTensor::from_f32(t).unwrap()))
        .collect();
    let old = dir.join("old.safetensors");
    write_atomic(&old, tensors, metadata).unwrap();

    // safetensors writes the metadata map in hash order, so the bytes of the header can differ
    // in key order only: compare the header as JSON and everything else byte for byte.
    let (new, old) = (std::fs::read(&path).unwrap(), std::fs::read(&old).unwrap());
    assert_eq!(new.len(), old.len());
    let split = |b: &[u8]| {
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
        (n, header, b[8 + n..].to_vec())
    };
    assert!(split(&new) == split(&old), "the dense file changed");
}

/// A metadata value serialised as the checkpoint writer does.
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap()
}

/// A file's tensors and metadata, to edit and write back.
struct Parts {
    tensors: BTreeMap<String, RawTensor>,
    metadata: HashMap<String, String>,
}

impl Parts {
    fn read(path: &Path) -> Parts {
        let (tensors, metadata) = common::raw_tensors(path);
        Parts { tensors, metadata }
    }

    fn write(self, path: &Path) {
        write_atomic(path, self.tensors.into_iter().collect(), self.metadata).unwrap();
    }

    fn get(&mut self, name: &str) -> &mut RawTensor {
        self.tensors.get_mut(name).unwrap()
    }
}

/// A pruned checkpoint, the name of one of its sparse tensors, and a resume-style checkpoint
/// whose extra tensor `optimizer.odd` has 9009 elements (its mask has 7 padding bits; enough
/// zeros for sparse storage to pay for the file).
fn sparse_files(dir: &Path) -> (PathBuf, String, PathBuf) {
    let mut model = dense_model();
    prune(&mut model, 0.8);
    let pruned = dir.join("pruned.safetensors");
    checkpoint::save(&model, &pruned).unwrap();
    let mut v = vec![0f32; 9009];
    v[9008] = 2.0;
    let odd = Tensor::from_vec(v, 9009, &Device::Cpu).unwrap();
    let resume = dir.join("resume.safetensors");
    checkpoint::save_with_extras(
        &dense_model(),
        &resume,
        vec![("optimizer.odd".into(), odd)],
        vec![],
    )
    .unwrap();
    // The largest sparse tensor.
    let shapes = sparse::sparse_shapes(&TensorFile::read(&pruned).unwrap()).unwrap();
    let name = shapes
        .iter()
        .max_by_key(|(_, s)| s.iter().product::<usize>())
        .map(|(n, _)| n.clone())
        .unwrap();
    (pruned, name, resume)
}

/// Loads `path` through every reading path; each must fail with the same message, which must
/// mention `file` and every string in `mentions`.
fn assert_rejected(path: &Path, mentions: &[&str]) {
    let file_name = path.file_name().unwrap().to_str().unwrap();
    let errors = [
        checkpoint::load(path).err(),
        checkpoint::load_with_extras(path, "optimizer.").err(),
        checkpoint::from_file(&TensorFile::read(path).unwrap()).err(),
    ];
    let messages: Vec<String> = errors
        .into_iter()
        .map(|e| format!("{:#}", e.expect("corrupt file must be rejected")))
        .collect();
    assert!(messages.iter().all(|m| m == &messages[0]), "{messages:?}");
    let msg = &messages[0];
    println!("{file_name}: {msg}");
    assert!(msg.contains(file_name), "expected `{file_name}` in: {msg}");
    for m in mentions {
        assert!(msg.contains(m), "expected `{m}` in: {msg}");
    }
}

#[test]
fn corrupt_sparse_data_gives_one_clear_error() {
    let dir = common::temp_dir("sparse-corrupt");
    let (pruned, name, resume) = sparse_files(&dir);
    let (mask, values) = (
        format!("{name}.__sparse_mask"),
        format!("{name}.__sparse_values"),
    );
    let (name, mask, values) = (name.as_str(), mask.as_str(), values.as_str());
    assert!(Parts::read(&pruned).tensors.contains_key(mask));
    let case = |file: &str, src: &Path, edit: &dyn Fn(&mut Parts), mentions: &[&str]| {
        let mut parts = Parts::read(src);
        edit(&mut parts);
        let path = dir.join(file);
        parts.write(&path);
        assert_rejected(&path, mentions);
    };

    case(
        "mask-dtype.safetensors",
        &pruned,
        &|p| p.get(mask).dtype = Dtype::I8,
        &[name, mask, "dtype I8, expected U8"],
    );
    case(
        "values-dtype.safetensors",
        &pruned,
        &|p| {
            let v = p.get(values);
            v.dtype = Dtype::F16;
            v.shape[0] *= 2;
        },
        &[name, values, "dtype F16, expected F32"],
    );
    case(
        "mask-length.safetensors",
        &pruned,
        &|p| {
            let m = p.get(mask);
            m.data.pop();
            m.shape[0] -= 1;
        },
        &[name, mask, "needs ["],
    );
    case(
        "values-count.safetensors",
        &pruned,
        &|p| {
            let v = p.get(values);
            v.data.truncate(v.data.len() - 4);
            v.shape[0] -= 1;
        },
        &[name, "stored elements but there are"],
    );
    case(
        "no-values.safetensors",
        &pruned,
        &|p| {
            p.tensors.remove(values);
        },
        &[name, format!("has no `{values}`").as_str()],
    );
    case(
        "no-mask.safetensors",
        &pruned,
        &|p| {
            p.tensors.remove(mask);
        },
        &[name, format!("has no `{mask}`").as_str()],
    );
    case(
        "no-entry.safetensors",
        &pruned,
        &|p| {
            let mut shapes: BTreeMap<String, Vec<usize>> =
                serde_json::from_str(&p.metadata["sparse"]).unwrap();
            shapes.remove(name);
            p.metadata
                .insert("sparse".into(), serde_json::to_string(&shapes).unwrap());
        },
        &[name, "does not list"],
    );
    case(
        "bad-json.safetensors",
        &pruned,
        &|p| {
            p.metadata.insert("sparse".into(), "{\"a\": [1,".into());
        },
        &["metadata entry `sparse`", "not a JSON object"],
    );
    case(
        "bad-shape.safetensors",
        &pruned,
        &|p| {
            p.metadata.insert(
                "sparse".into(),
                r#"{"features.0.0.weight": "8x3x3x3"}"#.into(),
            );
        },
        &["metadata entry `sparse`", "not a JSON object"],
    );
    case(
        "missing-tensor.safetensors",
        &pruned,
        &|p| {
            let mut shapes: BTreeMap<String, Vec<usize>> =
                serde_json::from_str(&p.metadata["sparse"]).unwrap();
            shapes.insert("ghost.weight".into(), vec![64, 64]);
            p.metadata
                .insert("sparse".into(), serde_json::to_string(&shapes).unwrap());
        },
        &[
            "ghost.weight",
            "has no `ghost.weight.__sparse_mask` or `ghost.weight.__sparse_values`",
        ],
    );
    case(
        "huge-shape.safetensors",
        &pruned,
        &|p| {
            let mut shapes: BTreeMap<String, Vec<usize>> =
                serde_json::from_str(&p.metadata["sparse"]).unwrap();
            shapes.insert(name.to_string(), vec![usize::MAX, 3]);
            p.metadata
                .insert("sparse".into(), serde_json::to_string(&shapes).unwrap());
        },
        &[name, "too large"],
    );
    case(
        "dense-and-sparse.safetensors",
        &pruned,
        &|p| {
            let t = RawTensor {
                dtype: Dtype::F32,
                shape: vec![1],
                data: vec![0; 4],
            };
            p.tensors.insert(name.to_string(), t);
        },
        &[name, "both dense and sparse"],
    );
    case(
        "padding.safetensors",
        &resume,
        &|p| {
            // 9009 elements: bit 0 of the last byte is element 9008, bits 1-7 are padding.
            let m = p.get("optimizer.odd.__sparse_mask");
            *m.data.last_mut().unwrap() |= 0b1000_0000;
            let v = p.get("optimizer.odd.__sparse_values");
            v.data.extend(1f32.to_le_bytes());
            v.shape[0] += 1;
        },
        &[
            "optimizer.odd",
            "padding bits beyond the tensor's 9009 elements",
        ],
    );
    // A newer format is refused as such, before its tensors are looked at.
    case(
        "newer.safetensors",
        &pruned,
        &|p| {
            p.metadata.insert("format_version".into(), "5".into());
            p.tensors.remove(mask);
        },
        &["format 5", "reads up to 4", "upgrade slimcandle"],
    );
}

#[test]
fn inspect_reports_sparse_storage() {
    let dir = common::temp_dir("sparse-inspect");
    let (pruned, name, _) = sparse_files(&dir);
    let run = common::slimcandle;
    let path = pruned.to_str().unwrap();
    let out = run(&["inspect", path, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shapes = sparse::sparse_shapes(&TensorFile::read(&pruned).unwrap()).unwrap();
    assert_eq!(json["format_version"], 2);
    assert_eq!(json["sparse_tensors"].as_u64(), Some(shapes.len() as u64));
    assert_eq!(json["file_size"].as_u64(), Some(file_size(&pruned)));
    let (params, nonzero) = (
        json["params"].as_u64().unwrap() as f64,
        json["nonzero_params"].as_u64().unwrap() as f64,
    );
    assert!(nonzero / params < 0.3, "{nonzero} of {params} non-zero");
    let text = String::from_utf8(run(&["inspect", path]).stdout).unwrap();
    assert!(
        text.contains(&format!("format 2, {} tensors sparse", shapes.len())),
        "{text}"
    );
    assert!(text.contains("non-zero"), "{text}");

    // A corrupt file is one clear error from the command line too.
    let mut parts = Parts::read(&pruned);
    parts.tensors.remove(&format!("{name}.__sparse_values"));
    let bad = dir.join("bad.safetensors");
    parts.write(&bad);
    let out = run(&["inspect", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: ") && !err.contains("panicked"),
        "{err}"
    );
    assert!(
        err.contains("bad.safetensors") && err.contains(&name),
        "{err}"
    );
}
