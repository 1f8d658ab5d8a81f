//! Classifying image files with a checkpoint's own preprocessing and class names.

use crate::data::{read_image_chw, resize_center_crop};
use crate::exec::Mode;
use crate::model::Model;
use anyhow::Result;
use candle_core::{D, Device, Tensor};
use std::path::PathBuf;

/// Decodes an image file into a normalised 1 x 3 x S x S tensor for `model`.
pub fn load_image(model: &Model, path: &std::path::Path) -> Result<Tensor> {
    let (chw, w, h) = read_image_chw(path)?;
    let p = &model.meta.preprocessing;
    let size = p.input_size[0];
    let pixels = resize_center_crop(&chw, w, h, size);
    let plane = size * size;
    let data: Vec<f32> = pixels
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = i / plane;
            (v as f32 / 255.0 - p.mean[c]) / p.std[c]
        })
        .collect();
    Ok(Tensor::from_vec(data, (1, 3, size, size), &Device::Cpu)?)
}

/// The `k` most likely classes with their probabilities, for each image.
pub fn predict_files(
    model: &Model,
    paths: &[PathBuf],
    k: usize,
) -> Result<Vec<Vec<(String, f32)>>> {
    let model = &crate::passes::fold_batch_norm(model)?;
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        let x = load_image(model, path)?;
        let probs = candle_nn::ops::softmax(&model.forward(&x, Mode::Eval)?, D::Minus1)?;
        let probs: Vec<f32> = probs.flatten_all()?.to_vec1()?;
        let mut idx: Vec<usize> = (0..probs.len()).collect();
        idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        out.push(
            idx.into_iter()
                .take(k)
                .map(|i| (model.meta.class_names[i].clone(), probs[i]))
                .collect(),
        );
    }
    Ok(out)
}
