#!/usr/bin/env python3
"""Finds the first node where our int8 engine and onnxruntime's fused QDQ graph disagree.

Exposes every `<node>.quantized` tensor of an int8 export as a graph output (onnxruntime still
fuses the graph into QLinearConv / QLinearAdd ...), runs it on 64 random 96x96 images (the
inputs of bench/verify_onnx.py), runs `slimcandle forward` with SLIMCANDLE_INT8_DUMP on the
same images, and prints, in graph order, how many codes of each node differ.

    python3 bench/int8_layers.py CHECKPOINT.int8.safetensors EXPORT.onnx [--binary PATH]

(bench/verify_onnx.py --work DIR leaves both in DIR as NAME.int8.safetensors / NAME.int8.onnx.)
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from safetensors.numpy import save_file


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("onnx")
    ap.add_argument("--binary", default=os.path.join(root, "target/release/slimcandle"))
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    for path, flag in ((args.checkpoint, "CHECKPOINT"), (args.onnx, "EXPORT"), (args.binary, "--binary")):
        if not os.path.exists(path):
            print(f"error: {flag} {path} does not exist", file=sys.stderr)
            return 2
    work = tempfile.mkdtemp(prefix="int8-layers-")
    x = np.random.default_rng(0).standard_normal((args.images, 3, 96, 96)).astype(np.float32)

    model = onnx.load(args.onnx)
    names = [o for n in model.graph.node if n.op_type == "QuantizeLinear" for o in n.output]
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.UINT8, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    theirs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))

    save_file({"x": x}, os.path.join(work, "in.safetensors"))
    dump = os.path.join(work, "dump")
    os.makedirs(dump)
    proc = subprocess.run(
        [args.binary, "forward", args.checkpoint, os.path.join(work, "in.safetensors"),
         "-o", os.path.join(work, "out.safetensors")],
        env=dict(os.environ, SLIMCANDLE_INT8_DUMP=dump), capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"error: slimcandle forward failed: {proc.stderr.strip()}", file=sys.stderr)
        return 1

    first = None
    for name in names:
        node = name[: -len(".quantized")]
        path = os.path.join(dump, f"{node}.u8")
        if not os.path.exists(path):
            continue  # computed by a float layer, or the output
        want = theirs[name]
        ours = np.fromfile(path, np.uint8)
        if want.ndim == 4:  # our dump is channels-last
            n, c, h, w = want.shape
            ours = ours.reshape(n, h, w, c).transpose(0, 3, 1, 2)
        else:
            ours = ours.reshape(want.shape)
        d = np.abs(ours.astype(np.int32) - want.astype(np.int32))
        differ = int((d > 0).sum())
        images = int((d.reshape(d.shape[0], -1).max(axis=1) > 0).sum())
        if differ and first is None:
            first = node
        print(f"{node:32s} {differ:9d} of {d.size:9d} codes differ, max {int(d.max())}, in {images} images")
    print(f"first node that differs: {first}" if first else "every node is bit-identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
