//! The int8 engine's plan: one step per graph node that computes something, with its weights
//! packed and its multipliers, biases and tables precomputed once from the `QuantizedModel`.
//!
//! Fused activations (a ReLU / ReLU6 read only by its conv, linear or add), flatten and
//! dropout are aliases of their input: the producer already wrote the activation's codes.

use crate::graph::{NodeId, Op};
use crate::kernels::int8::conv::{DepthwiseWeights, gemm_weights};
use crate::kernels::int8::elementwise::AddParams;
use crate::kernels::int8::gemm::PackedWeights;
use crate::kernels::int8::{Level, Requant};
use crate::passes::quant::{QParams, QuantizedModel, scheme};
use anyhow::{Context, Result, bail};

/// A conv or linear layer's output stage: per-channel multipliers and biases, and the clamp.
#[derive(Debug, Clone)]
pub(crate) struct OutStage {
    pub mult: Vec<f32>,
    /// `bias_q`, minus `in_zp * colsum` for the GEMM layers.
    pub bias: Vec<i32>,
    pub zp: u8,
    pub qmin: u8,
    pub qmax: u8,
}

impl OutStage {
    /// The kernels' view of this output stage.
    pub fn requant(&self) -> Requant<'_> {
        Requant {
            mult: &self.mult,
            bias: &self.bias,
            zp: self.zp as i32,
            qmin: self.qmin as i32,
            qmax: self.qmax as i32,
        }
    }
}

/// The geometry of a conv node.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvParams {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub groups: usize,
}

#[derive(Debug, Clone)]
pub(crate) enum Kernel {
    /// The weights hold the input zero point and the requantization (packed together).
    Depthwise {
        conv: ConvParams,
        weights: DepthwiseWeights,
    },
    /// Dense, grouped or 1x1 conv: one packed GEMM per group.
    ConvGemm {
        conv: ConvParams,
        groups: Vec<PackedWeights>,
        in_zp: u8,
        out: OutStage,
    },
    Linear {
        weights: PackedWeights,
        out: OutStage,
    },
    /// A conv or linear layer kept in float: dequantize, float op, quantize (or stay float at
    /// the network output, `out: None`).
    Float {
        conv: Option<ConvParams>,
        weight: Vec<f32>,
        shape: Vec<usize>,
        bias: Vec<f32>,
        input: QParams,
        out: Option<(QParams, u8, u8)>,
    },
    /// A 256-entry table (activations; copies whose qparams differ).
    Table(Box<[u8; 256]>),
    Add(AddParams),
    ChannelMul {
        x_zp: u8,
        s_zp: u8,
        mult: f32,
        y_zp: u8,
    },
    /// Concatenation; per input, the table that brings it to the output's qparams if needed.
    Concat(Vec<Option<Box<[u8; 256]>>>),
    Slice {
        start: usize,
        end: usize,
        requant: Option<Box<[u8; 256]>>,
    },
    Shuffle {
        groups: usize,
        requant: Option<Box<[u8; 256]>>,
    },
    MaxPool {
        k: usize,
        stride: usize,
        pad: usize,
        requant: Option<Box<[u8; 256]>>,
    },
    AvgPool {
        k: usize,
        stride: usize,
        pad: usize,
        in_zp: u8,
        mult: f32,
        y_zp: u8,
    },
    /// The multiplier depends on the plane size, known per forward pass.
    GlobalAvgPool {
        in_zp: u8,
        in_scale: f32,
        out_scale: f32,
        y_zp: u8,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub node: NodeId,
    /// The values it reads.
    pub inputs: Vec<NodeId>,
    pub kernel: Kernel,
}

pub(crate) struct Plan {
    pub steps: Vec<Step>,
    /// The value (node) the network returns.
    pub output: NodeId,
    pub input: QParams,
    /// The output's qparams; `None` when a float layer produces float logits.
    pub output_q: Option<QParams>,
}

/// The table that maps codes of `from` to codes of `to`, or `None` when they are the same:
/// `clamp(round_half_even(from.scale / to.scale * (q - from.zp)) + to.zp, 0, 255)`, as the
/// simulation's `requantize_codes`.
fn requant_table(from: QParams, to: QParams) -> Option<Box<[u8; 256]>> {
    (from != to).then(|| {
        let m = from.scale / to.scale;
        let mut t = Box::new([0u8; 256]);
        for (q, v) in t.iter_mut().enumerate() {
            let r = (m * (q as i32 - from.zero_point as i32) as f32).round_ties_even();
            *v = (r + to.zero_point as f32).clamp(0.0, 255.0) as u8;
        }
        t
    })
}

pub(crate) fn build(qm: &QuantizedModel, level: Level) -> Result<Plan> {
    let graph = &qm.graph;
    let mut value_of: Vec<NodeId> = (0..graph.nodes.len()).collect();
    let mut steps = Vec::new();
    let q = |id: NodeId| -> Result<QParams> {
        qm.activations[id].with_context(|| {
            format!(
                "node `{}` has no qparams (a float value inside the network)",
                graph.nodes[id].name
            )
        })
    };
    for (id, node) in graph.nodes.iter().enumerate() {
        let inputs: Vec<NodeId> = node.inputs.iter().map(|&i| value_of[i]).collect();
        let what = || format!("int8 plan, node `{}` ({})", node.name, node.op.kind());
        let kernel = match &node.op {
            Op::Input { .. } => continue,
            Op::Flatten | Op::Dropout { .. } => {
                value_of[id] = inputs[0];
                continue;
            }
            Op::Act { .. } if qm.is_fused_away(id) => {
                value_of[id] = inputs[0];
                continue;
            }
            Op::Act { .. } => Kernel::Table(Box::new(qm.lookup_table(id).with_context(what)?)),
            Op::Conv2d {
                kernel,
                stride,
                padding,
                dilation,
                groups,
                in_channels,
                out_channels,
                ..
            } => {
                if *dilation != 1 {
                    bail!("{}: dilation {dilation} is not supported", what());
                }
                let conv = ConvParams {
                    k: *kernel,
                    stride: *stride,
                    pad: *padding,
                    groups: *groups,
                };
                match qm.layer(id) {
                    None => float_layer(qm, id, Some(conv)).with_context(what)?,
                    Some(layer) => {
                        let in_zp = q(node.inputs[0])?.zero_point;
                        let values = &layer.weight.values;
                        let out = out_stage(qm, id, &layer.bias).with_context(what)?;
                        if node.op.is_depthwise() {
                            Kernel::Depthwise {
                                conv,
                                weights: DepthwiseWeights::new(
                                    values,
                                    *out_channels,
                                    *kernel,
                                    level,
                                    in_zp,
                                    &out.requant(),
                                ),
                            }
                        } else {
                            let (og, cg) = (out_channels / groups, in_channels / groups);
                            let per = og * cg * kernel * kernel;
                            let packed: Vec<PackedWeights> = (0..*groups)
                                .map(|g| {
                                    let w = gemm_weights(
                                        &values[g * per..(g + 1) * per],
                                        og,
                                        cg,
                                        *kernel,
                                    );
                                    PackedWeights::new(&w, og, cg * kernel * kernel, level)
                                })
                                .collect();
                            let sums: Vec<i32> = packed
                                .iter()
                                .flat_map(|p| p.column_sums().to_vec())
                                .collect();
                            let out = with_zero_point(out, &sums, in_zp);
                            Kernel::ConvGemm {
                                conv,
                                groups: packed,
                                in_zp,
                                out,
                            }
                        }
                    }
                }
            }
            Op::Linear {
                in_features,
                out_features,
                ..
            } => match qm.layer(id) {
                None => float_layer(qm, id, None).with_context(what)?,
                Some(layer) => {
                    let in_zp = q(node.inputs[0])?.zero_point;
                    let weights = PackedWeights::new(
                        &layer.weight.values,
                        *out_features,
                        *in_features,
                        level,
                    );
                    let out = out_stage(qm, id, &layer.bias).with_context(what)?;
                    let out = with_zero_point(out, weights.column_sums(), in_zp);
                    Kernel::Linear { weights, out }
                }
            },
            Op::Add => {
                let (a, b, y) = (q(node.inputs[0])?, q(node.inputs[1])?, q(id)?);
                let (qmin, qmax) = qm.clamp_range(id).expect("quantized");
                Kernel::Add(scheme::add_params(a, b, y, qmin, qmax))
            }
            Op::ChannelMul => {
                let (x, s, y) = (q(node.inputs[0])?, q(node.inputs[1])?, q(id)?);
                Kernel::ChannelMul {
                    x_zp: x.zero_point,
                    s_zp: s.zero_point,
                    mult: x.scale * s.scale / y.scale,
                    y_zp: y.zero_point,
                }
            }
            Op::Concat => {
                let y = q(id)?;
                let tables = node
                    .inputs
                    .iter()
                    .map(|&i| Ok(requant_table(q(i)?, y)))
                    .collect::<Result<_>>()?;
                Kernel::Concat(tables)
            }
            Op::Slice { start, end } => Kernel::Slice {
                start: *start,
                end: *end,
                requant: requant_table(q(node.inputs[0])?, q(id)?),
            },
            Op::ChannelShuffle { groups } => Kernel::Shuffle {
                groups: *groups,
                requant: requant_table(q(node.inputs[0])?, q(id)?),
            },
            Op::MaxPool {
                kernel,
                stride,
                padding,
                ..
            } => Kernel::MaxPool {
                k: *kernel,
                stride: *stride,
                pad: *padding,
                requant: requant_table(q(node.inputs[0])?, q(id)?),
            },
            Op::AvgPool {
                kernel,
                stride,
                padding,
            } => {
                let (x, y) = (q(node.inputs[0])?, q(id)?);
                Kernel::AvgPool {
                    k: *kernel,
                    stride: *stride,
                    pad: *padding,
                    in_zp: x.zero_point,
                    mult: x.scale / y.scale / (kernel * kernel) as f32,
                    y_zp: y.zero_point,
                }
            }
            Op::GlobalAvgPool => {
                let (x, y) = (q(node.inputs[0])?, q(id)?);
                Kernel::GlobalAvgPool {
                    in_zp: x.zero_point,
                    in_scale: x.scale,
                    out_scale: y.scale,
                    y_zp: y.zero_point,
                }
            }
            Op::BatchNorm { .. } => {
                bail!(
                    "{}: batch norm must be folded into its conv before quantization",
                    what()
                )
            }
        };
        steps.push(Step {
            node: id,
            inputs,
            kernel,
        });
    }
    let output = value_of[graph.output];
    Ok(Plan {
        steps,
        output,
        input: qm.input_qparams(),
        output_q: qm.activations[graph.output],
    })
}

/// The requantization of int8 layer `id` (bias without the zero-point correction).
fn out_stage(qm: &QuantizedModel, id: NodeId, bias: &[i32]) -> Result<OutStage> {
    let mult = qm.multipliers(id)?;
    let Some((qmin, qmax)) = qm.clamp_range(id) else {
        bail!("an int8 layer with a float output");
    };
    if bias.len() != mult.len() {
        bail!("{} biases for {} output channels", bias.len(), mult.len());
    }
    Ok(OutStage {
        mult,
        bias: bias.to_vec(),
        zp: qm.activations[id].expect("quantized").zero_point,
        qmin,
        qmax,
    })
}

/// Folds the input zero point into the bias of a GEMM layer: the GEMM sums `x_q * w_q`, the
/// conventions `(x_q - x_zp) * w_q`.
fn with_zero_point(mut out: OutStage, column_sums: &[i32], in_zp: u8) -> OutStage {
    for (b, &s) in out.bias.iter_mut().zip(column_sums) {
        *b = b.wrapping_sub(in_zp as i32 * s);
    }
    out
}

fn float_layer(qm: &QuantizedModel, id: NodeId, conv: Option<ConvParams>) -> Result<Kernel> {
    let node = &qm.graph.nodes[id];
    let Some(layer) = qm.float_layers.get(&node.name) else {
        bail!("neither an int8 nor a float layer in the quantized model");
    };
    let input = qm
        .input_of(id, 0)
        .context("the input of a float layer must be quantized")?;
    let out = match (qm.activations[id], qm.clamp_range(id)) {
        (Some(q), Some((lo, hi))) => Some((q, lo, hi)),
        _ if id == qm.graph.output => None,
        _ => bail!("a float layer inside the network without output qparams"),
    };
    Ok(Kernel::Float {
        conv,
        weight: layer.weight.clone(),
        shape: layer.shape.clone(),
        bias: layer.bias.clone(),
        input,
        out,
    })
}
