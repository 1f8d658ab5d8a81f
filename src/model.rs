//! A model: its graph, its weights and what a deployment needs to know about it.

use crate::exec::{self, Mode};
use crate::graph::{Graph, Op};
use crate::models::{ArchSpec, Stem};
use crate::weights::Weights;
use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// How raw images become network input: resize to `input_size`, scale to [0, 1], then
/// `(x - mean) / std` per channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// Height and width the network expects.
    pub input_size: [usize; 2],
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocessing {
    pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

    /// ImageNet statistics, at 224 for the ImageNet stem and 32 for the small-input stem.
    pub fn for_stem(stem: Stem) -> Preprocessing {
        let size = if stem == Stem::Cifar { 32 } else { 224 };
        Preprocessing {
            input_size: [size, size],
            mean: Self::IMAGENET_MEAN,
            std: Self::IMAGENET_STD,
        }
    }
}

/// Where a checkpoint came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Provenance {
    /// `slimcandle <version>`.
    pub tool: String,
    /// The command line that wrote the file.
    pub command: String,
    /// UTC time, RFC 3339.
    pub created: String,
    /// What the weights came from (a state dict, a parent checkpoint, a fresh init with seed).
    pub source: String,
    /// Earlier steps, oldest first, carried over from the parent checkpoint.
    #[serde(default)]
    pub history: Vec<String>,
    /// The effective recipe (`recipe.lock.toml`) of the `slimcandle run` that made the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<String>,
}

impl Provenance {
    /// Provenance for a file being written now by this process.
    pub fn now(source: impl Into<String>) -> Provenance {
        Provenance {
            tool: format!("slimcandle {}", env!("CARGO_PKG_VERSION")),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            created: utc_now_rfc3339(),
            source: source.into(),
            history: Vec::new(),
            recipe: None,
        }
    }

    /// Provenance of a file derived from a parent, keeping the parent's story.
    pub fn derived_from(parent: &Provenance, source: impl Into<String>) -> Provenance {
        let mut p = Provenance::now(source);
        p.history = parent.history.clone();
        p.history.push(format!(
            "{} ({}, {})",
            parent.command, parent.source, parent.created
        ));
        p
    }
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SSZ`, without a date-time dependency.
pub fn utc_now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil-from-days algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Everything in a checkpoint besides graph and weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// The architecture the graph was first built from; informational once passes rewrite it.
    pub arch: Option<ArchSpec>,
    pub class_names: Vec<String>,
    pub preprocessing: Preprocessing,
    pub provenance: Provenance,
}

pub struct Model {
    pub graph: Graph,
    pub weights: Weights,
    pub meta: ModelMeta,
}

/// `class_0`, `class_1`, ... for models whose classes have no names yet.
pub fn default_class_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("class_{i}")).collect()
}

impl Model {
    /// A freshly initialised model of `spec`.
    pub fn init(spec: &ArchSpec, seed: u64) -> Result<Model> {
        let graph = spec.build()?;
        let weights = Weights::init_with(&graph, seed, spec.family.init_scheme())?;
        Ok(Model {
            graph,
            weights,
            meta: ModelMeta {
                arch: Some(spec.clone()),
                class_names: default_class_names(spec.num_classes),
                preprocessing: Preprocessing::for_stem(spec.stem),
                provenance: Provenance::now(format!("initialised with seed {seed}")),
            },
        })
    }

    /// A copy whose weights have storage of their own (see [`Weights::deep_copy`]), for
    /// passes that zero weights while the original stays usable.
    pub fn deep_copy(&self) -> Result<Model> {
        Ok(Model {
            graph: self.graph.clone(),
            weights: self.weights.deep_copy()?,
            meta: self.meta.clone(),
        })
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        exec::forward(&self.graph, &self.weights, x, mode)
    }

    /// An eval-mode engine on this model's weights (shared: make a new one after they
    /// change), planned once for many forward passes (see [`crate::infer::Engine`]).
    pub fn engine(&self) -> crate::infer::Engine {
        crate::infer::Engine::new(&self.graph, &self.weights)
    }

    /// Replaces the last weight layer (the classifier) by a freshly initialised one with
    /// `classes` outputs; class names become placeholders until the caller sets them.
    pub fn replace_classifier(&mut self, classes: usize, seed: u64) -> Result<()> {
        let node = self
            .graph
            .nodes
            .iter()
            .rposition(|n| matches!(n.op, Op::Conv2d { groups: 1, .. } | Op::Linear { .. }))
            .context("the graph has no classifier layer")?;
        match &mut self.graph.nodes[node].op {
            Op::Conv2d { out_channels, .. } => *out_channels = classes,
            Op::Linear { out_features, .. } => *out_features = classes,
            _ => unreachable!("selected above"),
        }
        self.graph
            .validate()
            .context("the last weight layer does not feed the output directly")?;
        let counts = self.graph.channel_counts()?;
        if counts[self.graph.output] != classes {
            bail!("the last weight layer does not determine the number of outputs");
        }
        let scheme = self
            .meta
            .arch
            .as_ref()
            .map(|a| a.family.init_scheme())
            .unwrap_or_default();
        self.weights.init_node(&self.graph, node, seed, scheme)?;
        self.meta.class_names = default_class_names(classes);
        if let Some(arch) = &mut self.meta.arch {
            arch.num_classes = classes;
        }
        Ok(())
    }

    pub fn num_classes(&self) -> usize {
        self.meta.class_names.len()
    }
}
