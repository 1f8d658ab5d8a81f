//! The whole recipe checked before any stage starts, every problem collected with its line and
//! column: unknown keys (with did-you-mean), values the commands' own clap parsers refuse,
//! unknown kinds, duplicate names, `from`/`teacher` naming no earlier stage, missing files, and
//! an order that cannot work (float passes after an int8 `quantize`).

use super::kinds::{Effect, KindSpec, Registry, is_repeatable, is_switch};
use super::plan::{Initial, Input, Piece, Plan, PlannedStage};
use super::recipe::{Document, Entry, Node, Origin, Problem, Problems, Table, Value};
use crate::data::DataSpec;
use clap::Arg;
use std::path::{Path, PathBuf};

/// Top-level sections of a recipe.
const SECTIONS: &[&str] = &["model", "data", "train", "stage"];
/// `[model]` keys besides the architecture flags of `train`.
const MODEL_KEYS: &[&str] = &["init", "import"];
/// `train`'s architecture flags, given in `[model]` (a fresh model).
pub const ARCH_KEYS: &[&str] = &["arch", "width", "groups", "num_classes", "stem"];
/// `[data]` keys: flags of `train`, inherited by every stage whose command has them.
pub const DATA_KEYS: &[&str] = &[
    "data",
    "train_limit",
    "test_limit",
    "crop_padding",
    "no_flip",
];
/// Keys of a stage that are the recipe's, not its command's.
const STAGE_KEYS: &[&str] = &["name", "kind", "from", "finetune"];

/// A setting for one argument: the recipe key, its value, and the argument.
struct Setting<'k> {
    arg: &'k Arg,
    node: Node,
}

struct Checker<'r> {
    registry: &'r Registry,
    problems: Vec<Problem>,
    /// Per `quantize` stage (by index), the float checkpoint it read: where a `qat` stage
    /// after it starts from.
    quantize_inputs: std::collections::HashMap<usize, Option<Input>>,
}

/// "did you mean `x`?" for the closest key, when one is close.
fn suggestion(key: &str, known: &[String]) -> String {
    let best = known
        .iter()
        .map(|k| (crate::models::edit_distance(key, k), k))
        .min();
    match best {
        Some((d, k)) if d <= (key.len() / 3).max(2) => format!("; did you mean `{k}`?"),
        _ => String::new(),
    }
}

/// The first useful lines of a clap error, without its `error: ` prefix and usage footer.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    text.lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:")
        })
        .map(|l| l.strip_prefix("error: ").unwrap_or(l).to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

impl<'r> Checker<'r> {
    fn problem(&mut self, origin: &Origin, message: impl Into<String>) {
        self.problems.push(Problem {
            origin: origin.clone(),
            message: message.into(),
        });
    }

    fn table<'d>(&mut self, entry: &'d Entry, what: &str) -> Option<&'d Table> {
        match &entry.node.value {
            Value::Table(t) => Some(t),
            other => {
                self.problem(
                    &entry.node.origin,
                    format!("{what} must be a table, not {}", other.type_name()),
                );
                None
            }
        }
    }

    fn string<'d>(&mut self, entry: &'d Entry, what: &str) -> Option<&'d str> {
        match &entry.node.value {
            Value::Str(s) => Some(s),
            other => {
                self.problem(
                    &entry.node.origin,
                    format!("{what} must be a string, not {}", other.type_name()),
                );
                None
            }
        }
    }

    /// Checks one value against its argument with the argument's own parser; returns the
    /// command-line pieces it stands for.
    fn arg_pieces(
        &mut self,
        kind: &KindSpec,
        key: &str,
        arg: &Arg,
        node: &Node,
    ) -> Option<Vec<String>> {
        let flag = arg.get_long().expect("recipe args have long flags");
        let bad = |me: &mut Self, msg: String| {
            me.problem(&node.origin, format!("`{key}`: {msg}"));
            None
        };
        if is_switch(arg) {
            return match node.value {
                Value::Bool(true) => Some(vec![format!("--{flag}")]),
                Value::Bool(false) => Some(Vec::new()),
                ref other => bad(
                    self,
                    format!("expected true or false, got {}", other.type_name()),
                ),
            };
        }
        let values: Vec<&Node> = match &node.value {
            Value::Array(items) if is_repeatable(arg) => items.iter().collect(),
            Value::Array(_) => {
                return bad(self, "expected a single value, got an array".into());
            }
            Value::Table(_) => return bad(self, "expected a value, got a table".into()),
            _ => vec![node],
        };
        let mut out = Vec::new();
        for v in values {
            let Some(text) = v.value.as_arg_text() else {
                return bad(
                    self,
                    format!("expected a value, got {}", v.value.type_name()),
                );
            };
            // The value alone through the command's parser (with placeholders for what the
            // runner supplies), so that each bad value is reported at its own position.
            let piece = format!("--{flag}={text}");
            let input = match kind.input {
                super::kinds::InputArg::Positional => Some(Path::new(PLACEHOLDER)),
                super::kinds::InputArg::Flag(_) => None,
            };
            let trial = super::plan::argv(
                kind,
                input,
                &[Piece::Text(piece.clone())],
                Some(Path::new("recipe-output")),
                &|_| PathBuf::from(PLACEHOLDER),
            );
            // A required flag that this trial leaves out (quantize's --data) is not this
            // value's problem: the whole stage's parse below reports it if the recipe lacks it.
            if let Err(e) = kind.command.clone().try_get_matches_from(&trial)
                && e.kind() != clap::error::ErrorKind::MissingRequiredArgument
            {
                return bad(self, clap_message(&e));
            }
            out.push(piece);
        }
        Some(out)
    }

    /// Settings of `table` for `kind`; keys in `extra` are the caller's and skipped. Unknown
    /// keys are reported with `context` ("in stage `prune`").
    fn settings<'k>(
        &mut self,
        kind: &'k KindSpec,
        table: &Table,
        extra: &[&str],
        allowed: Option<&[&str]>,
        context: &str,
    ) -> Vec<(String, Setting<'k>)> {
        let mut known: Vec<String> = match allowed {
            Some(keys) => keys.iter().map(|k| k.to_string()).collect(),
            None => kind.keys(),
        };
        known.extend(extra.iter().map(|k| k.to_string()));
        let mut out = Vec::new();
        for e in &table.entries {
            if extra.contains(&e.key.as_str()) {
                continue;
            }
            let arg = kind.arg_for_key(&e.key).filter(|a| {
                allowed.is_none_or(|keys| {
                    keys.contains(&super::kinds::snake(a.get_long().unwrap_or("")).as_str())
                })
            });
            match arg {
                Some(arg) => {
                    if self.arg_pieces(kind, &e.key, arg, &e.node).is_some() {
                        out.push((
                            arg.get_id().to_string(),
                            Setting {
                                arg,
                                node: e.node.clone(),
                            },
                        ));
                    }
                }
                None => {
                    let hint = suggestion(&e.key, &known);
                    self.problem(
                        &e.key_origin,
                        format!("unknown key `{}` {context}{hint}", e.key),
                    );
                }
            }
        }
        out
    }

    /// A data spec must parse and its path must exist.
    fn check_data(&mut self, node: &Node) {
        let Some(text) = node.value.as_str() else {
            return;
        };
        match text.parse::<DataSpec>() {
            Err(e) => self.problem(&node.origin, format!("`data`: {e:#}")),
            Ok(spec) => {
                let path = match &spec {
                    DataSpec::Shapes => None,
                    DataSpec::Cifar10(p)
                    | DataSpec::Cifar100(p)
                    | DataSpec::Mnist(p)
                    | DataSpec::FashionMnist(p)
                    | DataSpec::Folder(p) => Some(p),
                };
                if let Some(p) = path.filter(|p| !p.exists()) {
                    self.problem(
                        &node.origin,
                        format!("`data`: `{}` does not exist", p.display()),
                    );
                }
            }
        }
    }

    fn check_file(&mut self, node: &Node, key: &str) -> Option<PathBuf> {
        let path = PathBuf::from(node.value.as_str()?);
        if !path.is_file() {
            self.problem(
                &node.origin,
                format!("`{key}`: file `{}` does not exist", path.display()),
            );
        }
        Some(path)
    }
}

/// Merges settings: later ones replace earlier ones for the same argument.
fn merge<'k>(into: &mut Vec<(String, Setting<'k>)>, from: Vec<(String, Setting<'k>)>) {
    for (id, s) in from {
        into.retain(|(i, _)| *i != id);
        into.push((id, s));
    }
}

/// The settings `kind` takes from a section checked against another kind (`[data]` and
/// `[train]` are checked against `train`; a prune stage takes the `data` of `[data]`).
fn inherited<'k>(kind: &'k KindSpec, section: &[(String, Node)]) -> Vec<(String, Setting<'k>)> {
    section
        .iter()
        .filter_map(|(key, node)| {
            let arg = kind.arg_for_key(key)?;
            Some((
                arg.get_id().to_string(),
                Setting {
                    arg,
                    node: node.clone(),
                },
            ))
        })
        .collect()
}

fn pieces(settings: &[(String, Setting<'_>)], skip: &[&str]) -> Vec<Piece> {
    let mut out = Vec::new();
    for (id, s) in settings {
        if skip.contains(&id.as_str()) {
            continue;
        }
        let flag = s.arg.get_long().expect("recipe args have long flags");
        if is_switch(s.arg) {
            if s.node.value == Value::Bool(true) {
                out.push(Piece::Text(format!("--{flag}")));
            }
            continue;
        }
        let values: Vec<&Node> = match &s.node.value {
            Value::Array(items) => items.iter().collect(),
            _ => vec![&s.node],
        };
        for v in values {
            let text = v.value.as_arg_text().expect("checked scalars");
            out.push(Piece::Text(format!("--{flag}={text}")));
        }
    }
    out
}

/// A name usable as a folder: letters, digits, `-` and `_`.
fn is_folder_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Placeholder paths for the trial parse of a stage's full argument vector.
const PLACEHOLDER: &str = "recipe-input.safetensors";

/// What `[model]` gives: the first checkpoint (or a fresh model) and its architecture flags.
struct ModelSection {
    initial: Option<Initial>,
    fresh_arch: Vec<String>,
    entries: Vec<(String, Node)>,
}

impl Checker<'_> {
    /// Checks `[model]`: exactly one of `arch` (with train's architecture flags), `init` or
    /// `import`.
    fn model(&mut self, train: &KindSpec, entry: Option<&Entry>) -> ModelSection {
        let mut initial = None;
        let mut fresh_arch = Vec::new();
        let mut model_entries = Vec::new();
        match entry {
            None => {
                self.problem(
                &Origin::File { line: 1, column: 1 },
                "the recipe has no [model]: give `arch = \"...\"` (a fresh model), `init = \"file\"` or `import = { arch, state_dict }`",
            );
            }
            Some(e) => {
                if let Some(t) = self.table(e, "[model]") {
                    let arch = self.settings(train, t, MODEL_KEYS, Some(ARCH_KEYS), "in [model]");
                    let ways = [
                        t.get("arch").is_some(),
                        t.get("init").is_some(),
                        t.get("import").is_some(),
                    ];
                    if ways.iter().filter(|w| **w).count() != 1 {
                        self.problem(
                        &e.key_origin,
                        "[model] needs exactly one of `arch` (a fresh model), `init` (a checkpoint) or `import` (a state dict)",
                    );
                    }
                    if let Some(init) = t.get("init") {
                        if !arch.is_empty() {
                            self.problem(
                                &init.key_origin,
                                "`init` loads a whole model: the architecture keys do not apply",
                            );
                        }
                        if self.string(init, "`init`").is_some() {
                            initial = self.check_file(&init.node, "init").map(Initial::File);
                        }
                    } else if let Some(import) = t.get("import") {
                        initial = check_import(self, import);
                    } else if t.get("arch").is_some() {
                        initial = Some(Initial::Fresh);
                        fresh_arch = pieces(&arch, &[])
                            .into_iter()
                            .filter_map(|p| match p {
                                Piece::Text(t) => Some(t),
                                Piece::Checkpoint { .. } | Piece::File { .. } => None,
                            })
                            .collect();
                    }
                    model_entries = valid_entries(arch);
                }
            }
        }
        ModelSection {
            initial,
            fresh_arch,
            entries: model_entries,
        }
    }
}

/// The (key, value) pairs of settings that passed their checks: only those are inherited, so
/// that a bad value is reported once.
fn valid_entries(settings: Vec<(String, Setting<'_>)>) -> Vec<(String, Node)> {
    settings
        .into_iter()
        .map(|(_, s)| (super::kinds::snake(s.arg.get_long().unwrap_or("")), s.node))
        .collect()
}

/// What every stage's check reads: the registry's train kind and the inherited sections.
struct StageContext<'r, 'd> {
    train: &'r KindSpec,
    train_key_refs: Vec<&'r str>,
    data_entries: Vec<(String, Node)>,
    train_entries: Vec<(String, Node)>,
    model_entries: Vec<(String, Node)>,
    initial: Option<Initial>,
    stage_nodes: Vec<&'d Node>,
}

impl<'r> Checker<'r> {
    /// Checks stage `index` and plans it; `names` and `quantized` (per earlier stage: the
    /// `quantize` stage in its lineage) grow by this stage's entry whatever the outcome.
    fn stage(
        &mut self,
        ctx: &StageContext<'r, '_>,
        index: usize,
        node: &Node,
        names: &mut Vec<String>,
        quantized: &mut Vec<Option<String>>,
    ) -> Option<PlannedStage> {
        let Value::Table(t) = &node.value else {
            self.problem(&node.origin, "each [[stage]] must be a table");
            return None;
        };
        let at = &node.origin;
        let kind_name = match t.get("kind") {
            None => {
                self.problem(at, format!("stage {} has no `kind`", index + 1));
                None
            }
            Some(e) => self
                .string(e, "`kind`")
                .map(|s| (s.to_string(), e.node.origin.clone())),
        };
        let name = match t.get("name") {
            Some(e) => self
                .string(e, "`name`")
                .map(|s| (s.to_string(), e.node.origin.clone())),
            None => kind_name.clone(),
        };
        let Some((name, name_at)) = name else {
            names.push(String::new());
            quantized.push(None);
            return None;
        };
        if !is_folder_name(&name) {
            self.problem(
                &name_at,
                format!("stage name `{name}`: use letters, digits, `-` and `_` (it names the stage's folder)"),
            );
        }
        if names.contains(&name) {
            self.problem(
                &name_at,
                format!("duplicate stage name `{name}`: give each stage its own `name`"),
            );
        }
        names.push(name.clone());
        quantized.push(None);
        let (kind_name, kind_at) = kind_name?;
        let kind = match self.registry.get(&kind_name).filter(|k| k.name != "import") {
            Some(k) => k,
            None => {
                let message = if let Some((_, why)) =
                    self.registry.pending.iter().find(|(n, _)| *n == kind_name)
                {
                    format!("stage kind `{kind_name}` is not available in this build: {why}")
                } else if kind_name == "import" {
                    "import is not a stage: write `[model] import = { arch = ..., state_dict = ... }`".to_string()
                } else {
                    let mut all: Vec<String> = self
                        .registry
                        .kinds
                        .iter()
                        .filter(|k| k.name != "import")
                        .map(|k| k.name.to_string())
                        .collect();
                    all.extend(self.registry.pending.iter().map(|(n, _)| n.to_string()));
                    format!(
                        "unknown stage kind `{kind_name}`{}; kinds: {}",
                        suggestion(&kind_name, &all),
                        all.join(", ")
                    )
                };
                self.problem(&kind_at, message);
                return None;
            }
        };
        let context = format!("in stage `{name}` (kind {})", kind.name);

        // Input: `from`, or the previous stage; none for a fresh first training stage.
        let earlier = |n: &str| names[..index].iter().position(|x| x == n);
        // Whether the input is known; if not, that was reported and the trial parse of the
        // whole command line (which needs it) is skipped.
        let mut input_known = !(index == 0 && ctx.initial.is_none());
        let input = match t.get("from") {
            Some(e) => match self.string(e, "`from`") {
                Some(from) => match earlier(from) {
                    Some(i) => Some(Input::Stage(i)),
                    None => {
                        input_known = false;
                        let hint = suggestion(from, &names[..index]);
                        self.problem(
                            &e.node.origin,
                            format!("`from = \"{from}\"` names no earlier stage{hint}"),
                        );
                        None
                    }
                },
                None => {
                    input_known = false;
                    None
                }
            },
            None if index == 0 => match ctx.initial {
                Some(Initial::Fresh) | None => None,
                Some(_) => Some(Input::Initial),
            },
            None => Some(Input::Stage(index - 1)),
        };
        // Quantization-aware training fine-tunes the float model and quantizes it itself: after
        // a `quantize` stage it reads the float checkpoint that stage read (the lineage stays
        // quantized: its result is int8 too).
        let quantized_input = match input {
            Some(Input::Stage(i)) if kind.reads_float_before_quantize => self
                .quantize_inputs
                .get(&i)
                .copied()
                .map(|float| (i, float)),
            _ => None,
        };
        let input = match quantized_input {
            Some((_, float)) => float,
            None => input,
        };
        let fresh = index == 0 && t.get("from").is_none() && ctx.initial == Some(Initial::Fresh);
        if fresh && kind.input != super::kinds::InputArg::Flag("init") {
            self.problem(
                &kind_at,
                format!(
                    "the first stage starts from a fresh `[model] arch`, which only a training stage can take; `{}` needs a checkpoint (`[model] init = \"file\"`)",
                    kind.name
                ),
            );
        }

        // The stage's own keys, over the inherited defaults.
        let mut extra: Vec<&str> = STAGE_KEYS.to_vec();
        if !kind.finetune {
            extra.retain(|k| *k != "finetune");
        }
        // A key refused on its own is not passed on: the trial of the whole command line
        // would then report its absence too, so it is skipped.
        let before = self.problems.len();
        let own = self.settings(kind, t, &extra, None, &context);
        let keys_ok = self.problems.len() == before;
        let mut settings = inherited(kind, &ctx.data_entries);
        if kind.inherits_train {
            merge(&mut settings, inherited(kind, &ctx.train_entries));
        }
        if fresh {
            merge(&mut settings, inherited(kind, &ctx.model_entries));
        }
        merge(&mut settings, own);
        for (_, s) in &settings {
            if s.arg.get_long() == Some("data") {
                self.check_data(&s.node);
            }
        }

        // A teacher: an earlier stage's checkpoint, or a file.
        let mut teacher = None;
        if let Some((_, s)) = settings
            .iter()
            .find(|(_, s)| s.arg.get_long() == Some("teacher"))
            && let Some(text) = s.node.value.as_str()
        {
            teacher = match earlier(text) {
                Some(i) => Some(Input::Stage(i)),
                None if names.contains(&text.to_string())
                    || ctx.stage_nodes.iter().skip(index).any(|n| {
                        n.value
                            .as_table()
                            .and_then(|t| t.get("name"))
                            .and_then(|e| e.node.value.as_str())
                            == Some(text)
                    }) =>
                {
                    self.problem(
                        &s.node.origin,
                        format!("`teacher = \"{text}\"`: that stage does not run before this one"),
                    );
                    None
                }
                None => {
                    if !Path::new(text).is_file() {
                        self.problem(
                                &s.node.origin,
                                format!("`teacher = \"{text}\"` is neither an earlier stage nor an existing file"),
                            );
                    }
                    None
                }
            };
        }
        let mut args = pieces(&settings, &["teacher"]);
        let mut hashed_args = pieces(&settings, kind.unhashed);
        hashed_args.retain(|p| !matches!(p, Piece::Text(t) if t.starts_with("--teacher=")));
        for list in [&mut args, &mut hashed_args] {
            if let Some(i) = teacher {
                list.push(Piece::Checkpoint {
                    flag: "teacher".into(),
                    input: i,
                });
            } else if let Some((_, s)) = settings
                .iter()
                .find(|(_, s)| s.arg.get_long() == Some("teacher"))
            {
                let text = s.node.value.as_arg_text().unwrap_or_default();
                list.push(Piece::File {
                    flag: "teacher".into(),
                    path: PathBuf::from(text),
                });
            }
        }

        // The whole argument vector, through the command's own parser and checks.
        let mut effects = Vec::new();
        let trial = super::plan::argv(
            kind,
            input.map(|_| Path::new(PLACEHOLDER)),
            &args,
            Some(Path::new("recipe-output")),
            &|_| PathBuf::from(PLACEHOLDER),
        );
        match kind.command.clone().try_get_matches_from(&trial) {
            _ if !input_known || !keys_ok => {}
            Err(e) => self.problem(at, format!("stage `{name}`: {}", clap_message(&e))),
            Ok(m) => {
                if let Err(e) = (kind.check)(&m) {
                    self.problem(at, format!("stage `{name}`: {e:#}"));
                }
                effects = (kind.effects)(&m);
            }
        }

        // Fine-tuning after the stage: a training run with [train]'s defaults.
        let mut finetune = None;
        if let Some(e) = t.get("finetune").filter(|_| kind.finetune)
            && let Some(ft) = self.table(e, "`finetune`")
        {
            let before = self.problems.len();
            let own = self.settings(
                ctx.train,
                ft,
                &[],
                Some(&ctx.train_key_refs),
                &format!("in the finetune of stage `{name}`"),
            );
            let mut s = inherited(ctx.train, &ctx.data_entries);
            merge(&mut s, inherited(ctx.train, &ctx.train_entries));
            merge(&mut s, own);
            let list = pieces(&s, &[]);
            let trial = super::plan::argv(
                ctx.train,
                Some(Path::new(PLACEHOLDER)),
                &list,
                Some(Path::new("recipe-output")),
                &|_| PathBuf::from(PLACEHOLDER),
            );
            let keys_ok = self.problems.len() == before;
            match ctx.train.command.clone().try_get_matches_from(&trial) {
                _ if !keys_ok => {}
                Err(err) => self.problem(
                    &e.node.origin,
                    format!("finetune of stage `{name}`: {}", clap_message(&err)),
                ),
                Ok(m) => {
                    if let Err(err) = (ctx.train.check)(&m) {
                        self.problem(
                            &e.node.origin,
                            format!("finetune of stage `{name}`: {err:#}"),
                        );
                    }
                }
            }
            effects.push(Effect::FloatTraining);
            finetune = Some(pieces(&s, ctx.train.unhashed));
        }

        // Order: nothing float after an int8 quantize in the same lineage, but QAT.
        let upstream = match (quantized_input, input) {
            (Some((q, _)), _) | (None, Some(Input::Stage(q))) => quantized[q].clone(),
            _ => None,
        };
        if let Some(q) = &upstream {
            for effect in &effects {
                let what = match effect {
                    Effect::FloatTraining => "trains in float",
                    Effect::ChannelPruning => "prunes channels",
                    Effect::Quantize | Effect::QuantAwareTraining => continue,
                };
                self.problem(
                    &kind_at,
                    format!(
                        "impossible order: stage `{name}` {what} after the int8 `quantize` stage `{q}`; move it before, or fine-tune for int8 with kind = \"qat\" (which reads the float model `{q}` quantized)"
                    ),
                );
            }
        }
        quantized[index] = if effects.contains(&Effect::Quantize) {
            self.quantize_inputs.insert(index, input);
            Some(name.clone())
        } else {
            upstream
        };
        Some(PlannedStage {
            index,
            folder: format!("{:02}-{name}", index + 1),
            name,
            kind: kind.name.to_string(),
            input,
            args,
            hashed_args,
            finetune,
            effects,
        })
    }
}

/// Checks the whole recipe and turns it into a plan, or returns every problem found.
pub fn validate(doc: &Document, registry: &Registry) -> Result<Plan, Problems> {
    let mut c = Checker {
        registry,
        problems: Vec::new(),
        quantize_inputs: std::collections::HashMap::new(),
    };
    let train = registry.train();
    let start = Origin::File { line: 1, column: 1 };
    let known_sections: Vec<String> = SECTIONS.iter().map(|s| s.to_string()).collect();
    let section = |name: &str| doc.root.get(name);
    for e in &doc.root.entries {
        if !SECTIONS.contains(&e.key.as_str()) {
            let hint = suggestion(&e.key, &known_sections);
            c.problem(&e.key_origin, format!("unknown section `{}`{hint}", e.key));
        }
    }

    // [data] and [train]: flags of `train`.
    let data_table = section("data").and_then(|e| c.table(e, "[data]"));
    let train_keys: Vec<String> = train
        .keys()
        .into_iter()
        .filter(|k| !ARCH_KEYS.contains(&k.as_str()) && !DATA_KEYS.contains(&k.as_str()))
        .collect();
    let train_key_refs: Vec<&str> = train_keys.iter().map(String::as_str).collect();
    // Only values that passed their checks are inherited (a bad one is reported once).
    let mut data_entries = Vec::new();
    if let Some(t) = data_table {
        data_entries = valid_entries(c.settings(train, t, &[], Some(DATA_KEYS), "in [data]"));
        if let Some(e) = t.get("data") {
            c.check_data(&e.node);
        }
    }
    let train_table = section("train").and_then(|e| c.table(e, "[train]"));
    let mut train_entries = Vec::new();
    if let Some(t) = train_table {
        train_entries =
            valid_entries(c.settings(train, t, &[], Some(&train_key_refs), "in [train]"));
    }

    // [model]: a fresh architecture, an init file or an import.
    let ModelSection {
        initial,
        fresh_arch,
        entries: model_entries,
    } = c.model(train, section("model"));

    // The stages.
    let stage_nodes: Vec<&Node> = match section("stage").map(|e| &e.node) {
        None => {
            c.problem(&start, "the recipe has no [[stage]]");
            Vec::new()
        }
        Some(Node {
            value: Value::Array(items),
            ..
        }) => items.iter().collect(),
        Some(n) => {
            c.problem(
                &n.origin,
                "`stage` must be an array of tables: write each as [[stage]]",
            );
            Vec::new()
        }
    };
    let mut stages: Vec<PlannedStage> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    // Per stage: whether its lineage has been quantized (by `quantize`), and by which stage.
    let mut quantized: Vec<Option<String>> = Vec::new();
    let ctx = StageContext {
        train,
        train_key_refs,
        data_entries,
        train_entries,
        model_entries,
        initial,
        stage_nodes,
    };
    for (index, node) in ctx.stage_nodes.iter().enumerate() {
        if let Some(stage) = c.stage(&ctx, index, node, &mut names, &mut quantized) {
            stages.push(stage);
        }
    }
    if !c.problems.is_empty() {
        return Err(Problems {
            path: doc.path.clone(),
            list: c.problems,
        });
    }
    let data = data_table
        .and_then(|t| t.get("data"))
        .and_then(|e| e.node.value.as_str())
        .unwrap_or("shapes")
        .to_string();
    let test_limit =
        data_table
            .and_then(|t| t.get("test_limit"))
            .and_then(|e| match e.node.value {
                Value::Int(i) => usize::try_from(i).ok(),
                _ => None,
            });
    Ok(Plan {
        recipe: doc.path.clone(),
        initial: ctx.initial.expect("no problems means a model"),
        stages,
        lock: doc.to_toml_string(),
        data,
        test_limit,
        fresh_arch,
    })
}

/// `[model] import = { arch, state_dict, ... }`: the import command's flags.
fn check_import(c: &mut Checker<'_>, entry: &Entry) -> Option<Initial> {
    let kind = c.registry.import()?;
    let table = c.table(entry, "`import`")?;
    let settings = c.settings(kind, table, &["state_dict"], None, "in [model] import");
    let Some(sd) = table.get("state_dict") else {
        c.problem(
            &entry.node.origin,
            "`import` needs `state_dict = \"file.safetensors\"`",
        );
        return None;
    };
    c.string(sd, "`state_dict`")?;
    let path = c.check_file(&sd.node, "state_dict")?;
    let mut argv = vec![path.display().to_string()];
    argv.extend(pieces(&settings, &[]).into_iter().filter_map(|p| match p {
        Piece::Text(t) => Some(t),
        Piece::Checkpoint { .. } | Piece::File { .. } => None,
    }));
    Some(Initial::Import(argv))
}
