use super::ArchArgs;
use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use slimcandle::bench::{self, BenchMode};
use slimcandle::model::Model;
use slimcandle::models::ArchSpec;
use slimcandle::report::human_bytes;
use slimcandle::train::teacher::{CheckpointTeacher, Teacher};
use std::path::PathBuf;

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
    /// Train mode: time distillation steps from this teacher checkpoint (its eval-mode
    /// forward pass and the distillation loss included). The student gets the teacher's
    /// number of classes unless --num-classes says otherwise.
    #[arg(long, value_name = "CKPT")]
    teacher: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let Some(arch) = &args.arch.arch else {
        bail!("bench needs --arch")
    };
    let mode = match args.mode {
        ModeArg::Train => BenchMode::Train,
        ModeArg::Infer => BenchMode::Infer,
    };
    let mut teacher = match &args.teacher {
        Some(_) if mode != BenchMode::Train => bail!("--teacher only applies to --mode train"),
        Some(path) => Some(CheckpointTeacher::load(path)?),
        None => None,
    };
    let mut options = args.arch.options();
    if let Some(t) = &teacher {
        options.num_classes = options.num_classes.or(Some(t.model().num_classes()));
    }
    let spec = ArchSpec::parse(arch, &options)?;
    let model = Model::init(&spec, 0)?;
    if let Some(t) = &mut teacher {
        // Random data, standard-normal per channel: the teacher's own normalisation.
        let p = t.model().meta.preprocessing.clone();
        t.prepare_for(&model.meta.class_names, [args.input_size; 2], p.mean, p.std)?;
    }
    let r = bench::run_with_teacher(
        &model,
        mode,
        args.batch_size,
        args.input_size,
        args.warmup,
        args.iterations,
        teacher.as_ref().map(|t| t as &dyn Teacher),
    )?;
    if args.json {
        let mut v = serde_json::to_value(&r)?;
        v["arch"] = serde_json::json!(spec.variant_name());
        v["stem"] = serde_json::json!(spec.stem);
        v["teacher"] = serde_json::json!(teacher.as_ref().map(|t| t.path.display().to_string()));
        super::print_json(&v);
    } else {
        let peak = r.peak_memory.map(human_bytes).unwrap_or_else(|| "-".into());
        let with = teacher
            .as_ref()
            .map(|t| format!(" with teacher `{}`", t.path.display()))
            .unwrap_or_default();
        println!(
            "{}{with} ({:?} stem) {:?} batch {} at {}x{}: {:.1} images/s ({:.1} ms/batch), peak memory {peak}, {} threads",
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
