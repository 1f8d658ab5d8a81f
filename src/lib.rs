//! slimcandle: build, train, compress and ship small CNNs on Candle.

// The command line (`cli`) lives in the library, so that the recipe runner's stage registry,
// built from the commands' clap definitions, is reachable from the fuzz targets and tests.
// Its modules were written against the library's public paths (`slimcandle::...`); this
// alias keeps those paths valid inside the crate.
extern crate self as slimcandle;

pub mod bench;
pub mod checkpoint;
pub mod cli;
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
