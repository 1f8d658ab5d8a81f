use anyhow::Result;
use clap::Args;
use serde_json::json;
use slimcandle::checkpoint;
use slimcandle::footprint::Footprint;
use slimcandle::report::{Table, human_bytes, human_count};
use slimcandle::sparse;
use slimcandle::tensor_file::TensorFile;
use std::path::PathBuf;

#[derive(Args)]
pub struct InspectArgs {
    /// Checkpoint to inspect.
    checkpoint: PathBuf,
    /// Input size for shapes and MACs (default: the checkpoint's preprocessing size).
    #[arg(long)]
    input_size: Option<usize>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let file = TensorFile::read(&args.checkpoint)?;
    let model = checkpoint::from_file(&file)?;
    let format_version = checkpoint::check_format(&file)?;
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
