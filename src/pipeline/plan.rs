//! The validated recipe: the stages in order, each with the argument vector its command will
//! get, where its input comes from, and the hash that decides whether a rerun can skip it.

use super::kinds::{Effect, InputArg, KindSpec, OutputArg, Registry};
use anyhow::Result;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Where a stage's input checkpoint comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The recipe's `[model]`: an `init` file or the imported state dict.
    Initial,
    /// The checkpoint of an earlier stage (by index).
    Stage(usize),
}

/// One piece of a stage's argument vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// `--FLAG=PATH` with the path of a checkpoint known when the stage runs (a teacher).
    Checkpoint {
        flag: String,
        input: Input,
    },
    /// `--FLAG=PATH` with a file given in the recipe, hashed by its content (a teacher file).
    File {
        flag: String,
        path: PathBuf,
    },
}

/// The model the first stage starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Initial {
    /// A fresh model: the first stage trains from `[model] arch = ...`.
    Fresh,
    /// `[model] init = "file"`.
    File(PathBuf),
    /// `[model] import = { ... }`: the import command's arguments (state dict first), run into
    /// `DIR/00-import/`.
    Import(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct PlannedStage {
    pub index: usize,
    pub name: String,
    pub kind: String,
    /// `NN-name`, the stage's folder under the run directory.
    pub folder: String,
    /// `None`: a fresh model (the first stage, training from `[model] arch`).
    pub input: Option<Input>,
    /// The command's flags (without input and output, which the runner adds).
    pub args: Vec<Piece>,
    /// The flags that decide the result (without test hooks): hashed.
    pub hashed_args: Vec<Piece>,
    /// A training run after the stage (`finetune = { ... }`): the train command's flags.
    pub finetune: Option<Vec<Piece>>,
    pub effects: Vec<Effect>,
}

/// A recipe ready to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub recipe: PathBuf,
    pub initial: Initial,
    pub stages: Vec<PlannedStage>,
    /// The effective recipe (after `--set`), as written to `recipe.lock.toml`.
    pub lock: String,
    /// Data the report measures accuracy on (the recipe's `[data]`).
    pub data: String,
    pub test_limit: Option<usize>,
    /// `[model]`'s architecture flags, for a fresh model's MACs in the dry-run plan.
    pub fresh_arch: Vec<String>,
}

impl PlannedStage {
    /// The checkpoint this stage leaves for the next one, under its folder `dir`.
    pub fn output_checkpoint(&self, dir: &Path) -> PathBuf {
        dir.join("model.safetensors")
    }
}

/// Builds one command line: `[kind, (input), flags..., (output)]`; `resolve` gives the path of
/// an input checkpoint.
pub fn argv(
    kind: &KindSpec,
    input: Option<&Path>,
    pieces: &[Piece],
    output: Option<&Path>,
    resolve: &dyn Fn(Input) -> PathBuf,
) -> Vec<String> {
    let mut v = vec![kind.name.to_string()];
    match (kind.input, input) {
        (InputArg::Positional, Some(p)) => v.push(p.display().to_string()),
        (InputArg::Flag(f), Some(p)) => v.push(format!("--{f}={}", p.display())),
        (_, None) => {}
    }
    for piece in pieces {
        v.push(match piece {
            Piece::Text(t) => t.clone(),
            Piece::Checkpoint { flag, input } => {
                format!("--{flag}={}", resolve(*input).display())
            }
            Piece::File { flag, path } => format!("--{flag}={}", path.display()),
        });
    }
    match (kind.output, output) {
        (OutputArg::File(f), Some(p))
        | (OutputArg::RunFolder { flag: f, .. }, Some(p))
        | (OutputArg::Artifact { flag: f, .. }, Some(p)) => {
            v.push(format!("--{f}={}", p.display()))
        }
        _ => {}
    }
    v
}

/// A stage's hash: sha256 over its kind, its effective flags (inherited defaults included,
/// checkpoint flags by their file's hash), its fine-tuning flags and its input checkpoint's
/// hash. Unchanged means a rerun may skip the stage.
pub fn stage_hash(
    stage: &PlannedStage,
    input_hash: Option<&str>,
    checkpoint_hash: &dyn Fn(Input) -> Result<String>,
) -> Result<String> {
    let mut h = Sha256::new();
    let mut put = |s: &str| {
        h.update(s.as_bytes());
        h.update([0u8]);
    };
    put(&stage.kind);
    put(input_hash.unwrap_or("fresh"));
    let pieces = |list: &[Piece], put: &mut dyn FnMut(&str)| -> Result<()> {
        for p in list {
            match p {
                Piece::Text(t) => put(t),
                Piece::Checkpoint { flag, input } => {
                    put(flag);
                    put(&checkpoint_hash(*input)?);
                }
                Piece::File { flag, path } => {
                    put(flag);
                    put(&crate::tensor_file::file_sha256(path)?);
                }
            }
        }
        Ok(())
    };
    pieces(&stage.hashed_args, &mut put)?;
    if let Some(f) = &stage.finetune {
        put("finetune");
        pieces(f, &mut put)?;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The registry's kind for a planned stage.
pub fn kind_of<'r>(registry: &'r Registry, stage: &PlannedStage) -> &'r KindSpec {
    registry
        .get(&stage.kind)
        .expect("validated stages have registered kinds")
}
