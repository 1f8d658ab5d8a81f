//! slimcandle: build, train, compress and ship small CNNs on Candle.

pub mod checkpoint;
pub mod exec;
pub mod graph;
pub mod import;
pub mod model;
pub mod models;
pub mod report;
pub mod rng;
pub mod tensor_file;
pub mod weights;
