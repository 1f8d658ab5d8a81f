//! Per-op timing of the train-step executor and the eval executor, for finding where a
//! step's (or a forward pass's) time goes.
//!
//! Why: `perf` shows which kernels are hot but not which graph op (or which of its forward
//! and backward) pays for a memcpy or an element-wise loop. With `SLIMCANDLE_PROFILE=1` the
//! executor times every node and `slimcandle bench` prints the totals by op kind after its
//! run. Off by default; when off, [`enabled`] is one relaxed load and nothing is recorded.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::time::Duration;

/// Whether `SLIMCANDLE_PROFILE=1` asked for op timings (read once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("SLIMCANDLE_PROFILE").is_ok_and(|v| v == "1"))
}

fn table() -> &'static Mutex<HashMap<String, (Duration, u64)>> {
    static TABLE: OnceLock<Mutex<HashMap<String, (Duration, u64)>>> = OnceLock::new();
    TABLE.get_or_init(Default::default)
}

/// Adds `elapsed` to the total of `label`.
pub fn record(label: &str, elapsed: Duration) {
    let mut t = table().lock().unwrap_or_else(|e| e.into_inner());
    let entry = t.entry(label.to_string()).or_default();
    entry.0 += elapsed;
    entry.1 += 1;
}

/// Forgets everything recorded so far (after warm-up).
pub fn reset() {
    table().lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// The totals recorded so far as a table, largest first, with each label's share.
pub fn report() -> String {
    let t = table().lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = t.iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1.0));
    let total: Duration = rows.iter().map(|r| r.1.0).sum();
    let mut out = format!("{:<28} {:>10} {:>7} {:>8}\n", "op", "ms", "share", "calls");
    for (label, (d, calls)) in rows {
        out += &format!(
            "{label:<28} {:>10.1} {:>6.1}% {calls:>8}\n",
            d.as_secs_f64() * 1e3,
            100.0 * d.as_secs_f64() / total.as_secs_f64().max(1e-12)
        );
    }
    out += &format!("{:<28} {:>10.1}\n", "total", total.as_secs_f64() * 1e3);
    out
}
