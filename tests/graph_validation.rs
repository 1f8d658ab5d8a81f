//! Untrusted graphs and tensor files are refused, with the node or tensor and the file named,
//! before anything is allocated from their sizes (issue #16); and the graph example in
//! `docs/checkpoint-format.md` is what the reader reads.

mod common;

use slimcandle::checkpoint;
use slimcandle::graph::{Graph, MAX_CHANNELS, Op};
use slimcandle::models::{ArchOptions, ArchSpec, catalog};
use slimcandle::tensor_file::{MAX_HEADER_BYTES, RawTensor, TensorFile, write_atomic};
use std::collections::HashMap;
use std::path::Path;

fn mobilenet_v2() -> Graph {
    ArchSpec::parse("mobilenet_v2", &ArchOptions::default())
        .unwrap()
        .build()
        .unwrap()
}

fn refused(g: &Graph) -> String {
    g.validate()
        .expect_err("graph should be refused")
        .to_string()
}

/// The error for `g` after `edit` changes node `id`, which it must name.
fn refused_at(id: usize, edit: impl FnOnce(&mut Op)) -> String {
    let mut g = mobilenet_v2();
    edit(&mut g.nodes[id].op);
    let err = refused(&g);
    assert!(err.contains(&g.nodes[id].name), "{err}");
    err
}

fn first(g: &Graph, kind: &str) -> usize {
    g.nodes.iter().position(|n| n.op.kind() == kind).unwrap()
}

/// The first ```json block after `heading` in a markdown file.
fn json_block(doc: &str, heading: &str) -> String {
    let section = &doc[doc.find(heading).expect("heading present")..];
    let start = section.find("```json\n").expect("json block") + "```json\n".len();
    let end = start + section[start..].find("```").expect("closed block");
    section[start..end].to_string()
}

#[test]
fn doc_graph_example_reads() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/checkpoint-format.md"),
    )
    .unwrap();
    let text = json_block(&doc, "## The graph");
    let g = Graph::from_json(&text).expect("the documented graph reads");
    assert_eq!(g.nodes.len(), 7);
    assert_eq!(g.output, 6);
    assert_eq!(
        g.nodes[1].op,
        Op::Conv2d {
            in_channels: 3,
            out_channels: 32,
            kernel: 3,
            stride: 2,
            padding: 1,
            dilation: 1,
            groups: 1,
            bias: false
        }
    );
    assert_eq!(g.nodes[2].inputs, vec![1]);
    assert_eq!(g.channel_counts().unwrap()[6], 10);
    // What a writer stores is the documented form, field for field.
    let written: serde_json::Value = serde_json::from_str(&g.to_json()).unwrap();
    let documented: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(written, documented);
}

#[test]
fn every_catalog_graph_passes_the_bounds() {
    for entry in catalog() {
        let g = entry.spec.build().unwrap();
        g.validate()
            .unwrap_or_else(|e| panic!("{}: {e}", entry.spec.variant_name()));
        let json = g.to_json();
        assert_eq!(Graph::from_json(&json).unwrap(), g);
    }
}

#[test]
fn bad_edges_are_refused_with_the_node_named() {
    let mut g = mobilenet_v2();
    g.nodes[3].inputs = vec![99_999];
    let err = refused(&g);
    assert!(
        err.contains(&g.nodes[3].name) && err.contains("99999") && err.contains("does not exist"),
        "{err}"
    );

    let mut g = mobilenet_v2();
    g.nodes[3].inputs = vec![7];
    let err = refused(&g);
    assert!(
        err.contains(&g.nodes[3].name) && err.contains("does not come before"),
        "{err}"
    );

    // A cycle: 4 reads 5 and 5 reads 4.
    let mut g = mobilenet_v2();
    g.nodes[4].inputs = vec![5];
    g.nodes[5].inputs = vec![4];
    let err = refused(&g);
    assert!(
        err.contains(&g.nodes[4].name) && err.contains("cycle"),
        "{err}"
    );

    let mut g = mobilenet_v2();
    g.output = g.nodes.len();
    assert!(refused(&g).contains("does not exist"));
}

#[test]
fn bad_channels_groups_and_windows_are_refused_with_the_node_named() {
    let g = mobilenet_v2();
    let conv = first(&g, "conv2d");
    let dw = first(&g, "conv2d_dw");
    let bn = first(&g, "batch_norm");
    let linear = first(&g, "linear");
    let dropout = first(&g, "dropout");
    let set_conv = |f: fn(&mut usize, &mut usize, &mut usize, &mut usize, &mut usize)| {
        move |op: &mut Op| {
            if let Op::Conv2d {
                in_channels,
                kernel,
                stride,
                padding,
                groups,
                ..
            } = op
            {
                f(in_channels, kernel, stride, padding, groups)
            }
        }
    };
    let err = refused_at(conv, set_conv(|c, _, _, _, _| *c += 1));
    assert!(err.contains("expects 4 input channels, gets 3"), "{err}");
    let err = refused_at(dw, set_conv(|_, _, _, _, g| *g = 7));
    assert!(err.contains("do not divide into 7 groups"), "{err}");
    let err = refused_at(dw, set_conv(|_, _, _, _, g| *g = 0));
    assert!(err.contains("0 groups"), "{err}");
    let err = refused_at(conv, set_conv(|_, k, _, _, _| *k = 0));
    assert!(err.contains("kernel is 0"), "{err}");
    let err = refused_at(conv, set_conv(|_, _, s, _, _| *s = 0));
    assert!(err.contains("stride is 0"), "{err}");
    let err = refused_at(conv, set_conv(|_, k, _, _, _| *k = usize::MAX));
    assert!(err.contains("kernel is 18446744073709551615"), "{err}");
    let err = refused_at(conv, set_conv(|_, _, _, p, _| *p = 1 << 40));
    assert!(err.contains("padding is 1099511627776"), "{err}");
    let err = refused_at(0, |op| *op = Op::Input { channels: 1 << 40 });
    assert!(
        err.contains(&format!("must be 1 to {MAX_CHANNELS}")),
        "{err}"
    );
    let err = refused_at(bn, |op| {
        if let Op::BatchNorm { eps, .. } = op {
            *eps = f64::NAN
        }
    });
    assert!(err.contains("eps is NaN"), "{err}");
    let err = refused_at(linear, |op| {
        if let Op::Linear { in_features, .. } = op {
            *in_features = 3
        }
    });
    assert!(err.contains("expects 3 features, gets 1280"), "{err}");
    let err = refused_at(dropout, |op| *op = Op::Dropout { p: 1.0 });
    assert!(err.contains("p is 1"), "{err}");
}

#[test]
fn parameter_sizes_that_overflow_are_refused() {
    // Every field is within its bound, but out x in x k x k is 2^64.
    let json = format!(
        r#"{{"nodes": [
            {{"name": "input", "op": {{"op": "input", "channels": {MAX_CHANNELS}}}}},
            {{"name": "huge", "op": {{"op": "conv2d", "in_channels": {MAX_CHANNELS},
              "out_channels": {MAX_CHANNELS}, "kernel": 4096, "stride": 1, "padding": 0,
              "dilation": 1, "groups": 1, "bias": false}}, "inputs": [0]}}],
            "output": 1}}"#
    );
    let err = Graph::from_json(&json).unwrap_err().to_string();
    assert!(err.contains("`huge`") && err.contains("overflow"), "{err}");
}

/// A safetensors file from its JSON header and data bytes.
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

#[test]
fn a_16_byte_file_claiming_10_to_the_12_elements_fails_before_allocating() {
    let dir = common::temp_dir("graph-validation-huge-tensor");
    let path = dir.join("huge.safetensors");
    let header = r#"{"w":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,16]}}"#;
    std::fs::write(&path, safetensors_bytes(header, &[0u8; 16])).unwrap();
    for err in [
        TensorFile::read(&path).err().unwrap().to_string(),
        checkpoint::load(&path).err().unwrap().to_string(),
    ] {
        assert!(
            err.contains("huge.safetensors")
                && err.contains("tensor `w` claims shape [1000000, 1000000], 4000000000000 bytes"),
            "{err}"
        );
    }
    // A header length far beyond the file.
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b' '; 8]);
    std::fs::write(&path, bytes).unwrap();
    let err = TensorFile::read(&path).err().unwrap().to_string();
    assert!(err.contains("huge.safetensors"), "{err}");
}

#[test]
fn a_header_over_the_limit_is_refused() {
    let dir = common::temp_dir("graph-validation-big-header");
    let path = dir.join("big.safetensors");
    let filler = "x".repeat(MAX_HEADER_BYTES);
    let header = format!(r#"{{"__metadata__":{{"note":"{filler}"}}}}"#);
    std::fs::write(&path, safetensors_bytes(&header, &[])).unwrap();
    let err = TensorFile::read(&path).err().unwrap().to_string();
    assert!(
        err.contains("big.safetensors") && err.contains("more than the 16777216"),
        "{err}"
    );
}

#[test]
fn a_graph_whose_parameters_cannot_fit_in_the_file_is_refused() {
    let dir = common::temp_dir("graph-validation-params-fit");
    let path = dir.join("claims.safetensors");
    // A 2^20 x 2^20 linear layer (2^40 elements) in a file of a few hundred bytes.
    let graph = format!(
        r#"{{"nodes": [
            {{"name": "input", "op": {{"op": "input", "channels": {MAX_CHANNELS}}}}},
            {{"name": "flatten#1", "op": {{"op": "flatten"}}, "inputs": [0]}},
            {{"name": "classifier", "op": {{"op": "linear", "in_features": {MAX_CHANNELS},
              "out_features": 2, "bias": false}}, "inputs": [1]}}],
            "output": 2}}"#
    );
    let metadata: HashMap<String, String> = [
        ("format", "slimcandle"),
        ("format_version", "1"),
        ("graph", graph.as_str()),
        ("class_names", r#"["a","b"]"#),
        (
            "preprocessing",
            r#"{"input_size":[1,1],"mean":[0,0,0],"std":[1,1,1]}"#,
        ),
        (
            "provenance",
            r#"{"tool":"t","command":"c","created":"now","source":"s","history":[]}"#,
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let tensors = vec![(
        "classifier.weight".to_string(),
        RawTensor {
            dtype: safetensors::Dtype::F32,
            shape: vec![2],
            data: vec![0; 8],
        },
    )];
    write_atomic(&path, tensors, metadata).unwrap();
    let err = checkpoint::load(&path).err().unwrap().to_string();
    assert!(
        err.contains("claims.safetensors")
            && err.contains("`classifier`")
            && err.contains("more than the file's"),
        "{err}"
    );
}

#[test]
fn devices_are_not_read_as_tensor_files() {
    let err = TensorFile::read(Path::new("/dev/zero"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("/dev/zero") && err.contains("not a regular file"),
        "{err}"
    );
}
