//! Structured channel pruning end to end: criteria pick the right channels, plans honour the
//! scope, rules, rounding and targets, and the pruned model's cost is what the plan says.

mod common;

use candle_core::{Device, Tensor};
use slimcandle::checkpoint;
use slimcandle::data::{DataSpec, LoadOptions};
use slimcandle::exec::Mode;
use slimcandle::model::Model;
use slimcandle::models::{ArchOptions, ArchSpec, Stem};
use slimcandle::prune::importance::{Criterion, TaylorData, unit_scores};
use slimcandle::prune::pattern::NamePattern;
use slimcandle::prune::plan::{PlanConfig, Scope, Target};
use slimcandle::prune::{ChannelPruneConfig, analyze, prune_channels};

fn cifar_model(arch: &str, width: Option<f64>, groups: Option<usize>) -> Model {
    let spec = ArchSpec::parse(
        arch,
        &ArchOptions {
            width,
            groups,
            num_classes: Some(10),
            stem: Some(Stem::Cifar),
        },
    )
    .unwrap();
    Model::init(&spec, 3).unwrap()
}

fn config(criterion: Criterion, scope: Scope, target: Target) -> ChannelPruneConfig {
    ChannelPruneConfig {
        criterion,
        plan: PlanConfig {
            scope,
            target,
            ..Default::default()
        },
        seed: 0,
    }
}

fn input() -> Tensor {
    Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap()
}

/// The plan's exact cost equals the pruned graph's own summary, and the pruned model runs,
/// saves and reloads with identical logits, for every family.
#[test]
fn every_family_prunes_to_the_planned_cost_and_round_trips() {
    let cases: [(&str, Option<f64>, Option<usize>); 6] = [
        ("mobilenet_v2", Some(0.5), None),
        ("mobilenet_v3_small", Some(0.5), None),
        ("mobilenet_v1", Some(0.25), None),
        ("shufflenet_v2", Some(0.5), None),
        ("shufflenet_v1", Some(0.5), Some(3)),
        ("squeezenet1_1", None, None),
    ];
    let dir = common::temp_dir("prune-channels");
    for (arch, width, groups) in cases {
        let model = cifar_model(arch, width, groups);
        for scope in [Scope::Uniform, Scope::Global] {
            let cfg = config(Criterion::L1, scope, Target::ChannelRatio(0.4));
            let (pruned, plan) = prune_channels(&model, &cfg, None).unwrap();
            let summary = pruned.graph.summary(32, 32).unwrap();
            let original = model.graph.summary(32, 32).unwrap();
            assert_eq!(plan.before.params, original.params, "{arch}");
            assert_eq!(plan.before.macs, original.macs, "{arch}");
            assert_eq!(plan.after.params, summary.params, "{arch} {scope:?}");
            assert_eq!(plan.after.macs, summary.macs, "{arch} {scope:?}");
            assert!(
                summary.macs < original.macs,
                "{arch} {scope:?}: nothing was pruned"
            );
            let x = input();
            let logits = pruned.forward(&x, Mode::Eval).unwrap();
            let path = dir.join(format!("{arch}.safetensors"));
            checkpoint::save(&pruned, &path).unwrap();
            let reloaded = checkpoint::load(&path).unwrap();
            assert_eq!(reloaded.graph, pruned.graph);
            let again = reloaded.forward(&x, Mode::Eval).unwrap();
            let diff = (logits - again)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{arch}");
            println!(
                "{arch} {scope:?}: params {} -> {}, MACs {} -> {}",
                original.params, summary.params, original.macs, summary.macs
            );
        }
    }
}

/// Kept channel counts of every pruned layer group are multiples of 8 (when the group was
/// wider than 8), and a MACs target is reached without overshooting by much.
#[test]
fn targets_are_reached_with_rounded_widths() {
    let model = cifar_model("mobilenet_v2", None, None);
    for scope in [Scope::Uniform, Scope::Global] {
        let cfg = config(Criterion::L1, scope, Target::Macs(0.5));
        let (_, plan) = prune_channels(&model, &cfg, None).unwrap();
        let kept = plan.after.macs as f64 / plan.before.macs as f64;
        assert!(kept <= 0.5 && kept > 0.45, "{scope:?}: kept {kept}");
        for g in &plan.groups {
            if g.kept < g.width {
                assert_eq!(g.kept % 8, 0, "{scope:?}: {:?}", g.layers);
            }
        }
        let cfg = config(Criterion::L2, scope, Target::Params(0.6));
        let (_, plan) = prune_channels(&model, &cfg, None).unwrap();
        let kept = plan.after.params as f64 / plan.before.params as f64;
        assert!(kept <= 0.6 && kept > 0.5, "{scope:?}: params kept {kept}");
    }
    let cfg = config(Criterion::L1, Scope::Uniform, Target::Macs(0.01));
    let err = prune_channels(&model, &cfg, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("cannot reach 1.0% of the MACs"), "{err}");
}

/// Exclusions keep whole layer groups, overrides fix their ratio, and a pattern that matches
/// nothing is an error naming it.
#[test]
fn exclusions_and_overrides_apply_per_layer_group() {
    let model = cifar_model("mobilenet_v2", None, None);
    let mut cfg = config(Criterion::L1, Scope::Uniform, Target::ChannelRatio(0.5));
    cfg.plan.exclude = vec![NamePattern::parse("features.2.*").unwrap()];
    cfg.plan.overrides = vec![(NamePattern::parse("features.3.conv.0.0").unwrap(), 0.25)];
    let (_, plan) = prune_channels(&model, &cfg, None).unwrap();
    let find = |layer: &str| {
        plan.groups
            .iter()
            .find(|g| g.layers.iter().any(|l| l == layer))
            .unwrap()
    };
    let excluded = find("features.2.conv.0.0");
    assert_eq!(excluded.kept, excluded.width);
    assert_eq!(excluded.rule.as_deref(), Some("excluded"));
    let overridden = find("features.3.conv.0.0");
    assert_eq!(overridden.width, 144);
    assert_eq!(overridden.kept, 112, "144 * 0.75 = 108, rounded to 112");
    let plain = find("features.4.conv.0.0");
    assert_eq!(plain.kept, plain.width / 2);
    cfg.plan.exclude = vec![NamePattern::parse("nothing.*").unwrap()];
    let err = prune_channels(&model, &cfg, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("`nothing.*` matches no conv or linear layer"),
        "{err}"
    );
}

/// Each criterion ranks a filter that was made negligible last in its layer group, so the
/// pass removes it.
#[test]
fn criteria_rank_negligible_channels_lowest() {
    let mut model = cifar_model("mobilenet_v2", Some(0.5), None);
    let groups = analyze(&model.graph).unwrap();
    // Unit whose filters include expand conv features.5.conv.0.0 channel 7.
    let layer = model.graph.node_by_name("features.5.conv.0.0").unwrap();
    let target = groups
        .units
        .iter()
        .position(|u| u.filters().any(|m| m.node == layer && m.channel == 7))
        .unwrap();
    let unit = groups.units[target].clone();
    for m in &unit.members {
        let name = &model.graph.nodes[m.node].name;
        let suffixes: &[&str] = match m.role {
            slimcandle::prune::Role::Filter | slimcandle::prune::Role::Depthwise => &["weight"],
            slimcandle::prune::Role::Norm => &["weight"],
            slimcandle::prune::Role::Column => &[],
        };
        for s in suffixes {
            let key = format!("{name}.{s}");
            let t = model.weights.get(&key).unwrap();
            let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let per = v.len() / t.dims()[0];
            v[m.channel * per..(m.channel + 1) * per]
                .iter_mut()
                .for_each(|x| *x *= 1e-3);
            let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
            model.weights.insert(&key, &t).unwrap();
        }
    }
    let data = DataSpec::Shapes
        .load(&LoadOptions {
            size: 32,
            train_limit: Some(64),
            test_limit: Some(10),
            ..Default::default()
        })
        .unwrap();
    let taylor = TaylorData {
        images: data.train.clone(),
        batch_size: 16,
        batches: 2,
    };
    for criterion in [
        Criterion::L1,
        Criterion::L2,
        Criterion::BnScale,
        Criterion::Taylor,
    ] {
        let scores = unit_scores(&model, &groups.units, criterion, Some(&taylor), 0).unwrap();
        let key = unit.nodes();
        let lowest = (0..groups.units.len())
            .filter(|&u| groups.units[u].nodes() == key)
            .min_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap();
        assert_eq!(lowest, target, "{criterion:?}");
        assert!(scores.iter().all(|s| s.is_finite() && *s >= 0.0));
    }
    let random = unit_scores(&model, &groups.units, Criterion::Random, None, 1).unwrap();
    let again = unit_scores(&model, &groups.units, Criterion::Random, None, 1).unwrap();
    assert_eq!(random, again, "random scores are seeded");
    let err = unit_scores(&model, &groups.units, Criterion::Taylor, None, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs data"), "{err}");
}

/// Networks without batch norm get a clear error from the bn-scale criterion.
#[test]
fn bn_scale_needs_batch_norm() {
    let model = cifar_model("squeezenet1_1", None, None);
    let cfg = config(
        Criterion::BnScale,
        Scope::Uniform,
        Target::ChannelRatio(0.3),
    );
    let err = prune_channels(&model, &cfg, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no batch norm there"), "{err}");
}

/// Residual streams (channels joined by an add) are spared unless asked for, found from the
/// graph: on MobileNet V2 they are the groups of the block projections.
#[test]
fn residual_streams_are_spared_by_default() {
    let model = cifar_model("mobilenet_v2", None, None);
    let mut cfg = config(Criterion::L1, Scope::Uniform, Target::ChannelRatio(0.5));
    let (_, plan) = prune_channels(&model, &cfg, None).unwrap();
    let streams: Vec<_> = plan
        .groups
        .iter()
        .filter(|g| g.rule.as_deref() == Some("residual stream"))
        .collect();
    // 24, 32, 64, 96 and 160 channel streams.
    assert_eq!(streams.len(), 5, "{streams:?}");
    assert!(streams.iter().all(|g| g.kept == g.width));
    assert!(streams.iter().all(|g| g.layers.len() >= 2));
    cfg.plan.prune_residual = true;
    let (_, plan) = prune_channels(&model, &cfg, None).unwrap();
    let stream = plan
        .groups
        .iter()
        .find(|g| g.layers.contains(&"features.14.conv.2".to_string()))
        .unwrap();
    assert_eq!((stream.width, stream.kept), (160, 80));
}

/// A ratio of 0 keeps a group whole even when its width is not a multiple of the rounding,
/// and rounding never takes a group past --max-ratio.
#[test]
fn rounding_respects_zero_ratios_and_the_max_ratio() {
    let model = cifar_model("shufflenet_v2", None, None);
    let mut cfg = config(Criterion::L1, Scope::Uniform, Target::ChannelRatio(0.0));
    let (_, plan) = prune_channels(&model, &cfg, None).unwrap();
    assert_eq!(plan.after, plan.before, "ratio 0 removes nothing");
    cfg.plan.target = Target::ChannelRatio(0.5);
    cfg.plan.overrides = vec![(NamePattern::parse("stage2.*").unwrap(), 0.0)];
    let (_, plan) = prune_channels(&model, &cfg, None).unwrap();
    for g in plan
        .groups
        .iter()
        .filter(|g| g.layers[0].starts_with("stage2."))
    {
        assert_eq!(g.kept, g.width, "{:?}", g.layers);
    }
    let model = cifar_model("mobilenet_v2", None, None);
    let mut cfg = config(Criterion::L1, Scope::Global, Target::Macs(0.45));
    cfg.plan.max_ratio = 0.6;
    let (_, plan) = prune_channels(&model, &cfg, None).unwrap();
    for g in &plan.groups {
        let removed = (g.width - g.kept) as f64 / g.width as f64;
        assert!(removed <= 0.6 + 1e-9, "{:?}: {removed}", g.layers);
    }
}

/// bn-scale ranks what has a batch norm and leaves the rest (MobileNet V3's
/// squeeze-and-excitation hidden units) whole; an override prunes a residual stream.
#[test]
fn bn_scale_skips_layers_without_batch_norm_and_overrides_reach_residuals() {
    let model = cifar_model("mobilenet_v3_small", None, None);
    let cfg = config(
        Criterion::BnScale,
        Scope::Uniform,
        Target::ChannelRatio(0.5),
    );
    let (pruned, plan) = prune_channels(&model, &cfg, None).unwrap();
    assert!(
        plan.groups
            .iter()
            .any(|g| g.rule.as_deref() == Some("no score"))
    );
    assert!(plan.after.macs < plan.before.macs);
    pruned.forward(&input(), Mode::Eval).unwrap();
    let mnv2 = cifar_model("mobilenet_v2", None, None);
    let mut cfg = config(Criterion::L1, Scope::Uniform, Target::ChannelRatio(0.5));
    cfg.plan.overrides = vec![(NamePattern::parse("features.14.conv.2").unwrap(), 0.25)];
    let (_, plan) = prune_channels(&mnv2, &cfg, None).unwrap();
    let stream = plan
        .groups
        .iter()
        .find(|g| g.layers.contains(&"features.14.conv.2".to_string()))
        .unwrap();
    assert_eq!((stream.width, stream.kept), (160, 120));
}
