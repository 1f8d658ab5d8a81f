//! Classification loss and accuracy counting: the Candle compositions (the autograd path, and
//! the reference the train-step executor's one-pass losses are tested against) and the
//! stable row-level pieces those one-pass losses share.

use super::distill::KdWeights;
use anyhow::Result;
use candle_core::{D, Tensor};

/// Mean cross-entropy of `logits` (N x K) against `labels` (N, u32), with label smoothing `eps`
/// as PyTorch defines it: `(1 - eps) * nll + eps * mean_k(-log p_k)`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, eps: f64) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let nll = log_p.gather(&labels.unsqueeze(1)?, 1)?.neg()?.mean_all()?;
    if eps == 0.0 {
        return Ok(nll);
    }
    let smooth = log_p.mean(D::Minus1)?.neg()?.mean_all()?;
    Ok(((nll * (1.0 - eps))? + (smooth * eps)?)?)
}

/// What knowledge distillation's loss is made of (`docs/distillation.md`).
pub struct DistillationLoss {
    /// `alpha * kd + (1 - alpha) * ce`: what is minimised.
    pub total: Tensor,
    /// Cross-entropy against the labels, with label smoothing.
    pub ce: Tensor,
    /// `T^2 * KL(softmax(teacher / T) || softmax(student / T))`, averaged over the batch.
    pub kd: Tensor,
}

/// Hinton et al.'s distillation loss of the `student` logits (N x K) against the `teacher`'s
/// (N x K; no gradient flows into them) and the `labels`, with label smoothing `eps` on the
/// cross-entropy part. With `alpha` 0 the total is [`cross_entropy`] itself (the same graph,
/// so bit for bit the same loss and gradients).
pub fn distillation_loss(
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
    eps: f64,
    kd: KdWeights,
) -> Result<DistillationLoss> {
    let ce = cross_entropy(student, labels, eps)?;
    let inv_t = 1.0 / kd.temperature;
    let log_q = candle_nn::ops::log_softmax(&student.affine(inv_t, 0.0)?, D::Minus1)?;
    let log_p = candle_nn::ops::log_softmax(&teacher.detach().affine(inv_t, 0.0)?, D::Minus1)?;
    let kl = (log_p.exp()? * (log_p - log_q)?)?
        .sum(D::Minus1)?
        .mean_all()?;
    let kd_part = (kl * (kd.temperature * kd.temperature))?;
    let total = if kd.alpha == 0.0 {
        ce.clone()
    } else {
        ((&ce * (1.0 - kd.alpha))? + (&kd_part * kd.alpha)?)?
    };
    Ok(DistillationLoss {
        total,
        ce,
        kd: kd_part,
    })
}

/// `ln sum_k exp(v_k)`, stable: the largest value is taken out before exponentiating.
pub fn log_sum_exp(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = values.clone().fold(f64::NEG_INFINITY, f64::max);
    max + values.map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// Class `k`'s target probability for a sample of class `label` under label smoothing `eps`
/// (PyTorch's: `1 - eps` on the label, `eps` spread evenly over all classes).
pub fn smoothed_target(k: usize, label: usize, classes: usize, eps: f64) -> f64 {
    let on_label = if k == label { 1.0 - eps } else { 0.0 };
    on_label + eps / classes as f64
}

/// One row's cross-entropy with label smoothing `eps`, given the row's log-sum-exp `lse`.
pub fn cross_entropy_row(row: &[f32], label: usize, lse: f64, eps: f64) -> f64 {
    let nll = lse - row[label] as f64;
    let smooth = lse - row.iter().map(|&v| v as f64).sum::<f64>() / row.len() as f64;
    (1.0 - eps) * nll + eps * smooth
}

/// For each row, the indices of the `k` largest logits, best first.
pub fn top_k(logits: &Tensor, k: usize) -> Result<Vec<Vec<usize>>> {
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    Ok(rows
        .iter()
        .map(|r| {
            let mut idx: Vec<usize> = (0..r.len()).collect();
            idx.sort_by(|&a, &b| r[b].total_cmp(&r[a]).then(a.cmp(&b)));
            idx.truncate(k);
            idx
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_matches_hand_computation() {
        let logits = Tensor::new(&[[2.0f32, 0.0, -1.0], [0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
        let lse0 = (2f64.exp() + 1.0 + (-1f64).exp()).ln();
        let nll = ((lse0 - 2.0) + 3f64.ln()) / 2.0;
        let got = cross_entropy(&logits, &labels, 0.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((got - nll).abs() < 1e-6);
        let smooth = ((lse0 * 3.0 - 1.0) / 3.0 + 3f64.ln()) / 2.0;
        let got = cross_entropy(&logits, &labels, 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((got - (0.9 * nll + 0.1 * smooth)).abs() < 1e-6);
        assert_eq!(top_k(&logits, 2).unwrap()[0], vec![0, 1]);
    }

    fn random(seed: u64, n: usize, k: usize, scale: f64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let v: Vec<f32> = (0..n * k).map(|_| (rng.normal() * scale) as f32).collect();
        Tensor::from_vec(v, (n, k), &Device::Cpu).unwrap()
    }

    /// The Candle composition's loss, parts and gradient against the one-pass version, at
    /// T = 1 and T = 4, alpha 0, 0.5 and 1.
    #[test]
    fn distillation_loss_matches_the_one_pass_loss_and_gradient() {
        let (n, k) = (6, 7);
        let s = random(1, n, k, 2.0);
        let t = random(2, n, k, 3.0);
        let labels: Vec<u32> = (0..n as u32).map(|i| i * 2 % k as u32).collect();
        let label_t = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for temperature in [1.0, 4.0] {
            for alpha in [0.0, 0.5, 1.0] {
                let kd = KdWeights { alpha, temperature };
                let var = candle_core::Var::from_tensor(&s).unwrap();
                let l = distillation_loss(var.as_tensor(), &t, &label_t, 0.1, kd).unwrap();
                let grads = l.total.backward().unwrap();
                let g = flat(grads.get(var.as_tensor()).unwrap());
                let (loss, parts, want) = crate::train::distill::distillation_loss_grad(
                    &flat(&s),
                    &flat(&t),
                    &labels,
                    k,
                    0.1,
                    kd,
                )
                .unwrap();
                let scalar = |x: &Tensor| x.to_scalar::<f32>().unwrap() as f64;
                assert!((scalar(&l.total) - loss as f64).abs() < 1e-5, "{kd:?}");
                assert!((scalar(&l.ce) - parts.ce).abs() < 1e-5, "{kd:?}");
                assert!((scalar(&l.kd) - parts.kd).abs() < 1e-5, "{kd:?}");
                for (a, b) in g.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-6, "{kd:?}: {a} vs {b}");
                }
            }
        }
    }

    /// With alpha 0 the Candle path's loss and gradient are those of `cross_entropy`, bit
    /// for bit.
    #[test]
    fn distillation_loss_at_alpha_zero_is_cross_entropy_bit_for_bit() {
        let s = random(3, 5, 4, 2.0);
        let t = random(4, 5, 4, 2.0);
        let labels = Tensor::new(&[0u32, 1, 2, 3, 0], &Device::Cpu).unwrap();
        let kd = KdWeights {
            alpha: 0.0,
            temperature: 4.0,
        };
        let var = candle_core::Var::from_tensor(&s).unwrap();
        let l = distillation_loss(var.as_tensor(), &t, &labels, 0.1, kd).unwrap();
        let g_kd = l.total.backward().unwrap();
        let ce = cross_entropy(var.as_tensor(), &labels, 0.1).unwrap();
        let g_ce = ce.backward().unwrap();
        let bits = |x: &Tensor| {
            x.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&l.total), bits(&ce));
        assert_eq!(
            bits(g_kd.get(var.as_tensor()).unwrap()),
            bits(g_ce.get(var.as_tensor()).unwrap())
        );
    }
}
