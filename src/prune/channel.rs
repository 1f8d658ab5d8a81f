//! Structured channel pruning end to end: coupled units, importance, plan, removal.

use super::groups::analyze;
use super::importance::{Criterion, TaylorData, unit_scores};
use super::plan::{ChannelPlan, PlanConfig, plan};
use super::remove::remove_channels;
use crate::model::{Model, Provenance};
use anyhow::{Result, bail};

#[derive(Debug, Clone)]
pub struct ChannelPruneConfig {
    pub criterion: Criterion,
    pub plan: PlanConfig,
    /// Seed of the random criterion and of the Taylor batches.
    pub seed: u64,
}

/// A physically smaller copy of `model`, and the plan that made it.
pub fn prune_channels(
    model: &Model,
    cfg: &ChannelPruneConfig,
    taylor: Option<&TaylorData>,
) -> Result<(Model, ChannelPlan)> {
    let groups = analyze(&model.graph)?;
    if groups.units.is_empty() {
        bail!("prune: the network has no channels that can be removed");
    }
    let scores = unit_scores(model, &groups.units, cfg.criterion, taylor, cfg.seed)?;
    let plan = plan(
        &model.graph,
        &groups.units,
        &scores,
        &cfg.plan,
        model.meta.preprocessing.input_size,
    )?;
    let chosen: Vec<_> = plan
        .remove
        .iter()
        .map(|&u| groups.units[u].clone())
        .collect();
    let mut pruned = remove_channels(model, &chosen)?;
    let before = plan.before;
    let after = plan.after;
    pruned.meta.provenance = Provenance::derived_from(
        &model.meta.provenance,
        format!(
            "{}; channel pruning ({} criterion) kept {:.1}% of the parameters and {:.1}% of the MACs",
            model.meta.provenance.source,
            cfg.criterion.name(),
            100.0 * after.params as f64 / before.params as f64,
            100.0 * after.macs as f64 / before.macs as f64
        ),
    );
    Ok((pruned, plan))
}
