//! Folding eval-mode batch norm into the convolution before it.
//!
//! `bn(conv(x))` with running statistics is `conv'(x)` with weights scaled per output channel
//! and a bias: `w' = w * s`, `b' = (b - mean) * s + beta`, `s = gamma / sqrt(var + eps)`. This
//! holds for dense, grouped and depthwise convs alike (each output channel has its own
//! filter). It saves a pass over every activation at inference time.

use crate::graph::{NodeId, Op};
use crate::model::Model;
use anyhow::Result;

/// A copy of `model` for inference with every batch norm that is the only reader of a conv
/// folded into that conv. Training a folded model is not meaningful (the statistics are gone).
pub fn fold_batch_norm(model: &Model) -> Result<Model> {
    let graph = &model.graph;
    let consumers = graph.consumers();
    let mut weights = model.weights.clone();
    let mut nodes = graph.nodes.clone();
    // For each removed batch norm, the node its readers should read instead.
    let mut replaced_by: Vec<Option<NodeId>> = vec![None; nodes.len()];
    for (id, node) in graph.nodes.iter().enumerate() {
        let Op::BatchNorm { eps, .. } = node.op else {
            continue;
        };
        let conv = node.inputs[0];
        let Op::Conv2d { bias, .. } = graph.nodes[conv].op else {
            continue;
        };
        if consumers[conv].len() != 1 || conv == graph.output {
            continue;
        }
        let bn = |s: &str| weights.get(&format!("{}.{s}", node.name));
        let scale = (bn("weight")? / (bn("running_var")? + eps)?.sqrt()?)?;
        let shift = (bn("bias")? - (bn("running_mean")? * &scale)?)?;
        let conv_name = &graph.nodes[conv].name;
        let w = weights.get(&format!("{conv_name}.weight"))?;
        let w = w.broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?;
        let b = if bias {
            ((weights.get(&format!("{conv_name}.bias"))? * &scale)? + &shift)?
        } else {
            shift
        };
        weights.insert(&format!("{conv_name}.weight"), &w)?;
        weights.insert(&format!("{conv_name}.bias"), &b)?;
        for suffix in ["weight", "bias", "running_mean", "running_var"] {
            weights.remove(&format!("{}.{suffix}", node.name));
        }
        if let Op::Conv2d { bias, .. } = &mut nodes[conv].op {
            *bias = true;
        }
        replaced_by[id] = Some(conv);
    }
    let (nodes, output) = drop_nodes(nodes, &replaced_by, graph.output);
    let folded = crate::graph::Graph { nodes, output };
    folded.validate()?;
    Ok(Model {
        graph: folded,
        weights,
        meta: model.meta.clone(),
    })
}

/// Removes the nodes that have a replacement, pointing their readers at the replacement, and
/// renumbers the rest. Returns the new node list and output.
fn drop_nodes(
    nodes: Vec<crate::graph::Node>,
    replaced_by: &[Option<NodeId>],
    output: NodeId,
) -> (Vec<crate::graph::Node>, NodeId) {
    let resolve = |mut id: NodeId| {
        while let Some(r) = replaced_by[id] {
            id = r;
        }
        id
    };
    let mut new_index = vec![usize::MAX; nodes.len()];
    let mut kept = Vec::with_capacity(nodes.len());
    for (id, mut node) in nodes.into_iter().enumerate() {
        if replaced_by[id].is_some() {
            continue;
        }
        node.inputs = node.inputs.iter().map(|&i| new_index[resolve(i)]).collect();
        new_index[id] = kept.len();
        kept.push(node);
    }
    (kept, new_index[resolve(output)])
}
