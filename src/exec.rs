//! Runs a [`Graph`] on Candle tensors, in train mode with autograd. Eval mode on f32 CPU
//! tensors goes to the fused executor in [`crate::infer`]; [`forward_candle`] keeps the
//! Candle eval path (other dtypes and devices, and the reference the executor is tested
//! against).

use crate::graph::{Activation, Graph, NodeId, Op};
use crate::kernels;
use crate::weights::Weights;
use anyhow::{Context, Result, bail};
use candle_core::{D, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Running statistics, no dropout, no gradient tracking.
    Eval,
    /// Batch statistics (updating the running ones), active dropout, gradients tracked.
    Train,
}

/// Checks that `x` is N x C x H x W with the graph's channels and a size every layer accepts.
pub fn check_input(graph: &Graph, dims: &[usize]) -> Result<()> {
    let channels = graph.input_channels();
    match dims {
        [_, c, h, w] if *c == channels => graph.infer_shapes(*h, *w).map(|_| ()),
        _ => bail!("expected an input of shape [N, {channels}, H, W], got {dims:?}"),
    }
}

/// Forward pass. In eval mode, f32 CPU tensors run the fused executor ([`crate::infer`]),
/// anything else the Candle ops. In train mode the batch norm running statistics in
/// `weights` are updated (PyTorch semantics: biased variance normalises, unbiased variance
/// updates, with momentum) and dropout masks are drawn from an unseeded source; see
/// [`forward_train`] for seeded ones.
pub fn forward(graph: &Graph, weights: &Weights, x: &Tensor, mode: Mode) -> Result<Tensor> {
    if mode == Mode::Eval
        && let Some(y) = crate::infer::forward(graph, weights, x)?
    {
        return Ok(y);
    }
    forward_candle(graph, weights, x, mode)
}

/// [`forward`] on Candle ops in both modes (no fused eval executor): the reference the
/// executor is tested against.
pub fn forward_candle(graph: &Graph, weights: &Weights, x: &Tensor, mode: Mode) -> Result<Tensor> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    forward_seeded(graph, weights, x, mode, seed)
}

/// Train-mode forward whose dropout masks depend only on `dropout_seed`, so that a resumed run
/// repeats an uninterrupted one exactly.
pub fn forward_train(
    graph: &Graph,
    weights: &Weights,
    x: &Tensor,
    dropout_seed: u64,
) -> Result<Tensor> {
    forward_seeded(graph, weights, x, Mode::Train, dropout_seed)
}

/// A callback that sees every node's output in turn (node id, value).
pub type Tap<'a> = &'a mut dyn FnMut(NodeId, &Tensor) -> Result<()>;

/// Eval-mode forward on the Candle ops that hands every node's output to `tap` as soon as it
/// is computed: how calibration observes every activation tensor (the fused executor never
/// materialises the values inside a fused step).
pub fn forward_eval_tapped(
    graph: &Graph,
    weights: &Weights,
    x: &Tensor,
    tap: Tap<'_>,
) -> Result<Tensor> {
    forward_tapped(graph, weights, x, Mode::Eval, 0, Some(tap))
}

fn forward_seeded(
    graph: &Graph,
    weights: &Weights,
    x: &Tensor,
    mode: Mode,
    seed: u64,
) -> Result<Tensor> {
    forward_tapped(graph, weights, x, mode, seed, None)
}

fn forward_tapped(
    graph: &Graph,
    weights: &Weights,
    x: &Tensor,
    mode: Mode,
    seed: u64,
    mut tap: Option<Tap<'_>>,
) -> Result<Tensor> {
    check_input(graph, x.dims())?;
    let param = |name: String| -> Result<Tensor> {
        let var = weights.var(&name)?;
        Ok(match mode {
            Mode::Train => var.as_tensor().clone(),
            Mode::Eval => var.as_detached_tensor(),
        })
    };
    // Values are dropped after their last reader so peak memory stays at the live set.
    let mut uses_left: Vec<usize> = graph.consumers().iter().map(Vec::len).collect();
    uses_left[graph.output] += 1;
    let mut values: Vec<Option<Tensor>> = vec![None; graph.nodes.len()];
    for (id, node) in graph.nodes.iter().enumerate() {
        let inputs: Vec<Tensor> = node
            .inputs
            .iter()
            .map(|&i| {
                values[i]
                    .clone()
                    .expect("topological order guarantees inputs")
            })
            .collect();
        for &i in &node.inputs {
            uses_left[i] -= 1;
            if uses_left[i] == 0 {
                values[i] = None;
            }
        }
        let p = |suffix: &str| param(format!("{}.{suffix}", node.name));
        let node_seed = seed ^ (id as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        let out = run_op(
            &node.op, &inputs, x, mode, &p, weights, &node.name, node_seed,
        )
        .with_context(|| format!("node `{}` ({})", node.name, node.op.kind()))?;
        if let Some(tap) = tap.as_mut() {
            tap(id, &out)?;
        }
        values[id] = Some(out);
    }
    Ok(values[graph.output].take().expect("output computed"))
}

#[allow(clippy::too_many_arguments)]
fn run_op(
    op: &Op,
    inputs: &[Tensor],
    network_input: &Tensor,
    mode: Mode,
    p: &dyn Fn(&str) -> Result<Tensor>,
    weights: &Weights,
    name: &str,
    seed: u64,
) -> Result<Tensor> {
    let x = inputs.first();
    let x0 = || x.expect("arity checked by validation");
    Ok(match op {
        Op::Input { .. } => match mode {
            Mode::Train => network_input.clone(),
            Mode::Eval => network_input.detach(),
        },
        Op::Conv2d {
            stride,
            padding,
            dilation,
            groups,
            bias,
            ..
        } => {
            let y = kernels::conv2d(x0(), &p("weight")?, *stride, *padding, *dilation, *groups)?;
            if *bias {
                kernels::add_channel_bias(&y, &p("bias")?)?
            } else {
                y
            }
        }
        Op::BatchNorm { eps, momentum, .. } => {
            batch_norm(x0(), p, weights, name, *eps, *momentum, mode)?
        }
        Op::Linear { bias, .. } => {
            let y = x0().matmul(&p("weight")?.t()?)?;
            if *bias {
                y.broadcast_add(&p("bias")?)?
            } else {
                y
            }
        }
        Op::Act { act } => activation(x0(), *act)?,
        Op::Add => (&inputs[0] + &inputs[1])?,
        Op::ChannelMul => inputs[0].broadcast_mul(&inputs[1])?,
        Op::Concat => Tensor::cat(inputs, 1)?,
        Op::Slice { start, end } => x0().narrow(1, *start, end - start)?,
        Op::ChannelShuffle { groups } => kernels::channel_shuffle(x0(), *groups)?,
        Op::MaxPool {
            kernel,
            stride,
            padding,
            ceil_mode,
        } => kernels::max_pool2d(x0(), *kernel, *stride, *padding, *ceil_mode)?,
        Op::AvgPool {
            kernel,
            stride,
            padding,
        } => kernels::avg_pool2d(x0(), *kernel, *stride, *padding, false)?,
        Op::GlobalAvgPool => x0().mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?,
        Op::Flatten => x0().flatten_from(1)?,
        Op::Dropout { p: rate } => match mode {
            Mode::Train if *rate > 0.0 => dropout(x0(), *rate, seed)?,
            _ => x0().clone(),
        },
    })
}

/// Inverted dropout with a mask drawn from `seed`.
fn dropout(x: &Tensor, rate: f64, seed: u64) -> Result<Tensor> {
    let mask = crate::rng::dropout_mask(seed, x.elem_count(), rate);
    Ok((x * Tensor::from_vec(mask, x.dims(), x.device())?)?)
}

pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(match act {
        Activation::Relu => kernels::relu(x)?,
        Activation::Relu6 => kernels::relu6(x)?,
        Activation::Hardsigmoid => kernels::hardsigmoid(x)?,
        Activation::Hardswish => kernels::hardswish(x)?,
        Activation::Sigmoid => candle_nn::ops::sigmoid(x)?,
    })
}

fn batch_norm(
    x: &Tensor,
    p: &dyn Fn(&str) -> Result<Tensor>,
    weights: &Weights,
    name: &str,
    eps: f64,
    momentum: f64,
    mode: Mode,
) -> Result<Tensor> {
    match mode {
        Mode::Eval => {
            let scale = (p("weight")? / (p("running_var")? + eps)?.sqrt()?)?;
            let shift = (p("bias")? - (p("running_mean")? * &scale)?)?;
            Ok(kernels::batch_norm_eval(x, &scale, &shift)?)
        }
        Mode::Train => {
            let (n, _, h, w) = x.dims4()?;
            let count = n * h * w;
            if count < 2 {
                bail!(
                    "batch norm in train mode needs more than one value per channel (batch {n}, {h}x{w})"
                );
            }
            let (y, mean, var) = kernels::batch_norm_train(x, &p("weight")?, &p("bias")?, eps)?;
            let running_mean = weights.var(&format!("{name}.running_mean"))?;
            let running_var = weights.var(&format!("{name}.running_var"))?;
            let unbiased = (var * (count as f64 / (count - 1) as f64))?;
            let update = |running: &candle_core::Var, batch: &Tensor| -> Result<()> {
                let old = running.as_detached_tensor();
                Ok(running
                    .set(&(old.affine(1.0 - momentum, 0.0)? + batch.affine(momentum, 0.0)?)?)?)
            };
            update(running_mean, &mean)?;
            update(running_var, &unbiased)?;
            Ok(y)
        }
    }
}
