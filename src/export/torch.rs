//! A plain PyTorch state dict: dense float32 tensors under the torchvision names, plus the
//! `num_batches_tracked` buffer (int64 0) of every batch norm, which `load_state_dict` in
//! strict mode requires. No slimcandle metadata: sparse tensors are expanded and the graph is
//! not stored, so any safetensors reader sees an ordinary `state_dict()`.

use crate::graph::Op;
use crate::model::Model;
use crate::tensor_file::{RawTensor, write_atomic};
use anyhow::Result;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;

/// The state dict's tensors, in graph order.
pub fn state_dict(model: &Model) -> Result<Vec<(String, RawTensor)>> {
    let mut tensors = Vec::new();
    for spec in model.graph.param_specs() {
        tensors.push((
            spec.name.clone(),
            RawTensor::from_f32(&model.weights.get(&spec.name)?)?,
        ));
    }
    for node in &model.graph.nodes {
        if matches!(node.op, Op::BatchNorm { .. }) {
            tensors.push((
                format!("{}.num_batches_tracked", node.name),
                RawTensor {
                    dtype: Dtype::I64,
                    shape: vec![],
                    data: 0i64.to_le_bytes().to_vec(),
                },
            ));
        }
    }
    Ok(tensors)
}

/// Writes the state dict of `model` to `path` atomically, with the metadata
/// `safetensors.torch.save_file` writes (`{"format": "pt"}`).
pub fn write_state_dict(model: &Model, path: &Path) -> Result<()> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_atomic(path, state_dict(model)?, metadata)
}
