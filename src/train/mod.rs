//! Training: the loop, its run directory, checkpoints and exact resume.
//!
//! A run directory holds `config.json`, `metrics.jsonl` (one JSON line per epoch),
//! `last.safetensors` and `best.safetensors` (lean, deployable checkpoints) and
//! `resume.safetensors` (model, optimizer buffers and progress: everything needed to continue
//! so that the result equals an uninterrupted run). All are written atomically.
//!
//! Two compression aids act during training: gradual magnitude pruning
//! ([`TrainConfig::prune`], masks recomputed on a cubic schedule and re-applied after every
//! optimizer step, so pruned weights stay exactly zero) and the network-slimming penalty
//! ([`TrainConfig::bn_l1`], an L1 pull of the batch-norm scales towards zero that marks whole
//! channels for structured pruning).
//!
//! With a teacher ([`TrainConfig::distill`], [`Run::attach_teacher`]) the loss is knowledge
//! distillation's (`distill.rs`): the teacher's logits of each augmented batch, computed in
//! eval mode, soften the student's targets. Feature hints between maps of different channel
//! counts go through learned adapters (`adapter.rs`), trained with the student, kept in the
//! resume state and left out of the saved checkpoints.

pub mod adapter;
pub mod distill;
mod elementwise;
pub mod fake_quant;
pub mod feature_kd;
pub mod loss;
pub mod optimizer;
pub mod qat;
pub mod schedule;
pub mod step;
pub mod teacher;

use crate::checkpoint;
use crate::data::{Augment, BatchLoader, Dataset, EpochPlan};
use crate::eval::{EvalReport, evaluate};
use crate::exec::forward_train;
use crate::graph::ParamRole;
use crate::model::{Model, Provenance};
use crate::prune::magnitude::{
    CubicSchedule, GradualPruning, Masks, SparsityReport, magnitude_masks, prunable_layers,
};
use crate::rng::Rng;
use crate::tensor_file::write_bytes_atomic;
use adapter::Adapters;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor, Var};
pub use distill::{DistillConfig, KdWeights, LossParts};
use loss::{cross_entropy, distillation_loss, top_k};
use optimizer::{Gradients, Optimizer, OptimizerKind};
use schedule::{LrPlan, Schedule};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use teacher::Teacher;

/// Everything that decides a run's result; stored in `config.json` and reused on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The `--data` specification.
    pub data: String,
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: OptimizerKind,
    /// Peak learning rate.
    pub lr: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
    pub warmup_epochs: f64,
    pub label_smoothing: f64,
    pub augment: Option<Augment>,
    pub seed: u64,
    /// Gradual magnitude pruning (none: dense training). The `best` checkpoint of a pruning
    /// run is chosen only among epochs that end at or after the schedule's end, when the
    /// final sparsity is reached: an earlier, denser epoch would otherwise win.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<GradualPruning>,
    /// Network slimming (Liu et al. 2017): adds `bn_l1 * sum |gamma|` over every batch-norm
    /// weight to the objective, as `bn_l1 * sign(gamma)` added to the gradient (the reported
    /// training loss stays the cross-entropy). 0 disables it.
    #[serde(default)]
    pub bn_l1: f64,
    /// Knowledge distillation from a teacher (none: the labels alone). The teacher itself is
    /// attached to the run with [`Run::attach_teacher`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
    /// Quantization-aware training (`qat.rs`): the model trains with fake quantization and
    /// `last` / `best` are int8 checkpoints (format 3). Its state is attached with
    /// [`Run::attach_qat`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qat: Option<qat::QatConfig>,
}

impl TrainConfig {
    /// Checks the settings that do not depend on the data or the model.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 {
            bail!("--epochs and --batch-size must be at least 1");
        }
        if !self.bn_l1.is_finite() || self.bn_l1 < 0.0 {
            bail!("--bn-l1 must be 0 or a positive number, got {}", self.bn_l1);
        }
        if let Some(p) = &self.prune {
            p.validate(self.epochs)?;
        }
        if let Some(d) = &self.distill {
            d.weights.validate()?;
        }
        if let Some(q) = &self.qat {
            q.validate(self.epochs)?;
        }
        Ok(())
    }
}

/// Progress of a run, saved with the resume state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Epoch in progress (0-based) and the next batch of it.
    pub epoch: usize,
    pub next_batch: usize,
    pub global_step: usize,
    pub best_top1: Option<f64>,
    /// Running sums of the epoch in progress.
    pub loss_sum: f64,
    pub correct: usize,
    pub seen: usize,
    /// Distillation runs: running sums of the cross-entropy and distillation parts.
    #[serde(default)]
    pub ce_sum: f64,
    #[serde(default)]
    pub kd_sum: f64,
    /// Feature distillation: running sum of the weighted hint losses.
    #[serde(default)]
    pub hint_sum: f64,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    /// The loss minimised (with a teacher: `alpha * train_kd + (1 - alpha) * train_ce`, plus
    /// `train_hint` with feature taps).
    pub train_loss: f64,
    /// Distillation runs: the cross-entropy part of the training loss (label smoothing
    /// included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_ce: Option<f64>,
    /// Distillation runs: the distillation part, `T^2 * KL(teacher || student)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_kd: Option<f64>,
    /// Feature distillation: the weighted sum of the hint losses (included in `train_loss`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_hint: Option<f64>,
    pub train_top1: f64,
    pub test_loss: Option<f64>,
    pub test_top1: Option<f64>,
    pub test_top5: Option<f64>,
    pub lr: f64,
    pub images_per_s: f64,
    pub seconds: f64,
    /// Pruning runs: fraction of zeros among the prunable weights at the end of the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<f64>,
    /// Pruning runs: non-zero trainable parameters of the whole model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonzero_params: Option<usize>,
}

/// What the caller sees while training runs (the CLI draws progress bars with it).
pub trait Observer {
    fn epoch_start(&mut self, _epoch: usize, _epochs: usize, _batches: usize, _first_batch: usize) {
    }
    fn step(&mut self, _batch: usize, _loss: f64, _top1: f64, _images_per_s: f64) {}
    fn epoch_end(&mut self, _metrics: &EpochMetrics) {}
}

pub struct NoObserver;
impl Observer for NoObserver {}

pub enum Outcome {
    Finished {
        best_top1: Option<f64>,
        last: Option<EpochMetrics>,
    },
    /// Stopped by the stop flag; the run directory holds a resumable state.
    Interrupted { epoch: usize, next_batch: usize },
}

pub struct RunPaths {
    pub dir: PathBuf,
}

impl RunPaths {
    pub fn new(dir: &Path) -> RunPaths {
        RunPaths {
            dir: dir.to_path_buf(),
        }
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    pub fn last(&self) -> PathBuf {
        self.dir.join("last.safetensors")
    }
    pub fn best(&self) -> PathBuf {
        self.dir.join("best.safetensors")
    }
    pub fn resume(&self) -> PathBuf {
        self.dir.join("resume.safetensors")
    }
}

/// Tensor name prefixes of the resume state besides the model's parameters.
const OPTIMIZER_PREFIX: &str = "optimizer.";
const MASK_PREFIX: &str = "mask.";
/// Feature-hint adapters: their parameters and optimizer buffers (`adapter.rs`).
const ADAPTER_PREFIX: &str = "adapter.";
/// Resume-state metadata key of the QAT ranges.
const QAT_STATE_KEY: &str = "qat";

/// A run in a directory: the model being trained, its optimizer and progress.
pub struct Run {
    pub paths: RunPaths,
    pub config: TrainConfig,
    pub model: Model,
    optimizer: Optimizer,
    pub progress: Progress,
    /// Pruning masks in force (none before pruning starts).
    masks: Option<Masks>,
    /// The teacher of a distillation run.
    teacher: Option<Box<dyn Teacher>>,
    /// The fake quantization of a QAT run.
    qat: Option<qat::Qat>,
    /// The learned adapters of feature taps between different channel counts (trained with
    /// the model, saved in the resume state only).
    adapters: Adapters,
}

impl Run {
    /// Starts a new run in `dir` (created if needed; an existing run there is refused).
    pub fn create(dir: &Path, config: TrainConfig, model: Model) -> Result<Run> {
        let paths = RunPaths::new(dir);
        if paths.resume().exists() {
            bail!(
                "`{}` already holds a run: continue it with --resume, or choose another folder",
                dir.display()
            );
        }
        config.validate()?;
        // Metrics without a resume state are from a run killed during its first epoch (the
        // resume state is written after each epoch's metrics line): nothing to continue, so
        // the folder is reused from the start.
        if paths.metrics().exists() {
            std::fs::remove_file(paths.metrics())
                .with_context(|| format!("cannot remove `{}`", paths.metrics().display()))?;
        }
        if let Some(p) = &config.prune {
            prunable_layers(&model.graph, &p.magnitude)?;
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create run folder `{}`", dir.display()))?;
        write_bytes_atomic(
            &paths.config(),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        let optimizer = Optimizer::new(
            config.optimizer,
            config.weight_decay,
            &model.graph,
            &model.weights,
        );
        let adapters = Self::fresh_adapters(&config)?;
        Ok(Run {
            paths,
            config,
            model,
            optimizer,
            progress: Progress::default(),
            masks: None,
            teacher: None,
            qat: None,
            adapters,
        })
    }

    /// Reopens the run in `dir` from its resume state.
    pub fn open(dir: &Path) -> Result<Run> {
        let paths = RunPaths::new(dir);
        let text = std::fs::read_to_string(paths.config()).with_context(|| {
            format!(
                "`{}` is not a run folder (no readable config.json)",
                dir.display()
            )
        })?;
        let config: TrainConfig = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("`{}`: {e}", paths.config().display()))?;
        if !paths.resume().exists() {
            bail!(
                "`{}` has no resume state: the run stopped before its first epoch ended; start it again with the command that began it (the folder is reused)",
                dir.display()
            );
        }
        let (model, extras) = checkpoint::load_with_extra_prefixes(
            &paths.resume(),
            &[OPTIMIZER_PREFIX, MASK_PREFIX, ADAPTER_PREFIX],
        )?;
        let mut optimizer_state = std::collections::HashMap::new();
        let mut mask_state = std::collections::HashMap::new();
        let mut adapter_state = std::collections::HashMap::new();
        for (name, t) in extras.tensors {
            if let Some(n) = name.strip_prefix(OPTIMIZER_PREFIX) {
                optimizer_state.insert(n.to_string(), t);
            } else if let Some(n) = name.strip_prefix(MASK_PREFIX) {
                mask_state.insert(n.to_string(), t);
            } else if let Some(n) = name.strip_prefix(ADAPTER_PREFIX) {
                adapter_state.insert(n.to_string(), t);
            }
        }
        let masks = if mask_state.is_empty() {
            None
        } else {
            Some(
                Masks::from_tensors(&model, mask_state)
                    .with_context(|| format!("`{}`", paths.resume().display()))?,
            )
        };
        let progress: Progress = serde_json::from_str(
            extras
                .metadata
                .get("progress")
                .map(String::as_str)
                .context("resume state has no progress entry")?,
        )?;
        let mut optimizer = Optimizer::new(
            config.optimizer,
            config.weight_decay,
            &model.graph,
            &model.weights,
        );
        optimizer.load_state(optimizer_state, progress.global_step as u64)?;
        let mut adapters = Self::fresh_adapters(&config)?;
        adapters
            .load_state(adapter_state, progress.global_step as u64)
            .with_context(|| format!("`{}`", paths.resume().display()))?;
        let qat = match &config.qat {
            Some(q) => {
                let text = extras
                    .metadata
                    .get(QAT_STATE_KEY)
                    .context("the resume state of a QAT run has no QAT ranges")?;
                let state: qat::QatState = serde_json::from_str(text)
                    .map_err(|e| anyhow::anyhow!("`{}`: {e}", paths.resume().display()))?;
                Some(qat::Qat::with_state(&model, q.clone(), state)?)
            }
            None => None,
        };
        let run = Run {
            paths,
            config,
            model,
            optimizer,
            progress,
            masks,
            teacher: None,
            qat,
            adapters,
        };
        run.drop_metrics_after(run.progress.epoch)?;
        Ok(run)
    }

    /// Removes metric lines of epochs the resume state does not include (written just before
    /// an interruption), so that a resumed run's log equals an uninterrupted one's.
    fn drop_metrics_after(&self, epochs_done: usize) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(self.paths.metrics()) else {
            return Ok(());
        };
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<EpochMetrics>(l).is_ok_and(|m| m.epoch <= epochs_done)
            })
            .collect();
        if kept.len() != text.lines().count() {
            let mut out = kept.join("\n");
            out.push('\n');
            write_bytes_atomic(&self.paths.metrics(), out.trim_start().as_bytes())?;
        }
        Ok(())
    }

    fn lr_plan(&self, steps_per_epoch: usize) -> LrPlan {
        LrPlan {
            schedule: self.config.schedule,
            lr: self.config.lr,
            total_steps: steps_per_epoch * self.config.epochs,
            warmup_steps: (self.config.warmup_epochs * steps_per_epoch as f64).round() as usize,
            steps_per_epoch,
        }
    }

    /// The adapters the configuration's feature taps name, freshly initialised from the
    /// run's seed (none without feature taps).
    fn fresh_adapters(config: &TrainConfig) -> Result<Adapters> {
        match &config.distill {
            Some(d) => Adapters::for_taps(
                &d.features,
                config.seed,
                config.optimizer,
                config.weight_decay,
            ),
            None => Ok(Adapters::none()),
        }
    }

    fn save_resume(&self) -> Result<()> {
        let mut extras: Vec<(String, candle_core::Tensor)> = self
            .optimizer
            .state()
            .into_iter()
            .map(|(n, t)| (format!("{OPTIMIZER_PREFIX}{n}"), t))
            .collect();
        if let Some(masks) = &self.masks {
            for (n, t) in masks.to_tensors()? {
                extras.push((format!("{MASK_PREFIX}{n}"), t));
            }
        }
        for (n, t) in self.adapters.state() {
            extras.push((format!("{ADAPTER_PREFIX}{n}"), t));
        }
        let mut metadata = vec![("progress".into(), serde_json::to_string(&self.progress)?)];
        if let Some(q) = &self.qat {
            metadata.push((QAT_STATE_KEY.into(), serde_json::to_string(&q.state)?));
        }
        checkpoint::save_with_extras(&self.model, &self.paths.resume(), extras, metadata)
    }

    /// Sets the teacher of a distillation run (`config.distill`): it must be the one the
    /// configuration records (the CLI loads it with [`teacher::CheckpointTeacher::reopen`] on resume).
    pub fn attach_teacher(&mut self, teacher: Box<dyn Teacher>) -> Result<()> {
        if self.config.distill.is_none() {
            bail!("this run's configuration has no distillation settings for a teacher");
        }
        self.teacher = Some(teacher);
        Ok(())
    }

    /// Sets the fake quantization of a QAT run (`config.qat`), calibrated on the model.
    pub fn attach_qat(&mut self, qat: qat::Qat) -> Result<()> {
        if self.config.qat.is_none() {
            bail!("this run's configuration has no quantization-aware training settings");
        }
        self.qat = Some(qat);
        Ok(())
    }

    /// The int8 model of a QAT run now (`None` for other runs).
    pub fn quantized(&self) -> Result<Option<crate::passes::quant::QuantizedModel>> {
        self.qat
            .as_ref()
            .map(|q| q.export(&self.model, self.progress.epoch))
            .transpose()
    }

    /// The pruning masks in force, if pruning has started.
    pub fn masks(&self) -> Option<&Masks> {
        self.masks.as_ref()
    }

    /// Zeros of the prunable weights and non-zero parameters now, for a pruning run.
    pub fn sparsity(&self) -> Result<Option<SparsityReport>> {
        self.config
            .prune
            .as_ref()
            .map(|p| SparsityReport::measure(&self.model, &p.magnitude))
            .transpose()
    }

    /// Recomputes the masks from the current weights at the schedule's sparsity for `step`
    /// and applies them.
    fn update_masks(&mut self, schedule: &CubicSchedule, step: usize) -> Result<()> {
        let prune = self
            .config
            .prune
            .as_ref()
            .expect("a schedule implies pruning");
        let masks = magnitude_masks(&self.model, &prune.magnitude, schedule.sparsity_at(step))?;
        masks.apply(&self.model.weights)?;
        self.masks = Some(masks);
        Ok(())
    }

    fn save_model(&mut self, path: &Path, what: &str) -> Result<()> {
        let previous = self.model.meta.provenance.clone();
        self.model.meta.provenance = Provenance {
            source: format!(
                "{what} of training run `{}` on {}",
                self.paths.dir.display(),
                self.config.data
            ),
            ..previous.clone()
        };
        if let Some(d) = &self.config.distill {
            self.model.meta.provenance.history.push(d.history_entry());
        }
        if let Some(q) = &self.config.qat {
            self.model.meta.provenance.history.push(format!(
                "quantization-aware training to int8 ({}, ranges calibrated with {} on {} images{}{}{})",
                match q.granularity {
                    crate::passes::quant::Granularity::PerChannel => "per channel",
                    crate::passes::quant::Granularity::PerTensor => "per tensor",
                },
                q.calibrator.name(),
                q.calibration_images,
                q.freeze_bn_epoch
                    .map(|e| format!(", batch norm frozen from epoch {e}"))
                    .unwrap_or_default(),
                q.freeze_observers_epoch
                    .map(|e| format!(", observers frozen from epoch {e}"))
                    .unwrap_or_default(),
                if q.keep_float.is_empty() {
                    String::new()
                } else {
                    format!(", kept in float: {}", q.keep_float.join(","))
                },
            ));
        }
        let result = match self.quantized() {
            Ok(Some(q)) => crate::passes::quant::store::save(&q, path),
            Ok(None) => checkpoint::save(&self.model, path),
            Err(e) => Err(e),
        };
        self.model.meta.provenance = previous;
        result
    }

    /// Trains until the last epoch or until `stop` is set (checked after every step).
    pub fn train(
        &mut self,
        data: &Dataset,
        stop: &AtomicBool,
        observer: &mut dyn Observer,
    ) -> Result<Outcome> {
        let cfg = self.config.clone();
        let distilling = match (&cfg.distill, &self.teacher) {
            (Some(d), Some(_)) => Some(d.weights),
            (None, _) => None,
            (Some(d), None) => bail!(
                "the run distils from `{}` but no teacher is attached",
                d.teacher.path.display()
            ),
        };
        let hint_taps = cfg
            .distill
            .as_ref()
            .map(|d| d.features.clone())
            .unwrap_or_default();
        let hint_loss = cfg
            .distill
            .as_ref()
            .map(|d| d.feature_loss)
            .unwrap_or_default();
        let hint_nodes = hint_taps
            .iter()
            .map(|t| feature_kd::find_node(&self.model.graph, &t.student, "student"))
            .collect::<Result<Vec<_>>>()?;
        if !hint_nodes.is_empty() && !step::enabled() {
            bail!(
                "feature distillation runs on the train-step executor only: unset SLIMCANDLE_TRAIN_EXEC"
            );
        }
        if cfg.qat.is_some() {
            if self.qat.is_none() {
                bail!("the run is quantization-aware but its calibrated ranges are not attached");
            }
            if !step::enabled() {
                bail!(
                    "quantization-aware training runs on the train-step executor only: unset SLIMCANDLE_TRAIN_EXEC"
                );
            }
        }
        let steps_per_epoch = data.train.len().div_ceil(cfg.batch_size);
        if steps_per_epoch == 0 {
            bail!("{}: the training split is empty", data.source);
        }
        let plan = self.lr_plan(steps_per_epoch);
        let schedule = cfg.prune.as_ref().map(|p| p.schedule(steps_per_epoch));
        if let Some(s) = &schedule {
            // Masks are updated after the step that reaches an update step; step 0 (pruning
            // from the start, an initial sparsity) has no step before it.
            if self.progress.global_step == 0 && s.is_update(0) {
                self.update_masks(s, 0)?;
            }
        }
        let bn_weights: Vec<(String, Var)> = if cfg.bn_l1 > 0.0 {
            self.model
                .weights
                .trainable(&self.model.graph)
                .into_iter()
                .filter(|(_, role, _)| *role == ParamRole::BnWeight)
                .map(|(name, _, v)| (name, v))
                .collect()
        } else {
            Vec::new()
        };
        let mut last = None;
        while self.progress.epoch < cfg.epochs {
            let epoch = self.progress.epoch;
            let loader = BatchLoader::new(
                data.train.clone(),
                EpochPlan {
                    batch_size: cfg.batch_size,
                    mean: data.mean,
                    std: data.std,
                    augment: cfg.augment,
                    shuffle: Some((cfg.seed, epoch)),
                    start_batch: self.progress.next_batch,
                },
            );
            observer.epoch_start(
                epoch,
                cfg.epochs,
                loader.num_batches,
                self.progress.next_batch,
            );
            let started = Instant::now();
            let mut images_this_session = 0usize;
            let mut lr = plan.at(self.progress.global_step).0;
            for batch in loader {
                let batch = batch?;
                let (step_lr, momentum) = plan.at(self.progress.global_step);
                lr = step_lr;
                let dropout_seed =
                    Rng::new(cfg.seed ^ 0xd1 ^ (self.progress.global_step as u64) << 20).next_u64();
                // The teacher sees the same augmented batch, in eval mode.
                let teacher_logits = match (&self.teacher, distilling) {
                    (Some(t), Some(kd)) => Some((teacher_logits(&**t, &batch.x)?, kd)),
                    _ => None,
                };
                let teacher_maps = match &self.teacher {
                    Some(t) if !hint_nodes.is_empty() => teacher_maps(&**t, &batch.x)?,
                    _ => Vec::new(),
                };
                let hint_targets: Option<Vec<step::HintTarget>> =
                    (!hint_nodes.is_empty()).then(|| {
                        hint_nodes
                            .iter()
                            .zip(&teacher_maps)
                            .zip(&hint_taps)
                            .enumerate()
                            .map(|(k, ((&node, (channels, map)), tap))| step::HintTarget {
                                node,
                                teacher: map,
                                channels: *channels,
                                weight: tap.weight,
                                adapter: self.adapters.get(k),
                            })
                            .collect()
                    });
                let fast = if step::enabled() {
                    let objective = step::Objective {
                        smoothing: cfg.label_smoothing,
                        teacher: teacher_logits.as_ref().map(|(t, kd)| (t.as_slice(), *kd)),
                        hints: hint_targets.as_deref().map(|h| (h, hint_loss)),
                    };
                    match &self.qat {
                        Some(q) => {
                            let fq = q.fake_quant(&self.model, epoch)?;
                            let out = step::train_step_quantized(
                                &self.model.graph,
                                &self.model.weights,
                                &batch.x,
                                &batch.labels,
                                &objective,
                                dropout_seed,
                                &fq,
                            )?;
                            if out.is_none() {
                                bail!("quantization-aware training needs an f32 model on the CPU");
                            }
                            out
                        }
                        None => step::train_step_with(
                            &self.model.graph,
                            &self.model.weights,
                            &batch.x,
                            &batch.labels,
                            &objective,
                            dropout_seed,
                        )?,
                    }
                } else {
                    None
                };
                let mut hint_value = None;
                let mut adapter_grads = Vec::new();
                let (logits, loss_value, parts, mut grads): (
                    Tensor,
                    f64,
                    Option<LossParts>,
                    Box<dyn Gradients>,
                ) = match fast {
                    Some(out) => {
                        hint_value = out.hint;
                        adapter_grads = out.adapter_grads;
                        if let Some(q) = &mut self.qat
                            && !cfg.qat.as_ref().is_some_and(|c| c.observers_frozen(epoch))
                        {
                            q.observe(&out.observed);
                        }
                        (out.logits, out.loss as f64, out.parts, Box::new(out.grads))
                    }
                    None => {
                        let logits = forward_train(
                            &self.model.graph,
                            &self.model.weights,
                            &batch.x,
                            dropout_seed,
                        )?;
                        let labels = batch.label_tensor()?;
                        let (loss, parts) = match &teacher_logits {
                            None => (cross_entropy(&logits, &labels, cfg.label_smoothing)?, None),
                            Some((t, kd)) => {
                                let t = Tensor::from_slice(t, logits.dims(), &Device::Cpu)?;
                                let l = distillation_loss(
                                    &logits,
                                    &t,
                                    &labels,
                                    cfg.label_smoothing,
                                    *kd,
                                )?;
                                let parts = LossParts {
                                    ce: l.ce.to_scalar::<f32>()? as f64,
                                    kd: l.kd.to_scalar::<f32>()? as f64,
                                };
                                (l.total, Some(parts))
                            }
                        };
                        let loss_value = loss.to_scalar::<f32>()? as f64;
                        // No backward through a non-finite loss (the step fails below).
                        let grads: Box<dyn Gradients> = if loss_value.is_finite() {
                            Box::new(loss.backward()?)
                        } else {
                            Box::new(std::collections::HashMap::new())
                        };
                        (logits, loss_value, parts, grads)
                    }
                };
                if !loss_value.is_finite() {
                    bail!(
                        "the loss became {loss_value} at epoch {} batch {} (learning rate {lr:.4}): lower --lr or \
                         add --warmup-epochs; the last checkpoint in the run folder is from before",
                        epoch + 1,
                        batch.index
                    );
                }
                for (name, gamma) in &bn_weights {
                    if let Some(g) = grads.gradient(name, gamma) {
                        let pull = (gamma.as_detached_tensor().sign()? * cfg.bn_l1)?;
                        let g = (g + pull)?;
                        grads.set_gradient(name, gamma, g);
                    }
                }
                self.optimizer.step(&*grads, lr, momentum)?;
                // The adapters learn with the student, at its learning rate and momentum.
                self.adapters.step(&adapter_grads, lr, momentum)?;
                // Momentum, Adam moments and weight decay move pruned weights off zero: the
                // masks go back on after every update.
                if let Some(masks) = &self.masks {
                    masks.apply(&self.model.weights)?;
                }
                let n = batch.labels.len();
                let correct = top_k(&logits.detach(), 1)?
                    .iter()
                    .zip(&batch.labels)
                    .filter(|(p, l)| p[0] == **l as usize)
                    .count();
                self.progress.loss_sum += loss_value * n as f64;
                if let Some(p) = parts {
                    self.progress.ce_sum += p.ce * n as f64;
                    self.progress.kd_sum += p.kd * n as f64;
                }
                if let Some(h) = hint_value {
                    self.progress.hint_sum += h * n as f64;
                }
                self.progress.correct += correct;
                self.progress.seen += n;
                self.progress.global_step += 1;
                self.progress.next_batch = batch.index + 1;
                if let Some(s) = &schedule
                    && s.is_update(self.progress.global_step)
                {
                    self.update_masks(s, self.progress.global_step)?;
                }
                images_this_session += n;
                let rate = images_this_session as f64 / started.elapsed().as_secs_f64().max(1e-9);
                observer.step(
                    batch.index,
                    self.progress.loss_sum / self.progress.seen as f64,
                    100.0 * self.progress.correct as f64 / self.progress.seen as f64,
                    rate,
                );
                if stop.load(Ordering::SeqCst) && self.progress.next_batch < steps_per_epoch {
                    self.save_model(
                        &self.paths.last(),
                        &format!(
                            "epoch {epoch} batch {} (interrupted)",
                            self.progress.next_batch
                        ),
                    )?;
                    self.save_resume()?;
                    return Ok(Outcome::Interrupted {
                        epoch,
                        next_batch: self.progress.next_batch,
                    });
                }
            }
            let seconds = started.elapsed().as_secs_f64();
            let sparsity = self.sparsity()?;
            let test: Option<EvalReport> = if data.test.is_empty() {
                None
            } else {
                Some(match self.quantized()? {
                    Some(q) => crate::eval::evaluate_int8(&q, data.test.clone(), 256)?,
                    None => evaluate(&self.model, data.test.clone(), 256)?,
                })
            };
            let metrics = EpochMetrics {
                epoch: epoch + 1,
                train_loss: self.progress.loss_sum / self.progress.seen.max(1) as f64,
                train_ce: distilling
                    .map(|_| self.progress.ce_sum / self.progress.seen.max(1) as f64),
                train_kd: distilling
                    .map(|_| self.progress.kd_sum / self.progress.seen.max(1) as f64),
                train_hint: (!hint_nodes.is_empty())
                    .then(|| self.progress.hint_sum / self.progress.seen.max(1) as f64),
                train_top1: 100.0 * self.progress.correct as f64 / self.progress.seen.max(1) as f64,
                test_loss: test.as_ref().map(|t| t.loss),
                test_top1: test.as_ref().map(|t| t.top1),
                test_top5: test.as_ref().map(|t| t.top5),
                lr,
                images_per_s: images_this_session as f64 / seconds.max(1e-9),
                seconds,
                sparsity: sparsity.as_ref().map(SparsityReport::sparsity),
                nonzero_params: sparsity.as_ref().map(|s| s.nonzero_params),
            };
            self.append_metrics(&metrics)?;
            self.progress = Progress {
                epoch: epoch + 1,
                global_step: self.progress.global_step,
                best_top1: self.progress.best_top1,
                ..Default::default()
            };
            self.save_model(&self.paths.last(), &format!("epoch {}", epoch + 1))?;
            let score = metrics.test_top1.unwrap_or(metrics.train_top1);
            // A pruning run's best model must have the final sparsity (from the start when
            // the schedule begins at it: fine-tuning an already pruned model).
            let eligible = schedule.as_ref().is_none_or(|s| {
                self.progress.global_step >= s.end_step || s.initial >= s.final_sparsity
            });
            if eligible && self.progress.best_top1.is_none_or(|b| score > b) {
                self.progress.best_top1 = Some(score);
                self.save_model(
                    &self.paths.best(),
                    &format!("best epoch ({}, top-1 {score:.2}%)", epoch + 1),
                )?;
            }
            self.save_resume()?;
            observer.epoch_end(&metrics);
            last = Some(metrics);
            if stop.load(Ordering::SeqCst) && self.progress.epoch < cfg.epochs {
                return Ok(Outcome::Interrupted {
                    epoch: self.progress.epoch,
                    next_batch: 0,
                });
            }
        }
        Ok(Outcome::Finished {
            best_top1: self.progress.best_top1,
            last,
        })
    }

    fn append_metrics(&self, m: &EpochMetrics) -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.paths.metrics())
            .with_context(|| format!("cannot write `{}`", self.paths.metrics().display()))?;
        writeln!(f, "{}", serde_json::to_string(m)?)?;
        Ok(())
    }
}

/// The teacher's logits of `x`, as f32 values, refused when they are not N x K.
fn teacher_logits(teacher: &dyn Teacher, x: &Tensor) -> Result<Vec<f32>> {
    let logits = teacher.logits(x).context("the teacher's forward pass")?;
    if logits.rank() != 2 || logits.dim(0)? != x.dim(0)? {
        bail!(
            "the teacher gave logits of shape {:?} for a batch of {}",
            logits.dims(),
            x.dim(0)?
        );
    }
    Ok(logits.flatten_all()?.to_vec1::<f32>()?)
}

/// The teacher's feature maps of `x` at its taps, each as (channels, f32 values).
fn teacher_maps(teacher: &dyn Teacher, x: &Tensor) -> Result<Vec<(usize, Vec<f32>)>> {
    let maps = teacher.features(x).context("the teacher's feature taps")?;
    maps.iter()
        .map(|m| Ok((m.dim(1)?, m.flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::Progress;
    use crate::rng::Rng;

    /// The resume state's running sums go through JSON: they must come back bit for bit, or a
    /// resumed run's epoch metrics differ from an uninterrupted run's in the last digit.
    #[test]
    fn progress_round_trips_bit_for_bit() {
        let mut rng = Rng::new(5);
        for i in 0..20_000 {
            let scale = 10f64.powi(i % 12 - 4);
            let p = Progress {
                loss_sum: rng.uniform() * scale,
                ce_sum: rng.uniform() * scale * 3.0,
                kd_sum: rng.uniform() / 7.0,
                hint_sum: rng.uniform() * 64.0,
                best_top1: Some(rng.uniform() * 100.0),
                ..Default::default()
            };
            let back: Progress = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
            for (a, b) in [
                (p.loss_sum, back.loss_sum),
                (p.ce_sum, back.ce_sum),
                (p.kd_sum, back.kd_sum),
                (p.hint_sum, back.hint_sum),
                (p.best_top1.unwrap(), back.best_top1.unwrap()),
            ] {
                assert_eq!(a.to_bits(), b.to_bits(), "{a} came back as {b}");
            }
        }
    }
}
