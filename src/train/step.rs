//! The train-step executor: one training step (train-mode forward, softmax cross-entropy,
//! backward) over the graph on plain f32 buffers, without Candle's autograd.
//!
//! Why: on the Candle path the kernels are fast but the autograd around them is not: every
//! gradient that reaches a tensor is accumulated as `zeros + grad` (a fresh zeroed buffer and
//! a full pass), element-wise ops (residual add, gradient sums, concat's backward) run through
//! Candle's spinning thread pool, and every op's backward allocates fresh buffers. Here:
//!
//! - the forward pass runs node by node in train mode, keeping each value only while a
//!   forward reader still needs it or a backward needs it (the input of a conv, batch norm,
//!   linear layer, activation, channel multiply or average pooling), plus what a backward
//!   needs beyond the inputs (batch norm's batch statistics, dropout's mask, drawn from the
//!   same seeded source as [`crate::exec::forward_train`], max pooling's window maxima);
//! - a conv or batch norm whose only reader is a ReLU or ReLU6 applies it to its output as
//!   it writes it (the conv in its kernel's epilogue, with the bias), and that activation's
//!   backward reads the output (which tells the same as the input for these two), so the
//!   pre-activation value is never stored;
//! - the loss (mean softmax cross-entropy with label smoothing, as `loss::cross_entropy`, or
//!   with a teacher's logits the distillation loss, as `loss::distillation_loss`) and its
//!   gradient are one pass over the logits ([`Objective`]);
//! - the backward pass runs in reverse graph order, calling the kernels' slice-level backward
//!   functions directly; each node's gradient is accumulated in place (the first contribution
//!   is moved in, later ones added), activation and dropout backward run in place over the
//!   incoming gradient, and a value is freed as soon as the last backward that reads it ran;
//! - batch norm running statistics are updated as `exec` does (PyTorch semantics).
//!
//! Parameter gradients come back as a map from parameter name to tensor, which
//! [`super::optimizer::Optimizer::step`] takes as it takes Candle's `GradStore`.
//!
//! Only f32 CPU tensors run here ([`train_step`] returns `None` otherwise). The executor is
//! used by `Run::train` and `bench --mode train` unless `SLIMCANDLE_TRAIN_EXEC=0`.

use super::adapter::Adapter;
use super::distill::{KdWeights, LossParts, distillation_loss_grad};
use super::elementwise::{
    add_into, channel_sums, gather, map, masked_channel_sums, per_sample, window_channel_sums,
    zip_map, zip_new,
};
use super::fake_quant::{FakeQuant, fake_quantize};
use super::feature_kd::{HintLoss, hint_loss_grad};
use super::loss::{cross_entropy_row, log_sum_exp, smoothed_target};
use crate::exec::check_input;
use crate::graph::{Activation, Graph, Op};
use crate::kernels::activation::Kind;
use crate::kernels::alloc::zeroed;
use crate::kernels::batch_norm::{ActMask, Source, Stats, train_backward, train_forward};
use crate::kernels::conv::ConvGeom;
use crate::kernels::gemm::{MatMut, MatRef, matmul, parallelism};
use crate::kernels::{conv_gemm, depthwise, pool};
use crate::weights::Weights;
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// Whether training steps use this executor: yes unless `SLIMCANDLE_TRAIN_EXEC=0` (which
/// runs the Candle autograd path instead).
pub fn enabled() -> bool {
    std::env::var("SLIMCANDLE_TRAIN_EXEC").map_or(true, |v| v != "0")
}

/// What one step produced.
pub struct StepOutput {
    /// The logits of the batch (N x K), detached.
    pub logits: Tensor,
    /// The mean loss.
    pub loss: f32,
    /// The gradient of the loss for every parameter that has one, by parameter name.
    pub grads: HashMap<String, Tensor>,
    /// With a teacher: the cross-entropy and distillation parts of the loss.
    pub parts: Option<LossParts>,
    /// With feature hints: their weighted sum (included in `loss`).
    pub hint: Option<f64>,
    /// With feature hints: per hint target, in order, the gradients of its adapter's
    /// parameters (`None` for a target without an adapter); empty without hints.
    pub adapter_grads: Vec<Option<HashMap<String, Tensor>>>,
    /// With fake quantization: per node, the min and max of its output before it was
    /// fake-quantized (`None` for the nodes not fake-quantized); empty without.
    pub observed: Vec<Option<(f32, f32)>>,
}

/// A feature hint's target: the teacher's map (N x `channels` x the student map's plane) for
/// the student's node `node`.
#[derive(Clone, Copy)]
pub struct HintTarget<'a> {
    pub node: usize,
    pub teacher: &'a [f32],
    pub channels: usize,
    pub weight: f64,
    /// An `mse` hint between different channel counts: the learned adapter the student's map
    /// goes through first (`adapter.rs`); its parameters' gradients come back in
    /// [`StepOutput::adapter_grads`].
    pub adapter: Option<&'a Adapter>,
}

/// What the loss compares the logits with.
#[derive(Clone, Copy)]
pub struct Objective<'a> {
    /// Label smoothing of the cross-entropy.
    pub smoothing: f64,
    /// Knowledge distillation: the teacher's logits of the same batch (N x K) and the
    /// weights of the two terms.
    pub teacher: Option<(&'a [f32], KdWeights)>,
    /// Feature distillation: hint losses on intermediate maps, their gradients added to the
    /// tap nodes' (`feature_kd.rs`).
    pub hints: Option<(&'a [HintTarget<'a>], HintLoss)>,
}

impl Objective<'_> {
    /// Cross-entropy against the labels only.
    pub fn labels(smoothing: f64) -> Objective<'static> {
        Objective {
            smoothing,
            teacher: None,
            hints: None,
        }
    }

    /// The mean loss of `logits` (N x `classes`), its parts with a teacher, and its gradient
    /// with respect to the logits.
    pub fn loss_grad(
        &self,
        logits: &[f32],
        labels: &[u32],
        classes: usize,
    ) -> Result<(f32, Option<LossParts>, Vec<f32>)> {
        Ok(match self.teacher {
            None => {
                let (loss, grad) = cross_entropy_grad(logits, labels, classes, self.smoothing)?;
                (loss, None, grad)
            }
            Some((teacher, kd)) => {
                let (loss, parts, grad) =
                    distillation_loss_grad(logits, teacher, labels, classes, self.smoothing, kd)?;
                (loss, Some(parts), grad)
            }
        })
    }
}

/// What a node's backward needs besides its inputs.
enum Saved {
    None,
    Bn(Stats),
    Mask(Vec<f32>),
    /// Max pooling's window maxima, by position in the input plane.
    Argmax(Vec<u32>),
}

/// Whether a node's backward reads its inputs' values.
fn keeps_inputs(op: &Op) -> bool {
    matches!(
        op,
        Op::Conv2d { .. }
            | Op::BatchNorm { .. }
            | Op::Linear { .. }
            | Op::Act { .. }
            | Op::ChannelMul
            | Op::AvgPool { .. }
    )
}

fn kind_of(act: Activation) -> Option<Kind> {
    match act {
        Activation::Relu => Some(Kind::Relu),
        Activation::Relu6 => Some(Kind::Relu6),
        Activation::Hardsigmoid => Some(Kind::Hardsigmoid),
        Activation::Hardswish => Some(Kind::Hardswish),
        Activation::Sigmoid => None,
    }
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Adds the owned gradient `g` into `slot` (moved in if the slot is empty).
fn acc_owned(slot: &mut Option<Vec<f32>>, g: Vec<f32>) {
    match slot {
        Some(a) => add_into(a, &g),
        None => *slot = Some(g),
    }
}

/// `$body` with `$k` (a [`Kind`] value) bound to the constant `$kind`, one arm per kind, so
/// that a loop calling `$kind.forward` or `$kind.backward` is compiled for that kind alone and
/// vectorised, without a branch on the kind per value (ShuffleNet V2's batch-norm backward
/// laps, ReLU mask included: 572-611 -> 409-463 ms).
macro_rules! per_kind {
    ($k:expr, $kind:ident => $body:expr) => {
        match $k {
            Kind::Relu => {
                const $kind: Kind = Kind::Relu;
                $body
            }
            Kind::Relu6 => {
                const $kind: Kind = Kind::Relu6;
                $body
            }
            Kind::Hardsigmoid => {
                const $kind: Kind = Kind::Hardsigmoid;
                $body
            }
            Kind::Hardswish => {
                const $kind: Kind = Kind::Hardswish;
                $body
            }
        }
    };
}

/// `g = k'(y) g` for an activation of kind `k` and its output (or input) `y`.
fn act_backward(g: &mut [f32], y: &[f32], k: Kind) {
    per_kind!(k, K => zip_map(g, y, |d, v| K.backward(v, d)))
}

/// `k(x)` as a new buffer.
fn act_forward(x: &[f32], k: Kind) -> Vec<f32> {
    per_kind!(k, K => map(x, |v| K.forward(v)))
}

/// Adds the borrowed gradient `g` into `slot` (copied if the slot is empty).
fn acc_ref(slot: &mut Option<Vec<f32>>, g: &[f32]) {
    match slot {
        Some(a) => add_into(a, g),
        None => *slot = Some(g.to_vec()),
    }
}

/// A parameter's values (copied out of the weights).
fn param(weights: &Weights, name: &str) -> Result<Vec<f32>> {
    let t = weights.get(name)?;
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

fn conv_geom(op: &Op, n: usize, din: crate::graph::Dims, c_out: usize) -> Result<ConvGeom> {
    let Op::Conv2d {
        kernel,
        stride,
        padding,
        dilation,
        groups,
        ..
    } = op
    else {
        unreachable!("called for convolutions")
    };
    Ok(ConvGeom::new(
        &[n, din.c, din.h, din.w],
        &[c_out, din.c / groups, *kernel, *kernel],
        *stride,
        *padding,
        *dilation,
        *groups,
    )?)
}

/// One training step on `x` (N x C x H x W) with class `labels`: the train-mode forward pass
/// (updating the batch norm running statistics in `weights`, dropout masks drawn from
/// `dropout_seed` as [`crate::exec::forward_train`] draws them), the mean cross-entropy with
/// label smoothing `smoothing`, and every parameter's gradient. `None` when the input or a
/// parameter is not an f32 CPU tensor.
pub fn train_step(
    graph: &Graph,
    weights: &Weights,
    x: &Tensor,
    labels: &[u32],
    smoothing: f64,
    dropout_seed: u64,
) -> Result<Option<StepOutput>> {
    let objective = Objective::labels(smoothing);
    train_step_with(graph, weights, x, labels, &objective, dropout_seed)
}

/// [`train_step`] with any [`Objective`]: with a teacher's logits, the distillation loss,
/// whose gradient goes into the logits' backward as the cross-entropy's does.
pub fn train_step_with(
    graph: &Graph,
    weights: &Weights,
    x: &Tensor,
    labels: &[u32],
    objective: &Objective,
    dropout_seed: u64,
) -> Result<Option<StepOutput>> {
    on_worker(|| step(graph, weights, x, labels, objective, dropout_seed, None))
}

/// [`train_step_with`] with fake quantization (quantization-aware training): the outputs
/// and weights `fq` names are fake-quantized in the forward pass, with straight-through
/// gradients (zero where an activation was clipped), and batch norm runs on its running
/// statistics when `fq.frozen_bn`.
pub fn train_step_quantized(
    graph: &Graph,
    weights: &Weights,
    x: &Tensor,
    labels: &[u32],
    objective: &Objective,
    dropout_seed: u64,
    fq: &FakeQuant,
) -> Result<Option<StepOutput>> {
    if fq.outputs.len() != graph.nodes.len() {
        bail!(
            "fake quantization for {} nodes on a graph of {}",
            fq.outputs.len(),
            graph.nodes.len()
        );
    }
    on_worker(|| step(graph, weights, x, labels, objective, dropout_seed, Some(fq)))
}

/// Runs `f` on a thread of the rayon pool, the calling thread waiting (asleep) for it.
///
/// Why: the step's serial parts run between parallel kernels, on the calling thread. Called
/// from outside the pool, that makes one thread more than there are cores, and the pool's
/// workers, spinning for a moment after each kernel, take turns with the calling thread on
/// the cores: a 40 KB copy between two kernels took 0.4 to 10 ms. On a worker, the step's
/// serial parts and the kernels share the pool's threads (ShuffleNet V2 training steps
/// 5-20% faster with 2 threads).
fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

fn step(
    graph: &Graph,
    weights: &Weights,
    x: &Tensor,
    labels: &[u32],
    objective: &Objective,
    dropout_seed: u64,
    fq: Option<&FakeQuant>,
) -> Result<Option<StepOutput>> {
    check_input(graph, x.dims())?;
    let frozen_bn = fq.is_some_and(|f| f.frozen_bn);
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    for (_, t) in weights.tensors() {
        if !t.device().is_cpu() || t.dtype() != DType::F32 {
            return Ok(None);
        }
    }
    let (n, _, h, w) = x.dims4()?;
    if labels.len() != n {
        bail!("{} labels for a batch of {n}", labels.len());
    }
    let dims = graph.infer_shapes(h, w)?;
    // As the Candle path runs the kernels (on one thread, rayon runs the work inline).
    let parallel = true;
    let par = parallelism(false);
    let consumers = graph.consumers();
    let count = graph.nodes.len();
    // A hint's tap keeps its own value (before any activation after it) for the loss.
    let mut tapped = vec![false; count];
    for h in objective.hints.iter().flat_map(|(h, _)| h.iter()) {
        if h.node >= count {
            bail!("feature tap node {} is not in the graph", h.node);
        }
        tapped[h.node] = true;
    }
    // Values a backward reads stay until that backward ran (see `fused` below).
    // A conv or batch norm whose only reader is a ReLU or ReLU6 applies it to its output
    // (one pass and one buffer less); the activation's backward reads its own output, which
    // tells the same as its input for these two (y > 0 iff x > 0; 0 < y < 6 iff 0 < x < 6).
    let mut fused_act: Vec<Option<Kind>> = vec![None; count];
    let mut fused: Vec<bool> = vec![false; count];
    for (id, node) in graph.nodes.iter().enumerate() {
        if matches!(node.op, Op::Conv2d { .. } | Op::BatchNorm { .. })
            && id != graph.output
            && !tapped[id]
            && consumers[id].len() == 1
        {
            let c = consumers[id][0];
            if let Op::Act {
                act: act @ (Activation::Relu | Activation::Relu6),
            } = graph.nodes[c].op
            {
                fused_act[id] = kind_of(act);
                fused[c] = true;
            }
        }
    }
    let kept: Vec<bool> = (0..count)
        .map(|v| {
            fused[v]
                || tapped[v]
                || v == graph.output
                || consumers[v]
                    .iter()
                    .any(|&c| !fused[c] && keeps_inputs(&graph.nodes[c].op))
        })
        .collect();
    let mut uses: Vec<usize> = consumers.iter().map(Vec::len).collect();
    let mut vals: Vec<Option<Vec<f32>>> = vec![None; count];
    let mut saved: Vec<Saved> = (0..count).map(|_| Saved::None).collect();
    // Every layer's parameters, copied out once for both passes.
    let mut params: HashMap<String, Vec<f32>> = HashMap::new();
    for node in &graph.nodes {
        let suffixes: &[&str] = match node.op {
            Op::Conv2d { bias: true, .. }
            | Op::Linear { bias: true, .. }
            | Op::BatchNorm { .. } => &["weight", "bias"],
            Op::Conv2d { .. } | Op::Linear { .. } => &["weight"],
            _ => &[],
        };
        for suffix in suffixes {
            let name = format!("{}.{suffix}", node.name);
            let values = match fq.and_then(|f| f.weights.get(&name)) {
                Some(w) => w.clone(),
                None => param(weights, &name)?,
            };
            params.insert(name, values);
        }
    }
    let get = |name: String| -> &Vec<f32> { &params[&name] };

    // With `SLIMCANDLE_PROFILE=1`, each node's forward and backward time by op kind.
    let profiling = crate::profile::enabled();
    let mut clock = std::time::Instant::now();
    let mut lap = |label: &dyn Fn() -> String| {
        if profiling {
            let now = std::time::Instant::now();
            crate::profile::record(&label(), now - clock);
            clock = now;
        }
    };

    // Fake quantization's straight-through masks and observed ranges, per node.
    let mut fq_masks: Vec<Option<Vec<f32>>> = vec![None; count];
    let mut observed: Vec<Option<(f32, f32)>> = vec![None; if fq.is_some() { count } else { 0 }];

    // Forward.
    for (id, node) in graph.nodes.iter().enumerate() {
        if fused[id] {
            // Applied by its producer, whose only reader it is.
            let i = node.inputs[0];
            uses[i] -= 1;
            vals[id] = vals[i].take();
            if let Some(q) = fq.and_then(|f| f.outputs[id]) {
                let v = vals[id].as_mut().expect("computed by its producer");
                // The activation's own backward is folded into the mask, read from the value
                // before rounding (a ReLU output in (0, scale / 2] rounds to 0 but passes its
                // gradient); the producer's backward then applies the mask (see below).
                let Op::Act { act } = node.op else {
                    unreachable!("only activations are fused")
                };
                let k = kind_of(act).expect("only ReLU and ReLU6 are fused");
                let act_mask: Vec<f32> = v.iter().map(|&y| k.backward(y, 1.0)).collect();
                let (mut mask, range) = fake_quantize(v, q);
                zip_map(&mut mask, &act_mask, |m, a| m * a);
                fq_masks[id] = Some(mask);
                observed[id] = Some(range);
            }
            continue;
        }
        let act = fused_act[id];
        let dout = dims[id];
        let input = |k: usize| -> &[f32] {
            vals[node.inputs[k]]
                .as_deref()
                .expect("topological order guarantees inputs")
        };
        let p = |suffix: &str| format!("{}.{suffix}", node.name);
        let y: Vec<f32> = match &node.op {
            Op::Input { .. } => x.flatten_all()?.to_vec1::<f32>()?,
            Op::Conv2d { bias, .. } => {
                let din = dims[node.inputs[0]];
                let g = conv_geom(&node.op, n, din, dout.c)?;
                let wt = get(p("weight"));
                let b = bias.then(|| get(p("bias")));
                let mut y = zeroed(n * dout.elements());
                let plane = dout.h * dout.w;
                let xs = input(0);
                // Bias, then the fused activation, on each block right after it is computed.
                let epilogue = |c0: usize, c_out: usize, block: &mut [f32]| {
                    if let Some(b) = &b {
                        for (j, pl) in block.chunks_mut(plane).enumerate() {
                            let bv = b[(c0 + j) % c_out];
                            pl.iter_mut().for_each(|v| *v += bv);
                        }
                    }
                    match act {
                        Some(Kind::Relu) => {
                            block.iter_mut().for_each(|v| *v = Kind::Relu.forward(*v))
                        }
                        Some(Kind::Relu6) => {
                            block.iter_mut().for_each(|v| *v = Kind::Relu6.forward(*v))
                        }
                        Some(k) => block.iter_mut().for_each(|v| *v = k.forward(*v)),
                        None => {}
                    }
                };
                let c_out = dout.c;
                if depthwise::supports(&g) {
                    depthwise::forward_into(&g, xs, wt, &mut y, parallel, &|i, vs| {
                        epilogue(i % c_out, c_out, vs)
                    });
                } else {
                    conv_gemm::forward_into(&g, xs, wt, &mut y, parallel, &|_, c0, block| {
                        epilogue(c0, c_out, block)
                    });
                }
                y
            }
            Op::BatchNorm { eps, .. } if frozen_bn => {
                let (scale, shift) =
                    frozen_bn_affine(weights, &node.name, get(p("weight")), get(p("bias")), *eps)?;
                let plane = dout.h * dout.w;
                let mut y = input(0).to_vec();
                for (i, pl) in y.chunks_mut(plane).enumerate() {
                    let c = i % dout.c;
                    let (s, t) = (scale[c], shift[c]);
                    match act {
                        Some(k) => pl.iter_mut().for_each(|v| *v = k.forward(*v * s + t)),
                        None => pl.iter_mut().for_each(|v| *v = *v * s + t),
                    }
                }
                y
            }
            Op::BatchNorm { eps, momentum, .. } => {
                let plane = dout.h * dout.w;
                if n * plane < 2 {
                    bail!(
                        "batch norm in train mode needs more than one value per channel (batch {n}, {}x{})",
                        dout.h,
                        dout.w
                    );
                }
                let (gamma, beta) = (get(p("weight")), get(p("bias")));
                let (y, stats) =
                    train_forward(input(0), gamma, beta, *eps, (n, dout.c, plane), act);
                update_running(weights, &node.name, &stats, n * plane, *momentum)?;
                saved[id] = Saved::Bn(stats);
                y
            }
            Op::Linear { bias, .. } => {
                let fin = dims[node.inputs[0]].elements();
                let fout = dout.c;
                let wt = get(p("weight"));
                let mut y = vec![0f32; n * fout];
                matmul(
                    MatMut::rows(&mut y, n, fout),
                    false,
                    MatRef::rows(input(0), n, fin),
                    MatRef::rows(wt, fout, fin).t(),
                    par,
                );
                if *bias {
                    let b = get(p("bias"));
                    for row in y.chunks_mut(fout) {
                        add_into(row, b);
                    }
                }
                y
            }
            Op::Act { act } => {
                let xs = input(0);
                match kind_of(*act) {
                    Some(k) => act_forward(xs, k),
                    None => map(xs, sigmoid),
                }
            }
            Op::Add => zip_new(input(0), input(1), |a, b| a + b),
            Op::ChannelMul => {
                let (xs, s) = (input(0), input(1));
                let plane = dout.h * dout.w;
                let mut y = xs.to_vec();
                if plane > 0 {
                    for (pl, &sv) in y.chunks_mut(plane).zip(s) {
                        pl.iter_mut().for_each(|v| *v *= sv);
                    }
                }
                y
            }
            Op::Concat => {
                let total = dout.elements();
                let parts: Vec<(&[f32], usize)> = (0..node.inputs.len())
                    .map(|k| (input(k), dims[node.inputs[k]].elements()))
                    .collect();
                gather(n, total, |s| {
                    parts
                        .iter()
                        .map(move |&(xs, len)| &xs[s * len..(s + 1) * len])
                })
            }
            Op::Slice { start, end } => {
                let din = dims[node.inputs[0]];
                let plane = din.h * din.w;
                let (sin, sout) = (din.elements(), dout.elements());
                let xs = input(0);
                gather(n, sout, |s| {
                    let from = s * sin + start * plane;
                    std::iter::once(&xs[from..from + (end - start) * plane])
                })
            }
            Op::ChannelShuffle { groups } => {
                let plane = dout.h * dout.w;
                let c = dout.c;
                let per = c / groups;
                let xs = input(0);
                gather(n, c * plane, |s| {
                    (0..c).map(move |o| {
                        let src = s * c + (o % groups) * per + o / groups;
                        &xs[src * plane..(src + 1) * plane]
                    })
                })
            }
            Op::MaxPool {
                kernel,
                stride,
                padding,
                ceil_mode,
            } => {
                let din = dims[node.inputs[0]];
                let (y, argmax) = pool::max_pool_with_argmax(
                    *kernel,
                    *stride,
                    *padding,
                    *ceil_mode,
                    (din.h, din.w),
                    input(0),
                )?;
                saved[id] = Saved::Argmax(argmax);
                y
            }
            Op::AvgPool {
                kernel,
                stride,
                padding,
            } => {
                let din = dims[node.inputs[0]];
                let mut y = zeroed(n * dout.elements());
                pool::pool_into(
                    false,
                    *kernel,
                    *stride,
                    *padding,
                    false,
                    (din.h, din.w),
                    input(0),
                    &mut y,
                    true,
                )?;
                y
            }
            Op::GlobalAvgPool => {
                let din = dims[node.inputs[0]];
                let plane = din.h * din.w;
                let inv = 1.0 / plane as f32;
                input(0)
                    .chunks_exact(plane)
                    .map(|pl| pl.iter().sum::<f32>() * inv)
                    .collect()
            }
            Op::Flatten => input(0).to_vec(),
            Op::Dropout { p: rate } => {
                let xs = input(0);
                if *rate > 0.0 {
                    let seed = dropout_seed ^ (id as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
                    let mask = crate::rng::dropout_mask(seed, xs.len(), *rate);
                    let mut y = xs.to_vec();
                    zip_map(&mut y, &mask, |a, m| a * m);
                    saved[id] = Saved::Mask(mask);
                    y
                } else {
                    xs.to_vec()
                }
            }
        };
        for &i in &node.inputs {
            uses[i] -= 1;
            if uses[i] == 0 && !kept[i] {
                vals[i] = None;
            }
        }
        let mut y = y;
        if let Some(q) = fq.and_then(|f| f.outputs[id]) {
            let (mask, range) = fake_quantize(&mut y, q);
            fq_masks[id] = Some(mask);
            observed[id] = Some(range);
        }
        vals[id] = Some(y);
        lap(&|| format!("fwd {}", lap_label(&node.op, dout)));
    }

    // Loss and its gradient.
    let classes = dims[graph.output].elements();
    let logits = vals[graph.output].as_deref().expect("output computed");
    let (mut loss, parts, dlogits) = objective.loss_grad(logits, labels, classes)?;
    let logits_t = Tensor::from_slice(logits, (n, classes), &Device::Cpu)?;
    let mut grads: Vec<Option<Vec<f32>>> = vec![None; count];
    let mut hint_total = None;
    let mut adapter_grads = Vec::new();
    if let Some((hints, kind)) = objective.hints {
        let mut sum = 0f64;
        for h in hints {
            let d = dims[h.node];
            let value = vals[h.node].as_deref().expect("tap values are kept");
            let what = || format!("feature hint at `{}`", graph.nodes[h.node].name);
            let (l, g) = match h.adapter {
                Some(a) => {
                    let spec = a.spec;
                    if kind != HintLoss::Mse
                        || (spec.student_channels, spec.teacher_channels) != (d.c, h.channels)
                    {
                        bail!(
                            "{}: an adapter from {} to {} channels for a {kind:?} hint from {} to {} channels",
                            what(),
                            spec.student_channels,
                            spec.teacher_channels,
                            d.c,
                            h.channels
                        );
                    }
                    let out = a
                        .loss_grad(value, h.teacher, n, d.h * d.w, h.weight)
                        .with_context(what)?;
                    adapter_grads.push(Some(out.param_grads));
                    (out.loss, out.student_grad)
                }
                None => {
                    adapter_grads.push(None);
                    hint_loss_grad(
                        kind,
                        value,
                        h.teacher,
                        n,
                        (d.c, h.channels),
                        d.h * d.w,
                        h.weight,
                    )
                    .with_context(what)?
                }
            };
            sum += l;
            acc_owned(&mut grads[h.node], g);
        }
        loss = (loss as f64 + sum) as f32;
        hint_total = Some(sum);
    }
    lap(&|| "loss".into());

    // Backward.
    let mut pgrads: HashMap<String, Vec<f32>> = HashMap::new();
    let need_grad: Vec<bool> = graph
        .nodes
        .iter()
        .map(|nd| !matches!(nd.op, Op::Input { .. }))
        .collect();
    let mut left: Vec<usize> = consumers.iter().map(Vec::len).collect();
    // A fused activation's kind and output, for its producer's backward to apply.
    let mut deferred: Vec<Option<(Kind, Vec<f32>)>> = (0..count).map(|_| None).collect();
    // Whether a deferred activation's values are its output (not a fake-quantization mask).
    let mut deferred_is_output = vec![false; count];
    acc_owned(&mut grads[graph.output], dlogits);
    for id in (0..count).rev() {
        let node = &graph.nodes[id];
        // A fused activation's backward reads its own output; nothing else reads a value
        // once its readers' backward ran.
        let own = vals[id].take();
        let Some(mut g) = grads[id].take() else {
            continue;
        };
        let fq_mask = fq_masks[id].take();
        if let Some(mask) = &fq_mask {
            zip_map(&mut g, mask, |d, m| d * m);
        }
        let dout = dims[id];
        let p = |suffix: &str| format!("{}.{suffix}", node.name);
        let get = |name: &str| params.get(name).expect("loaded before the forward pass");
        let val = |k: usize| -> &[f32] {
            vals[node.inputs[k]]
                .as_deref()
                .expect("kept for the backward pass")
        };
        let inp0 = node.inputs.first().copied().unwrap_or(0);
        match &node.op {
            Op::Input { .. } => {}
            Op::Conv2d { bias, .. } => {
                let din = dims[inp0];
                let gm = conv_geom(&node.op, n, din, dout.c)?;
                let plane = dout.h * dout.w;
                let act = deferred[id].take();
                if *bias {
                    let db = match &act {
                        Some((k, ys)) => match k.clamp_upper() {
                            Some(upper) => window_channel_sums(&mut g, ys, upper, dout.c, plane),
                            None => per_kind!(*k, K => {
                                let f = |d, v| K.backward(v, d);
                                masked_channel_sums(&mut g, ys, f, dout.c, plane)
                            }),
                        },
                        None => channel_sums(&g, dout.c, plane),
                    };
                    acc_param(&mut pgrads, p("bias"), db);
                } else if let Some((k, ys)) = act {
                    act_backward(&mut g, &ys, k);
                }
                let need_x = need_grad[inp0];
                let wt = get(&p("weight"));
                let mut out = if depthwise::supports(&gm) {
                    depthwise::backward(&gm, val(0), wt, &g, need_x, true)
                } else {
                    conv_gemm::backward(&gm, val(0), wt, &g, need_x, true)
                };
                let dx_len = if need_x { n * din.elements() } else { 0 };
                acc_param(&mut pgrads, p("weight"), out[dx_len..].to_vec());
                if need_x {
                    out.truncate(dx_len);
                    acc_owned(&mut grads[inp0], out);
                }
            }
            Op::BatchNorm { eps, .. } if frozen_bn => {
                if let Some((k, ys)) = deferred[id].take() {
                    act_backward(&mut g, &ys, k);
                }
                let plane = dout.h * dout.w;
                let c = dout.c;
                let mean = param(weights, &p("running_mean"))?;
                let var = param(weights, &p("running_var"))?;
                let gamma = get(&p("weight"));
                let inv_std: Vec<f32> =
                    var.iter().map(|v| 1.0 / (v + *eps as f32).sqrt()).collect();
                let (mut dgamma, mut dbeta) = (vec![0f32; c], vec![0f32; c]);
                let xs = val(0);
                for (i, (gp, xp)) in g.chunks(plane).zip(xs.chunks(plane)).enumerate() {
                    let ch = i % c;
                    for (&d, &x) in gp.iter().zip(xp) {
                        dgamma[ch] += d * (x - mean[ch]) * inv_std[ch];
                        dbeta[ch] += d;
                    }
                }
                acc_param(&mut pgrads, p("weight"), dgamma);
                acc_param(&mut pgrads, p("bias"), dbeta);
                if need_grad[inp0] {
                    for (i, gp) in g.chunks_mut(plane).enumerate() {
                        let s = gamma[i % c] * inv_std[i % c];
                        gp.iter_mut().for_each(|d| *d *= s);
                    }
                    acc_owned(&mut grads[inp0], g);
                }
            }
            Op::BatchNorm { .. } => {
                let Saved::Bn(stats) = &saved[id] else {
                    unreachable!("saved by the forward pass")
                };
                // A ReLU or ReLU6 after it masks the gradient inside the batch norm's passes,
                // from its output recomputed out of the input when `ys` is that output (one
                // buffer fewer to read), else from `ys` (a fake-quantization mask).
                let act = deferred[id].take();
                let mask = act.as_ref().and_then(|(k, ys)| {
                    let upper = k.clamp_upper()?;
                    let source = match deferred_is_output[id] {
                        true => Source::Affine(&stats.affine),
                        false => Source::Output(ys),
                    };
                    Some(ActMask { source, upper })
                });
                if let (Some((k, ys)), None) = (&act, mask) {
                    act_backward(&mut g, ys, *k);
                }
                let need_x = need_grad[inp0];
                let plane = dout.h * dout.w;
                let c = dout.c;
                let gamma = get(&p("weight"));
                let dims = (n, c, plane);
                let mut out = train_backward(val(0), gamma, &g, stats, dims, need_x, mask);
                let dx_len = if need_x { n * dout.elements() } else { 0 };
                acc_param(&mut pgrads, p("weight"), out[dx_len..dx_len + c].to_vec());
                acc_param(&mut pgrads, p("bias"), out[dx_len + c..].to_vec());
                if need_x {
                    out.truncate(dx_len);
                    acc_owned(&mut grads[inp0], out);
                }
            }
            Op::Linear { bias, .. } => {
                let fin = dims[inp0].elements();
                let fout = dout.c;
                let wt = get(&p("weight"));
                let mut dw = vec![0f32; fout * fin];
                matmul(
                    MatMut::rows(&mut dw, fout, fin),
                    false,
                    MatRef::rows(&g, n, fout).t(),
                    MatRef::rows(val(0), n, fin),
                    par,
                );
                acc_param(&mut pgrads, p("weight"), dw);
                if *bias {
                    let mut db = vec![0f32; fout];
                    for row in g.chunks_exact(fout) {
                        add_into(&mut db, row);
                    }
                    acc_param(&mut pgrads, p("bias"), db);
                }
                if need_grad[inp0] {
                    let mut dx = zeroed(n * fin);
                    matmul(
                        MatMut::rows(&mut dx, n, fin),
                        false,
                        MatRef::rows(&g, n, fout),
                        MatRef::rows(wt, fout, fin),
                        par,
                    );
                    acc_owned(&mut grads[inp0], dx);
                }
            }
            Op::Act { act } if fused[id] => {
                // Its producer (whose only reader it is) applies it, in its first pass over
                // the gradient.
                let k = kind_of(*act).expect("only ReLU and ReLU6 are fused");
                // Fake-quantized, the mask (1 or 0) stands for the output: the activation's
                // backward passes exactly where the mask does.
                deferred_is_output[inp0] = fq_mask.is_none();
                let ys = fq_mask.unwrap_or_else(|| own.expect("kept for the backward pass"));
                deferred[inp0] = Some((k, ys));
                acc_owned(&mut grads[inp0], g);
            }
            Op::Act { act } => {
                let xs = val(0);
                match kind_of(*act) {
                    Some(k) => act_backward(&mut g, xs, k),
                    None => zip_map(&mut g, xs, |d, v| {
                        let s = sigmoid(v);
                        d * (s * (1.0 - s))
                    }),
                }
                if need_grad[inp0] {
                    acc_owned(&mut grads[inp0], g);
                }
            }
            Op::Add => {
                let (a, b) = (node.inputs[0], node.inputs[1]);
                if need_grad[b] {
                    acc_ref(&mut grads[b], &g);
                }
                if need_grad[a] {
                    acc_owned(&mut grads[a], g);
                }
            }
            Op::ChannelMul => {
                let (a, b) = (node.inputs[0], node.inputs[1]);
                let plane = dout.h * dout.w;
                let (xs, s) = (val(0), val(1));
                if need_grad[b] {
                    let ds: Vec<f32> = g
                        .chunks_exact(plane)
                        .zip(xs.chunks_exact(plane))
                        .map(|(gp, xp)| gp.iter().zip(xp).map(|(u, v)| u * v).sum())
                        .collect();
                    acc_owned(&mut grads[b], ds);
                }
                if need_grad[a] {
                    for (pl, &sv) in g.chunks_mut(plane).zip(s) {
                        pl.iter_mut().for_each(|v| *v *= sv);
                    }
                    acc_owned(&mut grads[a], g);
                }
            }
            Op::Concat => {
                let total = dout.elements();
                let mut offset = 0;
                for &v in &node.inputs {
                    let len = dims[v].elements();
                    if need_grad[v] {
                        let part = |s: usize| &g[s * total + offset..s * total + offset + len];
                        let slot = &mut grads[v];
                        match slot {
                            Some(acc) => per_sample(acc, len, |s, a| add_into(a, part(s))),
                            None => *slot = Some(gather(n, len, |s| std::iter::once(part(s)))),
                        }
                    }
                    offset += len;
                }
            }
            Op::Slice { start, .. } => {
                if need_grad[inp0] {
                    let din = dims[inp0];
                    let plane = din.h * din.w;
                    let (sin, sout) = (din.elements(), dout.elements());
                    let from = start * plane;
                    let part = |s: usize| &g[s * sout..(s + 1) * sout];
                    match &mut grads[inp0] {
                        Some(acc) => per_sample(acc, sin, |s, a| {
                            add_into(&mut a[from..from + sout], part(s))
                        }),
                        // The first slice's gradient, zeros around it (the other slices of
                        // the same input add theirs).
                        slot @ None => {
                            let zeros = vec![0f32; sin - sout];
                            let after = sin - from - sout;
                            *slot = Some(gather(n, sin, |s| {
                                [&zeros[..from], part(s), &zeros[..after]].into_iter()
                            }));
                        }
                    }
                }
            }
            Op::ChannelShuffle { groups } => {
                if need_grad[inp0] {
                    let plane = dout.h * dout.w;
                    let c = dout.c;
                    let per = c / groups;
                    // Input channel `to` went to output channel `o` with
                    // to = (o % groups) * per + o / groups, so o = (to % per) * groups + to / per.
                    let g = &g;
                    let dx = gather(n, c * plane, |s| {
                        (0..c).map(move |to| {
                            let from = (s * c + (to % per) * groups + to / per) * plane;
                            &g[from..from + plane]
                        })
                    });
                    acc_owned(&mut grads[inp0], dx);
                }
            }
            Op::MaxPool { .. } => {
                if need_grad[inp0] {
                    let Saved::Argmax(argmax) = &saved[id] else {
                        unreachable!("saved by the forward pass")
                    };
                    let din = dims[inp0];
                    let plane_out = dout.h * dout.w;
                    let dx = pool::max_pool_backward_from(argmax, &g, din.h * din.w, plane_out);
                    acc_owned(&mut grads[inp0], dx);
                }
            }
            Op::AvgPool {
                kernel,
                stride,
                padding,
            } => {
                if need_grad[inp0] {
                    let din = dims[inp0];
                    let dx = pool::pool_backward(
                        false,
                        *kernel,
                        *stride,
                        *padding,
                        false,
                        (din.h, din.w),
                        val(0),
                        &g,
                    )?;
                    acc_owned(&mut grads[inp0], dx);
                }
            }
            Op::GlobalAvgPool => {
                if need_grad[inp0] {
                    let din = dims[inp0];
                    let plane = din.h * din.w;
                    let inv = 1.0 / plane as f32;
                    let c = din.c;
                    // Each plane gets its gradient / plane size, added or written.
                    let spread = |add: bool| {
                        move |s: usize, part: &mut [f32]| {
                            for (pl, &d) in part.chunks_mut(plane).zip(&g[s * c..(s + 1) * c]) {
                                if add {
                                    pl.iter_mut().for_each(|v| *v += d * inv);
                                } else {
                                    pl.fill(d * inv);
                                }
                            }
                        }
                    };
                    let slot = &mut grads[inp0];
                    match slot {
                        Some(acc) => per_sample(acc, c * plane, spread(true)),
                        None => {
                            let mut dx = zeroed(n * din.elements());
                            per_sample(&mut dx, c * plane, spread(false));
                            *slot = Some(dx);
                        }
                    }
                }
            }
            Op::Flatten => {
                if need_grad[inp0] {
                    acc_owned(&mut grads[inp0], g);
                }
            }
            Op::Dropout { .. } => {
                if let Saved::Mask(mask) = &saved[id] {
                    zip_map(&mut g, mask, |d, m| d * m);
                }
                if need_grad[inp0] {
                    acc_owned(&mut grads[inp0], g);
                }
            }
        }
        saved[id] = Saved::None;
        for &i in &node.inputs {
            left[i] -= 1;
            // (A fused activation's output is dropped by its own backward.)
            if left[i] == 0 && !fused[i] {
                vals[i] = None;
            }
        }
        lap(&|| format!("bwd {}", lap_label(&node.op, dout)));
    }

    let mut out = HashMap::with_capacity(pgrads.len());
    for (name, g) in pgrads {
        let shape = weights
            .get(&name)
            .with_context(|| format!("gradient of `{name}`"))?
            .dims()
            .to_vec();
        out.insert(name, Tensor::from_vec(g, shape, &Device::Cpu)?);
    }
    lap(&|| "gradients to tensors".into());
    Ok(Some(StepOutput {
        logits: logits_t,
        loss,
        grads: out,
        parts,
        hint: hint_total,
        adapter_grads,
        observed,
    }))
}

/// A node's label in the `SLIMCANDLE_PROFILE=1` laps: its kind and output plane, and for a
/// convolution its kernel, stride and channels, as the eval executor labels its steps (so
/// that layers of one kind and plane size but different shapes, which take different
/// kernel paths, are told apart).
fn lap_label(op: &Op, out: crate::graph::Dims) -> String {
    match op {
        Op::Conv2d {
            in_channels,
            out_channels,
            kernel,
            stride,
            ..
        } => format!(
            "{} {kernel}x{kernel} s{stride} -> {}x{} {in_channels}->{out_channels}",
            op.kind(),
            out.h,
            out.w
        ),
        _ => format!("{} {}x{}", op.kind(), out.h, out.w),
    }
}

fn acc_param(map: &mut HashMap<String, Vec<f32>>, name: String, g: Vec<f32>) {
    match map.get_mut(&name) {
        Some(a) => add_into(a, &g),
        None => {
            map.insert(name, g);
        }
    }
}

/// Eval-mode batch norm as one affine map per channel, `y = x * scale + shift`, from the
/// running statistics (as `passes::fold_batch_norm` folds it: `scale = gamma / sqrt(var +
/// eps)`, `shift = beta - mean * scale`).
fn frozen_bn_affine(
    weights: &Weights,
    name: &str,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let mean = param(weights, &format!("{name}.running_mean"))?;
    let var = param(weights, &format!("{name}.running_var"))?;
    Ok(crate::kernels::batch_norm::eval_affine(
        gamma, beta, &mean, &var, eps,
    ))
}

/// Running statistics updated as `exec` does it (same Candle ops, so the same rounding).
fn update_running(
    weights: &Weights,
    name: &str,
    stats: &Stats,
    count: usize,
    momentum: f64,
) -> Result<()> {
    let c = stats.mean.len();
    let mean = Tensor::from_slice(&stats.mean, c, &Device::Cpu)?;
    let var = Tensor::from_slice(&stats.var, c, &Device::Cpu)?;
    let running_mean = weights.var(&format!("{name}.running_mean"))?;
    let running_var = weights.var(&format!("{name}.running_var"))?;
    let unbiased = (var * (count as f64 / (count - 1) as f64))?;
    let update = |running: &candle_core::Var, batch: &Tensor| -> Result<()> {
        let old = running.as_detached_tensor();
        Ok(running.set(&(old.affine(1.0 - momentum, 0.0)? + batch.affine(momentum, 0.0)?)?)?)
    };
    update(running_mean, &mean)?;
    update(running_var, &unbiased)?;
    Ok(())
}

/// Mean softmax cross-entropy of `logits` (N x K) with label smoothing `eps` (PyTorch's
/// definition, as `loss::cross_entropy`), and its gradient with respect to the logits.
pub fn cross_entropy_grad(
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    eps: f64,
) -> Result<(f32, Vec<f32>)> {
    let n = labels.len();
    let mut grad = vec![0f32; logits.len()];
    let mut total = 0f64;
    let inv_n = 1.0 / n as f64;
    for ((row, d), &label) in logits
        .chunks_exact(classes)
        .zip(grad.chunks_exact_mut(classes))
        .zip(labels)
    {
        let label = checked_label(label, classes)?;
        let lse = log_sum_exp(row.iter().map(|&v| v as f64));
        total += cross_entropy_row(row, label, lse, eps);
        for (k, (dv, &v)) in d.iter_mut().zip(row).enumerate() {
            let p = (v as f64 - lse).exp();
            *dv = ((p - smoothed_target(k, label, classes, eps)) * inv_n) as f32;
        }
    }
    Ok(((total * inv_n) as f32, grad))
}

/// A label as an index, refused when it is not one of `classes`.
pub fn checked_label(label: u32, classes: usize) -> Result<usize> {
    let label = label as usize;
    if label >= classes {
        bail!("label {label} out of range for {classes} classes");
    }
    Ok(label)
}
