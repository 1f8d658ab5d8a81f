//! Which units to remove: scope, per-layer rules, rounding and targets.
//!
//! Units that touch the same nodes form a *layer group* (the hidden channels of one inverted
//! residual block, one residual stream, the squeeze output of one Fire module ...). Groups are
//! what a user thinks of as layers, so ratios, overrides, exclusions, minimum widths and the
//! rounding of kept channels to a hardware-friendly multiple all apply per group.
//!
//! A target in parameters or MACs is reached by bisection over the pruning ratio (uniform
//! scope) or over the share of the global ranking removed (global scope), with the cost of
//! each candidate computed exactly from the kept channel counts, so no candidate model has
//! to be built.

use super::groups::{PruneUnit, Role};
use super::pattern::NamePattern;
use crate::graph::{ChannelMap, Graph, NodeId, Op};
use anyhow::{Result, bail};
use serde::Serialize;

/// Which units compete with which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every layer group loses the same share of its channels, its own least important ones.
    Uniform,
    /// One ranking of normalised importance across all layer groups.
    Global,
}

/// What the pass aims for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// Remove this fraction of the prunable channels.
    ChannelRatio(f64),
    /// Keep at most this fraction of the trainable parameters.
    Params(f64),
    /// Keep at most this fraction of the multiply-accumulates.
    Macs(f64),
}

#[derive(Debug, Clone)]
pub struct PlanConfig {
    pub scope: Scope,
    pub target: Target,
    /// Fixed pruning ratios for the layer groups whose layers match, first match wins; these
    /// groups stay out of the global ranking and the target search.
    pub overrides: Vec<(NamePattern, f64)>,
    /// Layers whose output channels are never removed (their input channels may be): the
    /// layer groups whose filters include a matching layer are left whole.
    pub exclude: Vec<NamePattern>,
    /// No layer group is cut below this many channels.
    pub min_channels: usize,
    /// Kept channel counts are rounded to a multiple of this (1: no rounding).
    pub round_to: usize,
    /// No layer group loses more than this fraction of its channels (global scope, targets).
    pub max_ratio: f64,
    /// Also prune residual streams (channels joined by an add). Off by default: every block
    /// reads and writes them, so they cost little per channel and matter a lot; sparing them
    /// and cutting the hidden layers harder recovered best in our MobileNet V2 runs.
    pub prune_residual: bool,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            scope: Scope::Uniform,
            target: Target::ChannelRatio(0.5),
            overrides: Vec::new(),
            exclude: Vec::new(),
            min_channels: 8,
            round_to: 8,
            max_ratio: 0.9,
            prune_residual: false,
        }
    }
}

/// Units that touch the same nodes, with what the plan decided for them.
#[derive(Debug, Clone, Serialize)]
pub struct LayerGroup {
    /// The conv or linear layers whose filters the group's units remove.
    pub layers: Vec<String>,
    /// Channels of the group's first producing layer.
    pub width: usize,
    /// Channels it keeps under the plan.
    pub kept: usize,
    /// Why the group is not pruned by the plan's ratio, if so (`excluded`, `override 0.3`).
    pub rule: Option<String>,
    #[serde(skip)]
    lead: NodeId,
    /// Unit indices, least important first.
    #[serde(skip)]
    units: Vec<usize>,
    #[serde(skip)]
    fixed_ratio: Option<f64>,
    #[serde(skip)]
    excluded: bool,
}

/// Parameters and MACs of a network with some channels removed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cost {
    pub params: usize,
    pub macs: u64,
}

/// The result of [`plan`].
#[derive(Debug, Clone, Serialize)]
pub struct ChannelPlan {
    /// Indices into the units list of the units to remove.
    pub remove: Vec<usize>,
    pub groups: Vec<LayerGroup>,
    pub before: Cost,
    pub after: Cost,
    /// The ratio (uniform) or share of the ranking (global) the target search settled on.
    pub ratio: f64,
}

/// Decides which units to remove. `scores` (one per unit, higher = more important) come from
/// [`super::importance::unit_scores`]; `input_size` is the side the MACs are counted at.
pub fn plan(
    graph: &Graph,
    units: &[PruneUnit],
    scores: &[f64],
    cfg: &PlanConfig,
    input_size: [usize; 2],
) -> Result<ChannelPlan> {
    if units.len() != scores.len() {
        bail!("prune: {} scores for {} units", scores.len(), units.len());
    }
    for (what, v) in [("max ratio", cfg.max_ratio)]
        .into_iter()
        .chain(cfg.overrides.iter().map(|(_, r)| ("override ratio", *r)))
    {
        if !(0.0..1.0).contains(&v) {
            bail!("prune: {what} {v} is outside [0, 1)");
        }
    }
    let cost = CostModel::new(graph, input_size)?;
    let mut groups = layer_groups(graph, units, scores, cfg)?;
    if groups.iter().all(|g| g.excluded) {
        let count = |rule: &str| {
            groups
                .iter()
                .filter(|g| g.rule.as_deref() == Some(rule))
                .count()
        };
        bail!(
            "prune: no layer group can be pruned: {} excluded by --prune-exclude, {} residual streams \
             (--prune-residual prunes them), {} without a score (bn-scale needs a batch norm after \
             the layer: no batch norm there; use l1, l2 or taylor)",
            count("excluded"),
            count("residual stream"),
            count("no score")
        );
    }
    let before = cost.of(units, &[]);
    let removals = Removals::new(graph, units)?;
    let search_ratio = |ratio: f64, groups: &mut [LayerGroup]| -> Vec<usize> {
        match cfg.scope {
            Scope::Uniform => select_uniform(groups, &removals, ratio, cfg),
            Scope::Global => select_global(groups, &removals, scores, ratio, cfg),
        }
    };
    let (ratio, remove) = match cfg.target {
        Target::ChannelRatio(r) => {
            if !(0.0..1.0).contains(&r) {
                bail!("prune: ratio {r} is outside [0, 1)");
            }
            (r, search_ratio(r, &mut groups))
        }
        Target::Params(f) | Target::Macs(f) => {
            if !(0.0 < f && f <= 1.0) {
                bail!("prune: target fraction {f} is outside (0, 1]");
            }
            let measure = |remove: &[usize]| -> f64 {
                let c = cost.of(units, remove);
                match cfg.target {
                    Target::Params(_) => c.params as f64 / before.params as f64,
                    _ => c.macs as f64 / before.macs as f64,
                }
            };
            let most = search_ratio(cfg.max_ratio, &mut groups);
            let least = measure(&most);
            if least > f {
                let what = if matches!(cfg.target, Target::Params(_)) {
                    "parameters"
                } else {
                    "MACs"
                };
                bail!(
                    "prune: cannot reach {:.1}% of the {what}: removing up to {:.0}% of every prunable layer group \
                     (exclusions, --min-channels and rounding applied) still keeps {:.1}%",
                    100.0 * f,
                    100.0 * cfg.max_ratio,
                    100.0 * least
                );
            }
            // Smallest ratio that reaches the target: the cost falls as the ratio grows.
            let (mut lo, mut hi) = (0.0, cfg.max_ratio);
            for _ in 0..40 {
                let mid = 0.5 * (lo + hi);
                if measure(&search_ratio(mid, &mut groups)) <= f {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            (hi, search_ratio(hi, &mut groups))
        }
    };
    let after = cost.of(units, &remove);
    let mut removed_per_unit = vec![false; units.len()];
    for &u in &remove {
        removed_per_unit[u] = true;
    }
    for g in &mut groups {
        let gone: usize = g
            .units
            .iter()
            .filter(|&&u| removed_per_unit[u])
            .map(|&u| units[u].removed_from(g.lead))
            .sum();
        g.kept = g.width - gone;
    }
    Ok(ChannelPlan {
        remove,
        groups,
        before,
        after,
        ratio,
    })
}

/// For each layer group that may be pruned, the units that remove `ratio` of its channels
/// with every other group left whole: what a sensitivity scan evaluates.
pub fn single_group_plans(
    graph: &Graph,
    units: &[PruneUnit],
    scores: &[f64],
    cfg: &PlanConfig,
    ratio: f64,
) -> Result<Vec<(LayerGroup, Vec<usize>)>> {
    let removals = Removals::new(graph, units)?;
    let groups = layer_groups(graph, units, scores, cfg)?;
    Ok(groups
        .into_iter()
        .filter(|g| !g.excluded)
        .map(|mut g| {
            let mut kept = removals.fresh();
            let n = units_for_ratio(&g, &removals, ratio, cfg, &mut kept);
            g.kept = kept[g.lead];
            let chosen = g.units[..n].to_vec();
            (g, chosen)
        })
        .collect())
}

fn layer_groups(
    graph: &Graph,
    units: &[PruneUnit],
    scores: &[f64],
    cfg: &PlanConfig,
) -> Result<Vec<LayerGroup>> {
    for pattern in cfg
        .exclude
        .iter()
        .chain(cfg.overrides.iter().map(|(p, _)| p))
    {
        if !graph
            .nodes
            .iter()
            .any(|n| n.op.has_weight_matrix() && pattern.selects_layer(&n.name))
        {
            bail!(
                "prune: the pattern `{}` matches no conv or linear layer; `slimcandle inspect CKPT` lists their names",
                pattern.as_str()
            );
        }
    }
    let mut index: std::collections::HashMap<Vec<NodeId>, usize> = Default::default();
    let mut groups: Vec<LayerGroup> = Vec::new();
    let counts = graph.channel_counts()?;
    for (i, unit) in units.iter().enumerate() {
        let key = unit.nodes();
        let g = *index.entry(key).or_insert_with(|| {
            let mut layers: Vec<NodeId> = unit
                .members
                .iter()
                .filter(|m| matches!(m.role, Role::Filter | Role::Depthwise))
                .map(|m| m.node)
                .collect();
            layers.dedup();
            let lead = layers.first().copied().unwrap_or(unit.slots[0].0);
            let names: Vec<String> = layers
                .iter()
                .map(|&n| graph.nodes[n].name.clone())
                .collect();
            // Excluding a layer keeps its output channels; its inputs may still shrink.
            let excluded_by_pattern = cfg
                .exclude
                .iter()
                .any(|p| names.iter().any(|n| p.selects_layer(n)));
            let residual = unit
                .slots
                .iter()
                .any(|&(n, _)| matches!(graph.nodes[n].op, Op::Add));
            let fixed_ratio = cfg
                .overrides
                .iter()
                .find(|(p, _)| names.iter().any(|n| p.selects_layer(n)))
                .map(|(_, r)| *r);
            // An explicit ratio prunes a residual stream; an exclusion beats both.
            let spared_residual = residual && !cfg.prune_residual && fixed_ratio.is_none();
            // Units without a score (bn-scale on a layer with no batch norm) cannot be ranked.
            let unscored = !scores[i].is_finite();
            let excluded = excluded_by_pattern || spared_residual || unscored;
            let rule = if excluded_by_pattern {
                Some("excluded".to_string())
            } else if spared_residual {
                Some("residual stream".to_string())
            } else if unscored {
                Some("no score".to_string())
            } else {
                fixed_ratio.map(|r| format!("override {r}"))
            };
            groups.push(LayerGroup {
                layers: names,
                width: counts[lead],
                kept: counts[lead],
                rule,
                lead,
                units: Vec::new(),
                fixed_ratio,
                excluded,
            });
            groups.len() - 1
        });
        groups[g].units.push(i);
    }
    for g in &mut groups {
        g.units
            .sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    }
    Ok(groups)
}

/// Channels each unit removes, per node, and the channels each node has.
struct Removals {
    per_unit: Vec<Vec<(NodeId, usize)>>,
    counts: Vec<usize>,
}

impl Removals {
    fn new(graph: &Graph, units: &[PruneUnit]) -> Result<Removals> {
        let per_unit = units
            .iter()
            .map(|u| {
                let mut per_node: Vec<(NodeId, usize)> = Vec::new();
                for &(node, _) in &u.slots {
                    match per_node.last_mut() {
                        Some((n, k)) if *n == node => *k += 1,
                        _ => per_node.push((node, 1)),
                    }
                }
                per_node
            })
            .collect();
        Ok(Removals {
            per_unit,
            counts: graph.channel_counts()?,
        })
    }

    /// Kept channels per node before anything is removed.
    fn fresh(&self) -> Vec<usize> {
        self.counts.clone()
    }
}

/// How many of `group`'s least important units to remove to take away about `ratio` of its
/// channels, with the kept count rounded to the configured multiple and floor. No node the
/// units touch goes below the floor either (a split half, a concat shared with another
/// group); `kept` tracks every node's channels across the groups of one selection.
fn units_for_ratio(
    group: &LayerGroup,
    removals: &Removals,
    ratio: f64,
    cfg: &PlanConfig,
    kept: &mut [usize],
) -> usize {
    let width = group.width;
    if ratio <= 0.0 {
        return 0;
    }
    let floor = |n: NodeId| cfg.min_channels.max(1).min(removals.counts[n]);
    // Rounding may not take the group past --max-ratio.
    let cap = (width as f64 * (1.0 - cfg.max_ratio)).ceil() as usize;
    let desired = width as f64 * (1.0 - ratio);
    let lead_kept = rounded_kept(desired, width, cfg.round_to, floor(group.lead).max(cap));
    let mut n = 0;
    for &u in &group.units {
        let unit = &removals.per_unit[u];
        let allowed = unit.iter().all(|&(node, k)| {
            let left = kept[node].saturating_sub(k);
            k <= kept[node] && left >= floor(node) && (node != group.lead || left >= lead_kept)
        });
        if !allowed {
            break;
        }
        for &(node, k) in unit {
            kept[node] -= k;
        }
        n += 1;
    }
    n
}

/// `desired` rounded to the nearest multiple of `multiple`, within [`floor`, `width`]. A
/// result below `floor` is raised to the next multiple at or above it.
fn rounded_kept(desired: f64, width: usize, multiple: usize, floor: usize) -> usize {
    let m = multiple.max(1);
    let mut kept = ((desired / m as f64).round() as usize) * m;
    if kept < floor {
        kept = floor.div_ceil(m) * m;
    }
    kept.min(width)
}

fn group_ratio(group: &LayerGroup, ratio: f64) -> Option<f64> {
    if group.excluded {
        None
    } else {
        Some(group.fixed_ratio.unwrap_or(ratio))
    }
}

fn select_uniform(
    groups: &mut [LayerGroup],
    removals: &Removals,
    ratio: f64,
    cfg: &PlanConfig,
) -> Vec<usize> {
    let mut remove = Vec::new();
    let mut kept = removals.fresh();
    for g in groups.iter() {
        if let Some(r) = group_ratio(g, ratio) {
            let n = units_for_ratio(g, removals, r, cfg, &mut kept);
            remove.extend_from_slice(&g.units[..n]);
        }
    }
    remove.sort_unstable();
    remove
}

/// Removes the lowest-ranked `share` of the units of the groups in the global ranking (each
/// group capped at `max_ratio`), then rounds every group's kept count.
fn select_global(
    groups: &mut [LayerGroup],
    removals: &Removals,
    scores: &[f64],
    share: f64,
    cfg: &PlanConfig,
) -> Vec<usize> {
    let mut remove = Vec::new();
    let mut kept = removals.fresh();
    let mut ranked: Vec<(usize, usize)> = Vec::new(); // (group, unit)
    for (gi, g) in groups.iter().enumerate() {
        match (g.excluded, g.fixed_ratio) {
            (true, _) => {}
            (false, Some(r)) => {
                let n = units_for_ratio(g, removals, r, cfg, &mut kept);
                remove.extend_from_slice(&g.units[..n]);
            }
            (false, None) => ranked.extend(g.units.iter().map(|&u| (gi, u))),
        }
    }
    ranked.sort_by(|a, b| scores[a.1].total_cmp(&scores[b.1]).then(a.1.cmp(&b.1)));
    let budget = (share * ranked.len() as f64).round() as usize;
    let mut chosen = vec![0usize; groups.len()];
    let unrounded = PlanConfig {
        round_to: 1,
        ..cfg.clone()
    };
    let cap: Vec<usize> = groups
        .iter()
        .map(|g| {
            units_for_ratio(
                g,
                removals,
                cfg.max_ratio,
                &unrounded,
                &mut removals.fresh(),
            )
        })
        .collect();
    let mut taken = 0;
    for &(gi, _) in &ranked {
        if taken == budget {
            break;
        }
        if chosen[gi] < cap[gi] {
            chosen[gi] += 1;
            taken += 1;
        }
    }
    for (gi, g) in groups.iter().enumerate() {
        if g.excluded || g.fixed_ratio.is_some() || chosen[gi] == 0 {
            continue;
        }
        // The ranking's share for this group, as a ratio, then rounded like any other.
        let gone: usize = g.units[..chosen[gi]]
            .iter()
            .flat_map(|&u| &removals.per_unit[u])
            .filter(|(node, _)| *node == g.lead)
            .map(|(_, k)| k)
            .sum();
        let ratio = gone as f64 / g.width as f64;
        let n = units_for_ratio(g, removals, ratio, cfg, &mut kept);
        remove.extend_from_slice(&g.units[..n]);
    }
    remove.sort_unstable();
    remove
}

/// Exact parameters and MACs for any set of removed units, from the kept channel counts:
/// removing channels changes no spatial size, so each layer's cost is a product of counts.
pub struct CostModel {
    counts: Vec<usize>,
    /// Output height x width per node.
    spatial: Vec<usize>,
    inputs: Vec<Vec<NodeId>>,
    ops: Vec<Op>,
    depthwise: Vec<bool>,
}

impl CostModel {
    pub fn new(graph: &Graph, input_size: [usize; 2]) -> Result<CostModel> {
        let counts = graph.channel_counts()?;
        let dims = graph.infer_shapes(input_size[0], input_size[1])?;
        let depthwise = (0..graph.nodes.len())
            .map(|id| {
                matches!(graph.nodes[id].op, Op::Conv2d { .. })
                    && graph.channel_map(id, &counts) == ChannelMap::Identity
            })
            .collect();
        Ok(CostModel {
            spatial: dims.iter().map(|d| d.h * d.w).collect(),
            counts,
            inputs: graph.nodes.iter().map(|n| n.inputs.clone()).collect(),
            ops: graph.nodes.iter().map(|n| n.op.clone()).collect(),
            depthwise,
        })
    }

    /// Cost of the network without the units at `remove` (indices into `units`).
    pub fn of(&self, units: &[PruneUnit], remove: &[usize]) -> Cost {
        let mut kept = self.counts.clone();
        for &u in remove {
            for &(node, _) in &units[u].slots {
                kept[node] -= 1;
            }
        }
        let (mut params, mut macs) = (0usize, 0u64);
        for (id, op) in self.ops.iter().enumerate() {
            let out = kept[id];
            match op {
                Op::Conv2d {
                    kernel,
                    groups,
                    bias,
                    ..
                } => {
                    let input = kept[self.inputs[id][0]];
                    let per_group_in = if self.depthwise[id] {
                        1
                    } else {
                        input / groups
                    };
                    let weights = out * per_group_in * kernel * kernel;
                    params += weights + if *bias { out } else { 0 };
                    macs += (weights * self.spatial[id]) as u64;
                }
                Op::Linear { bias, .. } => {
                    let input = kept[self.inputs[id][0]];
                    params += out * input + if *bias { out } else { 0 };
                    macs += (out * input) as u64;
                }
                Op::BatchNorm { .. } => params += 2 * out,
                _ => {}
            }
        }
        Cost { params, macs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_counts_round_to_the_multiple_within_bounds() {
        assert_eq!(rounded_kept(50.0, 96, 8, 8), 48);
        assert_eq!(rounded_kept(53.0, 96, 8, 8), 56);
        assert_eq!(rounded_kept(3.0, 96, 8, 8), 8);
        assert_eq!(rounded_kept(3.0, 96, 8, 10), 16);
        assert_eq!(rounded_kept(100.0, 96, 8, 8), 96);
        assert_eq!(rounded_kept(13.0, 24, 1, 4), 13);
        assert_eq!(rounded_kept(5.0, 6, 8, 8), 6);
    }
}
