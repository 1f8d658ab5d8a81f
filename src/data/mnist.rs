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

/// Most bytes an IDX file may hold once decompressed (MNIST's largest is 47 MB): a small
/// gzip bomb must not expand into gigabytes.
pub const MAX_IDX_BYTES: u64 = 512 << 20;
/// Most pixels one image may have (MNIST's are 28 x 28).
const MAX_IMAGE_PIXELS: usize = 1 << 24;

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    gunzip_if_gzipped(path, raw)
}

/// `raw` itself, or its gzip decompression when it starts with the gzip magic bytes.
fn gunzip_if_gzipped(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>> {
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .take(MAX_IDX_BYTES + 1)
        .read_to_end(&mut out)
        .with_context(|| format!("`{}` is not a valid gzip file", path.display()))?;
    if out.len() as u64 > MAX_IDX_BYTES {
        bail!(
            "`{}` decompresses to more than {MAX_IDX_BYTES} bytes, more than an IDX file may hold",
            path.display()
        );
    }
    Ok(out)
}

/// Parses an IDX file with the given magic number; returns its dimensions and data.
fn parse_idx(path: &Path, bytes: Vec<u8>, magic: u32) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = gunzip_if_gzipped(path, bytes)?;
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
    let expected = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if expected != Some(bytes.len() - header) {
        bail!(
            "`{}` holds {} data bytes, but its header {dims:?} says {}",
            path.display(),
            bytes.len() - header,
            expected.map_or("more than 2^64".to_string(), |n| n.to_string())
        );
    }
    Ok((dims, bytes[header..].to_vec()))
}

fn load_split(dir: &Path, prefix: &str, size: usize) -> Result<Images> {
    let img_path = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let lbl_path = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    split_from_bytes(
        &img_path,
        read_maybe_gz(&img_path)?,
        &lbl_path,
        read_maybe_gz(&lbl_path)?,
        size,
    )
}

/// One split from the contents of its images and labels files (plain or gzipped; the paths
/// are only named in errors), resized to `size`.
pub fn split_from_bytes(
    img_path: &Path,
    img_bytes: Vec<u8>,
    lbl_path: &Path,
    lbl_bytes: Vec<u8>,
    size: usize,
) -> Result<Images> {
    let (dims, pixels) = parse_idx(img_path, img_bytes, 0x0803)?;
    let (ldims, labels) = parse_idx(lbl_path, lbl_bytes, 0x0801)?;
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
    if h == 0 || w == 0 || h.saturating_mul(w) > MAX_IMAGE_PIXELS {
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
