//! The compression report: one row per stage (or checkpoint) with what it costs to ship and
//! how well it does, and the change against the first row; as a text table, JSON and an SVG
//! plot of accuracy against file size with the Pareto front.

use crate::bench::{self, BenchMode};
use crate::checkpoint::AnyModel;
use crate::data::{DataSpec, Dataset, LoadOptions};
use crate::eval::{check_classes, evaluate, evaluate_int8};
use crate::footprint::Footprint;
use crate::report::{Table, human_bytes, human_count};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One measured checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The stage name, or the checkpoint's file name.
    pub name: String,
    pub kind: String,
    pub checkpoint: String,
    pub params: usize,
    pub nonzero_params: usize,
    pub macs: u64,
    pub file_bytes: u64,
    /// Percentages on the test split.
    pub top1: f64,
    pub top5: f64,
    /// Eval-mode forward time per image at batch 1, in milliseconds.
    pub latency_ms_batch1: f64,
    /// Eval-mode images per second at batch 64.
    pub images_per_s_batch64: f64,
}

/// Test data for measurements, loaded once per input size.
pub struct TestData {
    spec: String,
    test_limit: Option<usize>,
    loaded: Vec<Dataset>,
}

impl TestData {
    pub fn new(spec: &str, test_limit: Option<usize>) -> TestData {
        TestData {
            spec: spec.to_string(),
            test_limit,
            loaded: Vec::new(),
        }
    }

    fn at_size(&mut self, size: usize) -> Result<&Dataset> {
        if let Some(i) = self.loaded.iter().position(|d| d.test.size == size) {
            return Ok(&self.loaded[i]);
        }
        let spec: DataSpec = self.spec.parse()?;
        let data = spec.load(&LoadOptions {
            size,
            train_limit: Some(0),
            test_limit: self.test_limit,
            seed: 0,
            ..Default::default()
        })?;
        self.loaded.push(data);
        Ok(self.loaded.last().expect("just pushed"))
    }
}

/// Timed batches of the short speed measurements (after one untimed batch).
const LATENCY_ITERATIONS: usize = 20;
const THROUGHPUT_ITERATIONS: usize = 3;

/// Measures a checkpoint: footprint, accuracy on the test split, and speed.
pub fn measure(name: &str, kind: &str, path: &Path, data: &mut TestData) -> Result<Row> {
    let file_bytes = std::fs::metadata(path)
        .with_context(|| format!("cannot read `{}`", path.display()))?
        .len();
    // Accuracy and speed each on the executor the checkpoint deploys with: the float eval
    // executor, or the integer engine for an int8 checkpoint.
    let model = crate::checkpoint::load_any(path)?;
    let meta = model.meta();
    let size = meta.preprocessing.input_size[0];
    let test = data.at_size(size)?;
    check_classes(&meta.class_names, &test.class_names, &test.source)
        .with_context(|| format!("`{}`", path.display()))?;
    let (footprint, eval, one, batch) = match &model {
        AnyModel::Float(model) => (
            Footprint::of(model, Some(file_bytes))?,
            evaluate(model, test.test.clone(), 256)?,
            bench::run(model, BenchMode::Infer, 1, size, 1, LATENCY_ITERATIONS)?,
            bench::run(model, BenchMode::Infer, 64, size, 1, THROUGHPUT_ITERATIONS)?,
        ),
        AnyModel::Int8(model) => (
            Footprint::of_int8(model, Some(file_bytes))?,
            evaluate_int8(model, test.test.clone(), 256)?,
            bench::run_int8(model, 1, size, 1, LATENCY_ITERATIONS)?,
            bench::run_int8(model, 64, size, 1, THROUGHPUT_ITERATIONS)?,
        ),
    };
    Ok(Row {
        name: name.to_string(),
        kind: kind.to_string(),
        checkpoint: path.display().to_string(),
        params: footprint.params,
        nonzero_params: footprint.nonzero_params,
        macs: footprint.macs,
        file_bytes,
        top1: eval.top1,
        top5: eval.top5,
        // The median: one slow call (a page fault, another process) skews a mean of a few.
        latency_ms_batch1: one.ms_median,
        images_per_s_batch64: batch.images_per_s,
    })
}

fn ratio(a: f64, first: f64) -> f64 {
    a / first.max(1e-12)
}

/// The text table: one row per stage, ratios and accuracy change against the first row.
pub fn table(rows: &[Row]) -> Table {
    let mut t = Table::new(
        &[
            "stage",
            "params",
            "non-zero",
            "MACs",
            "file",
            "size",
            "top-1",
            "top-5",
            "ms/img b1",
            "img/s b64",
            "top-1 change",
        ],
        &[0],
    );
    let Some(first) = rows.first() else {
        return t;
    };
    for r in rows {
        t.row(vec![
            r.name.clone(),
            human_count(r.params as u64),
            human_count(r.nonzero_params as u64),
            format!(
                "{} ({:.0}%)",
                human_count(r.macs),
                100.0 * ratio(r.macs as f64, first.macs as f64)
            ),
            human_bytes(r.file_bytes),
            format!(
                "{:.2}x",
                ratio(r.file_bytes as f64, first.file_bytes as f64)
            ),
            format!("{:.2}%", r.top1),
            format!("{:.2}%", r.top5),
            format!("{:.3}", r.latency_ms_batch1),
            format!("{:.0}", r.images_per_s_batch64),
            format!("{:+.2}", r.top1 - first.top1),
        ]);
    }
    t
}

/// The report as Markdown (the table in a code block).
pub fn markdown(title: &str, rows: &[Row]) -> String {
    format!(
        "# {title}\n\n```\n{}```\n\nsize: file bytes against the first row; top-1 change: points against the first row; accuracy on the test split.\n",
        table(rows).render()
    )
}

/// The report as JSON: the rows, and each row's ratios and changes against the first.
pub fn json(rows: &[Row]) -> serde_json::Value {
    let first = rows.first();
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).expect("rows serialise");
            if let Some(f) = first {
                v["vs_first"] = serde_json::json!({
                    "params": ratio(r.params as f64, f.params as f64),
                    "nonzero_params": ratio(r.nonzero_params as f64, f.nonzero_params as f64),
                    "macs": ratio(r.macs as f64, f.macs as f64),
                    "file_bytes": ratio(r.file_bytes as f64, f.file_bytes as f64),
                    "top1_points": r.top1 - f.top1,
                    "top5_points": r.top5 - f.top5,
                    "latency_ms_batch1": ratio(r.latency_ms_batch1, f.latency_ms_batch1),
                    "images_per_s_batch64": ratio(r.images_per_s_batch64, f.images_per_s_batch64),
                });
            }
            v
        })
        .collect();
    serde_json::json!({ "rows": rows })
}

/// Indices of the rows on the Pareto front of (smaller file, higher top-1), by file size.
pub fn pareto_front(rows: &[Row]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| {
        rows[a]
            .file_bytes
            .cmp(&rows[b].file_bytes)
            .then(rows[b].top1.total_cmp(&rows[a].top1))
    });
    let mut front = Vec::new();
    let mut best = f64::NEG_INFINITY;
    for i in order {
        if rows[i].top1 > best {
            best = rows[i].top1;
            front.push(i);
        }
    }
    front
}

/// One point per checkpoint: rows measuring the same file (an `eval` stage passes its input
/// on) share a point, labelled with all their names.
fn points(rows: &[Row]) -> Vec<Row> {
    let mut points: Vec<Row> = Vec::new();
    for r in rows {
        match points.iter_mut().find(|p| p.checkpoint == r.checkpoint) {
            Some(p) => p.name = format!("{}, {}", p.name, r.name),
            None => points.push(r.clone()),
        }
    }
    points
}

/// Accuracy against file size (log x), a labelled point per checkpoint and the Pareto front,
/// as SVG text (plotters writes text as SVG elements: no fonts are needed).
pub fn svg(rows: &[Row]) -> Result<String> {
    use plotters::prelude::*;
    let rows = &points(rows);
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (720, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let min = rows.iter().map(|r| r.file_bytes).min().unwrap_or(1).max(1) as f64;
        let max = rows.iter().map(|r| r.file_bytes).max().unwrap_or(1).max(1) as f64;
        let (lo, hi) = (min / 1.5, max * 1.5);
        let top = rows.iter().map(|r| r.top1).fold(0.0, f64::max);
        let bottom = rows.iter().map(|r| r.top1).fold(100.0, f64::min);
        let pad = ((top - bottom) * 0.15).max(1.0);
        let mut chart = ChartBuilder::on(&root)
            .caption("top-1 against file size", ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(
                (lo..hi).log_scale(),
                (bottom - pad).max(0.0)..(top + pad).min(100.0),
            )?;
        chart
            .configure_mesh()
            .x_desc("file size (bytes, log scale)")
            .y_desc("top-1 (%)")
            .x_label_formatter(&|x| human_bytes(*x as u64))
            .draw()?;
        let front = pareto_front(rows);
        chart
            .draw_series(LineSeries::new(
                front
                    .iter()
                    .map(|&i| (rows[i].file_bytes as f64, rows[i].top1)),
                BLUE.stroke_width(2),
            ))?
            .label("Pareto front")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        chart.draw_series(rows.iter().map(|r| {
            EmptyElement::at((r.file_bytes as f64, r.top1))
                + Circle::new((0, 0), 4, RED.filled())
                + Text::new(r.name.clone(), (6, -14), ("sans-serif", 13))
        }))?;
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
        root.present()?;
    }
    Ok(out)
}

/// Writes `report.md`, `report.json` and `report.svg` into `dir` (atomically).
pub fn write_all(dir: &Path, title: &str, rows: &[Row]) -> Result<()> {
    use crate::tensor_file::write_bytes_atomic;
    write_bytes_atomic(&dir.join("report.md"), markdown(title, rows).as_bytes())?;
    write_bytes_atomic(
        &dir.join("report.json"),
        serde_json::to_string_pretty(&json(rows))?.as_bytes(),
    )?;
    write_bytes_atomic(&dir.join("report.svg"), svg(rows)?.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, bytes: u64, top1: f64) -> Row {
        Row {
            name: name.into(),
            kind: "train".into(),
            checkpoint: format!("{name}.safetensors"),
            params: 1000,
            nonzero_params: 900,
            macs: 5000,
            file_bytes: bytes,
            top1,
            top5: 99.0,
            latency_ms_batch1: 1.0,
            images_per_s_batch64: 100.0,
        }
    }

    #[test]
    fn pareto_front_keeps_the_undominated() {
        let rows = [
            row("a", 1000, 90.0),
            row("b", 500, 85.0),
            row("c", 700, 80.0),
            row("d", 2000, 91.0),
        ];
        assert_eq!(pareto_front(&rows), vec![1, 0, 3]);
    }

    #[test]
    fn rows_of_one_checkpoint_share_a_labelled_point() {
        let mut eval = row("prune", 500, 85.0);
        eval.name = "eval".into();
        let svg = svg(&[row("train", 1000, 90.0), row("prune", 500, 85.0), eval]).unwrap();
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("\nprune, eval\n</text>"), "{svg}");
    }

    #[test]
    fn json_compares_against_the_first_row() {
        let v = json(&[row("a", 1000, 90.0), row("b", 250, 87.5)]);
        assert_eq!(v["rows"][1]["vs_first"]["file_bytes"], 0.25);
        assert_eq!(v["rows"][1]["vs_first"]["top1_points"], -2.5);
        assert_eq!(v["rows"][0]["vs_first"]["macs"], 1.0);
    }
}
