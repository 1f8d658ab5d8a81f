use super::options::DataArgs;
use super::ranges::{MAX_BATCH, count_in};
use anyhow::Result;
use clap::Args;
use serde_json::json;
use slimcandle::checkpoint;
use slimcandle::data::{DataSpec, LoadOptions};
use slimcandle::eval::{check_classes, evaluate_with};
use slimcandle::report::Table;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    /// Checkpoint to evaluate.
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Images per forward pass (also the batch of the latency figure). Accuracy does not
    /// depend on it; 256 is larger than the other commands' 64 because evaluation holds no
    /// gradients or observers.
    #[arg(long, value_parser = count_in(1, MAX_BATCH), default_value_t = 256)]
    batch_size: usize,
    /// Seed of the subset (and of `shapes`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let model = checkpoint::load_any(&args.checkpoint)?;
    let meta = model.meta();
    let size = meta.preprocessing.input_size[0];
    let spec: DataSpec = args.data.spec().parse()?;
    let opts = LoadOptions {
        size,
        train_limit: Some(0),
        test_limit: args.data.test_limit,
        seed: args.seed,
        ..Default::default()
    };
    let data = spec.load(&opts)?;
    check_classes(&meta.class_names, &data.class_names, &data.source)?;
    let bar = super::progress::bar(data.test.len(), "evaluating", "images");
    // The bar advances after each batch's forward pass (its timing is the latency figure).
    let counted = |y: Result<candle_core::Tensor>| {
        if let Ok(t) = &y {
            bar.inc(t.dims()[0] as u64);
        }
        y
    };
    let report = match &model {
        checkpoint::AnyModel::Float(m) => {
            let m = slimcandle::passes::fold_batch_norm(m)?;
            let engine = m.engine();
            evaluate_with(&m.meta, data.test.clone(), args.batch_size, |x| {
                counted(engine.forward(x))
            })?
        }
        checkpoint::AnyModel::Int8(q) => {
            let engine = slimcandle::int8::Engine::new(q)?;
            evaluate_with(&q.meta, data.test.clone(), args.batch_size, |x| {
                counted(engine.forward_tensor(x))
            })?
        }
    };
    bar.finish_and_clear();
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["checkpoint"] = json!(args.checkpoint);
        value["data"] = json!(data.source);
        super::print_json(&value);
        return Ok(());
    }
    println!(
        "{} on {} ({} images)",
        args.checkpoint.display(),
        data.source,
        report.images
    );
    println!(
        "top-1 {:.2}%  top-5 {:.2}%  loss {:.4}",
        report.top1, report.top5, report.loss
    );
    println!(
        "latency {:.3} ms/image at batch {}",
        report.latency_ms_per_image, report.batch_size
    );
    let mut table = Table::new(&["class", "top-1", "images"], &[0]);
    for (i, name) in report.class_names.iter().enumerate() {
        let total: u64 = report.confusion[i].iter().sum();
        table.row(vec![
            name.clone(),
            format!("{:.1}%", report.per_class_top1[i]),
            total.to_string(),
        ]);
    }
    println!();
    print!("{}", table.render());
    if report.class_names.len() <= 20 {
        let mut header = vec!["true \\ predicted".to_string()];
        header.extend((0..report.class_names.len()).map(|i| i.to_string()));
        let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
        let mut confusion = Table::new(&header_refs, &[0]);
        for (i, row) in report.confusion.iter().enumerate() {
            let mut cells = vec![format!("{i} {}", report.class_names[i])];
            cells.extend(row.iter().map(|c| c.to_string()));
            confusion.row(cells);
        }
        println!("\nconfusion matrix");
        print!("{}", confusion.render());
    }
    Ok(())
}
