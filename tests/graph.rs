//! Static facts of the graphs: parameter and MAC counts, JSON round trips, shape errors.

mod common;

use slimcandle::graph::Graph;
use slimcandle::models::{ArchOptions, ArchSpec, Stem, catalog};

/// (name, params at 1000 classes, MACs at 224x224, params at 10 classes), as torchvision
/// 0.29 and the fixture layouts give them (`../shared/fixtures/reference.json`).
const REFERENCE: [(&str, usize, u64, usize); 9] = [
    ("mobilenet_v1", 4_231_976, 568_740_352, 3_217_226),
    ("mobilenet_v2", 3_504_872, 300_774_272, 2_236_682),
    ("mobilenet_v3_large", 5_483_032, 216_589_760, 4_214_842),
    ("mobilenet_v3_small", 2_542_856, 56_510_400, 1_528_106),
    ("shufflenet_v1_g3", 1_864_728, 137_460_672, 914_328),
    ("shufflenet_v2_x0_5", 1_366_792, 40_476_448, 352_042),
    ("shufflenet_v2_x1_0", 2_278_604, 144_907_992, 1_263_854),
    ("squeezenet1_0", 1_248_424, 818_924_576, 740_554),
    ("squeezenet1_1", 1_235_496, 349_151_936, 727_626),
];

/// Other widths, scales and groups, measured in PyTorch by `scripts/make_reference_fixtures.py`
/// (torchvision for MobileNet V2/V3 and ShuffleNet V2, the fixture layouts for the others).
const REFERENCE_OTHER_VARIANTS: [(&str, usize, u64, usize); 17] = [
    ("mobilenet_v1_w0_25", 470_072, 41_030_272, 215_642),
    ("mobilenet_v1_w0_5", 1_331_592, 149_497_088, 823_722),
    ("mobilenet_v2_w0_35", 1_677_128, 59_285_808, 408_938),
    ("mobilenet_v2_w0_5", 1_968_680, 97_131_840, 700_490),
    ("mobilenet_v2_w1_4", 6_108_776, 582_195_824, 4_333_706),
    ("mobilenet_v3_large_w0_5", 1_734_576, 64_962_192, 1_099_986),
    ("mobilenet_v3_small_w0_75", 1_653_920, 39_115_576, 892_610),
    ("shufflenet_v1_g1", 1_530_936, 143_078_976, 960_696),
    ("shufflenet_v1_g2", 1_732_848, 140_836_512, 940_848),
    ("shufflenet_v1_g3_w0_5", 717_324, 37_589_856, 242_124),
    ("shufflenet_v1_g3_w1_5", 3_441_168, 292_443_552, 2_015_568),
    ("shufflenet_v1_g3_w2_0", 5_449_776, 524_045_184, 3_548_976),
    ("shufflenet_v1_g4", 1_967_344, 134_339_776, 890_224),
    ("shufflenet_v1_g8", 2_433_768, 138_365_952, 913_128),
    ("shufflenet_v1_g8_w0_5", 1_010_448, 40_469_760, 250_128),
    ("shufflenet_v2_x1_5", 3_503_624, 295_759_392, 2_488_874),
    ("shufflenet_v2_x2_0", 7_393_996, 583_253_464, 5_365_486),
];

fn build(name: &str, classes: usize) -> Graph {
    let (arch, opts) = common::arch_of(name);
    let opts = ArchOptions {
        num_classes: Some(classes),
        ..opts
    };
    ArchSpec::parse(&arch, &opts).unwrap().build().unwrap()
}

#[test]
fn params_and_macs_match_references() {
    for (name, params, macs, params10) in REFERENCE.iter().chain(&REFERENCE_OTHER_VARIANTS).copied()
    {
        let g = build(name, 1000);
        let s = g.summary(224, 224).unwrap();
        assert_eq!((s.params, s.macs), (params, macs), "{name}");
        assert_eq!(g.param_count(), params, "{name}");
        assert_eq!(
            build(name, 10).param_count(),
            params10,
            "{name} at 10 classes"
        );
    }
}

#[test]
fn params_and_macs_match_shared_reference_json() {
    let Some(dir) = common::shared_dir("fixtures") else {
        return;
    };
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (name, entry) in json.as_object().unwrap() {
        let s = build(name, 1000).summary(224, 224).unwrap();
        assert_eq!(
            s.params as u64,
            entry["params_1000_classes"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            s.macs,
            entry["macs_224_1000_classes"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            build(name, 10).param_count() as u64,
            entry["params_10_classes"].as_u64().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn json_round_trip_is_lossless_for_every_variant_and_stem() {
    for entry in catalog() {
        for stem in [Stem::Imagenet, Stem::Cifar] {
            let spec = ArchSpec {
                stem,
                ..entry.spec.clone()
            };
            let g = spec.build().unwrap();
            let back = Graph::from_json(&g.to_json()).unwrap();
            assert_eq!(g, back, "{}", spec.variant_name());
            assert_eq!(back.to_json(), g.to_json());
        }
    }
}

#[test]
fn cifar_stem_keeps_resolution_and_parameter_shapes() {
    for entry in catalog() {
        let imagenet = entry.spec.build().unwrap();
        let cifar = ArchSpec {
            stem: Stem::Cifar,
            ..entry.spec.clone()
        }
        .build()
        .unwrap();
        let shapes = |g: &Graph| {
            g.param_specs()
                .into_iter()
                .map(|s| (s.name, s.shape))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            shapes(&imagenet),
            shapes(&cifar),
            "{}",
            entry.spec.variant_name()
        );
        // Height of the last feature map before global pooling, for a 32x32 input.
        let final_map = |g: &Graph| {
            let pool = g
                .nodes
                .iter()
                .rposition(|n| n.op.kind() == "global_avg_pool")
                .unwrap();
            g.infer_shapes(32, 32)
                .ok()
                .map(|d| d[g.nodes[pool].inputs[0]].h)
        };
        let cifar_h = final_map(&cifar).unwrap();
        assert!(
            cifar_h >= 2,
            "{}: {cifar_h} before pooling",
            entry.spec.variant_name()
        );
        if let Some(h) = final_map(&imagenet) {
            assert!(h < cifar_h, "{}", entry.spec.variant_name());
        }
    }
}

#[test]
fn corrupt_graph_descriptions_are_refused() {
    let g = build("mobilenet_v2", 10);
    let mut bad = g.clone();
    bad.nodes[3].inputs = vec![7];
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("does not come before")
    );
    let mut bad = g.clone();
    bad.nodes[5].name = bad.nodes[4].name.clone();
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("used twice")
    );
    let json = g.to_json().replace("\"groups\":1", "\"groups\":5");
    assert!(Graph::from_json(&json).is_err());
    assert!(
        Graph::from_json("{\"nodes\": 3}")
            .unwrap_err()
            .to_string()
            .contains("not valid")
    );
}

#[test]
fn too_small_inputs_name_the_layer() {
    let g = build("squeezenet1_0", 10);
    let err = g.infer_shapes(8, 8).unwrap_err().to_string();
    assert!(err.contains("too small"), "{err}");
}

#[test]
fn architecture_names_and_options() {
    let parse = |a: &str, o: ArchOptions| ArchSpec::parse(a, &o);
    let v2 = parse("shufflenet_v2_x1_5", ArchOptions::default()).unwrap();
    assert_eq!(v2.width, 1.5);
    let v1 = parse(
        "shufflenet_v1",
        ArchOptions {
            groups: Some(8),
            width: Some(0.5),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((v1.groups, v1.width), (8, 0.5));
    assert_eq!(v1.variant_name(), "shufflenet_v1_g8_x0_5");
    let err = parse("mobilenet_v9", ArchOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("did you mean"), "{err}");
    let err = parse(
        "shufflenet_v1",
        ArchOptions {
            groups: Some(2),
            width: Some(0.5),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("do not divide"), "{err}");
    assert!(
        parse(
            "shufflenet_v1",
            ArchOptions {
                groups: Some(5),
                ..Default::default()
            }
        )
        .is_err()
    );
    assert!(
        parse(
            "shufflenet_v2",
            ArchOptions {
                width: Some(0.75),
                ..Default::default()
            }
        )
        .is_err()
    );
    assert!(
        parse(
            "squeezenet1_1",
            ArchOptions {
                width: Some(0.5),
                ..Default::default()
            }
        )
        .is_err()
    );
    assert!(
        parse(
            "mobilenet_v2",
            ArchOptions {
                groups: Some(2),
                ..Default::default()
            }
        )
        .is_err()
    );
}
