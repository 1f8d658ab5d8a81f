#!/usr/bin/env python3
"""Checks slimcandle's ONNX exports in onnxruntime (issue #13).

For every shared fixture (../shared/fixtures/NAME.safetensors, a PyTorch state dict) the
script imports it with the slimcandle binary, and for one model per family also prunes it
(channels, half the MACs) and quantizes it (int8, calibrated on the synthetic `shapes` data).
Each checkpoint is exported with `slimcandle export` and:

- passes `onnx.checker.check_model(full_check=True)`;
- fp32 and pruned: onnxruntime's logits match `slimcandle forward` within 1e-4
  (|a - b| / max(1, |b|)) on the fixture's 96x96 inputs;
- int8 (QDQ): onnxruntime's logits equal our integer engine's within one quantization step of
  the output on at least 99.9 % of the values, over 64 images, and onnxruntime fuses the
  graph into integer kernels (QLinearConv and friends) when it optimises it.

    python3 bench/verify_onnx.py [--binary target/release/slimcandle] [--fixtures DIR]
                                 [--work DIR] [--only NAME,...]

Exit 0 when every check passes, 1 otherwise; one line per check on stdout.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file, save_file

# fixture name -> slimcandle import options
FIXTURES = {
    "squeezenet1_0": ["--arch", "squeezenet1_0"],
    "squeezenet1_1": ["--arch", "squeezenet1_1"],
    "mobilenet_v1": ["--arch", "mobilenet_v1"],
    "mobilenet_v2": ["--arch", "mobilenet_v2"],
    "mobilenet_v3_small": ["--arch", "mobilenet_v3_small"],
    "mobilenet_v3_large": ["--arch", "mobilenet_v3_large"],
    "shufflenet_v1_g3": ["--arch", "shufflenet_v1", "--groups", "3"],
    "shufflenet_v2_x0_5": ["--arch", "shufflenet_v2_x0_5"],
    "shufflenet_v2_x1_0": ["--arch", "shufflenet_v2_x1_0"],
}
# One per family: these are also pruned and quantized.
FAMILY_REPRESENTATIVES = [
    "squeezenet1_1",
    "mobilenet_v1",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "shufflenet_v1_g3",
    "shufflenet_v2_x0_5",
]
SIZE = 96
FLOAT_TOL = 1e-4
INT8_AGREEMENT = 0.999
INT8_IMAGES = 64


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc.stdout


def session(path, optimize=False, optimized_path=None):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3  # not the warning that a saved optimised model is machine-specific
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ours(binary, ckpt, inputs, work, tag):
    """slimcandle's logits for each input tensor (`slimcandle forward`)."""
    src = os.path.join(work, f"{tag}.in.safetensors")
    dst = os.path.join(work, f"{tag}.out.safetensors")
    save_file(inputs, src)
    run([binary, "forward", ckpt, src, "-o", dst])
    return load_file(dst)


def scaled_error(got, want):
    return float(np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))))


def check_model(path):
    onnx.checker.check_model(onnx.load(path), full_check=True)


def verify_float(binary, ckpt, x, work, tag):
    model = os.path.join(work, f"{tag}.onnx")
    run([binary, "export", ckpt, "-o", model, "--input-size", f"{SIZE},{SIZE}"])
    check_model(model)
    want = ours(binary, ckpt, {"x": x}, work, tag)["x"]
    got = session(model).run(None, {"input": x})[0]
    err = scaled_error(got, want)
    ok = err <= FLOAT_TOL
    print(f"{'ok  ' if ok else 'FAIL'} {tag}: checker passed, onnxruntime vs slimcandle {err:.2e}")
    return ok


def verify_int8(binary, ckpt, x, work, tag):
    model = os.path.join(work, f"{tag}.onnx")
    run([binary, "export", ckpt, "-o", model, "--input-size", f"{SIZE},{SIZE}"])
    check_model(model)
    proto = onnx.load(model)
    inits = {t.name: t for t in proto.graph.initializer}
    ident = next(n for n in proto.graph.node if list(n.output) == ["logits"])
    last = next(n for n in proto.graph.node if list(n.output) == [ident.input[0]])
    out_scale = float(onnx.numpy_helper.to_array(inits[last.input[1]]))
    want = ours(binary, ckpt, {"x": x}, work, tag)["x"]
    optimized = os.path.join(work, f"{tag}.ort.onnx")
    got = session(model, optimize=True, optimized_path=optimized).run(None, {"input": x})[0]
    steps = np.abs(got - want) / out_scale
    within = float(np.mean(steps <= 1.0 + 1e-3))
    fused = sorted({n.op_type for n in onnx.load(optimized).graph.node
                    if n.op_type.startswith(("QLinear", "QGemm"))})
    ok = within >= INT8_AGREEMENT and any(op == "QLinearConv" for op in fused)
    print(
        f"{'ok  ' if ok else 'FAIL'} {tag}: checker passed, {within * 100:.2f}% of "
        f"{steps.size} logits within one step ({out_scale:.3g}), worst {steps.max():.2f} steps; "
        f"fused into {', '.join(fused) or 'nothing'}"
    )
    return ok


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default=os.path.join(root, "target/release/slimcandle"))
    ap.add_argument("--fixtures", default=os.path.join(root, "../shared/fixtures"))
    ap.add_argument("--work", default=None, help="folder for the exports (default: a temp dir)")
    ap.add_argument("--only", default="", help="comma-separated fixture names")
    args = ap.parse_args()
    if not os.path.isdir(args.fixtures):
        print(f"skipping: fixtures folder {args.fixtures} is absent")
        return 0
    work = args.work or tempfile.mkdtemp(prefix="verify-onnx-")
    os.makedirs(work, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(FIXTURES)
    rng = np.random.default_rng(0)
    x_int8 = rng.standard_normal((INT8_IMAGES, 3, SIZE, SIZE)).astype(np.float32)
    results = []
    for name in names:
        io = load_file(os.path.join(args.fixtures, f"{name}.io.safetensors"))
        x = np.ascontiguousarray(io[f"input_{SIZE}"])
        ckpt = os.path.join(work, f"{name}.safetensors")
        run([binary_path(args), "import", *FIXTURES[name], "--num-classes", "10",
             os.path.join(args.fixtures, f"{name}.safetensors"), "-o", ckpt])
        results.append(verify_float(args.binary, ckpt, x, work, f"{name}.fp32"))
        if name not in FAMILY_REPRESENTATIVES:
            continue
        pruned = os.path.join(work, f"{name}.pruned.safetensors")
        run([args.binary, "prune", ckpt, "--criterion", "l1", "--target-macs", "0.5", "-o", pruned])
        results.append(verify_float(args.binary, pruned, x, work, f"{name}.pruned"))
        int8 = os.path.join(work, f"{name}.int8.safetensors")
        run([args.binary, "quantize", ckpt, "--data", "shapes", "--calibration", "32",
             "--test-limit", "10", "--batch-size", "16", "-o", int8])
        results.append(verify_int8(args.binary, int8, x_int8, work, f"{name}.int8"))
    passed = sum(1 for r in results if r)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


def binary_path(args):
    if not os.path.exists(args.binary):
        sys.exit(f"error: no slimcandle binary at {args.binary} (cargo build --release)")
    return args.binary


if __name__ == "__main__":
    sys.exit(main())
