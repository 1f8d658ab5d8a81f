//! Lowering of our graph to standard ONNX operators (default domain, opset 13 or newer).
//!
//! One graph node becomes one ONNX node, except a channel shuffle (Reshape, Transpose,
//! Reshape, torchvision's view/transpose/flatten) and dropout (removed: the export is for
//! inference). Tensor names: the network input is `input`, the output `logits`, every other
//! value the name of the node producing it; parameters keep their torchvision names
//! (`features.0.0.weight`), so the initializers line up with a PyTorch state dict.
//!
//! The float export ([`float_graph`]) keeps batch norm as `BatchNormalization`; the int8
//! export (`qdq.rs`) reuses [`Lowering::emit`] for every op and only adds the
//! QuantizeLinear/DequantizeLinear pairs around it.

use super::proto::{Attr, Dim, GraphBuilder};
use super::{Batch, OnnxOptions};
use crate::graph::{Activation, Dims, Graph, NodeId, Op, shape::pooled_len};
use crate::model::Model;
use anyhow::{Result, bail};

/// The name of the graph input and output tensors.
pub const INPUT_NAME: &str = "input";
pub const OUTPUT_NAME: &str = "logits";

/// The oldest and newest default-domain opsets the export writes.
pub const MIN_OPSET: i64 = 13;
pub const MAX_OPSET: i64 = 21;

/// The parameter tensors a conv, linear or batch-norm node reads, by ONNX input name.
pub enum Params {
    None,
    /// Conv or Gemm: weight and optional bias.
    Weight {
        weight: String,
        bias: Option<String>,
    },
    /// BatchNormalization: scale, bias, mean, variance.
    Norm([String; 4]),
}

/// The state shared by the float and the int8 lowering of one graph.
pub struct Lowering<'a> {
    pub b: GraphBuilder,
    pub graph: &'a Graph,
    /// Per node, its output shape for one image at the export's input size.
    pub dims: Vec<Dims>,
    pub opts: &'a OnnxOptions,
}

impl<'a> Lowering<'a> {
    pub fn new(graph: &'a Graph, opts: &'a OnnxOptions) -> Result<Lowering<'a>> {
        if !(MIN_OPSET..=MAX_OPSET).contains(&opts.opset) {
            bail!(
                "--opset {}: the export writes opsets {MIN_OPSET} to {MAX_OPSET}",
                opts.opset
            );
        }
        for node in &graph.nodes {
            let needed = min_opset(&node.op);
            if needed > opts.opset {
                bail!(
                    "node `{}` ({}) needs opset {needed} or newer, asked for {}; use --opset {needed}",
                    node.name,
                    node.op.kind(),
                    opts.opset
                );
            }
        }
        let [h, w] = opts.input_size;
        let dims = graph.infer_shapes(h, w)?;
        let mut b = GraphBuilder::default();
        let c = graph.input_channels();
        b.input_f32(INPUT_NAME, &with_batch(opts, &[c, h, w]));
        let out = dims[graph.output];
        b.output_f32(OUTPUT_NAME, &with_batch(opts, &out.with_batch(1)[1..]));
        Ok(Lowering {
            b,
            graph,
            dims,
            opts,
        })
    }

    /// The name of the value node `id` produces, as its readers see it.
    pub fn value_name(&self, id: NodeId) -> String {
        if id == 0 {
            INPUT_NAME.to_string()
        } else if id == self.graph.output {
            OUTPUT_NAME.to_string()
        } else {
            self.graph.nodes[id].name.clone()
        }
    }

    /// Emits node `id` reading `ins` and writing `out`. Dropout becomes an Identity (kept so
    /// that every graph node has a value of its own name; optimisers remove it).
    pub fn emit(&mut self, id: NodeId, ins: &[String], out: &str, params: Params) -> Result<()> {
        let graph = self.graph;
        let node = &graph.nodes[id];
        let name = node.name.clone();
        let ins: Vec<&str> = ins.iter().map(String::as_str).collect();
        let b = &mut self.b;
        match (&node.op, params) {
            (
                Op::Conv2d {
                    kernel,
                    stride,
                    padding,
                    dilation,
                    groups,
                    ..
                },
                Params::Weight { weight, bias },
            ) => {
                let mut inputs = vec![ins[0], weight.as_str()];
                if let Some(bias) = &bias {
                    inputs.push(bias);
                }
                let k = *kernel as i64;
                let (s, p, d) = (*stride as i64, *padding as i64, *dilation as i64);
                b.node(
                    "Conv",
                    &name,
                    &inputs,
                    out,
                    vec![
                        ("kernel_shape", Attr::Ints(vec![k, k])),
                        ("strides", Attr::Ints(vec![s, s])),
                        ("pads", Attr::Ints(vec![p, p, p, p])),
                        ("dilations", Attr::Ints(vec![d, d])),
                        ("group", Attr::Int(*groups as i64)),
                    ],
                );
            }
            (Op::Linear { .. }, Params::Weight { weight, bias }) => {
                let mut inputs = vec![ins[0], weight.as_str()];
                if let Some(bias) = &bias {
                    inputs.push(bias);
                }
                b.node("Gemm", &name, &inputs, out, vec![("transB", Attr::Int(1))]);
            }
            (Op::BatchNorm { eps, .. }, Params::Norm([scale, bias, mean, var])) => {
                b.node(
                    "BatchNormalization",
                    &name,
                    &[ins[0], &scale, &bias, &mean, &var],
                    out,
                    vec![("epsilon", Attr::Float(*eps as f32))],
                );
            }
            (Op::Act { act }, _) => {
                self.activation(*act, &name, ins[0], out);
            }
            (Op::Add, _) => {
                b.node("Add", &name, &ins, out, vec![]);
            }
            (Op::ChannelMul, _) => {
                b.node("Mul", &name, &ins, out, vec![]);
            }
            (Op::Concat, _) => {
                b.node("Concat", &name, &ins, out, vec![("axis", Attr::Int(1))]);
            }
            (Op::Slice { start, end }, _) => {
                let starts = b.init_i64(&format!("{name}.starts"), &[1], &[*start as i64]);
                let ends = b.init_i64(&format!("{name}.ends"), &[1], &[*end as i64]);
                let axes = b.init_i64(&format!("{name}.axes"), &[1], &[1]);
                b.node(
                    "Slice",
                    &name,
                    &[ins[0], &starts, &ends, &axes],
                    out,
                    vec![],
                );
            }
            (Op::ChannelShuffle { groups }, _) => {
                let d = self.dims[id];
                let (g, c, h, w) = (*groups as i64, d.c as i64, d.h as i64, d.w as i64);
                // Batch 0 copies the input's batch size, so a dynamic batch stays dynamic.
                let grouped =
                    b.init_i64(&format!("{name}.grouped_shape"), &[5], &[0, g, c / g, h, w]);
                let flat = b.init_i64(&format!("{name}.flat_shape"), &[4], &[0, c, h, w]);
                let v = b.node(
                    "Reshape",
                    &format!("{name}.reshape_grouped"),
                    &[ins[0], &grouped],
                    &format!("{name}.grouped"),
                    vec![],
                );
                let t = b.node(
                    "Transpose",
                    &format!("{name}.transpose"),
                    &[&v],
                    &format!("{name}.transposed"),
                    vec![("perm", Attr::Ints(vec![0, 2, 1, 3, 4]))],
                );
                b.node("Reshape", &name, &[&t, &flat], out, vec![]);
            }
            (
                Op::MaxPool {
                    kernel,
                    stride,
                    padding,
                    ceil_mode,
                },
                _,
            ) => {
                let input = self.dims[node.inputs[0]];
                let attrs = max_pool_attrs(*kernel, *stride, *padding, *ceil_mode, input);
                self.b.node("MaxPool", &name, &ins, out, attrs);
            }
            (
                Op::AvgPool {
                    kernel,
                    stride,
                    padding,
                },
                _,
            ) => {
                let (k, s, p) = (*kernel as i64, *stride as i64, *padding as i64);
                b.node(
                    "AveragePool",
                    &name,
                    &ins,
                    out,
                    vec![
                        ("kernel_shape", Attr::Ints(vec![k, k])),
                        ("strides", Attr::Ints(vec![s, s])),
                        ("pads", Attr::Ints(vec![p, p, p, p])),
                        ("count_include_pad", Attr::Int(1)),
                    ],
                );
            }
            (Op::GlobalAvgPool, _) => {
                b.node("GlobalAveragePool", &name, &ins, out, vec![]);
            }
            (Op::Flatten, _) => {
                b.node("Flatten", &name, &ins, out, vec![("axis", Attr::Int(1))]);
            }
            (Op::Dropout { .. }, _) => {
                b.node("Identity", &name, &ins, out, vec![]);
            }
            (op, _) => bail!(
                "node `{name}` ({}): no ONNX lowering for it with these parameters",
                op.kind()
            ),
        }
        Ok(())
    }

    /// An elementwise activation. PyTorch's hardsigmoid is relu6(x + 3) / 6, ONNX's
    /// HardSigmoid with alpha 1/6 and beta 1/2.
    pub fn activation(&mut self, act: Activation, name: &str, input: &str, out: &str) {
        let b = &mut self.b;
        match act {
            Activation::Relu => b.node("Relu", name, &[input], out, vec![]),
            Activation::Relu6 => {
                let (lo, hi) = ("const.relu6_min", "const.relu6_max");
                if !b.has_initializer(lo) {
                    b.init_f32(lo, &[], &[0.0]);
                    b.init_f32(hi, &[], &[6.0]);
                }
                b.node("Clip", name, &[input, lo, hi], out, vec![])
            }
            Activation::Hardswish => b.node("HardSwish", name, &[input], out, vec![]),
            Activation::Hardsigmoid => b.node(
                "HardSigmoid",
                name,
                &[input],
                out,
                vec![
                    ("alpha", Attr::Float(1.0 / 6.0)),
                    ("beta", Attr::Float(0.5)),
                ],
            ),
            Activation::Sigmoid => b.node("Sigmoid", name, &[input], out, vec![]),
        };
    }
}

/// The batch dimension followed by `rest`.
fn with_batch(opts: &OnnxOptions, rest: &[usize]) -> Vec<Dim> {
    let batch = match opts.batch {
        Batch::Fixed(n) => Dim::Fixed(n),
        Batch::Dynamic => Dim::Named("batch".to_string()),
    };
    std::iter::once(batch)
        .chain(rest.iter().map(|&d| Dim::Fixed(d)))
        .collect()
}

/// The oldest opset that has an operator for `op`.
fn min_opset(op: &Op) -> i64 {
    match op {
        Op::Act {
            act: Activation::Hardswish,
        } => 14,
        _ => MIN_OPSET,
    }
}

/// MaxPool attributes with PyTorch's output size. ONNX's ceil mode lacks PyTorch's rule that
/// the last window starts inside the input or the left padding; where that rule drops a
/// window (at this input size), the export pads the end explicitly instead of using ceil
/// mode. Max pooling never selects padding, so extra end padding changes nothing else.
fn max_pool_attrs(
    kernel: usize,
    stride: usize,
    padding: usize,
    ceil_mode: bool,
    input: Dims,
) -> Vec<(&'static str, Attr)> {
    let (k, s, p) = (kernel as i64, stride as i64, padding as i64);
    let onnx_ceil = |len: usize| (len + 2 * padding - kernel).div_ceil(stride) + 1;
    let torch = |len: usize| pooled_len(len, kernel, stride, padding, 1, ceil_mode).unwrap_or(1);
    let mut attrs = vec![
        ("kernel_shape", Attr::Ints(vec![k, k])),
        ("strides", Attr::Ints(vec![s, s])),
    ];
    if !ceil_mode {
        attrs.push(("pads", Attr::Ints(vec![p, p, p, p])));
    } else if onnx_ceil(input.h) == torch(input.h) && onnx_ceil(input.w) == torch(input.w) {
        attrs.push(("pads", Attr::Ints(vec![p, p, p, p])));
        attrs.push(("ceil_mode", Attr::Int(1)));
    } else {
        // Floor mode with end padding chosen so that floor((len + p + end - k) / s) + 1 is
        // PyTorch's size.
        let end = |len: usize| ((torch(len) - 1) * stride + kernel) as i64 - len as i64 - p;
        attrs.push((
            "pads",
            Attr::Ints(vec![p, p, end(input.h).max(p), end(input.w).max(p)]),
        ));
    }
    attrs
}

/// The float graph of `model`: every parameter a float initializer of its state-dict name.
pub fn float_graph(model: &Model, opts: &OnnxOptions) -> Result<tract_onnx::pb::GraphProto> {
    let graph = &model.graph;
    let mut low = Lowering::new(graph, opts)?;
    for (id, node) in graph.nodes.iter().enumerate().skip(1) {
        let ins: Vec<String> = node.inputs.iter().map(|&i| low.value_name(i)).collect();
        let mut param = |suffix: &str| -> Result<String> {
            let key = format!("{}.{suffix}", node.name);
            let t = model.weights.get(&key)?;
            let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
            Ok(low.b.init_f32(&key, t.dims(), &values))
        };
        let params = match &node.op {
            Op::Conv2d { bias, .. } | Op::Linear { bias, .. } => Params::Weight {
                weight: param("weight")?,
                bias: if *bias { Some(param("bias")?) } else { None },
            },
            Op::BatchNorm { .. } => Params::Norm([
                param("weight")?,
                param("bias")?,
                param("running_mean")?,
                param("running_var")?,
            ]),
            _ => Params::None,
        };
        let out = low.value_name(id);
        low.emit(id, &ins, &out, params)?;
    }
    Ok(low.b.finish("slimcandle"))
}
