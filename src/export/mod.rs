//! Deployment formats: ONNX (float, and QDQ for int8 models) and a plain PyTorch state dict.
//!
//! `proto.rs` wraps the ONNX protobuf types, `onnx.rs` lowers our graph to ONNX operators,
//! `qdq.rs` adds the QuantizeLinear/DequantizeLinear form of an int8 model, `torch.rs` writes
//! the state dict. See `docs/deploy.md`.

pub mod onnx;
pub mod proto;
pub mod qdq;
pub mod torch;

use crate::checkpoint::AnyModel;
use crate::model::ModelMeta;
use crate::tensor_file::write_bytes_atomic;
use anyhow::Result;
use std::path::Path;

/// The batch dimension of the exported graph's input and output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    Fixed(usize),
    /// A symbolic `batch` dimension.
    Dynamic,
}

/// What an ONNX export is made for.
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxOptions {
    /// Default-domain opset, [`onnx::MIN_OPSET`] to [`onnx::MAX_OPSET`].
    pub opset: i64,
    pub batch: Batch,
    /// Height and width of the input; the reshapes of a channel shuffle and max pooling's
    /// padding are exact for this size.
    pub input_size: [usize; 2],
}

impl OnnxOptions {
    /// Opset 17, a dynamic batch and the checkpoint's own input size.
    pub fn for_model(meta: &ModelMeta) -> OnnxOptions {
        OnnxOptions {
            opset: 17,
            batch: Batch::Dynamic,
            input_size: meta.preprocessing.input_size,
        }
    }
}

/// The serialised ONNX model of a checkpoint: float (fp32, pruned and sparse alike, dense
/// initializers) or QDQ (int8), with class names and preprocessing in `metadata_props`.
pub fn onnx_bytes(model: &AnyModel, opts: &OnnxOptions) -> Result<Vec<u8>> {
    let graph = match model {
        AnyModel::Float(m) => onnx::float_graph(m, opts)?,
        AnyModel::Int8(q) => qdq::qdq_graph(q, opts)?,
    };
    Ok(proto::encode_model(
        graph,
        opts.opset,
        metadata(model.meta()),
    ))
}

/// Writes the ONNX export of `model` to `path` atomically.
pub fn write_onnx(model: &AnyModel, opts: &OnnxOptions, path: &Path) -> Result<()> {
    let bytes = onnx_bytes(model, opts)?;
    write_bytes_atomic(path, &bytes)
}

/// `metadata_props`: the checkpoint's class names, preprocessing and architecture as JSON
/// text, under the keys of the checkpoint format.
fn metadata(meta: &ModelMeta) -> Vec<(String, String)> {
    let json = |v: serde_json::Value| v.to_string();
    let mut out = vec![
        (
            "class_names".to_string(),
            json(serde_json::json!(meta.class_names)),
        ),
        (
            "preprocessing".to_string(),
            json(serde_json::json!(meta.preprocessing)),
        ),
    ];
    if let Some(arch) = &meta.arch {
        out.push(("arch".to_string(), json(serde_json::json!(arch))));
    }
    out
}
