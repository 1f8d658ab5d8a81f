//! Runs a plan on one chunk of the batch, on plain f32 buffers (NCHW), step by step.
//!
//! Buffers come from a pool and go back to it after their value's last reader, so a chunk
//! touches a small working set and, once warm, allocates nothing. Element-wise steps
//! overwrite their input when they are its last reader.

use super::epilogue::Epilogue;
use super::plan::{EpiSpec, Plan, Src, Step, StepKind};
use crate::graph::NodeId;
use crate::kernels::conv::ConvGeom;
use crate::kernels::cpu::SharedMut;
use crate::kernels::gemm::{MatMut, MatRef, Parallelism, matmul, parallelism};
use crate::kernels::{conv_gemm, depthwise, pool, sgemm, team};
use anyhow::{Context, Result};
use rayon::prelude::*;

/// A value's buffer: the first `len` values of `data`, which may be longer.
///
/// Why: buffers move between values of different sizes through the pool; shortening the
/// vector itself would make the next, longer use refill the tail with zeros (a memset over
/// memory that is about to be overwritten anyway, and page faults where it had been given
/// back), which was 5% of a batch-1 forward pass. `data` keeps every value it ever held.
pub(super) struct Buf {
    pub(super) data: Vec<f32>,
    len: usize,
}

impl Buf {
    pub(super) fn whole(data: Vec<f32>) -> Buf {
        Buf {
            len: data.len(),
            data,
        }
    }

    pub(super) fn into_vec(mut self) -> Vec<f32> {
        self.data.truncate(self.len);
        self.data
    }
}

impl std::ops::Deref for Buf {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.data[..self.len]
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data[..self.len]
    }
}

/// The values of one chunk, indexed by node id; the network input is borrowed.
pub(super) struct Values<'a> {
    pub(super) x: &'a [f32],
    pub(super) vals: Vec<Option<Buf>>,
    pub(super) uses: Vec<usize>,
    /// Per value: written in place into its concatenation's output ([`placements`]), so it
    /// has no buffer of its own and the concatenation does not copy it.
    pub(super) placed: Vec<bool>,
    pub(super) pool: &'a mut Vec<Vec<f32>>,
}

impl<'a> Values<'a> {
    /// The values of a run of `steps` that exports `export`, with `x` as the network input
    /// (reads counted over both), and each step's placement ([`placements`], `contiguous`
    /// as there). Shared by both layouts' executors.
    pub(super) fn for_steps(
        plan: &Plan,
        steps: &[Step],
        export: &[NodeId],
        x: &'a [f32],
        contiguous: bool,
        pool: &'a mut Vec<Vec<f32>>,
    ) -> (Self, Vec<Option<(NodeId, usize)>>) {
        let mut uses = vec![0; plan.dims.len()];
        for v in steps
            .iter()
            .flat_map(Step::reads)
            .chain(export.iter().copied())
        {
            uses[v] += 1;
        }
        let places = placements(plan, steps, &uses, contiguous);
        let mut placed = vec![false; plan.dims.len()];
        for (step, place) in steps.iter().zip(&places) {
            placed[step.out] = place.is_some();
        }
        let values = Values {
            x,
            vals: (0..plan.dims.len()).map(|_| None).collect(),
            uses,
            placed,
            pool,
        };
        (values, places)
    }

    /// After `step` ran (from `clock`, when profiling): its time in the profile, its reads
    /// counted (buffers nobody reads any more recycled), its value `y` stored (`None` when it
    /// was written into its concatenation's output).
    pub(super) fn finish(
        &mut self,
        plan: &Plan,
        step: &Step,
        clock: Option<std::time::Instant>,
        y: Option<Buf>,
    ) {
        if let Some(start) = clock {
            crate::profile::record(&profile_label(plan, step), start.elapsed());
        }
        self.release(step);
        self.vals[step.out] = y;
    }

    /// Value `v`: the network input `x` for node 0 unless a buffer was given for it (the
    /// channels-last executor's transposed copy).
    pub(super) fn get(&self, v: NodeId) -> &[f32] {
        match self.vals[v].as_deref() {
            Some(vals) => vals,
            None if v == 0 => self.x,
            None => panic!("values are computed before use"),
        }
    }

    /// A buffer of `len` values with arbitrary contents (the step overwrites all of them):
    /// the smallest pooled buffer that is long enough, so nothing is cleared.
    pub(super) fn alloc(&mut self, len: usize) -> Buf {
        let best = (0..self.pool.len())
            .filter(|&i| self.pool[i].len() >= len)
            .min_by_key(|&i| self.pool[i].len());
        let mut data = match best {
            Some(i) => self.pool.swap_remove(i),
            // Otherwise the longest one (which will grow), or a new one.
            None => (0..self.pool.len())
                .max_by_key(|&i| self.pool[i].len())
                .map(|i| self.pool.swap_remove(i))
                .unwrap_or_default(),
        };
        if data.len() < len {
            data.resize(len, 0.0);
        }
        Buf { data, len }
    }

    /// The buffer already holding part of `v` (a concatenation that placed inputs wrote
    /// into, [`placements`]), else a new one of `len` values.
    pub(super) fn take_or_alloc(&mut self, v: NodeId, len: usize) -> Buf {
        match self.vals[v].take() {
            Some(buf) => buf,
            None => self.alloc(len),
        }
    }

    /// The buffer of `v` to overwrite when this step is its last reader, else a copy.
    pub(super) fn take_or_copy(&mut self, v: NodeId) -> Buf {
        if v != 0 && self.uses[v] == 1 {
            return self.vals[v].take().expect("values are computed before use");
        }
        let len = self.get(v).len();
        let mut buf = self.alloc(len);
        buf.copy_from_slice(self.get(v));
        buf
    }

    /// Counts the step's reads and recycles the buffers nobody reads any more.
    fn release(&mut self, step: &Step) {
        for v in step.reads() {
            self.uses[v] -= 1;
            if self.uses[v] == 0
                && let Some(buf) = self.vals[v].take()
            {
                self.pool.push(buf.data);
            }
        }
    }
}

/// Runs `plan.steps[steps]` on `n` samples. `x` is the network input (node 0); `given` are
/// values computed earlier (by an earlier range of steps). Returns the values in `export`,
/// in that order. `ws` are the plan's parameters as slices. With `parallel`, the kernels may
/// use the rayon pool.
#[allow(clippy::too_many_arguments)]
pub(crate) fn steps(
    plan: &Plan,
    ws: &[&[f32]],
    x: &[f32],
    given: Vec<(NodeId, Vec<f32>)>,
    steps: std::ops::Range<usize>,
    n: usize,
    parallel: bool,
    pool: &mut Vec<Vec<f32>>,
    export: &[NodeId],
) -> Result<Vec<Vec<f32>>> {
    let steps = &plan.steps[steps];
    let (mut values, places) = Values::for_steps(plan, steps, export, x, n == 1, pool);
    for (v, buf) in given {
        values.vals[v] = Some(Buf::whole(buf));
    }
    let profiling = crate::profile::enabled();
    for (step, place) in steps.iter().zip(places) {
        let clock = profiling.then(std::time::Instant::now);
        let y = match place {
            Some((concat, channel)) => {
                // The concatenation's output, allocated by the first of its placed inputs.
                let mut out = values.take_or_alloc(concat, n * plan.dims[concat].elements());
                let offset = channel * plan.dims[concat].h * plan.dims[concat].w;
                let len = n * plan.dims[step.out].elements();
                let done = conv(
                    plan,
                    ws,
                    step,
                    &values,
                    n,
                    parallel,
                    &mut out[offset..][..len],
                );
                values.vals[concat] = Some(out);
                done.map(|()| None)
            }
            None => run_step(plan, ws, step, &mut values, n, parallel).map(Some),
        }
        .with_context(|| format!("eval step at node {}", step.node))?;
        values.finish(plan, step, clock, y);
    }
    let out = export
        .iter()
        .map(|&v| match values.vals[v].take() {
            Some(buf) => buf.into_vec(),
            None => values.get(v).to_vec(),
        })
        .collect();
    let rest: Vec<Vec<f32>> = values.vals.into_iter().flatten().map(|b| b.data).collect();
    values.pool.extend(rest);
    Ok(out)
}

/// Per step of `steps`: `Some((concatenation, channel))` where the step is a convolution whose
/// output goes straight into a concatenation's output value, from channel `channel` on.
///
/// Why: SqueezeNet's fire modules concatenate two convolutions' outputs, and copying them
/// was 6-7% of a batch-1 forward pass at 224x224. In NCHW at batch 1 each input of a
/// concatenation along channels is one contiguous run of its output, so the convolution
/// can write there, epilogue included; channels last, at any batch, as a run of columns
/// (`contiguous`, either of those). In NCHW with more samples each sample's run sits apart
/// from the next (the other inputs' channels between them), and the copy stays. A convolution is
/// placed when the concatenation, among these steps, is its output's only reader (`uses`,
/// the reads counted over these steps and the exported values, is 1).
fn placements(
    plan: &Plan,
    steps: &[Step],
    uses: &[usize],
    contiguous: bool,
) -> Vec<Option<(NodeId, usize)>> {
    let mut places = vec![None; steps.len()];
    if !contiguous {
        return places;
    }
    for concat in steps.iter().filter(|s| matches!(s.kind, StepKind::Concat)) {
        let mut offset = 0;
        for &v in &concat.inputs {
            let producer = steps.iter().position(|s| s.out == v);
            if let Some(i) = producer
                && v != 0
                && uses[v] == 1
                && matches!(steps[i].kind, StepKind::Conv { .. })
            {
                places[i] = Some((concat.out, offset));
            }
            offset += plan.dims[v].c;
        }
    }
    places
}

/// The geometry of convolution step `step` on `n` samples.
pub(super) fn conv_geometry(plan: &Plan, step: &Step, n: usize) -> Result<ConvGeom> {
    let StepKind::Conv {
        kernel,
        stride,
        padding,
        dilation,
        groups,
        ..
    } = step.kind
    else {
        anyhow::bail!("step at node {} is not a convolution", step.node);
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

pub(super) fn epilogue<'a>(plan: &'a Plan, ws: &[&'a [f32]], spec: &EpiSpec) -> Epilogue<'a> {
    let src = |s: Option<Src>| {
        s.map(|s| match s {
            Src::Param(i) => ws[i],
            Src::Const(i) => plan.consts[i].as_slice(),
        })
    };
    Epilogue {
        scale: src(spec.scale),
        shift: src(spec.shift),
        act: spec.act,
        residual: spec.residual.is_some(),
        act_after: spec.act_after,
    }
}

/// A convolution step (with its fused epilogue) into `y`, its `n` samples' output: a fresh
/// buffer, or the step's place in its concatenation's output ([`placements`]).
fn conv(
    plan: &Plan,
    ws: &[&[f32]],
    step: &Step,
    values: &Values,
    n: usize,
    parallel: bool,
    y: &mut [f32],
) -> Result<()> {
    let StepKind::Conv { weight, epi, .. } = &step.kind else {
        unreachable!("conv() runs convolution steps")
    };
    let dout = plan.dims[step.out];
    let p_out = dout.h * dout.w;
    let g = conv_geometry(plan, step, n)?;
    let x = values.get(step.inputs[0]);
    let res = epi.residual.map(|r| values.get(r));
    let e = epilogue(plan, ws, epi);
    let (c_out, w) = (dout.c, ws[*weight]);
    if depthwise::supports(&g) {
        depthwise::forward_into(&g, x, w, y, parallel, &|i, planes| {
            let r = res.map(|r| &r[i * p_out..i * p_out + planes.len()]);
            e.apply(planes, i % c_out, p_out, r);
        });
    } else {
        conv_gemm::forward_into(&g, x, w, y, parallel, &|s, c0, block| {
            let start = (s * c_out + c0) * p_out;
            let r = res.map(|r| &r[start..start + block.len()]);
            e.apply(block, c0, p_out, r);
        });
    }
    Ok(())
}

fn run_step(
    plan: &Plan,
    ws: &[&[f32]],
    step: &Step,
    values: &mut Values,
    n: usize,
    parallel: bool,
) -> Result<Buf> {
    let din = plan.dims[step.inputs[0]];
    let dout = plan.dims[step.out];
    let (p_in, p_out) = (din.h * din.w, dout.h * dout.w);
    Ok(match &step.kind {
        StepKind::Conv { .. } => {
            let mut y = values.alloc(n * dout.elements());
            conv(plan, ws, step, values, n, parallel, &mut y)?;
            y
        }
        StepKind::Linear {
            weight,
            packed,
            epi,
        } => {
            let (fin, fout) = (din.elements(), dout.c);
            let mut y = values.alloc(n * fout);
            let x = values.get(step.inputs[0]);
            match packed {
                Some(p) => {
                    let threads = if parallel { team::size() } else { 1 };
                    let (b, rows) = (&plan.consts[*p], sgemm::BRows::Panels);
                    let shape = (n, fout, fin);
                    sgemm::sgemm_rows(shape, x, (fin, 1), b, rows, &mut y, fout, false, threads);
                }
                None => {
                    let par = if parallel {
                        parallelism(false)
                    } else {
                        Parallelism::None
                    };
                    matmul(
                        MatMut::rows(&mut y, n, fout),
                        false,
                        MatRef::rows(x, n, fin),
                        MatRef::rows(ws[*weight], fout, fin).t(),
                        par,
                    );
                }
            }
            let res = epi.residual.map(|r| values.get(r));
            let e = epilogue(plan, ws, epi);
            for (i, row) in y.chunks_mut(fout).enumerate() {
                e.apply(row, 0, 1, res.map(|r| &r[i * fout..(i + 1) * fout]));
            }
            y
        }
        StepKind::Pointwise { epi } => {
            let mut y = values.take_or_copy(step.inputs[0]);
            let res = epi.residual.map(|r| values.get(r));
            let e = epilogue(plan, ws, epi);
            let c = dout.c;
            let out = SharedMut::new(&mut y);
            split(parallel, n, n * c, &|planes| {
                // Runs of planes within one sample, whose channels count from the run's first.
                let mut first = planes.start;
                while first < planes.end {
                    let end = planes.end.min((first / c + 1) * c);
                    let (at, len) = (first * p_out, (end - first) * p_out);
                    // SAFETY: the parts of `split` are disjoint runs of planes.
                    let block = unsafe { out.part(at, len) };
                    e.apply(block, first % c, p_out, res.map(|r| &r[at..at + len]));
                    first = end;
                }
            });
            y
        }
        StepKind::GlobalAvgPool => {
            let mut y = values.alloc(n * din.c);
            let x = values.get(step.inputs[0]);
            let inv = 1.0 / p_in as f32;
            let out = SharedMut::new(&mut y);
            split(parallel, n, n * din.c, &|planes| {
                // SAFETY: the parts of `split` are disjoint.
                let part = unsafe { out.part(planes.start, planes.len()) };
                let xs = &x[planes.start * p_in..planes.end * p_in];
                for (v, plane) in part.iter_mut().zip(xs.chunks_exact(p_in)) {
                    *v = sum(plane) * inv;
                }
            });
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
            let out = SharedMut::new(&mut y);
            let failed = std::sync::Mutex::new(None);
            split(parallel, n, n * din.c, &|planes| {
                // SAFETY: the parts of `split` are disjoint runs of planes.
                let part = unsafe { out.part(planes.start * p_out, planes.len() * p_out) };
                let xs = &x[planes.start * p_in..planes.end * p_in];
                let done = pool::pool_into(
                    *max,
                    *kernel,
                    *stride,
                    *padding,
                    *ceil,
                    (din.h, din.w),
                    xs,
                    part,
                    false,
                );
                if let Err(e) = done {
                    *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                }
            });
            if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
                return Err(e.into());
            }
            y
        }
        StepKind::Concat => {
            let total = dout.elements();
            // Already there when placed inputs wrote into it ([`placements`]).
            let mut y = values.take_or_alloc(step.out, n * total);
            // Each input's values and where they start in a sample of the output, but for
            // the placed ones, already in place.
            let mut offset = 0;
            let parts: Vec<(&[f32], usize)> = step
                .inputs
                .iter()
                .filter_map(|&v| {
                    let start = offset;
                    offset += plan.dims[v].elements();
                    (!values.placed[v]).then(|| (values.get(v), start))
                })
                .collect();
            let out = SharedMut::new(&mut y);
            // One unit per sample and input.
            split(parallel, n, n * parts.len(), &|units| {
                for u in units {
                    let (s, (x, start)) = (u / parts.len(), parts[u % parts.len()]);
                    let len = x.len() / n;
                    // SAFETY: inputs fill disjoint ranges of each sample of `y`.
                    unsafe { out.part(s * total + start, len) }
                        .copy_from_slice(&x[s * len..(s + 1) * len]);
                }
            });
            y
        }
        StepKind::Slice { start, end } => {
            let mut y = values.alloc(n * dout.elements());
            let x = values.get(step.inputs[0]);
            let (sample_in, sample_out) = (din.elements(), dout.elements());
            for (s, dst) in y.chunks_mut(sample_out).enumerate() {
                let from = s * sample_in + start * p_in;
                dst.copy_from_slice(&x[from..from + (end - start) * p_in]);
            }
            y
        }
        StepKind::Shuffle { groups } => {
            let mut y = values.alloc(n * dout.elements());
            let x = values.get(step.inputs[0]);
            let (c, per_group) = (din.c, din.c / groups);
            if p_in > 0 {
                let out = SharedMut::new(&mut y);
                // Split over the team at batch 1 (a serial copy left the other core waiting).
                split(parallel, n, n * c, &|planes| {
                    // SAFETY: the parts of `split` are disjoint runs of planes.
                    let part = unsafe { out.part(planes.start * p_in, planes.len() * p_in) };
                    for (j, dst) in planes.zip(part.chunks_mut(p_in)) {
                        // Output plane (s, o), o = i g + gi, is input plane (s, gi C/g + i).
                        let (s, o) = (j / c, j % c);
                        let src = s * c + (o % groups) * per_group + o / groups;
                        dst.copy_from_slice(&x[src * p_in..(src + 1) * p_in]);
                    }
                });
            }
            y
        }
        StepKind::ChannelMul => {
            let mut y = values.take_or_copy(step.inputs[0]);
            let scale = values.get(step.inputs[1]);
            if p_in > 0 {
                let out = SharedMut::new(&mut y);
                split(parallel, n, scale.len(), &|planes| {
                    // SAFETY: the parts of `split` are disjoint runs of planes.
                    let part = unsafe { out.part(planes.start * p_in, planes.len() * p_in) };
                    for (plane, &s) in part.chunks_mut(p_in).zip(&scale[planes]) {
                        for v in plane {
                            *v *= s;
                        }
                    }
                });
            }
            y
        }
    })
}

/// Runs `f` on parts of `0..units` (interchangeable units of work: planes, samples) that
/// together cover it once: on the spinning team when the batch is smaller than the thread
/// count (batch 1, whose steps come back to back), on the rayon pool for a larger batch (the
/// tail of the plan, which runs on the whole batch), on this thread without `parallel`.
fn split(parallel: bool, n: usize, units: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    let threads = team::size();
    if !parallel || threads == 1 || units <= 1 {
        return f(0..units);
    }
    if n < threads {
        return team::run_parts(units, threads, f);
    }
    let per = units.div_ceil(4 * threads);
    (0..units.div_ceil(per))
        .into_par_iter()
        .for_each(|t| f(t * per..((t + 1) * per).min(units)));
}

/// A step's row in the `SLIMCANDLE_PROFILE=1` table: its kind, kernel and output plane
/// (convolutions by kind and size, since they differ most).
fn profile_label(plan: &Plan, step: &Step) -> String {
    let out = plan.dims[step.out];
    let plane = format!("{}x{}", out.h, out.w);
    match &step.kind {
        StepKind::Conv {
            kernel,
            stride,
            groups,
            ..
        } => {
            let cin = plan.dims[step.inputs[0]].c;
            let kind = if *groups == 1 {
                "conv"
            } else if *groups == cin && *groups == out.c {
                "depthwise"
            } else {
                "grouped conv"
            };
            format!(
                "eval {kind} {kernel}x{kernel} s{stride} -> {plane} {cin}->{}",
                out.c
            )
        }
        StepKind::Linear { .. } => "eval linear".into(),
        StepKind::Pointwise { .. } => format!("eval pointwise -> {plane}"),
        StepKind::GlobalAvgPool => "eval global avg pool".into(),
        StepKind::Pool { max, .. } => {
            format!("eval {} pool -> {plane}", if *max { "max" } else { "avg" })
        }
        StepKind::Concat => "eval concat".into(),
        StepKind::Slice { .. } => "eval slice".into(),
        StepKind::Shuffle { .. } => "eval channel shuffle".into(),
        StepKind::ChannelMul => "eval channel mul".into(),
    }
}

/// The sum of `v` in eight lanes (so that it vectorises).
fn sum(v: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            lanes[i] += c[i];
        }
    }
    lanes.iter().sum::<f32>() + rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::models::{ArchOptions, ArchSpec};

    /// SqueezeNet's eight fire modules each concatenate two expand convolutions: at batch 1
    /// both write in place (the logits are checked against Candle in tests/infer.rs); with
    /// more samples none does.
    #[test]
    fn fire_modules_write_their_expands_in_place_at_batch_1() {
        let options = ArchOptions {
            num_classes: Some(10),
            ..Default::default()
        };
        let spec = ArchSpec::parse("squeezenet1_1", &options).unwrap();
        let model = Model::init(&spec, 1).unwrap();
        let dims = model.graph.infer_shapes(64, 64).unwrap();
        let plan = super::super::plan::build(&model.graph, &model.weights, dims)
            .unwrap()
            .unwrap();
        let mut uses = vec![0; plan.dims.len()];
        for v in plan.steps.iter().flat_map(Step::reads).chain([plan.output]) {
            uses[v] += 1;
        }
        let placed = |n| {
            let places = placements(&plan, &plan.steps, &uses, n == 1);
            places.into_iter().flatten().count()
        };
        assert_eq!(placed(1), 16);
        assert_eq!(placed(2), 0);
    }
}
