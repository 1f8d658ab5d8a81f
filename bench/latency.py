"""Per-batch timing figures shared by the Python timers (`ort_time.py`,
`pytorch_reference.py`), computed as `slimcandle bench` computes them (`src/bench.rs`)."""

import math


def latency_ms(times: list) -> dict:
    """Median and 95th percentile (nearest rank) of per-batch times in seconds, in ms, under
    the keys `slimcandle bench --json` uses (`ms_median`, `ms_p95`)."""
    s = sorted(times)
    n = len(s)
    median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    p95 = s[min(max(math.ceil(0.95 * n), 1), n) - 1]
    return {"ms_median": 1000.0 * median, "ms_p95": 1000.0 * p95}
