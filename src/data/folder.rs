//! Image folders: `ROOT/train/<class>/*` and `ROOT/test/<class>/*`, or `ROOT/<class>/*` split
//! by a seeded fraction. Class names are the folder names, sorted. Images are decoded in
//! parallel and resized (shorter side) and center-cropped to the model's input size.

use super::{Images, read_image_chw, resize_center_crop};
use crate::rng::Rng;
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

const EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "bmp"];

fn class_dirs(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut dirs: Vec<(String, PathBuf)> = std::fs::read_dir(root)
        .with_context(|| format!("cannot read dataset folder `{}`", root.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        bail!(
            "`{}` has no class folders (expected `{}/<class>/*.jpg`)",
            root.display(),
            root.display()
        );
    }
    Ok(dirs)
}

/// Image files per class, in sorted order.
fn list(root: &Path, classes: &[String]) -> Result<Vec<(PathBuf, u32)>> {
    let mut files = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let dir = root.join(class);
        if !dir.is_dir() {
            bail!("`{}` has no folder for class `{class}`", root.display());
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read `{}`", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            })
            .collect();
        if found.is_empty() {
            bail!(
                "class folder `{}` has no images ({})",
                dir.display(),
                EXTENSIONS.join(", ")
            );
        }
        found.sort();
        files.extend(found.into_iter().map(|p| (p, label as u32)));
    }
    Ok(files)
}

/// Decodes `files` (in parallel) into images of `size`. A file that does not decode is an
/// error naming it, or with `skip_bad` is left out, counted and listed on stderr; a class
/// left with no image is an error either way.
fn decode(files: &[(PathBuf, u32)], size: usize, skip_bad: bool) -> Result<Images> {
    let decoded: Vec<Result<Vec<u8>>> = files
        .par_iter()
        .map(|(path, _)| {
            let (chw, w, h) = read_image_chw(path)?;
            Ok(resize_center_crop(&chw, w, h, size))
        })
        .collect();
    let mut images = Images::new(size);
    let mut skipped = Vec::new();
    for (img, (_, label)) in decoded.into_iter().zip(files) {
        match img {
            Ok(img) => images.push(&img, *label),
            Err(e) if skip_bad => skipped.push(format!("{e:#}")),
            Err(e) => {
                bail!("{e:#} (give --skip-bad-images to leave out the files that do not decode)")
            }
        }
    }
    if !skipped.is_empty() {
        eprintln!(
            "skipped {} image{} that do not decode (--skip-bad-images):",
            skipped.len(),
            if skipped.len() == 1 { "" } else { "s" }
        );
        for s in &skipped {
            eprintln!("  {s}");
        }
    }
    let mut per_class = std::collections::BTreeMap::new();
    for (path, label) in files {
        per_class.entry(*label).or_insert_with(|| path.clone());
    }
    for (label, first) in per_class {
        if !images.labels.contains(&label) {
            let dir = first.parent().unwrap_or(&first);
            bail!(
                "class folder `{}` has no image that decodes (all were skipped)",
                dir.display()
            );
        }
    }
    Ok(images)
}

pub fn load(
    root: &Path,
    size: usize,
    test_fraction: f64,
    seed: u64,
    skip_bad: bool,
) -> Result<(Images, Images, Vec<String>)> {
    if !root.is_dir() {
        bail!("dataset folder `{}` does not exist", root.display());
    }
    let (train_dir, test_dir) = (root.join("train"), root.join("test"));
    if train_dir.is_dir() != test_dir.is_dir() {
        bail!(
            "`{}` has a `train` or a `test` folder but not both: give both, or only class folders",
            root.display()
        );
    }
    if !(0.0..1.0).contains(&test_fraction) {
        bail!("the test fraction must be in [0, 1), not {test_fraction}");
    }
    if train_dir.is_dir() && test_dir.is_dir() {
        let classes: Vec<String> = class_dirs(&train_dir)?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let test_classes: Vec<String> =
            class_dirs(&test_dir)?.into_iter().map(|(n, _)| n).collect();
        if classes != test_classes {
            bail!(
                "`{}` and `{}` have different class folders",
                train_dir.display(),
                test_dir.display()
            );
        }
        let train = decode(&list(&train_dir, &classes)?, size, skip_bad)?;
        let test = decode(&list(&test_dir, &classes)?, size, skip_bad)?;
        return Ok((train, test, classes));
    }
    let classes: Vec<String> = class_dirs(root)?.into_iter().map(|(n, _)| n).collect();
    let mut files = list(root, &classes)?;
    Rng::new(seed ^ 0xf01d).shuffle(&mut files);
    let n_test = ((files.len() as f64) * test_fraction).round() as usize;
    let test_files = files.split_off(files.len() - n_test);
    Ok((
        decode(&files, size, skip_bad)?,
        decode(&test_files, size, skip_bad)?,
        classes,
    ))
}
