//! What the recipe runner knows about each stage kind. A kind is a command of the binary: its
//! clap `Command` is the one definition of the stage's keys, values and their checks (the
//! recipe key `target_macs` is the flag `--target-macs`), and the runner hands it an argument
//! vector built from the recipe. The binary fills the [`Registry`]; a new pass is one entry.

use clap::{Arg, ArgAction, ArgMatches, Command};

/// What a stage does to the model, for the order check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Trains the float weights (train, distill, a prune stage's fine-tuning).
    FloatTraining,
    /// Removes channels (changes the float graph).
    ChannelPruning,
    /// Turns the model into an int8 one; float passes cannot follow.
    Quantize,
    /// Quantization-aware training: the one kind of training allowed after `quantize`.
    QuantAwareTraining,
}

/// How a stage's input checkpoint reaches its command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputArg {
    /// The first positional argument (`prune CKPT`, `eval CKPT`).
    Positional,
    /// A flag (`train --init CKPT`).
    Flag(&'static str),
}

/// What a stage's command writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputArg {
    /// A checkpoint file at the flag's value (`prune -o FILE`).
    File(&'static str),
    /// A training run folder (`train -o DIR`, continued with `train --resume DIR`); the
    /// stage's checkpoint is the run's `best.safetensors`.
    RunFolder {
        flag: &'static str,
        resume: &'static str,
    },
    /// Nothing: the stage measures its input (`eval`), which it passes on.
    None,
    /// A file that is not the next stage's model, in the stage's folder (`export -o FILE`):
    /// like `None`, the stage passes its input on. The file is named by the value of the
    /// argument `by` (its default included) through `names` (`--format onnx`: `model.onnx`).
    Artifact {
        flag: &'static str,
        by: &'static str,
        names: &'static [(&'static str, &'static str)],
    },
}

impl OutputArg {
    /// Whether the next stage reads this stage's input rather than a checkpoint of its own.
    pub fn passes_input_on(&self) -> bool {
        matches!(self, OutputArg::None | OutputArg::Artifact { .. })
    }
}

/// One stage kind.
pub struct KindSpec {
    pub name: &'static str,
    /// The command's full clap definition (`TrainArgs::augment_args(Command::new("train"))`).
    pub command: Command,
    pub input: InputArg,
    pub output: OutputArg,
    /// Argument ids the runner sets itself (input, output, `--json`): not recipe keys.
    pub runner_sets: &'static [&'static str],
    /// Hidden test hooks that do not change a stage's result, left out of its hash.
    pub unhashed: &'static [&'static str],
    /// Whether the stage inherits the `[train]` defaults (training kinds).
    pub inherits_train: bool,
    /// Whether the stage takes a `finetune = { ... }` table (a training run after it).
    pub finetune: bool,
    /// Whether, placed right after a `quantize` stage, the stage reads that stage's float
    /// input instead of its int8 output (`qat`: it calibrates and quantizes itself).
    pub reads_float_before_quantize: bool,
    /// What the stage does, from its parsed arguments.
    pub effects: fn(&ArgMatches) -> Vec<Effect>,
    /// Checks that need the whole argument set, run before any stage starts (the command's own
    /// configuration check, e.g. training flags that only apply together).
    pub check: fn(&ArgMatches) -> anyhow::Result<()>,
    /// Runs the command on parsed arguments.
    pub run: fn(&ArgMatches) -> anyhow::Result<()>,
}

impl KindSpec {
    /// The arguments a recipe may set, with their recipe keys (the long flag in snake_case).
    pub fn recipe_args(&self) -> Vec<(String, &Arg)> {
        self.command
            .get_arguments()
            .filter(|a| {
                let id = a.get_id().as_str();
                a.get_long().is_some()
                    && !matches!(id, "help" | "version")
                    && !self.runner_sets.contains(&id)
            })
            .map(|a| (snake(a.get_long().expect("filtered")), a))
            .collect()
    }

    /// The argument a recipe key names: its long flag or one of the flag's aliases.
    pub fn arg_for_key(&self, key: &str) -> Option<&Arg> {
        let flag = key.replace('_', "-");
        self.recipe_args().into_iter().map(|(_, a)| a).find(|a| {
            a.get_long() == Some(flag.as_str())
                || a.get_all_aliases()
                    .is_some_and(|all| all.contains(&flag.as_str()))
        })
    }

    /// The recipe keys, in definition order.
    pub fn keys(&self) -> Vec<String> {
        self.recipe_args().into_iter().map(|(k, _)| k).collect()
    }

    /// Whether this kind's command has a `--teacher` (a stage name or a file in a recipe).
    pub fn takes_teacher(&self) -> bool {
        self.arg_for_key("teacher").is_some()
    }

    /// The name of the file an [`OutputArg::Artifact`] stage writes, from its command line
    /// without the output (`None` for the other kinds).
    pub fn artifact_name(&self, argv: &[String]) -> anyhow::Result<Option<&'static str>> {
        let OutputArg::Artifact { flag, by, names } = self.output else {
            return Ok(None);
        };
        let mut probe = argv.to_vec();
        probe.push(format!("--{flag}=artifact"));
        let matches = self.command.clone().try_get_matches_from(&probe)?;
        let value = matches
            .get_raw(by)
            .and_then(|mut values| values.next())
            .and_then(|v| v.to_str())
            .unwrap_or_default();
        match names.iter().find(|(v, _)| *v == value) {
            Some((_, name)) => Ok(Some(name)),
            None => anyhow::bail!(
                "stage kind `{}`: `--{by}={value}` names no output file",
                self.name
            ),
        }
    }
}

/// Whether an argument is a switch (`--nesterov`), set by `true` in a recipe.
pub fn is_switch(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse)
}

/// Whether an argument may be repeated (`--layer-ratio A --layer-ratio B`): an array in a
/// recipe.
pub fn is_repeatable(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Append)
}

pub fn snake(flag: &str) -> String {
    flag.replace('-', "_")
}

/// Every kind this build runs, and those it knows of but does not have yet.
pub struct Registry {
    pub kinds: Vec<KindSpec>,
    /// Kind names with the reason they are not available.
    pub pending: Vec<(&'static str, &'static str)>,
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<&KindSpec> {
        self.kinds.iter().find(|k| k.name == name)
    }

    /// The kind every `finetune` table and `[train]` default is checked against.
    pub fn train(&self) -> &KindSpec {
        self.get("train").expect("the registry has a train kind")
    }

    /// The kind that turns `[model] import = { ... }` into the first checkpoint.
    pub fn import(&self) -> Option<&KindSpec> {
        self.get("import")
    }
}
