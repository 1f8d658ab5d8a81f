//! `slimcandle quantize`: post-training int8 quantization of a float checkpoint.

use super::exit::as_usage;
use super::options::{self, DataArgs};
use super::ranges::{MAX_BATCH, MAX_IMAGES, count_in, open_closed};
use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use serde_json::json;
use slimcandle::checkpoint;
use slimcandle::data::{BatchLoader, DataSpec, EpochPlan, LoadOptions};
use slimcandle::eval::{EvalReport, check_classes, evaluate, evaluate_int8};
use slimcandle::footprint::Footprint;
use slimcandle::model::Provenance;
use slimcandle::passes::quant::{self, Calibrator, Granularity, QuantOptions, plan, store};
use slimcandle::prune::pattern::parse_list;
use slimcandle::report::{Table, human_bytes, human_count};
use slimcandle::tensor_file::TensorFile;
use std::path::PathBuf;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CalibratorArg {
    /// The observed minimum and maximum.
    Minmax,
    /// Clip each tail at --percentile.
    Percentile,
    /// The clipping range with the least quantization MSE.
    Mse,
    /// TensorRT's KL-divergence calibration over a 2048-bin histogram.
    Entropy,
}

#[derive(Args)]
#[command(mut_arg("data", options::data_required))]
pub struct QuantizeArgs {
    /// Float checkpoint to quantize.
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Number of training images to calibrate on (a seeded, class-balanced subset).
    #[arg(long, value_parser = count_in(1, MAX_IMAGES), default_value_t = 1024)]
    calibration: usize,
    /// How each activation's range is chosen from its observed values.
    #[arg(long, value_enum, default_value = "percentile")]
    calibrator: CalibratorArg,
    /// Percentile calibrator: keep this percentage of each tail, in (50, 100] (100 is minmax).
    #[arg(long, value_parser = open_closed(50.0, 100.0).parser(), default_value_t = 99.99)]
    percentile: f64,
    /// One weight scale per tensor instead of one per output channel.
    #[arg(long)]
    per_tensor: bool,
    /// Conv and linear layers to keep in float: comma-separated globs over layer names.
    #[arg(long, default_value = "")]
    keep_float: String,
    /// Images per batch for calibration and evaluation. Neither result depends on it (the
    /// observers see every image); 64 bounds the memory of the recorded activations.
    #[arg(long, value_parser = count_in(1, MAX_BATCH), default_value_t = 64)]
    batch_size: usize,
    /// Seed of the calibration and test subsets.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output int8 checkpoint (format 3).
    #[arg(short, long)]
    output: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl QuantizeArgs {
    pub(super) fn calibrator(&self) -> Result<Calibrator> {
        Ok(match self.calibrator {
            CalibratorArg::Minmax => Calibrator::Minmax,
            CalibratorArg::Percentile => Calibrator::Percentile {
                percentile: self.percentile,
            },
            CalibratorArg::Mse => Calibrator::Mse,
            CalibratorArg::Entropy => Calibrator::Entropy,
        })
    }
}

fn images_per_second(r: &EvalReport) -> f64 {
    1000.0 / r.latency_ms_per_image.max(1e-9)
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    super::check_output_is_not_input(&args.output, &[&args.checkpoint])?;
    super::output::check(&args.output, "-o", super::output::Kind::File)?;
    let calibrator = args.calibrator()?;
    let file = TensorFile::read(&args.checkpoint)?;
    let model = checkpoint::from_file(&file)?;
    let opts = QuantOptions {
        granularity: if args.per_tensor {
            Granularity::PerTensor
        } else {
            Granularity::PerChannel
        },
        calibrator,
        keep_float: parse_list(&args.keep_float)
            .map_err(|e| as_usage(e.context("--keep-float")))?,
    };
    // Pattern errors before the (long) calibration.
    plan::keep_float_layers(&model.graph, &opts.keep_float)?;
    let channels = model.graph.input_channels();
    if channels != 3 {
        bail!(
            "`{}` takes {channels}-channel input; --data gives RGB images (3 channels)",
            args.checkpoint.display()
        );
    }
    let size = model.meta.preprocessing.input_size[0];
    let spec: DataSpec = args.data.spec().parse()?;
    let data = spec.load(&LoadOptions {
        size,
        train_limit: Some(args.calibration),
        test_limit: args.data.test_limit,
        seed: args.seed,
        ..Default::default()
    })?;
    check_classes(&model.meta.class_names, &data.class_names, &data.source)?;
    if data.train.is_empty() {
        bail!(
            "{}: no training images to calibrate on (calibration never uses the test split)",
            data.source
        );
    }
    let [h, w] = model.meta.preprocessing.input_size;
    if data.train.size != h || data.train.size != w {
        bail!(
            "{}: images are {1}x{1} but the model takes {h}x{w}",
            data.source,
            data.train.size
        );
    }

    let bar = super::progress::bar(data.train.len(), "calibrating", "images");
    let p = &model.meta.preprocessing;
    let plan_batches = EpochPlan::in_order(args.batch_size.max(1), p.mean, p.std);
    let batches = BatchLoader::new(data.train.clone(), plan_batches).map(|b| b.map(|b| b.x));
    let mut q = quant::quantize(&model, batches, &opts, |n| bar.set_position(n as u64))?;
    bar.finish_and_clear();
    q.meta.provenance = Provenance::derived_from(
        &model.meta.provenance,
        format!(
            "{}; int8 post-training quantization ({}, {} calibrator, {} images of {})",
            model.meta.provenance.source,
            if args.per_tensor {
                "per tensor"
            } else {
                "per channel"
            },
            calibrator.name(),
            q.scheme.calibration_images,
            data.source
        ),
    );

    let before = Footprint::of(&model, Some(file.file_size() as u64))?;
    let evals = if data.test.is_empty() {
        None
    } else {
        Some((
            evaluate(&model, data.test.clone(), args.batch_size)?,
            evaluate_int8(&q, data.test.clone(), args.batch_size)?,
        ))
    };
    super::output::create_parent(&args.output)?;
    store::save(&q, &args.output)?;
    let size_after = std::fs::metadata(&args.output)?.len();
    let params_after = q.param_count() as u64;

    if args.json {
        super::print_json(&json!({
            "checkpoint": args.checkpoint,
            "output": args.output,
            "data": data.source,
            "calibrator": q.scheme.calibrator,
            "granularity": q.scheme.granularity,
            "calibration_images": q.scheme.calibration_images,
            "float_layers": q.float_layers.keys().collect::<Vec<_>>(),
            "params_before": before.params,
            "params_after": params_after,
            "file_size_before": before.file_size,
            "file_size_after": size_after,
            "test_images": evals.as_ref().map(|e| e.0.images),
            "top1_before": evals.as_ref().map(|e| e.0.top1),
            "top1_after": evals.as_ref().map(|e| e.1.top1),
            "top5_before": evals.as_ref().map(|e| e.0.top5),
            "top5_after": evals.as_ref().map(|e| e.1.top5),
            "images_per_second_before": evals.as_ref().map(|e| images_per_second(&e.0)),
            "images_per_second_after": evals.as_ref().map(|e| images_per_second(&e.1)),
        }));
        return Ok(());
    }
    let mut t = Table::new(&["", "float", "int8", "int8/float"], &[0]);
    let ratio = |a: f64, b: f64| format!("{:.1}%", 100.0 * b / a.max(1e-12));
    t.row(vec![
        "params".into(),
        human_count(before.params as u64),
        human_count(params_after),
        ratio(before.params as f64, params_after as f64),
    ]);
    let size_before = file.file_size() as u64;
    t.row(vec![
        "file size".into(),
        human_bytes(size_before),
        human_bytes(size_after),
        ratio(size_before as f64, size_after as f64),
    ]);
    if let Some((f, i)) = &evals {
        t.row(vec![
            "top-1".into(),
            format!("{:.2}%", f.top1),
            format!("{:.2}%", i.top1),
            format!("{:+.2} points", i.top1 - f.top1),
        ]);
        t.row(vec![
            "top-5".into(),
            format!("{:.2}%", f.top5),
            format!("{:.2}%", i.top5),
            format!("{:+.2} points", i.top5 - f.top5),
        ]);
        t.row(vec![
            "images/s".into(),
            format!("{:.1}", images_per_second(f)),
            format!("{:.1}", images_per_second(i)),
            ratio(images_per_second(f), images_per_second(i)),
        ]);
    }
    println!(
        "int8 ({}, {} calibrator, {} calibration images from {}{})",
        if args.per_tensor {
            "per tensor"
        } else {
            "per channel"
        },
        calibrator.name(),
        q.scheme.calibration_images,
        data.source,
        match &evals {
            Some((f, _)) => format!("; {} test images", f.images),
            None => String::new(),
        }
    );
    print!("{}", t.render());
    if evals.is_some() {
        println!("(int8 accuracy and speed measured on the integer engine)");
    }
    println!("\nwrote {}", args.output.display());
    Ok(())
}
