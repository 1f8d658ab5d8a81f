//! Importing PyTorch / torchvision state dicts (converted to safetensors) into checkpoints.

use crate::graph::ParamRole;
use crate::model::{Model, ModelMeta, Preprocessing, Provenance, default_class_names};
use crate::models::{ArchOptions, ArchSpec};
use crate::tensor_file::TensorFile;
use crate::weights::Weights;
use anyhow::{Context, Result, bail};
use std::path::Path;

/// Reads the state dict at `path` into a model of architecture `arch`. Without
/// `opts.num_classes`, the class count is read from the classifier's weight in the file.
pub fn import_state_dict(path: &Path, arch: &str, opts: &ArchOptions) -> Result<Model> {
    let file = TensorFile::read(path)?;
    if file.metadata.contains_key("graph") {
        bail!(
            "`{}` is already a slimcandle checkpoint; use it directly",
            path.display()
        );
    }
    let mut spec = ArchSpec::parse(
        arch,
        &ArchOptions {
            num_classes: Some(opts.num_classes.unwrap_or(1)),
            ..opts.clone()
        },
    )?;
    if opts.num_classes.is_none() {
        spec.num_classes = classifier_outputs(&spec, &file)?;
    }
    let graph = spec.build()?;
    let keys = file.names();
    let weights = Weights::from_state_dict(&graph, file.float_tensors()?).with_context(|| {
        format!(
            "`{}` does not hold weights for {} as configured{}",
            path.display(),
            spec.variant_name(),
            prefix_hint(&graph, &keys)
        )
    })?;
    let meta = ModelMeta {
        arch: Some(spec.clone()),
        class_names: default_class_names(spec.num_classes),
        preprocessing: Preprocessing::for_stem(spec.stem),
        provenance: Provenance::now(format!("imported from state dict `{}`", path.display())),
    };
    Ok(Model {
        graph,
        weights,
        meta,
    })
}

/// A hint for a state dict whose keys all start with a prefix the model's names lack
/// (`module.` from `DataParallel`, `model.` from a training wrapper): stripping it is the fix.
fn prefix_hint(graph: &crate::graph::Graph, keys: &[String]) -> String {
    let Some(prefix) = keys
        .first()
        .and_then(|k| k.split_once('.'))
        .map(|(p, _)| format!("{p}."))
    else {
        return String::new();
    };
    let names: std::collections::HashSet<String> =
        graph.param_specs().into_iter().map(|s| s.name).collect();
    let all_prefixed = keys.iter().all(|k| k.starts_with(&prefix));
    let stripped_match = keys
        .iter()
        .filter_map(|k| k.strip_prefix(&prefix))
        .any(|k| names.contains(k));
    if all_prefixed && stripped_match && !names.iter().any(|n| n.starts_with(&prefix)) {
        format!(
            " (every key starts with `{prefix}`: save the state dict without it, e.g. \
             `{{k.removeprefix(\"{prefix}\"): v for k, v in sd.items()}}`)"
        )
    } else {
        String::new()
    }
}

/// The number of outputs of the last weight layer as stored in the file. When the file has no
/// such tensor it holds another architecture: 1000 lets the key check list what differs.
fn classifier_outputs(spec: &ArchSpec, file: &TensorFile) -> Result<usize> {
    let graph = spec.build()?;
    let last = graph
        .param_specs()
        .into_iter()
        .rev()
        .find(|s| matches!(s.role, ParamRole::ConvWeight | ParamRole::LinearWeight))
        .expect("every family ends in a weight layer");
    Ok(match file.raw(&last.name) {
        Ok(view) if !view.shape().is_empty() => view.shape()[0],
        _ => 1000,
    })
}
