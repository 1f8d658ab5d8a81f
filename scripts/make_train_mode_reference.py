#!/usr/bin/env python3
"""Generate train-mode + autograd reference fixtures for `tests/train_mode.rs`.

For each model NAME it loads the PyTorch state dict (the small ones committed in
tests/fixtures, the torchvision ones from the shared fixtures), sets every Dropout's p to 0,
puts the model in train mode and runs one forward/backward:

    x = N(0, 1) of shape 4x3x40x40          (seeded)
    r = N(0, 1) of shape 4x10               (seeded)
    logits = model(x)                       (batch statistics; running stats updated)
    loss = (logits * r).sum(); loss.backward()

and writes tests/fixtures/train_mode/NAME.safetensors with:

    input, r, logits
    <bn>.running_mean, <bn>.running_var     for the first, a middle and the last BatchNorm,
                                            as they are after the forward
    grad.<param>                            for a few parameters: first conv, a depthwise /
                                            grouped conv, a BatchNorm weight, the classifier
                                            (and a few extras that exercise SE, hardswish ...)

The module definitions of MobileNet V1 and ShuffleNet V1 come from make_reference_fixtures.py.
Each model keeps its own BatchNorm momentum (torchvision's MobileNet V3 uses 0.01, the others
0.1), which is part of what the Rust side must reproduce.

The reference is computed in float64 (the float32 weights and input widened exactly) and stored
rounded to float32. Gradients through ReLU/ReLU6 are discontinuous where a pre-activation is 0
(or 6): with ~10^5-10^6 activations per model, some lie within float32 noise (~1e-6..1e-5) of a
kink, and whether float32 rounding puts them on one side or the other changes early-layer
gradients by up to a few percent. A float32 reference would therefore be an arbitrary pick
between equally valid answers; float64 makes it the exact answer (kink flips need |x| < ~1e-13).
The script prints how far PyTorch's own float32 run is from it, to show that conditioning.

Usage:
  make_train_mode_reference.py [--shared /work/shared/fixtures] [--out tests/fixtures/train_mode]
"""

import argparse
import os
import sys
import zlib

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import make_reference_fixtures as ref  # noqa: E402  (sets torch threads to 2)

BATCH = 4
SIZE = 40
NUM_CLASSES = 10
MAX_FILE_BYTES = 300 * 1024

# name -> (where the state dict lives, builder, parameters whose gradients are stored).
# The BatchNorm weight of the middle BatchNorm is added automatically.
MODELS = {
    "mobilenet_v1_w0_25": ("local", ref.EXTRA["mobilenet_v1_w0_25"], [
        "features.0.0.weight",       # first conv
        "features.1.0.weight",       # depthwise
        "features.13.0.weight",      # depthwise, last block
        "fc.weight",
        "fc.bias",
    ]),
    "shufflenet_v1_g3_w0_5": ("local", ref.EXTRA["shufflenet_v1_g3_w0_5"], [
        "first_conv.0.weight",       # first conv (before the overlapping max pool)
        "first_conv.1.weight",       # BN before the max pool
        "features.0.branch_main_1.0.weight",  # dense 1x1 of the first unit (avg-pool shortcut)
        "features.0.branch_main_1.3.weight",  # depthwise
        "features.5.branch_main_2.0.weight",  # grouped 1x1 (g=3)
        "classifier.0.weight",
    ]),
    "mobilenet_v3_small": ("shared", ref.SHARED["mobilenet_v3_small"], [
        "features.0.0.weight",       # first conv (hardswish)
        "features.1.block.0.0.weight",  # depthwise
        "features.1.block.1.fc2.bias",  # SE, hardsigmoid
        "features.4.block.2.fc1.weight",  # SE fc1
        "classifier.0.bias",         # hardswish in the head
        "classifier.3.weight",
    ]),
    "shufflenet_v2_x0_5": ("shared", ref.SHARED["shufflenet_v2_x0_5"], [
        "conv1.0.weight",            # first conv (before the overlapping max pool)
        "conv1.1.weight",            # BN before the max pool
        "stage2.0.branch1.0.weight",  # depthwise
        "stage4.3.branch2.3.weight",  # depthwise, last stage
        "fc.weight",
    ]),
    "squeezenet1_1": ("shared", ref.SHARED["squeezenet1_1"], [
        "features.0.weight",         # first conv (before the ceil-mode max pool)
        "features.0.bias",
        "features.3.squeeze.weight",
        "features.3.expand3x3.weight",
        "classifier.1.weight",       # classifier (a 1x1 conv)
        "classifier.1.bias",
    ]),
    "mobilenet_v2": ("shared", ref.SHARED["mobilenet_v2"], [
        "features.0.0.weight",       # first conv
        "features.1.conv.0.0.weight",  # depthwise
        "features.17.conv.1.0.weight",  # depthwise, last block
        "classifier.1.weight",
        "classifier.1.bias",
    ]),
}


def seed_for(name: str) -> int:
    return zlib.crc32(f"train_mode/{name}".encode())


def make(name: str, where: str, build, params, shared_dir: str, out_dir: str) -> None:
    src = os.path.join(ROOT, "tests", "fixtures") if where == "local" else shared_dir
    path = os.path.join(src, f"{name}.safetensors")
    if not os.path.isfile(path):
        print(f"skipped {name}: {path} not found")
        return
    state = load_file(path)
    model = build(NUM_CLASSES)
    model.load_state_dict(state, strict=True)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    bns = [(k, m) for k, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    chosen_bns = [bns[0][0], bns[len(bns) // 2][0], bns[-1][0]] if bns else []
    named = dict(model.named_parameters())
    params = list(params)
    if bns:
        params.insert(2, f"{chosen_bns[1]}.weight")
    for p in params:
        assert p in named, f"{name}: no parameter {p}"

    gen = torch.Generator().manual_seed(seed_for(name))
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)
    r = torch.randn(BATCH, NUM_CLASSES, generator=gen)

    def run(dtype):
        """One train-mode forward/backward from the file's weights; the stored tensors."""
        model.load_state_dict(state, strict=True)  # fresh running statistics
        model.to(dtype)
        model.train()
        model.zero_grad(set_to_none=True)
        logits = model(x.to(dtype))
        assert logits.shape == (BATCH, NUM_CLASSES), logits.shape
        assert torch.isfinite(logits).all(), name
        (logits * r.to(dtype)).sum().backward()
        out = {"logits": logits.detach()}
        for bn in chosen_bns:
            m = dict(bns)[bn]
            out[f"{bn}.running_mean"] = m.running_mean.detach().clone()
            out[f"{bn}.running_var"] = m.running_var.detach().clone()
        for p in params:
            g = named[p].grad
            assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, f"{name}: bad grad for {p}"
            out[f"grad.{p}"] = g.detach().clone()
        return out

    f32 = run(torch.float32)
    ref64 = run(torch.float64)
    # How far PyTorch's own float32 run is from the float64 reference, in the units the Rust
    # test uses (scaled by max(1, |ref|) elementwise for logits/stats, by max(1, max|ref|) for
    # gradients).
    worst = {"logits": 0.0, "stats": 0.0, "grads": 0.0}
    for k, v in ref64.items():
        d = (f32[k].double() - v).abs()
        if k.startswith("grad."):
            e = (d.max() / v.abs().max().clamp(min=1.0)).item()
            kind = "grads"
        else:
            e = (d / v.abs().clamp(min=1.0)).max().item()
            kind = "logits" if k == "logits" else "stats"
        worst[kind] = max(worst[kind], e)
    out = {"input": x, "r": r, **ref64}
    out = {k: v.contiguous().float() for k, v in out.items()}
    logits = ref64["logits"]
    momenta = sorted({m.momentum for _, m in bns})
    meta = {
        "source": os.path.relpath(path, ROOT) if where == "local" else f"shared/fixtures/{name}.safetensors",
        "bn_momentum": ",".join(str(mo) for mo in momenta),
        "torch": torch.__version__,
        "computed_in": "float64",
    }
    dst = os.path.join(out_dir, f"{name}.safetensors")
    save_file(out, dst, metadata=meta)
    size = os.path.getsize(dst)
    assert size < MAX_FILE_BYTES, f"{dst} is {size} bytes"
    print(f"wrote {name:22s} {size / 1024:6.1f} KB  bns={chosen_bns} momentum={momenta} "
          f"grads={len(params)} logit_spread={(logits[0] - logits[1]).abs().max().item():.3f}")
    print(f"      torch float32 vs float64: logits {worst['logits']:.1e} stats {worst['stats']:.1e} "
          f"grads {worst['grads']:.1e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(ROOT), "shared", "fixtures"),
                    help="folder of the shared torchvision fixtures (default ../shared/fixtures)")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "train_mode"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    for name, (where, build, params) in MODELS.items():
        make(name, where, build, params, args.shared, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
