//! Passes that rewrite a model's graph and weights. Each works from the graph's ops alone,
//! never from the architecture's name.

mod fold_bn;
pub mod quant;

pub use fold_bn::fold_batch_norm;
