use super::ranges::count;
use anyhow::Result;
use clap::Args;
use serde_json::json;
use slimcandle::checkpoint;
use slimcandle::footprint::Footprint;
use slimcandle::models::{ArchSpec, Family, Stem};
use slimcandle::report::{Table, human_bytes, human_count};
use slimcandle::sparse;
use slimcandle::tensor_file::TensorFile;
use std::path::PathBuf;

#[derive(Args)]
pub struct InspectArgs {
    /// Checkpoint to inspect.
    checkpoint: PathBuf,
    /// Input size for shapes and MACs (default: the checkpoint's preprocessing size).
    #[arg(long, value_parser = count(1))]
    input_size: Option<usize>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let file = TensorFile::read(&args.checkpoint)?;
    let version = checkpoint::check_format(&file)?;
    if checkpoint::is_int8(version) {
        return int8(&args, &file, version);
    }
    let model = checkpoint::from_file(&file)?;
    let format_version = version;
    let sparse_tensors = sparse::sparse_shapes(&file)?.len();
    let nonzero_params = Footprint::of(&model, None)?.nonzero_params;
    let meta = &model.meta;
    let [h, w] = match args.input_size {
        Some(s) => [s, s],
        None => meta.preprocessing.input_size,
    };
    let summary = model.graph.summary(h, w)?;
    // A pruned model keeps the `arch` it was derived from; say so when its graph has changed.
    let arch_name = meta.arch.as_ref().map(|a| a.variant_name());
    // None when there is no arch, or it no longer builds (then nothing is claimed).
    let reshaped = meta
        .arch
        .as_ref()
        .and_then(|a| a.build().ok())
        .map(|g| g != model.graph);
    if args.json {
        super::print_json(&json!({
            "file": args.checkpoint,
            "file_size": file.file_size(),
            "format_version": format_version,
            "arch": meta.arch,
            "variant": arch_name,
            "reshaped": reshaped,
            "class_names": meta.class_names,
            "preprocessing": meta.preprocessing,
            "provenance": meta.provenance,
            "input_size": [h, w],
            "params": summary.params,
            "nonzero_params": nonzero_params,
            "macs": summary.macs,
            "tensors": file.names().len(),
            "dtypes": file.dtype_counts(),
            "sparse_tensors": sparse_tensors,
            "layers": summary.layers,
            "torchvision_note": meta.arch.as_ref().and_then(torchvision_stem_note),
        }));
        return Ok(());
    }
    let mut table = Table::new(&["layer", "op", "output", "params", "MACs"], &[0, 1, 2]);
    for l in &summary.layers {
        let shape: Vec<String> = l.output_shape.iter().map(|d| d.to_string()).collect();
        let count = |n: u64| {
            if n == 0 {
                String::new()
            } else {
                human_count(n)
            }
        };
        table.row(vec![
            l.name.clone(),
            l.op.to_string(),
            shape.join("x"),
            count(l.params as u64),
            count(l.macs),
        ]);
    }
    let classes: Vec<&str> = meta
        .class_names
        .iter()
        .take(10)
        .map(String::as_str)
        .collect();
    let more = if meta.class_names.len() > 10 {
        ", ..."
    } else {
        ""
    };
    let dtypes: Vec<String> = file
        .dtype_counts()
        .iter()
        .map(|(d, n)| format!("{d}: {n}"))
        .collect();
    let p = &meta.preprocessing;
    let prov = &meta.provenance;
    println!(
        "file          {} ({})",
        args.checkpoint.display(),
        human_bytes(file.file_size() as u64)
    );
    println!(
        "architecture  {}",
        match (&arch_name, reshaped) {
            (Some(name), Some(true)) =>
                format!("derived from {name}, with other layer shapes (pruned)"),
            (Some(name), _) => name.clone(),
            (None, _) => "custom graph".to_string(),
        }
    );
    println!(
        "classes       {}: {}{more}",
        meta.class_names.len(),
        classes.join(", ")
    );
    println!(
        "input         {}x{}x{}, mean {:?}, std {:?}",
        model.graph.input_channels(),
        p.input_size[0],
        p.input_size[1],
        p.mean,
        p.std
    );
    if let Some(note) = meta.arch.as_ref().and_then(torchvision_stem_note) {
        println!("torchvision   {note}");
    }
    println!(
        "tensors       {} ({})",
        file.names().len(),
        dtypes.join(", ")
    );
    println!(
        "storage       format {format_version}, {sparse_tensors} tensors sparse (bitmask + values), file {}",
        human_bytes(file.file_size() as u64)
    );
    println!("created       {} by {}", prov.created, prov.tool);
    println!("source        {}", prov.source);
    println!("command       {}", prov.command);
    for step in &prov.history {
        println!("history       {step}");
    }
    println!();
    print!("{}", table.render());
    println!(
        "\ntotal: {} params ({} non-zero), {} MACs at {h}x{w}",
        human_count(summary.params as u64),
        human_count(nonzero_params as u64),
        human_count(summary.macs)
    );
    Ok(())
}

/// An int8 checkpoint: per layer its dtype, weight scales (min/max over channels) and the
/// qparams of its output.
fn int8(args: &InspectArgs, file: &TensorFile, format_version: u32) -> Result<()> {
    let checkpoint::AnyModel::Int8(q) = checkpoint::load_any(&args.checkpoint)? else {
        unreachable!("formats 3 and 4 are int8");
    };
    let mut rows = Vec::new();
    for (id, node) in q.graph.nodes.iter().enumerate() {
        if q.is_fused_away(id) {
            continue;
        }
        let (dtype, scales) = if let Some(l) = q.layer(id) {
            let s = &l.weight.scales;
            let min = s.iter().copied().fold(f32::INFINITY, f32::min);
            let max = s.iter().copied().fold(0f32, f32::max);
            ("int8", Some((min, max, s.len())))
        } else if q.float_layers.contains_key(&node.name) {
            ("float32", None)
        } else {
            ("", None)
        };
        rows.push((id, node, dtype, scales, q.activations[id], q.fused[id]));
    }
    if args.json {
        let layers: Vec<_> = rows
            .iter()
            .map(|(id, node, dtype, scales, act, fused)| {
                json!({
                    "node": id,
                    "name": node.name,
                    "op": node.op.kind(),
                    "weight_dtype": if dtype.is_empty() { None } else { Some(dtype) },
                    "weight_scale_min": scales.map(|s| s.0),
                    "weight_scale_max": scales.map(|s| s.1),
                    "weight_scales": scales.map(|s| s.2),
                    "output_scale": act.map(|a| a.scale),
                    "output_zero_point": act.map(|a| a.zero_point),
                    "fused_activation": fused,
                })
            })
            .collect();
        super::print_json(&json!({
            "file": args.checkpoint,
            "file_size": file.file_size(),
            "format_version": format_version,
            "int8": true,
            "arch": q.meta.arch,
            "class_names": q.meta.class_names,
            "preprocessing": q.meta.preprocessing,
            "provenance": q.meta.provenance,
            "quantization": q.scheme,
            "params": q.param_count(),
            "tensors": file.names().len(),
            "dtypes": file.dtype_counts(),
            "layers": layers,
        }));
        return Ok(());
    }
    let mut table = Table::new(
        &[
            "layer",
            "op",
            "weights",
            "w scale min",
            "w scale max",
            "out scale",
            "out zp",
        ],
        &[0, 1, 2],
    );
    for (_, node, dtype, scales, act, fused) in &rows {
        let op = match fused {
            Some(a) => format!(
                "{}+{}",
                node.op.kind(),
                serde_json::to_value(a)?.as_str().unwrap_or("")
            ),
            None => node.op.kind().to_string(),
        };
        table.row(vec![
            node.name.clone(),
            op,
            dtype.to_string(),
            scales.map_or(String::new(), |s| format!("{:.3e}", s.0)),
            scales.map_or(String::new(), |s| format!("{:.3e}", s.1)),
            act.map_or("float".into(), |a| format!("{:.3e}", a.scale)),
            act.map_or(String::new(), |a| a.zero_point.to_string()),
        ]);
    }
    let dtypes: Vec<String> = file
        .dtype_counts()
        .iter()
        .map(|(d, n)| format!("{d}: {n}"))
        .collect();
    let prov = &q.meta.provenance;
    let p = &q.meta.preprocessing;
    println!(
        "file          {} ({})",
        args.checkpoint.display(),
        human_bytes(file.file_size() as u64)
    );
    println!(
        "architecture  {} (batch norm folded)",
        q.meta
            .arch
            .as_ref()
            .map_or("custom graph".to_string(), |a| a.variant_name())
    );
    println!("classes       {}", q.meta.class_names.len());
    println!(
        "input         {}x{}x{}, mean {:?}, std {:?}",
        q.graph.input_channels(),
        p.input_size[0],
        p.input_size[1],
        p.mean,
        p.std
    );
    let ranges = match &q.scheme.qat {
        Some(qat) => format!(
            "quantization-aware training ({} epochs) from the {} calibrator on {} images",
            qat.epochs,
            q.scheme.calibrator.name(),
            q.scheme.calibration_images
        ),
        None => format!(
            "{} calibrator on {} images",
            q.scheme.calibrator.name(),
            q.scheme.calibration_images
        ),
    };
    println!(
        "int8          format {format_version}, weights {}, {ranges}, {} layers int8, {} float",
        match q.scheme.granularity {
            slimcandle::passes::quant::Granularity::PerChannel => "per channel",
            slimcandle::passes::quant::Granularity::PerTensor => "per tensor",
        },
        q.layers.len(),
        q.float_layers.len()
    );
    println!(
        "tensors       {} ({})",
        file.names().len(),
        dtypes.join(", ")
    );
    println!("created       {} by {}", prov.created, prov.tool);
    println!("source        {}", prov.source);
    println!("command       {}", prov.command);
    for step in &prov.history {
        println!("history       {step}");
    }
    println!();
    print!("{}", table.render());
    println!(
        "
total: {} params",
        human_count(q.param_count() as u64)
    );
    Ok(())
}

/// For the small-input stem: the weights load into stock torchvision without an error, but
/// that model keeps the ImageNet stem's stride (and pooling), so it computes something else.
/// Says so, with the change that makes torchvision's `model` match (docs/checkpoint-format.md).
pub fn torchvision_stem_note(arch: &ArchSpec) -> Option<String> {
    if arch.stem != Stem::Cifar {
        return None;
    }
    let change = match arch.family {
        Family::MobilenetV2 | Family::MobilenetV3Small | Family::MobilenetV3Large => {
            "model.features[0][0].stride = (1, 1)"
        }
        Family::ShufflenetV2 => {
            "model.conv1[0].stride = (1, 1); model.maxpool = torch.nn.Identity()"
        }
        Family::Squeezenet1_0 => {
            "model.features[0].stride, model.features[0].padding = (1, 1), (3, 3); model.features[2] = torch.nn.Identity()"
        }
        Family::Squeezenet1_1 => {
            "model.features[0].stride, model.features[0].padding = (1, 1), (1, 1); model.features[2] = torch.nn.Identity()"
        }
        Family::MobilenetV1 => {
            return Some(
                "small-input (cifar) stem: the first conv runs at stride 1 (not a torchvision model)"
                    .to_string(),
            );
        }
        Family::ShufflenetV1 => {
            return Some(
                "small-input (cifar) stem: `first_conv` runs at stride 1 and the max pool is dropped (not a torchvision model)"
                    .to_string(),
            );
        }
    };
    Some(format!(
        "small-input (cifar) stem: stock torchvision loads these weights but computes something else; to match, after loading: {change}"
    ))
}
