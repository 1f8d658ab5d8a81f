//! A float model planned once for many eval-mode forward passes, as an onnxruntime session
//! or our int8 engine is: the plan (fusions, folded batch-norm vectors) for each input size,
//! and the convolution weights rearranged for the channels-last kernels, are made on the
//! first call at that size and kept.
//!
//! Why: [`forward`](super::forward) plans and rearranges on every call, because training
//! changes the weights in place (`Var::set`) with nothing to tell a cache. That is 2-4% of a
//! channels-last batch, but at batch 1 it is most of the gain: MobileNet V2 at 224x224 spent
//! 1.0-1.2 ms of a 5.3 ms image rearranging weights. Evaluation, prediction, `bench` and a
//! distillation teacher hold their weights still, so they run here.

use super::{Layout, Rearranged, channels_last, execute, input_size, plan};
use crate::exec::{Mode, forward_candle};
use crate::graph::Graph;
use crate::weights::Weights;
use anyhow::Result;
use candle_core::Tensor;
use std::sync::{Arc, Mutex, OnceLock};

/// A graph and its weights, planned for eval-mode inference. The weights must not change
/// while the engine is in use (it shares their storage and keeps what it derived from them):
/// make a new engine after training or pruning them. Calls from several threads at once
/// are safe, but not from rayon jobs of one engine (a first call's one-time preparation runs
/// on the rayon pool, which could steal the second).
pub struct Engine {
    graph: Graph,
    weights: Weights,
    /// One per input size met so far.
    planned: Mutex<Vec<Arc<Planned>>>,
}

/// An input size's plan (`None` where a parameter is not an f32 CPU tensor) and, once a
/// channels-last pass has run, its rearranged weights.
struct Planned {
    /// Height and width of the input.
    size: (usize, usize),
    plan: Option<plan::Plan>,
    channels_last: OnceLock<channels_last::Prepared>,
}

impl Engine {
    /// An engine for `graph` with `weights` (shared, not copied: see [`Engine`]).
    pub fn new(graph: &Graph, weights: &Weights) -> Engine {
        Engine {
            graph: graph.clone(),
            weights: weights.clone(),
            planned: Mutex::new(Vec::new()),
        }
    }

    /// The eval-mode forward pass, as [`crate::exec::forward`] in [`Mode::Eval`]: the fused
    /// executor for f32 CPU tensors, the Candle ops for anything else.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.forward_with(x, Layout::Auto)? {
            Some(y) => Ok(y),
            None => forward_candle(&self.graph, &self.weights, x, Mode::Eval),
        }
    }

    /// The fused executor with the layout given; `None` where it does not run `x` (see
    /// [`super::forward`]).
    pub fn forward_with(&self, x: &Tensor, layout: Layout) -> Result<Option<Tensor>> {
        let Some((h, w)) = input_size(&self.graph, x)? else {
            return Ok(None);
        };
        let planned = self.planned(h, w)?;
        let Some(plan) = &planned.plan else {
            return Ok(None);
        };
        execute(plan, x, layout, Rearranged::Kept(&planned.channels_last))
    }

    /// The plan for inputs of `h` x `w`, made on the first call.
    fn planned(&self, h: usize, w: usize) -> Result<Arc<Planned>> {
        let mut planned = self.planned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = planned.iter().find(|p| p.size == (h, w)) {
            return Ok(p.clone());
        }
        let dims = self.graph.infer_shapes(h, w)?;
        let p = Arc::new(Planned {
            size: (h, w),
            plan: plan::build(&self.graph, &self.weights, dims)?,
            channels_last: OnceLock::new(),
        });
        planned.push(p.clone());
        Ok(p)
    }
}
