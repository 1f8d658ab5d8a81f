//! The network description: a small typed graph that is the single source of truth.
//!
//! Model builders emit it, the executor runs it, passes rewrite it and checkpoints store it
//! as JSON. Nodes are kept in topological order and addressed by index; every node has a
//! unique name, and parameterised nodes use the torchvision module path as their name so that
//! parameter keys (`{name}.weight`, `{name}.running_mean` ...) match PyTorch state dicts.

mod analysis;
mod builder;
mod channels;
mod limits;
pub mod shape;

pub use analysis::{LayerRow, Summary};
pub use builder::GraphBuilder;
pub use channels::{ChannelMap, shuffle_permutation};
pub use limits::{MAX_CHANNELS, MAX_NODES, MAX_WINDOW};
pub use shape::Dims;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Index of a node in [`Graph::nodes`].
pub type NodeId = usize;

/// Elementwise activation functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    Relu6,
    Hardswish,
    Hardsigmoid,
    Sigmoid,
}

/// The closed set of operations. Field names are part of the checkpoint format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// The network input, NCHW.
    Input {
        channels: usize,
    },
    /// 2-D convolution with square kernel and symmetric padding. Output channel `o` reads the
    /// input channels of its group: `[g*in/groups, (g+1)*in/groups)` with `g = o / (out/groups)`.
    Conv2d {
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
        groups: usize,
        bias: bool,
    },
    /// Per-channel batch normalisation (PyTorch semantics for eps and momentum).
    BatchNorm {
        channels: usize,
        eps: f64,
        momentum: f64,
    },
    /// Fully connected layer on a flat input.
    Linear {
        in_features: usize,
        out_features: usize,
        bias: bool,
    },
    Act {
        act: Activation,
    },
    /// Elementwise sum of two equally shaped inputs (residual connections).
    Add,
    /// `inputs[0] * inputs[1]`, where `inputs[1]` is N x C x 1 x 1 (squeeze-and-excitation).
    ChannelMul,
    /// Concatenation along channels, in input order.
    Concat,
    /// Channels `[start, end)` of the input (one half of a channel split).
    Slice {
        start: usize,
        end: usize,
    },
    /// torchvision's channel shuffle: view (N, g, C/g, H, W), transpose(1, 2), flatten.
    ChannelShuffle {
        groups: usize,
    },
    MaxPool {
        kernel: usize,
        stride: usize,
        padding: usize,
        ceil_mode: bool,
    },
    /// Average pool with zero padding counted in the divisor (PyTorch's default).
    AvgPool {
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    /// Mean over H and W, keeping N x C x 1 x 1.
    GlobalAvgPool,
    /// N x C x H x W to N x (C*H*W).
    Flatten,
    Dropout {
        p: f64,
    },
}

impl Op {
    /// A conv whose every channel is its own group (input and output channel go together).
    pub fn is_depthwise(&self) -> bool {
        matches!(self, Op::Conv2d { groups, in_channels, out_channels, .. }
            if *groups > 1 && groups == in_channels && groups == out_channels)
    }

    /// A conv or linear layer: the ops with weight matrices that pruning ranks.
    pub fn has_weight_matrix(&self) -> bool {
        matches!(self, Op::Conv2d { .. } | Op::Linear { .. })
    }

    /// Short name used in tables and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Conv2d { groups, .. } => {
                if *groups == 1 {
                    "conv2d"
                } else if self.is_depthwise() {
                    "conv2d_dw"
                } else {
                    "conv2d_grouped"
                }
            }
            Op::BatchNorm { .. } => "batch_norm",
            Op::Linear { .. } => "linear",
            Op::Act { act } => match act {
                Activation::Relu => "relu",
                Activation::Relu6 => "relu6",
                Activation::Hardswish => "hardswish",
                Activation::Hardsigmoid => "hardsigmoid",
                Activation::Sigmoid => "sigmoid",
            },
            Op::Add => "add",
            Op::ChannelMul => "channel_mul",
            Op::Concat => "concat",
            Op::Slice { .. } => "slice",
            Op::ChannelShuffle { .. } => "channel_shuffle",
            Op::MaxPool { .. } => "max_pool",
            Op::AvgPool { .. } => "avg_pool",
            Op::GlobalAvgPool => "global_avg_pool",
            Op::Flatten => "flatten",
            Op::Dropout { .. } => "dropout",
        }
    }

    /// Number of inputs the op takes; `None` for variadic (concat).
    fn arity(&self) -> Option<usize> {
        match self {
            Op::Input { .. } => Some(0),
            Op::Add | Op::ChannelMul => Some(2),
            Op::Concat => None,
            _ => Some(1),
        }
    }
}

/// What a parameter or buffer is, which decides its initialisation and whether it trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamRole {
    ConvWeight,
    LinearWeight,
    Bias,
    BnWeight,
    BnBias,
    RunningMean,
    RunningVar,
}

impl ParamRole {
    /// Running statistics are buffers: saved and loaded, but never touched by an optimizer.
    pub fn is_trainable(self) -> bool {
        !matches!(self, ParamRole::RunningMean | ParamRole::RunningVar)
    }
}

/// A parameter or buffer a node owns, with its torchvision state-dict name.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub node: NodeId,
    pub role: ParamRole,
    pub shape: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub op: Op,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<NodeId>,
}

/// A network: nodes in topological order, node 0 the input, `output` the result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub output: NodeId,
}

impl Graph {
    pub fn input_channels(&self) -> usize {
        match self.nodes.first().map(|n| &n.op) {
            Some(Op::Input { channels }) => *channels,
            _ => 0,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("graph serialisation cannot fail")
    }

    /// Parses and validates a graph, so that a corrupt description is refused before use.
    pub fn from_json(text: &str) -> Result<Graph> {
        let graph: Graph = serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("the graph description is not valid: {e}"))?;
        graph.validate()?;
        Ok(graph)
    }

    /// Structural checks: one input first, topological order (so no edge to a missing or
    /// later node, hence no cycle), arities, unique names, op fields within
    /// [`limits`](MAX_CHANNELS), channel counts consistent along every edge, and parameter
    /// sizes that fit in memory arithmetic. Everything a graph from a file could get wrong is
    /// caught here, before any tensor is allocated from it.
    pub fn validate(&self) -> Result<()> {
        if self.nodes.len() > MAX_NODES {
            bail!(
                "graph: {} nodes, more than the {MAX_NODES} a graph may have",
                self.nodes.len()
            );
        }
        if !matches!(self.nodes.first().map(|n| &n.op), Some(Op::Input { .. })) {
            bail!("graph: the first node must be the input");
        }
        let mut names = HashSet::new();
        for (id, node) in self.nodes.iter().enumerate() {
            if !names.insert(node.name.as_str()) {
                bail!("graph: node name `{}` is used twice", node.name);
            }
            if id > 0 && matches!(node.op, Op::Input { .. }) {
                bail!("graph: node `{}` is a second input", node.name);
            }
            if let Some(&bad) = node.inputs.iter().find(|&&i| i >= self.nodes.len()) {
                bail!(
                    "graph: node `{}` reads node {bad}, which does not exist ({} nodes)",
                    node.name,
                    self.nodes.len()
                );
            }
            if let Some(&bad) = node.inputs.iter().find(|&&i| i >= id) {
                bail!(
                    "graph: node `{}` reads node {bad} (`{}`), which does not come before it (a cycle or an unordered graph)",
                    node.name,
                    self.nodes[bad].name
                );
            }
            limits::check_fields(node)?;
            match node.op.arity() {
                Some(n) if n != node.inputs.len() => bail!(
                    "graph: node `{}` ({}) takes {n} inputs, has {}",
                    node.name,
                    node.op.kind(),
                    node.inputs.len()
                ),
                None if node.inputs.is_empty() => {
                    bail!("graph: node `{}` (concat) has no inputs", node.name)
                }
                _ => {}
            }
        }
        if self.output >= self.nodes.len() {
            bail!("graph: output node {} does not exist", self.output);
        }
        self.channel_counts()?;
        self.param_elements()?;
        Ok(())
    }

    /// Total elements of all parameters and buffers, or an error naming the first node whose
    /// parameter sizes overflow.
    pub fn param_elements(&self) -> Result<usize> {
        let mut total = 0usize;
        for node in &self.nodes {
            total = node
                .param_elements()
                .and_then(|n| total.checked_add(n))
                .ok_or_else(|| {
                    anyhow::anyhow!("graph: node `{}`: its parameter sizes overflow", node.name)
                })?;
        }
        Ok(total)
    }

    /// Number of channels (or features, after flatten) each node produces.
    pub fn channel_counts(&self) -> Result<Vec<usize>> {
        let mut counts: Vec<usize> = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let inc = |k: usize| counts[node.inputs[k]];
            let c = match &node.op {
                Op::Input { channels } => *channels,
                Op::Conv2d {
                    in_channels,
                    out_channels,
                    groups,
                    ..
                } => {
                    if inc(0) != *in_channels {
                        bail!(
                            "graph: conv `{}` expects {in_channels} input channels, gets {}",
                            node.name,
                            inc(0)
                        );
                    }
                    if *groups == 0 || in_channels % groups != 0 || out_channels % groups != 0 {
                        bail!(
                            "graph: conv `{}`: {in_channels} -> {out_channels} channels do not divide into {groups} groups",
                            node.name
                        );
                    }
                    *out_channels
                }
                Op::BatchNorm { channels, .. } => {
                    if inc(0) != *channels {
                        bail!(
                            "graph: batch norm `{}` has {channels} channels, gets {}",
                            node.name,
                            inc(0)
                        );
                    }
                    *channels
                }
                Op::Linear {
                    in_features,
                    out_features,
                    ..
                } => {
                    if inc(0) != *in_features {
                        bail!(
                            "graph: linear `{}` expects {in_features} features, gets {}",
                            node.name,
                            inc(0)
                        );
                    }
                    *out_features
                }
                Op::Add | Op::ChannelMul => {
                    if inc(0) != inc(1) {
                        bail!(
                            "graph: `{}` combines {} and {} channels",
                            node.name,
                            inc(0),
                            inc(1)
                        );
                    }
                    inc(0)
                }
                Op::Concat => {
                    let total: usize = node.inputs.iter().map(|&i| counts[i]).sum();
                    if total > MAX_CHANNELS {
                        bail!(
                            "graph: concat `{}` joins {total} channels, more than {MAX_CHANNELS}",
                            node.name
                        );
                    }
                    total
                }
                Op::Slice { start, end } => {
                    if start >= end || *end > inc(0) {
                        bail!(
                            "graph: slice `{}` [{start}, {end}) is outside {} channels",
                            node.name,
                            inc(0)
                        );
                    }
                    end - start
                }
                Op::ChannelShuffle { groups } => {
                    if *groups == 0 || inc(0) % groups != 0 {
                        bail!(
                            "graph: shuffle `{}`: {} channels do not divide into {groups} groups",
                            node.name,
                            inc(0)
                        );
                    }
                    inc(0)
                }
                _ => inc(0),
            };
            counts.push(c);
        }
        Ok(counts)
    }

    /// Every parameter and buffer, in node order, with torchvision names and shapes.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let mut specs = Vec::new();
        for (id, node) in self.nodes.iter().enumerate() {
            let mut push = |suffix: &str, role: ParamRole, shape: Vec<usize>| {
                specs.push(ParamSpec {
                    name: format!("{}.{suffix}", node.name),
                    node: id,
                    role,
                    shape,
                })
            };
            match &node.op {
                Op::Conv2d {
                    in_channels,
                    out_channels,
                    kernel,
                    groups,
                    bias,
                    ..
                } => {
                    push(
                        "weight",
                        ParamRole::ConvWeight,
                        vec![*out_channels, in_channels / groups, *kernel, *kernel],
                    );
                    if *bias {
                        push("bias", ParamRole::Bias, vec![*out_channels]);
                    }
                }
                Op::BatchNorm { channels, .. } => {
                    push("weight", ParamRole::BnWeight, vec![*channels]);
                    push("bias", ParamRole::BnBias, vec![*channels]);
                    push("running_mean", ParamRole::RunningMean, vec![*channels]);
                    push("running_var", ParamRole::RunningVar, vec![*channels]);
                }
                Op::Linear {
                    in_features,
                    out_features,
                    bias,
                } => {
                    push(
                        "weight",
                        ParamRole::LinearWeight,
                        vec![*out_features, *in_features],
                    );
                    if *bias {
                        push("bias", ParamRole::Bias, vec![*out_features]);
                    }
                }
                _ => {}
            }
        }
        specs
    }

    /// For each node, the nodes that read it.
    pub fn consumers(&self) -> Vec<Vec<NodeId>> {
        let mut out = vec![Vec::new(); self.nodes.len()];
        for (id, node) in self.nodes.iter().enumerate() {
            for &i in &node.inputs {
                out[i].push(id);
            }
        }
        out
    }

    pub fn node_by_name(&self, name: &str) -> Option<NodeId> {
        self.nodes.iter().position(|n| n.name == name)
    }
}
