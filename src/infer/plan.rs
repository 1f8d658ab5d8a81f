//! The eval executor's plan: which nodes run as one fused step, read from the graph alone.
//!
//! A conv or linear layer absorbs the chain of nodes after it while each link is the only
//! reader of the previous one: a batch norm (as a per-channel scale and shift), an
//! activation, a residual add whose other input is already computed when the conv runs, one
//! more activation after the add, and dropout (the identity in eval mode). A batch norm,
//! activation or add that does not follow such a producer starts a chain of its own, run in
//! place over its input. Flatten and dropout outside a chain are aliases of their input and
//! cost nothing.
//!
//! Values are identified by the id of the node that produces them (the last node of a fused
//! chain). The steps from the first fully connected layer on (`tail`), and for chunks of
//! few samples those from where the planes get small (`small_tail`, [`TAIL_COLUMNS`]), run
//! on the whole batch, the ones before them chunk by chunk.

use crate::graph::{Activation, Dims, Graph, NodeId, Op};
use crate::weights::Weights;
use anyhow::{Result, bail};
use candle_core::{DType, Tensor};

/// The small-plane suffix of a plan ([`Plan::small_tail`]) runs in the tail, on the whole
/// batch, when a chunk's samples give its GEMMs fewer columns than this.
///
/// Why: chunks hold as few samples as keep the largest activation in cache, often one; one
/// sample's 2x2 planes make GEMMs of 4 columns, which no vector kernel fills (14 GMAC/s
/// against 50-70 for 16 columns or more). On the whole batch, the samples' columns sit side
/// by side in one GEMM (`conv_gemm`'s batched path). Chunks of many samples (MobileNet V3
/// small's, 13 at 32x32) already batch their GEMMs and lose by leaving the cache (6%).
pub(crate) const TAIL_COLUMNS: usize = 16;

/// Where an epilogue's per-channel vector lives.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Src {
    /// A parameter tensor of the model, borrowed for the call (`Plan::params`).
    Param(usize),
    /// A vector computed for the plan (folded batch norm, `Plan::consts`).
    Const(usize),
}

/// An epilogue (see `epilogue.rs`) with its vectors and residual still unresolved.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EpiSpec {
    pub scale: Option<Src>,
    pub shift: Option<Src>,
    pub act: Option<Activation>,
    pub residual: Option<NodeId>,
    pub act_after: Option<Activation>,
}

#[derive(Debug, Clone)]
pub(crate) enum StepKind {
    Conv {
        weight: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
        groups: usize,
        epi: EpiSpec,
    },
    Linear {
        weight: usize,
        /// The weight transposed (`in x out`) and packed for our GEMM (`Plan::consts`, by
        /// [`packed_linear`]), where the CPU runs it.
        packed: Option<usize>,
        epi: EpiSpec,
    },
    /// The epilogue alone, over the first input (in place when this is its last reader).
    Pointwise {
        epi: EpiSpec,
    },
    GlobalAvgPool,
    Pool {
        max: bool,
        kernel: usize,
        stride: usize,
        padding: usize,
        ceil: bool,
    },
    Concat,
    Slice {
        start: usize,
        end: usize,
    },
    Shuffle {
        groups: usize,
    },
    ChannelMul,
}

#[derive(Debug, Clone)]
pub(crate) struct Step {
    /// The first node of the step, for error messages.
    pub node: NodeId,
    /// The value this step produces (the last node it covers).
    pub out: NodeId,
    /// The values it reads (besides an epilogue's residual).
    pub inputs: Vec<NodeId>,
    pub kind: StepKind,
}

impl Step {
    /// Every value the step reads, the residual included.
    pub fn reads(&self) -> impl Iterator<Item = NodeId> + '_ {
        let residual = match &self.kind {
            StepKind::Conv { epi, .. } | StepKind::Linear { epi, .. } => epi.residual,
            StepKind::Pointwise { epi } => epi.residual,
            _ => None,
        };
        self.inputs.iter().copied().chain(residual)
    }
}

pub(crate) struct Plan {
    pub steps: Vec<Step>,
    /// Per node: the shape of one sample's value.
    pub dims: Vec<Dims>,
    /// The first fully connected step: from there on the steps run on the whole batch at
    /// once (a classifier's weights are read once per batch instead of once per chunk).
    pub tail: usize,
    /// The first step of the run of steps at the end whose output planes all have fewer
    /// than [`TAIL_COLUMNS`] values, with the largest of those planes (before `tail` only).
    pub small_tail: Option<(usize, usize)>,
    /// The value the network returns.
    pub output: NodeId,
    /// The shape of one sample of the network's output (its graph node's, which may be a
    /// reshape of [`Self::output`]'s value).
    pub output_dims: Dims,
    /// Parameter tensors (f32, on the CPU), borrowed at run time.
    pub params: Vec<Tensor>,
    pub consts: Vec<Vec<f32>>,
}

/// Builds the plan; `None` when a parameter is not an f32 CPU tensor (the Candle path runs
/// those).
pub(crate) fn build(graph: &Graph, weights: &Weights, dims: Vec<Dims>) -> Result<Option<Plan>> {
    let mut b = Builder {
        graph,
        weights,
        consumers: graph.consumers(),
        claimed: vec![false; graph.nodes.len()],
        params: Vec::new(),
        consts: Vec::new(),
    };
    let mut value_of: Vec<NodeId> = (0..graph.nodes.len()).collect();
    let mut steps = Vec::new();
    for (id, node) in graph.nodes.iter().enumerate() {
        if b.claimed[id] {
            continue;
        }
        let inp: Vec<NodeId> = node.inputs.iter().map(|&i| value_of[i]).collect();
        let mut epi = EpiSpec::default();
        let kind = match &node.op {
            Op::Input { .. } => continue,
            Op::Flatten | Op::Dropout { .. } => {
                value_of[id] = inp[0];
                continue;
            }
            Op::Conv2d {
                kernel,
                stride,
                padding,
                dilation,
                groups,
                bias,
                ..
            } => {
                let Some(weight) = b.weight_and_bias(&node.name, *bias, &mut epi)? else {
                    return Ok(None);
                };
                StepKind::Conv {
                    weight,
                    kernel: *kernel,
                    stride: *stride,
                    padding: *padding,
                    dilation: *dilation,
                    groups: *groups,
                    epi,
                }
            }
            Op::Linear { bias, .. } => {
                let Some(weight) = b.weight_and_bias(&node.name, *bias, &mut epi)? else {
                    return Ok(None);
                };
                let packed = packed_linear(&b.params[weight])?.map(|p| {
                    b.consts.push(p);
                    b.consts.len() - 1
                });
                StepKind::Linear {
                    weight,
                    packed,
                    epi,
                }
            }
            Op::BatchNorm { eps, .. } => {
                let (scale, shift) = b.bn_affine(&node.name, *eps)?;
                epi.scale = Some(b.constant(scale));
                epi.shift = Some(b.constant(shift));
                StepKind::Pointwise { epi }
            }
            Op::Act { act } => {
                epi.act = Some(*act);
                StepKind::Pointwise { epi }
            }
            Op::Add => {
                epi.residual = Some(inp[1]);
                StepKind::Pointwise { epi }
            }
            Op::ChannelMul => StepKind::ChannelMul,
            Op::Concat => StepKind::Concat,
            Op::Slice { start, end } => StepKind::Slice {
                start: *start,
                end: *end,
            },
            Op::ChannelShuffle { groups } => StepKind::Shuffle { groups: *groups },
            Op::MaxPool {
                kernel,
                stride,
                padding,
                ceil_mode,
            } => StepKind::Pool {
                max: true,
                kernel: *kernel,
                stride: *stride,
                padding: *padding,
                ceil: *ceil_mode,
            },
            Op::AvgPool {
                kernel,
                stride,
                padding,
            } => StepKind::Pool {
                max: false,
                kernel: *kernel,
                stride: *stride,
                padding: *padding,
                ceil: false,
            },
            Op::GlobalAvgPool => StepKind::GlobalAvgPool,
        };
        let mut kind = kind;
        let out = match &mut kind {
            StepKind::Conv { epi, .. }
            | StepKind::Linear { epi, .. }
            | StepKind::Pointwise { epi } => b.extend(id, epi, &value_of)?,
            _ => id,
        };
        let inputs = match kind {
            // An add's second input is its residual.
            StepKind::Pointwise { .. } if matches!(node.op, Op::Add) => vec![inp[0]],
            _ => inp,
        };
        value_of[id] = out;
        value_of[out] = out;
        steps.push(Step {
            node: id,
            out,
            inputs,
            kind,
        });
    }
    let output = value_of[graph.output];
    let output_dims = dims[graph.output];
    let first_linear = steps
        .iter()
        .position(|s| matches!(s.kind, StepKind::Linear { .. }))
        .unwrap_or(steps.len());
    // The last steps whose outputs are all small planes.
    let small_planes = steps.len()
        - steps
            .iter()
            .rev()
            .take_while(|s| dims[s.out].h * dims[s.out].w < TAIL_COLUMNS)
            .count();
    let small_tail = (small_planes < first_linear).then(|| {
        let widest = steps[small_planes..]
            .iter()
            .map(|s| dims[s.out].h * dims[s.out].w)
            .max()
            .unwrap_or(1);
        (small_planes, widest)
    });
    Ok(Some(Plan {
        steps,
        dims,
        tail: first_linear,
        small_tail,
        output,
        output_dims,
        params: b.params,
        consts: b.consts,
    }))
}

struct Builder<'a> {
    graph: &'a Graph,
    weights: &'a Weights,
    consumers: Vec<Vec<NodeId>>,
    claimed: Vec<bool>,
    params: Vec<Tensor>,
    consts: Vec<Vec<f32>>,
}

/// A linear layer's weight (`out x in`, PyTorch's layout) as the right-hand matrix of
/// `y = x W^T`, packed panel by panel for our GEMM (`sgemm::pack_panels`); `None` where the
/// CPU does not run it. Why: read through a transposed view, the product went to the `gemm`
/// crate, whose path for one row of `x` (batch 1) ran on one thread at ~7 GMAC/s (MobileNet
/// V3 small's 576 -> 1,024 classifier: 84 us, 7% of a 224x224 pass); packed, each thread
/// streams its share of the columns once, summing along K in order.
fn packed_linear(w: &Tensor) -> Result<Option<Vec<f32>>> {
    if !crate::kernels::sgemm::available() {
        return Ok(None);
    }
    let (fout, fin) = w.dims2()?;
    let wt = w.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mut packed = vec![0f32; crate::kernels::sgemm::panels_len(fin, fout)];
    crate::kernels::sgemm::pack_panels(&wt, fout, (fin, fout), &mut packed);
    Ok(Some(packed))
}

impl Builder<'_> {
    /// The parameter `{node}.{suffix}`, or `None` if it is not f32 on the CPU.
    fn param(&mut self, node: &str, suffix: &str) -> Result<Option<usize>> {
        let t = self.weights.get(&format!("{node}.{suffix}"))?;
        if !t.device().is_cpu() || t.dtype() != DType::F32 {
            return Ok(None);
        }
        self.params.push(t);
        Ok(Some(self.params.len() - 1))
    }

    /// A conv or linear layer's weight, its bias (if `bias`) becoming the epilogue's shift;
    /// `None` as for [`Self::param`].
    fn weight_and_bias(
        &mut self,
        node: &str,
        bias: bool,
        epi: &mut EpiSpec,
    ) -> Result<Option<usize>> {
        let Some(weight) = self.param(node, "weight")? else {
            return Ok(None);
        };
        if bias {
            let Some(b) = self.param(node, "bias")? else {
                return Ok(None);
            };
            epi.shift = Some(Src::Param(b));
        }
        Ok(Some(weight))
    }

    fn constant(&mut self, v: Vec<f32>) -> Src {
        self.consts.push(v);
        Src::Const(self.consts.len() - 1)
    }

    fn values(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.weights.get(name)?;
        Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
    }

    fn src_values(&self, src: Src) -> Result<Vec<f32>> {
        Ok(match src {
            Src::Param(i) => self.params[i].flatten_all()?.to_vec1()?,
            Src::Const(i) => self.consts[i].clone(),
        })
    }

    /// Eval-mode batch norm as `x * scale + shift` (as `exec` computes it).
    fn bn_affine(&self, name: &str, eps: f64) -> Result<(Vec<f32>, Vec<f32>)> {
        let get = |s: &str| self.values(&format!("{name}.{s}"));
        let (gamma, beta, mean, var) = (
            get("weight")?,
            get("bias")?,
            get("running_mean")?,
            get("running_var")?,
        );
        if [&beta, &mean, &var].iter().any(|v| v.len() != gamma.len()) {
            bail!("batch norm `{name}`: parameters of different lengths");
        }
        Ok(crate::kernels::batch_norm::eval_affine(
            &gamma, &beta, &mean, &var, eps,
        ))
    }

    /// Fuses the chain after `root` into `epi` and returns the last node fused (the value the
    /// step produces).
    fn extend(&mut self, root: NodeId, epi: &mut EpiSpec, value_of: &[NodeId]) -> Result<NodeId> {
        let graph = self.graph;
        let mut last = root;
        loop {
            if last == graph.output || self.consumers[last].len() != 1 {
                return Ok(last);
            }
            let next = self.consumers[last][0];
            if self.claimed[next] {
                return Ok(last);
            }
            let node = &graph.nodes[next];
            match &node.op {
                Op::Dropout { .. } => {}
                Op::BatchNorm { eps, .. }
                    if epi.scale.is_none()
                        && epi.act.is_none()
                        && epi.residual.is_none()
                        && epi.act_after.is_none() =>
                {
                    let (scale, mut shift) = self.bn_affine(&node.name, *eps)?;
                    // (v + bias) * scale + shift
                    if let Some(bias) = epi.shift {
                        let bias = self.src_values(bias)?;
                        for ((t, b), s) in shift.iter_mut().zip(bias).zip(&scale) {
                            *t += b * s;
                        }
                    }
                    epi.scale = Some(self.constant(scale));
                    epi.shift = Some(self.constant(shift));
                }
                Op::Act { act } if epi.act.is_none() && epi.residual.is_none() => {
                    epi.act = Some(*act);
                }
                Op::Act { act } if epi.residual.is_some() && epi.act_after.is_none() => {
                    epi.act_after = Some(*act);
                }
                Op::Add if epi.residual.is_none() && epi.act_after.is_none() => {
                    let other = if node.inputs[0] == last {
                        node.inputs[1]
                    } else {
                        node.inputs[0]
                    };
                    // The other operand must exist before the root runs (and not be `last`).
                    let other = value_of[other];
                    if other >= root {
                        return Ok(last);
                    }
                    epi.residual = Some(other);
                }
                _ => return Ok(last),
            }
            self.claimed[next] = true;
            last = next;
        }
    }
}
