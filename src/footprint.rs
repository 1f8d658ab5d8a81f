//! What a model costs to ship: parameters, non-zero parameters, MACs, file size. Every
//! compression command reports these before and after, so users see what a pass bought.

use crate::model::Model;
use crate::passes::quant::QuantizedModel;
use anyhow::Result;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Footprint {
    /// Trainable parameters (running statistics excluded, as PyTorch counts them).
    pub params: usize,
    /// Trainable parameters that are not exactly zero.
    pub nonzero_params: usize,
    /// Multiply-accumulates of one image at the model's input size.
    pub macs: u64,
    /// Size of the checkpoint file, when there is one.
    pub file_size: Option<u64>,
}

impl Footprint {
    pub fn of(model: &Model, file_size: Option<u64>) -> Result<Footprint> {
        let [h, w] = model.meta.preprocessing.input_size;
        let summary = model.graph.summary(h, w)?;
        let mut nonzero = 0;
        for spec in model.graph.param_specs() {
            if spec.role.is_trainable() {
                nonzero += crate::sparse::count_nonzero(&model.weights.get(&spec.name)?)?;
            }
        }
        Ok(Footprint {
            params: summary.params,
            nonzero_params: nonzero,
            macs: summary.macs,
            file_size,
        })
    }

    /// The footprint of an int8 model: its folded graph's MACs, and its stored parameters (int8
    /// weights, i32 biases and the layers kept in float), as `QuantizedModel::param_count`.
    pub fn of_int8(model: &QuantizedModel, file_size: Option<u64>) -> Result<Footprint> {
        let [h, w] = model.meta.preprocessing.input_size;
        let macs = model.graph.summary(h, w)?.macs;
        let int8: usize = model
            .layers
            .values()
            .map(|l| {
                l.weight.values.iter().filter(|&&v| v != 0).count()
                    + l.bias.iter().filter(|&&b| b != 0).count()
            })
            .sum();
        let float: usize = model
            .float_layers
            .values()
            .map(|l| {
                l.weight
                    .iter()
                    .chain(&l.bias)
                    .filter(|&&v| v != 0.0)
                    .count()
            })
            .sum();
        Ok(Footprint {
            params: model.param_count(),
            nonzero_params: int8 + float,
            macs,
            file_size,
        })
    }

    /// Fraction of the trainable parameters that are zero.
    pub fn sparsity(&self) -> f64 {
        1.0 - self.nonzero_params as f64 / self.params.max(1) as f64
    }
}
