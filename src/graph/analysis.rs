//! Static analysis: parameters, multiply-adds and a per-layer table.
//!
//! MACs follow torchvision's `_ops` convention: multiply-adds of conv and linear layers only,
//! bias and normalisation excluded.

use super::{Dims, Graph, Op};
use anyhow::Result;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct LayerRow {
    pub name: String,
    pub op: &'static str,
    /// Output shape for one image (batch 1).
    pub output_shape: Vec<usize>,
    pub params: usize,
    pub macs: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub input_size: [usize; 2],
    /// Trainable parameters (buffers such as running statistics excluded, as in PyTorch).
    pub params: usize,
    pub macs: u64,
    pub layers: Vec<LayerRow>,
}

fn op_macs(op: &Op, out: Dims) -> u64 {
    match op {
        Op::Conv2d {
            in_channels,
            kernel,
            groups,
            ..
        } => (out.elements() * (in_channels / groups) * kernel * kernel) as u64,
        Op::Linear {
            in_features,
            out_features,
            ..
        } => (in_features * out_features) as u64,
        _ => 0,
    }
}

impl Graph {
    /// Trainable parameter count.
    pub fn param_count(&self) -> usize {
        self.param_specs()
            .iter()
            .filter(|s| s.role.is_trainable())
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    }

    /// Parameters, MACs and a row per node (the input excluded) for an `h` x `w` input.
    pub fn summary(&self, h: usize, w: usize) -> Result<Summary> {
        let dims = self.infer_shapes(h, w)?;
        let mut params_per_node = vec![0usize; self.nodes.len()];
        for spec in self.param_specs().iter().filter(|s| s.role.is_trainable()) {
            params_per_node[spec.node] += spec.shape.iter().product::<usize>();
        }
        let layers: Vec<LayerRow> = self
            .nodes
            .iter()
            .enumerate()
            .skip(1)
            .map(|(id, node)| LayerRow {
                name: node.name.clone(),
                op: node.op.kind(),
                output_shape: dims[id].with_batch(1),
                params: params_per_node[id],
                macs: op_macs(&node.op, dims[id]),
            })
            .collect();
        Ok(Summary {
            input_size: [h, w],
            params: params_per_node.iter().sum(),
            macs: layers.iter().map(|l| l.macs).sum(),
            layers,
        })
    }
}
