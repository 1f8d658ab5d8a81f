//! Human-readable numbers and plain-text tables for command output.

/// 3504872 -> "3.50M", 56510400 -> "56.5M", 1200 -> "1.20K".
pub fn human_count(n: u64) -> String {
    let (value, unit) = match n {
        0..1_000 => return n.to_string(),
        1_000..1_000_000 => (n as f64 / 1e3, "K"),
        1_000_000..1_000_000_000 => (n as f64 / 1e6, "M"),
        _ => (n as f64 / 1e9, "G"),
    };
    if value >= 100.0 {
        format!("{value:.1}{unit}")
    } else {
        format!("{value:.2}{unit}")
    }
}

/// Bytes in decimal units: "4.56 MB".
pub fn human_bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

/// A text table: left-aligned first column, right-aligned numbers elsewhere unless told.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    left_aligned: Vec<bool>,
}

impl Table {
    /// Columns named in `header`; those listed in `left` are left-aligned.
    pub fn new(header: &[&str], left: &[usize]) -> Table {
        let left_aligned = (0..header.len()).map(|i| left.contains(&i)).collect();
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
            left_aligned,
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.header.len())
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r[c].chars().count())
                    .chain([self.header[c].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(c, s)| {
                    if self.left_aligned[c] {
                        format!("{s:<w$}", w = widths[c])
                    } else {
                        format!("{s:>w$}", w = widths[c])
                    }
                })
                .collect();
            parts.join("  ").trim_end().to_string()
        };
        let mut out = line(&self.header);
        out.push('\n');
        out.push_str(
            &"-".repeat(widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1)),
        );
        for r in &self.rows {
            out.push('\n');
            out.push_str(&line(r));
        }
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(human_count(3_504_872), "3.50M");
        assert_eq!(human_count(300_774_272), "300.8M");
        assert_eq!(human_count(999), "999");
        assert_eq!(human_bytes(4_560_000), "4.56 MB");
    }

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["name", "n"], &[0]);
        t.row(vec!["a".into(), "10".into()]);
        t.row(vec!["long".into(), "2".into()]);
        assert_eq!(t.render(), "name   n\n--------\na     10\nlong   2\n");
    }
}
