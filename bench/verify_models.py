#!/usr/bin/env python3
"""Check that bench/pytorch_reference.py builds the same networks as `slimcandle bench`.

For each benchmarked model (or those named on the command line):
  1. params of the PyTorch ImageNet-stem 1000-class model == `slimcandle models --json`;
  2. params of the PyTorch small-input-stem (`--stem cifar`) 10-class model == those of its
     ImageNet-stem twin (the stem changes only strides and pooling);
  3. that 10-class cifar-stem state dict (random weights, BatchNorm statistics made
     non-trivial) imports with `slimcandle import --stem cifar --num-classes 10` (every key and
     shape checked), and the params and the MACs at 32x32 that slimcandle reports equal
     PyTorch's (the MACs differ if a stride or a pooling differs);
  4. `slimcandle forward` on the imported checkpoint gives PyTorch's eval-mode logits on a
     2x3x32x32 batch within --tol (this pins down every stride, padding and pooling).

Usage: python3 bench/verify_models.py [--slimcandle PATH] [NAME ...]
Exit code 1 when any check fails. Runs in a few seconds per model.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree
import pytorch_reference as pr  # noqa: E402

# name in `slimcandle models` -> (slimcandle/pytorch_reference --arch args)
MODELS = {
    "mobilenet_v2": ["--arch", "mobilenet_v2"],
    "mobilenet_v3_small": ["--arch", "mobilenet_v3_small"],
    "shufflenet_v2_x1_0": ["--arch", "shufflenet_v2", "--width", "1.0"],
    "shufflenet_v1_g3_x1_0": ["--arch", "shufflenet_v1", "--groups", "3", "--width", "1.0"],
    "squeezenet1_1": ["--arch", "squeezenet1_1"],
    "mobilenet_v1_w0_5": ["--arch", "mobilenet_v1", "--width", "0.5"],
}


def arch_tuple(argv):
    d = dict(zip(argv[::2], argv[1::2]))
    width = float(d["--width"]) if "--width" in d else None
    groups = int(d["--groups"]) if "--groups" in d else None
    return pr.parse_arch(d["--arch"], width, groups)


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr}")
    return r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"subset of {', '.join(MODELS)}")
    ap.add_argument("--slimcandle", default=os.path.join(pr.REPO, "target", "release", "slimcandle"))
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    names = args.names or list(MODELS)
    for n in names:
        if n not in MODELS:
            ap.error(f"unknown model {n}; known: {', '.join(MODELS)}")
    torch.set_num_threads(2)
    fx = pr.fixtures()
    catalog = {m["name"]: m for m in json.loads(run([args.slimcandle, "models", "--json"]))["models"]}

    failures = 0
    with tempfile.TemporaryDirectory(prefix="slimcandle-verify-") as tmp:
        for name in names:
            family, width, groups = arch_tuple(MODELS[name])
            checks = []

            p1000 = pr.count_params(pr.build_model(family, width, groups, 1000, "imagenet"))
            checks.append(("params 1000 cls (imagenet stem) vs `slimcandle models`",
                           p1000, catalog[name]["params"]))

            torch.manual_seed(fx.seed_for(name))
            model = pr.build_model(family, width, groups, 10, "cifar")
            p10_img = pr.count_params(pr.build_model(family, width, groups, 10, "imagenet"))
            p10 = pr.count_params(model)
            checks.append(("params 10 cls: cifar stem vs imagenet stem (PyTorch)", p10, p10_img))

            fx.widen_classifier(model)
            fx.randomize_batchnorm(model)  # leaves the model in eval mode
            sd = os.path.join(tmp, f"{name}.sd.safetensors")
            ck = os.path.join(tmp, f"{name}.ckpt.safetensors")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sd)
            imp = json.loads(run([args.slimcandle, "import", *MODELS[name], "--stem", "cifar",
                                  "--num-classes", "10", sd, "-o", ck, "--json"]))
            checks.append(("params 10 cls cifar stem: PyTorch vs slimcandle import", p10, imp["params"]))
            checks.append(("MACs at 32x32 cifar stem: PyTorch vs slimcandle import",
                           fx.count_macs(model, 32), imp["macs"]))

            x = torch.randn(2, 3, 32, 32)
            with torch.no_grad():
                ref = model(x)
            xin = os.path.join(tmp, f"{name}.in.safetensors")
            xout = os.path.join(tmp, f"{name}.out.safetensors")
            save_file({"x": x.contiguous()}, xin)
            run([args.slimcandle, "--threads", "2", "forward", ck, xin, "-o", xout])
            got = load_file(xout)["x"]
            diff = (got - ref).abs().max().item() if got.shape == ref.shape else float("inf")
            spread = (ref[0] - ref[1]).abs().max().item()

            ok_all = True
            for label, a, b in checks:
                ok = a == b
                ok_all &= ok
                print(f"{'ok  ' if ok else 'FAIL'} {name:22s} {label}: {a} / {b}")
            ok = diff <= args.tol
            ok_all &= ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:22s} logits 2x3x32x32 cifar stem: "
                  f"max|diff| {diff:.2e} (tol {args.tol:g}, logit spread {spread:.2f})")
            failures += not ok_all
    print(f"{len(names) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
