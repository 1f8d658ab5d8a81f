//! The quantization plan: from a batch-norm-folded model and its calibration observations to
//! a [`QuantizedModel`]. Decides which tensors share qparams, which layers stay in float, and
//! quantizes weights and biases.
//!
//! Shared qparams (one scale on both sides of an op that only moves values):
//! - max pool, channel shuffle, slice, flatten and dropout pass their input's qparams through;
//! - a concat and all its inputs share one;
//! - a conv, linear or add with a fused ReLU/ReLU6 writes the activation's tensor.
//!
//! These are equivalence classes over tensors, found with union-find; each class gets the
//! union of its members' calibrated ranges (a fused producer's own pre-activation range is not
//! a member's: its tensor *is* the activation's).

use super::calibrate::{Observers, calibrated_range};
use super::model::{
    Calibrator, FloatLayer, Granularity, QuantizedLayer, QuantizedModel, SchemeInfo,
    fused_activations,
};
use super::scheme::{self, QParams, QuantizedWeight};
use crate::graph::{Graph, NodeId, Op};
use crate::model::Model;
use crate::prune::pattern::NamePattern;
use anyhow::{Result, bail};
use candle_core::DType;
use std::collections::BTreeMap;

/// What the user chose.
#[derive(Debug, Clone)]
pub struct QuantOptions {
    pub granularity: Granularity,
    pub calibrator: Calibrator,
    /// Conv and linear layers to keep in float (`--keep-float`); every pattern must match one.
    pub keep_float: Vec<NamePattern>,
}

impl Default for QuantOptions {
    fn default() -> Self {
        QuantOptions {
            granularity: Granularity::PerChannel,
            calibrator: Calibrator::Percentile { percentile: 99.99 },
            keep_float: Vec::new(),
        }
    }
}

/// Ops whose output holds some of their input's values unchanged, so they keep its qparams.
pub fn is_pass_through(op: &Op) -> bool {
    matches!(
        op,
        Op::MaxPool { .. }
            | Op::ChannelShuffle { .. }
            | Op::Slice { .. }
            | Op::Flatten
            | Op::Dropout { .. }
    )
}

/// The conv and linear layers selected by `patterns`; a pattern that selects none is an error
/// naming `--keep-float`.
pub fn keep_float_layers(graph: &Graph, patterns: &[NamePattern]) -> Result<Vec<String>> {
    let layers: Vec<&str> = graph
        .nodes
        .iter()
        .filter(|n| n.op.has_weight_matrix())
        .map(|n| n.name.as_str())
        .collect();
    for p in patterns {
        if !layers.iter().any(|l| p.selects_layer(l)) {
            bail!(
                "--keep-float: pattern `{}` matches no conv or linear layer (see `slimcandle inspect` for layer names)",
                p.as_str()
            );
        }
    }
    Ok(layers
        .into_iter()
        .filter(|l| patterns.iter().any(|p| p.selects_layer(l)))
        .map(String::from)
        .collect())
}

/// Union-find over node ids.
struct Classes {
    parent: Vec<usize>,
}

impl Classes {
    fn new(n: usize) -> Classes {
        Classes {
            parent: (0..n).collect(),
        }
    }

    fn find(&mut self, mut i: usize) -> usize {
        while self.parent[i] != i {
            self.parent[i] = self.parent[self.parent[i]];
            i = self.parent[i];
        }
        i
    }

    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.parent[a.max(b)] = a.min(b);
        }
    }
}

/// Per node, the class representative of the tensor it produces (nodes in one class share
/// qparams).
pub fn shared_classes(graph: &Graph) -> Vec<NodeId> {
    let fused = fused_activations(graph);
    let consumers = graph.consumers();
    let mut classes = Classes::new(graph.nodes.len());
    for (id, node) in graph.nodes.iter().enumerate() {
        if is_pass_through(&node.op) || matches!(node.op, Op::Concat) {
            for &i in &node.inputs {
                classes.union(id, i);
            }
        }
        if fused[id].is_some() {
            classes.union(id, consumers[id][0]);
        }
    }
    (0..graph.nodes.len()).map(|i| classes.find(i)).collect()
}

/// Builds the quantized model from `folded` (batch norm folded) and its observations.
pub fn build(folded: &Model, observers: &Observers, opts: &QuantOptions) -> Result<QuantizedModel> {
    let activations = calibrated_qparams(&folded.graph, observers, opts)?;
    build_with_qparams(folded, activations, opts, observers.images)
}

/// Per node of the folded graph, the qparams of the tensor it produces: the union of the
/// calibrated ranges of its shared class's observed members. `None` only for the logits of a
/// classifier kept in float.
pub fn calibrated_qparams(
    graph: &Graph,
    observers: &Observers,
    opts: &QuantOptions,
) -> Result<Vec<Option<QParams>>> {
    let n = graph.nodes.len();
    let keep = keep_float_layers(graph, &opts.keep_float)?;
    let class = shared_classes(graph);

    // The union of the calibrated ranges of each class's observed members.
    let mut range: BTreeMap<NodeId, (f32, f32)> = BTreeMap::new();
    for (id, hist) in observers.histograms.iter().enumerate() {
        let Some(hist) = hist else {
            continue;
        };
        // The logits keep their full observed range: clipping them would saturate the top
        // classes at one code and lose their ranking (entropy calibration does that).
        let calibrator = if class[id] == class[graph.output] {
            Calibrator::Minmax
        } else {
            opts.calibrator
        };
        let (lo, hi) = calibrated_range(hist, calibrator);
        let r = range.entry(class[id]).or_insert((lo, hi));
        *r = (r.0.min(lo), r.1.max(hi));
    }
    let mut activations: Vec<Option<QParams>> = (0..n)
        .map(|id| {
            let (lo, hi) = range.get(&class[id]).copied().unwrap_or((0.0, 0.0));
            Some(QParams::from_range(lo, hi))
        })
        .collect();
    // Logits of a classifier kept in float stay float.
    if keep.contains(&graph.nodes[graph.output].name) {
        activations[graph.output] = None;
    }
    Ok(activations)
}

/// Builds the quantized model from `folded` (batch norm folded) with the given activation
/// qparams (one per node, shared classes already agreeing: from [`calibrated_qparams`], or
/// from quantization-aware training's observers): quantizes weights and biases, keeps the
/// `--keep-float` layers in float.
pub fn build_with_qparams(
    folded: &Model,
    activations: Vec<Option<QParams>>,
    opts: &QuantOptions,
    calibration_images: usize,
) -> Result<QuantizedModel> {
    let graph = &folded.graph;
    if activations.len() != graph.nodes.len() {
        bail!(
            "{} activation qparams for a graph of {} nodes",
            activations.len(),
            graph.nodes.len()
        );
    }
    let fused = fused_activations(graph);
    let keep = keep_float_layers(graph, &opts.keep_float)?;
    let mut layers = BTreeMap::new();
    let mut float_layers = BTreeMap::new();
    for node in &graph.nodes {
        if !node.op.has_weight_matrix() {
            continue;
        }
        let weight = folded.weights.get(&format!("{}.weight", node.name))?;
        let shape = weight.dims().to_vec();
        let w: Vec<f32> = weight.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let has_bias = matches!(
            node.op,
            Op::Conv2d { bias: true, .. } | Op::Linear { bias: true, .. }
        );
        let bias: Vec<f32> = if has_bias {
            let b = folded.weights.get(&format!("{}.bias", node.name))?;
            b.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?
        } else {
            vec![0.0; shape[0]]
        };
        if keep.contains(&node.name) {
            float_layers.insert(
                node.name.clone(),
                FloatLayer {
                    weight: w,
                    shape,
                    bias,
                },
            );
            continue;
        }
        let in_scale = activations[node.inputs[0]]
            .expect("only the network output can be float")
            .scale;
        let weight =
            QuantizedWeight::quantize(&w, &shape, opts.granularity == Granularity::PerChannel);
        let bias = bias
            .iter()
            .enumerate()
            .map(|(c, &b)| scheme::quantize_bias(b, in_scale, weight.scale(c)))
            .collect();
        layers.insert(node.name.clone(), QuantizedLayer { weight, bias });
    }
    Ok(QuantizedModel {
        graph: graph.clone(),
        activations,
        fused,
        layers,
        float_layers,
        meta: folded.meta.clone(),
        scheme: SchemeInfo {
            granularity: opts.granularity,
            calibrator: opts.calibrator,
            calibration_images,
            qat: None,
        },
    })
}
