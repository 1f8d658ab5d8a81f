use anyhow::Result;
use clap::Args;
use serde_json::json;
use slimcandle::models::catalog;
use slimcandle::report::{Table, human_count};

#[derive(Args)]
pub struct ModelsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ModelsArgs) -> Result<()> {
    let mut rows = Vec::new();
    for entry in catalog() {
        let spec = &entry.spec;
        let summary = spec.build()?.summary(224, 224)?;
        rows.push(json!({
            "name": spec.variant_name(),
            "family": spec.family.name(),
            "width": spec.width,
            "groups": spec.groups,
            "params": summary.params,
            "macs": summary.macs,
            "input_size": [224, 224],
            "num_classes": spec.num_classes,
            "imagenet_top1": entry.imagenet_top1,
            "top1_source": if entry.imagenet_top1.is_some() { Some(entry.top1_source) } else { None },
        }));
    }
    if args.json {
        super::print_json(&json!({ "models": rows }));
        return Ok(());
    }
    let mut table = Table::new(
        &["model", "--arch", "params", "MACs@224", "ImageNet top-1"],
        &[0, 1, 4],
    );
    for r in &rows {
        let mut arch = r["family"].as_str().unwrap_or_default().to_string();
        if r["family"] == "shufflenet_v1" {
            arch.push_str(&format!(" --groups {}", r["groups"]));
        }
        if !r["family"]
            .as_str()
            .unwrap_or_default()
            .starts_with("squeezenet")
        {
            arch.push_str(&format!(" --width {}", r["width"]));
        }
        let top1 = match r["imagenet_top1"].as_f64() {
            Some(t) => format!(
                "{t:.1}% ({})",
                r["top1_source"].as_str().unwrap_or_default()
            ),
            None => "-".to_string(),
        };
        table.row(vec![
            r["name"].as_str().unwrap_or_default().to_string(),
            arch,
            human_count(r["params"].as_u64().unwrap_or(0)),
            human_count(r["macs"].as_u64().unwrap_or(0)),
            top1,
        ]);
    }
    print!("{}", table.render());
    println!(
        "\nParams and MACs for 1000 classes at 224x224 (multiply-adds of conv and linear layers)."
    );
    Ok(())
}
