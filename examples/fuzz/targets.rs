//! The fuzz targets of issue #16, with their seeds and structure-aware generators: every
//! reader of an untrusted file. Each `run` feeds the bytes to the same code the commands use
//! (from memory, the file name only appearing in messages) and returns the reader's verdict.

use crate::engine::{Target, mutate_json};
use anyhow::Result;
use arbitrary::Unstructured;
use candle_core::{Device, Tensor};
use slimcandle::checkpoint::{self, AnyModel};
use slimcandle::data::{
    Images, cifar_records_from_bytes, decode_image_chw, mnist_split_from_bytes, resize_center_crop,
};
use slimcandle::exec::Mode;
use slimcandle::graph::Graph;
use slimcandle::model::{Model, ModelMeta, Preprocessing, Provenance, default_class_names};
use slimcandle::pipeline::{Document, Registry, validate};
use slimcandle::tensor_file::TensorFile;
use slimcandle::weights::Weights;
use std::path::{Path, PathBuf};

/// Names of every target, for `--help` and the smoke test.
pub const NAMES: [&str; 7] = [
    "tensor-file",
    "checkpoint",
    "graph",
    "recipe",
    "cifar",
    "idx",
    "image",
];

/// The target called `name`, its seeds built (some are files the tests also make).
pub fn target(name: &str) -> Option<Target> {
    Some(match name {
        "tensor-file" => Target {
            name: "tensor-file",
            seeds: tensor_file_seeds(),
            generate: Some(edit_safetensors),
            run: run_tensor_file,
        },
        "checkpoint" => Target {
            name: "checkpoint",
            seeds: checkpoint_seeds(),
            generate: Some(edit_safetensors),
            run: run_checkpoint,
        },
        "graph" => Target {
            name: "graph",
            seeds: graph_seeds(),
            generate: Some(edit_json),
            run: run_graph,
        },
        "recipe" => Target {
            name: "recipe",
            seeds: recipe_seeds(),
            generate: Some(edit_recipe),
            run: run_recipe,
        },
        "cifar" => Target {
            name: "cifar",
            seeds: cifar_seeds(),
            generate: None,
            run: run_cifar,
        },
        "idx" => Target {
            name: "idx",
            seeds: idx_seeds(),
            generate: None,
            run: run_idx,
        },
        "image" => Target {
            name: "image",
            seeds: image_seeds(),
            generate: None,
            run: run_image,
        },
        _ => return None,
    })
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_seed(rel: &str) -> Option<Vec<u8>> {
    std::fs::read(crate_dir().join(rel)).ok()
}

// ---- safetensors: the tensor-file reader behind `forward`, and checkpoints ----

/// Splits a safetensors file into its header JSON and its data.
fn split_safetensors(bytes: &[u8]) -> Option<(serde_json::Value, &[u8])> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    Some((header, &bytes[8 + n..]))
}

fn join_safetensors(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let text = header.to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Structure-aware edit of a safetensors seed: the tensor table, or one JSON metadata entry
/// (graph, sparse shapes, quantization, class names ...), edited as JSON and re-serialised.
fn edit_safetensors(seed: &[u8], u: &mut Unstructured<'_>) -> Option<Vec<u8>> {
    let (mut header, data) = split_safetensors(seed)?;
    for _ in 0..u.int_in_range(1..=3u8).ok()? {
        let metadata = header
            .get_mut("__metadata__")
            .and_then(|m| m.as_object_mut());
        match metadata {
            Some(meta) if u.arbitrary::<bool>().ok()? && !meta.is_empty() => {
                let i = u.choose_index(meta.len()).ok()?;
                let entry = meta.values_mut().nth(i)?;
                let mut value: serde_json::Value =
                    serde_json::from_str(entry.as_str()?).unwrap_or(serde_json::Value::Null);
                mutate_json(&mut value, u);
                *entry = serde_json::Value::String(value.to_string());
            }
            _ => mutate_json(&mut header, u),
        }
    }
    Some(join_safetensors(&header, data))
}

fn tensor_file_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = ["tests/fixtures/mobilenet_v1_w0_25.io.safetensors"]
        .iter()
        .filter_map(|p| read_seed(p))
        .collect();
    // Small files of every dtype `forward` meets, 4-D and not.
    let f32s: Vec<u8> = (0..2 * 3 * 4 * 4)
        .flat_map(|i| (i as f32 * 0.1).to_le_bytes())
        .collect();
    let views = [
        ("x", safetensors::Dtype::F32, vec![2, 3, 4, 4], f32s.clone()),
        (
            "h",
            safetensors::Dtype::F16,
            vec![1, 3, 2, 2],
            vec![0x3c; 24],
        ),
        (
            "b",
            safetensors::Dtype::BF16,
            vec![1, 3, 2, 2],
            vec![0x3f; 24],
        ),
        ("d", safetensors::Dtype::F64, vec![1, 1, 1, 2], vec![0; 16]),
        ("i", safetensors::Dtype::I32, vec![2], vec![1; 8]),
    ];
    let tensors: Vec<(&str, safetensors::tensor::TensorView<'_>)> = views
        .iter()
        .map(|(n, d, s, b)| {
            (
                *n,
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    seeds.push(safetensors::serialize(tensors, None).unwrap());
    seeds
}

fn run_tensor_file(bytes: &[u8]) -> Result<()> {
    let file = TensorFile::from_bytes(Path::new("fuzz.safetensors"), bytes.to_vec())?;
    file.dtype_counts();
    for name in file.names() {
        let view = file.raw(&name)?;
        if view.shape().len() == 4 {
            // What `forward` does with each 4-D float tensor.
            if let Ok(t) = file.tensor_f32(&name) {
                t.sum_all()?;
            }
        }
    }
    file.float_tensors()?;
    Ok(())
}

/// The doc's example graph (`docs/checkpoint-format.md`), small enough to run per input.
const TINY_GRAPH: &str = r#"{"nodes": [
   {"name": "input", "op": {"op": "input", "channels": 3}},
   {"name": "features.0.0", "op": {"op": "conv2d", "in_channels": 3, "out_channels": 32, "kernel": 3,
    "stride": 2, "padding": 1, "dilation": 1, "groups": 1, "bias": false}, "inputs": [0]},
   {"name": "features.0.1", "op": {"op": "batch_norm", "channels": 32, "eps": 1e-05, "momentum": 0.1}, "inputs": [1]},
   {"name": "relu6#3", "op": {"op": "act", "act": "relu6"}, "inputs": [2]},
   {"name": "global_avg_pool#4", "op": {"op": "global_avg_pool"}, "inputs": [3]},
   {"name": "flatten#5", "op": {"op": "flatten"}, "inputs": [4]},
   {"name": "classifier", "op": {"op": "linear", "in_features": 32, "out_features": 10, "bias": true}, "inputs": [5]}],
 "output": 6}"#;

fn tiny_model() -> Model {
    let graph = Graph::from_json(TINY_GRAPH).unwrap();
    let weights = Weights::init(&graph, 7).unwrap();
    Model {
        graph,
        weights,
        meta: ModelMeta {
            arch: None,
            class_names: default_class_names(10),
            preprocessing: Preprocessing::for_stem(slimcandle::models::Stem::Cifar),
            provenance: Provenance::now("fuzz seed"),
        },
    }
}

/// Bytes of a file written by `save` in a scratch folder.
fn saved(name: &str, save: impl FnOnce(&Path) -> Result<()>) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("slimcandle-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Targets are built on several test threads at once: one file per call.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{n}-{name}"));
    save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    bytes
}

/// A small network with one 1x1 conv of 16,384 weights: large enough that, pruned, its int8
/// file gap-codes that conv (format 4; the tiny model's tensors are too small for gap coding
/// to pay for itself), small enough to read and run per input.
const GAPS_GRAPH: &str = r#"{"nodes": [
   {"name": "input", "op": {"op": "input", "channels": 3}},
   {"name": "features.0", "op": {"op": "conv2d", "in_channels": 3, "out_channels": 64, "kernel": 3,
    "stride": 2, "padding": 1, "dilation": 1, "groups": 1, "bias": true}, "inputs": [0]},
   {"name": "relu#2", "op": {"op": "act", "act": "relu"}, "inputs": [1]},
   {"name": "features.1", "op": {"op": "conv2d", "in_channels": 64, "out_channels": 256, "kernel": 1,
    "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": true}, "inputs": [2]},
   {"name": "relu#4", "op": {"op": "act", "act": "relu"}, "inputs": [3]},
   {"name": "global_avg_pool#5", "op": {"op": "global_avg_pool"}, "inputs": [4]},
   {"name": "flatten#6", "op": {"op": "flatten"}, "inputs": [5]},
   {"name": "classifier", "op": {"op": "linear", "in_features": 256, "out_features": 10, "bias": true}, "inputs": [6]}],
 "output": 7}"#;

/// The int8 checkpoint of [`GAPS_GRAPH`] with about 90 % of `features.1.weight` zeroed at
/// random positions (runs of over 15 zeros, so fillers, included), as `store::save` writes it:
/// format 4 with `features.1.weight.__sparse_gaps`.
fn gap_coded_int8_seed() -> Vec<u8> {
    let mut model = tiny_model();
    model.graph = Graph::from_json(GAPS_GRAPH).unwrap();
    model.weights = Weights::init(&model.graph, 7).unwrap();
    let w = model.weights.get("features.1.weight").unwrap();
    let mut rng = slimcandle::rng::Rng::new(3);
    let kept: Vec<f32> = w
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|v| if rng.uniform() < 0.1 { v } else { 0.0 })
        .collect();
    let kept = Tensor::from_vec(kept, w.dims(), &Device::Cpu).unwrap();
    model.weights.insert("features.1.weight", &kept).unwrap();
    let images = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
    let int8 =
        slimcandle::passes::quant::quantize(&model, [Ok(images)], &Default::default(), |_| {})
            .unwrap();
    let bytes = saved("int8-gaps.safetensors", |p| {
        slimcandle::passes::quant::store::save(&int8, p)
    });
    let file = TensorFile::from_bytes(Path::new("seed"), bytes.clone()).unwrap();
    assert_eq!(
        file.metadata["format_version"], "4",
        "the seed is gap-coded"
    );
    bytes
}

/// A dense, a sparse and an int8 checkpoint of the tiny model, as `save` writes them, a
/// gap-coded int8 one ([`gap_coded_int8_seed`]), plus a real (train-mode fixture) checkpoint.
fn checkpoint_seeds() -> Vec<Vec<u8>> {
    let dense = tiny_model();
    let mut sparse = dense.deep_copy().unwrap();
    let w = sparse.weights.get("features.0.0.weight").unwrap();
    sparse
        .weights
        .insert("features.0.0.weight", &w.zeros_like().unwrap())
        .unwrap();
    let images = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
    let int8 =
        slimcandle::passes::quant::quantize(&dense, [Ok(images)], &Default::default(), |_| {})
            .unwrap();
    let mut seeds = vec![
        saved("dense.safetensors", |p| checkpoint::save(&dense, p)),
        saved("sparse.safetensors", |p| checkpoint::save(&sparse, p)),
        saved("int8.safetensors", |p| {
            slimcandle::passes::quant::store::save(&int8, p)
        }),
        gap_coded_int8_seed(),
    ];
    seeds.extend(read_seed(
        "tests/fixtures/train_mode/squeezenet1_1.safetensors",
    ));
    seeds
}

fn run_checkpoint(bytes: &[u8]) -> Result<()> {
    let file = TensorFile::from_bytes(Path::new("fuzz.safetensors"), bytes.to_vec())?;
    let model = checkpoint::any_from_file(&file)?;
    // A checkpoint that loads must also run: a small graph runs on one small image.
    let graph = model.graph();
    if graph.param_elements()? > 200_000 || graph.infer_shapes(8, 8).is_err() {
        return Ok(());
    }
    let x = Tensor::zeros(
        (1, graph.input_channels(), 8, 8),
        candle_core::DType::F32,
        &Device::Cpu,
    )?;
    match &model {
        AnyModel::Float(m) => {
            m.forward(&x, Mode::Eval)?;
        }
        AnyModel::Int8(q) => {
            slimcandle::int8::Engine::new(q)?.forward_tensor(&x)?;
        }
    }
    Ok(())
}

// ---- graph JSON ----

fn graph_seeds() -> Vec<Vec<u8>> {
    let mut seeds = vec![TINY_GRAPH.as_bytes().to_vec()];
    for arch in ["squeezenet1_1", "shufflenet_v2_x0_5", "mobilenet_v3_small"] {
        let spec = slimcandle::models::ArchSpec::parse(arch, &Default::default()).unwrap();
        seeds.push(spec.build().unwrap().to_json().into_bytes());
    }
    seeds
}

fn edit_json(seed: &[u8], u: &mut Unstructured<'_>) -> Option<Vec<u8>> {
    let mut value: serde_json::Value = serde_json::from_slice(seed).ok()?;
    for _ in 0..u.int_in_range(1..=4u8).ok()? {
        mutate_json(&mut value, u);
    }
    Some(value.to_string().into_bytes())
}

fn run_graph(bytes: &[u8]) -> Result<()> {
    let graph = Graph::from_json(std::str::from_utf8(bytes)?)?;
    graph.param_specs();
    graph.consumers();
    for (h, w) in [(1, 1), (7, 5), (32, 32)] {
        let _ = graph.infer_shapes(h, w);
    }
    Ok(())
}

// ---- recipes ----

fn recipe_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(crate_dir().join("recipes"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect();
    seeds.push(
        b"[model]\narch = \"mobilenet_v2\"\n[data]\ndata = \"shapes\"\n[[stage]]\nname = \"t\"\nkind = \"train\"\nepochs = 1\n"
            .to_vec(),
    );
    seeds
}

/// Lines that recipes are made of, with awkward values, to splice in.
const RECIPE_LINES: [&str; 16] = [
    "[[stage]]\n",
    "[train]\n",
    "[model]\n",
    "[data]\n",
    "name = \"train\"\n",
    "kind = \"prune\"\n",
    "kind = \"nope\"\n",
    "epochs = 18446744073709551615\n",
    "epochs = -1\n",
    "batch_size = 0\n",
    "target_macs = 1e308\n",
    "lr = nan\n",
    "teacher = \"train\"\n",
    "finetune = { epochs = 99999999999 }\n",
    "data = [1, [2, [3]]]\n",
    "checkpoint = \"../../etc/passwd\"\n",
];

fn edit_recipe(seed: &[u8], u: &mut Unstructured<'_>) -> Option<Vec<u8>> {
    let mut lines: Vec<&[u8]> = seed.split_inclusive(|&b| b == b'\n').collect();
    for _ in 0..u.int_in_range(1..=4u8).ok()? {
        let at = u.int_in_range(0..=lines.len()).ok()?;
        match u.int_in_range(0..=2u8).ok()? {
            0 if at < lines.len() => {
                lines.remove(at);
            }
            _ => lines.insert(
                at,
                RECIPE_LINES[u.choose_index(RECIPE_LINES.len()).ok()?].as_bytes(),
            ),
        }
    }
    Some(lines.concat())
}

fn run_recipe(bytes: &[u8]) -> Result<()> {
    // The real stage kinds: the commands' own clap definitions and checks.
    thread_local! {
        static REGISTRY: Registry = slimcandle::cli::stages::registry();
    }
    let path = Path::new("fuzz.toml");
    let doc = Document::parse(path, std::str::from_utf8(bytes)?)?;
    REGISTRY.with(|r| validate(&doc, r).map(|_| ()).map_err(anyhow::Error::from))
}

// ---- datasets ----

fn cifar_seeds() -> Vec<Vec<u8>> {
    let mut two = Vec::new();
    for label in [3u8, 9] {
        two.push(label);
        two.extend((0..3072).map(|i| (i * 7 + label as usize) as u8));
    }
    // The CIFAR-100 layout (coarse and fine label) shares the seeds.
    vec![
        two.clone(),
        two[..3073].to_vec(),
        [&[1u8][..], &two[1..]].concat(),
    ]
}

fn run_cifar(bytes: &[u8]) -> Result<()> {
    let path = Path::new("data_batch_1.bin");
    let mut cifar10 = Images::new(8);
    let ten = cifar_records_from_bytes(path, bytes, 1, 8, &mut cifar10, 10);
    let mut cifar100 = Images::new(32);
    let hundred = cifar_records_from_bytes(path, bytes, 2, 32, &mut cifar100, 100);
    ten.or(hundred)
}

/// An IDX pair in one input: a 4-byte little-endian length of the images file, the images
/// file, then the labels file.
fn idx_pair(images: &[u8], labels: &[u8]) -> Vec<u8> {
    let mut out = (images.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(images);
    out.extend_from_slice(labels);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn idx_seeds() -> Vec<Vec<u8>> {
    let (n, h, w) = (3u32, 28u32, 28u32);
    let mut images = 0x0803u32.to_be_bytes().to_vec();
    for d in [n, h, w] {
        images.extend(d.to_be_bytes());
    }
    images.extend((0..n * h * w).map(|i| i as u8));
    let mut labels = 0x0801u32.to_be_bytes().to_vec();
    labels.extend(n.to_be_bytes());
    labels.extend([1, 7, 9]);
    vec![
        idx_pair(&images, &labels),
        idx_pair(&gzip(&images), &gzip(&labels)),
    ]
}

fn run_idx(bytes: &[u8]) -> Result<()> {
    let split = bytes.get(..4).map_or(0, |b| {
        u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize
    });
    let rest = bytes.get(4..).unwrap_or_default();
    let (images, labels) = rest.split_at(split.min(rest.len()));
    mnist_split_from_bytes(
        Path::new("train-images-idx3-ubyte"),
        images.to_vec(),
        Path::new("train-labels-idx1-ubyte"),
        labels.to_vec(),
        8,
    )?;
    Ok(())
}

fn image_seeds() -> Vec<Vec<u8>> {
    let img = image::RgbImage::from_fn(9, 6, |x, y| image::Rgb([x as u8 * 20, y as u8 * 30, 99]));
    let mut seeds = Vec::new();
    for format in [
        image::ImageFormat::Png,
        image::ImageFormat::Jpeg,
        image::ImageFormat::Bmp,
    ] {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        seeds.push(out.into_inner());
    }
    seeds
}

fn run_image(bytes: &[u8]) -> Result<()> {
    let (chw, w, h) = decode_image_chw(Path::new("class/img.png"), bytes)?;
    resize_center_crop(&chw, w, h, 8);
    Ok(())
}
