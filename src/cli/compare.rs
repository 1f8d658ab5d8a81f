//! `slimcandle compare A.safetensors B.safetensors ...`: the recipe report for any checkpoints.

use super::exit::usage;
use super::options::DataArgs;
use anyhow::Result;
use clap::Args;
use slimcandle::pipeline::report::{self, TestData};
use slimcandle::tensor_file::write_bytes_atomic;
use std::path::PathBuf;

#[derive(Args)]
pub struct CompareArgs {
    /// Checkpoints to compare; the first is the reference of the ratios and changes.
    #[arg(required = true)]
    checkpoints: Vec<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    /// Write the plot of top-1 against file size (with the Pareto front) to this SVG file.
    #[arg(long, value_name = "SVG")]
    plot: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: CompareArgs) -> Result<()> {
    if let Some(plot) = &args.plot {
        let inputs: Vec<&std::path::Path> = args.checkpoints.iter().map(|p| p.as_path()).collect();
        super::check_output_is_not_input(plot, &inputs)?;
        super::output::check(plot, "--plot", super::output::Kind::File)?;
        if plot.extension().is_none_or(|e| e != "svg") {
            usage!(
                "--plot `{}`: the plot is SVG; name it *.svg",
                plot.display()
            );
        }
    }
    let mut data = TestData::new(args.data.spec(), args.data.test_limit);
    let mut rows = Vec::new();
    for path in &args.checkpoints {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| path.display().to_string());
        eprintln!("measuring {}", path.display());
        rows.push(report::measure(&name, "checkpoint", path, &mut data)?);
    }
    if let Some(plot) = &args.plot {
        super::output::create_parent(plot)?;
        write_bytes_atomic(plot, report::svg(&rows)?.as_bytes())?;
    }
    if args.json {
        super::print_json(&report::json(&rows));
    } else {
        print!("{}", report::table(&rows).render());
        if let Some(plot) = &args.plot {
            println!("\nplot {}", plot.display());
        }
    }
    Ok(())
}
