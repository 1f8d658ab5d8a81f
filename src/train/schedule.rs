//! Learning-rate schedules, evaluated per optimizer step (PyTorch's formulas).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    /// Cosine decay to zero after the warm-up (CosineAnnealingLR with eta_min 0).
    Cosine,
    /// Multiply by `gamma` every `every_epochs` epochs (StepLR).
    Step {
        every_epochs: usize,
        gamma: f64,
    },
    /// OneCycleLR with cosine annealing: from `max/div_factor` up to `max` over the first
    /// `pct_start` of the steps, then down to `max/div_factor/final_div_factor`. Momentum
    /// cycles inversely between `max_momentum` and `base_momentum`, as PyTorch does by default.
    OneCycle {
        pct_start: f64,
        div_factor: f64,
        final_div_factor: f64,
        base_momentum: f64,
        max_momentum: f64,
    },
}

impl Schedule {
    pub fn one_cycle(pct_start: f64) -> Schedule {
        Schedule::OneCycle {
            pct_start,
            div_factor: 25.0,
            final_div_factor: 1e4,
            base_momentum: 0.85,
            max_momentum: 0.95,
        }
    }
}

/// The schedule of one run: `lr` is the peak rate, `warmup_steps` a linear ramp from zero
/// (ignored by one-cycle, which has its own).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrPlan {
    pub schedule: Schedule,
    pub lr: f64,
    pub total_steps: usize,
    pub warmup_steps: usize,
    pub steps_per_epoch: usize,
}

fn cos_anneal(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * ((std::f64::consts::PI * pct).cos() + 1.0)
}

impl LrPlan {
    /// Learning rate and (for one-cycle) momentum at optimizer step `step` (0-based).
    pub fn at(&self, step: usize) -> (f64, Option<f64>) {
        let s = step as f64;
        if let Schedule::OneCycle {
            pct_start,
            div_factor,
            final_div_factor,
            base_momentum,
            max_momentum,
        } = self.schedule
        {
            let initial = self.lr / div_factor;
            let min = initial / final_div_factor;
            let up_end = pct_start * self.total_steps as f64 - 1.0;
            let down_end = self.total_steps as f64 - 1.0;
            return if s <= up_end {
                let pct = if up_end > 0.0 { s / up_end } else { 1.0 };
                (
                    cos_anneal(initial, self.lr, pct),
                    Some(cos_anneal(max_momentum, base_momentum, pct)),
                )
            } else {
                let pct = ((s - up_end) / (down_end - up_end).max(1e-12)).min(1.0);
                (
                    cos_anneal(self.lr, min, pct),
                    Some(cos_anneal(base_momentum, max_momentum, pct)),
                )
            };
        }
        if step < self.warmup_steps {
            return (self.lr * (s + 1.0) / self.warmup_steps as f64, None);
        }
        let lr = match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = (self.total_steps - self.warmup_steps).max(1) as f64;
                cos_anneal(self.lr, 0.0, (s - self.warmup_steps as f64) / span)
            }
            Schedule::Step {
                every_epochs,
                gamma,
            } => {
                let epoch = step / self.steps_per_epoch.max(1);
                self.lr * gamma.powi((epoch / every_epochs.max(1)) as i32)
            }
            Schedule::OneCycle { .. } => unreachable!("handled above"),
        };
        (lr, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(schedule: Schedule, warmup: usize) -> LrPlan {
        LrPlan {
            schedule,
            lr: 0.1,
            total_steps: 100,
            warmup_steps: warmup,
            steps_per_epoch: 10,
        }
    }

    #[test]
    fn one_cycle_matches_pytorch_shape() {
        let p = plan(Schedule::one_cycle(0.15), 0);
        let (lr0, m0) = p.at(0);
        assert!((lr0 - 0.004).abs() < 1e-12 && (m0.unwrap() - 0.95).abs() < 1e-12);
        // Peak at step pct_start * total - 1 = 14.
        let (peak, m) = p.at(14);
        assert!((peak - 0.1).abs() < 1e-12 && (m.unwrap() - 0.85).abs() < 1e-12);
        let (last, _) = p.at(99);
        assert!((last - 0.004 / 1e4).abs() < 1e-12);
        assert!(p.at(50).0 < p.at(20).0);
    }

    #[test]
    fn warmup_cosine_and_step() {
        let c = plan(Schedule::Cosine, 10);
        assert!((c.at(0).0 - 0.01).abs() < 1e-12);
        assert!((c.at(9).0 - 0.1).abs() < 1e-12);
        assert!((c.at(10).0 - 0.1).abs() < 1e-12);
        assert!((c.at(55).0 - 0.05).abs() < 1e-12);
        let s = plan(
            Schedule::Step {
                every_epochs: 3,
                gamma: 0.1,
            },
            0,
        );
        assert!((s.at(29).0 - 0.1).abs() < 1e-12 && (s.at(30).0 - 0.01).abs() < 1e-12);
    }
}
