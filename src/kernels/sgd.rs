//! The SGD (momentum, Nesterov, weight decay) update in place on f32 CPU parameters.
//!
//! Why: written with Candle ops the update is five to seven element-wise ops per parameter,
//! each a fresh tensor and a pass through Candle's thread pool; for the hundreds of small
//! parameters of a MobileNet or ShuffleNet that per-op cost is most of the step (5% of a
//! ShuffleNet V2 training step with 2 threads). Here it is two passes, in place.
//!
//! The arithmetic is the Candle composition's, operation for operation (`Tensor * f64` is
//! `v * c + 0`), so both give bit-identical parameters:
//!
//! ```text
//! d   = g + (w * wd + 0)                  (without decay: d = g)
//! buf = (buf * mu + 0) + d                (first step: buf = d)
//! s   = d + (buf * mu + 0)   if nesterov, else buf      (mu = 0: s = d)
//! w   = w - (s * lr + 0)
//! ```

use super::cpu::{all_cpu_f32, f32_slice};
use candle_core::{CpuStorage, InplaceOp3, Layout, Result, Tensor, bail};

/// Hyper-parameters of one step, as f32 (Candle converts them the same way).
#[derive(Clone, Copy)]
pub(crate) struct Sgd {
    pub lr: f32,
    pub momentum: f32,
    pub nesterov: bool,
    /// `None` for parameters without weight decay.
    pub weight_decay: Option<f32>,
}

impl Sgd {
    #[inline]
    fn direction(&self, g: f32, w: f32) -> f32 {
        match self.weight_decay {
            Some(wd) => g + (w * wd + 0.0),
            None => g,
        }
    }
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("{op}: expected an f32 tensor")
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => bail!("{op}: expected a contiguous tensor"),
    }
}

/// `buf = buf * mu + d`, in place on the momentum buffer; operands `g`, `w`.
struct MomentumUpdate(Sgd);

impl InplaceOp3 for MomentumUpdate {
    fn name(&self) -> &'static str {
        "slimcandle-sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let buf = slice_mut(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        let w = f32_slice(s3, l3, self.name())?;
        let mu = self.0.momentum;
        for ((b, &g), &w) in buf.iter_mut().zip(g).zip(w) {
            *b = (*b * mu + 0.0) + self.0.direction(g, w);
        }
        Ok(())
    }
}

/// `w = w - lr * s`, in place on the parameter; operands `g` and the (updated) momentum
/// buffer, or `g` twice without momentum.
struct WeightUpdate(Sgd);

impl InplaceOp3 for WeightUpdate {
    fn name(&self) -> &'static str {
        "slimcandle-sgd-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let w = slice_mut(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        let buf = f32_slice(s3, l3, self.name())?;
        let Sgd {
            lr,
            momentum: mu,
            nesterov,
            ..
        } = self.0;
        for ((w, &g), &b) in w.iter_mut().zip(g).zip(buf) {
            let d = self.0.direction(g, *w);
            let s = if mu == 0.0 {
                d
            } else if nesterov {
                d + (b * mu + 0.0)
            } else {
                b
            };
            *w -= s * lr + 0.0;
        }
        Ok(())
    }
}

/// One SGD step on parameter `w` (updated in place) with gradient `g` and momentum buffer
/// `buf` (updated in place; `None` on the first step). Returns the buffer to keep (a new one
/// on the first step; without momentum, `buf` untouched), or `None` if the tensors are not contiguous f32 CPU tensors of one
/// shape, in which case nothing was changed and the caller runs the Candle composition.
pub(crate) fn sgd_step(
    w: &Tensor,
    g: &Tensor,
    buf: Option<&Tensor>,
    hp: Sgd,
) -> Result<Option<Option<Tensor>>> {
    let mut all = vec![w, g];
    all.extend(buf);
    let contiguous = all
        .iter()
        .all(|t| t.is_contiguous() && t.dims() == w.dims());
    if !all_cpu_f32(&all) || !contiguous {
        return Ok(None);
    }
    if hp.momentum == 0.0 {
        w.inplace_op3(g, g, &WeightUpdate(hp))?;
        return Ok(Some(buf.cloned()));
    }
    let buf = match buf {
        Some(b) => {
            b.inplace_op3(g, w, &MomentumUpdate(hp))?;
            b.clone()
        }
        None => {
            let ws: Vec<f32> = w.flatten_all()?.to_vec1()?;
            let gs: Vec<f32> = g.flatten_all()?.to_vec1()?;
            let first: Vec<f32> = gs
                .iter()
                .zip(&ws)
                .map(|(&g, &w)| hp.direction(g, w))
                .collect();
            Tensor::from_vec(first, w.dims(), w.device())?
        }
    };
    w.inplace_op3(g, &buf, &WeightUpdate(hp))?;
    Ok(Some(Some(buf)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The Candle composition the optimizer runs for tensors this kernel does not take.
    fn reference(
        w: &Tensor,
        g: &Tensor,
        buf: Option<&Tensor>,
        hp: Sgd,
    ) -> (Tensor, Option<Tensor>) {
        let (lr, mu) = (hp.lr as f64, hp.momentum as f64);
        let mut d = match hp.weight_decay {
            Some(wd) => (g + (w * wd as f64).unwrap()).unwrap(),
            None => g.clone(),
        };
        let mut kept = buf.cloned();
        if mu > 0.0 {
            let b = match buf {
                Some(b) => ((b * mu).unwrap() + &d).unwrap(),
                None => d.clone(),
            };
            d = if hp.nesterov {
                (d + (&b * mu).unwrap()).unwrap()
            } else {
                b.clone()
            };
            kept = Some(b);
        }
        ((w - (d * lr).unwrap()).unwrap(), kept)
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn bit_identical_to_the_candle_composition() {
        let dev = Device::Cpu;
        let cases = [
            (0.9, true, Some(5e-4)),
            (0.9, false, Some(1e-2)),
            (0.85, true, None),
            (0.0, false, Some(5e-4)),
        ];
        for (mu, nesterov, wd) in cases {
            let hp = Sgd {
                lr: 0.05,
                momentum: mu,
                nesterov,
                weight_decay: wd,
            };
            let w = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
            let w_ref = w.copy().unwrap();
            let (mut buf, mut buf_ref): (Option<Tensor>, Option<Tensor>) = (None, None);
            let mut w_ref = w_ref;
            for _ in 0..3 {
                let g = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
                buf = sgd_step(&w, &g, buf.as_ref(), hp)
                    .unwrap()
                    .expect("f32 CPU tensors");
                let (nw, nb) = reference(&w_ref, &g, buf_ref.as_ref(), hp);
                (w_ref, buf_ref) = (nw, nb);
                let bits = |t: &Tensor| values(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&w),
                    bits(&w_ref),
                    "weights, mu {mu} nesterov {nesterov}"
                );
                assert_eq!(
                    buf.as_ref().map(bits),
                    buf_ref.as_ref().map(bits),
                    "momentum buffer, mu {mu}"
                );
            }
        }
    }

    #[test]
    fn other_dtypes_are_left_to_the_caller() {
        let w = Tensor::zeros((3,), candle_core::DType::F64, &Device::Cpu).unwrap();
        let hp = Sgd {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
            weight_decay: None,
        };
        assert!(sgd_step(&w, &w.clone(), None, hp).unwrap().is_none());
    }
}
