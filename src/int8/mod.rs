//! The integer engine: runs a [`QuantizedModel`] with u8 activations and i8 weights on the
//! integer kernels (`kernels::int8`), exactly as the int8 conventions (`docs/quantization.md`)
//! define each op, so that it agrees with the quantization pass's float simulation.
//!
//! - [`Engine::new`] plans once (`plan.rs`): weights packed for the CPU's instruction set,
//!   multipliers, zero-point-corrected biases and lookup tables precomputed.
//! - [`Engine::forward`] quantizes the NCHW f32 input into channels-last (NHWC) u8 buffers,
//!   runs every step (`run.rs`) and returns the dequantized logits. The batch is split into
//!   chunks that run the whole network each, over the rayon pool when there are samples for
//!   every thread (as the float executor, `infer/`); buffers are recycled per thread.
//! - Layers kept in float dequantize their input, run the float kernels and quantize their
//!   output (or return float logits at the network output).
//!
//! Why NHWC: see `kernels::int8` (1x1 convs need no im2col, the depthwise conv and the
//! requantization vectorise across channels).

mod plan;
mod run;

use crate::kernels::int8::{Level, level};
use crate::passes::quant::QuantizedModel;
use anyhow::{Result, bail};
use rayon::prelude::*;
use std::cell::RefCell;

/// Bytes of the largest activation per chunk that should stay in cache.
const CHUNK_BUDGET: usize = 1 << 19;
const MAX_CHUNK: usize = 16;

thread_local! {
    static SCRATCH: RefCell<run::Scratch> = RefCell::new(run::Scratch::default());
}

/// A quantized model planned for the integer kernels.
pub struct Engine {
    graph: crate::graph::Graph,
    plan: plan::Plan,
    level: Level,
}

impl Engine {
    /// Plans `qm` for the best instruction set of this CPU.
    pub fn new(qm: &QuantizedModel) -> Result<Engine> {
        Engine::with_level(qm, level())
    }

    /// Plans `qm` for instruction-set `level` (for tests and timing; must be one of
    /// [`Level::available`]).
    pub fn with_level(qm: &QuantizedModel, level: Level) -> Result<Engine> {
        if !Level::available().contains(&level) {
            bail!("int8 engine: this CPU cannot run {level:?} kernels");
        }
        Ok(Engine {
            graph: qm.graph.clone(),
            plan: plan::build(qm, level)?,
            level,
        })
    }

    /// [`Engine::forward`] on a Candle tensor (N x C x H x W f32), for the callers that hold
    /// batches as tensors (evaluation, prediction, `forward`): logits N x classes.
    pub fn forward_tensor(&self, x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        let (n, _, h, w) = x.dims4()?;
        let values = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let logits = self.forward(&values, n, h, w)?;
        let classes = logits.len() / n.max(1);
        Ok(candle_core::Tensor::from_vec(
            logits,
            (n, classes),
            x.device(),
        )?)
    }

    /// The network's outputs for `n` images `x` (NCHW f32, `n x C x h x w`), dequantized, in
    /// the float executor's layout (`n x classes` logits).
    pub fn forward(&self, x: &[f32], n: usize, h: usize, w: usize) -> Result<Vec<f32>> {
        let c = self.graph.input_channels();
        if x.len() != n * c * h * w {
            bail!(
                "int8 engine: {} input values for {n} images of {c} x {h} x {w}",
                x.len()
            );
        }
        let dims = self.graph.infer_shapes(h, w)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let largest = dims.iter().map(|d| d.elements()).max().unwrap_or(1);
        let threads = rayon::current_num_threads();
        let across = threads > 1 && n >= threads;
        let mut chunk = (CHUNK_BUDGET / largest.max(1)).clamp(1, MAX_CHUNK);
        if across {
            chunk = chunk.min(n.div_ceil(threads));
        }
        if let Some(v) = std::env::var("SLIMCANDLE_INFER_CHUNK")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            chunk = v.max(1);
        }
        let dump = dump_dir();
        if dump.is_some() {
            // One chunk, so that each dumped file holds the whole batch.
            chunk = n;
        }
        let chunk = chunk.min(n);
        let per_in = c * h * w;
        let run_chunk = |i: usize| -> Result<Vec<f32>> {
            let samples = chunk.min(n - i * chunk);
            let xs = &x[i * chunk * per_in..(i * chunk + samples) * per_in];
            SCRATCH.with(|s| {
                run::chunk(
                    &self.plan,
                    &dims,
                    self.level,
                    xs,
                    samples,
                    &mut s.borrow_mut(),
                    dump.as_deref().map(|d| (d, &self.graph)),
                )
            })
        };
        let chunks = n.div_ceil(chunk);
        let parts: Vec<Vec<f32>> = if across {
            (0..chunks)
                .into_par_iter()
                .map(run_chunk)
                .collect::<Result<_>>()?
        } else {
            (0..chunks).map(run_chunk).collect::<Result<_>>()?
        };
        Ok(parts.concat())
    }

    /// The instruction-set level the weights were packed for.
    pub fn level(&self) -> Level {
        self.level
    }
}

/// `SLIMCANDLE_INT8_DUMP=DIR` writes every step's output codes to `DIR/<node name>.u8` (raw
/// bytes, the whole batch, channels-last: `n x h x w x c`), to find the first node where the
/// engine and another integer runtime (onnxruntime's fused QDQ graph, whose tensors are named
/// `<node name>.quantized`) disagree. A debugging aid, off by default.
fn dump_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("SLIMCANDLE_INT8_DUMP")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
}
