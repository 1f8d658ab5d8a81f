//! Physical channel removal: a smaller graph with sliced weights.
//!
//! Given units from [`super::channel_groups`], every node keeps the channels not removed, in
//! their original order. Each op is rewritten and checked against its channel relation, so a
//! set of removals that would change what the network computes is refused with the name of
//! the node it breaks: identity ops must keep the same channels as their inputs, a slice the
//! kept channels of its range, a shuffle must stay an exact, order-preserving shuffle, and a
//! grouped conv must keep equally sized groups.

use super::groups::{PruneUnit, flatten_is_per_channel};
use crate::graph::{ChannelMap, Graph, Node, Op, shuffle_permutation};
use crate::model::{Model, ModelMeta, Provenance};
use crate::weights::Weights;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// A copy of `model` without the channels of `units`: a physically smaller graph and weights
/// that compute the same function as `model` with those channels' contributions removed.
/// The result validates, runs and saves as a self-describing checkpoint on its own.
pub fn remove_channels(model: &Model, units: &[PruneUnit]) -> Result<Model> {
    let graph = &model.graph;
    let counts = graph.channel_counts()?;
    let mut removed: Vec<Vec<bool>> = counts.iter().map(|&c| vec![false; c]).collect();
    for unit in units {
        for &(node, channel) in &unit.slots {
            match removed.get_mut(node).and_then(|r| r.get_mut(channel)) {
                Some(r) => *r = true,
                None => bail!("prune: node {node} has no channel {channel}"),
            }
        }
    }
    let kept: Vec<Vec<usize>> = removed
        .iter()
        .map(|r| (0..r.len()).filter(|&c| !r[c]).collect())
        .collect();
    let (graph, tensors) = shrink(graph, &model.weights, &counts, &kept)?;
    graph
        .validate()
        .context("prune: the pruned graph is not valid")?;
    let weights = Weights::from_state_dict(&graph, tensors)?;
    let channels: usize = removed.iter().flatten().filter(|&&r| r).count();
    let filters: usize = units.iter().map(|u| u.filters().count()).sum();
    let source = format!(
        "{}; structured pruning removed {} coupled channel groups ({filters} filters, {channels} channel slots)",
        model.meta.provenance.source,
        units.len()
    );
    Ok(Model {
        graph,
        weights,
        meta: ModelMeta {
            provenance: Provenance::derived_from(&model.meta.provenance, source),
            ..model.meta.clone()
        },
    })
}

/// Picks `index` along `dim`.
fn select(t: &Tensor, dim: usize, index: &[usize]) -> Result<Tensor> {
    if index.len() == t.dims()[dim] && index.iter().enumerate().all(|(i, &j)| i == j) {
        return Ok(t.clone());
    }
    let ids: Vec<u32> = index.iter().map(|&i| i as u32).collect();
    let ids = Tensor::from_vec(ids, index.len(), &Device::Cpu)?.to_device(t.device())?;
    Ok(t.index_select(&ids, dim)?)
}

/// Whether `kept` (sorted channel indices out of `total`) keeps the same number in each of
/// `groups` equal contiguous blocks.
fn balanced(kept: &[usize], total: usize, groups: usize) -> bool {
    let per = total / groups;
    let mut n = vec![0usize; groups];
    for &c in kept {
        n[c / per] += 1;
    }
    n.iter().all(|&k| k == n[0])
}

/// The rewritten nodes and their sliced parameters.
fn shrink(
    graph: &Graph,
    weights: &Weights,
    counts: &[usize],
    kept: &[Vec<usize>],
) -> Result<(Graph, HashMap<String, Tensor>)> {
    let mut nodes = Vec::with_capacity(graph.nodes.len());
    let mut tensors = HashMap::new();
    for (id, node) in graph.nodes.iter().enumerate() {
        let name = &node.name;
        let k = &kept[id];
        let n = k.len();
        let whole = n == counts[id];
        if n == 0 {
            bail!("prune: removing these channels would leave `{name}` with no channels");
        }
        if id == graph.output && !whole {
            bail!("prune: `{name}` is the network output; its channels cannot be removed");
        }
        let input = |i: usize| &kept[node.inputs[i]];
        let same_as_inputs = || -> Result<()> {
            for (i, &src) in node.inputs.iter().enumerate() {
                if kept[src] != *k {
                    bail!(
                        "prune: `{name}` ({}) passes channels through, but its input {i} (`{}`) keeps different ones",
                        node.op.kind(),
                        graph.nodes[src].name
                    );
                }
            }
            Ok(())
        };
        let param = |suffix: &str| weights.get(&format!("{name}.{suffix}"));
        let mut put = |suffix: &str, t: Tensor| {
            tensors.insert(format!("{name}.{suffix}"), t);
        };
        let op = match &node.op {
            Op::Input { .. } => {
                if !whole {
                    bail!("prune: the network input `{name}` cannot lose channels");
                }
                node.op.clone()
            }
            Op::Conv2d {
                kernel,
                stride,
                padding,
                dilation,
                groups,
                bias,
                ..
            } => {
                let w = param("weight")?;
                let (w, groups) = match graph.channel_map(id, counts) {
                    ChannelMap::Identity => {
                        same_as_inputs()?;
                        (select(&w, 0, k)?, n)
                    }
                    _ => {
                        let kin = input(0);
                        let in_total = counts[node.inputs[0]];
                        if !balanced(k, counts[id], *groups) || !balanced(kin, in_total, *groups) {
                            bail!("prune: grouped conv `{name}` would get groups of unequal size");
                        }
                        let w = if *groups == 1 {
                            select(&select(&w, 0, k)?, 1, kin)?
                        } else {
                            let (out_per, in_per) = (counts[id] / groups, in_total / groups);
                            let mut pieces = Vec::with_capacity(*groups);
                            for g in 0..*groups {
                                let rows: Vec<usize> =
                                    k.iter().copied().filter(|&c| c / out_per == g).collect();
                                let cols: Vec<usize> = kin
                                    .iter()
                                    .filter(|&&c| c / in_per == g)
                                    .map(|&c| c - g * in_per)
                                    .collect();
                                pieces.push(select(&select(&w, 0, &rows)?, 1, &cols)?);
                            }
                            Tensor::cat(&pieces, 0)?
                        };
                        (w, *groups)
                    }
                };
                put("weight", w);
                if *bias {
                    put("bias", select(&param("bias")?, 0, k)?);
                }
                Op::Conv2d {
                    in_channels: input(0).len(),
                    out_channels: n,
                    kernel: *kernel,
                    stride: *stride,
                    padding: *padding,
                    dilation: *dilation,
                    groups,
                    bias: *bias,
                }
            }
            Op::BatchNorm { eps, momentum, .. } => {
                same_as_inputs()?;
                for suffix in ["weight", "bias", "running_mean", "running_var"] {
                    put(suffix, select(&param(suffix)?, 0, k)?);
                }
                Op::BatchNorm {
                    channels: n,
                    eps: *eps,
                    momentum: *momentum,
                }
            }
            Op::Linear { bias, .. } => {
                put(
                    "weight",
                    select(&select(&param("weight")?, 0, k)?, 1, input(0))?,
                );
                if *bias {
                    put("bias", select(&param("bias")?, 0, k)?);
                }
                Op::Linear {
                    in_features: input(0).len(),
                    out_features: n,
                    bias: *bias,
                }
            }
            Op::Concat => {
                let mut expected = Vec::with_capacity(n);
                let mut offset = 0;
                for &src in &node.inputs {
                    expected.extend(kept[src].iter().map(|&c| c + offset));
                    offset += counts[src];
                }
                if expected != *k {
                    bail!("prune: concat `{name}` does not keep its inputs' channels");
                }
                node.op.clone()
            }
            Op::Slice { start, end } => {
                let expected: Vec<usize> = input(0)
                    .iter()
                    .filter(|&&c| c >= *start && c < *end)
                    .map(|&c| c - start)
                    .collect();
                if expected != *k {
                    bail!("prune: slice `{name}` does not keep the channels of its range");
                }
                let new_start = input(0).iter().filter(|&&c| c < *start).count();
                Op::Slice {
                    start: new_start,
                    end: new_start + n,
                }
            }
            Op::ChannelShuffle { groups } => {
                let kin = input(0);
                if !n.is_multiple_of(*groups) {
                    bail!(
                        "prune: shuffle `{name}` would keep {n} channels, not divisible into {groups} groups"
                    );
                }
                let old = shuffle_permutation(counts[id], *groups);
                let new = shuffle_permutation(n, *groups);
                if kin.len() != n || (0..n).any(|i| kin[new[i]] != old[k[i]]) {
                    bail!(
                        "prune: shuffle `{name}` would no longer permute the kept channels exactly"
                    );
                }
                node.op.clone()
            }
            Op::Flatten => {
                same_as_inputs()?;
                if !whole && !flatten_is_per_channel(graph, id) {
                    bail!(
                        "prune: flatten `{name}` does not follow a global pool; its channels cannot be removed"
                    );
                }
                node.op.clone()
            }
            Op::Act { .. }
            | Op::Add
            | Op::ChannelMul
            | Op::MaxPool { .. }
            | Op::AvgPool { .. }
            | Op::GlobalAvgPool
            | Op::Dropout { .. } => {
                same_as_inputs()?;
                node.op.clone()
            }
        };
        nodes.push(Node {
            name: name.clone(),
            op,
            inputs: node.inputs.clone(),
        });
    }
    Ok((
        Graph {
            nodes,
            output: graph.output,
        },
        tensors,
    ))
}
