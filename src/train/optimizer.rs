//! SGD (momentum, Nesterov) and AdamW with PyTorch's update rules. Weight decay applies to conv
//! and linear weights only: batch-norm parameters and biases are exempt.

use crate::graph::{Graph, ParamRole};
use crate::kernels::sgd::{Sgd, sgd_step};
use crate::weights::Weights;
use anyhow::{Result, bail};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerKind {
    Sgd { momentum: f64, nesterov: bool },
    AdamW { beta1: f64, beta2: f64, eps: f64 },
}

struct ParamState {
    name: String,
    var: Var,
    decay: bool,
    /// Momentum buffer (SGD) or first moment (AdamW).
    m: Option<Tensor>,
    /// Second moment (AdamW).
    v: Option<Tensor>,
}

/// Where [`Optimizer::step`] finds each parameter's gradient: Candle's `GradStore` (the
/// autograd path) or a map from parameter name to gradient (the train-step executor,
/// [`super::step`]).
pub trait Gradients {
    /// The gradient of the parameter `name` held in `var`, detached, if it has one.
    fn gradient(&self, name: &str, var: &Var) -> Option<Tensor>;
    /// Replaces (or sets) that gradient.
    fn set_gradient(&mut self, name: &str, var: &Var, g: Tensor);
}

impl Gradients for GradStore {
    fn gradient(&self, _name: &str, var: &Var) -> Option<Tensor> {
        // Candle's variable gradients can still reference the forward graph; detached, the
        // stored buffers do not keep a step's activations alive.
        self.get(var.as_tensor()).map(Tensor::detach)
    }

    fn set_gradient(&mut self, _name: &str, var: &Var, g: Tensor) {
        self.insert(var.as_tensor(), g);
    }
}

impl Gradients for HashMap<String, Tensor> {
    fn gradient(&self, name: &str, _var: &Var) -> Option<Tensor> {
        self.get(name).cloned()
    }

    fn set_gradient(&mut self, name: &str, _var: &Var, g: Tensor) {
        self.insert(name.to_string(), g);
    }
}

pub struct Optimizer {
    kind: OptimizerKind,
    weight_decay: f64,
    params: Vec<ParamState>,
    /// Updates applied so far (AdamW's bias correction).
    pub steps: u64,
}

impl Optimizer {
    pub fn new(
        kind: OptimizerKind,
        weight_decay: f64,
        graph: &Graph,
        weights: &Weights,
    ) -> Optimizer {
        let params = weights
            .trainable(graph)
            .into_iter()
            .map(|(name, role, var)| ParamState {
                name,
                var,
                decay: matches!(role, ParamRole::ConvWeight | ParamRole::LinearWeight),
                m: None,
                v: None,
            })
            .collect();
        Optimizer {
            kind,
            weight_decay,
            params,
            steps: 0,
        }
    }

    /// One update with learning rate `lr`; `momentum` overrides SGD's (one-cycle) or AdamW's
    /// beta1. Parameters without a gradient are left alone.
    pub fn step<G: Gradients + ?Sized>(
        &mut self,
        grads: &G,
        lr: f64,
        momentum: Option<f64>,
    ) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for p in &mut self.params {
            let Some(g) = grads.gradient(&p.name, &p.var) else {
                continue;
            };
            let g = &g;
            // Detached: the update must not extend the autograd graph from step to step.
            let w = &p.var.as_detached_tensor();
            match self.kind {
                OptimizerKind::Sgd {
                    momentum: base,
                    nesterov,
                } => {
                    let mu = momentum.unwrap_or(base);
                    let hp = Sgd {
                        lr: lr as f32,
                        momentum: mu as f32,
                        nesterov,
                        weight_decay: (p.decay && self.weight_decay > 0.0)
                            .then_some(self.weight_decay as f32),
                    };
                    if let Some(buf) = sgd_step(w, g, p.m.as_ref(), hp)? {
                        p.m = buf;
                        continue;
                    }
                    let mut d = if p.decay && self.weight_decay > 0.0 {
                        (g + (w * self.weight_decay)?)?
                    } else {
                        g.clone()
                    };
                    if mu > 0.0 {
                        let buf = match &p.m {
                            Some(buf) => ((buf * mu)? + &d)?,
                            None => d.clone(),
                        };
                        d = if nesterov {
                            (d + (&buf * mu)?)?
                        } else {
                            buf.clone()
                        };
                        p.m = Some(buf);
                    }
                    p.var.set(&(w - (d * lr)?)?)?;
                }
                OptimizerKind::AdamW { beta1, beta2, eps } => {
                    let b1 = momentum.unwrap_or(beta1);
                    let decayed = if p.decay && self.weight_decay > 0.0 {
                        (w * (1.0 - lr * self.weight_decay))?
                    } else {
                        w.clone()
                    };
                    let m = match &p.m {
                        Some(m) => ((m * b1)? + (g * (1.0 - b1))?)?,
                        None => (g * (1.0 - b1))?,
                    };
                    let v = match &p.v {
                        Some(v) => ((v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?,
                        None => (g.sqr()? * (1.0 - beta2))?,
                    };
                    let m_hat = (&m / (1.0 - b1.powi(t)))?;
                    let v_hat = (&v / (1.0 - beta2.powi(t)))?;
                    let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
                    p.var.set(&(decayed - (update * lr)?)?)?;
                    p.m = Some(m);
                    p.v = Some(v);
                }
            }
        }
        Ok(())
    }

    /// Optimizer buffers by name (`m.<param>`, `v.<param>`), for the resume file.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in &self.params {
            if let Some(m) = &p.m {
                out.push((format!("m.{}", p.name), m.clone()));
            }
            if let Some(v) = &p.v {
                out.push((format!("v.{}", p.name), v.clone()));
            }
        }
        out
    }

    /// Restores buffers saved by [`Optimizer::state`].
    pub fn load_state(
        &mut self,
        mut tensors: std::collections::HashMap<String, Tensor>,
        steps: u64,
    ) -> Result<()> {
        for p in &mut self.params {
            for (prefix, slot) in [("m", &mut p.m), ("v", &mut p.v)] {
                if let Some(t) = tensors.remove(&format!("{prefix}.{}", p.name)) {
                    if t.dims() != p.var.dims() {
                        bail!(
                            "optimizer state for `{}` has shape {:?}, the parameter {:?}",
                            p.name,
                            t.dims(),
                            p.var.dims()
                        );
                    }
                    *slot = Some(t);
                }
            }
        }
        if let Some(extra) = tensors.keys().next() {
            bail!("optimizer state has an entry `{extra}` for no parameter of this model");
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{ArchOptions, ArchSpec};

    /// One SGD-Nesterov step and two AdamW steps on a quadratic, against PyTorch's formulas
    /// written out by hand.
    #[test]
    fn updates_follow_pytorch_rules() {
        let spec = ArchSpec::parse(
            "mobilenet_v1",
            &ArchOptions {
                width: Some(0.25),
                num_classes: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        let graph = spec.build().unwrap();
        let weights = Weights::init(&graph, 1).unwrap();
        let fc = weights.var("fc.weight").unwrap().clone();
        let bias = weights.var("fc.bias").unwrap().clone();
        let w0: Vec<f32> = fc.flatten_all().unwrap().to_vec1().unwrap();
        let loss = || {
            (fc.as_tensor().sqr().unwrap().sum_all().unwrap() + bias.as_tensor().sum_all().unwrap())
                .unwrap()
        };

        let kind = OptimizerKind::Sgd {
            momentum: 0.9,
            nesterov: true,
        };
        let mut opt = Optimizer::new(kind, 0.1, &graph, &weights);
        opt.step(&loss().backward().unwrap(), 0.5, None).unwrap();
        // d = 2w + 0.1w; buf = d; nesterov: d + 0.9 buf = 1.9 d.
        let w1: Vec<f32> = fc.flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in w0.iter().zip(&w1) {
            assert!((a - 0.5 * 1.9 * 2.1 * a - b).abs() < 1e-6);
        }
        // The bias has no weight decay: gradient 1, step -0.5 * 1.9.
        let b1: Vec<f32> = bias.to_vec1().unwrap();
        assert!((b1[0] + 0.95).abs() < 1e-6, "{b1:?}");

        let kind = OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        let mut opt = Optimizer::new(kind, 0.01, &graph, &weights);
        let before: Vec<f32> = fc.flatten_all().unwrap().to_vec1().unwrap();
        opt.step(&loss().backward().unwrap(), 0.1, None).unwrap();
        let after: Vec<f32> = fc.flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in before.iter().zip(&after) {
            // First AdamW step: m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps).
            let g = 2.0 * a;
            let expected = a * (1.0 - 0.1 * 0.01) - 0.1 * g / (g.abs() + 1e-8);
            assert!((expected - b).abs() < 1e-5);
        }
        assert_eq!(
            opt.state().len(),
            4,
            "m and v for the two parameters with gradients"
        );
    }
}
