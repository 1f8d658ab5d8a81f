//! FitNets' learned adapter (Romero et al. 2015, their "regressor"): a 1x1 conv followed by a
//! train-mode batch norm that maps a student's feature map to a teacher's channel count, so
//! that the `mse` hint can compare maps whose channels differ:
//!
//! `hint = w * mean (BN(W s) - t)^2`, `W` a `Ct x Cs` 1x1 conv without bias.
//!
//! Why the batch norm: the teacher's map may sit at any scale; a batch norm (its own batch
//! statistics, learnable gamma and beta) lets the adapter match it without the conv's weights
//! having to grow or shrink to that scale, which follows the common FitNets-style
//! implementations (conv + BN connectors).
//!
//! The adapter lives only as long as the training run: it is trained with the student (same
//! optimizer, learning-rate schedule, momentum and weight-decay rule: the conv's weight decays,
//! the batch norm's gamma and beta do not), kept in the resume state (weights and optimizer
//! buffers, so that a resumed run equals an uninterrupted one bit for bit), and never written
//! into the student's checkpoints. Its batch norm always runs on batch statistics: the adapter
//! is never run in eval mode, so its running statistics are neither updated nor saved.
//!
//! The adapter is a two-node [`Graph`] with its own [`Weights`]: the project's initialisation
//! (Kaiming-normal over fan-out for the conv, identity batch norm), the student's
//! [`Optimizer`] rules, and, in the tests, the Candle autograd path through
//! [`crate::exec::forward_train`] all apply to it unchanged. The train-step executor computes
//! its forward and backward pass on slices with the kernels the student's 1x1 convs and batch
//! norms use ([`Adapter::loss_grad`]).

use super::feature_kd::{FeatureTap, mse_into_grad};
use super::optimizer::{Optimizer, OptimizerKind};
use crate::graph::{Graph, GraphBuilder};
use crate::kernels::batch_norm::{train_backward, train_forward};
use crate::kernels::conv::ConvGeom;
use crate::kernels::conv_gemm;
use crate::rng::Rng;
use crate::weights::Weights;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The batch norm's epsilon: PyTorch's default, as the MobileNet V2 and ShuffleNet batch norms
/// use.
pub const BN_EPS: f64 = 1e-5;
/// Node names of the adapter's conv and batch norm (its parameters are `conv.weight`,
/// `bn.weight` and `bn.bias`).
const CONV: &str = "conv";
const BN: &str = "bn";

/// What an adapter is, in the run's header line and the checkpoint's provenance.
pub const DESCRIPTION: &str = "a learned 1x1 conv + batch-norm adapter";

/// The channel counts an adapter maps between; recorded with its tap in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterSpec {
    pub student_channels: usize,
    pub teacher_channels: usize,
}

/// One tap's adapter: its graph (input, 1x1 conv, batch norm) and weights.
pub struct Adapter {
    pub spec: AdapterSpec,
    pub graph: Graph,
    pub weights: Weights,
}

/// What [`Adapter::loss_grad`] computes.
pub struct AdapterLoss {
    /// The weighted hint, `w * mean (BN(W s) - t)^2`.
    pub loss: f64,
    /// Its gradient with respect to the student's map (the tap's gradient).
    pub student_grad: Vec<f32>,
    /// Its gradients with respect to the adapter's parameters, by parameter name.
    pub param_grads: HashMap<String, Tensor>,
}

impl Adapter {
    /// A fresh adapter, initialised from `seed` as the project initialises a conv and a batch
    /// norm (conv Kaiming-normal over fan-out, gamma 1, beta 0).
    pub fn new(spec: AdapterSpec, seed: u64) -> Result<Adapter> {
        let mut b = GraphBuilder::new(spec.student_channels);
        let conv = b.conv(
            CONV,
            GraphBuilder::INPUT,
            spec.teacher_channels,
            1,
            1,
            0,
            1,
            false,
        );
        let bn = b.batch_norm(BN, conv, BN_EPS, 0.1);
        let graph = b.finish(bn);
        let weights = Weights::init(&graph, seed)?;
        Ok(Adapter {
            spec,
            graph,
            weights,
        })
    }

    fn values(&self, suffix: &str) -> Result<Vec<f32>> {
        Ok(self.weights.get(suffix)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The weighted hint of the student's map `s` (N x Cs x `plane`) through the adapter
    /// against the teacher's `t` (N x Ct x `plane`), and its gradients (see [`AdapterLoss`]).
    pub fn loss_grad(
        &self,
        s: &[f32],
        t: &[f32],
        n: usize,
        plane: usize,
        weight: f64,
    ) -> Result<AdapterLoss> {
        let AdapterSpec {
            student_channels: cs,
            teacher_channels: ct,
        } = self.spec;
        if s.len() != n * cs * plane || t.len() != n * ct * plane {
            bail!(
                "the adapter maps {cs} to {ct} channels: feature maps of {} and {} values do not fit a batch of {n} with {plane} positions",
                s.len(),
                t.len()
            );
        }
        // With one value per channel (a 1x1 map in a last batch of one image) the batch norm
        // outputs beta and passes no gradient back, rather than stopping the run mid-epoch.
        // A 1x1 conv does not care how the plane is laid out: one column of `plane` rows.
        let geom = ConvGeom::new(&[n, cs, plane, 1], &[ct, cs, 1, 1], 1, 0, 1, 1)?;
        let w = self.values(&format!("{CONV}.weight"))?;
        let gamma = self.values(&format!("{BN}.weight"))?;
        let beta = self.values(&format!("{BN}.bias"))?;
        let mut z = vec![0f32; n * ct * plane];
        conv_gemm::forward_into(&geom, s, &w, &mut z, true, &|_, _, _| {});
        let (y, stats) = train_forward(&z, &gamma, &beta, BN_EPS, (n, ct, plane), None);
        // The mse hint on the adapter's output, which becomes its gradient.
        let mut dy = y;
        let loss = mse_into_grad(&mut dy, t, plane, weight);
        let bn_out = train_backward(&z, &gamma, &dy, &stats, (n, ct, plane), true, None);
        let (dz, dbn) = bn_out.split_at(z.len());
        let mut conv_out = conv_gemm::backward(&geom, s, &w, dz, true, true);
        let dw = conv_out.split_off(s.len());
        let cpu = &Device::Cpu;
        let param_grads = HashMap::from([
            (
                format!("{CONV}.weight"),
                Tensor::from_vec(dw, (ct, cs, 1, 1), cpu)?,
            ),
            (
                format!("{BN}.weight"),
                Tensor::from_slice(&dbn[..ct], ct, cpu)?,
            ),
            (
                format!("{BN}.bias"),
                Tensor::from_slice(&dbn[ct..], ct, cpu)?,
            ),
        ]);
        Ok(AdapterLoss {
            loss,
            student_grad: conv_out,
            param_grads,
        })
    }
}

/// The adapters of a run's feature taps (`None` for a tap compared without one), each with
/// its optimizer.
pub struct Adapters {
    slots: Vec<Option<(Adapter, Optimizer)>>,
}

impl Adapters {
    /// No adapters (a run without feature taps).
    pub fn none() -> Adapters {
        Adapters { slots: Vec::new() }
    }

    /// Fresh adapters for the taps that name one ([`FeatureTap::adapter`]), each seeded from
    /// the run's `seed` and its tap's position, with the run's optimizer settings.
    pub fn for_taps(
        taps: &[FeatureTap],
        seed: u64,
        optimizer: OptimizerKind,
        weight_decay: f64,
    ) -> Result<Adapters> {
        let slots = taps
            .iter()
            .enumerate()
            .map(|(k, tap)| {
                tap.adapter
                    .map(|spec| {
                        let seed = Rng::new(seed ^ 0xada9 ^ ((k as u64 + 1) << 40)).next_u64();
                        let a = Adapter::new(spec, seed)?;
                        let opt = Optimizer::new(optimizer, weight_decay, &a.graph, &a.weights);
                        Ok((a, opt))
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(Adapters { slots })
    }

    /// Tap `k`'s adapter, if it has one.
    pub fn get(&self, k: usize) -> Option<&Adapter> {
        self.slots.get(k).and_then(|s| s.as_ref()).map(|(a, _)| a)
    }

    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// One optimizer update of every adapter that has gradients (`grads`, one entry per tap,
    /// as the train step returns them), with the student's learning rate and momentum.
    pub fn step(
        &mut self,
        grads: &[Option<HashMap<String, Tensor>>],
        lr: f64,
        momentum: Option<f64>,
    ) -> Result<()> {
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            if let (Some((_, opt)), Some(g)) = (slot, g) {
                opt.step(g, lr, momentum)?;
            }
        }
        Ok(())
    }

    /// The adapters' parameters (`K.conv.weight`, `K.bn.weight`, `K.bn.bias` for tap `K`) and
    /// optimizer buffers (`K.optimizer.m.conv.weight`, ...), for the resume state.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (k, slot) in self.slots.iter().enumerate() {
            let Some((a, opt)) = slot else { continue };
            for (name, _, var) in a.weights.trainable(&a.graph) {
                out.push((format!("{k}.{name}"), var.as_tensor().clone()));
            }
            for (name, t) in opt.state() {
                out.push((format!("{k}.optimizer.{name}"), t));
            }
        }
        out
    }

    /// Restores what [`Adapters::state`] saved; `steps` is the optimizer steps taken (AdamW's
    /// bias correction). Every adapter's parameters must be there.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for (k, slot) in self.slots.iter_mut().enumerate() {
            let Some((a, opt)) = slot else { continue };
            for (name, _, var) in a.weights.trainable(&a.graph) {
                let t = tensors.remove(&format!("{k}.{name}")).with_context(|| {
                    format!("the resume state has no `{name}` for the adapter of feature tap {k}")
                })?;
                if t.dims() != var.dims() {
                    bail!(
                        "the resume state's `{name}` of feature tap {k}'s adapter has shape {:?}, the adapter {:?}",
                        t.dims(),
                        var.dims()
                    );
                }
                var.set(&t)?;
            }
            let prefix = format!("{k}.optimizer.");
            let names: Vec<String> = tensors
                .keys()
                .filter(|name| name.starts_with(&prefix))
                .cloned()
                .collect();
            let buffers: HashMap<String, Tensor> = names
                .into_iter()
                .filter_map(|name| {
                    let t = tensors.remove(&name)?;
                    Some((name[prefix.len()..].to_string(), t))
                })
                .collect();
            opt.load_state(buffers, steps)
                .with_context(|| format!("the adapter of feature tap {k}"))?;
        }
        if let Some(extra) = tensors.keys().next() {
            bail!("the resume state has an adapter entry `{extra}` for no adapter of this run");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::forward_train;
    use crate::train::feature_kd::{HintLoss, hint_loss};
    use candle_core::Var;

    fn random(seed: u64, len: usize, scale: f32) -> Vec<f32> {
        Rng::new(seed)
            .normals(len)
            .into_iter()
            .map(|v| v * scale)
            .collect()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        let top = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * top,
                "{what}[{i}]: {a} vs {b} (largest {top})"
            );
        }
    }

    /// The slice-level forward and backward against Candle autograd through the adapter's
    /// graph (the stock conv and batch-norm ops) and `hint_loss`: the loss, the gradient for
    /// the student's map and for the three parameters, with gamma and beta moved off their
    /// initial values so that every term of the batch norm's backward matters.
    #[test]
    fn gradients_match_candle_autograd() {
        let (n, h, w) = (3, 2, 5);
        let plane = h * w;
        for (cs, ct) in [(4, 6), (6, 4)] {
            let spec = AdapterSpec {
                student_channels: cs,
                teacher_channels: ct,
            };
            let a = Adapter::new(spec, 11).unwrap();
            let cpu = &Device::Cpu;
            a.weights
                .var("bn.weight")
                .unwrap()
                .set(
                    &Tensor::from_vec(random(3, ct, 0.3), ct, cpu)
                        .unwrap()
                        .affine(1.0, 1.0)
                        .unwrap(),
                )
                .unwrap();
            a.weights
                .var("bn.bias")
                .unwrap()
                .set(&Tensor::from_vec(random(4, ct, 0.5), ct, cpu).unwrap())
                .unwrap();
            let s = random(1, n * cs * plane, 1.0);
            let t = random(2, n * ct * plane, 2.0);
            let weight = 2.5;
            let got = a.loss_grad(&s, &t, n, plane, weight).unwrap();

            let sv = Var::from_tensor(&Tensor::from_vec(s.clone(), (n, cs, h, w), cpu).unwrap())
                .unwrap();
            let tt = Tensor::from_vec(t.clone(), (n, ct, h, w), cpu).unwrap();
            let y = forward_train(&a.graph, &a.weights, sv.as_tensor(), 0).unwrap();
            let loss = hint_loss(HintLoss::Mse, &y, &tt, weight).unwrap();
            let want = loss.to_scalar::<f32>().unwrap() as f64;
            assert!(
                (got.loss - want).abs() < 1e-5 * want,
                "{cs}->{ct}: loss {} vs {want}",
                got.loss
            );
            let store = loss.backward().unwrap();
            assert_close(
                &got.student_grad,
                &flat(store.get(sv.as_tensor()).unwrap()),
                "student map",
            );
            assert_eq!(got.param_grads.len(), 3);
            for (name, _, var) in a.weights.trainable(&a.graph) {
                let want = store.get(var.as_tensor()).unwrap();
                let g = &got.param_grads[&name];
                assert_eq!(g.dims(), want.dims(), "{name}");
                assert_close(&flat(g), &flat(want), &name);
            }
        }
    }

    /// The adapter learns: with the teacher's map a linear map of the student's plus noise,
    /// fifty SGD steps on the adapter alone cut the hint by far more than half.
    #[test]
    fn training_the_adapter_lowers_the_hint() {
        let (n, plane, cs, ct) = (8, 16, 5, 7);
        let s = random(1, n * cs * plane, 1.0);
        let mix = random(2, ct * cs, 1.0);
        let noise = random(3, n * ct * plane, 0.05);
        let mut t = vec![0f32; n * ct * plane];
        for smp in 0..n {
            for o in 0..ct {
                for p in 0..plane {
                    let v: f32 = (0..cs)
                        .map(|i| mix[o * cs + i] * s[(smp * cs + i) * plane + p])
                        .sum();
                    t[(smp * ct + o) * plane + p] =
                        3.0 * v + 1.0 + noise[(smp * ct + o) * plane + p];
                }
            }
        }
        let tap = FeatureTap {
            student: "s".into(),
            teacher: "t".into(),
            weight: 1.0,
            adapter: Some(AdapterSpec {
                student_channels: cs,
                teacher_channels: ct,
            }),
        };
        let kind = OptimizerKind::Sgd {
            momentum: 0.9,
            nesterov: false,
        };
        let mut adapters = Adapters::for_taps(&[tap], 0, kind, 0.0).unwrap();
        let loss = |a: &Adapters| a.get(0).unwrap().loss_grad(&s, &t, n, plane, 1.0).unwrap();
        let first = loss(&adapters).loss;
        for _ in 0..50 {
            let g = loss(&adapters).param_grads;
            adapters.step(&[Some(g)], 0.05, None).unwrap();
        }
        let last = loss(&adapters).loss;
        assert!(last < 0.2 * first, "{first} -> {last}");
    }

    /// The resume state restores the parameters and momentum buffers exactly, and an adapter
    /// missing from it is refused.
    #[test]
    fn state_round_trips_and_missing_adapters_are_refused() {
        let spec = AdapterSpec {
            student_channels: 3,
            teacher_channels: 5,
        };
        let taps: Vec<FeatureTap> = [None, Some(spec)]
            .into_iter()
            .map(|adapter| FeatureTap {
                student: "a".into(),
                teacher: "b".into(),
                weight: 1.0,
                adapter,
            })
            .collect();
        let kind = OptimizerKind::Sgd {
            momentum: 0.9,
            nesterov: true,
        };
        let mut a = Adapters::for_taps(&taps, 4, kind, 5e-4).unwrap();
        assert!(a.get(0).is_none() && a.get(1).is_some());
        let (s, t) = (random(1, 2 * 3 * 4, 1.0), random(2, 2 * 5 * 4, 1.0));
        let g = a.get(1).unwrap().loss_grad(&s, &t, 2, 4, 1.0).unwrap();
        a.step(&[None, Some(g.param_grads)], 0.1, None).unwrap();
        let state = a.state();
        let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"1.conv.weight") && names.contains(&"1.optimizer.m.bn.bias"));

        let mut b = Adapters::for_taps(&taps, 99, kind, 5e-4).unwrap();
        b.load_state(state.iter().cloned().collect(), 1).unwrap();
        let bits = |x: &Adapters| -> Vec<(String, Vec<u32>)> {
            x.state()
                .iter()
                .map(|(n, t)| (n.clone(), flat(t).iter().map(|v| v.to_bits()).collect()))
                .collect()
        };
        assert_eq!(bits(&a), bits(&b));

        let mut c = Adapters::for_taps(&taps, 4, kind, 5e-4).unwrap();
        let e = c.load_state(HashMap::new(), 1).unwrap_err().to_string();
        assert!(e.contains("no `conv.weight`"), "{e}");
    }
}
