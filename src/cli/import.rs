use super::exit::{as_usage, usage};
use super::ranges::count;
use super::{ArchArgs, output};
use anyhow::{Result, bail};
use clap::Args;
use serde_json::json;
use slimcandle::checkpoint;
use slimcandle::import::import_state_dict;
use slimcandle::models::ArchSpec;
use slimcandle::report::{human_bytes, human_count};
use std::path::PathBuf;

#[derive(Args)]
pub struct ImportArgs {
    #[command(flatten)]
    arch: ArchArgs,
    /// PyTorch state dict saved as safetensors (`safetensors.torch.save_file(model.state_dict(), ...)`).
    state_dict: PathBuf,
    /// Checkpoint to write.
    #[arg(short, long)]
    output: PathBuf,
    /// Class names, comma-separated, in label order (default: class_0, class_1, ...).
    #[arg(long, value_delimiter = ',')]
    class_names: Option<Vec<String>>,
    /// Input size the preprocessing records (default: 224, or 32 with `--stem cifar`).
    #[arg(long, value_parser = count(1))]
    input_size: Option<usize>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ImportArgs) -> Result<()> {
    super::check_output_is_not_input(&args.output, &[&args.state_dict])?;
    output::check(&args.output, "-o", output::Kind::File)?;
    let Some(arch) = &args.arch.arch else {
        usage!("import needs --arch: which architecture the state dict is for")
    };
    ArchSpec::parse(arch, &args.arch.options()).map_err(as_usage)?;
    let mut model = import_state_dict(&args.state_dict, arch, &args.arch.options())?;
    if let Some(names) = args.class_names {
        if names.len() != model.num_classes() {
            bail!(
                "--class-names gives {} names, but the model has {} classes",
                names.len(),
                model.num_classes()
            );
        }
        model.meta.class_names = names;
    }
    if let Some(size) = args.input_size {
        model.meta.preprocessing.input_size = [size, size];
    }
    let [h, w] = model.meta.preprocessing.input_size;
    let summary = model.graph.summary(h, w)?;
    output::create_parent(&args.output)?;
    checkpoint::save(&model, &args.output)?;
    let file_size = std::fs::metadata(&args.output)?.len();
    let variant = model
        .meta
        .arch
        .as_ref()
        .map(|a| a.variant_name())
        .unwrap_or_default();
    if args.json {
        super::print_json(&json!({
            "output": args.output,
            "arch": variant,
            "num_classes": model.num_classes(),
            "params": summary.params,
            "macs": summary.macs,
            "input_size": [h, w],
            "file_size": file_size,
        }));
    } else {
        println!(
            "imported {variant} ({} classes): {} params, {} MACs at {h}x{w} -> {} ({})",
            model.num_classes(),
            human_count(summary.params as u64),
            human_count(summary.macs),
            args.output.display(),
            human_bytes(file_size)
        );
    }
    Ok(())
}
