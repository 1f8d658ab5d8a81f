//! Evaluation: top-1/top-5, per-class accuracy, confusion matrix and latency.

use crate::data::{BatchLoader, EpochPlan, Images};
use crate::model::{Model, ModelMeta};
use crate::passes::fold_batch_norm;
use crate::train::loss::{cross_entropy, top_k};
use anyhow::{Result, bail};
use candle_core::Tensor;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub images: usize,
    /// Percentages.
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    pub class_names: Vec<String>,
    pub per_class_top1: Vec<f64>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
    /// Mean forward time per image at `batch_size`, in milliseconds.
    pub latency_ms_per_image: f64,
    pub batch_size: usize,
}

/// Evaluates `model` on `images` (already at the model's input size) with the model's own
/// preprocessing.
pub fn evaluate(model: &Model, images: Arc<Images>, batch_size: usize) -> Result<EvalReport> {
    let model = &fold_batch_norm(model)?;
    let engine = model.engine();
    evaluate_with(&model.meta, images, batch_size, |x| engine.forward(x))
}

/// Evaluates an int8 model on the integer engine (planned once for all batches).
pub fn evaluate_int8(
    model: &crate::passes::quant::QuantizedModel,
    images: Arc<Images>,
    batch_size: usize,
) -> Result<EvalReport> {
    let engine = crate::int8::Engine::new(model)?;
    evaluate_with(&model.meta, images, batch_size, |x| {
        engine.forward_tensor(x)
    })
}

/// Evaluates any forward pass (preprocessed batch to logits) of a model described by `meta`.
pub fn evaluate_with(
    meta: &ModelMeta,
    images: Arc<Images>,
    batch_size: usize,
    forward: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<EvalReport> {
    let classes = meta.class_names.len();
    let [h, w] = meta.preprocessing.input_size;
    if images.size != h || images.size != w {
        bail!(
            "images are {0}x{0} but the model takes {h}x{w}",
            images.size
        );
    }
    if images.is_empty() {
        bail!("no images to evaluate");
    }
    let plan = EpochPlan::in_order(batch_size, meta.preprocessing.mean, meta.preprocessing.std);
    let mut confusion = vec![vec![0u64; classes]; classes];
    let (mut correct1, mut correct5, mut loss_sum, mut seconds) = (0usize, 0usize, 0f64, 0f64);
    for batch in BatchLoader::new(images.clone(), plan) {
        let batch = batch?;
        let start = Instant::now();
        let logits = forward(&batch.x)?;
        seconds += start.elapsed().as_secs_f64();
        loss_sum += cross_entropy(&logits, &batch.label_tensor()?, 0.0)?.to_scalar::<f32>()? as f64
            * batch.labels.len() as f64;
        for (best, &label) in top_k(&logits, 5.min(classes))?.iter().zip(&batch.labels) {
            confusion[label as usize][best[0]] += 1;
            correct1 += usize::from(best[0] == label as usize);
            correct5 += usize::from(best.contains(&(label as usize)));
        }
    }
    let n = images.len();
    let per_class_top1 = confusion
        .iter()
        .enumerate()
        .map(|(c, row)| {
            let total: u64 = row.iter().sum();
            if total == 0 {
                0.0
            } else {
                100.0 * row[c] as f64 / total as f64
            }
        })
        .collect();
    Ok(EvalReport {
        images: n,
        top1: 100.0 * correct1 as f64 / n as f64,
        top5: 100.0 * correct5 as f64 / n as f64,
        loss: loss_sum / n as f64,
        class_names: meta.class_names.clone(),
        per_class_top1,
        confusion,
        latency_ms_per_image: 1000.0 * seconds / n as f64,
        batch_size,
    })
}

/// Checks that a dataset's classes are the checkpoint's: same count, and the same names unless
/// the checkpoint only has placeholder names.
pub fn check_classes(
    model_classes: &[String],
    data_classes: &[String],
    source: &str,
) -> Result<()> {
    if model_classes.len() != data_classes.len() {
        bail!(
            "{source} has {} classes but the checkpoint has {}; fine-tune with `slimcandle train --init CKPT --new-classifier` first",
            data_classes.len(),
            model_classes.len()
        );
    }
    let placeholder = model_classes
        .iter()
        .enumerate()
        .all(|(i, n)| *n == format!("class_{i}"));
    let first_difference = model_classes
        .iter()
        .zip(data_classes)
        .enumerate()
        .find(|(_, (m, d))| m != d);
    if let (false, Some((i, (m, d)))) = (placeholder, first_difference) {
        bail!("{source}: class {i} is `{d}`, but the checkpoint's class {i} is `{m}`");
    }
    Ok(())
}
