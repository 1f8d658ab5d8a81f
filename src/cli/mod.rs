//! Command-line parsing and dispatch. Results go to stdout, diagnostics to stderr; `--json`
//! prints one JSON document with stable snake_case keys. The binary is `parse` then `run`;
//! `stages::registry` is the recipe runner's view of the same commands.

mod bench;
mod compare;
mod distill_args;
mod eval;
pub mod exit;
mod export;
mod forward;
mod import;
mod inspect;
mod models;
mod options;
mod output;
mod predict;
mod progress;
mod prune;
mod qat_args;
mod quantize;
mod ranges;
mod run;
mod sensitivity;
pub mod stages;
mod train;

use self::ranges::{MAX_CLASSES, POSITIVE, count, count_in};
use anyhow::Result;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use exit::usage;
use slimcandle::models::{ArchOptions, Stem};
use std::path::Path;

#[derive(Parser)]
#[command(
    name = "slimcandle",
    version,
    about = "Build, train, compress and ship small CNNs"
)]
pub struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = count(1), global = true)]
    threads: Option<usize>,
    /// Image folders (`--data folder:DIR`): skip files that do not decode, listing them,
    /// instead of stopping at the first.
    #[arg(long, global = true)]
    skip_bad_images: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every model family and variant with params, MACs at 224x224 and ImageNet top-1.
    #[command(after_help = "Example: slimcandle models --json")]
    Models(models::ModelsArgs),
    /// Convert a PyTorch state dict (safetensors) into a self-describing checkpoint.
    #[command(
        after_help = "Example: slimcandle import --arch mobilenet_v2 --num-classes 10 mnv2.safetensors -o mnv2.ckpt.safetensors"
    )]
    Import(import::ImportArgs),
    /// Show a checkpoint's architecture, per-layer table, totals and metadata.
    #[command(after_help = "Example: slimcandle inspect model.safetensors --json")]
    Inspect(inspect::InspectArgs),
    /// Train a model (fresh, or fine-tuned from a checkpoint), or resume a run.
    #[command(
        after_help = "Example: slimcandle train --arch mobilenet_v2 --stem cifar --data cifar10:DIR --epochs 8 --schedule one-cycle --nesterov -o runs/mnv2"
    )]
    Train(Box<train::TrainArgs>),
    /// Evaluate a checkpoint: top-1/top-5, per-class accuracy, confusion matrix, latency.
    #[command(
        after_help = "Example: slimcandle eval runs/mnv2/best.safetensors --data cifar10:DIR --json"
    )]
    Eval(eval::EvalArgs),
    /// Classify images with a checkpoint's preprocessing and class names.
    #[command(
        after_help = "Example: slimcandle predict runs/mnv2/best.safetensors cat.jpg dog.png --top-k 3"
    )]
    Predict(predict::PredictArgs),
    /// Measure training or inference throughput (images/s) and peak memory.
    #[command(
        after_help = "Example: slimcandle bench --arch mobilenet_v2 --stem cifar --batch-size 64 --input-size 32 --mode train"
    )]
    Bench(bench::BenchArgs),
    /// Run every 4-D float tensor of a safetensors file through a checkpoint (eval mode).
    #[command(
        after_help = "Example: slimcandle forward model.safetensors inputs.safetensors -o logits.safetensors"
    )]
    Forward(forward::ForwardArgs),
    /// Prune a checkpoint: remove whole channels (a smaller, faster network).
    #[command(
        after_help = "Examples:\n  slimcandle prune model.safetensors --criterion l1 --target-macs 0.5 --data cifar10:DIR -o pruned.safetensors\n  slimcandle train --init pruned.safetensors --data cifar10:DIR --epochs 4 -o runs/finetune"
    )]
    Prune(Box<prune::PruneArgs>),
    /// Quantize a checkpoint to int8 (post-training, calibrated on training images).
    #[command(
        after_help = "Example: slimcandle quantize model.safetensors --data cifar10:DIR --calibration 1024 --calibrator percentile -o model.int8.safetensors"
    )]
    Quantize(quantize::QuantizeArgs),
    /// Prune each layer alone at several ratios and measure accuracy: a table and a CSV.
    #[command(
        after_help = "Example: slimcandle sensitivity model.safetensors --data cifar10:DIR --ratios 0.1,0.3,0.5,0.7 --test-limit 1000 --csv sens.csv"
    )]
    Sensitivity(sensitivity::SensitivityArgs),
    /// Run a recipe: train, prune, evaluate ... stage by stage, with a report (docs/recipes.md).
    #[command(
        after_help = "Examples:\n  slimcandle run recipes/quickstart.toml\n  slimcandle run recipes/quickstart.toml --set train.epochs=2 --dry-run"
    )]
    Run(run::RunArgs),
    /// Compare checkpoints: size, MACs, accuracy and speed in one table, and a plot.
    #[command(
        after_help = "Example: slimcandle compare base.safetensors pruned.safetensors --data cifar10:DIR --plot cmp.svg"
    )]
    Compare(compare::CompareArgs),
    /// Export a checkpoint for deployment: ONNX (float or int8 QDQ) or a PyTorch state dict.
    #[command(
        after_help = "Examples:\n  slimcandle export model.safetensors -o model.onnx --batch dynamic\n  slimcandle export model.safetensors --format torch -o state_dict.safetensors"
    )]
    Export(export::ExportArgs),
}

/// `--arch` and the options that complete it, shared by every command that builds a model.
#[derive(Args, Debug, Clone)]
pub struct ArchArgs {
    /// Architecture: squeezenet1_0, squeezenet1_1, mobilenet_v1, mobilenet_v2,
    /// mobilenet_v3_small, mobilenet_v3_large, shufflenet_v1, shufflenet_v2 (torchvision names
    /// such as shufflenet_v2_x1_5 are accepted too).
    #[arg(long)]
    pub arch: Option<String>,
    /// Width multiplier (MobileNets) or scale (ShuffleNets: 0.5, 1.0, 1.5, 2.0).
    #[arg(long, value_parser = POSITIVE.parser())]
    pub width: Option<f64>,
    /// Groups of ShuffleNet V1's 1x1 convolutions (1, 2, 3, 4, 8).
    #[arg(long, value_parser = count(1))]
    pub groups: Option<usize>,
    /// Number of output classes.
    #[arg(long, value_parser = count_in(1, MAX_CLASSES))]
    pub num_classes: Option<usize>,
    /// Input stem: `imagenet` (the published network) or `cifar` (keeps resolution for 32x32).
    #[arg(long)]
    pub stem: Option<Stem>,
}

impl ArchArgs {
    pub fn options(&self) -> ArchOptions {
        ArchOptions {
            width: self.width,
            groups: self.groups,
            num_classes: self.num_classes,
            stem: self.stem,
        }
    }
}

/// The command line's definition: the derived one, with the argument relations that derive
/// attributes cannot state (everything `train --resume` refuses).
pub fn command() -> clap::Command {
    Cli::command().mut_subcommand("train", train::refuse_settings_with_resume)
}

/// Parses the command line; a usage error exits 2 with clap's message.
pub fn parse() -> Cli {
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

pub fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        // Candle and rayon both read this before their thread pools start.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    slimcandle::data::set_skip_bad_images(cli.skip_bad_images);
    match cli.command {
        Command::Models(a) => models::run(a),
        Command::Import(a) => import::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Forward(a) => forward::run(a),
        Command::Train(a) => train::run(*a),
        Command::Bench(a) => bench::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Prune(a) => prune::run(*a),
        Command::Sensitivity(a) => sensitivity::run(a),
        Command::Run(a) => run::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Export(a) => export::run(a),
    }
}

/// Refuses to write an output over one of the command's own inputs.
pub fn check_output_is_not_input(output: &Path, inputs: &[&Path]) -> Result<()> {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    for input in inputs {
        if output == *input || (canon(output).is_some() && canon(output) == canon(input)) {
            usage!(
                "the output `{}` is also an input of this command; choose another file",
                output.display()
            );
        }
    }
    Ok(())
}

/// Prints a JSON document on stdout.
pub fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialise")
    );
}

#[cfg(test)]
mod tests {

    /// Every option of every command explains itself in `--help` (issue #14).
    #[test]
    fn every_option_has_help_text() {
        let cli = super::command();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && !arg.is_hide_set() && arg.get_help().is_none() {
                    missing.push(format!("{} {}", sub.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "options without help: {missing:?}");
    }
}
