//! Structured pruning: removing whole channels, with everything coupled to them.
//!
//! Removing one output channel of a conv forces removals elsewhere: the batch-norm entries
//! after it, the input slices of every reader, every producer of a residual add, the matching
//! range of a concat or split, the positions a shuffle moves it to, the coupled channel of a
//! depthwise conv, the same share of every group of a grouped conv, and the
//! squeeze-and-excitation scale it is multiplied by. [`channel_groups`] derives these coupled
//! groups from the graph's channel relations ([`crate::graph::ChannelMap`]) alone, with no
//! knowledge of the architecture; [`remove_channels`] removes any set of them, giving a
//! physically smaller graph and weights that save as a self-describing checkpoint.
//!
//! Unstructured pruning: [`magnitude`] zeroes individual conv and linear weights of smallest
//! magnitude, behind masks that training keeps applied, on a cubic schedule.

mod groups;
mod lp;
pub mod magnitude;
pub mod pattern;
mod remove;

pub use groups::{Blocked, ChannelGroups, Member, PruneUnit, Role, analyze, channel_groups};
pub use remove::remove_channels;
