//! The command line, end to end: every command on real files, and every kind of bad input
//! giving one clear error (exit code 1, `error:` naming the file; 2 for a usage error such as
//! an unknown architecture) instead of a panic.

mod common;

use common::{ok, s, slimcandle, stderr};

use std::path::{Path, PathBuf};

/// Runs a command that must fail cleanly with a runtime error (exit 1); returns its stderr.
fn fails(args: &[&str], mentions: &[&str]) -> String {
    fails_with(1, args, mentions)
}

/// Runs a command that must fail cleanly with exit status `code`; returns its stderr.
fn fails_with(code: i32, args: &[&str], mentions: &[&str]) -> String {
    let o = slimcandle(args);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "slimcandle {args:?} should exit {code}:\n{err}"
    );
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for m in mentions {
        assert!(err.contains(m), "expected `{m}` in:\n{err}");
    }
    err
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn models_lists_every_family_with_exact_counts() {
    let json: serde_json::Value = serde_json::from_str(&ok(&["models", "--json"])).unwrap();
    let models = json["models"].as_array().unwrap();
    let find = |name: &str| {
        models
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(
        (
            find("mobilenet_v1")["params"].as_u64(),
            find("mobilenet_v1")["macs"].as_u64()
        ),
        (Some(4_231_976), Some(568_740_352))
    );
    let v2 = find("shufflenet_v2_x1_0");
    assert_eq!(
        (v2["params"].as_u64(), v2["macs"].as_u64()),
        (Some(2_278_604), Some(144_907_992))
    );
    for family in [
        "squeezenet1_0",
        "squeezenet1_1",
        "mobilenet_v1",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "mobilenet_v3_large",
        "shufflenet_v1",
        "shufflenet_v2",
    ] {
        assert!(models.iter().any(|m| m["family"] == family), "{family}");
    }
    assert!(find("mobilenet_v2")["imagenet_top1"].as_f64().unwrap() > 71.0);
    let text = ok(&["models"]);
    assert!(
        text.contains("shufflenet_v1 --groups 8 --width 0.5") && text.contains("568.7M"),
        "{text}"
    );
}

#[test]
fn import_inspect_forward_round_trip() {
    let dir = common::temp_dir("cli-roundtrip");
    let ckpt = dir.join("m.safetensors");
    let out = ok(&[
        "import",
        "--arch",
        "mobilenet_v1",
        "--width",
        "0.25",
        "--class-names",
        "a,b,c,d,e,f,g,h,i,j",
        s(&fixture("mobilenet_v1_w0_25.safetensors")),
        "-o",
        s(&ckpt),
    ]);
    assert!(
        out.contains("imported mobilenet_v1_w0_25 (10 classes)"),
        "{out}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", s(&ckpt), "--json"])).unwrap();
    assert_eq!(json["params"].as_u64(), Some(215_642));
    assert_eq!(json["class_names"][9], "j");
    assert_eq!(json["arch"]["family"], "mobilenet_v1");
    assert_eq!(json["preprocessing"]["input_size"][0], 224);
    assert!(
        json["provenance"]["source"]
            .as_str()
            .unwrap()
            .contains("mobilenet_v1_w0_25.safetensors")
    );
    assert_eq!(json["dtypes"]["F32"].as_u64(), json["tensors"].as_u64());
    let layers = json["layers"].as_array().unwrap();
    assert_eq!(layers[0]["name"], "features.0.0");
    assert_eq!(
        layers[0]["output_shape"],
        serde_json::json!([1, 8, 112, 112])
    );
    let mac_sum: u64 = layers.iter().map(|l| l["macs"].as_u64().unwrap()).sum();
    assert_eq!(json["macs"].as_u64(), Some(mac_sum));
    let text = ok(&["inspect", s(&ckpt), "--input-size", "96"]);
    assert!(
        text.contains("features.13.3") && text.contains("at 96x96"),
        "{text}"
    );

    // Into a folder that does not exist yet (created when the result is written), with the
    // shapes in JSON.
    let logits = dir.join("out/logits.safetensors");
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "forward",
        s(&ckpt),
        s(&fixture("mobilenet_v1_w0_25.io.safetensors")),
        "-o",
        s(&logits),
        "--json",
    ]))
    .unwrap();
    let shapes: Vec<_> = json["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["input_shape"].clone(), t["output_shape"].clone()))
        .collect();
    assert!(
        shapes.contains(&(
            serde_json::json!([2, 3, 96, 96]),
            serde_json::json!([2, 10])
        )),
        "{json}"
    );
    let got = slimcandle::tensor_file::TensorFile::read(&logits).unwrap();
    let want =
        slimcandle::tensor_file::TensorFile::read(&fixture("mobilenet_v1_w0_25.io.safetensors"))
            .unwrap();
    assert_eq!(got.names().len(), 2);
    for size in [96, 113] {
        let g: Vec<f32> = got
            .tensor_f32(&format!("input_{size}"))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w: Vec<f32> = want
            .tensor_f32(&format!("logits_{size}"))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let err = g
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-4, "{size}: {err}");
    }
}

#[test]
fn bad_inputs_get_clear_errors() {
    let dir = common::temp_dir("cli-errors");
    let state_dict = fixture("mobilenet_v1_w0_25.safetensors");
    let ckpt = dir.join("m.safetensors");
    ok(&[
        "import",
        "--arch",
        "mobilenet_v1",
        "--width",
        "0.25",
        s(&state_dict),
        "-o",
        s(&ckpt),
    ]);

    // A missing file.
    fails(
        &["inspect", "/nonexistent/model.safetensors"],
        &["/nonexistent/model.safetensors", "cannot read"],
    );
    // A file that is not safetensors.
    let text = dir.join("notes.safetensors");
    std::fs::write(
        &text,
        "these are not tensors, just a text file of some length",
    )
    .unwrap();
    fails(&["inspect", s(&text)], &["notes.safetensors", "not a"]);
    // A truncated checkpoint, cut in the data and in the header.
    let bytes = std::fs::read(&ckpt).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    fails(&["inspect", s(&cut)], &["cut.safetensors", "truncated"]);
    std::fs::write(&cut, &bytes[..100]).unwrap();
    fails(
        &[
            "forward",
            s(&cut),
            s(&ckpt),
            "-o",
            s(&dir.join("o.safetensors")),
        ],
        &["cut.safetensors", "truncated"],
    );
    // Weights for another architecture, or another width.
    fails(
        &[
            "import",
            "--arch",
            "shufflenet_v2",
            "--num-classes",
            "10",
            s(&state_dict),
            "-o",
            s(&dir.join("x.safetensors")),
        ],
        &[
            "mobilenet_v1_w0_25.safetensors",
            "missing keys",
            "conv1.0.weight",
            "unexpected keys",
            "features.0.0.weight",
        ],
    );
    fails(
        &[
            "import",
            "--arch",
            "mobilenet_v1",
            "--width",
            "0.5",
            "--num-classes",
            "10",
            s(&state_dict),
            "-o",
            s(&dir.join("x.safetensors")),
        ],
        &[
            "wrong shapes",
            "features.0.0.weight is [8, 3, 3, 3], the model needs [16, 3, 3, 3]",
        ],
    );
    // A plain state dict where a checkpoint is expected, and a typo in the architecture.
    fails(
        &["inspect", s(&state_dict)],
        &["plain safetensors file", "slimcandle import"],
    );
    fails_with(
        2,
        &[
            "import",
            "--arch",
            "mobilenet_v22",
            s(&state_dict),
            "-o",
            s(&dir.join("x.safetensors")),
        ],
        &["did you mean `mobilenet_v2`"],
    );
    fails_with(
        2,
        &[
            "import",
            "--arch",
            "shufflenet_v1",
            "--groups",
            "2",
            "--width",
            "0.5",
            s(&state_dict),
            "-o",
            s(&dir.join("x.safetensors")),
        ],
        &["do not divide"],
    );
    // An input of the wrong shape, and one too small for the network.
    let bad_input = dir.join("gray.safetensors");
    let gray = candle_core::Tensor::zeros(
        (2, 1, 64, 64),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let raw = slimcandle::tensor_file::RawTensor::from_f32(&gray).unwrap();
    slimcandle::tensor_file::write_atomic(&bad_input, vec![("x".into(), raw)], Default::default())
        .unwrap();
    fails(
        &[
            "forward",
            s(&ckpt),
            s(&bad_input),
            "-o",
            s(&dir.join("o.safetensors")),
        ],
        &["gray.safetensors", "`x`", "[N, 3, H, W]", "[2, 1, 64, 64]"],
    );
    let tiny = dir.join("tiny.safetensors");
    let t = candle_core::Tensor::zeros(
        (1, 3, 8, 8),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    slimcandle::tensor_file::write_atomic(
        &tiny,
        vec![(
            "x".into(),
            slimcandle::tensor_file::RawTensor::from_f32(&t).unwrap(),
        )],
        Default::default(),
    )
    .unwrap();
    let squeezenet = dir.join("squeezenet.safetensors");
    let spec = slimcandle::models::ArchSpec::parse("squeezenet1_0", &Default::default()).unwrap();
    slimcandle::checkpoint::save(
        &slimcandle::model::Model::init(&spec, 0).unwrap(),
        &squeezenet,
    )
    .unwrap();
    fails(
        &[
            "forward",
            s(&squeezenet),
            s(&tiny),
            "-o",
            s(&dir.join("o.safetensors")),
        ],
        &["tiny.safetensors", "too small"],
    );
    // Never overwrite an input.
    fails_with(
        2,
        &["forward", s(&ckpt), s(&bad_input), "-o", s(&bad_input)],
        &["also an input"],
    );
    // An output that cannot be written: a file stands where its folder would be (missing
    // folders are created, once the result is ready).
    let under_file = text.join("x.safetensors");
    fails(
        &[
            "import",
            "--arch",
            "mobilenet_v1",
            "--width",
            "0.25",
            s(&state_dict),
            "-o",
            s(&under_file),
        ],
        &["notes.safetensors", "is a file, not a folder"],
    );
    // Usage errors are clap's: exit code 2.
    assert_eq!(slimcandle(&["inspect"]).status.code(), Some(2));
}
