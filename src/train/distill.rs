//! Knowledge distillation (Hinton, Vinyals and Dean 2015): the student learns from a
//! teacher's softened class probabilities as well as from the labels,
//!
//! `loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)`
//!
//! with `s` the student's and `t` the teacher's logits of the same (augmented) batch and `CE`
//! the cross-entropy with label smoothing. Why `T^2`: the softened term's gradient,
//! `T * (softmax(s / T) - softmax(t / T))`, shrinks as `1 / T` relative to the logits' scale;
//! the factor keeps the two terms' gradients of comparable size whatever `T` is.
//!
//! This module holds the settings and their record in `config.json` ([`DistillConfig`]) and
//! the one-pass loss and gradient over the logits that the train-step executor uses
//! ([`distillation_loss_grad`]); `loss::distillation_loss` is the same loss on Candle tensors
//! (the autograd path), and `teacher.rs` runs the teacher.

use super::feature_kd::{FeatureTap, HintLoss};
use super::loss::{cross_entropy_row, log_sum_exp, smoothed_target};
use super::step::checked_label;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The weights of the two terms of the distillation loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KdWeights {
    /// Weight of the distillation term, in [0, 1]; the cross-entropy gets `1 - alpha`.
    pub alpha: f64,
    /// Softmax temperature of the distillation term, > 0.
    pub temperature: f64,
}

impl Default for KdWeights {
    /// alpha 0.9, T 4: the usual choice for CIFAR-sized problems.
    fn default() -> KdWeights {
        KdWeights {
            alpha: 0.9,
            temperature: 4.0,
        }
    }
}

impl KdWeights {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.alpha) {
            bail!("--kd-alpha must be in [0, 1], got {}", self.alpha);
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!(
                "--kd-temperature must be a positive number, got {}",
                self.temperature
            );
        }
        Ok(())
    }
}

/// The teacher of a distillation run as `config.json` records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherRecord {
    /// The checkpoint, as an absolute path (a resumed run reads it again).
    pub path: PathBuf,
    /// SHA-256 of the file, hex: a resumed run refuses a teacher that changed.
    pub sha256: String,
    /// The teacher's architecture, when its checkpoint names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// The teacher's test top-1 (%), measured once at the start on the run's test split.
    pub test_top1: Option<f64>,
}

/// A distillation run's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    pub teacher: TeacherRecord,
    #[serde(flatten)]
    pub weights: KdWeights,
    /// Feature distillation: student and teacher nodes whose maps are compared.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<FeatureTap>,
    #[serde(default)]
    pub feature_loss: HintLoss,
}

impl DistillConfig {
    /// What the saved student's provenance history says about its training.
    pub fn history_entry(&self) -> String {
        let t = &self.teacher;
        let top1 = t
            .test_top1
            .map(|v| format!(", test top-1 {v:.2}%"))
            .unwrap_or_default();
        let features = if self.features.is_empty() {
            String::new()
        } else {
            let taps: Vec<String> = self
                .features
                .iter()
                .map(|f| {
                    let adapter = f
                        .adapter
                        .map(|a| {
                            format!(
                                " (through {}, {} to {} channels)",
                                super::adapter::DESCRIPTION,
                                a.student_channels,
                                a.teacher_channels
                            )
                        })
                        .unwrap_or_default();
                    format!("{}:{}:{}{adapter}", f.student, f.teacher, f.weight)
                })
                .collect();
            let loss = match self.feature_loss {
                HintLoss::Mse => "mse",
                HintLoss::At => "attention transfer",
            };
            format!(", feature hints ({loss}) {}", taps.join(", "))
        };
        format!(
            "knowledge distillation from teacher `{}` ({}sha256 {}{top1}) with alpha {}, temperature {}{features}",
            t.path.display(),
            t.arch
                .as_ref()
                .map(|a| format!("{a}, "))
                .unwrap_or_default(),
            t.sha256,
            self.weights.alpha,
            self.weights.temperature
        )
    }
}

/// The two parts of the distillation loss, each averaged over the batch and unweighted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossParts {
    /// Cross-entropy against the labels, with label smoothing.
    pub ce: f64,
    /// `T^2 * KL(softmax(t / T) || softmax(s / T))`.
    pub kd: f64,
}

/// The distillation loss of the `student` logits (N x `classes`) against the `teacher`'s and
/// the `labels` (label smoothing `smoothing` on the cross-entropy), its parts, and its
/// gradient with respect to the student's logits; one pass over the rows.
///
/// Every softmax is taken through a log-sum-exp (the largest logit subtracted first), so large
/// logits or small temperatures neither overflow nor lose the small probabilities. Per logit
/// the gradient is `((1 - alpha) * (softmax(s) - target) + alpha * T * (softmax(s / T) -
/// softmax(t / T))) / N`. With `alpha` 0 the distillation term is left out of the loss and
/// gradient (only reported), which are then bit for bit `step::cross_entropy_grad`'s.
pub fn distillation_loss_grad(
    student: &[f32],
    teacher: &[f32],
    labels: &[u32],
    classes: usize,
    smoothing: f64,
    kd: KdWeights,
) -> Result<(f32, LossParts, Vec<f32>)> {
    let n = labels.len();
    if student.len() != n * classes || teacher.len() != student.len() {
        bail!(
            "distillation needs N x {classes} logits from student and teacher for {n} labels, got {} and {} values",
            student.len(),
            teacher.len()
        );
    }
    let KdWeights { alpha, temperature } = kd;
    let inv_t = 1.0 / temperature;
    let inv_n = 1.0 / n as f64;
    let mut grad = vec![0f32; student.len()];
    let (mut ce_sum, mut kd_sum) = (0f64, 0f64);
    for (((s, t), d), &label) in student
        .chunks_exact(classes)
        .zip(teacher.chunks_exact(classes))
        .zip(grad.chunks_exact_mut(classes))
        .zip(labels)
    {
        let label = checked_label(label, classes)?;
        let lse = log_sum_exp(s.iter().map(|&v| v as f64));
        ce_sum += cross_entropy_row(s, label, lse, smoothing);
        let lse_s = log_sum_exp(s.iter().map(|&v| v as f64 * inv_t));
        let lse_t = log_sum_exp(t.iter().map(|&v| v as f64 * inv_t));
        let mut kl = 0f64;
        for (k, ((dv, &sv), &tv)) in d.iter_mut().zip(s).zip(t).enumerate() {
            let ce_grad = (sv as f64 - lse).exp() - smoothed_target(k, label, classes, smoothing);
            let log_q = sv as f64 * inv_t - lse_s;
            let log_p = tv as f64 * inv_t - lse_t;
            let p = log_p.exp();
            kl += p * (log_p - log_q);
            let g = if alpha == 0.0 {
                ce_grad
            } else {
                (1.0 - alpha) * ce_grad + alpha * temperature * (log_q.exp() - p)
            };
            *dv = (g * inv_n) as f32;
        }
        kd_sum += temperature * temperature * kl;
    }
    let parts = LossParts {
        ce: ce_sum * inv_n,
        kd: kd_sum * inv_n,
    };
    let total = if alpha == 0.0 {
        parts.ce
    } else {
        (1.0 - alpha) * parts.ce + alpha * parts.kd
    };
    Ok((total as f32, parts, grad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::train::step::cross_entropy_grad;

    const CLASSES: usize = 5;

    fn logits(seed: u64, n: usize, scale: f64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n * CLASSES)
            .map(|_| (rng.normal() * scale) as f32)
            .collect()
    }

    /// The loss written out with plain softmaxes and `p * ln(p / q)`, in f64, no log-sum-exp.
    fn direct(s: &[f32], t: &[f32], labels: &[u32], eps: f64, kd: KdWeights) -> (f64, f64) {
        let softmax = |row: &[f32], temp: f64| -> Vec<f64> {
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 / temp).exp()).collect();
            let z: f64 = e.iter().sum();
            e.iter().map(|v| v / z).collect()
        };
        let n = labels.len();
        let (mut ce, mut kl) = (0.0, 0.0);
        for ((sr, tr), &y) in s.chunks(CLASSES).zip(t.chunks(CLASSES)).zip(labels) {
            let p1 = softmax(sr, 1.0);
            for (k, pk) in p1.iter().enumerate() {
                ce -= smoothed_target(k, y as usize, CLASSES, eps) * pk.ln();
            }
            let (q, p) = (softmax(sr, kd.temperature), softmax(tr, kd.temperature));
            kl += p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum::<f64>();
        }
        let kd_part = kd.temperature * kd.temperature * kl / n as f64;
        (ce / n as f64, kd_part)
    }

    fn cases() -> Vec<KdWeights> {
        let mut out = Vec::new();
        for temperature in [1.0, 4.0] {
            for alpha in [0.0, 0.3, 1.0] {
                out.push(KdWeights { alpha, temperature });
            }
        }
        out
    }

    #[test]
    fn loss_matches_the_direct_softmax_kl_formula() {
        let (s, t) = (logits(1, 6, 2.0), logits(2, 6, 3.0));
        let labels = [0u32, 4, 2, 1, 3, 0];
        for kd in cases() {
            let (total, parts, _) =
                distillation_loss_grad(&s, &t, &labels, CLASSES, 0.1, kd).unwrap();
            let (ce, kd_part) = direct(&s, &t, &labels, 0.1, kd);
            assert!(
                (parts.ce - ce).abs() < 1e-12,
                "{kd:?}: ce {} vs {ce}",
                parts.ce
            );
            assert!(
                (parts.kd - kd_part).abs() < 1e-12 * kd_part.max(1.0),
                "{kd:?}: kd {} vs {kd_part}",
                parts.kd
            );
            let want = (1.0 - kd.alpha) * ce + kd.alpha * kd_part;
            assert!((total as f64 - want).abs() < 1e-6 * want, "{kd:?}");
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (s, t) = (logits(3, 4, 2.0), logits(4, 4, 2.0));
        let labels = [1u32, 0, 4, 2];
        for kd in cases() {
            let (_, _, grad) = distillation_loss_grad(&s, &t, &labels, CLASSES, 0.1, kd).unwrap();
            // Central differences of the f64 formula (the f32 loss is too coarse for them).
            let loss = |s: &[f32]| {
                let (ce, kd_part) = direct(s, &t, &labels, 0.1, kd);
                (1.0 - kd.alpha) * ce + kd.alpha * kd_part
            };
            let h = 1e-3f32;
            for i in 0..s.len() {
                let (mut up, mut down) = (s.clone(), s.clone());
                up[i] += h;
                down[i] -= h;
                let fd = (loss(&up) - loss(&down)) / (up[i] - down[i]) as f64;
                assert!(
                    (grad[i] as f64 - fd).abs() < 1e-4,
                    "{kd:?} logit {i}: {} vs {fd}",
                    grad[i]
                );
            }
        }
    }

    #[test]
    fn alpha_zero_is_plain_cross_entropy_bit_for_bit() {
        let (s, t) = (logits(5, 8, 3.0), logits(6, 8, 3.0));
        let labels = [0u32, 1, 2, 3, 4, 0, 1, 2];
        for temperature in [1.0, 4.0] {
            for eps in [0.0, 0.1] {
                let kd = KdWeights {
                    alpha: 0.0,
                    temperature,
                };
                let (loss, parts, grad) =
                    distillation_loss_grad(&s, &t, &labels, CLASSES, eps, kd).unwrap();
                let (ce_loss, ce_grad) = cross_entropy_grad(&s, &labels, CLASSES, eps).unwrap();
                assert_eq!(loss.to_bits(), ce_loss.to_bits());
                let bits = |g: &[f32]| g.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&grad), bits(&ce_grad));
                // The distillation part is still measured (reported, not optimised).
                assert!(parts.kd > 0.0);
            }
        }
    }

    #[test]
    fn alpha_one_ignores_the_labels_and_vanishes_when_student_equals_teacher() {
        let (s, t) = (logits(7, 4, 2.0), logits(8, 4, 2.0));
        let kd = KdWeights {
            alpha: 1.0,
            temperature: 4.0,
        };
        let a = distillation_loss_grad(&s, &t, &[0, 1, 2, 3], CLASSES, 0.1, kd).unwrap();
        let b = distillation_loss_grad(&s, &t, &[4, 4, 0, 0], CLASSES, 0.1, kd).unwrap();
        assert_eq!(a.0, b.0);
        assert_eq!(a.2, b.2);
        let same = distillation_loss_grad(&s, &s, &[0, 1, 2, 3], CLASSES, 0.0, kd).unwrap();
        assert!(same.0.abs() < 1e-6);
        assert!(same.2.iter().all(|g| g.abs() < 1e-7));
    }

    #[test]
    fn large_logits_and_low_temperatures_stay_finite() {
        let (s, t) = (logits(9, 4, 1e4), logits(10, 4, 1e4));
        for temperature in [0.05, 1.0, 4.0] {
            let kd = KdWeights {
                alpha: 0.5,
                temperature,
            };
            let (loss, parts, grad) =
                distillation_loss_grad(&s, &t, &[0, 1, 2, 3], CLASSES, 0.1, kd).unwrap();
            assert!(loss.is_finite() && parts.kd.is_finite() && parts.kd >= 0.0);
            assert!(grad.iter().all(|g| g.is_finite()));
        }
    }

    #[test]
    fn bad_settings_name_their_flag() {
        let bad = |alpha, temperature| {
            KdWeights { alpha, temperature }
                .validate()
                .unwrap_err()
                .to_string()
        };
        assert!(bad(1.5, 4.0).contains("--kd-alpha"));
        assert!(bad(f64::NAN, 4.0).contains("--kd-alpha"));
        assert!(bad(0.5, 0.0).contains("--kd-temperature"));
        assert!(bad(0.5, f64::INFINITY).contains("--kd-temperature"));
        assert!(KdWeights::default().validate().is_ok());
    }
}
