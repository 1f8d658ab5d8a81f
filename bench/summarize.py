#!/usr/bin/env python3
"""Turn the JSON lines written by bench/compare.sh into its Markdown table.

Each input line: {"config": LABEL, "order": N, "tool": "slimcandle"|"pytorch", "round": R,
"result": {...the tool's JSON...}} or, for a failed run, "error": "...".

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
    errors = {}
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
            if rec["tool"] == "slimcandle":
                vals.setdefault((cfg, "slimcandle"), []).append(r["images_per_s"])
            else:
                if "images_per_s" in r:
                    vals.setdefault((cfg, "pytorch"), []).append(r["images_per_s"])
                if "onnxruntime_images_per_s" in r:
                    vals.setdefault((cfg, "onnxruntime"), []).append(r["onnxruntime_images_per_s"])

    def get(cfg, key):
        v = vals.get((cfg, key))
        return agg(v) if v else None

    print(f"images/s, {args.agg} of {len(rounds)} round(s) per cell "
          f"(slimcandle and PyTorch run in alternation; ratio > 1 means slimcandle is faster)")
    print()
    print("| config | slimcandle img/s | PyTorch img/s | slimcandle/PyTorch | onnxruntime img/s | slimcandle/onnxruntime |")
    print("|---|---:|---:|---:|---:|---:|")
    for cfg in sorted(order, key=order.get):
        s, p, o = get(cfg, "slimcandle"), get(cfg, "pytorch"), get(cfg, "onnxruntime")
        infer = cfg.startswith("infer")
        print(f"| {cfg} | {fmt(s)} | {fmt(p)} | {ratio(s, p)} | "
              f"{fmt(o) if infer else ''} | {ratio(s, o) if infer else ''} |")
    if errors:
        print()
        print("Failed runs:")
        for cfg in sorted(errors, key=lambda c: order.get(c, 0)):
            for e in errors[cfg]:
                print(f"- {cfg}: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
