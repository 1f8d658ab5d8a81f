//! Option sets that several commands share, each defined once and flattened into the commands
//! (`#[command(flatten)]`): the same flag, help, range and value names everywhere, and so the
//! same recipe keys for every stage kind that has them (issue #14, "one definition per option
//! set").

use super::ranges::{MAX_IMAGES, REMOVED_FRACTION, count_in};
use clap::{Arg, Args, ValueEnum};

/// The default of `--data` for the commands that have one.
const DEFAULT_DATA: &str = "shapes";

/// The data a command reads: `--data` and the seeded test subset. Most commands default to
/// the built-in `shapes`; `prune` takes no default (without data it does not measure
/// accuracy, see [`data_optional`]) and `quantize` and `sensitivity` insist on it (see
/// [`data_required`]), which is why `data` is an `Option` here.
#[derive(Args, Clone, Debug)]
pub struct DataArgs {
    /// shapes | cifar10:PATH | cifar100:PATH | mnist:PATH | fashion-mnist:PATH | folder:PATH.
    /// Accuracy is measured on its test split; training, calibration and the taylor criterion
    /// use its training split.
    #[arg(long, default_value = DEFAULT_DATA)]
    pub data: Option<String>,
    /// Evaluate on a seeded, class-balanced subset of this many test images.
    #[arg(long, value_parser = count_in(1, MAX_IMAGES))]
    pub test_limit: Option<usize>,
}

impl DataArgs {
    /// The data spec of a command whose `--data` has a default or is required (always set
    /// once parsed; `shapes` otherwise).
    pub fn spec(&self) -> &str {
        self.data.as_deref().unwrap_or(DEFAULT_DATA)
    }

    /// The data spec given, if any: for a command whose `--data` is optional (`prune`).
    pub fn given(&self) -> Option<&str> {
        self.data.as_deref()
    }
}

/// `--data` with no default, for a command that works without data (`prune`): use it as
/// `#[command(mut_arg("data", options::data_optional))]` on the command's struct.
pub fn data_optional(arg: Arg) -> Arg {
    arg.default_value(None::<&str>)
}

/// `--data` required, for a command that has nothing to do without data (`quantize`,
/// `sensitivity`): use it as `#[command(mut_arg("data", options::data_required))]`.
pub fn data_required(arg: Arg) -> Arg {
    arg.default_value(None::<&str>).required(true)
}

/// The ranking scope of a pruning pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PruneScope {
    /// Every layer (group) loses the same share: the same sparsity in every layer.
    #[value(alias = "layer")]
    Uniform,
    /// One ranking across layers: one magnitude threshold over all pruned layers, or channel
    /// importance normalised per layer.
    Global,
}

/// Which layers a pruning pass or scan leaves alone: shared by `prune`, `train --prune` and
/// `sensitivity`.
#[derive(Args, Clone, Debug)]
pub struct PruneLayerArgs {
    /// Layers never to prune: comma-separated globs over layer or parameter names, in addition
    /// to what is always spared (magnitude pruning: the first layer, the classifier and,
    /// without --prune-depthwise, the depthwise convs).
    #[arg(long = "prune-exclude", alias = "exclude", value_name = "PATTERNS")]
    pub exclude: Option<String>,
    /// Magnitude pruning: prune depthwise conv filters too (spared by default).
    #[arg(long)]
    pub prune_depthwise: bool,
}

impl PruneLayerArgs {
    /// The `--prune-exclude` patterns as given (empty: none).
    pub fn exclude(&self) -> &str {
        self.exclude.as_deref().unwrap_or("")
    }
}

/// The pruning amount and selection that `prune` and `train --prune` share.
#[derive(Args, Clone, Debug)]
pub struct PruneSelectArgs {
    /// Magnitude pruning: the fraction of the prunable weights to zero, in [0, 1) (0.8: 80%);
    /// for a gradual run (`train --prune`), the final sparsity.
    #[arg(long, value_parser = REMOVED_FRACTION.parser())]
    pub sparsity: Option<f64>,
    /// Ranking scope [default: uniform for channel pruning, global for magnitude pruning].
    #[arg(long = "prune-scope", alias = "scope", value_enum)]
    pub scope: Option<PruneScope>,
    #[command(flatten)]
    pub layers: PruneLayerArgs,
}
