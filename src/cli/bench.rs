use super::ArchArgs;
use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use slimcandle::bench::{self, BenchMode};
use slimcandle::model::Model;
use slimcandle::models::ArchSpec;
use slimcandle::report::human_bytes;

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Train,
    Infer,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    arch: ArchArgs,
    /// Images per batch.
    #[arg(long, alias = "batch", default_value_t = 64)]
    batch_size: usize,
    /// Input height and width.
    #[arg(long, alias = "size", default_value_t = 32)]
    input_size: usize,
    /// train: forward, backward and an SGD step; infer: eval-mode forward.
    #[arg(long, value_enum, default_value = "train")]
    mode: ModeArg,
    /// Untimed batches first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed batches.
    #[arg(long, default_value_t = 10)]
    iterations: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let Some(arch) = &args.arch.arch else {
        bail!("bench needs --arch")
    };
    let spec = ArchSpec::parse(arch, &args.arch.options())?;
    let model = Model::init(&spec, 0)?;
    let mode = match args.mode {
        ModeArg::Train => BenchMode::Train,
        ModeArg::Infer => BenchMode::Infer,
    };
    let r = bench::run(
        &model,
        mode,
        args.batch_size,
        args.input_size,
        args.warmup,
        args.iterations,
    )?;
    if args.json {
        let mut v = serde_json::to_value(&r)?;
        v["arch"] = serde_json::json!(spec.variant_name());
        v["stem"] = serde_json::json!(spec.stem);
        super::print_json(&v);
    } else {
        let peak = r.peak_memory.map(human_bytes).unwrap_or_else(|| "-".into());
        println!(
            "{} ({:?} stem) {:?} batch {} at {}x{}: {:.1} images/s ({:.1} ms/batch), peak memory {peak}, {} threads",
            spec.variant_name(),
            spec.stem,
            r.mode,
            r.batch,
            r.size,
            r.size,
            r.images_per_s,
            r.ms_per_batch,
            r.threads
        );
    }
    Ok(())
}
