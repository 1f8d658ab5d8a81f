//! The eval-mode executor: runs a graph on plain f32 buffers with fused epilogues.
//!
//! Why: on the Candle path every node is a tensor op with its own allocation and its own
//! pass over memory (conv, then bias, batch norm, activation, residual add), and Candle's
//! element-wise ops run through its own spinning thread pool. At small feature maps (32x32
//! inputs) that per-op cost dominates. Here:
//!
//! - the plan (`plan.rs`) fuses each conv or linear layer with the batch norm, activation,
//!   residual add and activation that follow it, decided from the graph alone;
//! - the kernels (`kernels::conv_gemm`, `kernels::depthwise`) call the fused epilogue
//!   (`epilogue.rs`) on each block of output right after computing it, while it is in cache;
//! - the batch is split into chunks that each run the whole network (`run.rs`), on the rayon
//!   pool when there are enough samples for every thread, with buffers recycled after their
//!   last reader. Batches smaller than the thread count run one chunk with multi-threaded
//!   convolutions instead.
//!
//! Parameters are borrowed from the weights for the call, not copied. Only f32 CPU tensors
//! run here; `exec::forward` sends anything else down the Candle path.
//!
//! `SLIMCANDLE_INFER_CHUNK=n` overrides the chunk size (samples), for timing experiments.

mod epilogue;
mod plan;
mod run;

use crate::exec::check_input;
use crate::graph::{Graph, NodeId};
use crate::weights::Weights;
use anyhow::Result;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

/// Values per sample of the largest activation that a chunk should keep in cache: the chunk
/// holds as many samples as fit this budget (between 1 and [`MAX_CHUNK`]).
const CHUNK_BUDGET: usize = 1 << 18;
const MAX_CHUNK: usize = 16;

thread_local! {
    /// Each thread's recycled buffers, kept between calls.
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Eval-mode forward pass of `graph` on `x` (N x C x H x W). Returns `None` when the input or
/// a parameter is not an f32 CPU tensor, which the Candle path handles instead.
pub fn forward(graph: &Graph, weights: &Weights, x: &Tensor) -> Result<Option<Tensor>> {
    check_input(graph, x.dims())?;
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (n, _, h, w) = x.dims4()?;
    let dims = graph.infer_shapes(h, w)?;
    let Some(plan) = plan::build(graph, weights, dims)? else {
        return Ok(None);
    };
    let x = x.contiguous()?;
    let mut owned = plan.params.clone();
    owned.push(x);
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
            (&**storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        slices.push(&data[start..end]);
    }
    let x = slices.pop().expect("the input was pushed last");
    let ws = slices;

    let out_dims = plan.dims[graph.output];
    let in_len = plan.dims[0].elements();
    let largest = plan.dims.iter().map(|d| d.elements()).max().unwrap_or(1);
    let threads = rayon::current_num_threads();
    let across = threads > 1 && n >= threads;
    let mut chunk = (CHUNK_BUDGET / largest.max(1)).clamp(1, MAX_CHUNK);
    if across {
        chunk = chunk.min(n.div_ceil(threads));
    }
    if let Some(c) = std::env::var("SLIMCANDLE_INFER_CHUNK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        chunk = c.max(1);
    }
    let chunk = chunk.min(n).max(1);
    // The values the tail reads from the chunked part (or the output, without a tail).
    let split = match plan.small_tail {
        Some((start, widest)) if chunk * widest < plan::TAIL_COLUMNS => start,
        _ => plan.tail,
    };
    let mut boundary: Vec<NodeId> = plan.steps[split..]
        .iter()
        .flat_map(|s| s.reads())
        .chain(std::iter::once(plan.output))
        .filter(|&v| !plan.steps[split..].iter().any(|s| s.out == v))
        .collect();
    boundary.sort_unstable();
    boundary.dedup();
    let per_chunk = |i: usize| -> Result<Vec<Vec<f32>>> {
        let samples = chunk.min(n - i * chunk);
        let xs = &x[i * chunk * in_len..(i * chunk + samples) * in_len];
        let mut pool = POOL.with(|p| p.take());
        let parallel = threads > 1 && !across;
        let result = run::steps(
            &plan,
            &ws,
            xs,
            Vec::new(),
            0..split,
            samples,
            parallel,
            &mut pool,
            &boundary,
        );
        POOL.with(|p| *p.borrow_mut() = pool);
        result
    };
    let chunks = n.div_ceil(chunk);
    let parts: Vec<Vec<Vec<f32>>> = if across {
        (0..chunks)
            .into_par_iter()
            .map(per_chunk)
            .collect::<Result<_>>()?
    } else {
        (0..chunks).map(per_chunk).collect::<Result<_>>()?
    };
    // Whole-batch values, chunks in order.
    let mut given: Vec<(NodeId, Vec<f32>)> = boundary
        .iter()
        .enumerate()
        .map(|(k, &v)| (v, parts.iter().flat_map(|p| p[k].iter().copied()).collect()))
        .collect();
    let out = if split < plan.steps.len() {
        let mut pool = POOL.with(|p| p.take());
        let result = run::steps(
            &plan,
            &ws,
            x,
            given,
            split..plan.steps.len(),
            n,
            threads > 1,
            &mut pool,
            &[plan.output],
        );
        POOL.with(|p| *p.borrow_mut() = pool);
        result?.pop().expect("one export")
    } else {
        let k = boundary
            .iter()
            .position(|&v| v == plan.output)
            .expect("exported");
        given.swap_remove(k).1
    };
    Ok(Some(Tensor::from_vec(
        out,
        out_dims.with_batch(n),
        &Device::Cpu,
    )?))
}
