//! The stage kinds of recipes: each is one of the commands, its clap definition the one source
//! of the stage's keys, values and checks (`slimcandle::pipeline::kinds`). The binary's `run`
//! command and the recipe fuzz target (examples/fuzz) use this same registry.

use super::{eval, export, import, prune, quantize, train};
use anyhow::{Result, bail};
use clap::{ArgMatches, Args, Command, FromArgMatches};
use slimcandle::pipeline::{Effect, InputArg, KindSpec, OutputArg, Registry};

fn no_effects(_: &ArgMatches) -> Vec<Effect> {
    Vec::new()
}

fn no_check(_: &ArgMatches) -> Result<()> {
    Ok(())
}

/// A training stage: `train`, or `distill`, the same command with a required `teacher`.
fn train_kind(name: &'static str, check: fn(&ArgMatches) -> Result<()>) -> KindSpec {
    KindSpec {
        name,
        command: train::refuse_settings_with_resume(train::TrainArgs::augment_args(Command::new(
            "train",
        ))),
        input: InputArg::Flag("init"),
        output: OutputArg::RunFolder {
            flag: "output",
            resume: "resume",
        },
        runner_sets: &["init", "resume", "output", "json"],
        unhashed: &["stop_after_steps"],
        inherits_train: true,
        finetune: false,
        reads_float_before_quantize: false,
        effects: |_| vec![Effect::FloatTraining],
        check,
        run: |m| train::run(train::TrainArgs::from_arg_matches(m)?),
    }
}

/// A qat stage: `train --qat` from the stage's float input (after a `quantize` stage, that
/// stage's own input), its result an int8 checkpoint.
fn qat_kind() -> KindSpec {
    KindSpec {
        effects: |_| vec![Effect::QuantAwareTraining],
        reads_float_before_quantize: true,
        run: |m| train::run(qat_args(m)?),
        ..train_kind("qat", |m| {
            train::config_from(&qat_args(m)?)?;
            Ok(())
        })
    }
}

/// The train arguments of a qat stage: `--qat` is implied by the kind.
fn qat_args(m: &ArgMatches) -> Result<train::TrainArgs> {
    let mut args = train::TrainArgs::from_arg_matches(m)?;
    args.qat.qat = true;
    Ok(args)
}

fn train_check(m: &ArgMatches) -> Result<()> {
    train::config_from(&train::TrainArgs::from_arg_matches(m)?)?;
    Ok(())
}

/// A distill stage is a training stage that names its teacher (a stage or a file).
fn distill_check(m: &ArgMatches) -> Result<()> {
    if m.get_one::<std::path::PathBuf>("teacher").is_none() {
        bail!("a distill stage needs `teacher` (an earlier stage's name or a checkpoint file)");
    }
    train_check(m)
}

/// The stage kinds of this build. Distillation and quantization plug in here: `distill` is the
/// train entry under another name (with `--teacher`), `quantize` an entry like prune's with
/// `effects: |_| vec![Effect::Quantize]`.
pub fn registry() -> Registry {
    Registry {
        kinds: vec![
            train_kind("train", train_check),
            train_kind("distill", distill_check),
            qat_kind(),
            KindSpec {
                name: "prune",
                command: prune::PruneArgs::augment_args(Command::new("prune")),
                input: InputArg::Positional,
                output: OutputArg::File("output"),
                runner_sets: &["checkpoint", "output", "json"],
                unhashed: &[],
                inherits_train: false,
                finetune: true,
                reads_float_before_quantize: false,
                effects: |m| match m.get_one::<prune::Method>("method") {
                    Some(prune::Method::Magnitude) => Vec::new(),
                    _ => vec![Effect::ChannelPruning],
                },
                check: |m| prune::check(&prune::PruneArgs::from_arg_matches(m)?),
                run: |m| prune::run(prune::PruneArgs::from_arg_matches(m)?),
            },
            KindSpec {
                name: "quantize",
                command: quantize::QuantizeArgs::augment_args(Command::new("quantize")),
                input: InputArg::Positional,
                output: OutputArg::File("output"),
                runner_sets: &["checkpoint", "output", "json"],
                unhashed: &[],
                inherits_train: false,
                finetune: false,
                reads_float_before_quantize: false,
                effects: |_| vec![Effect::Quantize],
                check: |m| {
                    quantize::QuantizeArgs::from_arg_matches(m)?.calibrator()?;
                    Ok(())
                },
                run: |m| quantize::run(quantize::QuantizeArgs::from_arg_matches(m)?),
            },
            KindSpec {
                name: "eval",
                command: eval::EvalArgs::augment_args(Command::new("eval")),
                input: InputArg::Positional,
                output: OutputArg::None,
                runner_sets: &["checkpoint", "json"],
                unhashed: &[],
                inherits_train: false,
                finetune: false,
                reads_float_before_quantize: false,
                effects: no_effects,
                check: no_check,
                run: |m| eval::run(eval::EvalArgs::from_arg_matches(m)?),
            },
            // Writes ONNX or a PyTorch state dict into the stage folder; the next stage reads
            // the model the export read.
            KindSpec {
                name: "export",
                command: export::ExportArgs::augment_args(Command::new("export")),
                input: InputArg::Positional,
                output: OutputArg::Artifact {
                    flag: "output",
                    by: "format",
                    names: &[("onnx", "model.onnx"), ("torch", "state_dict.safetensors")],
                },
                runner_sets: &["checkpoint", "output"],
                unhashed: &[],
                inherits_train: false,
                finetune: false,
                reads_float_before_quantize: false,
                effects: no_effects,
                check: no_check,
                run: |m| export::run(export::ExportArgs::from_arg_matches(m)?),
            },
            KindSpec {
                name: "import",
                command: import::ImportArgs::augment_args(Command::new("import")),
                input: InputArg::Positional,
                output: OutputArg::File("output"),
                runner_sets: &["state_dict", "output", "json"],
                unhashed: &[],
                inherits_train: false,
                finetune: false,
                reads_float_before_quantize: false,
                effects: no_effects,
                check: no_check,
                run: |m| import::run(import::ImportArgs::from_arg_matches(m)?),
            },
        ],
        pending: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slimcandle::pipeline::validate::{ARCH_KEYS, DATA_KEYS};

    /// One definition: every flag of a stage's command is a recipe key of that kind, and every
    /// key is a flag (the runner's own arguments aside).
    #[test]
    fn every_flag_is_a_recipe_key_and_back() {
        let registry = registry();
        for kind in &registry.kinds {
            let keys = kind.keys();
            for arg in kind.command.get_arguments() {
                let id = arg.get_id().as_str();
                let Some(long) = arg.get_long() else { continue };
                if matches!(id, "help" | "version") || kind.runner_sets.contains(&id) {
                    continue;
                }
                let key = long.replace('-', "_");
                assert!(
                    keys.contains(&key),
                    "{}: --{long} is no recipe key",
                    kind.name
                );
                assert_eq!(
                    kind.arg_for_key(&key).map(|a| a.get_id().as_str()),
                    Some(id)
                );
            }
            for key in &keys {
                let arg = kind.arg_for_key(key).expect("each key names a flag");
                assert_eq!(
                    arg.get_long().map(|l| l.replace('-', "_")).as_ref(),
                    Some(key)
                );
            }
        }
        let train = registry.train();
        for key in ARCH_KEYS.iter().chain(DATA_KEYS) {
            assert!(train.arg_for_key(key).is_some(), "train has no --{key}");
        }
        // Aliases are keys too (the old spellings of issue #14).
        let prune = registry.get("prune").unwrap();
        assert_eq!(prune.arg_for_key("exclude").unwrap().get_id(), "exclude");
        assert!(prune.keys().contains(&"prune_exclude".to_string()));
    }
}
