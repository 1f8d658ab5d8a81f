//! Calibration: observing activation tensors over calibration images, and the calibrators
//! that turn each tensor's histogram into the range its qparams cover.

use super::histogram::{BINS, Histogram};
use super::model::Calibrator;
use crate::exec;
use crate::graph::{Graph, Op};
use crate::model::Model;
use anyhow::Result;
use candle_core::{DType, Tensor};

/// One histogram per node of a (batch-norm-folded) graph, filled batch by batch.
pub struct Observers {
    /// Per node: `Some` for the nodes whose range the plan reads (see [`needs_observation`]).
    pub histograms: Vec<Option<Histogram>>,
    /// Number of images observed.
    pub images: usize,
}

/// Whether a node's own range is used by the plan. Pass-through ops and concat never widen
/// their inputs' ranges (max pooling never selects padding), and a conv, linear or add with a
/// fused ReLU/ReLU6 takes its activation's range, so observing them would only cost time.
pub fn needs_observation(graph: &Graph, fused: &[Option<crate::graph::Activation>]) -> Vec<bool> {
    graph
        .nodes
        .iter()
        .enumerate()
        .map(|(id, node)| {
            !super::plan::is_pass_through(&node.op)
                && !matches!(node.op, Op::Concat)
                && fused[id].is_none()
        })
        .collect()
}

impl Observers {
    pub fn new(graph: &Graph) -> Observers {
        let fused = super::model::fused_activations(graph);
        Observers {
            histograms: needs_observation(graph, &fused)
                .into_iter()
                .map(|o| o.then(Histogram::default))
                .collect(),
            images: 0,
        }
    }

    /// Runs `model` (batch norm folded) on the batch `x` (N x C x H x W, preprocessed) and
    /// adds every observed node's output to its histogram.
    pub fn observe(&mut self, model: &Model, x: &Tensor) -> Result<()> {
        let histograms = &mut self.histograms;
        let mut tap = |id: usize, value: &Tensor| -> Result<()> {
            if let Some(h) = histograms[id].as_mut() {
                let v: Vec<f32> = value.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                h.observe(&v);
            }
            Ok(())
        };
        exec::forward_eval_tapped(&model.graph, &model.weights, x, &mut tap)?;
        self.images += x.dim(0)?;
        Ok(())
    }
}

/// The range `calibrator` picks for a tensor observed as `hist`, before the scheme widens it
/// to include 0. An empty histogram gives [0, 0] (the scheme's guard range applies).
pub fn calibrated_range(hist: &Histogram, calibrator: Calibrator) -> (f32, f32) {
    if hist.is_empty() {
        return (0.0, 0.0);
    }
    match calibrator {
        Calibrator::Minmax => (hist.min, hist.max),
        Calibrator::Percentile { percentile } => {
            let q = percentile / 100.0;
            (hist.quantile(1.0 - q), hist.quantile(q))
        }
        Calibrator::Mse => mse_range(hist),
        Calibrator::Entropy => entropy_range(hist),
    }
}

/// The real value of bin edge `i`.
fn edge(hist: &Histogram, i: usize) -> f32 {
    (hist.lo + i as f64 * hist.width) as f32
}

/// Expected squared quantization error (times the count) of the histogram's values, each taken
/// at its bin centre, under the qparams of range `[a, b]`.
fn quantization_error(hist: &Histogram, a: f32, b: f32) -> f64 {
    let q = super::QParams::from_range(a, b);
    hist.counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, &c)| {
            let x = hist.center(i) as f32;
            let e = (x - q.dequantize(q.quantize(x))) as f64;
            c as f64 * e * e
        })
        .sum()
}

/// The clipping range with the least quantization MSE: a greedy search from the full range
/// that moves the lower or the upper edge inward by `BINS / 256` bins, whichever lowers the
/// error more (the lower edge only while it is below 0), keeping the best range seen.
pub fn mse_range(hist: &Histogram) -> (f32, f32) {
    let step = BINS / 256;
    let (mut l, mut r) = (0usize, BINS);
    let mut best = (quantization_error(hist, edge(hist, l), edge(hist, r)), l, r);
    while r - l > 2 * step {
        let can_left = edge(hist, l + step) < 0.0;
        let right = quantization_error(hist, edge(hist, l), edge(hist, r - step));
        let left = if can_left {
            quantization_error(hist, edge(hist, l + step), edge(hist, r))
        } else {
            f64::INFINITY
        };
        let err = if left < right {
            l += step;
            left
        } else {
            r -= step;
            right
        };
        if err < best.0 {
            best = (err, l, r);
        }
    }
    let (_, l, r) = best;
    within_observed(hist, edge(hist, l), edge(hist, r))
}

/// A chosen range kept inside what was observed (never wider than minmax).
fn within_observed(hist: &Histogram, lo: f32, hi: f32) -> (f32, f32) {
    (lo.max(hist.min), hi.min(hist.max))
}

/// Number of quantization intervals of a uint8 range.
const LEVELS: usize = 255;

/// TensorRT's entropy calibration, for asymmetric uint8: the candidate ranges keep `k` of the
/// histogram's bins (k from 255 to all 2048, every 4th), shrunk toward 0 in proportion on
/// both sides (for a non-negative tensor exactly TensorRT's `[0, threshold]`). For each, the
/// reference distribution P is the kept bins with the clipped outliers added to the edge
/// bins; the candidate Q merges the kept bins into 255 intervals and spreads each interval's
/// count evenly over its non-empty bins. The range minimising KL(P || Q) wins. The bin holding
/// 0 is first given its neighbour's count (see below).
pub fn entropy_range(hist: &Histogram) -> (f32, f32) {
    let zero = ((-hist.lo) / hist.width).clamp(0.0, BINS as f64);
    let total: u64 = hist.total();
    if total == 0 {
        return (0.0, 0.0);
    }
    // The spike of exact zeros (every ReLU output that did not fire) would dominate the
    // divergence: merged bins spread it over their neighbours, so the search would prefer
    // ever narrower bins over the data's shape. As NVIDIA's pytorch-quantization does, the
    // zero bin takes its neighbour's count instead.
    let mut counts = hist.counts.clone();
    let zero_bin = (zero as usize).min(BINS - 1);
    let neighbour = if zero_bin + 1 < BINS {
        zero_bin + 1
    } else {
        zero_bin - 1
    };
    counts[zero_bin] = counts[neighbour];
    let mut best = (f64::INFINITY, 0usize, BINS);
    let mut k = BINS;
    while k >= LEVELS {
        let f = k as f64 / BINS as f64;
        let l = ((zero * (1.0 - f)).round() as usize).min(BINS - k);
        let r = l + k;
        let kl = kl_divergence(&counts, l, r);
        if kl < best.0 {
            best = (kl, l, r);
        }
        if k < LEVELS + 4 {
            break;
        }
        k -= 4;
    }
    let (_, l, r) = best;
    within_observed(hist, edge(hist, l), edge(hist, r))
}

/// KL(P || Q) for the kept bins `[l, r)` of `counts`, as described at [`entropy_range`].
fn kl_divergence(counts: &[u64], l: usize, r: usize) -> f64 {
    let k = r - l;
    let kept = &counts[l..r];
    let mut p: Vec<f64> = kept.iter().map(|&c| c as f64).collect();
    p[0] += counts[..l].iter().sum::<u64>() as f64;
    p[k - 1] += counts[r..].iter().sum::<u64>() as f64;
    let mut q = vec![0f64; k];
    for j in 0..LEVELS {
        let (a, b) = (
            j * k / LEVELS,
            ((j + 1) * k / LEVELS).max(j * k / LEVELS + 1),
        );
        let b = b.min(k);
        let group = &kept[a..b];
        let sum: u64 = group.iter().sum();
        let nonzero = group.iter().filter(|&&c| c > 0).count();
        if nonzero == 0 {
            continue;
        }
        let share = sum as f64 / nonzero as f64;
        for (i, &c) in group.iter().enumerate() {
            if c > 0 {
                q[a + i] = share;
            }
        }
    }
    let (ps, qs): (f64, f64) = (p.iter().sum(), q.iter().sum());
    if ps == 0.0 || qs == 0.0 {
        return f64::INFINITY;
    }
    // Bins where P has mass but Q none (the outliers added to an empty edge bin) get a small
    // floor instead of an infinite divergence, as TensorRT's smoothing does.
    const FLOOR: f64 = 1e-4;
    p.iter()
        .zip(&q)
        .filter(|(pi, _)| **pi > 0.0)
        .map(|(pi, qi)| {
            let (pn, qn) = (pi / ps, (qi / qs).max(FLOOR / qs.max(1.0)));
            pn * (pn / qn).ln()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values: &[f32]) -> Histogram {
        let mut h = Histogram::default();
        h.observe(values);
        h
    }

    /// A bulk of values in [0, 1) with a few far outliers at 50.
    fn bulk_with_outliers() -> Vec<f32> {
        let mut v: Vec<f32> = (0..100_000).map(|i| (i % 1000) as f32 / 1000.0).collect();
        v.extend([50.0; 3]);
        v
    }

    #[test]
    fn minmax_is_the_observed_range() {
        assert_eq!(
            calibrated_range(&hist(&[-0.5, 2.0, 1.0]), Calibrator::Minmax),
            (-0.5, 2.0)
        );
    }

    #[test]
    fn percentile_clips_both_tails() {
        let mut v: Vec<f32> = (0..100_000).map(|i| i as f32 / 100_000.0).collect();
        v.extend([-40.0, 40.0]);
        let (lo, hi) = calibrated_range(&hist(&v), Calibrator::Percentile { percentile: 99.9 });
        // 0.1 % of 100,002 values on each side: about 0.001 and 0.999.
        assert!((lo - 0.001).abs() < 0.05, "{lo}");
        assert!((hi - 0.999).abs() < 0.05, "{hi}");
        let (lo, hi) = calibrated_range(&hist(&v), Calibrator::Percentile { percentile: 100.0 });
        assert_eq!((lo, hi), (-40.0, 40.0));
    }

    /// 100,000 random draws of an exponential distribution (a long right tail, max about 11).
    fn long_tail() -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(5);
        (0..100_000)
            .map(|_| -((1.0 - rng.uniform()).ln()) as f32)
            .collect()
    }

    #[test]
    fn mse_clips_a_long_tail_and_keeps_a_dense_range() {
        let h = hist(&long_tail());
        let (lo, hi) = calibrated_range(&h, Calibrator::Mse);
        eprintln!("mse: [{lo}, {hi}] of [{}, {}]", h.min, h.max);
        assert!(lo < 1e-3, "{lo}");
        assert!(hi < h.max && hi > 4.0, "{hi}");
        // A uniform tensor is best left unclipped (within a search step).
        let v: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0).collect();
        let (_, hi) = calibrated_range(&hist(&v), Calibrator::Mse);
        assert!(hi > 0.98, "{hi}");
    }

    #[test]
    fn mse_error_is_lower_than_minmax_on_outliers() {
        let h = hist(&bulk_with_outliers());
        let (lo, hi) = mse_range(&h);
        assert!(quantization_error(&h, lo, hi) <= quantization_error(&h, h.min, h.max));
        let h = hist(&long_tail());
        let (lo, hi) = mse_range(&h);
        assert!(quantization_error(&h, lo, hi) < quantization_error(&h, h.min, h.max));
    }

    #[test]
    fn entropy_clips_a_long_tail() {
        let h = hist(&long_tail());
        let (lo, hi) = calibrated_range(&h, Calibrator::Entropy);
        eprintln!("entropy: [{lo}, {hi}] of [{}, {}]", h.min, h.max);
        assert!(lo < 1e-3, "{lo}");
        assert!(hi < h.max && hi > 2.0, "{hi}");
        // Symmetric data: both ends shrink toward 0 together.
        let v: Vec<f32> = long_tail().iter().flat_map(|&x| [x, -x]).collect();
        let h = hist(&v);
        let (lo, hi) = calibrated_range(&h, Calibrator::Entropy);
        assert!(lo > h.min && hi < h.max, "[{lo}, {hi}]");
        assert!((lo + hi).abs() < 0.05 * hi, "[{lo}, {hi}]");
    }

    #[test]
    fn entropy_is_not_driven_by_the_spike_of_zeros() {
        // A ReLU6 output: half the values exactly 0, the rest spread over [0, 6] with a spike
        // of saturated 6s. Without the zero-bin rule the search clips to about [0, 1.5].
        let mut rng = crate::rng::Rng::new(3);
        let v: Vec<f32> = (0..100_000)
            .map(|i| match i % 10 {
                0..5 => 0.0,
                5 => 6.0,
                _ => (rng.uniform() * 6.0) as f32,
            })
            .collect();
        let (lo, hi) = calibrated_range(&hist(&v), Calibrator::Entropy);
        assert_eq!(lo, 0.0);
        assert!(hi > 5.0, "{hi}");
    }

    #[test]
    fn kl_is_zero_for_a_distribution_that_quantizes_exactly() {
        // 255 bins each holding the same count: Q equals P.
        let counts = vec![7u64; 255];
        assert!(kl_divergence(&counts, 0, 255).abs() < 1e-12);
        // Clipping mass into the edge makes P differ from Q.
        let mut counts = vec![7u64; 300];
        counts[299] = 10_000;
        assert!(kl_divergence(&counts, 0, 255) > 0.0);
    }

    #[test]
    fn empty_histograms_give_the_zero_range() {
        for c in [
            Calibrator::Minmax,
            Calibrator::Percentile { percentile: 99.99 },
            Calibrator::Mse,
            Calibrator::Entropy,
        ] {
            assert_eq!(calibrated_range(&Histogram::default(), c), (0.0, 0.0));
        }
    }
}
