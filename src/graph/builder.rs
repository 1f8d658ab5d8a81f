//! Incremental construction of a [`Graph`], tracking channel counts so builders only state
//! what changes.

use super::{Activation, Graph, Node, NodeId, Op};

pub struct GraphBuilder {
    nodes: Vec<Node>,
    channels: Vec<usize>,
}

impl GraphBuilder {
    /// Starts a graph whose node 0 is an input with `channels` channels.
    pub fn new(channels: usize) -> Self {
        let input = Node {
            name: "input".into(),
            op: Op::Input { channels },
            inputs: vec![],
        };
        GraphBuilder {
            nodes: vec![input],
            channels: vec![channels],
        }
    }

    /// The input node's id.
    pub const INPUT: NodeId = 0;

    pub fn channels(&self, id: NodeId) -> usize {
        self.channels[id]
    }

    /// Adds a node; `name` of `None` gets a unique name from the op kind and node index.
    pub fn push(&mut self, name: Option<&str>, op: Op, inputs: Vec<NodeId>) -> NodeId {
        let id = self.nodes.len();
        let ch = |k: usize| self.channels[inputs[k]];
        let c = match &op {
            Op::Input { channels } => *channels,
            Op::Conv2d { out_channels, .. } => *out_channels,
            Op::BatchNorm { channels, .. } => *channels,
            Op::Linear { out_features, .. } => *out_features,
            Op::Concat => inputs.iter().map(|&i| self.channels[i]).sum(),
            Op::Slice { start, end } => end - start,
            _ => ch(0),
        };
        let name = match name {
            Some(n) => n.to_string(),
            None => format!("{}#{id}", op.kind()),
        };
        self.nodes.push(Node { name, op, inputs });
        self.channels.push(c);
        id
    }

    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &mut self,
        name: &str,
        x: NodeId,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        groups: usize,
        bias: bool,
    ) -> NodeId {
        let in_channels = self.channels[x];
        let op = Op::Conv2d {
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            dilation: 1,
            groups,
            bias,
        };
        self.push(Some(name), op, vec![x])
    }

    pub fn batch_norm(&mut self, name: &str, x: NodeId, eps: f64, momentum: f64) -> NodeId {
        let channels = self.channels[x];
        self.push(
            Some(name),
            Op::BatchNorm {
                channels,
                eps,
                momentum,
            },
            vec![x],
        )
    }

    pub fn linear(&mut self, name: &str, x: NodeId, out_features: usize, bias: bool) -> NodeId {
        let in_features = self.channels[x];
        self.push(
            Some(name),
            Op::Linear {
                in_features,
                out_features,
                bias,
            },
            vec![x],
        )
    }

    pub fn act(&mut self, act: Activation, x: NodeId) -> NodeId {
        self.push(None, Op::Act { act }, vec![x])
    }

    pub fn add(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.push(None, Op::Add, vec![a, b])
    }

    pub fn channel_mul(&mut self, x: NodeId, scale: NodeId) -> NodeId {
        self.push(None, Op::ChannelMul, vec![x, scale])
    }

    pub fn concat(&mut self, xs: Vec<NodeId>) -> NodeId {
        self.push(None, Op::Concat, xs)
    }

    pub fn slice(&mut self, x: NodeId, start: usize, end: usize) -> NodeId {
        self.push(None, Op::Slice { start, end }, vec![x])
    }

    pub fn shuffle(&mut self, x: NodeId, groups: usize) -> NodeId {
        self.push(None, Op::ChannelShuffle { groups }, vec![x])
    }

    pub fn max_pool(
        &mut self,
        x: NodeId,
        kernel: usize,
        stride: usize,
        padding: usize,
        ceil_mode: bool,
    ) -> NodeId {
        self.push(
            None,
            Op::MaxPool {
                kernel,
                stride,
                padding,
                ceil_mode,
            },
            vec![x],
        )
    }

    pub fn avg_pool(&mut self, x: NodeId, kernel: usize, stride: usize, padding: usize) -> NodeId {
        self.push(
            None,
            Op::AvgPool {
                kernel,
                stride,
                padding,
            },
            vec![x],
        )
    }

    pub fn global_avg_pool(&mut self, x: NodeId) -> NodeId {
        self.push(None, Op::GlobalAvgPool, vec![x])
    }

    pub fn flatten(&mut self, x: NodeId) -> NodeId {
        self.push(None, Op::Flatten, vec![x])
    }

    pub fn dropout(&mut self, x: NodeId, p: f64) -> NodeId {
        self.push(None, Op::Dropout { p }, vec![x])
    }

    pub fn finish(self, output: NodeId) -> Graph {
        Graph {
            nodes: self.nodes,
            output,
        }
    }
}
