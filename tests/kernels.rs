//! The CPU kernels of `slimcandle::kernels` against the stock Candle compositions (forward and
//! autograd) and against central finite differences, on small odd shapes.
//!
//! The loops are compiled for several instruction sets and the best one runs; to cover the
//! others, run these tests again with `SLIMCANDLE_SIMD=avx2` and `SLIMCANDLE_SIMD=baseline`.

use candle_core::{DType, Device, Result, Tensor, Var};
use slimcandle::kernels::{self, reference};
use slimcandle::rng::Rng;

type Fun<'a> = dyn Fn(&[Tensor]) -> Result<Tensor> + 'a;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `max |got - want| <= tol * (1 + max |want|)`, with equal shapes.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let (g, w) = (values(got), values(want));
    let scale = 1.0 + w.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = g
        .iter()
        .zip(&w)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= tol * scale,
        "{what}: max error {err} > {tol} x {scale}"
    );
}

/// `sum f(inputs) * r`, accumulated in f64.
fn loss(f: &Fun, inputs: &[Tensor], r: &[f32]) -> f64 {
    let y = values(&f(inputs).unwrap());
    y.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Gradients of `sum f(inputs) * r` with respect to each input, by Candle autograd.
fn grads(f: &Fun, inputs: &[Tensor], r: &Tensor) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let store = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
    vars.iter()
        .map(|v| store.get(v).expect("gradient").clone())
        .collect()
}

/// Checks `analytic` at `samples` random coordinates of each input against central
/// differences with step `eps`.
fn check_fd(
    what: &str,
    f: &Fun,
    inputs: &[Tensor],
    r: &Tensor,
    analytic: &[Tensor],
    (samples, eps, tol): (usize, f32, f64),
) {
    let rv = values(r);
    let mut rng = Rng::new(99);
    for (idx, input) in inputs.iter().enumerate() {
        let base = values(input);
        let ga = values(&analytic[idx]);
        for _ in 0..samples {
            let j = rng.below(base.len());
            let at = |v: f32| {
                let mut p = base.clone();
                p[j] = v;
                let mut ins = inputs.to_vec();
                ins[idx] = Tensor::from_vec(p, input.dims(), &Device::Cpu).unwrap();
                loss(f, &ins, &rv)
            };
            let (hi, lo) = (base[j] + eps, base[j] - eps);
            let num = (at(hi) - at(lo)) / (hi as f64 - lo as f64);
            let err = (num - ga[j] as f64).abs();
            assert!(
                err <= tol * (1.0 + num.abs()),
                "{what}: input {idx} coordinate {j}: finite difference {num}, autograd {}",
                ga[j]
            );
        }
    }
}

/// Forward against `reference`, gradients against the reference's autograd and against
/// finite differences. `fd` = (samples per input, step, tolerance).
fn check_op(what: &str, ours: &Fun, reference: &Fun, inputs: &[Tensor], fd: (usize, f32, f64)) {
    let y = ours(inputs).unwrap();
    assert_close(
        &format!("{what} forward"),
        &y,
        &reference(inputs).unwrap(),
        1e-5,
    );
    let r = randn(y.dims(), 7);
    let g = grads(ours, inputs, &r);
    let g_ref = grads(reference, inputs, &r);
    for (i, (a, b)) in g.iter().zip(&g_ref).enumerate() {
        assert_close(&format!("{what} gradient {i}"), a, b, 1e-5);
    }
    check_fd(what, ours, inputs, &r, &g, fd);
}

// ---------------------------------------------------------------- convolution

#[derive(Debug, Clone, Copy)]
struct Conv {
    n: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    dil: usize,
    groups: usize,
}

impl Conv {
    fn new(n: usize, c_in: usize, c_out: usize, hw: (usize, usize), groups: usize) -> Self {
        Conv {
            n,
            c_in,
            c_out,
            h: hw.0,
            w: hw.1,
            k: 3,
            stride: 1,
            pad: 1,
            dil: 1,
            groups,
        }
    }

    fn kernel(self, k: usize, stride: usize, pad: usize) -> Self {
        Conv {
            k,
            stride,
            pad,
            ..self
        }
    }

    fn fits(&self) -> bool {
        self.h + 2 * self.pad > self.dil * (self.k - 1)
            && self.w + 2 * self.pad > self.dil * (self.k - 1)
    }

    fn inputs(&self, seed: u64) -> [Tensor; 2] {
        [
            randn(&[self.n, self.c_in, self.h, self.w], seed),
            randn(
                &[self.c_out, self.c_in / self.groups, self.k, self.k],
                seed + 1,
            ),
        ]
    }

    fn check(self) {
        let c = self;
        let ours =
            move |t: &[Tensor]| kernels::conv2d(&t[0], &t[1], c.stride, c.pad, c.dil, c.groups);
        let stock =
            move |t: &[Tensor]| reference::conv2d(&t[0], &t[1], c.stride, c.pad, c.dil, c.groups);
        // The convolution is linear, so a large step is exact up to rounding.
        check_op(
            &format!("{c:?}"),
            &ours,
            &stock,
            &self.inputs(1),
            (4, 0.5, 2e-4),
        );
    }
}

#[test]
fn depthwise_conv_all_kernels_strides_paddings() {
    for k in [1, 3, 5] {
        for stride in [1, 2] {
            for pad in [0, 1, 2] {
                Conv::new(2, 5, 5, (7, 9), 5).kernel(k, stride, pad).check();
            }
        }
    }
}

#[test]
fn depthwise_conv_tiny_planes() {
    // Rows under 4 outputs take the in-place tap loop; exactly 4 one 4-wide block.
    for (h, w) in [(1, 1), (2, 2), (3, 2), (4, 4), (5, 3)] {
        for (k, stride, pad) in [(3, 1, 1), (5, 1, 2), (5, 2, 2), (3, 2, 1), (1, 1, 0)] {
            let c = Conv::new(2, 3, 3, (h, w), 3).kernel(k, stride, pad);
            // Candle's own backward (the reference) needs the stride to divide evenly.
            let even = |len: usize| {
                (len + 2 * pad)
                    .checked_sub(k)
                    .is_some_and(|d| d % stride == 0)
            };
            if c.fits() && even(h) && even(w) {
                c.check();
            }
        }
    }
}

/// Planes whose 16-value vectors read at most 64 input values run in AVX-512 registers
/// (`depthwise_small`): one 4x4 plane per vector, four 2x2 ones, sixteen 1x1 ones, or a
/// row of 16 of a 16x16 plane; channel counts past a multiple of four vectors too.
#[test]
fn depthwise_conv_small_planes_in_registers() {
    Conv::new(2, 20, 20, (4, 4), 20).check();
    Conv::new(2, 24, 24, (4, 4), 24).kernel(5, 1, 2).check();
    Conv::new(2, 36, 36, (8, 8), 36).kernel(3, 2, 1).check();
    Conv::new(2, 32, 32, (2, 2), 32).check();
    Conv::new(1, 48, 48, (4, 4), 48).kernel(3, 2, 1).check();
    Conv::new(2, 32, 32, (2, 2), 32).kernel(3, 2, 1).check();
    Conv::new(3, 8, 8, (16, 16), 8).check();
    Conv::new(2, 8, 8, (8, 8), 8).check();
    // Stride 1: the input gradient takes the same kernel with the flipped filters and
    // padding k - 1 - p (5x5 on 2x2 and 1x1 planes, and without padding: 4x4 -> 2x2).
    Conv::new(2, 32, 32, (2, 2), 32).kernel(5, 1, 2).check();
    Conv::new(2, 32, 32, (1, 1), 32).kernel(3, 1, 1).check();
    Conv::new(2, 16, 16, (4, 4), 16).kernel(3, 1, 0).check();
    // Planes with a partial last vector (the backward's `plan_partial`): 6x6, 3x3, 7x7.
    Conv::new(2, 16, 16, (6, 6), 16).check();
    Conv::new(2, 16, 16, (3, 3), 16).kernel(5, 1, 2).check();
    Conv::new(2, 8, 8, (7, 7), 8).check();
    Conv::new(2, 8, 8, (12, 12), 8).kernel(3, 2, 1).check();
}

#[test]
fn depthwise_conv_wide_rows_batch_one_and_large_kernels() {
    // Rows long enough for the 16- and 8-wide blocks plus a scalar tail.
    Conv::new(2, 3, 3, (5, 27), 3).check();
    Conv::new(2, 3, 3, (7, 57), 3).kernel(3, 2, 1).check();
    Conv::new(1, 4, 4, (9, 45), 4).kernel(5, 2, 2).check();
    Conv::new(1, 4, 4, (9, 44), 4).kernel(5, 1, 2).check();
    Conv::new(1, 2, 2, (11, 13), 2).kernel(7, 2, 3).check();
    // Stride 3 and k = 9 take the non-specialised loops.
    Conv::new(2, 3, 3, (10, 13), 3).kernel(3, 3, 1).check();
    Conv::new(1, 2, 2, (10, 11), 2).kernel(9, 1, 4).check();
}

#[test]
fn depthwise_like_convs_that_take_the_gemm_path() {
    // Dilation 2 and a channel multiplier are not direct-kernel shapes.
    Conv {
        dil: 2,
        ..Conv::new(2, 4, 4, (9, 7), 4).kernel(3, 1, 2)
    }
    .check();
    Conv::new(2, 3, 6, (7, 9), 3).kernel(3, 2, 1).check();
}

#[test]
fn grouped_conv() {
    for k in [1, 3] {
        for stride in [1, 2] {
            for pad in [0, 1] {
                Conv::new(2, 6, 9, (7, 9), 3).kernel(k, stride, pad).check();
            }
        }
    }
    // ShuffleNet's 1x1 group convolutions, an uneven batch split, and a 5x5.
    Conv::new(3, 8, 8, (5, 7), 2).kernel(1, 1, 0).check();
    Conv::new(3, 12, 12, (5, 7), 4).kernel(1, 1, 0).check();
    Conv::new(1, 4, 6, (7, 9), 2).kernel(5, 1, 2).check();
}

#[test]
fn dense_conv() {
    for k in [1, 3, 5] {
        for stride in [1, 2] {
            for pad in [0, 1, 2] {
                let c = Conv::new(2, 3, 4, (7, 9), 1).kernel(k, stride, pad);
                if c.fits() {
                    c.check();
                }
            }
        }
    }
    Conv::new(1, 3, 4, (7, 9), 1).check();
    Conv::new(3, 5, 2, (6, 5), 1).kernel(1, 1, 0).check();
    // Output planes of more than 256 values run one sample per GEMM; smaller ones put
    // several samples side by side (conv_gemm::forward_batched), up to the boundary.
    Conv::new(3, 3, 4, (17, 19), 1).check();
    Conv::new(3, 3, 4, (17, 19), 1).kernel(1, 1, 0).check();
    Conv::new(3, 3, 4, (16, 16), 1).kernel(1, 1, 0).check();
    // 1x1 convolutions of planes from 32 values on run their forward per sample on the NCHW
    // planes (conv_gemm::direct_per_sample); below 32 values they stay joined.
    Conv::new(5, 20, 13, (4, 8), 1).kernel(1, 1, 0).check();
    Conv::new(5, 20, 13, (7, 7), 1).kernel(1, 1, 0).check();
    Conv::new(5, 20, 13, (5, 6), 1).kernel(1, 1, 0).check();
    Conv::new(3, 3, 4, (31, 33), 1).kernel(3, 2, 1).check();
    // Planes of whole 32-value panels (8x8, 4x8) run the batched products per sample on
    // the NCHW planes (conv_gemm::planes_in_place), with more than two 12-row blocks.
    Conv::new(5, 20, 30, (8, 8), 1).kernel(1, 1, 0).check();
    Conv::new(4, 7, 26, (4, 8), 1).check();
    // Many input channels (column matrices of 576 rows), one sample per GEMM and, with
    // small planes, several side by side.
    Conv::new(2, 64, 5, (17, 19), 1).check();
    Conv::new(5, 64, 5, (8, 8), 1).check();
    Conv::new(3, 48, 7, (13, 11), 1).kernel(3, 2, 1).check();
    Conv {
        dil: 2,
        ..Conv::new(2, 3, 4, (9, 7), 1).kernel(3, 1, 2)
    }
    .check();
}

/// Batch splitting depends on the thread count (one sample at a time with threaded GEMMs, or
/// chunks of samples in parallel), so run the same cases under several pool sizes.
#[test]
fn conv_under_different_thread_counts() {
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            Conv::new(7, 3, 4, (5, 6), 1).check();
            Conv::new(7, 4, 6, (5, 6), 2).kernel(1, 1, 0).check();
            Conv::new(7, 4, 4, (5, 7), 4).kernel(3, 2, 1).check();
            Conv::new(1, 64, 26, (17, 19), 1).check();
            // Depthwise at batch 1: short rows run channels last; 3x3 kernels on 7x7
            // outputs take the 4-wide row blocks, 5x5 ones channels last.
            Conv::new(1, 37, 37, (4, 4), 37).check();
            Conv::new(1, 40, 40, (5, 5), 40).kernel(3, 2, 1).check();
            Conv::new(1, 20, 20, (7, 7), 20).check();
            Conv::new(1, 20, 20, (7, 7), 20).kernel(5, 1, 2).check();
            Conv::new(2, 6, 6, (14, 14), 6).kernel(3, 2, 1).check();
            Conv::new(5, 64, 5, (8, 8), 1).check();
            let c = Conv::new(7, 3, 4, (5, 6), 1).kernel(1, 1, 0);
            c.check();
        });
    }
}

/// Candle's own conv backward derives the input gradient's output padding from the height
/// alone, so for stride 2 with heights and widths of different parity it fails; ours is
/// checked against finite differences there.
#[test]
fn conv_stride_two_with_mixed_parity_sizes() {
    for (groups, c_out) in [(1, 4), (2, 4), (4, 4)] {
        let c = Conv::new(2, 4, c_out, (8, 7), groups).kernel(3, 2, 1);
        let ours = move |t: &[Tensor]| kernels::conv2d(&t[0], &t[1], 2, 1, 1, groups);
        let stock = move |t: &[Tensor]| reference::conv2d(&t[0], &t[1], 2, 1, 1, groups);
        let inputs = c.inputs(3);
        assert_close(
            "forward",
            &ours(&inputs).unwrap(),
            &stock(&inputs).unwrap(),
            1e-5,
        );
        let r = randn(&[2, c_out, 4, 4], 5);
        let g = grads(&ours, &inputs, &r);
        check_fd("mixed parity", &ours, &inputs, &r, &g, (12, 0.5, 2e-4));
    }
}

#[test]
fn conv_non_contiguous_inputs() {
    for (groups, c_out) in [(1, 3), (3, 3), (3, 6)] {
        // x: a narrowed, transposed view; w: a transposed view.
        let ours = move |t: &[Tensor]| {
            let x = t[0].narrow(1, 1, 3)?.transpose(2, 3)?;
            kernels::conv2d(&x, &t[1].transpose(2, 3)?, 1, 1, 1, groups)
        };
        let stock = move |t: &[Tensor]| {
            let x = t[0].narrow(1, 1, 3)?.transpose(2, 3)?;
            reference::conv2d(&x, &t[1].transpose(2, 3)?, 1, 1, 1, groups)
        };
        let inputs = [
            randn(&[2, 5, 9, 7], 11),
            randn(&[c_out, 3 / groups, 3, 3], 12),
        ];
        check_op(
            "non-contiguous conv",
            &ours,
            &stock,
            &inputs,
            (6, 0.5, 2e-4),
        );
    }
}

#[test]
fn conv_gradient_only_where_needed() {
    for groups in [1, 2, 4] {
        let x = randn(&[2, 4, 7, 9], 1);
        let w = Var::from_tensor(&randn(&[4, 4 / groups, 3, 3], 2)).unwrap();
        let r = randn(&[2, 4, 7, 9], 3);
        let y = kernels::conv2d(&x, w.as_tensor(), 1, 1, 1, groups).unwrap();
        let store = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(store.get(&x).is_none());
        let y_ref = reference::conv2d(&x, w.as_tensor(), 1, 1, 1, groups).unwrap();
        let want = (y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let got = store.get(w.as_tensor()).unwrap();
        assert_close(
            "weight gradient only",
            got,
            want.get(w.as_tensor()).unwrap(),
            1e-5,
        );

        // Only the input tracked: a frozen weight.
        let xv = Var::from_tensor(&x).unwrap();
        let w = w.as_detached_tensor();
        let y = kernels::conv2d(xv.as_tensor(), &w, 1, 1, 1, groups).unwrap();
        let store = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(store.get(&w).is_none());
        assert!(store.get(xv.as_tensor()).is_some());
    }
}

#[test]
fn conv_errors_and_fallback() {
    let x = randn(&[1, 4, 5, 5], 1);
    let err = |r: Result<Tensor>| r.unwrap_err().to_string();
    assert!(err(kernels::conv2d(&x, &randn(&[4, 2, 3, 3], 2), 1, 1, 1, 3)).contains("divisible"));
    assert!(
        err(kernels::conv2d(&x, &randn(&[4, 3, 3, 3], 2), 1, 1, 1, 1)).contains("input channels")
    );
    assert!(err(kernels::conv2d(&x, &randn(&[4, 4, 3, 1], 2), 1, 1, 1, 1)).contains("square"));
    assert!(
        err(kernels::conv2d(&x, &randn(&[4, 4, 7, 7], 2), 1, 0, 1, 1)).contains("does not fit")
    );
    // f64 runs Candle's own convolution.
    let (x64, w64) = (
        x.to_dtype(DType::F64).unwrap(),
        randn(&[4, 1, 3, 3], 3).to_dtype(DType::F64).unwrap(),
    );
    let y = kernels::conv2d(&x64, &w64, 2, 1, 1, 4).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    assert_close(
        "f64",
        &y,
        &reference::conv2d(&x64, &w64, 2, 1, 1, 4).unwrap(),
        1e-12,
    );
}

// ---------------------------------------------------------------- batch norm

fn bn_inputs(shape: &[usize], seed: u64) -> [Tensor; 3] {
    let c = shape[1];
    let x = (randn(shape, seed) * 2.0)
        .unwrap()
        .affine(1.0, 0.5)
        .unwrap();
    [x, randn(&[c], seed + 1), randn(&[c], seed + 2)]
}

#[test]
fn batch_norm_train_matches_composition_and_finite_differences() {
    for shape in [[3, 5, 7, 9], [1, 4, 3, 5], [6, 3, 1, 1]] {
        let ours = |t: &[Tensor]| Ok(kernels::batch_norm_train(&t[0], &t[1], &t[2], 1e-5)?.0);
        let stock = |t: &[Tensor]| Ok(reference::batch_norm_train(&t[0], &t[1], &t[2], 1e-5)?.0);
        let inputs = bn_inputs(&shape, 1);
        check_op(
            &format!("batch norm {shape:?}"),
            &ours,
            &stock,
            &inputs,
            (6, 1e-2, 3e-3),
        );
        let (_, mean, var) =
            kernels::batch_norm_train(&inputs[0], &inputs[1], &inputs[2], 1e-5).unwrap();
        let (_, mean_ref, var_ref) =
            reference::batch_norm_train(&inputs[0], &inputs[1], &inputs[2], 1e-5).unwrap();
        assert_eq!(mean.dims(), [shape[1]]);
        assert_close("batch mean", &mean, &mean_ref, 1e-6);
        assert_close("batch variance (biased)", &var, &var_ref, 1e-5);
    }
}

/// Batch statistics far from zero and with a small spread (where a one-pass variance would
/// cancel) match a two-pass f64 computation.
#[test]
fn batch_norm_statistics_hold_far_from_zero() {
    let shape = [16, 3, 12, 12];
    for (offset, spread) in [(30.0, 0.05), (-200.0, 3.0), (0.0, 1e-3), (1e4, 1.0)] {
        let x = (randn(&shape, 7) * spread)
            .unwrap()
            .affine(1.0, offset)
            .unwrap();
        let c = shape[1];
        let (gamma, beta) = (
            Tensor::ones(c, DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(c, DType::F32, &Device::Cpu).unwrap(),
        );
        let (y, mean, var) = kernels::batch_norm_train(&x, &gamma, &beta, 1e-5).unwrap();
        let xv = values(&x);
        let plane = shape[2] * shape[3];
        let (mean, var) = (values(&mean), values(&var));
        for ch in 0..c {
            let vals: Vec<f64> = (0..shape[0])
                .flat_map(|s| {
                    xv[(s * c + ch) * plane..(s * c + ch + 1) * plane]
                        .iter()
                        .map(|&v| v as f64)
                })
                .collect();
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            let v = vals.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / vals.len() as f64;
            let what = format!("offset {offset} spread {spread} channel {ch}");
            assert!(
                (mean[ch] as f64 - m).abs() <= 1e-6 * (1.0 + m.abs()),
                "{what}: mean {} vs {m}",
                mean[ch]
            );
            assert!(
                (var[ch] as f64 - v).abs() <= 1e-4 * v,
                "{what}: variance {} vs {v}",
                var[ch]
            );
        }
        assert!(
            values(&y).iter().all(|v| v.is_finite() && v.abs() < 10.0),
            "offset {offset}"
        );
    }
}

#[test]
fn batch_norm_train_non_contiguous_frozen_affine_and_errors() {
    let ours =
        |t: &[Tensor]| Ok(kernels::batch_norm_train(&t[0].transpose(2, 3)?, &t[1], &t[2], 1e-3)?.0);
    let stock = |t: &[Tensor]| {
        Ok(reference::batch_norm_train(&t[0].transpose(2, 3)?, &t[1], &t[2], 1e-3)?.0)
    };
    check_op(
        "non-contiguous batch norm",
        &ours,
        &stock,
        &bn_inputs(&[2, 3, 9, 7], 4),
        (6, 1e-2, 3e-3),
    );

    // Gamma and beta frozen: only the input gets a gradient.
    let [x, gamma, beta] = bn_inputs(&[2, 3, 4, 5], 5);
    let xv = Var::from_tensor(&x).unwrap();
    let (y, _, _) = kernels::batch_norm_train(xv.as_tensor(), &gamma, &beta, 1e-5).unwrap();
    let store = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(store.get(&gamma).is_none() && store.get(&beta).is_none());
    assert!(store.get(xv.as_tensor()).is_some());

    let one = bn_inputs(&[1, 3, 1, 1], 6);
    let e = kernels::batch_norm_train(&one[0], &one[1], &one[2], 1e-5).unwrap_err();
    assert!(e.to_string().contains("more than one value"), "{e}");
    assert!(kernels::batch_norm_train(&x, &randn(&[4], 1), &beta, 1e-5).is_err());

    // f64 runs the composition.
    let [x, g, b] = bn_inputs(&[2, 3, 4, 5], 7).map(|t| t.to_dtype(DType::F64).unwrap());
    let (y, mean, _) = kernels::batch_norm_train(&x, &g, &b, 1e-5).unwrap();
    assert_eq!((y.dtype(), mean.dtype()), (DType::F64, DType::F64));
}

#[test]
fn batch_norm_eval_matches_composition() {
    let ours = |t: &[Tensor]| kernels::batch_norm_eval(&t[0].transpose(2, 3)?, &t[1], &t[2]);
    let stock = |t: &[Tensor]| reference::batch_norm_eval(&t[0].transpose(2, 3)?, &t[1], &t[2]);
    check_op(
        "batch norm eval",
        &ours,
        &stock,
        &bn_inputs(&[2, 5, 9, 7], 8),
        (6, 0.5, 2e-4),
    );
}

// ---------------------------------------------------------------- activations

/// Values in [-8, 8] at least 0.05 away from every kink.
fn away_from_kinks(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            loop {
                let x = (rng.uniform() * 16.0 - 8.0) as f32;
                if [-3f32, 0.0, 3.0, 6.0].iter().all(|k| (x - k).abs() > 0.05) {
                    break x;
                }
            }
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

type Act = fn(&Tensor) -> Result<Tensor>;

fn stock_relu(x: &Tensor) -> Result<Tensor> {
    x.relu()
}

const ACTIVATIONS: [(&str, Act, Act); 4] = [
    ("relu", kernels::relu, stock_relu),
    ("relu6", kernels::relu6, reference::relu6),
    ("hardsigmoid", kernels::hardsigmoid, reference::hardsigmoid),
    ("hardswish", kernels::hardswish, reference::hardswish),
];

#[test]
fn activations_match_composition_and_finite_differences() {
    for (name, ours, stock) in ACTIVATIONS {
        // Non-contiguous: a transposed view.
        let o = move |t: &[Tensor]| ours(&t[0].transpose(1, 3)?);
        let s = move |t: &[Tensor]| stock(&t[0].transpose(1, 3)?);
        let x = away_from_kinks(&[2, 9, 5, 7], 1);
        check_op(name, &o, &s, &[x], (20, 1e-2, 1e-3));
    }
}

#[test]
fn activation_gradients_at_the_kinks_follow_pytorch() {
    // From PyTorch 2.x: x.grad of f(x).sum() at these points.
    // Includes the floats next to -3 and 3, where a composed clamp can meet a rounding tie.
    let xs = [
        -3.5f32, -3.0, -2.9999998, -2.0, 0.0, 2.9999998, 3.0, 3.5, 6.0, 7.0,
    ];
    let expected: [(&str, Act, [f32; 10], [f32; 10]); 3] = [
        (
            "relu6",
            kernels::relu6,
            [0.0, 0.0, 0.0, 0.0, 0.0, 2.9999998, 3.0, 3.5, 6.0, 6.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0],
        ),
        (
            "hardsigmoid",
            kernels::hardsigmoid,
            [
                0.0,
                0.0,
                3.973643e-8,
                1.0 / 6.0,
                0.5,
                1.0,
                1.0,
                1.0,
                1.0,
                1.0,
            ],
            [
                0.0,
                0.0,
                1.0 / 6.0,
                1.0 / 6.0,
                1.0 / 6.0,
                1.0 / 6.0,
                0.0,
                0.0,
                0.0,
                0.0,
            ],
        ),
        (
            "hardswish",
            kernels::hardswish,
            [
                0.0,
                0.0,
                -1.1920928e-7,
                -1.0 / 3.0,
                0.0,
                2.9999998,
                3.0,
                3.5,
                6.0,
                7.0,
            ],
            [
                0.0,
                0.0,
                -0.49999994,
                -1.0 / 6.0,
                0.5,
                1.5,
                1.0,
                1.0,
                1.0,
                1.0,
            ],
        ),
    ];
    for (name, f, y_want, g_want) in expected {
        let x = Var::new(&xs[..], &Device::Cpu).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let (y, g) = (values(&y), values(g.get(x.as_tensor()).unwrap()));
        for i in 0..xs.len() {
            assert!(
                (y[i] - y_want[i]).abs() < 1e-6,
                "{name}({}) = {}",
                xs[i],
                y[i]
            );
            assert!(
                (g[i] - g_want[i]).abs() < 1e-6,
                "{name}'({}) = {}",
                xs[i],
                g[i]
            );
        }
        let nan = f(&Tensor::new(&[f32::NAN], &Device::Cpu).unwrap()).unwrap();
        assert!(values(&nan)[0].is_nan(), "{name} keeps NaN");
        // f64 runs the composition.
        let x64 = Tensor::new(&[-4.0f64, -1.0, 2.0, 7.0], &Device::Cpu).unwrap();
        assert_eq!(f(&x64).unwrap().dtype(), DType::F64);
    }
}

// ---------------------------------------------------------------- channel shuffle

#[test]
fn channel_shuffle_matches_composition_and_inverts() {
    for groups in [1, 2, 3, 6] {
        let ours = move |t: &[Tensor]| kernels::channel_shuffle(&t[0].transpose(2, 3)?, groups);
        let stock = move |t: &[Tensor]| reference::channel_shuffle(&t[0].transpose(2, 3)?, groups);
        check_op(
            "channel shuffle",
            &ours,
            &stock,
            &[randn(&[2, 6, 5, 3], 1)],
            (6, 0.5, 1e-4),
        );
        let x = randn(&[2, 6, 3, 5], 2);
        let back =
            kernels::channel_shuffle(&kernels::channel_shuffle(&x, groups).unwrap(), 6 / groups);
        assert_eq!(values(&back.unwrap()), values(&x));
    }
    assert!(kernels::channel_shuffle(&randn(&[1, 6, 2, 2], 1), 4).is_err());
    let x64 = randn(&[1, 6, 2, 2], 3).to_dtype(DType::F64).unwrap();
    let (ours, stock) = (
        kernels::channel_shuffle(&x64, 2).unwrap(),
        reference::channel_shuffle(&x64, 2).unwrap(),
    );
    assert_eq!(ours.dtype(), DType::F64);
    assert_eq!(values(&ours), values(&stock));
}

#[test]
fn relu_gradient_is_zero_at_zero_and_nan_propagates() {
    let x = Tensor::new(&[-1f32, 0.0, 2.0, f32::NAN], &Device::Cpu).unwrap();
    let var = Var::from_tensor(&x).unwrap();
    let y = kernels::relu(var.as_tensor()).unwrap();
    let v = values(&y);
    assert_eq!(&v[..3], &[0.0, 0.0, 2.0]);
    assert!(v[3].is_nan());
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(
        &values(g.get(var.as_tensor()).unwrap())[..3],
        &[0.0, 0.0, 1.0]
    );
}

#[test]
fn channel_bias_matches_broadcast_add_and_finite_differences() {
    let ours = |t: &[Tensor]| kernels::add_channel_bias(&t[0].transpose(2, 3)?, &t[1]);
    let stock = |t: &[Tensor]| {
        t[0].transpose(2, 3)?
            .broadcast_add(&t[1].reshape((1, (), 1, 1))?)
    };
    for shape in [[2, 5, 7, 9], [1, 3, 1, 1]] {
        let x = randn(&shape, 3);
        let b = randn(&[shape[1]], 4);
        check_op("channel bias", &ours, &stock, &[x, b], (20, 1e-2, 1e-3));
    }
    // Flat inputs (a linear layer's output) take the same path.
    let flat = |t: &[Tensor]| kernels::add_channel_bias(&t[0], &t[1]);
    let flat_stock = |t: &[Tensor]| t[0].broadcast_add(&t[1]);
    check_op(
        "channel bias (N x C)",
        &flat,
        &flat_stock,
        &[randn(&[4, 6], 5), randn(&[6], 6)],
        (10, 1e-2, 1e-3),
    );
}
