//! The knowledge-distillation flags of `slimcandle train` (`docs/distillation.md`). Their
//! names are also the keys of training recipes.

use super::exit::{as_usage, usage};
use super::ranges::{POSITIVE, WEIGHT};
use anyhow::Result;
use clap::{Args, ValueEnum};
use slimcandle::train::KdWeights;
use slimcandle::train::feature_kd::{FeatureTap, HintLoss};
use std::path::PathBuf;

#[derive(Args, Debug, Clone, Default)]
pub struct DistillArgs {
    /// Knowledge distillation: the student also learns from this trained checkpoint's logits
    /// (any architecture with the same classes and input size).
    #[arg(
        long,
        value_name = "CKPT",
        help_heading = "Distillation",
        conflicts_with = "resume"
    )]
    pub teacher: Option<PathBuf>,
    /// Weight of the distillation term, in [0, 1]; the cross-entropy gets 1 - alpha
    /// [default: 0.9].
    #[arg(long, value_parser = WEIGHT.parser(), value_name = "ALPHA", help_heading = "Distillation")]
    pub kd_alpha: Option<f64>,
    /// Softmax temperature of the distillation term, > 0 [default: 4].
    #[arg(long, value_parser = POSITIVE.parser(), value_name = "T", help_heading = "Distillation")]
    pub kd_temperature: Option<f64>,
    /// Feature distillation: compare the student's map at STUDENT_NODE with the teacher's at
    /// TEACHER_NODE (graph node names, as `slimcandle inspect` lists them); repeatable.
    /// WEIGHT defaults to 1 (mse) or 500 (at).
    #[arg(
        long,
        value_name = "STUDENT_NODE:TEACHER_NODE[:WEIGHT]",
        help_heading = "Distillation"
    )]
    pub feature_kd: Vec<String>,
    /// How feature maps are compared: mse (same shape) or at (attention transfer: channel
    /// counts may differ) [default: mse].
    #[arg(long, value_enum, value_name = "LOSS", help_heading = "Distillation")]
    pub feature_kd_loss: Option<HintLossName>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum HintLossName {
    Mse,
    At,
}

impl DistillArgs {
    /// The loss weights with `--teacher` (validated), `None` without; the other flags without
    /// `--teacher` are refused.
    pub fn weights(&self) -> Result<Option<KdWeights>> {
        if self.teacher.is_none() {
            let given = [
                ("--kd-alpha", self.kd_alpha.is_some()),
                ("--kd-temperature", self.kd_temperature.is_some()),
                ("--feature-kd", !self.feature_kd.is_empty()),
                ("--feature-kd-loss", self.feature_kd_loss.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
                usage!("{flag} only applies to distillation: add --teacher CKPT");
            }
            return Ok(None);
        }
        let defaults = KdWeights::default();
        let weights = KdWeights {
            alpha: self.kd_alpha.unwrap_or(defaults.alpha),
            temperature: self.kd_temperature.unwrap_or(defaults.temperature),
        };
        weights.validate().map_err(as_usage)?;
        Ok(Some(weights))
    }

    /// The feature taps and their loss (no taps: none), with `--feature-kd-loss` refused
    /// without taps.
    pub fn feature_taps(&self) -> Result<(Vec<FeatureTap>, HintLoss)> {
        let loss = match self.feature_kd_loss {
            Some(HintLossName::At) => HintLoss::At,
            Some(HintLossName::Mse) | None => HintLoss::Mse,
        };
        if self.feature_kd.is_empty() && self.feature_kd_loss.is_some() {
            usage!("--feature-kd-loss needs at least one --feature-kd tap");
        }
        let taps = self
            .feature_kd
            .iter()
            .map(|t| FeatureTap::parse(t, loss))
            .collect::<Result<_>>()
            .map_err(as_usage)?;
        Ok((taps, loss))
    }
}
