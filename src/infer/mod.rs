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
//!   convolutions instead;
//! - where it measured faster (`channels_last::chosen`), the chunks run channels last (NHWC,
//!   `channels_last.rs`), where a convolution's product has the chunk's pixels as rows and
//!   depthwise, pooling and epilogues vectorise across channels: the small planes of the
//!   last stages no longer starve the vector units.
//!
//! Parameters are borrowed from the weights for the call, not copied. Channels last, the
//! convolution weights are rearranged: once per call in [`forward`] (training changes the
//! weights in place), once per model in an [`Engine`], which also keeps the plans. Only
//! f32 CPU tensors run here; `exec::forward` sends anything else down the Candle path.
//!
//! `SLIMCANDLE_INFER_CHUNK=n` overrides the NCHW chunk size (samples; across threads an upper
//! bound, the chunks balanced below it), and
//! `SLIMCANDLE_LAYOUT=nchw|nhwc` the layout, for timing experiments.

mod channels_last;
mod engine;
mod epilogue;
mod plan;
mod run;

pub use engine::Engine;

use crate::exec::check_input;
use crate::graph::{Graph, NodeId};
use crate::weights::Weights;
use anyhow::Result;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Values per sample of the largest activation that a chunk should keep in cache: the chunk
/// holds as many samples as fit this budget (between 1 and [`MAX_CHUNK`]).
const CHUNK_BUDGET: usize = 1 << 18;
const MAX_CHUNK: usize = 16;

/// Values per chunk of the largest channels-last value: its chunks hold as many samples as
/// fit (at most the batch shared by the threads). Larger than [`CHUNK_BUDGET`]: the rows of
/// a channels-last product are the chunk's pixels, and each chunk reads every weight again.
const CHANNELS_LAST_BUDGET: usize = 1 << 19;

thread_local! {
    /// Each thread's recycled buffers, kept between calls.
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// How the executor stores the values of the chunked steps (the linear tail reads one value
/// per channel, the same in both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Chosen per call (`channels_last::chosen`): channels last where it measured faster,
    /// which depends on the batch and on whether the weights' rearrangement is kept between
    /// calls ([`Engine`]) or made on each.
    /// The environment variable `SLIMCANDLE_LAYOUT=nchw|nhwc` overrides it (timing
    /// experiments).
    Auto,
    /// NCHW: each channel's plane contiguous (`run.rs`).
    Planes,
    /// NHWC: each pixel's channels contiguous (`channels_last.rs`), where the CPU runs it.
    ChannelsLast,
}

impl Layout {
    /// The layout for a call: as given, but `Auto` overridden by `SLIMCANDLE_LAYOUT`.
    fn choose(self) -> Layout {
        if self != Layout::Auto {
            return self;
        }
        match std::env::var("SLIMCANDLE_LAYOUT").as_deref() {
            Ok("nhwc") => Layout::ChannelsLast,
            Ok("nchw") => Layout::Planes,
            _ => Layout::Auto,
        }
    }
}

/// Eval-mode forward pass of `graph` on `x` (N x C x H x W). Returns `None` when the input or
/// a parameter is not an f32 CPU tensor, which the Candle path handles instead.
pub fn forward(graph: &Graph, weights: &Weights, x: &Tensor) -> Result<Option<Tensor>> {
    forward_with(graph, weights, x, Layout::Auto)
}

/// [`forward`] with the layout given (the tests run both).
pub fn forward_with(
    graph: &Graph,
    weights: &Weights,
    x: &Tensor,
    layout: Layout,
) -> Result<Option<Tensor>> {
    let Some((h, w)) = input_size(graph, x)? else {
        return Ok(None);
    };
    let dims = graph.infer_shapes(h, w)?;
    let Some(plan) = plan::build(graph, weights, dims)? else {
        return Ok(None);
    };
    execute(&plan, x, layout, Rearranged::PerCall)
}

/// The height and width of `x` once it is checked against `graph`'s input, or `None` where
/// the fused executor does not run it (not an f32 CPU tensor).
fn input_size(graph: &Graph, x: &Tensor) -> Result<Option<(usize, usize)>> {
    check_input(graph, x.dims())?;
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (_, _, h, w) = x.dims4()?;
    Ok(Some((h, w)))
}

/// Where a channels-last pass gets its rearranged weights.
enum Rearranged<'a> {
    /// Made for this call, into buffers recycled between calls ([`forward`]).
    PerCall,
    /// Made on the first call and kept ([`Engine`]).
    Kept(&'a OnceLock<channels_last::Prepared>),
}

/// Runs `plan` on `x` (an f32 CPU tensor of the plan's input size, checked by the caller).
fn execute(
    plan: &plan::Plan,
    x: &Tensor,
    layout: Layout,
    rearranged: Rearranged<'_>,
) -> Result<Option<Tensor>> {
    let n = x.dims()[0];
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

    let out_dims = plan.output_dims;
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
    // The chunked steps [0, b), then the tail [b, ..) on the whole batch (NCHW), which
    // receives the values it reads as whole-batch NCHW vectors.
    let channels_last = match layout.choose() {
        Layout::ChannelsLast => true,
        Layout::Auto => {
            let kept = matches!(rearranged, Rearranged::Kept(_));
            channels_last::chosen(plan, n, threads, kept)
        }
        Layout::Planes => false,
    } && plan.tail > 0
        && channels_last::supports(plan, 0..plan.tail);
    let parallel = threads > 1 && !across;
    let (mut given, split) = if channels_last {
        let b = plan.tail;
        let clock = crate::profile::enabled().then(std::time::Instant::now);
        let prepared: Cow<'_, [Option<Vec<f32>>]> = match rearranged {
            Rearranged::PerCall => Cow::Owned(channels_last::prepare(
                plan,
                &ws,
                0..b,
                channels_last::recycled(),
            )),
            Rearranged::Kept(kept) => Cow::Borrowed(
                kept.get_or_init(|| channels_last::prepare(plan, &ws, 0..b, Vec::new())),
            ),
        };
        if let Some(start) = clock {
            crate::profile::record("eval channels-last weights", start.elapsed());
        }
        let largest = plan.steps[..b]
            .iter()
            .map(|s| plan.dims[s.out].elements())
            .max()
            .unwrap_or(1);
        let mut chunk = (CHANNELS_LAST_BUDGET / largest.max(1)).max(1);
        if across {
            chunk = chunk.min(n.div_ceil(threads));
        }
        let export = read_from(plan, b);
        let result = chunked(n, chunk.min(n), across, &export, &|first, samples| {
            let xs = &x[first * in_len..(first + samples) * in_len];
            with_pool(|pool| {
                let (steps, n) = (0..b, samples);
                let ws = &ws;
                channels_last::steps(plan, ws, &prepared, xs, steps, n, parallel, pool, &export)
            })
        });
        if let Cow::Owned(fresh) = prepared {
            channels_last::recycle(fresh);
        }
        (result?, b)
    } else {
        let b = match plan.small_tail {
            Some((start, widest)) if chunk * widest < plan::TAIL_COLUMNS => start,
            _ => plan.tail,
        };
        let export = read_from(plan, b);
        let result = chunked(n, chunk, across, &export, &|first, samples| {
            let xs = &x[first * in_len..(first + samples) * in_len];
            with_pool(|pool| {
                let (steps, n) = (0..b, samples);
                run::steps(plan, &ws, xs, Vec::new(), steps, n, parallel, pool, &export)
            })
        });
        (result?, b)
    };
    let out = if split < plan.steps.len() {
        let steps = split..plan.steps.len();
        let parallel = threads > 1;
        let export = [plan.output];
        let result =
            with_pool(|pool| run::steps(plan, &ws, x, given, steps, n, parallel, pool, &export));
        result?.pop().expect("one export")
    } else {
        match given.iter().position(|(v, _)| *v == plan.output) {
            Some(k) => given.swap_remove(k).1,
            None => x.to_vec(),
        }
    };
    Ok(Some(Tensor::from_vec(
        out,
        out_dims.with_batch(n),
        &Device::Cpu,
    )?))
}

/// The values that `plan.steps[from..]` read (and the output) but do not compute, sorted.
fn read_from(plan: &plan::Plan, from: usize) -> Vec<NodeId> {
    let later = &plan.steps[from..];
    let mut values: Vec<NodeId> = later
        .iter()
        .flat_map(|s| s.reads())
        .chain(std::iter::once(plan.output))
        .filter(|&v| !later.iter().any(|s| s.out == v))
        .collect();
    values.sort_unstable();
    values.dedup();
    values
}

/// Runs `run(first, samples)` on chunks of at most `chunk` samples of a batch of `n` (on the
/// rayon pool with `across`), each returning the values `export`; returns those values
/// for the whole batch, chunks in order.
///
/// Across threads, the chunks are a multiple of the thread count (unless that exceeds the
/// samples: then one sample each) and differ in size by one
/// sample at most, so that every thread gets the same work: chunks of the largest size that
/// fits left 32 samples as 7, 7, 7, 7 and 4 (MobileNet V1 0.5 at 96x96), one thread running
/// 18 while the other ran 14 (MobileNet V3 small 14, 14 and 4: 18 against 14).
fn chunked(
    n: usize,
    chunk: usize,
    across: bool,
    export: &[NodeId],
    run: &(dyn Fn(usize, usize) -> Result<Vec<Vec<f32>>> + Sync),
) -> Result<Vec<(NodeId, Vec<f32>)>> {
    let mut chunks = n.div_ceil(chunk.max(1));
    if across {
        let threads = rayon::current_num_threads();
        chunks = chunks.div_ceil(threads) * threads;
    }
    // (No chunk at all for an empty batch, as before.)
    let chunks = chunks.min(n);
    let bound = |i: usize| i * n / chunks;
    let one = |i: usize| run(bound(i), bound(i + 1) - bound(i));
    let parts: Vec<Vec<Vec<f32>>> = if across {
        (0..chunks)
            .into_par_iter()
            .map(one)
            .collect::<Result<_>>()?
    } else {
        (0..chunks).map(one).collect::<Result<_>>()?
    };
    Ok(export
        .iter()
        .enumerate()
        .map(|(k, &v)| {
            let mut whole = Vec::with_capacity(parts.iter().map(|p| p[k].len()).sum());
            for p in &parts {
                whole.extend_from_slice(&p[k]);
            }
            (v, whole)
        })
        .collect())
}

/// `f` with this thread's recycled buffers.
fn with_pool<T>(f: impl FnOnce(&mut Vec<Vec<f32>>) -> T) -> T {
    let mut pool = POOL.with(|p| p.take());
    let result = f(&mut pool);
    POOL.with(|p| *p.borrow_mut() = pool);
    result
}
