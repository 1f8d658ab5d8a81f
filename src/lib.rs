//! slimcandle: build, train, compress and ship small CNNs on Candle.

pub mod exec;
pub mod graph;
pub mod rng;
pub mod weights;
pub mod models;
pub mod checkpoint;
pub mod model;
pub mod tensor_file;
pub mod import;
pub mod report;
