//! Runs a plan stage by stage in a run directory:
//!
//! ```text
//! DIR/recipe.lock.toml      the effective recipe (after --set)
//! DIR/NN-name/              one folder per stage: its command's outputs (a training run
//!                           folder `run/`, `prune.safetensors`, `finetune/`, an export's
//!                           `model.onnx` ...), the stage's checkpoint `model.safetensors`
//!                           (provenance: the recipe; none for `eval` and `export`, which pass
//!                           their input on), `log.txt`,
//!                           `state.json` (its hash, written at the start) and `metrics.json`
//!                           (hash and measurements, written at the end)
//! DIR/final.safetensors     the last stage's checkpoint
//! DIR/report.{md,json,svg}  rewritten after every stage
//! ```
//!
//! A stage whose `metrics.json` records the hash it has now is skipped; one whose `state.json`
//! does but that did not finish continues its training run with `train --resume`; any other
//! is run afresh, and since its checkpoint changes, so does the hash of everything downstream.

use super::kinds::{OutputArg, Registry};
use super::plan::{Initial, Input, Plan, PlannedStage, argv, kind_of, stage_hash};
use super::report::{self, Row, TestData};
use crate::tensor_file::file_sha256;
use crate::tensor_file::write_bytes_atomic;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Runs one command line (`[kind, args...]`) of the registry.
pub type Execute<'a> = dyn Fn(&[String]) -> Result<()> + 'a;

/// `state.json`: the hash a stage started with.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StageState {
    hash: String,
}

/// `metrics.json`: what a finished stage did and measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    pub hash: String,
    pub commands: Vec<Vec<String>>,
    pub seconds: f64,
    pub row: Row,
}

/// What happened to a stage in this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageAction {
    Skipped,
    Resumed,
    Ran,
}

pub struct RunResult {
    pub rows: Vec<Row>,
    pub actions: Vec<StageAction>,
    pub final_checkpoint: PathBuf,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_bytes_atomic(path, serde_json::to_string_pretty(value)?.as_bytes())
}

/// Whether the training run in `folder` did all its epochs (an interrupted one did not).
fn training_finished(folder: &Path) -> Result<bool> {
    let paths = crate::train::RunPaths::new(folder);
    let config: crate::train::TrainConfig = read_json(&paths.config())
        .with_context(|| format!("`{}` is not a training run", folder.display()))?;
    let last = std::fs::read_to_string(paths.metrics())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<crate::train::EpochMetrics>(l).ok())
        .map(|m| m.epoch)
        .max();
    Ok(last == Some(config.epochs) && paths.best().exists())
}

/// Runs the training command of a stage in `folder`, continuing an interrupted run there when
/// `resume` (its hash is unchanged); returns its checkpoint.
fn train_into(
    folder: &Path,
    resume: bool,
    fresh_argv: Vec<String>,
    resume_flag: &str,
    exec: &Execute<'_>,
    commands: &mut Vec<Vec<String>>,
    resume_hint: &str,
) -> Result<PathBuf> {
    let paths = crate::train::RunPaths::new(folder);
    let argv = if resume && paths.resume().exists() {
        if training_finished(folder)? {
            None
        } else {
            Some(vec![
                fresh_argv[0].clone(),
                format!("--{resume_flag}={}", folder.display()),
            ])
        }
    } else {
        if folder.exists() {
            std::fs::remove_dir_all(folder)
                .with_context(|| format!("cannot clear `{}`", folder.display()))?;
        }
        Some(fresh_argv)
    };
    if let Some(argv) = argv {
        exec(&argv)?;
        commands.push(argv);
    }
    if !training_finished(folder)? {
        bail!(
            "the training run `{}` stopped before its last epoch; {resume_hint}",
            folder.display()
        );
    }
    Ok(paths.best())
}

/// Copies `from` to `to` atomically.
fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("cannot read `{}`", from.display()))?;
    write_bytes_atomic(to, &bytes)
}

/// Runs `plan` in `dir`; `exec` runs one command line, `after_stage` sees the report so far.
pub fn run(
    plan: &Plan,
    registry: &Registry,
    dir: &Path,
    exec: &Execute<'_>,
    after_stage: &mut dyn FnMut(&[Row], &PlannedStage, StageAction),
) -> Result<RunResult> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create run folder `{}`", dir.display()))?;
    write_bytes_atomic(&dir.join("recipe.lock.toml"), plan.lock.as_bytes())?;
    let resume_hint = format!(
        "continue with `slimcandle run {} -o {} --resume`",
        plan.recipe.display(),
        dir.display()
    );
    let initial = initial_checkpoint(plan, registry, dir, exec)?;
    let mut outputs: Vec<PathBuf> = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut actions = Vec::new();
    let mut data = TestData::new(&plan.data, plan.test_limit);
    let title = format!("slimcandle run {}", plan.recipe.display());
    for stage in &plan.stages {
        let kind = kind_of(registry, stage);
        let resolve = |input: Input| -> PathBuf {
            match input {
                Input::Initial => initial.clone().expect("validated: an initial checkpoint"),
                Input::Stage(i) => outputs[i].clone(),
            }
        };
        let input_path = stage.input.map(resolve);
        let input_hash = input_path.as_deref().map(file_sha256).transpose()?;
        let hash = stage_hash(stage, input_hash.as_deref(), &|i| file_sha256(&resolve(i)))?;
        let sdir = dir.join(&stage.folder);
        let checkpoint = if kind.output.passes_input_on() {
            input_path
                .clone()
                .expect("a stage that passes its input on has one")
        } else {
            stage.output_checkpoint(&sdir)
        };
        // An export's file, named by its format.
        let artifact = kind
            .artifact_name(&argv(
                kind,
                input_path.as_deref(),
                &stage.args,
                None,
                &resolve,
            ))?
            .map(|name| sdir.join(name));
        let record: Option<StageRecord> = read_json(&sdir.join("metrics.json"));
        let done = |r: &StageRecord| {
            r.hash == hash && checkpoint.exists() && artifact.as_ref().is_none_or(|a| a.exists())
        };
        if let Some(r) = record.filter(done) {
            eprintln!("stage {}: unchanged, skipped", stage.folder);
            outputs.push(checkpoint);
            rows.push(r.row);
            actions.push(StageAction::Skipped);
            report::write_all(dir, &title, &rows)?;
            after_stage(&rows, stage, StageAction::Skipped);
            continue;
        }
        let started = Instant::now();
        let state: Option<StageState> = read_json(&sdir.join("state.json"));
        let resume = state.is_some_and(|s| s.hash == hash);
        if !resume && sdir.exists() {
            std::fs::remove_dir_all(&sdir)
                .with_context(|| format!("cannot clear `{}`", sdir.display()))?;
        }
        std::fs::create_dir_all(&sdir)
            .with_context(|| format!("cannot create `{}`", sdir.display()))?;
        write_json(&sdir.join("state.json"), &StageState { hash: hash.clone() })?;
        eprintln!(
            "stage {} ({}){}",
            stage.folder,
            stage.kind,
            if resume { ": continuing" } else { "" }
        );
        let mut commands = Vec::new();
        let mut resumed = false;
        // The stage's own command.
        let mut product = match kind.output {
            OutputArg::RunFolder { resume: flag, .. } => {
                let folder = sdir.join("run");
                resumed |= resume && folder.join("resume.safetensors").exists();
                let fresh = argv(
                    kind,
                    input_path.as_deref(),
                    &stage.args,
                    Some(&folder),
                    &resolve,
                );
                train_into(
                    &folder,
                    resume,
                    fresh,
                    flag,
                    exec,
                    &mut commands,
                    &resume_hint,
                )?
            }
            OutputArg::File(_) => {
                let file = sdir.join(format!("{}.safetensors", stage.kind));
                if !(resume && file.exists()) {
                    let a = argv(
                        kind,
                        input_path.as_deref(),
                        &stage.args,
                        Some(&file),
                        &resolve,
                    );
                    exec(&a)?;
                    commands.push(a);
                }
                file
            }
            OutputArg::None => {
                let a = argv(kind, input_path.as_deref(), &stage.args, None, &resolve);
                exec(&a)?;
                commands.push(a);
                checkpoint.clone()
            }
            OutputArg::Artifact { .. } => {
                let file = artifact
                    .as_deref()
                    .expect("an artifact stage names its file");
                let a = argv(
                    kind,
                    input_path.as_deref(),
                    &stage.args,
                    Some(file),
                    &resolve,
                );
                exec(&a)?;
                commands.push(a);
                checkpoint.clone()
            }
        };
        // Its fine-tuning.
        if let Some(ft) = &stage.finetune {
            let train = registry.train();
            let OutputArg::RunFolder { resume: flag, .. } = train.output else {
                bail!("the train kind writes a run folder");
            };
            let folder = sdir.join("finetune");
            resumed |= resume && folder.join("resume.safetensors").exists();
            let fresh = argv(train, Some(&product), ft, Some(&folder), &resolve);
            product = train_into(
                &folder,
                resume,
                fresh,
                flag,
                exec,
                &mut commands,
                &resume_hint,
            )?;
        }
        if !kind.output.passes_input_on() {
            stamp(&product, &checkpoint, plan, stage)?;
        }
        let row = report::measure(&stage.name, &stage.kind, &checkpoint, &mut data)?;
        let seconds = started.elapsed().as_secs_f64();
        let log: String = commands
            .iter()
            .map(|c| format!("$ slimcandle {}\n", c.join(" ")))
            .chain([format!("stage finished in {seconds:.1}s\n")])
            .collect();
        write_bytes_atomic(&sdir.join("log.txt"), log.as_bytes())?;
        write_json(
            &sdir.join("metrics.json"),
            &StageRecord {
                hash,
                commands,
                seconds,
                row: row.clone(),
            },
        )?;
        outputs.push(checkpoint);
        rows.push(row);
        let action = if resumed {
            StageAction::Resumed
        } else {
            StageAction::Ran
        };
        actions.push(action);
        report::write_all(dir, &title, &rows)?;
        after_stage(&rows, stage, action);
    }
    let last = outputs.last().context("the plan has no stages")?;
    let final_checkpoint = dir.join("final.safetensors");
    copy_atomic(last, &final_checkpoint)?;
    Ok(RunResult {
        rows,
        actions,
        final_checkpoint,
    })
}

/// Writes the stage's checkpoint: the command's product, its provenance naming the recipe run
/// and holding the effective recipe.
fn stamp(product: &Path, to: &Path, plan: &Plan, stage: &PlannedStage) -> Result<()> {
    let command = format!(
        "slimcandle run {} (stage {})",
        plan.recipe.display(),
        stage.folder
    );
    let mut model = crate::checkpoint::load_any(product)?;
    let p = &mut model.meta_mut().provenance;
    p.command = command;
    p.recipe = Some(plan.lock.clone());
    model.save(to)
}

/// The checkpoint the first stage reads: the `init` file, or the imported state dict (imported
/// into `DIR/00-import/` unless already there from the same arguments).
fn initial_checkpoint(
    plan: &Plan,
    registry: &Registry,
    dir: &Path,
    exec: &Execute<'_>,
) -> Result<Option<PathBuf>> {
    match &plan.initial {
        Initial::Fresh => Ok(None),
        Initial::File(p) => Ok(Some(p.clone())),
        Initial::Import(args) => {
            let kind = registry.import().context("this build cannot import")?;
            let sdir = dir.join("00-import");
            let out = sdir.join("model.safetensors");
            let mut key = args.join("\0");
            key.push_str(&file_sha256(Path::new(&args[0]))?);
            let state: Option<StageState> = read_json(&sdir.join("state.json"));
            if state.is_some_and(|s| s.hash == key) && out.exists() {
                return Ok(Some(out));
            }
            std::fs::create_dir_all(&sdir)?;
            let mut a = vec![kind.name.to_string()];
            a.extend(args.iter().cloned());
            if let OutputArg::File(flag) = kind.output {
                a.push(format!("--{flag}={}", out.display()));
            }
            exec(&a)?;
            write_json(&sdir.join("state.json"), &StageState { hash: key })?;
            Ok(Some(out))
        }
    }
}
