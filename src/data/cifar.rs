//! CIFAR-10 and CIFAR-100 in their binary release.

use super::{Images, resize_center_crop};
use anyhow::{Context, Result, bail};
use std::path::Path;

const CIFAR10_CLASSES: [&str; 10] = [
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

const CIFAR100_CLASSES: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];

/// Reads one binary file of records: `label_bytes` label bytes (the last one used) followed by
/// a 32x32x3 CHW image.
fn read_records(
    path: &Path,
    label_bytes: usize,
    size: usize,
    into: &mut Images,
    classes: usize,
) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    records_from_bytes(path, &bytes, label_bytes, size, into, classes)
}

/// Parses the contents of one binary file of CIFAR records (see [`read_records`]; `path` is
/// only named in errors) into `into`.
pub fn records_from_bytes(
    path: &Path,
    bytes: &[u8],
    label_bytes: usize,
    size: usize,
    into: &mut Images,
    classes: usize,
) -> Result<()> {
    let record = label_bytes + 3072;
    if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
        bail!(
            "`{}` is {} bytes, not a whole number of {record}-byte CIFAR records: is it the binary release?",
            path.display(),
            bytes.len()
        );
    }
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        let label = rec[label_bytes - 1] as usize;
        if label >= classes {
            bail!(
                "`{}`: record {i} has label {label}, but there are {classes} classes",
                path.display()
            );
        }
        into.push(
            &resize_center_crop(&rec[label_bytes..], 32, 32, size),
            label as u32,
        );
    }
    Ok(())
}

/// Class names from the release's text file when present, else the published list.
fn names_from(dir: &Path, file: &str, builtin: &[&str]) -> Vec<String> {
    let listed: Vec<String> = std::fs::read_to_string(dir.join(file))
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    if listed.len() == builtin.len() {
        listed
    } else {
        builtin.iter().map(|s| s.to_string()).collect()
    }
}

fn check_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        bail!("dataset folder `{}` does not exist", dir.display());
    }
    Ok(())
}

/// `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin` in `dir`.
pub fn load_cifar10(dir: &Path, size: usize) -> Result<(Images, Images, Vec<String>)> {
    check_dir(dir)?;
    let (mut train, mut test) = (Images::new(size), Images::new(size));
    for i in 1..=5 {
        read_records(
            &dir.join(format!("data_batch_{i}.bin")),
            1,
            size,
            &mut train,
            10,
        )?;
    }
    read_records(&dir.join("test_batch.bin"), 1, size, &mut test, 10)?;
    Ok((
        train,
        test,
        names_from(dir, "batches.meta.txt", &CIFAR10_CLASSES),
    ))
}

/// `train.bin` and `test.bin` in `dir`, with fine labels (100 classes).
pub fn load_cifar100(dir: &Path, size: usize) -> Result<(Images, Images, Vec<String>)> {
    check_dir(dir)?;
    let (mut train, mut test) = (Images::new(size), Images::new(size));
    read_records(&dir.join("train.bin"), 2, size, &mut train, 100)?;
    read_records(&dir.join("test.bin"), 2, size, &mut test, 100)?;
    Ok((
        train,
        test,
        names_from(dir, "fine_label_names.txt", &CIFAR100_CLASSES),
    ))
}
