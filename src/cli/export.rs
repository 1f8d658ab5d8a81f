//! `slimcandle export`: a checkpoint as ONNX (float or QDQ int8) or as a PyTorch state dict.

use super::ranges::{MAX_BATCH, MAX_INPUT_SIZE};
use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use slimcandle::checkpoint::{self, AnyModel};
use slimcandle::export::{self, Batch, OnnxOptions};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    /// ONNX: float for fp32, pruned and sparse checkpoints, QDQ for int8 ones.
    Onnx,
    /// A plain float state dict (safetensors) for `torch.nn.Module.load_state_dict`.
    Torch,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Checkpoint to export (float, sparse, pruned or int8).
    checkpoint: PathBuf,
    /// Where to write the model (written atomically).
    #[arg(short, long)]
    output: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "onnx")]
    format: Format,
    /// ONNX opset of the default domain (13 to 21).
    #[arg(long, default_value_t = 17)]
    opset: i64,
    /// Batch dimension of the ONNX input: a number, or `dynamic` for a symbolic one.
    #[arg(long, default_value = "dynamic", value_parser = parse_batch)]
    batch: Batch,
    /// Input height and width, `H,W` (default: the checkpoint's preprocessing size).
    #[arg(long, value_parser = parse_size)]
    input_size: Option<[usize; 2]>,
}

fn parse_batch(s: &str) -> Result<Batch, String> {
    match s {
        "dynamic" => Ok(Batch::Dynamic),
        n => match n.parse::<usize>() {
            Ok(n) if (1..=MAX_BATCH).contains(&n) => Ok(Batch::Fixed(n)),
            _ => Err(format!(
                "`{s}` is neither a number in [1, {MAX_BATCH}] nor `dynamic`"
            )),
        },
    }
}

fn parse_size(s: &str) -> Result<[usize; 2], String> {
    let parts: Vec<Option<usize>> = s
        .split(',')
        .map(|p| {
            p.trim()
                .parse()
                .ok()
                .filter(|n| (1..=MAX_INPUT_SIZE).contains(n))
        })
        .collect();
    match parts.as_slice() {
        [Some(h), Some(w)] => Ok([*h, *w]),
        [Some(n)] => Ok([*n, *n]),
        _ => Err(format!(
            "`{s}` is not `H,W` with sizes in [1, {MAX_INPUT_SIZE}]"
        )),
    }
}

pub fn run(args: ExportArgs) -> Result<()> {
    super::check_output_is_not_input(&args.output, &[&args.checkpoint])?;
    let model = checkpoint::load_any(&args.checkpoint)?;
    match args.format {
        Format::Onnx => {
            let mut opts = OnnxOptions::for_model(model.meta());
            opts.opset = args.opset;
            opts.batch = args.batch;
            if let Some(size) = args.input_size {
                opts.input_size = size;
            }
            export::write_onnx(&model, &opts, &args.output)?;
        }
        Format::Torch => match &model {
            AnyModel::Float(m) => export::torch::write_state_dict(m, &args.output)?,
            AnyModel::Int8(_) => bail!(
                "`{}` is an int8 checkpoint; a PyTorch state dict is exported from its float parent",
                args.checkpoint.display()
            ),
        },
    }
    eprintln!("wrote {}", args.output.display());
    Ok(())
}
