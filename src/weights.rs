//! Parameters and buffers of a graph, keyed by torchvision state-dict names.

use crate::graph::{Graph, ParamRole, ParamSpec};
use crate::rng::Rng;
use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};

/// How a family initialises its weights, as torchvision does in each model's constructor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitScheme {
    /// Convs Kaiming-normal over fan-out, linear layers N(0, 0.01) (the MobileNets; also
    /// used for the ShuffleNets).
    #[default]
    KaimingNormalFanOut,
    /// Convs Kaiming-uniform over fan-in, the classifier conv N(0, 0.01) (SqueezeNet). With
    /// fan-out scaling a 10-class classifier conv starts with weights of std 0.45, and the
    /// network diverges in its first steps.
    KaimingUniformFanIn,
}

/// A fresh value for one parameter. `classifier` marks the last weight layer.
fn init_tensor(
    spec: &ParamSpec,
    rng: &mut Rng,
    scheme: InitScheme,
    classifier: bool,
) -> Result<Tensor> {
    let n: usize = spec.shape.iter().product();
    let values: Vec<f32> = match spec.role {
        ParamRole::ConvWeight => match scheme {
            InitScheme::KaimingNormalFanOut => {
                let fan_out = spec.shape[0] * spec.shape[2] * spec.shape[3];
                let std = (2.0 / fan_out as f64).sqrt();
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            }
            InitScheme::KaimingUniformFanIn if classifier => {
                (0..n).map(|_| (rng.normal() * 0.01) as f32).collect()
            }
            InitScheme::KaimingUniformFanIn => {
                let fan_in = spec.shape[1] * spec.shape[2] * spec.shape[3];
                let bound = (6.0 / fan_in as f64).sqrt();
                (0..n)
                    .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                    .collect()
            }
        },
        ParamRole::LinearWeight => (0..n).map(|_| (rng.normal() * 0.01) as f32).collect(),
        ParamRole::BnWeight | ParamRole::RunningVar => vec![1.0; n],
        ParamRole::Bias | ParamRole::BnBias | ParamRole::RunningMean => vec![0.0; n],
    };
    Ok(Tensor::from_vec(
        values,
        spec.shape.as_slice(),
        &Device::Cpu,
    )?)
}

/// The last conv or linear layer: the classifier of every family here.
fn last_weight_layer(graph: &Graph) -> Option<usize> {
    graph.nodes.iter().rposition(|n| n.op.has_weight_matrix())
}

/// Every parameter and buffer of one graph. Each is a [`Var`] so training can update it in
/// place; running statistics are Vars too but never handed to an optimizer.
#[derive(Clone)]
pub struct Weights {
    vars: BTreeMap<String, Var>,
}

impl Weights {
    /// Fresh initialisation as torchvision does for these families: conv weights Kaiming-normal
    /// (fan-out), linear weights N(0, 0.01), biases zero, batch norm identity.
    pub fn init(graph: &Graph, seed: u64) -> Result<Weights> {
        Weights::init_with(graph, seed, InitScheme::default())
    }

    /// Fresh initialisation by `scheme`.
    pub fn init_with(graph: &Graph, seed: u64, scheme: InitScheme) -> Result<Weights> {
        let mut rng = Rng::new(seed);
        let mut vars = BTreeMap::new();
        let classifier = last_weight_layer(graph);
        for spec in graph.param_specs() {
            let t = init_tensor(&spec, &mut rng, scheme, Some(spec.node) == classifier)?;
            vars.insert(spec.name.clone(), Var::from_tensor(&t)?);
        }
        Ok(Weights { vars })
    }

    /// Re-initialises the parameters of one node (a replaced classifier, say).
    pub fn init_node(
        &mut self,
        graph: &Graph,
        node: usize,
        seed: u64,
        scheme: InitScheme,
    ) -> Result<()> {
        let mut rng = Rng::new(seed);
        let classifier = last_weight_layer(graph) == Some(node);
        for spec in graph.param_specs().into_iter().filter(|s| s.node == node) {
            let t = init_tensor(&spec, &mut rng, scheme, classifier)?;
            self.vars.insert(spec.name.clone(), Var::from_tensor(&t)?);
        }
        Ok(())
    }

    /// Takes tensors named as in a PyTorch state dict, checking that every key the graph needs
    /// is there with the right shape and that nothing else is. `num_batches_tracked` entries
    /// are accepted and ignored. Errors list the offending keys by name.
    pub fn from_state_dict(graph: &Graph, mut tensors: HashMap<String, Tensor>) -> Result<Weights> {
        let mut vars = BTreeMap::new();
        let mut missing = Vec::new();
        let mut wrong_shape = Vec::new();
        for spec in graph.param_specs() {
            match tensors.remove(&spec.name) {
                None => missing.push(spec.name),
                Some(t) if t.dims() != spec.shape.as_slice() => wrong_shape.push(format!(
                    "{} is {:?}, the model needs {:?}",
                    spec.name,
                    t.dims(),
                    spec.shape
                )),
                Some(t) => {
                    let t = t.to_dtype(DType::F32)?;
                    vars.insert(spec.name, Var::from_tensor(&t)?);
                }
            }
        }
        let mut unexpected: Vec<String> = tensors
            .into_keys()
            .filter(|k| !k.ends_with("num_batches_tracked"))
            .collect();
        unexpected.sort();
        if missing.is_empty() && unexpected.is_empty() && wrong_shape.is_empty() {
            return Ok(Weights { vars });
        }
        let mut msg = String::from("the weights do not fit this architecture");
        let mut section = |title: &str, items: &[String]| {
            if !items.is_empty() {
                let shown: Vec<&str> = items.iter().take(12).map(String::as_str).collect();
                let more = if items.len() > 12 {
                    format!(" (and {} more)", items.len() - 12)
                } else {
                    String::new()
                };
                msg.push_str(&format!(
                    "\n  {title} ({}): {}{more}",
                    items.len(),
                    shown.join(", ")
                ));
            }
        };
        section("missing keys", &missing);
        section("unexpected keys", &unexpected);
        section("wrong shapes", &wrong_shape);
        bail!(msg)
    }

    /// The tensor stored under `name`, detached from autograd.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        Ok(self.var(name)?.as_detached_tensor())
    }

    pub fn var(&self, name: &str) -> Result<&Var> {
        match self.vars.get(name) {
            Some(v) => Ok(v),
            None => bail!("no parameter named `{name}`"),
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.keys().map(String::as_str)
    }

    /// (name, tensor) pairs in name order, for saving.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_tensor()))
    }

    /// The Vars an optimizer should update, in graph order, with their roles.
    pub fn trainable(&self, graph: &Graph) -> Vec<(String, ParamRole, Var)> {
        graph
            .param_specs()
            .into_iter()
            .filter(|s| s.role.is_trainable())
            .filter_map(|s| {
                self.vars
                    .get(&s.name)
                    .map(|v| (s.name.clone(), s.role, v.clone()))
            })
            .collect()
    }

    /// Replaces one tensor (a pass rewriting weights); the shape may change.
    pub fn insert(&mut self, name: &str, tensor: &Tensor) -> Result<()> {
        self.vars
            .insert(name.to_string(), Var::from_tensor(tensor)?);
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> Option<Var> {
        self.vars.remove(name)
    }

    /// A copy with storage of its own. `clone` shares the Vars (an optimizer and the model
    /// must see the same values); a pass that zeroes weights or a train-mode forward that
    /// updates running statistics on a scratch copy needs this instead.
    pub fn deep_copy(&self) -> Result<Weights> {
        let vars = self
            .vars
            .iter()
            .map(|(name, v)| Ok((name.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(Weights { vars })
    }
}

#[cfg(test)]
mod init_tests {
    use super::*;
    use crate::models::{ArchOptions, ArchSpec};

    fn std_of(t: &Tensor) -> f64 {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    }

    /// SqueezeNet starts as torchvision's does: a small classifier conv and fan-in uniform
    /// convs; the MobileNets keep fan-out normal convs.
    #[test]
    fn families_initialise_as_torchvision() {
        let opts = ArchOptions {
            num_classes: Some(10),
            ..Default::default()
        };
        let spec = ArchSpec::parse("squeezenet1_1", &opts).unwrap();
        let graph = spec.build().unwrap();
        let w = Weights::init_with(&graph, 0, spec.family.init_scheme()).unwrap();
        let classifier = std_of(&w.get("classifier.1.weight").unwrap());
        assert!((classifier - 0.01).abs() < 0.002, "{classifier}");
        // features.3.squeeze: 16 x 64 x 1 x 1, uniform(+-sqrt(6/64)) has std sqrt(2/64).
        let squeeze = std_of(&w.get("features.3.squeeze.weight").unwrap());
        assert!((squeeze - (2.0f64 / 64.0).sqrt()).abs() < 0.02, "{squeeze}");
        let spec = ArchSpec::parse("mobilenet_v2", &opts).unwrap();
        let graph = spec.build().unwrap();
        let w = Weights::init_with(&graph, 0, spec.family.init_scheme()).unwrap();
        // features.18.0: 1280 x 320 x 1 x 1, fan-out normal std sqrt(2/1280).
        let last = std_of(&w.get("features.18.0.weight").unwrap());
        assert!((last - (2.0f64 / 1280.0).sqrt()).abs() < 0.002, "{last}");
    }
}
