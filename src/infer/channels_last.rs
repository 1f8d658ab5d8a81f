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
//! The same plan and buffer pool as the NCHW executor (`run.rs`); the chunk's input is
//! transposed in, and exported values with planes larger than one pixel are transposed back.
//! The weights are rearranged once per forward pass ([`prepare`]). A convolution whose only
//! reader is a concatenation writes into its columns of the concatenation's output, at any
//! batch size.

use super::plan::{Plan, Step, StepKind};
use super::run::{Buf, Values, epilogue, placements, profile_label};
use crate::graph::NodeId;
use crate::kernels::conv::ConvGeom;
use crate::kernels::{conv_channels_last, depthwise, pool};
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

/// The weights of each convolution step among `plan.steps[steps]` in the layout its
/// channels-last kernel reads (`None` for the other steps): depthwise filters tap-major,
/// other convolutions as their products' right-hand matrices. Once per forward pass, on
/// the rayon pool.
pub(crate) fn prepare(plan: &Plan, ws: &[&[f32]], steps: Range<usize>) -> Vec<Option<Vec<f32>>> {
    plan.steps[steps]
        .par_iter()
        .map(|step| {
            let StepKind::Conv { weight, .. } = step.kind else {
                return None;
            };
            let g = geometry(plan, step, 1).ok()?;
            let w = ws[weight];
            Some(if depthwise::supports(&g) {
                depthwise::taps_major(w, g.c_in, g.k * g.k)
            } else {
                conv_channels_last::weights(&g, w)
            })
        })
        .collect()
}

/// `n` samples of `c` planes of `p` values, NCHW to NHWC (`back`: NHWC to NCHW).
pub(crate) fn transpose(x: &[f32], (n, c, p): (usize, usize, usize), back: bool, y: &mut [f32]) {
    for s in 0..n {
        let (xs, ys) = (
            &x[s * c * p..(s + 1) * c * p],
            &mut y[s * c * p..(s + 1) * c * p],
        );
        for ch in 0..c {
            for q in 0..p {
                if back {
                    ys[ch * p + q] = xs[q * c + ch];
                } else {
                    ys[q * c + ch] = xs[ch * p + q];
                }
            }
        }
    }
}

fn geometry(plan: &Plan, step: &Step, n: usize) -> Result<ConvGeom> {
    let StepKind::Conv {
        kernel,
        stride,
        padding,
        dilation,
        groups,
        ..
    } = step.kind
    else {
        bail!("not a convolution");
    };
    let din = plan.dims[step.inputs[0]];
    let dout = plan.dims[step.out];
    Ok(ConvGeom::new(
        &[n, din.c, din.h, din.w],
        &[dout.c, din.c / groups, kernel, kernel],
        stride,
        padding,
        dilation,
        groups,
    )?)
}

/// Runs `plan.steps[steps]` on `n` samples with values channels last; `given` are the values
/// they read from earlier steps (node 0 for the network input), in NCHW. Returns the values
/// in `export`, in that order, in NCHW. `prepared` comes from [`prepare`] for the same
/// steps. On the calling thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn steps(
    plan: &Plan,
    ws: &[&[f32]],
    prepared: &[Option<Vec<f32>>],
    given: Vec<(NodeId, &[f32])>,
    steps: Range<usize>,
    n: usize,
    pool: &mut Vec<Vec<f32>>,
    export: &[NodeId],
) -> Result<Vec<Vec<f32>>> {
    let steps = &plan.steps[steps];
    let mut uses = vec![0; plan.dims.len()];
    for v in steps
        .iter()
        .flat_map(Step::reads)
        .chain(export.iter().copied())
    {
        uses[v] += 1;
    }
    let places = placements(plan, steps, &uses, true);
    let mut placed = vec![false; plan.dims.len()];
    for (step, place) in steps.iter().zip(&places) {
        placed[step.out] = place.is_some();
    }
    let mut values = Values {
        x: &[],
        vals: (0..plan.dims.len()).map(|_| None).collect(),
        uses,
        placed,
        pool,
    };
    for (v, vals) in given {
        let d = plan.dims[v];
        let mut buf = values.alloc(vals.len());
        transpose(vals, (n, d.c, d.h * d.w), false, &mut buf);
        values.vals[v] = Some(buf);
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
                    n,
                    &mut cols,
                    (&mut out[channel..], dc.c),
                );
                values.vals[concat] = Some(out);
                done.map(|()| None)
            }
            None => run_step(plan, ws, (step, &prepared[i]), &mut values, n, &mut cols).map(Some),
        }
        .with_context(|| format!("eval step at node {}", step.node))?;
        if let Some(start) = clock {
            crate::profile::record(&profile_label(plan, step), start.elapsed());
        }
        values.release(step);
        values.vals[step.out] = y;
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
    n: usize,
    cols: &mut Vec<f32>,
    (y, ldc): (&mut [f32], usize),
) -> Result<()> {
    let StepKind::Conv { epi, .. } = &step.kind else {
        unreachable!("conv() runs convolution steps")
    };
    let g = geometry(plan, step, n)?;
    let wt = prepared.as_deref().context("weights not prepared")?;
    let x = values.get(step.inputs[0]);
    let c_out = g.c_out;
    let res = epi.residual.map(|r| values.get(r));
    let e = epilogue(plan, ws, epi);
    let mut post = |first: usize, rows: usize, block: &mut [f32]| {
        let r = res.map(|r| (&r[first * c_out..], c_out));
        e.apply_rows(block, rows, (ldc, c_out), r);
    };
    if depthwise::supports(&g) {
        depthwise::forward_channels_last(&g, x, wt, y, ldc, &mut |first, block| {
            post(first, g.wo, block)
        });
    } else {
        conv_channels_last::forward(&g, x, wt, y, ldc, cols, &mut post);
    }
    Ok(())
}

fn run_step(
    plan: &Plan,
    ws: &[&[f32]],
    (step, prepared): (&Step, &Option<Vec<f32>>),
    values: &mut Values,
    n: usize,
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
                n,
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
            let inv = 1.0 / p_in as f32;
            for (out, sample) in y.chunks_exact_mut(c).zip(x.chunks_exact(p_in * c)) {
                out.fill(0.0);
                for pixel in sample.chunks_exact(c) {
                    for (o, &v) in out.iter_mut().zip(pixel) {
                        *o += v;
                    }
                }
                for o in out.iter_mut() {
                    *o *= inv;
                }
            }
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
            let (c, per_group) = (din.c, din.c / groups);
            // Output channel o = i g + gi is input channel gi C/g + i.
            let from: Vec<usize> = (0..c)
                .map(|o| (o % groups) * per_group + o / groups)
                .collect();
            for (dst, src) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                for (d, &f) in dst.iter_mut().zip(&from) {
                    *d = src[f];
                }
            }
            y
        }
        StepKind::ChannelMul => {
            let mut y = values.take_or_copy(step.inputs[0]);
            let scale = values.get(step.inputs[1]);
            let c = din.c;
            if p_in > 0 {
                for (sample, s) in y.chunks_exact_mut(p_in * c).zip(scale.chunks_exact(c)) {
                    for pixel in sample.chunks_exact_mut(c) {
                        for (v, &m) in pixel.iter_mut().zip(s) {
                            *v *= m;
                        }
                    }
                }
            }
            y
        }
    })
}
