//! The knowledge-distillation flags of `slimcandle train` (`docs/distillation.md`). Their
//! names are also the keys of training recipes.

use anyhow::{Result, bail};
use clap::Args;
use slimcandle::train::KdWeights;
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
    #[arg(long, value_name = "ALPHA", help_heading = "Distillation")]
    pub kd_alpha: Option<f64>,
    /// Softmax temperature of the distillation term, > 0 [default: 4].
    #[arg(long, value_name = "T", help_heading = "Distillation")]
    pub kd_temperature: Option<f64>,
}

impl DistillArgs {
    /// The loss weights with `--teacher` (validated), `None` without; the other flags without
    /// `--teacher` are refused.
    pub fn weights(&self) -> Result<Option<KdWeights>> {
        if self.teacher.is_none() {
            let given = [
                ("--kd-alpha", self.kd_alpha.is_some()),
                ("--kd-temperature", self.kd_temperature.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
                bail!("{flag} only applies to distillation: add --teacher CKPT");
            }
            return Ok(None);
        }
        let defaults = KdWeights::default();
        let weights = KdWeights {
            alpha: self.kd_alpha.unwrap_or(defaults.alpha),
            temperature: self.kd_temperature.unwrap_or(defaults.temperature),
        };
        weights.validate()?;
        Ok(Some(weights))
    }
}
