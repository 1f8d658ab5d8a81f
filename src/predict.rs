//! Classifying image files with a checkpoint's own preprocessing and class names.

use crate::data::{read_image_chw, resize_center_crop};
use crate::model::{Model, ModelMeta, Preprocessing};
use anyhow::Result;
use candle_core::{D, Device, Tensor};
use std::path::PathBuf;

/// Decodes an image file into a normalised 1 x 3 x S x S tensor for `model`.
pub fn load_image(model: &Model, path: &std::path::Path) -> Result<Tensor> {
    load_image_for(&model.meta.preprocessing, path)
}

/// Decodes an image file into a normalised 1 x 3 x S x S tensor by `p`.
pub fn load_image_for(p: &Preprocessing, path: &std::path::Path) -> Result<Tensor> {
    let (chw, w, h) = read_image_chw(path)?;
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
    let engine = model.engine();
    predict_files_with(&model.meta, paths, k, |x| engine.forward(x))
}

/// [`predict_files`] for an int8 model, on the integer engine (planned once).
pub fn predict_files_int8(
    model: &crate::passes::quant::QuantizedModel,
    paths: &[PathBuf],
    k: usize,
) -> Result<Vec<Vec<(String, f32)>>> {
    let engine = crate::int8::Engine::new(model)?;
    predict_files_with(&model.meta, paths, k, |x| engine.forward_tensor(x))
}

/// [`predict_files`] for any forward pass of a model described by `meta`.
pub fn predict_files_with(
    meta: &ModelMeta,
    paths: &[PathBuf],
    k: usize,
    forward: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Vec<Vec<(String, f32)>>> {
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        let x = load_image_for(&meta.preprocessing, path)?;
        let probs = candle_nn::ops::softmax(&forward(&x)?, D::Minus1)?;
        let probs: Vec<f32> = probs.flatten_all()?.to_vec1()?;
        let mut idx: Vec<usize> = (0..probs.len()).collect();
        idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        out.push(
            idx.into_iter()
                .take(k)
                .map(|i| (meta.class_names[i].clone(), probs[i]))
                .collect(),
        );
    }
    Ok(out)
}
