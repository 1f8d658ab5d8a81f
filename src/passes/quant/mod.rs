//! Post-training int8 quantization (`docs/quantization.md`): the scheme's formulas
//! (`scheme.rs`) and the quantized model (`model.rs`) that the simulation, the integer engine
//! and checkpoint format 3 share.

pub mod model;
pub mod scheme;

pub use model::{
    Calibrator, FloatLayer, Granularity, QuantizedLayer, QuantizedModel, SchemeInfo,
    fused_activations,
};
pub use scheme::{QParams, QuantizedWeight};
