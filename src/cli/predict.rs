use super::ranges::count;
use anyhow::Result;
use clap::Args;
use serde_json::json;
use slimcandle::checkpoint;
use slimcandle::predict::{predict_files, predict_files_int8};
use std::path::PathBuf;

#[derive(Args)]
pub struct PredictArgs {
    /// Checkpoint to run.
    checkpoint: PathBuf,
    /// Images (JPEG, PNG, BMP).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// How many classes to show per image.
    #[arg(long, value_parser = count(1), default_value_t = 5)]
    top_k: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PredictArgs) -> Result<()> {
    let predictions = match checkpoint::load_any(&args.checkpoint)? {
        checkpoint::AnyModel::Float(m) => predict_files(&m, &args.images, args.top_k)?,
        checkpoint::AnyModel::Int8(q) => predict_files_int8(&q, &args.images, args.top_k)?,
    };
    if args.json {
        let items: Vec<_> = args
            .images
            .iter()
            .zip(&predictions)
            .map(|(p, top)| {
                let top: Vec<_> = top
                    .iter()
                    .map(|(c, prob)| json!({ "class": c, "probability": prob }))
                    .collect();
                json!({ "image": p, "top": top })
            })
            .collect();
        super::print_json(&json!({ "predictions": items }));
        return Ok(());
    }
    for (path, top) in args.images.iter().zip(&predictions) {
        println!("{}", path.display());
        for (class, prob) in top {
            println!("  {:6.2}%  {class}", 100.0 * prob);
        }
    }
    Ok(())
}
