//! Model families. Each builder emits a [`Graph`] with torchvision parameter names; nothing
//! outside this module knows which family a graph came from.

mod blocks;
mod mobilenet_v1;
mod mobilenet_v2;
mod mobilenet_v3;
mod shufflenet_v1;
mod shufflenet_v2;
mod squeezenet;

pub use blocks::make_divisible;

use crate::graph::Graph;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    #[serde(rename = "squeezenet1_0")]
    Squeezenet1_0,
    #[serde(rename = "squeezenet1_1")]
    Squeezenet1_1,
    MobilenetV1,
    MobilenetV2,
    MobilenetV3Small,
    MobilenetV3Large,
    ShufflenetV1,
    ShufflenetV2,
}

impl Family {
    pub const ALL: [Family; 8] = [
        Family::Squeezenet1_0,
        Family::Squeezenet1_1,
        Family::MobilenetV1,
        Family::MobilenetV2,
        Family::MobilenetV3Small,
        Family::MobilenetV3Large,
        Family::ShufflenetV1,
        Family::ShufflenetV2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Family::Squeezenet1_0 => "squeezenet1_0",
            Family::Squeezenet1_1 => "squeezenet1_1",
            Family::MobilenetV1 => "mobilenet_v1",
            Family::MobilenetV2 => "mobilenet_v2",
            Family::MobilenetV3Small => "mobilenet_v3_small",
            Family::MobilenetV3Large => "mobilenet_v3_large",
            Family::ShufflenetV1 => "shufflenet_v1",
            Family::ShufflenetV2 => "shufflenet_v2",
        }
    }

    /// The initialisation torchvision's constructor for this family uses.
    pub fn init_scheme(self) -> crate::weights::InitScheme {
        match self {
            Family::Squeezenet1_0 | Family::Squeezenet1_1 => {
                crate::weights::InitScheme::KaimingUniformFanIn
            }
            _ => crate::weights::InitScheme::KaimingNormalFanOut,
        }
    }

    fn has_width(self) -> bool {
        !matches!(self, Family::Squeezenet1_0 | Family::Squeezenet1_1)
    }
}

/// Input stem: `imagenet` is the published network; `cifar` keeps resolution for 32x32 inputs
/// (each family's module doc says what it changes). Parameter shapes are the same for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Stem {
    #[default]
    Imagenet,
    Cifar,
}

impl std::str::FromStr for Stem {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Stem> {
        match s {
            "imagenet" => Ok(Stem::Imagenet),
            "cifar" => Ok(Stem::Cifar),
            _ => bail!("unknown stem `{s}`: use `imagenet` or `cifar`"),
        }
    }
}

/// A fully specified architecture: what a builder needs to emit a graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchSpec {
    pub family: Family,
    /// Width multiplier (MobileNets) or scale (ShuffleNets); 1.0 for SqueezeNet.
    pub width: f64,
    /// Groups of ShuffleNet V1's 1x1 convs; 1 elsewhere.
    pub groups: usize,
    pub num_classes: usize,
    pub stem: Stem,
}

/// Options given next to `--arch` on the command line; `None` means the family's default.
#[derive(Debug, Clone, Default)]
pub struct ArchOptions {
    pub width: Option<f64>,
    pub groups: Option<usize>,
    pub num_classes: Option<usize>,
    pub stem: Option<Stem>,
}

fn scale_suffix(s: &str) -> Option<f64> {
    match s {
        "x0_5" => Some(0.5),
        "x1_0" => Some(1.0),
        "x1_5" => Some(1.5),
        "x2_0" => Some(2.0),
        _ => None,
    }
}

/// Levenshtein distance, for "did you mean" hints.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

impl ArchSpec {
    /// Parses an architecture name (`mobilenet_v2`, or torchvision's `shufflenet_v2_x1_5`,
    /// or `shufflenet_v1_g8`) with its options, validating every combination.
    pub fn parse(arch: &str, opts: &ArchOptions) -> Result<ArchSpec> {
        let arch = arch.trim().to_ascii_lowercase().replace('-', "_");
        let mut width = None;
        let mut groups = None;
        let mut family = Family::ALL.iter().copied().find(|f| f.name() == arch);
        if family.is_none() {
            // Names with a built-in variant: shufflenet_v2_x1_5, shufflenet_v1_g3[_x0_5].
            if let Some(rest) = arch.strip_prefix("shufflenet_v2_") {
                if let Some(s) = scale_suffix(rest) {
                    family = Some(Family::ShufflenetV2);
                    width = Some(s);
                }
            } else if let Some(rest) = arch.strip_prefix("shufflenet_v1_g") {
                // The scale suffix is optional: `shufflenet_v1_g3` leaves it to --width.
                let (g, scale) = match rest.split_once('_') {
                    Some((g, s)) => (g, scale_suffix(s).map(Some)),
                    None => (rest, Some(None)),
                };
                if let (Ok(g), Some(s)) = (g.parse::<usize>(), scale) {
                    family = Some(Family::ShufflenetV1);
                    groups = Some(g);
                    width = s;
                }
            }
        }
        let Some(family) = family else {
            let names: Vec<&str> = Family::ALL.iter().map(|f| f.name()).collect();
            let best = names
                .iter()
                .min_by_key(|n| edit_distance(&arch, n))
                .copied()
                .unwrap_or_default();
            let hint = if edit_distance(&arch, best) <= 4 {
                format!(" (did you mean `{best}`?)")
            } else {
                String::new()
            };
            bail!(
                "unknown architecture `{arch}`{hint}; known: {}",
                names.join(", ")
            );
        };
        if let (Some(a), Some(b)) = (width, opts.width)
            && (a - b).abs() > 1e-9
        {
            bail!("`{arch}` fixes the scale at {a}, but --width {b} was given");
        }
        if let (Some(a), Some(b)) = (groups, opts.groups)
            && a != b
        {
            bail!("`{arch}` fixes groups at {a}, but --groups {b} was given");
        }
        let width = opts.width.or(width).unwrap_or(1.0);
        let groups = opts
            .groups
            .or(groups)
            .unwrap_or(if family == Family::ShufflenetV1 { 3 } else { 1 });
        let spec = ArchSpec {
            family,
            width,
            groups,
            num_classes: opts.num_classes.unwrap_or(1000),
            stem: opts.stem.unwrap_or_default(),
        };
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<()> {
        let name = self.family.name();
        if self.num_classes == 0 {
            bail!("the number of classes must be at least 1");
        }
        if !(self.width > 0.0 && self.width.is_finite()) {
            bail!("width must be a positive number, not {}", self.width);
        }
        if !self.family.has_width() && self.width != 1.0 {
            bail!(
                "{name} has no width multiplier (got --width {})",
                self.width
            );
        }
        if self.family != Family::ShufflenetV1 && self.groups != 1 {
            bail!("--groups applies to shufflenet_v1 only");
        }
        match self.family {
            Family::ShufflenetV1 => {
                shufflenet_v1::channels(self.groups, self.width)?;
            }
            Family::ShufflenetV2 if shufflenet_v2::stage_channels(self.width).is_none() => {
                bail!(
                    "shufflenet_v2 supports scales 0.5, 1.0, 1.5 and 2.0, not {}",
                    self.width
                )
            }
            _ => {}
        }
        Ok(())
    }

    /// A name that identifies the variant, e.g. `mobilenet_v2_w0_5`, `shufflenet_v1_g8_x0_5`.
    pub fn variant_name(&self) -> String {
        let w = format!("{}", self.width).replace('.', "_");
        let w = if w.contains('_') { w } else { format!("{w}_0") };
        match self.family {
            Family::Squeezenet1_0 | Family::Squeezenet1_1 => self.family.name().to_string(),
            Family::ShufflenetV1 => format!("shufflenet_v1_g{}_x{w}", self.groups),
            Family::ShufflenetV2 => format!("shufflenet_v2_x{w}"),
            f if self.width == 1.0 => f.name().to_string(),
            f => format!("{}_w{w}", f.name()),
        }
    }

    pub fn build(&self) -> Result<Graph> {
        self.validate()?;
        let graph = match self.family {
            Family::Squeezenet1_0 => squeezenet::build(self, false),
            Family::Squeezenet1_1 => squeezenet::build(self, true),
            Family::MobilenetV1 => mobilenet_v1::build(self),
            Family::MobilenetV2 => mobilenet_v2::build(self),
            Family::MobilenetV3Small => mobilenet_v3::build(self, false),
            Family::MobilenetV3Large => mobilenet_v3::build(self, true),
            Family::ShufflenetV1 => shufflenet_v1::build(self)?,
            Family::ShufflenetV2 => shufflenet_v2::build(self),
        };
        graph.validate()?;
        Ok(graph)
    }
}

/// A listed variant with its published ImageNet top-1 (torchvision's model docs, or the paper
/// for MobileNet V1 and ShuffleNet V1, which torchvision does not ship).
pub struct CatalogEntry {
    pub spec: ArchSpec,
    pub imagenet_top1: Option<f64>,
    pub top1_source: &'static str,
}

/// Every family with its common variants, for `slimcandle models`.
pub fn catalog() -> Vec<CatalogEntry> {
    let mut out = Vec::new();
    let mut add = |arch: &str, opts: ArchOptions, top1: Option<f64>, source: &'static str| {
        let spec = ArchSpec::parse(arch, &opts).expect("catalog entries are valid");
        out.push(CatalogEntry {
            spec,
            imagenet_top1: top1,
            top1_source: source,
        });
    };
    let w = |width: f64| ArchOptions {
        width: Some(width),
        ..Default::default()
    };
    let tv = "torchvision";
    add("squeezenet1_0", w(1.0), Some(58.092), tv);
    add("squeezenet1_1", w(1.0), Some(58.178), tv);
    for (width, top1) in [(1.0, 70.6), (0.75, 68.4), (0.5, 63.7), (0.25, 50.6)] {
        add("mobilenet_v1", w(width), Some(top1), "paper");
    }
    for (width, top1, source) in [
        (1.4, 75.0, "paper"),
        (1.0, 71.878, tv),
        (0.75, 69.8, "paper"),
        (0.5, 65.4, "paper"),
        (0.35, 60.3, "paper"),
    ] {
        add("mobilenet_v2", w(width), Some(top1), source);
    }
    add("mobilenet_v3_small", w(1.0), Some(67.668), tv);
    add("mobilenet_v3_large", w(1.0), Some(74.042), tv);
    // Paper, Table 1 (top-1 = 100 - error) and Table 5 for the larger scales.
    let v1_top1 = |g: usize, scale: f64| -> Option<f64> {
        let err = match ((scale * 10.0) as usize, g) {
            (10, 1) => 33.6,
            (10, 2) => 32.7,
            (10, 3) => 32.6,
            (10, 4) => 32.8,
            (10, 8) => 32.4,
            (5, 3) => 43.2,
            (5, 8) => 42.3,
            (15, 3) => 28.5,
            (20, 3) => 26.3,
            _ => return None,
        };
        Some(((100.0 - err) * 10.0f64).round() / 10.0)
    };
    for groups in [1, 2, 3, 4, 8] {
        for scale in [0.5, 1.0, 1.5, 2.0] {
            if shufflenet_v1::channels(groups, scale).is_ok() {
                let opts = ArchOptions {
                    width: Some(scale),
                    groups: Some(groups),
                    ..Default::default()
                };
                let top1 = v1_top1(groups, scale);
                add(
                    "shufflenet_v1",
                    opts,
                    top1,
                    if top1.is_some() { "paper" } else { "" },
                );
            }
        }
    }
    for (scale, top1) in [(0.5, 60.552), (1.0, 69.362), (1.5, 72.996), (2.0, 76.23)] {
        add("shufflenet_v2", w(scale), Some(top1), tv);
    }
    out
}
