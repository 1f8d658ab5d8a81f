//! `slimcandle run RECIPE.toml`: the command that runs a recipe, with the stage kinds of
//! `stages::registry`.

use super::exit::Interrupted;
use super::stages::registry;
use super::{ArchArgs, train};
use anyhow::{Result, bail};
use clap::{Args, Command, FromArgMatches};
use slimcandle::footprint::Footprint;
use slimcandle::model::{Model, Preprocessing};
use slimcandle::models::ArchSpec;
use slimcandle::pipeline::plan::{Initial, Input, Piece};
use slimcandle::pipeline::runner::{self, StageAction};
use slimcandle::pipeline::{Document, Effect, Plan, Registry, report, validate};
use slimcandle::report::human_count;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct RunArgs {
    /// The recipe (see docs/recipes.md).
    recipe: PathBuf,
    /// Run folder [default: runs/<recipe name>].
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Override a recipe value: `train.lr=0.05`, `stage.prune.target_macs=0.4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run in the folder: finished, unchanged stages are skipped, an interrupted
    /// training stage continues (a rerun on the same folder does the same; this insists that
    /// the folder already holds a run).
    #[arg(long)]
    resume: bool,
    /// Check the recipe and print the plan without running anything.
    #[arg(long)]
    dry_run: bool,
}

/// Runs `f` with this process's stdout going to stderr: a stage command's own results are
/// progress of the recipe run, whose result (the report) alone goes to stdout.
fn with_stdout_on_stderr<T>(f: impl FnOnce() -> T) -> T {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // SAFETY: plain descriptor duplication; the saved descriptor is restored and closed.
    let saved = unsafe { libc::dup(1) };
    if saved >= 0 {
        unsafe { libc::dup2(2, 1) };
    }
    let out = f();
    let _ = std::io::stdout().flush();
    if saved >= 0 {
        unsafe {
            libc::dup2(saved, 1);
            libc::close(saved);
        }
    }
    out
}

/// Checks a recipe (with `--set` overrides) into a plan; every problem comes back at once.
pub fn load_plan(recipe: &Path, sets: &[String], registry: &Registry) -> Result<Plan> {
    let mut doc = Document::read(recipe)?;
    let set_problems = doc.apply_sets(sets).err();
    match (validate(&doc, registry), set_problems) {
        (Ok(plan), None) => Ok(plan),
        (Ok(_), Some(p)) => Err(p.into()),
        (Err(mut p), Some(set)) => {
            p.list.extend(set.list);
            Err(p.into())
        }
        (Err(p), None) => Err(p.into()),
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    let registry = registry();
    let plan = load_plan(&args.recipe, &args.sets, &registry)?;
    if args.dry_run {
        print!("{}", describe(&plan, &registry)?);
        return Ok(());
    }
    let dir = args.output.clone().unwrap_or_else(|| {
        let stem = args
            .recipe
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "recipe".into());
        PathBuf::from("runs").join(stem)
    });
    if args.resume && !dir.join("recipe.lock.toml").exists() {
        bail!(
            "`{}` holds no recipe run to resume (no recipe.lock.toml); run without --resume",
            dir.display()
        );
    }
    let exec = |argv: &[String]| -> Result<()> {
        let kind = registry
            .get(&argv[0])
            .expect("the runner only runs registered kinds");
        eprintln!("$ slimcandle {}", argv.join(" "));
        let matches = kind.command.clone().try_get_matches_from(argv)?;
        // An interrupted training stage is the runner's to report, with the recipe's way to
        // continue.
        match with_stdout_on_stderr(|| (kind.run)(&matches)) {
            Err(e) if e.is::<Interrupted>() => Ok(()),
            other => other,
        }
    };
    let mut after =
        |rows: &[report::Row], stage: &slimcandle::pipeline::plan::PlannedStage, action| {
            let what = match action {
                StageAction::Skipped => "skipped (unchanged)",
                StageAction::Resumed => "continued and finished",
                StageAction::Ran => "finished",
            };
            eprintln!(
                "stage {} {what}\n{}",
                stage.folder,
                report::table(rows).render()
            );
        };
    let result = runner::run(&plan, &registry, &dir, &exec, &mut after).map_err(|e| {
        if train::interrupted() {
            anyhow::Error::new(Interrupted).context(format!("{e:#}"))
        } else {
            e
        }
    })?;
    print!("{}", report::table(&result.rows).render());
    println!(
        "\nfinal checkpoint {}; report {}/report.md and report.json; plot {}/report.svg",
        result.final_checkpoint.display(),
        dir.display(),
        dir.display()
    );
    Ok(())
}

/// How many classes a data spec has, when that is known without loading it (training sizes a
/// fresh model's classifier by the data).
fn class_count(data: &str) -> Option<usize> {
    use slimcandle::data::DataSpec;
    match data.parse::<DataSpec>().ok()? {
        DataSpec::Shapes
        | DataSpec::Cifar10(_)
        | DataSpec::Mnist(_)
        | DataSpec::FashionMnist(_) => Some(10),
        DataSpec::Cifar100(_) => Some(100),
        DataSpec::Folder(root) => {
            let dir = if root.join("train").is_dir() {
                root.join("train")
            } else {
                root
            };
            let n = std::fs::read_dir(dir)
                .ok()?
                .filter(|e| e.as_ref().is_ok_and(|e| e.path().is_dir()))
                .count();
            (n > 0).then_some(n)
        }
    }
}

/// The MACs of the model the recipe starts from, when that is cheap to know.
fn initial_macs(plan: &Plan) -> Result<Option<u64>> {
    let model = match &plan.initial {
        Initial::File(p) => slimcandle::checkpoint::load(p)?,
        Initial::Fresh => {
            let mut argv = vec!["arch".to_string()];
            argv.extend(plan.fresh_arch.iter().cloned());
            let m = ArchArgs::augment_args(Command::new("arch")).try_get_matches_from(argv)?;
            let arch = ArchArgs::from_arg_matches(&m)?;
            let Some(name) = &arch.arch else {
                return Ok(None);
            };
            let options = slimcandle::models::ArchOptions {
                num_classes: arch.num_classes.or_else(|| class_count(&plan.data)),
                ..arch.options()
            };
            let spec = ArchSpec::parse(name, &options)?;
            let mut model = Model::init(&spec, 0)?;
            model.meta.preprocessing = Preprocessing::for_stem(spec.stem);
            model
        }
        Initial::Import(_) => return Ok(None),
    };
    Ok(Some(Footprint::of(&model, None)?.macs))
}

/// The dry-run plan: each stage, its input, its command and the MACs expected after it.
fn describe(plan: &Plan, registry: &Registry) -> Result<String> {
    let mut t = slimcandle::report::Table::new(
        &["stage", "kind", "input", "MACs", "command"],
        &[0, 1, 2, 4],
    );
    let mut macs: Vec<Option<f64>> = Vec::new();
    let start = initial_macs(plan)?.map(|m| m as f64);
    for s in &plan.stages {
        let before = match s.input {
            None | Some(Input::Initial) => start,
            Some(Input::Stage(i)) => macs[i],
        };
        let target = s.args.iter().find_map(|p| match p {
            Piece::Text(t) => t.strip_prefix("--target-macs=")?.parse::<f64>().ok(),
            Piece::Checkpoint { .. } | Piece::File { .. } => None,
        });
        let after = match (s.effects.contains(&Effect::ChannelPruning), target) {
            (false, _) => before,
            (true, Some(f)) => before.map(|m| m * f),
            (true, None) => None,
        };
        macs.push(after);
        let input = match s.input {
            None => "fresh model".to_string(),
            Some(Input::Initial) => match &plan.initial {
                Initial::File(p) => p.display().to_string(),
                _ => "00-import".to_string(),
            },
            Some(Input::Stage(i)) => plan.stages[i].folder.clone(),
        };
        let kind = registry.get(&s.kind).expect("validated");
        let resolve = |i: Input| match i {
            Input::Stage(j) => PathBuf::from(&plan.stages[j].folder).join("model.safetensors"),
            Input::Initial => PathBuf::from("initial"),
        };
        let input_path = s.input.map(|_| PathBuf::from(format!("<{input}>")));
        let mut command =
            slimcandle::pipeline::plan::argv(kind, input_path.as_deref(), &s.args, None, &resolve)
                .join(" ");
        if let Some(ft) = &s.finetune {
            let train = registry.train();
            command.push_str(" && ");
            command.push_str(
                &slimcandle::pipeline::plan::argv(
                    train,
                    Some(Path::new("<pruned>")),
                    ft,
                    None,
                    &resolve,
                )
                .join(" "),
            );
        }
        t.row(vec![
            s.folder.clone(),
            s.kind.clone(),
            input,
            after
                .map(|m| {
                    format!(
                        "{}{}",
                        if target.is_some() { "~" } else { "" },
                        human_count(m as u64)
                    )
                })
                .unwrap_or_else(|| "?".into()),
            command,
        ]);
    }
    Ok(format!(
        "{} is valid: {} stages, measured on {}\n\n{}",
        plan.recipe.display(),
        plan.stages.len(),
        plan.data,
        t.render()
    ))
}
