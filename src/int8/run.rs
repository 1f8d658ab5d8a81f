//! Runs the int8 plan on one chunk of the batch, on channels-last u8 buffers, step by step.
//!
//! Buffers come from a per-thread pool and go back to it after their value's last reader, so
//! a warm chunk allocates nothing (as the float executor's `infer/run.rs`).

use super::plan::{ConvParams, Kernel, Plan, Step};
use crate::graph::{Dims, NodeId};
use crate::kernels::conv::ConvGeom;
use crate::kernels::gemm::{MatMut, MatRef, Parallelism, matmul};
use crate::kernels::int8::Level;
use crate::kernels::int8::conv::{ConvShape, DepthwiseScratch, depthwise, im2col};
use crate::kernels::int8::elementwise::{
    PoolShape, add, avg_pool, channel_mul, dequantize, lookup, max_pool, quantize_to_nhwc,
};
use crate::kernels::int8::gemm::gemm;
use crate::kernels::{conv_gemm, depthwise as float_depthwise};
use crate::passes::quant::QParams;
use anyhow::{Context, Result, bail};

/// A thread's reusable memory.
#[derive(Default)]
pub(crate) struct Scratch {
    pool: Vec<Vec<u8>>,
    cols: Vec<u8>,
    acc: Vec<i32>,
    depthwise: DepthwiseScratch,
}

impl Scratch {
    /// A buffer of `len` bytes with arbitrary contents: the smallest pooled one that fits.
    fn alloc(&mut self, len: usize) -> Vec<u8> {
        let best = (0..self.pool.len())
            .filter(|&i| self.pool[i].len() >= len)
            .min_by_key(|&i| self.pool[i].len())
            .or_else(|| (0..self.pool.len()).max_by_key(|&i| self.pool[i].len()));
        let mut buf = best.map(|i| self.pool.swap_remove(i)).unwrap_or_default();
        buf.resize(len, 0);
        buf.truncate(len);
        buf
    }
}

/// Runs the plan on `n` samples of `x` (NCHW f32, `dims[0]` each); returns the output of each
/// sample, dequantized, in NCHW order.
pub(crate) fn chunk(
    plan: &Plan,
    dims: &[Dims],
    level: Level,
    x: &[f32],
    n: usize,
    scratch: &mut Scratch,
    dump: Option<(&std::path::Path, &crate::graph::Graph)>,
) -> Result<Vec<f32>> {
    let mut uses = vec![0usize; dims.len()];
    for s in &plan.steps {
        for &v in &s.inputs {
            uses[v] += 1;
        }
    }
    uses[plan.output] += 1;
    let mut vals: Vec<Option<Vec<u8>>> = vec![None; dims.len()];
    let mut float_out: Option<Vec<f32>> = None;

    let d0 = dims[0];
    let (c0, hw0) = (d0.c, d0.h * d0.w);
    let mut q0 = scratch.alloc(n * d0.elements());
    for (xs, qs) in x
        .chunks_exact(d0.elements())
        .zip(q0.chunks_exact_mut(d0.elements()))
    {
        quantize_to_nhwc(
            level,
            xs,
            c0,
            hw0,
            plan.input.scale,
            plan.input.zero_point,
            qs,
        );
    }
    if let Some((dir, graph)) = dump {
        write_dump(dir, &graph.nodes[0].name, &q0)?;
    }
    vals[0] = Some(q0);

    for step in &plan.steps {
        let y = run_step(step, dims, level, &vals, n, scratch)
            .with_context(|| format!("int8 step at node {}", step.node))?;
        match y {
            Out::Codes(y) => {
                if let Some((dir, graph)) = dump {
                    write_dump(dir, &graph.nodes[step.node].name, &y)?;
                }
                vals[step.node] = Some(y)
            }
            Out::Float(y) => float_out = Some(y),
        }
        for &v in &step.inputs {
            uses[v] -= 1;
            if uses[v] == 0
                && let Some(buf) = vals[v].take()
            {
                scratch.pool.push(buf);
            }
        }
    }
    let out = match float_out {
        Some(f) => f,
        None => {
            let Some(q) = plan.output_q else {
                bail!("the network output is neither quantized nor float");
            };
            let d = dims[plan.output];
            let codes = vals[plan.output].as_deref().context("output computed")?;
            to_nchw_f32(level, codes, n, d, q)
        }
    };
    scratch.pool.extend(vals.into_iter().flatten());
    Ok(out)
}

/// One value's codes for `SLIMCANDLE_INT8_DUMP` (see `int8::dump_dir`).
fn write_dump(dir: &std::path::Path, name: &str, codes: &[u8]) -> Result<()> {
    let path = dir.join(format!("{name}.u8"));
    std::fs::write(&path, codes)
        .with_context(|| format!("SLIMCANDLE_INT8_DUMP: writing {}", path.display()))
}

enum Out {
    Codes(Vec<u8>),
    Float(Vec<f32>),
}

/// NHWC codes to real values in NCHW order.
fn to_nchw_f32(level: Level, codes: &[u8], n: usize, d: Dims, q: QParams) -> Vec<f32> {
    let mut real = vec![0f32; codes.len()];
    dequantize(level, codes, q.scale, q.zero_point, &mut real);
    let (c, hw) = (d.c, d.h * d.w);
    if hw == 1 {
        return real;
    }
    let mut out = vec![0f32; real.len()];
    for s in 0..n {
        for p in 0..hw {
            for ch in 0..c {
                out[(s * c + ch) * hw + p] = real[(s * hw + p) * c + ch];
            }
        }
    }
    out
}

/// One sample's geometry for a conv on input `d`.
fn shape(d: Dims, conv: &ConvParams) -> ConvShape {
    ConvShape {
        h: d.h,
        w: d.w,
        c: d.c,
        k: conv.k,
        stride: conv.stride,
        pad: conv.pad,
    }
}

fn run_step(
    step: &Step,
    dims: &[Dims],
    level: Level,
    vals: &[Option<Vec<u8>>],
    n: usize,
    scratch: &mut Scratch,
) -> Result<Out> {
    let get = |v: NodeId| vals[v].as_deref().expect("values are computed before use");
    let din = dims[step.inputs[0]];
    let dout = dims[step.node];
    let (sin, sout) = (din.elements(), dout.elements());
    let (hw_in, hw_out) = (din.h * din.w, dout.h * dout.w);
    let x = get(step.inputs[0]);
    let mut y = scratch.alloc(n * sout);
    match &step.kernel {
        Kernel::Depthwise { conv, weights } => {
            let s = shape(din, conv);
            for (xs, ys) in x.chunks_exact(sin).zip(y.chunks_exact_mut(sout)) {
                depthwise(level, xs, &s, weights, ys, &mut scratch.depthwise);
            }
        }
        Kernel::ConvGemm {
            conv,
            groups,
            in_zp,
            out,
        } => {
            let s = shape(din, conv);
            let (cg, og) = (din.c / conv.groups, dout.c / conv.groups);
            let rq = out.requant();
            if s.is_pointwise() {
                // The NHWC input is the GEMM's activation matrix, one row per pixel.
                for (g, w) in groups.iter().enumerate() {
                    let rqg = rq.channels(g * og, og);
                    gemm(
                        &x[g * cg..],
                        n * hw_in,
                        din.c,
                        w,
                        &rqg,
                        &mut y[g * og..],
                        dout.c,
                    );
                }
            } else {
                let row = conv.k * conv.k * cg;
                scratch.cols.resize(hw_out * row, 0);
                for (xs, ys) in x.chunks_exact(sin).zip(y.chunks_exact_mut(sout)) {
                    for (g, w) in groups.iter().enumerate() {
                        im2col(xs, &s, g * cg, cg, *in_zp, &mut scratch.cols);
                        let rqg = rq.channels(g * og, og);
                        gemm(
                            &scratch.cols,
                            hw_out,
                            row,
                            w,
                            &rqg,
                            &mut ys[g * og..],
                            dout.c,
                        );
                    }
                }
            }
        }
        Kernel::Linear { weights, out } => {
            let rq = out.requant();
            // The graph flattens 1 x 1 planes only (`Graph::infer_shapes`), where NHWC and
            // NCHW agree.
            gemm(x, n, sin, weights, &rq, &mut y, sout);
        }
        Kernel::Float {
            conv,
            weight,
            shape: wshape,
            bias,
            input,
            out,
        } => {
            let xf = to_nchw_f32(level, x, n, din, *input);
            let mut yf = vec![0f32; n * sout];
            match conv {
                Some(conv) => {
                    let g = ConvGeom::new(
                        &[n, din.c, din.h, din.w],
                        wshape,
                        conv.stride,
                        conv.pad,
                        1,
                        conv.groups,
                    )?;
                    let c_out = dout.c;
                    if float_depthwise::supports(&g) {
                        float_depthwise::forward_into(
                            &g,
                            &xf,
                            weight,
                            &mut yf,
                            false,
                            &|i, planes| {
                                for (j, plane) in planes.chunks_mut(hw_out).enumerate() {
                                    let b = bias[(i + j) % c_out];
                                    plane.iter_mut().for_each(|v| *v += b);
                                }
                            },
                        );
                    } else {
                        conv_gemm::forward_into(
                            &g,
                            &xf,
                            weight,
                            &mut yf,
                            false,
                            &|_, c0, block| {
                                for (j, plane) in block.chunks_mut(hw_out).enumerate() {
                                    let b = bias[c0 + j];
                                    plane.iter_mut().for_each(|v| *v += b);
                                }
                            },
                        );
                    }
                }
                None => {
                    matmul(
                        MatMut::rows(&mut yf, n, sout),
                        false,
                        MatRef::rows(&xf, n, sin),
                        MatRef::rows(weight, sout, sin).t(),
                        Parallelism::None,
                    );
                    for row in yf.chunks_mut(sout) {
                        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                    }
                }
            }
            let Some((q, lo, hi)) = out else {
                scratch.pool.push(y);
                return Ok(Out::Float(yf));
            };
            for (fs, ys) in yf.chunks_exact(sout).zip(y.chunks_exact_mut(sout)) {
                quantize_to_nhwc(level, fs, dout.c, hw_out, q.scale, q.zero_point, ys);
            }
            y.iter_mut().for_each(|v| *v = (*v).clamp(*lo, *hi));
        }
        Kernel::Table(t) => lookup(t, x, &mut y),
        Kernel::Add(p) => add(level, x, get(step.inputs[1]), p, &mut y),
        Kernel::ChannelMul {
            x_zp,
            s_zp,
            mult,
            y_zp,
        } => {
            let gates = get(step.inputs[1]);
            let c = din.c;
            for (s, (xs, ys)) in x
                .chunks_exact(sin)
                .zip(y.chunks_exact_mut(sout))
                .enumerate()
            {
                let g = &gates[s * c..(s + 1) * c];
                channel_mul(level, xs, c, g, *x_zp, *s_zp, *mult, *y_zp, ys);
            }
        }
        Kernel::Concat(tables) => {
            let ct = dout.c;
            let mut offset = 0;
            for (&v, table) in step.inputs.iter().zip(tables) {
                let ci = dims[v].c;
                let xv = get(v);
                for (src, dst) in xv.chunks_exact(ci).zip(y.chunks_exact_mut(ct)) {
                    let dst = &mut dst[offset..offset + ci];
                    match table {
                        Some(t) => lookup(t, src, dst),
                        None => dst.copy_from_slice(src),
                    }
                }
                offset += ci;
            }
        }
        Kernel::Slice {
            start,
            end,
            requant,
        } => {
            for (src, dst) in x.chunks_exact(din.c).zip(y.chunks_exact_mut(dout.c)) {
                copy(&src[*start..*end], dst, requant.as_deref());
            }
        }
        Kernel::Shuffle { groups, requant } => {
            let (c, per) = (din.c, din.c / groups);
            for (src, dst) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
                // Output channel i * g + gi is input channel gi * C/g + i.
                if *groups == 2 {
                    // Interleaving two halves (ShuffleNet V2): vectorises.
                    let (a, b) = src.split_at(per);
                    for ((d, &u), &v) in dst.chunks_exact_mut(2).zip(a).zip(b) {
                        d[0] = u;
                        d[1] = v;
                    }
                } else {
                    for (i, d) in dst.chunks_exact_mut(*groups).enumerate() {
                        for (gi, v) in d.iter_mut().enumerate() {
                            *v = src[gi * per + i];
                        }
                    }
                }
                if let Some(t) = requant {
                    dst.iter_mut().for_each(|v| *v = t[*v as usize]);
                }
            }
        }
        Kernel::MaxPool {
            k,
            stride,
            pad,
            requant,
        } => {
            let s = pool_shape(din, dout, *k, *stride, *pad);
            for (xs, ys) in x.chunks_exact(sin).zip(y.chunks_exact_mut(sout)) {
                max_pool(level, xs, &s, ys);
            }
            if let Some(t) = requant {
                y.iter_mut().for_each(|v| *v = t[*v as usize]);
            }
        }
        Kernel::AvgPool {
            k,
            stride,
            pad,
            in_zp,
            mult,
            y_zp,
        } => {
            let s = pool_shape(din, dout, *k, *stride, *pad);
            scratch.acc.resize(din.c, 0);
            for (xs, ys) in x.chunks_exact(sin).zip(y.chunks_exact_mut(sout)) {
                avg_pool(level, xs, &s, *in_zp, *mult, *y_zp, ys, &mut scratch.acc);
            }
        }
        Kernel::GlobalAvgPool {
            in_zp,
            in_scale,
            out_scale,
            y_zp,
        } => {
            let mut s = pool_shape(din, dout, din.h.max(din.w), 1, 0);
            (s.ho, s.wo) = (1, 1);
            let mult = in_scale / out_scale / hw_in as f32;
            scratch.acc.resize(din.c, 0);
            for (xs, ys) in x.chunks_exact(sin).zip(y.chunks_exact_mut(sout)) {
                avg_pool(level, xs, &s, *in_zp, mult, *y_zp, ys, &mut scratch.acc);
            }
        }
    }
    Ok(Out::Codes(y))
}

fn pool_shape(din: Dims, dout: Dims, k: usize, stride: usize, pad: usize) -> PoolShape {
    PoolShape {
        h: din.h,
        w: din.w,
        c: din.c,
        k,
        stride,
        pad,
        ho: dout.h,
        wo: dout.w,
    }
}

/// A copy of codes, through the table when the qparams change.
fn copy(src: &[u8], dst: &mut [u8], table: Option<&[u8; 256]>) {
    match table {
        Some(t) => lookup(t, src, dst),
        None => dst.copy_from_slice(src),
    }
}
