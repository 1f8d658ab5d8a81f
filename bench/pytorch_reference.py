#!/usr/bin/env python3
"""PyTorch (and optionally onnxruntime) reference for `slimcandle bench`.

Runs the same configuration as

    slimcandle bench --arch ARCH [--width W] [--groups G] [--stem cifar] --num-classes 10 \
        --batch N --size S --mode train|infer --warmup K --iterations M --threads T --json

on the CPU, with the same thread count, and prints one JSON object with the same keys
(`images_per_s`, `ms_per_batch`, `ms_median`, `ms_p95`, `threads`, `arch`, `mode`, `batch`,
`size`, `stem`, `iterations`, `peak_memory`) plus a few of its own (`framework`, `params`,
`torch_version`, and with --onnxruntime `onnxruntime_images_per_s`,
`onnxruntime_ms_per_batch`, `onnxruntime_ms_median`, `onnxruntime_ms_p95`; with --openvino the
same under `openvino_`).

What is timed (warm-up batches excluded, the same random batch every step):
  train  model.train(); forward, cross-entropy, backward, SGD step (lr 1e-3, momentum 0.9,
         nesterov, weight decay 5e-4), as slimcandle's bench does.
  infer  model.eval() under torch.inference_mode().
  --onnxruntime (infer only): the eval model exported to ONNX (opset 17, fixed batch shape,
         in a temporary folder) and run by an onnxruntime InferenceSession on the CPU with
         intra_op_num_threads = --threads, inter_op_num_threads = 1, sequential execution,
         all graph optimizations.
  --openvino (infer only): the same ONNX export compiled by OpenVINO for its CPU plugin with
         INFERENCE_NUM_THREADS = --threads, one stream, the LATENCY hint, and f32 inference
         precision (on CPUs with AMX or AVX512-BF16 OpenVINO otherwise runs in bf16, which is
         not the fp32 comparison), run by one synchronous infer request.

Models: torchvision's mobilenet_v2, mobilenet_v3_small/large, shufflenet_v2_x*,
squeezenet1_0/1_1, and MobileNet V1 / ShuffleNet V1 from scripts/make_reference_fixtures.py.
`--stem cifar` reproduces docs/models.md exactly (only strides and pooling change, so the
parameter count is the same as with the ImageNet stem); bench/verify_models.py checks that
against slimcandle, logits included.
"""

import argparse
import importlib.util
import json
import os
import platform
import resource
import sys
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from latency import latency_ms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_fixture_module():
    """scripts/make_reference_fixtures.py, for its MobileNetV1 and ShuffleNetV1 classes.

    Importing it calls torch.set_num_threads(2); main() sets the requested count afterwards.
    """
    path = os.path.join(REPO, "scripts", "make_reference_fixtures.py")
    sys.dont_write_bytecode = True  # leave no __pycache__ in scripts/
    spec = importlib.util.spec_from_file_location("make_reference_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_FIXTURES = None


def fixtures():
    global _FIXTURES
    if _FIXTURES is None:
        _FIXTURES = load_fixture_module()
    return _FIXTURES


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------

# torchvision names that carry their width / groups, as slimcandle accepts them.
ALIASES = {
    "shufflenet_v2_x0_5": ("shufflenet_v2", 0.5, None),
    "shufflenet_v2_x1_0": ("shufflenet_v2", 1.0, None),
    "shufflenet_v2_x1_5": ("shufflenet_v2", 1.5, None),
    "shufflenet_v2_x2_0": ("shufflenet_v2", 2.0, None),
}


def parse_arch(arch: str, width, groups):
    """(family, width, groups) from slimcandle-style --arch/--width/--groups."""
    if arch in ALIASES:
        fam, w, g = ALIASES[arch]
        return fam, (width if width is not None else w), (groups if groups is not None else g)
    if arch.startswith("shufflenet_v1_g"):  # shufflenet_v1_g3, shufflenet_v1_g3_x0_5
        rest = arch[len("shufflenet_v1_g"):].split("_x")
        g = int(rest[0])
        w = float(rest[1].replace("_", ".")) if len(rest) > 1 else None
        return "shufflenet_v1", (width if width is not None else w), (groups or g)
    return arch, width, groups


def variant_name(family: str, width, groups) -> str:
    """Same spelling as `slimcandle models` (e.g. mobilenet_v1_w0_5, shufflenet_v1_g3_x1_0)."""
    if family == "shufflenet_v1":
        w = 1.0 if width is None else width
        return f"shufflenet_v1_g{groups or 3}_x{f'{w:.1f}'.replace('.', '_')}"
    if family == "shufflenet_v2":
        w = 1.0 if width is None else width
        return f"shufflenet_v2_x{f'{w:.1f}'.replace('.', '_')}"
    if family.startswith(("mobilenet",)) and width not in (None, 1.0):
        return f"{family}_w{width:g}".replace(".", "_")
    return family


def _stride1(conv: nn.Conv2d, padding=None) -> None:
    conv.stride = (1, 1)
    if padding is not None:
        conv.padding = (padding, padding)


def build_model(family: str, width=None, groups=None, num_classes=10, stem="imagenet") -> nn.Module:
    tvm = torchvision.models
    w = 1.0 if width is None else width
    cifar = stem == "cifar"
    if family == "mobilenet_v2":
        m = tvm.mobilenet_v2(num_classes=num_classes, width_mult=w)
        if cifar:  # first conv stride 1
            _stride1(m.features[0][0])
    elif family in ("mobilenet_v3_small", "mobilenet_v3_large"):
        m = getattr(tvm, family)(num_classes=num_classes, width_mult=w)
        if cifar:  # first conv stride 1
            _stride1(m.features[0][0])
    elif family == "shufflenet_v2":
        name = {0.5: "shufflenet_v2_x0_5", 1.0: "shufflenet_v2_x1_0",
                1.5: "shufflenet_v2_x1_5", 2.0: "shufflenet_v2_x2_0"}[w]
        m = getattr(tvm, name)(num_classes=num_classes)
        if cifar:  # conv1 stride 1, max pool dropped
            _stride1(m.conv1[0])
            m.maxpool = nn.Identity()
    elif family == "squeezenet1_1":
        m = tvm.squeezenet1_1(num_classes=num_classes)
        if cifar:  # first conv (3x3) stride 1 padding 1, first max pool dropped
            assert isinstance(m.features[0], nn.Conv2d) and isinstance(m.features[2], nn.MaxPool2d)
            _stride1(m.features[0], padding=1)
            m.features[2] = nn.Identity()
    elif family == "squeezenet1_0":
        m = tvm.squeezenet1_0(num_classes=num_classes)
        if cifar:  # first conv (7x7) stride 1 padding 3, first max pool dropped
            assert isinstance(m.features[0], nn.Conv2d) and isinstance(m.features[2], nn.MaxPool2d)
            _stride1(m.features[0], padding=3)
            m.features[2] = nn.Identity()
    elif family == "mobilenet_v1":
        m = fixtures().MobileNetV1(w, num_classes)
        if cifar:  # first conv stride 1
            _stride1(m.features[0][0])
    elif family == "shufflenet_v1":
        m = fixtures().ShuffleNetV1(groups or 3, w, num_classes)
        if cifar:  # first_conv stride 1, max pool dropped
            _stride1(m.first_conv[0])
            m.maxpool = nn.Identity()
    else:
        raise SystemExit(f"pytorch_reference: unknown --arch {family}")
    return m


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def time_loop(step, warmup: int, iterations: int) -> list:
    """Seconds of each timed step, after `warmup` untimed ones."""
    for i in range(warmup):
        step(i)
    times = []
    for i in range(iterations):
        start = time.perf_counter()
        step(warmup + i)
        times.append(time.perf_counter() - start)
    return times


def bench_torch(model, x, labels, mode, warmup, iterations) -> list:
    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True,
                              weight_decay=5e-4)

        def step(_i):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()

        return time_loop(step, warmup, iterations)

    model.eval()

    def step(_i):
        with torch.inference_mode():
            model(x)

    return time_loop(step, warmup, iterations)


def bench_onnxruntime(model, x, threads, warmup, iterations, spin=True) -> dict:
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes the model through it)
        import onnxruntime as ort
    except ImportError as e:
        raise SystemExit(f"pytorch_reference: --onnxruntime needs onnx and onnxruntime "
                         f"(pip install onnx onnxruntime): {e}")
    model.eval()
    with tempfile.TemporaryDirectory(prefix="slimcandle-ort-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        with torch.no_grad():
            export_onnx(model, x, path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:  # idle intra-op threads sleep instead of busy-waiting
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}

    def step(_i):
        sess.run(None, feed)

    return {"times": time_loop(step, warmup, iterations), "version": ort.__version__}


def bench_openvino(model, x, threads, warmup, iterations) -> dict:
    try:
        import openvino as ov
    except ImportError as e:
        raise SystemExit(f"pytorch_reference: --openvino needs openvino (pip install openvino): {e}")
    model.eval()
    core = ov.Core()
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }
    with tempfile.TemporaryDirectory(prefix="slimcandle-ov-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        with torch.no_grad():
            export_onnx(model, x, path)
        compiled = core.compile_model(path, "CPU", config)
    request = compiled.create_infer_request()
    feed = {0: x.numpy()}

    def step(_i):
        request.infer(feed)

    return {"times": time_loop(step, warmup, iterations), "version": ov.__version__}


def export_onnx(model, x, path) -> None:
    common = dict(input_names=["input"], output_names=["logits"], opset_version=17)
    try:
        # The TorchScript exporter needs only `onnx` (the dynamo one needs onnxscript too).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation notice
            torch.onnx.export(model, (x,), path, dynamo=False, **common)
    except TypeError:  # torch without the dynamo= keyword
        torch.onnx.export(model, (x,), path, **common)


def peak_memory() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS); slimcandle reports VmHWM in bytes.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--width", type=float)
    ap.add_argument("--groups", type=int)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--mode", choices=["train", "infer"], default="train")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--onnxruntime", action="store_true",
                    help="infer mode: also time the exported model in onnxruntime")
    ap.add_argument("--onnxruntime-no-spin", action="store_true",
                    help="onnxruntime: session.intra_op.allow_spinning=0 (the counterpart of "
                         "OMP_WAIT_POLICY=PASSIVE for PyTorch; helps on a busy machine)")
    ap.add_argument("--openvino", action="store_true",
                    help="infer mode: also time the exported model in OpenVINO (CPU, f32)")
    ap.add_argument("--no-torch", action="store_true",
                    help="with --onnxruntime or --openvino: time only those")
    ap.add_argument("--json", action="store_true", help="accepted for symmetry; output is always JSON")
    args = ap.parse_args()
    if (args.onnxruntime or args.openvino) and args.mode != "infer":
        ap.error("--onnxruntime and --openvino are for --mode infer only")
    if args.no_torch and not (args.onnxruntime or args.openvino):
        ap.error("--no-torch needs --onnxruntime or --openvino")

    family, width, groups = parse_arch(args.arch, args.width, args.groups)
    if family == "shufflenet_v1" and groups is None:
        groups = 3
    model = build_model(family, width, groups, args.num_classes, args.stem)  # imports fixtures
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already fixed by earlier parallel work; eager CPU ops use intra-op threads only
    torch.set_num_threads(args.threads)

    torch.manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.arange(args.batch) % args.num_classes

    out = {
        "framework": "pytorch",
        "arch": variant_name(family, width, groups),
        "stem": args.stem,
        "mode": args.mode,
        "batch": args.batch,
        "size": args.size,
        "num_classes": args.num_classes,
        "warmup": args.warmup,
        "iterations": args.iterations,
        "threads": torch.get_num_threads(),
        "params": count_params(model),
        "torch_version": torch.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(),
    }
    def timing(prefix, times):
        """The timing keys of one tool's per-batch times, under `prefix`."""
        seconds = sum(times)
        out[f"{prefix}images_per_s"] = args.batch * args.iterations / seconds
        out[f"{prefix}ms_per_batch"] = 1000.0 * seconds / args.iterations
        out.update({f"{prefix}{k}": v for k, v in latency_ms(times).items()})

    if not args.no_torch:
        timing("", bench_torch(model, x, labels, args.mode, args.warmup, args.iterations))
    if args.onnxruntime:
        r = bench_onnxruntime(model, x, args.threads, args.warmup, args.iterations,
                              spin=not args.onnxruntime_no_spin)
        timing("onnxruntime_", r["times"])
        out["onnxruntime_version"] = r["version"]
        out["onnxruntime_threads"] = args.threads
        out["onnxruntime_spinning"] = not args.onnxruntime_no_spin
    if args.openvino:
        r = bench_openvino(model, x, args.threads, args.warmup, args.iterations)
        timing("openvino_", r["times"])
        out["openvino_version"] = r["version"]
        out["openvino_threads"] = args.threads
    out["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
    out["peak_memory"] = peak_memory()
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
