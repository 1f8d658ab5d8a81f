//! Post-training int8 quantization (`docs/quantization.md`): the scheme's formulas
//! (`scheme.rs`), the quantized model (`model.rs`) that the simulation, the integer engine
//! and checkpoint format 3 share, activation observers (`histogram.rs`) and calibrators
//! (`calibrate.rs`), the plan that decides shared qparams and quantizes weights (`plan.rs`),
//! the simulation: the scheme's integer arithmetic on f32 tensors (`simulate.rs`), and the
//! sensitivity scan, one layer at a time in float (`sensitivity.rs`).

pub mod calibrate;
pub mod histogram;
pub mod model;
pub mod plan;
pub mod scheme;
pub mod sensitivity;
pub mod simulate;
pub mod store;

pub use calibrate::Observers;
pub use model::{
    Calibrator, FloatLayer, Granularity, QatInfo, QuantizedLayer, QuantizedModel, SchemeInfo,
    fused_activations,
};
pub use plan::QuantOptions;
pub use scheme::{QParams, QuantizedWeight};

use crate::model::Model;
use anyhow::Result;
use candle_core::Tensor;

/// Folds batch norm and quantizes `model` after observing it on `batches` (preprocessed
/// calibration images, N x C x H x W each); `progress` is called with the images seen so far.
pub fn quantize(
    model: &Model,
    batches: impl IntoIterator<Item = Result<Tensor>>,
    opts: &QuantOptions,
    mut progress: impl FnMut(usize),
) -> Result<QuantizedModel> {
    let folded = crate::passes::fold_batch_norm(model)?;
    let mut observers = Observers::new(&folded.graph);
    for batch in batches {
        observers.observe(&folded, &batch?)?;
        progress(observers.images);
    }
    if observers.images == 0 {
        anyhow::bail!("no calibration images");
    }
    plan::build(&folded, &observers, opts)
}

/// The int8 forward pass of one-off callers (prediction, `forward`): logits f32 for a
/// preprocessed batch, on the integer engine ([`crate::int8::Engine`]). Callers that run many
/// batches plan the engine once instead (as [`crate::eval::evaluate_int8`] does). The
/// simulation ([`simulate::simulate`]) stays the reference the engine is tested against.
pub fn forward(model: &QuantizedModel, x: &Tensor) -> Result<Tensor> {
    crate::int8::Engine::new(model)?.forward_tensor(x)
}
