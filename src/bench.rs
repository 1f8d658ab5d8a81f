//! Throughput measurement: images per second for training steps or inference, warm-up
//! excluded, with the process's peak memory.

use crate::exec::forward_train;
use crate::model::Model;
use crate::rng::Rng;
use crate::train::KdWeights;
use crate::train::loss::{cross_entropy, distillation_loss};
use crate::train::optimizer::{Optimizer, OptimizerKind};
use crate::train::step::Objective;
use crate::train::teacher::Teacher;
use anyhow::{Result, bail};
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchMode {
    /// Forward, backward and an SGD step, as in training.
    Train,
    /// Eval-mode forward.
    Infer,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub mode: BenchMode,
    pub batch: usize,
    pub size: usize,
    pub iterations: usize,
    pub images_per_s: f64,
    /// Mean wall time per timed batch.
    pub ms_per_batch: f64,
    /// Median and 95th percentile (nearest rank) of the timed batches' wall times: with
    /// `--batch-size 1`, the one-image latency an edge device sees, and its tail.
    pub ms_median: f64,
    pub ms_p95: f64,
    /// Peak resident memory of the process so far, in bytes (Linux only).
    pub peak_memory: Option<u64>,
    pub threads: usize,
}

/// Peak resident set size (`VmHWM`) of this process.
pub fn peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs `warmup` untimed then `iterations` timed batches of random data through `model`.
pub fn run(
    model: &Model,
    mode: BenchMode,
    batch: usize,
    size: usize,
    warmup: usize,
    iterations: usize,
) -> Result<BenchResult> {
    run_with_teacher(model, mode, batch, size, warmup, iterations, None)
}

/// [`run`], with a teacher in train mode: each timed step includes the teacher's eval-mode
/// forward pass and the distillation loss (alpha 0.9, T 4), as a distillation run's step does.
pub fn run_with_teacher(
    model: &Model,
    mode: BenchMode,
    batch: usize,
    size: usize,
    warmup: usize,
    iterations: usize,
    teacher: Option<&dyn Teacher>,
) -> Result<BenchResult> {
    if teacher.is_some() && mode != BenchMode::Train {
        bail!("a teacher only takes part in training steps (--mode train)");
    }
    let kd = KdWeights::default();
    let mut rng = Rng::new(1);
    let data: Vec<f32> = (0..batch * 3 * size * size)
        .map(|_| rng.normal() as f32)
        .collect();
    let x = Tensor::from_vec(data, (batch, 3, size, size), &Device::Cpu)?;
    let labels: Vec<u32> = (0..batch)
        .map(|i| (i % model.num_classes()) as u32)
        .collect();
    let labels = Tensor::new(labels.as_slice(), &Device::Cpu)?;
    let label_values: Vec<u32> = labels.to_vec1()?;
    let folded;
    let model = if mode == BenchMode::Infer {
        folded = crate::passes::fold_batch_norm(model)?;
        &folded
    } else {
        model
    };
    let mut optimizer = Optimizer::new(
        OptimizerKind::Sgd {
            momentum: 0.9,
            nesterov: true,
        },
        5e-4,
        &model.graph,
        &model.weights,
    );
    // Planned once, as onnxruntime's session is before its timed runs.
    let engine = model.engine();
    let mut step = |i: usize| -> Result<()> {
        match mode {
            BenchMode::Infer => {
                engine.forward(&x)?;
            }
            BenchMode::Train => {
                let t = Instant::now();
                let teacher_logits = match teacher {
                    Some(t) => Some(t.logits(&x)?),
                    None => None,
                };
                if teacher.is_some() && crate::profile::enabled() {
                    crate::profile::record("teacher forward", t.elapsed());
                }
                let teacher_values = match &teacher_logits {
                    Some(t) => Some(t.flatten_all()?.to_vec1::<f32>()?),
                    None => None,
                };
                let fast = if crate::train::step::enabled() {
                    let objective = Objective {
                        smoothing: 0.0,
                        teacher: teacher_values.as_deref().map(|t| (t, kd)),
                        hints: None,
                    };
                    crate::train::step::train_step_with(
                        &model.graph,
                        &model.weights,
                        &x,
                        &label_values,
                        &objective,
                        i as u64,
                    )?
                } else {
                    None
                };
                match fast {
                    Some(out) => {
                        let t = Instant::now();
                        optimizer.step(&out.grads, 1e-3, None)?;
                        if crate::profile::enabled() {
                            crate::profile::record("optimizer step", t.elapsed());
                        }
                    }
                    None => {
                        let logits = forward_train(&model.graph, &model.weights, &x, i as u64)?;
                        let loss = match &teacher_logits {
                            Some(t) => distillation_loss(&logits, t, &labels, 0.0, kd)?.total,
                            None => cross_entropy(&logits, &labels, 0.0)?,
                        };
                        let grads = loss.backward()?;
                        optimizer.step(&grads, 1e-3, None)?;
                    }
                }
            }
        }
        Ok(())
    };
    for i in 0..warmup {
        step(i)?;
    }
    crate::profile::reset();
    let times = timed(iterations, |i| step(warmup + i))?;
    if crate::profile::enabled() {
        eprint!("{}", crate::profile::report());
    }
    Ok(result(
        mode,
        batch,
        size,
        &times,
        candle_core::utils::get_num_threads(),
    ))
}

/// Runs `step` `iterations` times; the wall time of each, in seconds.
fn timed(iterations: usize, mut step: impl FnMut(usize) -> Result<()>) -> Result<Vec<f64>> {
    if iterations == 0 {
        bail!("bench: at least one timed batch is needed");
    }
    let mut times = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let start = Instant::now();
        step(i)?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// The figures of `times` (seconds per batch of `batch` images).
fn result(
    mode: BenchMode,
    batch: usize,
    size: usize,
    times: &[f64],
    threads: usize,
) -> BenchResult {
    let seconds: f64 = times.iter().sum();
    let iterations = times.len();
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    // Nearest rank: the smallest time that at least q of the batches did not exceed.
    let rank = |q: f64| sorted[((q * iterations as f64).ceil() as usize).clamp(1, iterations) - 1];
    let median = if iterations % 2 == 1 {
        sorted[iterations / 2]
    } else {
        (sorted[iterations / 2 - 1] + sorted[iterations / 2]) / 2.0
    };
    BenchResult {
        mode,
        batch,
        size,
        iterations,
        images_per_s: (batch * iterations) as f64 / seconds,
        ms_per_batch: 1000.0 * seconds / iterations as f64,
        ms_median: 1000.0 * median,
        ms_p95: 1000.0 * rank(0.95),
        peak_memory: peak_memory(),
        threads,
    }
}

/// Int8 inference throughput: `warmup` untimed then `iterations` timed batches of random
/// data through the integer engine (`crate::int8`), planned once before timing.
pub fn run_int8(
    model: &crate::passes::quant::QuantizedModel,
    batch: usize,
    size: usize,
    warmup: usize,
    iterations: usize,
) -> Result<BenchResult> {
    let x = random_batch(model.graph.input_channels(), batch, size);
    let engine = crate::int8::Engine::new(model)?;
    for _ in 0..warmup {
        engine.forward(&x, batch, size, size)?;
    }
    let times = timed(iterations, |_| {
        engine.forward(&x, batch, size, size).map(drop)
    })?;
    Ok(result(
        BenchMode::Infer,
        batch,
        size,
        &times,
        rayon::current_num_threads(),
    ))
}

/// Quantizes `model` for [`run_int8`] when no int8 checkpoint is given: calibrated (default
/// options) on one random batch of the bench's shape, which is all a throughput measurement
/// needs (the engine's speed does not depend on the qparams).
pub fn quantize_for_bench(
    model: &Model,
    batch: usize,
    size: usize,
) -> Result<crate::passes::quant::QuantizedModel> {
    let c = model.graph.input_channels();
    let x = Tensor::from_vec(
        random_batch(c, batch, size),
        (batch, c, size, size),
        &Device::Cpu,
    )?;
    let opts = crate::passes::quant::QuantOptions::default();
    crate::passes::quant::quantize(model, [Ok(x)], &opts, |_| {})
}

/// The bench's input: `batch` images of `channels x size x size` standard normal values.
fn random_batch(channels: usize, batch: usize, size: usize) -> Vec<f32> {
    Rng::new(1).normals(batch * channels * size * size)
}
