//! The broken-input corpus of issue #16: damaged checkpoints, tensor files, recipes and
//! datasets, each met by every command that reads that kind of input. Every run must exit
//! with a code from 1 to 99, print exactly one error line that names the broken file, never
//! panic, and leave no output file behind.

mod common;

use slimcandle::checkpoint;
use slimcandle::model::Model;
use slimcandle::models::{ArchOptions, ArchSpec, Stem};
use std::path::{Path, PathBuf};

fn tiny_model() -> Model {
    tiny_model_of(10)
}

fn tiny_model_of(classes: usize) -> Model {
    let spec = ArchSpec::parse(
        "mobilenet_v1",
        &ArchOptions {
            width: Some(0.25),
            stem: Some(Stem::Cifar),
            num_classes: Some(classes),
            ..Default::default()
        },
    )
    .unwrap();
    Model::init(&spec, 3).unwrap()
}

/// A safetensors file with a JSON header and data, written as is.
fn raw_safetensors(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// Damaged checkpoints made from a good one, by name.
fn broken_checkpoints(dir: &Path) -> Vec<PathBuf> {
    let good = dir.join("good.safetensors");
    checkpoint::save(&tiny_model(), &good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len])
        .unwrap()
        .to_string();
    let mut out = Vec::new();
    let mut add = |name: &str, content: Vec<u8>| {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        out.push(p);
    };
    add("empty.safetensors", Vec::new());
    add("truncated.safetensors", bytes[..bytes.len() / 2].to_vec());
    add("header-cut.safetensors", bytes[..header_len / 2].to_vec());
    add("text.safetensors", b"this is not a checkpoint\n".to_vec());
    // The graph edited to reference a later node, and a stride of zero.
    let edit = |from: &str, to: &str| {
        assert!(header.contains(from), "{from}");
        let h = header.replacen(from, to, 1);
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(&bytes[8 + header_len..]);
        b
    };
    add(
        "later-edge.safetensors",
        edit("\\\"inputs\\\":[1]", "\\\"inputs\\\":[9]"),
    );
    add(
        "zero-stride.safetensors",
        edit("\\\"stride\\\":2", "\\\"stride\\\":0"),
    );
    add(
        "wrong-classes.safetensors",
        edit("\\\"class_9\\\"", "\\\"class_9\\\",\\\"class_10\\\""),
    );
    let huge = dir.join("huge-claim.safetensors");
    raw_safetensors(
        &huge,
        r#"{"w":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,16]}}"#,
        &[0; 16],
    );
    out.push(huge);
    out
}

/// Runs `args` and checks the contract; `named` is the file the one error line must name,
/// `output` a path that must not exist afterwards.
fn refuses(args: &[&str], named: &Path, output: Option<&Path>) {
    let out = common::slimcandle(args);
    let stderr = common::stderr(&out);
    let code = out.status.code();
    assert!(
        code.is_some_and(|c| (1..100).contains(&c)),
        "{args:?}: exit {code:?}\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(
        errors.len(),
        1,
        "{args:?}: one error line expected:\n{stderr}"
    );
    let shown = named.file_name().unwrap().to_string_lossy();
    assert!(
        errors[0].contains(shown.as_ref()),
        "{args:?}: the error must name `{shown}`:\n{stderr}"
    );
    if let Some(o) = output {
        assert!(!o.exists(), "{args:?} left `{}`", o.display());
    }
}

#[test]
fn every_command_refuses_each_broken_checkpoint() {
    let dir = common::temp_dir("broken-checkpoints");
    let input = dir.join("input.safetensors");
    slimcandle::tensor_file::write_atomic(
        &input,
        vec![(
            "x".to_string(),
            slimcandle::tensor_file::RawTensor {
                dtype: safetensors::Dtype::F32,
                shape: vec![1, 3, 32, 32],
                data: vec![0; 4 * 3 * 32 * 32],
            },
        )],
        Default::default(),
    )
    .unwrap();
    let image = dir.join("img.png");
    image::RgbImage::new(32, 32).save(&image).unwrap();
    let out = dir.join("out.safetensors");
    let run = dir.join("run");
    let (o, i, img, r) = (
        out.to_str().unwrap(),
        input.to_str().unwrap(),
        image.to_str().unwrap(),
        run.to_str().unwrap(),
    );
    for ckpt in broken_checkpoints(&dir) {
        let c = ckpt.to_str().unwrap();
        let runs: [(Vec<&str>, Option<&Path>); 8] = [
            (vec!["inspect", c], None),
            (vec!["eval", c, "--test-limit", "10"], None),
            (vec!["forward", c, i, "-o", o], Some(&out)),
            (vec!["predict", c, img], None),
            (
                vec![
                    "prune",
                    c,
                    "--method",
                    "magnitude",
                    "--sparsity",
                    "0.5",
                    "-o",
                    o,
                ],
                Some(&out),
            ),
            (
                vec![
                    "quantize",
                    c,
                    "--data",
                    "shapes",
                    "--calibration",
                    "8",
                    "-o",
                    o,
                ],
                Some(&out),
            ),
            (
                vec![
                    "train", "--init", c, "--data", "shapes", "--epochs", "1", "-o", r,
                ],
                Some(&run),
            ),
            (vec!["compare", c], None),
        ];
        for (args, output) in runs {
            refuses(&args, &ckpt, output);
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn forward_refuses_broken_tensor_files() {
    let dir = common::temp_dir("broken-tensor-files");
    let ckpt = dir.join("good.safetensors");
    checkpoint::save(&tiny_model(), &ckpt).unwrap();
    let out = dir.join("out.safetensors");
    let cases: [(&str, &[u8]); 3] = [
        ("empty.safetensors", b""),
        ("short.safetensors", b"\x10\0\0\0"),
        ("garbage.safetensors", b"\xff\xff\xff\xff\xff\xff\xff\x7f{}"),
    ];
    for (name, bytes) in cases {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        refuses(
            &[
                "forward",
                ckpt.to_str().unwrap(),
                p.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ],
            &p,
            Some(&out),
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// An image folder with a train/test split and two classes of good 12x12 PNGs.
fn good_folder(root: &Path) {
    for split in ["train", "test"] {
        for class in ["a", "b"] {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..2 {
                image::RgbImage::from_pixel(12, 12, image::Rgb([i * 90, 40, 200]))
                    .save(d.join(format!("{i}.png")))
                    .unwrap();
            }
        }
    }
}

#[test]
fn broken_datasets_are_refused_naming_the_file() {
    let dir = common::temp_dir("broken-datasets");
    let run = dir.join("run");
    let r = run.to_str().unwrap();
    let mut png = Vec::new();
    image::RgbImage::new(12, 12)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let folder_cases: [(&str, Vec<u8>); 3] = [
        ("truncated.png", png[..png.len() / 2].to_vec()),
        ("zero.png", Vec::new()),
        ("notes.jpg", b"not an image".to_vec()),
    ];
    // Two classes, as the folders below have.
    let ckpt = dir.join("good.safetensors");
    checkpoint::save(&tiny_model_of(2), &ckpt).unwrap();
    let c = ckpt.to_str().unwrap();
    for (i, (name, bytes)) in folder_cases.iter().enumerate() {
        let root = dir.join(format!("folder{i}"));
        good_folder(&root);
        let bad = root.join("train/b").join(name);
        std::fs::write(&bad, bytes).unwrap();
        let data = format!("folder:{}", root.display());
        refuses(
            &[
                "train",
                "--arch",
                "mobilenet_v1",
                "--width",
                "0.25",
                "--stem",
                "cifar",
                "--data",
                &data,
                "--epochs",
                "1",
                "-o",
                r,
            ],
            &bad,
            Some(&run),
        );
        // With --skip-bad-images the file is listed and the run goes on.
        let out = common::slimcandle(&[
            "--skip-bad-images",
            "train",
            "--arch",
            "mobilenet_v1",
            "--width",
            "0.25",
            "--stem",
            "cifar",
            "--data",
            &data,
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "-o",
            r,
        ]);
        let stderr = common::stderr(&out);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains("skipped 1 image") && stderr.contains(*name),
            "{stderr}"
        );
        std::fs::remove_dir_all(&run).unwrap();
    }
    // A class folder with no image at all.
    let root = dir.join("empty-class");
    good_folder(&root);
    let empty = root.join("train/c");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::create_dir_all(root.join("test/c")).unwrap();
    let data = format!("folder:{}", root.display());
    refuses(&["eval", c, "--data", &data], &empty, None);
    // Mixed image sizes are resized, not refused.
    let root = dir.join("mixed");
    good_folder(&root);
    image::RgbImage::new(40, 17)
        .save(root.join("train/a/wide.png"))
        .unwrap();
    let out = common::slimcandle(&["eval", c, "--data", &format!("folder:{}", root.display())]);
    assert!(out.status.success(), "{}", common::stderr(&out));

    // A truncated CIFAR-10 batch and a truncated MNIST IDX file.
    let cifar = dir.join("cifar");
    std::fs::create_dir_all(&cifar).unwrap();
    for name in [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ] {
        std::fs::write(cifar.join(name), vec![1u8; 3073 * 2]).unwrap();
    }
    let cut = cifar.join("data_batch_3.bin");
    std::fs::write(&cut, vec![1u8; 3073 + 100]).unwrap();
    let ckpt10 = dir.join("ten.safetensors");
    checkpoint::save(&tiny_model(), &ckpt10).unwrap();
    let c10 = ckpt10.to_str().unwrap();
    refuses(
        &[
            "eval",
            c10,
            "--data",
            &format!("cifar10:{}", cifar.display()),
        ],
        &cut,
        None,
    );

    let mnist = dir.join("mnist");
    std::fs::create_dir_all(&mnist).unwrap();
    let idx = |magic: u32, dims: &[u32], data: usize| {
        let mut b = magic.to_be_bytes().to_vec();
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b.extend(vec![3u8; data]);
        b
    };
    for prefix in ["train", "t10k"] {
        std::fs::write(
            mnist.join(format!("{prefix}-images-idx3-ubyte")),
            idx(0x803, &[2, 28, 28], 2 * 784),
        )
        .unwrap();
        std::fs::write(
            mnist.join(format!("{prefix}-labels-idx1-ubyte")),
            idx(0x801, &[2], 2),
        )
        .unwrap();
    }
    let cut = mnist.join("t10k-images-idx3-ubyte");
    std::fs::write(&cut, idx(0x803, &[2, 28, 28], 784 + 5)).unwrap();
    refuses(
        &["eval", c10, "--data", &format!("mnist:{}", mnist.display())],
        &cut,
        None,
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn broken_recipes_are_refused_naming_the_file() {
    let dir = common::temp_dir("broken-recipes");
    let out = dir.join("out");
    let cases: [(&str, &str); 4] = [
        ("syntax.toml", "[model\narch = \"mobilenet_v2\"\n"),
        ("empty.toml", ""),
        ("binary.toml", "\u{0}\u{1}\u{2}"),
        (
            "unknown-kind.toml",
            "[model]\narch = \"mobilenet_v2\"\n[[stage]]\nname = \"x\"\nkind = \"nope\"\n",
        ),
    ];
    for (name, text) in cases {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        let out_s = out.to_str().unwrap();
        let o = common::slimcandle(&["run", p.to_str().unwrap(), "-o", out_s, "--dry-run"]);
        let stderr = common::stderr(&o);
        let code = o.status.code();
        assert!(
            code.is_some_and(|c| (1..100).contains(&c)),
            "{name}: {code:?} {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        // A recipe's problems come one per line, each naming the recipe.
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        assert!(!errors.is_empty(), "{stderr}");
        assert!(errors.iter().all(|l| l.contains(name)), "{name}: {stderr}");
        assert!(!out.exists(), "{name} left `{}`", out.display());
    }
    std::fs::remove_dir_all(&dir).ok();
}
