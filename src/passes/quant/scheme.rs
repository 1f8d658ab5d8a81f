//! The int8 scheme's formulas (`docs/quantization.md`), shared by the pass, the simulation and
//! the integer engine so that all three round the same way.
//!
//! Activations are uint8 affine per tensor, `real = scale * (q - zero_point)`; weights are
//! int8 symmetric (zero point 0, values in [-127, 127]) per output channel or per tensor;
//! biases are int32 at the accumulator's scale `in_scale * w_scale[c]`. Every rounding is
//! round-half-to-even (`f32::round_ties_even`, the default mode of `_mm_cvtps_epi32`).

pub use crate::kernels::int8::elementwise::AddParams;
use serde::{Deserialize, Serialize};

/// The smallest range an activation gets: a tensor observed as all zeros (a dead channel
/// group, a ReLU that never fires on the calibration set) would otherwise get scale 0 and
/// divide by zero. `[0, 2^-20]` keeps 0.0 exact, zero point 0, and a scale (~3.7e-9) far
/// above f32's subnormals, so `1 / scale` and products of scales stay finite and normal.
pub const MIN_RANGE: f32 = 1.0 / (1u32 << 20) as f32;

/// The largest int8 weight magnitude: -128 is never used, so the range is symmetric.
pub const WEIGHT_QMAX: i32 = 127;

/// An activation's affine uint8 parameters: `real = scale * (q - zero_point)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QParams {
    /// Real value of one quantization step; always finite and > 0.
    pub scale: f32,
    /// The code of real 0.0 (exact by construction), in [0, 255].
    pub zero_point: u8,
}

impl QParams {
    /// The parameters for an observed range `[min, max]`. The range is first widened to
    /// include 0 (so zero padding is exactly `zero_point`), and to at least [`MIN_RANGE`];
    /// then `scale = (max - min) / 255` and `zero_point = round_half_even(-min / scale)`
    /// clamped to [0, 255].
    pub fn from_range(min: f32, max: f32) -> QParams {
        // A NaN carries no range; infinities are capped so that `max - min` stays finite.
        let finite = |v: f32| {
            if v.is_nan() {
                0.0
            } else {
                v.clamp(-f32::MAX / 2.0, f32::MAX / 2.0)
            }
        };
        let (min, mut max) = (finite(min).min(0.0), finite(max).max(0.0));
        if max - min < MIN_RANGE {
            max = min + MIN_RANGE;
        }
        let scale = (max - min) / 255.0;
        let zero_point = (-min / scale).round_ties_even().clamp(0.0, 255.0) as u8;
        QParams { scale, zero_point }
    }

    /// `clamp(round_half_even(x / scale) + zero_point, 0, 255)`, as ONNX QuantizeLinear.
    pub fn quantize(&self, x: f32) -> u8 {
        ((x / self.scale).round_ties_even() + self.zero_point as f32).clamp(0.0, 255.0) as u8
    }

    /// `scale * (q - zero_point)`, as ONNX DequantizeLinear.
    pub fn dequantize(&self, q: u8) -> f32 {
        self.scale * (q as i32 - self.zero_point as i32) as f32
    }

    /// The real interval the 256 codes cover.
    pub fn range(&self) -> (f32, f32) {
        (self.dequantize(0), self.dequantize(255))
    }
}

/// Weights quantized to int8 per output channel or per tensor (symmetric, zero point 0):
/// `real = scales[c] * values[i]` for element `i` of output channel `c`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    /// The codes in the float weight's layout (`[out, in/groups, k, k]` for a conv, `[out, in]`
    /// for a linear layer, row-major), each in [-127, 127].
    pub values: Vec<i8>,
    /// The float weight's shape; axis 0 is the output channel.
    pub shape: Vec<usize>,
    /// One scale per output channel (`shape[0]` of them), or a single one for per-tensor
    /// quantization. Always > 0: `max|w| / 127`, or 1.0 for an all-zero channel.
    pub scales: Vec<f32>,
}

impl QuantizedWeight {
    /// Quantizes a float weight of `shape` (axis 0 = output channel): per channel when
    /// `per_channel`, otherwise one scale for the tensor.
    /// `q = clamp(round_half_even(w / scale), -127, 127)`.
    pub fn quantize(w: &[f32], shape: &[usize], per_channel: bool) -> QuantizedWeight {
        let out = shape.first().copied().unwrap_or(1).max(1);
        let per = w.len() / out;
        let scale_of = |vals: &[f32]| {
            let m = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
            if m > 0.0 && m.is_finite() {
                m / WEIGHT_QMAX as f32
            } else {
                1.0
            }
        };
        let scales: Vec<f32> = if per_channel {
            w.chunks(per.max(1)).map(scale_of).collect()
        } else {
            vec![scale_of(w)]
        };
        let values = w
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let s = scales[if per_channel { i / per.max(1) } else { 0 }];
                quantize_weight_value(v, s)
            })
            .collect();
        QuantizedWeight {
            values,
            shape: shape.to_vec(),
            scales,
        }
    }

    /// Number of output channels.
    pub fn out_channels(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// The scale of output channel `c`.
    pub fn scale(&self, c: usize) -> f32 {
        if self.scales.len() == 1 {
            self.scales[0]
        } else {
            self.scales[c]
        }
    }

    /// Elements per output channel (`in/groups * k * k`, or `in` for a linear layer).
    pub fn per_channel_len(&self) -> usize {
        self.values.len() / self.out_channels().max(1)
    }

    /// The weight as real values (`scale[c] * q`), in its layout.
    pub fn dequantized(&self) -> Vec<f32> {
        let per = self.per_channel_len().max(1);
        self.values
            .iter()
            .enumerate()
            .map(|(i, &q)| self.scale(i / per) * q as f32)
            .collect()
    }
}

/// One weight value's code for `scale`.
pub fn quantize_weight_value(w: f32, scale: f32) -> i8 {
    (w / scale)
        .round_ties_even()
        .clamp(-(WEIGHT_QMAX as f32), WEIGHT_QMAX as f32) as i8
}

/// `round_half_even(bias / (in_scale * w_scale))`, the product computed in f32 first (as
/// onnxruntime's quantizer does), saturated to the i32 range.
pub fn quantize_bias(bias: f32, in_scale: f32, w_scale: f32) -> i32 {
    let q = (bias / (in_scale * w_scale)).round_ties_even();
    q.clamp(i32::MIN as f32, i32::MAX as f32) as i32
}

/// The requantization multiplier of a conv or linear output channel,
/// `in_scale * w_scale / out_scale`, evaluated left to right in f32.
pub fn multiplier(in_scale: f32, w_scale: f32, out_scale: f32) -> f32 {
    in_scale * w_scale / out_scale
}

/// `clamp(round_half_even(v * mult) + zero_point, qmin, qmax)`: an accumulator (plus bias)
/// brought to the output's uint8 codes.
pub fn requantize(v: i32, mult: f32, zero_point: u8, qmin: u8, qmax: u8) -> u8 {
    ((v as f32 * mult).round_ties_even() + zero_point as f32).clamp(qmin as f32, qmax as f32) as u8
}

/// The residual add's constants as MLAS's x86 QLinearAdd kernel (AVX2, also taken on AVX-512
/// machines; onnxruntime 1.32) computes them: `fa = a_s / y_s`, `fb = b_s / y_s` and the zero
/// points folded into `offset = y_zp - fma(fa, a_zp, fb * b_zp)`, all f32. Why this and not
/// `fa * (a - a_zp) + fb * (b - b_zp)`: the two round differently near a half step, and one
/// code apart in a residual add grows through a deep network (MobileNet V2's exports
/// disagreed with onnxruntime by up to 7 output steps). The FMA in `offset` was measured, not
/// read: onnxruntime's build contracts `fa * a_zp + fb * b_zp` so, and an unfused sum or the
/// other contraction gives other codes (`tests/int8_engine.rs` pins cases).
pub fn add_params(a: QParams, b: QParams, y: QParams, qmin: u8, qmax: u8) -> AddParams {
    let (fa, fb) = (a.scale / y.scale, b.scale / y.scale);
    let offset = y.zero_point as f32 - fa.mul_add(a.zero_point as f32, fb * b.zero_point as f32);
    AddParams {
        fa,
        fb,
        offset,
        qmin,
        qmax,
    }
}

/// One output code of the residual add:
/// `clamp(round_half_even(fma(a, fa, fma(b, fb, offset))), qmin, qmax)` (see [`add_params`]).
pub fn add(qa: u8, qb: u8, p: &AddParams) -> u8 {
    let v = (qa as f32).mul_add(p.fa, (qb as f32).mul_add(p.fb, p.offset));
    v.round_ties_even().clamp(p.qmin as f32, p.qmax as f32) as u8
}

/// The code range of an output with `out` qparams after a fused activation: ReLU narrows
/// `qmin` to the zero point, ReLU6 also `qmax` to `min(255, zp + round(6 / scale))`
/// (`round` here is half-to-even too). `None` (no fused activation) gives [0, 255].
pub fn clamp_range(out: QParams, fused: Option<crate::graph::Activation>) -> (u8, u8) {
    use crate::graph::Activation;
    match fused {
        Some(Activation::Relu) => (out.zero_point, 255),
        Some(Activation::Relu6) => {
            let six = (6.0 / out.scale).round_ties_even();
            let qmax = (out.zero_point as f32 + six).min(255.0) as u8;
            (out.zero_point, qmax)
        }
        _ => (0, 255),
    }
}

/// The 256-entry table of an activation function applied between two quantized tensors:
/// `lut[q] = output.quantize(f(input.dequantize(q)))`, `f` in f32 (what a QDQ graph computes
/// between DequantizeLinear and QuantizeLinear).
pub fn lookup_table(input: QParams, output: QParams, f: impl Fn(f32) -> f32) -> [u8; 256] {
    let mut lut = [0u8; 256];
    for (q, slot) in lut.iter_mut().enumerate() {
        *slot = output.quantize(f(input.dequantize(q as u8)));
    }
    lut
}

/// An activation function on one real value, as the float executor computes it.
pub fn activation_fn(act: crate::graph::Activation) -> fn(f32) -> f32 {
    use crate::graph::Activation;
    match act {
        Activation::Relu => |x| x.max(0.0),
        Activation::Relu6 => |x| x.clamp(0.0, 6.0),
        Activation::Hardswish => |x| x * (x + 3.0).clamp(0.0, 6.0) / 6.0,
        Activation::Hardsigmoid => |x| (x + 3.0).clamp(0.0, 6.0) / 6.0,
        Activation::Sigmoid => |x| 1.0 / (1.0 + (-x).exp()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Activation;

    #[test]
    fn qparams_from_range_by_hand() {
        // [-1, 3]: scale 4/255, zero point round(1 / (4/255)) = round(63.75) = 64.
        let q = QParams::from_range(-1.0, 3.0);
        assert_eq!(q.scale, 4.0 / 255.0);
        assert_eq!(q.zero_point, 64);
        // A range that excludes 0 is widened to include it.
        let q = QParams::from_range(2.0, 5.1);
        assert_eq!((q.scale, q.zero_point), (5.1 / 255.0, 0));
        let q = QParams::from_range(-5.1, -2.0);
        assert_eq!((q.scale, q.zero_point), (5.1 / 255.0, 255));
        // Degenerate: all zeros gets the guard range.
        let q = QParams::from_range(0.0, 0.0);
        assert_eq!((q.scale, q.zero_point), (MIN_RANGE / 255.0, 0));
        assert!(q.scale > 0.0 && q.scale.is_normal());
        // 0.0 is exact.
        for (lo, hi) in [(-1.0, 3.0), (-0.37, 11.2), (-7.0, 0.01)] {
            let q = QParams::from_range(lo, hi);
            assert_eq!(q.dequantize(q.quantize(0.0)), 0.0);
        }
    }

    #[test]
    fn quantize_rounds_half_to_even_and_saturates() {
        let q = QParams {
            scale: 0.5,
            zero_point: 10,
        };
        // 0.25 / 0.5 = 0.5 -> 0; 0.75 / 0.5 = 1.5 -> 2; -0.25 -> -0.5 -> -0.
        assert_eq!(q.quantize(0.25), 10);
        assert_eq!(q.quantize(0.75), 12);
        assert_eq!(q.quantize(-0.25), 10);
        assert_eq!(q.quantize(1000.0), 255);
        assert_eq!(q.quantize(-1000.0), 0);
        assert_eq!(q.dequantize(14), 2.0);
        assert_eq!(q.range(), (-5.0, 122.5));
    }

    #[test]
    fn weights_per_channel_and_per_tensor_by_hand() {
        // Two output channels of two values each.
        let w = [0.5, -1.27, 0.0, 0.0];
        let q = QuantizedWeight::quantize(&w, &[2, 2], true);
        assert_eq!(q.scales, vec![1.27 / 127.0, 1.0]);
        // 0.5 / 0.01 = 50 (to f32 rounding), -1.27 -> -127, the zero channel stays 0.
        assert_eq!(q.values, vec![50, -127, 0, 0]);
        let q = QuantizedWeight::quantize(&[2.54, -0.01, 0.03, 1.0], &[2, 2], false);
        assert_eq!(q.scales, vec![0.02]);
        // -0.5 -> -0 (even), 1.5 -> 2, 50.
        assert_eq!(q.values, vec![127, 0, 2, 50]);
        assert_eq!(q.scale(1), 0.02);
        assert_eq!(q.per_channel_len(), 2);
        // -128 never appears: a value beyond the max (impossible from max|w|) saturates at -127.
        assert_eq!(quantize_weight_value(-3.0, 0.01), -127);
    }

    #[test]
    fn bias_multiplier_and_requantize_by_hand() {
        // bias 0.3 at in_scale 0.1, w_scale 0.02: 0.3 / 0.002 = 150.
        assert_eq!(quantize_bias(0.3, 0.1, 0.02), 150);
        assert_eq!(quantize_bias(-0.001, 0.1, 0.02), 0); // -0.5 -> -0
        assert_eq!(quantize_bias(-0.003, 0.1, 0.02), -2); // -1.5 -> -2
        assert_eq!(multiplier(0.1, 0.02, 0.5), 0.1f32 * 0.02 / 0.5);
        // 25 * 0.1 = 2.5 -> 2, + zp 3 = 5; 35 * 0.1 = 3.5 -> 4 -> 7.
        assert_eq!(requantize(25, 0.1, 3, 0, 255), 5);
        assert_eq!(requantize(35, 0.1, 3, 0, 255), 7);
        assert_eq!(requantize(-100, 0.1, 3, 0, 255), 0);
        assert_eq!(requantize(-100, 0.1, 3, 3, 255), 3);
        assert_eq!(requantize(100_000, 0.1, 3, 0, 255), 255);
    }

    #[test]
    fn fused_activation_clamp_ranges() {
        let q = QParams {
            scale: 0.05,
            zero_point: 20,
        };
        assert_eq!(clamp_range(q, None), (0, 255));
        assert_eq!(clamp_range(q, Some(Activation::Relu)), (20, 255));
        // 6 / 0.05 = 120 -> qmax 140.
        assert_eq!(clamp_range(q, Some(Activation::Relu6)), (20, 140));
        let wide = QParams {
            scale: 0.01,
            zero_point: 0,
        };
        assert_eq!(clamp_range(wide, Some(Activation::Relu6)), (0, 255));
        assert_eq!(clamp_range(q, Some(Activation::Hardswish)), (0, 255));
    }

    #[test]
    fn lookup_table_is_quantize_of_f_of_dequantize() {
        let inp = QParams::from_range(-4.0, 4.0);
        let out = QParams::from_range(-0.5, 4.0);
        let lut = lookup_table(inp, out, activation_fn(Activation::Hardswish));
        for q in 0..=255u8 {
            let x = inp.dequantize(q);
            let y = x * (x + 3.0).clamp(0.0, 6.0) / 6.0;
            assert_eq!(lut[q as usize], out.quantize(y));
        }
        assert_eq!(lut[inp.zero_point as usize], out.zero_point);
    }
}
