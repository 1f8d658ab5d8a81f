//! The integer engine (`slimcandle::int8`) against an independent reference: a plain NCHW
//! interpreter of the int8 conventions written here, op by op, with the scheme's own
//! formulas (`passes::quant::scheme`). Hand-built graphs cover every op kind (dense, grouped,
//! depthwise and 1x1 convs, linear, residual add, concat with and
//! without requantization, slice, channel shuffle, squeeze-and-excitation, max / average /
//! global pooling, lookup-table activations) at every instruction-set level, odd sizes and
//! batches that split into chunks.

// The reference indexes like the formulas it transcribes.
#![allow(clippy::needless_range_loop)]

mod common;

use slimcandle::graph::{Activation, Graph, GraphBuilder, Op};
use slimcandle::int8::Engine;
use slimcandle::kernels::int8::Level;
use slimcandle::model::{ModelMeta, Preprocessing, Provenance, default_class_names};
use slimcandle::passes::quant::scheme::{self, QParams, QuantizedWeight};
use slimcandle::passes::quant::{
    Calibrator, Granularity, QuantizedLayer, QuantizedModel, SchemeInfo, fused_activations,
};
use slimcandle::rng::Rng;
use std::collections::BTreeMap;

/// A quantized model of `graph` with random int8 weights and qparams that follow the
/// conventions (pass-through ops keep their input's, a fused activation has its producer's,
/// a concat shares its first input's, so that its other inputs are requantized).
fn random_quantized(graph: Graph, seed: u64) -> QuantizedModel {
    let mut rng = Rng::new(seed);
    let fused = fused_activations(&graph);
    let mut act: Vec<Option<QParams>> = vec![None; graph.nodes.len()];
    let mut layers = BTreeMap::new();
    for (id, node) in graph.nodes.iter().enumerate() {
        let fresh = |rng: &mut Rng| {
            let lo = if fused[id].is_some() {
                0.0
            } else {
                -3.0 * rng.uniform() as f32
            };
            QParams::from_range(lo, 0.5 + 4.0 * rng.uniform() as f32)
        };
        let inp = |k: usize| act[node.inputs[k]].unwrap();
        let q = match &node.op {
            Op::Input { .. } => QParams::from_range(-2.1, 2.6),
            Op::MaxPool { .. } | Op::ChannelShuffle { .. } | Op::Slice { .. } | Op::Flatten => {
                inp(0)
            }
            Op::Dropout { .. } => inp(0),
            Op::Act { .. } if fused[node.inputs[0]].is_some() => inp(0),
            Op::Concat => inp(0),
            _ => fresh(&mut rng),
        };
        let in_scale = node.inputs.first().map_or(1.0, |&i| act[i].unwrap().scale);
        act[id] = Some(q);
        let (out, per) = match &node.op {
            Op::Conv2d {
                out_channels,
                in_channels,
                kernel,
                groups,
                ..
            } => (*out_channels, in_channels / groups * kernel * kernel),
            Op::Linear {
                in_features,
                out_features,
                ..
            } => (*out_features, *in_features),
            _ => continue,
        };
        let scales: Vec<f32> = (0..out)
            .map(|_| {
                let mult = 0.012 / (per as f32).sqrt() * (0.5 + rng.uniform() as f32);
                mult * q.scale / in_scale
            })
            .collect();
        let values: Vec<i8> = (0..out * per)
            .map(|_| ((rng.uniform() * 255.0) as i32 - 127) as i8)
            .collect();
        let shape = match &node.op {
            Op::Conv2d { kernel, .. } => vec![out, per / (kernel * kernel), *kernel, *kernel],
            _ => vec![out, per],
        };
        let bias = (0..out).map(|_| (rng.below(4001) as i32) - 2000).collect();
        let weight = QuantizedWeight {
            values,
            shape,
            scales,
        };
        layers.insert(node.name.clone(), QuantizedLayer { weight, bias });
    }
    QuantizedModel {
        activations: act,
        fused,
        layers,
        float_layers: BTreeMap::new(),
        meta: ModelMeta {
            arch: None,
            class_names: default_class_names(10),
            preprocessing: Preprocessing {
                input_size: [32, 32],
                mean: Preprocessing::IMAGENET_MEAN,
                std: Preprocessing::IMAGENET_STD,
            },
            provenance: Provenance::now("test"),
        },
        scheme: SchemeInfo {
            granularity: Granularity::PerChannel,
            calibrator: Calibrator::Minmax,
            calibration_images: 0,
            qat: None,
        },
        graph,
    }
}

/// One value of one sample: channels x height x width codes (NCHW).
#[derive(Clone)]
struct Val {
    c: usize,
    h: usize,
    w: usize,
    q: Vec<u8>,
}

impl Val {
    fn at(&self, c: usize, y: usize, x: usize) -> u8 {
        self.q[(c * self.h + y) * self.w + x]
    }
}

/// `round_half_even(v) + zp` clamped, the conventions' last step.
fn finish(v: f32, zp: u8, lo: u8, hi: u8) -> u8 {
    (v.round_ties_even() + zp as f32).clamp(lo as f32, hi as f32) as u8
}

/// The conventions, literally, on one sample (NCHW, i32 accumulators); returns the
/// dequantized output.
fn reference(qm: &QuantizedModel, x: &[f32], h: usize, w: usize) -> Vec<f32> {
    let g = &qm.graph;
    let dims = g.infer_shapes(h, w).unwrap();
    let mut vals: Vec<Option<Val>> = vec![None; g.nodes.len()];
    for (id, node) in g.nodes.iter().enumerate() {
        let d = dims[id];
        let (c, ho, wo) = (d.c, d.h, d.w);
        let yq = qm.activations[id].unwrap();
        let inq = |k: usize| qm.input_of(id, k).unwrap();
        let input = |k: usize| vals[node.inputs[k]].clone().unwrap();
        let mut out = Val {
            c,
            h: ho,
            w: wo,
            q: vec![0; c * ho * wo],
        };
        // A copy whose qparams change: `round(from.scale / to.scale * (q - from.zp)) + to.zp`.
        let copy_table = |k: usize| {
            let from = inq(k);
            let m = from.scale / yq.scale;
            let mut t = [0u8; 256];
            for (q, v) in t.iter_mut().enumerate() {
                *v = finish(
                    m * (q as i32 - from.zero_point as i32) as f32,
                    yq.zero_point,
                    0,
                    255,
                );
            }
            t
        };
        match &node.op {
            Op::Input { .. } => out.q = x.iter().map(|&v| yq.quantize(v)).collect(),
            Op::Conv2d {
                kernel,
                stride,
                padding,
                groups,
                ..
            } => {
                let xv = input(0);
                let layer = qm.layer(id).unwrap();
                let mult = qm.multipliers(id).unwrap();
                let (lo, hi) = qm.clamp_range(id).unwrap();
                let (cg, og) = (xv.c / groups, c / groups);
                let zp = inq(0).zero_point as i32;
                for o in 0..c {
                    let grp = o / og;
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let mut acc = 0i32;
                            for ci in 0..cg {
                                for ky in 0..*kernel {
                                    for kx in 0..*kernel {
                                        let iy = (oy * stride + ky) as isize - *padding as isize;
                                        let ix = (ox * stride + kx) as isize - *padding as isize;
                                        if iy < 0
                                            || ix < 0
                                            || iy as usize >= xv.h
                                            || ix as usize >= xv.w
                                        {
                                            continue;
                                        }
                                        let v =
                                            xv.at(grp * cg + ci, iy as usize, ix as usize) as i32;
                                        let wv = layer.weight.values
                                            [((o * cg + ci) * kernel + ky) * kernel + kx];
                                        acc += (v - zp) * wv as i32;
                                    }
                                }
                            }
                            out.q[(o * ho + oy) * wo + ox] = scheme::requantize(
                                acc + layer.bias[o],
                                mult[o],
                                yq.zero_point,
                                lo,
                                hi,
                            );
                        }
                    }
                }
            }
            Op::Linear { in_features, .. } => {
                let xv = input(0);
                let layer = qm.layer(id).unwrap();
                let mult = qm.multipliers(id).unwrap();
                let (lo, hi) = qm.clamp_range(id).unwrap();
                let zp = inq(0).zero_point as i32;
                for o in 0..c {
                    let acc: i32 = (0..*in_features)
                        .map(|i| {
                            (xv.q[i] as i32 - zp) * layer.weight.values[o * in_features + i] as i32
                        })
                        .sum();
                    out.q[o] =
                        scheme::requantize(acc + layer.bias[o], mult[o], yq.zero_point, lo, hi);
                }
            }
            Op::Act { .. } if qm.is_fused_away(id) => out = input(0),
            Op::Act { .. } => {
                let t = qm.lookup_table(id).unwrap();
                out.q = input(0).q.iter().map(|&v| t[v as usize]).collect();
            }
            Op::Flatten | Op::Dropout { .. } => out = input(0),
            Op::Add => {
                let (a, b, qa, qb) = (input(0), input(1), inq(0), inq(1));
                let (lo, hi) = qm.clamp_range(id).unwrap();
                let p = scheme::add_params(qa, qb, yq, lo, hi);
                for i in 0..out.q.len() {
                    out.q[i] = scheme::add(a.q[i], b.q[i], &p);
                }
            }
            Op::ChannelMul => {
                let (xv, s, qx, qs) = (input(0), input(1), inq(0), inq(1));
                let mult = qx.scale * qs.scale / yq.scale;
                for i in 0..out.q.len() {
                    let ch = i / (ho * wo);
                    let p = (xv.q[i] as i32 - qx.zero_point as i32)
                        * (s.q[ch] as i32 - qs.zero_point as i32);
                    out.q[i] = finish(p as f32 * mult, yq.zero_point, 0, 255);
                }
            }
            Op::Concat => {
                let mut q = Vec::new();
                for k in 0..node.inputs.len() {
                    let t = copy_table(k);
                    q.extend(input(k).q.iter().map(|&v| t[v as usize]));
                }
                out.q = q;
            }
            Op::Slice { start, end } => {
                let xv = input(0);
                let t = copy_table(0);
                out.q = xv.q[start * ho * wo..end * ho * wo]
                    .iter()
                    .map(|&v| t[v as usize])
                    .collect();
            }
            Op::ChannelShuffle { groups } => {
                let xv = input(0);
                let t = copy_table(0);
                let per = c / groups;
                for o in 0..c {
                    let src = (o % groups) * per + o / groups;
                    for p in 0..ho * wo {
                        out.q[o * ho * wo + p] = t[xv.q[src * ho * wo + p] as usize];
                    }
                }
            }
            Op::MaxPool {
                kernel,
                stride,
                padding,
                ..
            }
            | Op::AvgPool {
                kernel,
                stride,
                padding,
            } => {
                let xv = input(0);
                let max = matches!(node.op, Op::MaxPool { .. });
                let t = copy_table(0);
                let qx = inq(0);
                let mult = qx.scale / yq.scale / (kernel * kernel) as f32;
                for ch in 0..c {
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let (mut m, mut sum) = (0u8, 0i32);
                            for ky in 0..*kernel {
                                for kx in 0..*kernel {
                                    let iy = (oy * stride + ky) as isize - *padding as isize;
                                    let ix = (ox * stride + kx) as isize - *padding as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy as usize >= xv.h
                                        || ix as usize >= xv.w
                                    {
                                        sum += qx.zero_point as i32;
                                        continue;
                                    }
                                    let v = xv.at(ch, iy as usize, ix as usize);
                                    m = m.max(v);
                                    sum += v as i32;
                                }
                            }
                            let o = (ch * ho + oy) * wo + ox;
                            out.q[o] = if max {
                                t[m as usize]
                            } else {
                                let v = (sum - (kernel * kernel) as i32 * qx.zero_point as i32)
                                    as f32
                                    * mult;
                                finish(v, yq.zero_point, 0, 255)
                            };
                        }
                    }
                }
            }
            Op::GlobalAvgPool => {
                let xv = input(0);
                let qx = inq(0);
                let hw = xv.h * xv.w;
                let mult = qx.scale / yq.scale / hw as f32;
                for ch in 0..c {
                    let sum: i32 = xv.q[ch * hw..(ch + 1) * hw].iter().map(|&v| v as i32).sum();
                    out.q[ch] = finish(
                        (sum - hw as i32 * qx.zero_point as i32) as f32 * mult,
                        yq.zero_point,
                        0,
                        255,
                    );
                }
            }
            Op::BatchNorm { .. } => panic!("folded"),
        }
        vals[id] = Some(out);
    }
    let yq = qm.activations[g.output].unwrap();
    vals[g.output]
        .as_ref()
        .unwrap()
        .q
        .iter()
        .map(|&v| yq.dequantize(v))
        .collect()
}

fn input(n: usize, c: usize, h: usize, w: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n * c * h * w)
        .map(|_| (rng.normal() * 1.2) as f32)
        .collect()
}

/// Engine at every level == the reference, exactly, for batches 1 and 5 (and the output is
/// not degenerate: the reference's codes vary).
fn check(graph: Graph, h: usize, w: usize, seed: u64, what: &str) {
    let qm = random_quantized(graph, seed);
    let c = qm.graph.input_channels();
    let n = 5;
    let x = input(n, c, h, w, seed + 1);
    let per = c * h * w;
    let want: Vec<f32> = x
        .chunks(per)
        .flat_map(|s| reference(&qm, s, h, w))
        .collect();
    let distinct: std::collections::BTreeSet<u32> = want.iter().map(|v| v.to_bits()).collect();
    assert!(
        distinct.len() > 3,
        "{what}: degenerate test output {distinct:?}"
    );
    for level in Level::available() {
        let engine = Engine::with_level(&qm, level).unwrap();
        let got = engine.forward(&x, n, h, w).unwrap();
        assert_eq!(got, want, "{what}: {level:?}, batch {n}");
        let one = engine.forward(&x[..per], 1, h, w).unwrap();
        assert_eq!(one, want[..want.len() / n], "{what}: {level:?}, batch 1");
    }
}

#[test]
fn convs_residual_add_and_linear() {
    // Dense 3x3 stride 2 + ReLU, depthwise 3x3 + ReLU6, 1x1 projection, residual add (+ReLU),
    // grouped 3x3, depthwise 5x5 stride 2, global pool and a linear layer.
    let mut b = GraphBuilder::new(3);
    let x = b.conv("stem", GraphBuilder::INPUT, 16, 3, 2, 1, 1, true);
    let x = b.act(Activation::Relu, x);
    let d = b.conv("dw", x, 16, 3, 1, 1, 16, true);
    let d = b.act(Activation::Relu6, d);
    let p = b.conv("pw", d, 16, 1, 1, 0, 1, true);
    let r = b.add(p, x);
    let r = b.act(Activation::Relu, r);
    let gc = b.conv("grouped", r, 24, 3, 1, 1, 4, true);
    let d5 = b.conv("dw5", gc, 24, 5, 2, 2, 24, true);
    let g = b.global_avg_pool(d5);
    let f = b.flatten(g);
    let y = b.linear("fc", f, 10, true);
    check(b.finish(y), 11, 9, 1, "convs");
}

#[test]
fn shufflenet_unit_concat_slice_shuffle_and_pools() {
    // Max pool (ceil mode), a channel split, a branch, concat (requantizing its second input),
    // shuffle, average pool, global pool.
    let mut b = GraphBuilder::new(3);
    let x = b.conv("stem", GraphBuilder::INPUT, 12, 3, 1, 1, 1, false);
    let x = b.act(Activation::Relu, x);
    let x = b.max_pool(x, 3, 2, 0, true);
    let left = b.slice(x, 0, 6);
    let right = b.slice(x, 6, 12);
    let r = b.conv("branch.pw", right, 6, 1, 1, 0, 1, true);
    let r = b.act(Activation::Relu, r);
    let r = b.conv("branch.dw", r, 6, 3, 1, 1, 6, true);
    let cat = b.concat(vec![left, r]);
    let s = b.shuffle(cat, 2);
    let s = b.avg_pool(s, 2, 2, 0);
    let g = b.global_avg_pool(s);
    let f = b.flatten(g);
    let y = b.linear("fc", f, 7, true);
    check(b.finish(y), 14, 12, 2, "shuffle unit");
}

#[test]
fn squeeze_excitation_and_table_activations() {
    // MobileNet V3's block: hardswish after a conv (not fusable: a table), SE with ReLU and
    // hardsigmoid, the channel multiply, a sigmoid, and an average pool with padding.
    let mut b = GraphBuilder::new(3);
    let x = b.conv("stem", GraphBuilder::INPUT, 16, 3, 2, 1, 1, true);
    let x = b.act(Activation::Hardswish, x);
    let s = b.global_avg_pool(x);
    let s = b.conv("se.fc1", s, 8, 1, 1, 0, 1, true);
    let s = b.act(Activation::Relu, s);
    let s = b.conv("se.fc2", s, 16, 1, 1, 0, 1, true);
    let s = b.act(Activation::Hardsigmoid, s);
    let m = b.channel_mul(x, s);
    let m = b.act(Activation::Sigmoid, m);
    let m = b.avg_pool(m, 3, 2, 1);
    let g = b.global_avg_pool(m);
    let f = b.flatten(g);
    let y = b.linear("fc", f, 5, true);
    check(b.finish(y), 13, 10, 3, "SE");
}

/// The engine against the quantization pass's simulation (`passes::quant::simulate`) on the
/// shared fixtures of every family, calibrated on the fixture inputs: the output codes agree
/// exactly on at least 99.9 % of the values and within one step everywhere. (The simulation
/// sums in f32, exact below 2^24, so the two should agree everywhere; the bound is the
/// issue's.)
#[test]
fn engine_agrees_with_the_simulation_on_every_family() {
    use candle_core::Tensor;
    use slimcandle::import::import_state_dict;
    use slimcandle::passes::quant::{self, QuantOptions};
    use slimcandle::tensor_file::TensorFile;
    let Some(dir) = common::shared_dir("fixtures") else {
        return;
    };
    let (mut same, mut total) = (0usize, 0usize);
    for name in common::FIXTURES {
        let (arch, opts) = common::arch_of(name);
        let model =
            import_state_dict(&dir.join(format!("{name}.safetensors")), &arch, &opts).unwrap();
        let io = TensorFile::read(&dir.join(format!("{name}.io.safetensors"))).unwrap();
        let inputs: Vec<Tensor> = [96, 113]
            .iter()
            .map(|s| io.tensor_f32(&format!("input_{s}")).unwrap())
            .collect();
        let qm = quant::quantize(
            &model,
            inputs.iter().cloned().map(Ok),
            &QuantOptions::default(),
            |_| {},
        )
        .unwrap();
        let out_q = qm.activations[qm.graph.output].expect("quantized logits");
        let engine = Engine::new(&qm).unwrap();
        for x in &inputs {
            let (n, _, h, w) = x.dims4().unwrap();
            let want: Vec<f32> = quant::simulate::simulate(&qm, x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let got = engine.forward(&xs, n, h, w).unwrap();
            assert_eq!(got.len(), want.len(), "{name}: output size");
            // One image alone runs as one chunk on one thread, the batch as a chunk per
            // thread: the same integers either way.
            let per = xs.len() / n;
            let one = engine.forward(&xs[..per], 1, h, w).unwrap();
            assert_eq!(
                one,
                got[..got.len() / n],
                "{name} {h}x{w}: batch 1 vs batch {n}"
            );
            for (g, w) in got.iter().zip(&want) {
                let steps = ((g - w) / out_q.scale).abs().round();
                assert!(steps <= 1.0, "{name} {h}x{w}: engine {g} vs simulation {w}");
                same += usize::from(g == w);
                total += 1;
            }
        }
    }
    eprintln!("engine == simulation on {same} of {total} output values");
    assert!(
        same * 1000 >= total * 999,
        "only {same} of {total} output values agree exactly"
    );
}

/// `slimcandle bench` times an int8 checkpoint on the engine, and `--int8` quantizes a fresh
/// `--arch` model; training an int8 model is refused with a one-line error.
#[test]
fn bench_times_int8_checkpoints_and_quantized_arch_models() {
    use common::{ok, s, slimcandle, stderr};
    let dir = common::temp_dir("int8-bench");
    let mut b = GraphBuilder::new(3);
    let x = b.conv("stem", GraphBuilder::INPUT, 8, 3, 2, 1, 1, true);
    let x = b.act(Activation::Relu, x);
    let g = b.global_avg_pool(x);
    let f = b.flatten(g);
    let y = b.linear("fc", f, 10, true);
    let qm = random_quantized(b.finish(y), 9);
    let path = dir.join("int8.safetensors");
    slimcandle::passes::quant::store::save(&qm, &path).unwrap();
    let quick = [
        "--batch",
        "3",
        "--size",
        "12",
        "--warmup",
        "0",
        "--iterations",
        "1",
    ];
    let mut args = vec!["bench", s(&path), "--mode", "infer"];
    args.extend(quick);
    let out = ok(&args);
    assert!(
        out.contains("int8 checkpoint") && out.contains("images/s"),
        "{out}"
    );
    let refused = slimcandle(&["bench", s(&path), "--mode", "train"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("int8 checkpoint"),
        "{}",
        stderr(&refused)
    );
    let mut args = vec![
        "bench",
        "--arch",
        "mobilenet_v3_small",
        "--stem",
        "cifar",
        "--mode",
        "infer",
        "--int8",
    ];
    args.extend(quick);
    let out = ok(&args);
    assert!(out.contains("int8") && out.contains("images/s"), "{out}");
}

/// Layers kept in float (dequantize, float kernels, quantize) and per-tensor weights, against
/// the simulation: ShuffleNet V2's classifier in float (float logits out) and MobileNet V3's
/// stem conv in float (quantized again inside the network). The float kernels' summation
/// order may differ from the simulation's, so an output may move by one step (quantized) or
/// by rounding (float logits).
#[test]
fn layers_kept_in_float_and_per_tensor_weights_follow_the_simulation() {
    use candle_core::Tensor;
    use slimcandle::import::import_state_dict;
    use slimcandle::passes::quant::{self, QuantOptions};
    use slimcandle::prune::pattern::parse_list;
    use slimcandle::tensor_file::TensorFile;
    let Some(dir) = common::shared_dir("fixtures") else {
        return;
    };
    for (name, keep, granularity) in [
        ("shufflenet_v2_x0_5", "fc", Granularity::PerTensor),
        (
            "mobilenet_v3_small",
            "features.0.*",
            Granularity::PerChannel,
        ),
    ] {
        let (arch, opts) = common::arch_of(name);
        let model =
            import_state_dict(&dir.join(format!("{name}.safetensors")), &arch, &opts).unwrap();
        let io = TensorFile::read(&dir.join(format!("{name}.io.safetensors"))).unwrap();
        let x: Tensor = io.tensor_f32("input_96").unwrap();
        let qopts = QuantOptions {
            granularity,
            keep_float: parse_list(keep).unwrap(),
            ..QuantOptions::default()
        };
        let qm = quant::quantize(&model, [Ok(x.clone())], &qopts, |_| {}).unwrap();
        assert!(!qm.float_layers.is_empty(), "{name}");
        let (n, _, h, w) = x.dims4().unwrap();
        let want: Vec<f32> = quant::simulate::simulate(&qm, &x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let got = Engine::new(&qm).unwrap().forward(&xs, n, h, w).unwrap();
        let span = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let bound = match qm.activations[qm.graph.output] {
            Some(q) => q.scale * 1.001,
            None => 1e-4 * span,
        };
        for (g, v) in got.iter().zip(&want) {
            assert!(
                (g - v).abs() <= bound,
                "{name} keep {keep}: engine {g} vs simulation {v}"
            );
        }
    }
}

/// The residual add gives onnxruntime's codes (1.32, x86: MLAS's AVX2 QLinearAdd, also used on
/// AVX-512) on inputs that sit on the edge of a rounding step. Each expected code was produced
/// by onnxruntime's `com.microsoft.QLinearAdd` on these f32 scales and zero points; the first
/// two are where the unfolded `fa * (a - a_zp) + fb * (b - b_zp)` rounds the other way (one an
/// exact tie, 196.5 -> 196), the next two where `offset` without the FMA does, the last two where
/// the other FMA contraction (`fma(fb, b_zp, fa * a_zp)`) does.
#[test]
fn add_rounds_as_onnxruntime_qlinearadd_at_rounding_boundaries() {
    use slimcandle::kernels::int8::elementwise::add;
    // (a_scale, a_zp, b_scale, b_zp, y_scale, y_zp, a, b, onnxruntime's code)
    #[rustfmt::skip]
    let cases = [
        (0.052114144, 184, 0.03727292, 65, 0.035058305, 253, 43, 209, 196),
        (0.0892299, 68, 0.055881172, 181, 0.086243525, 163, 18, 44, 22),
        (0.07761924, 82, 0.012267718, 205, 0.043496676, 7, 150, 124, 106),
        (0.014198702, 234, 0.012725995, 66, 0.011819402, 64, 177, 183, 121),
        (0.06309925, 250, 0.06445506, 140, 0.06741969, 173, 230, 226, 236),
        (0.093511514, 96, 0.059709385, 226, 0.026249725, 248, 26, 251, 55),
    ];
    for (sa, za, sb, zb, sy, zy, a, b, want) in cases {
        let q = |scale, zero_point| QParams { scale, zero_point };
        let p = scheme::add_params(q(sa, za), q(sb, zb), q(sy, zy), 0, 255);
        assert_eq!(scheme::add(a, b, &p), want, "scheme, case {a} + {b}");
        // Through the kernels too, at every level and at a position inside a vector.
        let (av, bv) = (vec![a; 37], vec![b; 37]);
        for level in Level::available() {
            let mut got = vec![0u8; 37];
            add(level, &av, &bv, &p, &mut got);
            assert!(
                got.iter().all(|&g| g == want),
                "{level:?}, case {a} + {b}: {got:?}"
            );
        }
    }
}
