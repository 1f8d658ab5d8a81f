//! Checkpoint format 3: a [`QuantizedModel`] as safetensors (`docs/checkpoint-format.md`).
//!
//! Int8 layer `N`: `N.weight` I8 (the float weight's shape), `N.weight_scale` F32 (one per
//! output channel, or one), `N.bias` I32 `[out]`. A layer kept in float: `N.weight` and
//! `N.bias` F32. Activations: `quant.activation_scale` F32 and `quant.activation_zero_point`
//! U8, one entry per graph node in node order (scale 0 marks the float network output). The
//! metadata adds `quantization` (the scheme options) to the float format's entries. A mostly
//! zero int8 weight (a pruned model) is stored as `N.weight.__sparse_mask` (U8 bitmask, as
//! for float tensors) and `N.weight.__sparse_values` (its non-zero I8 codes).

use super::model::{FloatLayer, QuantizedLayer, QuantizedModel, SchemeInfo, fused_activations};
use super::scheme::{QParams, QuantizedWeight, WEIGHT_QMAX};
use crate::checkpoint::{self, INT8_FORMAT_VERSION};
use crate::graph::{Graph, Op};
use crate::model::ModelMeta;
use crate::sparse;
use crate::tensor_file::{RawTensor, TensorFile, write_atomic};
use anyhow::{Context, Result, bail};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

/// The activation tensors' names.
pub const ACTIVATION_SCALE: &str = "quant.activation_scale";
pub const ACTIVATION_ZERO_POINT: &str = "quant.activation_zero_point";
/// The metadata key of the scheme options.
pub const METADATA_KEY: &str = "quantization";

/// Suffixes of a sparse int8 weight's tensors (as for sparse float tensors, plus the gaps).
const SPARSE_MASK: &str = sparse::MASK_SUFFIX;
const SPARSE_VALUES: &str = sparse::VALUES_SUFFIX;
const SPARSE_GAPS: &str = sparse::GAPS_SUFFIX;

/// How one int8 weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightStorage {
    /// `N.weight`, every code.
    Dense,
    /// `N.weight.__sparse_mask` and the non-zero codes (format 3).
    Bitmask,
    /// `N.weight.__sparse_gaps` and the codes with their fillers (format 4).
    Gaps,
}

impl WeightStorage {
    /// Bytes of tensor data `codes` take stored this way.
    pub fn bytes(self, codes: &[i8]) -> usize {
        match self {
            WeightStorage::Dense => codes.len(),
            WeightStorage::Bitmask => {
                sparse::mask_len(codes.len()) + codes.iter().filter(|&&c| c != 0).count()
            }
            WeightStorage::Gaps => sparse::gap_coded_len(codes),
        }
    }
}

/// The smallest storage of `codes`: a sparse form only when it is at least
/// [`sparse::MIN_SAVING`] bytes smaller than the dense codes (it adds two header entries),
/// gaps only where `allow_gaps` and smaller than the bitmask.
pub fn weight_storage(codes: &[i8], allow_gaps: bool) -> WeightStorage {
    let mut best = WeightStorage::Bitmask;
    if allow_gaps && WeightStorage::Gaps.bytes(codes) < best.bytes(codes) {
        best = WeightStorage::Gaps;
    }
    if best.bytes(codes) + sparse::MIN_SAVING <= codes.len() {
        best
    } else {
        WeightStorage::Dense
    }
}

/// The storage of each int8 weight of `model` and the format version that implies: gap coding
/// (format 4, which older readers refuse) only when it shrinks the file's tensor data by
/// [`sparse::file_worth_it`] over the bitmask; otherwise the file is format 3 as before gap
/// coding existed. `other_bytes` is the data of the tensors that are not int8 weights.
pub fn storage_plan(
    model: &QuantizedModel,
    other_bytes: usize,
) -> (BTreeMap<String, WeightStorage>, u32) {
    let (mut v3_bytes, mut saving) = (other_bytes, 0usize);
    let mut with_gaps = BTreeMap::new();
    let mut without = BTreeMap::new();
    for (name, l) in &model.layers {
        let codes = &l.weight.values;
        let (old, new) = (weight_storage(codes, false), weight_storage(codes, true));
        v3_bytes += old.bytes(codes);
        saving += old.bytes(codes) - new.bytes(codes);
        without.insert(name.clone(), old);
        with_gaps.insert(name.clone(), new);
    }
    if sparse::file_worth_it(v3_bytes, saving) {
        (with_gaps, checkpoint::INT8_GAPS_FORMAT_VERSION)
    } else {
        (without, INT8_FORMAT_VERSION)
    }
}

fn raw(dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) -> RawTensor {
    RawTensor { dtype, shape, data }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i8_bytes(v: &[i8]) -> Vec<u8> {
    v.iter().map(|&c| c as u8).collect()
}

/// The tensors of int8 weight `N.weight` stored as `storage`.
fn weight_tensors(
    wname: &str,
    w: &QuantizedWeight,
    storage: WeightStorage,
) -> Vec<(String, RawTensor)> {
    match storage {
        WeightStorage::Dense => vec![(
            wname.to_string(),
            raw(Dtype::I8, w.shape.clone(), i8_bytes(&w.values)),
        )],
        WeightStorage::Bitmask => {
            let as_f32: Vec<f32> = w.values.iter().map(|&v| v as f32).collect();
            let (mask, stored) = sparse::encode(&as_f32);
            let stored: Vec<i8> = stored.iter().map(|&v| v as i8).collect();
            vec![
                (
                    format!("{wname}{SPARSE_MASK}"),
                    raw(Dtype::U8, vec![mask.len()], mask),
                ),
                (
                    format!("{wname}{SPARSE_VALUES}"),
                    raw(Dtype::I8, vec![stored.len()], i8_bytes(&stored)),
                ),
            ]
        }
        WeightStorage::Gaps => {
            let coded = sparse::encode_gaps(&w.values);
            vec![
                (
                    format!("{wname}{SPARSE_GAPS}"),
                    raw(Dtype::U8, vec![coded.gaps.len()], coded.gaps),
                ),
                (
                    format!("{wname}{SPARSE_VALUES}"),
                    raw(Dtype::I8, vec![coded.values.len()], i8_bytes(&coded.values)),
                ),
            ]
        }
    }
}

/// Writes `model` to `path` atomically: format 4 when some weight is gap-coded
/// ([`storage_plan`]), format 3 otherwise.
pub fn save(model: &QuantizedModel, path: &Path) -> Result<()> {
    let mut tensors = Vec::new();
    for (name, l) in &model.layers {
        let w = &l.weight;
        tensors.push((
            format!("{name}.weight_scale"),
            raw(Dtype::F32, vec![w.scales.len()], f32_bytes(&w.scales)),
        ));
        tensors.push((
            format!("{name}.bias"),
            raw(
                Dtype::I32,
                vec![l.bias.len()],
                l.bias.iter().flat_map(|b| b.to_le_bytes()).collect(),
            ),
        ));
    }
    for (name, l) in &model.float_layers {
        tensors.push((
            format!("{name}.weight"),
            raw(Dtype::F32, l.shape.clone(), f32_bytes(&l.weight)),
        ));
        tensors.push((
            format!("{name}.bias"),
            raw(Dtype::F32, vec![l.bias.len()], f32_bytes(&l.bias)),
        ));
    }
    let n = model.activations.len();
    let scales: Vec<f32> = model
        .activations
        .iter()
        .map(|q| q.map_or(0.0, |q| q.scale))
        .collect();
    let zps: Vec<u8> = model
        .activations
        .iter()
        .map(|q| q.map_or(0, |q| q.zero_point))
        .collect();
    tensors.push((
        ACTIVATION_SCALE.to_string(),
        raw(Dtype::F32, vec![n], f32_bytes(&scales)),
    ));
    tensors.push((
        ACTIVATION_ZERO_POINT.to_string(),
        raw(Dtype::U8, vec![n], zps),
    ));
    let other_bytes = tensors.iter().map(|(_, t)| t.data.len()).sum();
    let (plan, version) = storage_plan(model, other_bytes);
    for (name, l) in &model.layers {
        tensors.extend(weight_tensors(
            &format!("{name}.weight"),
            &l.weight,
            plan[name],
        ));
    }
    let mut metadata: HashMap<String, String> =
        checkpoint::metadata_entries(&model.graph, &model.meta, version);
    metadata.insert(
        METADATA_KEY.to_string(),
        serde_json::to_string(&model.scheme).expect("scheme serialises"),
    );
    write_atomic(path, tensors, metadata)
}

/// Reads a format 3 or 4 file (whose header [`checkpoint::check_format`] accepted as
/// `version`).
pub fn from_file(
    file: &TensorFile,
    version: u32,
    graph: Graph,
    meta: ModelMeta,
) -> Result<QuantizedModel> {
    let shown = file.path.display().to_string();
    let scheme: SchemeInfo =
        serde_json::from_str(file.metadata.get(METADATA_KEY).with_context(|| {
            format!("`{shown}`: the int8 checkpoint has no `{METADATA_KEY}` entry")
        })?)
        .map_err(|e| {
            anyhow::anyhow!("`{shown}`: metadata entry `{METADATA_KEY}` is not valid: {e}")
        })?;
    let mut seen: HashSet<String> = HashSet::new();
    let mut take = |name: &str, dtype: Dtype, shape: Option<&[usize]>| -> Result<Vec<u8>> {
        let view = file.raw(name).map_err(|_| {
            anyhow::anyhow!("`{shown}`: the int8 checkpoint has no tensor `{name}`")
        })?;
        if view.dtype() != dtype {
            bail!(
                "`{shown}`: tensor `{name}` is {:?}, expected {dtype:?}",
                view.dtype()
            );
        }
        if let Some(shape) = shape
            && view.shape() != shape
        {
            bail!(
                "`{shown}`: tensor `{name}` has shape {:?}, expected {shape:?}",
                view.shape()
            );
        }
        seen.insert(name.to_string());
        Ok(view.data().to_vec())
    };
    let f32s = |b: Vec<u8>| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    let n = graph.nodes.len();
    let scales = f32s(take(ACTIVATION_SCALE, Dtype::F32, Some(&[n]))?);
    let zps = take(ACTIVATION_ZERO_POINT, Dtype::U8, Some(&[n]))?;

    let mut layers = BTreeMap::new();
    let mut float_layers = BTreeMap::new();
    let specs = graph.param_specs();
    for node in graph.nodes.iter().filter(|n| n.op.has_weight_matrix()) {
        let name = &node.name;
        let shape = specs
            .iter()
            .find(|s| s.name == format!("{name}.weight"))
            .expect("a weight layer has a weight")
            .shape
            .clone();
        let out = shape[0];
        let wname = format!("{name}.weight");
        let is_float = file
            .raw(&wname)
            .map(|v| v.dtype() == Dtype::F32)
            .unwrap_or(false);
        if is_float {
            let weight = f32s(take(&wname, Dtype::F32, Some(&shape))?);
            let bias = f32s(take(&format!("{name}.bias"), Dtype::F32, Some(&[out]))?);
            float_layers.insert(
                name.clone(),
                FloatLayer {
                    weight,
                    shape,
                    bias,
                },
            );
            continue;
        }
        let mask_name = format!("{wname}{SPARSE_MASK}");
        let gaps_name = format!("{wname}{SPARSE_GAPS}");
        let vname = format!("{wname}{SPARSE_VALUES}");
        let (has_mask, has_gaps) = (file.raw(&mask_name).is_ok(), file.raw(&gaps_name).is_ok());
        let count: usize = shape.iter().product();
        // The stored codes of a sparse weight: one dimension, any length (checked by decoding).
        if (has_mask || has_gaps)
            && let Ok(view) = file.raw(&vname)
            && view.shape().len() != 1
        {
            bail!(
                "`{shown}`: tensor `{vname}` has shape {:?}, expected one dimension",
                view.shape()
            );
        }
        let values: Vec<i8> = match (has_mask, has_gaps) {
            (true, true) => {
                bail!("`{shown}`: sparse tensor `{wname}` has both `{mask_name}` and `{gaps_name}`")
            }
            (false, true) if version < checkpoint::INT8_GAPS_FORMAT_VERSION => bail!(
                "`{shown}`: tensor `{gaps_name}` is gap-coded, which is format {}, but the file says format {version}",
                checkpoint::INT8_GAPS_FORMAT_VERSION
            ),
            (false, true) => {
                let stored: Vec<i8> = take(&vname, Dtype::I8, None)?
                    .into_iter()
                    .map(|b| b as i8)
                    .collect();
                let gaps = take(
                    &gaps_name,
                    Dtype::U8,
                    Some(&[sparse::gaps_len(stored.len())]),
                )?;
                sparse::decode_gaps(&gaps, &stored, count)
                    .map_err(|e| anyhow::anyhow!("`{shown}`: gap-coded tensor `{wname}`: {e}"))?
            }
            (true, false) => {
                let mask = take(&mask_name, Dtype::U8, Some(&[sparse::mask_len(count)]))?;
                let stored: Vec<f32> = take(&vname, Dtype::I8, None)?
                    .into_iter()
                    .map(|b| b as i8 as f32)
                    .collect();
                sparse::decode(&mask, &stored, count)
                    .map_err(|e| anyhow::anyhow!("`{shown}`: sparse tensor `{wname}`: {e}"))?
                    .into_iter()
                    .map(|v| v as i8)
                    .collect()
            }
            (false, false) => take(&wname, Dtype::I8, Some(&shape))?
                .into_iter()
                .map(|b| b as i8)
                .collect(),
        };
        if values.iter().any(|&v| (v as i32).abs() > WEIGHT_QMAX) {
            bail!("`{shown}`: tensor `{wname}` holds -128, outside the symmetric int8 range");
        }
        let sname = format!("{name}.weight_scale");
        let wscales = f32s(take(&sname, Dtype::F32, None)?);
        if wscales.len() != out && wscales.len() != 1 {
            bail!(
                "`{shown}`: tensor `{sname}` has {} scales; layer `{name}` needs {out} (per channel) or 1 (per tensor)",
                wscales.len()
            );
        }
        if let Some(bad) = wscales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            bail!("`{shown}`: tensor `{sname}` holds scale {bad}; scales must be positive");
        }
        let bias: Vec<i32> = take(&format!("{name}.bias"), Dtype::I32, Some(&[out]))?
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        layers.insert(
            name.clone(),
            QuantizedLayer {
                weight: QuantizedWeight {
                    values,
                    shape,
                    scales: wscales,
                },
                bias,
            },
        );
    }
    let mut activations = Vec::with_capacity(n);
    for (id, (&scale, &zero_point)) in scales.iter().zip(&zps).enumerate() {
        let float_output = id == graph.output && float_layers.contains_key(&graph.nodes[id].name);
        if float_output && scale == 0.0 {
            activations.push(None);
        } else if !(scale.is_finite() && scale > 0.0) {
            bail!(
                "`{shown}`: `{ACTIVATION_SCALE}` holds scale {scale} for node `{}`; scales must be positive",
                graph.nodes[id].name
            );
        } else {
            activations.push(Some(QParams { scale, zero_point }));
        }
    }
    if let Some(extra) = file.names().into_iter().find(|k| !seen.contains(k)) {
        bail!("`{shown}`: tensor `{extra}` does not belong to the int8 model");
    }
    if let Some(bn) = graph
        .nodes
        .iter()
        .find(|n| matches!(n.op, Op::BatchNorm { .. }))
    {
        bail!(
            "`{shown}`: batch norm `{}` in an int8 graph (batch norm must be folded)",
            bn.name
        );
    }
    Ok(QuantizedModel {
        fused: fused_activations(&graph),
        graph,
        activations,
        layers,
        float_layers,
        meta,
        scheme,
    })
}
