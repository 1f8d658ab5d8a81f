#!/usr/bin/env python3
"""Times onnxruntime on one ONNX file (a `slimcandle export`), as `slimcandle bench` times our
engine: the same random batch every step, warm-up batches excluded. Prints one JSON object
with `images_per_s`, `ms_per_batch`, `ms_median`, `ms_p95` and `peak_memory` (bytes of the process's peak RSS,
as `slimcandle bench` reports it).

    python3 bench/ort_time.py MODEL.onnx --batch 8 --size 224 [--threads 2] [--warmup 3]
                              [--iterations 10] [--no-spin]
"""

import argparse
import json
import resource
import sys
import time

import numpy as np
import onnxruntime as ort

from latency import latency_ms


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--no-spin", action="store_true", help="idle intra-op threads sleep")
    args = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if args.no_spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(args.model, sess_options=so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size))
    feed = {"input": x.astype(np.float32)}
    for _ in range(args.warmup):
        sess.run(None, feed)
    times = []
    for _ in range(args.iterations):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    seconds = sum(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "images_per_s": args.batch * args.iterations / seconds,
        "ms_per_batch": 1000 * seconds / args.iterations,
        **latency_ms(times),
        "onnxruntime_version": ort.__version__,
        # ru_maxrss is KiB on Linux, bytes on macOS.
        "peak_memory": rss if sys.platform == "darwin" else rss * 1024,
    }))


if __name__ == "__main__":
    main()
