use super::ArchArgs;
use super::exit::{as_usage, usage};
use super::ranges::{MAX_BATCH, MAX_INPUT_SIZE, MAX_STEPS, count_in};
use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use slimcandle::bench::{self, BenchMode};
use slimcandle::checkpoint::{self, AnyModel};
use slimcandle::graph::Graph;
use slimcandle::model::Model;
use slimcandle::models::{ArchSpec, Stem};
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
    /// A checkpoint to time instead of a fresh `--arch` model; an int8 (format 3) checkpoint
    /// runs on the integer engine (inference only).
    checkpoint: Option<std::path::PathBuf>,
    #[command(flatten)]
    arch: ArchArgs,
    /// Images per batch. 64 is the batch of the throughput column of the reports (`run`,
    /// `compare`); batch-1 latency is `--batch-size 1`.
    #[arg(long, value_parser = count_in(1, MAX_BATCH), alias = "batch", default_value_t = 64)]
    batch_size: usize,
    /// Input height and width.
    #[arg(long, value_parser = count_in(1, MAX_INPUT_SIZE), alias = "size", default_value_t = 32)]
    input_size: usize,
    /// train: forward, backward and an SGD step; infer: eval-mode forward.
    #[arg(long, value_enum, default_value = "train")]
    mode: ModeArg,
    /// Untimed batches first.
    #[arg(long, value_parser = count_in(0, MAX_STEPS), default_value_t = 2)]
    warmup: usize,
    /// Timed batches.
    #[arg(long, value_parser = count_in(1, MAX_STEPS), default_value_t = 10)]
    iterations: usize,
    /// Train mode: time distillation steps from this teacher checkpoint (its eval-mode
    /// forward pass and the distillation loss included). The student gets the teacher's
    /// number of classes unless --num-classes says otherwise.
    #[arg(long, value_name = "CKPT")]
    teacher: Option<PathBuf>,
    /// Print JSON instead of text.
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
    let (b, s, w, it) = (
        args.batch_size,
        args.input_size,
        args.warmup,
        args.iterations,
    );
    let mut teacher = match &args.teacher {
        Some(_) if mode != BenchMode::Train => usage!("--teacher only applies to --mode train"),
        Some(path) => Some(CheckpointTeacher::load(path)?),
        None => None,
    };
    let (name, stem, r) = match (&args.checkpoint, &args.arch.arch) {
        (Some(_), Some(_)) => usage!("bench takes a checkpoint or --arch, not both"),
        (None, None) => usage!("bench needs --arch or a checkpoint"),
        (Some(path), None) => match checkpoint::load_any(path)? {
            AnyModel::Int8(q) => {
                if mode == BenchMode::Train {
                    bail!(
                        "`{}` is an int8 checkpoint: use --mode infer",
                        path.display()
                    );
                }
                check_memory(&q.graph, mode, 1, b, s)?;
                let stem = q.meta.arch.as_ref().map(|a| a.stem);
                (
                    "int8 checkpoint".to_string(),
                    stem,
                    bench::run_int8(&q, b, s, w, it)?,
                )
            }
            AnyModel::Float(m) => {
                check_memory(&m.graph, mode, 4, b, s)?;
                let stem = m.meta.arch.as_ref().map(|a| a.stem);
                prepare_teacher(&mut teacher, &m, s)?;
                let r = bench::run_with_teacher(&m, mode, b, s, w, it, teacher_ref(&teacher))?;
                ("checkpoint".to_string(), stem, r)
            }
        },
        (None, Some(arch)) => {
            let mut options = args.arch.options();
            if let Some(t) = &teacher {
                options.num_classes = options.num_classes.or(Some(t.model().num_classes()));
            }
            let spec = ArchSpec::parse(arch, &options).map_err(as_usage)?;
            let model = Model::init(&spec, 0)?;
            let bytes = if args.int8 { 1 } else { 4 };
            check_memory(&model.graph, mode, bytes, b, s)?;
            let r = if args.int8 {
                if mode == BenchMode::Train {
                    usage!("--int8 times inference: use --mode infer");
                }
                bench::run_int8(&bench::quantize_for_bench(&model, b, s)?, b, s, w, it)?
            } else {
                prepare_teacher(&mut teacher, &model, s)?;
                bench::run_with_teacher(&model, mode, b, s, w, it, teacher_ref(&teacher))?
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
        v["teacher"] = serde_json::json!(teacher.as_ref().map(|t| t.path.display().to_string()));
        super::print_json(&v);
    } else {
        let peak = r.peak_memory.map(human_bytes).unwrap_or_else(|| "-".into());
        let with = teacher
            .as_ref()
            .map(|t| format!(" with teacher `{}`", t.path.display()))
            .unwrap_or_default();
        println!(
            "{}{with} ({} stem) {} batch {} at {}x{}: {:.1} images/s ({:.1} ms/batch; median {:.2} ms, p95 {:.2} ms), peak memory {peak}, {} threads",
            name,
            match stem {
                Some(Stem::Imagenet) => "imagenet",
                Some(Stem::Cifar) => "cifar",
                None => "unknown",
            },
            match r.mode {
                BenchMode::Train => "train",
                BenchMode::Infer => "infer",
            },
            r.batch,
            r.size,
            r.size,
            r.images_per_s,
            r.ms_per_batch,
            r.ms_median,
            r.ms_p95,
            r.threads
        );
    }
    Ok(())
}

/// Refuses a batch that cannot fit in this machine's available memory, before allocating
/// it. The estimate is a lower bound, so nothing that could run is refused: training keeps
/// every activation for the backward pass, inference needs at least the largest node's
/// input and output at once.
fn check_memory(
    graph: &Graph,
    mode: BenchMode,
    bytes_per_value: usize,
    batch: usize,
    size: usize,
) -> Result<()> {
    let Some(available) = available_memory() else {
        return Ok(());
    };
    let dims = graph.infer_shapes(size, size).map_err(as_usage)?;
    let per_image: usize = match mode {
        BenchMode::Train => dims.iter().map(|d| d.elements()).sum(),
        BenchMode::Infer => graph
            .nodes
            .iter()
            .zip(&dims)
            .map(|(n, d)| {
                d.elements() + n.inputs.iter().map(|&i| dims[i].elements()).sum::<usize>()
            })
            .max()
            .unwrap_or(0),
    };
    let needed = (per_image as u128) * (batch as u128) * (bytes_per_value as u128);
    if needed > available as u128 {
        usage!(
            "--batch-size {batch} at {size}x{size} needs at least {} of activations, and this machine has {} available",
            human_bytes(u64::try_from(needed).unwrap_or(u64::MAX)),
            human_bytes(available)
        );
    }
    Ok(())
}

/// `MemAvailable` of /proc/meminfo, in bytes (None where there is no such file).
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Checks the teacher against the student it will teach, on random standard-normal data (the
/// teacher's own normalisation).
fn prepare_teacher(
    teacher: &mut Option<CheckpointTeacher>,
    student: &Model,
    size: usize,
) -> Result<()> {
    if let Some(t) = teacher {
        let p = t.model().meta.preprocessing.clone();
        t.prepare_for(&student.meta.class_names, [size; 2], p.mean, p.std)?;
    }
    Ok(())
}

fn teacher_ref(teacher: &Option<CheckpointTeacher>) -> Option<&dyn Teacher> {
    teacher.as_ref().map(|t| t as &dyn Teacher)
}
