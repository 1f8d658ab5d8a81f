//! How much each prunable unit matters: the criteria structured pruning ranks by.
//!
//! A unit can span several layers (a residual stream, a concat, a shuffle), so scores are
//! made per filter and then averaged over the unit's filters after each layer's scores are
//! divided by that layer's mean. The normalisation is what makes a global ranking across
//! layers meaningful: raw norms differ by orders of magnitude between a stem and a 1x1
//! projection, and without it a global ranking empties whole layers.

use super::groups::{PruneUnit, Role};
use crate::data::{BatchLoader, EpochPlan, Images};
use crate::exec::forward_train;
use crate::graph::{NodeId, Op};
use crate::model::Model;
use crate::rng::Rng;
use crate::train::loss::cross_entropy;
use anyhow::{Result, bail};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// A structured-pruning importance criterion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    /// L1 norm of each filter (Li et al. 2017).
    L1,
    /// L2 norm of each filter.
    L2,
    /// |gamma| of the batch norm after each filter (network slimming, Liu et al. 2017); pairs
    /// with `train --bn-l1`.
    BnScale,
    /// First-order Taylor estimate of the loss change, (sum of weight x gradient)^2 over the
    /// unit's filters and batch-norm parameters, averaged over batches (Molchanov et al. 2019).
    Taylor,
    /// Seeded random scores: the baseline every criterion must beat.
    Random,
}

impl Criterion {
    pub const ALL: [Criterion; 5] = [
        Criterion::L1,
        Criterion::L2,
        Criterion::BnScale,
        Criterion::Taylor,
        Criterion::Random,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Criterion::L1 => "l1",
            Criterion::L2 => "l2",
            Criterion::BnScale => "bn-scale",
            Criterion::Taylor => "taylor",
            Criterion::Random => "random",
        }
    }

    pub fn needs_data(self) -> bool {
        self == Criterion::Taylor
    }
}

impl std::str::FromStr for Criterion {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Criterion> {
        Criterion::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Criterion::ALL.iter().map(|c| c.name()).collect();
                anyhow::anyhow!(
                    "unknown criterion `{s}`; choose one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Batches the Taylor criterion accumulates gradients over.
pub struct TaylorData {
    pub images: Arc<Images>,
    pub batch_size: usize,
    pub batches: usize,
}

/// One score per unit, normalised so that the units of each layer group (units touching the
/// same nodes) average 1. Higher means more important; NaN where the criterion has nothing to
/// score (bn-scale without a batch norm), which the plan leaves whole.
pub fn unit_scores(
    model: &Model,
    units: &[PruneUnit],
    criterion: Criterion,
    taylor: Option<&TaylorData>,
    seed: u64,
) -> Result<Vec<f64>> {
    let raw = match criterion {
        Criterion::L1 | Criterion::L2 => {
            let power = if criterion == Criterion::L1 { 1 } else { 2 };
            let norms = relative_to_layer_mean(filter_norms(model, power)?);
            per_filter_mean(units, |m| {
                matches!(m.role, Role::Filter | Role::Depthwise).then(|| norms[&m.node][m.channel])
            })
        }
        Criterion::BnScale => {
            // Units without a batch norm get no score (NaN); the plan leaves them whole.
            let gammas = relative_to_layer_mean(bn_scales(model)?);
            per_filter_mean(units, |m| {
                (m.role == Role::Norm).then(|| gammas[&m.node][m.channel])
            })
        }
        Criterion::Taylor => {
            let Some(data) = taylor else {
                bail!("criterion taylor needs data to take gradients on: pass --data");
            };
            taylor_scores(model, units, data, seed)?
        }
        Criterion::Random => {
            let mut rng = Rng::new(seed ^ 0x5eed_1e55);
            units.iter().map(|_| rng.uniform()).collect()
        }
    };
    Ok(normalise_per_layer_group(units, raw))
}

/// Mean of the per-member scores `score` gives (members it skips with `None`); NaN when a
/// unit has no scored member.
fn per_filter_mean(
    units: &[PruneUnit],
    score: impl Fn(&super::groups::Member) -> Option<f64>,
) -> Vec<f64> {
    units
        .iter()
        .map(|u| {
            let values: Vec<f64> = u.members.iter().filter_map(&score).collect();
            if values.is_empty() {
                f64::NAN
            } else {
                values.iter().sum::<f64>() / values.len() as f64
            }
        })
        .collect()
}

/// Each layer's scores divided by that layer's mean score (computed once per layer).
fn relative_to_layer_mean(mut per_layer: HashMap<NodeId, Vec<f64>>) -> HashMap<NodeId, Vec<f64>> {
    for values in per_layer.values_mut() {
        let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
        let mean = if mean > 0.0 { mean } else { 1.0 };
        values.iter_mut().for_each(|v| *v /= mean);
    }
    per_layer
}

fn normalise_per_layer_group(units: &[PruneUnit], raw: Vec<f64>) -> Vec<f64> {
    let mut sums: HashMap<Vec<NodeId>, (f64, usize)> = HashMap::new();
    for (u, &s) in units.iter().zip(&raw).filter(|(_, s)| s.is_finite()) {
        let e = sums.entry(u.nodes()).or_default();
        e.0 += s;
        e.1 += 1;
    }
    units
        .iter()
        .zip(raw)
        .map(|(u, s)| {
            let Some(&(sum, n)) = sums.get(&u.nodes()) else {
                return s;
            };
            let mean = sum / n as f64;
            if mean > 0.0 { s / mean } else { s }
        })
        .collect()
}

/// Per conv/linear node, the L1 (`power` 1) or L2 norm of each output filter.
fn filter_norms(model: &Model, power: i32) -> Result<HashMap<NodeId, Vec<f64>>> {
    let mut out = HashMap::new();
    for (id, node) in model.graph.nodes.iter().enumerate() {
        if !matches!(node.op, Op::Conv2d { .. } | Op::Linear { .. }) {
            continue;
        }
        let w = model.weights.get(&format!("{}.weight", node.name))?;
        let rows = w.dims()[0];
        let w = w.reshape((rows, ()))?.to_dtype(DType::F64)?;
        let norms = if power == 1 {
            w.abs()?.sum(1)?
        } else {
            w.sqr()?.sum(1)?.sqrt()?
        };
        out.insert(id, norms.to_vec1::<f64>()?);
    }
    Ok(out)
}

/// Per batch-norm node, |gamma| of each channel.
fn bn_scales(model: &Model) -> Result<HashMap<NodeId, Vec<f64>>> {
    let mut out = HashMap::new();
    for (id, node) in model.graph.nodes.iter().enumerate() {
        if let Op::BatchNorm { .. } = node.op {
            let g = model.weights.get(&format!("{}.weight", node.name))?;
            let g: Vec<f64> = g
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?
                .into_iter()
                .map(f64::abs)
                .collect();
            if g.iter().any(|v| !v.is_finite()) {
                bail!(
                    "criterion bn-scale: batch norm `{}` has non-finite scales (a diverged model?)",
                    node.name
                );
            }
            out.insert(id, g);
        }
    }
    Ok(out)
}

/// Taylor scores: for each batch, the sum over a unit's parameters of weight x gradient,
/// squared, averaged over batches. Runs on a copy of the weights, so the batch-norm
/// statistics of `model` stay as they were.
fn taylor_scores(
    model: &Model,
    units: &[PruneUnit],
    data: &TaylorData,
    seed: u64,
) -> Result<Vec<f64>> {
    if data.images.is_empty() || data.batches == 0 {
        bail!("criterion taylor: no images to take gradients on");
    }
    let graph = &model.graph;
    // A copy, so the train-mode forward leaves the model's running statistics alone.
    let weights = model.weights.deep_copy()?;
    let plan = EpochPlan {
        batch_size: data.batch_size,
        mean: model.meta.preprocessing.mean,
        std: model.meta.preprocessing.std,
        augment: None,
        shuffle: Some((seed, 0)),
        start_batch: 0,
    };
    let mut totals = vec![0f64; units.len()];
    let mut batches = 0usize;
    for batch in BatchLoader::new(data.images.clone(), plan).take(data.batches) {
        let batch = batch?;
        let logits = forward_train(graph, &weights, &batch.x, seed)?;
        let loss = cross_entropy(&logits, &batch.label_tensor()?, 0.0)?;
        let grads = loss.backward()?;
        // Per node and parameter suffix, weight x gradient summed within each output channel.
        let mut products: HashMap<(NodeId, &str), Vec<f64>> = HashMap::new();
        let mut product = |node: NodeId, suffix: &'static str| -> Result<()> {
            if products.contains_key(&(node, suffix)) {
                return Ok(());
            }
            let var = weights.var(&format!("{}.{suffix}", graph.nodes[node].name))?;
            let Some(g) = grads.get(var.as_tensor()) else {
                products.insert((node, suffix), Vec::new());
                return Ok(());
            };
            let w = var.as_tensor();
            let rows = w.dims()[0];
            let p = (w * g)?
                .reshape((rows, ()))?
                .to_dtype(DType::F64)?
                .sum(1)?
                .to_vec1::<f64>()?;
            products.insert((node, suffix), p);
            Ok(())
        };
        for unit in units {
            for m in &unit.members {
                match m.role {
                    Role::Filter | Role::Depthwise => product(m.node, "weight")?,
                    Role::Norm => {
                        product(m.node, "weight")?;
                        product(m.node, "bias")?;
                    }
                    Role::Column => {}
                }
            }
        }
        for (total, unit) in totals.iter_mut().zip(units) {
            let mut sum = 0f64;
            for m in &unit.members {
                let suffixes: &[&str] = match m.role {
                    Role::Filter | Role::Depthwise => &["weight"],
                    Role::Norm => &["weight", "bias"],
                    Role::Column => &[],
                };
                for s in suffixes {
                    if let Some(v) = products[&(m.node, *s)].get(m.channel) {
                        sum += v;
                    }
                }
            }
            *total += sum * sum;
        }
        batches += 1;
    }
    Ok(totals.into_iter().map(|t| t / batches as f64).collect())
}
