//! Every `--data` format, read from small files written here: exact bytes and labels, class
//! names, resizing, limits, seeded splits, and one clear error (naming the file or folder and
//! the problem) for each kind of bad data.

use image::{Rgb, RgbImage};
use slimcandle::data::{DataSpec, Dataset, LoadOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "slimcandle-data-formats-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn opts(size: usize) -> LoadOptions {
    LoadOptions {
        size,
        ..LoadOptions::default()
    }
}

fn spec(kind: &str, path: &Path) -> DataSpec {
    format!("{kind}:{}", path.display()).parse().unwrap()
}

fn load(kind: &str, path: &Path, o: &LoadOptions) -> Dataset {
    spec(kind, path)
        .load(o)
        .unwrap_or_else(|e| panic!("loading {kind}:{} failed: {e:#}", path.display()))
}

/// The whole error chain of a load that must fail.
fn load_err(kind: &str, path: &Path, o: &LoadOptions) -> String {
    match spec(kind, path).load(o) {
        Ok(d) => panic!(
            "loading {kind}:{} should fail, got {} + {} images",
            path.display(),
            d.train.len(),
            d.test.len()
        ),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error `{msg}` does not mention `{p}`");
    }
}

fn write(path: &Path, bytes: &[u8]) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

// ---------------------------------------------------------------------------------------------
// CIFAR

/// A 32x32 CHW image with a pattern unique to `id`.
fn cifar_image(id: usize) -> Vec<u8> {
    (0..3072)
        .map(|i| {
            let (c, y, x) = (i / 1024, (i / 32) % 32, i % 32);
            (id * 37 + c * 71 + y * 5 + x * 3) as u8
        })
        .collect()
}

/// CIFAR records: `labels` label bytes each, then the image.
fn cifar_file(records: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (labels, img) in records {
        assert_eq!(img.len(), 3072);
        out.extend_from_slice(labels);
        out.extend_from_slice(img);
    }
    out
}

/// CIFAR-10 with `per_batch` records in each of the five training files and `test` in the
/// test file. Train record `k` (in file order) has label `k % 10` and image `cifar_image(k)`;
/// test record `k` has label `(k + 3) % 10` and image `cifar_image(100 + k)`.
fn write_cifar10(dir: &Path, per_batch: usize, test: usize) {
    for b in 0..5 {
        let records: Vec<_> = (0..per_batch)
            .map(|j| {
                let k = b * per_batch + j;
                (vec![(k % 10) as u8], cifar_image(k))
            })
            .collect();
        write(
            &dir.join(format!("data_batch_{}.bin", b + 1)),
            &cifar_file(&records),
        );
    }
    let records: Vec<_> = (0..test)
        .map(|k| (vec![((k + 3) % 10) as u8], cifar_image(100 + k)))
        .collect();
    write(&dir.join("test_batch.bin"), &cifar_file(&records));
}

const CIFAR10_NAMES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

#[test]
fn cifar10_reads_bytes_labels_and_names_exactly() {
    let dir = TempDir::new("cifar10");
    write_cifar10(dir.path(), 2, 3);
    let d = load("cifar10", dir.path(), &opts(32));
    assert_eq!(d.source, format!("cifar10:{}", dir.path().display()));
    assert_eq!((d.train.len(), d.test.len()), (10, 3));
    assert_eq!((d.train.size, d.test.size), (32, 32));
    assert_eq!(d.train.pixels.len(), 10 * 3072);
    // Files in order 1..5, records in file order.
    assert_eq!(d.train.labels, (0..10).collect::<Vec<u32>>());
    assert_eq!(d.test.labels, vec![3, 4, 5]);
    for k in 0..10 {
        assert_eq!(d.train.image(k), &cifar_image(k)[..], "train image {k}");
    }
    assert_eq!(d.test.image(2), &cifar_image(102)[..]);
    assert_eq!(d.class_names, CIFAR10_NAMES);

    // Mean/std are the training set's per-channel statistics.
    let (mean, std) = d.train.channel_stats();
    assert_eq!((d.mean, d.std), (mean, std));
    let plane0: f64 = (0..10)
        .flat_map(|k| cifar_image(k)[..1024].to_vec())
        .map(|p| p as f64 / 255.0)
        .sum::<f64>()
        / 10240.0;
    assert!((d.mean[0] as f64 - plane0).abs() < 1e-5);

    // Names come from batches.meta.txt when it lists ten (blank lines ignored).
    let names: Vec<String> = (0..10).map(|i| format!("thing{i}")).collect();
    write(
        &dir.join("batches.meta.txt"),
        format!("{}\n\n", names.join("\n")).as_bytes(),
    );
    assert_eq!(load("cifar10", dir.path(), &opts(32)).class_names, names);
}

#[test]
fn cifar10_resizes_to_the_model_size() {
    let dir = TempDir::new("cifar10-resize");
    write_cifar10(dir.path(), 1, 2);
    // Make test record 1 a constant image.
    let records = vec![(vec![0u8], cifar_image(7)), (vec![9u8], vec![123u8; 3072])];
    write(&dir.join("test_batch.bin"), &cifar_file(&records));
    let d = load("cifar10", dir.path(), &opts(64));
    assert_eq!((d.train.size, d.test.size), (64, 64));
    assert_eq!(d.train.pixels.len(), 5 * 3 * 64 * 64);
    assert_eq!(d.test.image(1).len(), 3 * 64 * 64);
    assert!(d.test.image(1).iter().all(|&p| p == 123));
    assert_eq!(d.test.labels, vec![0, 9]);
    // Upscaling by 2 samples between source pixels: the corner keeps its value.
    assert_eq!(d.test.image(0)[0], cifar_image(7)[0]);
}

#[test]
fn cifar100_uses_the_fine_label() {
    let dir = TempDir::new("cifar100");
    let train = vec![
        (vec![3u8, 57], cifar_image(1)),
        (vec![19u8, 99], cifar_image(2)),
        (vec![0u8, 0], cifar_image(3)),
    ];
    write(&dir.join("train.bin"), &cifar_file(&train));
    write(
        &dir.join("test.bin"),
        &cifar_file(&[(vec![4u8, 12], cifar_image(4))]),
    );
    let d = load("cifar100", dir.path(), &opts(32));
    assert_eq!(d.train.labels, vec![57, 99, 0]);
    assert_eq!(d.test.labels, vec![12]);
    assert_eq!(d.train.image(1), &cifar_image(2)[..]);
    assert_eq!(d.test.image(0), &cifar_image(4)[..]);
    assert_eq!(d.class_names.len(), 100);
    assert_eq!(d.class_names[0], "apple");
    assert_eq!(d.class_names[57], "pear");
    assert_eq!(d.class_names[99], "worm");

    // A fine label of 100 is out of range (the coarse label is never checked against 100).
    write(
        &dir.join("test.bin"),
        &cifar_file(&[
            (vec![4u8, 12], cifar_image(4)),
            (vec![1u8, 100], cifar_image(5)),
        ]),
    );
    let msg = load_err("cifar100", dir.path(), &opts(32));
    assert_mentions(&msg, &["test.bin", "record 1", "label 100", "100 classes"]);
}

// ---------------------------------------------------------------------------------------------
// MNIST

fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// A 28x28 gray image with a pattern unique to `id`; id 0 is a constant 200.
fn digit(id: usize) -> Vec<u8> {
    if id == 0 {
        return vec![200; 784];
    }
    (0..784).map(|i| (id * 11 + i * 7 % 251) as u8).collect()
}

/// `n_train` + `n_test` images; image `k` of a split is `digit(k)` (test: `digit(50 + k)`),
/// labels `k % 10` (test: `(9 - k % 10)`).
fn write_mnist(dir: &Path, n_train: usize, n_test: usize, gz: bool) {
    let ext = if gz { ".gz" } else { "" };
    for (prefix, n, offset) in [("train", n_train, 0), ("t10k", n_test, 50)] {
        let pixels: Vec<u8> = (0..n)
            .flat_map(|k| digit(if offset == 0 { k } else { offset + k }))
            .collect();
        let labels: Vec<u8> = (0..n)
            .map(|k| if offset == 0 { k % 10 } else { 9 - k % 10 } as u8)
            .collect();
        let images = idx(0x0803, &[n as u32, 28, 28], &pixels);
        let labels = idx(0x0801, &[n as u32], &labels);
        let (images, labels) = if gz {
            (gzip(&images), gzip(&labels))
        } else {
            (images, labels)
        };
        write(
            &dir.join(format!("{prefix}-images-idx3-ubyte{ext}")),
            &images,
        );
        write(
            &dir.join(format!("{prefix}-labels-idx1-ubyte{ext}")),
            &labels,
        );
    }
}

#[test]
fn mnist_plain_and_gzipped_become_three_equal_channels() {
    let plain = TempDir::new("mnist-plain");
    let gz = TempDir::new("mnist-gz");
    write_mnist(plain.path(), 12, 4, false);
    write_mnist(gz.path(), 12, 4, true);
    assert!(gz.join("train-images-idx3-ubyte.gz").is_file());

    let a = load("mnist", plain.path(), &opts(32));
    let b = load("mnist", gz.path(), &opts(32));
    assert_eq!((a.train.len(), a.test.len()), (12, 4));
    assert_eq!(
        a.train.labels,
        (0..12).map(|k| k % 10).collect::<Vec<u32>>()
    );
    assert_eq!(a.test.labels, vec![9, 8, 7, 6]);
    assert_eq!(a.train.pixels, b.train.pixels);
    assert_eq!(a.test.pixels, b.test.pixels);
    assert_eq!(a.train.labels, b.train.labels);
    assert_eq!(
        a.class_names,
        (0..10).map(|d| d.to_string()).collect::<Vec<_>>()
    );
    assert_eq!(a.train.size, 32);
    for i in 0..a.train.len() {
        let img = a.train.image(i);
        assert_eq!(img.len(), 3 * 32 * 32);
        let plane = 32 * 32;
        assert_eq!(img[..plane], img[plane..2 * plane], "image {i}: R != G");
        assert_eq!(img[..plane], img[2 * plane..], "image {i}: R != B");
    }
    // The constant image stays constant through the 28 -> 32 resize.
    assert!(a.train.image(0).iter().all(|&p| p == 200));

    // At 28 the gray bytes are copied exactly into each channel.
    let exact = load("mnist", gz.path(), &opts(28));
    for (i, k) in [(3usize, 3usize), (11, 11)] {
        let img = exact.train.image(i);
        for c in 0..3 {
            assert_eq!(&img[c * 784..(c + 1) * 784], &digit(k)[..]);
        }
    }
    assert_eq!(&exact.test.image(1)[..784], &digit(51)[..]);
}

#[test]
fn fashion_mnist_has_its_class_names() {
    let dir = TempDir::new("fashion");
    write_mnist(dir.path(), 10, 2, true);
    let d = load("fashion-mnist", dir.path(), &opts(32));
    assert_eq!(d.source, format!("fashion-mnist:{}", dir.path().display()));
    assert_eq!(d.class_names.len(), 10);
    assert_eq!(d.class_names[0], "T-shirt/top");
    assert_eq!(d.class_names[9], "Ankle boot");
    // `fashion_mnist` is accepted too.
    let alias: DataSpec = format!("fashion_mnist:{}", dir.path().display())
        .parse()
        .unwrap();
    assert_eq!(alias, spec("fashion-mnist", dir.path()));
}

// ---------------------------------------------------------------------------------------------
// Image folders

fn save(path: &Path, img: &RgbImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

fn solid(w: u32, h: u32, rgb: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb(rgb))
}

fn class_color(label: usize) -> [u8; 3] {
    [[250, 10, 10], [10, 250, 10], [10, 10, 250]][label]
}

/// The channel means of image `i`.
fn mean_rgb(img: &[u8]) -> [f64; 3] {
    let plane = img.len() / 3;
    let mut m = [0.0; 3];
    for (c, v) in m.iter_mut().enumerate() {
        *v = img[c * plane..(c + 1) * plane]
            .iter()
            .map(|&p| p as f64)
            .sum::<f64>()
            / plane as f64;
    }
    m
}

#[test]
fn folder_with_train_and_test_splits() {
    let dir = TempDir::new("folder-split");
    // Created out of order; class names must come out sorted: ant, bee, cat.
    for (class, label) in [("cat", 2), ("ant", 0), ("bee", 1)] {
        let color = class_color(label);
        for i in 0..3 {
            let ext = if i == 1 { "jpg" } else { "png" };
            save(
                &dir.join(&format!("train/{class}/img{i}.{ext}")),
                &solid(20 + 4 * i as u32, 24, color),
            );
        }
        save(
            &dir.join(&format!("test/{class}/t.PNG")),
            &solid(16, 16, color),
        );
    }
    // Files that are not images are ignored.
    write(&dir.join("train/ant/notes.txt"), b"not an image");
    let d = load("folder", dir.path(), &opts(16));
    assert_eq!(d.class_names, ["ant", "bee", "cat"]);
    assert_eq!(d.train.labels, vec![0, 0, 0, 1, 1, 1, 2, 2, 2]);
    assert_eq!(d.test.labels, vec![0, 1, 2]);
    assert_eq!(d.train.size, 16);
    for (split, imgs) in [("train", &d.train), ("test", &d.test)] {
        for i in 0..imgs.len() {
            let want = class_color(imgs.labels[i] as usize);
            let got = mean_rgb(imgs.image(i));
            for c in 0..3 {
                // JPEG is lossy; PNG exact.
                assert!(
                    (got[c] - want[c] as f64).abs() < 6.0,
                    "{split} image {i}: {got:?} vs {want:?}"
                );
            }
        }
    }
    // The PNG test images are exact.
    assert!(d.test.image(1)[..256].iter().all(|&p| p == 10));
    assert!(d.test.image(1)[256..512].iter().all(|&p| p == 250));
}

#[test]
fn folder_resizes_the_shorter_side_and_center_crops() {
    let dir = TempDir::new("folder-crop");
    // A wide image: three 20-pixel vertical bands, red | green | blue.
    let wide = RgbImage::from_fn(60, 20, |x, _| Rgb(class_color((x / 20) as usize)));
    // A tall image: three horizontal bands, blue / red / green.
    let tall = RgbImage::from_fn(20, 60, |_, y| Rgb(class_color(((y / 20 + 2) % 3) as usize)));
    save(&dir.join("train/a/wide.png"), &wide);
    save(&dir.join("train/b/tall.png"), &tall);
    save(&dir.join("test/a/wide.png"), &wide);
    save(&dir.join("test/b/tall.png"), &tall);
    for size in [20, 10] {
        let d = load("folder", dir.path(), &opts(size));
        let plane = size * size;
        assert_eq!(d.train.image(0).len(), 3 * plane);
        // Only the middle band survives the crop: green for the wide one, red for the tall one.
        let wide_out = d.train.image(0);
        assert!(wide_out[..plane].iter().all(|&p| p == 10), "size {size}");
        assert!(wide_out[plane..2 * plane].iter().all(|&p| p == 250));
        assert!(wide_out[2 * plane..].iter().all(|&p| p == 10));
        let tall_out = d.train.image(1);
        assert!(tall_out[..plane].iter().all(|&p| p == 250), "size {size}");
        assert!(tall_out[plane..].iter().all(|&p| p == 10));
    }
}

/// `ROOT/<class>/...`: three classes of five images, each a distinct gray level.
fn write_single_folder(root: &Path) {
    for (ci, class) in ["zebra", "apple", "mango"].iter().enumerate() {
        for i in 0..5 {
            let v = (ci * 50 + i * 10 + 5) as u8;
            save(
                &root.join(format!("{class}/{i}.png")),
                &solid(8, 8, [v, v, v]),
            );
        }
    }
}

fn first_bytes(imgs: &slimcandle::data::Images) -> Vec<(u8, u32)> {
    (0..imgs.len())
        .map(|i| (imgs.image(i)[0], imgs.labels[i]))
        .collect()
}

#[test]
fn single_folder_is_split_by_test_fraction_and_seed() {
    let dir = TempDir::new("folder-single");
    write_single_folder(dir.path());
    let o = |seed, test_fraction| LoadOptions {
        size: 8,
        seed,
        test_fraction,
        ..LoadOptions::default()
    };
    let a = load("folder", dir.path(), &o(1, 0.2));
    assert_eq!(a.class_names, ["apple", "mango", "zebra"]);
    assert_eq!((a.train.len(), a.test.len()), (12, 3));
    // Every image lands in exactly one split, with the label of its (sorted) class.
    let mut all: Vec<(u8, u32)> = first_bytes(&a.train);
    all.extend(first_bytes(&a.test));
    all.sort();
    let mut want: Vec<(u8, u32)> = Vec::new();
    for (ci, label) in [(0usize, 2u32), (1, 0), (2, 1)] {
        for i in 0..5 {
            want.push(((ci * 50 + i * 10 + 5) as u8, label));
        }
    }
    want.sort();
    assert_eq!(all, want);

    // The same seed gives the same split; some other seed gives another one.
    let again = load("folder", dir.path(), &o(1, 0.2));
    assert_eq!(again.train.pixels, a.train.pixels);
    assert_eq!(again.test.labels, a.test.labels);
    assert_eq!(again.test.pixels, a.test.pixels);
    assert!(
        (2..8).any(|s| load("folder", dir.path(), &o(s, 0.2)).test.pixels != a.test.pixels),
        "the split ignores the seed"
    );

    // The fraction sets the test size.
    let half = load("folder", dir.path(), &o(1, 0.4));
    assert_eq!((half.train.len(), half.test.len()), (9, 6));
    let none = load("folder", dir.path(), &o(1, 0.0));
    assert_eq!((none.train.len(), none.test.len()), (15, 0));
}

// ---------------------------------------------------------------------------------------------
// Limits and shapes

#[test]
fn limits_are_class_balanced_and_seeded() {
    let dir = TempDir::new("limits");
    // 40 training images (4 per class) and 20 test images (2 per class).
    write_cifar10(dir.path(), 8, 20);
    let o = |seed, train_limit, test_limit| LoadOptions {
        size: 32,
        train_limit,
        test_limit,
        seed,
        ..LoadOptions::default()
    };
    let full = load("cifar10", dir.path(), &o(5, None, None));
    assert_eq!((full.train.len(), full.test.len()), (40, 20));

    let a = load("cifar10", dir.path(), &o(5, Some(20), Some(10)));
    assert_eq!((a.train.len(), a.test.len()), (20, 10));
    for c in 0..10 {
        assert_eq!(a.train.labels.iter().filter(|&&l| l == c).count(), 2);
        assert_eq!(a.test.labels.iter().filter(|&&l| l == c).count(), 1);
    }
    // The subset is made of real images, with their labels, in dataset order.
    let index = |img: &[u8]| {
        (0..40)
            .find(|&k| cifar_image(k) == img)
            .expect("a source image")
    };
    let picked: Vec<usize> = (0..a.train.len())
        .map(|i| index(a.train.image(i)))
        .collect();
    assert!(picked.windows(2).all(|w| w[0] < w[1]));
    for (i, &k) in picked.iter().enumerate() {
        assert_eq!(a.train.labels[i], (k % 10) as u32);
    }

    // Seeded: the same seed picks the same images, other seeds other ones.
    let b = load("cifar10", dir.path(), &o(5, Some(20), Some(10)));
    assert_eq!(a.train.pixels, b.train.pixels);
    assert_eq!(a.test.pixels, b.test.pixels);
    let others: Vec<Dataset> = (6..10)
        .map(|s| load("cifar10", dir.path(), &o(s, Some(20), Some(10))))
        .collect();
    assert!(others.iter().any(|d| d.train.pixels != a.train.pixels));
    assert!(others.iter().any(|d| d.test.pixels != a.test.pixels));

    // An uneven limit still takes classes in turn; a limit past the end takes everything.
    let c = load("cifar10", dir.path(), &o(5, Some(13), Some(1000)));
    assert_eq!(c.train.len(), 13);
    for l in 0..10 {
        let n = c.train.labels.iter().filter(|&&x| x == l).count();
        assert!((1..=2).contains(&n), "class {l}: {n}");
    }
    assert_eq!(c.test.pixels, full.test.pixels);
    // The mean follows the subset actually used.
    assert_eq!(c.mean, c.train.channel_stats().0);
}

#[test]
fn shapes_are_seeded_and_follow_the_limits() {
    let o = |seed, size| LoadOptions {
        size,
        train_limit: Some(20),
        test_limit: Some(10),
        seed,
        ..LoadOptions::default()
    };
    let s: DataSpec = "shapes".parse().unwrap();
    let a = s.load(&o(3, 32)).unwrap();
    assert_eq!(a.source, "shapes");
    assert_eq!(a.class_names.len(), 10);
    assert_eq!(a.class_names[0], "circle");
    assert_eq!((a.train.len(), a.test.len()), (20, 10));
    assert_eq!(a.train.pixels.len(), 20 * 3 * 32 * 32);
    assert_eq!(
        a.train.labels,
        (0..20).map(|i| i % 10).collect::<Vec<u32>>()
    );
    assert_eq!(a.test.labels, (0..10).collect::<Vec<u32>>());
    let b = s.load(&o(3, 32)).unwrap();
    assert_eq!(a.train.pixels, b.train.pixels);
    assert_eq!(a.test.pixels, b.test.pixels);
    assert_ne!(a.train.pixels, s.load(&o(4, 32)).unwrap().train.pixels);
    assert_ne!(a.train.pixels[..10 * 3072], a.test.pixels[..]);
    let small = s.load(&o(3, 16)).unwrap();
    assert_eq!(small.train.size, 16);
    assert_eq!(small.train.pixels.len(), 20 * 3 * 16 * 16);
    assert!(a.std.iter().all(|&s| s > 0.05));
}

// ---------------------------------------------------------------------------------------------
// Bad data

#[test]
fn missing_and_empty_folders() {
    let dir = TempDir::new("missing");
    let gone = dir.join("no-such-folder");
    for kind in ["cifar10", "cifar100", "mnist", "fashion-mnist", "folder"] {
        let msg = load_err(kind, &gone, &opts(32));
        assert_mentions(&msg, &["no-such-folder", "does not exist"]);
    }
    // An empty folder: no class folders, and no dataset files.
    let msg = load_err("folder", dir.path(), &opts(32));
    assert_mentions(
        &msg,
        &[&dir.path().display().to_string(), "no class folders"],
    );
    let msg = load_err("cifar10", dir.path(), &opts(32));
    assert_mentions(&msg, &["data_batch_1.bin", "cannot read"]);
    let msg = load_err("mnist", dir.path(), &opts(32));
    assert_mentions(&msg, &["train-images-idx3-ubyte", "has no"]);
    // `train/` and `test/` with no class folders in them.
    std::fs::create_dir_all(dir.join("train")).unwrap();
    std::fs::create_dir_all(dir.join("test")).unwrap();
    let msg = load_err("folder", dir.path(), &opts(32));
    assert_mentions(&msg, &["train", "no class folders"]);
}

#[test]
fn class_folder_without_images() {
    let dir = TempDir::new("no-images");
    save(&dir.join("cat/a.png"), &solid(4, 4, [1, 2, 3]));
    write(&dir.join("dog/readme.txt"), b"nothing here");
    let msg = load_err("folder", dir.path(), &opts(8));
    let dog = dir.join("dog").display().to_string();
    assert_mentions(&msg, &[&dog, "no images"]);
}

#[test]
fn undecodable_image_names_its_file() {
    let dir = TempDir::new("bad-jpg");
    for split in ["train", "test"] {
        save(
            &dir.join(&format!("{split}/a/ok.png")),
            &solid(4, 4, [9, 9, 9]),
        );
        save(
            &dir.join(&format!("{split}/b/ok.png")),
            &solid(4, 4, [9, 9, 9]),
        );
    }
    write(
        &dir.join("train/b/broken.jpg"),
        b"this is not a jpeg at all",
    );
    let msg = load_err("folder", dir.path(), &opts(8));
    let file = dir.join("train/b/broken.jpg").display().to_string();
    assert_mentions(&msg, &[&file, "cannot decode"]);

    // A PNG cut short, in the test split.
    std::fs::remove_file(dir.join("train/b/broken.jpg")).unwrap();
    let png = std::fs::read(dir.join("test/a/ok.png")).unwrap();
    write(&dir.join("test/a/cut.png"), &png[..png.len() / 2]);
    let msg = load_err("folder", dir.path(), &opts(8));
    let file = dir.join("test/a/cut.png").display().to_string();
    assert_mentions(&msg, &[&file, "cannot decode"]);
}

#[test]
fn train_and_test_with_different_classes() {
    let dir = TempDir::new("class-mismatch");
    save(&dir.join("train/a/x.png"), &solid(4, 4, [0, 0, 0]));
    save(&dir.join("train/b/x.png"), &solid(4, 4, [0, 0, 0]));
    save(&dir.join("test/a/x.png"), &solid(4, 4, [0, 0, 0]));
    save(&dir.join("test/c/x.png"), &solid(4, 4, [0, 0, 0]));
    let msg = load_err("folder", dir.path(), &opts(8));
    assert_mentions(&msg, &["train", "test", "different class folders"]);
}

#[test]
fn cifar_file_of_the_wrong_size_and_bad_label() {
    let dir = TempDir::new("cifar-bad");
    write_cifar10(dir.path(), 2, 2);
    let mut bytes = std::fs::read(dir.join("data_batch_3.bin")).unwrap();
    bytes.truncate(bytes.len() - 100);
    write(&dir.join("data_batch_3.bin"), &bytes);
    let msg = load_err("cifar10", dir.path(), &opts(32));
    assert_mentions(&msg, &["data_batch_3.bin", "not a whole number", "3073"]);

    // An empty file is as wrong.
    write(&dir.join("data_batch_3.bin"), b"");
    let msg = load_err("cifar10", dir.path(), &opts(32));
    assert_mentions(&msg, &["data_batch_3.bin", "0 bytes"]);

    // A CIFAR-100 file read as CIFAR-10 (3074-byte records): not a whole number of 3073.
    write_cifar10(dir.path(), 2, 2);
    let hundred = cifar_file(&vec![(vec![1u8, 2], cifar_image(0)); 3]);
    write(&dir.join("test_batch.bin"), &hundred);
    let msg = load_err("cifar10", dir.path(), &opts(32));
    assert_mentions(&msg, &["test_batch.bin", "not a whole number"]);

    // Label 12 in a ten-class file.
    write_cifar10(dir.path(), 2, 2);
    let records = vec![(vec![1u8], cifar_image(0)), (vec![12u8], cifar_image(1))];
    write(&dir.join("data_batch_2.bin"), &cifar_file(&records));
    let msg = load_err("cifar10", dir.path(), &opts(32));
    assert_mentions(
        &msg,
        &["data_batch_2.bin", "record 1", "label 12", "10 classes"],
    );

    // A missing file is named.
    write_cifar10(dir.path(), 2, 2);
    std::fs::remove_file(dir.join("data_batch_4.bin")).unwrap();
    let msg = load_err("cifar10", dir.path(), &opts(32));
    assert_mentions(&msg, &["data_batch_4.bin", "cannot read"]);
}

#[test]
fn idx_files_with_bad_magic_truncation_or_mismatched_counts() {
    let dir = TempDir::new("idx-bad");
    let labels = dir.join("train-labels-idx1-ubyte");
    let images = dir.join("train-images-idx3-ubyte");

    // Bad magic: an image file where labels belong.
    write_mnist(dir.path(), 4, 2, false);
    write(&labels, &idx(0x0803, &[4, 28, 28], &[0; 4 * 784]));
    let msg = load_err("mnist", dir.path(), &opts(32));
    assert_mentions(&msg, &["train-labels-idx1-ubyte", "magic number", "0x801"]);
    // Garbage shorter than a magic number.
    write(&images, b"ab");
    let msg = load_err("mnist", dir.path(), &opts(32));
    assert_mentions(&msg, &["train-images-idx3-ubyte", "magic number"]);

    // Truncated data: the header says 4 images, 3.5 are there.
    write_mnist(dir.path(), 4, 2, false);
    let mut bytes = std::fs::read(&images).unwrap();
    bytes.truncate(bytes.len() - 392);
    write(&images, &bytes);
    let msg = load_err("mnist", dir.path(), &opts(32));
    assert_mentions(&msg, &["train-images-idx3-ubyte", "3136", "2744"]);
    // Truncated header.
    write(&images, &idx(0x0803, &[4], &[]));
    let msg = load_err("mnist", dir.path(), &opts(32));
    assert_mentions(&msg, &["train-images-idx3-ubyte", "truncated"]);
    // A truncated gzip stream.
    let gz = gzip(&idx(0x0803, &[4, 28, 28], &[7; 4 * 784]));
    std::fs::remove_file(&images).unwrap();
    write(&dir.join("train-images-idx3-ubyte.gz"), &gz[..gz.len() / 2]);
    let msg = load_err("mnist", dir.path(), &opts(32));
    assert_mentions(&msg, &["train-images-idx3-ubyte.gz", "gzip"]);
    std::fs::remove_file(dir.join("train-images-idx3-ubyte.gz")).unwrap();

    // Five images, four labels.
    write_mnist(dir.path(), 4, 2, false);
    write(&images, &idx(0x0803, &[5, 28, 28], &[0; 5 * 784]));
    let msg = load_err("mnist", dir.path(), &opts(32));
    assert_mentions(
        &msg,
        &[
            "train-images-idx3-ubyte",
            "5 images",
            "train-labels-idx1-ubyte",
            "4 labels",
        ],
    );

    // A label past 9.
    write_mnist(dir.path(), 4, 2, false);
    write(
        &dir.join("t10k-labels-idx1-ubyte"),
        &idx(0x0801, &[2], &[3, 10]),
    );
    let msg = load_err("mnist", dir.path(), &opts(32));
    assert_mentions(&msg, &["t10k-labels-idx1-ubyte", "label 10", "10 classes"]);

    // Images of zero rows: an error, not a panic.
    write_mnist(dir.path(), 4, 2, false);
    write(&images, &idx(0x0803, &[4, 0, 0], &[]));
    let msg = load_err("mnist", dir.path(), &opts(32));
    assert_mentions(&msg, &["train-images-idx3-ubyte", "0x0 pixels"]);
}

#[test]
fn unknown_kinds_get_a_hint() {
    for (bad, hint) in [
        ("cifar:/x", "cifar10"),
        ("mnits:/x", "mnist"),
        ("fodler:/x", "folder"),
        ("shape", "shapes"),
        ("fashion:/x", "fashion-mnist"),
    ] {
        let msg = format!("{:#}", bad.parse::<DataSpec>().unwrap_err());
        let kind = bad.split(':').next().unwrap();
        assert_mentions(
            &msg,
            &[
                &format!("unknown dataset kind `{kind}`"),
                &format!("did you mean `{hint}`?"),
            ],
        );
    }
    for bare in ["cifar10", "mnist", "folder:"] {
        let msg = format!("{:#}", bare.parse::<DataSpec>().unwrap_err());
        assert_mentions(&msg, &["needs a path"]);
    }
    assert_eq!(
        "folder:/a/b:c".parse::<DataSpec>().unwrap(),
        DataSpec::Folder("/a/b:c".into())
    );
}

#[test]
fn image_format_comes_from_the_content() {
    // A PNG named `.jpg` (as a few ImageNet files are) decodes, exactly.
    let dir = TempDir::new("misnamed");
    save(&dir.join("a/x.png"), &solid(4, 4, [1, 2, 3]));
    save(&dir.join("b/tmp.png"), &solid(4, 4, [7, 8, 9]));
    std::fs::rename(dir.join("b/tmp.png"), dir.join("b/y.jpg")).unwrap();
    let d = load(
        "folder",
        dir.path(),
        &LoadOptions {
            size: 4,
            test_fraction: 0.0,
            ..LoadOptions::default()
        },
    );
    assert_eq!(d.train.labels, vec![0, 1]);
    let img = d.train.image(1);
    assert!(img[..16].iter().all(|&p| p == 7));
    assert!(img[16..32].iter().all(|&p| p == 8));
    assert!(img[32..].iter().all(|&p| p == 9));
}
