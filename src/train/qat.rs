//! Quantization-aware training (`docs/quantization.md`, "Quantization-aware training"):
//! fine-tuning a float model with the int8 scheme's quantization simulated in the forward
//! pass, so that the weights learn to live with it; the result is the same int8 model as
//! post-training quantization produces (checkpoint format 3).
//!
//! The training graph keeps its batch norms; the int8 plan is made on the batch-norm-folded
//! graph. A node of the training graph is mapped to the folded node that produces the same
//! tensor (a conv and the batch norm folded into it map to the folded conv, and the batch
//! norm, the later of the two, produces the tensor). The training step then fake-quantizes:
//!
//! - the output of every node the plan gives its own qparams (`calibrate::needs_observation`:
//!   the input, convs and linear layers without a fused activation, adds, activations,
//!   channel multiplies and poolings), with the qparams of its shared class, so that concat,
//!   channel shuffle, slice and max pooling see one scale on both sides and a fused ReLU or
//!   ReLU6 clamps to the same codes as the integer engine;
//! - every conv and linear weight as the plan will quantize it after folding: the folded
//!   weight `w * gamma / sqrt(running_var + eps)` quantized per channel (or per tensor) and
//!   divided by the fold factor again (`fake_quant::fake_quantize_weight`).
//!
//! Gradients are straight through (zero where an activation is clipped). The ranges start at
//! the calibrated PTQ ranges and follow a moving average of each batch's min and max
//! (PyTorch's `MovingAverageMinMaxObserver`, averaging constant 0.01) until the observers are
//! frozen; batch norm uses batch statistics until it is frozen, then its running statistics,
//! which is what folding uses at export.

use super::fake_quant::{FakeQuant, fake_quantize_weight};
use crate::graph::{NodeId, Op};
use crate::model::Model;
use crate::passes::quant::calibrate::needs_observation;
use crate::passes::quant::plan::{build_with_qparams, keep_float_layers, shared_classes};
use crate::passes::quant::{
    Calibrator, Granularity, QParams, QuantOptions, QuantizedModel, fused_activations,
};
use crate::prune::pattern::NamePattern;
use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// Weight of the newest batch in the moving average of an activation range.
pub const OBSERVER_MOMENTUM: f32 = 0.01;

/// The settings of a quantization-aware training run (part of `TrainConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QatConfig {
    pub granularity: Granularity,
    /// How the initial ranges were calibrated.
    pub calibrator: Calibrator,
    /// Number of training images the initial ranges were calibrated on.
    pub calibration_images: usize,
    /// Batch norm runs on its running statistics from this epoch on (0: from the start);
    /// `None`: batch statistics throughout.
    pub freeze_bn_epoch: Option<usize>,
    /// The activation ranges stop moving from this epoch on; `None`: they move throughout.
    pub freeze_observers_epoch: Option<usize>,
    /// Conv and linear layers kept in float (`--keep-float` patterns, as `quantize` takes
    /// them): their weights are not fake-quantized and the int8 model keeps them in float.
    /// Absent in the state of runs made before the flag existed.
    #[serde(default)]
    pub keep_float: Vec<String>,
}

impl QatConfig {
    /// Checks the freeze epochs against a run of `epochs` epochs.
    pub fn validate(&self, epochs: usize) -> Result<()> {
        for (flag, e) in [
            ("--freeze-bn-epoch", self.freeze_bn_epoch),
            ("--freeze-observers-epoch", self.freeze_observers_epoch),
        ] {
            if let Some(e) = e
                && e >= epochs
            {
                bail!(
                    "{flag} {e}: out of range for a run of {epochs} epochs (epochs count from 0; give at most {})",
                    epochs - 1
                );
            }
        }
        if self.calibration_images == 0 {
            bail!("--calibration 0: calibration needs at least one image");
        }
        Ok(())
    }

    pub fn bn_frozen(&self, epoch: usize) -> bool {
        self.freeze_bn_epoch.is_some_and(|e| epoch >= e)
    }

    pub fn observers_frozen(&self, epoch: usize) -> bool {
        self.freeze_observers_epoch.is_some_and(|e| epoch >= e)
    }

    /// The plan's options: every conv and linear layer in int8 but the `keep_float` ones.
    pub fn options(&self) -> Result<QuantOptions> {
        Ok(QuantOptions {
            granularity: self.granularity,
            calibrator: self.calibrator,
            keep_float: self
                .keep_float
                .iter()
                .map(|p| NamePattern::parse(p))
                .collect::<Result<_>>()
                .context("--keep-float")?,
        })
    }
}

/// What a QAT run carries from step to step (and saves in its resume state): the tracked
/// range of every tensor, per node of the batch-norm-folded graph (`None`: a float output).
/// Nodes of one shared class hold the same range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QatState {
    pub ranges: Vec<Option<(f32, f32)>>,
}

/// Quantization-aware training of one model: its state and how the training graph maps onto
/// the folded graph the plan is made on.
#[derive(Debug, Clone)]
pub struct Qat {
    pub config: QatConfig,
    pub state: QatState,
    /// Per node of the training graph: the folded node producing the same tensor.
    folded_of: Vec<NodeId>,
    /// Per node of the training graph: whether its output is fake-quantized.
    quantized_output: Vec<bool>,
    /// Per folded node, its shared class.
    class: Vec<NodeId>,
    /// Conv or linear layer name -> the batch norm folded into it (name, eps).
    folds_into: HashMap<String, (String, f64)>,
    /// The layers kept in float, whose weights the forward pass uses as they are.
    float_layers: HashSet<String>,
}

impl Qat {
    /// Calibrates `model` (a float model with batch norm) on `batches` as post-training
    /// quantization does and starts QAT from the calibrated ranges.
    pub fn calibrate(
        model: &Model,
        batches: impl IntoIterator<Item = Result<Tensor>>,
        config: QatConfig,
        progress: impl FnMut(usize),
    ) -> Result<Qat> {
        let q = crate::passes::quant::quantize(model, batches, &config.options()?, progress)?;
        let state = QatState {
            ranges: q.activations.iter().map(|a| a.map(|q| q.range())).collect(),
        };
        let config = QatConfig {
            calibration_images: q.scheme.calibration_images,
            ..config
        };
        Qat::with_state(model, config, state)
    }

    /// QAT of `model` with a saved state (a resumed run).
    pub fn with_state(model: &Model, config: QatConfig, state: QatState) -> Result<Qat> {
        let folded = crate::passes::fold_batch_norm(model)?;
        let fg = &folded.graph;
        if let Some(bn) = fg
            .nodes
            .iter()
            .find(|n| matches!(n.op, Op::BatchNorm { .. }))
        {
            bail!(
                "batch norm `{}` follows no conv it can be folded into: the int8 scheme has no standalone batch norm",
                bn.name
            );
        }
        if state.ranges.len() != fg.nodes.len() {
            bail!(
                "QAT state has {} ranges for a folded graph of {} nodes",
                state.ranges.len(),
                fg.nodes.len()
            );
        }
        let by_name: HashMap<&str, NodeId> = fg
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i))
            .collect();
        let graph = &model.graph;
        let mut folded_of = Vec::with_capacity(graph.nodes.len());
        let mut folds_into = HashMap::new();
        for node in &graph.nodes {
            let id = match by_name.get(node.name.as_str()) {
                Some(&id) => id,
                None => {
                    // A batch norm folded into the conv it reads.
                    let Op::BatchNorm { eps, .. } = node.op else {
                        bail!("node `{}` is missing from the folded graph", node.name);
                    };
                    let conv = &graph.nodes[node.inputs[0]].name;
                    folds_into.insert(conv.clone(), (node.name.clone(), eps));
                    *by_name
                        .get(conv.as_str())
                        .with_context(|| format!("conv `{conv}` of batch norm `{}`", node.name))?
                }
            };
            folded_of.push(id);
        }
        let float_layers = keep_float_layers(fg, &config.options()?.keep_float)?
            .into_iter()
            .collect();
        let observed = needs_observation(fg, &fused_activations(fg));
        let mut last = vec![usize::MAX; fg.nodes.len()];
        for (u, &f) in folded_of.iter().enumerate() {
            last[f] = u;
        }
        let quantized_output = folded_of
            .iter()
            .enumerate()
            .map(|(u, &f)| observed[f] && last[f] == u && state.ranges[f].is_some())
            .collect();
        Ok(Qat {
            config,
            state,
            folded_of,
            quantized_output,
            class: shared_classes(fg),
            folds_into,
            float_layers,
        })
    }

    /// The qparams of folded node `f` now.
    fn qparams(&self, f: NodeId) -> Option<QParams> {
        self.state.ranges[f].map(|(lo, hi)| QParams::from_range(lo, hi))
    }

    /// What the next training step of `model` at `epoch` fake-quantizes: the current ranges
    /// and the current weights (and batch-norm statistics) quantized.
    pub fn fake_quant(&self, model: &Model, epoch: usize) -> Result<FakeQuant> {
        let outputs = self
            .quantized_output
            .iter()
            .zip(&self.folded_of)
            .map(|(&q, &f)| if q { self.qparams(f) } else { None })
            .collect();
        let per_channel = self.config.granularity == Granularity::PerChannel;
        let mut weights = HashMap::new();
        for node in &model.graph.nodes {
            if !node.op.has_weight_matrix() || self.float_layers.contains(&node.name) {
                continue;
            }
            let name = format!("{}.weight", node.name);
            let w = model.weights.get(&name)?;
            let shape = w.dims().to_vec();
            let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
            let fold = match self.folds_into.get(&node.name) {
                Some((bn, eps)) => fold_factors(model, bn, *eps)?,
                None => vec![1.0; shape[0]],
            };
            weights.insert(
                name,
                fake_quantize_weight(&values, &shape, &fold, per_channel),
            );
        }
        Ok(FakeQuant {
            outputs,
            weights,
            frozen_bn: self.config.bn_frozen(epoch),
        })
    }

    /// Moves the ranges towards one step's observed min and max (`StepOutput::observed`,
    /// per node of the training graph): each shared class towards the union of its members'.
    pub fn observe(&mut self, observed: &[Option<(f32, f32)>]) {
        let mut batch: HashMap<NodeId, (f32, f32)> = HashMap::new();
        for (u, range) in observed.iter().enumerate() {
            let (Some((lo, hi)), Some(&f)) = (range, self.folded_of.get(u)) else {
                continue;
            };
            if !(lo.is_finite() && hi.is_finite()) {
                continue;
            }
            let r = batch.entry(self.class[f]).or_insert((*lo, *hi));
            *r = (r.0.min(*lo), r.1.max(*hi));
        }
        let c = OBSERVER_MOMENTUM;
        for (f, range) in self.state.ranges.iter_mut().enumerate() {
            if let (Some((lo, hi)), Some((blo, bhi))) = (range.as_mut(), batch.get(&self.class[f]))
            {
                *lo += c * (blo - *lo);
                *hi += c * (bhi - *hi);
            }
        }
    }

    /// The int8 model of `model` now: batch norm folded with its running statistics, the
    /// tracked ranges as activation qparams, weights and biases quantized by the plan, and
    /// its record that QAT made it (`epochs` trained, this run's freeze epochs).
    pub fn export(&self, model: &Model, epochs: usize) -> Result<QuantizedModel> {
        let folded = crate::passes::fold_batch_norm(model)?;
        let activations = (0..folded.graph.nodes.len())
            .map(|f| self.qparams(f))
            .collect();
        let mut q = build_with_qparams(
            &folded,
            activations,
            &self.config.options()?,
            self.config.calibration_images,
        )?;
        q.scheme.qat = Some(crate::passes::quant::QatInfo {
            epochs,
            freeze_bn_epoch: self.config.freeze_bn_epoch,
            freeze_observers_epoch: self.config.freeze_observers_epoch,
        });
        Ok(q)
    }
}

/// Per output channel, the factor batch norm `bn` folds into its conv's weight:
/// `gamma / sqrt(running_var + eps)`, computed as `passes::fold_batch_norm` computes it.
fn fold_factors(model: &Model, bn: &str, eps: f64) -> Result<Vec<f32>> {
    let gamma = model.weights.get(&format!("{bn}.weight"))?;
    let var = model.weights.get(&format!("{bn}.running_var"))?;
    let scale = (gamma / (var + eps)?.sqrt()?)?;
    Ok(scale.to_vec1()?)
}
