//! The teacher of knowledge distillation: anything that maps a batch to logits.
//!
//! The distillation loss needs nothing from the teacher but its logits of the student's batch,
//! so a teacher is the [`Teacher`] trait: a float checkpoint of any architecture, width, stem,
//! pruned or sparse ([`CheckpointTeacher`], run in eval mode on the fused eval executor with
//! its batch norms folded), and later an int8 engine, plug in the same way.

use super::distill::{DistillConfig, KdWeights, TeacherRecord};
use super::feature_kd::{find_node, truncated};
use crate::checkpoint;
use crate::data::Images;
use crate::eval::evaluate;
use crate::graph::Dims;
use crate::infer::Engine;
use crate::model::Model;
use crate::passes::fold_batch_norm;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Maps a batch to logits, in eval mode, without side effects.
pub trait Teacher: Send + Sync {
    /// Logits (N x K, f32, CPU) of `x`, a batch (N x 3 x H x W) normalised as the student's
    /// input is.
    fn logits(&self, x: &Tensor) -> Result<Tensor>;

    /// The feature maps (N x C x H x W) of the taps set up for feature distillation, in
    /// their order.
    fn features(&self, _x: &Tensor) -> Result<Vec<Tensor>> {
        bail!("this teacher exposes no intermediate feature maps for --feature-kd")
    }
}

/// A float checkpoint as a teacher.
pub struct CheckpointTeacher {
    /// The file, as an absolute path.
    pub path: PathBuf,
    pub sha256: String,
    /// The checkpoint with its batch norms folded into the convs (inference only).
    model: Model,
    /// The checkpoint as stored, whose node names feature taps use.
    stored: Model,
    /// [`Self::model`] planned once for every batch (the teacher's weights never change).
    engine: Engine,
    /// For each feature tap, the network up to the tap node, batch norms folded.
    taps: Vec<Engine>,
    /// Per-channel scale and shift that take the student's normalisation to the teacher's
    /// (`None` when they are the same): the teacher sees the student's augmented pixels as
    /// its own preprocessing would have presented them.
    renormalise: Option<([f32; 3], [f32; 3])>,
}

impl CheckpointTeacher {
    /// Reads the teacher checkpoint at `path` (errors name `--teacher` and the file).
    pub fn load(path: &Path) -> Result<CheckpointTeacher> {
        let flag = || format!("--teacher `{}`", path.display());
        let sha256 = crate::tensor_file::file_sha256(path).with_context(flag)?;
        let stored = checkpoint::load(path).with_context(flag)?;
        let model = fold_batch_norm(&stored).with_context(flag)?;
        let path = std::fs::canonicalize(path).with_context(flag)?;
        Ok(CheckpointTeacher {
            path,
            sha256,
            engine: model.engine(),
            model,
            stored,
            taps: Vec::new(),
            renormalise: None,
        })
    }

    /// Reads the teacher of a run being resumed, refusing a file that changed since the run
    /// started (another teacher would make the resumed run a different one).
    pub fn reopen(record: &TeacherRecord) -> Result<CheckpointTeacher> {
        let teacher = CheckpointTeacher::load(&record.path).context(
            "the run being resumed distils from this teacher, which must still be there",
        )?;
        if teacher.sha256 != record.sha256 {
            bail!(
                "the teacher `{}` changed since the run started (sha256 {}, now {}); restore it to resume",
                record.path.display(),
                record.sha256,
                teacher.sha256
            );
        }
        Ok(teacher)
    }

    /// The loaded checkpoint (batch norms folded).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Checks that the teacher can teach a student of `class_names` whose input is
    /// `input_size`, normalised with `mean` and `std`, and sets the teacher up for that input.
    pub fn prepare_for(
        &mut self,
        class_names: &[String],
        input_size: [usize; 2],
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Result<()> {
        let flag = format!("--teacher `{}`", self.path.display());
        let theirs = &self.model.meta.class_names;
        if theirs.len() != class_names.len() {
            bail!(
                "{flag} has {} classes but the student and data have {}",
                theirs.len(),
                class_names.len()
            );
        }
        let placeholders = |names: &[String]| {
            names
                .iter()
                .enumerate()
                .all(|(i, n)| *n == format!("class_{i}"))
        };
        let first_difference = theirs
            .iter()
            .zip(class_names)
            .enumerate()
            .find(|(_, (t, s))| t != s);
        if let Some((i, (t, s))) = first_difference
            && !placeholders(theirs)
            && !placeholders(class_names)
        {
            bail!("{flag}: class {i} is `{t}`, but the student's class {i} is `{s}`");
        }
        let own = self.model.meta.preprocessing.input_size;
        if own != input_size {
            bail!(
                "{flag} takes {}x{} images but the student's are {}x{}",
                own[0],
                own[1],
                input_size[0],
                input_size[1]
            );
        }
        crate::exec::check_input(&self.model.graph, &[1, 3, input_size[0], input_size[1]])
            .with_context(|| flag.clone())?;
        let p = &self.model.meta.preprocessing;
        self.renormalise = (p.mean != mean || p.std != std).then(|| {
            let scale: [f32; 3] = std::array::from_fn(|c| std[c] / p.std[c]);
            let shift: [f32; 3] = std::array::from_fn(|c| (mean[c] - p.mean[c]) / p.std[c]);
            (scale, shift)
        });
        Ok(())
    }

    /// Sets up feature taps at the teacher's nodes `names` (checked to exist) and returns
    /// their map sizes at the teacher's input size.
    pub fn set_feature_taps(&mut self, names: &[&str]) -> Result<Vec<Dims>> {
        let graph = &self.stored.graph;
        let [h, w] = self.stored.meta.preprocessing.input_size;
        let dims = graph.infer_shapes(h, w)?;
        let mut taps = Vec::new();
        let mut sizes = Vec::new();
        for name in names {
            let id = find_node(graph, name, "teacher")?;
            let prefix = Model {
                graph: truncated(graph, id),
                weights: self.stored.weights.clone(),
                meta: self.stored.meta.clone(),
            };
            taps.push(fold_batch_norm(&prefix)?.engine());
            sizes.push(dims[id]);
        }
        self.taps = taps;
        Ok(sizes)
    }

    /// Top-1 (%) on `images` with the teacher's own preprocessing, or `None` without images.
    pub fn test_top1(&self, images: Arc<Images>) -> Result<Option<f64>> {
        if images.is_empty() {
            return Ok(None);
        }
        let report = evaluate(&self.model, images, 256)
            .with_context(|| format!("--teacher `{}`", self.path.display()))?;
        Ok(Some(report.top1))
    }

    /// The run's record of this teacher and the loss weights.
    pub fn config(&self, test_top1: Option<f64>, weights: KdWeights) -> DistillConfig {
        DistillConfig {
            teacher: TeacherRecord {
                path: self.path.clone(),
                sha256: self.sha256.clone(),
                arch: self.model.meta.arch.as_ref().map(|a| a.variant_name()),
                test_top1,
            },
            weights,
            features: Vec::new(),
            feature_loss: Default::default(),
        }
    }
}

impl CheckpointTeacher {
    /// The student's batch as the teacher's preprocessing would have presented it.
    fn input(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.renormalise {
            None => x.clone(),
            Some((scale, shift)) => {
                let (n, c, h, w) = x.dims4()?;
                let plane = h * w;
                let mut v = x.flatten_all()?.to_vec1::<f32>()?;
                for (i, pl) in v.chunks_mut(plane).enumerate() {
                    let ch = i % c;
                    pl.iter_mut().for_each(|p| *p = *p * scale[ch] + shift[ch]);
                }
                Tensor::from_vec(v, (n, c, h, w), &Device::Cpu)?
            }
        })
    }
}

impl Teacher for CheckpointTeacher {
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.engine.forward(&self.input(x)?)
    }

    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let input = self.input(x)?;
        self.taps.iter().map(|tap| tap.forward(&input)).collect()
    }
}
