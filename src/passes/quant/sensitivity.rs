//! Quantization sensitivity: the accuracy of the int8 model with one conv or linear layer at a
//! time left in float. The layers whose float copy buys the most accuracy back are the ones to
//! name in `--keep-float` (mixed precision), or to look at before quantization-aware training.
//!
//! The activations are observed once; every trial rebuilds only the plan (which decides the
//! qparams and quantizes the weights) from the same observers, so a scan costs one calibration
//! plus one int8 evaluation per layer.

use super::{Observers, QuantOptions, plan};
use crate::data::Images;
use crate::eval::{evaluate, evaluate_int8};
use crate::model::Model;
use crate::prune::pattern::NamePattern;
use anyhow::{Result, bail};
use candle_core::Tensor;
use serde::Serialize;
use std::sync::Arc;

/// One trial: `layer` kept in float, everything else int8.
#[derive(Debug, Clone, Serialize)]
pub struct LayerTrial {
    pub layer: String,
    pub top1: f64,
    /// Points of top-1 gained against the all-int8 model.
    pub gain: f64,
}

/// A whole scan, trials ordered by gain (most sensitive layer first).
#[derive(Debug, Clone, Serialize)]
pub struct QuantSensitivity {
    pub float_top1: f64,
    pub int8_top1: f64,
    pub trials: Vec<LayerTrial>,
}

/// Scans `model` (a float model): observes its activations on `calibration` (preprocessed
/// training batches), then evaluates on `test` the all-int8 model and one model per conv or
/// linear layer with that layer kept in float. `opts.keep_float` layers stay float in every
/// trial. `progress(done, total)` counts evaluations.
pub fn quant_sensitivity(
    model: &Model,
    calibration: impl IntoIterator<Item = Result<Tensor>>,
    opts: &QuantOptions,
    test: Arc<Images>,
    mut progress: impl FnMut(usize, usize),
) -> Result<QuantSensitivity> {
    let folded = crate::passes::fold_batch_norm(model)?;
    let mut observers = Observers::new(&folded.graph);
    for batch in calibration {
        observers.observe(&folded, &batch?)?;
    }
    if observers.images == 0 {
        bail!("no calibration images");
    }
    let layers: Vec<String> = folded
        .graph
        .nodes
        .iter()
        .filter(|n| n.op.has_weight_matrix())
        .map(|n| n.name.clone())
        .filter(|name| !opts.keep_float.iter().any(|p| p.selects_layer(name)))
        .collect();
    let total = layers.len() + 2;
    let batch = 256;
    let float_top1 = evaluate(model, test.clone(), batch)?.top1;
    progress(1, total);
    let int8 = plan::build(&folded, &observers, opts)?;
    let int8_top1 = evaluate_int8(&int8, test.clone(), batch)?.top1;
    progress(2, total);
    let mut trials = Vec::with_capacity(layers.len());
    for (i, layer) in layers.into_iter().enumerate() {
        let mut trial_opts = opts.clone();
        trial_opts.keep_float.push(NamePattern::parse(&layer)?);
        let q = plan::build(&folded, &observers, &trial_opts)?;
        let top1 = evaluate_int8(&q, test.clone(), batch)?.top1;
        trials.push(LayerTrial {
            layer,
            top1,
            gain: top1 - int8_top1,
        });
        progress(i + 3, total);
    }
    trials.sort_by(|a, b| b.gain.total_cmp(&a.gain).then(a.layer.cmp(&b.layer)));
    Ok(QuantSensitivity {
        float_top1,
        int8_top1,
        trials,
    })
}
