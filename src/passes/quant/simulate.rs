//! The simulation: the int8 scheme's exact integer arithmetic computed with f32 tensors
//! holding integer values. It is the reference the integer engine is tested against and the
//! basis of quantization-aware training.
//!
//! Every quantized tensor is held as its uint8 codes (f32 values 0..=255) with its qparams.
//! Convolutions and linear layers run the float kernels on `x_q - x_zp` and the int8 weight
//! codes, which is exact while partial sums stay below 2^24 in magnitude; the requantization
//! and every other op follow `docs/quantization.md` formula by formula, in f32 where the
//! scheme says f32, rounding half to even.

use super::model::QuantizedModel;
use super::scheme::{self, QParams};
use crate::exec::check_input;
use crate::graph::{Activation, Op};
use crate::kernels;
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

/// A value during the simulation: codes with their qparams, or a float tensor.
#[derive(Clone)]
struct Value {
    t: Tensor,
    q: Option<QParams>,
}

/// Runs `model` on `x` (N x C x H x W, preprocessed f32) and returns the f32 logits.
pub fn simulate(model: &QuantizedModel, x: &Tensor) -> Result<Tensor> {
    let graph = &model.graph;
    check_input(graph, x.dims())?;
    let x = x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let mut uses_left: Vec<usize> = graph.consumers().iter().map(Vec::len).collect();
    uses_left[graph.output] += 1;
    let mut values: Vec<Option<Value>> = vec![None; graph.nodes.len()];
    for (id, node) in graph.nodes.iter().enumerate() {
        let inputs: Vec<Value> = node
            .inputs
            .iter()
            .map(|&i| values[i].clone().expect("topological order"))
            .collect();
        for &i in &node.inputs {
            uses_left[i] -= 1;
            if uses_left[i] == 0 {
                values[i] = None;
            }
        }
        let out = run_node(model, id, &inputs, &x)
            .with_context(|| format!("simulating node `{}` ({})", node.name, node.op.kind()))?;
        values[id] = Some(out);
    }
    let out = values[graph.output].take().expect("output computed");
    match out.q {
        Some(q) => dequantize(&out.t, q),
        None => Ok(out.t),
    }
}

fn run_node(model: &QuantizedModel, id: usize, inputs: &[Value], x: &Tensor) -> Result<Value> {
    let node = &model.graph.nodes[id];
    let want = model.activations[id];
    let codes = |t: Tensor| -> Result<Value> {
        Ok(Value {
            t,
            q: Some(want.context("an int8 op's output must be quantized")?),
        })
    };
    // The input `k`, as codes at the output's qparams (requantized if the plan gave the input
    // other qparams than the op needs: never, for plans built by `plan.rs`).
    let at_output = |k: usize| -> Result<Tensor> {
        let v = &inputs[k];
        let to = want.context("a pass-through op's output must be quantized")?;
        match v.q {
            Some(from) if from == to => Ok(v.t.clone()),
            Some(from) => requantize_codes(&v.t, from, to),
            None => quantize(&v.t, to),
        }
    };
    let qin = |k: usize| -> Result<QParams> {
        inputs[k]
            .q
            .with_context(|| format!("input {k} of an int8 op is float"))
    };
    Ok(match &node.op {
        Op::Input { .. } => codes(quantize(x, model.input_qparams())?)?,
        Op::Conv2d { .. } | Op::Linear { .. } => {
            if model.float_layers.contains_key(&node.name) {
                float_layer(model, id, &inputs[0])?
            } else {
                codes(int8_layer(model, id, &inputs[0])?)?
            }
        }
        Op::Act { .. } => {
            if model.is_fused_away(id) {
                // The producer already wrote this tensor, clamped.
                codes(at_output(0)?)?
            } else {
                let lut = model.lookup_table(id)?;
                let v = inputs[0].t.flatten_all()?.to_vec1::<f32>()?;
                let y: Vec<f32> = v.iter().map(|&c| lut[c as usize] as f32).collect();
                codes(Tensor::from_vec(y, inputs[0].t.dims(), &Device::Cpu)?)?
            }
        }
        Op::Add => {
            let (a, b) = (qin(0)?, qin(1)?);
            let y = want.context("add output")?;
            let (qmin, qmax) = model.clamp_range(id).expect("quantized");
            let p = scheme::add_params(a, b, y, qmin, qmax);
            let av = inputs[0].t.flatten_all()?.to_vec1::<f32>()?;
            let bv = inputs[1].t.flatten_all()?.to_vec1::<f32>()?;
            let out: Vec<f32> = av
                .iter()
                .zip(&bv)
                .map(|(&qa, &qb)| scheme::add(qa as u8, qb as u8, &p) as f32)
                .collect();
            codes(Tensor::from_vec(out, inputs[0].t.dims(), &Device::Cpu)?)?
        }
        Op::ChannelMul => {
            let (xq, sq) = (qin(0)?, qin(1)?);
            let y = want.context("channel_mul output")?;
            let mult = xq.scale * sq.scale / y.scale;
            let (n, c, h, w) = inputs[0].t.dims4()?;
            let xv = inputs[0].t.flatten_all()?.to_vec1::<f32>()?;
            let sv = inputs[1].t.flatten_all()?.to_vec1::<f32>()?;
            let plane = h * w;
            let out: Vec<f32> = xv
                .iter()
                .enumerate()
                .map(|(i, &qx)| {
                    let s = sv[i / plane];
                    let prod =
                        (qx as i32 - xq.zero_point as i32) * (s as i32 - sq.zero_point as i32);
                    clamp_code(
                        (prod as f32 * mult).round_ties_even() + y.zero_point as f32,
                        0,
                        255,
                    )
                })
                .collect();
            debug_assert_eq!(sv.len(), n * c);
            codes(Tensor::from_vec(out, (n, c, h, w), &Device::Cpu)?)?
        }
        Op::Concat => {
            let parts = (0..inputs.len())
                .map(at_output)
                .collect::<Result<Vec<_>>>()?;
            codes(Tensor::cat(&parts, 1)?)?
        }
        Op::Slice { start, end } => codes(at_output(0)?.narrow(1, *start, end - start)?)?,
        Op::ChannelShuffle { groups } => codes(kernels::channel_shuffle(&at_output(0)?, *groups)?)?,
        Op::MaxPool {
            kernel,
            stride,
            padding,
            ceil_mode,
        } => codes(kernels::max_pool2d(
            &at_output(0)?,
            *kernel,
            *stride,
            *padding,
            *ceil_mode,
        )?)?,
        Op::AvgPool {
            kernel,
            stride,
            padding,
        } => {
            let q = qin(0)?;
            let centred = inputs[0].t.affine(1.0, -(q.zero_point as f64))?;
            // The pool's mean times k*k is the window's integer sum (zero padding counts as
            // real 0, i.e. a centred 0), recovered exactly by rounding.
            let kk = (kernel * kernel) as f32;
            let mean = kernels::avg_pool2d(&centred, *kernel, *stride, *padding, false)?;
            let sums: Vec<f32> = mean
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|m| (m * kk).round())
                .collect();
            let y = want.context("avg_pool output")?;
            let mult = q.scale / y.scale / kk;
            let out = sums
                .iter()
                .map(|&s| clamp_code((s * mult).round_ties_even() + y.zero_point as f32, 0, 255))
                .collect();
            codes(Tensor::from_vec(out, mean.dims(), &Device::Cpu)?)?
        }
        Op::GlobalAvgPool => {
            let q = qin(0)?;
            let y = want.context("global_avg_pool output")?;
            let (n, c, h, w) = inputs[0].t.dims4()?;
            let plane = h * w;
            let v = inputs[0].t.flatten_all()?.to_vec1::<f32>()?;
            let mult = q.scale / y.scale / plane as f32;
            let out: Vec<f32> = v
                .chunks(plane)
                .map(|p| {
                    let sum: i64 = p.iter().map(|&c| c as i64).sum::<i64>()
                        - (plane as i64) * q.zero_point as i64;
                    clamp_code(
                        (sum as f32 * mult).round_ties_even() + y.zero_point as f32,
                        0,
                        255,
                    )
                })
                .collect();
            codes(Tensor::from_vec(out, (n, c, 1, 1), &Device::Cpu)?)?
        }
        Op::Flatten => codes(at_output(0)?.flatten_from(1)?)?,
        Op::Dropout { .. } => codes(at_output(0)?)?,
        Op::BatchNorm { .. } => bail!(
            "batch norm `{}` was not folded into a conv; the int8 scheme has no standalone batch norm",
            node.name
        ),
    })
}

fn clamp_code(v: f32, qmin: u8, qmax: u8) -> f32 {
    v.clamp(qmin as f32, qmax as f32)
}

/// Codes of a float tensor (ONNX QuantizeLinear).
pub fn quantize(x: &Tensor, q: QParams) -> Result<Tensor> {
    let v = x.flatten_all()?.to_vec1::<f32>()?;
    let codes: Vec<f32> = v.iter().map(|&x| q.quantize(x) as f32).collect();
    Ok(Tensor::from_vec(codes, x.dims(), &Device::Cpu)?)
}

/// Real values of codes (ONNX DequantizeLinear).
pub fn dequantize(codes: &Tensor, q: QParams) -> Result<Tensor> {
    let v = codes.flatten_all()?.to_vec1::<f32>()?;
    let out: Vec<f32> = v.iter().map(|&c| q.dequantize(c as u8)).collect();
    Ok(Tensor::from_vec(out, codes.dims(), &Device::Cpu)?)
}

/// Codes at `from` brought to `to`: `clamp(round_half_even(from.scale / to.scale * (q -
/// from.zp)) + to.zp, 0, 255)`.
pub fn requantize_codes(codes: &Tensor, from: QParams, to: QParams) -> Result<Tensor> {
    let m = from.scale / to.scale;
    let v = codes.flatten_all()?.to_vec1::<f32>()?;
    let out: Vec<f32> = v
        .iter()
        .map(|&c| {
            clamp_code(
                (m * (c - from.zero_point as f32)).round_ties_even() + to.zero_point as f32,
                0,
                255,
            )
        })
        .collect();
    Ok(Tensor::from_vec(out, codes.dims(), &Device::Cpu)?)
}

/// The int8 conv or linear layer `id`: `acc = sum (x_q - x_zp) * w_q` by the float kernels,
/// then `clamp(round_half_even((acc + bias_q) as f32 * mult[c]) + out_zp, qmin, qmax)`.
fn int8_layer(model: &QuantizedModel, id: usize, input: &Value) -> Result<Tensor> {
    let node = &model.graph.nodes[id];
    let layer = model.layer(id).expect("an int8 layer");
    let inq = input.q.context("the input of an int8 layer is float")?;
    let mult = model.multipliers(id)?;
    let out = model.activations[id].expect("quantized");
    let (qmin, qmax) = model.clamp_range(id).expect("quantized");
    let w: Vec<f32> = layer.weight.values.iter().map(|&v| v as f32).collect();
    let w = Tensor::from_vec(w, layer.weight.shape.as_slice(), &Device::Cpu)?;
    let centred = input.t.affine(1.0, -(inq.zero_point as f64))?;
    let acc = match &node.op {
        Op::Conv2d {
            stride,
            padding,
            dilation,
            groups,
            ..
        } => kernels::conv2d(&centred, &w, *stride, *padding, *dilation, *groups)?,
        _ => centred.matmul(&w.t()?)?,
    };
    let dims = acc.dims().to_vec();
    let channels = dims[1];
    let plane: usize = dims[2..].iter().product();
    let acc = acc.flatten_all()?.to_vec1::<f32>()?;
    let y: Vec<f32> = acc
        .iter()
        .enumerate()
        .map(|(i, &a)| {
            let c = (i / plane) % channels;
            let v = a.round() as i64 + layer.bias[c] as i64;
            let v = v.clamp(i32::MIN as i64, i32::MAX as i64) as i32;
            scheme::requantize(v, mult[c], out.zero_point, qmin, qmax) as f32
        })
        .collect();
    Ok(Tensor::from_vec(y, dims, &Device::Cpu)?)
}

/// A layer kept in float: dequantize the input, run the float op with its bias and fused
/// activation, quantize the output (or return it float when the output is float).
fn float_layer(model: &QuantizedModel, id: usize, input: &Value) -> Result<Value> {
    let node = &model.graph.nodes[id];
    let layer = &model.float_layers[&node.name];
    let x = match input.q {
        Some(q) => dequantize(&input.t, q)?,
        None => input.t.clone(),
    };
    let w = Tensor::from_vec(layer.weight.clone(), layer.shape.as_slice(), &Device::Cpu)?;
    let b = Tensor::from_vec(layer.bias.clone(), layer.bias.len(), &Device::Cpu)?;
    let y = match &node.op {
        Op::Conv2d {
            stride,
            padding,
            dilation,
            groups,
            ..
        } => kernels::add_channel_bias(
            &kernels::conv2d(&x, &w, *stride, *padding, *dilation, *groups)?,
            &b,
        )?,
        _ => x.matmul(&w.t()?)?.broadcast_add(&b)?,
    };
    let y = match model.fused[id] {
        Some(Activation::Relu) => kernels::relu(&y)?,
        Some(Activation::Relu6) => kernels::relu6(&y)?,
        _ => y,
    };
    Ok(match model.activations[id] {
        Some(q) => Value {
            t: quantize(&y, q)?,
            q: Some(q),
        },
        None => Value { t: y, q: None },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::GraphBuilder;
    use crate::model::{Model, ModelMeta, Preprocessing, Provenance};
    use crate::passes::quant::{Granularity, QuantOptions, quantize as quantize_model};
    use crate::rng::Rng;
    use crate::weights::Weights;

    /// input(2) -> conv 3x3 pad 1 (2->3) -> relu -+-> add -> relu -> gap -> flatten -> linear(3->2)
    ///          \-> conv 1x1 (2->3) -------------/
    fn tiny_model() -> Model {
        let mut g = GraphBuilder::new(2);
        let a = g.conv("a", 0, 3, 3, 1, 1, 1, true);
        let a = g.act(Activation::Relu, a);
        let b = g.conv("b", 0, 3, 1, 1, 0, 1, true);
        let sum = g.add(a, b);
        let sum = g.act(Activation::Relu, sum);
        let pooled = g.global_avg_pool(sum);
        let flat = g.flatten(pooled);
        let fc = g.linear("fc", flat, 2, true);
        let graph = g.finish(fc);
        assert_eq!(graph.nodes.len(), 9);
        let mut weights = Weights::init(&graph, 3).unwrap();
        let mut rng = Rng::new(9);
        let names: Vec<String> = weights.names().map(String::from).collect();
        for name in names {
            let t = weights.get(&name).unwrap();
            let v: Vec<f32> = (0..t.elem_count())
                .map(|_| rng.normal() as f32 * 0.5)
                .collect();
            let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
            weights.insert(&name, &t).unwrap();
        }
        Model {
            graph,
            weights,
            meta: ModelMeta {
                arch: None,
                class_names: vec!["x".into(), "y".into()],
                preprocessing: Preprocessing::for_stem(crate::models::Stem::Cifar),
                provenance: Provenance::default(),
            },
        }
    }

    fn random_input(seed: u64) -> Tensor {
        let mut rng = Rng::new(seed);
        let v: Vec<f32> = (0..2 * 2 * 5 * 4).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, (2, 2, 5, 4), &Device::Cpu).unwrap()
    }

    /// The scheme computed with scalar integer loops, independently of the simulation's
    /// tensor code, for the tiny model.
    fn scalar_reference(q: &QuantizedModel, x: &[f32]) -> Vec<f32> {
        let (h, w) = (5usize, 4usize);
        let act = |id: usize| q.activations[id].unwrap();
        let xin: Vec<i32> = x.iter().map(|&v| act(0).quantize(v) as i32).collect();
        let conv = |name: &str, id: usize, k: usize, pad: usize| -> Vec<i32> {
            let layer = &q.layers[name];
            let (inq, out) = (act(0), act(id));
            let (qmin, qmax) = q.clamp_range(id).unwrap();
            let mut y = vec![0; 2 * 3 * h * w];
            for n in 0..2 {
                for o in 0..3 {
                    for i in 0..h {
                        for j in 0..w {
                            let mut acc: i32 = 0;
                            for c in 0..2 {
                                for di in 0..k {
                                    for dj in 0..k {
                                        let (ii, jj) = (i + di, j + dj);
                                        if ii < pad || jj < pad || ii - pad >= h || jj - pad >= w {
                                            continue;
                                        }
                                        let xv = xin[((n * 2 + c) * h + ii - pad) * w + jj - pad]
                                            - inq.zero_point as i32;
                                        let wv =
                                            layer.weight.values[((o * 2 + c) * k + di) * k + dj];
                                        acc += xv * wv as i32;
                                    }
                                }
                            }
                            let m = inq.scale * layer.weight.scale(o) / out.scale;
                            y[((n * 3 + o) * h + i) * w + j] = scheme::requantize(
                                acc + layer.bias[o],
                                m,
                                out.zero_point,
                                qmin,
                                qmax,
                            ) as i32;
                        }
                    }
                }
            }
            y
        };
        let a = conv("a", 1, 3, 1);
        let b = conv("b", 3, 1, 0);
        let (qa, qb, qy) = (act(1), act(3), act(4));
        let (qmin, qmax) = q.clamp_range(4).unwrap();
        let sum: Vec<i32> = a
            .iter()
            .zip(&b)
            .map(|(&va, &vb)| {
                // MLAS QLinearAdd: zero points folded into one constant, two FMAs.
                let (fa, fb) = (qa.scale / qy.scale, qb.scale / qy.scale);
                let offset = qy.zero_point as f32
                    - fa.mul_add(qa.zero_point as f32, fb * qb.zero_point as f32);
                let v = (va as f32).mul_add(fa, (vb as f32).mul_add(fb, offset));
                v.round_ties_even().clamp(qmin as f32, qmax as f32) as i32
            })
            .collect();
        let qg = act(6);
        let pooled: Vec<i32> = sum
            .chunks(h * w)
            .map(|p| {
                let s: i32 = p.iter().map(|v| v - qy.zero_point as i32).sum();
                let v = s as f32 * (qy.scale / qg.scale / (h * w) as f32);
                (v.round_ties_even() + qg.zero_point as f32).clamp(0.0, 255.0) as i32
            })
            .collect();
        let fc = &q.layers["fc"];
        let out = act(8);
        let mut logits = Vec::new();
        for n in 0..2 {
            for o in 0..2 {
                let acc: i32 = (0..3)
                    .map(|c| {
                        (pooled[n * 3 + c] - qg.zero_point as i32)
                            * fc.weight.values[o * 3 + c] as i32
                    })
                    .sum();
                let m = qg.scale * fc.weight.scale(o) / out.scale;
                let code = scheme::requantize(acc + fc.bias[o], m, out.zero_point, 0, 255);
                logits.push(out.dequantize(code));
            }
        }
        logits
    }

    #[test]
    fn simulation_equals_the_scalar_integer_reference() {
        let model = tiny_model();
        let calib: Vec<Result<Tensor>> = (0..3).map(|s| Ok(random_input(s))).collect();
        for granularity in [Granularity::PerChannel, Granularity::PerTensor] {
            let opts = QuantOptions {
                granularity,
                ..QuantOptions::default()
            };
            let q = quantize_model(
                &model,
                calib.iter().map(|r| Ok(r.as_ref().unwrap().clone())),
                &opts,
                |_| {},
            )
            .unwrap();
            // The plan: fused ReLUs (conv a, the add), the flatten shares the pool's qparams.
            assert_eq!(q.fused[1], Some(Activation::Relu));
            assert_eq!(q.fused[4], Some(Activation::Relu));
            assert_eq!(q.fused[3], None);
            assert_eq!(q.activations[1], q.activations[2]);
            assert_eq!(q.activations[6], q.activations[7]);
            assert_eq!(q.activations[1].unwrap().zero_point, 0);
            let x = random_input(7);
            let got: Vec<f32> = simulate(&q, &x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want = scalar_reference(&q, &x.flatten_all().unwrap().to_vec1().unwrap());
            assert_eq!(got, want, "{granularity:?}");
        }
    }

    #[test]
    fn requantize_codes_and_round_trips() {
        let from = QParams {
            scale: 0.1,
            zero_point: 10,
        };
        let to = QParams {
            scale: 0.2,
            zero_point: 3,
        };
        let t = Tensor::new(&[10f32, 11.0, 13.0, 0.0, 255.0], &Device::Cpu).unwrap();
        let got: Vec<f32> = requantize_codes(&t, from, to).unwrap().to_vec1().unwrap();
        // 0.5 -> 0, 1.5 -> 2, -5, 122.5 -> 122.
        assert_eq!(got, vec![3.0, 3.0, 5.0, 0.0, 125.0]);
        let real = dequantize(&t, from).unwrap();
        let back: Vec<f32> = quantize(&real, from).unwrap().to_vec1().unwrap();
        assert_eq!(back, vec![10.0, 11.0, 13.0, 0.0, 255.0]);
    }
}
