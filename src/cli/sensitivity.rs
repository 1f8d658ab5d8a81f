use super::options::{self, DataArgs, PruneLayerArgs};
use super::ranges::{MAX_CHANNELS, MAX_IMAGES, count_in, open};
use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use slimcandle::checkpoint;
use slimcandle::data::{BatchLoader, DataSpec, Dataset, EpochPlan, LoadOptions};
use slimcandle::eval::check_classes;
use slimcandle::model::Model;
use slimcandle::passes::quant::QuantOptions;
use slimcandle::passes::quant::sensitivity::quant_sensitivity;
use slimcandle::prune::importance::Criterion;
use slimcandle::prune::magnitude::MagnitudeConfig;
use slimcandle::prune::pattern::parse_list;
use slimcandle::prune::plan::PlanConfig;
use slimcandle::prune::sensitivity::{Sensitivity, channel_sensitivity, magnitude_sensitivity};
use slimcandle::report::{Table, human_count};
use slimcandle::tensor_file::write_bytes_atomic;
use std::path::PathBuf;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SensitivityMethod {
    /// Remove each layer group's least important channels.
    Channel,
    /// Zero each layer's smallest weights.
    Magnitude,
    /// Quantize to int8 with one conv or linear layer at a time kept in float.
    Quantize,
}

#[derive(Args)]
#[command(mut_arg("data", options::data_required))]
pub struct SensitivityArgs {
    /// Checkpoint to analyse.
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// What each trial prunes: whole channels, or single weights by magnitude.
    #[arg(long, value_enum, default_value = "channel")]
    method: SensitivityMethod,
    /// Quantize scans: training images to calibrate on (a seeded, class-balanced subset).
    #[arg(long, value_parser = count_in(1, MAX_IMAGES), default_value_t = 1024)]
    calibration: usize,
    /// Pruning ratios to try on each layer, comma-separated.
    #[arg(long, value_parser = open(0.0, 1.0).parser(), default_value = "0.1,0.3,0.5,0.7", value_delimiter = ',')]
    ratios: Vec<f64>,
    /// Channel importance: l1, l2, bn-scale, random.
    #[arg(long, default_value = "l1")]
    criterion: Criterion,
    /// Round kept channel counts to a multiple of this. The default 1 measures exactly the
    /// ratios asked (and includes the residual streams), where `prune` rounds to 8 and spares
    /// them: pass `--round-to 8 --min-channels 8` to scan what `prune` would cut.
    #[arg(long, value_parser = count_in(1, MAX_CHANNELS), default_value_t = 1)]
    round_to: usize,
    /// Never cut a layer below this many channels (prune's default: 8; see --round-to).
    #[arg(long, value_parser = count_in(1, MAX_CHANNELS), default_value_t = 1)]
    min_channels: usize,
    /// The layers the scan leaves out (quantize scans: never quantized).
    #[command(flatten)]
    layers: PruneLayerArgs,
    /// Seed of the test subset and the random criterion.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the results to this CSV file (one row per layer and ratio).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: SensitivityArgs) -> Result<()> {
    if let Some(csv) = &args.csv {
        super::check_output_is_not_input(csv, &[&args.checkpoint])?;
        super::output::check(csv, "--csv", super::output::Kind::File)?;
    }
    let model = checkpoint::load(&args.checkpoint)?;
    let quantize = args.method == SensitivityMethod::Quantize;
    let spec: DataSpec = args.data.spec().parse()?;
    let data = spec.load(&LoadOptions {
        size: model.meta.preprocessing.input_size[0],
        train_limit: Some(if quantize { args.calibration } else { 0 }),
        test_limit: args.data.test_limit,
        seed: args.seed,
        ..Default::default()
    })?;
    check_classes(&model.meta.class_names, &data.class_names, &data.source)?;
    if data.test.is_empty() {
        bail!("{}: the test split is empty", data.source);
    }
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} evaluations, eta {eta}")
            .expect("valid template"),
    );
    // A quantize scan calibrates first, with its own bar; this one starts after it.
    if !quantize {
        bar.set_message("pruning one layer at a time");
    }
    let mut progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let result = match args.method {
        SensitivityMethod::Quantize => return run_quantize(&args, &model, &data, &bar),
        SensitivityMethod::Channel => {
            let cfg = PlanConfig {
                exclude: parse_list(args.layers.exclude())?,
                min_channels: args.min_channels,
                round_to: args.round_to.max(1),
                prune_residual: true,
                ..Default::default()
            };
            channel_sensitivity(
                &model,
                args.criterion,
                &cfg,
                &args.ratios,
                data.test.clone(),
                args.seed,
                &mut progress,
            )?
        }
        SensitivityMethod::Magnitude => {
            let cfg = MagnitudeConfig {
                exclude: parse_list(args.layers.exclude())?
                    .iter()
                    .map(|p| p.as_str().to_string())
                    .collect(),
                include_depthwise: args.layers.prune_depthwise,
                ..MagnitudeConfig::new(0.5)
            };
            magnitude_sensitivity(&model, &cfg, &args.ratios, data.test.clone(), &mut progress)?
        }
    };
    bar.finish_and_clear();
    if write_results(&args, &data, &csv(&result), serde_json::to_value(&result)?)? {
        return Ok(());
    }
    println!(
        "{} on {} ({} images): top-1 {:.2}%, {} params, {} MACs",
        args.checkpoint.display(),
        data.source,
        data.test.len(),
        result.baseline_top1,
        human_count(result.params as u64),
        human_count(result.macs)
    );
    let magnitude = args.method == SensitivityMethod::Magnitude;
    print!("{}", table(&result, &args.ratios, magnitude).render());
    Ok(())
}

/// One row per layer group (or layer), one column per ratio: the top-1 change in points, and
/// what pruning it at the largest ratio saves (MACs, or non-zero parameters for magnitude).
fn table(result: &Sensitivity, ratios: &[f64], magnitude: bool) -> Table {
    let mut header = vec!["layers".to_string(), "size".to_string()];
    header.extend(ratios.iter().map(|r| format!("{:.0}%", 100.0 * r)));
    header.push(
        if magnitude {
            "params saved at max"
        } else {
            "MACs saved at max"
        }
        .to_string(),
    );
    let refs: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut t = Table::new(&refs, &[0]);
    for chunk in result.rows.chunks(ratios.len()) {
        let layers = &chunk[0].layers;
        let name = if layers.len() > 2 {
            format!("{} +{} more", layers[0], layers.len() - 1)
        } else {
            layers.join(" ")
        };
        let mut row = vec![name, chunk[0].size.to_string()];
        row.extend(chunk.iter().map(|r| format!("{:+.2}", r.top1_change)));
        let last = chunk
            .iter()
            .max_by(|a, b| a.ratio.total_cmp(&b.ratio))
            .expect("one row per ratio");
        let saved = if magnitude {
            (result.params - last.params) as f64 / result.params.max(1) as f64
        } else {
            (result.macs - last.macs) as f64 / result.macs.max(1) as f64
        };
        row.push(format!("{:.1}%", 100.0 * saved));
        t.row(row);
    }
    t
}

fn csv(result: &Sensitivity) -> String {
    let mut out = String::from("layers,size,ratio,kept,params,macs,top1,top1_change\n");
    for r in &result.rows {
        out.push_str(&format!(
            "\"{}\",{},{},{},{},{},{:.4},{:.4}\n",
            r.layers.join(" "),
            r.size,
            r.ratio,
            r.kept,
            r.params,
            r.macs,
            r.top1,
            r.top1_change
        ));
    }
    out
}

/// Writes the scan's CSV (atomically) when asked and, with `--json`, prints `value` with the checkpoint,
/// data and CSV path added; returns whether it printed (so no table follows).
fn write_results(
    args: &SensitivityArgs,
    data: &Dataset,
    csv: &str,
    mut value: serde_json::Value,
) -> Result<bool> {
    if let Some(path) = &args.csv {
        super::output::create_parent(path)?;
        write_bytes_atomic(path, csv.as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    if args.json {
        value["checkpoint"] = serde_json::json!(args.checkpoint);
        value["data"] = serde_json::json!(data.source);
        value["csv"] = serde_json::json!(args.csv);
        super::print_json(&value);
    }
    Ok(args.json)
}

/// `--method quantize`: calibrate once on the training split, then the int8 model with each
/// conv or linear layer alone kept in float; a table ordered by the top-1 the float layer buys
/// back, and a CSV (`layer,top1,gain`).
fn run_quantize(
    args: &SensitivityArgs,
    model: &Model,
    data: &Dataset,
    bar: &ProgressBar,
) -> Result<()> {
    if data.train.is_empty() {
        bail!(
            "{}: no training images to calibrate on (calibration never uses the test split)",
            data.source
        );
    }
    let opts = QuantOptions {
        keep_float: parse_list(args.layers.exclude())?,
        ..Default::default()
    };
    let p = &model.meta.preprocessing;
    let batches = EpochPlan::in_order(64, p.mean, p.std);
    let mut batches = BatchLoader::new(data.train.clone(), batches).map(|b| b.map(|b| b.x));
    // The shared calibration bar of `quantize`, advanced as each batch goes to the observers
    // and cleared when they have seen the last one, before the evaluations' bar starts.
    let calibrating = super::progress::bar(data.train.len(), "calibrating", "images");
    let calibration = std::iter::from_fn(|| {
        let next = batches.next();
        match &next {
            Some(Ok(x)) => calibrating.inc(x.dims()[0] as u64),
            None => calibrating.finish_and_clear(),
            Some(Err(_)) => {}
        }
        next
    });
    let result = quant_sensitivity(
        model,
        calibration,
        &opts,
        data.test.clone(),
        |done, total| {
            if bar.length() == Some(0) {
                bar.set_message("int8, one layer at a time in float");
            }
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    calibrating.finish_and_clear();
    bar.finish_and_clear();
    let mut csv = String::from("layer,top1,gain\n");
    for t in &result.trials {
        csv.push_str(&format!("\"{}\",{:.4},{:.4}\n", t.layer, t.top1, t.gain));
    }
    if write_results(args, data, &csv, serde_json::to_value(&result)?)? {
        return Ok(());
    }
    println!(
        "{} on {} ({} images, {} calibration images): top-1 float {:.2}%, int8 {:.2}%",
        args.checkpoint.display(),
        data.source,
        data.test.len(),
        data.train.len(),
        result.float_top1,
        result.int8_top1,
    );
    let mut t = Table::new(&["layer kept in float", "top-1", "gain"], &[0]);
    for trial in &result.trials {
        t.row(vec![
            trial.layer.clone(),
            format!("{:.2}%", trial.top1),
            format!("{:+.2}", trial.gain),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}
