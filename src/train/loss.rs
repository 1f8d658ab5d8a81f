//! Classification loss and accuracy counting.

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
}
