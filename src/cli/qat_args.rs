//! The quantization-aware training flags of `slimcandle train` (`docs/quantization.md`,
//! "Quantization-aware training"). Their names are also the keys of training recipes.

use super::quantize::CalibratorArg;
use super::ranges::{MAX_EPOCHS, MAX_IMAGES, count_in};
use anyhow::{Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use slimcandle::data::{BatchLoader, Dataset, EpochPlan};
use slimcandle::model::Model;
use slimcandle::passes::quant::{Calibrator, Granularity};
use slimcandle::train::qat::{Qat, QatConfig};
use std::sync::Arc;

#[derive(Args, Clone, Default)]
pub struct QatArgs {
    /// Quantization-aware training: fine-tune the --init checkpoint with int8 fake
    /// quantization; the run's checkpoints are int8 (as `slimcandle quantize` writes them).
    #[arg(
        long,
        help_heading = "Quantization-aware training",
        conflicts_with = "resume"
    )]
    pub qat: bool,
    /// Batch norm uses its running statistics (frozen) from this epoch on, counted from 0
    /// [default: never].
    #[arg(
        long,
        value_name = "EPOCH",
        value_parser = count_in(0, MAX_EPOCHS),
        help_heading = "Quantization-aware training"
    )]
    pub freeze_bn_epoch: Option<usize>,
    /// Activation ranges stop following the batches from this epoch on, counted from 0
    /// [default: never].
    #[arg(
        long,
        value_name = "EPOCH",
        value_parser = count_in(0, MAX_EPOCHS),
        help_heading = "Quantization-aware training"
    )]
    pub freeze_observers_epoch: Option<usize>,
    /// Training images the initial activation ranges are calibrated on [default: 1024].
    #[arg(
        long,
        value_name = "N",
        value_parser = count_in(1, MAX_IMAGES),
        help_heading = "Quantization-aware training"
    )]
    pub calibration: Option<usize>,
    /// How the initial ranges are chosen [default: percentile].
    #[arg(
        long,
        value_enum,
        value_name = "METHOD",
        help_heading = "Quantization-aware training"
    )]
    pub calibrator: Option<CalibratorArg>,
    /// One weight scale per tensor instead of per output channel.
    #[arg(long, help_heading = "Quantization-aware training")]
    pub per_tensor: bool,
    /// Conv and linear layers to keep in float (mixed precision): comma-separated globs over
    /// layer names, as `quantize --keep-float` takes them.
    #[arg(
        long,
        value_name = "PATTERNS",
        help_heading = "Quantization-aware training"
    )]
    pub keep_float: Option<String>,
}

/// The percentile of `--calibrator percentile` (as `quantize`'s default).
const PERCENTILE: f64 = 99.99;

impl QatArgs {
    /// The QAT settings with `--qat` (checked against the run's `epochs` and `--init`),
    /// `None` without; the other flags without `--qat` are refused.
    pub fn config(&self, epochs: usize, has_init: bool) -> Result<Option<QatConfig>> {
        if !self.qat {
            let given = [
                ("--freeze-bn-epoch", self.freeze_bn_epoch.is_some()),
                (
                    "--freeze-observers-epoch",
                    self.freeze_observers_epoch.is_some(),
                ),
                ("--calibration", self.calibration.is_some()),
                ("--calibrator", self.calibrator.is_some()),
                ("--per-tensor", self.per_tensor),
                ("--keep-float", self.keep_float.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
                bail!("{flag} only applies to quantization-aware training: add --qat");
            }
            return Ok(None);
        }
        if !has_init {
            bail!("--qat fine-tunes a trained float model: give it with --init CKPT");
        }
        let config = QatConfig {
            granularity: if self.per_tensor {
                Granularity::PerTensor
            } else {
                Granularity::PerChannel
            },
            calibrator: match self.calibrator.unwrap_or(CalibratorArg::Percentile) {
                CalibratorArg::Minmax => Calibrator::Minmax,
                CalibratorArg::Percentile => Calibrator::Percentile {
                    percentile: PERCENTILE,
                },
                CalibratorArg::Mse => Calibrator::Mse,
                CalibratorArg::Entropy => Calibrator::Entropy,
            },
            calibration_images: self.calibration.unwrap_or(1024),
            freeze_bn_epoch: self.freeze_bn_epoch,
            freeze_observers_epoch: self.freeze_observers_epoch,
            keep_float: self
                .keep_float
                .as_deref()
                .unwrap_or("")
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(str::to_string)
                .collect(),
        };
        config.validate(epochs)?;
        Ok(Some(config))
    }
}

/// Refuses an int8 `--init` checkpoint: QAT fine-tunes the float model (fake quantization
/// needs the float weights), and its result is int8 again.
pub fn check_float_init(init: &std::path::Path) -> Result<()> {
    if let slimcandle::checkpoint::AnyModel::Int8(_) = slimcandle::checkpoint::load_any(init)? {
        bail!(
            "--init `{}` is an int8 checkpoint: --qat fine-tunes the float model it was quantized from",
            init.display()
        );
    }
    Ok(())
}

/// Calibrates the initial ranges of a QAT run on a seeded, class-balanced subset of the
/// training split (never the test split), with a progress bar.
pub fn calibrate(model: &Model, data: &Dataset, config: &QatConfig, seed: u64) -> Result<Qat> {
    let subset = data.train.balanced_subset(config.calibration_images, seed);
    if subset.is_empty() {
        bail!("{}: no training images to calibrate on", data.source);
    }
    let bar = ProgressBar::new(subset.len() as u64).with_style(
        ProgressStyle::with_template("calibrating {bar:30} {pos}/{len} images, eta {eta}")
            .expect("valid template"),
    );
    let p = &model.meta.preprocessing;
    let batches = BatchLoader::new(Arc::new(subset), EpochPlan::in_order(64, p.mean, p.std))
        .map(|b| b.map(|b| b.x));
    let qat = Qat::calibrate(model, batches, config.clone(), |n| {
        bar.set_position(n as u64)
    })?;
    bar.finish_and_clear();
    Ok(qat)
}
