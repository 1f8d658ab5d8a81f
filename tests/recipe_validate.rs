//! Recipe validation: broken recipes, each refused before any work with its message at the
//! right line and column (exit code 2, nothing written), all problems of a recipe at once; the
//! order check with stand-in kinds for the passes this build does not have yet.

mod common;

use clap::{Arg, ArgAction, Command};
use common::{s, slimcandle, stderr, temp_dir};
use slimcandle::pipeline::recipe::Document;
use slimcandle::pipeline::{Effect, InputArg, KindSpec, OutputArg, Registry, validate};
use std::path::Path;

/// A valid recipe the cases below break one line of.
const BASE: &str = r#"[model]
arch = "mobilenet_v2"
width = 0.25
stem = "cifar"

[data]
data = "shapes"
train_limit = 64
test_limit = 20

[train]
epochs = 1
lr = 0.05

[[stage]]
name = "train"
kind = "train"

[[stage]]
name = "prune"
kind = "prune"
target_macs = 0.5
finetune = { epochs = 1 }

[[stage]]
name = "eval"
kind = "eval"
"#;

/// `LINE:COL` of the first occurrence of `marker` in `text` (1-based, columns in characters).
fn position(text: &str, marker: &str) -> String {
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("`{marker}` not in recipe"));
    position_at(text, at)
}

/// `LINE:COL` of a byte offset.
fn position_at(text: &str, at: usize) -> String {
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap().chars().count() + 1;
    format!("{line}:{col}")
}

/// Runs `slimcandle run` on `text`, expecting a usage error; returns stderr.
fn refused(dir: &Path, name: &str, text: &str, extra: &[&str]) -> String {
    let recipe = dir.join(format!("{name}.toml"));
    std::fs::write(&recipe, text).unwrap();
    let out = dir.join(format!("{name}-run"));
    let mut args = vec!["run", s(&recipe), "-o", s(&out)];
    args.extend(extra);
    let o = slimcandle(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{name} should be refused:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "{name}: nothing may be written");
    err
}

#[test]
fn the_base_recipe_is_valid() {
    let dir = temp_dir("recipe-valid");
    let recipe = dir.join("base.toml");
    std::fs::write(&recipe, BASE).unwrap();
    let o = slimcandle(&["run", s(&recipe), "--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let plan = common::stdout(&o);
    assert!(plan.contains("3 stages"), "{plan}");
    assert!(plan.contains("02-prune"), "{plan}");
}

#[test]
fn each_broken_recipe_is_refused_at_its_position() {
    let dir = temp_dir("recipe-broken");
    let init_missing = dir.join("missing.safetensors");
    let missing_init = format!(
        "[model]\ninit = \"{}\"\n\n[[stage]]\nkind = \"eval\"\n",
        init_missing.display()
    );
    // (name, the replacement of one line of BASE (or a whole recipe), marker of the position,
    // what the message says)
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "unknown-key",
            BASE.replace("kind = \"train\"\n", "kind = \"train\"\nepoch = 3\n"),
            "epoch = 3",
            "unknown key `epoch` in stage `train` (kind train); did you mean `epochs`?",
        ),
        (
            "wrong-type",
            BASE.replace("epochs = 1\nlr", "epochs = \"ten\"\nlr"),
            "\"ten\"",
            "`epochs`: invalid value 'ten' for '--epochs <EPOCHS>'",
        ),
        (
            "float-for-integer",
            BASE.replace("epochs = 1\nlr", "epochs = 1.5\nlr"),
            "1.5",
            "`epochs`: invalid value '1.5'",
        ),
        (
            "out-of-range",
            BASE.replace("target_macs = 0.5", "target_macs = 1.5"),
            "1.5",
            "`target_macs`: invalid value '1.5' for '--target-macs <TARGET_MACS>': must be in (0, 1]",
        ),
        (
            "bad-choice",
            BASE.replace("lr = 0.05", "schedule = \"cosin\""),
            "\"cosin\"",
            "`schedule`: invalid value 'cosin'",
        ),
        (
            "switch-not-bool",
            BASE.replace("lr = 0.05", "nesterov = \"yes\""),
            "\"yes\"",
            "`nesterov`: expected true or false, got a string",
        ),
        (
            "unknown-kind",
            BASE.replace("kind = \"eval\"", "kind = \"evaluate\""),
            "\"evaluate\"",
            "unknown stage kind `evaluate`",
        ),
        // The upper bounds of src/cli/ranges.rs: a typo is refused before any work.
        (
            "epochs-beyond-bound",
            BASE.replace("epochs = 1\nlr", "epochs = 1000000000\nlr"),
            "1000000000",
            "`epochs`: invalid value '1000000000' for '--epochs <EPOCHS>': must be at most 10000",
        ),
        (
            "batch-beyond-bound",
            BASE.replace("lr = 0.05", "batch_size = 10000000"),
            "10000000",
            "`batch_size`: invalid value '10000000' for '--batch-size <BATCH_SIZE>': must be at most 65536",
        ),
        (
            "finetune-epochs-beyond-bound",
            BASE.replace("{ epochs = 1 }", "{ epochs = 99999999999 }"),
            "99999999999",
            "`epochs`: invalid value '99999999999' for '--epochs <EPOCHS>': must be at most 10000",
        ),
        (
            "test-limit-beyond-bound",
            BASE.replace("test_limit = 20", "test_limit = 1000000000"),
            "1000000000",
            "`test_limit`: invalid value '1000000000' for '--test-limit <TEST_LIMIT>': must be at most 10000000",
        ),
        (
            "calibration-beyond-bound",
            BASE.replace(
                "kind = \"eval\"",
                "kind = \"quantize\"\ncalibration = 100000000",
            ),
            "100000000",
            "`calibration`: invalid value '100000000' for '--calibration <CALIBRATION>': must be at most 10000000",
        ),
        (
            "export-size-beyond-bound",
            BASE.replace(
                "kind = \"eval\"",
                "kind = \"export\"\ninput_size = \"100000,32\"",
            ),
            "\"100000,32\"",
            "`input_size`: invalid value '100000,32' for '--input-size <INPUT_SIZE>'",
        ),
        (
            "duplicate-name",
            BASE.replace("name = \"eval\"", "name = \"train\""),
            "\"train\"\nkind = \"eval\"",
            "duplicate stage name `train`",
        ),
        (
            "from-unknown",
            BASE.replace("kind = \"eval\"", "kind = \"eval\"\nfrom = \"trian\""),
            "\"trian\"",
            "`from = \"trian\"` names no earlier stage; did you mean `train`?",
        ),
        (
            "from-later",
            BASE.replace("target_macs = 0.5", "target_macs = 0.5\nfrom = \"eval\""),
            "\"eval\"",
            "`from = \"eval\"` names no earlier stage",
        ),
        (
            "data-missing",
            BASE.replace("\"shapes\"", "\"folder:/nonexistent/slimcandle-data\""),
            "\"folder:",
            "`data`: `/nonexistent/slimcandle-data` does not exist",
        ),
        (
            "data-kind",
            BASE.replace("\"shapes\"", "\"shape\""),
            "\"shape\"",
            "`data`: unknown dataset kind `shape` (did you mean `shapes`?)",
        ),
        (
            "init-missing",
            missing_init.clone(),
            "\"/",
            "`init`: file `",
        ),
        (
            "unknown-section",
            BASE.replace("[train]", "[trian]"),
            "trian]",
            "unknown section `trian`; did you mean `train`?",
        ),
        (
            "syntax",
            BASE.replace("lr = 0.05", "lr = = 0.05"),
            "= 0.05",
            "invalid TOML",
        ),
        (
            "conflicting-flags",
            BASE.replace("target_macs = 0.5", "target_macs = 0.5\nratio = 0.3"),
            "[[stage]]\nname = \"prune\"",
            "stage `prune`: the argument '--target-macs <TARGET_MACS>' cannot be used with '--ratio <RATIO>'",
        ),
        (
            "train-config",
            BASE.replace("lr = 0.05", "sparsity = 0.5"),
            "[[stage]]\nname = \"train\"",
            "stage `train`: --sparsity only applies to a pruning run",
        ),
        (
            "prune-without-amount",
            BASE.replace("target_macs = 0.5\n", ""),
            "[[stage]]\nname = \"prune\"",
            "stage `prune`: say how much to prune: --ratio R, --target-macs F or --target-params F",
        ),
        (
            "prune-flag-of-other-method",
            BASE.replace("target_macs = 0.5", "target_macs = 0.5\nsparsity = 0.5"),
            "[[stage]]\nname = \"prune\"",
            "stage `prune`: --sparsity and --prune-depthwise are for --method magnitude",
        ),
        (
            "finetune-key",
            BASE.replace("{ epochs = 1 }", "{ epochs = 1, lr_max = 2 }"),
            "lr_max",
            "unknown key `lr_max` in the finetune of stage `prune`",
        ),
        (
            "runner-key",
            BASE.replace("kind = \"eval\"", "kind = \"eval\"\noutput = \"x\""),
            "output = ",
            "unknown key `output` in stage `eval`",
        ),
        (
            "fresh-model-pruned",
            BASE.replace("[[stage]]\nname = \"train\"\nkind = \"train\"\n\n", ""),
            "\"prune\"\ntarget",
            "the first stage starts from a fresh `[model] arch`",
        ),
    ];
    for (name, text, marker, message) in &cases {
        let err = refused(&dir, name, text, &["--dry-run"]);
        let recipe = dir.join(format!("{name}.toml"));
        let want = format!(
            "error: {}:{}: {message}",
            recipe.display(),
            position(text, marker)
        );
        assert!(
            err.lines().any(|l| l.starts_with(&want)),
            "{name}: expected a line starting with\n  {want}\nin:\n{err}"
        );
    }
}

#[test]
fn all_problems_of_a_recipe_come_at_once() {
    let dir = temp_dir("recipe-many");
    let text = BASE
        .replace("epochs = 1\nlr", "epochs = -1\nlr")
        .replace("kind = \"train\"\n", "kind = \"train\"\nmomentun = 0.9\n")
        .replace("target_macs = 0.5", "target_macs = 0")
        .replace("kind = \"eval\"", "kind = \"eval\"\nfrom = \"nowhere\"");
    let err = refused(&dir, "many", &text, &[]);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(lines.len(), 4, "{err}");
    for (marker, message) in [
        ("-1", "`epochs`: invalid value '-1'"),
        ("momentun", "did you mean `momentum`?"),
        ("= 0\n", "must be in (0, 1]"),
        ("\"nowhere\"", "names no earlier stage"),
    ] {
        let at = text.find(marker).unwrap() + if marker.starts_with("= ") { 2 } else { 0 };
        let at = format!(":{}: ", position_at(&text, at));
        assert!(
            lines.iter().any(|l| l.contains(&at) && l.contains(message)),
            "expected `{message}` at {at} in:\n{err}"
        );
    }
    // In file order.
    let order: Vec<usize> = lines
        .iter()
        .map(|l| {
            let rest = l.split(".toml:").nth(1).unwrap();
            rest.split(':').next().unwrap().parse().unwrap()
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{err}");
    assert!(err.contains("4 problem(s) in the recipe; nothing was run"));
}

#[test]
fn set_overrides_are_checked_like_the_file() {
    let dir = temp_dir("recipe-set");
    let err = refused(
        &dir,
        "set",
        BASE,
        &[
            "--set",
            "stage.prune.target_macs=2",
            "--set",
            "train.epoch=3",
            "--set",
            "stage.nope.lr=1",
            "--dry-run",
        ],
    );
    for want in [
        "error: --set stage.prune.target_macs=2: `target_macs`: invalid value '2'",
        "error: --set train.epoch=3: unknown key `epoch` in [train]; did you mean `epochs`?",
        "error: --set stage.nope.lr=1: no stage is named `nope`",
    ] {
        assert!(err.contains(want), "expected `{want}` in:\n{err}");
    }
}

/// A stand-in command with the given long flags (all taking a value) plus runner arguments.
fn command(name: &'static str, flags: &[&'static str]) -> Command {
    let mut c = Command::new(name).arg(Arg::new("checkpoint").required(false));
    for f in flags {
        c = c.arg(Arg::new(*f).long(*f).action(ArgAction::Set));
    }
    c
}

/// A registry of stand-ins with every effect.
fn stand_in_registry() -> Registry {
    let kind = |name: &'static str, flags: &[&'static str], effect: Option<Effect>| KindSpec {
        name,
        command: command(name, flags),
        input: if name == "train" {
            InputArg::Flag("init")
        } else {
            InputArg::Positional
        },
        output: match name {
            "train" => OutputArg::RunFolder {
                flag: "output",
                resume: "resume",
            },
            "eval" => OutputArg::None,
            _ => OutputArg::File("output"),
        },
        runner_sets: &["checkpoint", "init", "output", "resume"],
        unhashed: &[],
        inherits_train: name == "train" || name == "qat",
        finetune: name == "prune",
        reads_float_before_quantize: name == "qat",
        effects: match effect {
            Some(Effect::FloatTraining) => |_| vec![Effect::FloatTraining],
            Some(Effect::ChannelPruning) => |_| vec![Effect::ChannelPruning],
            Some(Effect::Quantize) => |_| vec![Effect::Quantize],
            Some(Effect::QuantAwareTraining) => |_| vec![Effect::QuantAwareTraining],
            None => |_| Vec::new(),
        },
        check: |_| Ok(()),
        run: |_| Ok(()),
    };
    Registry {
        kinds: vec![
            kind(
                "train",
                &["arch", "init", "output", "resume", "epochs", "data"],
                Some(Effect::FloatTraining),
            ),
            kind(
                "prune",
                &["output", "target_macs", "data"],
                Some(Effect::ChannelPruning),
            ),
            kind(
                "quantize",
                &["output", "calibration"],
                Some(Effect::Quantize),
            ),
            kind(
                "qat",
                &["output", "epochs"],
                Some(Effect::QuantAwareTraining),
            ),
            kind("eval", &["data"], None),
        ],
        pending: Vec::new(),
    }
}

/// A kind the registry knows of but this build lacks is named with the reason.
#[test]
fn a_pending_kind_is_refused_with_its_reason() {
    let mut registry = stand_in_registry();
    registry
        .pending
        .push(("sparsify", "there is no sparsify command yet"));
    let text = "[model]\narch = \"m\"\n\n[[stage]]\nname = \"s\"\nkind = \"sparsify\"\n";
    let doc = Document::parse(Path::new("pending.toml"), text).unwrap();
    let lines = validate(&doc, &registry).unwrap_err().lines();
    let want = format!(
        "pending.toml:{}: stage kind `sparsify` is not available in this build: there is no sparsify command yet",
        position(text, "\"sparsify\"")
    );
    assert!(lines.iter().any(|l| l.starts_with(&want)), "{lines:#?}");
}

#[test]
fn nothing_float_after_an_int8_quantize_but_qat() {
    let text = r#"[model]
arch = "m"

[[stage]]
name = "train"
kind = "train"

[[stage]]
name = "q"
kind = "quantize"

[[stage]]
name = "qat"
kind = "qat"

[[stage]]
name = "again"
kind = "train"

[[stage]]
name = "branch"
kind = "prune"
from = "train"

[[stage]]
name = "late"
kind = "prune"
from = "qat"

[[stage]]
name = "eval"
kind = "eval"
"#;
    let doc = Document::parse(Path::new("order.toml"), text).unwrap();
    let problems = validate(&doc, &stand_in_registry()).unwrap_err();
    let lines = problems.lines();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let kind_of = |stage: &str| {
        let at = text.find(&format!("name = \"{stage}\"")).unwrap();
        position_at(
            text,
            at + text[at..].find("kind = ").unwrap() + "kind = ".len(),
        )
    };
    assert!(
        lines[0].starts_with(&format!("order.toml:{}: impossible order: stage `again` trains in float after the int8 `quantize` stage `q`", kind_of("again"))),
        "{lines:#?}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "order.toml:{}: impossible order: stage `late` prunes channels",
            kind_of("late")
        )),
        "{lines:#?}"
    );
}

#[test]
fn a_teacher_is_an_earlier_stage_or_a_file() {
    let mut registry = stand_in_registry();
    // `distill` as it will plug in: the train command under another name, with --teacher.
    let mut distill = stand_in_registry().kinds.remove(0);
    distill.name = "distill";
    distill.command = distill
        .command
        .arg(Arg::new("teacher").long("teacher").action(ArgAction::Set));
    registry.kinds.push(distill);
    let dir = temp_dir("recipe-teacher");
    let file = dir.join("teacher.safetensors");
    std::fs::write(&file, b"weights").unwrap();
    let text = format!(
        r#"[model]
arch = "m"

[[stage]]
name = "big"
kind = "train"

[[stage]]
name = "small"
kind = "distill"
teacher = "big"

[[stage]]
name = "file"
kind = "distill"
teacher = "{}"

[[stage]]
name = "early"
kind = "distill"
teacher = "late"

[[stage]]
name = "late"
kind = "distill"
teacher = "nothing.safetensors"
"#,
        file.display()
    );
    let doc = Document::parse(Path::new("t.toml"), &text).unwrap();
    let lines = validate(&doc, &registry).unwrap_err().lines();
    assert_eq!(
        lines,
        vec![
            format!(
                "t.toml:{}: `teacher = \"late\"`: that stage does not run before this one",
                position(&text, "\"late\"")
            ),
            format!(
                "t.toml:{}: `teacher = \"nothing.safetensors\"` is neither an earlier stage nor an existing file",
                position(&text, "\"nothing")
            ),
        ]
    );
    // Without the two bad stages the plan gets the checkpoint of `big` and the file.
    let good = text.split("[[stage]]\nname = \"early\"").next().unwrap();
    let doc = Document::parse(Path::new("t.toml"), good).unwrap();
    let plan = validate(&doc, &registry).unwrap();
    use slimcandle::pipeline::plan::{Input, Piece};
    assert!(plan.stages[1].args.contains(&Piece::Checkpoint {
        flag: "teacher".into(),
        input: Input::Stage(0)
    }));
    assert!(plan.stages[2].args.contains(&Piece::File {
        flag: "teacher".into(),
        path: file.clone()
    }));
}

#[test]
fn a_qat_stage_after_quantize_reads_the_float_model_quantize_read() {
    let text = r#"[model]
arch = "m"

[[stage]]
name = "train"
kind = "train"

[[stage]]
name = "q"
kind = "quantize"

[[stage]]
name = "qat"
kind = "qat"

[[stage]]
name = "eval"
kind = "eval"
"#;
    let doc = Document::parse(Path::new("qat.toml"), text).unwrap();
    let plan = validate(&doc, &stand_in_registry()).unwrap();
    use slimcandle::pipeline::plan::Input;
    let inputs: Vec<Option<Input>> = plan.stages.iter().map(|s| s.input).collect();
    // quantize reads train; qat reads train too (the float model), eval reads qat's int8.
    assert_eq!(
        inputs,
        vec![
            None,
            Some(Input::Stage(0)),
            Some(Input::Stage(0)),
            Some(Input::Stage(2))
        ]
    );
}
