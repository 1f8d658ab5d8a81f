use super::exit::{as_usage, usage};
use super::options::{self, DataArgs, PruneScope, PruneSelectArgs};
use super::ranges::{
    KEPT_FRACTION, MAX_BATCH, MAX_CHANNELS, MAX_STEPS, REMOVED_FRACTION, count_in, open_closed,
};
use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use serde_json::json;
use slimcandle::checkpoint;
use slimcandle::data::{DataSpec, Dataset, LoadOptions};
use slimcandle::eval::{check_classes, evaluate};
use slimcandle::footprint::Footprint;
use slimcandle::model::{Model, Provenance};
use slimcandle::prune::importance::{Criterion, TaylorData};
use slimcandle::prune::magnitude::{MagnitudeConfig, MaskScope, prune_one_shot};
use slimcandle::prune::pattern::{NamePattern, parse_list};
use slimcandle::prune::plan::{PlanConfig, Scope, Target};
use slimcandle::prune::{ChannelPruneConfig, prune_channels};
use slimcandle::report::{Table, human_bytes, human_count};
use slimcandle::tensor_file::TensorFile;
use std::path::PathBuf;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// Remove whole channels with everything coupled to them: a smaller, faster network.
    Channel,
    /// Zero the weights of smallest magnitude: a smaller (sparse) file, same shapes.
    Magnitude,
}

#[derive(Args)]
#[command(mut_arg("data", options::data_optional))]
pub struct PruneArgs {
    /// Checkpoint to prune.
    checkpoint: PathBuf,
    /// What to remove: whole channels, or single weights.
    #[arg(long, value_enum, default_value = "channel")]
    method: Method,
    /// Channel importance: l1, l2, bn-scale, taylor (needs --data), random [default: l1].
    #[arg(long)]
    criterion: Option<Criterion>,
    /// Fraction of the prunable channels to remove.
    #[arg(long, value_parser = REMOVED_FRACTION.parser(), conflicts_with_all = ["target_macs", "target_params"])]
    ratio: Option<f64>,
    #[command(flatten)]
    select: PruneSelectArgs,
    /// Keep this fraction of the MACs (0.5 halves them), reached by searching the ratio.
    #[arg(long, value_parser = KEPT_FRACTION.parser(), conflicts_with = "target_params")]
    target_macs: Option<f64>,
    /// Keep this fraction of the parameters, reached by searching the ratio.
    #[arg(long, value_parser = KEPT_FRACTION.parser())]
    target_params: Option<f64>,
    /// Channel: round kept channel counts to a multiple of this (1: no rounding) [default: 8].
    #[arg(long, value_parser = count_in(1, MAX_CHANNELS))]
    round_to: Option<usize>,
    /// Channel: never cut a layer below this many channels [default: 8].
    #[arg(long, value_parser = count_in(1, MAX_CHANNELS))]
    min_channels: Option<usize>,
    /// Channel: never remove more than this fraction of one layer's channels (global scope,
    /// targets), in (0, 1] [default: 0.9].
    #[arg(long, value_parser = open_closed(0.0, 1.0).parser())]
    max_ratio: Option<f64>,
    /// Channel: prune residual streams (channels joined by an add) too; spared by default.
    #[arg(long)]
    prune_residual: bool,
    /// Per-layer ratio, PATTERN=RATIO (repeatable; first match wins).
    #[arg(long = "layer-ratio", value_name = "PATTERN=RATIO")]
    layer_ratios: Vec<String>,
    /// Without `--data`, the accuracy before and after is not measured (and the taylor
    /// criterion, which needs training images, is refused).
    #[command(flatten)]
    data: DataArgs,
    /// Taylor criterion: batches of training images to accumulate gradients over [default: 16].
    #[arg(long, value_parser = count_in(1, MAX_STEPS))]
    taylor_batches: Option<usize>,
    /// Images per batch for evaluation and the taylor criterion. The taylor scores depend on
    /// it (gradients of each batch), evaluation does not; 64 bounds the gradient memory.
    #[arg(long, value_parser = count_in(1, MAX_BATCH), default_value_t = 64)]
    batch_size: usize,
    /// Seed of the data subsets and the random criterion.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output checkpoint.
    #[arg(short, long)]
    output: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_layer_ratio(text: &str) -> Result<(NamePattern, f64)> {
    let Some((pattern, ratio)) = text.rsplit_once('=') else {
        bail!("--layer-ratio `{text}`: expected PATTERN=RATIO, e.g. `features.1.*=0.2`");
    };
    let ratio: f64 = ratio
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("--layer-ratio `{text}`: `{ratio}` is not a number"))?;
    if !REMOVED_FRACTION.contains(ratio) {
        bail!("--layer-ratio `{text}`: the ratio must be {REMOVED_FRACTION}");
    }
    Ok((NamePattern::parse(pattern)?, ratio))
}

/// Accuracy on the test split, when data was given.
fn accuracy(
    model: &Model,
    data: Option<&Dataset>,
    batch_size: usize,
) -> Result<Option<(f64, f64)>> {
    match data {
        Some(d) => {
            let r = evaluate(model, d.test.clone(), batch_size)?;
            Ok(Some((r.top1, r.top5)))
        }
        None => Ok(None),
    }
}

impl PruneArgs {
    fn criterion(&self) -> Criterion {
        self.criterion.unwrap_or(Criterion::L1)
    }

    fn taylor_batches(&self) -> usize {
        self.taylor_batches.unwrap_or(16)
    }
}

/// The checks that need no file: which flags go with which method, and that the method has
/// its amount (a recipe runs them before any stage starts).
pub fn check(args: &PruneArgs) -> Result<()> {
    match args.method {
        Method::Channel => {
            if args.select.sparsity.is_some() || args.select.layers.prune_depthwise {
                usage!("--sparsity and --prune-depthwise are for --method magnitude");
            }
            if [args.ratio, args.target_macs, args.target_params]
                .iter()
                .all(Option::is_none)
            {
                usage!("say how much to prune: --ratio R, --target-macs F or --target-params F");
            }
            if args.criterion().needs_data() && args.data.given().is_none() {
                usage!(
                    "--criterion {} takes gradients on training images: pass --data",
                    args.criterion().name()
                );
            }
            if args.taylor_batches.is_some() && !args.criterion().needs_data() {
                usage!("--taylor-batches is for --criterion taylor");
            }
        }
        Method::Magnitude => {
            if args.ratio.is_some() || args.target_macs.is_some() || args.target_params.is_some() {
                usage!("--method magnitude takes --sparsity S, not --ratio or --target-*");
            }
            let channel_only = [
                ("--layer-ratio", !args.layer_ratios.is_empty()),
                ("--criterion", args.criterion.is_some()),
                ("--round-to", args.round_to.is_some()),
                ("--min-channels", args.min_channels.is_some()),
                ("--max-ratio", args.max_ratio.is_some()),
                ("--prune-residual", args.prune_residual),
                ("--taylor-batches", args.taylor_batches.is_some()),
            ];
            if let Some((flag, _)) = channel_only.iter().find(|(_, given)| *given) {
                usage!("{flag} is for --method channel (magnitude zeroes single weights by size)");
            }
            if args.select.sparsity.is_none() {
                usage!(
                    "--method magnitude needs --sparsity S (the fraction of prunable weights to zero)"
                );
            }
        }
    }
    for text in &args.layer_ratios {
        parse_layer_ratio(text).map_err(as_usage)?;
    }
    parse_list(args.select.layers.exclude()).map_err(|e| as_usage(e.context("--prune-exclude")))?;
    Ok(())
}

pub fn run(args: PruneArgs) -> Result<()> {
    check(&args)?;
    super::check_output_is_not_input(&args.output, &[&args.checkpoint])?;
    super::output::check(&args.output, "-o", super::output::Kind::File)?;
    let file = TensorFile::read(&args.checkpoint)?;
    let model = checkpoint::from_file(&file)?;
    let needs_train = args.criterion().needs_data() && args.method == Method::Channel;
    let data = match args.data.given() {
        Some(spec) => {
            let spec: DataSpec = spec.parse()?;
            let opts = LoadOptions {
                size: model.meta.preprocessing.input_size[0],
                train_limit: Some(if needs_train {
                    args.taylor_batches() * args.batch_size
                } else {
                    0
                }),
                test_limit: args.data.test_limit,
                seed: args.seed,
                ..Default::default()
            };
            let d = spec.load(&opts)?;
            check_classes(&model.meta.class_names, &d.class_names, &d.source)?;
            Some(d)
        }
        None => None,
    };
    let before = Footprint::of(&model, Some(file.file_size() as u64))?;
    // Evaluation and the taylor criterion's gradients take seconds to minutes.
    let spinner = data
        .as_ref()
        .map(|_| super::progress::spinner("evaluating before pruning"));
    let acc_before = accuracy(&model, data.as_ref(), args.batch_size)?;
    if let Some(s) = &spinner {
        s.set_message(if needs_train {
            format!(
                "ranking channels (taylor: gradients of {} batches)",
                args.taylor_batches()
            )
        } else {
            "pruning".to_string()
        });
    }
    let (pruned, details) = match args.method {
        Method::Channel => channel(&args, &model, data.as_ref())?,
        Method::Magnitude => magnitude(&args, &model)?,
    };
    if let Some(s) = &spinner {
        s.set_message("evaluating after pruning");
    }
    super::output::create_parent(&args.output)?;
    checkpoint::save(&pruned, &args.output)?;
    let size_after = std::fs::metadata(&args.output)?.len();
    let after = Footprint::of(&pruned, Some(size_after))?;
    let acc_after = accuracy(&pruned, data.as_ref(), args.batch_size)?;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    if args.json {
        super::print_json(&json!({
            "checkpoint": args.checkpoint,
            "output": args.output,
            "method": details.method,
            "details": details.json,
            "before": before,
            "after": after,
            "top1_before": acc_before.map(|a| a.0),
            "top1_after": acc_after.map(|a| a.0),
            "top5_before": acc_before.map(|a| a.1),
            "top5_after": acc_after.map(|a| a.1),
            "data": data.as_ref().map(|d| &d.source),
        }));
        return Ok(());
    }
    print!("{}", details.table.render());
    println!();
    print!(
        "{}",
        comparison(&before, &after, acc_before, acc_after).render()
    );
    let out = args.output.display();
    match args.method {
        Method::Channel => {
            println!("\nwrote {out} (fine-tune it with `slimcandle train --init {out} ...`)")
        }
        Method::Magnitude => println!(
            "\nwrote {out} (fine-tune it keeping the zeros with `slimcandle train --init {out} --prune magnitude \
             --sparsity S --initial-sparsity S ...`)"
        ),
    }
    Ok(())
}

/// What one pruning method did, for the report.
struct Details {
    method: &'static str,
    json: serde_json::Value,
    table: Table,
}

fn channel(args: &PruneArgs, model: &Model, data: Option<&Dataset>) -> Result<(Model, Details)> {
    let target = match (args.ratio, args.target_macs, args.target_params) {
        (Some(r), None, None) => Target::ChannelRatio(r),
        (None, Some(f), None) => Target::Macs(f),
        (None, None, Some(f)) => Target::Params(f),
        _ => bail!("say how much to prune: --ratio R, --target-macs F or --target-params F"),
    };
    let overrides = args
        .layer_ratios
        .iter()
        .map(|t| parse_layer_ratio(t))
        .collect::<Result<Vec<_>>>()?;
    let cfg = ChannelPruneConfig {
        criterion: args.criterion(),
        plan: PlanConfig {
            scope: match args.select.scope.unwrap_or(PruneScope::Uniform) {
                PruneScope::Uniform => Scope::Uniform,
                PruneScope::Global => Scope::Global,
            },
            target,
            overrides,
            exclude: parse_list(args.select.layers.exclude())?,
            min_channels: args.min_channels.unwrap_or(8),
            round_to: args.round_to.unwrap_or(8),
            max_ratio: args.max_ratio.unwrap_or(0.9),
            prune_residual: args.prune_residual,
        },
        seed: args.seed,
    };
    let taylor = data.map(|d| TaylorData {
        images: d.train.clone(),
        batch_size: args.batch_size,
        batches: args.taylor_batches(),
    });
    let (pruned, plan) = prune_channels(model, &cfg, taylor.as_ref())?;
    let mut table = Table::new(&["layers", "channels", "kept", "rule"], &[0, 3]);
    for g in plan
        .groups
        .iter()
        .filter(|g| g.kept < g.width || g.rule.is_some())
    {
        let layers = match g.layers.as_slice() {
            [first, .., last] if g.layers.len() > 3 => {
                format!("{first} ... {last} ({} layers)", g.layers.len())
            }
            all => all.join(" "),
        };
        table.row(vec![
            layers,
            g.width.to_string(),
            g.kept.to_string(),
            g.rule.clone().unwrap_or_default(),
        ]);
    }
    let json = json!({
        "criterion": args.criterion().name(),
        "scope": if cfg.plan.scope == Scope::Global { "global" } else { "uniform" },
        "ratio": plan.ratio,
        "layer_groups": plan.groups,
    });
    Ok((
        pruned,
        Details {
            method: "channel",
            json,
            table,
        },
    ))
}

fn magnitude(args: &PruneArgs, model: &Model) -> Result<(Model, Details)> {
    let Some(sparsity) = args.select.sparsity else {
        bail!("--method magnitude needs --sparsity S (the fraction of prunable weights to zero)");
    };
    let cfg = MagnitudeConfig {
        scope: match args.select.scope.unwrap_or(PruneScope::Global) {
            PruneScope::Uniform => MaskScope::Layer,
            PruneScope::Global => MaskScope::Global,
        },
        exclude: parse_list(args.select.layers.exclude())?
            .iter()
            .map(|p| p.as_str().to_string())
            .collect(),
        include_depthwise: args.select.layers.prune_depthwise,
        ..MagnitudeConfig::new(sparsity)
    };
    let mut pruned = model.deep_copy()?;
    let masks = prune_one_shot(&pruned, &cfg)?;
    let stats = masks.stats()?;
    let mut table = Table::new(&["layer", "weights", "zero", "sparsity"], &[0]);
    for l in &stats {
        table.row(vec![
            l.name.clone(),
            l.numel.to_string(),
            l.zeros.to_string(),
            format!("{:.1}%", 100.0 * l.sparsity()),
        ]);
    }
    pruned.meta.provenance = Provenance::derived_from(
        &model.meta.provenance,
        format!(
            "{}; magnitude pruning to {:.1}% sparsity of {} layers",
            model.meta.provenance.source,
            100.0 * masks.sparsity()?,
            stats.len()
        ),
    );
    let json = json!({
        "scope": if cfg.scope == MaskScope::Global { "global" } else { "layer" },
        "sparsity": masks.sparsity()?,
        "layers": stats,
    });
    Ok((
        pruned,
        Details {
            method: "magnitude",
            json,
            table,
        },
    ))
}

/// The before/after table every pruning command prints.
pub fn comparison(
    before: &Footprint,
    after: &Footprint,
    acc_before: Option<(f64, f64)>,
    acc_after: Option<(f64, f64)>,
) -> Table {
    let mut t = Table::new(&["", "before", "after", "after/before"], &[0]);
    let ratio = |a: f64, b: f64| format!("{:.1}%", 100.0 * b / a.max(1e-12));
    let mut row = |name: &str, a: u64, b: u64, fmt: fn(u64) -> String| {
        t.row(vec![
            name.to_string(),
            fmt(a),
            fmt(b),
            ratio(a as f64, b as f64),
        ]);
    };
    row(
        "params",
        before.params as u64,
        after.params as u64,
        human_count,
    );
    row(
        "non-zero params",
        before.nonzero_params as u64,
        after.nonzero_params as u64,
        human_count,
    );
    row("MACs", before.macs, after.macs, human_count);
    if let (Some(a), Some(b)) = (before.file_size, after.file_size) {
        row("file size", a, b, human_bytes);
    }
    if let (Some(a), Some(b)) = (acc_before, acc_after) {
        t.row(vec![
            "top-1".into(),
            format!("{:.2}%", a.0),
            format!("{:.2}%", b.0),
            format!("{:+.2} points", b.0 - a.0),
        ]);
        t.row(vec![
            "top-5".into(),
            format!("{:.2}%", a.1),
            format!("{:.2}%", b.1),
            format!("{:+.2} points", b.1 - a.1),
        ]);
    }
    t
}
