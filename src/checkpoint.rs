//! Self-describing checkpoints (see `docs/checkpoint-format.md`): safetensors whose
//! `__metadata__` carries the format version, the graph, class names, preprocessing and
//! provenance, so a file reloads with no knowledge of how it was made.

use crate::graph::Graph;
use crate::model::{Model, ModelMeta};
use crate::models::ArchSpec;
use crate::sparse;
use crate::tensor_file::{TensorFile, write_atomic};
use crate::weights::Weights;
use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

pub const FORMAT: &str = "slimcandle";
/// The newest format version this slimcandle reads.
pub const FORMAT_VERSION: u32 = 4;
/// The version written when any tensor is stored sparse.
pub const SPARSE_FORMAT_VERSION: u32 = 2;
/// The version of int8 (quantized) checkpoints (`passes::quant::store`).
pub const INT8_FORMAT_VERSION: u32 = 3;
/// The version of int8 checkpoints with some weight gap-coded (4-bit relative indices,
/// [`sparse::encode_gaps`]): a new encoding, so readers of version 3 must refuse the file.
pub const INT8_GAPS_FORMAT_VERSION: u32 = 4;

/// Whether a file of format `version` (as [`check_format`] returns it) is an int8 model.
pub fn is_int8(version: u32) -> bool {
    version == INT8_FORMAT_VERSION || version == INT8_GAPS_FORMAT_VERSION
}
/// The version written when every tensor is dense, so such files stay readable by
/// slimcandle versions that predate sparse storage.
pub const DENSE_FORMAT_VERSION: u32 = 1;
/// Metadata keys the format itself writes; extra metadata may not use them.
const RESERVED_KEYS: [&str; 9] = [
    "format",
    "format_version",
    "graph",
    "class_names",
    "preprocessing",
    "provenance",
    "arch",
    sparse::METADATA_KEY,
    crate::passes::quant::store::METADATA_KEY,
];

/// Writes `model` to `path` atomically.
pub fn save(model: &Model, path: &Path) -> Result<()> {
    save_with_extras(model, path, Vec::new(), Vec::new())
}

/// Tensors and metadata stored beside a model (a training run's resume state).
pub struct Extras {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

/// Writes `model` plus extra tensors (whose names must not collide with parameters) and extra
/// metadata entries. Float tensors that are mostly `+0.0` are stored sparse
/// ([`crate::sparse`]); the file is then format version 2, otherwise version 1.
pub fn save_with_extras(
    model: &Model,
    path: &Path,
    extra_tensors: Vec<(String, Tensor)>,
    extra_metadata: Vec<(String, String)>,
) -> Result<()> {
    if let Some((key, _)) = extra_metadata
        .iter()
        .find(|(k, _)| RESERVED_KEYS.contains(&k.as_str()))
    {
        bail!(
            "cannot write `{}`: metadata key `{key}` is reserved by the checkpoint format",
            path.display()
        );
    }
    let tensors: Vec<(String, Tensor)> = model
        .weights
        .tensors()
        .map(|(name, t)| (name.to_string(), t.clone()))
        .chain(extra_tensors)
        .collect();
    let encoded = sparse::encode_tensors(tensors)
        .with_context(|| format!("cannot write `{}`", path.display()))?;
    let version = match encoded.metadata {
        Some(_) => SPARSE_FORMAT_VERSION,
        None => DENSE_FORMAT_VERSION,
    };
    let mut metadata = metadata_entries(&model.graph, &model.meta, version);
    if let Some(shapes) = encoded.metadata {
        metadata.insert(sparse::METADATA_KEY.to_string(), shapes);
    }
    metadata.extend(extra_metadata);
    write_atomic(path, encoded.tensors, metadata)
}

/// The metadata entries every checkpoint has: format, version, graph and the model's metadata.
pub fn metadata_entries(graph: &Graph, meta: &ModelMeta, version: u32) -> HashMap<String, String> {
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), FORMAT.to_string());
    metadata.insert("format_version".to_string(), version.to_string());
    metadata.insert("graph".to_string(), graph.to_json());
    metadata.insert("class_names".to_string(), json(&meta.class_names));
    metadata.insert("preprocessing".to_string(), json(&meta.preprocessing));
    metadata.insert("provenance".to_string(), json(&meta.provenance));
    if let Some(arch) = &meta.arch {
        metadata.insert("arch".to_string(), json(arch));
    }
    metadata
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("metadata serialises")
}

/// A checkpoint of either kind.
pub enum AnyModel {
    Float(Model),
    Int8(crate::passes::quant::QuantizedModel),
}

impl AnyModel {
    pub fn graph(&self) -> &Graph {
        match self {
            AnyModel::Float(m) => &m.graph,
            AnyModel::Int8(q) => &q.graph,
        }
    }

    pub fn meta(&self) -> &ModelMeta {
        match self {
            AnyModel::Float(m) => &m.meta,
            AnyModel::Int8(q) => &q.meta,
        }
    }

    pub fn meta_mut(&mut self) -> &mut ModelMeta {
        match self {
            AnyModel::Float(m) => &mut m.meta,
            AnyModel::Int8(q) => &mut q.meta,
        }
    }

    /// Writes the checkpoint in its own format ([`save`], or format 3 or 4 for int8).
    pub fn save(&self, path: &Path) -> Result<()> {
        match self {
            AnyModel::Float(m) => save(m, path),
            AnyModel::Int8(q) => crate::passes::quant::store::save(q, path),
        }
    }
}

/// Reads a float checkpoint (formats 1 and 2) or an int8 one (formats 3 and 4), whichever the
/// file is.
pub fn load_any(path: &Path) -> Result<AnyModel> {
    any_from_file(&TensorFile::read(path)?)
}

/// [`load_any`] on an already read file.
pub fn any_from_file(file: &TensorFile) -> Result<AnyModel> {
    let version = check_format(file)?;
    if is_int8(version) {
        let (graph, meta) = graph_and_meta(file, version)?;
        return Ok(AnyModel::Int8(crate::passes::quant::store::from_file(
            file, version, graph, meta,
        )?));
    }
    Ok(AnyModel::Float(from_file(file)?))
}

/// Reads a checkpoint written by [`save`].
pub fn load(path: &Path) -> Result<Model> {
    let file = TensorFile::read(path)?;
    from_file(&file)
}

fn field<'a>(file: &'a TensorFile, key: &str) -> Result<&'a str> {
    match file.metadata.get(key) {
        Some(v) => Ok(v),
        None => bail!(
            "`{}`: the checkpoint metadata has no `{key}` entry",
            file.path.display()
        ),
    }
}

fn parse_field<T: serde::de::DeserializeOwned>(file: &TensorFile, key: &str) -> Result<T> {
    serde_json::from_str(field(file, key)?).map_err(|e| {
        anyhow::anyhow!(
            "`{}`: metadata entry `{key}` is not valid: {e}",
            file.path.display()
        )
    })
}

/// Reads a model saved with [`save_with_extras`]; tensors whose names start with
/// `extra_prefix` are returned (prefix removed) instead of being taken as parameters.
pub fn load_with_extras(path: &Path, extra_prefix: &str) -> Result<(Model, Extras)> {
    let (model, mut extras) = load_with_extra_prefixes(path, &[extra_prefix])?;
    extras.tensors = extras
        .tensors
        .into_iter()
        .map(|(k, t)| (k[extra_prefix.len()..].to_string(), t))
        .collect();
    Ok((model, extras))
}

/// Like [`load_with_extras`] for several prefixes: every tensor whose name starts with one of
/// `extra_prefixes` is returned under its full name instead of being taken as a parameter.
pub fn load_with_extra_prefixes(path: &Path, extra_prefixes: &[&str]) -> Result<(Model, Extras)> {
    let file = TensorFile::read(path)?;
    let mut tensors = dense_tensors(&file)?;
    let extra_names: Vec<String> = tensors
        .keys()
        .filter(|k| extra_prefixes.iter().any(|p| k.starts_with(p)))
        .cloned()
        .collect();
    let extra = extra_names
        .into_iter()
        .map(|k| {
            let t = tensors.remove(&k).expect("listed above");
            (k, t)
        })
        .collect();
    let model = from_parts(&file, tensors)?;
    Ok((
        model,
        Extras {
            tensors: extra,
            metadata: file.metadata.clone(),
        },
    ))
}

/// Builds a model from an already read file (so callers can also report on the file itself).
pub fn from_file(file: &TensorFile) -> Result<Model> {
    from_parts(file, dense_tensors(file)?)
}

/// The file's float tensors, sparse ones decoded to dense, once the header says it is a
/// checkpoint this version can read (so a newer file gets "upgrade", not a decoding error).
fn dense_tensors(file: &TensorFile) -> Result<HashMap<String, Tensor>> {
    if is_int8(check_format(file)?) {
        bail!(
            "`{}` is an int8 (quantized) checkpoint; this needs a float model (quantize the float checkpoint it came from instead)",
            file.path.display()
        );
    }
    sparse::read_dense(file)
}

/// The format version of a checkpoint this slimcandle can read, or why it cannot.
pub fn check_format(file: &TensorFile) -> Result<u32> {
    let shown = file.path.display();
    match file.metadata.get("format").map(String::as_str) {
        Some(FORMAT) => {}
        _ if file.metadata.is_empty() || !file.metadata.contains_key("graph") => bail!(
            "`{shown}` is a plain safetensors file, not a slimcandle checkpoint; \
             convert a PyTorch state dict with `slimcandle import --arch ARCH {shown} -o OUT.safetensors`"
        ),
        Some(other) => bail!("`{shown}`: unknown checkpoint format `{other}`"),
        None => bail!("`{shown}`: the checkpoint metadata has no `format` entry"),
    }
    let version: u32 = field(file, "format_version")?
        .parse()
        .with_context(|| format!("`{shown}`: format_version is not a number"))?;
    if version > FORMAT_VERSION {
        bail!(
            "`{shown}` uses checkpoint format {version}; this slimcandle reads up to {FORMAT_VERSION}: upgrade slimcandle"
        );
    }
    Ok(version)
}

/// The graph and model metadata of a checkpoint of either kind, checked against each other.
fn graph_and_meta(file: &TensorFile, version: u32) -> Result<(Graph, ModelMeta)> {
    let shown = file.path.display();
    let graph = Graph::from_json(field(file, "graph")?).with_context(|| format!("`{shown}`"))?;
    let arch: Option<ArchSpec> = match file.metadata.get("arch") {
        Some(_) => Some(parse_field(file, "arch")?),
        None => None,
    };
    let meta = ModelMeta {
        arch,
        class_names: parse_field(file, "class_names")?,
        preprocessing: parse_field(file, "preprocessing")?,
        provenance: parse_field(file, "provenance")?,
    };
    check_params_fit(&graph, file, version)?;
    let counts = graph.channel_counts()?;
    if counts[graph.output] != meta.class_names.len() {
        bail!(
            "`{shown}`: the network has {} outputs but the metadata names {} classes",
            counts[graph.output],
            meta.class_names.len()
        );
    }
    Ok((graph, meta))
}

/// Refuses a graph whose parameters could not be stored in the file: every stored element
/// takes at least one bit (a sparse mask), and in format 4 a gap-coded entry of 12 bits covers
/// at most 16 elements, so more than 8 (format 4: 32/3) per byte of the file means the graph is
/// corrupt, and it is refused before anything is sized from it.
fn check_params_fit(graph: &Graph, file: &TensorFile, version: u32) -> Result<()> {
    let capacity = if version == INT8_GAPS_FORMAT_VERSION {
        file.file_size().saturating_mul(32) / 3
    } else {
        file.file_size().saturating_mul(8)
    };
    let mut total = 0usize;
    for node in &graph.nodes {
        total = total.saturating_add(node.param_elements().unwrap_or(usize::MAX));
        if total > capacity {
            bail!(
                "`{}`: graph node `{}` brings the parameters to {total} elements, more than the file's {} bytes can hold",
                file.path.display(),
                node.name,
                file.file_size()
            );
        }
    }
    Ok(())
}

fn from_parts(file: &TensorFile, tensors: HashMap<String, Tensor>) -> Result<Model> {
    let (graph, meta) = graph_and_meta(file, check_format(file)?)?;
    let weights = Weights::from_state_dict(&graph, tensors)
        .with_context(|| format!("`{}`", file.path.display()))?;
    Ok(Model {
        graph,
        weights,
        meta,
    })
}
