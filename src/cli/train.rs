use super::ArchArgs;
use super::distill_args::DistillArgs;
use super::exit::{Interrupted, as_usage, usage};
use super::options::{DataArgs, PruneScope, PruneSelectArgs};
use super::qat_args::{self, QatArgs};
use super::ranges::{
    EPOCH_POSITION, KEPT_FRACTION, MAX_BATCH, MAX_EPOCHS, MAX_IMAGES, MAX_INPUT_SIZE, MAX_STEPS,
    NON_NEGATIVE, POSITIVE, REMOVED_FRACTION, count_in, open,
};
use anyhow::{Result, bail};
use clap::{Args, Command, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use slimcandle::checkpoint;
use slimcandle::data::{Augment, DataSpec, LoadOptions};
use slimcandle::model::{Model, Preprocessing, Provenance};
use slimcandle::models::ArchSpec;
use slimcandle::prune::magnitude::{
    Exclusion, GradualPruning, MagnitudeConfig, MaskScope, layer_choices,
};
use slimcandle::prune::pattern;
use slimcandle::train::feature_kd::resolve_taps;
use slimcandle::train::optimizer::OptimizerKind;
use slimcandle::train::schedule::Schedule;
use slimcandle::train::teacher::CheckpointTeacher;
use slimcandle::train::{EpochMetrics, Observer, Outcome, Run, TrainConfig};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone, Copy, ValueEnum)]
enum OptimizerName {
    Sgd,
    Adamw,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScheduleName {
    Constant,
    Cosine,
    Step,
    OneCycle,
}

#[derive(Clone, Copy, ValueEnum)]
enum PruneMethod {
    /// Unstructured: zero the conv and linear weights of smallest magnitude.
    Magnitude,
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    arch: ArchArgs,
    /// Start from this checkpoint instead of a fresh `--arch` model; its architecture, width,
    /// stem and input size are the model's, so the options that build a model are refused.
    #[arg(long, conflicts_with_all = ["arch", "width", "groups", "num_classes", "stem"])]
    init: Option<PathBuf>,
    /// With --init: replace the classifier by a fresh one sized for the dataset's classes.
    #[arg(long, requires = "init")]
    new_classifier: bool,
    /// Continue the run in this folder where it stopped; every setting comes from the run, so
    /// any other option but --json is refused.
    #[arg(long)]
    resume: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    /// Train on a seeded, class-balanced subset of this many images (shapes: generate this many).
    #[arg(long, value_parser = count_in(1, MAX_IMAGES))]
    train_limit: Option<usize>,
    /// Passes over the training split.
    #[arg(long, value_parser = count_in(1, MAX_EPOCHS), default_value_t = 10)]
    epochs: usize,
    /// Images per optimizer step. Unlike the evaluation commands' batch, it changes the
    /// result; 128 is the recipe of docs/benchmarks.md.
    #[arg(long, value_parser = count_in(1, MAX_BATCH), default_value_t = 128)]
    batch_size: usize,
    /// Optimizer: sgd (momentum) or adamw.
    #[arg(long, value_enum, default_value = "sgd")]
    optimizer: OptimizerName,
    /// Peak learning rate.
    #[arg(long, value_parser = POSITIVE.parser(), default_value_t = 0.1)]
    lr: f64,
    /// SGD momentum (AdamW: beta1).
    #[arg(long, value_parser = REMOVED_FRACTION.parser(), default_value_t = 0.9)]
    momentum: f64,
    /// Nesterov momentum (SGD).
    #[arg(long)]
    nesterov: bool,
    /// Weight decay on conv and linear weights (batch-norm parameters and biases are exempt).
    #[arg(long, value_parser = NON_NEGATIVE.parser(), default_value_t = 5e-4)]
    weight_decay: f64,
    /// Learning-rate schedule after the warm-up.
    #[arg(long, value_enum, default_value = "cosine")]
    schedule: ScheduleName,
    /// Linear warm-up length in epochs (cosine, step, constant).
    #[arg(long, value_parser = EPOCH_POSITION.parser(), default_value_t = 0.0)]
    warmup_epochs: f64,
    /// One-cycle: fraction of the steps spent rising to the peak.
    #[arg(long, value_parser = open(0.0, 1.0).parser(), default_value_t = 0.3)]
    pct_start: f64,
    /// Step schedule: decay every this many epochs by --gamma.
    #[arg(long, value_parser = count_in(1, MAX_EPOCHS), default_value_t = 30)]
    step_epochs: usize,
    /// Step schedule: factor applied to the learning rate at every decay.
    #[arg(long, value_parser = KEPT_FRACTION.parser(), default_value_t = 0.1)]
    gamma: f64,
    /// Label smoothing of the cross-entropy, in [0, 1).
    #[arg(long, value_parser = REMOVED_FRACTION.parser(), default_value_t = 0.0)]
    label_smoothing: f64,
    /// Random-crop padding in pixels (0 disables the crop).
    #[arg(long, value_parser = count_in(0, MAX_INPUT_SIZE), default_value_t = 4)]
    crop_padding: usize,
    /// Disable horizontal flips.
    #[arg(long)]
    no_flip: bool,
    /// Seed of initialisation, data order, augmentation and dropout (recorded in config.json).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run folder: config.json, metrics.jsonl, last/best/resume .safetensors.
    #[arg(short, long, required_unless_present = "resume")]
    output: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Prune gradually during training (see docs/pruning.md).
    #[arg(long, value_enum, help_heading = "Pruning")]
    prune: Option<PruneMethod>,
    /// The selection `prune --method magnitude` shares. Its flags go under the "Pruning"
    /// heading, which stays the current one for the flags after it: every later option names
    /// its heading (or is hidden), so keep `--json` and the general options above.
    #[command(flatten, next_help_heading = "Pruning")]
    select: PruneSelectArgs,
    /// Sparsity when pruning starts [default: 0].
    #[arg(long, value_parser = REMOVED_FRACTION.parser(), help_heading = "Pruning")]
    initial_sparsity: Option<f64>,
    /// Epoch at which pruning starts, fractions allowed [default: 0].
    #[arg(long, value_parser = EPOCH_POSITION.parser(), value_name = "EPOCH", help_heading = "Pruning")]
    prune_start_epoch: Option<f64>,
    /// Epoch at which the final sparsity is reached, fractions allowed [default: 75% of
    /// --epochs, so the last quarter fine-tunes the pruned network].
    #[arg(long, value_parser = EPOCH_POSITION.parser(), value_name = "EPOCH", help_heading = "Pruning")]
    prune_end_epoch: Option<f64>,
    /// Optimizer steps between mask updates [default: 50].
    #[arg(long, value_parser = count_in(1, MAX_STEPS), value_name = "STEPS", help_heading = "Pruning")]
    prune_frequency: Option<usize>,
    /// Network slimming: L1 penalty on batch-norm scales (gamma), e.g. 1e-4.
    #[arg(long, value_parser = NON_NEGATIVE.parser(), default_value_t = 0.0, value_name = "LAMBDA", help_heading = "Pruning")]
    bn_l1: f64,
    #[command(flatten)]
    distill: DistillArgs,
    #[command(flatten)]
    pub(super) qat: QatArgs,
    /// Stop after this many steps as if interrupted (for tests of resume).
    #[arg(long, value_parser = count_in(1, MAX_STEPS), hide = true)]
    stop_after_steps: Option<usize>,
}

/// Gives `--resume` a conflict with every other option of `train` (but `--json` and the
/// hidden test hook): a resumed run takes its settings from its folder, and a flag that
/// would be silently ignored is refused instead (exit 2).
pub fn refuse_settings_with_resume(cmd: Command) -> Command {
    const ALLOWED: &[&str] = &["resume", "json", "stop_after_steps", "help", "threads"];
    let others: Vec<clap::Id> = cmd
        .get_arguments()
        .map(|a| a.get_id().clone())
        .filter(|id| !ALLOWED.contains(&id.as_str()))
        .collect();
    cmd.mut_arg("resume", |a| a.conflicts_with_all(others))
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C (or the test hook) has stopped training in this process.
pub fn interrupted() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Ctrl-C finishes the current step and leaves a resumable run; a second Ctrl-C quits at once.
fn install_interrupt_handler() {
    extern "C" fn on_sigint(_: libc::c_int) {
        if STOP.swap(true, Ordering::SeqCst) {
            unsafe { libc::_exit(130) };
        }
    }
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

struct Bars {
    bar: Option<ProgressBar>,
    stop_after: Option<usize>,
    steps: usize,
}

impl Observer for Bars {
    fn epoch_start(&mut self, epoch: usize, epochs: usize, batches: usize, first: usize) {
        let bar = ProgressBar::new(batches as u64).with_position(first as u64);
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{epochs}", epoch + 1));
        self.bar = Some(bar);
    }

    fn step(&mut self, _batch: usize, loss: f64, top1: f64, rate: f64) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            bar.set_message(format!("loss {loss:.3} top-1 {top1:.1}% {rate:.0} img/s"));
        }
        self.steps += 1;
        if self.stop_after.is_some_and(|n| self.steps >= n) {
            STOP.store(true, Ordering::SeqCst);
        }
    }

    fn epoch_end(&mut self, m: &EpochMetrics) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let hint = m
            .train_hint
            .map(|h| format!(", hints {h:.4}"))
            .unwrap_or_default();
        let parts = match (m.train_ce, m.train_kd) {
            (Some(ce), Some(kd)) => format!(" (ce {ce:.4}, kd {kd:.4}{hint})"),
            _ => String::new(),
        };
        let test = match (m.test_top1, m.test_top5) {
            (Some(t1), Some(t5)) => format!(", test top-1 {t1:.2}% top-5 {t5:.2}%"),
            _ => String::new(),
        };
        let sparsity = m
            .sparsity
            .map(|s| format!(", sparsity {:.1}%", 100.0 * s))
            .unwrap_or_default();
        eprintln!(
            "epoch {}: train loss {:.4}{parts} top-1 {:.2}%{test}{sparsity}, lr {:.4}, {:.0} img/s, {:.1}s",
            m.epoch, m.train_loss, m.train_top1, m.lr, m.images_per_s, m.seconds
        );
    }
}

/// The pruning settings from the flags; flags of a pruning run without `--prune` are refused.
fn pruning_from(args: &TrainArgs) -> Result<Option<GradualPruning>> {
    let Some(PruneMethod::Magnitude) = args.prune else {
        let given = [
            ("--sparsity", args.select.sparsity.is_some()),
            ("--prune-scope", args.select.scope.is_some()),
            ("--prune-exclude", args.select.layers.exclude.is_some()),
            ("--prune-depthwise", args.select.layers.prune_depthwise),
            ("--initial-sparsity", args.initial_sparsity.is_some()),
            ("--prune-start-epoch", args.prune_start_epoch.is_some()),
            ("--prune-end-epoch", args.prune_end_epoch.is_some()),
            ("--prune-frequency", args.prune_frequency.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
            usage!("{flag} only applies to a pruning run: add --prune magnitude");
        }
        return Ok(None);
    };
    let Some(sparsity) = args.select.sparsity else {
        usage!("--prune magnitude needs the target --sparsity (for example --sparsity 0.8)");
    };
    let exclude = pattern::parse_list(args.select.layers.exclude())
        .map_err(|e| as_usage(e.context("--prune-exclude")))?
        .iter()
        .map(|p| p.as_str().to_string())
        .collect();
    let magnitude = MagnitudeConfig {
        sparsity,
        scope: match args.select.scope {
            Some(PruneScope::Uniform) => MaskScope::Layer,
            Some(PruneScope::Global) | None => MaskScope::Global,
        },
        exclude,
        include_depthwise: args.select.layers.prune_depthwise,
    };
    let pruning = GradualPruning {
        magnitude,
        initial_sparsity: args.initial_sparsity.unwrap_or(0.0),
        start_epoch: args.prune_start_epoch.unwrap_or(0.0),
        end_epoch: args.prune_end_epoch.unwrap_or(0.75 * args.epochs as f64),
        frequency: args.prune_frequency.unwrap_or(50),
    };
    let flags = |e: anyhow::Error| {
        anyhow::anyhow!(
            "{e} (pruning flags: --sparsity, --initial-sparsity, --prune-start-epoch, --prune-end-epoch, --prune-frequency)"
        )
    };
    pruning
        .validate(args.epochs)
        .map_err(|e| as_usage(flags(e)))?;
    Ok(Some(pruning))
}

pub(super) fn config_from(args: &TrainArgs) -> Result<TrainConfig> {
    let optimizer = match args.optimizer {
        OptimizerName::Sgd => OptimizerKind::Sgd {
            momentum: args.momentum,
            nesterov: args.nesterov,
        },
        OptimizerName::Adamw => OptimizerKind::AdamW {
            beta1: args.momentum,
            beta2: 0.999,
            eps: 1e-8,
        },
    };
    let schedule = match args.schedule {
        ScheduleName::Constant => Schedule::Constant,
        ScheduleName::Cosine => Schedule::Cosine,
        ScheduleName::Step => Schedule::Step {
            every_epochs: args.step_epochs,
            gamma: args.gamma,
        },
        ScheduleName::OneCycle => Schedule::one_cycle(args.pct_start),
    };
    let augment = (args.crop_padding > 0 || !args.no_flip).then_some(Augment {
        crop_padding: args.crop_padding,
        hflip: !args.no_flip,
    });
    let config = TrainConfig {
        data: args.data.spec().to_string(),
        train_limit: args.train_limit,
        test_limit: args.data.test_limit,
        epochs: args.epochs,
        batch_size: args.batch_size,
        optimizer,
        lr: args.lr,
        weight_decay: args.weight_decay,
        schedule,
        warmup_epochs: args.warmup_epochs,
        label_smoothing: args.label_smoothing,
        augment,
        seed: args.seed,
        prune: pruning_from(args)?,
        bn_l1: args.bn_l1,
        // Completed once the teacher is loaded and measured.
        distill: None,
        qat: args.qat.config(args.epochs, args.init.is_some())?,
    };
    config.validate().map_err(as_usage)?;
    Ok(config)
}

/// One line on what a pruning run prunes and spares.
fn describe_pruning(model: &Model, p: &GradualPruning) -> Result<String> {
    let choices = layer_choices(&model.graph, &p.magnitude)?;
    let pruned: Vec<_> = choices.iter().filter(|c| c.excluded.is_none()).collect();
    let weights: usize = pruned.iter().map(|c| c.numel).sum();
    let name =
        |c: &&slimcandle::prune::magnitude::LayerChoice| model.graph.nodes[c.node].name.clone();
    let mut spared = Vec::new();
    for (kind, label) in [
        (Exclusion::FirstLayer, "first layer"),
        (Exclusion::Classifier, "classifier"),
    ] {
        let names: Vec<String> = choices
            .iter()
            .filter(|c| c.excluded.as_ref() == Some(&kind))
            .map(|c| name(&c))
            .collect();
        if !names.is_empty() {
            spared.push(format!("{label} {}", names.join(", ")));
        }
    }
    let depthwise = choices
        .iter()
        .filter(|c| c.excluded == Some(Exclusion::Depthwise))
        .count();
    if depthwise > 0 {
        spared.push(format!("{depthwise} depthwise convs"));
    }
    let by_pattern = choices
        .iter()
        .filter(|c| matches!(c.excluded, Some(Exclusion::Pattern(_))))
        .count();
    if by_pattern > 0 {
        spared.push(format!("{by_pattern} layers by --prune-exclude"));
    }
    let scope = match p.magnitude.scope {
        MaskScope::Global => "one global threshold",
        MaskScope::Layer => "per layer",
    };
    Ok(format!(
        "pruning {} layers ({weights} weights) to {:.1}% sparsity ({scope}) between epochs {} and {}, masks updated every {} steps; spared: {}",
        pruned.len(),
        100.0 * p.magnitude.sparsity,
        p.start_epoch,
        p.end_epoch,
        p.frequency,
        if spared.is_empty() {
            "nothing".to_string()
        } else {
            spared.join("; ")
        }
    ))
}

/// The model a new run starts from, with the dataset's classes and preprocessing.
fn initial_model(args: &TrainArgs, class_names: &[String], seed: u64) -> Result<Model> {
    let mut model = match (&args.init, &args.arch.arch) {
        (Some(path), _) => {
            let mut m = checkpoint::load(path)?;
            if m.num_classes() != class_names.len() {
                if !args.new_classifier {
                    bail!(
                        "`{}` has {} classes but the data has {}; add --new-classifier to replace the classifier",
                        path.display(),
                        m.num_classes(),
                        class_names.len()
                    );
                }
                m.replace_classifier(class_names.len(), seed)?;
            }
            m.meta.provenance = Provenance::derived_from(
                &m.meta.provenance,
                format!("fine-tuned from `{}`", path.display()),
            );
            m
        }
        (None, Some(arch)) => {
            let opts = slimcandle::models::ArchOptions {
                num_classes: Some(class_names.len()),
                ..args.arch.options()
            };
            Model::init(&ArchSpec::parse(arch, &opts)?, seed)?
        }
        (None, None) => {
            usage!("give --arch (a fresh model), --init CKPT (fine-tuning) or --resume RUN_DIR")
        }
    };
    model.meta.class_names = class_names.to_vec();
    Ok(model)
}

pub fn run(args: TrainArgs) -> Result<()> {
    install_interrupt_handler();
    let mut run = match &args.resume {
        Some(dir) => open_run(dir)?,
        None => {
            let mut config = config_from(&args)?;
            check_model_flags(&args)?;
            let out = args
                .output
                .as_ref()
                .expect("clap requires --output without --resume");
            super::output::check(out, "-o", super::output::Kind::Folder)?;
            if let (Some(init), true) = (&args.init, args.qat.qat) {
                qat_args::check_float_init(init)?;
            }
            let kd = args.distill.weights()?;
            let (mut taps, hint_loss) = args.distill.feature_taps()?;
            // The teacher file is checked before the (possibly slow) data loading.
            let mut teacher = match &args.distill.teacher {
                Some(path) => Some(CheckpointTeacher::load(path)?),
                None => None,
            };
            let spec: DataSpec = config.data.parse()?;
            // Images are loaded at the model's input size.
            let size = match (&args.init, &args.arch.arch) {
                (Some(p), _) => checkpoint::load(p)?.meta.preprocessing.input_size[0],
                (None, _) => {
                    Preprocessing::for_stem(args.arch.stem.unwrap_or_default()).input_size[0]
                }
            };
            let data = spec.load(&LoadOptions {
                size,
                train_limit: config.train_limit,
                test_limit: config.test_limit,
                seed: config.seed,
                ..Default::default()
            })?;
            let mut model = initial_model(&args, &data.class_names, args.seed)?;
            model.meta.preprocessing = Preprocessing {
                input_size: [size, size],
                mean: data.mean,
                std: data.std,
            };
            if let (Some(t), Some(kd)) = (&mut teacher, kd) {
                t.prepare_for(&data.class_names, [size, size], data.mean, data.std)?;
                let names: Vec<&str> = taps.iter().map(|f| f.teacher.as_str()).collect();
                let teacher_dims = t.set_feature_taps(&names)?;
                resolve_taps(
                    &model.graph,
                    [size, size],
                    &mut taps,
                    hint_loss,
                    &teacher_dims,
                )?;
                eprintln!("measuring the teacher on the test split");
                let mut distill = t.config(t.test_top1(data.test.clone())?, kd);
                distill.features = taps;
                distill.feature_loss = hint_loss;
                config.distill = Some(distill);
            }
            let created = !out.exists();
            let qat = match &config.qat {
                Some(q) => Some(qat_args::calibrate(&model, &data, q, config.seed)?),
                None => None,
            };
            if let Some(q) = &qat {
                config.qat = Some(q.config.clone());
            }
            let mut run = Run::create(out, config, model)?;
            if let Some(q) = qat {
                run.attach_qat(q)?;
            }
            if let Some(t) = teacher {
                run.attach_teacher(Box::new(t))?;
            }
            let result = train_and_report(run, Some(data), &args);
            if result.as_ref().is_err_and(|e| !e.is::<Interrupted>()) {
                remove_failed_start(out, created);
            }
            return result;
        }
    };
    run.model.meta.provenance.command = std::env::args().collect::<Vec<_>>().join(" ");
    if let Some(d) = &run.config.distill {
        let mut teacher = CheckpointTeacher::reopen(&d.teacher)?;
        let p = &run.model.meta.preprocessing;
        teacher.prepare_for(&run.model.meta.class_names, p.input_size, p.mean, p.std)?;
        let names: Vec<&str> = d.features.iter().map(|f| f.teacher.as_str()).collect();
        teacher.set_feature_taps(&names)?;
        run.attach_teacher(Box::new(teacher))?;
    }
    // After the teacher check: a finished run whose teacher changed is still refused.
    if run.progress.epoch >= run.config.epochs {
        return report_complete(&run, &args);
    }
    train_and_report(run, None, &args)
}

fn train_and_report(
    mut run: Run,
    data: Option<slimcandle::data::Dataset>,
    args: &TrainArgs,
) -> Result<()> {
    let data = match data {
        Some(d) => d,
        None => {
            let c = &run.config;
            let size = run.model.meta.preprocessing.input_size[0];
            c.data.parse::<DataSpec>()?.load(&LoadOptions {
                size,
                train_limit: c.train_limit,
                test_limit: c.test_limit,
                seed: c.seed,
                ..Default::default()
            })?
        }
    };
    slimcandle::eval::check_classes(&run.model.meta.class_names, &data.class_names, &data.source)?;
    eprintln!(
        "training {} on {} ({} train / {} test images, {} classes) for {} epochs -> {}",
        run.model
            .meta
            .arch
            .as_ref()
            .map(|a| a.variant_name())
            .unwrap_or_else(|| "model".into()),
        data.source,
        data.train.len(),
        data.test.len(),
        data.class_names.len(),
        run.config.epochs,
        run.paths.dir.display()
    );
    if let Some(p) = &run.config.prune {
        eprintln!("{}", describe_pruning(&run.model, p)?);
    }
    if let Some(d) = &run.config.distill {
        let t = &d.teacher;
        eprintln!(
            "distilling from teacher `{}`{}{} with alpha {}, temperature {}",
            t.path.display(),
            t.arch
                .as_ref()
                .map(|a| format!(" ({a})"))
                .unwrap_or_default(),
            t.test_top1
                .map(|v| format!(", test top-1 {v:.2}%"))
                .unwrap_or_default(),
            d.weights.alpha,
            d.weights.temperature
        );
        for f in &d.features {
            match f.adapter {
                Some(a) => eprintln!(
                    "feature hint ({:?}): student `{}` ({} ch) against teacher `{}` ({} ch) through {}, weight {}",
                    d.feature_loss,
                    f.student,
                    a.student_channels,
                    f.teacher,
                    a.teacher_channels,
                    slimcandle::train::adapter::DESCRIPTION,
                    f.weight
                ),
                None => eprintln!(
                    "feature hint ({:?}): student `{}` against teacher `{}`, weight {}",
                    d.feature_loss, f.student, f.teacher, f.weight
                ),
            }
        }
    }
    if run.config.bn_l1 > 0.0 {
        eprintln!(
            "network slimming: L1 penalty {} on batch-norm scales",
            run.config.bn_l1
        );
    }
    let mut observer = Bars {
        bar: None,
        stop_after: args.stop_after_steps,
        steps: 0,
    };
    let outcome = run.train(&data, &STOP, &mut observer)?;
    let dir = run.paths.dir.display().to_string();
    match outcome {
        Outcome::Finished { best_top1, last } => {
            let sparsity = run.sparsity()?;
            if args.json {
                let sparsity = sparsity.as_ref().map(|s| {
                    json!({
                        "prunable_weights": s.selected,
                        "zeros": s.selected_zeros,
                        "sparsity": s.sparsity(),
                        "params": s.params,
                        "nonzero_params": s.nonzero_params,
                    })
                });
                super::print_json(&json!({
                    "run_dir": dir,
                    "finished": true,
                    "best_top1": best_top1,
                    "last": last,
                    "sparsity": sparsity,
                }));
            } else {
                if let Some(s) = &sparsity {
                    println!(
                        "sparsity: {:.2}% of the {} prunable weights are zero; {} of {} parameters are non-zero ({:.2}%)",
                        100.0 * s.sparsity(),
                        s.selected,
                        s.nonzero_params,
                        s.params,
                        100.0 * s.nonzero_params as f64 / s.params.max(1) as f64
                    );
                }
                let last_top1 = last
                    .and_then(|m| m.test_top1)
                    .map(|t| format!("{t:.2}%"))
                    .unwrap_or("-".into());
                let best = best_top1.map(|t| format!("{t:.2}%")).unwrap_or("-".into());
                println!(
                    "finished: last test top-1 {last_top1}, best {best}; checkpoints in {dir}/last.safetensors and best.safetensors"
                );
            }
        }
        Outcome::Interrupted { epoch, next_batch } => {
            if args.json {
                super::print_json(
                    &json!({ "run_dir": dir, "finished": false, "epoch": epoch, "next_batch": next_batch }),
                );
            } else {
                println!(
                    "interrupted at epoch {} batch {next_batch}; the run is saved: continue with `slimcandle train --resume {dir}`",
                    epoch + 1
                );
            }
            // Exit status 130, the shell's code for Ctrl-C, whether the signal or the test
            // hook stopped it: the run is not finished.
            return Err(Interrupted.into());
        }
    }
    Ok(())
}

/// The model options checked before any data is loaded: a model is named (`--arch` or
/// `--init`), `--new-classifier` needs `--init`, and `--arch` with its width, groups and stem
/// must name a buildable model.
fn check_model_flags(args: &TrainArgs) -> Result<()> {
    if args.new_classifier && args.init.is_none() {
        usage!(
            "--new-classifier only applies with --init CKPT (a fresh --arch model is sized for the data already)"
        );
    }
    match (&args.init, &args.arch.arch) {
        (None, None) => {
            usage!("give --arch (a fresh model), --init CKPT (fine-tuning) or --resume RUN_DIR")
        }
        (None, Some(arch)) => {
            ArchSpec::parse(arch, &args.arch.options()).map_err(as_usage)?;
        }
        (Some(_), _) => {}
    }
    Ok(())
}

/// After a new run failed before saving its first state, removes what its start wrote
/// (`config.json`, and the folder when this command created it), so that the folder is not
/// mistaken for a run to resume.
fn remove_failed_start(dir: &std::path::Path, created: bool) {
    let paths = slimcandle::train::RunPaths::new(dir);
    if paths.resume().exists() || paths.metrics().exists() {
        return;
    }
    let _ = std::fs::remove_file(paths.config());
    if created {
        // Only an empty folder goes: anything else in it is not this command's.
        let _ = std::fs::remove_dir(dir);
    }
}

/// Reopens a run folder, telling a folder whose run never saved its first state (a start that
/// failed or was killed before its first step) from one that is not a run at all.
fn open_run(dir: &std::path::Path) -> Result<Run> {
    let paths = slimcandle::train::RunPaths::new(dir);
    if paths.config().exists() && !paths.resume().exists() {
        bail!(
            "`{}` holds no resume state (the run stopped before its first saved step): start it again without --resume",
            dir.display()
        );
    }
    Run::open(dir)
}

/// `train --resume` on a run that has done all its epochs: says so instead of training.
fn report_complete(run: &Run, args: &TrainArgs) -> Result<()> {
    let dir = run.paths.dir.display().to_string();
    let best = run.progress.best_top1;
    if args.json {
        super::print_json(&json!({
            "run_dir": dir,
            "finished": true,
            "epochs": run.config.epochs,
            "best_top1": best,
        }));
    } else {
        println!(
            "the run in {dir} is complete ({} epochs, best test top-1 {}); nothing to resume. Checkpoints: {dir}/last.safetensors and best.safetensors",
            run.config.epochs,
            best.map(|t| format!("{t:.2}%")).unwrap_or("-".into())
        );
    }
    Ok(())
}
