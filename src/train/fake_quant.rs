//! Fake quantization for the train-step executor: what quantization-aware training
//! (`qat.rs`) asks of one step, and the fake-quant op with its straight-through gradient.
//!
//! A fake-quantized activation is `dequantize(quantize(x))` with the tensor's uint8 qparams
//! (`passes::quant::scheme::QParams`, the same rounding as the simulation). Its gradient is
//! the straight-through estimator: 1 where `x` lies inside the codes' range (the rounding is
//! treated as the identity), 0 where quantization clips it.

use crate::passes::quant::QParams;
use std::collections::HashMap;

/// What the step fake-quantizes, decided per step by [`super::qat::QatState`].
#[derive(Debug, Clone, Default)]
pub struct FakeQuant {
    /// Per node of the training graph: the qparams its output is fake-quantized with (the
    /// points the int8 plan quantizes), `None` where the value passes unchanged.
    pub outputs: Vec<Option<QParams>>,
    /// Fake-quantized weights that replace the parameters of these names in the forward and
    /// backward passes; their gradient goes to the float weight unchanged (straight through).
    pub weights: HashMap<String, Vec<f32>>,
    /// Batch norm runs on its running statistics (not updated), as folded at export.
    pub frozen_bn: bool,
}

/// Fake-quantizes `values` in place with `q` and returns the straight-through mask (1 where
/// the value was inside the codes' range, 0 where it was clipped) and the values' min and max
/// before quantization (what the observers track).
pub fn fake_quantize(values: &mut [f32], q: QParams) -> (Vec<f32>, (f32, f32)) {
    // The codes 0..=255 as steps from the zero point.
    let (lo, hi) = (-(q.zero_point as f32), 255.0 - q.zero_point as f32);
    let mut mask = Vec::with_capacity(values.len());
    let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
    for v in values.iter_mut() {
        min = min.min(*v);
        max = max.max(*v);
        let steps = (*v / q.scale).round_ties_even();
        let inside = (lo..=hi).contains(&steps);
        mask.push(if inside { 1.0 } else { 0.0 });
        *v = q.scale * steps.clamp(lo, hi);
    }
    (mask, (min, max))
}

/// `dequantize(quantize(x))` for one value: exactly what [`fake_quantize`] writes, and what
/// the simulation's codes mean (`QParams::dequantize(QParams::quantize(x))`).
pub fn fake_quantize_value(x: f32, q: QParams) -> f32 {
    q.dequantize(q.quantize(x))
}

/// The fake-quantized weight of a conv or linear layer whose output channels are scaled by
/// `fold[c]` at export (batch-norm folding; 1 without batch norm): the folded weight
/// `w * fold[c]` is quantized as the plan quantizes it (per channel or per tensor), then
/// divided by `fold[c]` again, so that the training graph's batch norm restores what the
/// integer model computes. A channel whose fold factor is 0 or not finite is left as is (its
/// folded weight is 0, whatever the codes).
pub fn fake_quantize_weight(
    w: &[f32],
    shape: &[usize],
    fold: &[f32],
    per_channel: bool,
) -> Vec<f32> {
    use crate::passes::quant::QuantizedWeight;
    let out = shape.first().copied().unwrap_or(1).max(1);
    let per = w.len() / out;
    let usable = |s: f32| s != 0.0 && s.is_finite();
    let folded: Vec<f32> = w
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let s = fold[i / per.max(1)];
            if usable(s) { v * s } else { 0.0 }
        })
        .collect();
    let q = QuantizedWeight::quantize(&folded, shape, per_channel);
    q.dequantized()
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let s = fold[i / per.max(1)];
            if usable(s) { v / s } else { w[i] }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_quantize_matches_quantize_then_dequantize() {
        let q = QParams::from_range(-1.0, 3.0);
        let mut v: Vec<f32> = (-60..=60).map(|i| i as f32 * 0.071).collect();
        let want: Vec<f32> = v.iter().map(|&x| fake_quantize_value(x, q)).collect();
        let orig = v.clone();
        let (mask, (min, max)) = fake_quantize(&mut v, q);
        assert_eq!(v, want);
        assert_eq!((min, max), (orig[0], orig[orig.len() - 1]));
        let (lo, hi) = q.range();
        for (x, m) in orig.iter().zip(&mask) {
            // Inside the range up to half a step on each side, the gradient passes.
            let inside = *x >= lo - q.scale / 2.0 && *x <= hi + q.scale / 2.0;
            assert_eq!(*m == 1.0, inside, "x = {x}");
        }
    }

    /// The straight-through gradient is the derivative of the clipping the rounding sits in:
    /// central finite differences of `clamp(x, lo, hi)` (the codes' range widened by half a
    /// step, where rounding still lands on an end code) give 1 inside and 0 outside.
    #[test]
    fn straight_through_gradient_against_finite_differences_of_the_clipping() {
        let q = QParams::from_range(-0.5, 2.0);
        let (lo, hi) = (
            q.scale * (-(q.zero_point as f32) - 0.5),
            q.scale * (255.0 - q.zero_point as f32 + 0.5),
        );
        let clip = |x: f64| x.clamp(lo as f64, hi as f64);
        let h = 1e-4;
        let xs: Vec<f32> = (-40..=40).map(|i| 0.0371 + i as f32 * 0.0713).collect();
        let mut v = xs.clone();
        let (mask, _) = fake_quantize(&mut v, q);
        let (mut inside, mut outside) = (0, 0);
        for (&x, &m) in xs.iter().zip(&mask) {
            let x = x as f64;
            if (x - lo as f64).abs() < 2.0 * h || (x - hi as f64).abs() < 2.0 * h {
                continue;
            }
            let fd = (clip(x + h) - clip(x - h)) / (2.0 * h);
            assert!(
                (fd - m as f64).abs() < 1e-6,
                "x = {x}: mask {m}, finite difference {fd}"
            );
            if m == 1.0 { inside += 1 } else { outside += 1 }
        }
        assert!(
            inside > 20 && outside > 20,
            "{inside} inside, {outside} outside"
        );
    }

    #[test]
    fn fake_quantized_weight_equals_the_folded_weights_codes_unfolded() {
        let w = [0.5, -1.0, 0.25, 2.0, -0.3, 0.1];
        let fold = [2.0, -0.5];
        let fq = fake_quantize_weight(&w, &[2, 3], &fold, true);
        let folded: Vec<f32> = w.iter().enumerate().map(|(i, v)| v * fold[i / 3]).collect();
        let q = crate::passes::quant::QuantizedWeight::quantize(&folded, &[2, 3], true);
        for (i, (a, b)) in fq.iter().zip(q.dequantized()).enumerate() {
            assert!(
                (a * fold[i / 3] - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{i}"
            );
        }
        // A zero fold factor leaves the channel alone.
        assert_eq!(
            fake_quantize_weight(&w, &[2, 3], &[0.0, 1.0], true)[..3],
            w[..3]
        );
    }
}
