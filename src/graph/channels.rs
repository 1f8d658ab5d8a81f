//! How each op relates its output channels to its input channels. Structured pruning derives
//! its coupled channel groups from these relations alone, with no per-architecture code.

use super::{Graph, NodeId, Op};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelMap {
    /// Input 0 of this node is the channel-space source: output channels are new, each reading
    /// the input channels of its own group (`groups` = 1 for a dense conv or a linear layer).
    /// Out channel `o` belongs to group `o / (out/groups)`, reading in channels of that group.
    Grouped { groups: usize },
    /// Output channel `c` comes from channel `c` of every input (batch norm, activations,
    /// pooling, add, channel-wise multiply, depthwise conv, dropout).
    Identity,
    /// Output channels are the inputs' channels one after another, starting at `offsets[k]`.
    Concat { offsets: Vec<usize> },
    /// Output channel `c` is input channel `start + c`.
    Slice { start: usize },
    /// Output channel `i` is input channel `perm[i]`.
    Permute(Vec<usize>),
    /// Channel `c` becomes the `spatial` features `[c*spatial, (c+1)*spatial)`.
    Flatten,
    /// The input node: channels start here.
    Source,
}

/// Output position -> input channel of torchvision's channel shuffle.
pub fn shuffle_permutation(channels: usize, groups: usize) -> Vec<usize> {
    let per_group = channels / groups;
    (0..channels)
        .map(|i| (i % groups) * per_group + i / groups)
        .collect()
}

impl Graph {
    /// The channel relation of node `id`; `counts` comes from [`Graph::channel_counts`].
    pub fn channel_map(&self, id: NodeId, counts: &[usize]) -> ChannelMap {
        let node = &self.nodes[id];
        match &node.op {
            Op::Input { .. } => ChannelMap::Source,
            Op::Conv2d {
                in_channels,
                out_channels,
                groups,
                ..
            } => {
                if *groups > 1 && groups == in_channels && groups == out_channels {
                    ChannelMap::Identity
                } else {
                    ChannelMap::Grouped { groups: *groups }
                }
            }
            Op::Linear { .. } => ChannelMap::Grouped { groups: 1 },
            Op::Concat => {
                let mut offsets = Vec::with_capacity(node.inputs.len());
                let mut at = 0;
                for &i in &node.inputs {
                    offsets.push(at);
                    at += counts[i];
                }
                ChannelMap::Concat { offsets }
            }
            Op::Slice { start, .. } => ChannelMap::Slice { start: *start },
            Op::ChannelShuffle { groups } => {
                ChannelMap::Permute(shuffle_permutation(counts[id], *groups))
            }
            Op::Flatten => ChannelMap::Flatten,
            _ => ChannelMap::Identity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_permutation_matches_view_transpose() {
        // 6 channels, 2 groups: view (2, 3) -> transpose -> (3, 2): [0, 3, 1, 4, 2, 5].
        assert_eq!(shuffle_permutation(6, 2), vec![0, 3, 1, 4, 2, 5]);
        assert_eq!(shuffle_permutation(6, 3), vec![0, 2, 4, 1, 3, 5]);
    }
}
