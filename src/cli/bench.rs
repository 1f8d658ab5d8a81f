use super::ArchArgs;
use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use slimcandle::bench::{self, BenchMode};
use slimcandle::checkpoint::{self, AnyModel};
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
    /// A checkpoint to time instead of a fresh `--arch` model; an int8 (format 3) checkpoint
    /// runs on the integer engine (inference only).
    checkpoint: Option<std::path::PathBuf>,
    #[command(flatten)]
    arch: ArchArgs,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Input height and width.
    #[arg(long, default_value_t = 32)]
    size: usize,
    #[arg(long, value_enum, default_value = "train")]
    mode: ModeArg,
    /// Untimed batches first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed batches.
    #[arg(long, default_value_t = 10)]
    iterations: usize,
    #[arg(long)]
    json: bool,
    /// Time int8 inference: the `--arch` model quantized (calibrated on one random batch).
    #[arg(long)]
    int8: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let mode = match args.mode {
        ModeArg::Train => BenchMode::Train,
        ModeArg::Infer => BenchMode::Infer,
    };
    let (b, s, w, it) = (args.batch, args.size, args.warmup, args.iterations);
    let (name, stem, r) = match (&args.checkpoint, &args.arch.arch) {
        (Some(_), Some(_)) => bail!("bench takes a checkpoint or --arch, not both"),
        (None, None) => bail!("bench needs --arch or a checkpoint"),
        (Some(path), None) => match checkpoint::load_any(path)? {
            AnyModel::Int8(q) => {
                if matches!(args.mode, ModeArg::Train) {
                    bail!(
                        "`{}` is an int8 checkpoint: use --mode infer",
                        path.display()
                    );
                }
                let stem = q.meta.arch.as_ref().map(|a| a.stem);
                (
                    "int8 checkpoint".to_string(),
                    stem,
                    bench::run_int8(&q, b, s, w, it)?,
                )
            }
            AnyModel::Float(m) => {
                let stem = m.meta.arch.as_ref().map(|a| a.stem);
                (
                    "checkpoint".to_string(),
                    stem,
                    bench::run(&m, mode, b, s, w, it)?,
                )
            }
        },
        (None, Some(arch)) => {
            let spec = ArchSpec::parse(arch, &args.arch.options())?;
            let model = Model::init(&spec, 0)?;
            let r = if args.int8 {
                if matches!(args.mode, ModeArg::Train) {
                    bail!("--int8 times inference: use --mode infer");
                }
                bench::run_int8(&bench::quantize_for_bench(&model, b, s)?, b, s, w, it)?
            } else {
                bench::run(&model, mode, b, s, w, it)?
            };
            let name = if args.int8 {
                format!("{} int8", spec.variant_name())
            } else {
                spec.variant_name()
            };
            (name, Some(spec.stem), r)
        }
    };
    if args.json {
        let mut v = serde_json::to_value(&r)?;
        v["arch"] = serde_json::json!(name);
        v["stem"] = serde_json::json!(stem);
        super::print_json(&v);
    } else {
        let peak = r.peak_memory.map(human_bytes).unwrap_or_else(|| "-".into());
        println!(
            "{} ({} stem) {:?} batch {} at {}x{}: {:.1} images/s ({:.1} ms/batch), peak memory {peak}, {} threads",
            name,
            stem.map_or("unknown".to_string(), |s| format!("{s:?}")),
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
