//! Datasets held in memory as 8-bit images, and the `--data` specifications that load them.
//!
//! Every source is materialised at the model's input size (resized and center-cropped where it
//! differs) as 3-channel CHW bytes, so batching is a copy with augmentation and normalisation.

mod cifar;
mod folder;
mod loader;
mod mnist;
mod shapes;

pub use cifar::records_from_bytes as cifar_records_from_bytes;
pub use loader::{Augment, Batch, BatchLoader, EpochPlan};
pub use mnist::split_from_bytes as mnist_split_from_bytes;

use crate::rng::Rng;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Images of one split: `len()` images of 3 x `size` x `size` bytes, CHW, and their labels.
#[derive(Debug, Clone)]
pub struct Images {
    pub size: usize,
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
}

impl Images {
    pub fn new(size: usize) -> Images {
        Images {
            size,
            pixels: Vec::new(),
            labels: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image_bytes(&self) -> usize {
        3 * self.size * self.size
    }

    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_bytes();
        &self.pixels[i * n..(i + 1) * n]
    }

    pub fn push(&mut self, chw: &[u8], label: u32) {
        debug_assert_eq!(chw.len(), self.image_bytes());
        self.pixels.extend_from_slice(chw);
        self.labels.push(label);
    }

    /// A fixed, seeded, class-balanced subset of `n` images (all of them when `n` >= len):
    /// classes take turns, each giving its images in a seeded random order.
    pub fn balanced_subset(&self, n: usize, seed: u64) -> Images {
        if n >= self.len() {
            return self.clone();
        }
        let classes = self.labels.iter().max().map_or(0, |&m| m as usize + 1);
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
        for (i, &l) in self.labels.iter().enumerate() {
            by_class[l as usize].push(i);
        }
        let mut rng = Rng::new(seed);
        for list in &mut by_class {
            rng.shuffle(list);
        }
        let mut chosen = Vec::with_capacity(n);
        let mut round = 0;
        while chosen.len() < n {
            for list in &by_class {
                if chosen.len() < n && round < list.len() {
                    chosen.push(list[round]);
                }
            }
            round += 1;
        }
        chosen.sort_unstable();
        let mut out = Images::new(self.size);
        for i in chosen {
            out.push(self.image(i), self.labels[i]);
        }
        out
    }

    /// Per-channel mean and standard deviation of the pixels scaled to [0, 1].
    pub fn channel_stats(&self) -> ([f32; 3], [f32; 3]) {
        let plane = self.size * self.size;
        let mut sum = [0f64; 3];
        let mut sq = [0f64; 3];
        for img in self.pixels.chunks_exact(3 * plane) {
            for c in 0..3 {
                for &p in &img[c * plane..(c + 1) * plane] {
                    let v = p as f64 / 255.0;
                    sum[c] += v;
                    sq[c] += v * v;
                }
            }
        }
        let count = (self.len() * plane).max(1) as f64;
        let mut mean = [0f32; 3];
        let mut std = [0f32; 3];
        for c in 0..3 {
            let m = sum[c] / count;
            mean[c] = m as f32;
            std[c] = ((sq[c] / count - m * m).max(1e-12)).sqrt() as f32;
        }
        (mean, std)
    }
}

/// A dataset: train and test splits, class names, and the normalisation its models use.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// What `--data` said, for provenance.
    pub source: String,
    pub train: Arc<Images>,
    pub test: Arc<Images>,
    pub class_names: Vec<String>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// A parsed `--data` value.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSpec {
    Shapes,
    Cifar10(PathBuf),
    Cifar100(PathBuf),
    Mnist(PathBuf),
    FashionMnist(PathBuf),
    /// `ROOT/train/<class>/...` and `ROOT/test/<class>/...`, or one folder of class folders
    /// split by `test_fraction`.
    Folder(PathBuf),
}

impl std::str::FromStr for DataSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<DataSpec> {
        let (kind, path) = match s.split_once(':') {
            Some((k, p)) => (k, Some(PathBuf::from(p))),
            None => (s, None),
        };
        let need = |p: Option<PathBuf>| match p {
            Some(p) if !p.as_os_str().is_empty() => Ok(p),
            _ => bail!("--data {kind} needs a path: `--data {kind}:PATH`"),
        };
        Ok(match kind {
            "shapes" => DataSpec::Shapes,
            "cifar10" => DataSpec::Cifar10(need(path)?),
            "cifar100" => DataSpec::Cifar100(need(path)?),
            "mnist" => DataSpec::Mnist(need(path)?),
            "fashion-mnist" | "fashion_mnist" => DataSpec::FashionMnist(need(path)?),
            "folder" => DataSpec::Folder(need(path)?),
            other => {
                let known = [
                    "shapes",
                    "cifar10",
                    "cifar100",
                    "mnist",
                    "fashion-mnist",
                    "folder",
                ];
                // A known kind that starts with what was typed (`fashion`) beats a closer
                // edit distance (`shapes`).
                let best = known
                    .iter()
                    .min_by_key(|k| {
                        (
                            !k.starts_with(other),
                            crate::models::edit_distance(other, k),
                        )
                    })
                    .unwrap();
                bail!(
                    "unknown dataset kind `{other}` (did you mean `{best}`?); use one of {}",
                    known.join(", ")
                )
            }
        })
    }
}

/// The process-wide `--skip-bad-images` setting, the default of
/// [`LoadOptions::skip_bad_images`]: a global flag of the command line that every command's
/// data loading honours without each command passing it on.
static SKIP_BAD_IMAGES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sets the default of [`LoadOptions::skip_bad_images`] (the `--skip-bad-images` flag).
pub fn set_skip_bad_images(skip: bool) {
    SKIP_BAD_IMAGES.store(skip, std::sync::atomic::Ordering::Relaxed);
}

/// How much data to load and at what size.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Side of the square images the model takes.
    pub size: usize,
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    /// Fraction held out for testing when a folder has no train/test split.
    pub test_fraction: f64,
    pub seed: u64,
    /// Image folders: leave out (and list) files that do not decode instead of failing.
    pub skip_bad_images: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            size: 32,
            train_limit: None,
            test_limit: None,
            test_fraction: 0.2,
            seed: 0,
            skip_bad_images: SKIP_BAD_IMAGES.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// A binary-format loader's error, with a hint when `dir` holds folders: images sorted into
/// class folders are `folder:` data, not `cifar10:` or `mnist:`.
fn folder_hint(e: anyhow::Error, dir: &Path) -> anyhow::Error {
    let has_folders = std::fs::read_dir(dir)
        .is_ok_and(|entries| entries.flatten().any(|entry| entry.path().is_dir()));
    if has_folders {
        anyhow::anyhow!(
            "{e:#} (`{0}` holds folders: for images in class folders use `--data folder:{0}`)",
            dir.display()
        )
    } else {
        e
    }
}

impl DataSpec {
    /// Loads both splits. Limits take a seeded, class-balanced subset; for `shapes` they set
    /// how many images are generated.
    pub fn load(&self, opts: &LoadOptions) -> Result<Dataset> {
        let (mut train, mut test, class_names, source) = match self {
            DataSpec::Shapes => {
                let train = shapes::generate(
                    opts.train_limit.unwrap_or(10_000),
                    opts.size,
                    opts.seed,
                    false,
                );
                let test =
                    shapes::generate(opts.test_limit.unwrap_or(2_000), opts.size, opts.seed, true);
                (train, test, shapes::class_names(), "shapes".to_string())
            }
            DataSpec::Cifar10(p) => {
                let (tr, te, names) =
                    cifar::load_cifar10(p, opts.size).map_err(|e| folder_hint(e, p))?;
                (tr, te, names, format!("cifar10:{}", p.display()))
            }
            DataSpec::Cifar100(p) => {
                let (tr, te, names) =
                    cifar::load_cifar100(p, opts.size).map_err(|e| folder_hint(e, p))?;
                (tr, te, names, format!("cifar100:{}", p.display()))
            }
            DataSpec::Mnist(p) | DataSpec::FashionMnist(p) => {
                let fashion = matches!(self, DataSpec::FashionMnist(_));
                let (tr, te, names) =
                    mnist::load(p, opts.size, fashion).map_err(|e| folder_hint(e, p))?;
                let kind = if fashion { "fashion-mnist" } else { "mnist" };
                (tr, te, names, format!("{kind}:{}", p.display()))
            }
            DataSpec::Folder(p) => {
                let (tr, te, names) = folder::load(
                    p,
                    opts.size,
                    opts.test_fraction,
                    opts.seed,
                    opts.skip_bad_images,
                )?;
                (tr, te, names, format!("folder:{}", p.display()))
            }
        };
        if let Some(n) = opts.train_limit {
            train = train.balanced_subset(n, opts.seed);
        }
        if let Some(n) = opts.test_limit {
            test = test.balanced_subset(n, opts.seed ^ 0x7e57);
        }
        if train.is_empty() && test.is_empty() {
            bail!("{source}: no images");
        }
        let classes = class_names.len() as u32;
        if let Some(&bad) = train
            .labels
            .iter()
            .chain(&test.labels)
            .find(|&&l| l >= classes)
        {
            bail!("{source}: label {bad} is out of range for {classes} classes");
        }
        let (mean, std) = if train.is_empty() {
            test.channel_stats()
        } else {
            train.channel_stats()
        };
        Ok(Dataset {
            source,
            train: Arc::new(train),
            test: Arc::new(test),
            class_names,
            mean,
            std,
        })
    }
}

/// Decodes an image file into CHW RGB bytes with its width and height. The format comes from
/// the content, so a PNG named `.jpg` (ImageNet has some) still decodes.
pub fn read_image_chw(path: &std::path::Path) -> Result<(Vec<u8>, usize, usize)> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read image `{}`", path.display()))?;
    decode_image_chw(path, &bytes)
}

/// Longest side of an image slimcandle decodes: far beyond any training photo, and it stops a
/// forged header of a few hundred bytes from making the decoder fill tens of millions of
/// pixels.
pub const MAX_IMAGE_SIDE: u32 = 16_384;

/// Decodes the contents of an image file (`path` is only named in errors), as
/// [`read_image_chw`]. Besides [`MAX_IMAGE_SIDE`], the decoder's default allocation limit
/// (512 MiB) bounds what a forged header can make it allocate.
pub fn decode_image_chw(path: &std::path::Path, bytes: &[u8]) -> Result<(Vec<u8>, usize, usize)> {
    let decode = || -> Result<image::DynamicImage> {
        let mut reader =
            image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_IMAGE_SIDE);
        limits.max_image_height = Some(MAX_IMAGE_SIDE);
        reader.limits(limits);
        Ok(reader.decode()?)
    };
    let img = decode()
        .with_context(|| format!("cannot decode image `{}`", path.display()))?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut chw = vec![0u8; 3 * w * h];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            chw[c * w * h + i] = px[c];
        }
    }
    Ok((chw, w, h))
}

/// Resizes a CHW u8 image of `w` x `h` so that its shorter side is `size`, then center-crops
/// to `size` x `size` (bilinear; identity when already that size).
pub fn resize_center_crop(chw: &[u8], w: usize, h: usize, size: usize) -> Vec<u8> {
    if w == size && h == size {
        return chw.to_vec();
    }
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as usize).max(size),
        ((h as f64 * scale).round() as usize).max(size),
    );
    let (x0, y0) = ((nw - size) / 2, (nh - size) / 2);
    let mut out = vec![0u8; 3 * size * size];
    for c in 0..3 {
        let plane = &chw[c * w * h..(c + 1) * w * h];
        for oy in 0..size {
            // Pixel-centre mapping, as torchvision's antialias-free bilinear resize does.
            let sy = ((oy + y0) as f64 + 0.5) / scale - 0.5;
            let y = sy.floor().clamp(0.0, (h - 1) as f64) as usize;
            let y1 = (y + 1).min(h - 1);
            let fy = (sy - y as f64).clamp(0.0, 1.0);
            for ox in 0..size {
                let sx = ((ox + x0) as f64 + 0.5) / scale - 0.5;
                let x = sx.floor().clamp(0.0, (w - 1) as f64) as usize;
                let x1 = (x + 1).min(w - 1);
                let fx = (sx - x as f64).clamp(0.0, 1.0);
                let p = |yy: usize, xx: usize| plane[yy * w + xx] as f64;
                let v = (p(y, x) * (1.0 - fx) + p(y, x1) * fx) * (1.0 - fy)
                    + (p(y1, x) * (1.0 - fx) + p(y1, x1) * fx) * fy;
                out[c * size * size + oy * size + ox] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_subset_is_seeded_and_balanced() {
        let mut imgs = Images::new(1);
        for i in 0..100u32 {
            imgs.push(&[i as u8; 3], i % 4);
        }
        let a = imgs.balanced_subset(20, 3);
        let b = imgs.balanced_subset(20, 3);
        assert_eq!(a.labels, b.labels);
        assert_eq!(a.pixels, b.pixels);
        for c in 0..4 {
            assert_eq!(a.labels.iter().filter(|&&l| l == c).count(), 5);
        }
        assert_ne!(a.pixels, imgs.balanced_subset(20, 4).pixels);
    }

    #[test]
    fn data_specs_parse_with_hints() {
        assert_eq!("shapes".parse::<DataSpec>().unwrap(), DataSpec::Shapes);
        assert_eq!(
            "cifar10:/d".parse::<DataSpec>().unwrap(),
            DataSpec::Cifar10("/d".into())
        );
        assert!(
            "cifar10"
                .parse::<DataSpec>()
                .unwrap_err()
                .to_string()
                .contains("needs a path")
        );
        assert!(
            "cifr10:/x"
                .parse::<DataSpec>()
                .unwrap_err()
                .to_string()
                .contains("did you mean `cifar10`")
        );
    }

    #[test]
    fn resize_keeps_constant_images_constant() {
        let img = vec![77u8; 3 * 28 * 28];
        let out = resize_center_crop(&img, 28, 28, 32);
        assert_eq!(out.len(), 3 * 32 * 32);
        assert!(out.iter().all(|&v| v == 77));
        let wide = vec![5u8; 3 * 40 * 20];
        assert_eq!(resize_center_crop(&wide, 40, 20, 10).len(), 300);
    }
}
