//! The recipe runner (`slimcandle run RECIPE.toml`): a TOML file names a model, data,
//! training defaults and a list of stages (train, prune, eval, ...); each stage is one of the
//! binary's commands, its keys that command's flags. The recipe is parsed with positions
//! (`recipe`), checked as a whole against the commands' clap definitions (`validate`, with the
//! stage kinds in `kinds`), turned into a plan of argument vectors and hashes (`plan`), run in
//! a run directory that makes reruns skip unchanged stages (`runner`), and measured into a
//! report (`report`). See `docs/recipes.md`.

pub mod kinds;
pub mod plan;
pub mod recipe;
pub mod report;
pub mod runner;
pub mod validate;

pub use kinds::{Effect, InputArg, KindSpec, OutputArg, Registry};
pub use plan::Plan;
pub use recipe::{Document, Problems};
pub use validate::validate;
