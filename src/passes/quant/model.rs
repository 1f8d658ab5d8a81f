//! The quantized model: what the pass produces, the simulation and the integer engine run,
//! and checkpoint format 3 stores. See `docs/quantization.md` for the scheme.
//!
//! Values are identified by node, as in the graph: `activations[id]` describes the tensor
//! node `id` produces. Every conv and linear layer is either int8 (`layers`) or kept in float
//! (`float_layers`), never both.

use super::scheme::{self, QParams, QuantizedWeight};
use crate::graph::{Activation, Graph, NodeId, Op};
use crate::model::ModelMeta;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How weights are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// One scale per output channel (axis 0 of the weight): the default.
    #[default]
    PerChannel,
    /// One scale per weight tensor (`--per-tensor`).
    PerTensor,
}

/// How activation ranges were chosen from the calibration data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Calibrator {
    /// The observed minimum and maximum.
    Minmax,
    /// The `percentile`-th percentile of each tail (e.g. 99.99 clips 0.01 % on each side).
    Percentile { percentile: f64 },
    /// The clipping range minimising the quantization mean squared error over a histogram.
    Mse,
    /// TensorRT's: the clipping range minimising the KL divergence over a 2048-bin histogram.
    Entropy,
}

impl Calibrator {
    pub fn name(&self) -> &'static str {
        match self {
            Calibrator::Minmax => "minmax",
            Calibrator::Percentile { .. } => "percentile",
            Calibrator::Mse => "mse",
            Calibrator::Entropy => "entropy",
        }
    }
}

/// The scheme options a model was quantized with (informational for a reader: the
/// quantized values and qparams are the truth).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemeInfo {
    pub granularity: Granularity,
    pub calibrator: Calibrator,
    /// Number of calibration images (from the training split).
    pub calibration_images: usize,
    /// Set when quantization-aware training produced the weights and ranges (the calibrator
    /// then only chose the ranges it started from); absent for post-training quantization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qat: Option<QatInfo>,
}

/// How a quantization-aware training run ended, as the int8 checkpoint records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QatInfo {
    /// Epochs of quantization-aware training behind these weights.
    pub epochs: usize,
    pub freeze_bn_epoch: Option<usize>,
    pub freeze_observers_epoch: Option<usize>,
}

/// An int8 conv or linear layer.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedLayer {
    /// The int8 weight, in the float weight's layout.
    pub weight: QuantizedWeight,
    /// One i32 per output channel at the accumulator's scale `in_scale * w_scale[c]`:
    /// `round_half_even(bias[c] / (in_scale * w_scale[c]))`; zeros for a layer without bias.
    pub bias: Vec<i32>,
}

/// A conv or linear layer kept in float (`--keep-float`): its input is dequantized, the float
/// op runs, and its output is quantized with the node's qparams (or stays float when it is the
/// network output and `activations[id]` is `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct FloatLayer {
    /// The BN-folded float weight, row-major in its layout.
    pub weight: Vec<f32>,
    pub shape: Vec<usize>,
    /// One per output channel (zeros for a layer without bias).
    pub bias: Vec<f32>,
}

/// A BN-folded model with int8 weights and uint8 activations.
#[derive(Debug, Clone)]
pub struct QuantizedModel {
    /// The batch-norm-folded graph (no `batch_norm` node follows a conv any more). Node ids
    /// below index this graph.
    pub graph: Graph,
    /// Per node, the qparams of the tensor it produces. `activations[0]` quantizes the network
    /// input. Pass-through ops (max pool, channel shuffle, slice, flatten, dropout) have their
    /// input's qparams; a concat and all its inputs share one; a conv, linear or add with a
    /// fused activation (`fused`) has that activation node's qparams. `None` only for a
    /// float output: the network output when it comes from a layer kept in float (the
    /// logits stay f32). Every other value is quantized.
    pub activations: Vec<Option<QParams>>,
    /// Per node, the activation fused into it: `Some(Relu | Relu6)` for a conv, linear or add
    /// whose only reader is that activation (and which is not the network output). The node
    /// then writes the activation's tensor directly (clamped by [`scheme::clamp_range`]), and
    /// the activation node itself is the identity on codes (same qparams on both sides).
    pub fused: Vec<Option<Activation>>,
    /// The int8 conv and linear layers, by node name.
    pub layers: BTreeMap<String, QuantizedLayer>,
    /// The conv and linear layers kept in float, by node name.
    pub float_layers: BTreeMap<String, FloatLayer>,
    /// Class names, preprocessing, provenance and the original architecture.
    pub meta: ModelMeta,
    pub scheme: SchemeInfo,
}

impl QuantizedModel {
    /// The qparams of the network input.
    pub fn input_qparams(&self) -> QParams {
        self.activations[0].expect("the network input is always quantized")
    }

    /// The qparams of the `k`-th input of node `id` (what that input tensor holds).
    pub fn input_of(&self, id: NodeId, k: usize) -> Option<QParams> {
        self.activations[self.graph.nodes[id].inputs[k]]
    }

    /// Whether node `id` is an activation applied by its producer (see `fused`): it is the
    /// identity on codes.
    pub fn is_fused_away(&self, id: NodeId) -> bool {
        let node = &self.graph.nodes[id];
        matches!(node.op, Op::Act { .. })
            && node
                .inputs
                .first()
                .is_some_and(|&p| self.fused[p].is_some())
    }

    /// The int8 layer of conv or linear node `id`, or `None` when it is kept in float.
    pub fn layer(&self, id: NodeId) -> Option<&QuantizedLayer> {
        self.layers.get(&self.graph.nodes[id].name)
    }

    /// Per output channel, the requantization multiplier of int8 layer `id`:
    /// `in_scale * w_scale[c] / out_scale` (f32, left to right).
    pub fn multipliers(&self, id: NodeId) -> Result<Vec<f32>> {
        let node = &self.graph.nodes[id];
        let Some(layer) = self.layer(id) else {
            bail!("layer `{}` is not quantized", node.name);
        };
        let (Some(inp), Some(out)) = (self.input_of(id, 0), self.activations[id]) else {
            bail!("layer `{}` has a float input or output", node.name);
        };
        Ok((0..layer.weight.out_channels())
            .map(|c| scheme::multiplier(inp.scale, layer.weight.scale(c), out.scale))
            .collect())
    }

    /// The code range node `id` clamps its output to: [0, 255] narrowed by a fused ReLU or
    /// ReLU6. `None` when the output is float.
    pub fn clamp_range(&self, id: NodeId) -> Option<(u8, u8)> {
        self.activations[id].map(|q| scheme::clamp_range(q, self.fused[id]))
    }

    /// The 256-entry table of activation node `id` that is not fused away (hardswish,
    /// hardsigmoid, sigmoid, or a ReLU whose producer is not a conv, linear or add).
    pub fn lookup_table(&self, id: NodeId) -> Result<[u8; 256]> {
        let node = &self.graph.nodes[id];
        let Op::Act { act } = node.op else {
            bail!("node `{}` is not an activation", node.name);
        };
        let (Some(inp), Some(out)) = (self.input_of(id, 0), self.activations[id]) else {
            bail!("activation `{}` has a float input or output", node.name);
        };
        Ok(scheme::lookup_table(inp, out, scheme::activation_fn(act)))
    }

    /// Parameters stored: int8 weights, i32 biases and float weights and biases.
    pub fn param_count(&self) -> usize {
        let q: usize = self
            .layers
            .values()
            .map(|l| l.weight.values.len() + l.bias.len())
            .sum();
        let f: usize = self
            .float_layers
            .values()
            .map(|l| l.weight.len() + l.bias.len())
            .sum();
        q + f
    }

    pub fn num_classes(&self) -> usize {
        self.meta.class_names.len()
    }
}

/// Per node, the activation its producer applies: a ReLU or ReLU6 that is the only reader of a
/// conv, linear or add which is not the network output. Derived from the graph alone (the
/// pass and the checkpoint reader agree by construction).
pub fn fused_activations(graph: &Graph) -> Vec<Option<Activation>> {
    let consumers = graph.consumers();
    graph
        .nodes
        .iter()
        .enumerate()
        .map(|(id, node)| {
            if !matches!(node.op, Op::Conv2d { .. } | Op::Linear { .. } | Op::Add)
                || id == graph.output
                || consumers[id].len() != 1
            {
                return None;
            }
            match graph.nodes[consumers[id][0]].op {
                Op::Act {
                    act: act @ (Activation::Relu | Activation::Relu6),
                } => Some(act),
                _ => None,
            }
        })
        .collect()
}
