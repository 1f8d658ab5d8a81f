//! slimcandle: build, train, compress and ship small CNNs on Candle.

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod exec;
pub mod export;
pub mod footprint;
pub mod graph;
pub mod import;
pub mod infer;
pub mod int8;
pub mod kernels;
pub mod model;
pub mod models;
pub mod passes;
pub mod pipeline;
pub mod predict;
pub mod profile;
pub mod prune;
pub mod report;
pub mod rng;
pub mod sparse;
pub mod tensor_file;
pub mod train;
pub mod weights;
