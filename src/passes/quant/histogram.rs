//! A single-pass observer of one activation tensor: its exact minimum and maximum, and a
//! histogram of its values whose range grows as new data arrives.
//!
//! Why growing: the range is unknown until every calibration batch has been seen, and a
//! second pass over the data would double the calibration time. The histogram starts on the
//! first batch's range; when later values fall outside, the bin width doubles (adjacent bins
//! merge pairwise) until they fit, so every count stays exact and only resolution is lost.

/// Bins of every histogram (TensorRT's entropy calibrator uses 2048).
pub const BINS: usize = 2048;

#[derive(Debug, Clone)]
pub struct Histogram {
    /// The lower edge of bin 0.
    pub lo: f64,
    /// The width of one bin (> 0 once data was seen).
    pub width: f64,
    pub counts: Vec<u64>,
    /// Exact extremes of the finite values seen.
    pub min: f32,
    pub max: f32,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            lo: 0.0,
            width: 0.0,
            counts: vec![0; BINS],
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }
}

impl Histogram {
    /// Whether any finite value was observed.
    pub fn is_empty(&self) -> bool {
        self.min > self.max
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The upper edge of the last bin.
    pub fn hi(&self) -> f64 {
        self.lo + self.width * BINS as f64
    }

    /// Adds a batch of values (NaNs and infinities are skipped).
    pub fn observe(&mut self, values: &[f32]) {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in values.iter().filter(|v| v.is_finite()) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if lo > hi {
            return;
        }
        if self.is_empty() {
            // The first range, widened to include 0 (every quantized range does).
            let (a, b) = ((lo as f64).min(0.0), (hi as f64).max(0.0));
            self.lo = a;
            self.width = ((b - a) / BINS as f64).max(f64::MIN_POSITIVE * 1e10);
        }
        self.min = self.min.min(lo);
        self.max = self.max.max(hi);
        while (lo as f64) < self.lo {
            self.grow(false);
        }
        while (hi as f64) > self.hi() {
            self.grow(true);
        }
        let inv = 1.0 / self.width;
        for &v in values.iter().filter(|v| v.is_finite()) {
            let b = ((v as f64 - self.lo) * inv) as usize;
            self.counts[b.min(BINS - 1)] += 1;
        }
    }

    /// Doubles the bin width, keeping the lower edge (`upward`) or the upper edge.
    fn grow(&mut self, upward: bool) {
        let mut merged = vec![0u64; BINS];
        let offset = if upward { 0 } else { BINS / 2 };
        for (i, pair) in self.counts.chunks(2).enumerate() {
            merged[offset + i] = pair.iter().sum();
        }
        if !upward {
            self.lo -= self.width * BINS as f64;
        }
        self.width *= 2.0;
        self.counts = merged;
    }

    /// The centre of bin `i`.
    pub fn center(&self, i: usize) -> f64 {
        self.lo + (i as f64 + 0.5) * self.width
    }

    /// The value below which a fraction `q` of the observations lie, interpolating linearly
    /// inside the bin where the cumulative count crosses `q * total`, and kept within the
    /// observed [min, max].
    pub fn quantile(&self, q: f64) -> f32 {
        let total = self.total();
        if total == 0 {
            return 0.0;
        }
        let target = q.clamp(0.0, 1.0) * total as f64;
        let mut seen = 0.0;
        for (i, &c) in self.counts.iter().enumerate() {
            let next = seen + c as f64;
            if c > 0 && next >= target {
                let frac = ((target - seen) / c as f64).clamp(0.0, 1.0);
                let v = self.lo + (i as f64 + frac) * self.width;
                return (v as f32).clamp(self.min, self.max);
            }
            seen = next;
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_growth_in_both_directions() {
        let mut h = Histogram::default();
        h.observe(&[0.0, 1.0, 0.5]);
        h.observe(&[10.0]);
        h.observe(&[-25.0, 3.0]);
        assert_eq!(h.total(), 6);
        assert_eq!((h.min, h.max), (-25.0, 10.0));
        assert!(h.lo <= -25.0 && h.hi() >= 10.0);
        // Each value lies in the bin its count went to, or at its upper edge (a first batch's
        // maximum is counted in the last bin).
        for v in [0.0f64, 1.0, 0.5, 10.0, -25.0, 3.0] {
            let b = ((v - h.lo) / h.width) as usize;
            let near = b.saturating_sub(1)..=b.min(BINS - 1);
            assert!(near.clone().any(|i| h.counts[i] > 0), "{v}");
        }
        h.observe(&[f32::NAN, f32::INFINITY]);
        assert_eq!(h.total(), 6);
    }

    #[test]
    fn quantiles_of_a_uniform_ramp() {
        let values: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0).collect();
        let mut h = Histogram::default();
        h.observe(&values);
        assert!((h.quantile(0.5) - 0.5).abs() < 1e-3);
        assert!((h.quantile(0.9) - 0.9).abs() < 1e-3);
        assert_eq!(h.quantile(1.0), h.max);
        assert_eq!(h.quantile(0.0), 0.0);
    }
}
