//! Sensitivity scans: prune one layer group (or one layer's weights) alone at several ratios
//! and measure accuracy, so users can choose per-layer ratios from evidence.

use super::groups::analyze;
use super::importance::{Criterion, unit_scores};
use super::magnitude::{MagnitudeConfig, prunable_layers, single_layer_mask};
use super::plan::{CostModel, PlanConfig, single_group_plans};
use super::remove::remove_channels;
use crate::data::Images;
use crate::eval::evaluate;
use crate::footprint::Footprint;
use crate::model::Model;
use anyhow::{Result, bail};
use serde::Serialize;
use std::sync::Arc;

/// Accuracy with one layer group (or layer) pruned at one ratio.
#[derive(Debug, Clone, Serialize)]
pub struct SensitivityRow {
    /// The layers the group's units remove filters from (one layer for magnitude scans).
    pub layers: Vec<String>,
    /// Channels (channel scans) or weights (magnitude scans) of the group's lead layer.
    pub size: usize,
    pub ratio: f64,
    /// Channels or non-zero weights left in the lead layer.
    pub kept: usize,
    /// Parameters (non-zero parameters, for magnitude scans) and MACs of the whole network
    /// with this pruning alone.
    pub params: usize,
    pub macs: u64,
    pub top1: f64,
    /// `top1` minus the unpruned model's top-1, in points.
    pub top1_change: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sensitivity {
    pub baseline_top1: f64,
    pub params: usize,
    pub macs: u64,
    pub rows: Vec<SensitivityRow>,
}

fn check_ratios(ratios: &[f64]) -> Result<()> {
    if ratios.is_empty() {
        bail!("sensitivity: give at least one ratio");
    }
    if let Some(r) = ratios.iter().find(|r| !(0.0..1.0).contains(*r)) {
        bail!("sensitivity: ratio {r} is outside [0, 1)");
    }
    Ok(())
}

/// Channel scan: for each layer group and ratio, remove the group's least important channels
/// (by `criterion`, rounded as `cfg` says) and evaluate on `images`. `progress` gets
/// (evaluations done, total).
pub fn channel_sensitivity(
    model: &Model,
    criterion: Criterion,
    cfg: &PlanConfig,
    ratios: &[f64],
    images: Arc<Images>,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Sensitivity> {
    check_ratios(ratios)?;
    if criterion.needs_data() {
        bail!(
            "sensitivity: criterion {} is not supported here; use l1, l2, bn-scale or random",
            criterion.name()
        );
    }
    let baseline = evaluate(model, images.clone(), 256)?.top1;
    let units = analyze(&model.graph)?.units;
    let scores = unit_scores(model, &units, criterion, None, seed)?;
    let cost = CostModel::new(&model.graph, model.meta.preprocessing.input_size)?;
    let before = cost.of(&units, &[]);
    // Rows in graph order of the groups, ratios in the order given.
    let per_ratio = ratios
        .iter()
        .map(|&r| single_group_plans(&model.graph, &units, &scores, cfg, r))
        .collect::<Result<Vec<_>>>()?;
    let mut jobs = Vec::new();
    for g in 0..per_ratio[0].len() {
        for (&ratio, plans) in ratios.iter().zip(&per_ratio) {
            let (group, chosen) = plans[g].clone();
            jobs.push((ratio, group, chosen));
        }
    }
    let total = jobs.len();
    let mut rows = Vec::with_capacity(total);
    for (done, (ratio, group, chosen)) in jobs.into_iter().enumerate() {
        let after = cost.of(&units, &chosen);
        let top1 = if chosen.is_empty() {
            baseline
        } else {
            let picked: Vec<_> = chosen.iter().map(|&u| units[u].clone()).collect();
            evaluate(&remove_channels(model, &picked)?, images.clone(), 256)?.top1
        };
        rows.push(SensitivityRow {
            layers: group.layers.clone(),
            size: group.width,
            ratio,
            kept: group.kept,
            params: after.params,
            macs: after.macs,
            top1,
            top1_change: top1 - baseline,
        });
        progress(done + 1, total);
    }
    Ok(Sensitivity {
        baseline_top1: baseline,
        params: before.params,
        macs: before.macs,
        rows,
    })
}

/// Magnitude scan: for each prunable layer (as `cfg` selects them) and ratio, zero that
/// layer's smallest weights alone and evaluate on `images`.
pub fn magnitude_sensitivity(
    model: &Model,
    cfg: &MagnitudeConfig,
    ratios: &[f64],
    images: Arc<Images>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Sensitivity> {
    check_ratios(ratios)?;
    let baseline = evaluate(model, images.clone(), 256)?.top1;
    let dense = Footprint::of(model, None)?;
    let layers = prunable_layers(&model.graph, cfg)?;
    let total = layers.len() * ratios.len();
    let mut rows = Vec::with_capacity(total);
    for layer in &layers {
        for &ratio in ratios {
            let copy = model.deep_copy()?;
            single_layer_mask(model, &layer.weight, ratio)?.apply(&copy.weights)?;
            let after = Footprint::of(&copy, None)?;
            let kept = crate::sparse::count_nonzero(&copy.weights.get(&layer.weight)?)?;
            let top1 = evaluate(&copy, images.clone(), 256)?.top1;
            rows.push(SensitivityRow {
                layers: vec![model.graph.nodes[layer.node].name.clone()],
                size: layer.numel,
                ratio,
                kept,
                params: after.nonzero_params,
                macs: after.macs,
                top1,
                top1_change: top1 - baseline,
            });
            progress(rows.len(), total);
        }
    }
    Ok(Sensitivity {
        baseline_top1: baseline,
        params: dense.nonzero_params,
        macs: dense.macs,
        rows,
    })
}
