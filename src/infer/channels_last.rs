//! Runs a plan's chunked steps with every value stored channels last (NHWC): each pixel's
//! channels side by side.
//!
//! Why: the NCHW kernels vectorise along a plane, and the last stages of these networks have
//! small planes (6x6 down to 3x3 at 96x96 inputs, 4x4 down to 1x1 at 32x32): a 6x6 plane
//! fills 36 of 48 lanes, a 1x1 convolution on it is a product of 36 columns, and MobileNet
//! V2's depthwise convolutions there ran at 4-17 GMAC/s. Channels last, a convolution's
//! product has the chunk's pixels as rows and the output channels as columns
//! (`kernels::conv_channels_last`), and a depthwise convolution, pooling window or epilogue
//! is a vector operation across channels, whatever the plane's size. This is how
//! onnxruntime's and OpenVINO's CPU kernels lay out these networks.
//!
//! The same plan and buffer pool as the NCHW executor (`run.rs`). The network input stays
//! NCHW for the stem convolution, which reads it in place (`kernels::stem_channels_last`);
//! it is transposed only for other readers, as are the exported values back to NCHW.
//! The weights are rearranged by [`prepare`]: per call in `infer::forward`, once per input
//! size in an `infer::Engine`. A convolution whose only
//! reader is a concatenation writes into its columns of the concatenation's output, at any
//! batch size.

use super::epilogue::Epilogue;
use super::plan::{Plan, Step, StepKind};
use super::run::{Buf, Values, conv_geometry, epilogue};
use crate::graph::NodeId;
use crate::kernels::conv::ConvGeom;
use crate::kernels::{
    conv_channels_last, depthwise, depthwise_channels_last, pool, shuffle, stem_channels_last,
    team, transpose,
};
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use std::ops::Range;

/// Whether every step in `plan.steps[steps]` runs here: all but the linear layers (the tail,
/// on the whole batch, stays in the NCHW executor; its one-pixel inputs are the same in
/// both layouts), on CPUs where our GEMM runs.
pub(crate) fn supports(plan: &Plan, steps: Range<usize>) -> bool {
    conv_channels_last::available()
        && plan.steps[steps]
            .iter()
            .all(|s| !matches!(s.kind, StepKind::Linear { .. }))
}

/// Whether [`Layout::Auto`](super::Layout::Auto) runs `plan` channels last for a batch of
/// `n` on `threads` threads, with the weights rearranged on every call (`kept` false,
/// [`super::forward`]) or kept between calls (an [`super::Engine`]).
///
/// Plans that split channels (`Slice`, ShuffleNet V2's units) only with the weights kept: a
/// split, concatenation and shuffle move whole planes in NCHW but gather every pixel's
/// channels here. With a scalar shuffle on one thread ShuffleNet V2 ran 10-45% slower
/// channels last; with the vectorised shuffle on the team it is faster at every size (median
/// of 4 alternating pairs, weights kept: 96x96 b32 +47%, 224x224 b8 +27%, b1 +33%, one
/// thread b8 +14%, 32x32 b64 +3%, b1 +4%); per call, not measured, so NCHW as before.
/// Otherwise, measured with every family against NCHW (docs/performance.md):
/// - weights rearranged per call: from a batch of [`MIN_BATCH`] with a sample for every
///   thread (MobileNet V2 +14% to +60%, V3 small +15% to +50%, SqueezeNet 1.1 +15% to +25%,
///   MobileNet V1 0.5 +8% to +50%, ShuffleNet V1 level to +30%, at 32x32 batch 64, 96x96
///   batch 32, 224x224 batch 8); a smaller batch does not pay the rearrangement back;
/// - weights kept: at any batch. Batch 1, two threads: MobileNet V2 224x224 5.4-5.7 ->
///   4.0-4.4 ms, SqueezeNet 1.1 3.8 -> 3.0, MobileNet V1 0.5 2.35 -> 1.66, V3 small
///   1.76-1.85 -> 1.47; one thread: MobileNet V2 224x224 8.3 -> 6.6, 32x32 1.30 -> 0.83.
///   ShuffleNet V1 at batch 1 ran NCHW while the channel shuffle was a scalar per-pixel
///   gather on one thread; with the vectorised shuffle on the team
///   ([`shuffle::channels_last`]) channels last is 17% (224x224) and 8% (32x32) faster
///   (median of 8 alternating pairs, two threads).
pub(crate) fn chosen(plan: &Plan, n: usize, threads: usize, kept: bool) -> bool {
    let splits = plan.steps[..plan.tail]
        .iter()
        .any(|s| matches!(s.kind, StepKind::Slice { .. }));
    kept || (!splits && n >= threads.max(MIN_BATCH))
}

/// The smallest batch that runs channels last when the weights are rearranged on every
/// call ([`chosen`]): one thread, batch 1, MobileNet V2 at 32x32 ran 447-467 images/s
/// channels last against 805-822 in NCHW, at 224x224 98-107 against 107-115; at batch 8
/// (two threads, 224x224) channels last was 19% faster.
pub(crate) const MIN_BATCH: usize = 4;

/// Per step: a convolution's weights in the layout its channels-last kernel reads (`None`
/// for the other steps), from [`prepare`].
pub(crate) type Prepared = Vec<Option<Vec<f32>>>;

/// The weights of each convolution step among `plan.steps[steps]` in the layout its
/// channels-last kernel reads: depthwise filters tap-major, other convolutions as their
/// products' right-hand matrices. On the rayon pool, into `buffers` (by step; fresh ones
/// where missing): a forward pass that rearranges the weights on every call passes the
/// last call's ([`recycled`]), which fresh ones would page-fault in every time.
pub(crate) fn prepare(
    plan: &Plan,
    ws: &[&[f32]],
    steps: Range<usize>,
    mut buffers: Vec<Vec<f32>>,
) -> Prepared {
    buffers.resize_with(steps.len(), Vec::new);
    plan.steps[steps]
        .par_iter()
        .zip(buffers)
        .map(|(step, mut wt)| {
            let StepKind::Conv { weight, .. } = step.kind else {
                return None;
            };
            let g = conv_geometry(plan, step, 1).ok()?;
            let w = ws[weight];
            if reads_stem(step, &g) {
                stem_channels_last::weights(&g, w, &mut wt);
            } else if depthwise::supports(&g) {
                // c x (k k) to (k k) x c.
                wt.resize(w.len(), 0.0);
                transpose::transpose(w, (g.c_in, g.k * g.k), &mut wt);
            } else {
                conv_channels_last::weights(&g, w, &mut wt);
            }
            Some(wt)
        })
        .collect()
}

/// Whether `step` (a convolution of geometry `g`) reads the network input in NCHW, in place
/// (`kernels::stem_channels_last`).
fn reads_stem(step: &Step, g: &ConvGeom) -> bool {
    step.inputs[0] == 0 && stem_channels_last::supports(g)
}

/// The buffers of the last per-call [`prepare`], kept for the next call (by step, so that
/// each is usually the right size already).
static RECYCLED: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// The buffers [`recycle`] kept (empty when another call holds them).
pub(crate) fn recycled() -> Vec<Vec<f32>> {
    RECYCLED
        .lock()
        .map(|mut k| std::mem::take(&mut *k))
        .unwrap_or_default()
}

/// Gives a per-call [`prepare`]'s buffers back for the next call.
pub(crate) fn recycle(prepared: Prepared) {
    let buffers = prepared
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect();
    if let Ok(mut kept) = RECYCLED.lock() {
        *kept = buffers;
    }
}

/// `n` samples of `c` planes of `p` values, NCHW to NHWC (`back`: NHWC to NCHW).
pub(crate) fn transpose(x: &[f32], (n, c, p): (usize, usize, usize), back: bool, y: &mut [f32]) {
    let shape = if back { (p, c) } else { (c, p) };
    for (xs, ys) in x.chunks_exact(c * p).zip(y.chunks_exact_mut(c * p)).take(n) {
        transpose::transpose(xs, shape, ys);
    }
}

/// Runs `plan.steps[steps]` (the chunked steps from the first) on the `n` samples of `x`, the
/// network input in NCHW, with values channels last. Returns the values
/// in `export`, in that order, in NCHW. `prepared` comes from [`prepare`] for the same
/// steps. With `parallel` (a batch smaller than the thread count), the convolutions share
/// their rows out over the team.
#[allow(clippy::too_many_arguments)]
pub(crate) fn steps(
    plan: &Plan,
    ws: &[&[f32]],
    prepared: &[Option<Vec<f32>>],
    x: &[f32],
    steps: Range<usize>,
    n: usize,
    parallel: bool,
    pool: &mut Vec<Vec<f32>>,
    export: &[NodeId],
) -> Result<Vec<Vec<f32>>> {
    let steps = &plan.steps[steps];
    let (mut values, places) = Values::for_steps(plan, steps, export, x, true, pool);
    // The network input stays NCHW for the stems that read it in place; any other read
    // (another step, a residual, an export) gets it transposed.
    let other_reads = export.contains(&0)
        || steps.iter().any(|s| {
            // (Only convolutions: a geometry error costs a captured backtrace per step.)
            let stem = matches!(s.kind, StepKind::Conv { .. })
                && conv_geometry(plan, s, n).is_ok_and(|g| reads_stem(s, &g));
            s.reads()
                .enumerate()
                .any(|(i, r)| r == 0 && !(i == 0 && stem))
        });
    if other_reads {
        let d = plan.dims[0];
        let mut buf = values.alloc(x.len());
        transpose(x, (n, d.c, d.h * d.w), false, &mut buf);
        values.vals[0] = Some(buf);
    }
    let mut cols = Vec::new();
    let profiling = crate::profile::enabled();
    for ((i, step), place) in steps.iter().enumerate().zip(places) {
        let clock = profiling.then(std::time::Instant::now);
        let y = match place {
            Some((concat, channel)) => {
                let dc = plan.dims[concat];
                let mut out = values.take_or_alloc(concat, n * dc.elements());
                let done = conv(
                    plan,
                    ws,
                    (step, &prepared[i]),
                    &values,
                    (n, parallel),
                    &mut cols,
                    (&mut out[channel..], dc.c),
                );
                values.vals[concat] = Some(out);
                done.map(|()| None)
            }
            None => {
                let step = (step, &prepared[i]);
                run_step(plan, ws, step, &mut values, (n, parallel), &mut cols).map(Some)
            }
        }
        .with_context(|| format!("eval step at node {}", step.node))?;
        values.finish(plan, step, clock, y);
    }
    let out = export
        .iter()
        .map(|&v| {
            let d = plan.dims[v];
            let vals = values.get(v);
            let mut y = vec![0f32; vals.len()];
            transpose(vals, (n, d.c, d.h * d.w), true, &mut y);
            y
        })
        .collect();
    let Values { vals, pool, .. } = values;
    pool.extend(vals.into_iter().flatten().map(|b| b.data));
    Ok(out)
}

/// A convolution step (with its fused epilogue) into `y`, `ldc` values per output pixel: a
/// fresh buffer, or from its first column on in its concatenation's output.
fn conv(
    plan: &Plan,
    ws: &[&[f32]],
    (step, prepared): (&Step, &Option<Vec<f32>>),
    values: &Values,
    (n, parallel): (usize, bool),
    cols: &mut Vec<f32>,
    (y, ldc): (&mut [f32], usize),
) -> Result<()> {
    let StepKind::Conv { epi, .. } = &step.kind else {
        unreachable!("conv() runs convolution steps")
    };
    let g = conv_geometry(plan, step, n)?;
    let wt = prepared.as_deref().context("weights not prepared")?;
    let x = values.get(step.inputs[0]);
    let c_out = g.c_out;
    let res = epi.residual.map(|r| values.get(r));
    let e = epilogue(plan, ws, epi);
    let threads = if parallel { team::size() } else { 1 };
    let post = |first: usize, rows: usize, channels: Range<usize>, block: &mut [f32]| {
        let r = res.map(|r| (&r[first * c_out + channels.start..], c_out));
        e.apply_channels(block, rows, (ldc, channels), r);
    };
    if reads_stem(step, &g) {
        let post = |first: usize, block: &mut [f32]| post(first, g.wo, 0..c_out, block);
        stem_channels_last::forward(&g, values.x, wt, y, ldc, threads, &post);
    } else if depthwise::supports(&g) {
        let post = |first: usize, block: &mut [f32]| post(first, g.wo, 0..c_out, block);
        depthwise_channels_last::forward(&g, x, wt, y, ldc, threads, &post);
    } else {
        conv_channels_last::forward(&g, x, wt, y, ldc, cols, threads, &post);
    }
    Ok(())
}

fn run_step(
    plan: &Plan,
    ws: &[&[f32]],
    (step, prepared): (&Step, &Option<Vec<f32>>),
    values: &mut Values,
    (n, parallel): (usize, bool),
    cols: &mut Vec<f32>,
) -> Result<Buf> {
    let din = plan.dims[step.inputs[0]];
    let dout = plan.dims[step.out];
    let (p_in, p_out) = (din.h * din.w, dout.h * dout.w);
    Ok(match &step.kind {
        StepKind::Conv { .. } => {
            let mut y = values.alloc(n * dout.elements());
            conv(
                plan,
                ws,
                (step, prepared),
                values,
                (n, parallel),
                cols,
                (&mut y, dout.c),
            )?;
            y
        }
        StepKind::Linear { .. } => bail!("linear layers run in the NCHW executor"),
        StepKind::Pointwise { epi } => {
            let mut y = values.take_or_copy(step.inputs[0]);
            let res = epi.residual.map(|r| (values.get(r), dout.c));
            let e = epilogue(plan, ws, epi);
            e.apply_rows(&mut y, n * p_out, (dout.c, dout.c), res);
            y
        }
        StepKind::GlobalAvgPool => {
            let c = din.c;
            let mut y = values.alloc(n * c);
            let x = values.get(step.inputs[0]);
            pool::global_avg_channels_last(x, (n, p_in, c), &mut y);
            y
        }
        StepKind::Pool {
            max,
            kernel,
            stride,
            padding,
            ceil,
        } => {
            let mut y = values.alloc(n * dout.elements());
            let x = values.get(step.inputs[0]);
            pool::pool_channels_last_into(
                *max,
                *kernel,
                *stride,
                *padding,
                *ceil,
                (n, din.h, din.w, din.c),
                x,
                &mut y,
                if parallel { team::size() } else { 1 },
            )?;
            y
        }
        StepKind::Concat => {
            let c = dout.c;
            let mut y = values.take_or_alloc(step.out, n * dout.elements());
            let mut first = 0;
            for &v in &step.inputs {
                let width = plan.dims[v].c;
                if !values.placed[v] {
                    let x = values.get(v);
                    for (dst, src) in y.chunks_exact_mut(c).zip(x.chunks_exact(width)) {
                        dst[first..first + width].copy_from_slice(src);
                    }
                }
                first += width;
            }
            y
        }
        StepKind::Slice { start, end } => {
            let mut y = values.alloc(n * dout.elements());
            let x = values.get(step.inputs[0]);
            for (dst, src) in y.chunks_exact_mut(dout.c).zip(x.chunks_exact(din.c)) {
                dst.copy_from_slice(&src[*start..*end]);
            }
            y
        }
        StepKind::Shuffle { groups } => {
            let mut y = values.alloc(n * dout.elements());
            let x = values.get(step.inputs[0]);
            let threads = if parallel { team::size() } else { 1 };
            shuffle::channels_last(x, &mut y, din.c, *groups, threads);
            y
        }
        StepKind::ChannelMul => {
            let mut y = values.take_or_copy(step.inputs[0]);
            let scale = values.get(step.inputs[1]);
            let c = din.c;
            if p_in > 0 {
                // Each sample's pixels times its channels' factors: the epilogue's vector
                // pass (`v s + 0`, the same product), where this loop was left at four lanes.
                for (sample, s) in y.chunks_exact_mut(p_in * c).zip(scale.chunks_exact(c)) {
                    let e = Epilogue {
                        scale: Some(s),
                        ..Epilogue::default()
                    };
                    e.apply_rows(sample, p_in, (c, c), None);
                }
            }
            y
        }
    })
}
