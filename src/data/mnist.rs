//! MNIST and Fashion-MNIST IDX files, plain or gzipped. Gray images become three equal
//! channels, resized to the model's input size.

use super::{Images, resize_center_crop};
use anyhow::{Context, Result, bail};
use std::io::Read;
use std::path::{Path, PathBuf};

const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// `stem` with or without `.gz`, whichever exists.
fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [stem.to_string(), format!("{stem}.gz")] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("`{}` has no `{stem}` (nor `{stem}.gz`)", dir.display())
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("`{}` is not a valid gzip file", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file with the given magic number; returns its dimensions and data.
fn read_idx(path: &Path, magic: u32) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = read_maybe_gz(path)?;
    if bytes.len() < 4 || u32::from_be_bytes(bytes[..4].try_into().unwrap()) != magic {
        bail!(
            "`{}` is not an IDX file with magic number {magic:#x}",
            path.display()
        );
    }
    let ndim = (magic & 0xff) as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        bail!(
            "`{}` is truncated: its header needs {header} bytes",
            path.display()
        );
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let expected: usize = dims.iter().product();
    if bytes.len() - header != expected {
        bail!(
            "`{}` holds {} data bytes, but its header {dims:?} says {expected}",
            path.display(),
            bytes.len() - header
        );
    }
    Ok((dims, bytes[header..].to_vec()))
}

fn load_split(dir: &Path, prefix: &str, size: usize) -> Result<Images> {
    let img_path = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let lbl_path = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let (dims, pixels) = read_idx(&img_path, 0x0803)?;
    let (ldims, labels) = read_idx(&lbl_path, 0x0801)?;
    if dims[0] != ldims[0] {
        bail!(
            "`{}` has {} images but `{}` has {} labels",
            img_path.display(),
            dims[0],
            lbl_path.display(),
            ldims[0]
        );
    }
    let (h, w) = (dims[1], dims[2]);
    if h == 0 || w == 0 {
        bail!("`{}` has images of {h}x{w} pixels", img_path.display());
    }
    let mut images = Images::new(size);
    let mut chw = vec![0u8; 3 * h * w];
    for (i, (img, &label)) in pixels.chunks_exact(h * w).zip(&labels).enumerate() {
        if label >= 10 {
            bail!(
                "`{}`: label {label} of image {i} is out of range for 10 classes",
                lbl_path.display()
            );
        }
        for c in 0..3 {
            chw[c * h * w..(c + 1) * h * w].copy_from_slice(img);
        }
        images.push(&resize_center_crop(&chw, w, h, size), label as u32);
    }
    Ok(images)
}

pub fn load(dir: &Path, size: usize, fashion: bool) -> Result<(Images, Images, Vec<String>)> {
    if !dir.is_dir() {
        bail!("dataset folder `{}` does not exist", dir.display());
    }
    let train = load_split(dir, "train", size)?;
    let test = load_split(dir, "t10k", size)?;
    let names = if fashion {
        FASHION_CLASSES.iter().map(|s| s.to_string()).collect()
    } else {
        (0..10).map(|d| d.to_string()).collect()
    };
    Ok((train, test, names))
}
