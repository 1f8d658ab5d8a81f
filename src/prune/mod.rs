//! Pruning: removing whole channels (structured) or single weights (unstructured).
//!
//! Removing one output channel of a conv forces removals elsewhere: the batch-norm entries
//! after it, the input slices of every reader, every producer of a residual add, the matching
//! range of a concat or split, the positions a shuffle moves it to, the coupled channel of a
//! depthwise conv, the same share of every group of a grouped conv, and the
//! squeeze-and-excitation scale it is multiplied by. [`channel_groups`] derives these coupled
//! groups from the graph's channel relations ([`crate::graph::ChannelMap`]) alone, with no
//! knowledge of the architecture; [`importance`] scores them, [`plan`] picks which go, and
//! [`remove_channels`] removes them, giving a physically smaller graph and weights that save
//! as a self-describing checkpoint. [`prune_channels`] runs the whole pass.
//!
//! Unstructured pruning: [`magnitude`] zeroes individual conv and linear weights of smallest
//! magnitude, behind masks that training keeps applied, on a cubic schedule.

pub mod channel;
mod groups;
pub mod importance;
mod lp;
pub mod magnitude;
pub mod pattern;
pub mod plan;
mod remove;
pub mod sensitivity;

pub use channel::{ChannelPruneConfig, prune_channels};
pub use groups::{Blocked, ChannelGroups, Member, PruneUnit, Role, analyze, channel_groups};
pub use remove::remove_channels;
