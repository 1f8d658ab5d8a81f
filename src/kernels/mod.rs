//! Fast CPU kernels for the layers of small CNNs, as Candle custom ops with autograd.
//!
//! Why: on the CPU, stock Candle splits a grouped or depthwise convolution into one
//! convolution per group, differentiates convolutions through a naive `conv_transpose2d`, and
//! composes batch norm and the hard activations from generic ops, one pass each. These
//! functions do each layer in one op (one or two passes) forward and one op backward, on f32
//! NCHW tensors on the CPU. Any other dtype or device runs the stock composition in
//! [`reference`]; non-contiguous inputs are made contiguous first.
//!
//! | function | kernel |
//! |---|---|
//! | [`conv2d`] | depthwise: direct loops (`depthwise.rs`); dense and grouped: per-group GEMMs with im2col / col2im (`conv_gemm.rs`) |
//! | [`batch_norm_train`], [`batch_norm_eval`] | per-channel passes, closed-form backward (`batch_norm.rs`) |
//! | [`relu`], [`relu6`], [`hardsigmoid`], [`hardswish`] | one element-wise pass each way (`activation.rs`) |
//! | [`add_channel_bias`] | one pass forward; per-channel sums backward (`bias.rs`) |
//! | [`max_pool2d`], [`avg_pool2d`] | PyTorch's padding and ceil-mode rules, with backward (`pool.rs`) |
//! | [`channel_shuffle`] | one plane permutation each way (`shuffle.rs`) |
//! | `sgd::sgd_step` | the optimizer's SGD update, in place, two passes (`sgd.rs`) |
//!
//! The eval executor (`crate::infer`) calls the slice-level forward functions
//! (`conv_gemm::forward_into`, `depthwise::forward_into`, `pool::pool_into`) directly, with a
//! callback that fuses bias, batch norm, activation and residual add into the output.
//!
//! The f32 products of the convolutions go through `gemm::matmul`, which picks our AVX-512
//! kernel (`sgemm`: register tiles along N) or the `gemm` crate. At batch 1 the executor splits each layer over the
//! spinning threads of `team` (rayon's workers sleep between layers).
//!
//! [`reuse_freed_memory`] is an opt-in, process-wide glibc setting that removes the page
//! faults which otherwise dominate large-tensor steps on the CPU (`alloc.rs`).

pub(crate) mod activation;
pub(crate) mod alloc;
pub(crate) mod batch_norm;
mod bias;
pub(crate) mod conv;
pub(crate) mod conv_channels_last;
pub(crate) mod conv_gemm;
mod conv_implicit;
pub(crate) mod cpu;
pub(crate) mod depthwise;
pub(crate) mod depthwise_channels_last;
mod depthwise_small;
pub(crate) mod gemm;
pub(crate) mod im2col;
pub mod int8;
pub(crate) mod pool;
pub mod reference;
pub(crate) mod scratch;
pub(crate) mod sgd;
pub(crate) mod sgemm;
pub(crate) mod shuffle;
pub(crate) mod simd;
pub(crate) mod stem_channels_last;
pub(crate) mod team;
pub(crate) mod transpose;
mod winograd;

pub use activation::{hardsigmoid, hardswish, relu, relu6};
pub use alloc::reuse_freed_memory;
pub use batch_norm::{batch_norm_eval, batch_norm_train};
pub use bias::add_channel_bias;
pub use conv::conv2d;
pub use pool::{avg_pool2d, max_pool2d};
pub use shuffle::channel_shuffle;
