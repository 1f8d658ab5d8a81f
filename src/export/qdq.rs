//! Lowering of an int8 model to ONNX QDQ form (`docs/quantization.md`, "Mapping to ONNX QDQ").
//!
//! Every quantized value `V` is a float tensor `V.float` followed by QuantizeLinear (its
//! checkpoint scale `V.scale`, uint8 zero point `V.zero_point`) to `V.quantized` and
//! DequantizeLinear to `V.dequantized`, which the readers consume; the network output is an
//! Identity of the last one, named `logits`. Int8 weights are int8 initializers
//! under their checkpoint names (`N.weight`) with per-axis scales on axis 0 (`N.weight_scale`)
//! and zero points 0; biases are int32 (`N.bias`) at `in_scale * w_scale[c]`, the very
//! integers of the checkpoint. onnxruntime fuses DQ -> Conv -> Q into QLinearConv (likewise
//! Gemm, Add, Concat, pools) and drops the Q/DQ pairs around max pool, slice, reshape and
//! transpose, whose two sides carry the same qparams by construction of our plan.
//!
//! A ReLU or ReLU6 fused into its producer stays as an ONNX Relu/Clip between the producer and
//! its Q (the QDQ pattern onnxruntime folds into the clamp of the integer kernel); the
//! activation node of our graph is then the same value as its producer's.

use super::OnnxOptions;
use super::onnx::{INPUT_NAME, Lowering, OUTPUT_NAME, Params};
use crate::graph::{NodeId, Op};
use crate::passes::quant::{QParams, QuantizedModel};
use anyhow::{Result, bail};

/// The QDQ graph of an int8 model.
pub fn qdq_graph(q: &QuantizedModel, opts: &OnnxOptions) -> Result<tract_onnx::pb::GraphProto> {
    let graph = &q.graph;
    let mut low = Lowering::new(graph, opts)?;
    // Per node, the name of the value its readers consume.
    let mut values: Vec<String> = Vec::with_capacity(graph.nodes.len());
    let input_q = q.input_qparams();
    // The graph input itself is the float `input`; readers consume its dequantized codes.
    let input = quantize_dequantize(&mut low, INPUT_NAME, INPUT_NAME, input_q);
    values.push(input);
    for (id, node) in graph.nodes.iter().enumerate().skip(1) {
        if q.is_fused_away(id) {
            values.push(values[node.inputs[0]].clone());
            continue;
        }
        let ins: Vec<String> = node.inputs.iter().map(|&i| values[i].clone()).collect();
        let params = match &node.op {
            Op::Conv2d { .. } | Op::Linear { .. } => layer_params(&mut low, q, id)?,
            Op::BatchNorm { .. } => bail!(
                "node `{}`: an int8 model has its batch norms folded; this one does not",
                node.name
            ),
            _ => Params::None,
        };
        let is_output = id == graph.output;
        let value = match q.activations[id] {
            Some(qp) => {
                let float = format!("{}.float", node.name);
                let produced = match q.fused[id] {
                    Some(act) => {
                        let pre = format!("{}.preactivation", node.name);
                        low.emit(id, &ins, &pre, params)?;
                        let act_name = format!("{}.activation", node.name);
                        low.activation(act, &act_name, &pre, &float);
                        float
                    }
                    None => {
                        low.emit(id, &ins, &float, params)?;
                        float
                    }
                };
                let dequantized = quantize_dequantize(&mut low, &node.name, &produced, qp);
                if is_output {
                    low.b
                        .node("Identity", "output", &[&dequantized], OUTPUT_NAME, vec![]);
                    OUTPUT_NAME.to_string()
                } else {
                    dequantized
                }
            }
            None if is_output => {
                low.emit(id, &ins, OUTPUT_NAME, params)?;
                OUTPUT_NAME.to_string()
            }
            None => bail!(
                "node `{}` has no qparams but is not the network output",
                node.name
            ),
        };
        values.push(value);
    }
    if values[graph.output] != OUTPUT_NAME {
        // The output is an alias (a fused-away node); give it the output name.
        let last = values[graph.output].clone();
        low.b
            .node("Identity", "output", &[&last], OUTPUT_NAME, vec![]);
    }
    Ok(low.b.finish("slimcandle_int8"))
}

/// QuantizeLinear then DequantizeLinear of `float` with `qp` (initializers `{name}.scale` and
/// `{name}.zero_point`); returns the dequantized value's name, `{name}.dequantized`.
fn quantize_dequantize(low: &mut Lowering, name: &str, float: &str, qp: QParams) -> String {
    let b = &mut low.b;
    let scale = b.init_f32(&format!("{name}.scale"), &[], &[qp.scale]);
    let zp = b.init_u8(&format!("{name}.zero_point"), &[], &[qp.zero_point]);
    let quantized = b.node(
        "QuantizeLinear",
        &format!("{name}.quantize"),
        &[float, &scale, &zp],
        &format!("{name}.quantized"),
        vec![],
    );
    b.node(
        "DequantizeLinear",
        &format!("{name}.dequantize"),
        &[&quantized, &scale, &zp],
        &format!("{name}.dequantized"),
        vec![],
    )
}

/// The weight and bias inputs of conv or linear node `id`: DequantizeLinear of the int8
/// weight and the int32 bias, or float initializers for a layer kept in float.
fn layer_params(low: &mut Lowering, q: &QuantizedModel, id: NodeId) -> Result<Params> {
    let name = q.graph.nodes[id].name.clone();
    let b = &mut low.b;
    if let Some(f) = q.float_layers.get(&name) {
        let weight = b.init_f32(&format!("{name}.weight"), &f.shape, &f.weight);
        let bias = b.init_f32(&format!("{name}.bias"), &[f.bias.len()], &f.bias);
        return Ok(Params::Weight {
            weight,
            bias: Some(bias),
        });
    }
    let Some(layer) = q.layers.get(&name) else {
        bail!("layer `{name}` has neither int8 nor float weights");
    };
    let Some(in_q) = q.input_of(id, 0) else {
        bail!("int8 layer `{name}` reads a float tensor");
    };
    let w = &layer.weight;
    let out = w.out_channels();
    let per_channel = w.scales.len() > 1;
    // Per-axis scales need a 1-D scale and zero point; per-tensor ones are scalars.
    let scale_dims: &[usize] = if per_channel { &[out] } else { &[] };
    let axis = if per_channel {
        vec![("axis", super::proto::Attr::Int(0))]
    } else {
        vec![]
    };
    let w_scale = b.init_f32(&format!("{name}.weight_scale"), scale_dims, &w.scales);
    let w_zp = b.init_i8(
        &format!("{name}.weight_zero_point"),
        scale_dims,
        &vec![0; w.scales.len()],
    );
    let w_codes = b.init_i8(&format!("{name}.weight"), &w.shape, &w.values);
    let weight = b.node(
        "DequantizeLinear",
        &format!("{name}.weight_dequantize"),
        &[&w_codes, &w_scale, &w_zp],
        &format!("{name}.weight_dequantized"),
        axis,
    );
    // The bias scale is per output channel whenever the weight's is (the product in f32).
    let bias_scales: Vec<f32> = (0..out).map(|c| in_q.scale * w.scale(c)).collect();
    let bias_scales = if per_channel {
        bias_scales
    } else {
        bias_scales[..1].to_vec()
    };
    let b_scale = b.init_f32(&format!("{name}.bias_scale"), scale_dims, &bias_scales);
    let b_zp = b.init_i32(
        &format!("{name}.bias_zero_point"),
        scale_dims,
        &vec![0; bias_scales.len()],
    );
    let b_codes = b.init_i32(&format!("{name}.bias"), &[out], &layer.bias);
    let bias_axis = if per_channel {
        vec![("axis", super::proto::Attr::Int(0))]
    } else {
        vec![]
    };
    let bias = b.node(
        "DequantizeLinear",
        &format!("{name}.bias_dequantize"),
        &[&b_codes, &b_scale, &b_zp],
        &format!("{name}.bias_dequantized"),
        bias_axis,
    );
    Ok(Params::Weight {
        weight,
        bias: Some(bias),
    })
}
