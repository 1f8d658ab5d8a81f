#!/usr/bin/env python3
"""Turn the JSON lines written by bench/compare.sh into its Markdown table.

Each input line: {"config": LABEL, "order": N, "tool": "slimcandle"|"pytorch", "round": R,
"result": {...the tool's JSON...}} or, for a failed run, "error": "...".

The int8 rows (configs "int8 ..."; tools slimcandle_int8, ort_int8_quantize_static,
ort_int8_ours, slimcandle_fp32, ort_fp32, each result with `images_per_s`) get a table of their
own, followed by the largest peak RSS of any of their runs.

The training rows (configs "train ...") also get a table of peak memory: each tool's peak RSS
(`peak_memory`, bytes; the largest over the rounds, each run being its own process) and the
ratio of PyTorch's to ours (above 1: slimcandle needs less). PyTorch's figure includes the
Python interpreter and the torch libraries (a few hundred MiB before any tensor).

The latency rows (configs "latency ...", batch 1) get a table of per-image times instead:
the median and the 95th percentile (`ms_median`, `ms_p95`) of each tool, the median of the
rounds' values, and the ratios of onnxruntime's, OpenVINO's and PyTorch's median to ours
(above 1: ours is faster). OpenVINO's columns appear when its results are in the input.

Beside the ratio of the medians, the inference and latency tables give the ratio to
onnxruntime per round: the median, over the rounds, of the ratio of the two tools' figures in
the same round (ours and onnxruntime run back to back in each round). Why: the host's speed
drifts by up to 2x within minutes, moving both tools' figures in a round together; the
medians of two or three rounds taken apart could land in different minutes. Training rows
(no onnxruntime) give the ratio to PyTorch per round in that column.

Usage: summarize.py RAW.jsonl [--agg median|best]
"""

import argparse
import json
import statistics
import sys


def fmt(v):
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("--agg", choices=["median", "best"], default="median")
    args = ap.parse_args()
    agg = statistics.median if args.agg == "median" else max

    order = {}
    vals = {}  # (config, key) -> [images/s per round]
    by_round = {}  # (config, key) -> {round: images/s, or ms_median for the latency rows}
    lat = {}  # (config, tool, "ms_median" | "ms_p95") -> [ms per round], latency rows
    errors = {}
    peaks = []  # (peak RSS bytes, config, tool) of the int8 rows' runs
    train_peaks = {}  # (config, "slimcandle" | "pytorch") -> [peak RSS bytes per round]
    rounds = set()
    with open(args.raw) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            cfg = rec["config"]
            order.setdefault(cfg, rec.get("order", len(order)))
            rounds.add(rec.get("round"))
            if "error" in rec:
                errors.setdefault(cfg, []).append(f"{rec['tool']}: {rec['error']}")
                continue
            r = rec["result"]
            if cfg.startswith("int8"):
                vals.setdefault((cfg, rec["tool"]), []).append(r["images_per_s"])
                if r.get("peak_memory") is not None:
                    peaks.append((r["peak_memory"], cfg, rec["tool"]))
            elif cfg.startswith("latency"):
                tools = [("slimcandle", "")] if rec["tool"] == "slimcandle" else [
                    ("pytorch", ""), ("onnxruntime", "onnxruntime_"), ("openvino", "openvino_")]
                for tool, prefix in tools:
                    for stat in ("ms_median", "ms_p95"):
                        if prefix + stat in r:
                            lat.setdefault((cfg, tool, stat), []).append(r[prefix + stat])
                    if prefix + "ms_median" in r:
                        by_round.setdefault((cfg, tool), {})[rec.get("round")] = \
                            r[prefix + "ms_median"]
            elif rec["tool"] == "slimcandle":
                vals.setdefault((cfg, "slimcandle"), []).append(r["images_per_s"])
                by_round.setdefault((cfg, "slimcandle"), {})[rec.get("round")] = r["images_per_s"]
                if cfg.startswith("train") and r.get("peak_memory") is not None:
                    train_peaks.setdefault((cfg, "slimcandle"), []).append(r["peak_memory"])
            else:
                if cfg.startswith("train") and r.get("peak_memory") is not None:
                    train_peaks.setdefault((cfg, "pytorch"), []).append(r["peak_memory"])
                if "images_per_s" in r:
                    vals.setdefault((cfg, "pytorch"), []).append(r["images_per_s"])
                    by_round.setdefault((cfg, "pytorch"), {})[rec.get("round")] = \
                        r["images_per_s"]
                if "onnxruntime_images_per_s" in r:
                    vals.setdefault((cfg, "onnxruntime"), []).append(r["onnxruntime_images_per_s"])
                    by_round.setdefault((cfg, "onnxruntime"), {})[rec.get("round")] = \
                        r["onnxruntime_images_per_s"]
                if "openvino_images_per_s" in r:
                    vals.setdefault((cfg, "openvino"), []).append(r["openvino_images_per_s"])

    def get(cfg, key):
        v = vals.get((cfg, key))
        return agg(v) if v else None

    def get_ms(cfg, tool, stat):
        v = lat.get((cfg, tool, stat))
        return statistics.median(v) if v else None

    def ms(v):
        return "-" if v is None else f"{v:.2f}"

    def per_round(cfg, num, den):
        """The median over the rounds of `num`'s figure over `den`'s in the same round."""
        a, b = by_round.get((cfg, num), {}), by_round.get((cfg, den), {})
        r = [a[k] / b[k] for k in a if k in b and b[k]]
        return f"{statistics.median(r):.2f}x" if r else "-"

    configs = sorted(order, key=order.get)
    latency_configs = [c for c in configs if c.startswith("latency")]
    configs = [c for c in configs if not c.startswith("latency")]
    float_configs = [c for c in configs if not c.startswith("int8")]
    int8_configs = [c for c in configs if c.startswith("int8")]
    has_ov = any(k == "openvino" for _, k in vals) or any(t == "openvino" for _, t, _ in lat)
    ov_head = " OpenVINO img/s | slimcandle/OpenVINO |" if has_ov else ""
    if float_configs:
        print(f"images/s, {args.agg} of {len(rounds)} round(s) per cell "
              f"(slimcandle and PyTorch run in alternation; ratio > 1 means slimcandle is faster)")
        print()
        print("| config | slimcandle img/s | PyTorch img/s | slimcandle/PyTorch | onnxruntime img/s | "
              f"slimcandle/onnxruntime | per round |{ov_head}")
        print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if has_ov else ""))
    for cfg in float_configs:
        s, p, o = get(cfg, "slimcandle"), get(cfg, "pytorch"), get(cfg, "onnxruntime")
        infer = cfg.startswith("infer")
        ov = get(cfg, "openvino")
        ov_cells = (f" {fmt(ov) if infer else ''} | {ratio(s, ov) if infer else ''} |"
                    if has_ov else "")
        # Training rows have no onnxruntime figure: their per-round ratio is to PyTorch.
        paired = per_round(cfg, "slimcandle", "onnxruntime" if infer else "pytorch")
        print(f"| {cfg} | {fmt(s)} | {fmt(p)} | {ratio(s, p)} | "
              f"{fmt(o) if infer else ''} | {ratio(s, o) if infer else ''} | {paired} |{ov_cells}")
    train_configs = [c for c in float_configs
                     if any((c, t) in train_peaks for t in ("slimcandle", "pytorch"))]
    if train_configs:
        print()
        print("Training peak memory, MiB (peak RSS of the run's process, the largest over the "
              "rounds; PyTorch's includes its interpreter and libraries; ratio > 1 means "
              "slimcandle needs less)")
        print()
        print("| config | slimcandle MiB | PyTorch MiB | PyTorch/slimcandle |")
        print("|---|---:|---:|---:|")

    def peak_mib(cfg, tool):
        v = train_peaks.get((cfg, tool))
        return max(v) / 2**20 if v else None

    for cfg in train_configs:
        s, p = peak_mib(cfg, "slimcandle"), peak_mib(cfg, "pytorch")
        print(f"| {cfg} | {fmt(s)} | {fmt(p)} | {ratio(p, s)} |")
    if int8_configs:
        if float_configs:
            print()
        print(f"int8 inference, images/s, {args.agg} of the rounds per cell (the five run one "
              f"after the other in each round). ORT int8 (quantize_static): onnxruntime's own "
              f"QDQ per-channel quantization of our fp32 export; ORT int8 (our export): "
              f"onnxruntime on `slimcandle export` of our int8 checkpoint. The issue's bar: "
              f"ours int8 / ORT int8 >= 1.0x and ours int8 / ours fp32 >= 2x.")
        print()
        print("| config | ours int8 | ORT int8 (quantize_static) | ORT int8 (our export) "
              "| ours fp32 | ORT fp32 | ours int8 / ORT int8 | ours int8 / ours fp32 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for cfg in int8_configs:
        i8, oq, oo, f32, of32 = (get(cfg, k) for k in (
            "slimcandle_int8", "ort_int8_quantize_static", "ort_int8_ours", "slimcandle_fp32",
            "ort_fp32"))
        print(f"| {cfg} | {fmt(i8)} | {fmt(oq)} | {fmt(oo)} | {fmt(f32)} | {fmt(of32)} | "
              f"{ratio(i8, oq)} | {ratio(i8, f32)} |")
    if latency_configs:
        if float_configs or int8_configs:
            print()
        print("batch-1 latency, ms per image (eval mode, fp32), median of the rounds' median "
              "and 95th percentile; ratios are the other tool's median over ours "
              "(above 1: slimcandle is faster)")
        print()
        print("| config | slimcandle median | p95 | onnxruntime median | p95 | PyTorch median | p95 "
              + ("| OpenVINO median | p95 " if has_ov else "")
              + "| vs onnxruntime | per round | vs PyTorch |" + (" vs OpenVINO |" if has_ov else ""))
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if has_ov else ""))
    lat_tools = ("slimcandle", "onnxruntime", "pytorch") + (("openvino",) if has_ov else ())
    for cfg in latency_configs:
        row = {t: (get_ms(cfg, t, "ms_median"), get_ms(cfg, t, "ms_p95")) for t in lat_tools}
        s_med = row["slimcandle"][0]
        cells = " | ".join(f"{ms(m)} | {ms(p)}" for m, p in row.values())
        vs_ov = f" {ratio(row['openvino'][0], s_med)} |" if has_ov else ""
        print(f"| {cfg} | {cells} | {ratio(row['onnxruntime'][0], s_med)} | "
              f"{per_round(cfg, 'onnxruntime', 'slimcandle')} | "
              f"{ratio(row['pytorch'][0], s_med)} |{vs_ov}")
    if peaks:
        peak, cfg, tool = max(peaks)
        print()
        print(f"Largest peak RSS of the int8 rows' runs: {peak / 2**20:,.0f} MiB ({tool}, {cfg})")
    if errors:
        print()
        print("Failed runs:")
        for cfg in sorted(errors, key=lambda c: order.get(c, 0)):
            for e in errors[cfg]:
                print(f"- {cfg}: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
