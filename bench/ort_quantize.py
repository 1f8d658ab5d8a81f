#!/usr/bin/env python3
"""Quantizes a float ONNX file (a `slimcandle export`) with onnxruntime's own tool,
`onnxruntime.quantization.quantize_static`, in the scheme slimcandle uses: QDQ format, weights
int8 symmetric per output channel, activations uint8 affine per tensor, min/max calibration.
This is the onnxruntime int8 baseline of compare.sh's int8 rows: the same network, quantized
the way an onnxruntime user would quantize it.

    python3 bench/ort_quantize.py FP32.onnx -o INT8.onnx --size 32 [--calibration-batches 4]
                                  [--calibration-batch 16] [--seed 0]

Calibration runs on seeded standard-normal images (the timing input of ort_time.py is of the
same kind; for speed only the graph matters, not how good the ranges are). It runs in batches
of --calibration-batch whatever the model's batch: onnxruntime's calibrator keeps every
intermediate tensor of every batch, which at batch 500 would take gigabytes. To allow that, the
input's batch dimension is made symbolic for pre-processing and calibration, and set back to
the original one in the output, so the int8 file has the float file's fixed input shape.

Before quantizing, the model goes through `quant_pre_process` (shape inference and
onnxruntime's basic graph optimizations, which fold batch norm into the convolutions), as
onnxruntime's documentation recommends; without it the batch norms stay in float between
quantized convolutions and the result is not what a user would deploy.
"""

import argparse
import os
import sys
import tempfile

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process


class RandomImages(CalibrationDataReader):
    """`batches` seeded standard-normal batches of `batch` x 3 x size x size, fed as `name`."""

    def __init__(self, name, batches, batch, size, seed):
        rng = np.random.default_rng(seed)
        self.data = [
            {name: rng.standard_normal((batch, 3, size, size)).astype(np.float32)}
            for _ in range(batches)
        ]
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.data):
            return None
        self.pos += 1
        return self.data[self.pos - 1]

    def rewind(self):
        self.pos = 0


def set_batch(model, batch):
    """Sets dimension 0 of every graph input and output to `batch` (an int, or a name for a
    symbolic dimension), and drops the inferred intermediate shapes, which would otherwise
    still carry the old batch."""
    for v in list(model.graph.input) + list(model.graph.output):
        d = v.type.tensor_type.shape.dim[0]
        if isinstance(batch, int):
            d.dim_value = batch
        else:
            d.dim_param = batch
    del model.graph.value_info[:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="float ONNX file")
    ap.add_argument("-o", "--output", required=True, help="int8 QDQ ONNX file to write")
    ap.add_argument("--size", type=int, required=True, help="input height and width")
    ap.add_argument("--calibration-batches", type=int, default=4)
    ap.add_argument("--calibration-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.calibration_batches < 1 or args.calibration_batch < 1:
        ap.error("--calibration-batches and --calibration-batch must be at least 1")
    try:
        model = onnx.load(args.model)
    except Exception as e:  # noqa: BLE001  (any load failure is the same one-line error)
        print(f"ort_quantize: cannot read {args.model}: {e}", file=sys.stderr)
        return 1
    if len(model.graph.input) != 1:
        print(f"ort_quantize: {args.model} has {len(model.graph.input)} inputs, expected 1",
              file=sys.stderr)
        return 1
    name = model.graph.input[0].name
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    batch = dim0.dim_value if dim0.HasField("dim_value") else None

    with tempfile.TemporaryDirectory(prefix="slimcandle-ortq-") as tmp:
        dynamic = os.path.join(tmp, "dynamic.onnx")
        pre = os.path.join(tmp, "pre.onnx")
        quant = os.path.join(tmp, "int8.onnx")
        set_batch(model, "batch")
        onnx.save(model, dynamic)
        quant_pre_process(dynamic, pre)
        quantize_static(
            pre, quant,
            RandomImages(name, args.calibration_batches, args.calibration_batch, args.size,
                         args.seed),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        out = onnx.load(quant)
        if batch is not None:
            set_batch(out, batch)
        onnx.checker.check_model(out)
        # Written whole to a temporary name first, so a failure leaves no partial output file.
        partial = args.output + ".partial"
        onnx.save(out, partial)
        os.replace(partial, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
